"""Branch and bound with neuron splits through MaxPool (argmax-tap splits of a window) and PReLU
(sign splits with any slope): exact against the region oracle on small nets, never wider than
CROWN, sound at sampled points and in float32, verdicts equal to the exact range's, empty
window domains dropped only when they have no point, CROWN leaves sound, and the shipped
MaxPool model searched by neuron splits."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

pytest.importorskip("scipy")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.exact_oracle import exact_gradient_range  # noqa: E402
from tests.graph_nets import maxpool_cnn, prelu_cnn, prelu_mlp, tiny_pool_net  # noqa: E402
from tests.helpers import assert_contains_true_gradients, box_points, random_mlp  # noqa: E402
from verigrad import properties as props  # noqa: E402
from verigrad.bounds import Bounds, EngineOptions, compute_bounds  # noqa: E402
from verigrad.bounds.bab import (  # noqa: E402
    BabOptions, Leaf, Mode, Objective, _child, _deriv_bounds, _neuron_candidates, _pool_planes, _relu_planes,
    _Search, neuron_split_reason, search,
)
from verigrad.graph.gradient_graph import Output, saliency  # noqa: E402
from verigrad.models.network import (  # noqa: E402
    INPUT, ActKind, Linear, MaxPool, Network, PReLU, Reshape,
)
from verigrad.operators.pooling import _windows  # noqa: E402
from verigrad.perturbation import input_box  # noqa: E402
from verigrad.properties import Property  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-9
F64 = torch.float64

# (name, network factory, seed of the centre, radius, target): ≤ 12 inputs; CROWN is wider than
# the exact range on each, so equality with it is bab's
CASES = [
    ("pool-overlap", lambda: tiny_pool_net(1, 0), 7, 0.3, 1),
    ("pool-padded-leaky", lambda: tiny_pool_net(2, 1), 7, 0.25, 1),
    ("pool-on-input", lambda: tiny_pool_net(3, 2), 7, 0.3, 1),
    ("prelu-mlp", lambda: prelu_mlp(4), 7, 0.3, 1),
    ("prelu-mlp-neg-scalar", lambda: prelu_mlp(12, slopes=((-0.8, 1.3, 0.5, -0.1, 2.5, 0.0, 1.0), (-0.7,))), 12,
     0.6, 0),
]
IDS = [c[0] for c in CASES]


def _case(k: int):
    _, make, seed, radius, target = CASES[k]
    net = make()
    x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return net, input_box(x, radius, None), torch.tensor([target])


def _bab(net, box, t, **kw) -> object:
    return compute_bounds("bab", net, box, t, Output.LOGIT, None, EngineOptions(bab=BabOptions(**kw)))


def _np(b: Bounds) -> tuple[np.ndarray, np.ndarray]:
    return b.lower[0].numpy(), b.upper[0].numpy()


def _flat(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).reshape(-1)


# ------------------------------------------------------------------ the relaxations themselves


@pytest.mark.parametrize("a", [-1.3, -0.2, 0.0, 0.4, 1.0, 1.7, 3.0])
def test_prelu_planes_and_derivative_enclose_f(a):
    """sl·z + il ≤ f(z) ≤ su·z + iu and f'(z) ∈ [dl, du] on every z of random boxes, for slopes
    below 0 (f not monotone), in [0, 1] (convex) and above 1 (concave: the chord is the lower
    plane); the check fails for a plane taken from the wrong side."""
    node = PReLU("p", torch.full((1,), a, dtype=F64))
    gen = torch.Generator().manual_seed(3)
    lo = torch.randn(1, 400, generator=gen, dtype=F64)
    up = lo + torch.rand(1, 400, generator=gen, dtype=F64) * 2
    sl, il, su, iu = _relu_planes(node, lo, up, None)
    dl, du = _deriv_bounds(node, lo, up, None)
    for u in torch.linspace(0, 1, 41, dtype=F64):
        z = lo + u * (up - lo)
        f = node.forward([z])
        assert bool((sl * z + il <= f + 1e-12).all() and (f <= su * z + iu + 1e-12).all())
        d = torch.where(z > 0, torch.ones_like(z), torch.full_like(z, a))
        assert bool((dl <= d).all() and (d <= du).all())
    unstable = (lo < 0) & (up > 0)
    if a > 1:  # concave: the chord (the convex case's upper plane) lies below f at z = 0
        chord = (up - a * lo) / (up - lo)
        assert bool(((a * lo - chord * lo) < -1e-9)[unstable].all())
        assert bool((il < 0)[unstable].all() and (iu == 0).all())


def test_pool_planes_enclose_the_max_and_fix_split_windows():
    """y ≥ Σ low·x and y ≤ Σ upp·x + cup at random points of the box; a window split to tap t
    gives y = x_t on its points (both planes the same one-hot)."""
    node = MaxPool("mp", (2, 2), (1, 1))
    gen = torch.Generator().manual_seed(4)
    lo = torch.randn(1, 2, 3, 3, generator=gen, dtype=F64)
    up = lo + torch.rand(1, 2, 3, 3, generator=gen, dtype=F64)
    low, upp, cup = _pool_planes(node, lo, up, None)
    for _ in range(200):
        x = lo + torch.rand(lo.shape, generator=gen, dtype=F64) * (up - lo)
        w, _ = _windows(x, node, 0.0)
        y = node.forward([x]).reshape(1, 2, 1, -1)
        assert bool(((low * w).sum(2, keepdim=True) <= y + 1e-12).all())
        assert bool((y <= (upp * w).sum(2, keepdim=True) + cup + 1e-12).all())
    s = torch.zeros(1, 2, 4, dtype=torch.int16)
    s[0, 1, 2] = 3  # window 2 of channel 1 fixed to tap 2
    low, upp, cup = _pool_planes(node, lo, up, s)
    assert torch.equal(low[0, 1, :, 2], upp[0, 1, :, 2]) and int(low[0, 1, :, 2].argmax()) == 2
    assert float(cup[0, 1, 0, 2]) == 0.0


@pytest.mark.parametrize("make, radius", [(lambda: tiny_pool_net(2, 1), 0.3), (lambda: tiny_pool_net(1, 0), 0.3),
                                          (lambda: prelu_mlp(4), 0.5), (lambda: maxpool_cnn(seed=1), 0.1)],
                         ids=["pool-then-fc", "pool-overlap", "prelu", "maxpool-cnn"])
def test_interval_pass_encloses_every_domain(make, radius):
    """The neuron pass alone (no root map to hide an error): on random split patterns — sign
    splits and window splits, children of children — every sampled point of a domain has its
    split nodes' inputs inside the domain's boxes (back-substituted through PReLU planes and
    MaxPool planes) and its autograd gradient inside the domain's map; a domain flagged empty
    has no sampled point."""
    from verigrad.bounds.bab import _neuron_pass, _stack_splits

    net = make()
    x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    box, t = input_box(x, radius, None), torch.tensor([1])
    doms = random_domains(net, box, t, 60)
    splits = _stack_splits(net, doms, torch.device("cpu"))
    d = len(doms)
    p = _neuron_pass(net, stacked(box, d), t.expand(d), Output.LOGIT, splits)
    assert_pass_encloses(net, box, t, doms, p)
    assert d >= 20


# ------------------------------------------------------------------ exactness against the oracle


@pytest.mark.parametrize("k", range(len(CASES)), ids=IDS)
def test_bab_to_completion_is_the_exact_range(k):
    """Run to completion, bab equals the exact range of every gradient coordinate over the box
    (1e-9), enumerated by the region oracle with MaxPool argmax taps and PReLU slopes; CROWN
    is wider on every case."""
    net, box, t = _case(k)
    lo, hi, regions = exact_gradient_range(net, *_np(box), int(t))
    assert regions > 1
    res = _bab(net, box, t, timeout_s=120, max_domains=10**6)
    assert "(complete)" in res.notes[0] and "neurons splits" in res.notes[0], res.notes
    lower, upper = _np(res.bounds)
    assert np.abs(_flat(lower) - _flat(lo)).max() <= TOL and np.abs(_flat(upper) - _flat(hi)).max() <= TOL, res.notes
    crown = compute_bounds("crown", net, box, t)
    assert float(crown.bounds.width.sum()) > float((hi - lo).sum()) + 1e-6


@pytest.mark.parametrize("k", range(len(CASES)), ids=IDS)
def test_bab_never_wider_than_crown_and_contains_true_gradients(k):
    """Under budgets that stop it early too: never wider than CROWN (to round-off), and
    autograd's float64 gradient at the centre, interior points and corners lies inside."""
    net, box, t = _case(k)
    crown = compute_bounds("crown", net, box, t)
    for budget in (1, 7, 40, 10**6):
        res = _bab(net, box, t, max_domains=budget, timeout_s=120)
        assert bool((res.bounds.lower >= crown.bounds.lower - 1e-12).all()
                    and (res.bounds.upper <= crown.bounds.upper + 1e-12).all())
        assert_contains_true_gradients(res.bounds, net, box, t, Output.LOGIT, n=300)


