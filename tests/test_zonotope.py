"""The gradient zonotopes of branch-and-bound domains (verigrad.bounds.zonotope): against
autograd at sampled points of each domain (every bound holds), and tighter than what they
are built to improve on (the cosine of the interval map). At ε = 0 no neuron is free and the
pass keeps no zonotope: the interval map is exact there."""
from __future__ import annotations

import pytest

pytest.importorskip("scipy")

import torch  # noqa: E402

from tests.graph_nets import prelu_mlp  # noqa: E402
from tests.helpers import _lin, box_points, random_mlp  # noqa: E402
from tests.test_bab_pool import _membership, random_domains, stacked  # noqa: E402
from verigrad.bounds import Bounds  # noqa: E402
from verigrad.bounds.bab import _neuron_pass, _stack_splits  # noqa: E402
from verigrad.graph.gradient_graph import Output, saliency  # noqa: E402
from verigrad.bounds import bab  # noqa: E402
from verigrad.bounds.zonotope import GradZonotope  # noqa: E402
from verigrad.models.network import ActKind, Activation, Conv2d, Network, Reshape  # noqa: E402
from verigrad.perturbation import input_box  # noqa: E402

F64 = torch.float64



def conv_net(tail: bool, seed: int = 0) -> Network:
    """conv(1→6, 2×2) → relu → conv(6→4, 2×2) → relu → flatten → fc(→3), on 1×5×5 inputs; with
    ``tail`` an fc(→6) → relu before the last fc. The first hidden layer (96 neurons) is wider
    than twice the input (25), so the Gram products go through J; without the tail the second
    relu is the last, and its sparse two-level pass (:func:`bab._symbolic_two_level`) builds
    the zonotopes from entries."""
    gen = torch.Generator().manual_seed(seed)

    def conv(name, ci, co):
        return Conv2d(name, torch.randn(co, ci, 2, 2, generator=gen, dtype=F64) * (2 / (4 * ci)) ** 0.5,
                      torch.randn(co, generator=gen, dtype=F64) * 0.1, (1, 1), (0, 0))

    layers = [conv("c1", 1, 6), Activation("r1", ActKind.RELU), conv("c2", 6, 4), Activation("r2", ActKind.RELU),
              Reshape("flat", (36,))]
    layers += ([_lin("f1", 36, 6, gen, F64), Activation("r3", ActKind.RELU), _lin("f2", 6, 3, gen, F64)] if tail
               else [_lin("f1", 36, 3, gen, F64)])
    return Network(tuple(layers), (1, 5, 5), "conv_net")


NETS = {
    "conv-two-level": lambda: conv_net(False, 1),
    "conv-fc": lambda: conv_net(True, 2),
    "relu": lambda: random_mlp(ActKind.RELU, sizes=(6, 12, 10, 4), seed=3),
    "leaky": lambda: random_mlp(ActKind.LEAKY_RELU, 0.1, sizes=(5, 10, 8, 3), seed=4),
    "prelu": lambda: prelu_mlp(2),
    "relu-1-hidden": lambda: random_mlp(ActKind.RELU, sizes=(4, 9, 3), seed=5),
}


def _pass(net, radius: float, n: int, seed: int = 1):
    x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    box, t = input_box(x, radius, None), torch.tensor([1])
    doms = random_domains(net, box, t, n, with_root=True)
    splits = _stack_splits(net, doms, torch.device("cpu"))
    d = len(doms)
    p = _neuron_pass(net, stacked(box, d), t.expand(d), Output.LOGIT, splits, zonotope=True)
    return x, box, t, doms, p


@pytest.mark.parametrize("name,generators", [*((n, bab.ZONOTOPE_GENERATORS) for n in sorted(NETS)),
                                             ("conv-two-level", 2), ("conv-fc", 2), ("relu", 2)])
def test_zonotope_bounds_hold_at_sampled_points_of_every_domain(name, generators, monkeypatch):
    """For directions a (the centre's gradient, random ones): a·g ≥ dot_lower(a), ‖g‖ ≤
    norm_upper and cos(a, g) ≥ cos_lower(a) for the autograd gradient g at every sampled point
    of every domain (the root and random split patterns); over 500 points checked. With 2
    generators kept, the rest are boxed (order reduction): still sound."""
    monkeypatch.setattr(bab, "ZONOTOPE_GENERATORS", generators)
    built = {"entries": 0}
    from_entries = GradZonotope.from_entries

    def counted(*args, **kw):
        built["entries"] += 1
        return from_entries(*args, **kw)

    monkeypatch.setattr(GradZonotope, "from_entries", staticmethod(counted))
    net = NETS[name]()
    x, box, t, doms, p = _pass(net, 0.4, 40)
    z = p.zono
    assert z is not None and z.centre.shape[0] == len(doms)
    assert z.gens.shape[1] <= generators
    # the conv nets take the factored Gram products; only the one without a tail the two-level pass
    assert z.lift.gram is None or not name.startswith("conv")
    assert (built["entries"] > 0) == (name == "conv-two-level")
    pts = box_points(box, 3000, 1000, seed=9)
    g = saliency(net, pts, t.expand(len(pts))).reshape(len(pts), -1)
    gen = torch.Generator().manual_seed(2)
    dirs = [saliency(net, x, t).reshape(-1)] + [torch.randn(g.shape[1], generator=gen, dtype=F64) for _ in range(3)]
    checked = 0
    for a in dirs:
        dot, cos, norm = z.dot_lower(a), z.cos_lower(a), z.norm_upper()
        for k, dm in enumerate(doms):
            inside = _membership(net, pts, dm)
            if bool(p.empty[k]) or not bool(inside.any()):
                continue
            gi = g[inside]
            checked += int(inside.sum())
            assert bool((gi @ a >= dot[k] - 1e-9).all()), (k, float((gi @ a).min()), float(dot[k]))
            assert bool((gi.norm(dim=1) <= norm[k] + 1e-9).all()), k
            c = (gi @ a) / (gi.norm(dim=1) * a.norm()).clamp(min=1e-300)
            assert bool((c >= cos[k] - 1e-9).all()), (k, float(c.min()), float(cos[k]))
    assert checked > 500


