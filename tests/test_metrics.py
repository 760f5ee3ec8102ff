"""Empirical similarity metrics: each against a hand-computed value or a naive float64 reference
written from the formula, plus the conventions for degenerate maps and the perturbation studies."""
import math

import pytest
import torch

import verigrad.metrics as M
from verigrad.metrics import (
    SIMILARITIES,
    cosine_similarity,
    kendall_tau,
    max_sensitivity,
    mse,
    pcc,
    random_perturbation_similarity,
    similarity,
    similarity_batch,
    similarity_report,
    ssim,
    topk_intersection,
)


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Naive references, written straight from the definitions (loops, no vectorisation)
# --------------------------------------------------------------------------------------------

def naive_ssim_2d(a, b, wh, ww, L):
    """Mean over every valid wh×ww window of the SSIM formula with sample (N−1) statistics."""
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    H, W = a.shape
    n = wh * ww
    vals = []
    for i in range(H - wh + 1):
        for j in range(W - ww + 1):
            pa = [float(a[i + r, j + c]) for r in range(wh) for c in range(ww)]
            pb = [float(b[i + r, j + c]) for r in range(wh) for c in range(ww)]
            ma, mb = sum(pa) / n, sum(pb) / n
            va = sum((p - ma) ** 2 for p in pa) / (n - 1)
            vb = sum((p - mb) ** 2 for p in pb) / (n - 1)
            cab = sum((p - ma) * (q - mb) for p, q in zip(pa, pb, strict=True)) / (n - 1)
            vals.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return sum(vals) / len(vals)


def naive_tau_b(a, b):
    a, b = a.tolist(), b.tolist()
    n = len(a)
    P = Q = ta = tb = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0:
                ta += 1
            if db == 0:
                tb += 1
            if da * db > 0:
                P += 1
            elif da * db < 0:
                Q += 1
    n0 = n * (n - 1) // 2
    return (P - Q) / math.sqrt((n0 - ta) * (n0 - tb))


# --------------------------------------------------------------------------------------------
# PCC, MSE, cosine
# --------------------------------------------------------------------------------------------

def test_pcc_hand_value():
    # a−ā = (−1, 0, 1), b−b̄ = (−7/3, −1/3, 8/3) → Σ = 7/3 + 8/3 = 5;
    # ‖a−ā‖ = √2, ‖b−b̄‖ = √114/3 → ρ = 15/√228 ≈ 0.993399.
    assert pcc(t(1, 2, 3), t(2, 4, 7)) == pytest.approx(15 / math.sqrt(228), abs=1e-14)
    assert pcc(t(1, 2, 3), t(3, 2, 1)) == pytest.approx(-1.0, abs=1e-15)


def test_pcc_shape_agnostic_and_float32_input():
    a = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    b = (a ** 2).reshape(1, 2, 3)
    # Same numbers as flat float64 vectors.
    assert pcc(a, b) == pytest.approx(pcc(a.reshape(-1).double(), b.reshape(-1).double()), abs=1e-15)


def test_pcc_constant_map_is_zero():
    assert pcc(t(2, 2, 2), t(1, 2, 3)) == 0.0
    assert pcc(t(1, 2, 3), t(0.1, 0.1, 0.1)) == 0.0  # 0.1 is not exact; still caught exactly


def test_mse_hand_value():
    # differences (1, 2, 4) → (1 + 4 + 16)/3 = 7
    assert mse(t(1, 2, 3), t(2, 4, 7)) == 7.0
    assert mse(t(1, 2, 3), t(1, 2, 3)) == 0.0


def test_cosine_hand_values():
    assert cosine_similarity(t(1, 0), t(0, 1)) == 0.0
    assert cosine_similarity(t(1, 2), t(2, 4)) == pytest.approx(1.0, abs=1e-15)
    assert cosine_similarity(t(1, 2), t(-3, -6)) == pytest.approx(-1.0, abs=1e-15)
    # 1·2 + 2·4 + 3·7 = 31; ‖a‖ = √14, ‖b‖ = √69
    assert cosine_similarity(t(1, 2, 3), t(2, 4, 7)) == pytest.approx(31 / math.sqrt(14 * 69), abs=1e-15)


def test_cosine_zero_map_is_zero():
    assert cosine_similarity(t(0, 0, 0), t(1, 2, 3)) == 0.0
    assert cosine_similarity(t(1, 2, 3), t(0, 0, 0)) == 0.0


# --------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------

