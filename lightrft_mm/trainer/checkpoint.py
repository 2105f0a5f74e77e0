"""Checkpoints in Hugging Face format, written atomically (temp folder, then rename).

The full weights are gathered to rank 0 from whatever strategy holds them and written with
`save_pretrained` in `model.dtype`, so transformers reloads a checkpoint without this package;
the strategy adds its optimizer state (sharded per rank where it is sharded). A LoRA policy is
written merged (a plain model) with its adapter alone in `adapter/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lightrft_mm.models import DTYPES
from lightrft_mm.models.lora import ADAPTER_DIR, lora_config, merged_state_dict, save_adapter


def save_hf(model, processor, path: Path, *, strategy=None, dtype: str = "float32") -> Path:
    """Collective: every rank calls it; rank 0 writes `path` (model, processor, optimizer state).
    Without a strategy: the model as it is, no optimizer state, in this process."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    state = strategy.full_state_dict() if strategy else model.state_dict()
    model = getattr(model, "module", model)  # the HF model inside a DeepSpeed engine
    main = strategy.is_main if strategy else True
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        target = getattr(torch, DTYPES[dtype])
        lora = lora_config(model)
        if lora is not None:
            save_adapter(state, lora, tmp / ADAPTER_DIR)
            state = merged_state_dict(state, lora.lora_alpha / lora.r)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
        model.config.dtype = target  # what config.json records, and transformers loads by default
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        processor.save_pretrained(tmp)
    if strategy:
        strategy.barrier()
        strategy.save(tmp)
        strategy.barrier()
    if main:
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    if strategy:
        strategy.barrier()
    return path
