"""Peak memory and time of CROWN against the output chunk size (not a test: numbers vary by machine).

For each model and each output_chunk setting, a fresh subprocess loads the model, bounds n inputs
with CROWN (float64, ℓ∞ box of radius ε clipped to [0, 1]) and reports its peak resident set size
(resource.getrusage(RUSAGE_SELF).ru_maxrss) and the mean time per input. A "setup" row (model
loaded, auto_LiRPA imported, nothing bounded) gives the baseline every other row includes. The
largest difference between each chunked result and the unchunked one is printed too. Prints a
markdown table.

Models: cifar_cnn (3×32×32 input, random weights: conv 3→8 4×4 s2, conv 8→16 4×4 s2, fc 64, out
10; d = 3072) and the shipped MNIST nets (d = 784).

    python tools/bench_crown_memory.py                         # cifar_cnn and mnist_fc, chunks full, 512, 128
    python tools/bench_crown_memory.py --models mnist_cnn --chunks full 256 --n 3 --alpha
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST = {
    "mnist_fc": ROOT / "examples/models/mnist_fc.onnx",
    "mnist_cnn": ROOT / "examples/models/mnist_cnn.onnx",
}


def _worker(model: str, chunk: str, n: int, eps: float, alpha: bool, out: str) -> None:
    """One setting in this (fresh) process; writes JSON (and the bounds, for the comparison)."""
    import torch

    from verigrad.bounds import lirpa  # noqa: F401 - import auto_LiRPA before the baseline is read
    from verigrad.perturbation import input_box

    if model == "cifar_cnn":
        from tests.helpers import cifar_cnn  # the net the memory test uses

        net = cifar_cnn()
        x = torch.rand(n, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    else:
        from verigrad.data import load_dataset
        from verigrad.models import load_model

        net = load_model(MNIST[model]).to(dtype=torch.float64)
        x = load_dataset("mnist_sample", None, 0, n)[0].to(torch.float64)
    with torch.no_grad():
        pred = net.forward(x).argmax(1)
    rec: dict = {"model": model, "chunk": chunk, "d": int(x[0].numel()), "n": n}
    if chunk != "setup":
        # full: d rows, the unchunked path; auto: chosen from the default memory budget
        rows = int(x[0].numel()) if chunk == "full" else None if chunk == "auto" else int(chunk)
        opts = lirpa.CrownOptions(output_chunk=rows)
        lows, ups, times, notes = [], [], [], set()
        for i in range(n):
            box = input_box(x[i : i + 1], eps, (0.0, 1.0))
            t0 = time.perf_counter()
            res = lirpa.crown_bounds(net, box, pred[i : i + 1], alpha=alpha, options=opts)
            times.append(time.perf_counter() - t0)
            lows.append(res.bounds.lower)
            ups.append(res.bounds.upper)
            notes.update(nt for nt in res.notes if "chunks of" in nt)
        rec.update(time_per_input=sum(times) / n, width=float(torch.cat(ups).sub(torch.cat(lows)).mean()),
                   notes=sorted(notes))
        torch.save((torch.cat(lows), torch.cat(ups)), out + ".pt")
    rec["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    Path(out).write_text(json.dumps(rec))


def _run(model: str, chunk: str, n: int, eps: float, alpha: bool, tmp: Path) -> dict:
    out = str(tmp / f"{model}_{chunk}.json")
    cmd = [sys.executable, __file__, "--worker", model, chunk, str(n), str(eps), str(int(alpha)), out]
    subprocess.run(cmd, check=True, cwd=ROOT)
    rec = json.loads(Path(out).read_text())
    rec["bounds"] = out + ".pt" if chunk != "setup" else None
    return rec


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model, chunk, n, eps, alpha, out = sys.argv[2:8]
        sys.path.insert(0, str(ROOT))
        _worker(model, chunk, int(n), float(eps), bool(int(alpha)), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--models", nargs="+", default=["cifar_cnn", "mnist_fc"], choices=["cifar_cnn", *MNIST])
    ap.add_argument("--chunks", nargs="+", default=["full", "512", "128"], help="'full', 'auto' or row counts")
    ap.add_argument("--n", type=int, default=3, help="inputs per setting")
    ap.add_argument("--eps", type=float, default=0.01)
    ap.add_argument("--alpha", action="store_true", help="alpha-CROWN instead of CROWN")
    args = ap.parse_args()
    import torch

    engine = "alpha-CROWN" if args.alpha else "CROWN"
    print(f"{engine}, float64, ε = {args.eps}, {args.n} input(s) per setting, one subprocess per row; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | d | output_chunk | passes | peak RSS (MB) | over setup (MB) | time / input (s) | max diff vs "
          f"{'full' if 'full' in args.chunks else args.chunks[0]} |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            base = _run(model, "setup", args.n, args.eps, args.alpha, Path(tmp))
            print(f"| {model} | {base['d']} | setup only | – | {base['maxrss_mb']:.0f} | 0 | – | – |")
            recs = [_run(model, chunk, args.n, args.eps, args.alpha, Path(tmp)) for chunk in args.chunks]
            first = args.chunks.index("full") if "full" in args.chunks else 0
            ref = torch.load(recs[first]["bounds"])
            for chunk, rec in zip(args.chunks, recs, strict=True):
                lo, up = torch.load(rec["bounds"])
                diff = max(float((lo - ref[0]).abs().max()), float((up - ref[1]).abs().max()))
                found = [re.search(r"bounded in (\d+) chunks", nt) for nt in rec["notes"]]
                passes = max([int(m.group(1)) for m in found if m] or [1])
                print(f"| {model} | {rec['d']} | {chunk} | {passes} | {rec['maxrss_mb']:.0f} | "
                      f"{rec['maxrss_mb'] - base['maxrss_mb']:.0f} | {rec['time_per_input']:.2f} | {diff:.1e} |",
                      flush=True)


if __name__ == "__main__":
    main()
