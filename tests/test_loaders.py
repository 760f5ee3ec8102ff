"""Model loaders: ONNX files, TorchScript files and nn.Modules lowered to a Network must
compute the original model's logits and, through the gradient graph, its input gradients."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from torch import nn

from tests.helpers import hand_onnx, save_onnx
from verigrad.graph.gradient_graph import GradientGraph, Output
from verigrad.models import add_normalization, from_module, load_model, load_onnx
from verigrad.models.network import ActKind, Activation, Conv2d, Linear, ModelError, Network

DT = torch.float64
# torch.jit.trace/save/load and the legacy ONNX exporter warn that they are deprecated
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# -- torch models ------------------------------------------------------------------------


class Normalize(nn.Module):
    """A custom module (so from_module goes through ONNX): (x − mean)/std per channel."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=DT).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=DT).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


ACT_MODULES = {
    "relu": lambda: nn.ReLU(),
    "leaky": lambda: nn.LeakyReLU(0.1),
    "softplus1": lambda: nn.Softplus(),
    "softplus10": lambda: nn.Softplus(beta=10.0),
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
}


def _randomize_bn(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, so folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=DT) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=DT) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=gen, dtype=DT) * 0.5 + 1)
            m.bias.data.copy_(torch.randn(c, generator=gen, dtype=DT) * 0.2)


