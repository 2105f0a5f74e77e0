"""tiny:qwen3_5: the real hybrid Qwen3.5 class (Gated DeltaNet linear attention + full attention,
Qwen3-VL vision tower) in rollout and training: images and videos reach the LM, left-padded mixed batches
generate what each prompt gives alone, generation and training log-probs agree, the linear
layers' conv / recurrent states follow the KV cache to the n completions, one step trains every
parameter, checkpoints reload, padding-free packing is refused, and the demo learns."""

from __future__ import annotations

import pytest
import torch

from lightrft_mm.config import load_config
from lightrft_mm.errors import ConfigError, MediaError
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.shared import prefill_once
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.adapter import PromptBatch
from lightrft_mm.processors.qwen3_5 import Qwen3_5Adapter
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.schema import Sample
from tests.test_shared import (  # noqa: F401  (media is a fixture; the three tests run on `setup` below)
    N, _samples, media, test_rollout_prefill_once_gives_the_same_completions_with_1_over_n_of_the_encoder_work,
    test_sampled_rollouts_keep_logprob_parity_with_the_trainer,
    test_training_forward_encodes_once_per_group_with_the_same_logps_and_gradients)

LONG = " ".join(["Describe the image. Listen to the audio. Watch the video. Choices: A, B, C, D."] * 6)


def _row(sid, parts, text):
    return Sample.from_dict({"id": sid, "messages": [{"role": "user", "content": [
        *parts, {"type": "text", "text": text}]}]})


def _image(path):
    return {"type": "image", "image": str(path)}


def _video(path):
    return {"type": "video", "video": str(path)}


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny("qwen3_5")
    return model, make_adapter(model, processor)


@pytest.fixture(scope="module")
def setup(media, tiny):  # noqa: F811
    """test_shared's prompts (one image; two images), a video row and a text-only row, for its three tests."""
    model, adapter = tiny
    samples = [*_samples("qwen3_5", media), _row("v", [_video(media / "v.mp4")], "Which way?"), _row("t", [], "Hi")]
    return "qwen3_5", model, adapter, adapter.encode_prompts(samples)


@pytest.fixture(scope="module")
def mixed(media):  # noqa: F811
    """Short image row, text-only rows (short and long: heavy left padding), a two-image row, a video row."""
    return [_row("a", [_image(media / "a.png")], "What colour is it?"), _row("t", [], "Say hi."),
            _row("l", [], LONG), _row("b", [_image(media / "b.png"), _image(media / "a.png")], "How many?"),
            _row("v", [_video(media / "v.mp4")], "Which way does it move?")]


def test_tiny_is_the_real_hybrid_class_and_sees_the_image(tiny, media):  # noqa: F811
    from transformers import Qwen3_5ForConditionalGeneration
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Attention, Qwen3_5GatedDeltaNet

    model, adapter = tiny
    assert type(model) is Qwen3_5ForConditionalGeneration and model.config.model_type == "qwen3_5"
    assert isinstance(adapter, Qwen3_5Adapter)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert set(model.config.text_config.layer_types) == {"linear_attention", "full_attention"}
    kinds = {type(m) for m in model.modules()}
    assert {Qwen3_5GatedDeltaNet, Qwen3_5Attention} <= kinds
    batch = adapter.encode_prompts([_row("a", [_image(media / "a.png")], "What colour?")])
    assert int((batch.token_aligned["mm_token_type_ids"] == 1).sum()) == 9  # 84x84 -> 96x96 -> 3x3 tokens
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits[0, -1]
        batch.media["pixel_values"] = torch.zeros_like(batch.media["pixel_values"])
        blank = model(**batch.model_inputs()).logits[0, -1]
    assert not torch.allclose(logits, blank)


def test_video_has_frame_timestamps_and_reaches_the_lm(tiny, media):  # noqa: F811
    """A 4-frame video at 2 fps: two temporal patches, each `<t seconds>` + its 9 pads (56 -> 96
    pixels, the tiny image processor's minimum: 3x3 merged tokens), as Qwen3VLProcessor writes it;
    its pixels change the logits."""
    model, adapter = tiny
    batch = adapter.encode_prompts([_row("v", [_video(media / "v.mp4")], "Which way?")])
    text = adapter.tokenizer.decode(batch.input_ids[0])
    assert "<0.2 seconds><|vision_start|>" + "<|video_pad|>" * 9 + "<|vision_end|><1.2 seconds>" in text
    assert batch.media["video_grid_thw"].tolist() == [[2, 6, 6]]
    assert int((batch.token_aligned["mm_token_type_ids"] == 2).sum()) == 18
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits[0, -1]
        batch.media["pixel_values_videos"] = torch.zeros_like(batch.media["pixel_values_videos"])
        blank = model(**batch.model_inputs()).logits[0, -1]
    assert not torch.allclose(logits, blank)


