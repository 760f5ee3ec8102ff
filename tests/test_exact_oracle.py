"""The exact gradient-range oracle (tests/exact_oracle.py) and the bound engines against it.

The oracle enumerates the activation regions of a small ReLU / LeakyReLU MLP that meet an input
box; on each, ∂z_c/∂x = J_s[c] is constant, so [min, max] over the regions is the exact range
of every gradient coordinate. It is checked against autograd (sampled gradients lie in the
range and are region values; the extremes are attained at the regions' witness points), and
then every engine's bounds must contain that range — a sampling check can only see gradients
at the points it samples, the oracle sees all of them.
"""
from __future__ import annotations

import pytest

pytest.importorskip("scipy")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.exact_oracle import (  # noqa: E402
    TOL,
    activation_regions,
    containment_violations,
    exact_gradient_range,
    gradient_range,
)
from tests.helpers import box_points, random_mlp  # noqa: E402
from verigrad.bounds import EngineOptions, compute_bounds  # noqa: E402
from verigrad.bounds.base import Bounds  # noqa: E402
from verigrad.graph.gradient_graph import Output, saliency  # noqa: E402
from verigrad.models.network import ActKind, Activation, Linear, Network  # noqa: E402
from verigrad.perturbation import input_box  # noqa: E402

F64 = torch.float64
RADII = (0.05, 0.3, 1.0)
FAST = EngineOptions(alpha_iterations=5)
RELU = (ActKind.RELU, 0.0)
LEAKY = (ActKind.LEAKY_RELU, 0.1)


