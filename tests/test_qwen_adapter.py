"""Qwen2-VL / Qwen2.5-VL adapter: image, multi-image, video and text prompts in one batch."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from lightrft_mm.config import VideoConfig
from lightrft_mm.datasets.synthetic_video import write_mp4
from lightrft_mm.errors import MediaError
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.adapter import HFChatAdapter, PromptBatch
from lightrft_mm.processors.qwen_vl import QwenVLAdapter
from lightrft_mm.processors.video import load_video, qwen_video_inputs
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.schema import Sample

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]


@pytest.fixture(scope="module")
def video_paths(tmp_path_factory):
    """Two random videos of different sizes and lengths (so grids and prompt lengths differ)."""
    root = tmp_path_factory.mktemp("qwen_videos")
    rng = np.random.default_rng(1)
    a, b = root / "a.mp4", root / "b.mp4"
    write_mp4(a, rng.integers(0, 256, (8, 84, 84, 3), dtype=np.uint8), fps=4)  # 2 s
    write_mp4(b, rng.integers(0, 256, (12, 56, 112, 3), dtype=np.uint8), fps=4)  # 3 s
    return str(a), str(b)


def _user(*parts, system=None):
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def samples(image_paths, video_paths):
    image = lambda i: {"type": "image", "image": image_paths[i]}  # noqa: E731
    rows = {
        "img": _user(image(0), "What colour?"),
        "multi": _user(image(1), "and", image(2), "Describe the image."),
        "vid": _user({"type": "video", "video": video_paths[0]}, "Watch the video."),
        "vid-img": _user("Watch", {"type": "video", "video": video_paths[1], "fps": 1.0}, image(1),
                         system="You are a helpful assistant."),
        "txt": _user("Find x."),
    }
    return {k: Sample.from_dict({"id": k, "messages": m, "answer": "red", "choices": ["red", "blue"]})
            for k, m in rows.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def family_rollouts(request, samples):
    """(family, model, adapter, rollouts) of the mixed batch, 2 completions per prompt."""
    torch.manual_seed(0)
    model, processor = build_tiny(request.param)
    adapter = make_adapter(model, processor)
    prompts = adapter.encode_prompts(list(samples.values()))
    rollouts = HFRolloutEngine(model, adapter).generate(
        prompts, 2, SamplingParams(max_new_tokens=12, temperature=0.9))
    return request.param, model, adapter, rollouts


def _max_diff(model, prompts: PromptBatch, r) -> float:
    logps, _ = forward_logprobs(model, prompts, r.completion_ids, r.completion_mask, temperature=0.9)
    return ((logps - r.logps).abs() * r.completion_mask).max().item()


def test_registry_gives_the_qwen_adapter_per_family(family_rollouts):
    family, _, adapter, _ = family_rollouts
    assert isinstance(adapter, QwenVLAdapter) and adapter.model_type == family
    assert adapter.sends_second_per_grid == (family == "qwen2_5_vl")


def test_image_prompts_equal_the_hf_processor(family_rollouts, samples):
    """Image and multi-image prompts come out exactly as Qwen2VLProcessor makes them."""
    _, _, adapter, _ = family_rollouts
    reference = HFChatAdapter(adapter.processor)
    for key in ("img", "multi"):
        ours, theirs = adapter.encode_one(samples[key]), reference.encode_one(samples[key])
        assert torch.equal(ours.input_ids, theirs.input_ids)
        assert torch.equal(ours.token_aligned["mm_token_type_ids"], theirs.token_aligned["mm_token_type_ids"])
        assert ours.media.keys() == theirs.media.keys() == {"pixel_values", "image_grid_thw"}
        assert all(torch.equal(ours.media[k], theirs.media[k]) for k in ours.media)
    assert adapter.encode_one(samples["multi"]).media["image_grid_thw"].shape == (2, 3)


def test_video_prompt_tokens_and_tensors(family_rollouts, samples, video_paths):
    family, _, adapter, _ = family_rollouts
    enc = adapter.encode_one(samples["vid-img"])
    # The part's own fps (1.0) wins over the config's (2.0): 3 s -> 3 frames -> min 4 frames.
    clip = load_video(video_paths[1], fps=1.0)
    expected = qwen_video_inputs(clip.frames, adapter.image_processor, **adapter.video_pixels())
    assert torch.equal(enc.media["pixel_values_videos"], expected["pixel_values_videos"])
    assert torch.equal(enc.media["video_grid_thw"], expected["video_grid_thw"])
    assert enc.media["video_grid_thw"].tolist() == [[2, 6, 10]]  # 56x112 resized up to 84x140
    types = enc.token_aligned["mm_token_type_ids"]
    assert int((types == 2).sum()) == 2 * 6 * 10 // 4
    assert int((types == 1).sum()) == int(enc.media["image_grid_thw"].prod()) // 4
    assert torch.equal(types == 2, enc.input_ids == adapter.video_token_id)
    # The video comes before the image in the text, and in the token types.
    assert (types == 2).nonzero().max() < (types == 1).nonzero().min()
    if family == "qwen2_5_vl":
        assert enc.media["second_per_grid_ts"].tolist() == pytest.approx([2 / clip.sample_fps])
    else:
        assert "second_per_grid_ts" not in enc.media


def test_media_of_each_prompt_survive_repeat_in_order(samples):
    model, processor = build_tiny("qwen2_5_vl")
    adapter = make_adapter(model, processor)
    batch = adapter.encode_prompts([samples["vid"], samples["img"], samples["vid-img"]])
    seconds = batch.media["second_per_grid_ts"].tolist()
    assert len(seconds) == 2 and seconds[0] != seconds[1]
    repeated = batch.repeat(2, adapter.pad_token_id)
    assert repeated.media["second_per_grid_ts"].tolist() == [seconds[0]] * 2 + [seconds[1]] * 2
    grids = batch.media["video_grid_thw"]
    assert torch.equal(repeated.media["video_grid_thw"], grids.repeat_interleave(2, dim=0))


def test_generation_and_training_logps_agree(family_rollouts):
    _, model, _, r = family_rollouts
    assert (r.prompts.attention_mask == 0).any(), "the batch really is left-padded"
    assert {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"} <= set(r.prompts.media)
    assert r.completion_mask.sum() > 10
    assert _max_diff(model, r.prompts, r) <= 1e-4


def test_parity_check_detects_broken_video_positions(family_rollouts):
    """Video tokens typed as text get 1-D positions: the parity above (<= 1e-4) would fail."""
    family, model, _, r = family_rollouts
    types = r.prompts.token_aligned["mm_token_type_ids"]
    as_text = {"mm_token_type_ids": types.masked_fill(types == 2, 0)}
    broken = dataclasses.replace(r.prompts, token_aligned=as_text)
    assert _max_diff(model, broken, r) > 5e-4
    if family == "qwen2_5_vl":
        # Qwen2.5-VL spaces video time positions by seconds: a wrong time scale shows too.
        media = dict(r.prompts.media, second_per_grid_ts=r.prompts.media["second_per_grid_ts"] * 4)
        assert _max_diff(model, dataclasses.replace(r.prompts, media=media), r) > 5e-4


def test_one_training_step_changes_every_parameter(family_rollouts):
    _, model, _, r = family_rollouts
    model = copy.deepcopy(model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask)
    (-(logps * r.completion_mask).sum() / r.completion_mask.sum()).backward()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"parameters that never changed: {unchanged}"


@pytest.mark.parametrize("text", ["Look: <|video_pad|>", "Look: <|image_pad|> here"])
def test_placeholder_mismatch_names_the_sample(family_rollouts, image_paths, text):
    _, _, adapter, _ = family_rollouts
    messages = _user({"type": "image", "image": image_paths[0]}, text)
    sample = Sample.from_dict({"id": "bad-17", "messages": messages})
    with pytest.raises(MediaError, match=r"sample bad-17: the prompt has \d image and \d video placeholder"):
        adapter.encode_one(sample)


def test_media_errors_name_the_sample(family_rollouts, tmp_path):
    _, _, adapter, _ = family_rollouts
    video = {"type": "video", "video": str(tmp_path / "x.mp4")}
    missing = Sample.from_dict({"id": "gone-3", "messages": _user(video, "?")})
    with pytest.raises(MediaError, match=r"sample gone-3: video file .*x.mp4 does not exist"):
        adapter.encode_one(missing)
    audio = Sample.from_dict({"id": "aud-1", "messages": _user({"type": "audio", "audio": "a.wav"}, "?")})
    with pytest.raises(MediaError, match="sample aud-1: audio parts"):
        adapter.encode_one(audio)


def test_video_config_fps_and_max_frames_change_the_grid(samples):
    """8 frames over 2 s: fps 2 -> 4 frames, fps 4 -> 8, max_frames 6 -> 6 (temporal grid = frames / 2)."""
    model, processor = build_tiny("qwen2_5_vl")
    grids = {}
    for name, cfg in {"default": VideoConfig(), "fps4": VideoConfig(fps=4.0),
                      "fps4-max6": VideoConfig(fps=4.0, max_frames=6)}.items():
        enc = make_adapter(model, processor, video=cfg).encode_one(samples["vid"])
        grids[name] = enc.media["video_grid_thw"][0, 0].item()
        tokens = int((enc.token_aligned["mm_token_type_ids"] == 2).sum())
        assert tokens == grids[name] * 9  # 84x84 frames: 3x3 merged tokens per temporal grid
    assert grids == {"default": 2, "fps4": 4, "fps4-max6": 3}


def test_image_guard_reaches_the_qwen_adapter(tmp_path):
    from PIL import Image

    from lightrft_mm.config import ImageConfig

    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 2000), (1, 2, 3)).save(big)
    sample = Sample.from_dict({"id": "big", "messages": [{"role": "user", "content": [
        {"type": "image", "image": str(big)}, {"type": "text", "text": "?"}]}]})
    model, processor = build_tiny("qwen2_5_vl")
    with pytest.raises(MediaError, match="image.max_pixels_guard"):
        make_adapter(model, processor, image=ImageConfig(max_pixels_guard=1_000_000)).encode_one(sample)
