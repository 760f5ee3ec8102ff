"""SmoothGrad / Sparsified SmoothGrad and their randomized-smoothing certificates.

The certificate is probabilistic, so its main test is a failure rate: on a separable toy
network the smoothed map h(x) is known EXACTLY (enumeration of the 2^d activation patterns),
the certificate is run with many seeds, and the fraction of runs whose bounds miss the truth
(at x and at points of the radius sphere, including the directions where the Lipschitz bound
is tight) must stay within p; with the finite-sample or the radius term removed it must not.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import verigrad.smoothing as sm
from verigrad.bounds.base import Bounds
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.guarantees import Guarantee
from verigrad.models.network import ActKind, Activation, Linear, Network
from verigrad.properties import Property, _topk_members_that_stay, worst_case
from verigrad.smoothing import (
    SmoothingConfig,
    clopper_pearson,
    global_gradient_range,
    hoeffding_halfwidth,
    smoothgrad,
    smoothing_bounds,
    sparsified_smoothgrad,
    sparsify_map,
    topk_overlap_certificate,
    topk_overlap_lower_bound,
)
from tests.helpers import ACT_IDS, ACTS, random_cnn, random_mlp

F64 = torch.float64
OUTPUTS = [Output.LOGIT, Output.LOSS]


def _phi(z: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(z)


# ----------------------------------------------------------------------------------------
# The separable toy: g_j(x) = v_j a_j 1[a_j (x_j − t_j) > 0], so under N(0, σ²I) noise the
# coordinates are independent Bernoullis with P(active_j) = Φ(a_j (x_j − t_j) / σ).

D = 6
A = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 1.0], dtype=F64)
T = torch.tensor([0.1, -0.2, 0.3, -0.1, 0.0, 0.2], dtype=F64)
V = torch.tensor([1.0, -3.0, 2.0, 0.5, 2.5, -1.5], dtype=F64)  # distinct magnitudes, not in index order
X0 = torch.tensor([0.3, -0.1, 0.1, 0.4, -0.3, 0.2], dtype=F64)
SIGMA = 0.5
PATTERNS = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)), dtype=F64)  # (64, D)


def toy_net() -> Network:
    w2 = torch.stack([V, torch.zeros(D, dtype=F64)])
    return Network((Linear("fc0", torch.diag(A), -A * T), Activation("act0", ActKind.RELU),
                    Linear("fc1", w2, torch.zeros(2, dtype=F64))), (D,), "toy")


def ref_sparsify(g: torch.Tensor, kept: int, clip: int | None) -> torch.Tensor:
    """Independent reference for s: rank by (−|g_j|, j); relaxed as in the module docstring."""
    out = torch.zeros_like(g)
    for r, row in enumerate(g):
        mags = [abs(float(v)) for v in row]
        order = sorted(range(len(mags)), key=lambda j: (-mags[j], j))
        srt = [mags[j] for j in order]
        for rank, j in enumerate(order):
            if rank >= kept:
                continue
            if clip is None or rank < clip:
                out[r, j] = 1.0
                continue
            hi = srt[max(clip, 1) - 1]
            lo = srt[kept] if kept < len(mags) else 0.0
            out[r, j] = 1.0 if hi == lo else min(1.0, max(0.0, (mags[j] - lo) / (hi - lo)))
    return out


def exact_h(points: torch.Tensor, kept: int | None, clip: int | None = None) -> torch.Tensor:
    """Exact E[s(∇o(x + δ))] (kept = K) or E[∇o(x + δ)] (kept None) at each row of points."""
    q = _phi(A * (points - T) / SIGMA)  # (P, D) activation probabilities
    if kept is None:
        return V * A * q
    grads = PATTERNS * (V * A)  # (64, D)
    s = ref_sparsify(grads, kept, clip)
    prob = torch.prod(torch.where(PATTERNS[None] > 0, q[:, None, :], 1 - q[:, None, :]), dim=2)  # (P, 64)
    return prob @ s


def sphere_points(rho: float, n_random: int, seed: int) -> torch.Tensor:
    """x0, x0 ± ρ e_j (where the 1/σ-Lipschitz bound is tight for a half-space coordinate) and
    random points of the sphere."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n_random, D, generator=gen, dtype=F64)
    u = u / u.norm(dim=1, keepdim=True)
    eye = torch.eye(D, dtype=F64)
    return torch.cat([X0[None], X0 + rho * eye, X0 - rho * eye, X0 + rho * u])


