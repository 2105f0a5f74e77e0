"""`geo3k_like`: Geo3K-style geometry problems drawn offline, with computed answers.

Each sample is one diagram (triangle angles, right-triangle sides, areas, circumferences,
supplementary and isosceles angles) with the quantities written on it, a short problem text
("Find x.") followed by the Geo3K instruction, the answer and four choices. Sample ``i`` of a
seed is the same whatever ``n`` is.

`geo3k_rows` gives the same problems as rows of the Hugging Face `hiyouga/geometry3k` table
(``images`` as ``{bytes, path}``, ``problem`` with ``<image>``, ``answer``, ``id``,
``choices``, ``ground_truth``), for tests and benchmarks of ``prepare geo3k``.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable

import numpy as np

from lightrft_mm.datasets.geo3k import DEFAULT_INSTRUCTION
from lightrft_mm.schema import Sample

SIZE = 224
_PAD = 28
LETTERS = "ABCD"


def _font(size: int = 14):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale and centre points (y up) into the canvas (y down), keeping their proportions."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span = max(max(xs) - min(xs), max(ys) - min(ys), 1e-6)
    scale = (SIZE - 2 * _PAD) / span
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return [(SIZE / 2 + (x - cx) * scale, SIZE / 2 - (y - cy) * scale) for x, y in points]


def _toward(p, q, d: float):
    """The point at distance d from p in the direction of q."""
    length = math.dist(p, q) or 1.0
    return p[0] + (q[0] - p[0]) * d / length, p[1] + (q[1] - p[1]) * d / length


def _inside_label(vertex, others, d: float = 22):
    """A label position inside the angle at vertex (towards the middle of the other points)."""
    mid = (sum(o[0] for o in others) / len(others), sum(o[1] for o in others) / len(others))
    return _toward(vertex, mid, d)


def _canvas():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    return image, ImageDraw.Draw(image)


def _text(draw, xy, text: str) -> None:
    draw.text(xy, text, fill=(0, 0, 0), font=_font(), anchor="mm")


def _triangle_angle(rng):
    a = int(rng.integers(30, 90))
    b = int(rng.integers(25, 151 - a))
    x = 180 - a - b
    ra, rb = math.radians(a), math.radians(b)
    side = math.sin(rb) / math.sin(ra + rb)  # law of sines, base of length 1
    pts = _fit([(0, 0), (1, 0), (side * math.cos(ra), side * math.sin(ra))])
    image, draw = _canvas()
    draw.polygon(pts, outline=(0, 0, 0), width=2)
    for k, label in enumerate((f"{a}°", f"{b}°", "x°")):
        _text(draw, _inside_label(pts[k], [p for j, p in enumerate(pts) if j != k]), label)
    return image, "Find x.", x, [180 - a, a + b, 90 - a if a < 90 else a - 45, b]


_TRIPLES = [(3, 4, 5), (5, 12, 13), (8, 15, 17), (7, 24, 25), (6, 8, 10), (9, 12, 15), (20, 21, 29)]


def _right_hypotenuse(rng):
    a, b, c = _TRIPLES[int(rng.integers(len(_TRIPLES)))]
    k = int(rng.integers(1, 4))
    a, b, c = a * k, b * k, c * k
    pts = _fit([(0, 0), (b, 0), (0, a)])
    image, draw = _canvas()
    draw.polygon(pts, outline=(0, 0, 0), width=2)
    s = 12  # the right-angle mark
    draw.line([(pts[0][0] + s, pts[0][1]), (pts[0][0] + s, pts[0][1] - s), (pts[0][0], pts[0][1] - s)],
              fill=(0, 0, 0), width=1)
    _text(draw, ((pts[0][0] + pts[1][0]) / 2, pts[0][1] + 14), str(b))
    _text(draw, (pts[0][0] - 14, (pts[0][1] + pts[2][1]) / 2), str(a))
    _text(draw, ((pts[1][0] + pts[2][0]) / 2 + 12, (pts[1][1] + pts[2][1]) / 2 - 8), "x")
    return image, "Find x.", c, [a + b, c + k, abs(b - a) + k, c - k]


def _rectangle_area(rng):
    w, h = int(rng.integers(3, 21)), int(rng.integers(2, 16))
    pts = _fit([(0, 0), (w, 0), (w, h), (0, h)])
    image, draw = _canvas()
    draw.polygon(pts, outline=(0, 0, 0), width=2)
    _text(draw, ((pts[0][0] + pts[1][0]) / 2, pts[0][1] + 14), f"{w} cm")
    _text(draw, (pts[1][0] + 8, (pts[1][1] + pts[2][1]) / 2), f"{h}")
    return image, "Find the area of the rectangle.", w * h, [2 * (w + h), w + h, w * h + w, w * h - h]


def _triangle_area(rng):
    base, height = 2 * int(rng.integers(2, 11)), int(rng.integers(3, 16))
    shift = float(rng.uniform(0.2, 0.8)) * base
    pts = _fit([(0, 0), (base, 0), (shift, height), (shift, 0)])
    image, draw = _canvas()
    draw.polygon(pts[:3], outline=(0, 0, 0), width=2)
    draw.line([pts[2], pts[3]], fill=(90, 90, 90), width=1)  # the height
    _text(draw, ((pts[0][0] + pts[1][0]) / 2, pts[0][1] + 14), str(base))
    _text(draw, (pts[2][0] + 10, (pts[2][1] + pts[3][1]) / 2), str(height))
    return image, "Find the area of the triangle.", base * height // 2, [base * height, base + height,
                                                                        base * height // 2 + base]


def _circle_circumference(rng):
    r = int(rng.integers(2, 16))
    image, draw = _canvas()
    c, rad = SIZE / 2, SIZE / 2 - _PAD
    draw.ellipse([c - rad, c - rad, c + rad, c + rad], outline=(0, 0, 0), width=2)
    draw.line([(c, c), (c + rad, c)], fill=(0, 0, 0), width=2)
    _text(draw, (c + rad / 2, c - 10), f"{r} in.")
    answer = round(2 * math.pi * r, 1)
    return (image, "Find the circumference of the circle. Round to the nearest tenth.", answer,
            [round(math.pi * r * r, 1), round(math.pi * r, 1), round(4 * math.pi * r, 1)])


def _supplementary(rng):
    a = int(rng.choice([v for v in range(20, 161, 5) if v != 90]))
    ra = math.radians(a)
    pts = _fit([(-1, 0), (1, 0), (0, 0), (math.cos(ra), math.sin(ra))])
    image, draw = _canvas()
    draw.line([pts[0], pts[1]], fill=(0, 0, 0), width=2)
    draw.line([pts[2], pts[3]], fill=(0, 0, 0), width=2)
    _text(draw, _inside_label(pts[2], [pts[1], pts[3]], 26), f"{a}°")
    _text(draw, _inside_label(pts[2], [pts[0], pts[3]], 26), "x°")
    return image, "Find x.", 180 - a, [a, 90 - a if a < 90 else a - 90, 360 - a]


def _isosceles(rng):
    apex = 2 * int(rng.integers(10, 71))
    x = (180 - apex) // 2
    half = math.radians(apex / 2)
    pts = _fit([(-math.sin(half), 0), (math.sin(half), 0), (0, math.cos(half))])
    image, draw = _canvas()
    draw.polygon(pts, outline=(0, 0, 0), width=2)
    for p in (pts[0], pts[1]):  # tick marks on the equal sides
        m = ((p[0] + pts[2][0]) / 2, (p[1] + pts[2][1]) / 2)
        draw.line([(m[0] - 5, m[1]), (m[0] + 5, m[1])], fill=(0, 0, 0), width=2)
    _text(draw, _inside_label(pts[2], pts[:2], 26), f"{apex}°")
    _text(draw, _inside_label(pts[0], [pts[1], pts[2]]), "x°")
    return image, "Find x.", x, [apex, 180 - apex, 90 - x, x + 10]


KINDS: dict[str, Callable] = {
    "triangle_angle": _triangle_angle, "right_hypotenuse": _right_hypotenuse,
    "rectangle_area": _rectangle_area, "triangle_area": _triangle_area,
    "circle_circumference": _circle_circumference, "supplementary": _supplementary,
    "isosceles": _isosceles,
}


def _fmt(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(int(value))


def _choices(answer, candidates: list, rng) -> list[str]:
    """The answer and three distinct positive distractors, in a random order."""
    right = _fmt(answer)
    out = [right]
    for c in candidates:
        c = type(answer)(c)
        if c > 0 and _fmt(c) not in out and len(out) < 4:
            out.append(_fmt(c))
    step = 0.1 * max(1.0, round(answer)) if isinstance(answer, float) else max(1, int(answer) // 10)
    while len(out) < 4:
        c = answer + step * int(rng.integers(1, 8)) * (1 if rng.random() < 0.5 else -1)
        if c > 0 and _fmt(type(answer)(c)) not in out:
            out.append(_fmt(type(answer)(c)))
    return [out[i] for i in rng.permutation(4)]


def problem(seed: int, i: int):
    """Problem ``i`` of ``seed``: ``(PIL image, problem text, answer, choices, kind)``."""
    rng = np.random.default_rng([seed, i])
    names = list(KINDS)
    kind = names[int(rng.integers(len(names)))]
    image, text, answer, candidates = KINDS[kind](rng)
    return image, text, _fmt(answer), _choices(answer, candidates, rng), kind


def geo3k_like(n: int, seed: int, media_dir: Path) -> list[Sample]:
    """n Geo3K-like samples; diagrams are written to media_dir as PNG."""
    media_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        image, text, answer, choices, kind = problem(seed, i)
        sid = f"geo3k_like-{seed}-{i}"
        image.save(media_dir / f"{sid}.png")
        samples.append(Sample.from_dict({
            "id": sid, "source": "synthetic:geo3k_like",
            "messages": [{"role": "user", "content": [
                {"type": "image", "image": f"media/{sid}.png"},
                {"type": "text", "text": f"{text}\n{DEFAULT_INSTRUCTION}"}]}],
            "answer": answer, "choices": choices, "meta": {"kind": kind, "seed": seed, "index": i}}))
    return samples


def geo3k_rows(n: int, seed: int = 0) -> list[dict]:
    """n problems as rows of the `hiyouga/geometry3k` table (image bytes inline, PNG)."""
    rows = []
    for i in range(n):
        image, text, answer, choices, _ = problem(seed, i)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        rows.append({"images": [{"bytes": buf.getvalue(), "path": None}], "problem": f"<image>{text}",
                     "answer": answer, "id": str(i), "choices": choices,
                     "ground_truth": LETTERS[choices.index(answer)]})
    return rows


def write_geo3k_parquet(rows: list[dict], path: Path) -> Path:
    """Write rows as a parquet file with the column types and metadata the hub's files have."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("images", pa.list_(image)), ("problem", pa.string()), ("answer", pa.string()),
                        ("id", pa.string()), ("choices", pa.list_(pa.string())),
                        ("ground_truth", pa.string())])
    features = {"images": {"feature": {"_type": "Image"}, "_type": "List"},
                **{k: {"dtype": "string", "_type": "Value"} for k in ("problem", "answer", "id", "ground_truth")},
                "choices": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"}}
    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path
