"""`python -m lightrft_mm.prepare SOURCE --out DIR`: write unified sample shards.

Sources: `synthetic:<task>` (offline generators; `--n`, `--seed`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import uuid
from pathlib import Path

from lightrft_mm.errors import DataError, LightRFTError


def prepare_synthetic(task: str, out: Path, *, n: int, seed: int, overwrite: bool = False) -> Path:
    """Generate `n` samples of a synthetic task into the shard folder `out`.

    Written into a temporary sibling folder first: a failure leaves an existing `out` intact.
    """
    from lightrft_mm.datasets.loader import MANIFEST, write_shard
    from lightrft_mm.datasets.synthetic import generate

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file. Fix: give a folder path for the shards.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out} already exists and is not empty. Fix: choose another --out, "
                            "or pass --overwrite to replace it.")
        if not (out / MANIFEST).is_file():
            raise DataError(f"{out} is not a shard folder written by prepare (no {MANIFEST}); "
                            "--overwrite only replaces those. Fix: choose another --out.")
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_shard(generate(task, n, seed, tmp), tmp, source=f"synthetic:{task}", n=n, seed=seed)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m lightrft_mm.prepare", description=__doc__)
    parser.add_argument("source", help="synthetic:<task>, e.g. synthetic:colors")
    parser.add_argument("--out", required=True, type=Path, help="output shard folder")
    parser.add_argument("--n", type=int, default=1000, help="samples to generate (synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (synthetic)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.source.startswith("synthetic:"):
        raise DataError(f"unknown source {args.source!r}. Supported here: synthetic:<task> "
                        "(e.g. synthetic:colors).")
    out = prepare_synthetic(args.source.split(":", 1)[1], args.out, n=args.n, seed=args.seed,
                            overwrite=args.overwrite)
    print(f"prepare: wrote {args.n} samples to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LightRFTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
