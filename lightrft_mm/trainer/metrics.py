"""Per-step metrics (`metrics.jsonl`) and sampled trajectories (`trajectories.jsonl`), written by
rank 0; `reduce_metrics` combines the ranks' metrics first."""

from __future__ import annotations

import json
from pathlib import Path


class JsonlWriter:
    """Append one JSON object per line and flush, so a crash loses at most the current line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class _Discard:
    """A writer that writes nothing (ranks other than 0)."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def open_writer(path: Path, enabled: bool = True):
    """A `JsonlWriter` for `path`, or a writer that discards everything when not `enabled`."""
    return JsonlWriter(path) if enabled else _Discard()


def reduce_metrics(comm, row: dict) -> dict:
    """One rank's metrics combined over every rank: integer counts summed, other numbers
    averaged over the ranks that report them (each rank holds an equal share of the groups)."""
    rows = comm.gather(row)
    merged = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [r[key] for r in rows if key in r]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            merged[key] = sum(values)
        else:
            merged[key] = sum(float(v) for v in values) / len(values)
    return merged