def test_ssim_identical_is_one():
    x = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_ssim_single_window_matches_naive_formula():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(7, 7, generator=g, dtype=torch.float64)
    L = float(torch.maximum(a.max(), b.max()) - torch.minimum(a.min(), b.min()))
    ref = naive_ssim_2d(a, b, 7, 7, L)  # 7×7 map, 7×7 window: exactly one value
    assert ssim(a, b) == pytest.approx(ref, abs=1e-12)
    assert ssim(a, b, data_range=2.0) == pytest.approx(naive_ssim_2d(a, b, 7, 7, 2.0), abs=1e-12)


def test_ssim_averages_valid_windows_only():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(9, 10, generator=g, dtype=torch.float64)
    b = torch.rand(9, 10, generator=g, dtype=torch.float64)
    L = float(torch.maximum(a.max(), b.max()) - torch.minimum(a.min(), b.min()))
    # 3 × 4 = 12 window positions, no padded borders
    assert ssim(a, b) == pytest.approx(naive_ssim_2d(a, b, 7, 7, L), abs=1e-12)
    assert ssim(a, b, window=3) == pytest.approx(naive_ssim_2d(a, b, 3, 3, L), abs=1e-12)


def test_ssim_window_clipped_to_odd_map_size():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(5, 6, generator=g, dtype=torch.float64)
    b = torch.rand(5, 6, generator=g, dtype=torch.float64)
    L = float(torch.maximum(a.max(), b.max()) - torch.minimum(a.min(), b.min()))
    assert ssim(a, b) == pytest.approx(naive_ssim_2d(a, b, 5, 5, L), abs=1e-12)  # 7 → 5 (rows), 7 → 5 (cols, 6 even)
    assert ssim(a, b, window=4) == pytest.approx(naive_ssim_2d(a, b, 3, 3, L), abs=1e-12)  # even → next odd down


def test_ssim_one_dimensional_map_is_one_row():
    g = torch.Generator().manual_seed(4)
    a = torch.rand(20, generator=g, dtype=torch.float64)
    b = torch.rand(20, generator=g, dtype=torch.float64)
    L = float(torch.maximum(a.max(), b.max()) - torch.minimum(a.min(), b.min()))
    assert ssim(a, b) == pytest.approx(naive_ssim_2d(a.reshape(1, 20), b.reshape(1, 20), 1, 7, L), abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(a.reshape(1, 20), b.reshape(1, 20)), abs=1e-15)


