"""Rounding before a verdict: outward-rounded IBP encloses the exact (float64) gradient and the
exact IBP result, mask decisions included; float32 bounds widened by the allowance of
verigrad.bounds.rounding contain the float64 truth; a margin within round-off is unknown,
never certified."""
import pytest
import torch

from tests.helpers import ACT_IDS, ACTS, box_points, random_mlp
from verigrad import properties as props
from verigrad.bounds import Bounds, compute_bounds, rounding
from verigrad.bounds.ibp import ibp_bounds
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
    raw = ibp_bounds(net, input_box(x, 0.0, None), target, Output.LOGIT).bounds  # round-to-nearest IBP
    v0 = saliency(net, x, target)
    assert props.evaluate(prop, v0, raw)[0].verdict == Verdict.CERTIFIED  # round-off alone would certify it
    truth = saliency(net.to(dtype=F64), x.double(), target)
    assert float(truth.abs().max()) > prop.threshold  # ...though the exact map violates it
    widened, note = rounding.widen(net, raw, F32)
    assert props.evaluate(prop, v0, widened)[0].verdict == Verdict.UNKNOWN and "float32" in note
    # the engine (outward-rounded IBP) needs no allowance: its own bounds already leave it unknown
    res = compute_bounds("ibp", net, input_box(x, 0.0, None), target, Output.LOGIT)
    assert res.rigorous and props.evaluate(prop, v0, res.bounds)[0].verdict == Verdict.UNKNOWN


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
    assert any(n.startswith("rounding: engine bounds rigorous") and "float32" in n for n in run.notes)
    inst = vmod.instance(problem, 0)
    res = compute_bounds("ibp", problem.net, inst.threat.box, inst.threat.target_tensor)
    assert res.rigorous  # outward-rounded: only the explanation's own roundings get an allowance
    assert bool((run.bounds.lower < res.bounds.lower).all()) and bool((run.bounds.upper > res.bounds.upper).all())
    full, _ = rounding.widen(problem.net, res.bounds, F32, 2)  # what a non-rigorous engine would get
    assert float(run.bounds.width.mean()) < float(full.width.mean())


# -- outward-rounded IBP: a rigorous enclosure --------------------------------------------------

def _f32_nets() -> dict:
    from tests.graph_nets import GRAPHS
    from tests.helpers import random_cnn

    nets = {f"mlp_{k.value}": (lambda k=k, p=p: random_mlp(k, p, sizes=(12, 16, 16, 5), seed=3, dtype=F32))
            for k, p in ACTS}
    nets.update({f"cnn_{k.value}": (lambda k=k, p=p: random_cnn(k, p, seed=1, dtype=F32)) for k, p in ACTS[::2]})
    nets.update({name: (lambda f=f: f().to(dtype=F32)) for name, f in GRAPHS.items()})
    return nets


NETS32 = _f32_nets()


def _params64(params):
    from verigrad.perturbation import LayerParamBox, ParamBox

    return ParamBox({k: LayerParamBox(b.weight.to(F64), b.bias.to(F64)) for k, b in params.layers.items()})


def _check_outward(net, eps: float, output: Output, params=None, product: str = "midpoint_radius") -> None:
    """Outward float32 IBP ⊇ float64 IBP of the same (float32) weights, and ∋ the float64 autograd
    gradient at the centre, corners and random points of the box (and of the parameter box)."""
    from tests.helpers import assert_contains_true_gradients

    x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(1), dtype=F32)
    box, t = input_box(x, eps, (0.0, 1.0)), torch.tensor([1])
    res = ibp_bounds(net, box, t, output, params, product=product, outward=True)
    assert res.rigorous and not ibp_bounds(net, box, t, output, params, product=product).rigorous
    net64, box64 = net.to(dtype=F64), box.to(F64)
    p64 = _params64(params) if params is not None else None
    exact_ibp = ibp_bounds(net64, box64, t, output, p64, product=product).bounds
    lo, up = res.bounds.lower.double(), res.bounds.upper.double()
    assert bool((lo <= exact_ibp.lower).all()), float((lo - exact_ibp.lower).max())
    assert bool((up >= exact_ibp.upper).all()), float((exact_ibp.upper - up).max())
    assert_contains_true_gradients(Bounds(lo, up), net64, box64, t, output, params=p64, n=150, tol=0.0)


@pytest.mark.parametrize("output", list(Output), ids=[o.value for o in Output])
@pytest.mark.parametrize("name", list(NETS32))
def test_outward_ibp_encloses_the_float64_gradient_and_the_float64_ibp(name, output):
    _check_outward(NETS32[name](), 0.05, output)