def _objective(net, box, t, prop: Property, v0: torch.Tensor) -> Objective:
    def worst(maps: Bounds, boxes: Bounds) -> torch.Tensor:
        return props.worst_case(prop, v0.reshape(1, -1).expand(maps.shape[0], -1),
                                Bounds(maps.lower.flatten(1), maps.upper.flatten(1)))

    def check(x: torch.Tensor):
        v = saliency(net, x.reshape(1, *net.input_shape), t, Output.LOGIT).reshape(1, -1)
        inside = bool(((x >= box.lower) & (x <= box.upper)).all())
        return x if inside and float(props.metric(prop, v0.reshape(1, -1), v)[0]) > prop.threshold else None

    return Objective(worst, lambda w: w <= prop.threshold, 1.0, check)


@pytest.mark.parametrize("k", [0, 3], ids=[IDS[0], IDS[3]])
def test_bab_verdicts_equal_the_exact_ranges(k):
    """max ‖v − v0‖_∞ ≤ δ: with δ just above the exact worst case bab certifies (CROWN alone
    cannot); just below it, bab finds a point of the box whose real gradient violates it."""
    net, box, t = _case(k)
    lo, hi, _ = exact_gradient_range(net, *_np(box), int(t))
    v0 = saliency(net, box.center, t, Output.LOGIT)
    c0 = _flat(v0[0].numpy())
    exact_worst = float(np.maximum(_flat(hi) - c0, c0 - _flat(lo)).max())
    crown = compute_bounds("crown", net, box, t).bounds
    prop1 = Property("linf", "untargeted", "linf", 1.0)
    crown_worst = float(props.worst_case(prop1, v0.reshape(1, -1),
                                         Bounds(crown.lower.flatten(1), crown.upper.flatten(1)))[0])
    opts = BabOptions(timeout_s=60, max_domains=10**6)
    above = Property("linf", "untargeted", "linf", exact_worst * (1 + 1e-6) + 1e-9)
    assert crown_worst > above.threshold
    r = search(net, box, t, Output.LOGIT, crown, _objective(net, box, t, above, v0), opts)
    assert r.status == "certified" and r.worst <= above.threshold, r.notes
    below = Property("linf", "untargeted", "linf", exact_worst * (1 - 1e-3))
    r = search(net, box, t, Output.LOGIT, crown, _objective(net, box, t, below, v0), opts)
    assert r.status == "falsified", r.notes
    v = saliency(net, r.witness.reshape(1, *net.input_shape), t, Output.LOGIT).reshape(1, -1)
    assert float(props.metric(below, v0.reshape(1, -1), v)[0]) > below.threshold


