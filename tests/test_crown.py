"""CROWN / alpha-CROWN engine (auto_LiRPA 0.3): soundness against autograd by sampling, exactness
at ε = 0, alpha-CROWN never looser (and strictly tighter somewhere), parameter boxes, the
relaxations themselves, and the compat shim."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import ACT_IDS, ACTS, box_points, random_cnn, random_mlp, sample_network
from verigrad.bounds.base import Bounds, EngineUnsupported
from verigrad.bounds.lirpa import CrownOptions, crown_bounds
from verigrad.bounds.lirpa_compat import (
    _relu_mask_alpha_passthrough,
    clamp_blocks_gradient_at_bounds,
    passthrough_clamp,
)
from verigrad.bounds.ibp import softmax_bounds as softmax_interval
from verigrad.bounds.lirpa_ops import relu_grad_planes, softplus_exact, softplus_planes
from verigrad.graph.gradient_graph import GradientGraph, Output, saliency
from verigrad.models.network import ActKind, Activation, Conv2d, Linear, Network, Reshape
from verigrad.perturbation import LayerParamBox, ParamBox, input_box, param_box

F64 = torch.float64
TOL = 1e-9  # float64 round-off allowance on bounds of size O(1)
FAST_ALPHA = CrownOptions(alpha_iterations=8)


def _net(kind: str, act: ActKind, param: float, seed: int = 0) -> Network:
    return random_mlp(act, param, seed=seed) if kind == "mlp" else random_cnn(act, param, seed=seed)


def _centre(net: Network, n: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *net.input_shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _assert_contains(bounds: Bounds, v: torch.Tensor, tol: float = TOL) -> None:
    """Every row of v (points of one sample's box) lies in the sample's bounds."""
    lo, up = bounds.lower[0:1], bounds.upper[0:1]
    below = (lo - v).clamp(min=0).max().item()
    above = (v - up).clamp(min=0).max().item()
    assert below <= tol and above <= tol, f"gradient leaves the bounds by {max(below, above):.3e}"


# ---------------------------------------------------------------- input boxes


@pytest.mark.parametrize("seed,eps", [(0, 0.08), (1, 0.05)])
@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_input_box_sound_and_alpha_tighter(kind, act, param, seed, eps):
    net = _net(kind, act, param, seed=seed)
    x = _centre(net, seed=seed + 1)
    box = input_box(x, eps, None)
    target = torch.tensor([1])
    crown = crown_bounds(net, box, target)
    alpha = crown_bounds(net, box, target, alpha=True, options=FAST_ALPHA)
    assert crown.method == "crown" and alpha.method == "alpha-crown"
    assert crown.bounds.shape == box.shape
    pts = box_points(box, 500, 500, seed=2)
    v = saliency(net, pts, target.expand(pts.shape[0]))
    _assert_contains(crown.bounds, v)
    _assert_contains(alpha.bounds, v)
    assert bool((alpha.bounds.width <= crown.bounds.width + 1e-12).all())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_loss_output_sound(kind):
    for act, param in ACTS:
        net = _net(kind, act, param, seed=3)
        x = _centre(net, seed=4)
        box = input_box(x, 0.05, None)
        target = torch.tensor([2])
        res = crown_bounds(net, box, target, Output.LOSS)
        # alpha too: the softmax seed passes no A to the logits, so the forward activations
        # behind it must be left out of the optimisation (they are never visited)
        opt = crown_bounds(net, box, target, Output.LOSS, alpha=True, options=FAST_ALPHA)
        pts = box_points(box, 300, 300, seed=5)
        v = saliency(net, pts, target.expand(pts.shape[0]), Output.LOSS)
        _assert_contains(res.bounds, v)
        _assert_contains(opt.bounds, v)
        assert bool((opt.bounds.width <= res.bounds.width + 1e-12).all())


@pytest.mark.parametrize("output", list(Output))
@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_zero_radius_equals_autograd(kind, act, param, output):
    net = _net(kind, act, param, seed=6)
    x = _centre(net, n=2, seed=7)
    target = torch.tensor([0, 2])
    res = crown_bounds(net, Bounds.point(x), target, output)
    ref = saliency(net, x, target, output)
    torch.testing.assert_close(res.bounds.lower, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.bounds.upper, ref, rtol=0, atol=1e-10)


def test_alpha_strictly_tighter_somewhere():
    """Catches alpha-CROWN silently equal to CROWN (torch 2.14's clamp has zero gradient at its bounds, see lirpa_compat fix 4)."""
    net = random_mlp(ActKind.RELU, sizes=(6, 16, 16, 3), seed=11)
    x = _centre(net, n=2, seed=12)
    box = input_box(x, 0.15, None)
    target = torch.tensor([0, 1])
    crown = crown_bounds(net, box, target)
    alpha = crown_bounds(net, box, target, alpha=True)
    assert bool((alpha.bounds.width <= crown.bounds.width + 1e-12).all())
    assert alpha.bounds.width.sum() < 0.99 * crown.bounds.width.sum()


def test_alphas_receive_gradients(monkeypatch):
    """alpha-CROWN moves both auto_LiRPA's ReLU slopes (which start exactly at 0 or 1, where
    torch 2.14's clamp has zero gradient) and our relu'(z)·g plane weights (start at 0)."""
    from auto_LiRPA.operators import BoundRelu

    from verigrad.bounds.lirpa_ops import BoundReluGrad

    seen: dict[str, float] = {"relu": 0.0, "relu_grad": 0.0}

    def spy(kind, orig):
        def clip(self):
            for v in self.alpha.values():
                if v.grad is not None:
                    seen[kind] = max(seen[kind], float(v.grad.abs().max()))
            orig(self)

        return clip

    monkeypatch.setattr(BoundRelu, "clip_alpha_", spy("relu", BoundRelu.clip_alpha_))
    monkeypatch.setattr(BoundReluGrad, "clip_alpha_", spy("relu_grad", BoundReluGrad.clip_alpha_))
    net = random_mlp(ActKind.RELU, sizes=(6, 16, 16, 3), seed=11)
    x = _centre(net, n=1, seed=12)
    crown_bounds(net, input_box(x, 0.15, None), torch.tensor([0]), alpha=True, options=CrownOptions(alpha_iterations=3))
    assert seen["relu"] > 0 and seen["relu_grad"] > 0, seen


def test_per_sample_targets_match_single_calls():
    net = random_cnn(ActKind.RELU, seed=13)
    x = _centre(net, n=4, seed=14)
    box = input_box(x, 0.05, None)
    target = torch.tensor([0, 2, 1, 0])
    res = crown_bounds(net, box, target)
    for i in range(4):
        one = crown_bounds(net, box[i : i + 1], target[i : i + 1])
        torch.testing.assert_close(res.bounds.lower[i : i + 1], one.bounds.lower, rtol=0, atol=1e-12)
        torch.testing.assert_close(res.bounds.upper[i : i + 1], one.bounds.upper, rtol=0, atol=1e-12)
        pts = box_points(box[i : i + 1], 200, 200, seed=i)
        _assert_contains(res.bounds[i : i + 1], saliency(net, pts, target[i].expand(pts.shape[0])))


def test_float32_and_clipped_domain():
    net = random_cnn(ActKind.RELU, seed=15).to(dtype=torch.float32)
    x = torch.rand(2, *net.input_shape, generator=torch.Generator().manual_seed(16))
    box = input_box(x, 0.1, (0.0, 1.0))
    target = torch.tensor([1, 0])
    res = crown_bounds(net, box, target, alpha=True, options=FAST_ALPHA)
    assert res.bounds.lower.dtype == torch.float32
    for i in range(2):
        pts = box_points(box[i : i + 1], 300, 300, seed=i)
        _assert_contains(res.bounds[i : i + 1], saliency(net, pts, target[i].expand(pts.shape[0])), tol=1e-5)


def test_conv_output_padding_graph_and_bounds():
    """Convs whose stride leaves input rows unread (output_padding > 0): the gradient graph pads
    explicitly (auto_LiRPA's ConvTranspose refuses output_padding); it must equal autograd."""
    gen = torch.Generator().manual_seed(17)

    def conv(name, ci, co, k, s, p):
        w = torch.randn(co, ci, k, k, generator=gen, dtype=F64) * 0.4
        return Conv2d(name, w, torch.randn(co, generator=gen, dtype=F64) * 0.1, (s, s), (p, p))

    c0, c1 = conv("conv0", 1, 3, 3, 2, 0), conv("conv1", 3, 4, 3, 2, 1)
    s0 = c0.out_shape([(1, 10, 10)])
    s1 = c1.out_shape([s0])
    assert c0.output_padding((1, 10, 10)) == (1, 1) and c1.output_padding(s0) == (1, 1)
    n = s1[0] * s1[1] * s1[2]
    lin = Linear("fc", torch.randn(3, n, generator=gen, dtype=F64) * 0.3, torch.zeros(3, dtype=F64))
    net = Network(
        (c0, Activation("a0", ActKind.RELU), c1, Activation("a1", ActKind.TANH), Reshape("flat", (n,)), lin), (1, 10, 10)
    )
    x = torch.rand(3, 1, 10, 10, generator=gen, dtype=F64)
    torch.testing.assert_close(GradientGraph(net, 2)(x), saliency(net, x, torch.full((3,), 2)), rtol=1e-10, atol=1e-12)
    box = input_box(x[:1], 0.05, (0.0, 1.0))
    res = crown_bounds(net, box, torch.tensor([2]))
    pts = box_points(box, 300, 300)
    _assert_contains(res.bounds, saliency(net, pts, torch.full((pts.shape[0],), 2)))


# ---------------------------------------------------------------- parameter boxes


def _check_param_box(net, box, params, target, output, n_nets=40, n_points=25, alpha=False):
    res = crown_bounds(net, box, target, output, params, alpha=alpha, options=FAST_ALPHA)
    gen = torch.Generator().manual_seed(21)
    pts = box_points(box, n_points // 2, n_points - n_points // 2 - 1, seed=22)
    for k in range(n_nets):
        sampled = sample_network(net, params, gen, corner=k % 2 == 1)
        _assert_contains(res.bounds, saliency(sampled, pts, target.expand(pts.shape[0]), output))
    return res


@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
def test_param_box_sound_mlp(act, param):
    net = random_mlp(act, param, seed=23)
    x = _centre(net, seed=24)
    params = param_box(net, 0.05)
    target = torch.tensor([1])
    only = _check_param_box(net, Bounds.point(x), params, target, Output.LOGIT)
    joint = _check_param_box(net, input_box(x, 0.05, None), params, target, Output.LOGIT)
    # a larger box gives no narrower bound, up to the rounding allowances (γ_n·M: the magnitudes M
    # of the two passes differ; measured ≤ 1.3e-10 apart here)
    assert bool((joint.bounds.width >= only.bounds.width - 1e-9).all())
    assert only.bounds.width.max() > 0
    _check_param_box(net, input_box(x, 0.03, None), param_box(net, 0.03, layers=["fc0", "fc2"]), target, Output.LOSS)


def test_param_box_cnn_linear_layers_and_row_seed():
    net = random_cnn(ActKind.RELU, seed=25)
    x = _centre(net, seed=26)
    params = param_box(net, 0.05, layers=["fc0", "fc1"])
    crown = _check_param_box(net, input_box(x, 0.05, None), params, torch.tensor([2]), Output.LOGIT, n_nets=20)
    alpha = _check_param_box(net, input_box(x, 0.05, None), params, torch.tensor([2]), Output.LOGIT, n_nets=20, alpha=True)
    assert bool((alpha.bounds.width <= crown.bounds.width + 1e-12).all())


def test_param_box_alpha_loss_mlp():
    net = random_mlp(ActKind.TANH, seed=28)
    x = _centre(net, seed=29)
    _check_param_box(net, input_box(x, 0.05, None), param_box(net, 0.05), torch.tensor([3]), Output.LOSS, alpha=True)


def test_conv_param_box_unsupported():
    net = random_cnn(ActKind.RELU, seed=27)
    x = _centre(net)
    with pytest.raises(EngineUnsupported, match="op 'conv2d' at node 'conv0': auto_LiRPA 0.3 cannot bound perturbed conv weights"):
        crown_bounds(net, input_box(x, 0.05, None), torch.tensor([0]), params=param_box(net, 0.01))


# ---------------------------------------------------------------- errors


def test_input_errors():
    net = random_mlp(ActKind.RELU)
    x = _centre(net)
    with pytest.raises(ValueError, match="dtype"):
        crown_bounds(net, Bounds.point(x.float()), torch.tensor([0]))
    with pytest.raises(ValueError, match="target"):
        crown_bounds(net, Bounds.point(x), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target classes"):
        crown_bounds(net, Bounds.point(x), torch.tensor([9]))
    with pytest.raises(ValueError, match="shape"):
        crown_bounds(net, Bounds.point(torch.zeros(1, 3, dtype=F64)), torch.tensor([0]))
    bad = ParamBox({"fc0": LayerParamBox(Bounds.point(torch.zeros(2, 2, dtype=F64)), Bounds.point(torch.zeros(2, dtype=F64)))})
    with pytest.raises(ValueError, match="shapes"):
        crown_bounds(net, Bounds.point(x), torch.tensor([0]), params=bad)


def test_unsupported_op_is_named(monkeypatch):
    from verigrad.bounds import lirpa_ops

    monkeypatch.delitem(lirpa_ops.CUSTOM_OPS, "verigrad::ReluGrad")
    net = random_mlp(ActKind.RELU)
    with pytest.raises(EngineUnsupported, match="verigrad::ReluGrad"):
        crown_bounds(net, input_box(_centre(net), 0.1, None), torch.tensor([0]))


# ---------------------------------------------------------------- relaxations, sampled directly


def _random_boxes(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    def interval(scale):
        a = torch.randn(n, generator=gen, dtype=F64) * scale
        b = torch.randn(n, generator=gen, dtype=F64) * scale
        return torch.minimum(a, b), torch.maximum(a, b)

    zl, zu = interval(1.0)
    gl, gu = interval(2.0)
    # include the degenerate cases: z_l = 0 exactly, point intervals, nearly-stable neurons
    zl[:50] = 0.0
    zu[50:100] = zl[50:100]
    gu[100:150] = gl[100:150]
    zl[150:200] = -1e-9
    return zl, zu, gl, gu


@pytest.mark.parametrize("alpha", ["zero", "one", "random"])
def test_relu_grad_planes_sound(alpha):
    gen = torch.Generator().manual_seed(31)
    n = 20000
    zl, zu, gl, gu = _random_boxes(n, gen)
    a = {"zero": 0.0, "one": 1.0}.get(alpha)
    al = torch.rand(n, generator=gen, dtype=F64) if a is None else a
    au = torch.rand(n, generator=gen, dtype=F64) if a is None else a
    p = relu_grad_planes(zl, zu, gl, gu, al, au)
    for k in range(40):
        uz = torch.rand(n, generator=gen, dtype=F64)
        ug = torch.rand(n, generator=gen, dtype=F64)
        if k % 4 == 1:  # corners
            uz, ug = (uz > 0.5).to(F64), (ug > 0.5).to(F64)
        z = zl + uz * (zu - zl)
        if k % 4 == 2:  # z = 0 where it is in the box (relu'(0) = 0)
            z = torch.where((zl <= 0) & (zu >= 0), torch.zeros_like(z), z)
        g = gl + ug * (gu - gl)
        h = (z > 0).to(F64) * g
        lo = p.lz * z + p.lg * g + p.lb
        up = p.uz * z + p.ug * g + p.ub
        scale = 1 + h.abs() + z.abs() * (p.lz.abs() + p.uz.abs())
        assert bool((lo <= h + 1e-12 * scale).all()), float((lo - h).max())
        assert bool((h <= up + 1e-12 * scale).all()), float((h - up).max())


def test_relu_grad_planes_exact_when_stable_and_crown_default():
    zl = torch.tensor([0.5, -2.0, -1.0], dtype=F64)
    zu = torch.tensor([1.0, -0.1, 1.0], dtype=F64)
    gl = torch.tensor([-1.0, -1.0, -1.0], dtype=F64)
    gu = torch.tensor([2.0, 2.0, 3.0], dtype=F64)
    p = relu_grad_planes(zl, zu, gl, gu)
    torch.testing.assert_close(p.lg[:2], torch.tensor([1.0, 0.0], dtype=F64))
    torch.testing.assert_close(p.ug[:2], torch.tensor([1.0, 0.0], dtype=F64))
    assert float(p.uz.abs().max()) == 0.0 and float(p.lz.abs().max()) == 0.0  # α = 0: z-free
    # chord of max(0, g) over [-1, 3]: 3(g + 1)/4
    assert float(p.ug[2]) == pytest.approx(0.75) and float(p.ub[2]) == pytest.approx(0.75)


def test_softplus_and_softmax_relaxations_sound():
    gen = torch.Generator().manual_seed(41)
    n = 5000
    a = torch.randn(n, generator=gen, dtype=F64) * 10
    b = a + torch.rand(n, generator=gen, dtype=F64) * torch.tensor([0.0, 1e-14, 1.0, 30.0], dtype=F64).repeat(n // 4)
    lk, lb, uk, ub = softplus_planes(a, b)
    for _ in range(20):
        u = a + torch.rand(n, generator=gen, dtype=F64) * (b - a)
        f = softplus_exact(u)
        assert bool((lk * u + lb <= f + 1e-9).all()) and bool((f <= uk * u + ub + 1e-9).all())
    lo = torch.randn(200, 5, generator=gen, dtype=F64) * 3
    hi = lo + torch.rand(200, 5, generator=gen, dtype=F64) * 2
    p_lo, p_hi = softmax_interval(lo, hi, dim=1)
    for k in range(50):
        u = torch.rand(200, 5, generator=gen, dtype=F64)
        if k % 2:
            u = (u > 0.5).to(F64)
        p = torch.softmax(lo + u * (hi - lo), dim=1)
        assert bool((p_lo <= p + 1e-12).all()) and bool((p <= p_hi + 1e-12).all())


# ---------------------------------------------------------------- compat shim


def test_compat_alpha_clamp_passes_gradient_at_bounds():
    a = torch.tensor([0.0, 1.0, 0.5, 1.5], dtype=F64, requires_grad=True)
    out = passthrough_clamp(a, 0.0, 1.0)
    torch.testing.assert_close(out.detach(), torch.tensor([0.0, 1.0, 0.5, 1.0], dtype=F64))
    out.sum().backward()
    assert bool((a.grad == 1).all())
    # the BoundRelu replacement keeps stable neurons fixed and lets unstable alphas move from 0
    lower = torch.tensor([[0.5, -1.0, -1.0]], dtype=F64)
    upper = torch.tensor([[1.0, -0.5, 1.0]], dtype=F64)
    alpha = torch.zeros(1, 1, 3, dtype=F64, requires_grad=True)
    lb_d, _, _ = _relu_mask_alpha_passthrough(lower, upper, alpha, None)
    torch.testing.assert_close(lb_d.detach(), torch.tensor([[[1.0, 0.0, 0.0]]], dtype=F64))
    lb_d.sum().backward()
    torch.testing.assert_close(alpha.grad, torch.tensor([[[0.0, 0.0, 1.0]]], dtype=F64))
    assert isinstance(clamp_blocks_gradient_at_bounds(), bool)


def test_compat_torch_fixes_present():
    import torch.onnx.symbolic_helper as sh

    from verigrad.bounds import lirpa_compat

    assert lirpa_compat.import_auto_lirpa() is lirpa_compat.import_auto_lirpa()  # idempotent
    assert hasattr(sh, "_set_opset_version")
    assert hasattr(torch._C.Node, "__getitem__")
    import auto_LiRPA.operators as ops

    if clamp_blocks_gradient_at_bounds():
        assert ops.BoundRelu._relu_mask_alpha is _relu_mask_alpha_passthrough


def test_ibp_intermediate_bounds_leave_the_bounded_input_untouched():
    """auto_LiRPA 0.3 wrote a Neg / ReLU node's IBP interval onto its input (shim fix 6)."""
    import auto_LiRPA

    from verigrad.bounds.lirpa_compat import _check_ibp_intermediate

    assert auto_LiRPA.BoundedModule.check_IBP_intermediate is _check_ibp_intermediate

    class Node:
        def __init__(self, inputs=()):
            self.inputs = list(inputs)

    class Neg(Node):
        pass

    x = Node()
    x.lower, x.upper = torch.tensor([1.0]), torch.tensor([2.0])
    x.interval = (x.lower, x.upper)
    neg = Neg([x])

    class Model:
        ibp_intermediate = [Neg]

        def IBP_general(self, n):
            lo, up = n.inputs[0].interval
            n.lower, n.upper = n.interval = (-up, -lo)
            return n.interval

    assert _check_ibp_intermediate(Model(), neg)
    assert x.interval[0].item() == 1.0 and x.interval[1].item() == 2.0
    assert neg.interval[0].item() == -2.0 and neg.interval[1].item() == -1.0
    assert not _check_ibp_intermediate(Model(), Node([x]))  # a kind outside the list: CROWN bounds it


def test_param_box_sound_through_a_negated_gradient():
    """residual_mlp's Sub negates the gradient of the boxed last layer's row (a Neg of a perturbed
    input whose bounds a bilinear product requests): CROWN was unsound there before shim fix 6."""
    from tests.graph_nets import residual_mlp

    net = residual_mlp()
    x = torch.rand(1, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    _check_param_box(net, input_box(x, 0.02, (0.0, 1.0)), param_box(net, 0.03, "relative"), torch.tensor([1]),
                     Output.LOGIT)
