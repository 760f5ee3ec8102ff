"""The symbolic gradient pass of branch and bound (linear bounds in the relaxed σ′ of the last
sign node with free neurons): on its own, on random split domains of graph networks with
branches (residual Add, Sub, Concat, Pad, Transpose), PReLU slopes of every sign, leaky relu
and MaxPool, it contains the autograd gradient of every sampled point of a domain, is never
wider than the interval pass and is narrower somewhere; on a two-layer ReLU MLP it equals
CROWN's map of the gradient graph; with a softmax output its interval seed keeps it sound."""
from __future__ import annotations

import pytest

pytest.importorskip("scipy")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tests.graph_nets import concat_cnn, maxpool_cnn, prelu_cnn, prelu_mlp, residual_cnn, residual_mlp  # noqa: E402
from tests.helpers import box_points, random_cnn, random_mlp  # noqa: E402
from tests.test_bab_pool import _membership, random_domains, stacked  # noqa: E402
from verigrad.bounds import compute_bounds  # noqa: E402
from verigrad.bounds.bab import _neuron_pass, _stack_splits, _symbolic_grad  # noqa: E402
from verigrad.graph.gradient_graph import Output, saliency  # noqa: E402
from verigrad.models.network import ActKind  # noqa: E402
from verigrad.perturbation import input_box  # noqa: E402

F64 = torch.float64
NETS = [
    ("residual-mlp", lambda: residual_mlp(seed=1), 0.4),
    ("residual-mlp-leaky", lambda: residual_mlp(ActKind.LEAKY_RELU, 0.2, seed=2), 0.4),
    ("residual-cnn", lambda: residual_cnn(seed=3), 0.2),
    ("concat-cnn", lambda: concat_cnn(seed=4), 0.2),
    ("prelu-mlp", lambda: prelu_mlp(4), 0.5),
    ("prelu-neg-scalar", lambda: prelu_mlp(12, slopes=((-0.8, 1.3, 0.5, -0.1, 2.5, 0.0, 1.0), (-0.7,))), 0.6),
    ("maxpool-cnn", lambda: maxpool_cnn(seed=1), 0.4),  # both relus free: a pool below the basis
    ("mlp-3-hidden", lambda: random_mlp(ActKind.RELU, sizes=(6, 10, 10, 10, 3), seed=5), 0.3),
]


@pytest.mark.parametrize("make, radius", [n[1:] for n in NETS], ids=[n[0] for n in NETS])
def test_symbolic_pass_encloses_every_domain_and_never_loses_to_intervals(make, radius):
    net = make()
    x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    box, t = input_box(x, radius, None), torch.tensor([1])
    doms = random_domains(net, box, t, 40, with_root=True)
    splits = _stack_splits(net, doms, torch.device("cpu"))
    d = len(doms)
    p = _neuron_pass(net, stacked(box, d), t.expand(d), Output.LOGIT, splits, symbolic=False)
    onehot = F.one_hot(t.expand(d), net.num_classes).to(F64)
    sym = _symbolic_grad(net, (onehot, onehot), p.pre, splits)
    assert sym is not None
    lo, up = sym
    # never wider than the interval pass (up to round-off), narrower somewhere
    assert bool((lo >= p.grad[0] - 1e-12).all() and (up <= p.grad[1] + 1e-12).all())
    assert int((up - lo < p.grad[1] - p.grad[0] - 1e-9).sum()) > 0
    pts = box_points(box, 3000, 1000, seed=7)
    g = saliency(net, pts, t.expand(len(pts)))
    checked = 0
    for k, dm in enumerate(doms):
        inside = _membership(net, pts, dm)
        if bool(p.empty[k]) or not bool(inside.any()):
            continue
        gi = g[inside]
        checked += len(gi)
        tol = 1e-9 * (1 + gi.abs())
        assert bool(((gi >= lo[k] - tol) & (gi <= up[k] + tol)).all()), (k, float(torch.maximum(lo[k] - gi, gi - up[k]).max()))
    assert checked > 500 and d >= 20


def test_symbolic_pass_equals_crown_on_a_two_layer_relu_mlp():
    """With one hidden layer before the basis, the chords are CROWN's relaxation of σ′ ⊙ g
    (σ′ ∈ [0, 1] on unstable neurons) and the forms are exact: the maps agree to 1e-9, and both
    are much narrower than the interval pass."""
    net = random_mlp(ActKind.RELU, sizes=(8, 16, 16, 3), seed=9)
    x = torch.rand(1, 8, generator=torch.Generator().manual_seed(9), dtype=F64)
    box, t = input_box(x, 0.3, None), torch.tensor([2])
    p = _neuron_pass(net, box, t, Output.LOGIT, {}, symbolic=False)
    onehot = F.one_hot(t, 3).to(F64)
    sym = _symbolic_grad(net, (onehot, onehot), p.pre, {})
    assert sym is not None
    crown = compute_bounds("crown", net, box, t).bounds
    assert float((sym[0] - crown.lower).abs().max()) <= 1e-9 and float((sym[1] - crown.upper).abs().max()) <= 1e-9
    assert float((p.grad[1] - p.grad[0]).sum()) > 1.2 * float(crown.width.sum())


