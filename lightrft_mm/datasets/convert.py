"""Row converters: one source row -> a unified sample dict plus the media it needs written.

Three generic layouts (``--layout``; ``auto`` picks per row):

- ``fields``: flat columns mapped with ``--map prompt=question --map image=img --map answer=label``
  (targets: prompt, system, image, video, audio, answer, choices, id). Unmapped targets use the
  column of the same name (``images``/``videos``/``audios`` too).
- ``llava``: LLaVA-style ``conversations`` (``from``: human/gpt/system, ``value`` with
  ``<image>`` tokens) plus ``image``/``images`` (and ``video``) columns.
- ``chat``: ``messages`` with ``role`` and ``content``; content is a string with ``<image>``
  tokens (media from the ``images``/``videos``/``audios`` columns) or a list of parts (unified
  parts, Hugging Face ``{"type": "image"}`` slots filled from ``images``, OpenAI
  ``image_url``). Rows already in the unified schema are this layout.

In ``llava`` and ``chat`` a final assistant turn is the answer (unless an ``answer`` column is
given). Converters raise `Reject` with a reason code, the offending field and the fix.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightrft_mm.datasets.media import MediaItem, media_from_value
from lightrft_mm.datasets.readers import RawRow
from lightrft_mm.errors import MediaError
from lightrft_mm.schema import MEDIA_TYPES

LAYOUTS = ("auto", "fields", "llava", "chat")
TARGETS = ("prompt", "system", "image", "video", "audio", "answer", "choices", "id")
PLACEHOLDER = re.compile(r"<(image|video|audio)>")
SLOT = "\x00media:{}"  # the path of a media part until prepare names its file
_DEFAULT_COLUMNS = {"prompt": ("prompt",), "system": ("system",), "image": ("image", "images"),
                    "video": ("video", "videos"), "audio": ("audio", "audios"),
                    "answer": ("answer",), "choices": ("choices",), "id": ("id",)}
_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "system": "system"}
_PART_EXTRAS = ("fps", "max_frames", "start", "end")


class Reject(Exception):
    """A row that cannot become a Sample: reason code, offending field, and a message with the fix."""

    def __init__(self, reason: str, field: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.field, self.message = reason, field, message


@dataclass
class Converted:
    """A converted row: the sample dict (media paths are `SLOT`s) and its media, in slot order."""

    row: dict
    media: list[MediaItem] = field(default_factory=list)


def media_part(kind: str, media: list[MediaItem], item: MediaItem, extras: dict | None = None) -> dict:
    """A media part whose path is the slot of ``item`` (appended to ``media``)."""
    media.append(item)
    return {"type": kind, kind: SLOT.format(len(media) - 1), **(extras or {})}


def place_media(text: str, items: list[MediaItem], media: list[MediaItem], *, where: str,
                auto: bool) -> list[dict]:
    """Split ``text`` at ``<image>``/``<video>``/``<audio>`` tokens and put ``items`` there, in order.

    Args:
        text: Text with placeholder tokens.
        items: The media of the text, any kinds, in order of appearance per kind.
        media: The row's media list; placed items are appended (their slots index it).
        where: The field the text came from, for messages.
        auto: With no placeholder at all, put every item before the text (instead of rejecting).

    Raises:
        Reject: ``placeholder_mismatch`` when a kind's token count differs from its item count.
    """
    tokens = PLACEHOLDER.findall(text)
    if not tokens and auto:
        return [media_part(i.kind, media, i) for i in items] + _text_parts(text)
    queues = {k: [i for i in items if i.kind == k] for k in MEDIA_TYPES}
    for kind in MEDIA_TYPES:
        if tokens.count(kind) != len(queues[kind]):
            raise Reject("placeholder_mismatch", where,
                         f"{where}: {tokens.count(kind)} <{kind}> placeholder(s) but "
                         f"{len(queues[kind])} {kind}(s). Fix: make them equal, or drop the row.")
    parts: list[dict] = []
    pieces = PLACEHOLDER.split(text)  # text, kind, text, kind, ..., text
    for i, piece in enumerate(pieces):
        if i % 2:
            parts.append(media_part(piece, media, queues[piece].pop(0)))
        else:
            parts.extend(_text_parts(piece))
    return parts


def _text_parts(text: str) -> list[dict]:
    text = text.strip()
    return [{"type": "text", "text": text}] if text else []


def media_of(value: Any, kind: str, field_name: str, root: Path | None,
             in_place_root: str | None = None) -> list[MediaItem]:
    """`media_from_value`, with a bad value turned into a ``media_value`` Reject."""
    try:
        items = media_from_value(value, kind, field_name, root)
    except MediaError as e:
        raise Reject("media_value", field_name, str(e)) from None
    if in_place_root:
        for item in items:
            if item.path and item.path.startswith(in_place_root + os.sep):
                item.in_place = True
    return items


def text_of(value: Any, field_name: str, *, required: bool) -> str | None:
    """A text cell (None when absent and not required)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise Reject("missing_field", field_name, f"{field_name}: missing or empty. Fix: fill it, "
                         f"or map another column with --map.")
        return None
    if not isinstance(value, str):
        raise Reject("bad_value", field_name, f"{field_name}: expected text, got "
                     f"{type(value).__name__} {str(value)[:60]!r}. Fix: map a text column.")
    return value


