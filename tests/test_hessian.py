"""Second-order bounds: the autograd Hessian reference, σ'' and its interval, IBP and CROWN
Hessian bounds (exact at ε = 0, sound by sampling), the refusal for piecewise-linear
networks, and the mean-value certificates on the explanation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import box_points, random_cnn, random_mlp
from verigrad.bounds import hessian as hm
from verigrad.bounds.base import Bounds
from verigrad.bounds.hessian import (
    SecondOrderUnsupported,
    abs_bound,
    frobenius_upper,
    hessian,
    hessian_bounds,
    ibp_hessian_bounds,
    l2_change_bound,
    linf_change_bound,
    mean_value_bounds,
    second_derivative,
    second_derivative_bounds,
    spectral_norm_upper,
)
from verigrad.graph.gradient_graph import Output, logits, saliency
from verigrad.models.network import ActKind, Activation, Network
from verigrad.perturbation import input_box

F64 = torch.float64
TOL = 1e-9  # float64 round-off allowance, relative to the size of the bound
SMOOTH = [(ActKind.SOFTPLUS, 2.0), (ActKind.SIGMOID, 0.0), (ActKind.TANH, 0.0)]
SMOOTH_IDS = [k.value for k, _ in SMOOTH]
KINDS = ["mlp", "cnn"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many tiny tensor ops: with 2 shared cores, intra-op threads only wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(kind: str, act: ActKind, param: float, seed: int = 0) -> Network:
    return random_mlp(act, param, seed=seed) if kind == "mlp" else random_cnn(act, param, seed=seed)


def _x(net: Network, batch: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, *net.input_shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _objective(net: Network, c: int, output: Output):
    def o(xi: torch.Tensor) -> torch.Tensor:
        z = logits(net, xi.unsqueeze(0))
        return z[0, c] if output == Output.LOGIT else F.cross_entropy(z, torch.tensor([c]))

    return o


def _excess(hb: Bounds, h: torch.Tensor) -> torch.Tensor:
    """Per point: how far the matrices h (N, d, d) leave the bounds of one sample (d, d),
    relative to the size of the bound (≤ 0 inside)."""
    lo, up = hb.lower[0], hb.upper[0]
    scale = 1 + torch.maximum(lo.abs(), up.abs())
    return (torch.maximum(lo - h, h - up) / scale).flatten(1).amax(1)


def _assert_contains(hb: Bounds, h: torch.Tensor) -> None:
    ex = _excess(hb, h)
    bad = ex > TOL
    assert not bool(bad.any()), f"{int(bad.sum())} of {len(h)} true Hessians outside the bounds; max excess {float(ex.max()):.3e}"


# ---------------------------------------------------------------------------------------------
# autograd reference


@pytest.mark.parametrize("act,param", SMOOTH, ids=SMOOTH_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("output", [Output.LOGIT, Output.LOSS])
def test_hessian_matches_autograd_functional(act, param, kind, output):
    net = _net(kind, act, param)
    x = _x(net, 2)
    target = torch.tensor([0, 2])
    h = hessian(net, x, target, output)
    d = math.prod(net.input_shape)
    assert h.shape == (2, d, d)
    for b in range(2):
        ref = torch.autograd.functional.hessian(_objective(net, int(target[b]), output), x[b]).reshape(d, d)
        torch.testing.assert_close(h[b], ref, rtol=1e-10, atol=1e-12)
        # and the Jacobian of the explanation itself
        jac = torch.autograd.functional.jacobian(
            lambda xi, b=b: saliency(net, xi.unsqueeze(0), target[b : b + 1], output, create_graph=True)[0],
            x[b],
        ).reshape(d, d)
        torch.testing.assert_close(h[b], jac, rtol=1e-10, atol=1e-12)


def test_hessian_sample_groups_do_not_change_it(monkeypatch):
    net = random_mlp(ActKind.TANH)
    x, target = _x(net, 3), torch.tensor([0, 3, 1])
    whole = hessian(net, x, target, Output.LOSS)
    monkeypatch.setattr(hm, "_CHUNK_ELEMENTS", 1)  # one sample per group
    torch.testing.assert_close(hessian(net, x, target, Output.LOSS), whole, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# σ'' and its range


@pytest.mark.parametrize("act,param", SMOOTH, ids=SMOOTH_IDS)
def test_second_derivative_matches_autograd(act, param):
    layer = Activation("a", act, param)
    z = torch.linspace(-8, 8, 1601, dtype=F64).requires_grad_(True)
    (d1,) = torch.autograd.grad(layer(z).sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z)
    torch.testing.assert_close(second_derivative(layer, z.detach()), d2, rtol=1e-10, atol=1e-13)


def _interval_cases(layer: Activation, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random intervals, intervals around / ending at / equal to every critical point of σ'',
    and intervals straddling 0."""
    centre = (torch.rand(400, generator=gen, dtype=F64) - 0.5) * 12
    width = 10 ** (torch.rand(400, generator=gen, dtype=F64) * 3 - 2.5)
    lo, up = [centre - width / 2], [centre + width / 2]
    for z_star, _ in layer.critical_points():
        for a, b in ((-0.3, 0.3), (-2.0, 0.01), (-0.01, 2.0), (0.0, 1.0), (-1.0, 0.0), (0.0, 0.0), (-5.0, 5.0)):
            lo.append(torch.tensor([z_star + a], dtype=F64))
            up.append(torch.tensor([z_star + b], dtype=F64))
    lo.append(torch.tensor([-0.1, -3.0], dtype=F64))
    up.append(torch.tensor([0.1, 3.0], dtype=F64))
    return torch.cat(lo), torch.cat(up)


