"""`lightrft-mm view RUN`: one static HTML folder of a run's saved trajectories.

The trainer writes ``<RUN>/trajectories/step-<step:06d>.jsonl`` every ``logging.trajectories_every``
steps, one JSON line per prompt group (prompt, media paths, answer, and every completion with its
tokens, log-probs, entropies, rewards and advantage). The page is rendered here, in Python, with
every piece of text escaped (completions are model output); its small inline script only hides
and shows groups for the filters, so the page reads the same with scripts off.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from lightrft_mm.errors import DataError
from lightrft_mm.trainer.metrics import read_rows
from lightrft_mm.view.page import CSS, JS

COPY_LIMIT = 2 * 1024 * 1024  # media up to this size are copied into the view; larger ones linked
_TAGS = {"image": "img", "video": "video", "audio": "audio"}
_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)")


def read_trajectories(run: Path, last: int | None = None) -> list[dict]:
    """The prompt groups of a run's trajectory files, by step then group.

    Args:
        run: the run folder (holding ``trajectories/step-*.jsonl``).
        last: keep only the last ``last`` saved steps; None keeps them all.

    Raises:
        DataError: the run has no trajectory files, or a line other than a file's last is not a
            JSON object with an integer ``step`` and a ``completions`` list.
    """
    files = sorted((Path(run) / "trajectories").glob("step-*.jsonl"))
    if not files:
        raise DataError(f"{run}: no trajectory files ({Path(run) / 'trajectories' / 'step-*.jsonl'}); the trainer "
                        "writes them when logging.trajectories_every=N is set (every N steps), e.g. "
                        "`lightrft-mm train CONFIG logging.trajectories_every=10`")
    groups = []
    for path in files[-last:] if last else files:
        try:
            rows = list(read_rows(path))
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        for number, line, record in rows:
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)
                    and isinstance(record.get("completions"), list)):
                raise DataError(f"{path}:{number}: a trajectory line is a JSON object with an integer 'step' and a "
                                f"'completions' list, got {line[:80]!r}")
            groups.append(record)
    groups.sort(key=lambda g: (g["step"], g.get("group", 0)))
    return groups


class MediaPlacer:
    """Where the page finds each media file: copied into ``<view>/media/`` when small, else linked.

    Copies are deduplicated by the file's absolute path. A link is the relative path from the view
    folder (so the folder and the run can move together), or a ``file://`` URL where none exists.
    """

    def __init__(self, view_dir: Path, limit: int = COPY_LIMIT):
        self.view_dir, self.limit = Path(view_dir), limit
        self.placed: dict[str, str] = {}
        self.copied = self.linked = 0

    def href(self, path: str) -> str | None:
        """The URL of ``path`` relative to the page, or None when the file is missing."""
        if _URL.match(path):  # a remote or data: URL stays as the dataset gave it
            return path
        source = Path(path).absolute()
        key = str(source)
        if key not in self.placed:
            if not source.is_file():
                return None
            if source.stat().st_size <= self.limit:
                name = f"{hashlib.sha1(key.encode()).hexdigest()[:10]}-{source.name}"
                (self.view_dir / "media").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, self.view_dir / "media" / name)
                self.placed[key] = "media/" + quote(name)
                self.copied += 1
            else:
                try:
                    self.placed[key] = quote(Path(os.path.relpath(source, self.view_dir)).as_posix())
                except ValueError:  # another drive: no relative path
                    self.placed[key] = source.as_uri()
                self.linked += 1
        return self.placed[key]


def build_view(run: Path, out: Path | None = None, last: int | None = None,
               copy_limit: int = COPY_LIMIT) -> Path:
    """Write the run's trajectory viewer to ``out`` (default ``<run>/view``).

    Args:
        run: the run folder.
        out: the view folder; created, and its ``index.html`` and ``media/`` replaced.
        last: show only the last ``last`` saved steps.
        copy_limit: media files up to this many bytes are copied into the view, larger ones linked.

    Returns:
        The path of ``index.html``.

    Raises:
        DataError: no trajectory files, or a malformed one.
    """
    run = Path(run)
    out = Path(out) if out is not None else run / "view"
    groups = read_trajectories(run, last)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "media", ignore_errors=True)
    media = MediaPlacer(out, copy_limit)
    entropy_ref = _entropy_scale(groups)
    sections = [_group_html(g, media, entropy_ref) for g in groups]
    head = _header_html(run, out, groups, entropy_ref)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(run.name)} · trajectories</title><style>{CSS}</style></head>\n<body>\n{head}\n"
            f"<main>\n{''.join(sections)}</main>\n<script>{JS}</script>\n</body></html>\n")
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, index)
    return index


def _e(text: object) -> str:
    """Escaped text, with control characters (model output holds them) written as ``\\x1f``."""
    s = "".join(f"\\x{ord(c):02x}" if (ord(c) < 32 and c not in "\n\t") or c == "\x7f" else c for c in str(text))
    return html.escape(s, quote=True)


def _num(value: object, signed: bool = False) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—" if value is None else _e(value)
    return f"{value:+.3g}" if signed and value != 0 else f"{value:.3g}"


def _entropy_scale(groups: Sequence[dict]) -> float:
    """The entropy drawn at full colour: the 95th percentile of every token's (outliers saturate)."""
    values = sorted(h for g in groups for c in g["completions"] for h in c.get("entropy") or []
                    if isinstance(h, (int, float)) and math.isfinite(h))
    return max(values[int(0.95 * (len(values) - 1))], 1e-6) if values else 1.0


