"""`lightrft-mm data inspect DIR [--sheet out.png]`: what a prepared folder holds.

Prints counts (samples, sources, splits, media by kind and their bytes, missing media,
prompt lengths, answers, choices, rejects by reason) and a few samples; ``--sheet`` draws a
contact sheet: each sample's first image with its prompt and answer under it.
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import uuid
from collections import Counter
from pathlib import Path

from lightrft_mm.datasets.loader import MANIFEST, load_samples
from lightrft_mm.schema import MEDIA_TYPES, Sample


def folder_stats(folder: Path, samples: list[Sample]) -> dict:
    """Counts of a prepared folder and its (loaded) samples."""
    media = {kind: [p.path for s in samples for p in s.media(kind)] for kind in MEDIA_TYPES}
    paths = {p for kind in MEDIA_TYPES for p in media[kind]}
    present = {p for p in paths if os.path.isfile(p)}
    chars = sorted(len(s.prompt_text()) for s in samples)
    answers = Counter(str(s.answer) for s in samples if s.answer not in (None, ""))
    rejects = Counter()
    if (folder / "rejects.jsonl").is_file():
        for line in (folder / "rejects.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                rejects[json.loads(line).get("reason", "?")] += 1
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else None
    return {
        "folder": str(folder), "samples": len(samples), "manifest": manifest is not None,
        "schema_version": (manifest or {}).get("schema_version"),
        "sources": dict(Counter(s.source for s in samples).most_common()),
        "splits": dict(Counter(str(s.meta.get("split")) for s in samples if "split" in s.meta)),
        "media": {kind: len(v) for kind, v in media.items() if v},
        "media_bytes": sum(os.path.getsize(p) for p in present),
        "missing_media": len(paths - present),
        "prompt_chars": {"min": chars[0], "median": chars[len(chars) // 2], "max": chars[-1]} if chars else {},
        "with_answer": sum(answers.values()), "distinct_answers": len(answers),
        "top_answers": dict(answers.most_common(5)),
        "with_choices": sum(1 for s in samples if s.choices),
        "rejected": dict(rejects.most_common()),
    }


def format_stats(stats: dict, samples: list[Sample], show: int = 3) -> str:
    """The stats as aligned lines, then ``show`` samples."""
    lines = [f"data inspect: {stats['folder']}"]
    for key in ("samples", "sources", "splits", "media", "media_bytes", "missing_media", "prompt_chars",
                "with_answer", "distinct_answers", "top_answers", "with_choices", "rejected"):
        value = stats[key]
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        lines.append(f"  {key:<18} {value}")
    if not stats["manifest"]:
        lines.append(f"  note: no {MANIFEST}: not a finished prepare output")
    for s in samples[:show]:
        media = ", ".join(f"{p.type}:{Path(p.path).name}" for p in s.media()) or "no media"
        lines += [f"--- {s.id} ({s.source}; {media})",
                  textwrap.shorten(s.prompt_text(), 300, placeholder=" ..."),
                  f"answer: {s.answer!r}" + (f"  choices: {s.choices}" if s.choices else "")]
    return "\n".join(lines)


def contact_sheet(samples: list[Sample], out: Path, *, max_items: int = 12, columns: int = 4,
                  thumb: int = 192) -> Path:
    """Draw up to ``max_items`` samples (first image, prompt, answer) into a PNG grid at ``out``."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=12)
    except TypeError:
        font = ImageFont.load_default()
    chosen = samples[:max_items]
    text_lines, line_h, pad = 7, 15, 8
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + text_lines * line_h
    rows = max(1, -(-len(chosen) // columns))
    sheet = Image.new("RGB", (cell_w * min(columns, max(len(chosen), 1)), cell_h * rows), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, s in enumerate(chosen):
        x, y = (k % columns) * cell_w + pad, (k // columns) * cell_h + pad
        sheet.paste(_thumbnail(s, thumb), (x, y))
        wrapped = textwrap.wrap(s.prompt_text(), width=max(10, thumb // 7))[:text_lines - 2]
        lines = [s.id[: thumb // 7]] + wrapped + [f"answer: {s.answer}"]
        for j, line in enumerate(lines):
            draw.text((x, y + thumb + 4 + j * line_h), line, fill=(0, 0, 0) if j else (40, 40, 160), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


def _thumbnail(sample: Sample, size: int):
    from PIL import Image, ImageDraw

    images = sample.media("image")
    if images:
        try:
            with Image.open(images[0].image) as im:
                im = im.convert("RGB")
                im.thumbnail((size, size))
                box = Image.new("RGB", (size, size), (235, 235, 235))
                box.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
                return box
        except OSError:
            label = "unreadable image"
    else:
        label = ", ".join(p.type for p in sample.media()) or "no media"
    box = Image.new("RGB", (size, size), (220, 220, 220))
    ImageDraw.Draw(box).text((8, size // 2), label, fill=(90, 90, 90))
    return box


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of `data inspect`."""
    parser.add_argument("folder", type=Path, help="a prepared shard folder")
    parser.add_argument("--sheet", type=Path, help="write a contact sheet PNG here")
    parser.add_argument("--samples", type=int, default=3, help="samples to print (default: 3)")
    parser.add_argument("--sheet-items", type=int, default=12, help="samples on the sheet (default: 12)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the folder's stats and samples; write the sheet when asked."""
    samples = load_samples([args.folder])
    print(format_stats(folder_stats(args.folder, samples), samples, show=args.samples))
    if args.sheet:
        print(f"sheet: {contact_sheet(samples, args.sheet, max_items=args.sheet_items)}")
    return 0
