"""The ONNX loader on graphs with branches, exported by both of torch's exporters (the legacy
TorchScript one, ``dynamo=False``, and the default dynamo one): every lowered network computes
the module's logits, and its gradient graph and autograd saliency give the module's input
gradient. Also: refusals by name, output selection, a final Softmax, and float64 constants
built exactly from a float32 file."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from tests.helpers import hand_onnx, save_onnx
from verigrad.graph.gradient_graph import GradientGraph, Output, saliency
from verigrad.models import load_model, load_onnx
from verigrad.models.network import (
    INPUT, ActKind, Activation, Add, Concat, Conv2d, Linear, MaxPool, ModelError, Network, Pad, PReLU, Reshape, Sub,
    Transpose,
)

DT = torch.float64
EXPORTERS = ["legacy", "dynamo"]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")


# -- exporting and checking ---------------------------------------------------------------


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, exporter: str, dtype=DT) -> Path:
    model.eval()
    x = torch.zeros(2, *shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
        else:
            pytest.importorskip("onnxscript")
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False, input_names=["x"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    return path


def _load(model: nn.Module, shape, tmp_path: Path, exporter: str, dtype=DT, **kw) -> Network:
    return load_onnx(_export(model, tuple(shape), tmp_path / f"{exporter}.onnx", exporter, dtype), **kw)


def _input(shape, n: int = 3, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _check(model: nn.Module, net: Network, x: torch.Tensor | None = None, tol: float = 1e-10) -> None:
    """net's logits and, for every class, GradientGraph and saliency equal the module's."""
    model = model.eval()
    x = _input(net.input_shape) if x is None else x
    assert net.dtype == DT
    with torch.no_grad():
        ref = model(x).reshape(x.shape[0], -1)
    torch.testing.assert_close(net.forward(x), ref, rtol=tol, atol=tol)
    for c in range(net.num_classes):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xg).reshape(x.shape[0], -1)[:, c].sum(), xg)
        torch.testing.assert_close(GradientGraph(net, c)(x), g, rtol=tol, atol=tol)
        torch.testing.assert_close(saliency(net, x, torch.full((x.shape[0],), c)), g, rtol=tol, atol=tol)


def _randomize_bn(model: nn.Module, seed: int = 0, var_scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c, d = m.num_features, m.running_mean.dtype
                m.running_mean.copy_(torch.randn(c, generator=gen, dtype=d) * 0.3)
                m.running_var.copy_((torch.rand(c, generator=gen, dtype=d) + 0.5) * var_scale)
                m.weight.copy_(torch.randn(c, generator=gen, dtype=d) * 0.5 + 1)
                m.bias.copy_(torch.randn(c, generator=gen, dtype=d) * 0.2)


def _kinds(net: Network) -> list[type]:
    return [type(l) for l in net.layers]


# -- the modules ----------------------------------------------------------------------------


class Residual(nn.Module):
    """Add and Sub of computed tensors; the BatchNorm after conv2 feeds two nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.bn, self.fc = nn.BatchNorm2d(3), nn.Linear(3 * 5 * 5, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        r = self.bn(self.c2(h))
        return self.fc(torch.flatten((h + r) - torch.sigmoid(r), 1))


class CatFlat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(torch.cat([torch.tanh(self.a(x)), self.b(x)], dim=-1))


class CatChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 3, 1), nn.Linear(5 * 4 * 4, 2)

    def forward(self, x):
        return self.fc(torch.cat([torch.tanh(self.a(x)), self.b(x)], dim=1).flatten(1))


