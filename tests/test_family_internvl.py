"""tiny:internvl (InternVL3 -hf): the real class, dynamic tiles per image, mixed left-padded
batches, log-prob parity, encode-once-per-group, padding-free, training, reload and the demo."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from lightrft_mm.datasets.synthetic_video import write_mp4
from lightrft_mm.errors import MediaError
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.internvl import InternVLAdapter, internvl_image_processor_class
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.schema import Sample
from tests import test_mixed_modalities
from tests.test_mixed_modalities import mixed  # noqa: F401  (a fixture)
from tests.test_padding_free import test_packed_forward_equals_the_padded_one as packed_forward_check
from tests.test_shared import (  # noqa: F401  (media is a fixture; the three tests run on `setup` below)
    media, test_rollout_prefill_once_gives_the_same_completions_with_1_over_n_of_the_encoder_work,
    test_sampled_rollouts_keep_logprob_parity_with_the_trainer,
    test_training_forward_encodes_once_per_group_with_the_same_logps_and_gradients)

TOKENS_PER_TILE = 4  # 56-pixel tiles of 14-pixel patches, 0.5 pixel shuffle


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, processor = build_tiny("internvl")
    return model, processor, make_adapter(model, processor)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Random images of three aspect ratios: square, wide, tall."""
    root = tmp_path_factory.mktemp("internvl")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"square.png": (84, 84), "wide.png": (56, 112), "tall.png": (140, 56)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    write_mp4(root / "clip.mp4", rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8), fps=2)  # 4 frames sampled
    return root


def _row(sid, root, files, text, system=None):
    kind = lambda name: "video" if name.endswith(".mp4") else "image"  # noqa: E731
    parts = [{"type": kind(n), kind(n): str(root / n)} for n in files] + [{"type": "text", "text": text}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": parts}]
    return Sample.from_dict({"id": sid, "messages": messages})


def _mixed(root):
    """Rows of different lengths: one image, text only, two images of other shapes, text with a
    system turn, a video after an image."""
    return [_row("square", root, ["square.png"], "What colour?"),
            _row("text", root, [], "Say hi."),
            _row("two", root, ["wide.png", "tall.png"], "Which one is wider? Answer with one word."),
            _row("sys", root, [], "Count to three.", system="You are a helpful assistant."),
            _row("clip", root, ["wide.png", "clip.mp4"], "Which way does it move?")]


@pytest.fixture(scope="module")
def setup(tiny, pictures):
    """What tests/test_shared.py's three tests take: (family, model, adapter, prompts)."""
    model, _, adapter = tiny
    return "internvl", model, adapter, adapter.encode_prompts(_mixed(pictures))


def test_tiny_internvl_is_the_real_class_and_images_and_videos_reach_the_lm(tiny, pictures):
    from transformers import InternVLForConditionalGeneration

    model, _, adapter = tiny
    assert type(model) is InternVLForConditionalGeneration and isinstance(adapter, InternVLAdapter)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    for files in (["square.png"], ["clip.mp4"]):  # an image's tiles, a video's frames
        batch = adapter.encode_prompts([_row("one", pictures, files, "What colour?")])
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits[0, -1]
            batch.media["pixel_values"] = torch.zeros_like(batch.media["pixel_values"])
            blank = model(**batch.model_inputs()).logits[0, -1]
        assert not torch.allclose(logits, blank), files


def _spans(ids: list[int], start: int, end: int, context: int) -> list[int]:
    """The lengths of the <img> ... </img> spans of a prompt (each span holds only <IMG_CONTEXT>)."""
    spans = []
    while start in ids:
        i, j = ids.index(start), ids.index(end)
        assert set(ids[i + 1:j]) == {context}
        spans.append(j - i - 1)
        ids = ids[j + 1:]
    assert context not in ids
    return spans


def test_each_image_is_tiled_by_its_aspect_ratio_and_each_frame_is_one_tile(tiny, pictures):
    """<img> + <IMG_CONTEXT> x (4 x tiles) + </img> per image (tiles from the GotOcr2 grid rule),
    `FrameK: <img>` + 4 x <IMG_CONTEXT> + `</img>` per sampled frame, as InternVLProcessor writes them."""
    _, processor, adapter = tiny
    tok = processor.tokenizer
    ids_of = {t: tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>")}
    ip = processor.image_processor
    tiles = {name: ip.get_number_of_image_patches(*Image.open(pictures / name).size[::-1], {})
             for name in ("square.png", "wide.png", "tall.png")}
    # 2x2 grid + thumbnail, 2x1 + thumbnail, 1x3 + thumbnail: one batch, three tile counts.
    assert tiles == {"square.png": 5, "wide.png": 3, "tall.png": 4}
    tiles["clip.mp4"] = [1] * 4  # 2 s at the default 2 fps: 4 frames of one tile each
    batch = adapter.encode_prompts(_mixed(pictures))
    files = [["square.png"], [], ["wide.png", "tall.png"], [], ["wide.png", "clip.mp4"]]
    for enc, names in zip(batch.encodings, files, strict=True):
        spans = _spans(enc.input_ids.tolist(), *ids_of.values())
        per_tile = [[tiles[n]] if isinstance(tiles[n], int) else tiles[n] for n in names]
        assert spans == [TOKENS_PER_TILE * t for item in per_tile for t in item]
        assert enc.media.get("pixel_values", torch.zeros(0, 3, 56, 56)).shape == (sum(map(sum, per_tile)), 3, 56, 56)
    assert batch.media["pixel_values"].shape[0] == 5 + 3 + 4 + 3 + 4
    # The -hf template's one <IMG_CONTEXT>\n / <video>\n per part, expanded in place.
    text = tok.decode(batch.encodings[4].input_ids)
    frame = "<img>" + "<IMG_CONTEXT>" * TOKENS_PER_TILE + "</img>"
    assert text == ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 12 + "</img>\n"
                    + "\n".join(f"Frame{k}: {frame}" for k in range(1, 5))
                    + "\nWhich way does it move?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("own_crop", [True, False], ids=["crop", "released-config"])
def test_image_prompts_are_encoded_exactly_as_the_internvl_processor_encodes_them(tiny, pictures, own_crop):
    """Also with `crop_to_patches: false` in the image processor's own config, as the released
    checkpoints have it: InternVLProcessor tiles anyway (its call default), and so does the adapter."""
    import copy

    processor = copy.deepcopy(tiny[1])
    processor.image_processor.crop_to_patches = own_crop
    adapter = InternVLAdapter(processor)
    for sample in _mixed(pictures)[:3]:
        enc = adapter.encode_one(sample)
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": p.type} if p.type != "text" else {"type": "text", "text": p.text}
                                          for p in sample.messages[0].content]}],
            add_generation_prompt=True, tokenize=False)
        images = [Image.open(p.image).convert("RGB") for p in sample.media("image")]
        out = processor(text=[text], images=images or None, return_tensors="pt")
        assert torch.equal(enc.input_ids, out["input_ids"][0]), sample.id
        if images:
            assert torch.equal(enc.media["pixel_values"], out["pixel_values"]), sample.id


