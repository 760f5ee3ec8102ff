"""Engines on the shipped example models (real MNIST): CROWN is tighter than IBP on average,
and both contain autograd's gradient at sampled points of the clipped box."""
from pathlib import Path

import pytest
import torch

from verigrad.bounds import compute_bounds
from verigrad.data import load_dataset
from verigrad.models import load_model
from verigrad.perturbation import input_box
from tests.helpers import assert_contains_true_gradients
from verigrad.graph.gradient_graph import Output

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,eps,n", [("mnist_fc", 0.01, 3), ("mnist_cnn", 0.01, 2), ("mnist_softplus", 0.01, 3)])
def test_crown_tighter_than_ibp_and_both_sound(name, eps, n):
    net = load_model(ROOT / f"examples/models/{name}.onnx").to(dtype=torch.float64)
    x, y = load_dataset("mnist_sample", None, 0, n)
    x = x.double()
    widths = {"ibp": [], "crown": []}
    for i in range(n):
        box = input_box(x[i : i + 1], eps, (0.0, 1.0))
        t = y[i : i + 1]
        for m in widths:
            b = compute_bounds(m, net, box, t).bounds
            widths[m].append(float(b.width.mean()))
            assert_contains_true_gradients(b, net, box, t, Output.LOGIT, n=100, seed=i)
    ibp, crown = sum(widths["ibp"]) / n, sum(widths["crown"]) / n
    assert crown <= ibp
    assert crown <= 0.5 * ibp, (name, crown, ibp)
