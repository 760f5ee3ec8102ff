"""Where CROWN's time goes, per input (not a test: numbers vary by machine).

For each model, n inputs are bounded with CROWN (ℓ∞ box of radius ε clipped to [0, 1]) and
each call is split into its stages:

  graph         building the gradient graph (verigrad.graph.gradient_graph.GradientGraph)
  convert       auto_LiRPA tracing and conversion (BoundedModule); paid once per (network, class,
                output, batch size) since the model is memoised (Network.memo), 0 on later inputs
  intermediate  the bounds of every intermediate node (the CROWN passes before the last)
  final         the final backward pass over the d output rows (timed alone: intermediate
                bounds handed in as fixed, so intermediate = bounding time − final)
  overhead      the rest of the call (checks, boxes, chunk planning)

"cold" is the first input of a class (conversion included), "warm" a later one. With
``--scaling`` each configuration of a width / input-size sweep runs in a fresh subprocess and
its peak resident memory is reported too.

    python tools/profile_crown.py                          # mnist_fc, mnist_cnn, control, cifar_cnn
    python tools/profile_crown.py --models mnist_fc --n 10 --dtype float64
    python tools/profile_crown.py --scaling                # width and input-size sweeps
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("mnist_fc", "mnist_cnn", "control", "small_mlp", "cifar_cnn")


def _random_mlp(sizes: tuple[int, ...]):
    """The test suite's random ReLU MLP (He-scaled weights, seed 0), named after its sizes."""
    from tests.helpers import random_mlp
    from verigrad.models.network import ActKind, Network

    net = random_mlp(ActKind.RELU, sizes=sizes, seed=0)
    return Network(net.layers, net.input_shape, f"mlp{'-'.join(map(str, sizes))}")


def _small_cnn(shape: tuple[int, int, int], seed: int = 0):
    """conv c→16 4×4 s2 p1 → relu → conv 16→32 4×4 s1 p1 → relu → fc 100 → relu → fc 10 (the
    shipped MNIST CNN's architecture) on any input size, random weights."""
    from verigrad.models.network import ActKind, Activation, Conv2d, Linear, Network, Reshape

    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    h1, w1 = (h + 2 - 4) // 2 + 1, (w + 2 - 4) // 2 + 1
    h2, w2 = h1 + 2 - 4 + 1, w1 + 2 - 4 + 1
    flat = 32 * h2 * w2

    def conv(name, ci, co, stride):
        k = torch.randn(co, ci, 4, 4, generator=g, dtype=torch.float64) * (2.0 / (ci * 16)) ** 0.5
        return Conv2d(name, k, torch.randn(co, generator=g, dtype=torch.float64) * 0.1, (stride, stride), (1, 1))

    def lin(name, a, b):
        return Linear(name, torch.randn(b, a, generator=g, dtype=torch.float64) * (2.0 / a) ** 0.5,
                      torch.randn(b, generator=g, dtype=torch.float64) * 0.1)

    layers = (conv("conv0", c, 16, 2), Activation("act0", ActKind.RELU), conv("conv1", 16, 32, 1),
              Activation("act1", ActKind.RELU), Reshape("flatten", (flat,)), lin("fc0", flat, 100),
              Activation("act2", ActKind.RELU), lin("fc1", 100, 10))
    return Network(layers, shape, f"cnn{c}x{h}x{w}")