def test_ssim_channels_are_averaged_with_shared_range():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(2, 8, 8, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(2, 8, 8, generator=g, dtype=torch.float64)
    L = float(torch.maximum(a.max(), b.max()) - torch.minimum(a.min(), b.min()))
    per = [naive_ssim_2d(a[c], b[c], 7, 7, L) for c in range(2)]
    assert per[0] != pytest.approx(per[1], abs=1e-3)  # the channels really differ
    assert ssim(a, b) == pytest.approx(sum(per) / 2, abs=1e-12)


def test_ssim_symmetric_and_lower_for_noisier_maps():
    g = torch.Generator().manual_seed(6)
    a = torch.rand(1, 16, 16, generator=g, dtype=torch.float64)
    noise = torch.randn(1, 16, 16, generator=g, dtype=torch.float64)
    b1, b2 = a + 0.05 * noise, a + 0.5 * noise
    assert ssim(a, b1) == pytest.approx(ssim(b1, a), abs=1e-15)
    assert ssim(a, b2) == pytest.approx(ssim(b2, a), abs=1e-15)
    assert 1.0 > ssim(a, b1) > ssim(a, b2)


def test_ssim_constant_maps():
    z = torch.zeros(7, 7, dtype=torch.float64)
    assert ssim(z + 3, z + 3) == 1.0  # L = 0: the 1.0 convention
    # 0s vs 1s: L = 1, μ = (0, 1), all variances 0 → C1·C2 / ((1 + C1)·C2) = C1/(1 + C1), C1 = 1e-4
    assert ssim(z, z + 1) == pytest.approx(1e-4 / (1 + 1e-4), rel=1e-12)


def test_ssim_bad_arguments():
    a = torch.rand(7, 7)
    with pytest.raises(ValueError):
        ssim(a, a, window=0)
    with pytest.raises(ValueError):
        ssim(a, a, data_range=0.0)


# --------------------------------------------------------------------------------------------
# Top-k intersection
# --------------------------------------------------------------------------------------------

def test_topk_intersection_known_sets():
    a, b = t(5, -4, 3, 2, 1), t(1, 2, 3, -4, 5)
    assert topk_intersection(a, b, 2) == 0.0  # {0, 1} vs {4, 3}
    assert topk_intersection(a, b, 3) == pytest.approx(1 / 3)  # {0, 1, 2} vs {4, 3, 2}
    assert topk_intersection(a, b, 4) == pytest.approx(3 / 4)  # {0, 1, 2, 3} vs {4, 3, 2, 1}
    assert topk_intersection(a, b, 5) == 1.0
    assert topk_intersection(a, -a, 2) == 1.0  # absolute values


def test_topk_ties_go_to_lower_index():
    a, b = t(1, 1, 1, 0), t(0, 1, 1, 1)
    assert topk_intersection(a, b, 1) == 0.0  # {0} vs {1}
    assert topk_intersection(a, b, 2) == 0.5  # {0, 1} vs {1, 2}


@pytest.mark.parametrize("k", [0, 6, -1, 1.5, True, None])
def test_topk_bad_k(k):
    with pytest.raises(ValueError, match="top-k"):
        topk_intersection(t(1, 2, 3, 4, 5), t(1, 2, 3, 4, 5), k)


# --------------------------------------------------------------------------------------------
# Kendall τ-b
# --------------------------------------------------------------------------------------------

def test_kendall_tau_b_with_ties_hand_value():
    # a = (1, 2, 2, 3), b = (1, 3, 2, 2); the 6 pairs:
    # (0,1) C, (0,2) C, (0,3) C, (1,2) tied in a, (1,3) a↑ b↓ D, (2,3) tied in b
    # P = 3, Q = 1, n0 = 6, n1 = 1, n2 = 1 → τ_b = 2 / √(5·5) = 0.4
    assert kendall_tau(t(1, 2, 2, 3), t(1, 3, 2, 2)) == pytest.approx(0.4, abs=1e-15)
    # a = (1, 1, 2), b = (1, 2, 3): (0,1) tied in a, (0,2) C, (1,2) C → 2 / √(2·3)
    assert kendall_tau(t(1, 1, 2), t(1, 2, 3)) == pytest.approx(2 / math.sqrt(6), abs=1e-15)


def test_kendall_tau_identical_and_reversed():
    x = torch.randn(50, generator=torch.Generator().manual_seed(7))
    assert kendall_tau(x, x) == 1.0
    assert kendall_tau(x, -x) == -1.0
    assert kendall_tau(x, x ** 3) == 1.0  # rank statistic: any increasing map


def test_kendall_tau_constant_is_zero():
    assert kendall_tau(t(4, 4, 4), t(1, 2, 3)) == 0.0
    assert kendall_tau(t(1, 2, 3), t(0, 0, 0)) == 0.0
    assert kendall_tau(t(1), t(2)) == 0.0


def test_kendall_tau_matches_naive_pair_count_across_chunks(monkeypatch):
    g = torch.Generator().manual_seed(8)
    a = torch.randint(0, 6, (60,), generator=g).double()  # many ties
    b = torch.randint(0, 6, (60,), generator=g).double()
    ref = naive_tau_b(a, b)
    assert kendall_tau(a, b) == pytest.approx(ref, abs=1e-14)
    monkeypatch.setattr(M, "_TAU_CHUNK_ELEMENTS", 130)  # 2 rows per chunk, ragged last chunk
    assert kendall_tau(a, b) == pytest.approx(ref, abs=1e-14)


def test_kendall_tau_cifar_sized_map():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(3, 32, 32, generator=g)
    assert kendall_tau(a, a) == 1.0
    b = a + torch.randn(3, 32, 32, generator=g)
    assert 0.2 < kendall_tau(a, b) < 0.8


def test_kendall_and_pcc_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(10)
    a = torch.randint(0, 8, (200,), generator=g).double()
    b = a + torch.randint(0, 4, (200,), generator=g).double()
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a.numpy(), b.numpy())[0], abs=1e-12)
    x, y = torch.randn(300, generator=g, dtype=torch.float64), torch.randn(300, generator=g, dtype=torch.float64)
    assert kendall_tau(x, x + y) == pytest.approx(stats.kendalltau(x.numpy(), (x + y).numpy())[0], abs=1e-12)
    assert pcc(x, x + y) == pytest.approx(stats.pearsonr(x.numpy(), (x + y).numpy())[0], abs=1e-12)


# --------------------------------------------------------------------------------------------
# Registry, similarity(), report, input checks
# --------------------------------------------------------------------------------------------

def test_registry_names():
    assert set(SIMILARITIES) == {"pcc", "ssim", "mse", "cosine", "topk_intersection", "kendall_tau"}