def make_mlp(act: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Linear → BN1d (folded) → σ → Linear → σ → Dropout → BN1d (stand-alone) → Linear."""
    torch.manual_seed(seed)
    a = ACT_MODULES[act]
    model = nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), a(),
        nn.Sequential(nn.Linear(8, 7), a(), nn.Dropout(0.5)),
        nn.BatchNorm1d(7), nn.Linear(7, 4),
    )
    model = model.to(DT).eval()
    _randomize_bn(model, seed)
    return model, (6,)


def make_cnn(act: str, seed: int = 0, normalize: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    """conv(k3, s2, p1; 10 → 5, stride remainder 1) → BN2d (folded) → σ →
    conv(k(3,2), s(2,3), p(1,0); uneven) → σ → avgpool(2, s1) → BN2d (stand-alone) →
    avgpool(3, s2, p1) → flatten → Linear → σ → Linear; optionally a custom Normalize first."""
    torch.manual_seed(seed)
    a = ACT_MODULES[act]
    layers: list[nn.Module] = [Normalize([0.1, -0.2], [0.5, 2.0])] if normalize else []
    layers += [
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), a(),
        nn.Conv2d(3, 4, (3, 2), stride=(2, 3), padding=(1, 0)), a(),
        nn.AvgPool2d(2, stride=1), nn.BatchNorm2d(4), nn.AvgPool2d(3, stride=2, padding=1),
        nn.Flatten(), nn.Linear(4, 5), a(), nn.Linear(5, 3),
    ]
    model = nn.Sequential(*layers).to(DT).eval()
    _randomize_bn(model, seed)
    return model, (2, 10, 10)


def _export(model: nn.Module, shape: tuple[int, ...], path: Path, dynamic: bool = True) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, *shape, dtype=DT),), str(path), dynamo=False,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}} if dynamic else None,
        )
    return path


def _load(route: str, model: nn.Module, shape: tuple[int, ...], tmp_path: Path) -> Network:
    if route == "onnx":
        return load_model(_export(model, shape, tmp_path / "m.onnx"))
    if route == "module":
        return from_module(model, shape)
    traced = torch.jit.trace(model, torch.zeros(2, *shape, dtype=DT))
    torch.jit.save(traced, str(tmp_path / "m.pt"))
    return load_model(tmp_path / "m.pt", shape)


def _torch_input_grad(model: nn.Module, x: torch.Tensor, c: int, output: Output) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    logits = model(x)
    target = torch.full((x.shape[0],), c)
    if output == Output.LOGIT:
        o = logits[:, c].sum()
    elif output == Output.LOSS:
        o = F.cross_entropy(logits, target, reduction="sum")
    else:
        o = torch.softmax(logits, dim=1)[:, c].sum()
    (g,) = torch.autograd.grad(o, x)
    return g


def _check_equivalent(model: nn.Module, net: Network, act: str, via_onnx: bool = False) -> None:
    x = torch.randn(4, *net.input_shape, dtype=DT, generator=torch.Generator().manual_seed(7))
    assert net.dtype == DT
    # torch's Softplus returns z for β·z > 20; we (and ONNX) use the exact function, which
    # differs by at most log(1 + e^-20)/β ≈ 2e-9/β
    tol = 1e-8 if act.startswith("softplus") else 1e-11
    if via_onnx and act == "leaky":
        # ONNX stores LeakyRelu's alpha as float32 and the loader uses the file's exact value
        # (0.10000000149 for torch's 0.1): the ONNX route differs from torch's float64 module
        # by ~1e-9 relative, so it is compared at 1e-6 relative
        tol = 1e-6
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x), model(x), rtol=tol, atol=tol)
    for c in range(net.num_classes):
        for output in Output:
            got = GradientGraph(net, c, output)(x)
            torch.testing.assert_close(got, _torch_input_grad(model, x, c, output), rtol=tol, atol=tol)


# -- equivalence over every supported layer and every route -------------------------------


@pytest.mark.parametrize("route", ["onnx", "module", "torchscript"])
@pytest.mark.parametrize("act", list(ACT_MODULES))
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_loaded_network_matches_torch(arch, act, route, tmp_path):
    model, shape = make_mlp(act) if arch == "mlp" else make_cnn(act)
    net = _load(route, model, shape, tmp_path)
    _check_equivalent(model, net, act, via_onnx=route != "module")
    kinds = {l.kind for l in net.layers if isinstance(l, Activation)}
    assert len(kinds) == 1
    if act == "softplus10":
        assert all(l.param == 10.0 for l in net.layers if isinstance(l, Activation))


@pytest.mark.parametrize("route", ["onnx", "module", "torchscript"])
def test_custom_normalization_module(route, tmp_path):
    """Sub/Div constants at the graph input become one fixed '/normalize' layer."""
    model, shape = make_cnn("relu", seed=1, normalize=True)
    net = _load(route, model, shape, tmp_path)
    _check_equivalent(model, net, "relu")
    first = net.layers[0]
    assert isinstance(first, Conv2d) and not first.perturbable and first.name.endswith("/normalize")
    assert sum(l.name.endswith("/normalize") for l in net.layers) == 1  # Sub and Div merged


def test_sequential_names_and_folding():
    model, shape = make_cnn("tanh")
    net = from_module(model, shape)
    names = [l.name for l in net.layers]
    # module paths; BN after conv is folded into "0"; stand-alone BN and pools are fixed layers
    assert names == ["0", "2", "3", "4", "5/avgpool", "6/batchnorm", "7/avgpool", "8", "9", "10", "11"]
    fixed = {l.name for l in net.affine_layers() if not l.perturbable}
    assert fixed == {"5/avgpool", "6/batchnorm", "7/avgpool"}
    model, shape = make_mlp("relu")
    assert [l.name for l in from_module(model, shape).layers] == ["0", "2", "3.0", "3.1", "4/batchnorm", "5"]


def test_onnx_names_and_softplus_beta(tmp_path):
    model, shape = make_mlp("softplus10")
    net = load_onnx(_export(model, shape, tmp_path / "m.onnx"))
    assert [l.name for l in net.layers] == [
        "/0/Gemm", "/2/Softplus", "/3/3.0/Gemm", "/3/3.1/Softplus", "/4/BatchNormalization/affine", "/5/Gemm",
    ]
    sp = net.layer("/2/Softplus")
    assert isinstance(sp, Activation) and sp.kind == ActKind.SOFTPLUS and sp.param == 10.0


def test_add_normalization(tmp_path):
    model, shape = make_cnn("relu", seed=2)
    mean, std = [0.1, -0.2], [0.5, 2.0]
    ref = nn.Sequential(Normalize(mean, std), model)
    net = load_model(_export(model, shape, tmp_path / "m.onnx"), normalization=(mean, std))
    assert net.layers[0].name == "input/normalize" and not net.layers[0].perturbable
    _check_equivalent(ref, net, "relu")
    mlp, mshape = make_mlp("relu")
    net = add_normalization(from_module(mlp, mshape), [0.5], [0.25])
    assert isinstance(net.layers[0], Linear)
    x = torch.randn(3, 6, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x), mlp((x - 0.5) / 0.25))
    with pytest.raises(ModelError, match="std must be > 0"):
        add_normalization(net, [0.0], [0.0])
    with pytest.raises(ModelError, match="3 values"):
        add_normalization(net, [0.0, 0.0, 0.0], [1.0])


class _ViewNet(nn.Module):
    """Custom forward with x.view(x.size(0), -1): the reshape arithmetic must be resolved."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sigmoid(self.conv(x))
        return self.fc(h.view(h.size(0), -1))


@pytest.mark.parametrize("dynamic", [True, False])
def test_view_batch_reshape(dynamic, tmp_path):
    torch.manual_seed(0)
    model = _ViewNet().to(DT).eval()
    net = load_onnx(_export(model, (1, 6, 6), tmp_path / "v.onnx", dynamic=dynamic))
    _check_equivalent(model, net, "sigmoid")
    _check_equivalent(model, from_module(model, (1, 6, 6)), "sigmoid")


# -- hand-built ONNX graphs: Gemm attributes, MatMul+Add, BN after Conv --------------------


def test_gemm_attributes_matmul_add(tmp_path):
    rng = np.random.default_rng(0)
    w1, b1 = rng.normal(size=(4, 5)), rng.normal(size=5)
    w2, c2 = rng.normal(size=(5, 3)), rng.normal(size=(1, 3))
    w3 = rng.normal(size=(3, 2))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Add", ["b1", "h1"], ["h2"], name="bias1"),
        helper.make_node("LeakyRelu", ["h2"], ["h3"], name="act", alpha=0.2),
        helper.make_node("Gemm", ["h3", "w2", "c2"], ["h4"], name="gemm", alpha=0.5, beta=2.0),
        helper.make_node("Identity", ["h4"], ["h5"], name="id"),
        helper.make_node("MatMul", ["h5", "w3"], ["y"], name="mm2"),
    ]
    path = save_onnx(hand_onnx(nodes, dict(w1=w1, b1=b1, w2=w2, c2=c2, w3=w3), [4], [2]), tmp_path / "g.onnx")
    net = load_model(path)
    assert [l.name for l in net.layers] == ["mm1", "act", "gemm", "mm2"]
    x = rng.normal(size=(3, 4))
    h = x @ w1 + b1
    h = np.where(h > 0, h, 0.2 * h)
    ref = (0.5 * h @ w2 + 2.0 * c2) @ w3
    torch.testing.assert_close(net.forward(torch.tensor(x)), torch.tensor(ref))


