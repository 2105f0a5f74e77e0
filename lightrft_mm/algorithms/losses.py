"""Policy losses: PPO-clip (clip-higher, dual-clip), GSPO, GMPO, CPGD and vanilla policy gradient.

Each ``*_token_loss`` returns per-token loss terms [N, T] (to be minimised) plus a [N, T] bool
of where the clip acted; ``aggregate`` (tokens.py) turns them into a scalar the way the
algorithm does. ``policy_loss`` combines a policy loss with the truncated importance-sampling
weight, high-entropy token selection, the KL term and the entropy bonus.

Notation: ``r_t = exp(logp_t - old_logp_t)`` is the ratio to the policy the advantages were
computed for; ``A`` the advantage; ``eps_low`` / ``eps_high`` the clip range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightrft_mm.algorithms.kl import kl_estimate
from lightrft_mm.algorithms.presets import LOSSES
from lightrft_mm.algorithms.tokens import aggregate, masked_mean


def _log_ratio(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    # Zero outside the mask: padded positions may hold junk whose exp() would overflow and turn
    # a masked-out 0 * inf gradient into NaN.
    return torch.where(mask.bool(), logps - old_logps.detach(), torch.zeros_like(logps))


def clipped_surrogate(ratio: Tensor, advantages: Tensor, *, eps_low: float, eps_high: float,
                      dual_clip: float = 0.0) -> tuple[Tensor, Tensor]:
    """PPO's pessimistic clipped surrogate as a loss, elementwise.

    ``loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` (PPO, arXiv 1707.06347;
    separate ``eps_high > eps_low`` is DAPO's clip-higher, arXiv 2503.14476). Dual-clip
    (Ye et al. 2020, arXiv 1912.09729) also bounds the loss of negative advantages, which a
    huge ratio would otherwise make unbounded: for ``A < 0``, ``loss = min(loss, -dual_clip * A)``.

    Args:
        ratio: importance ratios, any shape.
        advantages: same shape.
        eps_low, eps_high: the clip range ``[1 - eps_low, 1 + eps_high]``.
        dual_clip: the constant c > 1 of dual-clip; 0 = off.

    Returns:
        (loss, clipped): elementwise loss and where a clip (either kind) set it.
    """
    unclipped = -advantages * ratio
    clipped_value = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped_value)
    clipped = clipped_value > unclipped
    if dual_clip > 0:
        cap = -dual_clip * advantages
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        clipped = clipped | dual
    return loss, clipped


def ppo_token_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float,
                   eps_high: float, dual_clip: float = 0.0) -> tuple[Tensor, Tensor]:
    """PPO-clip per token: ``clipped_surrogate(r_t, A_t)``; GRPO's and DAPO's policy loss."""
    ratio = torch.exp(_log_ratio(logps, old_logps, mask))
    return clipped_surrogate(ratio, advantages, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)


def gspo_token_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float,
                    eps_high: float, dual_clip: float = 0.0) -> tuple[Tensor, Tensor]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): one length-normalised ratio per sequence.

    ``s_i = exp(mean_t log r_t)`` = ``(pi(y|x) / pi_old(y|x))^(1/|y|)`` is clipped like PPO's
    ratio (GSPO uses a tiny range, ~3e-4 / 4e-4, since ``s_i`` is a geometric mean). In
    token form ``s_it = sg(s_i) * pi_t / sg(pi_t)``: every token of a sequence has the value
    of ``s_i`` and the gradient ``s_i * grad log pi_t``, so ``seq-mean-token-mean``
    aggregation gives exactly GSPO's gradient ``s_i A_i mean_t grad log pi_t``.

    Returns:
        (loss [N, T], clipped [N, T]).
    """
    log_ratio = _log_ratio(logps, old_logps, mask)
    seq_log_ratio = masked_mean(log_ratio, mask, dim=1).unsqueeze(1)
    log_s = seq_log_ratio.detach() + (log_ratio - log_ratio.detach())
    return clipped_surrogate(torch.exp(log_s), advantages, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)


def gmpo_token_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float,
                    eps_high: float) -> tuple[Tensor, Tensor]:
    """GMPO (Zhao et al. 2025, arXiv 2507.20673): geometric mean of token ratios, clipped in log space.

    Per token the pessimistic log-ratio ``l_t = min(log r_t, clip(log r_t, -eps_low, eps_high))``
    for ``A >= 0`` (``max`` for ``A < 0``); the sequence objective is
    ``A * exp(mean_t l_t)`` = ``A * (prod_t clipped r_t)^(1/|y|)``. In token form every token
    carries ``-A * sg(R_i) * exp(l_t - sg(l_t))`` with ``R_i = exp(mean_t l_t)``, so
    ``seq-mean-token-mean`` aggregation gives GMPO's value and gradient. The range is on the
    log-ratio: the paper's ``eps = 0.4`` keeps ``r_t`` in ``[e^-0.4, e^0.4]``.

    Returns:
        (loss [N, T], clipped [N, T]).
    """
    log_ratio = _log_ratio(logps, old_logps, mask)
    bounded = torch.clamp(log_ratio, -eps_low, eps_high)
    pessimistic = torch.where(advantages >= 0, torch.minimum(log_ratio, bounded), torch.maximum(log_ratio, bounded))
    seq_ratio = torch.exp(masked_mean(pessimistic, mask, dim=1)).unsqueeze(1)
    loss = -advantages * seq_ratio.detach() * torch.exp(pessimistic - pessimistic.detach())
    return loss, pessimistic != log_ratio


def cpgd_token_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float,
                    eps_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """CPGD (Liu et al. 2025, arXiv 2505.12504): clipped policy gradient on the log-ratio, plus drift.

    ``loss_t = max(-A log r_t, -A clip(log r_t, log(1 - eps_low), log(1 + eps_high)))``: a
    policy-gradient objective (``grad = -A grad log pi`` at ``r = 1``) whose update is cut once
    the log-ratio leaves the range, instead of PPO's ratio-weighted one. The policy-drift term
    is ``KL(pi_old || pi)``, estimated per token by ``(r_t - 1) - log r_t`` (non-negative,
    0 at ``r = 1``); weight it with ``drift_coef`` in ``policy_loss``.

    Returns:
        (loss [N, T], clipped [N, T], drift [N, T]).
    """
    log_ratio = _log_ratio(logps, old_logps, mask)
    low = math.log(1.0 - eps_low) if eps_low < 1.0 else -math.inf
    bounded = torch.clamp(log_ratio, low, math.log(1.0 + eps_high))
    unclipped = -advantages * log_ratio
    clipped_value = -advantages * bounded
    drift = torch.exp(log_ratio) - 1.0 - log_ratio
    return torch.maximum(unclipped, clipped_value), clipped_value > unclipped, drift


def pg_token_loss(logps: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Vanilla policy gradient (REINFORCE, Williams 1992): ``loss_t = -A_t log pi_t``."""
    return torch.where(mask.bool(), -advantages * logps, torch.zeros_like(logps))


def _check_shapes(logps: Tensor, **tensors: Tensor | None) -> None:
    if logps.dim() != 2:
        raise ValueError(f"policy_loss: logps must be [N, T], got shape {tuple(logps.shape)}")
    shape = tuple(logps.shape)
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        ok = tuple(tensor.shape) == shape or (name == "advantages" and tuple(tensor.shape) == shape[:1])
        if not ok:
            raise ValueError(f"policy_loss: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                             "(advantages may also be [N]; the other tensors are [N, T] like logps)")


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    loss: str = "ppo",
    aggregation: str = "token-mean",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float = 0.0,
    max_tokens: int | None = None,
    drift_coef: float = 0.0,
    behaviour_logps: Tensor | None = None,
    tis_cap: float = 0.0,
    token_select: Tensor | None = None,
    ref_logps: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    pg_scale: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """The scalar training loss: a policy loss, aggregated, plus KL, drift and entropy terms.

    ``loss = agg(w_t * pg_t over selected tokens) + drift_coef * agg(drift_t)
    + kl_coef * agg(k(logp_t, ref_t)) - entropy_coef * agg(H_t)``, every ``agg`` over the
    completion mask with the same ``aggregation``.

    Args:
        logps: [N, T] current-policy log-probabilities of the sampled tokens (with grad).
        old_logps: [N, T] log-probabilities under the policy the advantages belong to.
        advantages: [N] per completion or [N, T] per token.
        completion_mask: [N, T] 1 for completion tokens that count, 0 for padding / left out.
        loss: one of ``LOSSES``.
        aggregation: one of ``tokens.AGGREGATIONS``.
        clip_eps: lower clip epsilon (ratio >= 1 - eps; log space for gmpo).
        clip_eps_high: upper clip epsilon; None = ``clip_eps``.
        dual_clip: dual-clip constant (> 1) for ppo and gspo; 0 = off.
        max_tokens: the generation budget (``seq-mean-token-sum-norm``).
        drift_coef: weight of CPGD's policy drift ``KL(pi_old || pi)`` (cpgd only).
        behaviour_logps: [N, T] log-probs the rollout engine sampled with, for the truncated
            importance-sampling weight ``min(exp(old - behaviour), tis_cap)`` on each policy
            term (Espeholt et al. 2018, arXiv 1802.01561). Needed when ``tis_cap > 0``.
        tis_cap: the truncation C; 0 = no correction.
        token_select: [N, T] bool; the policy term counts only these tokens (high-entropy
            selection); the KL, drift and entropy terms still see every token.
        ref_logps: [N, T] reference log-probs; the ``kl`` metric is reported when given.
        kl_coef: weight of the KL loss term (needs ``ref_logps``).
        kl_estimator, kl_clamp: see ``kl.kl_estimate``.
        entropy: [N, T] per-token entropies; needed when ``entropy_coef != 0``.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        pg_scale: multiplies the policy term in the returned total (gradient accumulation with
            ``token_select``: the policy term averages over the selected tokens, the others over
            every token, so a micro-batch weighs differently in each). The `loss` and `pg_loss`
            metrics are scaled alike, so their weighted sum over the micro-batches is the mini-batch's.

    Returns:
        The scalar loss and float metrics: ``loss``, ``pg_loss``, ``kl``, ``kl_loss``,
        ``clip_fraction``, ``ratio_mean``; ``entropy`` / ``entropy_loss`` with ``entropy``;
        ``drift`` for cpgd; ``tis_weight_mean`` with TIS; ``selected_fraction`` with selection.
    """
    _check_shapes(logps, old_logps=old_logps, advantages=advantages, completion_mask=completion_mask,
                  ref_logps=ref_logps, entropy=entropy, behaviour_logps=behaviour_logps, token_select=token_select)
    if kl_coef > 0 and ref_logps is None:
        raise ValueError("policy_loss: kl_coef > 0 needs ref_logps")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("policy_loss: entropy_coef != 0 needs entropy")
    if tis_cap > 0 and behaviour_logps is None:
        raise ValueError("policy_loss: tis_cap > 0 needs behaviour_logps")
    if loss not in LOSSES:
        raise ValueError(f"policy_loss: unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    mask = completion_mask.bool()
    adv = advantages.to(logps.dtype)
    adv = adv.unsqueeze(1).expand_as(logps) if adv.dim() == 1 else adv
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    clip = dict(eps_low=clip_eps, eps_high=eps_high)

    drift = None
    if loss == "ppo":
        pg, clipped = ppo_token_loss(logps, old_logps, adv, mask, dual_clip=dual_clip, **clip)
    elif loss == "gspo":
        pg, clipped = gspo_token_loss(logps, old_logps, adv, mask, dual_clip=dual_clip, **clip)
    elif loss == "gmpo":
        pg, clipped = gmpo_token_loss(logps, old_logps, adv, mask, **clip)
    elif loss == "cpgd":
        pg, clipped, drift = cpgd_token_loss(logps, old_logps, adv, mask, **clip)
    else:
        pg, clipped = pg_token_loss(logps, adv, mask), torch.zeros_like(mask)

    tis_weight = None
    if tis_cap > 0:
        tis_weight = truncated_is_weight(old_logps, behaviour_logps, mask, tis_cap)
        pg = pg * tis_weight
    pg_mask = mask if token_select is None else mask & token_select.bool()
    pg_loss = aggregate(pg, pg_mask, aggregation, max_tokens=max_tokens)
    zero = torch.zeros_like(pg_loss)
    total = pg_loss * pg_scale if pg_scale != 1.0 else pg_loss

    drift_value = zero if drift is None else aggregate(drift, mask, aggregation, max_tokens=max_tokens)
    if drift_coef != 0:
        total = total + drift_coef * drift_value
    kl = zero
    if ref_logps is not None:
        kl = aggregate(kl_estimate(logps, ref_logps, kl_estimator, kl_clamp), mask, aggregation, max_tokens=max_tokens)
    kl_loss = kl_coef * kl if kl_coef > 0 else zero
    mean_entropy = zero if entropy is None else aggregate(entropy, mask, aggregation, max_tokens=max_tokens)
    entropy_loss = -entropy_coef * mean_entropy if entropy_coef != 0 else zero
    total = total + kl_loss + entropy_loss

    with torch.no_grad():
        parts = {"loss": total, "pg_loss": pg_loss * pg_scale, "kl": kl, "kl_loss": kl_loss,
                 "clip_fraction": masked_mean(clipped.to(logps.dtype), mask),
                 "ratio_mean": masked_mean(torch.exp(_log_ratio(logps, old_logps, mask)), mask)}
        if entropy is not None:
            parts.update(entropy=mean_entropy, entropy_loss=entropy_loss)
        if drift is not None:
            parts["drift"] = drift_value
        if tis_weight is not None:
            parts["tis_weight_mean"] = masked_mean(tis_weight, mask)
        if token_select is not None:
            parts["selected_fraction"] = masked_mean(pg_mask.to(logps.dtype), mask)
        metrics = {name: value.item() for name, value in parts.items()}
    return total, metrics


def truncated_is_weight(old_logps: Tensor, behaviour_logps: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance weight ``min(pi_old / pi_behaviour, cap)`` per token (no gradient).

    The rollout engine (behaviour policy) and the trainer (old policy) compute log-probs of the
    same weights with different kernels; with vLLM they differ enough to bias the gradient.
    Weighting each token's policy term by the truncated ratio corrects for it with bounded
    variance (IMPALA's truncation, arXiv 1802.01561). With the HF engine the two agree to
    ~1e-6 and the weight is ~1.

    Args:
        old_logps: [N, T] trainer log-probs before the update.
        behaviour_logps: [N, T] log-probs the tokens were sampled with.
        mask: [N, T]; the weight is 1 outside it.
        cap: the truncation C > 0.

    Returns:
        [N, T] weights in (0, cap].
    """
    if cap <= 0:
        raise ValueError(f"truncated_is_weight: cap must be > 0, got {cap}")
    log_w = torch.where(mask.bool(), old_logps.detach() - behaviour_logps.detach(), torch.zeros_like(old_logps))
    return torch.exp(log_w).clamp(max=cap)
