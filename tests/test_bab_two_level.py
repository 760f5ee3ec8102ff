"""Branch and bound's two-level back-substitution (z = A2·f(A1·x + c1) + c2 summed over the
sparse entries of convolutions, or a shared product plus a per-domain low-rank term for dense
layers): the same bounds as the generic pass on random split domains of conv nets and MLPs
(relu, leaky relu, PReLU), used where the structure holds and only there."""
from __future__ import annotations

import pytest

pytest.importorskip("scipy")

import torch  # noqa: E402

import verigrad.bounds.bab as bab  # noqa: E402
from tests.graph_nets import maxpool_cnn, prelu_cnn, prelu_mlp, residual_cnn  # noqa: E402
from tests.helpers import random_cnn, random_mlp  # noqa: E402
from tests.test_bab_pool import assert_pass_encloses, random_domains, stacked  # noqa: E402
from verigrad.bounds import Bounds  # noqa: E402
from verigrad.graph.gradient_graph import Output  # noqa: E402
from verigrad.models.network import ActKind  # noqa: E402
from verigrad.operators import MaxPool  # noqa: E402
from verigrad.perturbation import input_box  # noqa: E402

F64 = torch.float64
NETS = [
    ("cnn-relu", lambda: random_cnn(ActKind.RELU, seed=1), 0.3),
    ("cnn-leaky", lambda: random_cnn(ActKind.LEAKY_RELU, 0.1, seed=2), 0.3),
    ("cnn-prelu", lambda: prelu_cnn(3), 0.3),
    ("mlp-relu", lambda: random_mlp(ActKind.RELU, sizes=(12, 16, 14, 3), seed=4), 0.4),
    ("mlp-leaky", lambda: random_mlp(ActKind.LEAKY_RELU, 0.2, sizes=(12, 16, 14, 3), seed=5), 0.4),
    ("mlp-prelu", lambda: prelu_mlp(6, sizes=(5, 7, 6, 3)), 0.6),
]


