"""Every operator kind on graphs with branches, against autograd: the gradient graph equals
autograd; IBP / CROWN / alpha-CROWN are exact at ε = 0 and contain the true gradient at the
centre, 500 interior points and 500 corners of the box (input and parameter boxes)."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from tests.graph_nets import GRAPHS, maxpool_cnn, residual_mlp
from tests.helpers import assert_contains_true_gradients
from verigrad.bounds import EngineUnsupported, compute_bounds
from verigrad.bounds.base import Bounds
from verigrad.bounds.ibp import ibp_bounds
from verigrad.errors import OpUnsupported
from verigrad.graph.gradient_graph import GradientGraph, Output, saliency
from verigrad.models.network import Conv2d, MaxPool, ModelError, Network, Node, Reshape
from verigrad.operators.base import IbpContext
from verigrad.perturbation import input_box, param_box

OUTPUTS = list(Output)


def _target(net: Network, x: torch.Tensor) -> torch.Tensor:
    return net.forward(x).argmax(1)


@pytest.mark.parametrize("output", OUTPUTS, ids=[o.value for o in OUTPUTS])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_gradient_graph_equals_autograd(name, output):
    net = GRAPHS[name]()
    x = torch.randn(6, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for c in range(net.num_classes):
        t = torch.full((6,), c, dtype=torch.long)
        ref = saliency(net, x, t, output)
        got = GradientGraph(net, c, output)(x)
        assert torch.allclose(got, ref, atol=1e-10, rtol=0), f"class {c}: {float((got - ref).abs().max())}"


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("output", OUTPUTS, ids=[o.value for o in OUTPUTS])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_engines_exact_at_zero_radius(name, output, method):
    net = GRAPHS[name]()
    x = torch.randn(2, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = _target(net, x)
    res = compute_bounds(method, net, Bounds(x, x), t, output)
    assert res.actual_method is None, res.notes
    ref = saliency(net, x, t, output)
    assert torch.allclose(res.bounds.lower, ref, atol=1e-10, rtol=0)
    assert torch.allclose(res.bounds.upper, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("output", OUTPUTS, ids=[o.value for o in OUTPUTS])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_engines_contain_true_gradients(name, output, method):
    net = GRAPHS[name]()
    x = torch.randn(1, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = _target(net, x)
    box = input_box(x, 0.05, None)
    res = compute_bounds(method, net, box, t, output)
    assert res.actual_method is None, res.notes
    assert assert_contains_true_gradients(res.bounds, net, box, t, output, n=500) == 1001


@pytest.mark.parametrize("name", ["residual_mlp", "maxpool_cnn", "concat_cnn", "prelu_cnn"])
def test_alpha_crown_contains_and_is_no_wider(name):
    net = GRAPHS[name]()
    x = torch.randn(1, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = _target(net, x)
    box = input_box(x, 0.05, None)
    crown = compute_bounds("crown", net, box, t, Output.LOGIT)
    alpha = compute_bounds("alpha-crown", net, box, t, Output.LOGIT)
    assert alpha.actual_method is None, alpha.notes
    assert bool((alpha.bounds.width <= crown.bounds.width + 1e-12).all())
    assert_contains_true_gradients(alpha.bounds, net, box, t, Output.LOGIT, n=500)


def test_crown_is_tighter_than_ibp_on_graphs():
    for name in ("residual_mlp", "residual_cnn", "maxpool_cnn", "concat_cnn"):
        net = GRAPHS[name]()
        x = torch.randn(1, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        t = _target(net, x)
        box = input_box(x, 0.02, None)
        ibp = compute_bounds("ibp", net, box, t).bounds.width.mean()
        crown = compute_bounds("crown", net, box, t).bounds.width.mean()
        assert crown < ibp, name


# ---------------------------------------------------------------------------------------------
# parameter boxes on graphs

@pytest.mark.parametrize("method,product", [("ibp", "midpoint_radius"), ("ibp", "exact"), ("crown", None),
                                            ("alpha-crown", None)])
@pytest.mark.parametrize("output", [Output.LOGIT, Output.LOSS], ids=["logit", "loss"])
def test_parameter_boxes_on_a_residual_mlp(method, product, output):
    from verigrad.bounds import EngineOptions, Product

    net = residual_mlp()
    x = torch.randn(1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = _target(net, x)
    box = input_box(x, 0.02, None)
    params = param_box(net, 0.02, "relative", ["fc1", "fc3", "fc5"])
    opts = EngineOptions(product=Product(product)) if product else EngineOptions()
    res = compute_bounds(method, net, box, t, output, params, opts)
    assert res.actual_method is None, res.notes
    assert_contains_true_gradients(res.bounds, net, box, t, output, params=params, n=500)
    # exact at zero radius
    zero = param_box(net, 0.0, "relative", ["fc1", "fc3", "fc5"])
    res0 = compute_bounds(method, net, Bounds(x, x), t, output, zero, opts)
    ref = saliency(net, x, t, output)
    assert torch.allclose(res0.bounds.lower, ref, atol=1e-10) and torch.allclose(res0.bounds.upper, ref, atol=1e-10)


def test_parameter_box_on_a_residual_cnn_conv_falls_back_for_crown():
    net = GRAPHS["residual_cnn"]()
    x = torch.randn(1, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    t = _target(net, x)
    box = input_box(x, 0.01, None)
    params = param_box(net, 0.01, "relative", ["c1", "fc1"])
    res = compute_bounds("crown", net, box, t, Output.LOGIT, params)
    assert res.actual_method == "ibp" and "perturbed conv weights" in res.notes[0] and "'c1'" in res.notes[0]
    assert_contains_true_gradients(res.bounds, net, box, t, Output.LOGIT, params=params, n=200)


# ---------------------------------------------------------------------------------------------
# MaxPool: ties and the candidate argmax set

def _brute_force_maxpool_grad(node: MaxPool, lo: torch.Tensor, up: torch.Tensor, gl: torch.Tensor, gu: torch.Tensor):
    """Elementwise hull of Σ_w m_w·g_w over every combination of argmax choices consistent with
    the box (a window's argmax: any tap whose interval reaches the window's largest lower bound),
    with g at either end of its box: realisable values that any sound bound must contain."""
    from verigrad.operators.pooling import _windows

    wl, _ = _windows(lo, node, float("-inf"))
    wu, _ = _windows(up, node, float("-inf"))
    cand = wu >= wl.max(dim=2, keepdim=True).values  # (1, C, kk, L)
    c, kk, L = cand.shape[1:]
    shape = tuple(lo.shape[1:])
    out_lo = torch.full((1, *shape), float("inf"), dtype=lo.dtype)
    out_up = torch.full((1, *shape), float("-inf"), dtype=lo.dtype)
    # each window's choice is independent; a coordinate's range is attained by choosing, per
    # window, the tap and the g end independently: enumerate per coordinate contributions
    from verigrad.operators.pooling import _scatter_taps

    choices = [[p for p in range(kk) if cand[0, ch, p, l]] for ch in range(c) for l in range(L)]
    # candidates that are all points are tied everywhere in the box: torch routes to the first
    points = (wl == wu)[0]
    choices = [ps[:1] if all(points[idx // L, p, idx % L] for p in ps) else ps for idx, ps in enumerate(choices)]
    for combo in itertools.product(*choices):
        onehot = torch.zeros(1, c, kk, L, dtype=lo.dtype)
        for idx, p in enumerate(combo):
            onehot[0, idx // L, p, idx % L] = 1
        for gsel in (gl, gu):
            v = _scatter_taps(onehot * gsel.reshape(1, c, 1, L), node, shape)
            out_lo, out_up = torch.minimum(out_lo, v), torch.maximum(out_up, v)
    return out_lo, out_up


def test_maxpool_gradient_interval_covers_every_candidate():
    node = MaxPool("mp", (2, 2), (2, 2), (0, 0, 0, 0), False)
    # window 0: two taps tie exactly ([1, 1]); window 1: overlapping intervals; window 2: a clear winner;
    # window 3: all equal points
    lo = torch.tensor([[[[1.0, 1.0, 0.0, 0.5], [0.0, 0.0, 0.2, 0.0], [3.0, 0.0, 2.0, 2.0], [0.0, 1.0, 2.0, 2.0]]]],
                      dtype=torch.float64)
    up = lo.clone()
    up[0, 0, 0, 3], up[0, 0, 1, 2] = 0.9, 0.8
    gl = torch.tensor([[[[-1.0, 2.0], [0.5, -3.0]]]], dtype=torch.float64)
    gu = torch.tensor([[[[0.5, 2.0], [0.7, -1.0]]]], dtype=torch.float64)
    (lo_g, up_g), = node.ibp_vjp([(lo, up)], (gl, gu), [(1, 4, 4)], IbpContext())
    bl, bu = _brute_force_maxpool_grad(node, lo, up, gl, gu)
    assert bool((lo_g <= bl + 1e-12).all()) and bool((up_g >= bu - 1e-12).all())
    # window 0 ties two point taps (1 and 1): tied everywhere in the box, torch's first tap is certain
    assert (float(lo_g[0, 0, 0, 0]), float(up_g[0, 0, 0, 0])) == (-1.0, 0.5)
    assert (float(lo_g[0, 0, 0, 1]), float(up_g[0, 0, 0, 1])) == (0.0, 0.0)
    # window 1: [0.5, 0.9] and [0.2, 0.8] can each be the max: both uncertain, [min(0, gl), max(0, gu)]
    assert (float(lo_g[0, 0, 0, 3]), float(up_g[0, 0, 0, 3])) == (0.0, 2.0)
    assert (float(lo_g[0, 0, 1, 2]), float(up_g[0, 0, 1, 2])) == (0.0, 2.0)
    # the clear winner of window 2 (value 3 at (2, 0)) gets exactly g
    assert float(lo_g[0, 0, 2, 0]) == 0.5 and float(up_g[0, 0, 2, 0]) == 0.7
    # the point-equal window 3 routes to the first tap in autograd: covered
    x = lo.clone().requires_grad_(True)
    y = node.forward([x])
    (gx,) = torch.autograd.grad((y * gl).sum(), x)
    assert bool(((gx >= lo_g - 1e-12) & (gx <= up_g + 1e-12)).all())


def test_maxpool_with_ties_inside_the_box():
    """ReLU before MaxPool makes whole windows 0 (exact ties) over the box; a constant image region
    ties too: every engine must still contain autograd's gradient (first-tap routing)."""
    net = maxpool_cnn(ceil_mode=True)
    x = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    x[0, 0, :4, :4] = 0.7  # a constant patch: equal conv outputs in its interior
    x[0, 0, 5:, 5:] = torch.rand(4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    t = _target(net, x)
    box = input_box(x, 0.01, None)
    for method in ("ibp", "crown"):
        res = compute_bounds(method, net, box, t)
        assert_contains_true_gradients(res.bounds, net, box, t, Output.LOGIT, n=500)
        ref = saliency(net, x, t)
        zero = compute_bounds(method, net, Bounds(x, x), t).bounds
        # at a point with ties the gradient is autograd's choice; bounds cover every candidate
        assert bool(((ref >= zero.lower - 1e-12) & (ref <= zero.upper + 1e-12)).all())


def test_maxpool_matches_torch():
    for kernel, stride, pads, ceil in [((3, 3), (2, 2), (1, 1, 1, 1), True), ((2, 2), (2, 2), (0, 0, 0, 0), True),
                                       ((3, 3), (3, 3), (0, 0, 0, 0), False), ((2, 2), (1, 1), (1, 1, 1, 1), False)]:
        node = MaxPool("mp", kernel, stride, pads, ceil)
        x = torch.randn(2, 3, 8, 7, dtype=torch.float64, requires_grad=True)
        ref = torch.nn.functional.max_pool2d(x, kernel, stride, (pads[0], pads[1]), ceil_mode=ceil)
        got = node.forward([x])
        assert got.shape == ref.shape and torch.equal(got, ref)
        assert node.out_shape([(3, 8, 7)]) == tuple(ref.shape[1:])
        g = torch.randn_like(ref)
        (gr,) = torch.autograd.grad(ref, x, g)
        (gv,) = node.vjp([x.detach()], g, [(3, 8, 7)])
        assert torch.allclose(gr, gv, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# refusals: unknown kinds are named, never guessed

@dataclasses.dataclass(frozen=True, eq=False)
class _Mystery(Node):
    op = "mystery"

    def forward(self, xs, t=None):
        return xs[0] * 2


def test_an_engine_without_a_rule_names_op_node_and_engine():
    net = Network((_Mystery("m"), Reshape("r", (4,))), (4,), "mystery_net")
    x = torch.randn(1, 4, dtype=torch.float64)
    with pytest.raises(OpUnsupported, match=r"engine 'ibp' cannot handle op 'mystery' at node 'm'"):
        ibp_bounds(net, Bounds(x, x), torch.zeros(1, dtype=torch.long))
    with pytest.raises(OpUnsupported, match=r"'gradient graph' cannot handle op 'mystery' at node 'm'"):
        GradientGraph(net, 0)(x)


def test_crown_falls_back_to_ibp_on_a_non_square_kernel():
    g = torch.Generator().manual_seed(9)
    conv = Conv2d("rect", torch.randn(2, 1, 3, 2, generator=g, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    from verigrad.models.network import Linear

    net = Network((conv, Reshape("f", (2 * 4 * 5,)), Linear("fc", torch.randn(3, 40, generator=g, dtype=torch.float64),
                                                               torch.zeros(3, dtype=torch.float64))), (1, 6, 6), "rect")
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, generator=g)
    res = compute_bounds("crown", net, input_box(x, 0.01, None), torch.zeros(1, dtype=torch.long))
    assert res.actual_method == "ibp"
    assert "non-square conv kernel" in res.notes[0] and "'rect'" in res.notes[0]


def test_chain_only_engines_refuse_graphs_by_node():
    from verigrad.bounds.hessian import require_smooth

    net = GRAPHS["residual_mlp_tanh"]()
    with pytest.raises(EngineUnsupported, match=r"node 'res'"):
        require_smooth(net)


def test_network_validates_wiring():
    g = GRAPHS["residual_mlp"]()
    nodes = list(g.layers)
    with pytest.raises(ModelError, match="reads 'nope'"):
        Network((nodes[0].renamed(inputs=("nope",)), *nodes[1:]), g.input_shape)
    with pytest.raises(ModelError, match="'dangling' .* does not feed the output"):
        Network((nodes[0], Reshape("dangling", (6,), inputs=("fc0",)), nodes[1].renamed(inputs=("fc0",)), *nodes[2:]),
                g.input_shape)
    with pytest.raises(ModelError, match="takes 2 input"):
        Network((*nodes[:5], nodes[5].renamed(inputs=("fc2",)), *nodes[6:]), g.input_shape)


def test_literature_bounds_on_a_graph_skip_the_chain_only_theorem():
    from verigrad import literature as lit

    net = GRAPHS["residual_mlp_tanh"]()
    x = torch.randn(1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    c = int(_target(net, x))
    out = lit.all_bounds(lit.saliency_explainer(net, c), x, 0.01, "linf", None, net=net, target=c)
    names = [b.name for b in out]
    assert names and not any(n.startswith("dom_thm1") for n in names)
    with pytest.raises(EngineUnsupported, match="node 'res'"):
        lit.weight_norm_hessian_bound(net)