# ------------------------------------------------------------------ rounding: float32 leaves


@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("make", [lambda: maxpool_cnn(seed=2), lambda: prelu_cnn(seed=6)], ids=["maxpool", "prelu"])
def test_float32_bab_encloses_the_float64_gradient(make, eps):
    """float32 bab (γ_n·M allowances with MaxPool's fold and PReLU's slopes) encloses the
    float64 autograd gradient of the same float32 weights with zero tolerance."""
    net = make().to(dtype=torch.float32)
    x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(6), dtype=torch.float32)
    box, t = input_box(x, eps, (0.0, 1.0)), torch.tensor([1])
    res = _bab(net, box, t, timeout_s=4.0)
    assert res.rigorous and "neurons splits" in res.notes[0], res.notes
    lo, up = res.bounds.lower.double(), res.bounds.upper.double()
    assert_contains_true_gradients(Bounds(lo, up), net.to(dtype=F64), box.to(F64), t, Output.LOGIT, n=200, tol=0.0)


# ------------------------------------------------------------------ empty window domains


def _pair_net() -> Network:
    """x (one coordinate) → (x, x/2 + 3/2) → maxpool over the two → 2·(·): on x ∈ [0, 2] tap 1
    is the argmax everywhere (x/2 + 3/2 − x ≥ 1/2), yet the taps' boxes [0, 2] and [1.5, 2.5]
    overlap; the gradient is 1 (tap 0 would give 2)."""
    return Network((Linear("fc0", torch.tensor([[1.0], [0.5]], dtype=F64), torch.tensor([0.0, 1.5], dtype=F64)),
                    Reshape("img", (1, 1, 2)), MaxPool("mp", (1, 2), (1, 2)), Reshape("flat", (1,)),
                    Linear("fc1", torch.tensor([[2.0]], dtype=F64), torch.zeros(1, dtype=F64))), (1,))


