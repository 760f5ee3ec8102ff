"""Properties: hand-computed cases, exactness, and soundness of every worst case by sampling."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from verigrad.bounds.base import Bounds
from verigrad.properties import (
    RULES,
    Kind,
    Metric,
    Normalize,
    Property,
    _topk_members_that_stay,
    PropertyResult,
    Verdict,
    cosine,
    decide,
    evaluate,
    metric,
    normalize_map,
    normalized_bounds,
    rule_for,
    worst_case,
)
from verigrad.spec import FileTarget, GaussianTarget, SquareTarget

F64 = torch.float64
TOL = 1e-9
LP = [Metric.L1, Metric.L2, Metric.LINF]
# every metric × kind × normalization that the spec allows (cosine only without normalization)
MKINDS = [Kind.UNTARGETED, Kind.TARGETED]  # the kinds that compare maps with a metric
COMBOS = [(k, m, n) for k in MKINDS for m in LP for n in Normalize] + [(k, Metric.COSINE, Normalize.NONE) for k in MKINDS]
COMBO_IDS = [f"{k.value}-{m.value}-{n.value}" for k, m, n in COMBOS]


def t64(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def prop(kind: Kind, m: Metric, n: Normalize = Normalize.NONE, target: torch.Tensor | None = None,
         threshold: float = 0.5) -> Property:
    return Property("p", kind, m, threshold, n, target if kind == Kind.TARGETED else None)


# ----------------------------------------------------------------------------------------
# hand-computed cases

L, U = t64([-1.0, 0.5, 2.0]), t64([1.0, 1.0, 3.0])
BOX = Bounds(L, U)
V0 = t64([0.0, 0.75, 2.5])
T = torch.tensor([0.0, 0.0, 1.0], dtype=F64)


@pytest.mark.parametrize("m,expected", [(Metric.L1, 1.75), (Metric.L2, math.sqrt(1 + 0.0625 + 0.25)),
                                        (Metric.LINF, 1.0)])
def test_untargeted_lp_by_hand(m, expected):
    # farthest endpoints from v0 = (0, .75, 2.5): deviations (1, .25, .5)
    assert worst_case(prop(Kind.UNTARGETED, m), V0, BOX).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("m,expected", [(Metric.L1, 1.5), (Metric.L2, math.sqrt(1.25)), (Metric.LINF, 1.0)])
def test_targeted_lp_by_hand(m, expected):
    # clip(t, l, u) = (0, .5, 2): distances (0, .5, 1)
    assert worst_case(prop(Kind.TARGETED, m, target=T), V0, BOX).item() == pytest.approx(expected, abs=1e-12)


def test_targeted_cosine_by_hand():
    # cos(v, e3) = v3/‖v‖ is largest at v = (0, .5, 3): 3/√9.25, and the bound is exact here
    w = worst_case(prop(Kind.TARGETED, Metric.COSINE, target=T), V0, BOX).item()
    assert w == pytest.approx(3 / math.sqrt(9.25), abs=1e-12)


def test_untargeted_cosine_by_hand():
    # a 1-D box of positive values: the direction never changes, cos = 1
    p = prop(Kind.UNTARGETED, Metric.COSINE)
    assert worst_case(p, t64([2.0]), Bounds(t64([1.0]), t64([3.0]))).item() == pytest.approx(1.0)
    # v0 = (1, 0), v ∈ [1, 1] × [−1, 1]: min cos = 1/√2 at v = (1, ±1); sound and not trivial
    w = worst_case(p, t64([1.0, 0.0]), Bounds(t64([1.0, -1.0]), t64([1.0, 1.0]))).item()
    assert 0.0 < w <= 1 / math.sqrt(2) + 1e-12
    # a box containing 0 with v0 = e1 and a negative side: the trivial bound −1 is allowed, never NaN
    w = worst_case(p, t64([1.0, 0.0]), Bounds(t64([-1.0, -1.0]), t64([1.0, 1.0])))
    assert w.item() == pytest.approx(-1.0)


def test_cosine_concrete():
    a, b = t64([1.0, 0.0]), t64([1.0, 1.0])
    assert cosine(a, b).item() == pytest.approx(1 / math.sqrt(2))
    assert cosine(a, t64([0.0, 0.0])).item() == 0.0  # convention: 0 with a zero map, not NaN


def test_normalize_map_by_hand():
    v = t64([3.0, -4.0])
    torch.testing.assert_close(normalize_map(v, Normalize.L1), t64([3 / 7, -4 / 7]))
    torch.testing.assert_close(normalize_map(v, Normalize.L2), t64([0.6, -0.8]))
    torch.testing.assert_close(normalize_map(v, Normalize.MAX), t64([0.75, -1.0]))
    torch.testing.assert_close(normalize_map(t64([0.0, 0.0]), Normalize.L2), t64([0.0, 0.0]))


def test_normalized_bounds_by_hand():
    # v ∈ [1, 2] × [1, 1], l1: N_0 = v0/(v0 + 1) ∈ [1/2, 2/3], N_1 = 1/(v0 + 1) ∈ [1/3, 1/2]
    nb = normalized_bounds(Bounds(t64([1.0, 1.0]), t64([2.0, 1.0])), Normalize.L1)
    torch.testing.assert_close(nb.lower, t64([0.5, 1 / 3]))
    torch.testing.assert_close(nb.upper, t64([2 / 3, 0.5]))
    # a box containing 0: bounded by [−1, 1], no NaN
    nb = normalized_bounds(Bounds(t64([-1.0, 0.0]), t64([1.0, 0.0])), Normalize.MAX)
    torch.testing.assert_close(nb.lower, t64([-1.0, 0.0]))
    torch.testing.assert_close(nb.upper, t64([1.0, 0.0]))


def test_decide_and_result():
    p = prop(Kind.UNTARGETED, Metric.L2, threshold=1.0)
    assert decide(p, torch.tensor([0.5, 1.0, 1.5, float("nan")])) == [
        Verdict.CERTIFIED, Verdict.CERTIFIED, Verdict.UNKNOWN, Verdict.UNKNOWN]
    q = prop(Kind.TARGETED, Metric.L2, target=T, threshold=1.0)
    assert decide(q, torch.tensor([0.5, 1.5])) == [Verdict.UNKNOWN, Verdict.CERTIFIED]
    c = prop(Kind.UNTARGETED, Metric.COSINE, threshold=0.9)
    assert decide(c, torch.tensor([0.95, 0.5])) == [Verdict.CERTIFIED, Verdict.UNKNOWN]
    (r,) = evaluate(q, V0, BOX)
    assert isinstance(r, PropertyResult) and r.verdict == Verdict.CERTIFIED
    d = r.to_dict()
    assert d["verdict"] == "certified" and d["worst_case"] == pytest.approx(math.sqrt(1.25))
    assert ">=" in d["direction"] and d["threshold"] == 1.0
    assert set(Verdict) == {Verdict.CERTIFIED, Verdict.FALSIFIED, Verdict.UNKNOWN}


def test_registry_and_errors():
    assert set(RULES) == {(k, m) for k in MKINDS for m in Metric} | {(Kind.TOPK, None), (Kind.SIGN, None),
                                                                     (Kind.FEATURE_BOUND, None)}
    with pytest.raises(ValueError, match="no property rule.*'hamming'"):
        rule_for("untargeted", "hamming")
    with pytest.raises(ValueError, match="scale-invariant"):
        Property("c", "untargeted", "cosine", 0.5, "l2")
    with pytest.raises(ValueError, match="target map"):
        Property("t", "targeted", "l2", 0.5)
    with pytest.raises(ValueError, match="target map"):
        Property("u", "untargeted", "l2", 0.5, target=T)
    with pytest.raises(ValueError, match="differ"):
        worst_case(prop(Kind.UNTARGETED, Metric.L2), V0[:, :2], BOX)


# ----------------------------------------------------------------------------------------
# soundness by sampling


def random_box(gen: torch.Generator, n: int, style: str) -> Bounds:
    """One box (batch 1): mixed coordinate types (straddling 0, one-signed, points), all
    straddling, 0 as a vertex, a point, or a tiny box."""
    c = torch.randn(n, generator=gen, dtype=F64) * 2
    r = torch.rand(n, generator=gen, dtype=F64) * 1.5
    if style == "straddle":  # every coordinate contains 0: ‖v‖ can vanish
        lo, up = -torch.rand(n, generator=gen, dtype=F64), torch.rand(n, generator=gen, dtype=F64)
    elif style == "touch":  # 0 is a corner: ‖v‖ vanishes only at one vertex
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(F64)
        lo, up = torch.minimum(sign * r, torch.zeros_like(r)), torch.maximum(sign * r, torch.zeros_like(r))
    elif style == "point":
        lo = up = c
    elif style == "tiny":
        lo, up = c - 1e-4 * r, c + 1e-4 * r
    else:  # mixed: some points, some straddling, some one-signed
        kind = torch.randint(0, 4, (n,), generator=gen)
        r = torch.where(kind == 0, torch.zeros_like(r), r)
        c = torch.where(kind == 1, torch.zeros_like(c), c)
        lo, up = c - r, c + r
    return Bounds(lo[None], up[None])


def sample_points(gen: torch.Generator, box: Bounds, n_uniform: int = 1000) -> torch.Tensor:
    """Uniform points, every corner, and points whose coordinates are each at l, u, 0 (when
    inside) or uniform — the places where normalized and cosine extremes sit."""
    lo, up = box.lower[0], box.upper[0]
    n = lo.numel()
    uni = lo + torch.rand(n_uniform, n, generator=gen, dtype=F64) * (up - lo)
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=F64)
    corners = lo + bits * (up - lo)
    choice = torch.randint(0, 4, (500, n), generator=gen)
    zero = torch.zeros_like(lo).clamp(lo, up).expand(500, n)
    mixed = torch.where(choice == 0, lo.expand(500, n), torch.where(choice == 1, up.expand(500, n),
                        torch.where(choice == 2, zero, uni[:500])))
    return torch.cat([uni, corners, mixed, zero[:1]])


def random_target(gen: torch.Generator, box: Bounds, i: int) -> torch.Tensor:
    n = box.shape[1]
    if i % 5 == 0:  # inside the box: distance 0 attainable
        return (box.lower[0] + torch.rand(n, generator=gen, dtype=F64) * box.width[0])
    if i % 7 == 0:
        return torch.zeros(n, dtype=F64)
    return torch.randn(n, generator=gen, dtype=F64) * 2


@pytest.mark.parametrize("kind,m,norm", COMBOS, ids=COMBO_IDS)
def test_worst_case_is_sound(kind, m, norm):
    gen = torch.Generator().manual_seed(1234)
    for i, style in enumerate(["mixed"] * 24 + ["straddle"] * 6 + ["touch"] * 6 + ["point"] * 3 + ["tiny"] * 3):
        n = [1, 2, 3, 6][i % 4]
        box = random_box(gen, n, style)
        v0 = box.lower + torch.rand(box.shape, generator=gen, dtype=F64) * box.width
        p = prop(kind, m, norm, target=random_target(gen, box, i))
        w = worst_case(p, v0, box)
        assert w.shape == (1,) and not torch.isnan(w).any()
        pts = sample_points(gen, box)
        vals = metric(p, v0.expand_as(pts), pts)
        assert not torch.isnan(vals).any()
        # untargeted ℓp and targeted cosine: worst = an upper bound of the max; else of the min
        if (kind == Kind.UNTARGETED) != (m == Metric.COSINE):
            worst_seen = vals.max()
            assert worst_seen <= w.item() + TOL, (style, n, worst_seen.item(), w.item())
        else:
            worst_seen = vals.min()
            assert worst_seen >= w.item() - TOL, (style, n, worst_seen.item(), w.item())


@pytest.mark.parametrize("kind,m,norm", COMBOS, ids=COMBO_IDS)
def test_zero_width_bounds_give_the_concrete_value(kind, m, norm):
    gen = torch.Generator().manual_seed(7)
    v0 = torch.randn(4, 5, dtype=F64, generator=gen)
    v0[1, 2] = 0.0
    p = prop(kind, m, norm, target=torch.randn(5, dtype=F64, generator=gen))
    torch.testing.assert_close(worst_case(p, v0, Bounds.point(v0)), metric(p, v0, v0), rtol=0, atol=TOL)


@pytest.mark.parametrize("m", LP)
def test_lp_worst_cases_are_attained(m):
    """Without normalization the ℓp worst cases are exact: the untargeted one at the corner
    farthest from v0, the targeted one at clip(t, l, u)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        box = random_box(gen, 6, "mixed")
        v0 = box.lower + torch.rand(box.shape, generator=gen, dtype=F64) * box.width
        corner = torch.where((box.lower - v0).abs() >= (box.upper - v0).abs(), box.lower, box.upper)
        p = prop(Kind.UNTARGETED, m)
        torch.testing.assert_close(worst_case(p, v0, box), metric(p, v0, corner), rtol=0, atol=1e-12)
        t = torch.randn(6, dtype=F64, generator=gen) * 2
        q = prop(Kind.TARGETED, m, target=t)
        nearest = torch.minimum(torch.maximum(t[None], box.lower), box.upper)
        torch.testing.assert_close(worst_case(q, v0, box), metric(q, v0, nearest), rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", [Normalize.L1, Normalize.L2, Normalize.MAX])
def test_normalized_bounds_are_exact_per_coordinate(norm):
    """Each bound of N(v)_i is attained: v_i at its endpoint, every other coordinate at the
    point of its interval with the smallest (or largest) magnitude."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(40):
        box = random_box(gen, 5, "mixed")
        nb = normalized_bounds(box, norm)
        lo, up = box.lower[0], box.upper[0]
        small = torch.zeros_like(lo).clamp(lo, up)  # argmin |v_j|
        big = torch.where(lo.abs() >= up.abs(), lo, up)  # argmax |v_j|
        for i in range(5):
            for end, bound, sign in ((up, nb.upper, 1), (lo, nb.lower, -1)):
                # shrinking the rest pushes N_i away from 0; growing it pulls it towards 0
                towards_extreme = (end[i] * sign) >= 0
                v = (small if towards_extreme else big).clone()
                v[i] = end[i]
                got = normalize_map(v[None], norm)[0, i]
                if v.abs().sum() == 0:
                    continue  # N(0) = 0 is a convention, not a limit
                assert got.item() == pytest.approx(bound[0, i].item(), abs=1e-12)


def test_normalized_bounds_tighter_than_interval_division():
    """The dependence-aware bounds lie inside plain interval division v_i / [n_lo, n_hi]."""
    gen = torch.Generator().manual_seed(9)
    for _ in range(50):
        box = random_box(gen, 6, "mixed")
        amin = torch.zeros_like(box.lower).clamp(box.lower, box.upper).abs()
        amax = torch.maximum(box.lower.abs(), box.upper.abs())
        n_lo, n_hi = amin.norm(), amax.norm()
        if n_lo == 0:
            continue
        q = torch.stack([box.lower / n_lo, box.lower / n_hi, box.upper / n_lo, box.upper / n_hi])
        nb = normalized_bounds(box, Normalize.L2)
        assert (nb.lower >= q.min(0).values - 1e-12).all() and (nb.upper <= q.max(0).values + 1e-12).all()


def test_cosine_bound_is_second_order_near_v0():
    """For a small box around v0 the untargeted cosine bound loses O(r²), not O(r)."""
    gen = torch.Generator().manual_seed(11)
    v0 = torch.randn(1, 50, dtype=F64, generator=gen)
    p = prop(Kind.UNTARGETED, Metric.COSINE)
    gap = [1 - worst_case(p, v0, Bounds(v0 - r, v0 + r)).item() for r in (1e-2, 1e-3)]
    assert gap[1] < gap[0] / 50  # quadratic: ~100× smaller for a 10× smaller box


def test_worst_case_runs_in_float64():
    v0 = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    box = Bounds(v0 - 0.1, v0 + 0.1)
    for kind, m, norm in COMBOS:
        p = prop(kind, m, norm, target=torch.ones(5))
        assert worst_case(p, v0, box).dtype == F64


def test_batch_and_image_shapes():
    gen = torch.Generator().manual_seed(2)
    v0 = torch.randn(3, 1, 4, 4, dtype=F64, generator=gen)
    box = Bounds(v0 - 0.1, v0 + 0.1)
    t = SquareTarget(position=(0, 0), size=2, value=1.0).map((1, 4, 4), F64)
    for kind, m, norm in COMBOS:
        p = prop(kind, m, norm, target=t)
        w = worst_case(p, v0, box)
        assert w.shape == (3,)
        # batch invariance: each sample alone gives the same worst case
        for b in range(3):
            torch.testing.assert_close(worst_case(p, v0[b:b + 1], box[b:b + 1]), w[b:b + 1])


# ----------------------------------------------------------------------------------------
# target maps


def test_gaussian_target():
    m = GaussianTarget(center=(14.0, 10.0), sigma=3.0, amplitude=2.0).map((3, 28, 28), F64)
    assert m.shape == (3, 28, 28) and m.dtype == F64
    for c in range(3):
        assert divmod(int(m[c].argmax()), 28) == (14, 10)
    assert m.max().item() == pytest.approx(2.0)
    assert m[0, 14, 13].item() == pytest.approx(2.0 * math.exp(-9 / 18))
    torch.testing.assert_close(m[0], m[2])
    flat = GaussianTarget(center=(5.0,), sigma=1.0).map((12,), F64)
    assert flat.shape == (12,) and int(flat.argmax()) == 5
    with pytest.raises(ValueError, match="needs 2"):
        GaussianTarget(center=(5.0,), sigma=1.0).map((1, 8, 8), F64)


def test_square_target():
    m = SquareTarget(position=(0, 0), size=5, value=1.0).map((1, 28, 28), F64)
    assert m.shape == (1, 28, 28) and m.sum().item() == 25 and m[0, 4, 4] == 1 and m[0, 5, 5] == 0
    m = SquareTarget(position=(23, 20), size=5, value=-2.0).map((2, 28, 28), F64)
    assert m[1, 23:28, 20:25].eq(-2).all() and m.sum().item() == -2 * 25 * 2
    flat = SquareTarget(position=(3,), size=2, value=1.0).map((10,), F64)
    assert flat.tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="does not fit"):
        SquareTarget(position=(25, 0), size=5, value=1.0).map((1, 28, 28), F64)


def test_file_target(tmp_path):
    arr = np.random.default_rng(0).normal(size=(1, 6, 6))
    f = tmp_path / "t.npy"
    np.save(f, arr)
    m = FileTarget(path=f).map((1, 6, 6), F64)
    np.testing.assert_array_equal(m.numpy(), arr)
    with pytest.raises(ValueError, match=r"t\.npy.*\(1, 6, 6\).*\(1, 5, 5\)"):
        FileTarget(path=f).map((1, 5, 5), F64)


def test_property_spec_builds_the_property(tmp_path):
    from verigrad.spec import PropertySpec

    entry = PropertySpec(name="blob", kind=Kind.TARGETED, metric=Metric.L2, threshold=0.5,
                         normalize=Normalize.L2, target=GaussianTarget(center=(2.0, 2.0), sigma=1.0))
    p = entry.build((1, 5, 5))
    assert p.name == "blob" and p.target is not None and p.target.shape == (1, 5, 5)
    assert "N(v)" in evaluate(p, torch.zeros(1, 1, 5, 5, dtype=F64),
                              Bounds.point(torch.ones(1, 1, 5, 5, dtype=F64)))[0].direction


# ----------------------------------------------------------------------------------------
# top-k, sign, feature bound


def rank_prop(kind: str, threshold: float, k=None, features=None) -> Property:
    return Property("r", kind, None, threshold, k=k, features=features)


def test_topk_by_hand():
    # |v0| = (3, 2, .5, .1): top-2 = {0, 1}. |v| ranges: [2.5,3.5], [0,2.5], [0,1], [.1,.1].
    # feature 0: rivals with a⁺ ≥ 2.5 besides itself: feature 1 (2.5) → 1 ≤ k−1: guaranteed.
    # feature 1: a⁻ = 0, every other feature can tie: not guaranteed. Worst overlap = 1/2.
    v0 = t64([3.0, -2.0, 0.5, 0.1])
    box = Bounds(t64([2.5, -2.5, -1.0, 0.1]), t64([3.5, 0.0, 0.5, 0.1]))
    p = rank_prop("topk", 0.5, k=2)
    assert worst_case(p, v0, box).item() == 0.5
    assert decide(p, worst_case(p, v0, box)) == [Verdict.CERTIFIED]
    # attained: v = (3, 0, 1, .1) has top-2 {0, 2}
    assert metric(p, v0, t64([3.0, 0.0, -1.0, 0.1])).item() == 0.5
    assert metric(p, v0, v0).item() == 1.0


def test_sign_and_feature_bound_by_hand():
    v0 = t64([1.0, -1.0, 0.0, 2.0])
    box = Bounds(t64([0.0, -2.0, 0.0, 1.0]), t64([2.0, 0.5, 0.0, 3.0]))
    # feature 0 can reach 0 (flip: sign 0 ≠ 1), 1 can reach +.5, 2 is pinned at 0, 3 stays > 0
    assert worst_case(rank_prop("sign", 0.0, features=None), v0, box).item() == 2
    assert worst_case(rank_prop("sign", 0.0, features=(2, 3)), v0, box).item() == 0
    assert metric(rank_prop("sign", 0.0), v0, t64([0.0, 0.5, 0.0, 1.0])).item() == 2
    # max |v_i| over {1, 3}: max(2, .5, 1, 3) = 3
    fb = rank_prop("feature_bound", 2.0, features=(1, 3))
    assert worst_case(fb, v0, box).item() == 3.0 and metric(fb, v0, v0).item() == 2.0
    assert "sign flips of 2 feature(s) <= 0" in direction_text_for(rank_prop("sign", 0.0, features=(2, 3)))
    assert "max |v_i| over 2 feature(s) <= 2" in direction_text_for(fb)
    assert "min top-3 overlap(v, v0) >= 0.5" in direction_text_for(rank_prop("topk", 0.5, k=3))


def direction_text_for(p: Property) -> str:
    from verigrad.properties import direction_text

    return direction_text(p)


@pytest.mark.parametrize("kind", ["topk", "sign", "feature_bound"])
def test_rank_and_feature_worst_cases_are_sound_by_sampling(kind):
    gen = torch.Generator().manual_seed(7)
    for i, style in enumerate(["mixed"] * 20 + ["straddle"] * 5 + ["touch"] * 5 + ["point"] * 3 + ["tiny"] * 3):
        n = [1, 2, 3, 6][i % 4]
        box = random_box(gen, n, style)
        if i % 6 == 0:  # ties: repeated magnitudes in v0 and in the box
            box = Bounds(box.lower.round(), box.upper.round())
        v0 = box.lower + torch.rand(box.shape, generator=gen, dtype=F64) * box.width
        if kind == "topk":
            p = rank_prop(kind, 1.0, k=[1, n, max(1, n // 2)][i % 3])
        else:
            feats = None if i % 2 else tuple(sorted(set(torch.randint(0, n, (2,), generator=gen).tolist())))
            p = rank_prop(kind, 1.0, features=feats)
        w = worst_case(p, v0, box)
        vals = metric(p, v0.expand(len(pts := sample_points(gen, box)), -1), pts)
        if p.rule.direction.value == ">=":
            assert bool((vals >= w - 1e-12).all()), (kind, i, float(vals.min()), float(w))
        else:
            assert bool((vals <= w + 1e-12).all()), (kind, i, float(vals.max()), float(w))
        # zero-width bounds at v0 give the concrete value
        assert worst_case(p, v0, Bounds(v0, v0)).item() == pytest.approx(metric(p, v0, v0).item())


@pytest.mark.parametrize("kind", ["sign", "feature_bound"])
def test_sign_and_feature_worst_cases_are_attained(kind):
    """Exact: the worst corner (each coordinate at its worst endpoint, 0 where reachable) attains it."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        box = random_box(gen, 5, "mixed")
        v0 = box.lower + torch.rand(box.shape, generator=gen, dtype=F64) * box.width
        p = rank_prop(kind, 1.0)
        lo, up = box.lower, box.upper
        if kind == "sign":
            zero = torch.zeros_like(lo).clamp(lo, up)
            worst_v = torch.where(v0 > 0, torch.minimum(lo, zero).where(lo <= 0, lo),
                                  torch.where(v0 < 0, torch.maximum(up, zero).where(up >= 0, up),
                                              torch.where(lo < 0, lo, up)))
        else:
            worst_v = torch.where(lo.abs() > up.abs(), lo, up)
        assert metric(p, v0, worst_v).item() == pytest.approx(worst_case(p, v0, box).item())


def test_topk_set_unchanged_is_exact():
    """Threshold 1: when the bound says the top-k set can change, a point of the box changes it
    (the weakest member of K at its smallest |v|, the strongest outsider at its largest)."""
    gen = torch.Generator().manual_seed(11)
    seen_change = 0
    for i in range(200):
        n, k = 6, 1 + i % 5
        box = random_box(gen, n, "mixed" if i % 2 else "tiny")
        v0 = box.lower + torch.rand(box.shape, generator=gen, dtype=F64) * box.width
        p = rank_prop("topk", 1.0, k=k)
        w = worst_case(p, v0, box).item()
        amin = torch.where(box.lower > 0, box.lower, torch.where(box.upper < 0, -box.upper, 0 * box.lower))
        amax = torch.maximum(box.lower.abs(), box.upper.abs())
        K = v0.abs().topk(k, dim=1).indices[0]
        inK = torch.zeros(n, dtype=torch.bool)
        inK[K] = True
        set_can_change = k < n and float(amin[0][inK].min()) <= float(amax[0][~inK].max())
        assert (w < 1.0) == set_can_change
        if set_can_change and float(amin[0][inK].min()) < float(amax[0][~inK].max()):
            i_weak = int(torch.nonzero(inK)[amin[0][inK].argmin()])
            j_strong = int(torch.nonzero(~inK)[amax[0][~inK].argmax()])
            v = v0.clone()
            v[0, i_weak] = torch.where(box.lower[0, i_weak] > 0, box.lower[0, i_weak],
                                       torch.where(box.upper[0, i_weak] < 0, box.upper[0, i_weak], 0.0))
            v[0, j_strong] = torch.where(box.lower[0, j_strong].abs() > box.upper[0, j_strong].abs(),
                                         box.lower[0, j_strong], box.upper[0, j_strong])
            assert metric(p, v0, v).item() < 1.0
            seen_change += 1
    assert seen_change > 10


def test_gap_ratio_by_hand():
    from verigrad.properties import gap_ratio

    assert gap_ratio(prop(Kind.UNTARGETED, Metric.L2), 2.0, 0.5) == 4.0
    assert gap_ratio(prop(Kind.UNTARGETED, Metric.COSINE), 0.6, 0.9) == pytest.approx(4.0)
    assert gap_ratio(prop(Kind.TARGETED, Metric.L2, target=T), 0.5, 1.5) == pytest.approx(3.0)
    assert gap_ratio(prop(Kind.TARGETED, Metric.COSINE, target=T), 0.5, -0.5) == pytest.approx(3.0)
    assert gap_ratio(rank_prop("topk", 0.5, k=2), 0.0, 0.5) == pytest.approx(2.0)
    assert gap_ratio(rank_prop("sign", 0.0), 3.0, 0.0) is None  # the attack moved nothing
    assert gap_ratio(rank_prop("feature_bound", 1.0), 0.3, 0.2) == pytest.approx(1.5)


def test_rank_property_construction_errors():
    with pytest.raises(ValueError, match="takes no metric"):
        Property("x", "topk", "l2", 0.5, k=2)
    with pytest.raises(ValueError, match="needs a metric"):
        Property("x", "untargeted", None, 0.5)
    with pytest.raises(ValueError, match="k"):
        Property("x", "topk", None, 0.5)
    with pytest.raises(ValueError, match="overlap fraction"):
        Property("x", "topk", None, 1.5, k=2)
    with pytest.raises(ValueError, match="features"):
        Property("x", "topk", None, 0.5, k=2, features=(1,))
    with pytest.raises(ValueError, match="normalize"):
        Property("x", "sign", None, 0.0, "l2")


@pytest.mark.parametrize("m,norm", [(Metric.L1, Normalize.L1), (Metric.L2, Normalize.L2), (Metric.LINF, Normalize.MAX)])
def test_normalized_deviation_never_exceeds_the_triangle_bound(m, norm):
    # a box straddling 0 everywhere: the per-coordinate bound alone would exceed 2
    box = Bounds(-torch.ones(1, 50, dtype=F64), torch.ones(1, 50, dtype=F64))
    v0 = torch.full((1, 50), 0.1, dtype=F64)
    w = worst_case(prop(Kind.UNTARGETED, m, norm), v0, box).item()
    assert w == pytest.approx(2.0)
    far = torch.maximum((normalized_bounds(box, norm).lower - normalize_map(v0, norm)).abs(),
                        (normalized_bounds(box, norm).upper - normalize_map(v0, norm)).abs())
    per_coordinate = torch.linalg.vector_norm(far, ord={Metric.L1: 1, Metric.L2: 2, Metric.LINF: math.inf}[m])
    assert per_coordinate > 2 if m != Metric.LINF else per_coordinate == 2


# ----------------------------------------------------------------------------------------
# top-k, sign, feature bound: more hand cases, ties, exactness, sizes, NaN


def adversarial_overlap(in_k: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """The smallest |topk(a) ∩ K| / k over EVERY tie-breaking of topk on the rows of a (N, n):
    everything above the k-th value is in; the remaining slots go to tied outsiders first."""
    tau = a.sort(dim=1, descending=True).values[:, k - 1:k]
    above, tied = a > tau, a == tau
    slots = k - above.sum(1)
    tied_out = (tied & ~in_k).sum(1)
    return ((above & in_k).sum(1) + (slots - tied_out).clamp(min=0)).to(F64) / k


def k_set(a0: torch.Tensor, k: int, prefer_high_index: bool) -> torch.Tensor:
    """A valid top-k set of the magnitudes a0 (n,), ties broken by index one way or the other."""
    n = a0.numel()
    order = sorted(range(n), key=lambda i: (-float(a0[i]), -i if prefer_high_index else i))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def brute_topk_worst(v0: torch.Tensor, box: Bounds, k: int) -> torch.Tensor:
    """The count argument written out with explicit loops (j ≠ i), one sample at a time."""
    lo, up = box.lower.reshape(box.shape[0], -1), box.upper.reshape(box.shape[0], -1)
    out = []
    for b in range(lo.shape[0]):
        amin = [0.0 if l <= 0 <= u else min(abs(l), abs(u)) for l, u in zip(lo[b].tolist(), up[b].tolist(), strict=True)]
        amax = [max(abs(l), abs(u)) for l, u in zip(lo[b].tolist(), up[b].tolist(), strict=True)]
        K = v0.reshape(v0.shape[0], -1)[b].abs().topk(k).indices.tolist()
        good = sum(1 for i in K if sum(1 for j in range(len(amax)) if j != i and amax[j] >= amin[i]) <= k - 1)
        out.append(good / k)
    return torch.tensor(out, dtype=F64)


def test_topk_vectorised_count_matches_the_loops():
    gen = torch.Generator().manual_seed(21)
    for n, ks, rounded in ((40, (1, 3, 20, 40), False), (40, (1, 5, 39, 40), True), (300, (1, 30, 300), True)):
        c = torch.randn(3, n, generator=gen, dtype=F64) * 3
        r = torch.rand(3, n, generator=gen, dtype=F64) * 0.7
        lo, up = c - r, c + r
        if rounded:  # many exact ties between a⁺ and a⁻ (and inside v0)
            lo, up = lo.floor(), up.ceil()
        box = Bounds(lo, up)
        v0 = (lo + up) / 2 if rounded else lo + torch.rand(3, n, generator=gen, dtype=F64) * (up - lo)
        for k in ks:
            p = rank_prop("topk", 1.0, k=k)
            members = _topk_members_that_stay(p, v0, box) / k
            torch.testing.assert_close(members, brute_topk_worst(v0, box, k), rtol=0, atol=0)
            # the pigeonhole bound can only raise the certified overlap
            assert bool((worst_case(p, v0, box) >= members).all())


def test_topk_pigeonhole_beats_one_member_at_a_time():
    """One outsider (feature 3) can reach each of the top 3, so no member is safe on its own,
    but it can displace only one of them at a time: the certified overlap is 2 of 3."""
    v0 = torch.tensor([[10.0, 9.0, 8.0, 7.0, 0.0]], dtype=F64)
    box = Bounds(v0 - torch.tensor([[1.5, 1.5, 1.5, 1.5, 0.0]], dtype=F64),
                 v0 + torch.tensor([[1.5, 1.5, 1.5, 1.5, 0.0]], dtype=F64))
    p = rank_prop("topk", 1.0, k=3)
    assert float(_topk_members_that_stay(p, v0, box)[0]) == 0  # feature 3 reaches 8.5 ≥ 8.5 = a⁻ of each
    assert float(worst_case(p, v0, box)[0]) == 2 / 3  # only one outsider: at most one member leaves
    # and it is attained: push feature 3 up and feature 2 down
    v = torch.tensor([[10.0, 9.0, 6.5, 8.5, 0.0]], dtype=F64)
    assert float(metric(p, v0, v)[0]) == 2 / 3


def test_topk_runs_on_cifar_sized_maps():
    gen = torch.Generator().manual_seed(4)
    v0 = torch.randn(4, 3, 32, 32, generator=gen, dtype=F64)
    box = Bounds(v0 - 0.05, v0 + 0.05)
    for k in (1, 100, 3072):
        w = worst_case(rank_prop("topk", 1.0, k=k), v0, box)
        assert w.shape == (4,) and w.dtype == F64 and bool(((w >= 0) & (w <= 1)).all())
    assert worst_case(rank_prop("topk", 1.0, k=3072), v0, box).eq(1.0).all()  # k = n: nothing can leave


def test_topk_is_sound_under_any_tie_breaking():
    """Integer boxes and integer points: ties everywhere. The bound must hold against the most
    adversarial tie-breaking of topk(|v|), and for either tie-breaking of K = topk(|v0|)."""
    gen = torch.Generator().manual_seed(13)
    n = 4
    for trial in range(120):
        a, b = torch.randint(-3, 4, (n,), generator=gen), torch.randint(-3, 4, (n,), generator=gen)
        lo, up = torch.minimum(a, b).to(F64), torch.maximum(a, b).to(F64)
        box = Bounds(lo[None], up[None])
        grids = [torch.arange(int(l), int(u) + 1, dtype=F64) for l, u in zip(lo, up, strict=True)]
        pts = torch.cartesian_prod(*grids).reshape(-1, n)
        pts = torch.cat([pts, sample_points(gen, box)])
        v0 = pts[torch.randint(0, len(pts), (1,), generator=gen)]  # an integer point: ties in v0 too
        for k in range(1, n + 1):
            p = rank_prop("topk", 1.0, k=k)
            w = worst_case(p, v0, box).item()
            for prefer in (False, True):
                K = k_set(v0[0].abs(), k, prefer)
                seen = adversarial_overlap(K, pts.abs(), k).min().item()
                assert seen >= w - 1e-12, (trial, k, prefer, lo.tolist(), up.tolist(), v0.tolist(), seen, w)
            # torch's own tie-breaking in the concrete metric, too
            assert metric(p, v0.expand_as(pts), pts).min().item() >= w - 1e-12


def test_topk_tie_at_the_kth_place_is_counted_against_us():
    # |v0| = (2, 2, 1), k = 1, a point box: whichever of 0, 1 torch.topk picks, the other ties
    # with it, so no tie-breaking-independent guarantee exists: the bound is 0 while the
    # concrete overlap (same tie-breaking twice) is 1. Sound, deliberately not exact.
    v0 = t64([2.0, -2.0, 1.0])
    p = rank_prop("topk", 1.0, k=1)
    assert worst_case(p, v0, Bounds.point(v0)).item() == 0.0
    assert metric(p, v0, v0).item() == 1.0
    assert decide(p, worst_case(p, v0, Bounds.point(v0))) == [Verdict.UNKNOWN]
    # k = 2 takes both tied features: the set {0, 1} is certain
    assert worst_case(rank_prop("topk", 1.0, k=2), v0, Bounds.point(v0)).item() == 1.0


def test_topk_by_hand_not_exact_below_one():
    # |v0| = (5, 4, 1), k = 2, K = {0, 1}; |v_0| ∈ [0.5, 5], |v_1| ∈ [0.5, 4], |v_2| ∈ [1, 3].
    # Feature 0: rivals j ≠ 0 with a⁺ ≥ 0.5: features 1 and 2 → 2 > k − 1: not guaranteed;
    # feature 1 likewise. The member count is 0, but feature 2 can displace only one of them
    # at a time, so the true minimum overlap is 1/2 — which the pigeonhole bound (one outsider
    # at rank ≥ 2k − K + 1 = 4 > n would be needed to displace both) certifies.
    v0 = t64([5.0, 4.0, 1.0])
    box = Bounds(t64([0.5, 0.5, 1.0]), t64([5.0, 4.0, 3.0]))
    p = rank_prop("topk", 0.5, k=2)
    assert _topk_members_that_stay(p, v0, box).item() == 0.0
    assert worst_case(p, v0, box).item() == 0.5
    gen = torch.Generator().manual_seed(0)
    pts = sample_points(gen, box)
    assert metric(p, v0.expand_as(pts), pts).min().item() == 0.5


def test_sign_by_hand_with_zeros_in_v0():
    # v0 = (0, 0, 0, 0, 1, -1); intervals [−1, 0], [0, 1], [0, 0], [−2, −1], [0, 2], [−3, 0]:
    # zero flips iff the interval leaves 0 on either side: features 0, 1, 3 → 3 (2 is pinned);
    # v0 = 1 with l = 0 can reach 0 (sign 0 ≠ 1) → flips; v0 = −1 with u = 0 → flips. Total 5.
    v0 = t64([0.0, 0.0, 0.0, 0.0, 1.0, -1.0])
    box = Bounds(t64([-1.0, 0.0, 0.0, -2.0, 0.0, -3.0]), t64([0.0, 1.0, 0.0, -1.0, 2.0, 0.0]))
    assert worst_case(rank_prop("sign", 0.0), v0, box).item() == 5
    assert worst_case(rank_prop("sign", 0.0, features=(2,)), v0, box).item() == 0
    assert worst_case(rank_prop("sign", 0.0, features=(2, 3)), v0, box).item() == 1
    # attained at (−1, 1, 0, −2, 0, 0); a concrete point with only feature 3 moved: 1 flip
    assert metric(rank_prop("sign", 0.0), v0, t64([-1.0, 1.0, 0.0, -2.0, 0.0, 0.0])).item() == 5
    assert metric(rank_prop("sign", 0.0), v0, t64([0.0, 0.0, 0.0, -1.5, 1.0, -1.0])).item() == 1
    assert decide(rank_prop("sign", 1.0, features=(2, 3)),
                  worst_case(rank_prop("sign", 1.0, features=(2, 3)), v0, box)) == [Verdict.CERTIFIED]


def test_feature_bound_by_hand():
    # features (0, 2): |[−.3, .1]| ≤ .3, |[.05, .2]| ≤ .2 → worst .3; feature 1 (|−5|) is not chosen
    v0 = t64([0.0, -4.0, 0.1])
    box = Bounds(t64([-0.3, -5.0, 0.05]), t64([0.1, -3.0, 0.2]))
    p = rank_prop("feature_bound", 0.25, features=(0, 2))
    assert worst_case(p, v0, box).item() == pytest.approx(0.3, abs=1e-15)
    assert metric(p, v0, v0).item() == pytest.approx(0.1)
    assert decide(p, worst_case(p, v0, box)) == [Verdict.UNKNOWN]
    assert decide(rank_prop("feature_bound", 0.3, features=(0, 2)), worst_case(p, v0, box)) == [Verdict.CERTIFIED]
    assert worst_case(rank_prop("feature_bound", 1.0), v0, box).item() == 5.0  # all features


RANK_PROPS = [("topk", {"k": 1}), ("topk", {"k": 2}), ("topk", {"k": 5}), ("sign", {}), ("sign", {"features": (1, 2)}),
              ("feature_bound", {}), ("feature_bound", {"features": (0, 4)})]
RANK_IDS = [f"{k}-{'-'.join(f'{a}{b}' for a, b in e.items()) or 'all'}" for k, e in RANK_PROPS]


@pytest.mark.parametrize("kind,extra", RANK_PROPS, ids=RANK_IDS)
def test_rank_zero_width_bounds_give_the_concrete_value(kind, extra):
    gen = torch.Generator().manual_seed(7)
    v0 = torch.randn(4, 5, dtype=F64, generator=gen)  # continuous: no tie at the k-th place
    v0[1, 2] = 0.0
    p = rank_prop(kind, 1.0, **extra)
    torch.testing.assert_close(worst_case(p, v0, Bounds.point(v0)), metric(p, v0, v0), rtol=0, atol=0)


@pytest.mark.parametrize("kind,extra", RANK_PROPS, ids=RANK_IDS)
def test_rank_batch_image_shapes_and_float64(kind, extra):
    gen = torch.Generator().manual_seed(2)
    v0 = torch.randn(3, 1, 2, 3, generator=gen)  # float32 in, float64 out
    box = Bounds(v0 - 0.3, v0 + 0.3)
    p = rank_prop(kind, 1.0, **extra)
    w = worst_case(p, v0, box)
    assert w.shape == (3,) and w.dtype == F64
    for b in range(3):
        torch.testing.assert_close(worst_case(p, v0[b:b + 1], box[b:b + 1]), w[b:b + 1])
    # the metric accepts v0 as one sample (1, *S) or the per-sample shape S against a batch
    pts = v0[:1] + 0.1 * torch.randn(6, 1, 2, 3, generator=gen)
    torch.testing.assert_close(metric(p, v0[:1], pts), metric(p, v0[0], pts))
    torch.testing.assert_close(metric(p, v0[:1], pts), metric(p, v0[:1].expand_as(pts), pts))


@pytest.mark.parametrize("kind", ["sign", "feature_bound"])
def test_sign_and_feature_worst_cases_are_attained_on_subsets_and_zeros(kind):
    gen = torch.Generator().manual_seed(17)
    for i in range(40):
        box = random_box(gen, 6, ["mixed", "touch", "straddle"][i % 3])
        v0 = box.lower + torch.rand(box.shape, generator=gen, dtype=F64) * box.width
        v0[0, i % 6] = 0.0 if float(box.lower[0, i % 6]) <= 0 <= float(box.upper[0, i % 6]) else v0[0, i % 6]
        feats = None if i % 2 else tuple(sorted(set(torch.randint(0, 6, (3,), generator=gen).tolist())))
        p = rank_prop(kind, 1.0, features=feats)
        lo, up = box.lower, box.upper
        bits = torch.tensor(list(itertools.product([False, True], repeat=6)))
        corners = torch.where(bits, up, lo)  # exactly the endpoints (lo + bits·(u − l) may round out)
        zero = torch.zeros_like(lo).clamp(lo, up)
        # the exact worst cases sit at corners; also try 0 in place of the upper endpoints
        pts = torch.cat([corners, torch.where(bits, zero.expand_as(corners), corners)])
        vals = metric(p, v0.expand_as(pts), pts)
        assert vals.max().item() == worst_case(p, v0, box).item()


def test_gap_ratio_more_cases():
    from verigrad.properties import gap_ratio

    unt, cos = prop(Kind.UNTARGETED, Metric.L1), prop(Kind.UNTARGETED, Metric.COSINE)
    tl2, tcos = prop(Kind.TARGETED, Metric.L2, target=T), prop(Kind.TARGETED, Metric.COSINE, target=T)
    top, sgn, fb = rank_prop("topk", 0.5, k=4), rank_prop("sign", 2.0), rank_prop("feature_bound", 1.0)
    assert gap_ratio(unt, 1.0, 1.0) == 1.0  # tight
    assert gap_ratio(sgn, 3, 1) == 3.0 and gap_ratio(sgn, 2, 2) == 1.0
    assert gap_ratio(top, 0.25, 0.75) == pytest.approx(3.0)  # (1 − .25) / (1 − .75)
    assert gap_ratio(top, 0.5, 0.5) == 1.0
    assert gap_ratio(cos, 0.0, 0.5) == pytest.approx(2.0)
    assert gap_ratio(tcos, 1.0, 0.0) == pytest.approx(2.0)  # (1 + 1) / (1 + 0)
    assert gap_ratio(tl2, 0.25, 1.0) == pytest.approx(4.0)
    # inconsistent (an attack beyond the certificate would be a soundness bug): < 1, reported
    assert gap_ratio(fb, 0.1, 0.2) == pytest.approx(0.5)
    # undefined: zero denominators, NaN, infinity
    assert gap_ratio(fb, 0.3, 0.0) is None
    assert gap_ratio(cos, 0.5, 1.0) is None and gap_ratio(top, 0.5, 1.0) is None  # attack moved nothing
    assert gap_ratio(tl2, 0.0, 1.0) is None  # the certificate says nothing
    assert gap_ratio(tcos, 0.5, -1.0) is None
    assert gap_ratio(unt, float("nan"), 1.0) is None and gap_ratio(unt, 1.0, float("nan")) is None
    assert gap_ratio(unt, float("inf"), 1.0) is None
    # each rule declares its own
    assert all(callable(r.gap) for r in RULES.values())


def test_rank_property_size_and_value_errors():
    from verigrad.spec import PropertySpec

    v0 = torch.zeros(1, 4, dtype=F64)
    box = Bounds.point(v0)
    with pytest.raises(ValueError, match=r"'r'.*k = 5 exceeds the 4 features"):
        worst_case(rank_prop("topk", 1.0, k=5), v0, box)
    with pytest.raises(ValueError, match=r"'r'.*feature index 4 out of range.*0\.\.3"):
        worst_case(rank_prop("sign", 0.0, features=(0, 4)), v0, box)
    with pytest.raises(ValueError, match="feature index 7"):
        metric(rank_prop("feature_bound", 1.0, features=(7,)), v0, v0)
    with pytest.raises(ValueError, match="unique"):
        rank_prop("sign", 0.0, features=(1, 1))
    with pytest.raises(ValueError, match="unique"):
        rank_prop("sign", 0.0, features=())
    with pytest.raises(ValueError, match=">= 0"):
        rank_prop("sign", -1.0)
    with pytest.raises(ValueError, match="> 0"):
        rank_prop("feature_bound", 0.0, features=(1,))
    with pytest.raises(ValueError, match="k"):
        rank_prop("topk", 1.0, k=0)
    with pytest.raises(ValueError, match="k"):
        rank_prop("topk", 1.0, k=True)
    with pytest.raises(ValueError, match="k"):
        rank_prop("sign", 0.0, k=2)
    with pytest.raises(ValueError, match="target map"):
        Property("x", "topk", None, 1.0, target=T, k=1)
    assert rank_prop("topk", 1.0, k=2.0).k == 2
    # PropertySpec.build: sizes against the map, 'all' → None
    with pytest.raises(ValueError, match=r"'big'.*k = 26 exceeds the 25 features"):
        PropertySpec(name="big", kind=Kind.TOPK, k=26, threshold=1.0).build((1, 5, 5))
    with pytest.raises(ValueError, match=r"'far'.*feature index 25 out of range"):
        PropertySpec(name="far", kind=Kind.SIGN, features=(3, 25), threshold=0.0).build((1, 5, 5))
    p = PropertySpec(name="all", kind=Kind.FEATURE_BOUND, features="all", threshold=1.0).build((1, 5, 5))
    assert p.features is None and p.metric is None and p.k is None
    p = PropertySpec(name="few", kind=Kind.SIGN, features=(3, 24), threshold=0.0).build((1, 5, 5))
    assert p.features == (3, 24)
    assert PropertySpec(name="t", kind=Kind.TOPK, k=25, threshold=0.5).build((1, 5, 5)).k == 25


def test_nan_never_certifies_nor_falsifies():
    v0 = t64([1.0, float("nan"), 2.0])
    box = Bounds(t64([0.5, 0.0, 1.0]), t64([1.5, 1.0, 3.0]))
    for p in (rank_prop("topk", 0.5, k=1), rank_prop("sign", 3.0), rank_prop("feature_bound", 10.0),
              prop(Kind.UNTARGETED, Metric.COSINE, threshold=-1.0), prop(Kind.UNTARGETED, Metric.L2, threshold=10.0)):
        w = worst_case(p, v0, box)
        assert torch.isnan(w).all() and decide(p, w) == [Verdict.UNKNOWN], p
    # a NaN target: the cosine bound's "t = 0" branch must not certify
    tnan = t64([float("nan"), 0.0, 0.0])[0]
    q = prop(Kind.TARGETED, Metric.COSINE, target=tnan, threshold=0.5)
    assert decide(q, worst_case(q, t64([1.0, 1.0, 1.0]), box)) == [Verdict.UNKNOWN]
    # a NaN explanation is no counterexample: the metric is NaN, not a count of flips
    good = t64([1.0, 1.0, 2.0])
    bad = t64([1.0, float("nan"), 2.0])
    for p in (rank_prop("topk", 0.5, k=1), rank_prop("sign", 0.0), rank_prop("feature_bound", 10.0)):
        assert torch.isnan(metric(p, good, bad)).all() and not torch.isnan(metric(p, good, good)).any()
    # a NaN outside the chosen features does not matter to sign / feature_bound
    assert metric(rank_prop("sign", 0.0, features=(0, 2)), good, bad).item() == 0.0


def test_file_target_must_be_finite(tmp_path):
    arr = np.zeros((1, 3, 3))
    arr[0, 1, 1] = np.nan
    np.save(tmp_path / "t.npy", arr)
    with pytest.raises(ValueError, match="1 non-finite"):
        FileTarget(path=tmp_path / "t.npy").map((1, 3, 3), F64)