def _header_html(run: Path, out: Path, groups: Sequence[dict], entropy_ref: float) -> str:
    parts = [f"<header class=\"top\"><h1>{_e(run.name)}: trajectories</h1>"]
    summary_path = run / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            summary = {}
        items = [f"<span><b>{_e(k)}</b> {_num(v) if isinstance(v, (int, float)) else _e(v)}</span>"
                 for k, v in (summary.items() if isinstance(summary, dict) else [])
                 if isinstance(v, (int, float, str)) and len(str(v)) <= 120]
        parts.append(f"<div class=\"summary\" id=\"summary\">{''.join(items)}</div>")
    if (run / "curves.png").is_file():
        shutil.copyfile(run / "curves.png", out / "curves.png")
        parts.append("<details><summary>curves</summary><img class=\"curves\" src=\"curves.png\" "
                     "alt=\"training curves\"></details>")
    parts.append("</header>")
    steps = sorted({g["step"] for g in groups})
    sources = sorted({str(g.get("source", "")) for g in groups})
    step_opts = "".join(f"<option value=\"{s}\">{s}</option>" for s in steps)
    source_opts = "".join(f"<option value=\"{_e(s)}\">{_e(s)}</option>" for s in sources)
    parts.append(
        "<div class=\"filters\">"
        f"<label>step <select id=\"f-step\"><option value=\"\">all</option>{step_opts}</select></label>"
        f"<label>source <select id=\"f-source\"><option value=\"\">all</option>{source_opts}</select></label>"
        "<label>reward ≥ <input id=\"f-min\" type=\"number\" step=\"any\"></label>"
        "<label>reward ≤ <input id=\"f-max\" type=\"number\" step=\"any\"></label>"
        f"<span id=\"f-count\">{len(groups)} groups</span>"
        "<span class=\"legend\">token entropy 0 <span class=\"bar\"></span> "
        f"{entropy_ref:.3g} nats (and above); hover a token for its log-prob</span></div>")
    return "".join(parts)


