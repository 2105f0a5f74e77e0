"""GRPO algorithm functions against hand-computed values."""

import math

import pytest
import torch

from lightrft_mm.algorithms.grpo import (
    group_advantages,
    kl_k3,
    masked_mean,
    policy_loss,
    selective_logps,
    token_entropy,
)


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


# --- masked_mean ------------------------------------------------------------------------


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


# --- kl_k3 ------------------------------------------------------------------------------


def test_kl_k3_hand_values():
    logps = torch.tensor([0.0, math.log(0.5), -1.0])
    ref_logps = torch.tensor([math.log(0.5), 0.0, -1.0])
    # d = ref - logp = log 0.5 -> 0.5 - log 0.5 - 1 = 0.193147
    # d = log 2 -> 2 - log 2 - 1 = 0.306853; d = 0 -> 0
    out = kl_k3(logps, ref_logps)
    torch.testing.assert_close(out, torch.tensor([0.5 + math.log(2.0) - 1.0, 1.0 - math.log(2.0), 0.0]))
    torch.testing.assert_close(out[:2], torch.tensor([0.1931, 0.3069]), atol=1e-4, rtol=0)


def test_kl_k3_non_negative():
    gen = torch.Generator().manual_seed(0)
    logps, ref_logps = -torch.rand(2, 64, generator=gen) * 5
    assert (kl_k3(logps, ref_logps) >= 0).all()


# --- policy_loss ------------------------------------------------------------------------


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


def test_policy_loss_clips_positive_and_negative():
    old_logps = torch.zeros(2, 1)
    # Row 0: ratio 1.5, A = +2 -> min(3.0, 1.2 * 2 = 2.4) -> loss -2.4
    # Row 1: ratio 0.5, A = -1 -> min(-0.5, 0.8 * -1 = -0.8) -> loss 0.8
    logps = torch.log(torch.tensor([[1.5], [0.5]]))
    loss, metrics = policy_loss(logps, old_logps, torch.tensor([2.0, -1.0]), torch.ones(2, 1))
    assert loss.item() == pytest.approx((-2.4 + 0.8) / 2)
    assert metrics["clip_fraction"] == 1.0
    assert metrics["ratio_mean"] == pytest.approx(1.0)


def test_policy_loss_no_clip_when_ratio_moves_against_advantage():
    # ratio 1.5 with A = -1 is not clipped (the pessimistic term is the unclipped one): 1.5
    # ratio 0.5 with A = +1 is not clipped either: -0.5
    logps = torch.log(torch.tensor([[1.5], [0.5]]))
    advantages = torch.tensor([-1.0, 1.0])
    loss, metrics = policy_loss(logps, torch.zeros(2, 1), advantages, torch.ones(2, 1))
    assert loss.item() == pytest.approx((1.5 - 0.5) / 2)
    assert metrics["clip_fraction"] == 0.0


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


def test_policy_loss_ignores_masked_tokens():
    gen = torch.Generator().manual_seed(1)
    logps = -torch.rand(3, 5, generator=gen)
    old_logps = -torch.rand(3, 5, generator=gen)
    ref_logps = -torch.rand(3, 5, generator=gen)
    entropy = torch.rand(3, 5, generator=gen)
    advantages = torch.tensor([0.5, -1.0, 2.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    coefs = dict(kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = policy_loss(
        logps, old_logps, advantages, mask, ref_logps=ref_logps, entropy=entropy, **coefs
    )
    junk = ~mask.bool()
    loss2, metrics2 = policy_loss(
        logps.masked_fill(junk, 50.0),
        old_logps.masked_fill(junk, -50.0),
        advantages,
        mask,
        ref_logps=ref_logps.masked_fill(junk, 80.0),
        entropy=entropy.masked_fill(junk, float("nan")),
        **coefs,
    )
    assert loss2.item() == pytest.approx(loss.item())
    assert metrics2 == pytest.approx(metrics)


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
    loss0, metrics0 = policy_loss(
        logps, logps, torch.tensor([0.0]), torch.ones(1, 2), ref_logps=ref_logps
    )
    assert loss0.item() == 0.0 and metrics0["kl"] == pytest.approx(k3) and metrics0["kl_loss"] == 0.0


def test_policy_loss_all_masked_is_zero():
    logps = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = policy_loss(logps, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and metrics["clip_fraction"] == 0.0
    assert torch.equal(logps.grad, torch.zeros(2, 3))


def test_policy_loss_shape_errors():
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


# --- token_entropy / selective_logps ----------------------------------------------------


def test_token_entropy_uniform_and_peaked():
    logits = torch.zeros(2, 3, 7)
    torch.testing.assert_close(token_entropy(logits), torch.full((2, 3), math.log(7)))
    peaked = torch.tensor([[[1000.0, 0.0, 0.0]]])
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    # p = (0.5, 0.5, 0) up to e^-1000 -> log 2
    assert token_entropy(torch.tensor([[[5.0, 5.0, -1e4]]])).item() == pytest.approx(math.log(2))


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
