"""GRPO building blocks: group-relative advantages, the PPO-clip token loss, KL, entropy.

Pure torch functions without I/O or models. Shapes: B prompts, G completions per prompt,
T completion tokens, V vocabulary; N = B * G rows once the groups are flattened.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, *, scale_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages: each reward minus its group's mean, optionally over its std.

    The std is the sample std (``unbiased=True``, Bessel's correction), as in the GRPO paper's
    reference code and TRL. Groups whose rewards are all equal carry no learning signal and get
    exactly 0, also for G = 1 (where the sample std is undefined).

    Args:
        rewards: [B, G] rewards of the G completions of each of B prompts.
        scale_by_std: divide the centred rewards by (group std + eps); False gives the
            mean-centred rewards only (Dr. GRPO).
        eps: added to the std so near-constant groups do not blow up.

    Returns:
        [B, G] advantages, float dtype of ``rewards`` (integers become float32).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, G], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; a reward function returned a bad value")
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
    # Float rounding of the mean can leave ~1e-8 residues; constant groups must be exactly 0.
    return advantages.masked_fill(constant, 0.0)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero (weighted by ``mask``).

    Masked-out entries never reach the result, even when they are NaN or inf, and an
    all-zero mask gives 0 (not NaN) with finite gradients.

    Args:
        x: values, any shape.
        mask: same shape as ``x``; bool or 0/1 (or non-negative weights).
        dim: dimension(s) to reduce; None reduces everything to a scalar.

    Returns:
        The masked mean, ``x`` reduced over ``dim``.
    """
    if x.shape != mask.shape:
        raise ValueError(f"masked_mean: x {tuple(x.shape)} and mask {tuple(mask.shape)} differ")
    weights = mask.to(x.dtype)
    numerator = torch.where(weights != 0, x * weights, torch.zeros_like(x))
    numerator = numerator.sum() if dim is None else numerator.sum(dim=dim)
    denominator = weights.sum() if dim is None else weights.sum(dim=dim)
    # A where() over num/den would still back-propagate 0 * inf = NaN; divide by a safe value.
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference): ``exp(ref - logp) - (ref - logp) - 1``.

    Unbiased for tokens sampled from the policy, non-negative, 0 where the two agree.

    Args:
        logps: [N, T] (or any shape) policy log-probabilities of the sampled tokens.
        ref_logps: same shape, reference-model log-probabilities of the same tokens.

    Returns:
        Per-token estimates, same shape as ``logps``.
    """
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1.0


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    clip_eps: float = 0.2,
    ref_logps: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip token loss with optional k3 KL penalty and entropy bonus, token-mean aggregated.

    Per token: ``max(-A * r, -A * clip(r, 1 - eps, 1 + eps)) + kl_coef * k3 - entropy_coef * H``
    with ``r = exp(logps - old_logps)``, averaged over every valid token of the batch (so long
    completions weigh more than short ones, as in DAPO's token-level loss).

    Args:
        logps: [N, T] current-policy log-probabilities of the sampled tokens (with grad).
        old_logps: [N, T] log-probabilities under the policy that sampled the tokens.
        advantages: [N] one advantage per completion, broadcast over its tokens.
        completion_mask: [N, T] 1 for completion tokens that count, 0 for prompt/padding.
        clip_eps: half-width of the ratio trust region.
        ref_logps: [N, T] reference-model log-probabilities; when given the ``kl`` metric is
            reported, and the penalty is added when ``kl_coef > 0``.
        kl_coef: weight of the k3 KL penalty.
        entropy: [N, T] per-token policy entropy (see ``token_entropy``), optional.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).

    Returns:
        The scalar loss, and float metrics: ``loss``, ``pg_loss``, ``kl_loss``, ``kl`` (mean
        k3, 0.0 without ``ref_logps``), ``clip_fraction`` (share of valid tokens where the
        clipped term was chosen), ``ratio_mean``; plus ``entropy`` and ``entropy_loss`` when
        ``entropy`` is given.

    Raises:
        ValueError: on mismatched shapes, or a non-zero coefficient without its tensor.
    """
    if logps.dim() != 2:
        raise ValueError(f"policy_loss: logps must be [N, T], got shape {tuple(logps.shape)}")
    shape = tuple(logps.shape)
    for name, tensor, expected in (
        ("old_logps", old_logps, shape),
        ("completion_mask", completion_mask, shape),
        ("advantages", advantages, shape[:1]),
        ("ref_logps", ref_logps, shape),
        ("entropy", entropy, shape),
    ):
        if tensor is not None and tuple(tensor.shape) != expected:
            raise ValueError(
                f"policy_loss: {name} has shape {tuple(tensor.shape)}, expected {expected} "
                "(advantages are [N], the other tensors [N, T] like logps)"
            )
    if kl_coef > 0 and ref_logps is None:
        raise ValueError("policy_loss: kl_coef > 0 needs ref_logps")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("policy_loss: entropy_coef != 0 needs entropy")

    mask = completion_mask.bool()
    adv = advantages.to(logps.dtype).unsqueeze(1)
    ratio = torch.exp(logps - old_logps.detach())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    zero = torch.zeros_like(pg_loss)
    kl = zero if ref_logps is None else masked_mean(kl_k3(logps, ref_logps.detach()), mask)
    kl_loss = kl_coef * kl if kl_coef > 0 else zero
    mean_entropy = zero if entropy is None else masked_mean(entropy, mask)
    entropy_loss = -entropy_coef * mean_entropy if entropy_coef != 0 else zero
    loss = pg_loss + kl_loss + entropy_loss

    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logps.dtype), mask)
        parts = {"loss": loss, "pg_loss": pg_loss, "kl": kl, "kl_loss": kl_loss}
        if entropy is not None:
            parts.update(entropy=mean_entropy, entropy_loss=entropy_loss)
        parts.update(clip_fraction=clip_fraction, ratio_mean=masked_mean(ratio, mask))
        metrics = {name: value.item() for name, value in parts.items()}
    return loss, metrics