def test_similarity_dispatch_and_default_k():
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    assert similarity("pcc", a, b) == pcc(a, b)
    assert similarity("pcc", a, b, k=3) == pcc(a, b)  # k ignored where not needed
    assert similarity("ssim", a, b, window=3) == ssim(a, b, window=3)
    assert similarity("topk_intersection", a, b) == topk_intersection(a, b, 4)  # 10 % of 40
    assert similarity("topk_intersection", a, b, k=7) == topk_intersection(a, b, 7)
    assert similarity("topk_intersection", t(3, 1, 2), t(3, 2, 1)) == 1.0  # n = 3 → k = 1
    with pytest.raises(ValueError, match="top-k"):
        similarity("topk_intersection", a, b, k=41)


def test_similarity_unknown_name():
    with pytest.raises(ValueError, match=r"'spearman'.*available: cosine, kendall_tau, mse, pcc, ssim"):
        similarity("spearman", t(1, 2), t(2, 1))


def test_similarity_report_all_metrics():
    a = torch.rand(1, 10, 10, generator=torch.Generator().manual_seed(12))
    rep = similarity_report(a, a)
    assert set(rep) == set(SIMILARITIES)
    assert all(isinstance(v, float) for v in rep.values())
    assert rep["mse"] == 0.0
    for name in ("pcc", "ssim", "cosine", "topk_intersection", "kendall_tau"):
        assert rep[name] == pytest.approx(1.0, abs=1e-12), name
    rep = similarity_report(a, 1 - a, k=5)
    assert rep["pcc"] == pytest.approx(-1.0, abs=1e-12) and rep["kendall_tau"] == -1.0


def test_similarity_batch():
    g = torch.Generator().manual_seed(13)
    a, b = torch.randn(3, 1, 7, 7, generator=g), torch.randn(3, 1, 7, 7, generator=g)
    out = similarity_batch("ssim", a, b)
    assert out.shape == (3,) and out.dtype == torch.float64
    assert out.tolist() == [ssim(a[i], b[i]) for i in range(3)]
    with pytest.raises(ValueError):
        similarity_batch("pcc", a, b[:2])


def test_shape_mismatch_and_nan_rejected():
    with pytest.raises(ValueError, match="same shape"):
        pcc(torch.zeros(1, 28, 28), torch.zeros(784))
    with pytest.raises(ValueError, match="NaN"):
        mse(t(1, float("nan")), t(1, 2))


# --------------------------------------------------------------------------------------------
# Random-perturbation similarity
# --------------------------------------------------------------------------------------------

def _sin_explain(xb):
    return torch.sin(3 * xb)


def _x():
    return torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(14), dtype=torch.float64)


def test_rps_reproducible_and_seed_dependent():
    x = _x()
    r1 = random_perturbation_similarity(_sin_explain, x, [0.1, 0.3], 4, (0.0, 1.0), seed=3)
    r2 = random_perturbation_similarity(_sin_explain, x, [0.1, 0.3], 4, (0.0, 1.0), seed=3)
    r3 = random_perturbation_similarity(_sin_explain, x, [0.1, 0.3], 4, (0.0, 1.0), seed=4)
    assert r1 == r2
    assert r1 != r3
    assert set(r1) == {0.1, 0.3} and set(r1[0.1]) == set(SIMILARITIES)
    assert all(isinstance(v, float) for d in r1.values() for v in d.values())


def test_rps_level_zero_is_identity():
    r = random_perturbation_similarity(_sin_explain, _x(), [0.0], 3, (0.0, 1.0), seed=0)[0.0]
    assert r["pcc"] == pytest.approx(1.0, abs=1e-12)
    assert r["mse"] == 0.0
    assert r["kendall_tau"] == 1.0 and r["topk_intersection"] == 1.0


def test_rps_similarity_decreases_with_noise():
    levels = [0.02, 0.1, 0.3, 0.6]
    r = random_perturbation_similarity(_sin_explain, _x(), levels, 8, None, seed=1)
    for lo, hi in zip(levels, levels[1:], strict=False):  # consecutive pairs: the shift is one shorter
        for m in ("pcc", "ssim", "cosine", "kendall_tau"):
            assert r[lo][m] > r[hi][m], (m, lo, hi)
        assert r[lo]["mse"] < r[hi]["mse"]


def test_rps_sigma_is_relative_to_input_range_and_levels_independent():
    x = _x()
    scale = 10.0
    # Scaling x by s scales σ by s: for e(x) = x the scale-free pcc is unchanged, mse grows by s².
    r1 = random_perturbation_similarity(lambda xb: xb, x, [0.2], 2, None, seed=5, metrics=["pcc", "mse"])
    r2 = random_perturbation_similarity(lambda xb: xb, scale * x, [0.2], 2, None, seed=5, metrics=["pcc", "mse"])
    assert r1[0.2]["pcc"] == pytest.approx(r2[0.2]["pcc"], abs=1e-12)
    assert r2[0.2]["mse"] == pytest.approx(scale ** 2 * r1[0.2]["mse"], rel=1e-10)
    # Common random numbers: a level's value does not depend on which other levels are asked for.
    r3 = random_perturbation_similarity(lambda xb: xb, x, [0.05, 0.2], 2, None, seed=5, metrics=["pcc", "mse"])
    assert r3[0.2] == r1[0.2]


