"""The CUDA path against the CPU one (not a test: needs a GPU; skips cleanly without one).

For each shipped model, n MNIST inputs are bounded with IBP, CROWN and alpha-CROWN on the CPU
and on CUDA (same boxes, same dtype), and the script reports per engine the time per input on
each device and the largest difference between the two bound maps relative to the map's scale
(max |l_cpu − l_cuda|, |u_cpu − u_cuda| over 1 + max |bound|); it must be ≤ --tol (1e-6 by
default). A ``verigrad verify`` of one shipped spec with ``general.device: cuda`` closes the run.
Exit 0 when everything agrees (or no CUDA device is visible: "skipped"), 1 when a bound map
differs beyond the tolerance, 2 on a failure.

    python tools/check_cuda.py                              # all shipped MNIST models, n = 3, float64
    python tools/check_cuda.py --models mnist_fc --n 10 --dtype float32 --no-alpha
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mnist_fc", "mnist_cnn", "mnist_softplus", "mnist_resnet", "mnist_bn_maxpool")


def _bounds(method, net, box, target, options):
    from verigrad.bounds import compute_bounds

    t0 = time.perf_counter()
    res = compute_bounds(method, net, box, target, options=options)
    if box.lower.device.type == "cuda":
        torch.cuda.synchronize()
    return res.bounds, time.perf_counter() - t0


def check_model(name: str, n: int, eps: float, dtype: torch.dtype, methods, tol: float) -> list[dict]:
    from verigrad.bounds import EngineOptions
    from verigrad.data import load_dataset
    from verigrad.models import load_model
    from verigrad.perturbation import input_box

    opts = EngineOptions(alpha_iterations=10)
    cpu_net = load_model(ROOT / f"examples/models/{name}.onnx").to(dtype=dtype)
    gpu_net = cpu_net.to(device="cuda")
    x = load_dataset("mnist_sample", None, 0, n)[0].to(dtype)
    with torch.no_grad():
        pred = cpu_net.forward(x).argmax(1)
    rows = []
    for m in methods:
        diff, t_cpu, t_gpu = 0.0, [], []
        for i in range(n):
            box = input_box(x[i : i + 1], eps, (0.0, 1.0))
            b_cpu, dt_cpu = _bounds(m, cpu_net, box, pred[i : i + 1], opts)
            gbox = type(box)(box.lower.cuda(), box.upper.cuda())
            b_gpu, dt_gpu = _bounds(m, gpu_net, gbox, pred[i : i + 1].cuda(), opts)
            scale = 1.0 + float(torch.maximum(b_cpu.lower.abs(), b_cpu.upper.abs()).max())
            d = max(float((b_cpu.lower - b_gpu.lower.cpu()).abs().max()), float((b_cpu.upper - b_gpu.upper.cpu()).abs().max()))
            diff = max(diff, d / scale)
            t_cpu.append(dt_cpu)
            t_gpu.append(dt_gpu)
        # the first call of each class converts the graph: report the later ones where there are any
        cpu_s = sorted(t_cpu)[len(t_cpu) // 2]
        gpu_s = sorted(t_gpu)[len(t_gpu) // 2]
        row = {"model": name, "method": str(getattr(m, "value", m)), "n": n, "cpu_s": cpu_s, "cuda_s": gpu_s,
               "max_rel_diff": diff, "ok": diff <= tol}
        rows.append(row)
        print(f"| {name} | {row['method']} | {cpu_s:.3f} | {gpu_s:.3f} | {cpu_s / gpu_s:.1f}× | {diff:.1e} | "
              f"{'ok' if row['ok'] else 'DIFFERS'} |", flush=True)
    return rows


def verify_on_cuda(spec: Path) -> int:
    """``verigrad verify`` of ``spec`` with general.device: cuda (its exit code)."""
    from click.testing import CliRunner

    from verigrad.cli import main

    out = Path(tempfile.mkdtemp(prefix="verigrad-cuda-"))
    r = CliRunner().invoke(main, ["verify", str(spec), "--device", "cuda", "--start", "0", "--end", "2",
                                  "--out", str(out / "r.json"), "--bounds-npz", str(out / "r.npz")])
    print(f"verigrad verify {spec.name} --device cuda: exit {r.exit_code}")
    return r.exit_code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--no-alpha", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA device visible to torch "
              f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'})")
        return 0
    from verigrad.bounds import Method

    methods = [Method.IBP, Method.CROWN] + ([] if args.no_alpha else [Method.ALPHA_CROWN])
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.dtype}, ε = {args.eps}; "
          "seconds per input (median), bounds compared to tol")
    print("| model | engine | CPU s | CUDA s | speed-up | max rel diff | |\n|---|---|---|---|---|---|---|")
    rows = []
    try:
        for name in args.models:
            rows += check_model(name, args.n, args.eps, dtype, methods, args.tol)
        code = verify_on_cuda(ROOT / "specs/mnist_resnet.yaml")
    except Exception as e:  # noqa: BLE001 - a report, not a traceback
        print(f"failed: {type(e).__name__}: {e}")
        return 2
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "verify_exit": code}, indent=1))
    if code not in (0, 1, 3):
        return 2
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
