"""The trainer's recomputed log-probs equal generation's (same positions, M-RoPE included)."""

import pytest
import torch

from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors.adapter import HFChatAdapter
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams


def _rollout(family, samples, temperature=0.9):
    torch.manual_seed(0)
    model, processor = build_tiny(family)
    adapter = HFChatAdapter(processor)
    prompts = adapter.encode_prompts(samples)
    # Mixed prompt lengths: the batch really is left-padded.
    assert (prompts.attention_mask == 0).any()
    rollouts = HFRolloutEngine(model, adapter).generate(
        prompts, 2, SamplingParams(max_new_tokens=12, temperature=temperature))
    return model, rollouts


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_generation_and_training_logps_agree(family, image_samples):
    model, r = _rollout(family, image_samples)
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    diff = ((logps - r.logps).abs() * r.completion_mask).max().item()
    assert diff <= 1e-4
    assert r.completion_mask.sum() > 10


def test_parity_check_detects_wrong_positions(image_samples):
    """Without the token-type ids, Qwen falls back to 1-D positions: the test above would fail."""
    model, r = _rollout("qwen2_5_vl", image_samples)
    r.prompts.token_aligned.clear()
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    assert ((logps - r.logps).abs() * r.completion_mask).max().item() > 1e-3
