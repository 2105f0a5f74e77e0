import torch

from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors.adapter import HFChatAdapter
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams, completion_mask_from


def test_completion_mask_keeps_tokens_through_the_first_eos():
    eos = 9
    ids = torch.tensor([[5, 6, 9, 0, 0], [5, 9, 0, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(completion_mask_from(ids, eos), expected)


def test_n_completions_per_prompt_group_major(image_samples):
    torch.manual_seed(0)
    model, processor = build_tiny("qwen2_5_vl")
    adapter = HFChatAdapter(processor)
    engine = HFRolloutEngine(model, adapter)
    r = engine.generate(adapter.encode_prompts(image_samples), 4, SamplingParams(max_new_tokens=6))
    assert r.completion_ids.shape == (12, 6) and r.n == 4 and len(r.texts) == 12
    # Rows 4g..4g+3 are prompt g's: identical prompt tokens within a group.
    for g in range(3):
        block = r.prompts.input_ids[4 * g:4 * g + 4]
        assert (block == block[0]).all()
    assert not torch.equal(r.prompts.input_ids[0], r.prompts.input_ids[4])
    # Sampling log-probs are real log-probabilities of the sampled tokens.
    assert (r.logps[r.completion_mask.bool()] < 0).all()
    assert (r.logps[~r.completion_mask.bool()] == 0).all()


def test_special_tokens_other_than_end_of_turn_are_never_sampled(image_samples):
    torch.manual_seed(0)
    model, processor = build_tiny("qwen2_5_vl")
    adapter = HFChatAdapter(processor)
    pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def favour_image_pad(module, args, output):  # make <|image_pad|> by far the most likely token
        output[..., pad_id] += 20.0
        return output

    model.lm_head.register_forward_hook(favour_image_pad)
    suppressed = set(adapter.special_ids_to_suppress())
    assert pad_id in suppressed and adapter.eos_token_id not in suppressed
    engine = HFRolloutEngine(model, adapter)
    prompts = adapter.encode_prompts(image_samples)
    r = engine.generate(prompts, 4, SamplingParams(max_new_tokens=8))
    assert not (set(r.completion_ids[r.completion_mask.bool()].tolist()) & suppressed)
    engine._suppress = []  # control: without suppression the pad token is what gets sampled
    r = engine.generate(prompts, 4, SamplingParams(max_new_tokens=8))
    assert pad_id in r.completion_ids.tolist()[0]


def test_greedy_is_deterministic(image_samples):
    model, processor = build_tiny("llava")
    adapter = HFChatAdapter(processor)
    engine = HFRolloutEngine(model, adapter)
    prompts = adapter.encode_prompts(image_samples)
    a = engine.generate(prompts, 1, SamplingParams(max_new_tokens=6, greedy=True))
    b = engine.generate(prompts, 1, SamplingParams(max_new_tokens=6, greedy=True))
    assert torch.equal(a.completion_ids, b.completion_ids)