def choices_of(value: Any, field_name: str) -> list | None:
    """A list of choices; a JSON list in a string (CSV) is parsed."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, (list, tuple)):
        raise Reject("bad_value", field_name, f"{field_name}: choices must be a list (or a JSON list "
                     "in text). Fix: map a list column, or drop it from --map.")
    return list(value)


def row_id(value: Any, prefix: str, index: int) -> str:
    """The row's own id (as text) or ``<prefix>-<index>``."""
    if value is None or value == "":
        return f"{prefix}-{index}"
    return str(value)


@dataclass
class FieldsConverter:
    """Flat columns -> one user turn (see the module doc); picklable for worker processes."""

    mapping: dict
    root: str | None = None
    source: str = "default"
    id_prefix: str = "row"

    def column(self, target: str, row: dict) -> str | None:
        """The column that feeds ``target`` in this row (explicit mapping, else the default)."""
        if target in self.mapping:
            return self.mapping[target]
        return next((c for c in _DEFAULT_COLUMNS[target] if c in row), None)

    def __call__(self, raw: RawRow) -> Converted:
        row = raw.data
        cols = {t: self.column(t, row) for t in TARGETS}
        get = lambda t: row.get(cols[t]) if cols[t] else None  # noqa: E731
        if cols["prompt"] is None or cols["prompt"] not in row:
            raise Reject("missing_field", cols["prompt"] or "prompt",
                         f"no prompt column{' ' + repr(cols['prompt']) if cols['prompt'] else ''} in "
                         f"this row (columns: {', '.join(map(str, row))}). Fix: --map prompt=<column>.")
        prompt = text_of(get("prompt"), cols["prompt"], required=True)
        root = Path(self.root) if self.root else None
        items = [i for k in MEDIA_TYPES if cols[k] for i in media_of(get(k), k, cols[k], root)]
        media: list[MediaItem] = []
        messages = []
        system = text_of(get("system"), cols["system"] or "system", required=False)
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        content = place_media(prompt, items, media, where=cols["prompt"], auto=True)
        messages.append({"role": "user", "content": content})
        out = {"id": row_id(get("id"), self.id_prefix, raw.index), "source": self.source,
               "messages": messages, "meta": {"row": raw.index}}
        if get("answer") is not None:
            out["answer"] = get("answer")
        choices = choices_of(get("choices"), cols["choices"] or "choices")
        if choices is not None:
            out["choices"] = choices
        return Converted(out, media)


@dataclass
class LlavaConverter:
    """LLaVA ``conversations`` rows; the final gpt turn is the answer."""

    root: str | None = None
    source: str = "default"
    id_prefix: str = "row"

    def __call__(self, raw: RawRow) -> Converted:
        row = raw.data
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise Reject("missing_field", "conversations", "conversations: missing or not a non-empty "
                         "list of {from, value}. Fix: use --layout fields or chat for this source.")
        root = Path(self.root) if self.root else None
        items = [i for kind in MEDIA_TYPES for col in (kind, kind + "s") if row.get(col) is not None
                 for i in media_of(row[col], kind, col, root)]
        messages = []
        for k, turn in enumerate(turns):
            where = f"conversations[{k}]"
            role = _LLAVA_ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
            if role is None:
                raise Reject("bad_value", f"{where}.from", f"{where}.from: {turn!r} is not human, gpt "
                             "or system. Fix: correct the turn, or drop the row.")
            messages.append({"role": role, "value": text_of(turn.get("value"), f"{where}.value",
                                                            required=True)})
        answer = row.get("answer")
        if answer is None and messages[-1]["role"] == "assistant":
            answer = messages.pop()["value"]
        return _chat_from_strings(messages, items, answer, row, raw, self.source, self.id_prefix)


def _chat_from_strings(messages: list[dict], items: list[MediaItem], answer: Any, row: dict,
                       raw: RawRow, source: str, id_prefix: str) -> Converted:
    """Turns of plain text with placeholder tokens -> a unified row (media placed per token)."""
    media: list[MediaItem] = []
    every = "".join(m["value"] for m in messages)
    if items and not PLACEHOLDER.search(every):  # no tokens: the media lead the first user turn
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise Reject("placeholder_mismatch", "messages", "the row has media but no user turn "
                         "to put them in. Fix: add a user turn, or drop the row.")
        tokens = "".join(f"<{i.kind}>" for i in items)
        first["value"] = tokens + first["value"]
    queue = list(items)
    out_messages = []
    for k, m in enumerate(messages):
        kinds = PLACEHOLDER.findall(m["value"])
        mine = []
        for kind in kinds:
            take = next((i for i in queue if i.kind == kind), None)
            if take is None:
                raise Reject("placeholder_mismatch", f"messages[{k}]", f"messages[{k}]: more <{kind}> "
                             f"placeholders than {kind}s in the row. Fix: make them equal, or drop the row.")
            queue.remove(take)
            mine.append(take)
        content = place_media(m["value"], mine, media, where=f"messages[{k}]", auto=False)
        out_messages.append({"role": m["role"], "content": content or [{"type": "text", "text": ""}]})
    if queue:
        raise Reject("placeholder_mismatch", queue[0].field, f"{len(queue)} {queue[0].kind}(s) of the "
                     "row have no placeholder in the turns. Fix: make them equal, or drop the row.")
    return Converted(_finish(out_messages, answer, row, raw, source, id_prefix), media)


