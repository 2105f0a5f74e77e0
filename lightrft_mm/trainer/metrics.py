"""Per-step metrics (`metrics.jsonl`) and sampled trajectories (`trajectories.jsonl`), written by
rank 0; `reduce_metrics` combines the ranks' metrics first."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path


class JsonlWriter:
    """Append one JSON object per line and flush, so a crash loses at most the current line."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(_json_values(row), ensure_ascii=False, allow_nan=False) + "\n")
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


def read_rows(path: Path) -> Iterator[tuple[int, str, object]]:
    """`(line number, line, its JSON value)` of each line of a JSONL file the trainer writes
    (numbers 1-based): blank lines skipped, a last line cut short (the trainer may be writing
    it right now) left out.

    Raises:
        ValueError: a line other than the last is not valid JSON (`path:line` named).
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                return
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        yield number, line, value


def merge_metrics(metrics: list[tuple[dict, int]]) -> dict:
    """Metrics of several parts (scored batches weighted by their completions, or ranks): integer
    counts summed, other numbers averaged by weight over the parts that report the key."""
    merged = {}
    for key in dict.fromkeys(k for m, _ in metrics for k in m):
        values = [(m[key], w) for m, w in metrics if key in m]
        if all(isinstance(v, int) and not isinstance(v, bool) for v, _ in values):
            merged[key] = sum(v for v, _ in values)
        else:
            merged[key] = sum(float(v) * w for v, w in values) / max(sum(w for _, w in values), 1)
    return merged


def reduce_metrics(comm, row: dict) -> dict:
    """One rank's metrics combined over every rank (`merge_metrics`, each rank weighing the same:
    each holds an equal share of the groups)."""
    return merge_metrics([(r, 1) for r in comm.gather(row)])


def _json_values(value):
    """`value` as strict JSON values: a NaN or inf number (a diverged loss) becomes null, so every
    line stays valid JSON for any reader; tensors and numpy numbers become floats."""
    if isinstance(value, dict):
        return {str(k): _json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_values(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None
