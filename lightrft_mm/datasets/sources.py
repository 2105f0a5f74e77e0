"""Sources of `prepare`: a registry of factories, ``SOURCE`` spec -> rows and their converter.

``geo3k`` (``--src PATH``), ``synthetic:<task>`` (``--n``, ``--seed``) and ``file:PATH`` (any
jsonl / json / parquet / csv file or save_to_disk folder; a bare existing path means the same).
A new source is one registered factory ``(argument, SourceOptions) -> Source``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from lightrft_mm.datasets import geo3k
from lightrft_mm.datasets.convert import (LAYOUTS, TARGETS, AutoConverter, ChatConverter, FieldsConverter,
                                          LlavaConverter)
from lightrft_mm.datasets.readers import RawRow, open_table
from lightrft_mm.errors import DataError
from lightrft_mm.registry import Registry

SOURCES = Registry("prepare source", entry_point_group="lightrft_mm.sources")


@dataclass
class SourceOptions:
    """The command-line options sources read (see `lightrft_mm.prepare.build_parser`)."""

    src: str | None = None
    split: str | None = None
    instruction: str = geo3k.DEFAULT_INSTRUCTION
    mapping: dict = field(default_factory=dict)
    layout: str = "auto"
    media_root: str | None = None
    source_name: str | None = None
    n: int = 1000
    seed: int = 0


@dataclass
class Source:
    """What `prepare` reads.

    Attributes:
        spec: The SOURCE as given (``geo3k``, ``synthetic:colors``, a path).
        open: ``workdir -> (rows, converter)``; synthetic tasks write their media into workdir.
        fingerprint: sha256 of the source data (files, or the generator's name and settings).
        total: Row count when known up front (for the progress bar).
        options: Settings recorded in the manifest.
        require_answer: Rows without an answer are rejected.
    """

    spec: str
    open: Callable[[Path], tuple[Iterable[RawRow], Callable]]
    fingerprint: str
    total: int | None = None
    options: dict = field(default_factory=dict)
    require_answer: bool = True


def resolve_source(spec: str, opts: SourceOptions) -> Source:
    """The Source named by ``spec``: ``name`` or ``name:argument`` of a registered source, or a path.

    Raises:
        DataError: An unknown source (listing the registered ones and the path forms).
    """
    name, _, arg = spec.partition(":")
    if name and name in SOURCES and (arg or spec == name):
        return SOURCES.get(name)(arg, opts)
    if Path(spec).expanduser().exists():
        return SOURCES.get("file")(spec, opts)
    raise DataError(f"unknown source {spec!r}: not a registered source and no such file or folder. "
                    f"Sources: geo3k --src PATH, synthetic:<task> (e.g. synthetic:colors, "
                    f"synthetic:geo3k_like), file:PATH or a path to a .jsonl/.json/.parquet/.csv "
                    f"file or a save_to_disk folder. Registered: {', '.join(SOURCES.names())}.")


@SOURCES.register("geo3k")
def geo3k_source(arg: str, opts: SourceOptions) -> Source:
    """A local copy of ``hiyouga/geometry3k`` (``--src``), one split (``--split``, default train)."""
    src = arg or opts.src
    if not src:
        raise DataError("geo3k needs --src PATH: a local copy of hiyouga/geometry3k (its parquet "
                        f"files or a save_to_disk folder). Fix: `{geo3k.DOWNLOAD_HINT}`, then "
                        "--src data/geometry3k.")
    split = opts.split or "train"
    table = open_table(src, split=split)
    converter = geo3k.Geo3KConverter(split=split, instruction=opts.instruction)
    return Source("geo3k", lambda workdir: (table.rows(), converter), table.fingerprint(),
                  table.total, {"src": str(src), "split": split, "instruction": opts.instruction})


@SOURCES.register("synthetic")
def synthetic_source(task: str, opts: SourceOptions) -> Source:
    """An offline generator of `lightrft_mm.datasets.synthetic.TASKS` (``--n``, ``--seed``)."""
    from lightrft_mm.datasets.synthetic import TASKS, generate

    if not task:
        raise DataError(f"synthetic needs a task: synthetic:<task>, one of {', '.join(TASKS.names())}.")
    origin = TASKS.origin(task)  # an unknown task fails here, with did-you-mean

    def open_(workdir: Path):
        samples = generate(task, opts.n, opts.seed, workdir)
        rows = (RawRow(i, f"synthetic:{task} sample {i}", s.to_dict()) for i, s in enumerate(samples))
        root = str(Path(workdir).absolute())
        return rows, ChatConverter(root=root, source=f"synthetic:{task}", in_place_root=root)

    digest = hashlib.sha256(json.dumps([task, origin, opts.n, opts.seed]).encode()).hexdigest()
    return Source(f"synthetic:{task}", open_, f"sha256:{digest}", opts.n, {"n": opts.n, "seed": opts.seed})


@SOURCES.register("file")
def file_source(path: str, opts: SourceOptions) -> Source:
    """A jsonl / json / parquet / csv file or a save_to_disk folder, in any layout of `convert`."""
    if opts.layout not in LAYOUTS:
        raise DataError(f"--layout {opts.layout!r}: use one of {', '.join(LAYOUTS)}.")
    unknown = sorted(set(opts.mapping) - set(TARGETS))
    if unknown:
        raise DataError(f"--map {unknown[0]}=...: unknown target {unknown[0]!r}. Fix: map one of "
                        f"{', '.join(TARGETS)} (e.g. --map prompt=question).")
    table = open_table(path, split=opts.split)
    root = str(Path(opts.media_root).expanduser().absolute()) if opts.media_root else str(table.root.absolute())
    name = opts.source_name or Path(path).stem
    converter = AutoConverter(FieldsConverter(dict(opts.mapping), root, name, name),
                              LlavaConverter(root, name, name), ChatConverter(root, name, name),
                              layout=opts.layout)
    return Source(str(path), lambda workdir: (table.rows(), converter), table.fingerprint(), table.total,
                  {"layout": opts.layout, "map": dict(opts.mapping), "media_root": root,
                   "split": opts.split, "source_name": name})
