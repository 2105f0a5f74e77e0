"""Policy losses and stabilisers against hand-computed values and gradients."""

import math

import pytest
import torch

from lightrft_mm.algorithms.losses import (
    clipped_surrogate,
    cpgd_token_loss,
    gmpo_token_loss,
    policy_loss,
    truncated_is_weight,
)
from lightrft_mm.algorithms.stabilisers import (
    RunningMoments,
    clip_advantages,
    finished,
    high_entropy_mask,
    informative_groups,
    normalize_rewards,
)

# --- clipped surrogate, clip-higher, dual-clip ------------------------------------------------


def test_clipped_surrogate_clip_higher_and_dual_clip_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.1, 5.0], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 1.0, -1.0])
    # 1.5, A=2: max(-3, -2 * 1.28) = -2.56 (clipped); 0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped);
    # 1.1, A=1: -1.1; 5.0, A=-1: max(5, 1.28) = 5 (the ratio runs away on a negative advantage).
    loss, clipped = clipped_surrogate(ratio, adv, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.56, 0.8, -1.1, 5.0]))
    assert clipped.tolist() == [True, True, False, False]
    # Dual-clip c = 3 caps the last one at c * |A| = 3, with no gradient.
    loss, clipped = clipped_surrogate(ratio, adv, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.56, 0.8, -1.1, 3.0]))
    assert clipped.tolist() == [True, True, False, True]
    loss.sum().backward()
    torch.testing.assert_close(ratio.grad, torch.tensor([0.0, 0.0, -1.0, 0.0]))


def test_clip_higher_lets_positive_ratios_grow_further():
    logps = torch.log(torch.tensor([[1.25]]))
    old = torch.zeros(1, 1)
    sym, _ = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 1), clip_eps=0.2)
    high, metrics = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 1), clip_eps=0.2, clip_eps_high=0.28)
    assert sym.item() == pytest.approx(-1.2) and high.item() == pytest.approx(-1.25)
    assert metrics["clip_fraction"] == 0.0


# --- policy_loss (ppo, token-mean) -------------------------------------------------------------


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.3, 0.3, 0.3]]))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages = torch.tensor([1.0, -2.0])
    loss, metrics = policy_loss(logps, logps.clone(), advantages, mask)
    # Token mean over 4 valid tokens: -(1 + 1 + 1 - 2) / 4 = -0.25
    assert loss.item() == pytest.approx(-0.25)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["clip_fraction"] == 0.0
    assert metrics["kl"] == 0.0 and metrics["kl_loss"] == 0.0
    assert metrics["loss"] == pytest.approx(-0.25) and metrics["pg_loss"] == pytest.approx(-0.25)
    assert "entropy" not in metrics
    # Per completion instead: (-1 + 2) / 2 = 0.5
    loss, _ = policy_loss(logps, logps.clone(), advantages, mask, aggregation="seq-mean-token-mean")
    assert loss.item() == pytest.approx(0.5)


def test_policy_loss_clips_positive_and_negative():
    old_logps = torch.zeros(2, 1)
    # Row 0: ratio 1.5, A = +2 -> min(3.0, 1.2 * 2 = 2.4) -> loss -2.4
    # Row 1: ratio 0.5, A = -1 -> min(-0.5, 0.8 * -1 = -0.8) -> loss 0.8
    logps = torch.log(torch.tensor([[1.5], [0.5]]))
    loss, metrics = policy_loss(logps, old_logps, torch.tensor([2.0, -1.0]), torch.ones(2, 1))
    assert loss.item() == pytest.approx((-2.4 + 0.8) / 2)
    assert metrics["clip_fraction"] == 1.0
    assert metrics["ratio_mean"] == pytest.approx(1.0)


