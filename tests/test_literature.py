"""Literature bounds (verigrad.literature): each formula against a hand case or brute force
in float64, the sound variants against sampled true changes, Dombrowski's Theorem 1 against
autograd Hessians."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from verigrad import literature as lit
from verigrad.bounds.base import Bounds
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.guarantees import Guarantee
from verigrad.models.network import ActKind, Activation, Conv2d, Linear, Network
from tests.helpers import random_cnn, random_mlp

DT = torch.float64
SMOOTH = [(ActKind.SOFTPLUS, 2.0), (ActKind.SIGMOID, 0.0), (ActKind.TANH, 0.0)]
SMOOTH_IDS = [k.value for k, _ in SMOOTH]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only contend on the shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def linear_explain(a: torch.Tensor, c: torch.Tensor | None = None):
    """g(x) = A x + c per sample: J = A everywhere, so first-order bounds are exact."""

    def explain(x: torch.Tensor) -> torch.Tensor:
        out = x.reshape(x.shape[0], -1) @ a.T
        if c is not None:
            out = out + c
        return out.reshape(x.shape)

    return explain


def corner_max(a: torch.Tensor, eps: float) -> float:
    """max over the 2^d corners of ‖A δ‖₂, δ ∈ {±ε}^d (the max of a convex function on a box)."""
    d = a.shape[1]
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=DT)
    return float((signs @ a.T).norm(dim=1).max()) * eps


def cos_dist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(u.reshape(u.shape[0], -1), v.reshape(v.shape[0], -1), dim=1)


# ------------------------------------------------------------------ point Jacobian


def test_attribution_jacobian_is_the_hessian_for_saliency_and_the_jacobian_otherwise():
    net = random_mlp(ActKind.SOFTPLUS, 2.0, seed=1)
    x = torch.randn(1, 6, dtype=DT, generator=torch.Generator().manual_seed(0))
    j = lit.attribution_jacobian(lit.saliency_explainer(net, 2), x, chunk=4)  # two chunks
    h = torch.autograd.functional.hessian(lambda z: net.forward(z[None])[0, 2], x[0])
    assert torch.allclose(j, h, atol=1e-12)
    gxi = lit.input_x_gradient_explainer(net, 2)
    jg = lit.attribution_jacobian(gxi, x)
    ref = torch.autograd.functional.jacobian(
        lambda z: z * torch.autograd.functional.jacobian(lambda w: net.forward(w[None])[0, 2], z, create_graph=True),
        x[0])
    assert torch.allclose(jg, ref, atol=1e-12)
    assert not torch.allclose(jg, jg.T)  # gradient×input: J is not symmetric


# ------------------------------------------------------------------ [CAR] estimates


def test_first_order_l2_is_exact_and_attained_for_a_linear_attribution():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 5, dtype=DT, generator=gen)
    x = torch.randn(1, 5, dtype=DT, generator=gen)
    j = lit.attribution_jacobian(linear_explain(a), x)
    assert torch.allclose(j, a, atol=1e-14)
    eps = 0.07
    b = lit.first_order_l2(j, eps)
    assert b.guarantee == Guarantee.ESTIMATE and b.quantity == "l2_change"
    xi = float(torch.linalg.svdvals(a)[0])
    assert b.value == pytest.approx(xi * eps, rel=1e-13)
    v = torch.linalg.svd(a).Vh[0]
    assert float((a @ (eps * v)).norm()) == pytest.approx(b.value, rel=1e-12)  # attained at eps*v_max
    d = torch.randn(2000, 5, dtype=DT, generator=gen)
    d = eps * d / d.norm(dim=1, keepdim=True) * torch.rand(2000, 1, dtype=DT, generator=gen)
    assert float((d @ a.T).norm(dim=1).max()) <= b.value * (1 + 1e-12)


def test_first_order_linf_uses_jt_j_and_bounds_the_corner_maximum():
    eps = 0.1
    # orientation: P = JᵀJ. For J = [[1, 1], [0, 0]] the corner (ε, ε) moves g by 2ε;
    # Σ|J Jᵀ| would claim √2·ε.
    a = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=DT)
    thm2, cor1 = lit.first_order_linf(a, eps)
    assert thm2.value == pytest.approx(2 * eps, rel=1e-13)
    assert corner_max(a, eps) == pytest.approx(2 * eps, rel=1e-13)
    assert eps * math.sqrt(float((a @ a.T).abs().sum())) < corner_max(a, eps)
    assert cor1.value == pytest.approx(math.sqrt(2) * math.sqrt(2) * eps, rel=1e-13)  # √d·ξ·ε, ξ = √2
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        a = torch.randn(6, 6, dtype=DT, generator=gen)
        thm2, cor1 = lit.first_order_linf(a, eps)
        truth = corner_max(a, eps)
        assert truth <= thm2.value * (1 + 1e-12) and truth <= cor1.value * (1 + 1e-12)
        assert cor1.value == pytest.approx(math.sqrt(6) * float(torch.linalg.svdvals(a)[0]) * eps, rel=1e-12)
    # equality at the all-ones corner when J ≥ 0 (then P ≥ 0 and Σ P_ij = ‖J 1‖²)
    a = torch.rand(6, 6, dtype=DT, generator=gen)
    assert lit.first_order_linf(a, eps)[0].value == pytest.approx(corner_max(a, eps), rel=1e-12)
    # Theorem 2 is not always tighter than Corollary 1: P = I + ρS with S a random ±1 matrix
    # has Σ|P_ij| ≈ ρd² ≫ d·λ_max(P) (here 304 vs 122)
    d = 64
    s = torch.triu(torch.sign(torch.randn(d, d, dtype=DT, generator=gen)), 1)
    s = s + s.T
    p = torch.eye(d, dtype=DT) + 0.9 / float(torch.linalg.eigvalsh(s).abs().max()) * s
    w, v = torch.linalg.eigh(p)
    thm2, cor1 = lit.first_order_linf((v * w.sqrt()) @ v.T, eps)  # J = P^(1/2), JᵀJ = P
    assert thm2.value > 1.2 * cor1.value


def test_label_constrained_hand_case_equals_the_constrained_linearised_maximum():
    j_y = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=DT)
    j_o = torch.tensor([[0.0, 0.0], [0.0, 3.0]], dtype=DT)
    # M = (J_o − J_y)ᵀ 1 = (−2, 2), b = 1 − 0.5 = 0.5
    b = lit.label_constrained(j_y, j_o, 1.0, 0.5, 0.1, "l2")
    assert b.value == pytest.approx(0.2, rel=1e-13) and b.guarantee == Guarantee.ESTIMATE
    assert "inactive" in b.note  # 0.1·‖M‖₂ = 0.283 < 0.5
    b = lit.label_constrained(j_y, j_o, 1.0, 0.5, 0.3, "l2")
    assert b.value == pytest.approx(0.6, rel=1e-13) and "active somewhere" in b.note  # 0.849 > 0.5
    # brute force: the max of ‖J δ‖ over the circle ‖δ‖ = 0.3 restricted to Mᵀδ < b
    th = torch.linspace(0, 2 * math.pi, 100001, dtype=DT)
    dl = 0.3 * torch.stack([th.cos(), th.sin()], 1)
    m = torch.tensor([-2.0, 2.0], dtype=DT)
    ok = dl @ m < 0.5
    assert float((dl[ok] @ j_y.T).norm(dim=1).max()) == pytest.approx(0.6, rel=1e-9)
    bi = lit.label_constrained(j_y, j_o, 1.0, 0.5, 0.3, "linf")
    assert bi.value == pytest.approx(0.3 * math.sqrt(5.0), rel=1e-13)
    corners = 0.3 * torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2)), dtype=DT)
    feas = corners[corners @ m < 0.5]
    assert float((feas @ j_y.T).norm(dim=1).max()) <= bi.value
    with pytest.raises(ValueError, match="not classified"):
        lit.label_constrained(j_y, j_o, 0.5, 0.5, 0.1, "l2")


def test_cosine_conversion_is_attained_by_the_tangent_worst_case():
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(3, dtype=DT, generator=gen)
    gn = float(g.norm())
    t = 0.3 * gn
    bound = lit.cosine_from_l2(t, gn)
    # worst case: g' = g + Δ with ‖Δ‖ = T and Δ ⊥ g' (g' tangent to the ball): angle arcsin(T/‖g‖)
    u = torch.randn(3, dtype=DT, generator=gen)
    u = u - (u @ g) / gn ** 2 * g
    u = u / u.norm()
    th = math.asin(t / gn)
    gp = gn * math.cos(th) * (math.cos(th) * g / gn + math.sin(th) * u)
    assert float((gp - g).norm()) == pytest.approx(t, rel=1e-12)
    assert float(cos_dist(gp[None], g[None])) == pytest.approx(bound, rel=1e-10)
    # and nothing in the ball does worse
    dlt = torch.randn(20000, 3, dtype=DT, generator=gen)
    dlt = t * dlt / dlt.norm(dim=1, keepdim=True) * torch.rand(20000, 1, dtype=DT, generator=gen) ** (1 / 3)
    assert float(cos_dist(g + dlt, g.expand(20000, 3)).max()) <= bound * (1 + 1e-12)
    assert lit.cosine_from_l2(0.0, gn) == 0.0
    assert lit.cosine_from_l2(gn, gn) == 1.0
    assert lit.cosine_from_l2(1.01 * gn, gn) == math.inf


def test_cosine_bound_keeps_the_guarantee_and_inf_serialises_as_none():
    sound = lit.LiteratureBound("s", "l2_change", 0.5, Guarantee.SOUND, "src")
    est = lit.LiteratureBound("e", "l2_change", 0.5, Guarantee.ESTIMATE, "src")
    assert lit.cosine_bound(sound, 2.0).guarantee == Guarantee.SOUND
    assert lit.cosine_bound(est, 2.0).guarantee == Guarantee.ESTIMATE
    assert lit.cosine_bound(est, 2.0).value == pytest.approx(1 - math.sqrt(1 - 0.0625))
    vac = lit.cosine_bound(sound, 0.4)
    assert vac.value == math.inf and "vacuous" in vac.note
    assert vac.to_dict()["value"] is None and vac.to_dict()["guarantee"] == "sound"
    json.dumps(vac.to_dict(), allow_nan=False)


def test_inverse_radius_round_trips():
    gen = torch.Generator().manual_seed(11)
    j = torch.randn(7, 7, dtype=DT, generator=gen)
    gn = 3.0
    for omega in (0.01, 0.3):
        e2 = lit.inverse_radius(j, omega, "l2").value
        assert lit.first_order_l2(j, e2).value == pytest.approx(omega, rel=1e-12)
        ei = lit.inverse_radius(j, omega, "linf").value
        assert lit.first_order_linf(j, ei)[0].value == pytest.approx(omega, rel=1e-12)
        for norm in ("l2", "linf"):
            r = lit.inverse_radius(j, omega, norm, "cosine", g_norm=gn)
            assert r.quantity == "radius" and r.guarantee == Guarantee.ESTIMATE
            t = lit.first_order_l2(j, r.value) if norm == "l2" else lit.first_order_linf(j, r.value)[0]
            assert lit.cosine_from_l2(t.value, gn) == pytest.approx(omega, rel=1e-9)
    # ω ≥ 1: the corollary's own limit T ≤ ‖g‖
    r = lit.inverse_radius(j, 1.5, "l2", "cosine", g_norm=gn)
    assert lit.first_order_l2(j, r.value).value == pytest.approx(gn, rel=1e-12)
    assert lit.inverse_radius(torch.zeros(3, 3, dtype=DT), 0.1, "l2").value == math.inf


# ------------------------------------------------------------------ [JOO]


def test_joo_bound_holds_exactly_for_an_affine_attribution():
    gen = torch.Generator().manual_seed(13)
    a = torch.randn(5, 5, dtype=DT, generator=gen)
    c = 3 * torch.randn(5, dtype=DT, generator=gen)
    ex = linear_explain(a, c)
    x = torch.randn(1, 5, dtype=DT, generator=gen)
    g = ex(x)
    for _ in range(20):
        delta = 0.2 * torch.randn(1, 5, dtype=DT, generator=gen)
        b = lit.joo_cosine_bound(ex, x, delta)
        bf = lit.joo_cosine_bound(ex, x, delta, form="frobenius")
        eps = float(delta.norm())
        hand = 2 * eps * float((a @ (delta[0] / eps)).norm()) / float(ex(x + delta).norm())
        assert b.value == pytest.approx(hand, rel=1e-12)
        assert float(cos_dist(ex(x + delta), g)) <= b.value <= bf.value
        assert b.quantity == "cosine_distance" and b.guarantee == Guarantee.ESTIMATE


# ------------------------------------------------------------------ [DOM] Hutchinson


def test_hutchinson_converges_to_the_squared_frobenius_norm_and_is_unbiased():
    net = random_mlp(ActKind.SOFTPLUS, 2.0, seed=2)
    x = torch.randn(1, 6, dtype=DT, generator=torch.Generator().manual_seed(1))
    ex = lit.saliency_explainer(net, 1)
    h = torch.autograd.functional.hessian(lambda z: net.forward(z[None])[0, 1], x[0])
    true = float((h ** 2).sum())
    mean, se = lit.hutchinson_frobenius_sq(ex, x, 20000, seed=0, batch=5000)
    assert abs(mean - true) <= 4 * se and abs(mean - true) / true < 0.05
    # unbiased: 60 independent 1-sample estimates average to the truth (Var = 2‖HHᵀ‖_F²)
    sd = math.sqrt(2 * float((h @ h.T).pow(2).sum()))
    ones = [lit.hutchinson_frobenius_sq(ex, x, 1, seed=s)[0] for s in range(60)]
    assert abs(sum(ones) / 60 - true) <= 4 * sd / math.sqrt(60)
    b = lit.hutchinson_frobenius(ex, x, 4000, seed=3)
    assert b.quantity == "hessian_frobenius" and b.guarantee == Guarantee.ESTIMATE
    assert b.value == pytest.approx(math.sqrt(true), rel=0.05)
    # a non-symmetric Jacobian (gradient × input): estimates ‖J‖_F²
    gxi = lit.input_x_gradient_explainer(net, 1)
    jg = lit.attribution_jacobian(gxi, x)
    m2, se2 = lit.hutchinson_frobenius_sq(gxi, x, 20000, seed=1, batch=5000)
    assert abs(m2 - float((jg ** 2).sum())) <= 4 * se2


# ------------------------------------------------------------------ [DOM] Theorem 1


def _hessians(net: Network, xs: torch.Tensor, target: int, output: Output) -> torch.Tensor:
    """∇²o at every point of xs (n, *S) in one double backward: row k of the Hessian at
    point i is ∂(∂o/∂x_k)/∂x of copy (i, k) (the trick of ``attribution_jacobian``)."""
    ex = lit.saliency_explainer(net, target, output)
    n, d = len(xs), xs[0].numel()
    big = xs.repeat_interleave(d, 0).clone().requires_grad_(True)
    g = ex(big).reshape(n * d, d)
    sel = g.gather(1, torch.arange(d).repeat(n)[:, None]).sum()
    (h,) = torch.autograd.grad(sel, big)
    return h.reshape(n, d, d)


def _points(shape, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.1, 1.0, 4.0], dtype=DT).repeat(n // 3 + 1)[:n]
    return torch.randn(n, *shape, dtype=DT, generator=gen) * scale.reshape(n, *([1] * len(shape)))


@pytest.mark.parametrize("act,param", SMOOTH, ids=SMOOTH_IDS)
def test_dombrowski_bound_dominates_the_true_hessian_mlp(act, param):
    net = random_mlp(act, param, seed=4)
    xs = _points(net.input_shape, 150, seed=5)
    for output in (Output.LOGIT, Output.LOSS):
        fro = lit.weight_norm_hessian_bound(net, output, None, "frobenius")
        spe = lit.weight_norm_hessian_bound(net, output, None, "spectral")
        assert fro.guarantee == Guarantee.SOUND and fro.quantity == "hessian_frobenius"
        assert spe.value <= fro.value
        for c in range(net.num_classes):
            hf = _hessians(net, xs, c, output).flatten(1).norm(dim=1)
            per_c = lit.weight_norm_hessian_bound(net, output, c, "spectral").value
            assert float(hf.max()) <= per_c <= spe.value * (1 + 1e-12)
            assert float(hf.max()) > 0


@pytest.mark.parametrize("act,param", [SMOOTH[0], SMOOTH[2]], ids=["softplus", "tanh"])
def test_dombrowski_bound_dominates_the_true_hessian_cnn(act, param):
    net = random_cnn(act, param, seed=6, in_shape=(2, 7, 7))
    xs = _points(net.input_shape, 30, seed=7)
    spe = lit.weight_norm_hessian_bound(net, Output.LOGIT, 0, "spectral").value
    fro = lit.weight_norm_hessian_bound(net, Output.LOGIT, 0, "frobenius").value
    hf = _hessians(net, xs, 0, Output.LOGIT).flatten(1).norm(dim=1)
    assert float(hf.max()) <= spe <= fro


def test_dombrowski_frobenius_variant_is_equation_8_over_the_hidden_layers():
    net = random_mlp(ActKind.SOFTPLUS, 3.0, sizes=(5, 9, 8, 7, 4), seed=8)
    ws = [l.weight for l in net.layers if isinstance(l, Linear)]
    hidden, last = ws[:-1], ws[-1]
    s1, s2 = 1.0, 3.0 / 4
    k = len(hidden)
    fn = [float(w.norm()) for w in hidden]
    eq8 = sum(math.prod(f * f for f in fn[:m]) * math.prod(fn[m:]) * s1 ** (k + m - 2) * s2
              for m in range(1, k + 1))
    for c in range(4):
        b = lit.weight_norm_hessian_bound(net, Output.LOGIT, c, "frobenius")
        assert b.value == pytest.approx(float(last[c].norm()) * eq8, rel=1e-8)


def test_dombrowski_is_attained_on_one_neuron_and_eq8_with_an_activated_logit_layer_is_not_sound():
    """One sigmoid neuron, logit z = σ(w·x + b): ∇²z = σ''(w·x + b) w wᵀ, so
    max ‖∇²z‖_F = Σ2‖w‖², which our recursion returns. Reading eq. (8) with the logit layer
    counted as an activated layer (L = 2) gives ‖w‖²Σ2(Σ1 + Σ1²) = 0.3125·Σ2‖w‖² < the truth."""
    w = torch.tensor([[0.6, -0.8, 0.0]], dtype=DT)  # ‖w‖ = 1
    net = Network((Linear("fc0", w, torch.zeros(1, dtype=DT)), Activation("a", ActKind.SIGMOID),
                   Linear("fc1", torch.ones(1, 1, dtype=DT), torch.zeros(1, dtype=DT))), (3,))
    s1, s2 = lit.activation_sigma(net.layers[1])
    b = lit.weight_norm_hessian_bound(net, Output.LOGIT, 0, "spectral")
    z_star = math.log((3 + math.sqrt(3)) / (3 - math.sqrt(3)))  # sigmoid(z*) = (3 + √3)/6, argmax |σ''|
    x = (z_star * w).reshape(1, 3)  # w·x = z*
    h = lit.attribution_jacobian(lit.saliency_explainer(net, 0), x)
    true = float(h.norm())
    assert true == pytest.approx(s2, rel=1e-9) and b.value == pytest.approx(true, rel=1e-8) and b.value >= true
    naive = 1.0 * s2 * (s1 + s1 ** 2)  # eq. (8), L = 2, ‖W⁽¹⁾‖_F = ‖W⁽²⁾‖_F = 1
    assert naive < 0.5 * true


@pytest.mark.parametrize("act,param", [(ActKind.RELU, 0.0), (ActKind.LEAKY_RELU, 0.1)], ids=["relu", "leaky"])
def test_dombrowski_refuses_relu(act, param):
    with pytest.raises(ValueError, match="twice differentiable"):
        lit.weight_norm_hessian_bound(random_mlp(act, param))
    with pytest.raises(ValueError, match="twice differentiable"):
        lit.activation_sigma(Activation("a", act, param))


def test_activation_constants_are_the_suprema():
    z = torch.linspace(-20, 20, 400001, dtype=DT)
    for kind, param in SMOOTH:
        a = Activation("a", kind, param)
        zz = z.clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(a(zz).sum(), zz, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), zz)
        d1 = d1.detach()
        s1, s2 = lit.activation_sigma(a)
        assert float(d1.abs().max()) <= s1 + 1e-12 and float(d1.abs().max()) == pytest.approx(s1, rel=1e-6)
        assert float(d2.abs().max()) <= s2 + 1e-12 and float(d2.abs().max()) == pytest.approx(s2, rel=1e-6)


@pytest.mark.parametrize("stride,pad,shape", [((1, 1), (0, 0), (2, 6, 6)), ((2, 2), (1, 1), (3, 7, 8)),
                                              ((2, 1), (1, 0), (1, 9, 7))])
def test_conv_operator_norms(monkeypatch, stride, pad, shape):
    gen = torch.Generator().manual_seed(9)
    layer = Conv2d("c", torch.randn(4, shape[0], 3, 3, dtype=DT, generator=gen), torch.zeros(4, dtype=DT), stride, pad)
    n = math.prod(shape)
    eye = torch.eye(n, dtype=DT).reshape(n, *shape)
    a = F.conv2d(eye, layer.weight, None, stride, pad).reshape(n, -1).T  # the unfolded matrix
    exact = float(torch.linalg.svdvals(a)[0])
    nm = lit._affine_norms(layer, shape)
    assert nm.spec == pytest.approx(exact, rel=1e-10)  # small: exact SVD
    assert nm.fro == pytest.approx(float(a.norm()), rel=1e-12)
    assert torch.allclose(nm.row_norms, a.norm(dim=1), atol=1e-12)
    assert nm.rho == pytest.approx(float(a.norm(dim=1).pow(2).norm()), rel=1e-12)
    monkeypatch.setattr(lit, "_EXPLICIT_CONV_ENTRIES", 0)  # large-layer path: circulant / Hölder bounds
    big = lit._affine_norms(layer, shape).spec
    assert exact <= big * (1 + 1e-12) and big <= nm.fro


# ------------------------------------------------------------------ sound variants


def _one_hidden_hessian_box(net: Network, x: torch.Tensor, e: torch.Tensor, c: int) -> Bounds:
    """Interval bound on ∇²z_c over the box [x − e, x + e] for fc0 → softplus_β → fc1:
    ∇²z_c = W1ᵀ diag(w2_c ⊙ σ''(z)) W1 with σ''(z) = β s(1 − s) unimodal (peak β/4 at 0)."""
    fc0, act, fc1 = net.layers
    w1, beta = fc0.weight, act.param
    zc = fc0(x)[0]
    zr = w1.abs() @ e
    zl, zu = zc - zr, zc + zr

    def s2(z):
        s = torch.sigmoid(beta * z)
        return beta * s * (1 - s)

    lo = torch.minimum(s2(zl), s2(zu))
    hi = torch.where((zl <= 0) & (zu >= 0), torch.full_like(zl, beta / 4), torch.maximum(s2(zl), s2(zu)))
    w2 = fc1.weight[c]
    cl, cu = torch.minimum(w2 * lo, w2 * hi), torch.maximum(w2 * lo, w2 * hi)
    p = w1[:, :, None] * w1[:, None, :]  # (k, i, j)
    a, b = p * cl[:, None, None], p * cu[:, None, None]
    return Bounds(torch.minimum(a, b).sum(0), torch.maximum(a, b).sum(0))


def test_sound_variants_bound_the_true_change_on_a_one_hidden_layer_net():
    """jb is a real (interval) bound of the Jacobian over the box: the sound numbers must
    dominate every sampled change."""
    net = random_mlp(ActKind.SOFTPLUS, 2.0, sizes=(5, 8, 3), seed=10)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 5, dtype=DT, generator=gen)
    c, eps = 0, 0.4
    ex = lit.saliency_explainer(net, c)
    g = saliency(net, x, torch.tensor([c]))
    e = torch.full((5,), eps, dtype=DT)
    jb = _one_hidden_hessian_box(net, x, e, c)
    n = 1500
    u = torch.rand(n, 5, dtype=DT, generator=gen) * 2 - 1
    corners = torch.sign(torch.rand(n, 5, dtype=DT, generator=gen) - 0.5)
    pts = x + eps * torch.cat([u, corners])
    # the test's own interval bound really contains the Hessian at the sampled points
    for i in range(0, len(pts), 150):
        h = lit.attribution_jacobian(ex, pts[i : i + 1])
        assert bool(((h >= jb.lower - 1e-12) & (h <= jb.upper + 1e-12)).all())
    vs = saliency(net, pts, torch.full((len(pts),), c))
    change = (vs - g).norm(dim=1)
    sl = lit.sound_linf(jb, eps)
    assert sl.guarantee == Guarantee.SOUND and sl.quantity == "linf_ball_l2_change"
    assert float(change.max()) <= sl.value
    assert lit.sound_linf(jb, e).value == pytest.approx(sl.value, rel=1e-12)  # per-coordinate radii
    # ℓ2 ball of radius eps lies in the box
    dl = torch.randn(2 * n, 5, dtype=DT, generator=gen)
    dl = eps * dl / dl.norm(dim=1, keepdim=True) * torch.rand(2 * n, 1, dtype=DT, generator=gen) ** 0.2
    c2 = (saliency(net, x + dl, torch.full((2 * n,), c)) - g).norm(dim=1)
    s2 = lit.sound_l2(jb, eps)
    assert float(c2.max()) <= s2.value
    # the cosine conversion of a sound T dominates the sampled cosine distances
    sc = lit.cosine_bound(sl, float(g.norm()))
    if math.isfinite(sc.value):
        assert float(cos_dist(vs, g.expand_as(vs)).max()) <= sc.value
    # and the point estimates are not bounds: sound ≥ first-order at x
    j = lit.attribution_jacobian(ex, x)
    assert sl.value >= lit.first_order_linf(j, eps)[0].value * (1 - 1e-12)


def test_sound_arithmetic_on_point_jacobian_boxes():
    """ARITHMETIC ONLY: jb is a point (g linear), so the sound formulas must reduce to the
    first-order ones (exact for linear g); jb from a dense sample checks shape handling."""
    eps = 0.05
    a = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=DT)
    assert lit.sound_linf(Bounds.point(a), eps).value == pytest.approx(2 * eps, rel=1e-8)  # MᵀM orientation
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(6, 6, dtype=DT, generator=gen)
    sl = lit.sound_l2(Bounds.point(a[None]), eps)  # (1, d, d) accepted
    assert sl.value == pytest.approx(lit.first_order_l2(a, eps).value, rel=1e-8)
    si = lit.sound_linf(Bounds.point(a), eps)
    assert corner_max(a, eps) <= si.value <= lit.first_order_linf(a, eps)[0].value * (1 + 1e-8)
    ap = a.abs()
    assert lit.sound_linf(Bounds.point(ap), eps).value == pytest.approx(corner_max(ap, eps), rel=1e-8)
    # ARITHMETIC ONLY (not a sound jb): min/max of the Jacobian over a dense sample
    net = random_mlp(ActKind.TANH, 0.0, sizes=(4, 6, 3), seed=3)
    ex = lit.saliency_explainer(net, 1)
    x = torch.randn(1, 4, dtype=DT, generator=gen)
    js = torch.stack([lit.attribution_jacobian(ex, x + eps * (2 * torch.rand(1, 4, dtype=DT, generator=gen) - 1))
                      for _ in range(40)])
    jb = Bounds(js.min(0).values, js.max(0).values)
    m = torch.maximum(jb.lower.abs(), jb.upper.abs())
    assert lit.sound_linf(jb, eps).value <= eps * float((m @ torch.ones(4, dtype=DT)).norm()) * (1 + 1e-8)
    assert lit.sound_l2(jb, eps).value <= eps * float(torch.linalg.svdvals(m)[0]) * (1 + 1e-8)
    with pytest.raises(ValueError):
        lit.sound_linf(Bounds.point(torch.zeros(2, 3, 3, dtype=DT)), eps)


def test_certified_radius_bisection():
    calls: list[tuple[float, bool]] = []

    def rec(f):
        def check(e):
            r = bool(f(e))
            calls.append((e, r))
            return r
        return check

    r = lit.certified_radius(rec(lambda e: e <= 0.3), 1.0, tol=1e-6)
    assert 0.3 - 1e-6 <= r <= 0.3
    assert lit.certified_radius(lambda e: True, 0.5) == 0.5
    assert lit.certified_radius(lambda e: False, 0.5) == 0.0
    calls.clear()
    # non-monotone: certifies on [0, 0.1] and [0.5, 0.6] only; the answer is a certified point
    r = lit.certified_radius(rec(lambda e: e <= 0.1 or 0.5 <= e <= 0.6), 1.0, tol=1e-6)
    assert r in {e for e, ok in calls if ok} and 0.6 - 1e-6 <= r <= 0.6
    calls.clear()
    r = lit.certified_radius(rec(lambda e: 0.2 <= e <= 0.3), 1.0, tol=1e-6, max_iter=30)
    assert r == 0.0 or r in {e for e, ok in calls if ok}
    assert len(calls) <= 30
    with pytest.raises(ValueError):
        lit.certified_radius(lambda e: True, 0.0)


# ------------------------------------------------------------------ all_bounds


def test_all_bounds_side_by_side():
    net = random_mlp(ActKind.SOFTPLUS, 2.0, sizes=(6, 8, 7, 4), seed=14)
    x = torch.randn(1, 6, dtype=DT, generator=torch.Generator().manual_seed(15))
    c = int(net.forward(x).argmax())
    ex = lit.saliency_explainer(net, c)
    j = lit.attribution_jacobian(ex, x)
    jb = Bounds(j - 0.01, j + 0.01)  # stands in for an engine's box (arithmetic only here)
    for norm in ("l2", "linf"):
        bs = lit.all_bounds(ex, x, 0.01, norm, jb, net=net, target=c, omega=0.1, hutchinson_samples=64)
        names = [b.name for b in bs]
        assert len(set(names)) == len(names)
        by = {b.name: b for b in bs}
        for n in ("sound_" + norm, "dom_thm1_frobenius", "dom_thm1_spectral"):
            assert by[n].guarantee == Guarantee.SOUND
        assert any(n.startswith("dom_thm1_") and n.endswith("_change") for n in names)
        assert {"joo_thm6_direction", "dom_hutchinson", "jacobian_frobenius_at_x"} <= set(names)
        assert ("car_thm1_l2" in names) == (norm == "l2") and ("car_thm2_linf" in names) == (norm == "linf")
        for b in bs:
            if b.name.startswith(("car_", "joo_", "dom_hutchinson", "jacobian_")):
                assert b.guarantee == Guarantee.ESTIMATE
        json.dumps([b.to_dict() for b in bs], allow_nan=False)
        # the sound Dombrowski change bound dominates the first-order estimate here
        ch = next(b for b in bs if b.name.startswith("dom_thm1_") and b.name.endswith("_change"))
        first = by["car_thm1_l2"] if norm == "l2" else by["car_cor1_linf"]
        assert ch.value >= first.value
    # an explanation that is not the net's saliency gets no Dombrowski change bound
    gxi = lit.input_x_gradient_explainer(net, c)
    o = 1 - c if c < 2 else 0
    bs = lit.all_bounds(gxi, x, 0.01, "linf", net=net, target=c, hutchinson_samples=8,
                        label_constraint=(lit.input_x_gradient_explainer(net, o), 1.0))
    names = [b.name for b in bs]
    assert "dom_thm1_frobenius" in names and not any(n.endswith("_change") and n.startswith("dom_thm1") for n in names)
    assert "car_label_linf" in names
    # a ReLU net: Theorem 1 silently does not apply, the estimates are still there
    relu = random_mlp(ActKind.RELU, 0.0, seed=14)
    bs = lit.all_bounds(lit.saliency_explainer(relu, 0), x, 0.01, "l2", net=relu, target=0, hutchinson_samples=8)
    assert not any(b.name.startswith("dom_thm1") for b in bs)


def test_sound_cosine_refuses_an_estimate_and_zero_jacobian_is_flagged():
    est = lit.LiteratureBound("e", "l2_change", 0.5, Guarantee.ESTIMATE, "src")
    with pytest.raises(ValueError, match="not sound"):
        lit.sound_cosine(est, 2.0)
    assert lit.sound_cosine(lit.LiteratureBound("s", "l2_change", 0.5, Guarantee.SOUND, "src"), 2.0).guarantee \
        == Guarantee.SOUND
    relu = random_mlp(ActKind.RELU, 0.0, seed=1)
    x = torch.randn(1, 6, dtype=DT, generator=torch.Generator().manual_seed(2))
    j = lit.attribution_jacobian(lit.saliency_explainer(relu, 0), x)
    b = lit.first_order_l2(j, 0.1)
    assert b.value == 0.0 and "piecewise-linear" in b.note
