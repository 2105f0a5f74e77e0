"""KL between the policy and the frozen reference: estimators, reward penalty, adaptive coefficient.

With ``d = logp - ref_logp`` for a token sampled from the policy (Schulman, "Approximating KL
divergence", 2020, http://joschu.net/blog/kl-approx.html):

- k1 = d: unbiased, high variance, can be negative (REINFORCE++'s and RLOO's reward penalty).
- k2 = d^2 / 2: biased, low variance, non-negative.
- k3 = exp(-d) - 1 + d: unbiased, non-negative (GRPO's loss term, arXiv 2402.03300).

The "low-variance KL" of some frameworks is k3 clamped to [-10, 10]: here any estimator can be
clamped with ``clamp``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightrft_mm.algorithms.presets import KL_ESTIMATORS


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


def kl_estimate(logps: Tensor, ref_logps: Tensor, estimator: str = "k3", clamp: float = 0.0) -> Tensor:
    """Per-token estimate of KL(policy || reference) with the named estimator.

    Args:
        logps: [N, T] policy log-probabilities (gradients flow through them).
        ref_logps: [N, T] reference log-probabilities (treated as constants).
        estimator: ``k1``, ``k2`` or ``k3`` (see the module docstring).
        clamp: clamp each estimate to [-clamp, clamp] (0 = no clamp). A token the reference
            finds very unlikely makes k3 explode (exp of a large number); the clamp bounds
            its weight and its gradient.

    Returns:
        [N, T] estimates.
    """
    if logps.shape != ref_logps.shape:
        raise ValueError(f"kl_estimate: logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ")
    d = logps - ref_logps.detach()
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        kl = kl_k3(logps, ref_logps.detach())
    else:
        raise ValueError(f"kl_estimate: unknown estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")
    if clamp < 0:
        raise ValueError(f"kl_estimate: clamp must be >= 0, got {clamp}")
    return kl.clamp(-clamp, clamp) if clamp > 0 else kl


def kl_reward_penalty(old_logps: Tensor, ref_logps: Tensor, mask: Tensor, *, coef: float,
                      estimator: str = "k1", clamp: float = 0.0) -> Tensor:
    """Per-token KL penalty ``coef * k(t)`` to subtract from the rewards (no gradient).

    In the reward, the KL is that of the policy which sampled the tokens (``old_logps``), as in
    REINFORCE++ (arXiv 2501.03262) and RLOO (arXiv 2402.14740); it shapes the advantages and is
    not differentiated.

    Args:
        old_logps: [N, T] log-probabilities of the sampled tokens under the sampling policy.
        ref_logps: [N, T] reference log-probabilities.
        mask: [N, T] completion tokens that count (others get 0).
        coef: the KL coefficient beta.
        estimator, clamp: see ``kl_estimate``.

    Returns:
        [N, T] penalties, 0 outside the mask.
    """
    with torch.no_grad():
        kl = kl_estimate(old_logps.detach(), ref_logps, estimator, clamp)
        return torch.where(mask.bool(), coef * kl, torch.zeros_like(kl))


def adaptive_kl_coef(coef: float, observed_kl: float, *, target: float, horizon: int, n_steps: int) -> float:
    """One update of the adaptive KL controller of Ziegler et al. 2019 (arXiv 1909.08593).

    ``e = clip(observed / target - 1, -0.2, 0.2)``; ``coef <- coef * (1 + e * n_steps / horizon)``:
    the coefficient grows while the KL is above the target and shrinks while it is below.

    Args:
        coef: the current coefficient.
        observed_kl: the KL measured on the last batch.
        target: the KL to steer towards (> 0).
        horizon: how many samples it takes to correct a proportional error (> 0).
        n_steps: samples in the last batch.

    Returns:
        The new coefficient.
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive_kl_coef: target ({target}) and horizon ({horizon}) must be > 0")
    if not math.isfinite(observed_kl):
        return coef
    error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)