def failure_rate(cfg_kw: dict, rho: float, sparsified: bool, runs: int, check_rho: float | None = None,
                 k: int | None = None) -> tuple[float, float, float]:
    """(fraction of runs whose bounds miss the exact truth somewhere, mean width at ρ,
    fraction of runs whose certified top-k overlap is violated) over ``runs`` seeds."""
    net = toy_net()
    pts = sphere_points(rho if check_rho is None else check_rho, 20, seed=1)
    cfg0 = SmoothingConfig(sigma=SIGMA, **cfg_kw)
    kept = cfg0.kept(D) if sparsified else None
    clip = cfg0.clipped(D) if (sparsified and cfg0.relaxed) else None
    truth = exact_h(pts, kept, clip)  # (P, D)
    target = torch.zeros(1, dtype=torch.long)
    misses, widths, topk_misses = 0, [], 0
    for seed in range(runs):
        cfg = SmoothingConfig(sigma=SIGMA, seed=seed, **cfg_kw)
        cert = smoothing_bounds(net, X0[None], target, Output.LOGIT, cfg, rho, sparsified)
        lo, up = cert.bounds.lower[0], cert.bounds.upper[0]
        ok = bool(((truth >= lo - 1e-12) & (truth <= up + 1e-12)).all())
        ok_x = bool(((truth[0] >= cert.at_x.lower[0] - 1e-12) & (truth[0] <= cert.at_x.upper[0] + 1e-12)).all())
        misses += not (ok and ok_x)
        widths.append(float(cert.bounds.width.mean()))
        if k is not None and ok and ok_x:
            kstar = int(topk_overlap_certificate(cert, k)[0])
            top_x = set(truth[0].topk(k).indices.tolist())
            top_est = set(cert.estimate[0].topk(k).indices.tolist())
            for row in truth:
                top_p = set(row.topk(k).indices.tolist())
                if len(top_x & top_p) < kstar or len(top_est & top_p) < kstar:
                    topk_misses += 1
                    break
    return misses / runs, sum(widths) / runs, topk_misses / runs


def test_toy_truth_matches_sampling():
    """The enumeration is the real smoothed map of the toy network (checks the test itself)."""
    net = toy_net()
    g = saliency(net, (X0 + 1e-9)[None], torch.zeros(1, dtype=torch.long))[0]
    act = (A * (X0 + 1e-9 - T) > 0).to(F64)
    assert torch.allclose(g, V * A * act)
    cfg = SmoothingConfig(sigma=SIGMA, samples=40000, sparsify=2, seed=3, batch_size=40000)
    est = sparsified_smoothgrad(net, X0[None], torch.zeros(1, dtype=torch.long), Output.LOGIT, cfg)[0]
    assert torch.allclose(est, exact_h(X0[None], 2)[0], atol=0.015)
    est = smoothgrad(net, X0[None], torch.zeros(1, dtype=torch.long), Output.LOGIT, cfg)[0]
    assert torch.allclose(est, exact_h(X0[None], None)[0], atol=0.04)


P = 0.05
RUNS = 200
SLACK = 3 * math.sqrt(P * (1 - P) / RUNS)  # 3 binomial standard deviations