def test_policy_loss_gradient_zero_on_clipped_tokens():
    # One token per row: clipped (1.5, A>0), clipped (0.5, A<0), unclipped (1.1, A>0), masked
    logps = torch.log(torch.tensor([[1.5], [0.5], [1.1], [1.5]])).requires_grad_(True)
    old_logps = torch.zeros(4, 1)
    advantages = torch.tensor([1.0, -1.0, 1.0, 1.0])
    mask = torch.tensor([[1], [1], [1], [0]])
    loss, metrics = policy_loss(logps, old_logps, advantages, mask)
    loss.backward()
    grad = logps.grad.squeeze(1)
    assert grad[0].item() == 0.0 and grad[1].item() == 0.0 and grad[3].item() == 0.0
    # d/dlogp of -A * exp(logp - old) / 3 = -ratio / 3 for the one live token
    assert grad[2].item() == pytest.approx(-1.1 / 3)
    assert metrics["clip_fraction"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("loss_name", ["ppo", "gspo", "gmpo", "cpgd", "pg"])
def test_policy_loss_ignores_masked_tokens_values_and_gradients(loss_name):
    gen = torch.Generator().manual_seed(1)
    logps = -torch.rand(3, 5, generator=gen)
    old_logps = -torch.rand(3, 5, generator=gen)
    ref_logps = -torch.rand(3, 5, generator=gen)
    entropy = torch.rand(3, 5, generator=gen)
    advantages = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    coefs = dict(loss=loss_name, kl_coef=0.1, entropy_coef=0.01, drift_coef=0.1 if loss_name == "cpgd" else 0.0,
                 aggregation="seq-mean-token-mean")
    leaf = logps.clone().requires_grad_(True)
    loss, metrics = policy_loss(leaf, old_logps, advantages, mask, ref_logps=ref_logps, entropy=entropy, **coefs)
    loss.backward()
    junk = ~mask.bool()
    leaf2 = logps.masked_fill(junk, 50.0).requires_grad_(True)
    loss2, metrics2 = policy_loss(
        leaf2, old_logps.masked_fill(junk, -50.0), advantages, mask,
        ref_logps=ref_logps.masked_fill(junk, 80.0), entropy=entropy.masked_fill(junk, float("nan")), **coefs)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item())
    assert metrics2 == pytest.approx(metrics)
    assert torch.isfinite(leaf2.grad).all()
    torch.testing.assert_close(leaf2.grad, leaf.grad)


def test_policy_loss_kl_and_entropy_terms():
    logps = torch.zeros(1, 2)
    ref_logps = torch.full((1, 2), math.log(0.5))
    entropy = torch.tensor([[1.0, 3.0]])
    loss, metrics = policy_loss(
        logps, logps, torch.tensor([0.0]), torch.ones(1, 2),
        ref_logps=ref_logps, kl_coef=0.5, entropy=entropy, entropy_coef=0.1,
    )
    k3 = 0.5 + math.log(2.0) - 1.0
    assert metrics["kl"] == pytest.approx(k3)
    assert metrics["kl_loss"] == pytest.approx(0.5 * k3)
    assert metrics["entropy"] == pytest.approx(2.0)
    assert metrics["entropy_loss"] == pytest.approx(-0.2)
    assert loss.item() == pytest.approx(0.5 * k3 - 0.2)
    # ref_logps with kl_coef 0: the kl metric is reported, the loss does not include it.
    loss0, metrics0 = policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 2), ref_logps=ref_logps)
    assert loss0.item() == 0.0 and metrics0["kl"] == pytest.approx(k3) and metrics0["kl_loss"] == 0.0
    # Another estimator: k1 = logp - ref = log 2 per token; a clamp bounds it.
    _, k1 = policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 2), ref_logps=ref_logps, kl_coef=1.0,
                        kl_estimator="k1")
    assert k1["kl"] == pytest.approx(math.log(2.0))
    _, clamped = policy_loss(logps, logps, torch.tensor([0.0]), torch.ones(1, 2), ref_logps=ref_logps, kl_coef=1.0,
                             kl_estimator="k1", kl_clamp=0.5)
    assert clamped["kl"] == pytest.approx(0.5)


