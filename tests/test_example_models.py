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


@pytest.mark.slow
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


def test_shipped_gradcert_model_certifies_where_vanilla_does_not():
    """The robust example model (GradCert, ε = 0.01) is IBP-certified on held-out sample
    images for the demo's properties; the vanilla model with the same architecture is not."""
    from verigrad.spec import spec_from_dict
    from verigrad.verify import prepare, verify_instance

    def certified(model: str) -> int:
        spec = spec_from_dict({
            "model": {"path": str(ROOT / f"examples/models/{model}.onnx")},
            "data": {"dataset": "mnist_sample", "start": 0, "end": 5},
            "perturbation": {"input": {"epsilon": 0.01}},
            "properties": [{"name": "l2n", "kind": "untargeted", "metric": "l2", "normalize": "l2", "threshold": 0.3},
                           {"name": "top20", "kind": "topk", "k": 20, "threshold": 0.5}],
            "bounds": {"methods": ["ibp"]}, "attack": {"order": "skip"},
        })
        p = prepare(spec)
        return sum(v.value == "certified" for i in range(5) for v in verify_instance(p, i).verdicts.values())

    assert certified("mnist_fc_gradcert") == 10
    assert certified("mnist_fc") == 0


def test_fairness_models_bound_exposes_the_biased_one():
    """The shipped German-credit models: the certified bound on |attribution of sex| over the
    ε-box holds (≤ 0.5) for the model trained on the original labels and fails for the one
    trained with an induced bias, on held-out applicants."""
    from verigrad.spec import spec_from_dict
    from verigrad.verify import prepare, verify_instance

    def worst(model: str) -> list[float]:
        spec = spec_from_dict({
            "model": {"path": str(ROOT / f"examples/models/{model}.onnx"), "input_shape": [25]},
            "data": {"dataset": "german_credit", "start": 800, "end": 830},
            "explanation": {"target": 1},
            "perturbation": {"input": {"epsilon": 0.01}},
            "properties": [{"name": "sex", "kind": "feature_bound", "features": [0], "threshold": 0.5}],
            "bounds": {"methods": ["ibp"]}, "attack": {"order": "skip"},
        })
        p = prepare(spec)
        return [verify_instance(p, i).engines[0].properties[0].worst_case for i in range(30)]

    assert max(worst("german_fc_fair")) <= 0.5
    assert min(worst("german_fc_biased")) > 1.0
