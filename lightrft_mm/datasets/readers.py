"""Tables of source rows: jsonl, json, parquet, csv and `datasets.save_to_disk` folders.

A `Table` yields `RawRow`s (a dict per row, numbered across all its files) without loading the
whole source: parquet and Arrow files are read a record batch at a time. The `datasets`
library is not needed to read a `save_to_disk` folder: its Arrow stream files are read directly.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lightrft_mm.errors import DataError

FORMATS = ("jsonl", "json", "parquet", "csv", "arrow")
_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
           ".csv": "csv", ".arrow": "arrow"}
_BATCH_ROWS = 256
_ESCAPED = re.compile("[\udc80-\udcff]")  # undecodable bytes, as errors="surrogateescape" keeps them


@dataclass
class RawRow:
    """One source row.

    Attributes:
        index: 0-based number of the row across the whole source (the reject file's ``row``).
        where: File and row inside it, for messages (``train-00000.parquet row 17``).
        data: The row as a dict, or None when it could not be parsed.
        error: Why it could not be parsed (a jsonl line that is not JSON).
        reason: The reject reason of a row that could not be parsed: ``bad_json``, or
            ``bad_encoding`` for bytes that are not UTF-8.
    """

    index: int
    where: str
    data: dict | None
    error: str | None = None
    reason: str = "bad_json"


@dataclass
class Table:
    """Rows of one format spread over one or more files (read in the order given)."""

    fmt: str
    files: list[Path]
    total: int | None = None
    root: Path = field(default_factory=Path.cwd)

    def rows(self) -> Iterator[RawRow]:
        """Yields every row of every file, numbered from 0."""
        index = 0
        for f in self.files:
            for where, data, error, *reason in _READERS[self.fmt](f):
                yield RawRow(index, where, data, error, *reason)
                index += 1

    def fingerprint(self) -> str:
        """sha256 of the files' names and bytes: changes whenever the source does."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return "sha256:" + h.hexdigest()


def open_table(path: str | Path, *, split: str | None = None) -> Table:
    """The Table at ``path``: a file, a folder of parquet files, or a save_to_disk folder.

    Args:
        path: A ``.jsonl``/``.json``/``.parquet``/``.csv``/``.arrow`` file; a folder of parquet
            files as the Hugging Face hub serves them (``data/train-00000-of-00001.parquet``);
            or a ``datasets.save_to_disk`` folder (of a Dataset or of a DatasetDict).
        split: Which split of a folder to read (parquet files named ``<split>-*.parquet`` or
            under a ``<split>/`` folder; a DatasetDict's split). Ignored for a single file.

    Raises:
        DataError: A missing path, an unknown format, or a split the folder does not have.
    """
    p = Path(path).expanduser()
    if p.is_file():
        fmt = _SUFFIX.get(p.suffix.lower())
        if fmt is None:
            raise DataError(f"{p}: unknown table format {p.suffix!r}. Fix: use one of "
                            f"{', '.join(sorted(_SUFFIX))}, or a save_to_disk / parquet folder.")
        return _with_total(Table(fmt, [p], root=p.parent))
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return _with_total(Table("arrow", _save_to_disk_files(p, split), root=p))
        return _with_total(Table("parquet", _parquet_files(p, split), root=p))
    raise DataError(f"{p}: no such file or folder. Fix: check the path (relative paths are taken "
                    f"from {Path.cwd()}).")


def _save_to_disk_files(folder: Path, split: str | None) -> list[Path]:
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        chosen = split or ("train" if "train" in splits else (splits[0] if len(splits) == 1 else None))
        if chosen not in splits:
            raise DataError(f"{folder}: saved DatasetDict has splits {', '.join(splits)}; "
                            f"{'--split ' + repr(split) + ' is not one of them' if split else 'no --split given'}. "
                            f"Fix: pass --split with one of them.")
        folder = folder / chosen
    state = json.loads((folder / "state.json").read_text())
    files = [folder / f["filename"] for f in state.get("_data_files", [])]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"{folder}: state.json names data files that are missing ({files}). "
                        "Fix: save the dataset again with datasets' save_to_disk.")
    return files


def _parquet_files(folder: Path, split: str | None) -> list[Path]:
    every = sorted(folder.rglob("*.parquet"))
    if not every:
        raise DataError(f"{folder}: folder holds no .parquet file, dataset_dict.json or state.json. "
                        "Fix: point at the dataset's parquet files or its save_to_disk folder.")
    if split is None:
        return every
    files = [f for f in every if f.name.startswith(f"{split}-") or f.name.startswith(f"{split}.")
             or f.parent.name == split]
    if not files:
        have = sorted({f.name.split("-")[0].split(".")[0] for f in every} | {f.parent.name for f in every})
        raise DataError(f"{folder}: no parquet file of split {split!r} (named {split}-*.parquet or "
                        f"under {split}/). Splits seen: {', '.join(have)}. Fix: pass --split with one of them.")
    return files


