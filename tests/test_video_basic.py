"""Video decoding and the Qwen video path: both backends, bad files, patch parity, mixed batches."""

import numpy as np
import pytest
import torch

from lightrft_mm.config import VideoConfig
from lightrft_mm.errors import MediaError
from lightrft_mm.models.logprobs import forward_logprobs
from lightrft_mm.models.tiny import build_tiny
from lightrft_mm.processors import make_adapter
from lightrft_mm.processors.video import load_video, qwen_video_inputs
from lightrft_mm.rollout.hf import HFRolloutEngine, SamplingParams
from lightrft_mm.schema import Sample


def _write_mp4(path, frames, fps=4):
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """4 s at 4 fps, 56x56: the frame brightness encodes the frame index."""
    frames = np.stack([np.full((56, 56, 3), 10 + 15 * i, dtype=np.uint8) for i in range(16)])
    return _write_mp4(tmp_path_factory.mktemp("video") / "ramp.mp4", frames)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_sampling_by_fps_and_clip_window(video, backend):
    clip = load_video(video, fps=2.0, max_frames=32, backend=backend)
    assert clip.frames.shape[1:] == (56, 56, 3) and len(clip.frames) == 8  # 4 s * 2 fps
    assert np.all(np.diff(clip.timestamps) > 0)
    brightness = clip.frames.mean(axis=(1, 2, 3))
    assert np.all(np.diff(brightness) > 0), "frames come in time order"
    window = load_video(video, fps=2.0, start=1.0, end=3.0, backend=backend)
    assert len(window.frames) == 4 and window.timestamps[0] >= 1.0 - 1e-6 and window.timestamps[-1] <= 3.0
    capped = load_video(video, fps=4.0, max_frames=6, backend=backend)
    assert len(capped.frames) == 6 and len(capped.frames) % 2 == 0


def test_backends_agree(video):
    a = load_video(video, fps=2.0, backend="decord").frames.astype(float)
    b = load_video(video, fps=2.0, backend="pyav").frames.astype(float)
    assert a.shape == b.shape and np.abs(a - b).mean() < 3


def test_bad_video_files_name_the_file(tmp_path):
    with pytest.raises(MediaError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(MediaError, match="corrupt.mp4"):
        load_video(corrupt)


def test_two_identical_frames_give_the_image_patches():
    _, processor = build_tiny("qwen2_5_vl")
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (84, 84, 3), dtype=np.uint8)
    from PIL import Image

    image = processor.image_processor(images=[Image.fromarray(frame)], return_tensors="pt")
    vid = qwen_video_inputs(np.stack([frame, frame]), processor.image_processor)
    assert torch.equal(vid["video_grid_thw"], image["image_grid_thw"])
    assert torch.allclose(vid["pixel_values_videos"], image["pixel_values"], atol=1e-6)


def _samples(video, image_paths):
    rows = [
        {"id": "img", "messages": [{"role": "user", "content": [
            {"type": "image", "image": image_paths[0]}, {"type": "text", "text": "What colour?"}]}]},
        {"id": "two", "messages": [{"role": "user", "content": [
            {"type": "image", "image": image_paths[1]}, {"type": "image", "image": image_paths[2]},
            {"type": "text", "text": "Compare them."}]}]},
        {"id": "vid", "messages": [{"role": "user", "content": [
            {"type": "video", "video": str(video)}, {"type": "text", "text": "Which way?"}]}]},
        {"id": "txt", "messages": [{"role": "user", "content": "Say hi."}]},
    ]
    return [Sample.from_dict(r) for r in rows]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_mixed_batch_parity_and_every_parameter_trains(family, video, image_paths):
    torch.manual_seed(0)
    model, processor = build_tiny(family)
    adapter = make_adapter(model, processor)
    prompts = adapter.encode_prompts(_samples(video, image_paths))
    assert {"pixel_values", "pixel_values_videos", "video_grid_thw"} <= set(prompts.media)
    r = HFRolloutEngine(model, adapter).generate(prompts, 2, SamplingParams(max_new_tokens=8))
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask)
    assert ((logps - r.logps).abs() * r.completion_mask).max().item() <= 1e-4
    # One step of the policy-gradient surrogate moves every trainable parameter.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    logps, _ = forward_logprobs(model, r.prompts, r.completion_ids, r.completion_mask)
    (-(logps * r.completion_mask).sum() / r.completion_mask.sum()).backward()
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged


def test_video_config_changes_the_frames(video, image_paths):
    model, processor = build_tiny("qwen2_5_vl")
    sample = _samples(video, image_paths)[2]
    grids = []
    for cfg in (VideoConfig(fps=1.0), VideoConfig(fps=2.0), VideoConfig(fps=4.0, max_frames=4)):
        adapter = make_adapter(model, processor, video=cfg)
        grids.append(adapter.encode_one(sample).media["video_grid_thw"][0, 0].item())
    assert grids == [2, 4, 2]  # temporal grid = frames / temporal patch (2)


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
    assert make_adapter(model, processor, image=ImageConfig(max_pixels_guard=5_000_000)).encode_one(sample)