def test_audio_rows_are_refused_by_name(tiny, media):  # noqa: F811
    _, adapter = tiny
    with pytest.raises(MediaError, match=r"sample s: audio parts need an audio.*tiny:qwen2_audio.*Qwen3.5 models"):
        adapter.encode_prompts([_row("s", [{"type": "audio", "audio": str(media / "t.wav")}], "High?")])


@pytest.mark.parametrize("share", [True, False], ids=["prefill-once", "per-row-prefill"])
def test_left_padding_does_not_leak_into_the_recurrent_state(tiny, mixed, share):
    """Each prompt greedy-decodes the same tokens with the same log-probs in the left-padded mixed
    batch (the short rows padded by ~250 tokens, over several 64-token chunks of the delta rule)
    as alone, unpadded."""
    model, adapter = tiny
    prompts = adapter.encode_prompts(mixed)
    pads = (prompts.attention_mask == 0).sum(1)
    assert pads.max() > 200 and pads.min() == 0
    engine = HFRolloutEngine(model, adapter, share_prefill=share)
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    together = engine.generate(prompts, 2, greedy)
    for i, sample in enumerate(mixed):
        alone = engine.generate(adapter.encode_prompts([sample]), 2, greedy)
        assert torch.equal(together.completion_ids[2 * i:2 * i + 2], alone.completion_ids), sample.id
        diff = (together.logps[2 * i:2 * i + 2] - alone.logps).abs().max().item()
        assert diff <= 1e-4, (sample.id, diff)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen2_5_vl"])
def test_text_only_batches_prefilled_once_count_no_padding(family):
    """A batch without media gives M-RoPE models no rope offsets: `prefill_once` must give its
    prefill the mask's positions, as generate's decode steps use (before the fix the padded row
    of this batch decoded other tokens on qwen3_5, and log-probs 1.6e-3 off on qwen2_5_vl)."""
    model, processor = build_tiny(family)
    adapter = make_adapter(model, processor)
    short, long = _row("s", [], "Say hi."), _row("l", [], LONG)
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    engine = HFRolloutEngine(model, adapter)
    together = engine.generate(adapter.encode_prompts([short, long]), N, greedy)
    alone = engine.generate(adapter.encode_prompts([short]), N, greedy)
    assert torch.equal(together.completion_ids[:N], alone.completion_ids)
    assert (together.logps[:N] - alone.logps).abs().max().item() <= 1e-4
    logps, _ = forward_logprobs(model, together.prompts, together.completion_ids, together.completion_mask)
    assert ((logps - together.logps).abs() * together.completion_mask).max().item() <= 1e-4


@pytest.fixture(scope="module")
def sampled(tiny, mixed):
    model, adapter = tiny
    torch.manual_seed(0)
    r = HFRolloutEngine(model, adapter).generate(adapter.encode_prompts(mixed), 2,
                                                 SamplingParams(max_new_tokens=10, temperature=0.9))
    assert r.completion_mask.sum() > 20
    return r


