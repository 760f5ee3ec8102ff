"""Throughput of ``verigrad batch`` (a benchmark, not a test), measured in one run:
instances (inputs) per minute with 1 and 2 local workers, one input per work unit against
auto-sized units (consecutive inputs of a spec bounded together by IBP), and the Dask
backend on a loopback LocalCluster; then, in one process, what bounding a unit's inputs in
one IBP call buys per instance.

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


def in_process(specs: list[Path], n: int = 32, unit: int = 16) -> None:
    """Per instance, one input at a time against units of ``unit`` inputs (IBP batched), in
    this process on one thread, attacks off, best of three: what batching itself buys."""
    import torch

    from verigrad.spec import apply_overrides, load_spec
    from verigrad.verify import prepare, verify_instance, verify_many

    torch.set_num_threads(1)
    print(f"\n| spec | engines | ms per instance, one at a time | ms per instance, units of {unit} | speed-up |")
    print("|---|---|---|---|---|")
    for path in specs:
        for methods in (["ibp"], ["ibp", "crown"]):
            spec = apply_overrides(load_spec(path), {"bounds.methods": methods, "data.start": 0, "data.end": n,
                                                      "attack.order": "skip"})
            p = prepare(spec)
            k = len(p.x)
            one = many = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for i in range(k):
                    verify_instance(p, i)
                one = min(one, (time.perf_counter() - t) / k)
                t = time.perf_counter()
                for c in range(0, k, unit):
                    list(verify_many(p, list(range(c, min(c + unit, k)))))
                many = min(many, (time.perf_counter() - t) / k)
            print(f"| {path.stem} | {' + '.join(methods)} | {one * 1e3:.2f} | {many * 1e3:.2f} | ×{one / many:.2f} |")


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
    in_process(list(dict.fromkeys(a.specs)))


if __name__ == "__main__":
    main()
