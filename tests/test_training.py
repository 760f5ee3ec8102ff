"""Tests for verigrad.training: the live network view, the regularisers and GradCert training."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from verigrad import properties as P
from verigrad.bounds import compute_bounds
from verigrad.graph.gradient_graph import saliency
from verigrad.perturbation import input_box, param_box
from verigrad.training import (
    REGULARIZERS,
    Regularizer,
    RegularizerConfig,
    gradcert_penalty,
    network_from_module,
    ramp,
    training_loss,
)

torch.set_num_threads(1)
DT = torch.float64


def moons(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles with Gaussian noise (sklearn's make_moons, in torch)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=DT) * math.pi
    y = torch.randint(0, 2, (n,), generator=g)
    upper = torch.stack([torch.cos(t), torch.sin(t)], 1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], 1)
    x = torch.where(y[:, None] == 1, lower, upper)
    return x + 0.1 * torch.randn(n, 2, generator=g, dtype=DT), y


def mlp(act: type[nn.Module] = nn.Softplus, sizes=(2, 16, 16, 2), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            mods.append(act())
    return nn.Sequential(*mods).to(DT)


def tiny_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
        nn.Conv2d(3, 4, (3, 2), stride=(1, 2), padding=(1, 0)), nn.Softplus(beta=2.0),
        nn.Flatten(), nn.Linear(4 * 5 * 2, 6), nn.Tanh(), nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3),
    ).to(DT)


# ----------------------------------------------------------------------------------------
# network_from_module


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_view_forward_saliency_and_grad_flow(kind: str) -> None:
    if kind == "mlp":
        model, shape = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT), (4,)
    else:
        model, shape = tiny_cnn(), (2, 9, 9)
    net = network_from_module(model, shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, *shape, generator=g, dtype=DT)
    y = torch.tensor([0, 1, 2, 1, 0])
    # no copy: the view holds the module's parameter objects
    assert net.layers[0].weight is model[0].weight
    torch.testing.assert_close(net.forward(x), model(x), rtol=0, atol=1e-12)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model(xr).gather(1, y[:, None]).sum(), xr)
    torch.testing.assert_close(saliency(net, x, y), ref, rtol=0, atol=1e-12)
    # gradients through the view reach every module parameter
    s = saliency(net, x.clone().requires_grad_(True), y, create_graph=True).pow(2).sum() + net.forward(x).sum()
    s.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # the view is live: an in-place update of the module shows up
    with torch.no_grad():
        model[0].bias.add_(0.5)
    torch.testing.assert_close(net.forward(x), model(x), rtol=0, atol=1e-12)


def test_view_rejects_unsupported_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"layer 2 \(Dropout\)"):
        network_from_module(model, (4,))
    # (padding="same" with an odd kernel is converted since the converters were unified)
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d\)"):
        network_from_module(nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2), nn.Flatten(), nn.Linear(1, 2)), (1, 5, 5))
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\)"):
        network_from_module(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), (4,))


# ----------------------------------------------------------------------------------------
# GradCert penalty vs the verification path


@pytest.mark.parametrize("gamma", [0.0, 0.05])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Softplus])
def test_gradcert_matches_verification_bounds(gamma: float, act: type[nn.Module]) -> None:
    model = mlp(act, (4, 16, 3))
    net = network_from_module(model, (4,))
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    eps, dom = 0.1, (-1.5, 1.5)
    res = compute_bounds("ibp", net, input_box(x, eps, dom), y,
                         params=param_box(net, gamma) if gamma > 0 else None)
    width = (res.bounds.upper - res.bounds.lower).reshape(7, -1)
    got = gradcert_penalty(net, x, y, eps, gamma, dom)
    assert abs(got.item() - width.norm(dim=1).mean().item()) <= 1e-12
    got_mean = gradcert_penalty(net, x, y, eps, gamma, dom, norm="mean")
    assert abs(got_mean.item() - width.mean().item()) <= 1e-12
    # and through the registry with full ramp
    cfg = RegularizerConfig("gradcert", epsilon=eps, gamma=gamma, domain=dom, ramp_fraction=0.5)
    pen, info = REGULARIZERS[Regularizer.GRADCERT](model, net, x, y, cfg, 0.7)
    assert abs(pen.item() - width.norm(dim=1).mean().item()) <= 1e-12 and info["epsilon"] == eps


def test_ramp() -> None:
    assert ramp(0.3, 0.0, 0.4) == 0.0
    assert ramp(0.3, 0.2, 0.4) == pytest.approx(0.15)
    assert ramp(0.3, 0.4, 0.4) == 0.3 and ramp(0.3, 1.0, 0.4) == 0.3
    assert ramp(0.3, 0.0, 0.0) == 0.3
    with pytest.raises(ValueError):
        ramp(0.3, 1.5, 0.4)
    model = mlp()
    net = network_from_module(model, (2,))
    x, y = moons(8, 0)
    cfg = RegularizerConfig("gradcert", epsilon=0.2, gamma=0.1, ramp_fraction=0.5)
    _, info0 = training_loss(model, net, x, y, cfg, 0.0)
    _, info1 = training_loss(model, net, x, y, cfg, 0.6)
    assert info0["epsilon"] == 0.0 and info0["gamma"] == 0.0 and info0["penalty"] == 0.0
    assert info1["epsilon"] == 0.2 and info1["gamma"] == 0.1


def test_config_validation() -> None:
    for bad in [dict(name="nope"), dict(weight=-1.0), dict(epsilon=float("nan")), dict(ramp_fraction=1.5),
                dict(pgd_steps=0), dict(samples=0), dict(size_norm="l3"), dict(domain=(1.0, 0.0)),
                dict(name="pgd_at", epsilon=0.0)]:
        with pytest.raises(ValueError):
            RegularizerConfig(**bad)
    assert RegularizerConfig("gradcert").name is Regularizer.GRADCERT
    assert set(REGULARIZERS) == set(Regularizer)


def test_hessian_refuses_relu_and_estimates_frobenius() -> None:
    x, y = moons(1, 4)
    relu = mlp(nn.ReLU)
    with pytest.raises(ValueError, match="twice-differentiable"):
        REGULARIZERS[Regularizer.HESSIAN](relu, network_from_module(relu, (2,)), x, y,
                                          RegularizerConfig("hessian"), 0.0)
    model = mlp(nn.Softplus)
    net = network_from_module(model, (2,))
    h = torch.autograd.functional.hessian(lambda t: model(t[None])[0, y[0]], x[0])
    torch.manual_seed(0)
    est, _ = REGULARIZERS[Regularizer.HESSIAN](model, net, x, y, RegularizerConfig("hessian", samples=4000), 0.0)
    assert est.item() == pytest.approx(h.pow(2).sum().item(), rel=0.1)


# ----------------------------------------------------------------------------------------
# every regulariser: finite, differentiable, trainable


CFGS = {
    "none": RegularizerConfig("none"),
    "gradcert": RegularizerConfig("gradcert", weight=1.0, epsilon=0.1, gamma=0.02),
    "grad_norm": RegularizerConfig("grad_norm", weight=1.0, epsilon=0.05, samples=2),
    "gnorm": RegularizerConfig("gnorm", weight=1.0, epsilon=0.1, pgd_steps=3),
    "pgd_at": RegularizerConfig("pgd_at", weight=1.0, epsilon=0.1, pgd_steps=3),
    "hessian": RegularizerConfig("hessian", weight=0.1, samples=2),
    "alignment": RegularizerConfig("alignment", weight=1.0, epsilon=0.1),
}


@pytest.mark.parametrize("name", [r.value for r in Regularizer])
@pytest.mark.parametrize("act", [nn.Softplus, nn.ReLU])
def test_regularizer_differentiable_and_decreasing(name: str, act: type[nn.Module]) -> None:
    if name == "hessian" and act is nn.ReLU:
        pytest.skip("hessian needs smooth activations (tested above)")
    cfg = CFGS[name]
    model = mlp(act, (2, 16, 3) if act is nn.Softplus else (2, 16, 16, 3))
    net = network_from_module(model, (2,))
    x, y = moons(64, 0)
    y = torch.where(x[:, 0] > 1.0, torch.full_like(y, 2), y)  # a third class

    def loss_at() -> float:
        torch.manual_seed(123)  # the same noise / PGD start before and after training
        return training_loss(model, net, x, y, cfg, 1.0)[0].item()

    torch.manual_seed(7)
    loss, info = training_loss(model, net, x, y, cfg, 1.0)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in info.values())
    if name != "none":
        torch.manual_seed(7)
        pen, _ = REGULARIZERS[cfg.name](model, net, x, y, cfg, 1.0)
        grads = torch.autograd.grad(pen, list(model.parameters()), allow_unused=True)
        flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
        assert torch.isfinite(flat).all() and flat.abs().sum() > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    start = loss_at()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        opt.zero_grad()
        training_loss(model, net, x, y, cfg, 1.0)[0].backward()
        opt.step()
    assert loss_at() < start


# ----------------------------------------------------------------------------------------
# GradCert training raises the certified fraction


def _train(cfg: RegularizerConfig, steps: int = 150) -> nn.Sequential:
    model = mlp(nn.ReLU)
    net = network_from_module(model, (2,))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = moons(256, 1)
    torch.manual_seed(5)
    for s in range(steps):
        loss, _ = training_loss(model, net, x, y, cfg, s / steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _certified_fraction(model: nn.Sequential, eps: float, delta: float) -> tuple[float, float]:
    net = network_from_module(model, (2,))
    x, y = moons(200, 2)
    with torch.no_grad():
        bounds = compute_bounds("ibp", net, input_box(x, eps, None), y).bounds
    v0 = saliency(net, x, y)
    prop = P.Property("stable", "untargeted", "l2", delta)
    verdicts = P.decide(prop, P.worst_case(prop, v0, bounds))
    acc = float((model(x).argmax(1) == y).double().mean())
    return sum(v == P.Verdict.CERTIFIED for v in verdicts) / len(verdicts), acc


def test_gradcert_training_raises_certified_fraction() -> None:
    eps, delta = 0.05, 1.0
    vanilla, acc_v = _certified_fraction(_train(RegularizerConfig("none")), eps, delta)
    gc, acc_g = _certified_fraction(
        _train(RegularizerConfig("gradcert", weight=1.0, epsilon=0.1, ramp_fraction=0.5)), eps, delta)
    assert vanilla < 0.5 and gc > 0.9 and gc >= vanilla + 0.4, (vanilla, gc)
    assert acc_g > 0.75 and acc_v > 0.75  # the certificate is not bought with a useless classifier


def test_gradcert_penalty_on_maxpool_and_prelu_layers_trains() -> None:
    """The live view of a Sequential with PReLU and ceil-mode MaxPool: the GradCert penalty (IBP
    over the box) is finite, back-propagates into every parameter, and one step lowers it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.PReLU(3), nn.MaxPool2d(2, ceil_mode=True),
                          nn.Flatten(), nn.Linear(3 * 3 * 3, 3)).to(DT)
    net = network_from_module(model, (1, 5, 5))
    x = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = gradcert_penalty(net, x, y, 0.05, 0.0, (0.0, 1.0))
    assert torch.isfinite(before)
    opt.zero_grad()
    before.backward()
    # weights and PReLU slopes (biases only move the piecewise-constant masks: zero gradient)
    moved = [model[0].weight, model[1].weight, model[4].weight]
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in moved)
    opt.step()
    assert gradcert_penalty(net, x, y, 0.05, 0.0, (0.0, 1.0)).item() < before.item()
