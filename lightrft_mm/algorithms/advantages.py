"""Advantage estimators of the critic-free policy-gradient family.

Rewards arrive as [B, G] (B prompts, G completions each, group-major rows); advantages leave
as [N, T] per token (N = B * G), because REINFORCE++ gives each token its own value. The
sequence-level estimators broadcast one advantage over the completion's tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightrft_mm.algorithms.presets import ADVANTAGES
from lightrft_mm.algorithms.tokens import SumAcross, masked_whiten


def _check_rewards(rewards: Tensor) -> Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; a reward function returned a bad value")
    return rewards


def group_advantages(rewards: Tensor, *, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO: each reward minus its group's mean, optionally over the group's std.

    ``A_i = (r_i - mean(r)) / (std(r) + eps)`` (GRPO, arXiv 2402.03300), or ``r_i - mean(r)``
    without the std (Dr. GRPO, arXiv 2503.20783: the std favours too easy and too hard prompts).
    The std is the sample std (Bessel's correction), as in the GRPO reference code. Groups whose
    rewards are all equal carry no learning signal and get exactly 0, also for G = 1.

    Args:
        rewards: [B, G] rewards of the G completions of each of B prompts.
        scale_by_std: divide the centred rewards by (group std + eps).
        eps: added to the std so near-constant groups do not blow up.

    Returns:
        [B, G] advantages, float dtype of ``rewards`` (integers become float32).
    """
    rewards = _check_rewards(rewards)
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
    # Float rounding of the mean can leave ~1e-8 residues; constant groups must be exactly 0.
    return advantages.masked_fill(constant, 0.0)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO: each reward minus the mean of the *other* completions of its prompt.

    ``A_i = r_i - (sum_j r_j - r_i) / (G - 1) = G / (G - 1) * (r_i - mean(r))`` (Kool et al.
    2019; Ahmadian et al. 2024, arXiv 2402.14740). Unbiased, since the baseline of a sample
    does not depend on it.

    Args:
        rewards: [B, G] with G >= 2.

    Returns:
        [B, G] advantages.
    """
    rewards = _check_rewards(rewards)
    g = rewards.shape[1]
    if g < 2:
        raise ValueError("rloo_advantages needs at least 2 completions per prompt (rollout.n >= 2)")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - others


def token_returns(seq_rewards: Tensor, mask: Tensor, token_rewards: Tensor | None = None) -> Tensor:
    """Reward-to-go per token with discount 1: the sequence reward sits on the last counted token.

    ``G_t = sum_{s >= t} r_s`` with ``r_s = token_rewards[s] + [s is last] * seq_reward``.

    Args:
        seq_rewards: [N] one reward per completion.
        mask: [N, T] counted tokens (right-padded: ones, then zeros).
        token_rewards: [N, T] per-token rewards (e.g. minus the KL penalty), or None.

    Returns:
        [N, T] returns, 0 outside the mask.
    """
    m = mask.bool()
    if seq_rewards.shape != m.shape[:1]:
        raise ValueError(f"token_returns: seq_rewards {tuple(seq_rewards.shape)} must be [N] for mask "
                         f"{tuple(m.shape)}")
    counts = m.long().cumsum(dim=1)
    last = m & (counts == counts[:, -1:])
    seq = seq_rewards.to(device=m.device, dtype=torch.float32).unsqueeze(1)
    per_token = torch.where(last, seq, torch.zeros(m.shape, device=m.device))
    if token_rewards is not None:
        per_token = per_token + torch.where(m, token_rewards.float(), torch.zeros_like(per_token))
    returns = per_token.flip(1).cumsum(dim=1).flip(1)
    return torch.where(m, returns, torch.zeros_like(returns))


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, *, kl_penalty: Tensor | None = None,
                            baseline: bool = False, eps: float = 1e-8, sum_across: SumAcross | None = None) -> Tensor:
    """REINFORCE++ (arXiv 2501.03262): token returns whitened over the whole batch.

    Each token's return is the final reward plus the (negative) KL penalties from that token
    on; the advantage is the return normalised by the mean and std of every counted token of
    the batch (global, not per group). REINFORCE++-baseline first subtracts the group's mean
    reward from each reward, then does the same.

    Args:
        rewards: [B, G] rewards.
        mask: [N, T] counted tokens (N = B * G).
        kl_penalty: [N, T] per-token ``beta * KL`` to subtract (KL in the reward), or None.
        baseline: subtract the group mean first (REINFORCE++-baseline).
        eps: added to the batch std.
        sum_across: data parallel: whiten over every rank's batch (see ``masked_moments``).

    Returns:
        [N, T] advantages, 0 outside the mask.
    """
    rewards = _check_rewards(rewards)
    if baseline:
        rewards = rewards - rewards.mean(dim=1, keepdim=True)
    token_rewards = None if kl_penalty is None else -kl_penalty
    returns = token_returns(rewards.reshape(-1), mask, token_rewards)
    return masked_whiten(returns, mask, eps, sum_across=sum_across)


def compute_advantages(estimator: str, rewards: Tensor, mask: Tensor, *, scale_by_std: bool = True,
                       kl_penalty: Tensor | None = None, sum_across: SumAcross | None = None) -> Tensor:
    """Per-token advantages [N, T] from rewards [B, G] with the named estimator.

    ``group`` (GRPO / Dr. GRPO with ``scale_by_std=False``), ``rloo`` and ``reinforce`` (the
    raw reward, Williams 1992) are sequence-level: a KL penalty is summed over the completion's
    tokens and subtracted from its reward first. ``reinforce_pp`` and ``reinforce_pp_baseline``
    keep the penalty per token (see ``reinforce_pp_advantages``).

    Args:
        estimator: one of ``ADVANTAGES``.
        rewards: [B, G] rewards.
        mask: [N, T] counted completion tokens; advantages are 0 elsewhere.
        scale_by_std: ``group`` only: divide by the group std.
        kl_penalty: [N, T] per-token ``beta * KL`` (KL in the reward), or None.
        sum_across: data parallel: REINFORCE++'s batch whitening over every rank's batch.

    Returns:
        [N, T] float32 advantages.
    """
    rewards = _check_rewards(rewards)
    n = rewards.numel()
    if mask.dim() != 2 or mask.shape[0] != n:
        raise ValueError(f"compute_advantages: mask {tuple(mask.shape)} must be [N, T] with N = B * G = {n}")
    m = mask.bool()
    rewards = rewards.to(m.device)
    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        return reinforce_pp_advantages(rewards, m, kl_penalty=kl_penalty,
                                       baseline=estimator == "reinforce_pp_baseline", sum_across=sum_across)
    if kl_penalty is not None:
        summed = torch.where(m, kl_penalty, torch.zeros_like(kl_penalty)).sum(dim=1)
        rewards = rewards - summed.view_as(rewards).to(rewards.dtype)
    if estimator == "group":
        seq = group_advantages(rewards, scale_by_std=scale_by_std)
    elif estimator == "rloo":
        seq = rloo_advantages(rewards)
    elif estimator == "reinforce":
        seq = rewards
    else:
        raise ValueError(f"compute_advantages: unknown estimator {estimator!r}; expected one of "
                         f"{', '.join(ADVANTAGES)}")
    per_token = seq.reshape(-1, 1).float().expand(m.shape)
    return torch.where(m, per_token, torch.zeros_like(per_token))
