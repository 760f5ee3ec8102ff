import pytest
import torch

from verigrad.graph.gradient_graph import GradientGraph, Output, saliency
from tests.helpers import ACTS, ACT_IDS, random_cnn, random_mlp


@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("output", list(Output))
def test_gradient_graph_equals_autograd(act, param, kind, output):
    net = random_mlp(act, param) if kind == "mlp" else random_cnn(act, param)
    x = torch.randn(5, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for c in range(net.num_classes):
        target = torch.full((5,), c)
        ref = saliency(net, x, target, output)
        got = GradientGraph(net, c, output)(x)
        assert got.shape == x.shape
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_gradient_graph_detects_wrong_derivative():
    """The check above must fail for the reference code's bug (first activation skipped)."""
    from verigrad.models.network import ActKind

    net = random_mlp(ActKind.RELU)
    x = torch.randn(20, *net.input_shape, dtype=torch.float64)
    gg = GradientGraph(net, 0)
    ref = saliency(net, x, torch.zeros(20, dtype=torch.long))
    # drop relu'(z) of the first hidden layer: a different function
    from verigrad.operators.activation import Activation

    orig = Activation.vjp
    try:
        Activation.vjp = lambda self, xs, g, *a, **k: (g,) if self.name == "act0" else orig(self, xs, g, *a, **k)
        bad = gg(x)
    finally:
        Activation.vjp = orig
    assert not torch.allclose(bad, ref)
