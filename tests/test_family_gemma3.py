"""tiny:gemma3 (Gemma3ForConditionalGeneration) and its adapter: Gemma's chat format, images (several
per prompt) with text-only rows in left-padded batches, log-prob parity under the bidirectional
image mask and the sliding window, encode-once-per-group, padding-free packing, training, reload,
and the colour demo."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightrft_mm.errors import MediaError
from lightrft_mm.models import load_pretrained
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.gemma3 import Gemma3Adapter
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.schema import Sample
from tests.test_padding_free import test_packed_forward_equals_the_padded_one as _packed_equals_padded
from tests.test_shared import (  # noqa: F401  (media is a fixture; the tests run on this module's setup)
    _samples, media, test_rollout_prefill_once_gives_the_same_completions_with_1_over_n_of_the_encoder_work,
    test_sampled_rollouts_keep_logprob_parity_with_the_trainer,
    test_training_forward_encodes_once_per_group_with_the_same_logps_and_gradients)

SOFT = "<image_soft_token>"


def _sample(sid, *parts, system=None):
    content = [{"type": "image", "image": p} if p.endswith(".png") else {"type": "text", "text": p} for p in parts]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return Sample.from_dict({"id": sid, "messages": messages, "answer": "red"})


@pytest.fixture(scope="module")
def samples(image_paths):
    """Image, two images with a system message, and text-only rows of different lengths."""
    return [
        _sample("img", image_paths[0], "What color is the shape?"),
        _sample("txt", "Say hi."),
        _sample("multi", image_paths[1], "and", image_paths[2], "Describe the image.",
                system="You are a helpful assistant. Answer with one word."),
        _sample("txt-long", "How many shapes are in the image? Count them. Answer with one word."),
    ]


@pytest.fixture(scope="module")
def built():
    model, processor = build_tiny("gemma3", seed=0)
    return model, processor, make_adapter(model, processor)


@pytest.fixture(scope="module")
def rollouts(built, samples):
    model, _, adapter = built
    prompts = adapter.encode_prompts(samples)
    assert (prompts.attention_mask == 0).any()  # mixed lengths: the batch really is left-padded
    torch.manual_seed(0)
    return HFRolloutEngine(model, adapter).generate(prompts, 2, SamplingParams(max_new_tokens=12, temperature=0.9))


@pytest.fixture(scope="module")
def setup(built, media):  # noqa: F811  (the fixture the imported test_shared tests take)
    model, _, adapter = built
    rows = _samples("gemma3", media) + [_sample("t", "Say hi.")]
    return "gemma3", model, adapter, adapter.encode_prompts(rows)


def _max_diff(model, r, **kwargs) -> float:
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9, **kwargs)
    return ((logps - r.logps).abs() * r.completion_mask).max().item()


def test_tiny_gemma3_is_the_real_class_and_the_image_reaches_the_lm(built, samples):
    from transformers import Gemma3ForConditionalGeneration

    model, _, adapter = built
    assert type(model) is Gemma3ForConditionalGeneration and model.config.model_type == "gemma3"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    text = model.config.text_config
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    assert text.final_logit_softcapping is None and text.attn_logit_softcapping is None  # as Gemma 3 ships
    embed = model.get_input_embeddings()
    assert embed.embed_scale.item() == pytest.approx(math.sqrt(text.hidden_size))  # Gemma's scaled embeddings
    assert model.lm_head.weight is embed.weight  # tied, as the released checkpoints
    batch = adapter.encode_prompts(samples[:1])
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits[0, -1]
        batch.media["pixel_values"] = torch.zeros_like(batch.media["pixel_values"])
        blank = model(**batch.model_inputs()).logits[0, -1]
    assert not torch.allclose(logits, blank)  # changing the pixels changes the next-token distribution


def test_prompt_is_gemmas_chat_format_with_the_processors_image_tokens(built, samples):
    model, processor, adapter = built
    assert isinstance(adapter, Gemma3Adapter) and adapter.modalities == {"image"}
    tok = adapter.tokenizer
    assert adapter.eos_token_id == tok.convert_tokens_to_ids("<end_of_turn>") == model.generation_config.eos_token_id
    assert model.config.text_config.eos_token_id == adapter.eos_token_id
    enc = adapter.encode_one(samples[2])
    image = "\n\n<start_of_image>" + SOFT * 9 + "<end_of_image>\n\n"
    assert tok.decode(enc.input_ids) == (
        "<bos><start_of_turn>user\nYou are a helpful assistant. Answer with one word.\n\n"
        f"{image}and{image}Describe the image.<end_of_turn>\n<start_of_turn>model\n")
    soft = enc.input_ids == tok.convert_tokens_to_ids(SOFT)
    assert torch.equal(enc.token_aligned["token_type_ids"], soft.long())  # 1 exactly at the soft tokens
    assert enc.media["pixel_values"].shape == (2, 3, 84, 84) and len(enc.raw["image"]) == 2
    # The same tokens and pixels as Gemma3Processor gives for the rendered prompt.
    text = processor.apply_chat_template([{"role": m.role, "content": [
        {"type": p.type, "text": p.text} if p.type == "text" else {"type": "image"} for p in m.content]}
        for m in samples[2].messages], add_generation_prompt=True, tokenize=False)
    out = processor(text=[text], images=[enc.raw["image"]], return_tensors="pt")
    assert torch.equal(out["input_ids"][0], enc.input_ids)
    assert torch.equal(out["pixel_values"], enc.media["pixel_values"])
    text_only = adapter.encode_one(samples[1])
    assert not text_only.media and not text_only.token_aligned["token_type_ids"].any()


def test_left_padded_mixed_batch_generates_as_each_prompt_alone(built, samples):
    model, _, adapter = built
    engine, greedy = HFRolloutEngine(model, adapter), SamplingParams(max_new_tokens=8, greedy=True)
    batch = engine.generate(adapter.encode_prompts(samples), 1, greedy)
    for row, sample in enumerate(samples):
        alone = engine.generate(adapter.encode_prompts([sample]), 1, greedy)
        width = alone.completion_ids.shape[1]
        assert torch.equal(batch.completion_ids[row, :width], alone.completion_ids[0]), sample.id
        assert (batch.logps[row, :width] - alone.logps[0]).abs().max().item() <= 1e-4, sample.id


def test_generation_and_training_logps_agree_through_image_blocks_and_the_window(built, rollouts):
    model, _, _ = built
    r = rollouts
    assert r.prompts.media["pixel_values"].shape[0] == 2 * 3  # 3 images per copy of the batch, n=2
    assert r.completion_mask.sum() > 20
    window = model.config.text_config.sliding_window
    assert r.prompts.input_ids.shape[1] > 3 * window  # the sliding layer's mask and cache really cut
    assert _max_diff(model, r) <= 1e-4
    assert _max_diff(model, r, share_media=False) <= 1e-4


def test_parity_check_fails_without_the_image_blocks_or_with_another_window(built, rollouts):
    model, _, _ = built
    r = copy.copy(rollouts)
    r.prompts = copy.copy(rollouts.prompts)
    r.prompts.token_aligned = {}  # image tokens causal in training, bidirectional in generation
    assert _max_diff(model, r) > 1e-3
    text = model.config.text_config
    window = text.sliding_window
    text.sliding_window = 4 * window  # the training forward would see further back than generation did
    try:
        assert _max_diff(model, rollouts) > 1e-3
    finally:
        text.sliding_window = window
    assert _max_diff(model, rollouts) <= 1e-4


@pytest.mark.parametrize("share", [True, False], ids=["shared-media", "per-row-media"])
def test_packed_forward_equals_the_padded_one(share, media):  # noqa: F811
    _packed_equals_padded("gemma3", share, media)


def test_packed_forward_equals_the_padded_one_with_eager_attention(media):  # noqa: F811
    _packed_equals_padded("gemma3", True, media, attn="eager")


def test_media_it_does_not_take_and_placeholder_mismatch_name_the_sample(built, image_paths):
    _, _, adapter = built
    for kind in ("video", "audio"):
        sample = Sample.from_dict({"id": f"{kind}-7", "messages": [{"role": "user", "content": [
            {"type": kind, kind: f"x.{kind}"}, {"type": "text", "text": "?"}]}]})
        with pytest.raises(MediaError, match=rf"sample {kind}-7: Gemma 3 takes text and image parts only.*tiny:qwen2"):
            adapter.encode_one(sample)
    bad = _sample("bad-3", image_paths[0], "Look: <start_of_image> here")
    with pytest.raises(MediaError, match="sample bad-3: the rendered prompt holds 2 '<start_of_image>'"):
        adapter.encode_one(bad)


def test_checkpoint_reloads_with_the_same_prompts_and_logits(built, samples, tmp_path):
    model, processor, adapter = built
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reproc = load_pretrained(tmp_path)
    assert type(reloaded) is type(model) and type(reproc) is type(processor)
    readapter = make_adapter(reloaded, reproc)
    assert isinstance(readapter, Gemma3Adapter) and readapter.eos_token_id == adapter.eos_token_id
    batch, batch2 = adapter.encode_prompts(samples), readapter.encode_prompts(samples)
    assert torch.equal(batch.input_ids, batch2.input_ids)
    assert torch.equal(batch.token_aligned["token_type_ids"], batch2.token_aligned["token_type_ids"])
    with torch.no_grad():
        assert torch.allclose(model(**batch.model_inputs()).logits, reloaded(**batch2.model_inputs()).logits)


def test_one_training_run_step_changes_every_parameter(tmp_path):
    from lightrft_mm.config import load_config
    from lightrft_mm.prepare import prepare_synthetic
    from lightrft_mm.trainer.loop import train

    data = prepare_synthetic("colors", tmp_path / "colors", n=8, seed=1)
    reward = tmp_path / "length.py"  # varies within every group: every step has a gradient
    reward.write_text("def length(inputs):\n    return [float(len(x.completion_ids)) for x in inputs]\n")
    out = tmp_path / "run"
    train(load_config("recipes/demo/colors.yaml", [
        "model.name_or_path=tiny:gemma3", f"data.train=[{data}]", "data.eval=[]", "warmup.steps=0",
        "trainer.max_steps=2", "data.batch_size=4", "rollout.n=4", "trainer.lr=1e-2", f"trainer.output_dir={out}",
        "logging.progress=false", "logging.plot=false", f"rewards=[{{name: '{reward}:length'}}]"]))
    before, _ = build_tiny("gemma3", seed=0)
    after = dict(load_pretrained(out / "checkpoint-final")[0].named_parameters())
    unchanged = [n for n, p in before.named_parameters() if torch.equal(p, after[n])]
    assert not unchanged, f"parameters that never changed: {unchanged}"
