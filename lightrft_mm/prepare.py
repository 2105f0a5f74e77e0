"""`python -m lightrft_mm.prepare SOURCE --out DIR`: any source -> validated unified shards.

Sources:
  geo3k --src PATH [--split train]      a local copy of hiyouga/geometry3k (parquet or save_to_disk)
  synthetic:<task> [--n N --seed S]      offline generators (colors, geo3k_like, ...)
  PATH (or file:PATH)                    a .jsonl/.json/.parquet/.csv file or a save_to_disk
                                         folder: flat columns (--map), LLaVA `conversations`
                                         or chat `messages` (--layout)

Every row is validated (schema, media decode, placeholders, answer, media inside the media
root, UTF-8 text); bad rows go to DIR/rejects.jsonl with the row, reason, field and fix. DIR
gets shard-*.jsonl, media/ and a manifest.json; an existing DIR is only replaced with
--overwrite. When every row is rejected, DIR holds only rejects.jsonl (an earlier output in DIR
is kept, and the rejects go to DIR.rejects.jsonl beside it) and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightrft_mm.errors import DataError, LightRFTError


def prepare_synthetic(task: str, out: Path, *, n: int, seed: int, overwrite: bool = False) -> Path:
    """Generate `n` samples of a synthetic task into the shard folder `out`.

    Written into a temporary sibling folder first: a failure leaves an existing `out` intact.
    """
    from lightrft_mm.datasets.pipeline import PrepareOptions, prepare
    from lightrft_mm.datasets.sources import SourceOptions, resolve_source

    source = resolve_source(f"synthetic:{task}", SourceOptions(n=n, seed=seed))
    prepare(source, Path(out), PrepareOptions(overwrite=overwrite, progress=False))
    return Path(out)


def _mapping(text: str) -> tuple[str, str]:
    target, sep, column = text.partition("=")
    if not sep or not target.strip() or not column.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write TARGET=COLUMN, e.g. prompt=question")
    return target.strip(), column.strip()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of `prepare` (on ``parser``, e.g. a `lightrft-mm` sub-command, or a new one)."""
    from lightrft_mm.datasets.convert import LAYOUTS, TARGETS
    from lightrft_mm.datasets.geo3k import DEFAULT_INSTRUCTION

    parser = parser or argparse.ArgumentParser(prog="python -m lightrft_mm.prepare")
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("source", help="geo3k, synthetic:<task> (e.g. synthetic:colors), or a path")
    parser.add_argument("--out", required=True, type=Path, help="output shard folder")
    parser.add_argument("--src", help="geo3k: the local copy of hiyouga/geometry3k")
    parser.add_argument("--split", help="split to read (geo3k default: train; folders: all files)")
    parser.add_argument("--instruction", default=DEFAULT_INSTRUCTION,
                        help="geo3k: text appended to each problem ('' for none; default: %(default)r)")
    parser.add_argument("--map", dest="mapping", action="append", type=_mapping, default=[],
                        metavar="TARGET=COLUMN", help=f"column of a target ({', '.join(TARGETS)}); repeatable")
    parser.add_argument("--layout", default="auto", choices=LAYOUTS,
                        help="row layout of a file source (auto: per row, by its columns)")
    parser.add_argument("--media-root", help="folder that relative media paths are taken from "
                        "(default: the source file's folder); media must lie inside it")
    parser.add_argument("--allow-outside-media", action="store_true",
                        help="accept media paths that resolve (symlinks followed) outside the media root: "
                        "absolute paths, ../ paths and links out (rejected as media_outside_root by default)")
    parser.add_argument("--source-name", help="the samples' `source` field (default: the file's stem)")
    parser.add_argument("--n", type=int, default=1000, help="samples to generate (synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (synthetic)")
    parser.add_argument("--limit", type=int, help="read at most this many source rows")
    parser.add_argument("--num-workers", type=int, default=1, help="validation worker processes "
                        "(the output is identical for any number)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per shard file")
    parser.add_argument("--model", help="tiny:<family> or a model folder: add a prompt-token histogram")
    parser.add_argument("--allow-missing-answer", action="store_true",
                        help="keep rows without an answer (for rewards that need none)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepare output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run `prepare` for parsed arguments; prints the summary table. Returns the exit status."""
    from lightrft_mm.datasets.pipeline import PrepareOptions, prepare
    from lightrft_mm.datasets.report import summary_table
    from lightrft_mm.datasets.sources import SourceOptions, resolve_source

    for name in ("limit", "num_workers", "shard_size", "n"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DataError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    opts = SourceOptions(src=args.src, split=args.split, instruction=args.instruction,
                         mapping=dict(args.mapping), layout=args.layout, media_root=args.media_root,
                         source_name=args.source_name, n=args.n, seed=args.seed)
    source = resolve_source(args.source, opts)
    source.require_answer = not args.allow_missing_answer
    report = prepare(source, args.out, PrepareOptions(
        limit=args.limit, num_workers=args.num_workers, overwrite=args.overwrite,
        shard_size=args.shard_size, progress=False if args.no_progress else None, model=args.model,
        allow_outside_media=args.allow_outside_media))
    print(summary_table(report, source=source.spec, model=args.model))
    print(f"prepare: wrote {report.written} samples to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lightrft_mm.prepare`: exit status 0, or 1 with a readable error."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LightRFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