def _centre(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _np(box: Bounds) -> tuple[np.ndarray, np.ndarray]:
    return box.lower[0].numpy(), box.upper[0].numpy()


def _grads(net: Network, pts: torch.Tensor, target: int) -> np.ndarray:
    return saliency(net, pts, torch.full((len(pts),), target)).numpy()


def _jacobians(net: Network, pts: torch.Tensor) -> np.ndarray:
    """Autograd's ∂z/∂x at each point: (points, classes, inputs)."""
    return np.stack([_grads(net, pts, c) for c in range(net.num_classes)], axis=1)


def _pre_activation_signs(net: Network, x: torch.Tensor) -> tuple[tuple[bool, ...], ...]:
    """The activation pattern at one point x (1, n): z > 0 per unit of every activation."""
    vals = net.evaluate(x)
    prev = "input"
    out = []
    for node in net.layers:
        if isinstance(node, Activation):
            out.append(tuple(bool(v) for v in (vals[prev][0] > 0)))
        prev = node.name
    return tuple(out)


# ---------------------------------------------------------------- the oracle itself

ORACLE_CASES = [((4, 6, 5, 3), RELU, 0), ((6, 8, 8, 4), RELU, 1), ((3, 10, 3), RELU, 2), ((4, 6, 5, 3), LEAKY, 3),
                ((5, 7, 6, 3), RELU, 4), ((3, 10, 3), LEAKY, 5)]


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("sizes,act,seed", ORACLE_CASES, ids=[f"{'-'.join(map(str, s))}-{a[0].value}"
                                                              for s, a, _ in ORACLE_CASES])
def test_oracle_against_autograd(sizes, act, seed, radius):
    """Sampled gradients lie in [min, max] and each equals a region's value; every region's
    witness lies in the box, has the region's pattern and autograd's Jacobian there equals the
    region's; so min and max are attained (by autograd at the attaining region's witness)."""
    net = random_mlp(act[0], act[1], sizes=sizes, seed=seed)
    box = input_box(_centre(sizes[0], 100 + seed), radius, None)
    lower, upper = _np(box)
    target = seed % sizes[-1]
    regions = activation_regions(net, lower, upper)
    lo, hi = gradient_range(regions, target, net.input_shape)
    assert len({r.pattern for r in regions}) == len(regions), "a pattern was enumerated twice"

    pts = box_points(box, 400, 100, seed=seed)  # centre, 400 interior points, 100 corners
    v = _grads(net, pts, target)
    outside = (v < lo - TOL) | (v > hi + TOL)
    assert not outside.any(), f"{int(outside.any(1).sum())} sampled gradients leave the exact range"
    table = np.stack([r.gradient(target) for r in regions])  # (regions, inputs)
    dist = np.abs(v[:, None, :] - table[None]).max(-1).min(-1)
    assert dist.max() <= TOL, f"a sampled gradient is no region's value (off by {dist.max():.3e})"

    wit = torch.as_tensor(np.stack([r.point for r in regions]))
    assert bool(((wit >= box.lower) & (wit <= box.upper)).all()), "a witness leaves the box"
    for r, x in zip(regions, wit, strict=True):
        assert r.margin > TOL
        assert _pre_activation_signs(net, x[None]) == r.pattern, "witness not in its region"
    jac = _jacobians(net, wit)
    err = np.abs(jac - np.stack([r.jacobian for r in regions])).max()
    assert err <= TOL, f"autograd's Jacobian at a witness differs from its region's by {err:.3e}"
    # attained: the region holding the min (max) of coordinate i, at its witness
    for i in range(sizes[0]):
        k_lo, k_hi = int(table[:, i].argmin()), int(table[:, i].argmax())
        assert abs(jac[k_lo, target, i] - lo[i]) <= TOL and abs(jac[k_hi, target, i] - hi[i]) <= TOL


@pytest.mark.parametrize("sizes,act,seed", ORACLE_CASES)
def test_oracle_point_box(sizes, act, seed):
    """Radius 0 (a generic point, no ties): one region and min = max = autograd's gradient."""
    net = random_mlp(act[0], act[1], sizes=sizes, seed=seed)
    x = _centre(sizes[0], 200 + seed)
    target = (seed + 1) % sizes[-1]
    lo, hi, count = exact_gradient_range(net, x[0].numpy(), x[0].numpy(), target)
    g = _grads(net, x, target)[0]
    assert count == 1
    assert np.abs(lo - g).max() <= TOL and np.abs(hi - g).max() <= TOL



def _brute_force_patterns(net: Network, lower: np.ndarray, upper: np.ndarray) -> set:
    """Independent of the oracle's search: every one of the 2^H patterns, each kept iff the LP
    max t s.t. x ∈ box, s_j·z_j(x)/‖∇z_j‖ ≥ t (z_j affine given the pattern) reaches t > TOL."""
    from itertools import product

    from scipy.optimize import linprog

    lins = [l for l in net.layers if isinstance(l, Linear)]
    acts = [l for l in net.layers if isinstance(l, Activation)]
    widths = [l.weight.shape[0] for l in lins[:-1]]
    n = lower.size
    kept = set()
    for bits in product((True, False), repeat=sum(widths)):
        split = np.split(np.array(bits), np.cumsum(widths)[:-1])
        m, c, rows, rhs, possible = np.eye(n), np.zeros(n), [], [], True
        for lin, act, s in zip(lins, acts, split, strict=False):
            m, c = lin.weight.numpy() @ m, lin.weight.numpy() @ c + lin.bias.numpy()
            sg = np.where(s, 1.0, -1.0)
            nrm = np.linalg.norm(m, axis=1)
            const = nrm <= 1e-12  # z_j constant (a relu of dead units): autograd's sign, no constraint
            possible &= bool(np.array_equal(s[const], c[const] > 0))
            rows.append(-sg[~const, None] * m[~const] / nrm[~const, None])
            rhs.append(sg[~const] * c[~const] / nrm[~const])
            d = np.where(s, 1.0, act.param if act.kind == ActKind.LEAKY_RELU else 0.0)
            m, c = d[:, None] * m, d * c
        a = np.vstack(rows)
        if not possible:
            continue
        res = linprog(np.r_[np.zeros(n), -1.0], A_ub=np.hstack([a, np.ones((len(a), 1))]), b_ub=np.concatenate(rhs),
                      bounds=[*zip(lower, upper, strict=True), (None, 1.0)], method="highs")
        if -res.fun > TOL:
            kept.add(tuple(tuple(bool(b) for b in s) for s in split))
    return kept


@pytest.mark.parametrize("sizes,act,seed,radius", [((3, 5, 4, 2), RELU, 0, 1.0), ((3, 5, 4, 2), LEAKY, 1, 0.5),
                                                   ((2, 4, 4, 3), RELU, 2, 2.0)])
def test_oracle_patterns_match_brute_force(sizes, act, seed, radius):
    """The pruned search finds exactly the patterns a brute-force LP over all 2^H patterns
    finds (catches regions lost to a wrong filter, which sampling rarely hits: thin slivers)."""
    net = random_mlp(act[0], act[1], sizes=sizes, seed=seed)
    lower, upper = _np(input_box(_centre(sizes[0], 300 + seed), radius, None))
    found = {r.pattern for r in activation_regions(net, lower, upper)}
    brute = _brute_force_patterns(net, lower, upper)
    assert found == brute, f"missing {len(brute - found)}, extra {len(found - brute)} of {len(brute)} regions"

def test_oracle_degenerate_box():
    """Coordinates with lower = upper are held fixed (the regions are full-dimensional in the
    others): sampled gradients are region values and lie in the range."""
    net = random_mlp(ActKind.RELU, sizes=(5, 7, 6, 3), seed=7)
    box = input_box(_centre(5, 7), 0.8, None)
    lower, upper = _np(box)
    lower, upper = lower.copy(), upper.copy()
    lower[[1, 3]] = upper[[1, 3]] = box.center[0, [1, 3]].numpy()
    flat = Bounds(torch.as_tensor(lower)[None], torch.as_tensor(upper)[None])
    regions = activation_regions(net, lower, upper)
    lo, hi = gradient_range(regions, 2, net.input_shape)
    full = activation_regions(net, *_np(box))
    assert 1 < len(regions) < len(full)  # a slice of the box meets fewer regions
    pts = box_points(flat, 300, 100, seed=3)
    v = _grads(net, pts, 2)
    table = np.stack([r.gradient(2) for r in regions])
    assert not ((v < lo - TOL) | (v > hi + TOL)).any()
    assert np.abs(v[:, None, :] - table[None]).max(-1).min(-1).max() <= TOL
    assert all(np.array_equal(r.point[[1, 3]], lower[[1, 3]]) for r in regions)


def _tie_net() -> Network:
    """z = x₀ + x₁, y = relu(z): on the box [0, 1]² the face z = 0 is a single corner."""
    return Network((Linear("fc0", torch.tensor([[1.0, 1.0]], dtype=F64), torch.zeros(1, dtype=F64)),
                    Activation("act0", ActKind.RELU),
                    Linear("fc1", torch.tensor([[1.0], [-2.0]], dtype=F64), torch.zeros(2, dtype=F64))), (2,))


def test_oracle_ties_interior_versus_closed():
    """The documented tie rule: on [0, 1]² the region z < 0 meets the box only at the corner 0
    (where autograd's relu'(0) = 0 gives gradient 0), so the interior rule has one region
    (gradient (1, 1)) and the closed rule adds the degenerate one (gradient (0, 0))."""
    net = _tie_net()
    lower, upper = np.zeros(2), np.ones(2)
    lo, hi, n = exact_gradient_range(net, lower, upper, 0)
    assert n == 1 and np.array_equal(lo, [1.0, 1.0]) and np.array_equal(hi, [1.0, 1.0])
    lo_c, hi_c, n_c = exact_gradient_range(net, lower, upper, 0, interior=False)
    assert n_c == 2 and np.array_equal(lo_c, [0.0, 0.0]) and np.array_equal(hi_c, [1.0, 1.0])
    assert np.array_equal(_grads(net, torch.zeros(1, 2, dtype=F64), 0)[0], [0.0, 0.0])
    # a box across the face: both regions are open there
    lo_x, hi_x, n_x = exact_gradient_range(net, -np.ones(2), np.ones(2), 1)
    assert n_x == 2 and np.array_equal(lo_x, [-2.0, -2.0]) and np.array_equal(hi_x, [0.0, 0.0])


def test_oracle_closed_contains_interior():
    """Closed half-spaces only add patterns: the closed range contains the interior one."""
    net = random_mlp(ActKind.RELU, sizes=(4, 6, 5, 3), seed=0)
    lower, upper = _np(input_box(_centre(4, 100), 0.6, None))
    lo, hi, n = exact_gradient_range(net, lower, upper, 0)
    lo_c, hi_c, n_c = exact_gradient_range(net, lower, upper, 0, interior=False)
    assert n_c >= n and (lo_c <= lo).all() and (hi_c >= hi).all()


@pytest.mark.parametrize("case", ["sigmoid", "inputs", "layers", "units", "last-activation", "box"])
def test_oracle_refuses(case):
    nets = {
        "sigmoid": lambda: random_mlp(ActKind.SIGMOID, sizes=(3, 4, 2)),
        "inputs": lambda: random_mlp(ActKind.RELU, sizes=(13, 4, 2)),
        "layers": lambda: random_mlp(ActKind.RELU, sizes=(3, 4, 4, 4, 4, 2)),
        "units": lambda: random_mlp(ActKind.RELU, sizes=(3, 13, 2)),
        "last-activation": lambda: Network((Linear("fc0", torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64)),
                                            Activation("act0", ActKind.RELU)), (2,)),
        "box": lambda: random_mlp(ActKind.RELU, sizes=(3, 4, 2)),
    }
    net = nets[case]()
    n = net.input_shape[0]
    lower, upper = (np.ones(n), np.zeros(n)) if case == "box" else (np.zeros(n), np.ones(n))
    with pytest.raises(ValueError, match="exact oracle"):
        exact_gradient_range(net, lower, upper, 0)


