"""Checkpoints in Hugging Face format, written atomically (temp folder, then rename)."""

from __future__ import annotations

import shutil
from pathlib import Path


def save_hf(model, processor, path: Path, *, strategy=None) -> Path:
    """`save_pretrained` of model and processor into `path`; transformers reloads it as is."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if strategy is not None:
        strategy.save(tmp)
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path
