"""Video decoding, Qwen frame sampling and Qwen2-VL video patches, without torchvision.

`load_video` decodes the frames a Qwen model would see (decord, or PyAV as a fallback) with
the frame-sampling rules of `qwen-vl-utils` (which imports torchvision, so they are
implemented here). `qwen_video_inputs` turns those frames into `pixel_values_videos` and
`video_grid_thw` the way transformers' `Qwen2VLVideoProcessor` does (that processor needs
torchvision too): Qwen's smart resize under a per-frame pixel budget, the image processor's
rescale and mean/std, and the temporal-patch / merge-size patch order.

The only intended difference from the torchvision path is the resampler: frames are resized
with PIL bicubic, exactly as the PIL image processor resizes images, so a video of two
identical frames gives the image's `pixel_values` bit for bit. Frames already at the target
size (multiples of patch_size * merge_size within the pixel bounds) are not resampled at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightrft_mm.errors import MediaError
from lightrft_mm.processors.image import qwen_smart_resize

BACKENDS = ("auto", "decord", "pyav")
# qwen-vl-utils defaults, in units of its 28x28-pixel factor.
FPS_MIN_FRAMES = 4
VIDEO_MAX_TOKENS_PER_FRAME = 768
VIDEO_TOTAL_TOKENS = 128000 * 0.9
_FIX_DECODE = ("Fix: re-encode it (e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`) "
               "or drop the row.")


@dataclass
class VideoClip:
    """Sampled frames of one video.

    Attributes:
        frames: uint8 [T, H, W, 3] RGB; T is a multiple of the temporal patch size.
        timestamps: float64 [T] start time of each frame, in seconds from the video's start.
        sample_fps: frames per second of the sampled sequence (Qwen2.5-VL's
            `second_per_grid_ts` is temporal_patch / sample_fps).
    """

    frames: np.ndarray
    timestamps: np.ndarray
    sample_fps: float


def _ceil_by(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def _floor_by(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def frame_range(total_frames: int, video_fps: float, start: float | None, end: float | None,
                *, where: str = "video") -> tuple[int, int]:
    """First and last frame index (inclusive) of the clip [start, end] in seconds (qwen-vl-utils).

    The start frame is ceil(start * fps), the end frame floor(end * fps); both times are clamped
    to the video's duration.

    Raises:
        MediaError: the clip holds no frame (e.g. start at or after the end of the video).
    """
    if start is None and end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(start, duration)) * video_fps) if start is not None else 0
    last = total_frames - 1
    if end is not None:
        last = min(math.floor(max(0.0, min(end, duration)) * video_fps), total_frames - 1)
    if first > last:
        raise MediaError(f"{where}: the clip start={start} end={end} holds no frame of a "
                         f"{duration:.3f} s video ({total_frames} frames at {video_fps:g} fps). "
                         "Fix: give start/end inside the video's duration, or drop them.")
    return first, last


def frame_indices(total_frames: int, video_fps: float, *, fps: float = 2.0, max_frames: int = 32,
                  start: float | None = None, end: float | None = None, temporal_patch: int = 2,
                  min_frames: int = FPS_MIN_FRAMES, where: str = "video") -> tuple[np.ndarray, float]:
    """Indices of the frames to sample, and the sampled sequence's fps (Qwen's rules).

    As qwen-vl-utils' `smart_nframes`: n = clip duration * fps, bounded below by min_frames
    (rounded up to a multiple of temporal_patch) and above by max_frames (rounded down, but at
    least temporal_patch) and by the frames in the clip, then rounded down to a multiple of
    temporal_patch; the indices are n evenly spaced frames from the clip's first to its last
    frame, rounded to the nearest integer.

    A clip with fewer frames than temporal_patch (e.g. a one-frame video, or start/end closer
    than one frame interval) is where qwen-vl-utils raises. Here it gives every frame it has,
    padded to temporal_patch by repeating the last frame (as Qwen's video processor pads), at
    the video's own fps: a one-frame video is encoded like an image.

    Returns:
        (int64 indices [T] into the video's frames, sample_fps).
    """
    first, last = frame_range(total_frames, video_fps, start, end, where=where)
    in_clip = last - first + 1
    if in_clip < temporal_patch:
        idx = np.arange(first, last + 1)
        idx = np.concatenate([idx, np.full(temporal_patch - in_clip, last)])
        return idx.astype(np.int64), float(video_fps)
    lowest = _ceil_by(min_frames, temporal_patch)
    highest = max(temporal_patch, _floor_by(max_frames, temporal_patch))
    n = in_clip / video_fps * fps
    n = _floor_by(min(max(n, lowest), highest, in_clip), temporal_patch)
    idx = np.round(np.linspace(first, last, n)).astype(np.int64)
    return idx, n / in_clip * float(video_fps)


def load_video(path, *, fps: float = 2.0, max_frames: int = 32, start: float | None = None,
               end: float | None = None, backend: str = "auto", temporal_patch: int = 2,
               where: str = "") -> VideoClip:
    """Decode the frames of `path` that Qwen's sampling rules pick (see `frame_indices`).

    Args:
        path: a video file (mp4, webm, mkv, ... anything FFmpeg reads).
        fps: frames sampled per second of video.
        max_frames: most frames sampled (rounded down to a multiple of temporal_patch).
        start, end: clip the video to [start, end] seconds (clamped to its duration).
        backend: "decord", "pyav", or "auto" (decord, then PyAV where decord is missing or
            fails on this file).
        temporal_patch: the model's temporal patch size; the frame count is a multiple of it.
        where: prefix of error messages (e.g. "sample geo3k-17").

    Returns:
        The sampled frames with their timestamps and the sampled fps. A clip shorter than
        temporal_patch frames gives its frames padded by repeating the last one.

    Raises:
        MediaError: the file is missing, cannot be decoded, has no video stream, or the clip
            holds no frame; the message names the file, the reason and the fix.
    """
    where = f"{where}: " if where else ""
    if backend not in BACKENDS:
        raise MediaError(f"{where}unknown video backend {backend!r}. Fix: use one of {', '.join(BACKENDS)}.")
    path = str(path)
    if not Path(path).is_file():
        raise MediaError(f"{where}video file {path} does not exist. Fix the path in the shard (media "
                         "paths are relative to the shard's folder).")
    if backend == "pyav":
        readers = [_read_pyav]
    elif backend == "decord":
        readers = [_read_decord]
    else:
        readers = [_read_decord, _read_pyav]
    spec = dict(fps=fps, max_frames=max_frames, start=start, end=end, temporal_patch=temporal_patch,
                where=f"{where}video {path}")
    failures = []
    for read in readers:
        try:
            return read(path, spec)
        except MediaError:
            raise
        except _BackendMissing as e:
            failures.append(str(e))
        except Exception as e:  # noqa: BLE001 - decoders raise many unrelated types
            failures.append(f"{read.__name__[6:]}: {type(e).__name__}: {str(e).strip()[:300]}")
    raise MediaError(f"{where}cannot decode video {path} ({'; '.join(failures)}). {_FIX_DECODE}")


class _BackendMissing(Exception):
    """The backend's package is not installed."""


def _clip(frames: list[np.ndarray], idx: np.ndarray, video_fps: float, sample_fps: float,
          where: str) -> VideoClip:
    if not frames:
        raise MediaError(f"{where}: no frame could be decoded. {_FIX_DECODE}")
    stacked = np.stack(frames).astype(np.uint8, copy=False)
    return VideoClip(stacked, idx.astype(np.float64) / video_fps, float(sample_fps))


def _read_decord(path: str, spec: dict) -> VideoClip:
    try:
        import decord
    except ImportError as e:
        raise _BackendMissing("decord: not installed (pip install decord)") from e
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # noqa: BLE001 - decord raises DECORDError / RuntimeError
        if "cannot find video stream" in str(e):
            raise MediaError(f"{spec['where']}: the file has no video stream. Fix: give a file with a "
                             "video track, or use an audio part for audio.") from e
        raise
    total, video_fps = len(reader), float(reader.get_avg_fps())
    if total < 1 or not video_fps > 0:
        raise MediaError(f"{spec['where']}: the video stream declares {total} frames at {video_fps} fps. "
                         f"{_FIX_DECODE}")
    idx, sample_fps = frame_indices(total, video_fps, **spec)
    frames = reader.get_batch(idx.tolist()).asnumpy()
    return _clip(list(frames), idx, video_fps, sample_fps, spec["where"])


def _read_pyav(path: str, spec: dict) -> VideoClip:
    try:
        import av
    except ImportError as e:
        raise _BackendMissing("pyav: not installed (pip install av)") from e
    with av.open(path) as container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise MediaError(f"{spec['where']}: the file has no video stream (streams: {kinds}). Fix: "
                             "give a file with a video track, or use an audio part for audio.")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else 0.0
        total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if total < 1 or not video_fps > 0:
            raise MediaError(f"{spec['where']}: the video stream declares {total} frames at {video_fps} "
                             f"fps. {_FIX_DECODE}")
        idx, sample_fps = frame_indices(total, video_fps, **spec)
        container.seek(0)
        wanted = set(idx.tolist())
        decoded: dict[int, np.ndarray] = {}
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                decoded[i] = frame.to_ndarray(format="rgb24")
            if i >= idx[-1]:
                break
    missing = sorted(wanted - set(decoded))
    if missing:
        raise MediaError(f"{spec['where']}: frames {missing[:5]} of {total} could not be decoded (truncated "
                         f"file?). {_FIX_DECODE}")
    return _clip([decoded[i] for i in idx.tolist()], idx, video_fps, sample_fps, spec["where"])


def default_video_pixels(image_processor) -> tuple[int, int]:
    """qwen-vl-utils' video budgets for this processor: (per-frame max, whole-video total) pixels."""
    factor = image_processor.patch_size * image_processor.merge_size
    return VIDEO_MAX_TOKENS_PER_FRAME * factor * factor, int(VIDEO_TOTAL_TOKENS * factor * factor)


def video_frame_size(height: int, width: int, num_frames: int, image_processor, *,
                     max_pixels: int | None = None, total_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) every frame is resized to.

    The per-frame bounds are the image processor's (`size["shortest_edge"]`,
    `size["longest_edge"]`). A `total_pixels` budget caps each frame at an even share of it
    (`total_pixels * temporal_patch / num_frames`, floored at 1.05 x the minimum), as
    qwen-vl-utils and `Qwen2VLVideoProcessor(cap_pixels_per_frame=True)` do; `max_pixels`
    lowers the per-frame cap further.
    """
    size = image_processor.size
    lowest, cap = int(size["shortest_edge"]), int(size["longest_edge"])
    tp = image_processor.temporal_patch_size
    if total_pixels is not None:
        cap = max(min(cap, total_pixels * tp / max(num_frames, 1)), int(lowest * 1.05))
    if max_pixels is not None:
        cap = min(cap, max_pixels)
    factor = image_processor.patch_size * image_processor.merge_size
    return qwen_smart_resize(height, width, factor=factor, min_pixels=lowest, max_pixels=cap)


def qwen_video_inputs(frames: np.ndarray, image_processor, *, max_pixels: int | None = None,
                      total_pixels: int | None = None, frame_size: tuple[int, int] | None = None) -> dict:
    """Qwen2-VL / Qwen2.5-VL video inputs of decoded frames, as `Qwen2VLVideoProcessor` makes them.

    Args:
        frames: uint8 [T, H, W, 3] RGB frames (T is padded to a multiple of the temporal patch
            size by repeating the last frame).
        image_processor: the model's Qwen2-VL image processor (its pixel bounds, mean/std,
            rescale factor, patch, temporal patch and merge sizes are used).
        max_pixels, total_pixels: per-frame and whole-video pixel budgets (see
            `video_frame_size`); None = the image processor's bounds only.
        frame_size: (height, width) to resize to instead of `video_frame_size`'s (multiples of
            patch_size * merge_size; a vLLM engine gets frames the trainer already sized).

    Returns:
        {"pixel_values_videos": float32 tensor [N, C * tp * p * p],
         "video_grid_thw": int64 tensor [1, 3]} with N = grid_t * grid_h * grid_w.
    """
    import torch
    from PIL import Image

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise MediaError(f"video frames must be uint8 [T, H, W, 3] with T >= 1, got shape {frames.shape}.")
    ip = image_processor
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    height, width = frame_size or video_frame_size(frames.shape[1], frames.shape[2], frames.shape[0], ip,
                                                   max_pixels=max_pixels, total_pixels=total_pixels)
    mean = np.array(ip.image_mean, dtype=np.float32)
    std = np.array(ip.image_std, dtype=np.float32)
    out = []
    for frame in frames:
        if frame.shape[:2] != (height, width):
            frame = np.asarray(Image.fromarray(frame).resize((width, height), resample=int(ip.resample)))
        # Same arithmetic as the PIL image processor: rescale in float64, then float32 mean/std.
        x = frame.astype(np.float64) * ip.rescale_factor if ip.do_rescale else frame
        x = x.astype(np.float32)
        if ip.do_normalize:
            x = (x - mean) / std
        out.append(x.transpose(2, 0, 1))
    video = np.stack(out)  # [T, C, H, W]
    if pad := -len(video) % tp:
        video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
    gt, gh, gw = len(video) // tp, height // p, width // p
    channels = video.shape[1]
    patches = video.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
    # (t, h-block, w-block, h-in-block, w-in-block, C, tp, ph, pw): Qwen2VLVideoProcessor.patchify.
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, channels * tp * p * p)
    return {"pixel_values_videos": torch.from_numpy(np.ascontiguousarray(patches)),
            "video_grid_thw": torch.tensor([[gt, gh, gw]], dtype=torch.long)}


__all__ = ["BACKENDS", "VideoClip", "default_video_pixels", "frame_indices", "frame_range", "load_video",
           "qwen_video_inputs", "video_frame_size"]