def _search(net, box, t, **kw) -> _Search:
    root = compute_bounds("crown", net, box, t).bounds
    obj = Objective(worst=lambda m, b: m.width.flatten(1).sum(1), holds=lambda w: w <= 0)
    return _Search(net, box, t, Output.LOGIT, root, obj, BabOptions(**kw), Mode.NEURONS, None)


def random_domains(net: Network, box: Bounds, t: torch.Tensor, n: int, with_root: bool = False
                   ) -> list[dict[int, torch.Tensor]]:
    """Random split patterns (children of children of random candidate splits), until n domains
    (the unsplit root first when ``with_root``)."""
    s = _search(net, box, t)
    gen = torch.Generator().manual_seed(6)
    doms: list[dict[int, torch.Tensor]] = [{}] if with_root else []
    frontier = [s.bound_neurons([{}])[0]]
    while frontier and len(doms) < n:
        dom = frontier.pop(0)
        cands = _neuron_candidates(net, dom, 6)
        if not cands:
            continue
        i, w, sides = cands[int(torch.randint(len(cands), (1,), generator=gen))]
        kids = [_child(net, dom.splits, i, w, side, "cpu") for side in sides]
        doms += kids
        frontier += [k for k in s.bound_neurons(kids) if k is not None]
    return doms



def assert_pass_encloses(net: Network, box: Bounds, t: torch.Tensor, doms: list[dict[int, torch.Tensor]], p) -> None:
    """Every sampled point of each domain of neuron pass ``p`` has its split nodes' inputs inside
    the domain's boxes and its autograd gradient inside the domain's map; a domain flagged
    empty has no sampled point; over 500 points are checked."""
    pts = box_points(box, 3000, 1000, seed=7)
    g = saliency(net, pts, t.expand(len(pts)))
    vals = net.evaluate(pts)
    checked = 0
    for k, dm in enumerate(doms):
        inside = _membership(net, pts, dm)
        if bool(p.empty[k]):
            assert not bool(inside.any()), k
            continue
        if not bool(inside.any()):
            continue
        checked += int(inside.sum())
        gi = g[inside]
        scale = 1e-9 * (1 + gi.abs())
        assert bool(((gi >= p.grad[0][k] - scale) & (gi <= p.grad[1][k] + scale)).all()), k
        for i, (lo, up) in p.pre.items():
            z = (pts if net.wiring[i][0] == INPUT else vals[net.wiring[i][0]])[inside]
            assert bool(((z >= lo[k] - 1e-9) & (z <= up[k] + 1e-9)).all()), (k, i)
    assert checked > 500

def stacked(box: Bounds, d: int) -> Bounds:
    """The box repeated for d domains."""
    return Bounds(box.lower.expand(d, *box.lower.shape[1:]), box.upper.expand(d, *box.upper.shape[1:]))


def test_a_window_child_whose_tap_cannot_win_is_dropped():
    """By the boxes: x₀ ∈ [1, 2], x₁ ∈ [0, 1] — tap 1 can reach x₀'s floor (a tie at 1, which the
    FIRST tap wins), so both taps are candidates, but tap 1's child is empty (l₀ ≥ u₁) and is
    dropped, tap 0's kept and exact. By the LP: tap 0's child of _pair_net passes the interval
    pass (the boxes overlap) but has no point (x/2 + 3/2 ≤ x needs x ≥ 3) and is dropped: the
    complete run's range is tap 1's gradient alone, where CROWN (every candidate tap) is wider."""
    net = Network((MaxPool("mp", (1, 2), (1, 2)), Reshape("flat", (1,)),
                   Linear("fc", torch.tensor([[3.0]], dtype=F64), torch.zeros(1, dtype=F64))), (1, 1, 2))
    box = Bounds(torch.tensor([[[[1.0, 0.0]]]], dtype=F64), torch.tensor([[[[2.0, 1.0]]]], dtype=F64))
    t = torch.tensor([0])
    s = _search(net, box, t)
    root = s.bound_neurons([{}])[0]
    assert root is not None and not root.full
    (i, w, sides), = _neuron_candidates(net, root, 4)
    assert (i, w, sides) == (0, 0, [1, 2])
    kids = s.bound_neurons([_child(net, {}, i, w, side, "cpu") for side in sides])
    assert kids[0] is not None and kids[0].full and kids[1] is None
    res = _bab(net, box, t, timeout_s=10)
    assert "(complete)" in res.notes[0]
    for b in (res.bounds.lower, res.bounds.upper):  # tap 0's gradient alone (up to the rounding allowance)
        assert b.flatten().tolist() == pytest.approx([3.0, 0.0], abs=1e-12)

    net = _pair_net()
    box = Bounds(torch.zeros(1, 1, dtype=F64), torch.full((1, 1), 2.0, dtype=F64))
    s = _search(net, box, t)
    root = s.bound_neurons([{}])[0]
    assert root is not None and not root.full
    (i, w, sides), = _neuron_candidates(net, root, 4)
    assert (i, w, sides) == (2, 0, [1, 2])
    kids = s.bound_neurons([_child(net, {}, i, w, side, "cpu") for side in sides])
    assert all(k is not None for k in kids)  # the interval pass cannot tell
    res = _bab(net, box, t, timeout_s=10)
    assert "(complete)" in res.notes[0]
    assert float(res.bounds.lower) == pytest.approx(1.0, abs=1e-12) and float(res.bounds.upper) == pytest.approx(
        1.0, abs=1e-12)
    crown = compute_bounds("crown", net, box, t).bounds
    assert float(crown.upper) > 1.5


