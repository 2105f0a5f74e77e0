"""Checkpoints: Hugging Face weights for users, plus the exact training state for resuming.

A checkpoint folder holds
- the model in HF format (`save_pretrained` in `model.dtype`, so transformers reloads it
  without this package; a LoRA policy merged, its adapter alone in `adapter/`) and the processor;
- the strategy's training state (`Strategy.save`: fp32 model state and optimizer state, sharded
  per rank where the strategy shards), the RNG states of every rank (`rng/rank<r>.json`) and the
  loop's state (`trainer_state.json`: step, data position, KL coefficient, reward statistics,
  counters), unless it is a weights-only export;
- `manifest.json`, written last: every file with its size, the step, and whether it can be
  resumed from. A folder is written as `.<name>.tmp` and renamed when complete, so a crash never
  leaves a half-written `checkpoint-<k>`; `verify` finds one that was damaged afterwards.

Writing the weights comes first: when the training state cannot be written (disk full) the
final checkpoint still keeps the weights, marked not resumable, and the error says so.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from lightrft_mm.errors import CheckpointError
from lightrft_mm.models import DTYPES
from lightrft_mm.models.lora import ADAPTER_DIR, lora_config, merged_state_dict, save_adapter

MANIFEST, TRAINER_STATE, RNG_DIR = "manifest.json", "trainer_state.json", "rng"
NUMBERED = re.compile(r"checkpoint-(\d+)")


class _Alone:
    """The collectives of a single process without a strategy (an export)."""

    is_main, rank, world_size = True, 0, 1

    def all_reduce(self, value, op="sum"):
        return value

    def barrier(self):
        pass


def save_hf(model, processor, path: Path, *, strategy=None, dtype: str = "float32",
            trainer_state: dict | None = None, final: bool = False) -> Path:
    """Collective: every rank calls it; the main rank writes the weights, every rank its share of
    the training state. With `trainer_state` (and a strategy) the checkpoint can be resumed from;
    without, it is a weights-only export.

    Raises:
        CheckpointError: a weight is not finite (nothing written), or writing failed (which path,
            whether the disk is full; the previous checkpoint of that name is intact). When only
            the training state failed on the `final` save, the weights are kept at `path`.
    """
    path = Path(path)
    comm = strategy or _Alone()
    tmp = path.with_name(f".{path.name}.tmp")
    state = strategy.full_state_dict() if strategy else model.state_dict()
    bad = _first_non_finite(state) if comm.is_main else None
    if comm.all_reduce(float(bad is not None), "max") > 0:
        raise CheckpointError(f"not writing {path}: {bad or 'a weight'} is not finite (NaN or inf). The "
                              "weights diverged; the previous checkpoints are intact. Fix: resume from one with "
                              "a lower trainer.lr.")
    failure = None
    if comm.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _write_weights(getattr(model, "module", model), processor, state, tmp, dtype)
        except (OSError, RuntimeError) as exc:
            failure = exc
    del state
    _agree(comm, failure, path, tmp, what="the weights")
    resumable = strategy is not None and trainer_state is not None
    if resumable:
        weights = {p.name for p in tmp.iterdir()} if comm.is_main else set()
        failure = None
        try:
            strategy.save(tmp)
            _write_json(tmp / RNG_DIR / f"rank{comm.rank}.json", rng_state())
            if comm.is_main:
                _write_json(tmp / TRAINER_STATE, trainer_state)
        except (OSError, RuntimeError) as exc:
            failure = exc
        if comm.all_reduce(float(failure is not None), "max") > 0:
            if not final:
                _agree(comm, failure or RuntimeError("failed on another rank"), path, tmp, what="the training state")
            comm.barrier()
            if comm.is_main:  # the final weights are never lost to an optimizer-state write
                for extra in set(p.name for p in tmp.iterdir()) - weights:
                    _remove(tmp / extra)
                _publish(tmp, path, step=None, resumable=False)
            comm.barrier()
            raise CheckpointError(_io_message(path, failure, "the training state (optimizer, RNG)")
                                  + f" The weights were saved: {path} holds the trained model (loadable with "
                                  "transformers) but cannot be resumed from.")
    comm.barrier()
    if comm.is_main:
        _publish(tmp, path, step=(trainer_state or {}).get("step"), resumable=resumable,
                 world_size=comm.world_size)
    comm.barrier()
    return path


def _write_weights(model, processor, state: dict, folder: Path, dtype: str) -> None:
    target = getattr(torch, DTYPES[dtype])
    lora = lora_config(model)
    if lora is not None:
        save_adapter(state, lora, folder / ADAPTER_DIR)
        state = merged_state_dict(state, lora.lora_alpha / lora.r)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    model.config.dtype = target  # what config.json records, and transformers loads by default
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    processor.save_pretrained(folder)


def _first_non_finite(state: dict) -> str | None:
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def _agree(comm, failure, path: Path, tmp: Path, *, what: str) -> None:
    """Every rank raises when any failed: the temp folder is removed, the old checkpoint kept."""
    if comm.all_reduce(float(failure is not None), "max") == 0:
        return
    comm.barrier()
    if comm.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(_io_message(path, failure, what) + (f" The previous {path.name} is intact."
                                                              if path.exists() else ""))


def _io_message(path: Path, exc: BaseException | None, what: str) -> str:
    where = next((p for p in [path.parent, *path.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(where).free
    full = getattr(exc, "errno", None) == errno.ENOSPC or free < 64 * 2**20
    message = f"saving {what} of {path} failed: {exc or 'on another rank'}."
    if full:
        message += (f" The disk is full ({free / 2**20:.0f} MiB free on the disk holding {where}). Fix: free "
                    "space or move trainer.output_dir, then resume with trainer.resume=auto.")
    return message


def _publish(tmp: Path, path: Path, *, step, resumable: bool, world_size: int = 1) -> None:
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write_json(tmp / MANIFEST, {"step": step, "resumable": resumable, "world_size": world_size, "files": files})
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _remove(old)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")


# --- resuming ------------------------------------------------------------------------------------------

def verify(path: Path) -> dict:
    """The manifest of a complete, undamaged checkpoint.

    Raises:
        CheckpointError: no manifest (not a checkpoint, or written by a version without one), a
            file missing or of another size, or a weights-only checkpoint.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a complete checkpoint ({MANIFEST} unreadable: {exc}).") from None
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            found = f"{f.stat().st_size} bytes" if f.is_file() else "missing"
            raise CheckpointError(f"{path}: damaged checkpoint: {name} is {found}, the manifest says {size} bytes.")
    if not manifest.get("resumable"):
        raise CheckpointError(f"{path}: a weights-only checkpoint (its training state was not written), so it "
                              "cannot be resumed from.")
    return manifest


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The run's checkpoint folders by step, oldest first (`checkpoint-final` by its manifest)."""
    found = []
    for p in Path(out).glob("checkpoint-*"):
        m = NUMBERED.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
        elif p.name == "checkpoint-final":
            try:
                step = json.loads((p / MANIFEST).read_text()).get("step")
            except (OSError, ValueError):
                step = None
            found.append((step if isinstance(step, int) else 10**12, p))
    return sorted(found)


