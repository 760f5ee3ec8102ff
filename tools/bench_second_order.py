"""Direct bounds, Hessian-based bounds and the literature's bounds on the shipped softplus
model (a benchmark, not a test): how far can the saliency map move, in ℓ2, over the ε-box?

For each ε and each of the first N sample images, one run of the pipeline with
``second_order: {hessian: [...], literature: true}`` and an ℓ2 property the attack maximises
(``attack.order: both``), then per bound the median over inputs of

    bound / attacked        (the worst ‖v(x') − v(x)‖₂ any attack reached, a lower bound on
                             the truth: a sound bound has ratio ≥ 1, an estimate may not)

  direct_<engine>           exact max ‖v − v0‖₂ over the engine's coordinate bounds (sound)
  direct_hessian-<engine>   the same over the mean-value engine v0 + [H](box − x) (sound)
  hessian_<engine>_spectral ‖max(|H_l|, |H_u|)‖₂ · max ‖x' − x‖₂ (sound)
  sound_linf_<engine>       [CAR] Thm 2 with the box Hessian bound (sound)
  dom_thm1_spectral_change  Dombrowski et al. Thm 1 global Hessian bound × path length (sound)
  car_thm2_linf, car_cor1_linf, jacobian_frobenius_at_x_change   point-Hessian estimates

    python tools/bench_second_order.py                         # ε 0.001 and 0.01, 5 inputs
    python tools/bench_second_order.py --eps 0.003 --n 10 --hessian ibp --json so.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from verigrad.spec import spec_from_dict
from verigrad.verify import prepare, verify_instance

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples/models/mnist_softplus.onnx"
SHOWN = ["direct_ibp", "direct_crown", "direct_hessian-ibp", "direct_hessian-crown", "hessian_ibp_spectral",
         "hessian_crown_spectral", "sound_linf_ibp", "sound_linf_crown", "dom_thm1_spectral_change",
         "car_thm2_linf", "car_label_linf", "car_cor1_linf", "jacobian_frobenius_at_x_change"]


def run(eps: float, n: int, hessian: list[str], steps: int, restarts: int) -> dict:
    spec = spec_from_dict({
        "model": {"path": str(MODEL)},
        "data": {"dataset": "mnist_sample", "start": 0, "end": n},
        "perturbation": {"input": {"epsilon": eps}},
        "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1e9}],
        "bounds": {"methods": ["ibp", "crown"], "dtype": "float64"},
        "second_order": {"hessian": hessian, "literature": True, "hutchinson_samples": 64},
        "attack": {"order": "both", "steps": steps, "restarts": restarts, "methods": ["pgd"]},
    })
    problem = prepare(spec)
    rows: dict[str, dict] = {}
    times: dict[str, list[float]] = {}
    for i in range(n):
        r = verify_instance(problem, i)
        if r.error is not None:
            raise RuntimeError(f"ε={eps}, input {i}: {r.error}")
        attacked = r.attacks["l2"].value
        for e in r.engines:
            times.setdefault(e.method, []).append(e.time_s)
        for b in r.second_order["bounds"]:
            if b["quantity"] != "linf_ball_l2_change" or b["value"] is None:
                continue
            row = rows.setdefault(b["name"], {"guarantee": b["guarantee"], "values": [], "ratios": []})
            row["values"].append(b["value"])
            row["ratios"].append(b["value"] / attacked if attacked else float("nan"))
        rows.setdefault("attack (pgd)", {"guarantee": "witness", "values": [], "ratios": []})
        rows["attack (pgd)"]["values"].append(attacked)
        rows["attack (pgd)"]["ratios"].append(1.0)
    return {"eps": eps, "n": n, "time_s": {k: statistics.median(v) for k, v in times.items()},
            "bounds": {k: {"guarantee": v["guarantee"], "median": statistics.median(v["values"]),
                           "median_ratio": statistics.median(v["ratios"])} for k, v in rows.items()}}


def table(results: list[dict]) -> str:
    names = [n for n in SHOWN + ["attack (pgd)"] if any(n in r["bounds"] for r in results)]
    head = ["bound", "guarantee"] + [f"ε={r['eps']:g} (÷attack)" for r in results]
    lines = []
    for n in names:
        g = next(r["bounds"][n]["guarantee"] for r in results if n in r["bounds"])
        cells = []
        for r in results:
            b = r["bounds"].get(n)
            cells.append("-" if b is None else f"{b['median']:.4g} ({b['median_ratio']:.3g})")
        lines.append([n, g] + cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=True)]
    fmt = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    for r in results:
        out.append(f"ε={r['eps']:g}: median time per input (s): "
                   + ", ".join(f"{k} {v:.3g}" for k, v in r["time_s"].items()))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.001, 0.01])
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--hessian", nargs="+", default=["ibp", "crown"], choices=["ibp", "crown"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    t0 = time.perf_counter()
    results = [run(e, a.n, a.hessian, a.steps, a.restarts) for e in a.eps]
    print(table(results))
    print(f"total {time.perf_counter() - t0:.1f} s")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
