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


def _processed_logps(model, adapter, r, sampling):
    """Recompute, from one full forward, the log-prob of each sampled token under the
    distribution generate draws from: special tokens suppressed, the per-position temperature,
    then transformers' own top-k and top-p warpers."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from lightrft_mm.models.logprobs import sequence_inputs

    tc = r.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(**sequence_inputs(r.prompts, r.completion_ids, r.completion_mask)).logits[:, -tc - 1:-1]
    logits = logits.float()
    logits[..., adapter.special_ids_to_suppress()] = -float("inf")
    temps = torch.as_tensor(sampling.temperatures(tc), dtype=torch.float32).expand(tc)
    out = torch.zeros(r.completion_ids.shape)
    for t in range(tc):
        scores = logits[:, t] / temps[t]
        if sampling.top_k:
            scores = TopKLogitsWarper(sampling.top_k)(None, scores)
        if sampling.top_p < 1:
            scores = TopPLogitsWarper(sampling.top_p)(None, scores)
        out[:, t] = scores.log_softmax(-1).gather(-1, r.completion_ids[:, t:t + 1])[:, 0]
    return out


def test_recorded_sampling_logps_are_the_processed_distributions(image_samples):
    model, processor = build_tiny("qwen2_5_vl", seed=0)
    adapter = HFChatAdapter(processor)
    prompts = adapter.encode_prompts(image_samples)
    for sampling in (SamplingParams(max_new_tokens=8, temperature=0.8, top_k=2),
                     SamplingParams(max_new_tokens=8, temperature=1.2, top_p=0.5),
                     SamplingParams(max_new_tokens=8, temperature=0.7, top_k=3, first_temperature=3.0)):
        torch.manual_seed(0)
        r = HFRolloutEngine(model, adapter).generate(prompts, 4, sampling)
        real = r.completion_mask.bool()
        want = _processed_logps(model, adapter, r, sampling)
        assert (r.sample_logps - want)[real].abs().max().item() <= 1e-4, sampling
        # The policy at the sampling temperature is another, lower number: the trainer's quantity.
        assert (r.logps[real] < r.sample_logps[real] - 1e-3).any()
        if sampling.top_k == 2:  # drawn among two tokens: the sampled one had at least a fair share of mass
            assert r.sample_logps[real].mean().item() > -0.75 > r.logps[real].mean().item()


def test_a_checkpoints_generation_config_changes_nothing(image_samples):
    """Qwen-VL Instruct checkpoints ship repetition_penalty 1.05 (and top_k / top_p): none of it
    reaches the sampling; rollout.repetition_penalty does."""
    model, processor = build_tiny("qwen2_5_vl", seed=0)
    adapter = HFChatAdapter(processor)
    prompts = adapter.encode_prompts(image_samples)
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0)

    def sample(params=sampling):
        torch.manual_seed(3)
        return HFRolloutEngine(model, adapter).generate(prompts, 4, params)

    plain = sample()
    own = model.generation_config
    model.generation_config.repetition_penalty, model.generation_config.top_k = 3.0, 1
    try:
        shipped = sample()
    finally:
        model.generation_config = own
    assert model.generation_config.repetition_penalty == 3.0  # the model's own config is left as it was
    assert torch.equal(shipped.completion_ids, plain.completion_ids)
    assert torch.equal(shipped.sample_logps, plain.sample_logps)
    model.generation_config.repetition_penalty, model.generation_config.top_k = 1.0, 50
    penalised = sample(SamplingParams(max_new_tokens=10, temperature=1.0, repetition_penalty=3.0))
    # The penalty reaches the sampled distribution (a random tiny model's is nearly flat, so the
    # same seed can still draw the same tokens: their recorded log-probs are what must move).
    assert not torch.equal(penalised.sample_logps, plain.sample_logps)


def test_rollout_repetition_penalty_reaches_the_engine(tmp_path):
    from lightrft_mm.config import load_config
    from lightrft_mm.prepare import prepare_synthetic
    from lightrft_mm.strategy import STRATEGIES
    from lightrft_mm.trainer.setup import build_run

    data = prepare_synthetic("colors", tmp_path / "colors", n=4, seed=1)
    cfg = load_config("recipes/demo/colors.yaml", ["rollout.repetition_penalty=1.3", f"data.train=[{data}]",
                                                   "data.eval=[]", "warmup.steps=0", f"trainer.output_dir={tmp_path}/r",
                                                   "logging.progress=false"])
    run = build_run(cfg, STRATEGIES.get("single")(cfg.strategy, max_grad_norm=1.0))
    assert run.sampling.repetition_penalty == 1.3