@pytest.mark.parametrize("product", ["midpoint_radius", "exact"])
@pytest.mark.parametrize("output", [Output.LOGIT, Output.LOSS], ids=["logit", "loss"])
@pytest.mark.parametrize("name", ["mlp_relu", "mlp_tanh", "cnn_softplus", "residual_mlp", "prelu_cnn", "maxpool_cnn"])
def test_outward_ibp_encloses_the_float64_gradient_with_a_parameter_box(name, output, product):
    from verigrad.perturbation import param_box

    net = NETS32[name]()
    _check_outward(net, 0.02, output, param_box(net, 0.03, "relative"), product)


def _mask_flip_net() -> tuple[Network, Bounds]:
    """z = w·x + b over x ∈ [l, u] whose exact lower bound w·l + b is −3.9e-10 (−5.9e-9 of w·l),
    but whose float32 midpoint-radius IBP, fl(fl(w·c) − fl(w·r)) + b, computes +7.5e-9 (found by a
    random search over float32 w, l, u, b): then relu(z) → a 2-logit layer."""
    from verigrad.models.network import Activation, ActKind

    w, lo, up, b = 1.3964447975158691, 0.046864211559295654, 0.10374806821346283, -0.06544328480958939
    t = lambda v: torch.tensor(v, dtype=F32)  # noqa: E731
    net = Network((Linear("fc0", t([[w]]), t([b])), Activation("relu", ActKind.RELU),
                   Linear("fc1", t([[1.0], [0.5]]), t([0.0, 0.0]))), (1,), "mask_flip")
    return net, Bounds(t([[lo]]), t([[up]]))


def test_a_relu_mask_flipped_by_round_off_is_caught_by_outward_ibp():
    from fractions import Fraction

    from verigrad.operators.base import IbpContext

    net, box = _mask_flip_net()
    fc0 = net.layers[0]
    exact_lo = Fraction(float(fc0.weight)) * Fraction(float(box.lower)) + Fraction(float(fc0.bias))
    assert exact_lo < 0  # the exact pre-activation is negative at x = l ...
    z_lo, _ = fc0.ibp_forward([(box.lower, box.upper)], [(1,)], IbpContext())
    assert float(z_lo) > 0  # ... float32 IBP computes it positive: relu' fixed to 1 on the box
    t = torch.tensor([0])
    truth = saliency(net.to(dtype=F64), box.lower.double(), t)  # at x = l: relu'(z) = 0, so v = 0
    assert float(truth) == 0.0
    plain = ibp_bounds(net, box, t).bounds
    assert not bool(plain.contains(truth.float())[0])  # plain IBP excludes the true gradient
    outward = compute_bounds("ibp", net, box, t).bounds  # the engine rounds outward
    assert bool(outward.contains(truth.float())[0])
    assert bool(outward.contains(saliency(net.to(dtype=F64), box.upper.double(), t).float())[0])


def test_crown_intermediate_bounds_are_widened_so_round_off_fixes_no_mask(monkeypatch):
    from verigrad.bounds import lirpa

    net, box = _mask_flip_net()
    t = torch.tensor([0])
    truth = saliency(net.to(dtype=F64), box.lower.double(), t).float()
    assert bool(lirpa.crown_bounds(net, box, t).bounds.contains(truth)[0])
    # without the widening CROWN decides the mask on its round-to-nearest pre-activation bound
    monkeypatch.setattr(lirpa._GradBoundedModule, "_widen_for_rounding", lambda self, node: None)
    fresh = Network(net.layers, net.input_shape, "mask_flip_unwidened")  # not the memoised graph
    assert not bool(lirpa.crown_bounds(fresh, box, t).bounds.contains(truth)[0])


# -- CROWN / alpha-CROWN: rigorous through the magnitude of the back-substituted sums -----------

