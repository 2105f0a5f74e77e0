"""Token-level building blocks: masked statistics, loss aggregation, log-probs and entropy.

Pure torch functions without I/O or models. Shapes: N completions (rows), T completion
tokens, V vocabulary. A mask is 1 (or True) where a token counts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightrft_mm.algorithms.presets import AGGREGATIONS

SumAcross = Callable[[Tensor], Tensor]  # sums a tensor over the data-parallel ranks


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


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is non-zero; masked entries (even NaN) contribute nothing."""
    if x.shape != mask.shape:
        raise ValueError(f"masked_sum: x {tuple(x.shape)} and mask {tuple(mask.shape)} differ")
    picked = torch.where(mask.bool(), x, torch.zeros_like(x))
    return picked.sum() if dim is None else picked.sum(dim=dim)


def masked_moments(x: Tensor, mask: Tensor, *, sum_across: SumAcross | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, (population) variance and count of the masked entries of ``x``.

    Args:
        x: values, any shape.
        mask: same shape; which entries count.
        sum_across: data parallel: sums a tensor over every rank (the strategy's ``all_reduce``),
            so the moments are those of the global batch. None = this batch only.

    Returns:
        (mean, var, count) as 0-d tensors; 0, 0, 0 when nothing is masked in.
    """
    m = mask.bool()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    count_total = torch.stack([m.sum().to(x.dtype), torch.where(m, x, zero).sum()])
    if sum_across is not None:
        count_total = sum_across(count_total)
    count, total = count_total[0], count_total[1]
    mean = total / count.clamp(min=1)
    squares = torch.where(m, (x - mean) ** 2, zero).sum()
    if sum_across is not None:
        squares = sum_across(squares)
    return mean, squares / count.clamp(min=1), count


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8, *, sum_across: SumAcross | None = None) -> Tensor:
    """``(x - mean) / (std + eps)`` with mean and (population) std over the masked entries.

    Masked-out positions come back as 0. With fewer than two masked entries, or all of them
    equal, the result is 0 everywhere (there is nothing to compare).

    Args:
        x: values, any shape (e.g. [N, T] token returns).
        mask: same shape; which entries form the statistics and are returned.
        eps: added to the std.
        sum_across: data parallel: statistics over every rank's batch (see ``masked_moments``).

    Returns:
        The whitened values, same shape as ``x``.
    """
    m = mask.bool()
    mean, var, _ = masked_moments(x, m, sum_across=sum_across)
    out = (x - mean) / (var.sqrt() + eps)
    return torch.where(m, out, torch.zeros_like(out))


def aggregate(values: Tensor, mask: Tensor, mode: str = "token-mean", *, max_tokens: int | None = None) -> Tensor:
    """Reduce per-token loss terms [N, T] to a scalar, the way the named algorithm does.

    - ``token-mean``: ``sum(v * m) / sum(m)``: every token of the batch weighs the same, so long
      completions weigh more (DAPO, arXiv 2503.14476).
    - ``seq-mean-token-mean``: ``mean_i(sum_t v m / sum_t m)``: each completion weighs the same
      (GRPO, arXiv 2402.03300; GSPO and GMPO's sequence objectives).
    - ``seq-mean-token-sum``: ``mean_i(sum_t v m)``: a completion's loss is its summed token
      terms, the sequence log-probability of REINFORCE / RLOO (arXiv 2402.14740).
    - ``seq-mean-token-sum-norm``: ``mean_i(sum_t v m) / max_tokens``: a constant normaliser
      instead of the length (Dr. GRPO, arXiv 2503.20783).

    The sequence means run over the completions with at least one counted token, so
    completions left out of the loss (no reward, truncated) do not dilute it.

    Args:
        values: [N, T] per-token terms.
        mask: [N, T] bool or 0/1.
        mode: one of ``AGGREGATIONS``.
        max_tokens: the generation budget, required by ``seq-mean-token-sum-norm``.

    Returns:
        A scalar tensor (0 with finite gradients when nothing is counted).
    """
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(f"aggregate: values {tuple(values.shape)} and mask {tuple(mask.shape)} must be "
                         "the same [N, T] shape")
    if mode == "token-mean":
        return masked_mean(values, mask)
    counted = mask.bool().any(dim=1)
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(values, mask, dim=1)
    elif mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        per_seq = masked_sum(values, mask, dim=1)
        if mode == "seq-mean-token-sum-norm":
            if not max_tokens or max_tokens <= 0:
                raise ValueError("aggregate: seq-mean-token-sum-norm needs max_tokens > 0 (the generation budget)")
            per_seq = per_seq / max_tokens
    else:
        raise ValueError(f"aggregate: unknown mode {mode!r}; expected one of {', '.join(AGGREGATIONS)}")
    return masked_mean(per_seq, counted)


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


def loss_units(mask: Tensor, mode: str = "token-mean") -> int:
    """What an aggregation averages over: counted tokens (token-mean) or counted completions."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss_units: unknown mode {mode!r}; expected one of {', '.join(AGGREGATIONS)}")
    m = mask.bool()
    return int(m.sum()) if mode == "token-mean" else int(m.any(dim=1).sum())


def micro_batch_weight(micro_mask: Tensor, batch_units: float, mode: str = "token-mean", *,
                       world_size: int = 1) -> float:
    """Weight of a micro-batch's aggregated loss so that the weighted sum over the micro-batches
    of a batch equals the aggregate over the whole batch (gradient accumulation, exact).

    ``token-mean`` averages over tokens, so a micro-batch weighs its share of the counted tokens;
    the sequence means weigh its share of the counted completions. Data parallel: the batch is
    every rank's, ``batch_units`` counts its units over all ranks, and since the ranks'
    gradients are averaged each weight is scaled by ``world_size``.

    Args:
        micro_mask: [n, T] mask of the micro-batch's rows.
        batch_units: ``loss_units`` of the whole batch (summed over the ranks).
        mode: one of ``AGGREGATIONS``.
        world_size: data-parallel ranks whose gradients are averaged.

    Returns:
        The weight (0 when the batch counts nothing).
    """
    part = loss_units(micro_mask, mode)
    return part * world_size / float(batch_units) if batch_units else 0.0