def test_ties_at_zero_radius_keep_the_first_tap():
    """ε = 0 on an image of equal pixels: every window of the conv output ties exactly at the
    point; the child of the first tap (torch's argmax) is never dropped, so the bounds contain
    autograd's gradient there, in float64 and float32 with zero tolerance. With the pool on the
    input itself the boxes are points: the first tap is certain and the leaf is exact."""
    for dtype in (F64, torch.float32):
        net = tiny_pool_net(1, 0).to(dtype=dtype)
        x = torch.full((1, *net.input_shape), 0.5, dtype=dtype)
        box, t = input_box(x, 0.0, None), torch.tensor([1])
        res = _bab(net, box, t, timeout_s=20, max_domains=10**5)
        v = saliency(net.to(dtype=F64), x.to(F64), t, Output.LOGIT)
        assert bool(((res.bounds.lower.double() <= v) & (v <= res.bounds.upper.double())).all()), res.notes
    net = tiny_pool_net(3, 2)
    x = torch.full((1, *net.input_shape), 0.25, dtype=F64)
    box, t = input_box(x, 0.0, None), torch.tensor([0])
    res = _bab(net, box, t, timeout_s=10)
    v = saliency(net, x, t, Output.LOGIT)
    assert "(complete)" in res.notes[0]
    assert float((res.bounds.upper - res.bounds.lower).max()) <= 1e-12
    assert float((res.bounds.lower - v).abs().max()) <= 1e-12


# ------------------------------------------------------------------ CROWN leaves


def _membership(net: Network, pts: torch.Tensor, splits: dict[int, torch.Tensor]) -> torch.Tensor:
    """Which points lie in the domain of ``splits`` (sign splits: z > 0 / z ≤ 0; window splits:
    the window's first argmax is the fixed tap), by evaluating the network at each point."""
    vals = net.evaluate(pts)
    inside = torch.ones(len(pts), dtype=torch.bool)
    for i, s in splits.items():
        node = net.layers[i]
        z = pts if net.wiring[i][0] == INPUT else vals[net.wiring[i][0]]
        if isinstance(node, MaxPool):
            tap = node.argmax_onehot(z).argmax(dim=2).reshape(len(pts), -1)
            fixed = s.reshape(-1) > 0
            inside &= (tap[:, fixed] == (s.reshape(-1)[fixed].long() - 1)).all(1)
        else:
            zf, sf = z.reshape(len(pts), -1), s.reshape(-1)
            inside &= ((zf > 0) | (sf <= 0)).all(1) & ((zf <= 0) | (sf >= 0)).all(1)
    return inside


@pytest.mark.parametrize("make, radius", [(lambda: maxpool_cnn(seed=3), 0.15), (lambda: prelu_mlp(5), 0.4)],
                         ids=["maxpool", "prelu"])
