"""Token helpers, advantage estimators and KL estimators against hand-computed values."""

import math

import pytest
import torch

from lightrft_mm.algorithms.advantages import (
    compute_advantages,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    token_returns,
)
from lightrft_mm.algorithms.kl import adaptive_kl_coef, kl_estimate, kl_k3, kl_reward_penalty
from lightrft_mm.algorithms.tokens import (
    aggregate,
    masked_mean,
    masked_whiten,
    selective_logps,
    token_entropy,
)

LOG2 = math.log(2.0)


# --- group_advantages -------------------------------------------------------------------


def test_group_advantages_hand_values():
    # mean 0.5, centred +-0.5, sample std sqrt(4 * 0.25 / 3) = 0.577350 -> 0.5 / 0.577351
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    expected = torch.tensor([[0.8660, -0.8660, -0.8660, 0.8660]])
    torch.testing.assert_close(adv, expected, atol=1e-4, rtol=0)


def test_group_advantages_per_group():
    # Row 2: rewards 1, 2, 3 -> mean 2, sample std 1 -> -1, 0, 1 (up to eps).
    adv = group_advantages(torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 3.0]]), eps=0.0)
    torch.testing.assert_close(adv[1], torch.tensor([-1.0, 0.0, 1.0]))
    # Row 1: mean 1/3, centred (-1/3, -1/3, 2/3), sample var (1/9 + 1/9 + 4/9) / 2 = 1/3
    expected = torch.tensor([-0.57735, -0.57735, 1.15470])
    torch.testing.assert_close(adv[0], expected, atol=1e-4, rtol=0)


def test_group_advantages_identical_rewards_are_exactly_zero():
    rewards = torch.tensor([[0.1, 0.1, 0.1, 0.1], [3.0, 3.0, 3.0, 3.0], [1.0, 0.0, 1.0, 0.0]])
    adv = group_advantages(rewards)
    assert torch.equal(adv[:2], torch.zeros(2, 4))
    assert adv[2].abs().min() > 0.5
    assert torch.equal(group_advantages(rewards, scale_by_std=False)[:2], torch.zeros(2, 4))


def test_group_advantages_mean_centred_only():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 4.0, 6.0, 8.0]])
    adv = group_advantages(rewards, scale_by_std=False)
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [-3.0, -1.0, 1.0, 3.0]])
    torch.testing.assert_close(adv, expected)


def test_group_advantages_single_completion_and_ints():
    assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]])), torch.zeros(2, 1))
    adv = group_advantages(torch.tensor([[1, 0]]))
    assert adv.dtype == torch.float32
    # mean 0.5, sample std sqrt(0.5) = 0.7071 -> +-0.7071
    torch.testing.assert_close(adv, torch.tensor([[0.7071, -0.7071]]), atol=1e-4, rtol=0)


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


# --- rloo / reinforce++ / returns --------------------------------------------------------


def test_rloo_leaves_each_completion_out_of_its_baseline():
    # Row 0: r0 = 1, others (0, 0, 1) mean 1/3 -> 2/3; r1 = 0, others (1, 0, 1) -> -2/3.
    # Row 1: 3 - (1 + 2) / 2 = 1.5; 1 - (3 + 2) / 2 = -1.5; 2 - (3 + 1) / 2 = 0.
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))
    torch.testing.assert_close(rloo_advantages(torch.tensor([[3.0, 1.0, 2.0]])), torch.tensor([[1.5, -1.5, 0.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.tensor([[1.0]]))


def test_token_returns_put_the_reward_on_the_last_token_and_sum_to_go():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    token_rewards = torch.tensor([[-0.1, -0.2, -0.3], [-1.0, -1.0, 5.0]])
    # Row 0: per-token (-0.1, -0.2, -0.3 + 1) -> to go (0.4, 0.5, 0.7).
    # Row 1: per-token (-1, -1 + 2), the masked 5 ignored -> (0, 1), then 0.
    out = token_returns(torch.tensor([1.0, 2.0]), mask, token_rewards)
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.5, 0.7], [0.0, 1.0, 0.0]]))
    torch.testing.assert_close(token_returns(torch.tensor([1.0, 2.0]), mask),
                               torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))


def test_reinforce_pp_whitens_over_the_batch_not_the_group():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    mask = torch.ones(4, 1)
    # Returns 1, 0, 3, 3: mean 1.75, population var 1.6875 -> std 1.299038.
    adv = reinforce_pp_advantages(rewards, mask)
    torch.testing.assert_close(adv.view(-1), torch.tensor([-0.57735, -1.34715, 0.96225, 0.96225]),
                               atol=1e-4, rtol=0)
    # Baseline: group means subtracted first -> 0.5, -0.5, 0, 0: mean 0, std 0.353553.
    adv = reinforce_pp_advantages(rewards, mask, baseline=True)
    torch.testing.assert_close(adv.view(-1), torch.tensor([1.41421, -1.41421, 0.0, 0.0]), atol=1e-4, rtol=0)