def test_rps_noise_variance_and_clipping():
    seen = []

    def explain(xb):
        seen.append(xb.clone())
        return xb

    x = torch.linspace(0, 1, 400, dtype=torch.float64)  # range 1 → σ = ν
    random_perturbation_similarity(explain, x, [0.5], 50, None, seed=2, metrics=["mse"])
    noise = seen[-1] - x
    assert noise.std().item() == pytest.approx(0.5, rel=0.02)
    random_perturbation_similarity(explain, x, [0.5], 5, (0.0, 1.0), seed=2, metrics=["mse"])
    assert seen[-1].min() == 0.0 and seen[-1].max() == 1.0


def test_rps_bad_arguments():
    with pytest.raises(ValueError, match="'spearman'"):
        random_perturbation_similarity(_sin_explain, _x(), [0.1], 2, None, 0, metrics=["pcc", "spearman"])
    with pytest.raises(ValueError, match="top-k"):
        random_perturbation_similarity(_sin_explain, _x(), [0.1], 2, None, 0, metrics=["topk_intersection"], k=0)
    with pytest.raises(ValueError):
        random_perturbation_similarity(_sin_explain, _x(), [-0.1], 2, None, 0)
    with pytest.raises(ValueError):
        random_perturbation_similarity(_sin_explain, _x(), [0.1], 0, None, 0)


# --------------------------------------------------------------------------------------------
# Max-sensitivity
# --------------------------------------------------------------------------------------------

def test_max_sensitivity_constant_explanation_is_zero():
    assert max_sensitivity(lambda xb: torch.ones_like(xb), _x(), 0.1, 10, (0.0, 1.0), seed=0) == 0.0


def test_max_sensitivity_linear_bound():
    x = _x()
    r, d = 0.05, x.numel()
    val = max_sensitivity(lambda xb: 2 * xb, x, r, 20, None, seed=0)
    # e(x+δ) − e(x) = 2δ with ‖δ‖ ≤ r√d (cube corner) → value ≤ 2r√d / ‖2x‖
    assert 0.0 < val <= 2 * r * math.sqrt(d) / float((2 * x).norm())
    # ...and a uniform δ has E‖δ‖² = d r²/3, so it is well above a tenth of the bound
    assert val > 0.3 * r * math.sqrt(d) / float(x.norm())


def test_max_sensitivity_one_dimensional_analytic():
    # d = 1, e(x) = 2x at x = 1: value = max |2δ| / 2 = max |δ| → r as samples grow
    val = max_sensitivity(lambda xb: 2 * xb, t(1.0), 0.5, 2000, None, seed=1)
    assert 0.49 < val <= 0.5


def test_max_sensitivity_clipped_to_domain():
    # x = 0.5 in domain [0.4, 0.6], r = 0.5: clipping caps |δ| at 0.1 → value ≤ 0.1, reached often
    val = max_sensitivity(lambda xb: 2 * xb, t(0.5), 0.5, 50, (0.4, 0.6), seed=2)
    assert val == pytest.approx(0.2, abs=1e-12)


def test_max_sensitivity_zero_explanation_uses_numerator():
    x = _x()
    r, d = 0.05, x.numel()
    val = max_sensitivity(lambda xb: xb - x, x, r, 20, None, seed=3)  # e(x) = 0, e(x+δ) = δ
    assert 0.3 * r * math.sqrt(d) < val <= r * math.sqrt(d)


def test_max_sensitivity_reproducible():
    x = _x()
    v1 = max_sensitivity(_sin_explain, x, 0.1, 10, (0.0, 1.0), seed=7)
    assert v1 == max_sensitivity(_sin_explain, x, 0.1, 10, (0.0, 1.0), seed=7)
    assert v1 != max_sensitivity(_sin_explain, x, 0.1, 10, (0.0, 1.0), seed=8)


def test_max_sensitivity_bad_arguments():
    with pytest.raises(ValueError):
        max_sensitivity(_sin_explain, _x(), -0.1, 5, None, 0)
    with pytest.raises(ValueError):
        max_sensitivity(_sin_explain, _x(), 0.1, 0, None, 0)
