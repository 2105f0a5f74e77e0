"""Read prepared shards and serve deterministic batches of Samples.

`PromptLoader` mixes several prepared folders (pooled, or drawn by weight), shuffles them
deterministically by seed, gives each rank its own part of every global batch, drops prompts
that are too long (counted), and has a position (`state_dict` / `load_state_dict`) from which
a resumed run continues with exactly the batches that would have come next.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

from lightrft_mm.datasets.media import resolves_inside
from lightrft_mm.datasets.readers import jsonl_lines
from lightrft_mm.errors import DataError, MediaError
from lightrft_mm.schema import MEDIA_TYPES, Sample, resolve_media

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)")  # not a file: left as it is


def shard_files(path: str | Path) -> list[Path]:
    """A shard folder's `*.jsonl` files (sorted, rejects.jsonl excluded), or the file itself."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.glob("*.jsonl") if f.name != "rejects.jsonl")
        if files:
            return files
        raise DataError(f"{p}: folder holds no .jsonl shard. Fix: create it with "
                        f"`python -m lightrft_mm.prepare SOURCE --out {p}`.")
    raise DataError(f"{p}: no such shard folder or file. Fix: check data.train / data.eval, or "
                    f"create it with `python -m lightrft_mm.prepare SOURCE --out {p}`.")


def load_samples(paths: Sequence[str | Path], *, allow_outside_media: bool = False) -> list[Sample]:
    """All Samples of the given shard folders/files, media paths made absolute.

    Args:
        paths: Shard folders or .jsonl files.
        allow_outside_media: Accept media files that resolve (symlinks followed) outside the
            shard's folder (``data.allow_outside_media``).

    Raises:
        DataError: Like any bad row (a line that is not UTF-8 or not JSON, a schema error), a
            media path outside the shard's folder stops the load, naming file, line and fix.
    """
    samples = []
    for path in paths:
        for f in shard_files(path):
            for line, sample in read_shard(f):
                if not allow_outside_media:
                    check_media_inside(sample, f, line)
                samples.append(resolve_media(sample, f.parent))
    return samples


def read_shard(path: Path) -> Iterator[tuple[int, Sample]]:
    """``(line number, Sample)`` of each row of a JSONL shard, blank lines skipped.

    Each line is decoded as UTF-8 on its own, so a bad byte is reported with its line and offset.

    Raises:
        DataError: Naming the file and 1-based line: bytes that are not UTF-8, a line that is
            not JSON, or a row that breaks the schema.
    """
    for i, text, bad in jsonl_lines(path):
        if bad is not None:
            raise DataError(f"{path} line {i}: {bad}. Fix: save the shard as UTF-8 (prepare writes "
                            "UTF-8; prepare the data again), or correct or delete the line.")
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {i}: not valid JSON ({exc.msg} at column "
                            f"{exc.colno}); each line must hold one JSON object") from exc
        yield i, Sample.from_dict(row, where=f"{path} row {i}")