@pytest.mark.parametrize("kw,sparsified", [
    ({"sparsify": 2}, True),
    ({"sparsify": 2, "interval": "clopper_pearson"}, True),
    ({"sparsify": 3, "relaxed": True, "clip": 1}, True),
    ({}, False),
], ids=["sparsified-hoeffding", "sparsified-clopper-pearson", "relaxed", "plain"])
def test_failure_rate_within_p_and_not_vacuous(kw, sparsified):
    rho = 0.25  # ρ/σ = 0.5
    rate, width, topk_rate = failure_rate({"samples": 200, "failure_probability": P, **kw}, rho, sparsified,
                                          RUNS, k=2 if sparsified else None)
    assert rate <= P + SLACK, rate
    assert topk_rate == 0.0  # the top-k claim follows from the bounds holding
    # not vacuous: far from the trivial width (1 for the [0, 1] maps, 2G for the plain map)
    trivial = 1.0 if sparsified else float((2 * V.abs()).mean())
    assert width < 0.75 * trivial, (width, trivial)


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_broken_finite_sample_term_is_caught(monkeypatch, factor):
    """With the Hoeffding correction removed (or halved) the bounds at x are (nearly) the
    point estimate mapped through Φ(Φ⁻¹(·) ± ρ/σ): they miss the truth far more often than p."""
    right = sm.hoeffding_halfwidth
    monkeypatch.setattr(sm, "hoeffding_halfwidth", lambda n, d, p: factor * right(n, d, p))
    rate, _, _ = failure_rate({"samples": 200, "sparsify": 2, "failure_probability": P}, 0.25, True, RUNS)
    assert rate > P + SLACK + 0.1, rate


def test_missing_radius_term_is_caught():
    """Certifying radius 0 but checking on the sphere of radius 0.5 σ (along ±e_j the true
    Φ⁻¹(h_j) moves by exactly ρ/σ for a coordinate that is a half-space indicator) fails."""
    rate, _, _ = failure_rate({"samples": 200, "sparsify": 1, "failure_probability": P}, 0.0, True, 60,
                              check_rho=0.5 * SIGMA)
    assert rate > P + 0.3, rate


def test_hoeffding_halfwidth_formula():
    """c = sqrt(ln(2d/p)/(2n)): grows with the number of coordinates (union bound), shrinks as
    1/√n."""
    c = hoeffding_halfwidth(1000, 784, 0.05)
    assert c == pytest.approx(math.sqrt(math.log(2 * 784 / 0.05) / 2000))
    assert hoeffding_halfwidth(1000, 1, 0.05) < c
    assert hoeffding_halfwidth(4000, 784, 0.05) == pytest.approx(c / 2)


# ----------------------------------------------------------------------------------------
# Clopper–Pearson


def test_clopper_pearson_closed_forms_and_symmetry():
    n, a = 50, 1e-3
    lo, hi = clopper_pearson(torch.tensor([0, 1, 25, 49, 50]), n, a)
    assert float(hi[0]) == pytest.approx(1 - a ** (1 / n), rel=1e-8)  # m = 0: (1 − p)^n = α
    assert float(lo[0]) == 0.0 and float(hi[4]) == 1.0
    assert float(lo[4]) == pytest.approx(a ** (1 / n), rel=1e-8)  # m = n: p^n = α
    assert float(lo[1]) == pytest.approx(1 - (1 - a) ** (1 / n), rel=1e-6)  # m = 1: 1 − (1 − p)^n = α
    assert float(lo[2]) == pytest.approx(1 - float(hi[2]), abs=1e-9)  # symmetric at m = n/2
    assert bool((lo[:-1] <= lo[1:]).all() and (hi[:-1] <= hi[1:]).all())
    # the exact tail at the limits: P(X ≤ m; hi) ≤ α, just below the limit it exceeds α
    m = 25
    p = float(hi[2])
    cdf = sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(m + 1))
    assert cdf <= a * (1 + 1e-6)
    p2 = p - 1e-6
    assert sum(math.comb(n, j) * p2**j * (1 - p2) ** (n - j) for j in range(m + 1)) > a