@pytest.mark.parametrize("output", [Output.PROBABILITY, Output.LOSS])
def test_symbolic_pass_with_an_interval_seed_is_sound(output):
    """A softmax output's seed ∂o/∂z is an interval: the basis products take its hull."""
    net = residual_mlp(seed=7)
    x = torch.rand(1, 5, generator=torch.Generator().manual_seed(7), dtype=F64)
    box, t = input_box(x, 0.3, None), torch.tensor([0])
    p = _neuron_pass(net, box, t, output, {})
    p0 = _neuron_pass(net, box, t, output, {}, symbolic=False)
    assert float((p.grad[1] - p.grad[0]).sum()) < float((p0.grad[1] - p0.grad[0]).sum())
    pts = box_points(box, 3000, 1000, seed=8)
    g = saliency(net, pts, t.expand(len(pts)), output)
    assert bool(((g >= p.grad[0] - 1e-12) & (g <= p.grad[1] + 1e-12)).all())


def test_symbolic_pass_is_skipped_where_one_domain_would_not_fit(monkeypatch):
    """Forms of (V + 1) × (widest node) elements per domain: above BACKSUB_ELEMENTS the pass
    returns None and the domain keeps the interval map (no silent huge allocation)."""
    import verigrad.bounds.bab as bab

    net = random_mlp(ActKind.RELU, sizes=(8, 16, 16, 3), seed=9)
    x = torch.rand(1, 8, generator=torch.Generator().manual_seed(9), dtype=F64)
    box, t = input_box(x, 0.3, None), torch.tensor([2])
    p = _neuron_pass(net, box, t, Output.LOGIT, {}, symbolic=False)
    onehot = F.one_hot(t, 3).to(F64)
    assert _symbolic_grad(net, (onehot, onehot), p.pre, {}) is not None
    monkeypatch.setattr(bab, "BACKSUB_ELEMENTS", 16)
    assert _symbolic_grad(net, (onehot, onehot), p.pre, {}) is None
    q = _neuron_pass(net, box, t, Output.LOGIT, {})
    assert torch.equal(q.grad[0], p.grad[0]) and torch.equal(q.grad[1], p.grad[1])


SPARSE_NETS = [
    ("cnn-relu", lambda: random_cnn(ActKind.RELU, seed=1), 0.3),
    ("cnn-leaky", lambda: random_cnn(ActKind.LEAKY_RELU, 0.1, seed=2), 0.3),
    ("cnn-prelu", lambda: prelu_cnn(3), 0.3),
    ("cnn-prelu-neg", lambda: prelu_cnn(5, per_channel=False), 0.3),
]


@pytest.mark.parametrize("make, radius", [n[1:] for n in SPARSE_NETS], ids=[n[0] for n in SPARSE_NETS])
def test_symbolic_pass_over_sparse_entries_equals_the_dense_forms(make, radius, monkeypatch):
    """With the basis at a conv net's second activation (the last dense layer's units fixed by
    the split domains), the pass over A2's entries gives the dense forms' bounds to 1e-10."""
    import verigrad.bounds.bab as bab

    net = make()
    x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    box, t = input_box(x, radius, None), torch.tensor([1])
    doms = random_domains(net, box, t, 40, with_root=True)
    d = len(doms)
    splits = _stack_splits(net, doms, torch.device("cpu"))
    p = _neuron_pass(net, stacked(box, d), t.expand(d), Output.LOGIT, splits, symbolic=False)
    last = max(i for i in p.pre if isinstance(net.layers[i], bab.SIGN_NODES))
    # fix the last activation as at the centre, so that the basis is the one below it
    z = net.evaluate(x)[net.wiring[last][0]]
    pre = dict(p.pre)
    sign = torch.where(z > 0, 1.0, -1.0).expand_as(pre[last][0])
    pre[last] = (torch.where(sign > 0, pre[last][0].abs() + 1, -pre[last][0].abs() - 1),) * 2
    assert bab._sym_basis(net, pre, splits)[0] < last
    calls = []
    fast_fn = bab._symbolic_two_level
    monkeypatch.setattr(bab, "_symbolic_two_level", lambda *a, **k: calls.append(1) or fast_fn(*a, **k))
    onehot = F.one_hot(t.expand(d), net.num_classes).to(F64)
    fast = _symbolic_grad(net, (onehot, onehot), pre, splits)
    assert calls and fast is not None
    monkeypatch.setattr(bab, "_two_level", lambda *a, **k: None)
    slow = _symbolic_grad(make(), (onehot, onehot), pre, splits)
    assert slow is not None
    for a, b in zip(fast, slow, strict=True):
        assert float((a - b).abs().max()) <= 1e-10 * (1 + float(b.abs().max()))
