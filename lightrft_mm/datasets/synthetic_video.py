"""Synthetic video task: which way does a bright dot move (left, right, up or down)?

Each sample is a short mp4 (written with PyAV) of a bright disc drifting at constant speed
over a dark background. The frame is a torus: the dot starts anywhere and wraps around at
the edges, so every single frame shows the dot at a uniformly random place whatever its
direction. No policy can beat chance (0.25) from one frame; the answer is in the motion,
across frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightrft_mm.schema import Sample

DIRECTIONS = ("left", "right", "up", "down")
MOVING_DOT_PROMPT = "Which way does the dot move? Answer with \\boxed{direction}."
# Shift of the image per frame along (rows, columns) for each direction.
_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def render_moving_dot(direction: str, rng: np.random.Generator, *, size: int = 84, frames: int = 4,
                      radius: tuple[float, float] = (26.0, 32.0),
                      speed: tuple[int, int] = (16, 20)) -> np.ndarray:
    """uint8 [frames, size, size, 3]: a bright disc moving `direction` on a torus.

    The disc is large (it covers about a third of the frame) and fast (a fifth of the frame
    per frame): a tiny vision tower sees the motion inside each pair of frames it patches
    together, where a small, slow dot would hide it in one or two patches.

    Args:
        direction: one of DIRECTIONS.
        rng: the random source (start, radius, speed, colours).
        size: frame side in pixels.
        frames: number of frames.
        radius: range of the disc's radius in pixels.
        speed: range (inclusive) of the disc's motion in pixels per frame.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0, size, size=2)
    # Distance on the torus, so the disc is whole wherever it sits.
    dy = np.minimum(np.abs(yy - cy), size - np.abs(yy - cy))
    dx = np.minimum(np.abs(xx - cx), size - np.abs(xx - cx))
    r = rng.uniform(*radius)
    disc = np.clip(r + 0.5 - np.sqrt(dy * dy + dx * dx), 0.0, 1.0)  # anti-aliased edge
    background = rng.uniform(10, 40)
    colour = rng.uniform(200, 255, size=3)
    step = int(rng.integers(speed[0], speed[1] + 1))
    drow, dcol = _STEP[direction]
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for k in range(frames):
        shifted = np.roll(disc, (drow * step * k, dcol * step * k), axis=(0, 1))
        pixels = background + shifted[..., None] * (colour - background)
        video[k] = np.clip(pixels, 0, 255).astype(np.uint8)
    return video


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Write uint8 [T, H, W, 3] frames as an H.264 mp4 (yuv420p)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def moving_dot(n: int, seed: int, media_dir: Path, *, size: int = 84, frames: int = 4,
               fps: int = 2) -> list[Sample]:
    """n balanced samples of the moving-dot task; videos are written to media_dir as mp4.

    Args:
        n: number of samples (directions cycle, so every class gets n // 4 or one more).
        seed: generator seed: same seed, same videos and order.
        media_dir: folder of the mp4 files (paths in the samples are `media/<id>.mp4`).
        size: frame side in pixels.
        frames: frames per video.
        fps: frame rate written in the file (4 frames at 2 fps = 2 s: Qwen's sampling at
            video.fps=2 takes every frame, so each temporal patch pairs consecutive frames).
    """
    rng = np.random.default_rng(seed)
    media_dir = Path(media_dir)
    media_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        direction = DIRECTIONS[i % len(DIRECTIONS)]
        sid = f"moving_dot-{seed}-{i}"
        write_mp4(media_dir / f"{sid}.mp4", render_moving_dot(direction, rng, size=size, frames=frames), fps)
        samples.append(Sample.from_dict({
            "id": sid, "source": "synthetic:moving_dot",
            "messages": [{"role": "user", "content": [
                {"type": "video", "video": f"media/{sid}.mp4"},
                {"type": "text", "text": MOVING_DOT_PROMPT}]}],
            "answer": direction, "choices": list(DIRECTIONS), "meta": {"seed": seed, "index": i}}))
    order = rng.permutation(n)
    return [samples[j] for j in order]


__all__ = ["DIRECTIONS", "MOVING_DOT_PROMPT", "moving_dot", "render_moving_dot", "write_mp4"]