@pytest.mark.parametrize("act,param", SMOOTH, ids=SMOOTH_IDS)
def test_second_derivative_bounds_against_dense_sampling(act, param):
    layer = Activation("a", act, param)
    zl, zu = _interval_cases(layer, torch.Generator().manual_seed(7))
    lo, up = second_derivative_bounds(layer, zl, zu)
    t = torch.linspace(0, 1, 4001, dtype=F64)
    grid = zl[:, None] + t[None] * (zu - zl)[:, None]
    f = second_derivative(layer, grid)
    fmin, fmax = f.min(1).values, f.max(1).values
    assert bool((lo <= fmin + 1e-15).all()) and bool((up >= fmax - 1e-15).all())  # sound
    # and exact: the grid comes within (grid step)² of the interior extrema
    torch.testing.assert_close(lo, fmin, rtol=0, atol=1e-6 * max(1.0, param))
    torch.testing.assert_close(up, fmax, rtol=0, atol=1e-6 * max(1.0, param))


def test_second_derivative_bounds_need_the_interior_extremum():
    """sigmoid'' peaks at −ln(2 + √3) inside [−2, 0], above both endpoint values: an endpoint
    rule would be unsound there."""
    layer = Activation("a", ActKind.SIGMOID)
    zl, zu = torch.tensor([-2.0], dtype=F64), torch.tensor([0.0], dtype=F64)
    lo, up = second_derivative_bounds(layer, zl, zu)
    ends = torch.stack([second_derivative(layer, zl), second_derivative(layer, zu)])
    assert float(up) == pytest.approx(math.sqrt(3) / 18, rel=1e-15)
    assert float(up) > float(ends.max()) + 0.01
    assert float(second_derivative(layer, torch.tensor(-math.log(2 + math.sqrt(3)), dtype=F64))) == pytest.approx(
        math.sqrt(3) / 18, rel=1e-14
    )
    assert float(lo) == pytest.approx(0.0, abs=1e-300)


# ---------------------------------------------------------------------------------------------
# IBP Hessian bounds


