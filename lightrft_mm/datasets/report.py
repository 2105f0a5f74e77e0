"""The summary `prepare` prints: counts, rejects by reason, media bytes, prompt-token histogram."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from lightrft_mm.schema import Sample


def token_counter_for(model: str) -> Callable[[Sample], int]:
    """A prompt-token counter with the processor of ``tiny:<family>`` or of a model folder.

    The count is the length of the prompt as the model's adapter encodes it: chat template,
    text and the media tokens the processor expands. Only the processor of a model folder is
    loaded, not its weights.

    Raises:
        ModelError: An unknown tiny family, or a folder without a loadable processor.
    """
    from types import SimpleNamespace

    from lightrft_mm.datasets.loader import prompt_token_counter
    from lightrft_mm.errors import ModelError
    from lightrft_mm.processors import make_adapter

    if model.startswith("tiny:"):
        from lightrft_mm.models.tiny import build_tiny

        model_obj, processor = build_tiny(model[len("tiny:"):])
    else:
        from lightrft_mm.models.hub import resolve
        from lightrft_mm.models.processing import load_processor

        folder = resolve(model)  # a Hub id: its cached snapshot (downloaded unless offline)
        config = folder / "config.json"
        if not config.is_file():
            raise ModelError(f"--model {model}: not a model folder (no config.json). Fix: give a "
                             "local Hugging Face model folder, a Hub id (ORG/NAME), or tiny:<family>.")
        model_type = json.loads(config.read_text()).get("model_type", "")
        processor = load_processor(folder)
        model_obj = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
    return prompt_token_counter(make_adapter(model_obj, processor))


def prompt_token_lengths(folder: Path, counter: Callable[[Sample], int]) -> list[int]:
    """Prompt lengths of every sample of a shard folder, in shard order."""
    from lightrft_mm.datasets.loader import load_samples

    return [counter(s) for s in load_samples([folder])]


def token_stats(lengths: list[int]) -> dict:
    """min / median / p90 / max / mean of prompt lengths."""
    xs = sorted(lengths)
    pick = lambda q: xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]  # noqa: E731
    return {"count": len(xs), "min": xs[0], "p50": pick(0.5), "p90": pick(0.9), "max": xs[-1],
            "mean": round(sum(xs) / len(xs), 1)}


def histogram(lengths: list[int], bins: int = 8, width: int = 30) -> list[str]:
    """Text histogram lines, equal-width bins from the shortest to the longest prompt."""
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts: dict[int, int] = {}
    for x in lengths:
        counts[(x - lo) // step] = counts.get((x - lo) // step, 0) + 1
    top = max(counts.values())
    lines = []
    for b in range((hi - lo) // step + 1):
        n = counts.get(b, 0)
        start = lo + b * step
        lines.append(f"    {start:>6}-{start + step - 1:<6} {'#' * round(width * n / top):<{width}} {n}")
    return lines


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def summary_table(report, *, source: str, model: str | None = None) -> str:
    """The end-of-run table: read, written, rejected by reason, media, time, token histogram."""
    rows = [("rows read", str(report.read)), ("written", str(report.written)),
            ("rejected", str(sum(report.rejected.values())))]
    rows += [(f"  {reason}", str(n)) for reason, n in sorted(report.rejected.items())]
    rows += [("media files", f"{report.media_files} ({_size(report.media_bytes)})")]
    rate = report.read / report.seconds if report.seconds > 0 else 0.0
    rows += [("time", f"{report.seconds:.1f} s ({rate:.0f} rows/s)")]
    lines = [f"prepare summary: {source} -> {report.out}"]
    lines += [f"  {k:<24} {v}" for k, v in rows]
    if report.rejected:
        lines.append(f"  rejects (row, reason, field, fix): {report.out / 'rejects.jsonl'}")
    if report.token_lengths:
        s = token_stats(report.token_lengths)
        lines.append(f"  prompt tokens ({model}): min {s['min']}, median {s['p50']}, p90 {s['p90']}, "
                     f"max {s['max']}")
        lines += histogram(report.token_lengths)
    return "\n".join(lines)