class PermutePad(nn.Module):
    """F.pad of (C, H, W) with a fill value, permute, F.pad of the last dim, transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 2, 3), nn.Linear(3 * 4 * 5, 2)

    def forward(self, x):  # (2, 3, 4)
        a = torch.tanh(self.conv(F.pad(x, (1, 0, 2, 1), value=0.5)))  # (2, 6, 5) → (2, 4, 3)
        b = F.pad(a.permute(0, 2, 3, 1), (1, 2))  # (4, 3, 2) → (4, 3, 5)
        return self.fc(b.transpose(1, 2).flatten(1))  # (3, 4, 5)


class Reshapes(nn.Module):
    """x.view(x.size(0), -1), unsqueeze, reshape, squeeze, flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(24, 6), nn.Linear(6, 2)

    def forward(self, x):  # (2, 3, 4)
        h = torch.tanh(self.fc1(x.view(x.size(0), -1))).unsqueeze(1).unsqueeze(-1)  # (1, 6, 1)
        h = h.reshape(h.shape[0], 2, 3, 1).squeeze(-1)  # (2, 3)
        return self.fc2(torch.flatten(h, 1))


class Means(nn.Module):
    """AdaptiveAvgPool2d(1), mean over (H, W) with and without keepdim, AvgPool2d with padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gap = nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1)
        self.pool, self.fc = nn.AvgPool2d(2, stride=1, padding=1), nn.Linear(3 + 3 + 3 * 5 * 5, 2)

    def forward(self, x):  # (2, 6, 6)
        h = torch.tanh(self.conv(x))  # (3, 4, 4)
        a = self.gap(h).flatten(1)
        b = h.mean(dim=(2, 3)) - h.mean(dim=(-2, -1), keepdim=True).flatten(1) * 0.5
        return self.fc(torch.cat([a, b, self.pool(h).flatten(1)], dim=1))


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h), torch.tanh(h)


def _seeded(fn, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fn().to(DT).eval()


# -- features -------------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_residual_add_sub(exporter, tmp_path):
    model = _seeded(Residual)
    _randomize_bn(model)
    net = _load(model, (2, 5, 5), tmp_path, exporter)
    assert not net.is_chain
    assert Add in _kinds(net) and Sub in _kinds(net)
    _check(model, net)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch,shape", [(CatFlat, (4,)), (CatChannels, (2, 4, 4))])
def test_concat(arch, shape, exporter, tmp_path):
    model = _seeded(arch)
    net = _load(model, shape, tmp_path, exporter)
    cat = [l for l in net.layers if isinstance(l, Concat)]
    assert len(cat) == 1 and cat[0].axis == 0
    _check(model, net)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("kernel,stride,padding,ceil", [(3, 2, 1, False), (2, 2, 0, True), (3, 2, 1, True)])
def test_maxpool(kernel, stride, padding, ceil, exporter, tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                          nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil), nn.Flatten())
    out = model(torch.zeros(1, 2, 7, 7)).shape[1]
    model = nn.Sequential(*model, nn.Linear(out, 3)).to(DT).eval()
    net = _load(model, (2, 7, 7), tmp_path, exporter)
    (mp,) = [l for l in net.layers if isinstance(l, MaxPool)]
    assert mp.ceil_mode == ceil and mp.pads == (padding,) * 4 and mp.kernel == (kernel, kernel)
    _check(model, net)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_prelu_per_channel_and_single(exporter, tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.PReLU(3), nn.Flatten(), nn.Linear(3 * 3 * 3, 4), nn.PReLU(),
                          nn.Linear(4, 2)).to(DT).eval()
    with torch.no_grad():  # slopes on both sides of 1 and negative
        model[1].weight.copy_(torch.tensor([-0.5, 0.3, 1.5], dtype=DT))
        model[4].weight.fill_(0.2)
    net = _load(model, (2, 5, 5), tmp_path, exporter)
    slopes = [tuple(l.slope.shape) for l in net.layers if isinstance(l, PReLU)]
    assert slopes == [(3, 1, 1), (1,)]
    _check(model, net)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_transpose_and_pad(exporter, tmp_path):
    model = _seeded(PermutePad)
    net = _load(model, (2, 3, 4), tmp_path, exporter)
    perms = [l.perm for l in net.layers if isinstance(l, Transpose)]
    pads = [(l.pads, l.value) for l in net.layers if isinstance(l, Pad)]
    assert perms == [(1, 2, 0), (1, 0, 2)]
    assert pads == [(((0, 0), (2, 1), (1, 0)), 0.5), (((0, 0), (0, 0), (1, 2)), 0.0)]
    _check(model, net)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_reshape_squeeze_unsqueeze_flatten(exporter, tmp_path):
    model = _seeded(Reshapes)
    net = _load(model, (2, 3, 4), tmp_path, exporter)
    assert set(_kinds(net)) <= {Reshape, Linear, Activation}
    _check(model, net)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_reducemean_global_and_avg_pool(exporter, tmp_path):
    model = _seeded(Means)
    net = _load(model, (2, 6, 6), tmp_path, exporter)
    pools = [l for l in net.layers if l.name.endswith("/avgpool")]
    assert len(pools) == 4 and not any(p.perturbable for p in pools)
    _check(model, net)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dropout_and_activation_after_the_last_affine(exporter, tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.3), nn.Tanh(), nn.Linear(5, 3), nn.Sigmoid()).to(DT).eval()
    net = _load(model, (4,), tmp_path, exporter)
    assert _kinds(net) == [Linear, Activation, Linear, Activation]
    assert net.layers[-1].kind == ActKind.SIGMOID
    _check(model, net)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_softplus_beta_and_threshold_branch(beta, exporter, tmp_path):
    """legacy: Mul(β)→Softplus→Div(β); dynamo: Where(Greater(β·x, 20), x, Softplus(β·x)/β)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3), nn.Softplus(beta=beta), nn.Linear(3, 2)).to(DT).eval()
    net = _load(model, (4,), tmp_path, exporter)
    assert _kinds(net) == [Linear, Activation, Linear]
    sp = net.layers[1]
    assert sp.kind == ActKind.SOFTPLUS and sp.param == beta
    assert net.notes == ()  # threshold 20: the branch differs by < 2e-9/β
    _check(model, net)  # no β·z > 20 here, where torch's threshold branch would differ


