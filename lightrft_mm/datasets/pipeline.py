"""The prepare pipeline: source rows -> validated shards, media files, rejects and a manifest.

Every row is converted and checked (schema, media decode, placeholders, answer) in worker
processes; the parent writes the results in source order, so the output does not depend on
the number of workers. The output is built in a hidden sibling folder and renamed into place
at the end: an interrupted run leaves the old output (or nothing) behind, never a half-written
folder with a manifest, and the next run deletes its leftovers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

from lightrft_mm.datasets.convert import SLOT, Reject
from lightrft_mm.datasets.loader import MANIFEST
from lightrft_mm.datasets.media import DEFAULT_MAX_PIXELS, MediaItem, check, outside_root_message
from lightrft_mm.datasets.readers import RawRow
from lightrft_mm.datasets.sources import Source
from lightrft_mm.errors import DataError, MediaError
from lightrft_mm.schema import MEDIA_TYPES, Sample

SCHEMA_VERSION = 1
REJECTS = "rejects.jsonl"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_WINDOW = 512  # rows handed to the worker pool at a time
_UNREADABLE_FIX = {"bad_json": "correct or delete the line.",
                   "bad_encoding": "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT` when "
                                   "it is Latin-1), or correct or delete the row."}


@dataclass
class PrepareOptions:
    """How to prepare (see `lightrft_mm.prepare.build_parser` for each option)."""

    limit: int | None = None
    num_workers: int = 1
    overwrite: bool = False
    shard_size: int = 10_000
    progress: bool | None = None  # None: only when stderr is a terminal
    max_pixels: int = DEFAULT_MAX_PIXELS
    model: str | None = None
    allow_outside_media: bool = False


@dataclass
class Report:
    """What a prepare run did; ``manifest`` is what was written to manifest.json."""

    out: Path
    read: int = 0
    written: int = 0
    rejected: dict = field(default_factory=dict)
    media_files: int = 0
    media_bytes: int = 0
    seconds: float = 0.0
    token_lengths: list = field(default_factory=list)
    manifest: dict = field(default_factory=dict)


def prepare(source: Source, out: str | Path, opts: PrepareOptions) -> Report:
    """Prepare ``source`` into the shard folder ``out``.

    Raises:
        DataError: ``out`` exists and is not replaceable (no ``--overwrite``, or not a prepare
            output); ``out`` is left untouched then. Or no row survived validation: the
            rejects are kept (see `_keep_rejects`) and the message says where.
    """
    out = Path(out)
    check_out(out, opts.overwrite)
    counter = None
    if opts.model:  # before the long part: a bad --model fails at once
        from lightrft_mm.datasets.report import prompt_token_lengths, token_counter_for

        counter = token_counter_for(opts.model)
    clean_leftovers(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        report = Report(out)
        shards = _write(source, tmp, opts, report)
        if report.written == 0:
            message = _nothing_written(source, tmp, report)
            if report.read:
                message += f"\nEvery reject (row, reason, field, fix) is in {_keep_rejects(tmp, out)}."
            raise DataError(message)
        report.seconds = time.perf_counter() - started
        if counter is not None:
            report.token_lengths = prompt_token_lengths(tmp, counter)
        report.manifest = _manifest(source, report, shards)
        write_json_atomic(tmp / MANIFEST, report.manifest)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output that exists, unless it is a prepare output and ``overwrite`` is set."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file. Fix: give a folder path for the shards.")
    if out.is_dir() and any(out.iterdir()) and not _only_rejects(out):
        if not overwrite:
            raise DataError(f"{out} already exists and is not empty. Fix: choose another --out, "
                            "or pass --overwrite to replace it.")
        if not (out / MANIFEST).is_file():
            raise DataError(f"{out} is not a shard folder written by prepare (no {MANIFEST}); "
                            "--overwrite only replaces those. Fix: choose another --out.")


def _only_rejects(out: Path) -> bool:
    """``out`` holds nothing but the rejects of a run that kept no row: the next run replaces it."""
    return [p.name for p in out.iterdir()] == [REJECTS]


def _keep_rejects(tmp: Path, out: Path) -> Path:
    """Move the rejects of a run that kept no row out of ``tmp``; returns where they went.

    Into ``out`` (which then holds only rejects.jsonl; the loader finds no shard there), or,
    when ``out`` is an earlier prepare output, beside it as ``<out>.rejects.jsonl``: that output
    stays untouched.
    """
    if (out / MANIFEST).is_file():
        dest = out.with_name(f"{out.name}.{REJECTS}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        dest = out / REJECTS
    os.replace(tmp / REJECTS, dest)
    return dest


def clean_leftovers(out: Path) -> None:
    """Delete what killed runs into ``out`` left behind (their hidden temporary folders)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name[len(f".{out.name}.tmp-"):].split("-")[0]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
    elif out.is_dir():
        out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name in the same folder, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def process_row(converter, require_answer: bool, max_pixels: int, raw: RawRow, *,
                allow_outside_media: bool = False) -> tuple:
    """Convert and validate one row (runs in a worker).

    Media files that resolve (symlinks followed) outside their data root are rejected
    (``media_outside_root``) unless ``allow_outside_media``.

    Returns:
        ``(raw.index, raw.where, "ok", sample_dict, media)`` or
        ``(raw.index, raw.where, "reject", reason, field, message, row_id)``.
    """
    if raw.data is None:
        return raw.index, raw.where, "reject", raw.reason, "", f"{raw.where}: {raw.error}. Fix: "\
            f"{_UNREADABLE_FIX.get(raw.reason, _UNREADABLE_FIX['bad_json'])}", None
    item = None
    try:
        converted = converter(raw)
        try:
            sample = Sample.from_dict(converted.row, where=raw.where)
        except DataError as e:
            raise Reject("schema", _first_field(str(e)), str(e)) from None
        if not allow_outside_media:  # before anything opens the file
            for item in converted.media:
                outside = outside_root_message(item, raw.where)
                if outside is not None:
                    raise Reject("media_outside_root", item.field, outside)
        for item in converted.media:
            check(item, where=raw.where, max_pixels=max_pixels)
        if require_answer and sample.answer in (None, ""):
            raise Reject("missing_answer", "answer", f"{raw.where}: no answer. Fix: map the answer "
                         "column (--map answer=<column>), or pass --allow-missing-answer when the "
                         "rewards need none.")
    except Reject as r:
        return raw.index, raw.where, "reject", r.reason, r.field, _located(r.message, raw.where), _id_of(raw)
    except MediaError as e:
        reason = "media_missing" if "does not exist" in str(e) else "media_decode"
        return raw.index, raw.where, "reject", reason, item.field if item else "", str(e), _id_of(raw)
    return raw.index, raw.where, "ok", sample.to_dict(), converted.media