def test_clopper_pearson_coverage():
    gen = torch.Generator().manual_seed(0)
    n, a = 30, 0.05
    for p in (0.02, 0.3, 0.5, 0.97):
        x = torch.binomial(torch.full((4000,), float(n), dtype=F64), torch.full((4000,), p, dtype=F64), generator=gen)
        lo, hi = clopper_pearson(x.long(), n, a)
        assert float((hi < p).to(F64).mean()) <= a + 0.012
        assert float((lo > p).to(F64).mean()) <= a + 0.012


# ----------------------------------------------------------------------------------------
# Explanations


def test_sparsify_map_matches_reference_and_ties():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(20, 9, generator=gen, dtype=F64)
    g[::3, :4] = 0.0  # ties at zero
    g[1::4, 5] = -g[1::4, 6]  # ties in magnitude
    for kept in (1, 3, 9):
        s = sparsify_map(g, kept)
        assert torch.equal(s, ref_sparsify(g, kept, None))
        assert bool((s.sum(1) == kept).all())
        for clip in range(0, kept + 1):
            assert torch.allclose(sparsify_map(g, kept, clip), ref_sparsify(g, kept, clip), atol=1e-12)
    assert torch.equal(sparsify_map(g, 4, 4), sparsify_map(g, 4))  # C = K: the plain sparsified map
    zero = torch.zeros(2, 5, dtype=F64)
    assert torch.equal(sparsify_map(zero, 2), torch.tensor([[1.0, 1, 0, 0, 0]] * 2, dtype=F64))  # lowest index


@pytest.mark.parametrize("sparse", [False, True])
def test_estimates_reproducible_and_batch_size_independent(sparse):
    net = random_mlp(ActKind.TANH, sizes=(6, 8, 7, 4), seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=gen, dtype=F64)
    tgt = torch.tensor([0, 3, 1])
    fn = sparsified_smoothgrad if sparse else smoothgrad
    outs = [fn(net, x, tgt, Output.LOSS, SmoothingConfig(sigma=0.3, samples=37, sparsify=2, batch_size=bs))
            for bs in (1, 7, 64, 1000)]
    for o in outs[1:]:
        if sparse:
            assert torch.equal(o, outs[0])
        else:
            assert torch.allclose(o, outs[0], rtol=0, atol=1e-13)
    # alone or in a batch: the same draws, the same map
    alone = fn(net, x[1:2], tgt[1:2], Output.LOSS, SmoothingConfig(sigma=0.3, samples=37, sparsify=2))
    assert torch.allclose(alone[0], outs[0][1], rtol=0, atol=1e-13)
    other = fn(net, x, tgt, Output.LOSS, SmoothingConfig(sigma=0.3, samples=37, sparsify=2, seed=5))
    assert not torch.allclose(other, outs[0])
    if sparse:  # exactly K ones per draw: every estimate sums to K
        assert torch.allclose(outs[0].sum(1), torch.full((3,), 2.0, dtype=F64), atol=1e-12)
        assert bool(((outs[0] >= 0) & (outs[0] <= 1)).all())


def test_noise_stream_is_chunking_invariant():
    full = sm._noise(7, 0, 600, 5)
    parts = torch.cat([sm._noise(7, lo, min(600, lo + 37), 5) for lo in range(0, 600, 37)])
    assert torch.equal(full, parts)
    assert abs(float(full.mean())) < 0.1 and abs(float(full.std()) - 1) < 0.1


@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
def test_tiny_sigma_smoothgrad_is_saliency(act, param):
    net = random_mlp(act, param, seed=4)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    tgt = torch.tensor([0, 1, 2, 3])
    for out in OUTPUTS:
        sg = smoothgrad(net, x, tgt, out, SmoothingConfig(sigma=1e-8, samples=5))
        assert torch.allclose(sg, saliency(net, x, tgt, out), rtol=1e-5, atol=1e-7)