def test_softplus_small_threshold_is_noted(tmp_path):
    """A hand-built threshold branch with threshold 1 is lowered to the exact softplus, noted."""
    nodes = [
        helper.make_node("Mul", ["x", "beta"], ["u"], name="mul"),
        helper.make_node("Softplus", ["u"], ["s"], name="sp"),
        helper.make_node("Div", ["s", "beta"], ["d"], name="div"),
        helper.make_node("Greater", ["u", "thr"], ["g"], name="gt"),
        helper.make_node("Where", ["g", "x", "d"], ["y"], name="where"),
    ]
    net = load_onnx(save_onnx(hand_onnx(nodes, dict(beta=np.array(3.0), thr=np.array(1.0)), [4], [4]), tmp_path / "s.onnx"))
    assert [(type(l), l.name, l.param) for l in net.layers] == [(Activation, "sp", 3.0)]
    assert len(net.notes) == 1 and "threshold" in net.notes[0] and "'sp'" in net.notes[0]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_several_outputs(exporter, tmp_path):
    model = _seeded(TwoOutputs)
    path = _export(model, (4,), tmp_path / "two.onnx", exporter)
    names = [o.name for o in onnx.load(str(path)).graph.output]
    with pytest.raises(ModelError, match=r"two\.onnx: the graph has 2 outputs .*pass model\.output"):
        load_onnx(path)
    with pytest.raises(ModelError, match="out of range"):
        load_onnx(path, output=2)
    with pytest.raises(ModelError, match="no graph output named 'nope'"):
        load_onnx(path, output="nope")
    first = nn.Sequential(model.a, nn.ReLU(), model.b)
    _check(first, load_onnx(path, output=0))
    _check(first, load_model(path, output=names[0]))
    second = load_onnx(path, output=1)  # tanh(h): the second branch alone (model.b pruned)
    assert _kinds(second) == [Linear, Activation, Activation]
    _check(nn.Sequential(model.a, nn.ReLU(), nn.Tanh()), second)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("dim", [1, -1])