def test_batchnorm_after_conv_is_folded(tmp_path):
    rng = np.random.default_rng(1)
    inits = dict(
        w=rng.normal(size=(3, 2, 3, 3)), b=rng.normal(size=3), g=rng.normal(size=3), be=rng.normal(size=3),
        m=rng.normal(size=3), v=rng.uniform(0.5, 1.5, size=3), fw=rng.normal(size=(2, 3 * 3 * 3)),
    )
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "m", "v"], ["bn"], name="bn", epsilon=1e-3),
        helper.make_node("Tanh", ["bn"], ["t"], name="tanh"),
        helper.make_node("Flatten", ["t"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fw"], ["y"], name="fc", transB=1),
    ]
    net = load_onnx(save_onnx(hand_onnx(nodes, inits, [2, 6, 6], [2]), tmp_path / "bn.onnx"))
    assert [l.name for l in net.layers] == ["conv", "tanh", "flat", "fc"]
    x = torch.tensor(rng.normal(size=(3, 2, 6, 6)))
    t = {k: torch.tensor(v) for k, v in inits.items()}
    z = F.batch_norm(F.conv2d(x, t["w"], t["b"], 2, 1), t["m"], t["v"], t["g"], t["be"], eps=1e-3)
    ref = F.linear(torch.tanh(z).flatten(1), t["fw"])
    torch.testing.assert_close(net.forward(x), ref)


def test_input_normalization_ops_and_fixed_affine(tmp_path):
    """Scalar / per-feature Mul, Add, Sub (both orders) at the input merge into one fixed
    layer; a Div in mid-network becomes a fixed '/affine' layer; per-element constants are refused."""
    rng = np.random.default_rng(2)
    inits = dict(two=np.array(2.0), shift=rng.normal(size=(1, 4)), c=np.array([1.0, 2.0, 3.0, 4.0]),
                 w=rng.normal(size=(4, 5)), three=np.array([3.0]), fw=rng.normal(size=(2, 5)), fb=rng.normal(size=2))
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["a"], name="scale"),
        helper.make_node("Add", ["a", "shift"], ["b"], name="shift"),
        helper.make_node("Sub", ["c", "b"], ["d"], name="flip"),
        helper.make_node("MatMul", ["d", "w"], ["e"], name="mm"),
        helper.make_node("Sigmoid", ["e"], ["f"], name="sig"),
        helper.make_node("Div", ["f", "three"], ["g"], name="div"),
        helper.make_node("Gemm", ["g", "fw", "fb"], ["y"], name="fc", transB=1),
    ]
    net = load_onnx(save_onnx(hand_onnx(nodes, inits, [4], [2]), tmp_path / "n.onnx"))
    assert [l.name for l in net.layers] == ["scale/normalize", "mm", "sig", "div/affine", "fc"]
    assert [l.perturbable for l in net.affine_layers()] == [False, True, False, True]
    x = rng.normal(size=(3, 4))
    h = 1.0 / (1.0 + np.exp(-((inits["c"] - (2.0 * x + inits["shift"])) @ inits["w"])))
    ref = (h / 3.0) @ inits["fw"].T + inits["fb"]
    torch.testing.assert_close(net.forward(torch.tensor(x)), torch.tensor(ref))
    inits["two"] = rng.normal(size=(4,))  # per feature is fine for a flat input ...
    load_onnx(save_onnx(hand_onnx(nodes, inits, [4], [2]), tmp_path / "n2.onnx"))
    conv_nodes = [
        helper.make_node("Mul", ["x", "px"], ["a"], name="perpixel"),
        helper.make_node("Flatten", ["a"], ["y"], name="flat"),
    ]
    bad = hand_onnx(conv_nodes, dict(px=rng.normal(size=(1, 2, 2))), [1, 2, 2], [4])
    with pytest.raises(ModelError, match=r"'perpixel' \(Mul\): only scalar or per-channel"):
        load_onnx(save_onnx(bad, tmp_path / "bad.onnx"))


