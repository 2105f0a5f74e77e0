"""Read prepared shards and serve deterministic, reshuffled batches of Samples."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterator

from lightrft_mm.errors import DataError
from lightrft_mm.schema import Sample, read_jsonl, resolve_media, write_jsonl

MANIFEST = "manifest.json"


def shard_files(path: str | Path) -> list[Path]:
    """A shard folder's `*.jsonl` files (sorted), or the file itself."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if files:
            return files
        raise DataError(f"{p}: folder holds no .jsonl shard. Fix: create it with "
                        f"`python -m lightrft_mm.prepare SOURCE --out {p}`.")
    raise DataError(f"{p}: no such shard folder or file. Fix: check data.train / data.eval, or "
                    f"create it with `python -m lightrft_mm.prepare SOURCE --out {p}`.")


def load_samples(paths: list[str] | tuple[str, ...]) -> list[Sample]:
    """All Samples of the given shard folders/files, media paths made absolute."""
    samples = []
    for path in paths:
        for f in shard_files(path):
            samples.extend(resolve_media(s, f.parent) for s in read_jsonl(f))
    return samples


def write_shard(samples: list[Sample], out_dir: Path, *, source: str, **manifest) -> Path:
    """Write samples as out_dir/shard-00000.jsonl plus a manifest (both atomic)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(samples, out_dir / "shard-00000.jsonl")
    info = {"source": source, "count": len(samples), **manifest}
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(out_dir / MANIFEST)
    return out_dir


def batches(samples: list[Sample], batch_size: int, seed: int) -> Iterator[list[Sample]]:
    """Endless full batches; each epoch is a fresh deterministic shuffle.

    When batch_size does not divide the sample count, the last `len % batch_size` samples of
    an epoch's shuffle are left for later epochs (a new shuffle each time), so every step sees
    a full batch. Fewer samples than batch_size give one short batch per epoch.
    """
    if not samples:
        raise DataError("no training samples: data.train is empty or its shards hold no rows.")
    return _batches(samples, batch_size, seed)


def _batches(samples: list[Sample], batch_size: int, seed: int) -> Iterator[list[Sample]]:
    epoch = 0
    while True:
        order = list(range(len(samples)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        for start in range(0, max(len(order) - batch_size, 0) + 1, batch_size):
            yield [samples[i] for i in order[start:start + batch_size]]
        epoch += 1