def test_greedy_generation_in_a_left_padded_mixed_batch_equals_each_prompt_alone(tiny, pictures):
    model, _, adapter = tiny
    samples = _mixed(pictures)
    prompts = adapter.encode_prompts(samples)
    assert (prompts.attention_mask == 0).any() and prompts.attention_mask[:, -1].all()
    sampling = SamplingParams(max_new_tokens=6, greedy=True)
    engine = HFRolloutEngine(model, adapter)
    batch = engine.generate(prompts, 2, sampling)
    for row, sample in enumerate(samples):
        alone = engine.generate(adapter.encode_prompts([sample]), 1, sampling)
        width = int(alone.completion_mask.sum())
        for copy in (2 * row, 2 * row + 1):
            assert torch.equal(batch.completion_ids[copy, :width], alone.completion_ids[0, :width]), sample.id
            assert (batch.logps[copy, :width] - alone.logps[0, :width]).abs().max().item() <= 1e-4
    suppressed = set(adapter.special_ids_to_suppress())
    assert not suppressed & set(batch.completion_ids[batch.completion_mask.bool()].tolist())


@pytest.mark.parametrize("share", [True, False], ids=["shared-media", "per-row-media"])
def test_generation_and_training_logps_agree(tiny, pictures, share):
    model, _, adapter = tiny
    torch.manual_seed(3)
    r = HFRolloutEngine(model, adapter).generate(adapter.encode_prompts(_mixed(pictures)), 2,
                                                 SamplingParams(max_new_tokens=10, temperature=0.9))
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask, temperature=0.9,
                                share_media=share)
    assert ((logps - r.logps).abs() * r.completion_mask).max().item() <= 1e-4
    assert r.completion_mask.sum() > 20


def test_parity_check_detects_wrong_positions_and_a_wrong_image(tiny, pictures):
    """The same check fails when the forward counts the left padding, or sees other pixels."""
    model, _, adapter = tiny
    torch.manual_seed(3)
    r = HFRolloutEngine(model, adapter).generate(adapter.encode_prompts(_mixed(pictures)), 2,
                                                 SamplingParams(max_new_tokens=10, temperature=0.9))
    mask = r.completion_mask
    with torch.no_grad():
        padded = r.prompts.attention_mask.clone()
        r.prompts.attention_mask.fill_(1)  # padding attended and counted in the positions
        wrong, _ = forward_logprobs(model, r.prompts, r.completion_ids, mask, temperature=0.9)
        r.prompts.attention_mask.copy_(padded)
        r.prompts.media["pixel_values"] = r.prompts.media["pixel_values"].flip(0)
        other, _ = forward_logprobs(model, r.prompts, r.completion_ids, mask, temperature=0.9, share_media=False)
    assert ((wrong - r.logps).abs() * mask).max().item() > 1e-3
    assert ((other - r.logps).abs() * mask).max().item() > 1e-3


