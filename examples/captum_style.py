"""Captum-style certified attributions on a plain nn.Module (runs in a few seconds).

    python examples/captum_style.py

Builds a small untrained nn.Sequential, then for one batch: the attribution (captum's value),
sound bounds on it over an ℓ∞ ball of inputs, certified properties, and a certified
max-sensitivity score.
"""
from __future__ import annotations

import torch
from torch import nn

from verigrad import CertifiedIntegratedGradients, CertifiedSaliency
from verigrad.metrics import CertifiedMaxSensitivity


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    x = torch.randn(4, 6)
    target = [0, 1, 2, 1]

    sal = CertifiedSaliency(model)  # converted once; the module itself is never modified
    print("saliency |∂o/∂x|:\n", sal.attribute(x, target))
    b = sal.attribute_bounds(x, target, epsilon=0.01, method="crown")
    print("bound width over the ε = 0.01 box (mean per sample):", b.width.mean(dim=1))

    verdicts = sal.certify(x, [{"kind": "untargeted", "metric": "l2", "threshold": 0.05},
                               {"kind": "topk", "k": 2, "threshold": 1.0}], target, epsilon=0.01)
    for i, rows in enumerate(verdicts):
        print(f"sample {i}: " + ", ".join(f"{r.name} {r.verdict.value} (worst {r.worst_case:.4g})" for r in rows))

    ig = CertifiedIntegratedGradients(model)
    print("integrated gradients:\n", ig.attribute(x, target, n_steps=20))
    ig_b = ig.attribute_bounds(x, target, epsilon=0.01, n_steps=20)
    print("IG bounds contain the attribution:",
          bool(((ig_b.lower <= ig.attribute(x, target, n_steps=20)) & (ig.attribute(x, target, n_steps=20) <= ig_b.upper)).all()))

    ms = CertifiedMaxSensitivity(perturb_radius=0.01)(model, x.numpy(), target, explain_func="Saliency")
    print("certified max-sensitivity (sound upper bound per sample):", ms)


if __name__ == "__main__":
    main()