def test_final_softmax_is_stripped(dim, exporter, tmp_path):
    torch.manual_seed(5)
    body = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    model = nn.Sequential(*body, nn.Softmax(dim=dim)).to(DT).eval()
    net = _load(model, (4,), tmp_path, exporter)
    assert _kinds(net) == [Linear, Activation, Linear]
    assert len(net.notes) == 1 and net.notes[0].startswith("final Softmax at node")
    assert "stripped" in net.notes[0] and "explanation.output: probability" in net.notes[0]
    _check(body, net)
    # the probability output of the stripped network explains the file's probabilities
    x = _input((4,))
    for c in range(3):
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xg)[:, c].sum(), xg)
        torch.testing.assert_close(GradientGraph(net, c, Output.PROBABILITY)(x), g, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_final_logsoftmax_refused(exporter, tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)).to(DT).eval()
    with pytest.raises(ModelError, match=r"LogSoftmax \(node '[^']+'\)"):
        _load(model, (4,), tmp_path, exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_float32_module_loads_as_float64(exporter, tmp_path):
    """A float32 file: the network is float64, matches the float32 module to float32
    precision, and a float64 copy of the module (the file's values) exactly."""
    model = _seeded(CatChannels, seed=6).float()
    net = _load(model, (2, 4, 4), tmp_path, exporter, dtype=torch.float32)
    assert net.dtype == DT
    x = _input((2, 4, 4))
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x).float(), model(x.float()), rtol=1e-5, atol=1e-5)
    _check(copy.deepcopy(model).double(), net, x)


# -- float64 constants from a float32 file ----------------------------------------------------


