"""What makes CROWN cheaper changes no bound. The traced auto_LiRPA graph is built once per
(network, class, output, batch size) and reused: a reused model gives exactly the bounds a fresh
one gives on every later box, with CROWN and alpha-CROWN interleaved, and an in-place change of a
weight rebuilds it. Backward products with a constant matrix no longer ask for bounds on their
perturbed operand: the bounds equal those of auto_LiRPA's own bookkeeping (to float64 round-off,
bit-identical on the MNIST models), with fewer passes."""
from __future__ import annotations

import pytest
import torch

from tests.graph_nets import GRAPHS
from tests.helpers import random_cnn, random_mlp
from verigrad.bounds import lirpa
from verigrad.bounds.lirpa import CrownOptions, crown_bounds
from verigrad.graph.gradient_graph import Output
from verigrad.models.network import ActKind, Network
from verigrad.perturbation import input_box

FAST_ALPHA = CrownOptions(alpha_iterations=5)


@pytest.fixture
def conversions(monkeypatch):
    """Counts the auto_LiRPA conversions (one per traced gradient graph)."""
    count = [0]
    original = lirpa._GradBoundedModule.__init__

    def counted(self, *a, **k):
        count[0] += 1
        original(self, *a, **k)

    monkeypatch.setattr(lirpa._GradBoundedModule, "__init__", counted)
    return count


def _fresh(net: Network) -> Network:
    return net.to()  # the same tensors, a new network: nothing memoised


@pytest.mark.parametrize("make", [lambda: random_mlp(ActKind.RELU, seed=3),
                                  lambda: random_cnn(ActKind.TANH, seed=4)], ids=["mlp-relu", "cnn-tanh"])
@pytest.mark.parametrize("output", [Output.LOGIT, Output.LOSS])
def test_a_reused_model_bounds_every_later_box_as_a_fresh_one(conversions, make, output):
    net = make()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, *net.input_shape, dtype=torch.float64, generator=g) for _ in range(3)]
    t = torch.tensor([1])
    runs = [(x, eps, alpha) for x in xs for eps, alpha in ((0.05, False), (0.2, True), (0.01, False))]
    for x, eps, alpha in runs:
        box = input_box(x, eps, None)
        opts = FAST_ALPHA if alpha else None
        reused = crown_bounds(net, box, t, output, alpha=alpha, options=opts).bounds
        fresh = crown_bounds(_fresh(net), box, t, output, alpha=alpha, options=opts).bounds
        assert torch.equal(reused.lower, fresh.lower) and torch.equal(reused.upper, fresh.upper)
    # one conversion for the reused network, one per fresh network
    assert conversions[0] == 1 + len(runs)


def test_one_model_per_class_and_batch_size_and_a_weight_change_rebuilds(conversions):
    net = random_mlp(ActKind.SIGMOID, seed=6)
    x = torch.randn(2, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    box = input_box(x, 0.1, None)
    for _ in range(2):
        crown_bounds(net, box[0:1], torch.tensor([0]))
        crown_bounds(net, box[0:1], torch.tensor([2]))
        crown_bounds(net, box, torch.tensor([2, 2]), options=CrownOptions(max_batch=2))  # batch size 2
    assert conversions[0] == 3
    before = crown_bounds(net, box[0:1], torch.tensor([0])).bounds
    with torch.no_grad():
        net.layers[0].weight.mul_(1.5)  # an in-place edit: the memoised graph holds a stale copy
    after = crown_bounds(net, box[0:1], torch.tensor([0])).bounds
    assert conversions[0] == 4
    fresh = crown_bounds(_fresh(net), box[0:1], torch.tensor([0])).bounds
    assert torch.equal(after.lower, fresh.lower) and not torch.equal(after.lower, before.lower)


@pytest.mark.parametrize("make", [lambda: random_mlp(ActKind.RELU, sizes=(6, 16, 16, 16, 4), seed=8),
                                  lambda: random_cnn(ActKind.LEAKY_RELU, 0.1, seed=9),
                                  lambda: random_mlp(ActKind.SOFTPLUS, 2.0, seed=10),
                                  *GRAPHS.values()],
                         ids=["mlp-relu", "cnn-leaky", "mlp-softplus", *GRAPHS])
@pytest.mark.parametrize("output", list(Output))
def test_skipping_bounds_on_the_perturbed_operand_of_constant_products_changes_no_bound(monkeypatch, make, output):
    net = make()
    x = torch.randn(1, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    box, t = input_box(x, 0.1, None), torch.tensor([1])
    passes = {}
    original = lirpa.BoundedModule.backward_general

    def counted(self, *a, **k):
        passes[mode] = passes.get(mode, 0) + 1
        return original(self, *a, **k)

    monkeypatch.setattr(lirpa.BoundedModule, "backward_general", counted)
    got = {}
    for mode in ("ours", "auto_LiRPA's"):
        if mode != "ours":
            monkeypatch.setattr(lirpa._GradBoundedModule, "check_prior_bounds", lirpa.BoundedModule.check_prior_bounds)
        got[mode] = [crown_bounds(_fresh(net), box, t, output, alpha=alpha, options=FAST_ALPHA).bounds
                     for alpha in (False, True)]
    for a, b in zip(got["ours"], got["auto_LiRPA's"], strict=True):
        # the same bounds up to round-off and its allowance γ_n·M (measured ≤ 1.2e-16 apart before
        # the bounds were widened for rounding; M reads an operand's bounds where it has them and
        # its magnitude where not, so the allowances differ: ≤ 2.4e-12 on the softplus CNN)
        torch.testing.assert_close(a.lower, b.lower, rtol=0, atol=1e-10)
        torch.testing.assert_close(a.upper, b.upper, rtol=0, atol=1e-10)
    if output == Output.LOGIT and net.source.startswith("maxpool"):
        assert passes["ours"] <= passes["auto_LiRPA's"]  # measured: these graphs request no such bounds
    else:
        assert passes["ours"] < passes["auto_LiRPA's"]
