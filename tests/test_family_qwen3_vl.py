"""tiny:qwen3_vl: the real Qwen3-VL class (DeepStack, interleaved M-RoPE, text timestamps in
video prompts), its adapter, generation in mixed batches, log-prob parity, encode-once-per-group,
padding-free packing, training of every parameter, checkpoint reload and the demo."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lightrft_mm.datasets.synthetic_video import write_mp4
from lightrft_mm.errors import MediaError
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.adapter import HFChatAdapter
from lightrft_mm.processors.qwen3_vl import Qwen3VLAdapter, temporal_patch_times
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.schema import Sample
from tests.test_padding_free import test_packed_forward_equals_the_padded_one as _packed_test
from tests.test_shared import (  # noqa: F401  (imported tests run here with this module's `setup`)
    test_rollout_prefill_once_gives_the_same_completions_with_1_over_n_of_the_encoder_work,
    test_sampled_rollouts_keep_logprob_parity_with_the_trainer,
    test_training_forward_encodes_once_per_group_with_the_same_logps_and_gradients,
)

FAMILY = "qwen3_vl"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_vl")
    rng = np.random.default_rng(0)
    for name, shape in (("a.png", (84, 84, 3)), ("b.png", (56, 112, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
    write_mp4(root / "v.mp4", rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8), fps=2)  # 2 s
    write_mp4(root / "w.mp4", rng.integers(0, 256, (12, 64, 96, 3), dtype=np.uint8), fps=4)  # 3 s
    return root


def _row(sid, *parts):
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return Sample.from_dict({"id": sid, "messages": [{"role": "user", "content": content}]})


@pytest.fixture(scope="module")
def samples(media):
    image = lambda name: {"type": "image", "image": str(media / name)}  # noqa: E731
    video = lambda name, **kw: {"type": "video", "video": str(media / name), **kw}  # noqa: E731
    return {
        "image": _row("image", image("a.png"), "What colour is it?"),
        "multi": _row("multi", image("b.png"), "and", image("a.png"), "Describe the image."),
        "video": _row("video", video("v.mp4"), "Which way does it move?"),
        "video_image": _row("video_image", "Watch", video("w.mp4", fps=2.0), image("b.png"), "Hi"),
        "text": _row("text", "Say hi."),
    }


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(FAMILY)
    return model, processor, make_adapter(model, processor)


@pytest.fixture(scope="module")
def setup(tiny, samples):
    """(family, model, adapter, prompts) for the tests imported from tests/test_shared.py."""
    model, _, adapter = tiny
    rows = [samples[k] for k in ("image", "multi", "video", "text")]
    return FAMILY, model, adapter, adapter.encode_prompts(rows)


def test_tiny_model_is_the_real_class_and_sees_images_and_videos(tiny, samples):
    from transformers import Qwen3VLForConditionalGeneration

    model, _, adapter = tiny
    assert type(model) is Qwen3VLForConditionalGeneration and isinstance(adapter, Qwen3VLAdapter)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert len(model.model.visual.deepstack_merger_list) == 1  # DeepStack: vision layer 0 into text layer 0
    assert model.config.text_config.rope_parameters["mrope_interleaved"]
    for key, pixels in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        batch = adapter.encode_prompts([samples[key]])
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits[0, -1]
            batch.media[pixels] = torch.zeros_like(batch.media[pixels])
            blank = model(**batch.model_inputs()).logits[0, -1]
        assert not torch.allclose(logits, blank), key


def test_image_prompts_equal_the_qwen3_vl_processor(tiny, samples):
    """Image and multi-image prompts are exactly what Qwen3VLProcessor makes (84 x 84 -> 9 tokens)."""
    _, processor, adapter = tiny
    reference = HFChatAdapter(processor)
    for key in ("image", "multi", "text"):
        ours, theirs = adapter.encode_one(samples[key]), reference.encode_one(samples[key])
        assert torch.equal(ours.input_ids, theirs.input_ids), key
        if key != "text":
            assert torch.equal(ours.token_aligned["mm_token_type_ids"], theirs.token_aligned["mm_token_type_ids"])
            assert all(torch.equal(ours.media[k], theirs.media[k]) for k in ("pixel_values", "image_grid_thw"))
    assert int((adapter.encode_one(samples["image"]).input_ids == adapter.image_token_id).sum()) == 9


def test_video_prompts_carry_the_timestamps_as_the_qwen3_vl_processor_writes_them(tiny, samples, media):
    """Per temporal patch `<t seconds><|vision_start|>pads<|vision_end|>`, the text of
    Qwen3VLProcessor.replace_video_token given the frames' indices and the video's fps."""
    from transformers.video_utils import VideoMetadata

    _, processor, adapter = tiny
    ip = adapter.image_processor
    enc = adapter.encode_one(samples["video_image"])
    clip = adapter.load_clip(samples["video_image"].media("video")[0], "test")
    video_fps = 4.0
    meta = VideoMetadata(total_num_frames=12, fps=video_fps,
                         frames_indices=np.round(clip.timestamps * video_fps).astype(int).tolist())
    stock = copy.copy(processor)  # the stock Qwen3VLProcessor code, with the video sizes it reads
    stock.video_processor = SimpleNamespace(merge_size=ip.merge_size, temporal_patch_size=ip.temporal_patch_size)
    expansion = stock.replace_video_token({"video_grid_thw": enc.media["video_grid_thw"],
                                           "video_metadata": [meta]}, 0)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Watch"}, {"type": "video"}, {"type": "image"},
                                      {"type": "text", "text": "Hi"}]}], add_generation_prompt=True, tokenize=False)
    image = adapter.encode_one(_row("i", {"type": "image", "image": str(media / "b.png")}))
    text = text.replace(processor.video_token, expansion).replace(
        processor.image_token, processor.image_token * int((image.input_ids == adapter.image_token_id).sum()))
    expected = adapter.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert enc.input_ids.tolist() == expected
    # 3 s at 2 fps: 6 frames (indices 0, 2, 4, 7, 9, 11 of 12 at 4 fps) -> 3 temporal patches.
    assert "<0.2 seconds>" in expansion and "<1.4 seconds>" in expansion and expansion.count("seconds") == 3
    gt, gh, gw = enc.media["video_grid_thw"][0].tolist()
    assert gt == 3 and int((enc.input_ids == adapter.video_token_id).sum()) == gt * gh * gw // 4
    assert temporal_patch_times([0.0, 0.5, 1.0], 2) == [0.25, 1.0]  # an odd count pads with the last frame


def test_left_padded_mixed_batches_generate_as_each_prompt_alone(tiny, samples):
    """Image, multi-image, video, video+image and text rows in one left-padded batch: greedy
    completions and their log-probs equal those of each prompt generated alone."""
    model, _, adapter = tiny
    rows = [samples[k] for k in ("image", "text", "video", "multi", "video_image")]
    prompts = adapter.encode_prompts(rows)
    assert (prompts.attention_mask == 0).any() and len(set(prompts.attention_mask.sum(1).tolist())) == len(rows)
    sampling = SamplingParams(max_new_tokens=6, greedy=True)
    engine = HFRolloutEngine(model, adapter)
    batch = engine.generate(prompts, 2, sampling)
    for i, sample in enumerate(rows):
        alone = engine.generate(adapter.encode_prompts([sample]), 1, sampling)
        n = int(alone.completion_mask.sum())
        for j in (2 * i, 2 * i + 1):
            assert batch.completion_ids[j, :n].tolist() == alone.completion_ids[0, :n].tolist(), sample.id
            assert (batch.logps[j, :n] - alone.logps[0, :n]).abs().max().item() <= 1e-4, sample.id


def _rollout(tiny, samples):
    model, _, adapter = tiny
    torch.manual_seed(0)
    prompts = adapter.encode_prompts([samples[k] for k in ("image", "video_image", "text", "multi")])
    return model, HFRolloutEngine(model, adapter).generate(prompts, 2, SamplingParams(max_new_tokens=12,
                                                                                       temperature=0.9))


def test_generation_and_training_logps_agree_and_the_check_can_fail(tiny, samples):
    model, r = _rollout(tiny, samples)
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    assert ((logps - r.logps).abs() * r.completion_mask).max().item() <= 1e-4
    assert r.completion_mask.sum() > 20
    # Negative control: with every token typed as text the model computes 1-D positions.
    r.prompts.token_aligned["mm_token_type_ids"].zero_()
    wrong, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    assert ((wrong - r.logps).abs() * r.completion_mask).max().item() > 1e-3


def test_shared_features_carry_deepstack(tiny, setup):
    """The once-per-group features hold the DeepStack features of every row; dropping them changes the logps."""
    from lightrft_mm.models.shared import group_encoder_outputs

    model, _, adapter = tiny
    prompts = setup[3].repeat(2, adapter.pad_token_id)
    outputs, _ = group_encoder_outputs(model, prompts)
    image = outputs["image"]
    assert len(image.deepstack_features) == len(model.config.vision_config.deepstack_visual_indexes)
    assert all(len(layer) == len(image.pooler_output) for layer in image.deepstack_features)
    ids = torch.full((prompts.input_ids.shape[0], 3), adapter.tokenizer.convert_tokens_to_ids("red"))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        shared, _ = forward_logprobs(model, prompts, ids, mask)
        plain, _ = forward_logprobs(model, prompts, ids, mask, share_media=False)
        assert (shared - plain).abs().max().item() <= 1e-5
        inputs = prompts.model_inputs()
        for key in ("pixel_values", "pixel_values_videos"):
            inputs.pop(key)
        for kind in outputs.values():
            kind.deepstack_features = [tuple(torch.zeros_like(f) for f in layer) for layer in kind.deepstack_features]
        out = model(**inputs, mm_encoder_outputs=outputs)
        full = model(**prompts.model_inputs())
    assert (out.logits - full.logits).abs().max().item() > 1e-4


@pytest.mark.parametrize("share", [True, False], ids=["shared-media", "per-row-media"])
def test_packed_forward_equals_the_padded_one(share, media, monkeypatch):
    import tests.test_padding_free as padding_free

    # The imported test builds its samples with tests.test_shared._samples: give it this family's.
    monkeypatch.setattr(padding_free, "_samples", lambda family, root: [
        _row("i", {"type": "image", "image": str(root / "a.png")}, "Colour?"),
        _row("v", {"type": "video", "video": str(root / "v.mp4")}, "Move?"),
        _row("t", "Say hi.")])
    _packed_test(FAMILY, share, media)


def test_audio_is_refused_with_the_sample_and_the_families_that_take_it(tiny, tmp_path):
    _, _, adapter = tiny
    row = _row("clip-3", {"type": "audio", "audio": str(tmp_path / "a.wav")}, "Listen.")
    with pytest.raises(MediaError, match=r"sample clip-3: audio parts .*qwen2_audio"):
        adapter.encode_one(row)


def test_checkpoint_reloads_with_the_same_logits(tiny, samples, tmp_path):
    from lightrft_mm.models import load_pretrained

    model, processor, adapter = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reprocessor = load_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    rows = [samples[k] for k in ("image", "video_image", "text")]
    batch = adapter.encode_prompts(rows)
    batch2 = make_adapter(reloaded, reprocessor).encode_prompts(rows)
    assert torch.equal(batch.input_ids, batch2.input_ids)
    assert all(torch.equal(batch.media[k], batch2.media[k]) for k in batch.media)
    with torch.no_grad():
        assert torch.allclose(model(**batch.model_inputs()).logits, reloaded(**batch2.model_inputs()).logits)


def _write_mixed_data(root, rng):
    rows = []
    (root / "media").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(root / "media" / f"{i}.png")
        write_mp4(root / "media" / f"{i}.mp4", rng.integers(0, 256, (4, 56, 56, 3), dtype=np.uint8), fps=2)
        part = ({"type": "image", "image": f"media/{i}.png"} if i % 2 == 0
                else {"type": "video", "video": f"media/{i}.mp4"})
        rows.append({"id": f"r{i}", "answer": "red",
                     "messages": [{"role": "user", "content": [part, {"type": "text", "text": "Colour?"}]}]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


def test_one_training_step_changes_every_parameter(tmp_path):
    """Two GRPO steps on image and video rows move
    every parameter of the model: vision blocks, position embeddings, both mergers and DeepStack
    mergers, every text layer (q/k norms included), embeddings and head."""
    from lightrft_mm.config import load_config
    from lightrft_mm.models import load_pretrained
    from lightrft_mm.trainer.loop import train

    data = _write_mixed_data(tmp_path / "data", np.random.default_rng(3))
    # The random tiny model almost never samples its end of turn in 8 tokens (every completion has
    # the same length), so the reward that varies in every group is the sum of the token ids mod 11.
    reward = tmp_path / "tokens.py"
    reward.write_text("def tokens(inputs):\n    return [float(sum(x.completion_ids) % 11) for x in inputs]\n")
    out = tmp_path / "run"
    train(load_config("recipes/demo/colors.yaml", [
        f"model.name_or_path=tiny:{FAMILY}", f"data.train=[{data}]", "data.eval=[]", "warmup.steps=0",
        "trainer.max_steps=2", "data.batch_size=2", "rollout.n=4", "trainer.lr=1e-2", f"trainer.output_dir={out}",
        "logging.progress=false", "logging.plot=false", f"rewards=[{{name: '{reward}:tokens'}}]"]))
    before, _ = build_tiny(FAMILY, seed=0)
    after = dict(load_pretrained(out / "checkpoint-final")[0].named_parameters())
    unchanged = [n for n, p in before.named_parameters() if torch.equal(p.detach(), after[n].detach())]
    assert unchanged == []


def test_deepstack_mergers_are_projectors(tiny):
    """model.freeze=[vision] keeps the DeepStack mergers training with the main merger (both map
    vision features into the text model), and the FSDP2 / ZeRO plans wrap each as a unit."""
    from lightrft_mm.models.trainable import part_of_each_parameter

    model, _, _ = tiny
    names = {id(p): n for n, p in model.named_parameters()}
    owners = {names[id(p)].split(".")[2] for p in part_of_each_parameter(model)["projector"]}
    assert owners == {"merger", "deepstack_merger_list"}
