"""Stabilisers and sampling tricks: reward normalisation and clipping, advantage clipping,
high-entropy token selection, DAPO's dynamic-sampling group filter and overlong filtering.

Pure torch functions (and one small running-statistics object) without I/O or models.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightrft_mm.algorithms.presets import REWARD_NORMS
from lightrft_mm.algorithms.tokens import SumAcross, masked_moments


class RunningMoments:
    """Running mean and std of every value seen so far (Chan et al.'s parallel update).

    Used for ``reward_norm=running``: rewards are normalised by statistics over the whole
    run, so a batch's rewards keep their absolute meaning across steps.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: Tensor) -> tuple[float, float]:
        """Fold ``values`` (any shape) in; returns the new (mean, population std)."""
        x = values.detach().double().flatten()
        if x.numel():
            mean = float(x.mean())
            self.merge(int(x.numel()), mean, float(((x - mean) ** 2).mean()))
        return self.mean, self.std

    def merge(self, n: int, batch_mean: float, batch_var: float) -> tuple[float, float]:
        """Fold in a batch given by its size, mean and population variance (data parallel: the
        moments of every rank's batch); returns the new (mean, population std)."""
        if n:
            total = self.count + n
            delta = batch_mean - self.mean
            self.mean += delta * n / total
            self.m2 += batch_var * n + delta * delta * self.count * n / total
            self.count = total
        return self.mean, self.std

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0


def normalize_rewards(rewards: Tensor, valid: Tensor, mode: str, *, running: RunningMoments | None = None,
                      clip: float = 0.0, eps: float = 1e-6, sum_across: SumAcross | None = None) -> Tensor:
    """Normalise rewards to zero mean and unit std, then clip them to ``[-clip, clip]``.

    ``batch``: statistics of this batch's valid rewards; ``running``: of every valid reward so
    far (``running`` is updated with this batch first); ``none``: only the clip. Rewards where
    ``valid`` is False are returned unchanged (they are left out of the loss anyway).

    Args:
        rewards: [B, G] rewards.
        valid: [B, G] bool, which rewards are real.
        mode: one of ``REWARD_NORMS``.
        running: the run's ``RunningMoments`` (required for ``running``).
        clip: clip bound after normalisation; 0 = no clip.
        eps: added to the std.
        sum_across: data parallel: the batch (and the running statistics) are every rank's
            (see ``masked_moments``).

    Returns:
        [B, G] float rewards.
    """
    if mode not in REWARD_NORMS:
        raise ValueError(f"normalize_rewards: unknown mode {mode!r}; expected one of {', '.join(REWARD_NORMS)}")
    out = rewards.float()
    v = valid.bool()
    if mode != "none":
        mean, var, count = masked_moments(out.double() if mode == "running" else out, v, sum_across=sum_across)
        if mode == "running":
            if running is None:
                raise ValueError("normalize_rewards: mode 'running' needs a RunningMoments")
            mean, std = running.merge(int(count), float(mean), float(var))
        else:
            std = var.sqrt()
        out = (out - mean) / (std + eps)
    if clip > 0:
        out = out.clamp(-clip, clip)
    return torch.where(v, out, rewards.float())


def clip_advantages(advantages: Tensor, clip: float) -> Tensor:
    """Clip advantages to ``[-clip, clip]`` (0 = unchanged): one outlier cannot dominate a step."""
    if clip < 0:
        raise ValueError(f"clip_advantages: clip must be >= 0, got {clip}")
    return advantages.clamp(-clip, clip) if clip > 0 else advantages


def high_entropy_mask(entropy: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """The top-``ratio`` highest-entropy counted tokens (Wang et al. 2025, arXiv 2506.01939).

    Only the "forking" tokens, where the policy is uncertain, carry the policy gradient; the
    paper trains on the top 20% per batch. ``k = ceil(ratio * counted)`` tokens are kept (at
    least one when any token counts); ties at the threshold are broken by position.

    Args:
        entropy: [N, T] per-token entropies.
        mask: [N, T] counted tokens.
        ratio: fraction in (0, 1]; 1 keeps every counted token.

    Returns:
        [N, T] bool, a subset of ``mask``.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"high_entropy_mask: ratio must be in (0, 1], got {ratio}")
    m = mask.bool()
    counted = int(m.sum())
    if ratio == 1.0 or counted == 0:
        return m
    k = max(1, math.ceil(ratio * counted))
    scores = torch.where(m, entropy.detach().float(), torch.full_like(entropy, -math.inf, dtype=torch.float32))
    top = torch.topk(scores.flatten(), k).indices
    selected = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
    selected[top] = True
    return selected.view_as(m) & m


def high_entropy_threshold(entropy: Tensor, mask: Tensor, ratio: float, *,
                           gather: Callable[[Tensor], list[Tensor]] | None = None) -> float:
    """The entropy above which a token is among the top-``ratio`` of a whole mini-batch.

    ``high_entropy_mask`` decides within one tensor; when the mini-batch is split into
    micro-batches (or over ranks) the threshold must still be the whole mini-batch's, so it is
    computed once here and each part selects ``entropy >= threshold``.

    Args:
        entropy: [N, T] this rank's mini-batch entropies.
        mask: [N, T] counted tokens.
        ratio: fraction in (0, 1].
        gather: data parallel: returns every rank's tensor (the strategy's ``gather``).

    Returns:
        The k-th largest counted entropy, k = ceil(ratio * counted) over every rank (-inf when
        nothing is counted or ratio is 1).
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"high_entropy_threshold: ratio must be in (0, 1], got {ratio}")
    values = entropy.detach().float()[mask.bool()].cpu()
    if gather is not None:
        values = torch.cat(gather(values))
    if ratio == 1.0 or values.numel() == 0:
        return -math.inf
    k = max(1, math.ceil(ratio * values.numel()))
    return float(torch.topk(values, k).values[-1])


def informative_groups(rewards: Tensor, valid: Tensor) -> Tensor:
    """DAPO dynamic sampling (arXiv 2503.14476): groups whose valid rewards are not all equal.

    A group where every completion scored the same has zero advantage and no policy gradient;
    DAPO drops it and samples more prompts instead.

    Args:
        rewards: [B, G].
        valid: [B, G] bool.

    Returns:
        [B] bool, True for groups with at least two different valid rewards.
    """
    v = valid.bool()
    high = torch.where(v, rewards, torch.full_like(rewards, -math.inf)).max(dim=1).values
    low = torch.where(v, rewards, torch.full_like(rewards, math.inf)).min(dim=1).values
    return (v.sum(dim=1) >= 2) & (high > low)


def finished(completion_ids: Tensor, eos_id: int) -> Tensor:
    """[N] bool: the completion ended with end-of-turn (False = cut at the token budget).

    DAPO's overlong filtering leaves the truncated ones out of the loss: their reward judges
    an unfinished answer.
    """
    return (completion_ids == eos_id).any(dim=1)
