"""Benchmark the bound engines on the shipped example models (not a test: numbers vary by machine).

Prints, per model and ε: mean bound width per engine, the width ratio against IBP, time per
input per engine, and — on a batch of 100 MNIST inputs — IBP time against plain autograd
saliency time. Peak resident memory of the process is reported at the end. All ratios are
measured within one run.

    python tools/bench_bounds.py                       # defaults: every model below at ε 0.001, 0.01
    python tools/bench_bounds.py --models fc --eps 0.01 --n 10 --alpha --json out.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from verigrad.bounds import EngineOptions, Method, compute_bounds
from verigrad.data import load_dataset
from verigrad.graph.gradient_graph import saliency
from verigrad.models import load_model
from verigrad.perturbation import input_box

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "fc": ROOT / "examples/models/mnist_fc.onnx",
    "cnn": ROOT / "examples/models/mnist_cnn.onnx",
    "softplus": ROOT / "examples/models/mnist_softplus.onnx",
    # DAG models (tools/train_graph_examples.py): a residual Add; BatchNorm + MaxPool (ceil_mode)
    "resnet": ROOT / "examples/models/mnist_resnet.onnx",
    "bn_maxpool": ROOT / "examples/models/mnist_bn_maxpool.onnx",
}


def _timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_model(name: str, eps_list, n: int, methods, dtype, batch: int) -> list[dict]:
    net = load_model(MODELS[name]).to(dtype=dtype)
    x, y = load_dataset("mnist_sample", None, 0, max(n, batch))
    x = x.to(dtype)
    with torch.no_grad():
        pred = net.forward(x).argmax(1)
    rows = []
    for eps in eps_list:
        row: dict = {"model": name, "eps": eps, "n": n, "engines": {}}
        for m in methods:
            widths, times = [], []
            for i in range(n):
                box = input_box(x[i : i + 1], eps, (0.0, 1.0))
                dt, res = _timed(lambda m=m, box=box, i=i: compute_bounds(m, net, box, pred[i : i + 1],
                                                                          options=EngineOptions()))
                widths.append(float(res.bounds.width.mean()))
                times.append(dt)
            row["engines"][m.value] = {"mean_width": statistics.mean(widths), "time_per_input_s": statistics.mean(times)}
        base = row["engines"].get("ibp", {}).get("mean_width")
        for _, e in row["engines"].items():
            e["width_over_ibp"] = e["mean_width"] / base if base else None
        # IBP on a whole batch against plain autograd saliency on the same batch
        xb, tb = x[:batch], pred[:batch]
        box = input_box(xb, eps, (0.0, 1.0))
        t_ibp, _ = _timed(lambda box=box, tb=tb: compute_bounds(Method.IBP, net, box, tb), repeats=5)
        t_grad, _ = _timed(lambda xb=xb, tb=tb: saliency(net, xb, tb), repeats=5)
        row["batch"] = {"size": batch, "ibp_s": t_ibp, "autograd_s": t_grad, "ibp_over_autograd": t_ibp / t_grad}
        rows.append(row)
        print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict) -> str:
    parts = [f"{row['model']:<10} eps={row['eps']:<6}"]
    for m, e in row["engines"].items():
        r = e["width_over_ibp"]
        parts.append(f"{m}: width {e['mean_width']:.4g} (x{r:.3f} of ibp) {e['time_per_input_s']:.3f}s/input")
    b = row["batch"]
    parts.append(f"batch {b['size']}: ibp {b['ibp_s'] * 1e3:.1f} ms vs autograd {b['autograd_s'] * 1e3:.1f} ms "
                 f"(x{b['ibp_over_autograd']:.2f})")
    return " | ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--eps", nargs="+", type=float, default=[0.001, 0.01])
    ap.add_argument("--n", type=int, default=5, help="inputs per model and eps for the per-input engines")
    ap.add_argument("--batch", type=int, default=100, help="batch for the ibp-vs-autograd timing")
    ap.add_argument("--alpha", action="store_true", help="also run alpha-crown (slow)")
    ap.add_argument("--no-crown", action="store_true", help="ibp only (no auto_LiRPA needed)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [Method.IBP] + ([] if args.no_crown else [Method.CROWN]) + ([Method.ALPHA_CROWN] if args.alpha else [])
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    print(f"# torch {torch.__version__}, {args.threads} threads, {args.dtype}, {platform.processor() or platform.machine()}")
    rows = []
    for name in args.models:
        rows += bench_model(name, args.eps, args.n, methods, dtype, args.batch)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"# peak resident memory of this process: {peak_mb:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "peak_rss_mb": peak_mb}, indent=1))


if __name__ == "__main__":
    main()
