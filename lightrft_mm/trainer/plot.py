"""Training curves from a run's metrics.jsonl, drawn to a PNG.

matplotlib is imported inside ``plot_curves`` so importing this module stays light.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_KEYS = ("reward/mean", "eval/accuracy")


def read_series(metrics_path: Path, keys: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """Read ``(step, value)`` points of each key from a metrics.jsonl file.

    Lines without a key are skipped for that key, as are non-numeric values. When a step
    repeats (a resumed run re-logs it), the later line wins. A truncated last line (the
    trainer may be writing it right now) is ignored.

    Args:
        metrics_path: one JSON object per line, each with a numeric ``"step"``.
        keys: the metric names to collect.

    Returns:
        For every key with at least one point, its points sorted by step.

    Raises:
        ValueError: a line other than the last is not a JSON object with a numeric ``step``.
    """
    lines = Path(metrics_path).read_text(encoding="utf-8").splitlines()
    by_key: dict[str, dict[float, float]] = {key: {} for key in keys}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{metrics_path}:{number}: not valid JSON ({exc.msg})") from exc
        step = record.get("step") if isinstance(record, dict) else None
        if not _is_number(step):
            raise ValueError(
                f"{metrics_path}:{number}: each line must be a JSON object with a numeric "
                f"'step', got {line[:80]!r}"
            )
        for key in keys:
            if _is_number(record.get(key)):
                by_key[key][float(step)] = float(record[key])
    return {key: sorted(points.items()) for key, points in by_key.items() if points}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_curves(metrics_path: Path, out_png: Path, keys: Sequence[str] = DEFAULT_KEYS) -> Path:
    """Draw one subplot per key found in ``metrics_path`` (x = step) and save it as a PNG.

    The PNG is written to a temporary file beside ``out_png`` and moved into place, so a
    reader never sees a half-written image.

    Args:
        metrics_path: the run's metrics.jsonl.
        out_png: where to write the image; parent folders are created.
        keys: metric names to plot, in subplot order; keys absent from the file are left out.

    Returns:
        ``out_png``.

    Raises:
        ValueError: none of ``keys`` appears in the file, or the file is malformed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = read_series(metrics_path, keys)
    if not series:
        raise ValueError(
            f"{metrics_path}: none of the keys {list(keys)} has a numeric value on any line; "
            "pass keys= with metric names the file contains"
        )
    # Figure + Agg canvas rather than pyplot: no global backend switch, no figure registry.
    fig = Figure(figsize=(7, 2.6 * len(series)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (key, points) in zip(axes, series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(key)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_png.name}.", suffix=".tmp", dir=out_png.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            fig.savefig(handle, format="png", dpi=100)
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the PNG is meant to be shared
        os.replace(tmp_name, out_png)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_png