def _with_total(table: Table) -> Table:
    if table.fmt == "parquet":
        import pyarrow.parquet as pq

        table.total = sum(pq.ParquetFile(f).metadata.num_rows for f in table.files)
    return table


def jsonl_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """``(line number, text, None)`` or ``(line number, None, why)`` of each non-blank line.

    The file is read as bytes and each line decoded as UTF-8 on its own (a BOM at the start is
    dropped): a line holding bytes that are not UTF-8 is reported, with the byte's offset in the
    file, and the lines around it are still read. No character is ever replaced.
    """
    offset = 0
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if i == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            try:
                yield i, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield i, None, (f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {start + e.start} "
                                f"of the file (column {e.start + 1} of the line)")


def _jsonl(path: Path) -> Iterator[tuple]:
    for i, line, bad in jsonl_lines(path):
        where = f"{path.name} line {i}"
        if bad is not None:
            yield where, None, bad, "bad_encoding"
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, None, f"not valid JSON ({e.msg} at column {e.colno})"
            continue
        if isinstance(row, dict):
            yield where, row, None
        else:
            yield where, None, f"a row must be a JSON object, got {type(row).__name__}"


def _undecoded(value: Any, at: str = "") -> tuple[str, bytes] | None:
    """``(field, bytes)`` of the first text in ``value`` holding bytes that are not UTF-8.

    Such bytes come from reading with ``errors="surrogateescape"``: each one is kept as a lone
    surrogate (U+DC80..U+DCFF), so it can be found here instead of being replaced.
    """
    if isinstance(value, str):
        found = _ESCAPED.findall(value)
        return (at, bytes(ord(c) - 0xDC00 for c in found)) if found else None
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        name = f"{at}[{key}]" if isinstance(key, int) else f"{at}.{key}" if at else str(key)
        hit = (_undecoded(key, name) if isinstance(key, str) else None) or _undecoded(child, name)
        if hit is not None:
            return hit
    return None


def _encoding_problem(row: Any) -> str | None:
    """Why a row read with surrogate escapes is not UTF-8 text (None when it is)."""
    hit = _undecoded(row)
    if hit is None:
        return None
    at, raw = hit
    return (f"{at or 'a value'} holds bytes that are not UTF-8 ({', '.join(f'0x{b:02x}' for b in raw[:4])}); "
            "the file is not UTF-8 text")


def _json(path: Path) -> Iterator[tuple]:
    try:  # surrogate escapes keep undecodable bytes findable: the rows around them survive
        rows = json.loads(path.read_text(encoding="utf-8-sig", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}). "
                        "Fix: a .json source holds one list of row objects (or use .jsonl).") from None
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if not isinstance(rows, list):
        raise DataError(f"{path}: the top level is a {type(rows).__name__}; a .json source holds a "
                        "list of row objects. Fix: write [{...}, {...}] (or use .jsonl).")
    for i, row in enumerate(rows):
        where = f"{path.name} row {i}"
        bad = _encoding_problem(row)
        if bad is not None:
            yield where, None, bad, "bad_encoding"
        elif isinstance(row, dict):
            yield where, row, None
        else:
            yield where, None, f"a row must be a JSON object, got {type(row).__name__}"


def _csv(path: Path) -> Iterator[tuple]:
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            bad = _encoding_problem(row)
            if bad is not None:
                yield f"{path.name} row {i}", None, bad, "bad_encoding"
            else:
                yield f"{path.name} row {i}", {k: _csv_value(v) for k, v in row.items()}, None


def _csv_value(value: str | None) -> Any:
    """CSV cells are text; a cell holding a JSON list (``["a", "b"]``) becomes that list."""
    if value is None or value == "":
        return None
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return value
    return value


def _parquet(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    import pyarrow.parquet as pq

    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS):
        for row in batch.to_pylist():
            yield f"{path.name} row {i}", row, None
            i += 1


def _arrow(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    import pyarrow as pa

    i = 0
    with pa.memory_map(str(path)) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:  # the file (random access) format
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(k) for k in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path.parent.name}/{path.name} row {i}", row, None
                i += 1


_READERS = {"jsonl": _jsonl, "json": _json, "parquet": _parquet, "csv": _csv, "arrow": _arrow}