def test_policy_loss_all_masked_is_zero():
    logps = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = policy_loss(logps, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and metrics["clip_fraction"] == 0.0
    assert torch.equal(logps.grad, torch.zeros(2, 3))


def test_policy_loss_shape_and_argument_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match="completion_mask has shape"):
        policy_loss(x, x, torch.zeros(2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="old_logps has shape"):
        policy_loss(x, torch.zeros(3, 2), torch.zeros(2), x)
    with pytest.raises(ValueError, match="ref_logps has shape"):
        policy_loss(x, x, torch.zeros(2), x, ref_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="logps must be"):
        policy_loss(torch.zeros(6), x, torch.zeros(2), x)
    with pytest.raises(ValueError, match="needs ref_logps"):
        policy_loss(x, x, torch.zeros(2), x, kl_coef=0.1)
    with pytest.raises(ValueError, match="needs entropy"):
        policy_loss(x, x, torch.zeros(2), x, entropy_coef=0.1)
    with pytest.raises(ValueError, match="needs behaviour_logps"):
        policy_loss(x, x, torch.zeros(2), x, tis_cap=2.0)
    with pytest.raises(ValueError, match="unknown loss"):
        policy_loss(x, x, torch.zeros(2), x, loss="trpo")


# --- GSPO --------------------------------------------------------------------------------------


def _gspo_reference(logps, old, adv, mask, eps_low, eps_high):
    """GSPO written as in the paper: one ratio per sequence, mean over sequences."""
    m = mask.bool()
    s = torch.exp(torch.stack([(logps[i] - old[i])[m[i]].mean() for i in range(len(logps))]))
    return torch.maximum(-adv * s, -adv * s.clamp(1 - eps_low, 1 + eps_high)).mean()


def test_gspo_by_hand():
    # Row 0: log-ratios (log 1.1, log 0.9) -> s = exp(-0.005025) = 0.994987 < 1 - 3e-4, A = 1:
    # the pessimistic term is unclipped: -0.994987, gradient -s / 2 per token.
    # Row 1: ratio 1.01 > 1 + 4e-4, A = 1: clipped at -1.0004, no gradient.
    logps = torch.log(torch.tensor([[1.1, 0.9], [1.01, 1.0]])).requires_grad_(True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, metrics = policy_loss(logps, torch.zeros(2, 2), torch.tensor([1.0, 1.0]), mask, loss="gspo",
                                aggregation="seq-mean-token-mean", clip_eps=3e-4, clip_eps_high=4e-4)
    s = math.exp((math.log(1.1) + math.log(0.9)) / 2)
    assert loss.item() == pytest.approx((-s - 1.0004) / 2)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-s / 4, -s / 4], [0.0, 0.0]]))
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)


def test_gspo_matches_the_sequence_formula_value_and_gradient():
    gen = torch.Generator().manual_seed(5)
    old = -torch.rand(4, 6, generator=gen)
    logps = old + 0.01 * torch.randn(4, 6, generator=gen)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    a = logps.clone().requires_grad_(True)
    b = logps.clone().requires_grad_(True)
    ours, _ = policy_loss(a, old, adv, mask, loss="gspo", aggregation="seq-mean-token-mean", clip_eps=3e-3,
                          clip_eps_high=4e-3)
    ref = _gspo_reference(b, old, adv, mask, 3e-3, 4e-3)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(a.grad, b.grad)


# --- GMPO --------------------------------------------------------------------------------------


def test_gmpo_by_hand():
    # Row 0, A = +1: log-ratios (0.5, -0.1) -> min(l, clip(l, -0.4, 0.4)) = (0.4, -0.1), mean 0.15,
    #   R = exp(0.15) = 1.161834, loss -R; d/dl1 = -R / 2, d/dl0 = 0 (clipped).
    # Row 1, A = -1: (0.5, -0.6) -> max(l, clip) = (0.5, -0.4), mean 0.05, R = exp(0.05) = 1.051271,
    #   loss +R; d/dl0 = R / 2, d/dl1 = 0 (clipped).
    logps = torch.tensor([[0.5, -0.1], [0.5, -0.6]], requires_grad=True)
    loss, metrics = policy_loss(logps, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), torch.ones(2, 2), loss="gmpo",
                                aggregation="seq-mean-token-mean", clip_eps=0.4, clip_eps_high=0.4)
    r0, r1 = math.exp(0.15), math.exp(0.05)
    assert loss.item() == pytest.approx((-r0 + r1) / 2)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -r0 / 4], [r1 / 4, 0.0]]))
    assert metrics["clip_fraction"] == pytest.approx(0.5)


def test_gmpo_is_the_geometric_mean_of_ratios_inside_the_range():
    ratios = torch.tensor([[1.1, 0.8, 1.2]])
    loss, clipped = gmpo_token_loss(torch.log(ratios), torch.zeros(1, 3), torch.full((1, 3), 2.0),
                                    torch.ones(1, 3), eps_low=0.4, eps_high=0.4)
    geometric = (1.1 * 0.8 * 1.2) ** (1 / 3)
    torch.testing.assert_close(loss, torch.full((1, 3), -2.0 * geometric))
    assert not clipped.any()