def load(name: str, dtype: torch.dtype):
    """(network, inputs (8, *shape)) for a model name of MODELS or a sweep entry."""
    from verigrad.data import load_dataset
    from verigrad.models import load_model

    if name in ("mnist_fc", "mnist_cnn"):
        net = load_model(ROOT / f"examples/models/{name}.onnx")
        x = load_dataset("mnist_sample", None, 0, 8)[0]
    elif name == "cifar_cnn":
        from tests.helpers import cifar_cnn

        net = cifar_cnn()
        x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    else:
        if name == "control":  # a public control-net shape: 5 inputs, 6 × 50 ReLU, 5 outputs
            net = _random_mlp((5, 50, 50, 50, 50, 50, 50, 5))
        elif name == "small_mlp":  # ≤ 10 inputs and ≤ 100 hidden units
            net = _random_mlp((8, 50, 50, 4))
        elif name.startswith("mlp"):
            net = _random_mlp(tuple(int(s) for s in name[3:].split("-")))
        elif name.startswith("cnn"):
            net = _small_cnn(tuple(int(s) for s in name[3:].split("x")))  # type: ignore[arg-type]
        else:
            raise SystemExit(f"unknown model {name!r}")
        x = torch.rand(8, *net.input_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return net.to(dtype=dtype), x.to(dtype)


class _Stages:
    """Wraps the adapter's conversion and graph construction to time them."""

    def __init__(self) -> None:
        from verigrad.bounds import lirpa

        self.lirpa = lirpa
        self.t = {"graph": 0.0, "convert": 0.0}
        self._graph, self._init = lirpa._perturbed_graph, lirpa._GradBoundedModule.__init__
        stages = self

        def graph(*a, **k):
            t0 = time.perf_counter()
            try:
                return stages._graph(*a, **k)
            finally:
                stages.t["graph"] += time.perf_counter() - t0

        def init(model, *a, **k):
            t0 = time.perf_counter()
            try:
                stages._init(model, *a, **k)
            finally:
                stages.t["convert"] += time.perf_counter() - t0

        lirpa._perturbed_graph = graph
        lirpa._GradBoundedModule.__init__ = init

    def reset(self) -> None:
        self.t = {"graph": 0.0, "convert": 0.0}


def _final_pass_s(net, box, target: int) -> float:
    """The final backward pass alone, on the memoised model of the call that just ran."""
    from auto_LiRPA import BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    lirpa = sys.modules["verigrad.bounds.lirpa"]
    graph, model = list(net._memo.values())[-1]
    centre = box.center
    seed = (lirpa._seed_input(graph, net, target, 1, None),) if graph.uses_row_seed else ()
    x = (BoundedTensor(centre, PerturbationLpNorm(norm=math.inf, x_L=box.lower, x_U=box.upper)), *seed)
    fixed = lirpa._intermediate_bounds(model)
    with lirpa._lirpa_context(net.dtype), torch.no_grad():
        t0 = time.perf_counter()
        model.compute_bounds(x=x, method="backward", intermediate_layer_bounds=fixed)
        dt = time.perf_counter() - t0
    lirpa._release(model)
    return dt


def profile(name: str, n: int, eps: float, dtype: torch.dtype, split: bool = True) -> dict:
    """Stage times of n CROWN calls on model ``name``; ``split`` False skips the extra final
    pass and the IBP call (so the peak memory is CROWN's own)."""
    from verigrad.bounds import Method, compute_bounds
    from verigrad.perturbation import input_box

    stages = _Stages()
    net, x = load(name, dtype)
    with torch.no_grad():
        pred = net.forward(x).argmax(1)
    c = int(pred[0])  # every input explained for one class: the first is cold, the others warm
    target = torch.tensor([c])
    rows = []
    for i in range(n):
        box = input_box(x[i % len(x) : i % len(x) + 1], eps, (0.0, 1.0))
        stages.reset()
        t0 = time.perf_counter()
        compute_bounds(Method.CROWN, net, box, target)
        total = time.perf_counter() - t0
        final, ibp = 0.0, 0.0
        if split:
            final = _final_pass_s(net, box, c)
            t1 = time.perf_counter()
            compute_bounds(Method.IBP, net, box, target)
            ibp = time.perf_counter() - t1
        rows.append({"total": total, "final": final, "ibp": ibp, **stages.t})
    cold, warm = rows[0], rows[1:] or rows

    def med(key: str) -> float:
        return statistics.median(r[key] for r in warm)

    bounding = med("total") - med("graph") - med("convert")
    out = {"model": name, "d": int(x[0].numel()), "n": n, "eps": eps, "dtype": str(dtype).removeprefix("torch."),
           "cold_s": cold["total"], "cold_graph_s": cold["graph"], "cold_convert_s": cold["convert"],
           "warm_s": med("total"), "warm_final_s": med("final"),
           "warm_intermediate_s": max(bounding - med("final"), 0.0), "ibp_s": med("ibp"),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return out


def _row(r: dict) -> str:
    ms = 1e3
    return (f"| {r['model']} | {r['d']} | {r['cold_s'] * ms:.0f} | {r['cold_graph_s'] * ms:.1f} | "
            f"{r['cold_convert_s'] * ms:.0f} | {r['warm_s'] * ms:.1f} | {r['warm_intermediate_s'] * ms:.1f} | "
            f"{r['warm_final_s'] * ms:.1f} | {r['ibp_s'] * ms:.2f} | {r['peak_rss_mb']:.0f} |")


HEADER = ("| model | d | cold ms | graph ms | convert ms | warm ms | intermediate ms | final ms | IBP ms | "
          "peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|")
SWEEP = ("mlp784-64-64-10", "mlp784-256-256-10", "mlp784-1024-1024-10", "cnn1x28x28", "cnn3x32x32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--n", type=int, default=6, help="inputs per model (the first is cold)")
    ap.add_argument("--eps", type=float, default=0.001)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scaling", action="store_true", help="the width / input-size sweep, one process each")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--no-split", action="store_true", help="time whole calls only (peak memory of CROWN alone)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    if args.worker:  # one sweep entry in a fresh process: its peak memory is its own
        print(json.dumps(profile(args.worker, args.n, args.eps, dtype, split=not args.no_split)))
        return
    print(f"# CROWN stages per input, ε = {args.eps}, {args.dtype}, torch {torch.__version__}, {args.threads} threads; "
          "warm = median over the later inputs")
    print(HEADER)
    rows = []
    names = SWEEP if args.scaling else args.models
    for name in names:
        if args.scaling:
            cmd = [sys.executable, __file__, "--worker", name, "--n", str(args.n), "--eps", str(args.eps),
                   "--dtype", args.dtype, "--threads", str(args.threads)] + (["--no-split"] if args.no_split else [])
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        else:
            r = profile(name, args.n, args.eps, dtype)
        rows.append(r)
        print(_row(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