class NormBN(nn.Module):
    """(x − mean)/std, conv, ReLU, a BatchNorm with tiny running variances (ε matters), Linear,
    Tanh, BatchNorm1d, Linear. The BatchNorms follow activations, so neither exporter folds
    them: the file holds the module's own values."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.1307, -0.25]).view(1, 2, 1, 1))
        self.register_buffer("std", torch.tensor([0.3081, 0.7]).view(1, 2, 1, 1))
        self.conv, self.bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)
        self.fc1, self.bn1, self.fc2 = nn.Linear(3 * 3 * 3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(torch.relu(self.conv((x - self.mean) / self.std)))
        return self.fc2(self.bn1(torch.tanh(self.fc1(h.flatten(1)))))


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_float64_constants_from_a_float32_file(exporter, tmp_path):
    torch.manual_seed(8)
    model = NormBN().eval()
    _randomize_bn(model, var_scale=1e-6)
    net = _load(model, (2, 5, 5), tmp_path, exporter, dtype=torch.float32)
    assert all(t.dtype == DT for l in net.layers for t in l.tensors(net.in_shapes(net.layers.index(l))).values())
    # the file's graph in float64: the module's float32 values and ε as stored (float32)
    ref = copy.deepcopy(model).double()
    for m in (ref.bn, ref.bn1):
        m.eps = float(np.float32(m.eps))
    rounded = copy.deepcopy(model).double()  # ε = 1e-5 as written in Python
    x = _input((2, 5, 5), n=5)
    with torch.no_grad():
        want, got = ref(x), net.forward(x)
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= 1e-12 * scale
        # the test can tell: the rounded ε moves the logits by far more than 1e-12
        assert float((rounded(x) - want).abs().max()) > 1e-10 * scale


def test_float64_folding_and_hyperparameters_from_a_float32_file(tmp_path):
    """Gemm α/β, BatchNorm ε (folded into the Gemm), LeakyRelu α and PRelu slopes as stored
    in float32, every derived constant computed in float64."""
    rng = np.random.default_rng(0)
    f32 = {k: v.astype(np.float32) for k, v in dict(
        w=rng.normal(size=(5, 4)), b=rng.normal(size=5), g=rng.normal(size=5), be=rng.normal(size=5),
        m=rng.normal(size=5), v=rng.uniform(0.5, 1.5, size=5) * 1e-6, a=rng.uniform(-0.5, 1.5, size=5),
        w2=rng.normal(size=(5, 2)), b2=rng.normal(size=2), mu=rng.normal(size=4), sd=rng.uniform(0.5, 2, size=4),
    ).items()}
    nodes = [
        helper.make_node("Sub", ["x", "mu"], ["x1"], name="sub"),
        helper.make_node("Div", ["x1", "sd"], ["x2"], name="div"),
        helper.make_node("Gemm", ["x2", "w", "b"], ["h"], name="gemm", alpha=0.3, beta=0.7, transB=1),
        helper.make_node("BatchNormalization", ["h", "g", "be", "m", "v"], ["n"], name="bn", epsilon=1e-5),
        helper.make_node("LeakyRelu", ["n"], ["l"], name="leaky", alpha=0.1),
        helper.make_node("PRelu", ["l", "a"], ["p"], name="prelu"),
        helper.make_node("MatMul", ["p", "w2"], ["q"], name="mm"),
        helper.make_node("Add", ["q", "b2"], ["y"], name="bias"),
    ]
    net = load_onnx(save_onnx(hand_onnx(nodes, f32, [4], [2], TensorProto.FLOAT), tmp_path / "f.onnx"))
    assert [l.name for l in net.layers] == ["sub/normalize", "gemm", "leaky", "prelu", "mm"]
    assert net.layer("leaky").param == float(np.float32(0.1)) != 0.1
    d = {k: v.astype(np.float64) for k, v in f32.items()}
    alpha, beta, eps, leak = (float(np.float32(v)) for v in (0.3, 0.7, 1e-5, 0.1))
    x = rng.normal(size=(4, 4))
    h = alpha * ((x - d["mu"]) / d["sd"]) @ d["w"].T + beta * d["b"]
    n = (h - d["m"]) / np.sqrt(d["v"] + eps) * d["g"] + d["be"]
    n = np.where(n > 0, n, leak * n)
    n = np.where(n > 0, n, d["a"] * n)
    ref = n @ d["w2"] + d["b2"]
    got = net.forward(torch.tensor(x)).numpy()
    assert np.abs(got - ref).max() <= 1e-12 * np.abs(ref).max()


# -- BatchNorm folding in a graph ------------------------------------------------------------


def test_batchnorm_not_folded_when_the_conv_output_is_shared(tmp_path):
    rng = np.random.default_rng(1)
    inits = dict(w=rng.normal(size=(3, 2, 3, 3)), b=rng.normal(size=3), g=rng.normal(size=3), be=rng.normal(size=3),
                 m=rng.normal(size=3), v=rng.uniform(0.5, 1.5, size=3), fw=rng.normal(size=(2, 3 * 4 * 4)))
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["n"], name="bn"),
        helper.make_node("Add", ["n", "c"], ["r"], name="res"),
        helper.make_node("Flatten", ["r"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fw"], ["y"], name="fc", transB=1),
    ]
    net = load_onnx(save_onnx(hand_onnx(nodes, inits, [2, 4, 4], [2]), tmp_path / "bn.onnx"))
    assert [l.name for l in net.layers] == ["conv", "bn/affine", "res", "flat", "fc"]
    assert net.layer("res").inputs == ("bn/affine", "conv")
    torch.testing.assert_close(net.layer("conv").weight, torch.tensor(inits["w"]), rtol=0, atol=0)
    t = {k: torch.tensor(v) for k, v in inits.items()}
    x = torch.tensor(rng.normal(size=(3, 2, 4, 4)))
    c = F.conv2d(x, t["w"], t["b"], padding=1)
    ref = F.linear((F.batch_norm(c, t["m"], t["v"], t["g"], t["be"]) + c).flatten(1), t["fw"])
    torch.testing.assert_close(net.forward(x), ref)


# -- refusals ----------------------------------------------------------------------------------


def test_dropout_training_mode_refused(tmp_path):
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "train"], ["d"], name="drop"),
        helper.make_node("Gemm", ["d", "w"], ["y"], name="fc"),
    ]
    inits = dict(ratio=np.array(0.5), train=np.array(True), w=np.ones((4, 2)))
    with pytest.raises(ModelError, match=r"d\.onnx: node 'drop' \(Dropout\): training_mode=1"):
        load_onnx(save_onnx(hand_onnx(nodes, inits, [4], [2]), tmp_path / "d.onnx"))
    inits["train"] = np.array(False)  # inference: a no-op
    net = load_onnx(save_onnx(hand_onnx(nodes, inits, [4], [2]), tmp_path / "d.onnx"))
    assert [l.name for l in net.layers] == ["fc"]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_unsupported_op_names_file_node_and_op(exporter, tmp_path):
    class Sine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.sin(x))

    with pytest.raises(ModelError, match=rf"{exporter}\.onnx: unsupported ONNX op 'Sin' at node '[^']+'"):
        _load(Sine().to(DT), (4,), tmp_path, exporter)


def test_batch_moving_transpose_refused(tmp_path):
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="swap", perm=[1, 0, 2]),
        helper.make_node("Flatten", ["t"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w"], ["y"], name="fc"),
    ]
    with pytest.raises(ModelError, match=r"node 'swap' \(Transpose\): permutation \[1, 0, 2\] moves the batch"):
        load_onnx(save_onnx(hand_onnx(nodes, dict(w=np.ones((12, 2))), [3, 4], [2]), tmp_path / "t.onnx"))


@pytest.mark.parametrize("op,attrs,extra,match", [
    ("MaxPool", dict(kernel_shape=[2, 2], dilations=[2, 2]), {}, r"'op' \(MaxPool\): dilations \[2, 2\]"),
    ("MaxPool", dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER"), {}, r"'op' \(MaxPool\): auto_pad=SAME_UPPER"),
    ("Pad", dict(mode="reflect"), dict(pads=np.array([0, 0, 1, 1, 0, 0, 1, 1])), r"'op' \(Pad\): mode=reflect"),
    ("Pad", {}, dict(pads=np.array([0, 0, -1, 0, 0, 0, 0, 0])), r"'op' \(Pad\): negative pads"),
    ("Pad", {}, dict(pads=np.array([1, 0, 0, 0, 0, 0, 0, 0])), r"'op' \(Pad\): .*pad the batch dimension"),
    ("ReduceMean", dict(axes=[1]), {}, r"'op' \(ReduceMean\): ReduceMean over axes \[1\]"),
])
def test_unsupported_attributes_refused_by_name(op, attrs, extra, match, tmp_path):
    ins = ["x", *extra]
    nodes = [helper.make_node(op, ins, ["o"], name="op", **attrs), helper.make_node("Flatten", ["o"], ["y"], name="flat")]
    with pytest.raises(ModelError, match=match):
        load_onnx(save_onnx(hand_onnx(nodes, extra, [2, 6, 6], ["M"], opset=17), tmp_path / "a.onnx"))


def test_maxpool_indices_output_refused(tmp_path):
    mp = helper.make_node("MaxPool", ["x"], ["p", "idx"], name="mp", kernel_shape=[2, 2], strides=[2, 2])
    nodes = [
        mp,
        helper.make_node("Cast", ["idx"], ["ic"], name="cast", to=TensorProto.DOUBLE),
        helper.make_node("Add", ["p", "ic"], ["s"], name="add"),
        helper.make_node("Flatten", ["s"], ["y"], name="flat"),
    ]
    with pytest.raises(ModelError, match=r"node 'mp' \(MaxPool\): its output 'idx' is used"):
        load_onnx(save_onnx(hand_onnx(nodes, {}, [1, 4, 4], [4]), tmp_path / "mp.onnx"))
    # unused indices are fine (and a trailing Flatten of the logits is left out)
    nodes = [mp, helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    assert _kinds(load_onnx(save_onnx(hand_onnx(nodes, {}, [1, 4, 4], [4]), tmp_path / "mp.onnx"))) == [MaxPool]


def test_two_data_inputs_refused(tmp_path):
    nodes = [helper.make_node("Add", ["x", "z"], ["y"], name="add")]
    graph = helper.make_graph(
        nodes, "two",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 3]),
         helper.make_tensor_value_info("z", TensorProto.DOUBLE, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelError, match=r"2 graph inputs \['x', 'z'\]"):
        load_onnx(save_onnx(model, tmp_path / "two.onnx"))


def test_network_inputs_are_explicit(tmp_path):
    """Every node names what it reads; a chain stays a chain."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(DT).eval()
    net = _load(model, (4,), tmp_path, "legacy")
    assert net.is_chain and [l.inputs for l in net.layers] == [(INPUT,), ("/0/Gemm",), ("/1/Relu",)]
    assert all(isinstance(l, (Linear, Conv2d, Activation)) for l in net.layers)