def resume_point(out: Path, spec: str) -> Path | None:
    """The checkpoint `trainer.resume` names: `auto` = the newest of `out` (None when it has none),
    else a path. It must be complete and undamaged.

    Raises:
        CheckpointError: the named or newest checkpoint fails `verify`; the message names the newest
            good one before it.
    """
    if not spec:
        return None
    if spec == "auto":
        found = checkpoints(out)
        if not found:
            return None
        path = found[-1][1]
    else:
        path = Path(spec)
        found = checkpoints(path.parent)
    try:
        verify(path)
    except CheckpointError as exc:
        good = None
        for _, p in reversed(found):
            if p != path:
                try:
                    verify(p)
                    good = p
                    break
                except CheckpointError:
                    continue
        fix = (f" The newest good one before it is {good}: trainer.resume={good} (or delete {path})." if good
               else " No earlier good checkpoint exists: start again without trainer.resume.")
        raise CheckpointError(f"trainer.resume: {exc}{fix}") from None
    return path


def read_trainer_state(path: Path, rank: int) -> tuple[dict, dict]:
    """The loop's state and this rank's RNG state of checkpoint `path` (written by as many
    processes as read it: `prepare_output_dir` checks)."""
    state = json.loads((Path(path) / TRAINER_STATE).read_text())
    return state, json.loads((Path(path) / RNG_DIR / f"rank{rank}.json").read_text())


def prune(out: Path, keep: int) -> None:
    """Delete the numbered checkpoints of `out` but the newest `keep` (0 = keep all)."""
    numbered = [(s, p) for s, p in checkpoints(out) if NUMBERED.fullmatch(p.name)]
    if keep > 0:
        for _, p in numbered[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    """Python, numpy and torch (CPU and CUDA) generator states as JSON values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