def test_linear_model_sparsified_map_is_exact_indicator():
    gen = torch.Generator().manual_seed(6)
    w1 = torch.randn(5, 8, generator=gen, dtype=F64)
    w2 = torch.randn(3, 5, generator=gen, dtype=F64)
    net = Network((Linear("a", w1, torch.zeros(5, dtype=F64)), Linear("b", w2, torch.zeros(3, dtype=F64))), (8,))
    x = torch.randn(2, 8, generator=gen, dtype=F64)
    tgt = torch.tensor([2, 0])
    grad = (w2 @ w1)[tgt]  # constant gradient
    cfg = SmoothingConfig(sigma=2.0, samples=50, sparsify=3)
    est = sparsified_smoothgrad(net, x, tgt, Output.LOGIT, cfg)
    ind = torch.zeros_like(grad).scatter(1, grad.abs().topk(3).indices, 1.0)
    assert torch.equal(est, ind)
    rel = sparsified_smoothgrad(net, x, tgt, Output.LOGIT,
                                SmoothingConfig(sigma=2.0, samples=50, sparsify=3, relaxed=True, clip=1))
    assert torch.allclose(rel, sparsify_map(grad, 3, 1), atol=1e-12)
    # and its certificate at radius 0 contains the (constant) truth
    cert = smoothing_bounds(net, x, tgt, Output.LOGIT, cfg, 0.0, True)
    assert bool(cert.at_x.contains(ind).all() and cert.bounds.contains(ind).all())


def test_sparsify_fraction_uses_ceiling():
    cfg = SmoothingConfig(sigma=1.0, sparsify=0.1)
    assert cfg.kept(784) == 79 and cfg.kept(780) == 78 and cfg.kept(10) == 1
    assert SmoothingConfig(sigma=1.0, sparsify=78).kept(784) == 78
    assert SmoothingConfig(sigma=1.0, sparsify=0.5, relaxed=True, clip=0.1).clipped(100) == 10


# ----------------------------------------------------------------------------------------
# Global gradient range


def _far_points(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 1.0, 10.0, 1000.0], dtype=F64).repeat_interleave(25)
    return torch.randn(len(scales), *shape, generator=gen, dtype=F64) * scales.reshape(-1, *[1] * len(shape))


@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_global_gradient_range_is_sound(act, param, kind):
    net = random_mlp(act, param, seed=7) if kind == "mlp" else random_cnn(act, param, seed=7)
    x = _far_points(net.input_shape, seed=8)
    ncls = net.num_classes
    for out in OUTPUTS:
        g_any = global_gradient_range(net, out)
        assert g_any.shape == tuple(net.input_shape)
        for c in range(ncls):
            tgt = torch.full((len(x),), c, dtype=torch.long)
            g = global_gradient_range(net, out, tgt)
            v = saliency(net, x, tgt, out).abs()
            assert bool((v <= g * (1 + 1e-9) + 1e-12).all()), float((v - g).max())
            assert bool((g <= g_any[None] + 1e-12).all())


def test_global_gradient_range_exact_for_last_layer():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(4, 7, generator=gen, dtype=F64)
    net = Network((Linear("fc", w, torch.zeros(4, dtype=F64)),), (7,))
    tgt = torch.tensor([2])
    assert torch.allclose(global_gradient_range(net, Output.LOGIT, tgt)[0], w[2].abs())
    # loss: max_j |W_j − W_c|, approached as softmax puts its mass on the best j
    g = global_gradient_range(net, Output.LOSS, tgt)[0]
    assert torch.allclose(g, (w - w[2]).abs().amax(0))
    # sigmoid's derivative is at most 1/4
    s = random_mlp(ActKind.SIGMOID, sizes=(3, 4, 2), seed=1)
    r = random_mlp(ActKind.RELU, sizes=(3, 4, 2), seed=1)
    assert torch.allclose(global_gradient_range(s, Output.LOGIT), global_gradient_range(r, Output.LOGIT) / 4)