def test_reinforce_pp_counts_every_token_and_the_kl_per_token():
    rewards = torch.tensor([[1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # Returns: row 0 (1, 1), row 1 (0): mean 2/3, population std sqrt(2/9) = 0.471405.
    adv = reinforce_pp_advantages(rewards, mask)
    torch.testing.assert_close(adv, torch.tensor([[0.70711, 0.70711], [-1.41421, 0.0]]), atol=1e-4, rtol=0)
    # A KL penalty on row 0's first token only lowers that token's return: (0.5, 1) and (0).
    kl = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    adv = reinforce_pp_advantages(rewards, mask, kl_penalty=kl)
    returns = torch.tensor([0.5, 1.0, 0.0])
    expected = (returns - returns.mean()) / returns.std(unbiased=False)
    torch.testing.assert_close(adv[mask.bool()], expected, atol=1e-5, rtol=0)


def test_compute_advantages_sequence_estimators_and_kl_in_the_reward():
    rewards = torch.tensor([[1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    group = compute_advantages("group", rewards, mask, scale_by_std=False)
    torch.testing.assert_close(group, torch.tensor([[0.5, 0.5, 0.0], [-0.5, -0.5, -0.5]]))
    # The KL penalty is summed over each completion's counted tokens: 0.1 + 0.1 = 0.2 off the
    # first reward (the masked 9.0 is not counted) -> rewards (0.8, 0) -> centred +-0.4.
    kl = torch.tensor([[0.1, 0.1, 9.0], [0.0, 0.0, 0.0]])
    with_kl = compute_advantages("group", rewards, mask, scale_by_std=False, kl_penalty=kl)
    torch.testing.assert_close(with_kl[:, 0], torch.tensor([0.4, -0.4]))
    # With the std: +-0.4 / sample std 0.565685 = +-0.707107.
    scaled = compute_advantages("group", rewards, mask, kl_penalty=kl)
    torch.testing.assert_close(scaled[:, 0], torch.tensor([0.70711, -0.70711]), atol=1e-4, rtol=0)
    torch.testing.assert_close(compute_advantages("reinforce", rewards, mask)[:, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(compute_advantages("rloo", rewards, mask)[:, 0], torch.tensor([1.0, -1.0]))
    token_level = compute_advantages("reinforce_pp", rewards, mask)
    torch.testing.assert_close(token_level, reinforce_pp_advantages(rewards, mask))


def test_compute_advantages_errors():
    with pytest.raises(ValueError, match="unknown estimator"):
        compute_advantages("ppo", torch.zeros(1, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="N = B \\* G = 2"):
        compute_advantages("group", torch.zeros(1, 2), torch.ones(3, 3))


# --- masked_mean / masked_whiten / aggregate ---------------------------------------------


def test_masked_mean_values_and_dim():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0]))


def test_masked_mean_all_zero_mask_is_zero_with_finite_grad():
    x = torch.tensor([[1.0, float("nan")], [2.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[0, 0], [1, 0]], dtype=torch.bool)
    out = masked_mean(x, mask, dim=1)
    torch.testing.assert_close(out.detach(), torch.tensor([0.0, 2.0]))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert masked_mean(torch.ones(3), torch.zeros(3)).item() == 0.0


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0], [100.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    # mean 2, population std sqrt(2/3) = 0.816497
    expected = torch.tensor([[-1.224745, 0.0, 1.224745], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask), expected, atol=1e-5, rtol=0)
    assert torch.equal(masked_whiten(torch.ones(2, 2), torch.ones(2, 2)), torch.zeros(2, 2))


def test_aggregate_modes_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # row 2 counts nothing: not in any mean
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum-norm", max_tokens=4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    assert aggregate(values, torch.zeros_like(mask), "seq-mean-token-mean").item() == 0.0


def test_aggregate_gradients_weigh_tokens_as_documented():
    values = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    aggregate(values, mask, "seq-mean-token-mean").backward()
    torch.testing.assert_close(values.grad, torch.tensor([[1 / 6, 1 / 6, 1 / 6], [0.5, 0.0, 0.0]]))
    values.grad = None
    aggregate(values, mask, "token-mean").backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.25, 0.25, 0.25], [0.25, 0.0, 0.0]]))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="unknown mode"):
        aggregate(torch.zeros(1, 2), torch.ones(1, 2), "sum")
    with pytest.raises(ValueError, match="max_tokens"):
        aggregate(torch.zeros(1, 2), torch.ones(1, 2), "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="same"):
        aggregate(torch.zeros(1, 2), torch.ones(1, 3))


# --- KL ----------------------------------------------------------------------------------


def test_kl_k3_hand_values():
    logps = torch.tensor([0.0, math.log(0.5), -1.0])
    ref_logps = torch.tensor([math.log(0.5), 0.0, -1.0])
    # d = ref - logp = log 0.5 -> 0.5 - log 0.5 - 1 = 0.193147
    # d = log 2 -> 2 - log 2 - 1 = 0.306853; d = 0 -> 0
    out = kl_k3(logps, ref_logps)
    torch.testing.assert_close(out, torch.tensor([0.5 + LOG2 - 1.0, 1.0 - LOG2, 0.0]))
    torch.testing.assert_close(out[:2], torch.tensor([0.1931, 0.3069]), atol=1e-4, rtol=0)


def test_kl_k3_non_negative():
    gen = torch.Generator().manual_seed(0)
    logps, ref_logps = -torch.rand(2, 64, generator=gen) * 5
    assert (kl_k3(logps, ref_logps) >= 0).all()


def test_kl_estimators_by_hand_with_gradients():
    ref = torch.tensor([[math.log(0.5), 0.0]])
    logps = torch.tensor([[0.0, math.log(0.5)]], requires_grad=True)  # d = logp - ref = (log 2, -log 2)
    k1 = kl_estimate(logps, ref, "k1")
    torch.testing.assert_close(k1.detach(), torch.tensor([[LOG2, -LOG2]]))
    k2 = kl_estimate(logps, ref, "k2")
    torch.testing.assert_close(k2.detach(), torch.tensor([[LOG2 ** 2 / 2, LOG2 ** 2 / 2]]))
    k3 = kl_estimate(logps, ref, "k3")
    torch.testing.assert_close(k3.detach(), torch.tensor([[0.5 - 1 + LOG2, 2 - 1 - LOG2]]))
    # d k2 / d logp = d; d k3 / d logp = 1 - exp(-d); d k1 / d logp = 1.
    k2.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[LOG2, -LOG2]]))
    logps.grad = None
    k3.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.5, -1.0]]))
    clamped = kl_estimate(logps, ref, "k1", clamp=0.2)
    torch.testing.assert_close(clamped.detach(), torch.tensor([[0.2, -0.2]]))
    with pytest.raises(ValueError, match="unknown estimator"):
        kl_estimate(logps, ref, "k4")