@pytest.mark.parametrize("share", [True, False], ids=["shared-media", "per-row-media"])
def test_packed_forward_equals_the_padded_one(share, media):  # noqa: F811
    packed_forward_check("internvl", share, media)


def test_a_mixed_jsonl_trains_two_steps_without_its_audio_rows(mixed, tmp_path, caplog, monkeypatch):  # noqa: F811
    monkeypatch.setitem(test_mixed_modalities.TAKES, "internvl", {"image", "multi_image", "video", "text"})
    test_mixed_modalities.test_mixed_jsonl_trains_two_steps(mixed, tmp_path, "internvl", caplog)


def test_audio_parts_and_stray_placeholders_are_refused_clearly(tiny, pictures):
    _, _, adapter = tiny
    audio = Sample.from_dict({"id": "tone-1", "messages": [{"role": "user", "content": [
        {"type": "audio", "audio": str(pictures / "t.wav")}, {"type": "text", "text": "High or low?"}]}]})
    with pytest.raises(MediaError, match=r"sample tone-1: .*text, image and video parts.*qwen2_audio"):
        adapter.encode_prompts([audio])
    stray = _row("stray", pictures, ["square.png"], "Look: <IMG_CONTEXT>")
    with pytest.raises(MediaError, match=r"sample stray: .*2 '<IMG_CONTEXT>' placeholder\(s\).*1 image part"):
        adapter.encode_prompts([stray])
    with pytest.raises(MediaError, match=r"sample vid: .*1 '<video>' placeholder\(s\).*0 video part"):
        adapter.encode_prompts([_row("vid", pictures, [], "a <video> here")])
    with pytest.raises(MediaError, match=r"sample gone: .*missing\.mp4"):
        adapter.encode_prompts([_row("gone", pictures, ["missing.mp4"], "Hi")])


def test_one_training_step_moves_every_parameter_the_images_use(tmp_path):
    import json

    from transformers import AutoModelForImageTextToText

    from lightrft_mm.config import load_config
    from lightrft_mm.prepare import prepare_synthetic
    from lightrft_mm.trainer.loop import train

    data = prepare_synthetic("colors", tmp_path / "colors", n=8, seed=1)
    # The random policy never ends within max_new_tokens (every length is the same): a reward of
    # the sampled ids varies within every group instead, so the step has a gradient.
    reward = tmp_path / "ids.py"
    reward.write_text("def ids(inputs):\n    return [float(sum(x.completion_ids) % 13) for x in inputs]\n")
    out = tmp_path / "run"
    train(load_config("recipes/demo/colors.yaml", [
        "model.name_or_path=tiny:internvl", f"data.train=[{data}]", "data.eval=[]", "warmup.steps=0",
        "trainer.max_steps=1", "data.batch_size=4", "rollout.n=4", "trainer.lr=1e-2", f"trainer.output_dir={out}",
        "logging.progress=false", "logging.plot=false", f"rewards=[{{name: '{reward}:ids'}}]"]))
    step = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "grad_norm" in r]
    assert len(step) == 1 and step[0]["completion/zero_std_groups"] == 0 and step[0]["grad_norm"] > 0
    before, _ = build_tiny("internvl", seed=0)
    # Saved in the -hf checkpoints' key layout; transformers maps it back to the module names.
    after = dict(AutoModelForImageTextToText.from_pretrained(out / "checkpoint-final").named_parameters())
    unmoved = [name for name, p in before.named_parameters() if torch.equal(p.detach(), after[name].detach())]
    assert unmoved == [], unmoved


def test_checkpoint_reloads_with_the_same_logits(tiny, pictures, tmp_path):
    """The saved folder is a stock InternVL folder (class and processor class of the -hf
    checkpoints); the image-only processor reads it back without torchvision."""
    import json

    from transformers import AutoModelForImageTextToText

    model, processor, adapter = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "InternVLProcessor"
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    reprocessor = internvl_image_processor_class().from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    samples = _mixed(pictures)
    batch = adapter.encode_prompts(samples)
    batch2 = make_adapter(reloaded, reprocessor).encode_prompts(samples)
    assert torch.equal(batch.input_ids, batch2.input_ids)
    assert torch.equal(batch.media["pixel_values"], batch2.media["pixel_values"])
    with torch.no_grad():
        assert torch.allclose(model(**batch.model_inputs()).logits, reloaded(**batch2.model_inputs()).logits)


def test_load_pretrained_reads_an_internvl_folder(tiny, tmp_path):
    from lightrft_mm.models import load_pretrained

    model, processor, _ = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    _, reprocessor = load_pretrained(tmp_path)
    assert reprocessor.image_seq_length == processor.image_seq_length