def test_crown_leaves_are_sound_on_maxpool_and_prelu_nets(make, radius):
    """CROWN leaves (each domain's sign-split input boxes handed to CROWN on the gradient graph;
    MaxPool inputs bounded by CROWN itself) lie inside the interval leaves and contain the
    autograd gradient of every sampled point of their domain: the children of the first
    window (MaxPool net; else of the top neuron), then a sign split of a later neuron."""
    from verigrad.bounds import domain_engine

    net = make()
    x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    box, t = input_box(x, radius, None), torch.tensor([1])
    root = compute_bounds("crown", net, box, t).bounds
    obj = Objective(worst=lambda m, b: m.width.flatten(1).sum(1), holds=lambda w: w <= 0)
    searches = {leaf: _Search(net, box, t, Output.LOGIT, root, obj, BabOptions(leaf=leaf), Mode.NEURONS, None,
                              domain_engine(net, Output.LOGIT, EngineOptions()))
                for leaf in (Leaf.INTERVAL, Leaf.CROWN)}
    first = searches[Leaf.INTERVAL].bound_neurons([{}])[0]
    cands = _neuron_candidates(net, first, 10**6)
    windows = [c for c in cands if isinstance(net.layers[c[0]], MaxPool)]
    i, w, sides = windows[0] if windows else cands[0]
    kids = [_child(net, {}, i, w, side, "cpu") for side in sides]
    # a sign split of a neuron after the first split node, on top of the first child
    later = [c for c in cands if c[0] > i and not isinstance(net.layers[c[0]], MaxPool)]
    if later:
        j, u, _ = later[0]
        kids += [_child(net, kids[0], j, u, side, "cpu") for side in (1, -1)]
    got = {leaf: s.bound_neurons(kids) for leaf, s in searches.items()}
    pts = box_points(box, 6000, 2000, seed=9)
    g = saliency(net, pts, t.expand(len(pts)))
    seen = 0
    for q, splits in enumerate(kids):
        a, c = got[Leaf.INTERVAL][q], got[Leaf.CROWN][q]
        inside = _membership(net, pts, splits)
        if a is None:
            assert c is None and not bool(inside.any())
            continue
        assert c is not None
        assert bool((c.lower >= a.lower).all() and (c.upper <= a.upper).all())
        gi = g[inside]
        seen += len(gi)
        assert bool(((gi >= c.lower) & (gi <= c.upper)).all()), float(torch.maximum(c.lower - gi, gi - c.upper).max())
    assert seen > 50


# ------------------------------------------------------------------ which networks, the shipped model


def test_neuron_split_reason_names_what_it_refuses():
    """MaxPool and PReLU nets get neuron splits; a smooth activation and a node kind without a
    split rule are refused, by name."""
    assert neuron_split_reason(tiny_pool_net(0, 1)) is None and neuron_split_reason(prelu_cnn()) is None
    assert neuron_split_reason(maxpool_cnn()) is None
    reason = neuron_split_reason(random_mlp(ActKind.TANH, sizes=(3, 4, 2)))
    assert reason is not None and "'act0'" in reason and "tanh" in reason
    assert neuron_split_reason(maxpool_cnn(ActKind.SIGMOID)) is not None
    mystery = SimpleNamespace(name="strange", op="mystery")  # no node class bab knows
    reason = neuron_split_reason(cast(Network, SimpleNamespace(layers=(*tiny_pool_net(0, 0).layers, mystery))))
    assert reason is not None and "'strange'" in reason and "mystery" in reason


@pytest.mark.slow
def test_shipped_maxpool_model_gets_neuron_splits():
    """examples/models/mnist_bn_maxpool.onnx (conv, relu, folded BatchNorm, MaxPool ×2, fc):
    neuron splits apply; a short search splits windows and neurons, stays inside CROWN and
    contains sampled autograd gradients."""
    from verigrad.data import load_dataset
    from verigrad.models import load_model
    from verigrad.spec import load_spec

    spec = load_spec(ROOT / "specs/mnist_bn_maxpool.yaml")
    net = load_model(spec.model.path).to(dtype=F64)
    assert any(isinstance(n, MaxPool) for n in net.layers)
    assert neuron_split_reason(net) is None
    x, y = load_dataset("mnist_sample", None, 0, 1)
    box, t = input_box(x.double(), 0.003, (0.0, 1.0)), y[:1]
    crown = compute_bounds("crown", net, box, t).bounds
    res = _bab(net, box, t, timeout_s=10, max_domains=40)
    assert "neurons splits" in res.notes[0], res.notes
    assert bool((res.bounds.lower >= crown.lower - 1e-12).all() and (res.bounds.upper <= crown.upper + 1e-12).all())
    assert_contains_true_gradients(res.bounds, net, box, t, Output.LOGIT, n=40)
