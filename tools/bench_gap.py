"""The certificate–attack gap on the shipped models (a benchmark, not a test).

For each model and ε, on the first N sample images, every engine bounds the explanation and
every attack searches the same box (``attack.order: both``). Per engine and property it
prints the fraction of inputs certified by that engine, falsified (a float64 witness in the
box), and left unknown, and the median gap ratio (certified worst case / attacked worst
case, oriented so that 1 = tight; see ``verigrad.properties.gap_ratio``).

Properties (scale-free, so one threshold serves every model):
  l2n   untargeted ℓ2 on l2-normalised maps: ‖v/‖v‖ − v0/‖v0‖‖₂ ≤ 0.3
  cos   untargeted cosine: cos(v0, v) ≥ 0.9
  top   top-20 overlap ≥ 0.5 (by |v|)

    python tools/bench_gap.py                        # fc, cnn, softplus at ε 0.001, 0.003, 0.01
    python tools/bench_gap.py --models fc --eps 0.01 --n 10 --json gap.json
    python tools/bench_gap.py --methods crown bab --bab-timeout 60   # branch and bound beside CROWN

With ``bab`` the per-engine rows also give the median time per input and the median number
of domains branch and bound bounded per property (0 where an earlier engine certified it or
an attack falsified it first).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from verigrad import properties as props
from verigrad.properties import Verdict
from verigrad.spec import spec_from_dict
from verigrad.verify import prepare, verify_instance

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "fc": ROOT / "examples/models/mnist_fc.onnx",
    "cnn": ROOT / "examples/models/mnist_cnn.onnx",
    "softplus": ROOT / "examples/models/mnist_softplus.onnx",
}
PROPERTIES = [
    {"name": "l2n", "kind": "untargeted", "metric": "l2", "normalize": "l2", "threshold": 0.3},
    {"name": "cos", "kind": "untargeted", "metric": "cosine", "threshold": 0.9},
    {"name": "top", "kind": "topk", "k": 20, "threshold": 0.5},
]


def run(model: str, eps: float, n: int, methods: list[str], steps: int, restarts: int,
        bab_timeout: float = 60.0, bab_leaf: str = "interval") -> dict:
    spec = spec_from_dict({
        "model": {"path": str(MODELS[model])},
        "data": {"dataset": "mnist_sample", "start": 0, "end": n},
        "perturbation": {"input": {"epsilon": eps}},
        "properties": PROPERTIES,
        # bab's budget is per input: a third per property (time one search leaves goes to the next)
        "bounds": {"methods": methods, "dtype": "float64", "bab": {"timeout_s": bab_timeout / len(PROPERTIES),
                                                                              "leaf": bab_leaf}},
        "attack": {"order": "both", "steps": steps, "restarts": restarts},
    })
    problem = prepare(spec)
    t0 = time.perf_counter()
    results = [verify_instance(problem, i) for i in range(n)]
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{model} ε={eps}: {errors[0]}")
    out: dict = {"model": model, "eps": eps, "n": n, "time_s": time.perf_counter() - t0, "engines": {}}
    for m in methods:
        per = {}
        runs = [next(e for e in r.engines if e.method == m) for r in results]
        for k, p in enumerate(problem.properties):
            cert = fals = 0
            ratios = []
            for r, e in zip(results, runs, strict=True):
                pr, a = e.properties[k], r.attacks[p.name]
                cert += pr.verdict == Verdict.CERTIFIED
                fals += a.violated
                g = props.gap_ratio(p, pr.worst_case, a.value)
                if g is not None:
                    ratios.append(g)
            per[p.name] = {"certified": cert / n, "falsified": fals / n, "unknown": (n - cert - fals) / n,
                           "median_gap": statistics.median(ratios) if ratios else None,
                           "median_domains": statistics.median(e.search.get(p.name, {}).get("domains", 0)
                                                               for e in runs)}
        out["engines"][m] = {"properties": per, "median_time_s": statistics.median(e.time_s for e in runs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--eps", nargs="+", type=float, default=[0.001, 0.003, 0.01])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["ibp", "crown"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--bab-timeout", type=float, default=60.0, help="bab's seconds per input (all properties)")
    ap.add_argument("--bab-leaf", choices=["crown", "interval"], default="interval",
                    help="how bab bounds neuron-split domains (bounds.bab.leaf)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = []
    print("| model | ε | engine | property | certified | falsified | decided | unknown | median gap "
          "| median s/input | median domains |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models:
        for eps in a.eps:
            res = run(model, eps, a.n, a.methods, a.steps, a.restarts, a.bab_timeout, a.bab_leaf)
            rows.append(res)
            for m, eng in res["engines"].items():
                for name, c in eng["properties"].items():
                    gap = "-" if c["median_gap"] is None else f"{c['median_gap']:.3g}"
                    print(f"| {model} | {eps:g} | {m} | {name} | {c['certified']:.2f} | {c['falsified']:.2f} | "
                          f"{c['certified'] + c['falsified']:.2f} | {c['unknown']:.2f} | {gap} | "
                          f"{eng['median_time_s']:.3g} | {c['median_domains']:g} |", flush=True)
    print()
    print(summary_table(rows, a.methods))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


def summary_table(rows: list[dict], methods: list[str]) -> str:
    """One line per model, ε and property: certified fraction per engine, falsified and
    unknown fractions (after every engine and attack), median gap per engine."""
    fmt = lambda g: "-" if g is None else f"{g:.3g}"  # noqa: E731
    head = (["model", "ε", "property"] + [f"certified {m}" for m in methods] + ["falsified", "unknown"]
            + [f"median gap {m}" for m in methods])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for p in PROPERTIES:
            per = [r["engines"][m]["properties"][p["name"]] for m in methods]
            cert = [c["certified"] for c in per]
            fals = per[0]["falsified"]
            cells = ([r["model"], f"{r['eps']:g}", p["name"]] + [f"{c:.1f}" for c in cert]
                     + [f"{fals:.1f}", f"{1 - max(cert) - fals:.1f}"] + [fmt(c["median_gap"]) for c in per])
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