@pytest.mark.parametrize("make, radius", [n[1:] for n in NETS], ids=[n[0] for n in NETS])
def test_two_level_back_substitution_equals_the_generic_pass(make, radius, monkeypatch):
    x = torch.rand(1, *make().input_shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    box, t = input_box(x, radius, None), torch.tensor([1])
    doms = random_domains(make(), box, t, 40, with_root=True)
    d = len(doms)
    used = []

    def counting(fast):
        def run(*a, **k):
            used.append(1)
            return fast(*a, **k)
        return run

    for name in ("_backsub_two_level", "_backsub_dense_two_level"):
        monkeypatch.setattr(bab, name, counting(getattr(bab, name)))
    fast_net = make()
    splits = bab._stack_splits(fast_net, doms, torch.device("cpu"))
    fast = bab._neuron_pass(fast_net, stacked(box, d), t.expand(d), Output.LOGIT, splits)
    assert used  # the structure holds for the second activation
    # one box per domain (not one expanded box): the same bounds
    sb = stacked(box, d)
    own = bab._neuron_pass(fast_net, Bounds(sb.lower.contiguous(), sb.upper.contiguous()), t.expand(d), Output.LOGIT,
                           splits)
    for i, (lo, up) in own.pre.items():
        assert torch.allclose(lo, fast.pre[i][0], rtol=1e-12, atol=1e-12)
        assert torch.allclose(up, fast.pre[i][1], rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(bab, "_two_level", lambda *a, **k: None)
    slow_net = make()  # a fresh memo
    slow = bab._neuron_pass(slow_net, stacked(box, d), t.expand(d), Output.LOGIT, splits)
    for i, (lo, up) in slow.pre.items():
        scale = 1e-11 * (1 + lo.abs().max() + up.abs().max())
        assert float((fast.pre[i][0] - lo).abs().max()) <= scale, i
        assert float((fast.pre[i][1] - up).abs().max()) <= scale, i
    assert float((fast.grad[0] - slow.grad[0]).abs().max()) <= 1e-10
    assert float((fast.grad[1] - slow.grad[1]).abs().max()) <= 1e-10
    assert d >= 20


def test_two_level_structure_is_found_only_where_it_holds():
    """A sign node fed by one affine chain from the input and feeding one (sparse) chain to the
    split node: the second conv's relu of a plain CNN; not the first relu (no sign node before
    it), not a node behind a residual sum or a MaxPool; a dense MLP's second layer in dense form."""
    cpu = torch.device("cpu")
    net = random_cnn(ActKind.RELU, seed=1)
    found = {i: bab._two_level(net, i, F64, cpu) is not None for i in bab._split_nodes(net)}
    assert found == {1: False, 3: True, 6: False}
    res = residual_cnn(seed=3)  # a1 after c1 ∘ a0 ∘ c0; a2 after the residual sum; a3 behind a2
    assert {i: bab._two_level(res, i, F64, cpu) is not None for i in bab._split_nodes(res)} == \
        {1: False, 3: True, 6: False, 9: False}
    pool = maxpool_cnn(seed=1)  # the second relu's chain starts at a MaxPool
    assert not any(bab._two_level(pool, i, F64, cpu) is not None for i in bab._split_nodes(pool))
    mlp = random_mlp(ActKind.RELU, sizes=(6, 10, 10, 3), seed=1)
    assert {i: type(bab._two_level(mlp, i, F64, cpu)).__name__ for i in bab._split_nodes(mlp)} == \
        {1: "NoneType", 3: "_DenseTwoLevel"}


def test_two_level_structure_is_refused_past_the_entry_cap(monkeypatch):
    """A2's nonzero entries are collected chunk by chunk and abandoned past BACKSUB_ELEMENTS
    (the generic pass then runs), so a large conv layer never builds a huge index."""
    cpu = torch.device("cpu")
    assert bab._two_level(random_cnn(ActKind.RELU, seed=1), 3, F64, cpu) is not None
    monkeypatch.setattr(bab, "BACKSUB_ELEMENTS", 100)
    assert bab._two_level(random_cnn(ActKind.RELU, seed=1), 3, F64, cpu) is None


ROOT_NETS = NETS + [
    ("residual-cnn", lambda: residual_cnn(seed=3), 0.2),
    ("maxpool-cnn", lambda: maxpool_cnn(seed=1), 0.4),
    ("mlp-3-hidden", lambda: random_mlp(ActKind.RELU, sizes=(6, 10, 10, 10, 3), seed=5), 0.3),
]


@pytest.mark.parametrize("make, radius", [n[1:] for n in ROOT_NETS], ids=[n[0] for n in ROOT_NETS])
def test_root_boxes_tighten_domains_soundly(make, radius, monkeypatch):
    _root_boxes_check(make, radius, monkeypatch, strict=False)


def test_root_boxes_leave_fewer_rows_to_back_substitute(monkeypatch):
    _root_boxes_check(lambda: random_mlp(ActKind.RELU, sizes=(12, 40, 30, 3), seed=4), 0.1, monkeypatch, strict=True)


def _root_boxes_check(make, radius, monkeypatch, strict: bool) -> None:
    """The root pass's split-node input boxes, intersected with each domain's before
    back-substitution: every sampled point of a domain keeps its pre-activations and its
    gradient inside the domain's bounds, a domain flagged empty has no sampled point, no bound
    is wider than without the root boxes, and fewer rows are back-substituted."""
    net = make()
    x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    box, t = input_box(x, radius / 2, None), torch.tensor([1])
    doms = random_domains(net, box, t, 40, with_root=True)
    d = len(doms)
    splits = bab._stack_splits(net, doms, torch.device("cpu"))
    root = bab._neuron_pass(net, box, t, Output.LOGIT, {})
    rows = []
    generic = bab._backsub

    def counting(net_, box_, i_act, pre, splits_, z):
        zl, zu = z[0].reshape(len(z[0]), -1), z[1].reshape(len(z[1]), -1)
        rows.append(int(((zl < 0) & (zu > 0)).any(0).sum()))
        return generic(net_, box_, i_act, pre, splits_, z)

    monkeypatch.setattr(bab, "_backsub", counting)
    plain = bab._neuron_pass(net, stacked(box, d), t.expand(d), Output.LOGIT, splits)
    n_plain, rows[:] = sum(rows), []
    tight = bab._neuron_pass(net, stacked(box, d), t.expand(d), Output.LOGIT, splits, root_pre=root.pre)
    assert sum(rows) <= n_plain
    if strict:
        assert sum(rows) < n_plain
    assert bool((plain.empty <= tight.empty).all())
    for i, (lo, up) in tight.pre.items():  # a node left stable is not back-substituted: its box may be wider
        node, (pl, pu) = net.layers[i], plain.pre[i]
        if isinstance(node, MaxPool):
            assert bool((bab._pool_free(node, lo, up, splits.get(i)) <= bab._pool_free(node, pl, pu, splits.get(i))).all())
        else:
            assert bool((bab._unstable(lo, up, splits.get(i)) <= bab._unstable(pl, pu, splits.get(i))).all()), i
    assert bool((tight.grad[0] >= plain.grad[0] - 1e-12).all() and (tight.grad[1] <= plain.grad[1] + 1e-12).all())
    assert_pass_encloses(net, box, t, doms, tight)
    assert d >= 20
