"""The one nn.Module → Network converter (verigrad.models.torch_loader.module_network) in both
modes: ``live=False`` (from_module: detached float64 copies) and ``live=True`` (training's
network_from_module: the module's own parameters). Every walked layer must reproduce the
module's logits and, through saliency and the gradient graph, its input gradients."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from verigrad.graph.gradient_graph import GradientGraph, Output, saliency
from verigrad.models import from_module
from verigrad.models.network import Conv2d, MaxPool, ModelError, PReLU
from verigrad.models.torch_loader import LayerRefused, module_network
from verigrad.training import network_from_module

torch.set_num_threads(1)
DT = torch.float64


def _prelu(n: int, seed: int) -> nn.PReLU:
    """A PReLU with distinct, non-trivial slopes (some > 1, some negative)."""
    m = nn.PReLU(n)
    with torch.no_grad():
        m.weight.copy_(torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.8)
    return m


def _cnn_pool(ceil_mode: bool) -> nn.Sequential:
    """conv(p1) → PReLU per channel → maxpool(3, s2, p1, ceil?) → conv → PReLU scalar →
    maxpool(2, s1) → adaptive avg (1) → flatten → Linear. 10x10 input: the first pool gives
    6x6 with ceil_mode, 5x5 without."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), _prelu(3, 1),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode),
        nn.Conv2d(3, 4, 3), _prelu(1, 2),
        nn.MaxPool2d(2, stride=1, ceil_mode=ceil_mode),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def _model(kind: str) -> tuple[nn.Sequential, tuple[int, ...]]:
    torch.manual_seed(0)
    if kind == "mlp_act_last":  # scalar PReLU, and an activation after the last Linear
        m, shape = nn.Sequential(nn.Linear(5, 7), _prelu(1, 3), nn.Linear(7, 4), nn.Tanh()), (5,)
    elif kind == "mlp_prelu_channels":  # per-feature PReLU on a flat input, Identity skipped
        m, shape = nn.Sequential(nn.Linear(5, 6), _prelu(6, 4), nn.Identity(), nn.Linear(6, 3), nn.Sigmoid()), (5,)
    elif kind == "cnn_pool_floor":
        m, shape = _cnn_pool(False), (2, 10, 10)
    elif kind == "cnn_pool_ceil":
        m, shape = _cnn_pool(True), (2, 10, 10)
    elif kind == "cnn_adaptive_tuple":  # AdaptiveAvgPool2d((1, 1)) and a per-channel PReLU after Linear
        m, shape = nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(3, 3, 3, padding="same"), nn.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1)),
            nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(3, 4), _prelu(4, 5),
        ), (1, 7, 8)
    else:
        raise KeyError(kind)
    return m.to(DT), shape


KINDS = ["mlp_act_last", "mlp_prelu_channels", "cnn_pool_floor", "cnn_pool_ceil", "cnn_adaptive_tuple"]


def _convert(model: nn.Module, shape: tuple[int, ...], live: bool):
    return network_from_module(model, shape) if live else from_module(model, shape)


def _input_grad(f, x: torch.Tensor, c: int) -> torch.Tensor:
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr)[:, c].sum(), xr)
    return g


def _check(net, ref: nn.Module, x: torch.Tensor, probability_of: nn.Module | None = None) -> None:
    """Logits (1e-12), saliency and the gradient graph (1e-10) against autograd on ``ref``;
    optionally the probability saliency against ``probability_of`` (a module ending in Softmax)."""
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x), ref(x), rtol=0, atol=1e-12)
    for c in range(net.num_classes):
        g = _input_grad(ref, x, c)
        target = torch.full((x.shape[0],), c)
        torch.testing.assert_close(saliency(net, x, target), g, rtol=0, atol=1e-10)
        torch.testing.assert_close(GradientGraph(net, c)(x), g, rtol=0, atol=1e-10)
        if probability_of is not None:
            gp = _input_grad(probability_of, x, c)
            torch.testing.assert_close(saliency(net, x, target, Output.PROBABILITY), gp, rtol=0, atol=1e-10)
            torch.testing.assert_close(GradientGraph(net, c, Output.PROBABILITY)(x), gp, rtol=0, atol=1e-10)


def _x(shape: tuple[int, ...], n: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


# -- equivalence, both modes ----------------------------------------------------------------


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_module(kind: str, live: bool) -> None:
    model, shape = _model(kind)
    model.eval()
    net = _convert(model, shape, live)
    assert net.dtype == DT
    _check(net, model, _x(shape))
    names = [l.name for l in net.layers]
    assert all(n.split("/")[0] in dict(model.named_children()) for n in names)  # module paths


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_maxpool_and_prelu_nodes(ceil_mode: bool) -> None:
    model, shape = _model("cnn_pool_ceil" if ceil_mode else "cnn_pool_floor")
    net = from_module(model, shape)
    pools = [l for l in net.layers if isinstance(l, MaxPool)]
    assert [(p.kernel, p.stride, p.pads, p.ceil_mode) for p in pools] == [
        ((3, 3), (2, 2), (1, 1, 1, 1), ceil_mode), ((2, 2), (1, 1), (0, 0, 0, 0), ceil_mode)]
    assert net.shape_of["2"] == ((3, 6, 6) if ceil_mode else (3, 5, 5))
    slopes = [tuple(l.slope.shape) for l in net.layers if isinstance(l, PReLU)]
    assert slopes == [(3, 1, 1), (1,)]
    avg = net.layer("6/avgpool")
    assert isinstance(avg, Conv2d) and not avg.perturbable and tuple(avg.weight.shape[2:]) == net.shape_of["5"][1:]
    # rectangular kernel, stride and padding per axis
    p = [l for l in from_module(*_model("cnn_adaptive_tuple")).layers if isinstance(l, MaxPool)][0]
    assert (p.kernel, p.stride, p.pads) == ((2, 3), (1, 2), (1, 1, 1, 1))


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("dim", [1, -1])
def test_final_softmax_stripped(dim: int, live: bool) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.Softmax(dim=dim), nn.Dropout(0.0)).to(DT)
    model.eval()
    net = _convert(model, (4,), live)
    assert len(net.layers) == 3
    assert any(n.startswith("final Softmax '3' stripped: the logits are its input") for n in net.notes)
    _check(net, model[:3], _x((4,)), probability_of=model)