def test_kl_reward_penalty_is_a_constant_outside_the_graph():
    old = torch.tensor([[0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.5), math.log(0.5)]])
    out = kl_reward_penalty(old, ref, torch.tensor([[1, 0]]), coef=0.5, estimator="k1")
    torch.testing.assert_close(out, torch.tensor([[0.5 * LOG2, 0.0]]))
    assert not out.requires_grad


def test_adaptive_kl_coefficient_moves_towards_the_target():
    # error clip(0.03 / 0.01 - 1, +-0.2) = 0.2 -> 0.1 * (1 + 0.2 * 100 / 1000) = 0.102
    assert adaptive_kl_coef(0.1, 0.03, target=0.01, horizon=1000, n_steps=100) == pytest.approx(0.102)
    # error 0.009 / 0.01 - 1 = -0.1 -> 0.1 * (1 - 0.1 * 0.1) = 0.099
    assert adaptive_kl_coef(0.1, 0.009, target=0.01, horizon=1000, n_steps=100) == pytest.approx(0.099)
    assert adaptive_kl_coef(0.1, float("nan"), target=0.01, horizon=1000, n_steps=100) == 0.1
    with pytest.raises(ValueError, match="target"):
        adaptive_kl_coef(0.1, 0.1, target=0.0, horizon=1000, n_steps=1)


# --- token_entropy / selective_logps ----------------------------------------------------


def test_token_entropy_uniform_and_peaked():
    logits = torch.zeros(2, 3, 7)
    torch.testing.assert_close(token_entropy(logits), torch.full((2, 3), math.log(7)))
    peaked = torch.tensor([[[1000.0, 0.0, 0.0]]])
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    # p = (0.5, 0.5, 0) up to e^-1000 -> log 2
    assert token_entropy(torch.tensor([[[5.0, 5.0, -1e4]]])).item() == pytest.approx(LOG2)


def test_token_entropy_bf16_and_grad():
    logits = torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(2))
    naive = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    out = token_entropy(logits.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive, atol=2e-2, rtol=0)
    leaf = logits.clone().requires_grad_(True)
    token_entropy(leaf).sum().backward()
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_logps_matches_naive(temperature):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 13, generator=gen) * 4
    tokens = torch.randint(0, 13, (3, 5), generator=gen)
    leaf = logits.clone().requires_grad_(True)
    naive_leaf = logits.clone().requires_grad_(True)
    out = selective_logps(leaf, tokens, temperature)
    naive = torch.log_softmax(naive_leaf / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, naive)
    out.sum().backward()
    naive.sum().backward()
    torch.testing.assert_close(leaf.grad, naive_leaf.grad)


def test_selective_logps_bf16_dtype_and_errors():
    logits = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))
    tokens = torch.tensor([[0, 1, 7], [3, 3, 3]])
    out = selective_logps(logits.bfloat16(), tokens)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    rounded = logits.bfloat16().float().log_softmax(-1)
    torch.testing.assert_close(out, rounded.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
    assert selective_logps(torch.zeros(0, 3, 8), torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)
    with pytest.raises(ValueError, match="tokens"):
        selective_logps(logits, tokens[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        selective_logps(logits, tokens, temperature=0.0)
