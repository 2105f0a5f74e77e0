"""The unified sample schema (docs/schema.md): Sample, Message, Part and JSONL shards.

Media paths in a shard are relative to the shard's folder; ``resolve_media`` makes them absolute.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image", "video", "audio")
MEDIA_TYPES = ("image", "video", "audio")
SAMPLE_KEYS = ("id", "source", "messages", "answer", "choices", "meta")
MESSAGE_KEYS = ("role", "content")
PART_KEYS = ("type", "text", "image", "video", "audio", "fps", "max_frames", "start", "end")
# The optional timing keys each part type accepts.
_TIMING_KEYS = {"text": (), "image": (), "video": ("fps", "max_frames", "start", "end"),
                "audio": ("start", "end")}
# key -> (the fix, the check of a number), for the optional timing keys.
_TIMING_RULES = {"fps": ("a number of frames per second > 0", lambda v: v > 0),
                 "max_frames": ("a whole number > 0", lambda v: isinstance(v, int) and v > 0),
                 "start": ("a time in seconds >= 0", lambda v: v >= 0),
                 "end": ("a time in seconds >= 0", lambda v: v >= 0)}
_URL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*://|data:)")


@dataclass
class Part:
    """Text, or the path of an image, video or audio file; ``fps``, ``max_frames`` (video),
    ``start`` and ``end`` in seconds (video, audio) are optional sampling hints."""

    type: str
    text: str | None = None
    image: str | None = None
    video: str | None = None
    audio: str | None = None
    fps: float | None = None
    max_frames: int | None = None
    start: float | None = None
    end: float | None = None

    @property
    def path(self) -> str | None:
        """The media path of a media part (``None`` for text)."""
        return getattr(self, self.type) if self.type in MEDIA_TYPES else None

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON form, without the fields that are ``None``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Message:
    """One chat turn: a role (system, user, assistant) and its parts."""

    role: str
    content: list[Part]


@dataclass
class Sample:
    """One example; ``answer``, ``choices`` and ``meta`` are handed to rewards untouched."""

    id: str
    messages: list[Message]
    source: str = "default"
    answer: Any = None
    choices: list | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, *, where: str = "") -> Sample:
        """Validates a decoded JSON row and builds the Sample.

        Args:
            d: The decoded row.
            where: Where the row came from (``"shard-0.jsonl row 17"``); prefixes every error.

        Raises:
            DataError: Listing every problem of the row with its field path, value and fix.
        """
        prefix = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise DataError(f"{prefix}a sample must be a JSON object, got {type(d).__name__} "
                            f"{_short(d)}; write one object per line (see DESIGN.md section 3)")
        problems: list[str] = []
        _unknown_keys(d, SAMPLE_KEYS, "", problems)
        sample_id = d.get("id")
        named = f"sample {sample_id!r}" if isinstance(sample_id, str) and sample_id else "sample"
        if named == "sample":
            problems.append(_problem("id", sample_id, "use a non-empty string id", "id" in d))
        source = "default" if d.get("source") is None else d["source"]
        if not isinstance(source, str) or not source:
            problems.append(_problem("source", source, "use a non-empty string such as \"geo3k\""))
        messages = _parse_messages(d.get("messages"), "messages" in d, problems)
        choices = d.get("choices")
        if choices is not None and not isinstance(choices, list):
            problems.append(_problem("choices", choices, "use a list like [\"A\", \"B\"] or null"))
        meta = d.get("meta")
        if meta is not None and not isinstance(meta, dict):
            problems.append(_problem("meta", meta, "use an object like {\"split\": 1}"))
        if problems:
            plural = "s" if len(problems) > 1 else ""
            raise DataError(f"{prefix}{named} has {len(problems)} problem{plural}:\n"
                            + "\n".join(f"  - {p}" for p in problems))
        return cls(id=sample_id, messages=messages, source=source, answer=d.get("answer"),
                   choices=list(choices) if choices is not None else None, meta=dict(meta or {}))

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON form (``from_dict(s.to_dict()) == s``).

        Content is always a list of parts; ``answer`` and ``choices`` are left out when ``None``.
        """
        d: dict[str, Any] = {"id": self.id, "source": self.source, "messages": [
            {"role": m.role, "content": [p.to_dict() for p in m.content]} for m in self.messages]}
        if self.answer is not None:
            d["answer"] = copy.deepcopy(self.answer)
        if self.choices is not None:
            d["choices"] = copy.deepcopy(self.choices)
        d["meta"] = copy.deepcopy(self.meta)
        return d

    def media(self, kind: str | None = None) -> list[Part]:
        """Returns the media parts (of one ``kind``: image, video or audio) in message order."""
        if kind is not None and kind not in MEDIA_TYPES:
            raise ValueError(f"media kind must be one of {', '.join(MEDIA_TYPES)} or None, "
                             f"got {kind!r}")
        return [p for m in self.messages for p in m.content
                if p.type in MEDIA_TYPES and (kind is None or p.type == kind)]

    def prompt_text(self) -> str:
        """Returns the text of the user turns, parts joined by newlines."""
        return "\n".join(p.text for m in self.messages if m.role == "user"
                         for p in m.content if p.type == "text" and p.text is not None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problem(path: str, value: Any, fix: str, present: bool = True) -> str:
    got = f"got {_short(value)}" if present else "missing"
    return f"{path}: {got}; {fix}"


def _one_of(value: Any, options: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, options, n=1) if isinstance(value, str) else []
    return f"use one of {', '.join(options)}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _unknown_keys(d: dict, known: tuple[str, ...], path: str, problems: list[str]) -> None:
    for key in d:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        where = f"{path}.{key}" if path else str(key)
        problems.append(f"{where}: unknown key {key!r}; {hint}")


def _parse_messages(raw: Any, present: bool, problems: list[str]) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        problems.append(_problem("messages", raw, "give a non-empty list of "
                                 "{\"role\": ..., \"content\": [...]} objects", present))
        return []
    messages = []
    for i, message in enumerate(raw):
        path = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append(_problem(path, message, "use an object with 'role' and 'content'"))
            continue
        _unknown_keys(message, MESSAGE_KEYS, path, problems)
        role = message.get("role")
        if role not in ROLES:
            problems.append(_problem(f"{path}.role", role, _one_of(role, ROLES), "role" in message))
        content = message.get("content")
        if isinstance(content, str):  # shorthand for one text part
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            problems.append(_problem(f"{path}.content", content, "give a string or a non-empty "
                                     "list of parts like {\"type\": \"text\", \"text\": \"...\"}",
                                     "content" in message))
            continue
        parts = [_parse_part(p, f"{path}.content[{j}]", problems) for j, p in enumerate(content)]
        messages.append(Message(role=role, content=[p for p in parts if p is not None]))
    return messages


def _parse_part(raw: Any, path: str, problems: list[str]) -> Part | None:
    if not isinstance(raw, dict):
        problems.append(_problem(path, raw, "a part is an object such as "
                                 "{\"type\": \"text\", \"text\": \"...\"}"))
        return None
    _unknown_keys(raw, PART_KEYS, path, problems)
    # A null value is the same as an absent key (columnar sources write every column).
    values = {k: v for k, v in raw.items() if k in PART_KEYS and v is not None}
    kind = values.get("type")
    if kind not in PART_TYPES:
        guess = next((k for k in PART_TYPES if k in values), None)
        fix = _one_of(kind, PART_TYPES) + (f"; here \"type\": {guess!r}" if guess else "")
        problems.append(_problem(f"{path}.type", kind, fix, "type" in values))
        return None
    before = len(problems)
    body = values.get(kind)
    if not isinstance(body, str) or (kind != "text" and not body):
        fix = ("put the text under the key 'text'" if kind == "text" else
               f"put the {kind} path (relative to the shard folder) or URL under the key {kind!r}")
        problems.append(_problem(f"{path}.{kind}", body, fix, kind in values))
    for other in PART_TYPES:
        if other != kind and other in values:
            problems.append(_problem(f"{path}.{other}", values[other], f"a {kind} part holds no "
                                     f"{other!r}; put it in its own part"))
    _check_timing(values, kind, path, problems)
    if len(problems) > before:
        return None
    return Part(**values)


def _check_timing(values: dict, kind: str, path: str, problems: list[str]) -> None:
    for key, (fix, ok) in _TIMING_RULES.items():
        value = values.get(key)
        if value is None:
            continue
        if key not in _TIMING_KEYS[kind]:
            takers = "video parts" if key in ("fps", "max_frames") else "video and audio parts"
            problems.append(_problem(f"{path}.{key}", value, f"only {takers} take {key!r}"))
        elif not (_is_number(value) and ok(value)):
            problems.append(_problem(f"{path}.{key}", value, f"use {fix}"))
    start, end = values.get("start"), values.get("end")
    if "start" in _TIMING_KEYS[kind] and _is_number(start) and _is_number(end) and start >= end:
        problems.append(f"{path}.start: got start={start!r} >= end={end!r}; make start < end")


def resolve_media(sample: Sample, root: Path) -> Sample:
    """Returns a copy of ``sample`` whose relative media paths are absolute under ``root``.

    ``root`` is the shard's folder. Absolute paths and URLs (``http(s)://``, ``data:``, ...) are
    left as they are; the input sample is not changed.
    """
    root = Path(root).expanduser().absolute()

    def resolved(part: Part) -> Part:
        path = part.path
        if path is None or _URL.match(path) or os.path.isabs(path):
            return part
        return dataclasses.replace(part, **{part.type: str(root / path)})

    messages = [Message(m.role, [resolved(p) for p in m.content]) for m in sample.messages]
    return dataclasses.replace(sample, messages=messages)


def read_jsonl(path: str | os.PathLike) -> Iterator[Sample]:
    """Yields the validated Samples of a JSONL shard, skipping blank lines.

    Raises:
        DataError: Naming the file and 1-based line: a missing file, a line that is not JSON,
            or a row that breaks the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such shard file; check the path (relative paths are taken "
                        f"from {Path.cwd()})")
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {i}: not valid JSON ({exc.msg} at column "
                                f"{exc.colno}); each line must hold one JSON object") from exc
            yield Sample.from_dict(row, where=f"{path} row {i}")


def write_jsonl(samples: Iterable[Sample], path: str | os.PathLike) -> int:
    """Writes Samples as JSONL atomically (a temp file in the same folder, then ``os.replace``).

    Returns:
        The number of samples written.

    Raises:
        DataError: A sample holds a value JSON cannot encode; nothing is written then.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    count = 0
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # "x": never clobber; umask gives the mode
            for sample in samples:
                try:
                    line = json.dumps(sample.to_dict(), ensure_ascii=False)
                except (TypeError, ValueError) as exc:
                    raise DataError(f"{path}: sample {sample.id!r} cannot be written as JSON "
                                    f"({exc}); answer, choices and meta must hold JSON values "
                                    f"(str, number, bool, null, list, object)") from exc
                f.write(line + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count
