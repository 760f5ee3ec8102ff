"""Throughput of ``verigrad batch`` (a benchmark, not a test), measured in one run:
instances (inputs) per minute with 1 and 2 local workers, one input per work unit against
auto-sized units (consecutive inputs of a spec bounded together by IBP), and the Dask
backend on a loopback LocalCluster.

    python tools/bench_batch.py                                   # demo + demo_robust + fairness_fair
    python tools/bench_batch.py --specs specs/demo.yaml --jobs 1 2 --limit 100
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
    ap.add_argument("--limit", type=int, default=None, help="first N instances over all specs (default: all)")
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask rows")
    a = ap.parse_args()
    tasks = expand(a.specs)[: a.limit]
    settings = [("local", j, bs) for j in a.jobs for bs in (1, None)]
    if not a.no_dask:
        settings += [("dask", a.jobs[-1], None)]
    rows = []
    for backend, j, bs in settings:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            recs = run_batch(tasks, Path(tmp), jobs=j, timeout=600, backend=backend, batch_size=bs)
            dt = time.perf_counter() - t0
        inner = sum(r["seconds"] for r in recs) / len(recs)
        rows.append((backend, j, "1" if bs == 1 else "auto", len(recs), dt, 60 * len(recs) / dt, inner))
    print("| backend | workers | inputs per unit | instances | wall (s, incl. worker start) | instances / min "
          "| mean s per instance (in worker) |")
    print("|---|---|---|---|---|---|---|")
    for backend, j, bs, n, dt, rate, inner in rows:
        print(f"| {backend} | {j} | {bs} | {n} | {dt:.1f} | {rate:.0f} | {inner:.4f} |")
    rate = {(r[0], r[1], r[2]): r[5] for r in rows}
    for j in a.jobs:
        print(f"{j} worker(s): auto units vs one input per unit ×{rate['local', j, 'auto'] / rate['local', j, '1']:.2f}")
    lo, hi = a.jobs[0], a.jobs[-1]
    print(f"{hi} vs {lo} workers (auto units): ×{rate['local', hi, 'auto'] / rate['local', lo, 'auto']:.2f}")


if __name__ == "__main__":
    main()
