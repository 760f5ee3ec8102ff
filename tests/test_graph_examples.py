"""The shipped DAG example models (tools/train_graph_examples.py) and their specs:
``mnist_resnet.onnx`` (a residual Add) and ``mnist_bn_maxpool.onnx`` (BatchNormalization after
ReLU, MaxPool with ceil_mode). Loader against onnx's own reference evaluator, accuracy on the
shipped sample, exactness of the engines at ε = 0, soundness at the specs' ε."""
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import assert_contains_true_gradients
from verigrad.bounds import compute_bounds
from verigrad.data import load_dataset
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.models import load_model
from verigrad.perturbation import input_box
from verigrad.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["mnist_resnet", "mnist_bn_maxpool"]
# ops each file must keep, so the test exercises what the model is shipped for
OPS = {"mnist_resnet": {"Add", "Conv", "Gemm"}, "mnist_bn_maxpool": {"BatchNormalization", "MaxPool"}}


def _net(name: str):
    return load_model(ROOT / f"examples/models/{name}.onnx").to(dtype=torch.float64)


def _spec(name: str):
    return load_spec(ROOT / f"specs/{name}.yaml")


@pytest.fixture(scope="module")
def sample():
    x, y = load_dataset("mnist_sample", None, 0, 20)
    return x.double(), y


def _reference_logits(model, x: np.ndarray) -> np.ndarray:
    """onnx.reference's logits. Its opset-9..13 BatchNormalization uses batch statistics
    whenever ``momentum`` is set (and fills a missing one with 0.9), while a one-output
    BatchNormalization of those opsets is inference with the stored statistics; so the copy
    evaluated here declares opset 15 with ``training_mode=0`` (the other ops of these models
    mean the same in 13 and 15). tools/train_graph_examples.py does the same."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for node in bns:
        keep = [a for a in node.attribute if a.name not in ("momentum", "training_mode")]
        del node.attribute[:]
        node.attribute.extend(keep + [onnx.helper.make_attribute("training_mode", 0)])
    if bns:
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = max(imp.version, 15)
    (out,) = ReferenceEvaluator(model).run(None, {"input": x})
    return out


@pytest.mark.parametrize("name", MODELS)
def test_loads_and_matches_onnx_reference(name, sample):
    """verigrad's network computes the file's logits (onnx.reference, float32) and classifies
    most of the first 20 (held-out) sample images correctly."""
    import onnx

    path = ROOT / f"examples/models/{name}.onnx"
    model = onnx.load(str(path))
    assert OPS[name] <= {n.op_type for n in model.graph.node}
    if name == "mnist_bn_maxpool":
        pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
        assert any(a.name == "ceil_mode" and a.i == 1 for n in pools for a in n.attribute)
    x, y = sample
    net = _net(name)
    assert net.input_shape == (1, 28, 28)
    ref = _reference_logits(model, x.float().numpy())
    with torch.no_grad():
        z = net.forward(x)
    np.testing.assert_allclose(z.numpy(), ref.astype(np.float64), rtol=0, atol=1e-4)
    assert int((z.argmax(1) == y).sum()) >= 16


@pytest.mark.parametrize("name", MODELS)
def test_sample_accuracy_agrees_with_readme(name):
    """On all 100 sample images, within a 4-sigma band of the README's 1000-image test accuracy."""
    import json

    record = next(line for line in (ROOT / "examples/models/README.md").read_text(encoding="utf-8").splitlines()
                  if line.startswith("<!-- results: "))
    reported = json.loads(record[len("<!-- results: "):-len(" -->")])[name]["test_acc"]
    x, y = load_dataset("mnist_sample")
    with torch.no_grad():
        acc = (_net(name).forward(x.double()).argmax(1) == y).double().mean().item()
    assert acc >= 0.85 and abs(acc - reported) <= 0.08, (acc, reported)


def _check_exact(net, x: torch.Tensor, ties: bool = False) -> None:
    """The engines at ε = 0 give autograd's gradient (to 1e-9). With exact MaxPool ties
    (``ties``) the rigorous engines cannot tell a tie from a near-tie within round-off (IBP's
    outward rounding, CROWN's widened intermediate bounds), so they bound every tied tap's
    gradient: there they must contain autograd's, and the plain interval rules are exact."""
    from verigrad.bounds.ibp import ibp_bounds

    pred = net.forward(x).argmax(1)
    v0 = saliency(net, x, pred)
    for i in range(len(x)):
        box = input_box(x[i : i + 1], 0.0, (0.0, 1.0))
        results = {m: compute_bounds(m, net, box, pred[i : i + 1]).bounds for m in ("ibp", "crown")}
        if ties:
            for m, b in results.items():
                assert bool(b.contains(v0[i : i + 1], tol=1e-9).all()), f"{m}, input {i}"
            results = {"plain ibp": ibp_bounds(net, box, pred[i : i + 1]).bounds}
        for m, b in results.items():
            torch.testing.assert_close(b.lower[0], v0[i], rtol=0, atol=1e-9, msg=f"{m} lower, input {i}")
            torch.testing.assert_close(b.upper[0], v0[i], rtol=0, atol=1e-9, msg=f"{m} upper, input {i}")


def _tie_broken(x: torch.Tensor) -> torch.Tensor:
    """x plus uniform noise in [0, 1e-3): no two taps of a MaxPool window are equal any more."""
    gen = torch.Generator().manual_seed(0)
    return (x + 1e-3 * torch.rand(x.shape, generator=gen, dtype=x.dtype)).clamp(0.0, 1.0)


def test_resnet_bounds_exact_at_zero_radius(sample):
    net = _net("mnist_resnet")
    _check_exact(net, sample[0][:2])
    _check_exact(net, _tie_broken(sample[0][:2]))


def test_bn_maxpool_bounds_exact_at_zero_radius_with_and_without_ties(sample):
    """On real MNIST the flat zero background makes the taps of many MaxPool windows exactly
    equal. At ε = 0 those ties hold at every point of the box, so the argmax is torch's first
    tap and the plain interval rules return autograd's gradient exactly (the rigorous engines
    contain it); with the ties broken both engines are exact."""
    net = _net("mnist_bn_maxpool")
    x = sample[0][:2]
    _check_exact(net, x, ties=True)
    _check_exact(net, _tie_broken(x))


@pytest.mark.parametrize("name", MODELS)
def test_crown_sound_at_spec_epsilon(name, sample):
    """CROWN's bounds at the spec's ε contain autograd's saliency at the centre, 200 interior
    points and 200 corners of the clipped box of input 0, and are tighter than IBP's."""
    eps = _spec(name).perturbation.input.epsilon
    assert 0 < eps <= 0.01
    net = _net(name)
    x = sample[0][:1]
    t = net.forward(x).argmax(1)
    box = input_box(x, eps, (0.0, 1.0))
    crown = compute_bounds("crown", net, box, t).bounds
    assert_contains_true_gradients(crown, net, box, t, Output.LOGIT, n=200, seed=0)
    ibp = compute_bounds("ibp", net, box, t).bounds
    assert float(crown.width.mean()) < float(ibp.width.mean())


@pytest.mark.parametrize("name", MODELS)
def test_spec_validates(name):
    """The spec loads and prepares (model, data, properties), as test_spec does for all specs."""
    from verigrad.verify import prepare

    spec = _spec(name)
    assert spec.model.path == (ROOT / f"examples/models/{name}.onnx").resolve()
    assert [m.value for m in spec.bounds.methods] == ["ibp", "crown"]
    prepare(spec, methods=())
