"""Benchmark the bound engines on the shipped example models (not a test: numbers vary by machine).

Prints, per model and ε: mean bound width per engine, the width ratio against IBP, time per
input per engine, and — on a batch of 100 MNIST inputs — IBP time against plain autograd
saliency time. Peak resident memory of the process is reported at the end. All ratios are
measured within one run.

    python tools/bench_bounds.py                       # defaults: every model below at ε 0.001, 0.01
    python tools/bench_bounds.py --models fc --eps 0.01 --n 10 --alpha --json out.json
    python tools/bench_bounds.py --targets             # the speed targets, each with its measured value

``--targets`` measures, in one run: CROWN s/image on the MNIST MLP and CNN (warm: the traced
graph of the class reused) against the upstream auto_LiRPA 0.7 Jacobian-bound figures measured
side by side on an idle 2-core machine; CROWN per input on nets with ≤ 10 inputs and ≤ 100
hidden units; a batch of 100 MNIST inputs in one call against 100 single calls (with the graph
reused, and each converted afresh as before it was memoised); the 3×32×32 CNN's time and peak
memory (in a fresh process).
"""
from __future__ import annotations

import argparse
import json
import math
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


# upstream auto_LiRPA 0.7 (JacobianOP) CROWN s/image, measured side by side with verigrad on an idle
# 2-core machine on the same boxes (float32)
UPSTREAM_S = {("fc", 0.001): 0.029, ("fc", 0.01): 0.032, ("cnn", 0.001): 2.57, ("cnn", 0.01): 2.53}


def _crown_s(net, x, pred, eps: float, n: int, fresh: bool = False) -> float:
    """Median CROWN seconds per input over n inputs of one class (warm: after a first call)."""
    from verigrad.bounds.lirpa import crown_bounds

    c = int(pred[0])
    idx = [i for i in range(len(x)) if int(pred[i]) == c][:n] or [0]
    times = []
    crown_bounds(net, input_box(x[idx[0] : idx[0] + 1], eps, (0.0, 1.0)), pred[idx[0] : idx[0] + 1])
    for i in idx:
        box = input_box(x[i : i + 1], eps, (0.0, 1.0))
        target = net if not fresh else net.to()  # a fresh copy: nothing memoised
        t0 = time.perf_counter()
        crown_bounds(target, box, pred[i : i + 1])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def targets(dtype: torch.dtype, n: int) -> list[dict]:
    """Every speed target of the issue with its measured value."""
    import subprocess
    import sys

    from verigrad.bounds.lirpa import CrownOptions, crown_bounds

    sys.path.insert(0, str(ROOT / "tools"))
    import profile_crown

    rows: list[dict] = []

    def row(name: str, value: float, unit: str, target: float, op: str, note: str = "") -> None:
        met = value <= target if op == "<=" else value >= target
        rows.append({"target": name, "value": value, "unit": unit, "goal": f"{op} {target:g}", "met": met, "note": note})
        print(f"| {name} | {value:.3g} {unit} | {op} {target:g} | {'met' if met else 'NOT met'} | {note} |", flush=True)

    print("| target | measured | goal | | note |\n|---|---|---|---|---|")
    x, _ = load_dataset("mnist_sample", None, 0, 100)
    x = x.to(dtype)
    for key in ("fc", "cnn"):
        net = load_model(MODELS[key]).to(dtype=dtype)
        with torch.no_grad():
            pred = net.forward(x).argmax(1)
        for eps in (0.001, 0.01):
            up = UPSTREAM_S[(key, eps)]
            s = _crown_s(net, x, pred, eps, n)
            row(f"mnist_{key} CROWN s/image, ε {eps}", s, "s", up, "<=", f"upstream 0.7: {up} s (×{s / up:.2f})")
    for name in ("small_mlp", "control"):
        net, xs = profile_crown.load(name, dtype)
        with torch.no_grad():
            pred = net.forward(xs).argmax(1)
        s = _crown_s(net, xs, pred, 0.01, n)
        hidden = sum(math.prod(sh) for sh in net.shapes[1:-1]) // 2  # each hidden layer: affine + activation
        row(f"{net.source} CROWN s/input", s, "s", 0.05, "<=",
            "≤ 10 inputs, ≤ 100 hidden units" if name == "small_mlp" else f"{hidden} hidden units: outside the target's class")
    # a batch of 100 MNIST inputs: one call (per class, max_batch 100) against 100 single calls
    net = load_model(MODELS["fc"]).to(dtype=dtype)
    with torch.no_grad():
        pred = net.forward(x).argmax(1)
    box = input_box(x, 0.001, (0.0, 1.0))
    crown_bounds(net, box, pred, options=CrownOptions(max_batch=100))  # warm every class and batch size
    t_batch, _ = _timed(lambda: crown_bounds(net, box, pred, options=CrownOptions(max_batch=100)))
    t_single, _ = _timed(lambda: [crown_bounds(net, box[i : i + 1], pred[i : i + 1]) for i in range(100)])
    t_cold, _ = _timed(lambda: [crown_bounds(net.to(), box[i : i + 1], pred[i : i + 1]) for i in range(100)])
    row("batch of 100 (mnist_fc): 100 single calls / one batched call", t_single / t_batch, "×", 3.0, ">=",
        f"batched {t_batch:.2f} s, single {t_single:.2f} s (graph reused), single {t_cold:.2f} s converted "
        f"each time as before the memo (×{t_cold / t_batch:.2f})")
    # the 3×32×32 CNN in a fresh process (its own peak memory)
    cmd = [sys.executable, str(ROOT / "tools/profile_crown.py"), "--worker", "cifar_cnn", "--n", str(max(n, 2)),
           "--eps", "0.01", "--dtype", str(dtype).removeprefix("torch."), "--threads", str(torch.get_num_threads()),
           "--no-split"]
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    row("cifar_cnn (3×32×32) CROWN s/input", r["warm_s"], "s", 1.0, "<=", f"first input {r['cold_s']:.2f} s (conversion)")
    row("cifar_cnn (3×32×32) peak RSS", r["peak_rss_mb"] / 1024, "GB", 1.0, "<=", "whole process, auto_LiRPA import included")
    return rows


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
    ap.add_argument("--targets", action="store_true", help="the speed targets, each with its measured value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.targets:
        dtype = torch.float64 if args.dtype == "float64" else torch.float32
        print(f"# speed targets, torch {torch.__version__}, {args.threads} threads, {args.dtype}")
        rows = targets(dtype, args.n)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
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