def _cancelling_net(terms) -> Network:
    """v = Σ_k terms_k exactly (a linear 1 → k → 1 net, weights |t_k| and sign(t_k)), whose float32
    sum cancels: 2^24 + 1 − 2^24 computes 0 in every order of summation torch uses here."""
    k = len(terms)
    w1 = torch.tensor([[abs(t)] for t in terms], dtype=F32)
    w2 = torch.tensor([[1.0 if t > 0 else -1.0 for t in terms]], dtype=F32)
    return Network((Linear("a", w1, torch.zeros(k, dtype=F32)), Linear("b", w2, torch.zeros(1, dtype=F32))),
                   (1,), "cancelling")


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
def test_crown_encloses_a_value_lost_to_cancellation(monkeypatch, method):
    from verigrad.bounds import lirpa

    terms = [2.0 ** 24, 1.0, -(2.0 ** 24)]
    net, x, t = _cancelling_net(terms), torch.zeros(1, 1, dtype=F32), torch.tensor([0])
    assert float(saliency(net, x, t)) == 0.0  # float32 loses the exact value 1 ...
    res = compute_bounds(method, net, input_box(x, 0.0, None), t, Output.LOGIT)
    assert res.rigorous
    assert float(res.bounds.lower) <= 1.0 <= float(res.bounds.upper)  # ... the certificate keeps it
    # the allowance is what keeps it: a bound widened by a multiple of its own magnitude (the
    # a-priori allowance this replaced: |l| + |u| + max|bound| = 0 here) would be [0, 0]
    monkeypatch.setattr(lirpa, "gamma", lambda n, dtype: 0.0)
    raw = lirpa.crown_bounds(Network(net.layers, net.input_shape, "cancelling_raw"),
                             input_box(x, 0.0, None), t, alpha=method == "alpha-crown")
    assert float(raw.bounds.upper) < 1.0


def _check_crown_rigorous(net, eps: float, output: Output, params=None, alpha: bool = False,
                          times_input: bool = False) -> None:
    """float32 CROWN ∋ the float64 autograd gradient (or x ⊙ g) at the centre, corners and random
    points of the box, with no tolerance at all."""
    from tests.helpers import assert_contains_true_gradients
    from verigrad.bounds.lirpa import crown_bounds

    x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(1), dtype=F32)
    box, t = input_box(x, eps, (0.0, 1.0)), torch.tensor([1])
    res = crown_bounds(net, box, t, output, params, alpha=alpha, times_input=times_input)
    assert res.rigorous and res.bounds.lower.dtype == F32
    net64, box64 = net.to(dtype=F64), box.to(F64)
    p64 = _params64(params) if params is not None else None
    lo, up = res.bounds.lower.double(), res.bounds.upper.double()
    if times_input:
        pts = box_points(box64, 150, 150, seed=2)
        v = pts * saliency(net64, pts, t.expand(len(pts)), output)
        assert bool(((v >= lo) & (v <= up)).all()), float(torch.maximum(lo - v, v - up).max())
        return
    assert_contains_true_gradients(Bounds(lo, up), net64, box64, t, output, params=p64, n=150, tol=0.0)


@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("output", list(Output), ids=[o.value for o in Output])
@pytest.mark.parametrize("name", list(NETS32))
def test_float32_crown_is_rigorous_on_every_operator_kind(name, output, eps):
    _check_crown_rigorous(NETS32[name](), eps, output)


@pytest.mark.parametrize("output", [Output.LOGIT, Output.LOSS], ids=["logit", "loss"])
@pytest.mark.parametrize("name", ["mlp_relu", "mlp_sigmoid", "residual_mlp", "prelu_cnn", "maxpool_cnn"])
def test_float32_alpha_crown_is_rigorous(name, output):
    _check_crown_rigorous(NETS32[name](), 0.05, output, alpha=True)


@pytest.mark.parametrize("output", [Output.LOGIT, Output.LOSS], ids=["logit", "loss"])
@pytest.mark.parametrize("name", ["mlp_relu", "mlp_tanh", "residual_mlp"])
def test_float32_crown_is_rigorous_with_a_parameter_box_and_for_x_times_g(name, output):
    from verigrad.perturbation import param_box

    net = NETS32[name]()
    _check_crown_rigorous(net, 0.02, output, param_box(net, 0.03, "relative"))
    _check_crown_rigorous(net, 0.05, output, times_input=True)


def test_every_auto_lirpa_node_of_our_graphs_has_a_magnitude_rule():
    from verigrad.bounds.lirpa_magnitude import Magnitudes, MagnitudeError

    class Unknown:  # a perturbed node of a kind no rule covers
        name, perturbed, inputs = "n", True, [type("In", (), {"perturbed": True, "inputs": []})()]

    with pytest.raises(MagnitudeError, match="no rounding-magnitude rule"):
        Magnitudes(model=None)._compute(Unknown())


