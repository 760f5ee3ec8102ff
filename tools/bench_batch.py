"""Throughput of ``verigrad batch`` (a benchmark, not a test): instances (inputs) per minute
with 1 and 2 worker processes on shipped specs, measured in one run.

    python tools/bench_batch.py                                   # demo + demo_robust + fairness_fair
    python tools/bench_batch.py --specs specs/demo.yaml --jobs 1 2
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from verigrad.batch import expand, run_batch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT / "specs/demo.yaml", ROOT / "specs/demo_robust.yaml", ROOT / "specs/fairness_fair.yaml"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="+", type=Path, default=DEFAULT)
    ap.add_argument("--jobs", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--limit", type=int, default=30, help="first N instances over all specs")
    a = ap.parse_args()
    tasks = expand(a.specs)[: a.limit]
    rows = []
    for j in a.jobs:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            recs = run_batch(tasks, Path(tmp), jobs=j, timeout=600)
            dt = time.perf_counter() - t0
        inner = sum(r["seconds"] for r in recs) / len(recs)
        rows.append((j, len(recs), dt, 60 * len(recs) / dt, inner))
    print("| workers | instances | wall (s) | instances / min | mean s per instance (in worker, incl. start) |")
    print("|---|---|---|---|---|")
    for j, n, dt, rate, inner in rows:
        print(f"| {j} | {n} | {dt:.1f} | {rate:.1f} | {inner:.2f} |")
    print(f"speed-up {rows[-1][3] / rows[0][3]:.2f}x ({rows[-1][0]} vs {rows[0][0]} workers)")


if __name__ == "__main__":
    main()