def _finish(messages: list[dict], answer: Any, row: dict, raw: RawRow, source: str, id_prefix: str) -> dict:
    out = {"id": row_id(row.get("id"), id_prefix, raw.index), "source": row.get("source") or source,
           "messages": messages}
    if answer is not None:
        out["answer"] = answer
    choices = choices_of(row.get("choices"), "choices")
    if choices is not None:
        out["choices"] = choices
    meta = row.get("meta")
    out["meta"] = dict(meta) if isinstance(meta, dict) else {"row": raw.index}
    return out


@dataclass
class ChatConverter:
    """``messages`` rows (text with tokens, or lists of parts), unified rows included."""

    root: str | None = None
    source: str = "default"
    id_prefix: str = "row"
    in_place_root: str | None = None

    def __call__(self, raw: RawRow) -> Converted:
        row = raw.data
        raw_messages = row.get("messages")
        if not isinstance(raw_messages, list) or not raw_messages:
            raise Reject("missing_field", "messages", "messages: missing or not a non-empty list of "
                         "{role, content}. Fix: use --layout fields or llava for this source.")
        root = Path(self.root) if self.root else None
        pools = {}
        for kind in MEDIA_TYPES:  # a top-level `images` (or `image`) column feeds the slots
            col = kind + "s" if row.get(kind + "s") is not None else kind
            pools[kind] = media_of(row.get(col), kind, col, root, self.in_place_root)
        if all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in raw_messages):
            turns = [{"role": m.get("role"), "value": m["content"]} for m in raw_messages]
            answer = row.get("answer")
            if answer is None and turns[-1]["role"] == "assistant":
                answer = turns.pop()["value"]
            return _chat_from_strings(turns, [i for k in MEDIA_TYPES for i in pools[k]], answer,
                                      row, raw, self.source, self.id_prefix)
        return self._from_parts(raw_messages, pools, row, raw, root)

    def _from_parts(self, raw_messages: list, pools: dict, row: dict, raw: RawRow, root) -> Converted:
        media: list[MediaItem] = []
        messages = []
        for k, m in enumerate(raw_messages):
            if not isinstance(m, dict):
                raise Reject("schema", f"messages[{k}]", f"messages[{k}]: {m!r} is not an object with "
                             "role and content. Fix: correct the row, or drop it.")
            content = m.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise Reject("schema", f"messages[{k}].content", f"messages[{k}].content: expected a "
                             "string or a list of parts. Fix: correct the row, or drop it.")
            parts = [self._part(p, f"messages[{k}].content[{j}]", pools, media, root)
                     for j, p in enumerate(content)]
            messages.append({"role": m.get("role"), "content": parts})
        left = [i for k in MEDIA_TYPES for i in pools[k]]
        if left:
            raise Reject("placeholder_mismatch", left[0].field, f"{len(left)} media item(s) of the row "
                         "have no part in the messages. Fix: make them equal, or drop the row.")
        answer = row.get("answer")
        if answer is None and messages[-1]["role"] == "assistant":
            answer = " ".join(p.get("text", "") for p in messages.pop()["content"] if p.get("type") == "text")
        return Converted(_finish(messages, answer, row, raw, self.source, self.id_prefix), media)

    def _part(self, part: Any, where: str, pools: dict, media: list[MediaItem], root) -> Any:
        if not isinstance(part, dict):
            return part  # the schema check names it
        kind = part.get("type")
        if kind == "image_url":  # OpenAI style
            url = part.get("image_url")
            kind, part = "image", {"type": "image", "image": url.get("url") if isinstance(url, dict) else url}
        if kind not in MEDIA_TYPES:
            return part
        extras = {k: part[k] for k in _PART_EXTRAS if part.get(k) is not None}
        value = part.get(kind)
        if value is None:  # a Hugging Face style slot: take the next item of the column
            if not pools[kind]:
                raise Reject("placeholder_mismatch", where, f"{where}: a {kind} part without a path, "
                             f"and no {kind}s left in the row's {kind}s column. Fix: make them equal.")
            return media_part(kind, media, pools[kind].pop(0), extras)
        (item,) = media_of(value, kind, where, root, self.in_place_root)
        return media_part(kind, media, item, extras)


@dataclass
class AutoConverter:
    """Picks the layout per row: ``conversations`` -> llava, ``messages`` -> chat, else fields."""

    fields: FieldsConverter
    llava: LlavaConverter
    chat: ChatConverter
    layout: str = "auto"

    def __call__(self, raw: RawRow) -> Converted:
        layout = self.layout
        if layout == "auto":
            layout = ("llava" if "conversations" in raw.data else
                      "chat" if "messages" in raw.data else "fields")
        return getattr(self, layout)(raw)
