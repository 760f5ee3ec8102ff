"""Explanation methods beyond saliency: the autograd references against captum (and a naive
loop), exactness of every engine at ε = 0, and containment of the true explanation at many
points of input and parameter boxes for random MLPs and CNNs with every activation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import ACT_IDS, ACTS, box_points, random_cnn, random_mlp, sample_network
from verigrad.bounds import Bounds
from verigrad.explanations import (
    Explainer,
    ExplanationMethod,
    IGRule,
    explain,
    explanation_bounds,
    ig_nodes,
)
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.models.network import ActKind
from verigrad.perturbation import Perturbation, input_box, param_box

F64 = torch.float64
TOL = 1e-9
IXG = Explainer(ExplanationMethod.INPUT_X_GRADIENT)


def _ig(steps=6, rule=IGRule.GAUSS_LEGENDRE, baseline=0.0) -> Explainer:
    return Explainer(ExplanationMethod.INTEGRATED_GRADIENTS, steps, rule, baseline)


DETERMINISTIC = [("saliency", Explainer()), ("ixg", IXG), ("ig", _ig()), ("ig_trap", _ig(5, IGRule.RIEMANN_TRAPEZOID, 0.3))]
DET_IDS = [n for n, _ in DETERMINISTIC]


def _net(kind, act, param, seed=0):
    return random_mlp(act, param, seed=seed) if kind == "mlp" else random_cnn(act, param, seed=seed)


def _x(net, n=1, seed=1):
    return torch.randn(n, *net.input_shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _naive_ig(net, x, target, output, e: Explainer) -> torch.Tensor:
    """IG by an explicit loop over the nodes, one autograd call per path point."""
    alpha, w = ig_nodes(e.rule, e.steps)
    b = torch.full_like(x, float(e.baseline))
    total = torch.zeros_like(x)
    for a, wk in zip(alpha, w, strict=True):
        total += wk * saliency(net, b + a * (x - b), target, output)
    return (x - b) * total


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("rule", list(IGRule))
def test_ig_nodes_integrate_polynomials(rule):
    """Gauss–Legendre with m nodes is exact for degree 2m − 1; the Riemann rules are the
    captum ones (trapezoid weights sum to 1 − 1/m, as captum's do)."""
    a, w = ig_nodes(rule, 4)
    assert (w > 0).all() and ((a >= 0) & (a <= 1)).all()
    if rule == IGRule.GAUSS_LEGENDRE:
        for deg in range(8):
            assert abs((w * a**deg).sum() - 1 / (deg + 1)) < 1e-14
    elif rule == IGRule.RIEMANN_TRAPEZOID:
        np.testing.assert_allclose(a, [0, 1 / 3, 2 / 3, 1])
        np.testing.assert_allclose(w, [1 / 8, 1 / 4, 1 / 4, 1 / 8])
    else:
        assert abs(w.sum() - 1) < 1e-15
        first = {IGRule.RIEMANN_LEFT: 0.0, IGRule.RIEMANN_RIGHT: 0.25, IGRule.RIEMANN_MIDDLE: 0.125}[rule]
        assert abs(a[0] - first) < 1e-15
    with pytest.raises(ValueError, match="steps"):
        ig_nodes(rule, 1 if rule != IGRule.GAUSS_LEGENDRE else 0)


@pytest.mark.parametrize("output", list(Output))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ig_matches_naive_loop(kind, output):
    net = _net(kind, ActKind.TANH, 0.0, seed=2)
    x = _x(net, n=3, seed=3)
    t = torch.tensor([0, 1, 2])
    for e in (_ig(7), _ig(5, IGRule.RIEMANN_MIDDLE, -0.2)):
        torch.testing.assert_close(explain(e, net, x, t, output), _naive_ig(net, x, t, output, e), rtol=0, atol=1e-12)
    torch.testing.assert_close(explain(IXG, net, x, t, output), x * saliency(net, x, t, output), rtol=0, atol=0)


def test_ig_completeness_with_many_nodes():
    """Σ_i IG_i → o(x) − o(b) as the quadrature converges (a check on the path and weights)."""
    net = random_mlp(ActKind.SOFTPLUS, 1.0, seed=4)
    x = _x(net, seed=5)
    t = torch.tensor([1])
    v = explain(_ig(64, baseline=0.2), net, x, t)
    diff = net.forward(x)[0, 1] - net.forward(torch.full_like(x, 0.2))[0, 1]
    assert abs(float(v.sum() - diff)) < 1e-10


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matches_captum(kind):
    captum = pytest.importorskip("captum.attr", reason="captum not installed: the naive-loop tests still run")
    net = _net(kind, ActKind.SOFTPLUS, 2.0, seed=6)
    x = _x(net, n=3, seed=7)
    t = torch.tensor([0, 1, 2])

    def fwd(z):
        return net.forward(z)

    sal = captum.Saliency(fwd).attribute(x.clone().requires_grad_(True), target=t, abs=False)
    torch.testing.assert_close(explain(Explainer(), net, x, t), sal, rtol=0, atol=1e-12)
    ixg = captum.InputXGradient(fwd).attribute(x.clone().requires_grad_(True), target=t)
    torch.testing.assert_close(explain(IXG, net, x, t), ixg, rtol=0, atol=1e-12)
    for rule in IGRule:
        ref = captum.IntegratedGradients(fwd).attribute(x, baselines=0.25, target=t, n_steps=9, method=rule.value)
        # captum builds Riemann α with float32 linspace: agreement to ~1e-8, not 1e-15
        torch.testing.assert_close(explain(_ig(9, rule, 0.25), net, x, t), ref, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- bounds


@pytest.mark.parametrize("name,e", DETERMINISTIC, ids=DET_IDS)
@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("output", list(Output))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_zero_radius_is_exact(kind, output, method, name, e):
    net = _net(kind, ActKind.SIGMOID, 0.0, seed=8)
    x = _x(net, n=2, seed=9)
    t = torch.tensor([0, 2])
    res = explanation_bounds(e, method, net, Bounds.point(x), t, output)
    ref = explain(e, net, x, t, output)
    torch.testing.assert_close(res.bounds.lower, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.bounds.upper, ref, rtol=0, atol=1e-10)


def _assert_contains(bounds: Bounds, v: torch.Tensor) -> None:
    lo, up = bounds.lower[0:1], bounds.upper[0:1]
    scale = TOL * (1 + torch.maximum(lo.abs(), up.abs()))
    excess = torch.maximum(lo - scale - v, v - up - scale).max().item()
    assert excess <= 0, f"true explanation outside the bounds by {excess:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("name,e", DETERMINISTIC[1:], ids=DET_IDS[1:])
@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_contains_true_explanation(kind, act, param, name, e):
    net = _net(kind, act, param, seed=10)
    x = _x(net, seed=11)
    box = input_box(x, 0.05, None)
    t = torch.tensor([1])
    pts = box_points(box, 200, 200, seed=12)
    for output in Output:
        v = explain(e, net, pts, t.expand(len(pts)), output)
        for method in ("ibp", "crown"):
            res = explanation_bounds(e, method, net, box, t, output)
            _assert_contains(res.bounds, v)


def test_contains_with_clipped_domain_and_alpha():
    net = random_mlp(ActKind.RELU, sizes=(6, 12, 12, 3), seed=13)
    x = torch.rand(1, 6, dtype=F64, generator=torch.Generator().manual_seed(14))
    box = input_box(x, 0.2, (0.0, 1.0))
    t = torch.tensor([2])
    pts = box_points(box, 300, 300, seed=15)
    for e in (IXG, _ig(4, baseline=0.5)):
        v = explain(e, net, pts, t.expand(len(pts)))
        for method in ("ibp", "crown", "alpha-crown"):
            _assert_contains(explanation_bounds(e, method, net, box, t).bounds, v)


@pytest.mark.parametrize("name,e", DETERMINISTIC[1:], ids=DET_IDS[1:])
def test_parameter_box_contains(name, e):
    """Input and parameter box together: explanations of sampled networks at sampled inputs."""
    net = random_mlp(ActKind.SOFTPLUS, 2.0, seed=16)
    x = _x(net, seed=17)
    box = input_box(x, 0.03, None)
    params = param_box(net, 0.05)
    t = torch.tensor([0])
    res = explanation_bounds(e, "ibp", net, box, t, Output.LOGIT, params)
    pts = box_points(box, 30, 30, seed=18)
    gen = torch.Generator().manual_seed(19)
    for k in range(len(pts)):
        sub = sample_network(net, params, gen, corner=bool(k % 2))
        _assert_contains(res.bounds, explain(e, sub, pts[k : k + 1], t))


def test_ig_bounds_tighten_with_the_box_and_crown_beats_ibp():
    net = random_mlp(ActKind.SOFTPLUS, 2.0, sizes=(8, 16, 16, 4), seed=20)
    x = _x(net, seed=21)
    t = torch.tensor([3])
    e = _ig(8)
    widths = [float(explanation_bounds(e, "ibp", net, input_box(x, eps, None), t).bounds.width.mean())
              for eps in (0.01, 0.05, 0.1)]
    assert widths[0] < widths[1] < widths[2]
    box = input_box(x, 0.05, None)
    ibp = explanation_bounds(e, "ibp", net, box, t).bounds.width.mean()
    crown = explanation_bounds(e, "crown", net, box, t).bounds.width.mean()
    assert crown < ibp


def test_validation_errors():
    with pytest.raises(ValueError, match="steps"):
        _ig(1, IGRule.RIEMANN_LEFT)
    with pytest.raises(ValueError, match="smoothing settings"):
        Explainer(ExplanationMethod.SMOOTHGRAD)
    net = random_mlp(ActKind.TANH)
    e = Explainer(ExplanationMethod.INTEGRATED_GRADIENTS, 4, baseline=torch.zeros(3))
    with pytest.raises(ValueError, match="baseline of shape"):
        explain(e, net, _x(net), torch.tensor([0]))


# ---------------------------------------------------------------- attacks on the new maps


@pytest.mark.parametrize("name,e", DETERMINISTIC[1:3], ids=DET_IDS[1:3])
def test_attacks_respect_certificates_and_find_witnesses(name, e):
    """The attack searches the map the spec names: its worst value never beats the certified
    worst case, and with a threshold below what it reaches it returns a witness that re-judges
    as violated in float64 (through the same explanation method)."""
    from verigrad.attacks import AttackOptions, Threat, attack_property, evaluate_point
    from verigrad.properties import Property

    opts = AttackOptions(steps=15, restarts=1)
    net = random_mlp(ActKind.SOFTPLUS, 2.0, sizes=(6, 10, 10, 3), seed=22)
    x = _x(net, seed=23)
    th = Threat.around(net, x, 1, Output.LOGIT, Perturbation(0.05), explainer=e)
    cert = explanation_bounds(e, "crown", net, th.box, th.target_tensor).bounds
    v0 = explain(e, net, x, th.target_tensor)
    prop = Property("l2", "untargeted", "l2", 10.0)
    from verigrad import properties as props

    worst = float(props.worst_case(prop, v0, cert)[0])
    out = attack_property(th, prop, opts)
    assert out.value is not None and 0 < out.value <= worst + 1e-9
    below = Property("l2", "untargeted", "l2", out.value / 2)
    hit = attack_property(th, below, opts)
    assert hit.violated and hit.witness is not None
    ev = evaluate_point(th, below, hit.witness.point)
    assert ev.violated
    # the witness is judged on this method's map, not on the saliency map
    torch.testing.assert_close(ev.v, explain(e, net.to(dtype=F64), ev.point.x, th.target_tensor))


# ---------------------------------------------------------------- Jacobian (second-order) bounds


def _jacobian(e: Explainer, net, x, t):
    """∂v/∂x (d, d) of one input by autograd through the explanation itself."""
    def f(z):
        return explain(e, net, z.reshape(1, *net.input_shape), t, create_graph=True).reshape(-1)

    return torch.autograd.functional.jacobian(f, x.reshape(-1))


SMOOTH = [a for a in ACTS if a[0] in (ActKind.SOFTPLUS, ActKind.SIGMOID, ActKind.TANH)]


@pytest.mark.parametrize("name,e", DETERMINISTIC, ids=DET_IDS)
@pytest.mark.parametrize("act,param", SMOOTH, ids=[a[0].value for a in SMOOTH])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_jacobian_bounds_exact_at_a_point_and_contain_sampled_jacobians(kind, act, param, name, e):
    from verigrad.bounds.hessian import mean_value_bounds
    from verigrad.explanations import jacobian_bounds

    net = _net(kind, act, param, seed=24)
    x = _x(net, seed=25)
    t = torch.tensor([1])
    j0 = _jacobian(e, net, x, t)
    point = jacobian_bounds(e, "ibp", net, Bounds.point(x), t).bounds
    torch.testing.assert_close(point.lower[0], j0, rtol=0, atol=1e-10)
    torch.testing.assert_close(point.upper[0], j0, rtol=0, atol=1e-10)
    box = input_box(x, 0.04, None)
    jb = jacobian_bounds(e, "ibp", net, box, t).bounds
    pts = box_points(box, 12, 12, seed=26)
    for p in pts:
        j = _jacobian(e, net, p[None], t)
        assert bool(((j >= jb.lower[0] - TOL) & (j <= jb.upper[0] + TOL)).all()), "Jacobian outside its bounds"
    # the mean-value engine built from them contains the explanation at many points
    mv = mean_value_bounds(explain(e, net, x, t), jb, box, x)
    more = box_points(box, 150, 150, seed=27)
    _assert_contains(mv, explain(e, net, more, t.expand(len(more))))


def test_jacobian_bounds_refuse_relu():
    from verigrad.bounds.hessian import SecondOrderUnsupported
    from verigrad.explanations import jacobian_bounds

    net = random_mlp(ActKind.RELU)
    x = _x(net)
    with pytest.raises(SecondOrderUnsupported, match="zero almost everywhere"):
        jacobian_bounds(IXG, "ibp", net, input_box(x, 0.1, None), torch.tensor([0]))


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("act,param", [(ActKind.SOFTPLUS, 2.0), (ActKind.TANH, 0.0), (ActKind.RELU, 0.0)],
                         ids=["softplus", "tanh", "relu"])
def test_input_x_gradient_joint_relaxation_never_looser_than_the_interval_product(method, act, param):
    """x ⊙ g bounded as one graph, intersected with the interval product [x]·[g]: never wider,
    strictly tighter somewhere on smooth nets, and still containing the sampled maps."""
    from verigrad.bounds import compute_bounds, input_product_bounds
    from verigrad.bounds.ibp import mul_interval

    net = random_mlp(act, param, sizes=(6, 12, 12, 3), seed=21)
    x = torch.rand(1, 6, dtype=F64, generator=torch.Generator().manual_seed(22))
    box, t = input_box(x, 0.3, None), torch.tensor([1])
    g = compute_bounds(method, net, box, t).bounds
    lo, up = mul_interval((box.lower, box.upper), (g.lower, g.upper))
    joint = input_product_bounds(method, net, box, t)
    assert joint is not None and "jointly" in " ".join(joint.notes)
    both = explanation_bounds(IXG, method, net, box, t).bounds
    assert bool((both.lower >= lo).all()) and bool((both.upper <= up).all())
    if act != ActKind.RELU:
        assert float((both.upper - both.lower).sum()) < float((up - lo).sum())
    pts = box_points(box, 300, 300, seed=23)
    _assert_contains(both, explain(IXG, net, pts, t.expand(len(pts))))
    _assert_contains(joint.bounds, explain(IXG, net, pts, t.expand(len(pts))))