def check_media_inside(sample: Sample, shard: Path, line: int) -> None:
    """Refuse a media file of ``sample`` that resolves (symlinks followed) outside ``shard``'s folder.

    URLs and ``data:`` URIs are not files and are left as they are.

    Raises:
        DataError: Naming the shard file, line, sample id, field, path and the fix.
    """
    folder = shard.parent
    for m, message in enumerate(sample.messages):
        for k, part in enumerate(message.content):
            path = part.path if part.type in MEDIA_TYPES else None
            if not path or _URL.match(path):
                continue
            full = Path(path) if os.path.isabs(path) else folder / path
            if not resolves_inside(full, folder):
                raise DataError(
                    f"{shard} line {line} (id {sample.id!r}), messages[{m}].content[{k}].{part.type}: "
                    f"{part.type} path {path!r} resolves to {full.resolve()}, outside the shard folder "
                    f"{folder.resolve()}. Shards are read with media from inside their folder only, so "
                    "that shards from elsewhere cannot make training read (or a remote reward send out) "
                    "other files. Fix: prepare the data again (prepare copies media into the folder), "
                    "or set data.allow_outside_media=true for shards you trust.")


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` from torch.distributed when it is initialised, else ``(0, 1)``."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def prompt_token_counter(adapter) -> Callable[[Sample], int]:
    """``sample -> prompt length in tokens`` as ``adapter`` encodes it (media tokens included).

    A sample whose media fails to decode counts 0 tokens: the training loop's media policy
    (``data.on_media_error``) decides about it, not the length filter.
    """
    def count(sample: Sample) -> int:
        try:
            return int(adapter.encode_prompts([sample]).attention_mask.sum())
        except MediaError:
            return 0

    return count


def drop_long(samples: list[Sample], max_tokens: int,
              token_len: Callable[[Sample], int]) -> tuple[list[Sample], int]:
    """The samples whose prompt has at most ``max_tokens`` tokens, and how many were dropped."""
    kept = [s for s in samples if token_len(s) <= max_tokens]
    return kept, len(samples) - len(kept)


def drop_unsupported(samples: list[Sample], modalities: frozenset[str] | set[str], where: str = ""
                     ) -> tuple[list[Sample], int]:
    """The samples whose media kinds the model takes, and how many were dropped (logged once).

    Args:
        samples: candidate samples.
        modalities: media kinds the model's adapter takes besides text (``adapter.modalities``).
        where: the folder, named in the warning.
    """
    kept, dropped = [], {}
    for s in samples:
        missing = sorted({p.type for p in s.media()} - set(modalities))
        if missing:
            for kind in missing:
                dropped[kind] = dropped.get(kind, 0) + 1
        else:
            kept.append(s)
    if dropped:
        takes = ", ".join(["text", *sorted(modalities)])
        log.warning("%s%d of %d samples hold %s parts, which this model cannot take (it takes %s); they "
                    "are left out. Fix: train them with a model that takes those modalities.",
                    f"{where}: " if where else "", len(samples) - len(kept), len(samples),
                    "/".join(sorted(dropped)), takes)
    return kept, len(samples) - len(kept)


class PromptLoader:
    """Endless, deterministic batches of Samples for one rank.

    Without weights every source is pooled: each epoch is a fresh shuffle of all samples
    (``random.Random(seed * 100_003 + epoch)``), cut into global batches of
    ``batch_size * world_size``; a tail that does not fill a global batch waits for a later
    epoch's shuffle, and fewer samples than a global batch give one short batch per epoch.
    With weights, each element of a global batch comes from source ``i`` with probability
    ``weights[i] / sum(weights)``, and each source is read in its own reshuffled epochs.
    Rank ``r`` takes elements ``r, r + world_size, ...`` of every global batch.

    Args:
        sources: Samples of each source (a prepared folder).
        batch_size: Samples per rank per step.
        seed: Seed of the shuffles and of the mixing draws.
        weights: Mixing weight of each source (>= 0, one > 0), or None to pool them.
        rank: This process's rank (default: from torch.distributed, else 0).
        world_size: Number of ranks (default: from torch.distributed, else 1).
        filtered: Samples already dropped as too long (reported by ``filtered``).
        unsupported: Samples already dropped for media kinds the model cannot take.
    """

    def __init__(self, sources: Sequence[Sequence[Sample]], *, batch_size: int, seed: int = 0,
                 weights: Sequence[float] | None = None, rank: int | None = None,
                 world_size: int | None = None, filtered: int = 0, unsupported: int = 0) -> None:
        if rank is None or world_size is None:
            default_rank, default_world = dist_rank_world()
            rank = default_rank if rank is None else rank
            world_size = default_world if world_size is None else world_size
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.seed, self.filtered = int(batch_size), int(seed), filtered
        self.unsupported = unsupported
        self.sources = [list(s) for s in sources]
        self.weights = _check_weights(weights, len(self.sources))
        if self.weights is None:
            self.sources = [[s for src in self.sources for s in src]]
        _check_sizes(self.sources, self.weights, self.world_size, self.rank, self.batch_size)
        self.step = 0
        self._counts = [0] * len(self.sources)  # mixture: draws of each source before `step`
        self._orders: dict[int, tuple[int, list[int]]] = {}  # source -> (epoch, its shuffle)

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], *, batch_size: int, seed: int = 0,
                   weights: Sequence[float] | None = None, max_prompt_tokens: int = 0,
                   token_len: Callable[[Sample], int] | None = None, rank: int | None = None,
                   world_size: int | None = None, modalities: frozenset[str] | None = None,
                   allow_outside_media: bool = False) -> "PromptLoader":
        """Load prepared folders (one source each) and drop prompts over ``max_prompt_tokens``
        and, given ``modalities`` (the adapter's), samples with media kinds the model cannot take.
        ``allow_outside_media``: see `load_samples`.

        Raises:
            DataError: No paths, weights that do not match them, a folder left empty by the
                filters, or ``max_prompt_tokens`` without ``token_len``.
        """
        if not paths:
            raise DataError("no training samples: data.train is empty. Fix: list prepared shard "
                            "folders, e.g. data.train=[data/geo3k-train].")
        _check_weights(weights, len(paths))  # before the (slow) loading
        sources = [load_samples([p], allow_outside_media=allow_outside_media) for p in paths]
        filtered, unsupported = 0, 0
        if modalities is not None:
            for i, (path, samples) in enumerate(zip(paths, sources)):
                sources[i], dropped = drop_unsupported(samples, modalities, where=str(path))
                unsupported += dropped
                if samples and not sources[i]:
                    raise DataError(f"{path}: none of its {len(samples)} samples can be used: they hold "
                                    f"media this model cannot take (it takes text"
                                    f"{''.join(', ' + m for m in sorted(modalities))}). Fix: pick a model "
                                    "for that data, or leave the folder out of data.train.")
        if max_prompt_tokens:
            if token_len is None:
                raise DataError("data.max_prompt_tokens needs a token-length function (the model's "
                                "adapter); pass token_len.")
            for i, (path, samples) in enumerate(zip(paths, sources)):
                sources[i], dropped = drop_long(samples, max_prompt_tokens, token_len)
                filtered += dropped
                if samples and not sources[i]:
                    raise DataError(f"{path}: every one of its {len(samples)} prompts is longer than "
                                    f"data.max_prompt_tokens={max_prompt_tokens} (the shortest has "
                                    f"{min(map(token_len, samples))} tokens). Fix: raise the limit.")
        return cls(sources, batch_size=batch_size, seed=seed, weights=weights, rank=rank,
                   world_size=world_size, filtered=filtered, unsupported=unsupported)

    @classmethod
    def from_config(cls, data_cfg, *, seed: int, token_len: Callable[[Sample], int] | None = None,
                    rank: int | None = None, world_size: int | None = None,
                    modalities: frozenset[str] | None = None, batch_size: int | None = None) -> "PromptLoader":
        """The training loader of a `DataConfig` (train, batch_size, weights, max_prompt_tokens,
        allow_outside_media); `batch_size` (per rank) defaults to data.batch_size."""
        return cls.from_paths(data_cfg.train, batch_size=batch_size or data_cfg.batch_size, seed=seed,
                              weights=data_cfg.weights or None, max_prompt_tokens=data_cfg.max_prompt_tokens,
                              token_len=token_len, rank=rank, world_size=world_size, modalities=modalities,
                              allow_outside_media=data_cfg.allow_outside_media)

    @property
    def samples(self) -> list[Sample]:
        """Every kept sample, all sources together."""
        return [s for src in self.sources for s in src]

    def __iter__(self) -> Iterator[list[Sample]]:
        return self

    def __next__(self) -> list[Sample]:
        if self.weights is None:
            batch = self._pooled_batch(self.step)
        else:
            batch = self._mixed_batch(self.step)
        self.step += 1
        return batch[self.rank::self.world_size]

    def _pooled_batch(self, step: int) -> list[Sample]:
        pool, size = self.sources[0], self.batch_size * self.world_size
        per_epoch = max(len(pool) // size, 1)
        epoch, k = divmod(step, per_epoch)
        order = self._order(0, epoch, lambda: random.Random(self.seed * 100_003 + epoch))
        return [pool[i] for i in order[k * size:(k + 1) * size]]

    def _mixed_batch(self, step: int) -> list[Sample]:
        batch = []
        for src in self._draws(step):
            epoch, pos = divmod(self._counts[src], len(self.sources[src]))
            order = self._order(src, epoch, lambda: random.Random(f"{self.seed}-{src}-{epoch}"))
            batch.append(self.sources[src][order[pos]])
            self._counts[src] += 1
        return batch

    def _draws(self, step: int) -> list[int]:
        """The source of each element of global batch ``step`` (mixture mode)."""
        rng = random.Random(f"{self.seed}-mix-{step}")
        return rng.choices(range(len(self.sources)), weights=self.weights,
                           k=self.batch_size * self.world_size)

    def _order(self, src: int, epoch: int, make_rng: Callable[[], random.Random]) -> list[int]:
        cached = self._orders.get(src)
        if cached is None or cached[0] != epoch:
            order = list(range(len(self.sources[src])))
            make_rng().shuffle(order)
            self._orders[src] = cached = (epoch, order)
        return cached[1]

    def state_dict(self) -> dict:
        """The position, plus what must match for it to mean the same batches on resume."""
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "sizes": [len(s) for s in self.sources],
                "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: the next batch is the one that would have come next.

        Raises:
            DataError: The data or the loader settings differ from the saved ones.
        """
        mine = self.state_dict()
        changed = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in mine
                   if k != "step" and state.get(k) != mine[k]]
        if changed:
            raise DataError("cannot resume the data position: " + "; ".join(changed) + ". Fix: resume "
                            "with the same data.train, data.weights, data.batch_size, seed and world size.")
        self.step, self._counts, self._orders = int(state["step"]), [0] * len(self.sources), {}
        if self.weights is not None:
            for step in range(self.step):
                for src in self._draws(step):
                    self._counts[src] += 1


def weight_problems(weights: Sequence, n_folders: int) -> list[str]:
    """Why ``data.weights`` does not fit ``n_folders`` data.train folders (empty when it does)."""
    if not weights:
        return []
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0]
    if len(weights) != n_folders or bad or not any(weights):
        return [f"data.weights: {list(weights)!r} does not fit {n_folders} data.train folder(s). Fix: give "
                "one number >= 0 per folder, in order (at least one > 0), or none to pool the folders."]
    return []


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float] | None:
    problems = weight_problems(weights or [], n)
    if problems:
        raise DataError(problems[0])
    return [float(w) for w in weights] if weights else None


def _check_sizes(sources: list[list[Sample]], weights, world_size: int, rank: int, batch_size: int) -> None:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: need "
                        "batch_size >= 1 and 0 <= rank < world_size.")
    used = [s for s, w in zip(sources, weights or [1.0] * len(sources)) if w > 0]
    if not any(used) or any(not s for s in used):
        raise DataError("no training samples: data.train (or one of its weighted folders) holds no rows.")
    if weights is None and len(sources[0]) < world_size:
        raise DataError(f"{len(sources[0])} training samples for {world_size} ranks: every rank needs "
                        "at least one. Fix: prepare more data or use fewer ranks.")


def batches(samples: list[Sample], batch_size: int, seed: int) -> Iterator[list[Sample]]:
    """Endless full batches of one process; each epoch is a fresh deterministic shuffle.

    When batch_size does not divide the sample count, the last `len % batch_size` samples of
    an epoch's shuffle are left for later epochs (a new shuffle each time), so every step sees
    a full batch. Fewer samples than batch_size give one short batch per epoch.
    """
    return PromptLoader([samples], batch_size=batch_size, seed=seed, rank=0, world_size=1)