def test_dropout_skipped_for_verification() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2)).to(DT).eval()
    net = from_module(model, (4,))
    assert [l.name for l in net.layers] == ["0", "2", "3"]
    _check(net, model, _x((4,)))


# -- live mode: gradients flow into the module and the view follows its updates -------------


@pytest.mark.parametrize("kind", ["mlp_act_last", "mlp_prelu_channels", "cnn_pool_ceil"])
def test_live_view_trains(kind: str) -> None:
    model, shape = _model(kind)
    net = network_from_module(model, shape)
    lin = [l for l in net.affine_layers() if l.perturbable]  # (not the fixed average-pool conv)
    mods = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert all(l.weight is m.weight and l.bias is m.bias for l, m in zip(lin, mods, strict=True))
    for l, m in zip([l for l in net.layers if isinstance(l, PReLU)], [m for m in model if isinstance(m, nn.PReLU)],
                    strict=True):
        assert l.slope.data_ptr() == m.weight.data_ptr()  # the parameter itself or a view of it
    x, y = _x(shape, 4), torch.tensor([0, 1, 2, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):  # two steps: the view keeps working after in-place parameter updates
        opt.zero_grad()
        xr = x.clone().requires_grad_(True)
        loss = saliency(net, xr, y, create_graph=True).pow(2).sum() + net.forward(x).pow(2).sum()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
        _check(net, model, x)


# -- refusals, named ----------------------------------------------------------------------


def test_refusals() -> None:
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\).*BatchNorm"):
        network_from_module(bn, (4,))
    with pytest.raises(LayerRefused, match=r"'1' \(BatchNorm1d\)") as e:
        module_network(bn, (4,), live=True)
    assert (e.value.path, e.value.kind) == ("1", "BatchNorm1d")
    from_module(bn.eval(), (4,))  # fine when copying: folded into layer '0'
    soft = nn.Sequential(nn.Linear(4, 5), nn.Softmax(dim=1), nn.Linear(5, 2))
    for live in (False, True):
        with pytest.raises(ModelError, match=r"'1' \(Softmax\).*only as the last layer"):
            module_network(soft, (4,), live=live)
    chan = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softmax(dim=1))
    with pytest.raises(ModelError, match=r"'1' \(Softmax\).*over the classes"):
        from_module(chan, (1, 5, 5))
    pool = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, dilation=2), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ModelError, match=r"'1' \(MaxPool2d\): dilation"):
        from_module(pool, (1, 7, 7))
    with pytest.raises(ValueError, match=r"layer 1 \(MaxPool2d\).*dilation"):
        network_from_module(pool, (1, 7, 7))
    with pytest.raises(ModelError, match=r"'1' \(MaxPool2d\): return_indices"):
        from_module(nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, return_indices=True)), (1, 6, 6))
    with pytest.raises(ModelError, match=r"'1' \(AdaptiveAvgPool2d\).*does not divide"):
        from_module(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(2)), (1, 5, 5))
    with pytest.raises(ValueError, match=r"layer 1 \(Dropout\)"):
        network_from_module(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 2)), (4,))
    with pytest.raises(ValueError, match="nn.Sequential"):
        network_from_module(nn.Linear(4, 2), (4,))  # type: ignore[arg-type]


# -- from_module: float64 copies, BatchNorm folded in float64 --------------------------------


def test_float32_batchnorm_module_gives_exact_float64_network() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), _prelu(3, 6), nn.MaxPool2d(2, ceil_mode=True),
        nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4), nn.BatchNorm1d(4),
        nn.Tanh(), nn.Linear(4, 2),
    )
    g = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
    model.eval()
    assert model[0].weight.dtype == torch.float32
    net = from_module(model, (2, 7, 7))
    assert net.dtype == DT
    for l in net.layers:
        for k in l.tensor_fields:
            assert getattr(l, k).dtype == DT and not getattr(l, k).requires_grad
    assert [l.name for l in net.layers] == ["0", "2", "3", "4/batchnorm", "5/avgpool", "6", "7", "9", "10"]
    assert model[0].weight.dtype == torch.float32  # the module is untouched
    x = _x((2, 7, 7), 5)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        want = ref(x)
    got = net.forward(x)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-12
    for c in range(2):
        torch.testing.assert_close(saliency(net, x, torch.full((5,), c)), _input_grad(ref, x, c), rtol=0, atol=1e-10)
    # the caller casts
    assert net.to(torch.float32).dtype == torch.float32