# ----------------------------------------------------------------------------------------
# Certificate object and top-k


def test_certificate_fields_and_monotonicity():
    net = random_mlp(ActKind.SOFTPLUS, 2.0, sizes=(10, 12, 3), seed=3)
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(1), dtype=F64)
    tgt = torch.tensor([0, 2])
    cfg = SmoothingConfig(sigma=0.5, samples=300, sparsify=3)
    c0 = smoothing_bounds(net, x, tgt, "logit", cfg, 0.0, True)
    c1 = smoothing_bounds(net, x, tgt, "logit", cfg, 0.2, True)
    assert c1.guarantee == Guarantee.PROBABILISTIC and c1.samples == 300 and c1.radius == 0.2
    assert c1.failure_probability == 0.05 and c1.method == "sparsified_smoothgrad" and c1.notes
    assert torch.equal(c0.estimate, c1.estimate)
    assert torch.allclose(c0.bounds.lower, c1.at_x.lower) and torch.allclose(c0.bounds.upper, c1.at_x.upper)
    # the estimate lies in its own bounds; larger radius, wider bounds; all within [0, 1]
    assert bool(c1.bounds.contains(c1.estimate).all())
    assert bool((c1.bounds.lower <= c0.bounds.lower).all() and (c1.bounds.upper >= c0.bounds.upper).all())
    assert bool((c1.bounds.lower >= 0).all() and (c1.bounds.upper <= 1).all())
    plain = smoothing_bounds(net, x, tgt, "logit", cfg, 0.2, False)
    assert plain.method == "smoothgrad" and bool(plain.bounds.contains(plain.estimate).all())
    g = plain.scale
    assert bool((plain.bounds.lower >= -g - 1e-12).all() and (plain.bounds.upper <= g + 1e-12).all())


def test_topk_box_rule_is_sound_by_sampling():
    gen = torch.Generator().manual_seed(11)
    d, k = 9, 3
    for trial in range(60):
        v0 = torch.round(torch.randn(1, d, generator=gen, dtype=F64) * 2) / 2  # ties in |v0|
        w = torch.rand(1, d, generator=gen, dtype=F64) * (0.8 if trial % 2 else 0.2)
        lo, up = v0 - w * torch.rand(1, d, generator=gen, dtype=F64), v0 + w * torch.rand(1, d, generator=gen, dtype=F64)
        box = Bounds(lo, up)
        bound = int(topk_overlap_lower_bound(v0, box, k)[0])
        repo = float(worst_case(Property("t", "topk", None, 0.5, k=k), v0, box)[0]) * k
        assert bound >= 0
        pts = lo + (up - lo) * torch.rand(400, d, generator=gen, dtype=F64)
        corners = lo + (up - lo) * torch.randint(0, 2, (400, d), generator=gen).to(F64)
        pts = torch.cat([pts, corners, v0])
        top0 = set(v0[0].abs().topk(k).indices.tolist())
        for p in pts:
            assert len(top0 & set(p.abs().topk(k).indices.tolist())) >= bound
            assert len(top0 & set(p.abs().topk(k).indices.tolist())) >= repo - 1e-9


def test_topk_certificate_at_least_the_property_rule():
    """On monotone smoothing bounds the paper's Corollary 2 is never below properties' topk rule,
    and both agree that overlap = k at radius 0 with zero-width bounds."""
    net = random_mlp(ActKind.RELU, sizes=(30, 20, 3), seed=5)
    x = torch.randn(3, 30, generator=torch.Generator().manual_seed(0), dtype=F64)
    tgt = torch.tensor([0, 1, 2])
    k = 6
    cert = smoothing_bounds(net, x, tgt, "logit", SmoothingConfig(sigma=0.3, samples=2000, sparsify=6), 0.05, True)
    ours = topk_overlap_certificate(cert, k)
    repo = worst_case(Property("t", "topk", None, 0.5, k=k), cert.estimate, cert.bounds) * k
    assert bool((ours >= repo - 1e-9).all()) and bool((ours <= k).all())
    point = Bounds(cert.estimate, cert.estimate)
    assert bool((topk_overlap_lower_bound(cert.estimate, point, k) == k).all())