def test_normalization_prepended_to_a_graph(tmp_path):
    """load_model(normalization=...) rewires every node that read the input (two here)."""

    class Normalize(nn.Module):
        def forward(self, x):
            return (x - 0.25) / 2.0

    model = _seeded(CatFlat)
    net = load_model(_export(model, (4,), tmp_path / "c.onnx", "legacy"), normalization=([0.25], [2.0]))
    assert net.layers[0].name == "input/normalize"
    assert [l.name for l, ins in zip(net.layers, net.wiring, strict=True) if INPUT in ins] == ["input/normalize"]
    _check(nn.Sequential(Normalize(), model), net)


# -- every engine on exported graphs -------------------------------------------------------


class AllOps(nn.Module):
    """conv → PReLU → residual conv → ReLU → MaxPool(ceil) → two branches concatenated → permute →
    pad → flatten → Linear → Tanh → Linear: every graph operator in one exported file."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(2, 3, 3, padding=1)
        self.p0 = nn.PReLU(3)
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.b0 = nn.Conv2d(3, 2, 1)
        self.fc0 = nn.Linear(4 * 5 * 4, 6)
        self.fc1 = nn.Linear(6, 3)

    def forward(self, x):
        h = self.p0(self.c0(x))
        h = torch.relu(self.c1(h) - h)
        h = self.pool(h)  # 5x5 → 3x3
        h = torch.cat([self.b0(h), torch.sigmoid(self.b0(h))], dim=1)
        h = torch.nn.functional.pad(h.permute(0, 2, 3, 1), (0, 0, 1, 0, 0, 2))  # (3, 3, 4) → (5, 4, 4)
        return self.fc1(torch.tanh(self.fc0(h.flatten(1))))


def _torchscript(model: nn.Module, shape, tmp_path: Path) -> Network:
    from verigrad.models import load_model

    path = tmp_path / "m.pt"
    torch.jit.trace(model.eval(), (torch.zeros(2, *shape, dtype=DT),)).save(str(path))
    return load_model(path, shape)


@pytest.mark.slow
@pytest.mark.parametrize("route", EXPORTERS + ["torchscript"])
def test_every_engine_on_an_exported_graph(route, tmp_path):
    from tests.helpers import assert_contains_true_gradients
    from verigrad.bounds import compute_bounds
    from verigrad.bounds.base import Bounds
    from verigrad.perturbation import input_box, param_box

    model = _seeded(AllOps).to(DT).eval()
    shape = (2, 5, 5)
    net = _torchscript(model, shape, tmp_path) if route == "torchscript" else _load(model, shape, tmp_path, route)
    _check(model, net)
    x = _input(shape, n=1, seed=11)
    t = net.forward(x).argmax(1)
    box = input_box(x, 0.05, None)
    params = param_box(net, 0.02, "relative", [n.name for n in net.affine_layers() if n.weight.dim() == 2])
    for method in ("ibp", "crown"):
        zero = compute_bounds(method, net, Bounds(x, x), t).bounds
        ref = saliency(net, x, t)
        assert torch.allclose(zero.lower, ref, atol=1e-10) and torch.allclose(zero.upper, ref, atol=1e-10)
        res = compute_bounds(method, net, box, t)
        assert res.actual_method is None, res.notes
        assert_contains_true_gradients(res.bounds, net, box, t, "logit", n=500)
        if method == "crown" and route != "legacy":
            continue  # CROWN with a parameter box costs ~10 s here; one route shows it on exported graphs
        res_p = compute_bounds(method, net, box, t, "logit", params)
        assert res_p.actual_method is None, res_p.notes
        assert_contains_true_gradients(res_p.bounds, net, box, t, "logit", params=params, n=100)
