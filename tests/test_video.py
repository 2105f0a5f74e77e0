"""Video decoding, Qwen frame sampling, bad files, and Qwen2-VL video patches (parity)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from lightrft_mm.datasets.synthetic_video import write_mp4
from lightrft_mm.errors import MediaError
from lightrft_mm.processors.video import frame_indices, load_video, qwen_video_inputs

BACKENDS = ["decord", "pyav"]


def _counting_frames(n, height=56, width=84):
    """Frame i is flat grey 10 + 20 * i, so a decoded frame tells which frame it was."""
    return np.stack([np.full((height, width, 3), 10 + 20 * i, dtype=np.uint8) for i in range(n)])


def _ids(frames):
    return np.round((frames.reshape(len(frames), -1).mean(1) - 10) / 20).astype(int).tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    import av

    root = tmp_path_factory.mktemp("videos")
    paths = {name: root / f"{name}.mp4" for name in
             ("counting", "one_frame", "three_frames", "audio_only", "corrupt", "truncated")}
    write_mp4(paths["counting"], _counting_frames(10), fps=8)  # 1.25 s
    write_mp4(paths["one_frame"], _counting_frames(1), fps=25)
    write_mp4(paths["three_frames"], _counting_frames(3), fps=30)  # 0.1 s
    with av.open(str(paths["audio_only"]), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        tone = np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    paths["corrupt"].write_bytes(b"this is not an mp4 file" * 20)
    data = paths["counting"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    return paths


@pytest.mark.parametrize("total, video_fps, kwargs, expected, sample_fps", [
    # 1.25 s at fps 2 gives 2.5 frames, raised to min_frames 4; evenly spaced first..last.
    (10, 8.0, {}, [0, 3, 6, 9], 3.2),
    # 4 s at fps 2: 8 frames over 100.
    (100, 25.0, {}, [0, 14, 28, 42, 57, 71, 85, 99], 2.0),
    # max_frames is rounded down to the temporal patch: 5 -> 4.
    (100, 25.0, {"max_frames": 5}, [0, 33, 66, 99], 1.0),
    # Never more frames than the clip has; an odd count is rounded down to the patch.
    (7, 7.0, {"fps": 10.0}, [0, 1, 2, 4, 5, 6], 6.0),
    # start/end in seconds: frames ceil(1.0 * 25) = 25 .. floor(2.0 * 25) = 50.
    (100, 25.0, {"start": 1.0, "end": 2.0}, [25, 33, 42, 50], 4 / 26 * 25),
    # A clip of one frame (start/end closer than one frame interval) is padded to the patch.
    (100, 25.0, {"start": 0.5, "end": 0.52}, [13, 13], 25.0),
    # A temporal patch of 3: 8 frames by fps, rounded down to 6 (linspace 0, 19.8, ... 99).
    (100, 25.0, {"temporal_patch": 3}, [0, 20, 40, 59, 79, 99], 1.5),
])
def test_frame_indices_follow_qwen_rules(total, video_fps, kwargs, expected, sample_fps):
    idx, fps = frame_indices(total, video_fps, **kwargs)
    assert idx.tolist() == expected
    assert fps == pytest.approx(sample_fps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_video_samples_the_right_frames(videos, backend):
    clip = load_video(videos["counting"], backend=backend)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (4, 56, 84, 3)
    assert _ids(clip.frames) == [0, 3, 6, 9]
    assert clip.timestamps.tolist() == pytest.approx([0.0, 0.375, 0.75, 1.125])
    assert clip.sample_fps == pytest.approx(3.2)
    dense = load_video(videos["counting"], backend=backend, fps=8, max_frames=6)
    assert _ids(dense.frames) == [0, 2, 4, 5, 7, 9]


def test_both_backends_decode_identical_frames(videos):
    by_backend = {b: load_video(videos["counting"], backend=b, fps=8) for b in BACKENDS + ["auto"]}
    assert by_backend["decord"].frames.shape[0] == 10
    for other in ("pyav", "auto"):
        assert np.array_equal(by_backend["decord"].frames, by_backend[other].frames)
        assert np.array_equal(by_backend["decord"].timestamps, by_backend[other].timestamps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_and_end_clip_the_video(videos, backend):
    clip = load_video(videos["counting"], backend=backend, start=0.5, end=1.0)
    # Frames ceil(0.5 * 8) = 4 .. floor(1.0 * 8) = 8; 4 frames evenly spaced over them.
    assert _ids(clip.frames) == [4, 5, 7, 8]
    assert clip.timestamps.tolist() == pytest.approx([0.5, 0.625, 0.875, 1.0])
    with pytest.raises(MediaError, match=r"start=5.0 end=None holds no frame of a 1.250 s video"):
        load_video(videos["counting"], backend=backend, start=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_video_shorter_than_one_frame_interval(videos, backend):
    """Documented choice: the frames it has, padded to the temporal patch with the last one."""
    # 0.1 s at fps=2 is shorter than one sampling interval (0.5 s): 3 frames, rounded to 2.
    short = load_video(videos["three_frames"], backend=backend, fps=2)
    assert _ids(short.frames) == [0, 2]
    # A single-frame video gives that frame twice (encoded like an image), at the video's fps.
    single = load_video(videos["one_frame"], backend=backend)
    assert single.frames.shape[0] == 2 and np.array_equal(single.frames[0], single.frames[1])
    assert single.timestamps.tolist() == [0.0, 0.0] and single.sample_fps == pytest.approx(25.0)
    # A clip narrower than one frame interval inside a longer video: one frame, padded.
    narrow = load_video(videos["counting"], backend=backend, start=0.5, end=0.55)
    assert _ids(narrow.frames) == [4, 4]


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("name, reason", [
    ("missing", "does not exist"),
    ("corrupt", "cannot decode video"),
    ("truncated", "cannot decode video"),
    ("audio_only", "has no video stream"),
])
def test_bad_video_files_raise_media_error(videos, tmp_path, backend, name, reason):
    path = tmp_path / "nope.mp4" if name == "missing" else videos[name]
    with pytest.raises(MediaError) as info:
        load_video(path, backend=backend, where="sample s-1")
    message = str(info.value)
    assert message.startswith("sample s-1: ") and str(path) in message
    assert reason in message and "Fix" in message


def test_unknown_backend_is_a_media_error(videos):
    with pytest.raises(MediaError, match="unknown video backend 'opencv'"):
        load_video(videos["counting"], backend="opencv")


# --- Qwen2-VL video patches --------------------------------------------------------------


@pytest.fixture(scope="module")
def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=84 * 84, max_pixels=84 * 84)  # as tiny:qwen2_5_vl


def _random_frames(n, height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("height, width", [(84, 84), (100, 70), (56, 140)])
def test_two_identical_frames_give_the_image_processor_output(image_processor, height, width):
    """The image path repeats one frame temporal_patch_size times: a 2-frame still video is it."""
    frame = _random_frames(1, height, width)[0]
    video = qwen_video_inputs(np.stack([frame, frame]), image_processor)
    image = image_processor(images=[Image.fromarray(frame)], return_tensors="pt")
    assert torch.equal(video["video_grid_thw"], image["image_grid_thw"])
    assert video["pixel_values_videos"].dtype == torch.float32
    assert torch.equal(video["pixel_values_videos"], image["pixel_values"])


def _reference_from_image_processor(frames, ip):
    """Video patches assembled from transformers' own per-frame image path.

    Each frame goes through the Qwen2-VL PIL image processor (resize, rescale, normalise,
    patchify in (h-block, w-block, h-in-block, w-in-block) order with the frame broadcast over
    the temporal patch). Taking temporal slot 0 gives that frame's [N, C, p, p] patches; the
    video layout of `Qwen2VLVideoProcessor.patchify` is then (t, spatial patch, C, tp, p, p):
    frames 2t and 2t+1 stacked on the tp axis, temporal grids one after the other.
    """
    tp, p = ip.temporal_patch_size, ip.patch_size
    per_frame = []
    for frame in frames:
        out = ip(images=[Image.fromarray(frame)], return_tensors="np")["pixel_values"]
        per_frame.append(out.reshape(out.shape[0], 3, tp, p, p)[:, :, 0])
    per_frame += [per_frame[-1]] * (-len(per_frame) % tp)  # pad with the last frame
    grids = [np.stack(per_frame[t * tp:(t + 1) * tp], axis=2) for t in range(len(per_frame) // tp)]
    return np.concatenate([g.reshape(g.shape[0], -1) for g in grids])


@pytest.mark.parametrize("num_frames, height, width", [(4, 84, 84), (3, 100, 70), (6, 56, 140)])
def test_distinct_frames_match_transformers_per_frame_patches(image_processor, num_frames, height, width):
    frames = _random_frames(num_frames, height, width, seed=num_frames)
    video = qwen_video_inputs(frames, image_processor)
    reference = _reference_from_image_processor(frames, image_processor)
    grid = video["video_grid_thw"][0].tolist()
    assert grid[0] == math.ceil(num_frames / 2)
    assert video["pixel_values_videos"].shape == (grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14)
    assert np.array_equal(video["pixel_values_videos"].numpy(), reference)


def _hf_video_patchify(videos, patch_size, merge_size, temporal_patch_size):
    """`Qwen2VLVideoProcessor.patchify` of transformers 5.24, verbatim (torch)."""
    batch_size, num_frames, channel, resized_height, resized_width = videos.shape
    if pad := -num_frames % temporal_patch_size:
        repeats = videos[:, -1:].expand(-1, pad, -1, -1, -1)
        videos = torch.cat((videos, repeats), dim=1)
        num_frames += pad
    grid_t = num_frames // temporal_patch_size
    grid_h, grid_w = resized_height // patch_size, resized_width // patch_size
    patches = videos.view(batch_size, grid_t, temporal_patch_size, channel, grid_h // merge_size,
                          merge_size, patch_size, grid_w // merge_size, merge_size, patch_size)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    flatten = patches.reshape(batch_size, grid_t * grid_h * grid_w,
                              channel * temporal_patch_size * patch_size * patch_size)
    return flatten, grid_t, grid_h, grid_w


def test_patch_order_matches_the_torch_video_processor(image_processor):
    """Frames already at the target size: no resampling, only normalisation and patch order."""
    ip = image_processor
    frames = _random_frames(5, 84, 84, seed=3)
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    normalised = (torch.from_numpy(frames).float() / 255 - mean) / std  # [T, H, W, C]
    flat, *grid = _hf_video_patchify(normalised.permute(0, 3, 1, 2)[None], ip.patch_size,
                                     ip.merge_size, ip.temporal_patch_size)
    video = qwen_video_inputs(frames, ip)
    assert video["video_grid_thw"][0].tolist() == grid == [3, 6, 6]
    torch.testing.assert_close(video["pixel_values_videos"], flat[0], atol=1e-5, rtol=0)


def test_pixel_budgets_shrink_the_frames():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=10**6)
    frames = _random_frames(8, 168, 168)

    def grid(**budget):
        return qwen_video_inputs(frames, ip, **budget)["video_grid_thw"][0].tolist()

    assert grid() == [4, 12, 12]
    # An even share of the total budget per frame: 4 * 84^2 * 2 / 8 = 84^2 pixels.
    assert grid(total_pixels=4 * 84 * 84) == [4, 6, 6]
    assert grid(max_pixels=56 * 56) == [4, 4, 4]


def test_malformed_frames_raise_media_error(image_processor):
    with pytest.raises(MediaError, match=r"\[T, H, W, 3\]"):
        qwen_video_inputs(np.zeros((2, 28, 28), dtype=np.uint8), image_processor)