def _diff(model, r, prompts: PromptBatch):
    with torch.no_grad():
        logps, _ = forward_logprobs(model, prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    return ((logps - r.logps).abs() * r.completion_mask).max().item()


def test_generation_and_training_logps_agree_on_a_left_padded_mixed_batch(tiny, sampled):
    assert _diff(tiny[0], sampled, sampled.prompts) <= 1e-4


def test_parity_check_detects_padding_leaking_into_the_linear_layers(tiny, sampled):
    """Negative control: with the padding unmasked (the Gated DeltaNet convolution and state see
    the pad tokens) the same check fails."""
    p = sampled.prompts
    leaky = PromptBatch(p.input_ids, torch.ones_like(p.attention_mask), p.token_aligned, p.media, p.encodings)
    assert _diff(tiny[0], sampled, leaky) > 1e-3


def _linear_states(cache):
    return [(layer.conv_states[0], layer.recurrent_states[0]) for layer in cache.layers
            if getattr(layer, "conv_states", None) and layer.conv_states[0] is not None]


def test_prefill_once_repeats_the_conv_and_recurrent_states(tiny, mixed):
    """The cache `prefill_once` hands to generate holds each prompt's linear-attention states n
    times, equal to those of prefilling every copy."""
    model, adapter = tiny
    prompts = adapter.encode_prompts(mixed)
    with torch.no_grad():
        shared = _linear_states(prefill_once(model, prompts, N))
        each = _linear_states(prefill_once(model, prompts.repeat(N, adapter.pad_token_id), 1))
    assert len(shared) == len(each) == 1  # the tiny model's one linear-attention layer
    for got, want in zip(shared[0], each[0]):
        assert got.shape[0] == len(mixed) * N
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_padding_free_is_refused_because_packed_rows_share_the_recurrent_state(tiny, mixed):
    """Packed rows would run through one convolution and delta-rule state (no varlen kernels on
    the torch fallback): a row's log-probs change with the row packed before it."""
    model, adapter = tiny
    with pytest.raises(ConfigError, match="trainer.padding_free: qwen3_5 has linear-attention.*padding_free=false"):
        load_config("recipes/demo/colors.yaml", ["model.name_or_path=tiny:qwen3_5", "trainer.padding_free=true"])
    prompts = adapter.encode_prompts([mixed[2], mixed[1]])  # text rows, long then short: only the packing differs
    ids = adapter.tokenizer([" red green blue yellow"] * 2, return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        padded, _ = forward_logprobs(model, prompts, ids, mask)
        packed, _ = forward_logprobs(model, prompts, ids, mask, packed=True)
    # The first row sees nothing before it (measured 5e-7); the second starts from the first
    # row's conv window and recurrent state (measured 7.5e-4; the fast-decaying heads of the
    # real init forget most of it within its prompt), far above the 1e-5 packing must keep.
    assert (packed[0] - padded[0]).abs().max() <= 1e-5
    assert (packed[1] - padded[1]).abs().max() > 1e-4


def test_checkpoint_reloads_with_transformers(tiny, media, tmp_path):  # noqa: F811
    from lightrft_mm.models import load_pretrained

    model, adapter = tiny
    model.save_pretrained(tmp_path)
    adapter.processor.save_pretrained(tmp_path)
    reloaded, processor = load_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    assert reloaded.config.text_config.layer_types == model.config.text_config.layer_types
    samples = _samples("qwen3_5", media)
    batch = adapter.encode_prompts(samples)
    batch2 = make_adapter(reloaded, processor).encode_prompts(samples)
    assert torch.equal(batch.input_ids, batch2.input_ids)
    with torch.no_grad():
        assert torch.allclose(model(**batch.model_inputs()).logits, reloaded(**batch2.model_inputs()).logits)


def test_one_step_trains_every_parameter(tmp_path):
    """Two GRPO steps on colour images with a reward that varies in every group (the sum of the
    completion's token ids: a length reward alone is constant here, the random policy rarely ends
    within 8 tokens): every parameter moves, the vision tower's, the Gated DeltaNet's (A_log,
    dt_bias, conv1d, ...) and the full-attention layer's included."""
    import json

    from lightrft_mm.config import load_config
    from lightrft_mm.models import load_pretrained
    from lightrft_mm.prepare import prepare_synthetic
    from lightrft_mm.trainer.loop import train

    data = prepare_synthetic("colors", tmp_path / "train", n=4, seed=1)
    reward = tmp_path / "ids.py"
    reward.write_text("def ids(inputs):\n    return [float(sum(x.completion_ids)) for x in inputs]\n")
    out = tmp_path / "run"
    train(load_config("recipes/demo/colors.yaml", [
        "model.name_or_path=tiny:qwen3_5", f"data.train=[{data}]", "data.eval=[]", "warmup.steps=0",
        "trainer.max_steps=2", "data.batch_size=2", "rollout.n=4", "trainer.lr=1e-2", f"trainer.output_dir={out}",
        "logging.progress=false", "logging.plot=false", f"rewards=[{{name: '{reward}:ids'}}]"]))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] > 0 for r in steps if "grad_norm" in r] == [True, True]
    before, _ = build_tiny("qwen3_5", seed=0)
    after = dict(load_pretrained(out / "checkpoint-final")[0].named_parameters())
    still = [n for n, p in before.named_parameters() if torch.equal(p.detach(), after[n].detach())]
    assert still == []