# --- CPGD ---------------------------------------------------------------------------------------


def test_cpgd_by_hand():
    # Bounds log 0.8 = -0.223144, log 1.2 = 0.182322.
    # t0: log 1.5 = 0.405465, A = 1 -> max(-0.405465, -0.182322) = -0.182322, clipped.
    # t1: log 0.5 = -0.693147, A = -1 -> max(-0.693147, -0.223144) = -0.223144, clipped.
    # t2: log 1.1 = 0.095310, A = 1 -> -0.095310, gradient -1.
    # drift r - 1 - log r: 0.094535, 0.193147, 0.004690.
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    token, clipped, drift = cpgd_token_loss(logps, torch.zeros(1, 3), adv, torch.ones(1, 3), eps_low=0.2,
                                            eps_high=0.2)
    torch.testing.assert_close(token.detach(), torch.tensor([[math.log(1.2), math.log(0.8), -math.log(1.1)]]) *
                               torch.tensor([[-1.0, 1.0, 1.0]]))
    assert clipped.tolist() == [[True, True, False]]
    torch.testing.assert_close(drift.detach(), torch.tensor([[0.5 - math.log(1.5), -0.5 + math.log(2.0),
                                                              0.1 - math.log(1.1)]]))
    loss, metrics = policy_loss(logps, torch.zeros(1, 3), adv, torch.ones(1, 3), loss="cpgd", drift_coef=0.1)
    pg = (-math.log(1.2) + math.log(0.8) - math.log(1.1)) / 3
    drift_mean = (0.5 - math.log(1.5) - 0.5 + math.log(2.0) + 0.1 - math.log(1.1)) / 3
    assert loss.item() == pytest.approx(pg + 0.1 * drift_mean)
    assert metrics["drift"] == pytest.approx(drift_mean)


def test_cpgd_clip_eps_one_leaves_the_log_ratio_unbounded_below():
    logps = torch.log(torch.tensor([[0.01]])).requires_grad_(True)
    token, clipped, _ = cpgd_token_loss(logps, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1),
                                        eps_low=1.0, eps_high=0.2)
    token.sum().backward()
    assert token.item() == pytest.approx(math.log(0.01)) and not clipped.any()
    assert logps.grad.item() == pytest.approx(1.0)


def test_cpgd_and_pg_on_policy_gradient_is_reinforce():
    logps = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    adv = torch.tensor([2.0])
    for name in ("cpgd", "pg"):
        logps.grad = None
        loss, _ = policy_loss(logps, logps.detach().clone(), adv, torch.ones(1, 2), loss=name, drift_coef=0.0)
        loss.backward()
        torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, -1.0]]))  # -A / 2 tokens
    pg, _ = policy_loss(logps.detach(), torch.zeros(1, 2), adv, torch.ones(1, 2), loss="pg")
    assert pg.item() == pytest.approx(-2.0 * (-0.75))


# --- truncated importance sampling -----------------------------------------------------------------


def test_truncated_importance_weight_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))
    behaviour = torch.log(torch.tensor([[0.25, 0.9, 0.4]]))
    w = truncated_is_weight(old, behaviour, torch.tensor([[1, 1, 0]]), cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 1.0, 1.0]]))  # min(2, 1.5), 1, masked -> 1
    # In the loss: each policy term is weighted (on-policy ppo, A = 1, token-mean of -w).
    loss, metrics = policy_loss(old, old, torch.tensor([1.0]), torch.tensor([[1, 1, 0]]),
                                behaviour_logps=behaviour, tis_cap=1.5)
    assert loss.item() == pytest.approx(-(1.5 + 1.0) / 2)
    assert metrics["tis_weight_mean"] == pytest.approx(1.25)
    # Equal log-probs (HF rollout): the weight is 1.
    torch.testing.assert_close(truncated_is_weight(old, old, torch.ones(1, 3), cap=2.0), torch.ones(1, 3))
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weight(old, old, torch.ones(1, 3), cap=0.0)


# --- high-entropy selection -----------------------------------------------------------------------