def _located(message: str, where: str) -> str:
    return message if message.startswith(where) else f"{where}: {message}"


def _first_field(message: str) -> str:
    """The field path of the first problem of a schema DataError (``messages[0].role``)."""
    m = re.search(r"^\s+- ([^:]+):", message, re.M)
    return m.group(1) if m else ""


def _id_of(raw: RawRow):
    return raw.data.get("id") if isinstance(raw.data, dict) and isinstance(raw.data.get("id"), (str, int)) else None


def _results(source: Source, tmp: Path, opts: PrepareOptions):
    rows, converter = source.open(tmp)
    if opts.limit is not None:
        rows = islice(rows, opts.limit)
    work = partial(process_row, converter, source.require_answer, opts.max_pixels,
                   allow_outside_media=opts.allow_outside_media)
    if opts.num_workers <= 1:
        yield from map(work, rows)
        return
    # spawn: workers import only this package's light modules (never a forked torch runtime).
    # Rows go out a window at a time, so a large source is never held in memory at once.
    rows = iter(rows)
    with multiprocessing.get_context("spawn").Pool(opts.num_workers) as pool:
        while window := list(islice(rows, _WINDOW)):
            yield from pool.imap(work, window, chunksize=max(1, len(window) // (4 * opts.num_workers)))


def _write(source: Source, tmp: Path, opts: PrepareOptions, report: Report) -> list[dict]:
    """Write shards, media and rejects into ``tmp``; returns the manifest's shard list."""
    from tqdm.auto import tqdm

    shards = _ShardWriter(tmp, opts.shard_size)
    seen_ids: set[str] = set()
    known = [x for x in (source.total, opts.limit) if x is not None]
    disable = None if opts.progress is None else not opts.progress  # None: off unless a terminal
    with open(tmp / REJECTS, "w", encoding="utf-8") as rejects, \
            tqdm(total=min(known) if known else None, desc="prepare", unit="row", disable=disable,
                 file=sys.stderr) as bar:
        for result in _results(source, tmp, opts):
            report.read += 1
            bar.update(1)
            index, where, status = result[:3]
            if status == "ok" and result[3]["id"] in seen_ids:
                sid = result[3]["id"]
                result = (index, where, "reject", "duplicate_id", "id", f"{where}: id {sid!r} was "
                          "already written by an earlier row. Fix: give every row a unique id (or "
                          "map none: ids then come from row numbers).", sid)
            if result[2] == "ok":
                sample, media = result[3], result[4]
                seen_ids.add(sample["id"])
                _write_media(sample, media, tmp, report)
                shards.add(json.dumps(sample, ensure_ascii=False))
                report.written += 1
                continue
            reason, fld, message, rid = result[3:7]
            report.rejected[reason] = report.rejected.get(reason, 0) + 1
            rejects.write(json.dumps({"row": index, "where": where, "id": rid, "reason": reason,
                                      "field": fld, "message": message}, ensure_ascii=False) + "\n")
    return shards.close()


def _write_media(sample: dict, media: list[MediaItem], tmp: Path, report: Report) -> None:
    """Write each media item under media/ with a name made from the sample id; fill the slots."""
    stem = _SAFE.sub("_", sample["id"]).strip("._") or "sample"
    if stem != sample["id"]:  # keep names of ids that differ only in unsafe characters apart
        stem += "-" + hashlib.sha1(sample["id"].encode()).hexdigest()[:8]
    names = []
    for k, item in enumerate(media):
        if item.in_place:
            names.append(Path(os.path.relpath(item.path, tmp)).as_posix())
        else:
            name = f"media/{stem}-{k}{item.ext}"
            (tmp / "media").mkdir(exist_ok=True)
            if item.data is not None:
                (tmp / name).write_bytes(item.data)
            else:
                shutil.copyfile(item.path, tmp / name)
            names.append(name)
        report.media_files += 1
        report.media_bytes += item.size
    slots = {SLOT.format(k): name for k, name in enumerate(names)}
    for message in sample["messages"]:
        for part in message["content"]:
            if part["type"] in MEDIA_TYPES:
                part[part["type"]] = slots[part[part["type"]]]


class _ShardWriter:
    """Lines into shard-00000.jsonl, shard-00001.jsonl, ... of ``size`` rows each."""

    def __init__(self, folder: Path, size: int) -> None:
        self.folder, self.size = folder, max(int(size), 1)
        self.shards: list[dict] = []
        self._file = None

    def add(self, line: str) -> None:
        if self._file is None or self.shards[-1]["count"] >= self.size:
            self._close_file()
            name = f"shard-{len(self.shards):05d}.jsonl"
            self._file = open(self.folder / name, "w", encoding="utf-8")
            self.shards.append({"file": name, "count": 0})
        self._file.write(line + "\n")
        self.shards[-1]["count"] += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[dict]:
        self._close_file()
        for shard in self.shards:
            shard["sha256"] = hashlib.sha256((self.folder / shard["file"]).read_bytes()).hexdigest()
        return self.shards


def _manifest(source: Source, report: Report, shards: list[dict]) -> dict:
    manifest = {"schema_version": SCHEMA_VERSION, "source": source.spec,
                "source_fingerprint": source.fingerprint, "options": source.options,
                "count": report.written,
                "counts": {"read": report.read, "written": report.written,
                           "rejected": sum(report.rejected.values()),
                           "rejected_by_reason": dict(sorted(report.rejected.items())),
                           "media_files": report.media_files, "media_bytes": report.media_bytes},
                "shards": shards}
    if report.token_lengths:
        from lightrft_mm.datasets.report import token_stats

        manifest["prompt_tokens"] = token_stats(report.token_lengths)
    return manifest


def _nothing_written(source: Source, tmp: Path, report: Report) -> str:
    if report.read == 0:
        return f"{source.spec}: the source holds no rows. Fix: check the path and --split."
    lines = (tmp / REJECTS).read_text(encoding="utf-8").splitlines()[:3]
    first = "\n".join(f"  - {json.loads(x)['message']}" for x in lines)
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.rejected.items()))
    return (f"{source.spec}: all {report.read} rows were rejected ({reasons}); nothing was written. "
            f"The first ones:\n{first}\nFix the mapping (--map, --layout, --media-root) or the data.")
