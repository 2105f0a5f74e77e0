"""Synthetic visual tasks generated offline, for the demo and for tests.

`colors`: an image filled with one of four colours (jittered, with pixel noise); the answer
is the colour's name. A tiny VLM learns it in minutes on a CPU, and only through the image:
with the image blanked, no policy can beat chance (0.25).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightrft_mm.errors import DataError
from lightrft_mm.registry import Registry
from lightrft_mm.schema import Sample

TASKS = Registry("synthetic task")
# Tasks in other modules, imported only when used. Each is `fn(n, seed, media_dir) -> list[Sample]`.
TASKS.register_lazy("moving_dot", "lightrft_mm.datasets.synthetic_video:moving_dot")
TASKS.register_lazy("higher_tone", "lightrft_mm.datasets.synthetic_audio:higher_tone")
TASKS.register_lazy("geo3k_like", "lightrft_mm.datasets.synthetic_geo:geo3k_like")

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
COLORS_PROMPT = "What colour is the image? Answer with \\boxed{colour}."


@TASKS.register("colors")
def colors(n: int, seed: int, media_dir: Path, *, size: int = 84) -> list[Sample]:
    """n balanced colour samples; images are written to media_dir as PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(COLORS)
    media_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        name = names[i % len(names)] if n >= len(names) else names[rng.integers(len(names))]
        base = np.array(COLORS[name], dtype=np.float32) + rng.uniform(-25, 25, size=3)
        pixels = base + rng.normal(0, 12, size=(size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        sid = f"colors-{seed}-{i}"
        image.save(media_dir / f"{sid}.png")
        samples.append(Sample.from_dict({
            "id": sid, "source": "synthetic:colors",
            "messages": [{"role": "user", "content": [
                {"type": "image", "image": f"media/{sid}.png"},
                {"type": "text", "text": COLORS_PROMPT}]}],
            "answer": name, "choices": names, "meta": {"seed": seed, "index": i}}))
    order = rng.permutation(n)
    return [samples[j] for j in order]


def generate(task: str, n: int, seed: int, out_dir: Path) -> list[Sample]:
    """Run the registered synthetic task `task`, media into out_dir/media."""
    if n < 1:
        raise DataError(f"synthetic:{task}: --n must be >= 1, got {n}.")
    return TASKS.get(task)(n, seed, out_dir / "media")


# Splits that `data.synthetic` generates: (samples, generator seed). Held-out seeds never meet training.
SPLITS = {"train": (1024, 1), "heldout": (256, 2)}


def ensure_synthetic(data_cfg) -> None:
    """Generate `data_cfg.synthetic` into data.train[0] / data.eval[0] where they do not exist yet.

    Raises:
        DataError: an existing folder's manifest names another source than the configured task
            (e.g. colours in the video recipe's folders), which training would silently reuse.
    """
    from lightrft_mm.prepare import prepare_synthetic

    if not data_cfg.synthetic:
        return
    for paths, split in ((data_cfg.train[:1], "train"), (data_cfg.eval[:1], "heldout")):
        for path in paths:
            if Path(path).exists():
                _check_source(Path(path), f"synthetic:{data_cfg.synthetic}", split)
            else:
                n, seed = SPLITS[split]
                prepare_synthetic(data_cfg.synthetic, Path(path), n=n, seed=seed)


def _check_source(folder: Path, expected: str, split: str) -> None:
    """Refuse a prepared folder whose manifest names a source other than `expected`."""
    import json

    from lightrft_mm.datasets.loader import MANIFEST

    try:
        found = json.loads((folder / MANIFEST).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return  # no readable manifest: not a folder this function wrote; the loader judges it
    if found and found != expected:
        key = "data.train" if split == "train" else "data.eval"
        raise DataError(f"{folder}: holds {found!r} data, but data.synthetic asks for {expected!r}; it would be "
                        f"reused as is. Fix: delete {folder} (it is generated again), or point {key} at "
                        "another folder.")
