"""Training curves from runs' metrics.jsonl, drawn to a PNG (``lightrft-mm plot``).

matplotlib is imported inside ``_draw`` so importing this module stays light.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lightrft_mm.trainer.metrics import read_rows

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
    by_key: dict[str, dict[float, float]] = {key: {} for key in keys}
    for number, line, record in read_rows(metrics_path):
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
    series = read_series(metrics_path, keys)
    if not series:
        raise ValueError(
            f"{metrics_path}: none of the keys {list(keys)} has a numeric value on any line; "
            "pass keys= with metric names the file contains"
        )
    _draw({"": series}, list(series), Path(out_png))
    return out_png


def metric_keys(metrics_path: Path) -> list[str]:
    """Every key with a numeric value on some line of ``metrics_path``, in first-seen order."""
    seen: dict[str, None] = {}
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # read_series reports malformed lines; here they only hide their keys
        if isinstance(record, dict):
            seen.update((k, None) for k, v in record.items() if k != "step" and _is_number(v))
    return list(seen)


def run_panels(available: Sequence[str]) -> list[str]:
    """The default panels of ``plot``, in order, out of the keys a run (or several) logged.

    Reward mean, then each reward function's mean (``reward/<name>``, the run's own names),
    held-out accuracy, KL, entropy, completion length, truncation and step time; keys no run
    logged are left out.
    """
    names = [k for k in available if k.startswith("reward/") and k.count("/") == 1 and k not in _REWARD_STATS]
    entropy = [k for k in available if k.rsplit("/", 1)[-1] == "entropy"]
    wanted = ["reward/mean", *names, "eval/accuracy", "loss/kl", *entropy, "completion/length",
              "completion/truncated", "time/step"]
    return [k for k in dict.fromkeys(wanted) if k in set(available)]


_REWARD_STATS = {"reward/mean", "reward/std", "reward/invalid", "reward/errors", "reward/timeouts"}


def _metrics_file(run: Path) -> Path:
    run = Path(run)
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file; pass a run folder (holding metrics.jsonl) "
                                "or a metrics.jsonl file")
    return path


def run_labels(runs: Sequence[Path]) -> list[str]:
    """Legend names: each run's folder name, or the path as given where two names collide."""
    names = [(Path(r) if Path(r).is_dir() else Path(r).parent).name or str(r) for r in runs]
    return [n if names.count(n) == 1 else str(r) for n, r in zip(names, runs)]


def plot_runs(runs: Sequence[Path], out_png: Path, keys: Sequence[str] | None = None) -> list[str]:
    """Overlay several runs' curves, one panel per metric and one colour per run, in one PNG.

    Args:
        runs: run folders (each holding ``metrics.jsonl``) or metrics.jsonl files.
        out_png: where to write the image; parent folders are created.
        keys: the metrics to draw, one panel each; ``fnmatch`` patterns (``reward/*``) are
            expanded against the runs' keys. Default: ``run_panels`` of the runs' keys.

    Returns:
        The panel titles drawn (metric names), in order.

    Raises:
        FileNotFoundError: a run has no metrics.jsonl.
        ValueError: no run logged any of the keys, or a file is malformed.
    """
    files = [_metrics_file(r) for r in runs]
    available = list(dict.fromkeys(k for f in files for k in metric_keys(f)))
    if keys is None:
        keys = run_panels(available)
    else:
        keys = list(dict.fromkeys(m for k in keys for m in (fnmatch.filter(available, k) or [k])))
    by_run = {label: read_series(f, keys) for label, f in zip(run_labels(runs), files)}
    panels = [k for k in keys if any(k in series for series in by_run.values())]
    if not panels:
        raise ValueError(f"{', '.join(map(str, files))}: none of the keys {list(keys)} has a numeric value; "
                         f"keys these runs logged: {', '.join(available) or 'none'}")
    _draw(by_run, panels, Path(out_png))
    return panels


def _draw(by_run: dict[str, dict[str, list[tuple[float, float]]]], panels: list[str], out_png: Path) -> None:
    """One subplot per panel key, one line per run (legend only for named runs); atomic write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 1 if len(panels) <= 3 else 2
    rows = math.ceil(len(panels) / cols)
    # Figure + Agg canvas rather than pyplot: no global backend switch, no figure registry.
    fig = Figure(figsize=(7 * cols, 2.6 * rows + (0.4 if len(by_run) > 1 else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, cols, sharex=True, squeeze=False)
    axes = list(grid.flat)
    colours = [f"C{i % 10}" for i in range(len(by_run))]
    for ax, key in zip(axes, panels):
        for colour, (label, series) in zip(colours, by_run.items()):
            if key in series:
                steps, values = zip(*series[key])
                ax.plot(steps, values, color=colour, label=label or None,
                        marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(key)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
        above = axes[axes.index(ax) - cols]  # sharex hid its tick labels: the panel ends its column
        above.xaxis.set_tick_params(labelbottom=True)
        above.set_xlabel("step")
    for ax in grid[-1][: len(panels) - (rows - 1) * cols]:
        ax.set_xlabel("step")
    if any(by_run):
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c) for c in colours]
        fig.legend(handles, list(by_run), loc="outside upper center", ncols=min(len(by_run), 4), frameon=False)

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
