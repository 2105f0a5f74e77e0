"""Benchmark `prepare geo3k`: rows/s on Geo3K-like rows with 1 and 2 worker processes.

    .venv/bin/python bench/prepare.py [--rows 2000] [--workers 1 2] [--repeat 2]

Builds a parquet file in the layout and column types of hiyouga/geometry3k from the
`synthetic:geo3k_like` diagrams (PNG bytes inline), then times the whole prepare call (read,
decode-check, write shards and media, manifest) for each worker count and prints one line
each, the best of ``--repeat`` runs. Target: >= 200 rows/s with one worker.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from lightrft_mm.datasets.pipeline import PrepareOptions, prepare
from lightrft_mm.datasets.sources import SourceOptions, resolve_source
from lightrft_mm.datasets.synthetic_geo import geo3k_rows, write_geo3k_parquet


def bench(src: Path, work: Path, workers: int, repeat: int) -> tuple[float, int]:
    """Best rows/s of `repeat` runs of `prepare geo3k --src src` with `workers` processes."""
    best, written = 0.0, 0
    for k in range(repeat):
        out = work / f"out-{workers}-{k}"
        source = resolve_source("geo3k", SourceOptions(src=str(src), split="train"))
        started = time.perf_counter()
        report = prepare(source, out, PrepareOptions(num_workers=workers, progress=False))
        best = max(best, report.read / (time.perf_counter() - started))
        written = report.written
        shutil.rmtree(out)
    return best, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        parquet = write_geo3k_parquet(geo3k_rows(args.rows, seed=0),
                                      work / "geometry3k" / "data" / "train-00000-of-00001.parquet")
        print(f"bench prepare: {args.rows} Geo3K-like rows, parquet {parquet.stat().st_size / 2**20:.1f} MB "
              f"(built in {time.perf_counter() - t0:.1f} s)")
        for workers in args.workers:
            rate, written = bench(work / "geometry3k", work, workers, args.repeat)
            print(f"bench prepare: workers={workers} rows/s={rate:.0f} written={written} "
                  f"(best of {args.repeat}; target >= 200 with 1 worker)")


if __name__ == "__main__":
    main()