def test_high_entropy_mask_by_hand():
    entropy = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # 5 counted tokens, ratio 0.4 -> ceil(2) = 2: entropies 0.9 and 0.7 (the masked 99 never).
    assert high_entropy_mask(entropy, mask, 0.4).tolist() == [[False, True, False], [True, False, False]]
    assert high_entropy_mask(entropy, mask, 0.01).tolist() == [[False, True, False], [False, False, False]]
    assert torch.equal(high_entropy_mask(entropy, mask, 1.0), mask.bool())
    with pytest.raises(ValueError, match="ratio"):
        high_entropy_mask(entropy, mask, 0.0)


def test_token_selection_limits_the_policy_term_only():
    logps = torch.zeros(1, 3, requires_grad=True)
    entropy = torch.tensor([[1.0, 2.0, 3.0]])
    select = torch.tensor([[False, False, True]])
    loss, metrics = policy_loss(logps, torch.zeros(1, 3), torch.tensor([1.0]), torch.ones(1, 3),
                                token_select=select, entropy=entropy, entropy_coef=0.1)
    loss.backward()
    # pg over the selected token: -1; the entropy bonus over all three: -0.1 * 2.
    assert loss.item() == pytest.approx(-1.0 - 0.2)
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, -1.0]]))
    assert metrics["selected_fraction"] == pytest.approx(1 / 3)


# --- reward / advantage stabilisers -----------------------------------------------------------------


def test_normalize_rewards_batch_by_hand():
    out = normalize_rewards(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.ones(2, 2, dtype=torch.bool), "batch")
    # mean 4, population std sqrt(5) = 2.236068
    torch.testing.assert_close(out, torch.tensor([[-1.341641, -0.447214], [0.447214, 1.341641]]), atol=1e-5, rtol=0)
    valid = torch.tensor([[True, True], [True, False]])
    out = normalize_rewards(torch.tensor([[1.0, 3.0], [5.0, 100.0]]), valid, "batch")
    # valid 1, 3, 5: mean 3, std sqrt(8/3) = 1.632993; the invalid 100 is untouched
    torch.testing.assert_close(out, torch.tensor([[-1.224745, 0.0], [1.224745, 100.0]]), atol=1e-5, rtol=0)
    clipped = normalize_rewards(torch.tensor([[1.0, 3.0], [5.0, 100.0]]), valid, "batch", clip=1.0)
    torch.testing.assert_close(clipped, torch.tensor([[-1.0, 0.0], [1.0, 100.0]]))
    torch.testing.assert_close(normalize_rewards(torch.tensor([[1.0, 3.0]]), torch.ones(1, 2), "none", clip=2.0),
                               torch.tensor([[1.0, 2.0]]))


def test_running_normalisation_remembers_earlier_batches():
    running = RunningMoments()
    valid = torch.ones(1, 2, dtype=torch.bool)
    first = normalize_rewards(torch.tensor([[1.0, 3.0]]), valid, "running", running=running)
    torch.testing.assert_close(first, torch.tensor([[-1.0, 1.0]]), atol=1e-5, rtol=0)  # mean 2, std 1
    second = normalize_rewards(torch.tensor([[5.0, 7.0]]), valid, "running", running=running)
    # all four seen: mean 4, std sqrt(5)
    torch.testing.assert_close(second, torch.tensor([[0.447214, 1.341641]]), atol=1e-5, rtol=0)
    assert running.count == 4
    with pytest.raises(ValueError, match="RunningMoments"):
        normalize_rewards(torch.tensor([[1.0, 3.0]]), valid, "running")


def test_clip_advantages():
    torch.testing.assert_close(clip_advantages(torch.tensor([-3.0, 0.5, 2.0]), 1.0), torch.tensor([-1.0, 0.5, 1.0]))
    assert torch.equal(clip_advantages(torch.tensor([-3.0, 2.0]), 0.0), torch.tensor([-3.0, 2.0]))


def test_informative_groups_and_finished():
    rewards = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.5, 0.7], [2.0, 2.0]])
    valid = torch.tensor([[True, True], [True, True], [True, False], [True, True]])
    # Group 2 differs only through an invalid reward: not informative.
    assert informative_groups(rewards, valid).tolist() == [False, True, False, False]
    assert finished(torch.tensor([[5, 9, 0], [1, 2, 3]]), eos_id=9).tolist() == [True, False]