def _media_html(item: dict, media: MediaPlacer) -> str:
    kind, path = item.get("type"), str(item.get("path", ""))
    href = media.href(path) if path else None
    if href is None:
        return f"<div class=\"missing\">{_e(kind)} missing: {_e(path)}</div>"
    tag = _TAGS.get(kind)
    if tag == "img":
        body = f"<img src=\"{_e(href)}\" alt=\"{_e(Path(path).name)}\" loading=\"lazy\">"
    elif tag:
        body = f"<{tag} controls preload=\"metadata\" src=\"{_e(href)}\"></{tag}>"
    else:
        body = f"<a href=\"{_e(href)}\">{_e(kind)}: {_e(Path(path).name)}</a>"
    return f"<figure>{body}<figcaption class=\"where\">{_e(Path(path).name)}</figcaption></figure>"


def _tokens_html(completion: dict, entropy_ref: float) -> str:
    tokens = completion.get("tokens") or []
    logps, entropy = completion.get("logps") or [], completion.get("entropy") or []
    spans = []
    for i, token in enumerate(tokens):
        h = entropy[i] if i < len(entropy) and isinstance(entropy[i], (int, float)) else None
        lp = logps[i] if i < len(logps) and isinstance(logps[i], (int, float)) else None
        shade = 0.0 if h is None or not math.isfinite(h) else min(max(h / entropy_ref, 0.0), 1.0)
        title = f"log-prob {_num(lp)}" + (f" (p {math.exp(lp):.3g})" if lp is not None and math.isfinite(lp)
                                          else "") + f" · entropy {_num(h)}"
        spans.append(f"<span class=\"tok\" style=\"background:rgba(230,60,30,{0.85 * shade:.2f})\" "
                     f"title=\"{title}\">{_e(token)}</span>")
    return "".join(spans)


def _group_html(group: dict, media: MediaPlacer, entropy_ref: float) -> str:
    completions = group["completions"]
    names = list(dict.fromkeys(n for c in completions for n in (c.get("rewards") or {})))
    head_cells = "".join(f"<th>{_e(n)}</th>" for n in names)
    rows = []
    for i, c in enumerate(completions):
        reward, adv = c.get("reward"), c.get("advantage")
        scores = "".join(f"<td class=\"num\">{_num((c.get('rewards') or {}).get(n))}</td>" for n in names)
        sign = " pos" if isinstance(adv, (int, float)) and adv > 0 else " neg" if isinstance(adv, (int, float)) \
            and adv < 0 else ""
        text = c.get("text", "")
        tokens = _tokens_html(c, entropy_ref)
        rows.append(
            f"<tr class=\"completion\" data-reward=\"{'' if not isinstance(reward, (int, float)) else reward}\">"
            f"<td class=\"num\">{i}</td><td class=\"num reward\">{_num(reward)}</td>{scores}"
            f"<td class=\"num advantage{sign}\">{_num(adv, signed=True)}</td>"
            f"<td><pre class=\"text\">{_e(text) if text else '<span class=empty>(empty)</span>'}</pre>"
            + (f"<div class=\"tokens\">{tokens}</div>" if tokens else "") + "</td></tr>")
    media_html = "".join(_media_html(m, media) for m in group.get("media") or [] if isinstance(m, dict))
    answer = group.get("answer")
    source = str(group.get("source", ""))
    return (
        f"<section class=\"group\" data-step=\"{group['step']}\" data-source=\"{_e(source)}\">"
        f"<h2>step {group['step']} · group {_e(group.get('group', ''))} · <span class=\"source\">{_e(source)}"
        f"</span> · {_e(group.get('sample_id', ''))}</h2>"
        f"<div class=\"body\"><div class=\"media\">{media_html}</div><div class=\"prompt\">"
        f"<b>prompt</b><pre>{_e(group.get('prompt', ''))}</pre>"
        f"<b>answer</b><pre class=\"answer\">{'—' if answer is None else _e(answer)}</pre></div></div>"
        f"<table class=\"completions\"><tr><th>#</th><th>reward</th>{head_cells}<th>advantage</th>"
        f"<th>completion (tokens coloured by entropy)</th></tr>{''.join(rows)}</table></section>\n")