def test_topk_corollary2_beats_per_member_rule_by_hand():
    """d = 7, k = 3: the ranks-3 and 4 features can rise above both leaders, so no single leader
    is certain to stay in the top 3 (properties' rule: 0), but two outsiders cannot displace
    both at once: Corollary 2 gives 2, which the attained point below shows is exact."""
    v0 = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1]], dtype=F64)
    lo = torch.tensor([[5.5, 5.5, 3.0, 3.0, 2.5, 1.5, 0.5]], dtype=F64)
    up = torch.tensor([[7.5, 6.5, 5.6, 5.8, 3.5, 2.5, 1.5]], dtype=F64)
    box = Bounds(lo, up)
    assert int(topk_overlap_lower_bound(v0, box, 3)[0]) == 2
    prop = Property("t", "topk", None, 0.5, k=3)
    assert float(_topk_members_that_stay(prop, v0, box)[0]) == 0.0
    # the topk property rule takes the larger of the two
    assert float(worst_case(prop, v0, box)[0]) == 2 / 3
    v = torch.tensor([[5.5, 5.5, 5.6, 5.8, 3.0, 2.0, 1.0]], dtype=F64)
    assert len({0, 1, 2} & set(v[0].topk(3).indices.tolist())) == 2


# ----------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("kw,msg", [
    ({"sigma": 0.0}, "sigma"),
    ({"sigma": float("nan")}, "sigma"),
    ({"sigma": 1.0, "samples": 0}, "samples"),
    ({"sigma": 1.0, "samples": 2.5}, "samples"),
    ({"sigma": 1.0, "seed": -1}, "seed"),
    ({"sigma": 1.0, "batch_size": 0}, "batch_size"),
    ({"sigma": 1.0, "sparsify": 0.0}, "sparsify"),
    ({"sigma": 1.0, "sparsify": 1.5}, "sparsify"),
    ({"sigma": 1.0, "sparsify": 0}, "sparsify"),
    ({"sigma": 1.0, "sparsify": True}, "sparsify"),
    ({"sigma": 1.0, "relaxed": True}, "clip"),
    ({"sigma": 1.0, "clip": 0.1}, "clip"),
    ({"sigma": 1.0, "relaxed": True, "clip": -1}, "clip"),
    ({"sigma": 1.0, "failure_probability": 0.0}, "failure_probability"),
    ({"sigma": 1.0, "failure_probability": 1.0}, "failure_probability"),
    ({"sigma": 1.0, "interval": "wilson"}, "interval"),
    ({"sigma": 1.0, "relaxed": True, "clip": 1, "interval": "clopper_pearson"}, "clopper_pearson"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SmoothingConfig(**kw)


def test_runtime_validation():
    net = toy_net()
    x, tgt = X0[None], torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds"):
        sparsified_smoothgrad(net, x, tgt, "logit", SmoothingConfig(sigma=1.0, sparsify=7))
    with pytest.raises(ValueError, match="clip"):
        sparsified_smoothgrad(net, x, tgt, "logit", SmoothingConfig(sigma=1.0, sparsify=2, relaxed=True, clip=3))
    with pytest.raises(ValueError, match="radius"):
        smoothing_bounds(net, x, tgt, "logit", SmoothingConfig(sigma=1.0, sparsify=2), -0.1, True)
    with pytest.raises(ValueError, match="hoeffding"):
        smoothing_bounds(net, x, tgt, "logit", SmoothingConfig(sigma=1.0, interval="clopper_pearson"), 0.1, False)
    with pytest.raises(ValueError, match="shape"):
        smoothgrad(net, torch.zeros(1, 5, dtype=F64), tgt, "logit", SmoothingConfig(sigma=1.0))
