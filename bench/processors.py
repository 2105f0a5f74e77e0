"""Throughput of the media processors on this machine (torch threads = 2).

Run: `.venv/bin/python bench/processors.py`. Makes its media in a temp folder and prints, each
the median of a few repeats:

- images/s: `load_image` + the tiny Qwen2.5-VL processor (84x84 and 448x448 PNGs, each
  through a processor whose pixel budget is its own size, so nothing is resampled away);
- audio seconds/s: `load_audio` (44.1 kHz stereo wav -> 16 kHz mono) + WhisperFeatureExtractor
  (128 mel bins, as Qwen2-Audio);
- video frames/s per backend: `load_video` (2 fps sampling of a 10 s 30 fps 320x240 mp4),
  counted in sampled frames returned.

Takes well under a minute.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

REPEATS = 3


def median_rate(fn, units: float, repeats: int = REPEATS) -> float:
    """units / seconds for one call of fn, the median over repeats (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return units / statistics.median(times)


def bench_images(root: Path) -> None:
    from PIL import Image

    from lightrft_mm.models.tiny import build_tiny
    from lightrft_mm.processors.image import load_image

    rng = np.random.default_rng(0)
    text = ["<|vision_start|><|image_pad|><|vision_end|>What colour is it?"]
    for side, count in ((84, 40), (448, 10)):
        paths = []
        for i in range(count):
            path = root / f"img{side}-{i}.png"
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        processor = build_tiny("qwen2_5_vl", image_size=side)[1]

        def run():
            for path in paths:
                processor(text=text, images=[load_image(path)], return_tensors="pt")

        load_only = median_rate(lambda: [load_image(p) for p in paths], count)
        rate = median_rate(run, count)
        print(f"image {side}x{side}: {rate:8.1f} images/s  load_image + processor "
              f"(load_image alone {load_only:.0f}/s)")


def bench_audio(root: Path) -> None:
    import soundfile as sf
    from transformers import WhisperFeatureExtractor

    from lightrft_mm.processors.audio import load_audio

    seconds, files = 10.0, 3
    t = np.arange(int(seconds * 44100)) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)], axis=1)
    paths = []
    for i in range(files):
        path = root / f"a{i}.wav"
        sf.write(path, stereo.astype(np.float32), 44100, subtype="PCM_16")
        paths.append(path)
    extractor = WhisperFeatureExtractor(feature_size=128)

    def decode():
        return [load_audio(p, sampling_rate=16000) for p in paths]

    def run():
        for wave in decode():
            extractor(wave, sampling_rate=16000, return_tensors="np")

    total = seconds * files
    print(f"audio 44.1k stereo wav -> 16k mono: {median_rate(run, total):8.1f} audio s/s  "
          f"load_audio + WhisperFeatureExtractor (load_audio alone {median_rate(decode, total):.0f} s/s)")


def write_video(path: Path, seconds: float = 10.0, fps: int = 30, size=(320, 240)) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        base = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        for k in range(int(seconds * fps)):
            frame = np.roll(base, 4 * k, axis=1)  # moving content: realistic inter frames
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def bench_video(root: Path) -> None:
    try:
        from lightrft_mm.processors.video import load_video
    except ImportError:
        print("video: not available yet")
        return
    path = root / "clip.mp4"
    write_video(path)
    for backend in ("decord", "pyav"):
        try:
            frames = len(load_video(path, fps=2.0, max_frames=32, backend=backend).frames)
            rate = median_rate(lambda: load_video(path, fps=2.0, max_frames=32, backend=backend), frames)
        except Exception as e:  # noqa: BLE001 - report a broken backend, keep benchmarking
            print(f"video [{backend}]: failed: {type(e).__name__}: {e}")
            continue
        print(f"video [{backend}] 10 s 30 fps 320x240 mp4 @ 2 fps: {rate:8.1f} sampled frames/s "
              f"({frames} frames per call)")


def main() -> None:
    import torch

    torch.set_num_threads(2)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lightrft-bench-") as tmp:
        root = Path(tmp)
        bench_images(root)
        bench_audio(root)
        bench_video(root)
    print(f"total {time.perf_counter() - start:.1f} s, torch threads = {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