def _rowwise(logits: Tensor, temperature: float, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Apply ``fn(row [T, V] in float32 or wider, row index)`` to each row and stack to [N, T]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if logits.shape[0] == 0:
        return logits.new_zeros(logits.shape[:2], dtype=dtype)
    rows = []
    for i, row in enumerate(logits):
        row = row.to(dtype)
        rows.append(fn(row if temperature == 1.0 else row / temperature, i))
    return torch.stack(rows)


def token_entropy(logits: Tensor) -> Tensor:
    """Per-token entropy of the softmax over the vocabulary, from ``log_softmax``.

    Works row by row in float32 so the peak extra memory is [T, V], not [N, T, V].

    Args:
        logits: [N, T, V] logits (any float dtype).

    Returns:
        [N, T] entropies in nats, float32 (float64 for float64 input).
    """
    if logits.dim() != 3:
        raise ValueError(f"token_entropy: logits must be [N, T, V], got {tuple(logits.shape)}")

    def entropy(row: Tensor, _: int) -> Tensor:
        row_logps = torch.log_softmax(row, dim=-1)
        return -(row_logps.exp() * row_logps).sum(dim=-1)

    return _rowwise(logits, 1.0, entropy)


def selective_logps(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of ``tokens`` under ``softmax(logits / temperature)``.

    Computes ``logit[token] - logsumexp(logits)`` one row at a time in float32, so neither a
    full [N, T, V] log-softmax nor a float32 copy of bf16 logits is ever materialised.

    Args:
        logits: [N, T, V] logits, position t predicting ``tokens[:, t]``.
        tokens: [N, T] token ids.
        temperature: the sampling temperature the tokens were drawn with (> 0).

    Returns:
        [N, T] log-probabilities, float32 (float64 for float64 input).
    """
    if logits.dim() != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"selective_logps: logits {tuple(logits.shape)} must be [N, T, V] and tokens "
            f"{tuple(tokens.shape)} must be [N, T]"
        )
    index = tokens.long().unsqueeze(-1)

    def logps(row: Tensor, i: int) -> Tensor:
        return row.gather(-1, index[i]).squeeze(-1) - torch.logsumexp(row, dim=-1)

    return _rowwise(logits, temperature, logps)