# ---------------------------------------------------------------- engines against the oracle

ENGINE_NETS = [(4, 6, 5, 3), (3, 10, 3), (5, 7, 4), (4, 5, 5, 3), (3, 6, 6, 6, 2), (6, 8, 4)]
METHODS = ("ibp", "crown", "alpha-crown")


def _width_ratio(lower: np.ndarray, upper: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> str:
    """Engine width / exact width over the coordinates of nonzero exact width."""
    w = hi - lo
    ok = w > 1e-12
    if not ok.any():
        return "exact width 0 everywhere"
    r = (upper - lower)[ok] / w[ok]
    return f"width ratio engine/exact median {np.median(r):.3f}, max {r.max():.3f}"


def _case(k: int, act: tuple[ActKind, float], radius: float):
    sizes = ENGINE_NETS[k]
    net = random_mlp(act[0], act[1], sizes=sizes, seed=10 + k)
    box = input_box(_centre(sizes[0], 20 + k), radius, None)
    return net, box, k % sizes[-1]


@pytest.mark.parametrize("act", [RELU, LEAKY], ids=["relu", "leaky_relu"])
@pytest.mark.parametrize("k", range(len(ENGINE_NETS)), ids=["-".join(map(str, s)) for s in ENGINE_NETS])
def test_engines_contain_exact_range(k, act):
    """Every engine's bounds contain the exact range: lower ≤ min + 1e-9, upper ≥ max − 1e-9."""
    for radius in RADII:
        net, box, target = _case(k, act, radius)
        lo, hi, count = exact_gradient_range(net, *_np(box), target)
        # the oracle first (so that a failure below is the engine's): sampled gradients lie in it
        v = _grads(net, box_points(box, 200, 50, seed=k), target)
        assert not ((v < lo - TOL) | (v > hi + TOL)).any(), "oracle bug: a sampled gradient leaves the exact range"
        for method in METHODS:
            res = compute_bounds(method, net, box, torch.tensor([target]), Output.LOGIT, None, FAST)
            assert res.actual_method is None, res.notes
            lower, upper = _np(res.bounds)
            bad = containment_violations(lower, upper, lo, hi, TOL)
            assert not bad, (f"{method} on {ENGINE_NETS[k]} {act[0].value} radius {radius} ({count} regions, "
                             f"{_width_ratio(lower, upper, lo, hi)}): " + "; ".join(bad))


def test_containment_check_can_fail():
    """CROWN's bounds shrunk by 10 % of their width around their midpoint no longer contain
    the exact range (on a case where CROWN is exact on some coordinate of nonzero width)."""
    net, box, target = _case(2, RELU, 0.3)
    lo, hi, _ = exact_gradient_range(net, *_np(box), target)
    assert (hi - lo).max() > 1e-3
    lower, upper = _np(compute_bounds("crown", net, box, torch.tensor([target])).bounds)
    assert not containment_violations(lower, upper, lo, hi)
    mid, half = (lower + upper) / 2, (upper - lower) / 2
    bad = containment_violations(mid - 0.9 * half, mid + 0.9 * half, lo, hi)
    assert bad and "miss the exact range" in bad[0]