def test_pooling_and_standalone_batchnorm(tmp_path):
    rng = np.random.default_rng(3)
    inits = dict(
        mean=np.array([0.5, -0.5]).reshape(1, 2, 1, 1), w=rng.normal(size=(3, 2, 3, 3)),
        g=rng.normal(size=3), be=rng.normal(size=3), m=rng.normal(size=3), v=rng.uniform(0.5, 1.5, size=3),
        fw=rng.normal(size=(3, 2)),
    )
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["a"], name="sub"),
        helper.make_node("Conv", ["a", "w"], ["b"], name="conv", strides=[1, 1]),
        helper.make_node("Relu", ["b"], ["c"], name="relu"),
        helper.make_node("AveragePool", ["c"], ["d"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["d", "g", "be", "m", "v"], ["e"], name="bn"),
        helper.make_node("GlobalAveragePool", ["e"], ["f"], name="gap"),
        helper.make_node("Flatten", ["f"], ["h"], name="flat"),
        helper.make_node("Dropout", ["h"], ["i"], name="drop"),
        helper.make_node("Gemm", ["i", "fw"], ["y"], name="fc"),
    ]
    net = load_onnx(save_onnx(hand_onnx(nodes, inits, [2, 7, 7], [2]), tmp_path / "p.onnx"))
    assert [l.name for l in net.layers] == [
        "sub/normalize", "conv", "relu", "pool/avgpool", "bn/affine", "gap/avgpool", "flat", "fc",
    ]
    t = {k: torch.tensor(v) for k, v in inits.items()}
    x = torch.tensor(rng.normal(size=(3, 2, 7, 7)))
    z = F.avg_pool2d(torch.relu(F.conv2d(x - t["mean"], t["w"])), 2)
    z = F.batch_norm(z, t["m"], t["v"], t["g"], t["be"])
    ref = F.adaptive_avg_pool2d(z, 1).flatten(1) @ t["fw"]
    torch.testing.assert_close(net.forward(x), ref)
    for c in range(2):
        xg = x.clone().requires_grad_(True)
        z = F.avg_pool2d(torch.relu(F.conv2d(xg - t["mean"], t["w"])), 2)
        z = F.batch_norm(z, t["m"], t["v"], t["g"], t["be"])
        (g,) = torch.autograd.grad((F.adaptive_avg_pool2d(z, 1).flatten(1) @ t["fw"])[:, c].sum(), xg)
        torch.testing.assert_close(GradientGraph(net, c)(x), g)


