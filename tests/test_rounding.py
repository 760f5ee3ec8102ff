"""Rounding before a verdict: float32 bounds widened by the allowance of verigrad.bounds.rounding
contain the float64 truth, and a margin within round-off is unknown, never certified."""
import pytest
import torch

from tests.helpers import ACT_IDS, ACTS, box_points, random_mlp
from verigrad import properties as props
from verigrad.bounds import Bounds, compute_bounds, rounding
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.models.network import Linear, Network
from verigrad.perturbation import input_box
from verigrad.properties import Kind, Property, Verdict

F32, F64 = torch.float32, torch.float64


def _two_layer(w1: float, w2: float) -> Network:
    t = lambda v: torch.tensor([[v]], dtype=F32)  # noqa: E731
    return Network((Linear("a", t(w1), torch.zeros(1, dtype=F32)), Linear("b", t(w2), torch.zeros(1, dtype=F32))),
                   (1,), "two_layer")


def test_a_margin_inside_float32_round_off_is_unknown_not_certified():
    # v = ∂(w2·w1·x)/∂x = w2·w1: exact in float64 for float32 weights, rounded down in float32
    w1, w2 = 1.0 + 2.0 ** -23, 1.0 + 2.0 ** -22
    net = _two_layer(w1, w2)
    exact = float(torch.tensor(w1, dtype=F32).double() * torch.tensor(w2, dtype=F32).double())
    computed = float(torch.tensor(w1, dtype=F32) * torch.tensor(w2, dtype=F32))
    assert computed < exact  # float32 rounds the true map value down
    prop = Property("small", Kind.FEATURE_BOUND, None, computed, features=(0,))  # |v_0| <= the rounded value
    x = torch.zeros(1, 1, dtype=F32)
    target = torch.tensor([0])
    raw = compute_bounds("ibp", net, input_box(x, 0.0, None), target, Output.LOGIT).bounds
    v0 = saliency(net, x, target)
    assert props.evaluate(prop, v0, raw)[0].verdict == Verdict.CERTIFIED  # round-off alone would certify it
    truth = saliency(net.to(dtype=F64), x.double(), target)
    assert float(truth.abs().max()) > prop.threshold  # ...though the exact map violates it
    widened, note = rounding.widen(net, raw, F32)
    assert props.evaluate(prop, v0, widened)[0].verdict == Verdict.UNKNOWN and "float32" in note


@pytest.mark.parametrize("act, param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_float64_truth_lies_in_widened_float32_bounds(act, param, eps, method):
    net = random_mlp(act, param, sizes=(12, 16, 16, 5), seed=3, dtype=F32)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 12, generator=gen, dtype=F32)
    target = torch.tensor([2])
    box = input_box(x, eps, (0.0, 1.0))
    raw = compute_bounds(method, net, box, target, Output.LOGIT).bounds
    widened, _ = rounding.widen(net, raw, F32)
    net64 = net.to(dtype=F64)
    pts = box_points(box.to(F64), 200, 200, seed=2)
    g = saliency(net64, pts, target.expand(len(pts)))
    lo, up = widened.lower.double(), widened.upper.double()
    assert bool(((g >= lo) & (g <= up)).all()), float(torch.maximum(lo - g, g - up).max())
    if eps == 0.0:  # at a point the raw float32 value misses the float64 truth: the widening is needed
        assert not torch.equal(raw.lower.double(), g[:1])


def test_the_allowance_is_negligible_in_float64_and_scales_with_the_network():
    net = random_mlp(ACTS[0][0], sizes=(784, 256, 10), dtype=F64)
    b = Bounds(torch.full((1, 784), -0.5, dtype=F64), torch.full((1, 784), 0.25, dtype=F64))
    a = rounding.allowance(b, rounding.chain_length(net), F64)
    assert float(a.max()) < 1e-11
    small = random_mlp(ACTS[0][0], sizes=(4, 4, 2), dtype=F64)
    assert rounding.chain_length(small) < rounding.chain_length(net)
    with pytest.raises(ValueError, match="compute in float64"):
        rounding.gamma(2 ** 24, F32)


def test_intersect_tolerates_round_off_but_not_disjoint_bounds():
    from verigrad.bounds import BoundsError

    a = Bounds(torch.tensor([[-1.0, 1.0]], dtype=F64), torch.tensor([[0.0, 2.0]], dtype=F64))
    b = Bounds(torch.tensor([[2.8e-17, 1.5]], dtype=F64), torch.tensor([[3.0, 1.7]], dtype=F64))
    c = a.intersect(b)  # IBP and CROWN agreeing to 2.8e-17 used to be an internal error
    assert float(c.lower[0, 0]) == 0.0 and float(c.upper[0, 0]) == 2.8e-17 and float(c.lower[0, 1]) == 1.5
    with pytest.raises(BoundsError, match="unsound"):
        a.intersect(Bounds(torch.tensor([[1.1, 1.0]], dtype=F64), torch.tensor([[2.0, 2.0]], dtype=F64)))


def test_the_pipeline_decides_on_widened_bounds(tmp_path):
    from pathlib import Path

    import yaml

    import verigrad.verify as vmod
    from verigrad.spec import load_spec

    root = Path(__file__).resolve().parents[1]
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({
        "model": {"path": str(root / "examples/models/mnist_fc.onnx")},
        "data": {"dataset": "mnist_sample", "start": 0, "end": 1}, "perturbation": {"input": {"epsilon": 0.001}},
        "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1.0}],
        "bounds": {"methods": ["ibp"], "dtype": "float32"}, "attack": {"order": "skip"}}))
    problem = vmod.prepare(load_spec(p))
    r = vmod.verify_instance(problem, 0)
    (run,) = r.engines
    assert any(n.startswith("rounding: ") and "float32" in n for n in run.notes)
    inst = vmod.instance(problem, 0)
    raw = compute_bounds("ibp", problem.net, inst.threat.box, inst.threat.target_tensor).bounds
    assert bool((run.bounds.lower < raw.lower).all()) and bool((run.bounds.upper > raw.upper).all())