def test_zonotope_cosine_beats_the_interval_map_on_a_wide_layer():
    """Where the first hidden layer is wider than the input, keeping its neurons' σ′ as
    generators through the Gram matrix (a ball bound) is tighter at the root than the cosine of
    the interval map — the reason it exists; a zonotope that lost its generators' correlation
    (or its ball bound) would not be."""
    from verigrad import properties as props
    from verigrad.properties import Property

    net = random_mlp(ActKind.RELU, sizes=(10, 60, 40, 3), seed=8)
    x, box, t, _, p = _pass(net, 0.03, 1)
    z = p.zono
    assert z is not None
    a = saliency(net, x, t)
    prop = Property(name="cos", kind="untargeted", metric="cosine", threshold=0.9)
    maps = Bounds(p.grad[0][0:1], p.grad[1][0:1])
    interval = float(props.worst_case(prop, a, maps)[0])
    ball = float(z.cos_lower(a.reshape(-1))[0])
    assert ball > interval + 0.2, (ball, interval)  # measured 0.37 against 0.02


def _sparse_forms(d: int, n: int, v: int, per: int, seed: int):
    """Random sparse forms y ∈ [m(δ) − r(δ), m(δ) + r(δ)]: ``per`` entries for each of v
    variables, radius coefficients of both signs with r(δ) ≥ 0 on [0, 1]^v; and the same
    forms as dense slices (D, v + 1, n)."""
    gen = torch.Generator().manual_seed(seed)
    row = torch.arange(v).repeat_interleave(per)
    col = torch.stack([torch.randperm(n, generator=gen)[:per] for _ in range(v)]).reshape(-1)
    em = torch.randn(d, v * per, generator=gen, dtype=F64)
    er = 0.3 * torch.randn(d, v * per, generator=gen, dtype=F64)
    mid0 = torch.randn(d, n, generator=gen, dtype=F64)
    rad0 = torch.zeros(d, n, dtype=F64).index_add_(1, col, er.abs()) + 0.1 * torch.rand(d, n, generator=gen, dtype=F64)
    mid = torch.zeros(d, v + 1, n, dtype=F64)
    rad = torch.zeros(d, v + 1, n, dtype=F64)
    mid[:, 0], rad[:, 0] = mid0, rad0
    mid[:, 1 + row, col] += em
    rad[:, 1 + row, col] += er
    return (mid0, rad0, row, col, em, er), (mid, rad)


@pytest.mark.parametrize("generators", [2, 32])
@pytest.mark.parametrize("sparse", [False, True])
def test_zonotope_contains_every_point_of_its_forms(generators, sparse):
    """Lifted by J = I (so a·g is a·y and dot_lower is exact over the zonotope), every point
    y = m(δ) + s⊙r(δ) of the forms — δ at corners and inside, s ∈ {−1, 1}ⁿ — has a·y ≥
    dot_lower(a) for random directions a; with 2 generators the other 4 are boxed. Both
    constructors (dense slices, sparse entries) build the same centre and contain the same points."""
    from verigrad.bounds.zonotope import Lift

    d, n, v = 3, 10, 6
    entries, (mid, rad) = _sparse_forms(d, n, v, 3, seed=generators + sparse)
    lift = Lift.of(torch.eye(n, dtype=F64))
    z = (GradZonotope.from_entries(*entries, v, lift, generators) if sparse
         else GradZonotope.from_forms(mid, rad, lift, generators))
    dense = GradZonotope.from_forms(mid, rad, lift, generators)
    assert torch.allclose(z.centre, dense.centre, rtol=0, atol=1e-12)
    assert z.gens.shape[1] == min(generators, v)
    gen = torch.Generator().manual_seed(5)
    delta = torch.cat([torch.randint(0, 2, (400, v), generator=gen).to(F64), torch.rand(200, v, generator=gen, dtype=F64)])
    sgn = torch.randint(0, 2, (600, n), generator=gen).to(F64) * 2 - 1
    for k in range(d):
        m = mid[k, 0] + delta @ mid[k, 1:]
        r = rad[k, 0] + delta @ rad[k, 1:]
        assert bool((r >= 0).all())
        y = m + sgn * r
        for _ in range(20):
            a = torch.randn(n, generator=gen, dtype=F64)
            lower = float(z.dot_lower(a)[k])
            assert float((y @ a).min()) >= lower - 1e-12, (k, float((y @ a).min()), lower)