# -- errors -------------------------------------------------------------------------------


def test_unsupported_op_names_op_and_node(tmp_path):
    # the ONNX loader lowers MaxPool now; an op it does not know is refused naming op and node
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ELU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)).to(DT).eval()
    path = _export(model, (1, 8, 8), tmp_path / "model.onnx")
    with pytest.raises(ModelError, match=r"model\.onnx: unsupported ONNX op 'Elu' at node '/1/Elu'"):
        load_onnx(path)
    # from_module walks MaxPool2d now; an unsupported torch.nn layer is still refused by name
    bad = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Hardswish(), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)).to(DT).eval()
    with pytest.raises(ModelError, match=r"'1' \(Hardswish\)"):
        from_module(bad, (1, 8, 8))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.out(h + torch.relu(self.fc2(h)))


def test_residual_loads_as_a_graph(tmp_path):
    """A residual connection is an Add node reading two branches (more in test_onnx_graphs.py)."""
    model = _Residual().to(DT).eval()
    for net in (load_onnx(_export(model, (4,), tmp_path / "res.onnx")), from_module(model, (4,))):
        assert not net.is_chain and any(l.op == "add" for l in net.layers)
        _check_equivalent(model, net, "relu")


def test_batch_mixing_reshape_refused():
    class Mix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.reshape(-1, 3))

    with pytest.raises(ModelError, match="batch dimension"):
        from_module(Mix().to(DT), (6,))


def test_file_errors(tmp_path):
    with pytest.raises(ModelError, match=r"model\.h5.*'\.h5'.*\.onnx.*\.pt"):
        load_model(tmp_path / "model.h5")
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a TorchScript archive"):
        load_model(tmp_path / "junk.pt", (4,))
    model, shape = make_mlp("relu")
    path = _export(model, shape, tmp_path / "m.onnx")
    with pytest.raises(ModelError, match=r"input_shape \(7,\).*declared.*\(6,\)"):
        load_model(path, input_shape=(7,))
    with pytest.raises(ModelError, match="input_shape is required"):
        load_model(model)


def test_conv_options_refused(tmp_path):
    with pytest.raises(ModelError, match="groups=2"):
        from_module(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 1)), (2, 3, 3))
    model = nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2), nn.Flatten(), nn.Linear(1, 1)).to(DT).eval()
    with pytest.raises(ModelError, match=r"node '/0/Conv' \(Conv\): dilation"):
        load_onnx(_export(model, (1, 5, 5), tmp_path / "d.onnx"))
    pool = nn.Sequential(nn.AvgPool2d(2, padding=1, count_include_pad=False), nn.Flatten(), nn.Linear(4, 1))
    with pytest.raises(ModelError, match="count_include_pad"):
        from_module(pool, (1, 2, 2))
    with pytest.raises(ModelError, match="count_include_pad"):
        load_onnx(_export(pool.to(DT), (1, 2, 2), tmp_path / "p.onnx"))