@pytest.mark.parametrize("act,param", SMOOTH, ids=SMOOTH_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("output", [Output.LOGIT, Output.LOSS])
def test_ibp_exact_at_zero_epsilon(act, param, kind, output):
    net = _net(kind, act, param)
    x = _x(net, 3)
    target = torch.tensor([0, 1, 2])
    res = hessian_bounds("ibp", net, input_box(x, 0.0, (0.0, 1.0)), target, output)
    ref = hessian(net, x, target, output)
    assert res.method == "ibp" and res.actual_method is None
    torch.testing.assert_close(res.bounds.lower, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.bounds.upper, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act,param", SMOOTH, ids=SMOOTH_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("output", [Output.LOGIT, Output.LOSS])
def test_ibp_contains_sampled_hessians(act, param, kind, output):
    net = _net(kind, act, param)
    box = input_box(_x(net), 0.05, (0.0, 1.0))
    target = torch.tensor([1])
    hb = hessian_bounds("ibp", net, box, target, output).bounds
    assert bool((hb.width > 0).any())
    pts = box_points(box, 150, 100, seed=1)  # centre, interior points, corners
    _assert_contains(hb, hessian(net, pts, target.expand(len(pts)), output))


def test_containment_check_fails_on_shrunk_bounds():
    """The sampling check is not vacuous: bounds pulled inside the sampled range fail it."""
    net = random_mlp(ActKind.SOFTPLUS, 2.0)
    box = input_box(_x(net), 0.05, (0.0, 1.0))
    target = torch.tensor([1])
    hb = hessian_bounds("ibp", net, box, target).bounds
    pts = box_points(box, 150, 100, seed=1)
    h = hessian(net, pts, target.expand(len(pts)))
    _assert_contains(hb, h)
    hmin, hmax = h.amin(0, keepdim=True), h.amax(0, keepdim=True)
    spread = hmax - hmin
    shrunk = Bounds(hmin + 0.1 * spread, hmax - 0.1 * spread)
    with pytest.raises(AssertionError, match="outside the bounds"):
        _assert_contains(shrunk, h)
    centre_only = Bounds.point(hessian(net, box.center, target))
    with pytest.raises(AssertionError, match="outside the bounds"):
        _assert_contains(centre_only, h)


def test_ibp_sample_groups_and_mixed_targets(monkeypatch):
    net = random_cnn(ActKind.SOFTPLUS, 2.0)
    box = input_box(_x(net, 3), 0.02, (0.0, 1.0))
    target = torch.tensor([2, 0, 1])
    whole = ibp_hessian_bounds(net, box, target, Output.LOSS).bounds
    monkeypatch.setattr(hm, "_CHUNK_ELEMENTS", 1)
    alone = ibp_hessian_bounds(net, box, target, Output.LOSS).bounds
    torch.testing.assert_close(alone.lower, whole.lower, rtol=0, atol=1e-14)
    torch.testing.assert_close(alone.upper, whole.upper, rtol=0, atol=1e-14)
    one = ibp_hessian_bounds(net, box[1:2], target[1:2], Output.LOSS).bounds
    torch.testing.assert_close(one.lower[0], whole.lower[1], rtol=0, atol=1e-14)


def test_bounds_are_symmetric_and_linear_nets_have_zero_hessian():
    net = random_mlp(ActKind.TANH)
    hb = hessian_bounds("ibp", net, input_box(_x(net), 0.1, (0.0, 1.0)), torch.tensor([0]), Output.LOSS).bounds
    assert torch.equal(hb.lower, hb.lower.transpose(1, 2)) and torch.equal(hb.upper, hb.upper.transpose(1, 2))
    linear = random_mlp(ActKind.TANH, sizes=(5, 3))
    box = input_box(_x(linear), 0.1, (0.0, 1.0))
    hb = hessian_bounds("ibp", linear, box, torch.tensor([2])).bounds
    assert bool((hb.lower == 0).all()) and bool((hb.upper == 0).all())
    assert bool((hessian(linear, box.center, torch.tensor([2])) == 0).all())


@pytest.mark.parametrize("act", [ActKind.RELU, ActKind.LEAKY_RELU])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_piecewise_linear_networks_are_refused(act, method):
    net = random_cnn(act, 0.1 if act == ActKind.LEAKY_RELU else 0.0)
    box = input_box(_x(net), 0.01, (0.0, 1.0))
    with pytest.raises(SecondOrderUnsupported, match=r"'act0'.*zero almost everywhere.*discontinuous.*surrogate_beta"):
        hessian_bounds(method, net, box, torch.tensor([0]))
    with pytest.raises(SecondOrderUnsupported):
        ibp_hessian_bounds(net, box, torch.tensor([0]))
    assert issubclass(SecondOrderUnsupported, ValueError)


def test_bad_arguments():
    net = random_mlp(ActKind.SOFTPLUS, 2.0)
    box = input_box(_x(net), 0.01, (0.0, 1.0))
    with pytest.raises(ValueError, match="unknown Hessian bound method"):
        hessian_bounds("alpha-crown", net, box, torch.tensor([0]))
    with pytest.raises(ValueError, match="dtype"):
        hessian_bounds("ibp", net, box.to(torch.float32), torch.tensor([0]))
    with pytest.raises(ValueError, match="target"):
        hessian_bounds("ibp", net, box, torch.tensor([0, 1]))
    hb = hessian_bounds("ibp", net, box, torch.tensor([0])).bounds
    outside = box.upper + 0.5
    with pytest.raises(ValueError, match="x0 must lie in the box"):
        mean_value_bounds(saliency(net, outside, torch.tensor([0])), hb, box, outside)
    with pytest.raises(ValueError, match="shape"):
        l2_change_bound(hb, box, box.center.reshape(-1)[:3])
    # one input's shape is accepted for x0 and v0
    x0 = box.center
    v0 = saliency(net, x0, torch.tensor([0]))
    whole = mean_value_bounds(v0, hb, box, x0)
    single = mean_value_bounds(v0[0], hb, box, x0[0])
    assert torch.equal(whole.lower, single.lower) and torch.equal(whole.upper, single.upper)


# ---------------------------------------------------------------------------------------------
# certificates


def _clipped_input(net: Network) -> torch.Tensor:
    """A point with coordinates on both ends of [0, 1], so the clipped box is not centred on it."""
    x = _x(net)
    flat = x.reshape(-1)
    flat[::3] = 0.0
    flat[1::5] = 1.0
    return x


@pytest.mark.parametrize("act,param", SMOOTH, ids=SMOOTH_IDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("output", [Output.LOGIT, Output.LOSS])
def test_mean_value_certificates_hold_by_sampling(act, param, kind, output):
    net = _net(kind, act, param)
    x0 = _clipped_input(net)
    box = input_box(x0, 0.05, (0.0, 1.0))
    assert not torch.equal(box.center, x0)
    target = torch.tensor([2])
    hb = hessian_bounds("ibp", net, box, target, output).bounds
    v0 = saliency(net, x0, target, output)
    mv = mean_value_bounds(v0, hb, box, x0)
    pts = box_points(box, 200, 200, seed=2)
    v = saliency(net, pts, target.expand(len(pts)), output)
    scale = TOL * (1 + torch.maximum(mv.lower.abs(), mv.upper.abs()))
    assert bool(((v >= mv.lower - scale) & (v <= mv.upper + scale)).all())
    dv = (v - v0).reshape(len(pts), -1)
    l2, linf = l2_change_bound(hb, box, x0), linf_change_bound(hb, box, x0)
    assert float(l2) >= float(dv.norm(dim=1).max()) * (1 - TOL)
    assert float(linf) >= float(dv.abs().max()) * (1 - TOL)
    # the coordinatewise forms never lose to the norm forms of the brief
    m = abs_bound(hb)[0]
    r = torch.maximum(x0 - box.lower, box.upper - x0).reshape(-1)
    assert float(l2) <= float(spectral_norm_upper(hb)) * float(r.norm()) * (1 + TOL)
    assert float(linf) <= float(m.sum(1).max()) * float(r.max()) * (1 + TOL)
    assert float(linf) == pytest.approx(float(torch.maximum(v0 - mv.lower, mv.upper - v0).max()), rel=1e-12)
    # norms of the Hessian at sampled points
    h = hessian(net, pts[:60], target.expand(60), output)
    assert float(spectral_norm_upper(hb)) >= float(torch.linalg.matrix_norm(h, ord=2).max())
    assert float(frobenius_upper(hb)) >= float(torch.linalg.matrix_norm(h, ord="fro").max())


def test_norm_bounds_on_point_matrices():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(3, 20, 20, generator=gen, dtype=F64)
    a = a + a.transpose(1, 2)
    hb = Bounds.point(a)
    exact = torch.linalg.matrix_norm(a.abs(), ord=2)  # ‖|H|‖₂ ≥ ‖H‖₂
    sn = spectral_norm_upper(hb)
    assert bool((sn >= exact).all()) and bool((sn <= exact * (1 + 1e-9)).all())
    assert bool((sn >= torch.linalg.matrix_norm(a, ord=2)).all())
    assert bool((sn <= frobenius_upper(hb)).all())
    torch.testing.assert_close(abs_bound(Bounds(-a.abs(), a.abs() / 2)), a.abs())


def test_mean_value_bounds_beat_first_order_ibp_on_small_boxes():
    """At ε = 0.001 on a smooth net, v0 + Ĥ·Δx is far tighter than IBP on v itself."""
    from verigrad.bounds.ibp import ibp_bounds

    net = random_mlp(ActKind.SOFTPLUS, 2.0, sizes=(10, 16, 16, 4))
    x0 = _x(net)
    box = input_box(x0, 0.001, (0.0, 1.0))
    target = torch.tensor([1])
    hb = hessian_bounds("ibp", net, box, target).bounds
    mv = mean_value_bounds(saliency(net, x0, target), hb, box, x0)
    first = ibp_bounds(net, box, target).bounds
    assert float(mv.width.mean()) < 0.5 * float(first.width.mean())


# ---------------------------------------------------------------------------------------------
# CROWN (auto_LiRPA)


def _lirpa_available() -> bool:
    try:
        import verigrad.bounds.lirpa  # noqa: F401
    except ImportError:
        return False
    return True


needs_lirpa = pytest.mark.skipif(not _lirpa_available(), reason="auto_LiRPA not installed")


@needs_lirpa
@pytest.mark.parametrize("act,param", SMOOTH, ids=SMOOTH_IDS)
def test_crown_hessian_sound_and_never_looser_than_ibp(act, param):
    net = random_mlp(act, param)
    box = input_box(_x(net, 2), 0.05, (0.0, 1.0))
    target = torch.tensor([1, 3])
    res = hessian_bounds("crown", net, box, target)
    assert res.method == "crown" and res.actual_method is None
    ibp = hessian_bounds("ibp", net, box, target).bounds
    assert bool((res.bounds.lower >= ibp.lower).all()) and bool((res.bounds.upper <= ibp.upper).all())
    assert float(res.bounds.width.mean()) < float(ibp.width.mean())  # CROWN helps on these nets
    for k in range(2):
        pts = box_points(box[k : k + 1], 150, 100, seed=k)
        _assert_contains(res.bounds[k : k + 1], hessian(net, pts, target[k : k + 1].expand(len(pts))))


@needs_lirpa
def test_crown_hessian_exact_at_zero_epsilon():
    net = random_mlp(ActKind.SIGMOID)
    x = _x(net)
    res = hessian_bounds("crown", net, input_box(x, 0.0, (0.0, 1.0)), torch.tensor([2]))
    ref = hessian(net, x, torch.tensor([2]))
    torch.testing.assert_close(res.bounds.lower, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.bounds.upper, ref, rtol=1e-9, atol=1e-12)


@needs_lirpa
@pytest.mark.parametrize(
    "case,reason",
    [("loss", "z_c only"), ("cnn", "MLPs only"), ("wide", "at most 64")],
)
def test_crown_hessian_falls_back_to_ibp(case, reason):
    if case == "cnn":
        net = random_cnn(ActKind.SOFTPLUS, 2.0)
    elif case == "wide":
        net = random_mlp(ActKind.SOFTPLUS, 2.0, sizes=(65, 3, 2))
    else:
        net = random_mlp(ActKind.SOFTPLUS, 2.0)
    output = Output.LOSS if case == "loss" else Output.LOGIT
    box = input_box(_x(net), 0.02, (0.0, 1.0))
    target = torch.tensor([1])
    res = hessian_bounds("crown", net, box, target, output)
    assert res.method == "crown" and res.actual_method == "ibp"
    assert res.notes[0].startswith("crown unsupported here") and reason in res.notes[0] and "fell back to ibp" in res.notes[0]
    ibp = hessian_bounds("ibp", net, box, target, output).bounds
    assert torch.equal(res.bounds.lower, ibp.lower) and torch.equal(res.bounds.upper, ibp.upper)


def test_probability_output_is_refused_by_name():
    net = _net("mlp", *SMOOTH[0])
    x = _x(net, 1)
    with pytest.raises(SecondOrderUnsupported, match="probability"):
        ibp_hessian_bounds(net, Bounds(x, x), torch.tensor([0]), Output.PROBABILITY)
