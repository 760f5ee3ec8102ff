import pytest
import torch

from verigrad.bounds.base import Bounds
from verigrad.bounds.ibp import Product, _bilinear_midrad, ibp_bounds, mul_interval, softmax_bounds
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.models.network import ActKind
from verigrad.perturbation import input_box, param_box
from tests.helpers import ACTS, ACT_IDS, assert_contains_true_gradients, random_cnn, random_mlp


def _net(kind, act, param, seed=0):
    return random_mlp(act, param, seed=seed) if kind == "mlp" else random_cnn(act, param, seed=seed)


def _x(net, seed=3):
    return torch.rand(1, *net.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("output", list(Output))
def test_ibp_exact_at_zero_epsilon(act, param, kind, output):
    net = _net(kind, act, param)
    x = torch.rand(4, *net.input_shape, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 1])
    b = ibp_bounds(net, input_box(x, 0.0, (0.0, 1.0)), target, output).bounds
    ref = saliency(net, x, target, output)
    torch.testing.assert_close(b.lower, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.upper, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("output", list(Output))
def test_ibp_contains_autograd_on_input_box(act, param, kind, output):
    net = _net(kind, act, param)
    x = _x(net)
    box = input_box(x, 0.1, (0.0, 1.0))
    target = torch.tensor([1])
    b = ibp_bounds(net, box, target, output).bounds
    assert bool((b.width > 0).any())
    assert assert_contains_true_gradients(b, net, box, target, output, n=500) == 1001


@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("product", list(Product))
@pytest.mark.parametrize("mode,gamma,eps", [("relative", 0.05, 0.0), ("absolute", 0.02, 0.05)])
def test_ibp_contains_autograd_on_param_box(act, param, kind, product, mode, gamma, eps):
    net = _net(kind, act, param)
    x = _x(net)
    box = input_box(x, eps, (0.0, 1.0))
    params = param_box(net, gamma, mode)
    target = torch.tensor([2])
    out = Output.LOSS if mode == "absolute" else Output.LOGIT
    res = ibp_bounds(net, box, target, out, params, product=product)
    assert product.value in res.notes[0]
    assert_contains_true_gradients(res.bounds, net, box, target, out, params=params, n=250)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_exact_product_never_wider_than_midpoint_radius(kind):
    net = _net(kind, ActKind.RELU, 0.0, seed=5)
    x = _x(net)
    box = input_box(x, 0.02, (0.0, 1.0))
    params = param_box(net, 0.05, "relative")
    t = torch.tensor([0])
    mr = ibp_bounds(net, box, t, Output.LOGIT, params, product="midpoint_radius").bounds
    ex = ibp_bounds(net, box, t, Output.LOGIT, params, product="exact").bounds
    assert bool((ex.lower >= mr.lower - 1e-12).all() and (ex.upper <= mr.upper + 1e-12).all())
    assert float(ex.width.mean()) < float(mr.width.mean())


def test_lemma1_is_loose_and_exact_rule_is_not():
    """[1,3]·[1,3]: Lemma 1 gives [-1, 9], the true range is [1, 9] (Lemma 1 is sound, not exact)."""
    a = (torch.tensor([[1.0]]), torch.tensor([[3.0]]))
    lo, up = _bilinear_midrad(lambda x, w: x @ w, a, a)
    assert (lo.item(), up.item()) == (-1.0, 9.0)
    assert tuple(t.item() for t in mul_interval(a, a)) == (1.0, 9.0)


def test_softmax_bounds_contain_samples_and_are_tight_at_corners():
    gen = torch.Generator().manual_seed(0)
    lo = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    up = lo + torch.rand(3, 5, generator=gen, dtype=torch.float64)
    pl, pu = softmax_bounds(lo, up)
    z = lo + torch.rand(2000, 3, 5, generator=gen, dtype=torch.float64) * (up - lo)
    p = torch.softmax(z, dim=2)
    assert bool(((p >= pl - 1e-12) & (p <= pu + 1e-12)).all())
    # the lower bound of p_0 is attained at z_0 = l_0, z_j = u_j
    corner = up.clone()
    corner[:, 0] = lo[:, 0]
    torch.testing.assert_close(torch.softmax(corner, 1)[:, 0], pl[:, 0])


def test_ibp_batch_matches_single_and_clipping_matters():
    net = random_cnn(ActKind.RELU)
    x = torch.rand(3, *net.input_shape, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    batch = ibp_bounds(net, input_box(x, 0.05, (0.0, 1.0)), t).bounds
    for i in range(3):
        one = ibp_bounds(net, input_box(x[i : i + 1], 0.05, (0.0, 1.0)), t[i : i + 1]).bounds
        torch.testing.assert_close(one.lower[0], batch.lower[i])
        torch.testing.assert_close(one.upper[0], batch.upper[i])
    unclipped = ibp_bounds(net, input_box(x, 0.05, None), t).bounds
    assert float(unclipped.width.sum()) >= float(batch.width.sum())


def test_containment_check_catches_a_wrong_bound():
    """The sampling helper must fail on bounds that miss part of the true range."""
    net = random_mlp(ActKind.TANH)
    x = _x(net)
    box = input_box(x, 0.1, (0.0, 1.0))
    t = torch.tensor([0])
    b = ibp_bounds(net, box, t).bounds
    v0 = saliency(net, x, t)
    shrunk = Bounds(torch.minimum(v0, b.lower + 0.45 * b.width), torch.maximum(v0, b.upper - 0.45 * b.width))
    with pytest.raises(AssertionError):
        assert_contains_true_gradients(shrunk, net, box, t, Output.LOGIT, n=500)


def test_containment_check_with_a_parameter_box_catches_bounds_of_the_input_box_only():
    """With a parameter box the helper must sample the parameters too: bounds computed for the
    input box alone (exact parameters) miss gradients of perturbed networks."""
    net = random_mlp(ActKind.TANH)
    x = _x(net)
    box = input_box(x, 0.01, (0.0, 1.0))
    t = torch.tensor([0])
    params = param_box(net, 0.3)
    only_input = ibp_bounds(net, box, t).bounds
    with pytest.raises(AssertionError):
        assert_contains_true_gradients(only_input, net, box, t, Output.LOGIT, params=params, n=200)
    both = ibp_bounds(net, box, t, Output.LOGIT, params).bounds
    assert_contains_true_gradients(both, net, box, t, Output.LOGIT, params=params, n=200)