# At ε = 0 the outward bounds are no longer a point: Higham's γ_m per reduction (m ≈ fan-in)
# compounded through the layers. Tolerance: |bound − v| ≤ 2e-3·max|v| (about 2e4 float32 ulps of
# the map's scale; measured ≤ 4e-4 on these nets), and strictly wider than the plain point.
@pytest.mark.parametrize("output", list(Output), ids=[o.value for o in Output])
@pytest.mark.parametrize("act, param", ACTS, ids=ACT_IDS)
def test_outward_ibp_at_zero_epsilon_is_within_tolerance_of_autograd(act, param, output):
    net = random_mlp(act, param, sizes=(12, 16, 16, 5), seed=3, dtype=F32)
    x = torch.rand(3, 12, generator=torch.Generator().manual_seed(4), dtype=F32)
    t = torch.tensor([0, 2, 4])
    b = ibp_bounds(net, input_box(x, 0.0, None), t, output, outward=True).bounds
    v = saliency(net.to(dtype=F64), x.double(), t, output)
    lo, up = b.lower.double(), b.upper.double()
    assert bool(((lo <= v) & (v <= up)).all())
    assert bool((b.width > 0).any())  # no longer bit-exact
    scale = v.abs().flatten(1).max(dim=1, keepdim=True).values
    assert float(((v - lo).flatten(1) / scale).max()) <= 2e-3 and float(((up - v).flatten(1) / scale).max()) <= 2e-3


def test_every_registered_kind_has_a_rounding_error_model():
    from verigrad.errors import OpUnsupported
    from verigrad.operators.base import OPS, IbpContext, Node

    for kind, cls in OPS.items():
        assert cls.ibp_forward_error is not Node.ibp_forward_error, kind
        assert cls.ibp_vjp_error is not Node.ibp_vjp_error, kind

    class Bare(Node):
        op = "bare"

    x = (torch.zeros(1, 2), torch.ones(1, 2))
    with pytest.raises(OpUnsupported, match="rounding-error model"):
        Bare("n").ibp_forward_error([x], x, [(2,)], IbpContext())


def test_ieee_float32_context_turns_tf32_off_and_restores_the_flags():
    from verigrad.bounds.ibp import ieee_float32

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled)
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        with ieee_float32(torch.device("cuda")):  # only flags are touched: no GPU needed
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.enabled
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.enabled == saved[2]
        assert torch.get_float32_matmul_precision() == "high"  # what allow_tf32 means for all backends
        with ieee_float32(torch.device("cpu")):  # CPU: only a lowered matmul precision is raised
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.enabled = saved


def test_rigorous_results_skip_the_allowance_but_not_the_explanation_roundings():
    net = random_mlp(ACTS[0][0], sizes=(12, 16, 5), seed=3, dtype=F32)
    x = torch.rand(1, 12, generator=torch.Generator().manual_seed(1), dtype=F32)
    res = compute_bounds("ibp", net, input_box(x, 0.05, (0.0, 1.0)), torch.tensor([1]))
    full, _ = rounding.widen(net, res.bounds, F32, 10)
    rig, note = rounding.widen(net, res.bounds, F32, 10, rigorous=True)
    bare, note0 = rounding.widen(net, res.bounds, F32, 0, rigorous=True)
    assert bool((bare.lower < res.bounds.lower).all()) and bool((bare.upper > res.bounds.upper).all())  # one ulp
    assert bool((rig.lower < bare.lower).all()) and bool((full.lower < rig.lower).all())
    assert "10 further roundings" in note and "no allowance" in note0


def test_the_integrated_gradients_sum_is_rounded_outward():
    from verigrad.explanations import _node_sum

    # three quadrature terms whose float32 sum cancels: 2^24 + 1 − 2^24 computes 0, exactly 1
    terms = torch.tensor([2.0 ** 24, 1.0, -(2.0 ** 24)], dtype=F32).reshape(3, 1, 1)
    s = _node_sum(torch.ones(3, dtype=F32), Bounds(terms, terms))
    assert float((terms[0] + terms[1]) + terms[2]) == 0.0
    assert float(s.lower) <= 1.0 <= float(s.upper)


def test_integrated_gradients_bounds_are_rigorous_with_a_rigorous_engine():
    from verigrad.explanations import ExplanationMethod, Explainer, explanation_bounds

    net = random_mlp(ACTS[2][0], ACTS[2][1], sizes=(6, 8, 3), seed=2, dtype=F32)
    x = torch.rand(1, 6, generator=torch.Generator().manual_seed(3), dtype=F32)
    box, t = input_box(x, 0.02, (0.0, 1.0)), torch.tensor([1])
    for method in ("ibp", "crown"):
        res = explanation_bounds(Explainer(ExplanationMethod.INTEGRATED_GRADIENTS, steps=8), method, net, box, t)
        assert res.rigorous, method
