"""Shared test helpers: random networks, box sampling, autograd references."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from verigrad.bounds.base import Bounds
from verigrad.models.network import ActKind, Activation, Conv2d, Linear, Network, Reshape

ACTS = [
    (ActKind.RELU, 0.0),
    (ActKind.LEAKY_RELU, 0.1),
    (ActKind.SOFTPLUS, 2.0),
    (ActKind.SIGMOID, 0.0),
    (ActKind.TANH, 0.0),
]
ACT_IDS = [k.value for k, _ in ACTS]


def _lin(name: str, n_in: int, n_out: int, gen: torch.Generator, dtype) -> Linear:
    w = torch.randn(n_out, n_in, generator=gen, dtype=dtype) * (2.0 / n_in) ** 0.5
    b = torch.randn(n_out, generator=gen, dtype=dtype) * 0.1
    return Linear(name, w, b)


def random_mlp(act: ActKind, param: float = 0.0, sizes=(6, 8, 7, 4), seed: int = 0, dtype=torch.float64) -> Network:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(_lin(f"fc{i}", sizes[i], sizes[i + 1], gen, dtype))
        if i < len(sizes) - 2:
            layers.append(Activation(f"act{i}", act, param))
    return Network(tuple(layers), (sizes[0],), "random_mlp")


def random_cnn(act: ActKind, param: float = 0.0, seed: int = 0, dtype=torch.float64, in_shape=(2, 9, 9)) -> Network:
    """conv(stride 2, pad 1) → act → conv(stride 1, pad 1) → act → flatten → fc → act → fc."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = in_shape

    def conv(name, ci, co, k, s, p):
        wt = torch.randn(co, ci, k, k, generator=gen, dtype=dtype) * (2.0 / (ci * k * k)) ** 0.5
        return Conv2d(name, wt, torch.randn(co, generator=gen, dtype=dtype) * 0.1, (s, s), (p, p))

    c1 = conv("conv0", c, 3, 3, 2, 1)
    s1 = c1.out_shape([in_shape])
    c2 = conv("conv1", 3, 4, 3, 1, 1)
    s2 = c2.out_shape([s1])
    n = s2[0] * s2[1] * s2[2]
    layers = [
        c1, Activation("act0", act, param), c2, Activation("act1", act, param),
        Reshape("flatten", (n,)), _lin("fc0", n, 10, gen, dtype), Activation("act2", act, param),
        _lin("fc1", 10, 3, gen, dtype),
    ]
    return Network(tuple(layers), in_shape, "random_cnn")


def box_points(box: Bounds, n_interior: int, n_corners: int, seed: int = 0) -> torch.Tensor:
    """Centre, uniform interior points and random corners of a box with batch size 1:
    shape (1 + n_interior + n_corners, *box.shape[1:])."""
    gen = torch.Generator().manual_seed(seed)
    lo, up = box.lower[0], box.upper[0]
    u = torch.rand(n_interior, *lo.shape, generator=gen, dtype=lo.dtype)
    interior = lo + u * (up - lo)
    bits = torch.randint(0, 2, (n_corners, *lo.shape), generator=gen).to(lo.dtype)
    corners = lo + bits * (up - lo)
    return torch.cat([box.center[0:1], interior, corners])


def sample_network(net: Network, params, gen: torch.Generator, corner: bool) -> Network:
    """A network whose boxed parameters are drawn uniformly from ``params`` (or at a random
    corner of it); other layers unchanged."""
    from verigrad.models.network import Conv2d, Linear

    def draw(b: Bounds) -> torch.Tensor:
        u = torch.rand(b.lower.shape, generator=gen, dtype=b.lower.dtype)
        if corner:
            u = (u > 0.5).to(u.dtype)
        return b.lower + u * (b.upper - b.lower)

    import dataclasses

    layers = []
    for l in net.layers:
        box = params.get(l.name) if params is not None else None
        if box is None:
            layers.append(l)
        else:
            assert isinstance(l, (Linear, Conv2d))
            layers.append(dataclasses.replace(l, weight=draw(box.weight), bias=draw(box.bias)))
    return Network(tuple(layers), net.input_shape, net.source)


PARAM_GROUPS = 40  # parameter draws per containment check with a parameter box


def assert_contains_true_gradients(bounds: Bounds, net: Network, box: Bounds, target: torch.Tensor, output,
                                   params=None, n: int = 500, seed: int = 0, tol: float = 1e-9) -> int:
    """Sample the centre, n interior points and n corners of the input box (and, with a
    parameter box, parameters at random interior points / corners) and check autograd's
    gradient lies in ``bounds`` (batch size 1). With a parameter box the points are split into
    PARAM_GROUPS groups, each checked under its own parameter draw. Returns the number of points
    checked."""
    from verigrad.graph.gradient_graph import saliency

    pts = box_points(box, n, n, seed)
    lo, up = bounds.lower[0], bounds.upper[0]
    scale = tol * (1 + torch.maximum(lo.abs(), up.abs()))
    if params is None:
        v = saliency(net, pts, target.expand(len(pts)), output)
        bad = (v < lo - scale) | (v > up + scale)
        assert not bool(bad.any()), f"{int(bad.reshape(len(pts), -1).any(1).sum())} of {len(pts)} true gradients outside the bounds; max excess {float(torch.maximum(lo - v, v - up).max())}"
        return len(pts)
    # parameters drawn per group of points (interior and corner draws alternate; the centre uses
    # the network's own parameters): 1 + 2n points in ~PARAM_GROUPS batched autograd calls
    gen = torch.Generator().manual_seed(seed + 1)
    groups = [torch.arange(1)] + list(torch.arange(1, len(pts)).tensor_split(PARAM_GROUPS))
    for k, idx in enumerate(groups):
        if not len(idx):
            continue
        sub = sample_network(net, params, gen, corner=bool(k % 2)) if k else net
        v = saliency(sub, pts[idx], target[:1].expand(len(idx)), output)
        bad = (v < lo - scale) | (v > up + scale)
        assert not bool(bad.any()), f"group {k}: true gradient outside bounds by {float(torch.maximum(lo - v, v - up).max())}"
    return len(pts)


def cifar_cnn(seed: int = 0) -> Network:
    """A CIFAR-sized (3×32×32) net for memory tests and tools/bench_crown_memory.py: conv 3→8 4×4 s2 → relu → conv 8→16 4×4 s2 → relu → fc 576→64 → relu → fc 64→10, random weights."""
    gen = torch.Generator().manual_seed(seed)

    def conv(name, ci, co):
        w = torch.randn(co, ci, 4, 4, generator=gen, dtype=torch.float64) * (2.0 / (ci * 16)) ** 0.5
        return Conv2d(name, w, torch.randn(co, generator=gen, dtype=torch.float64) * 0.1, (2, 2), (0, 0))

    def lin(name, n_in, n_out):
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) * (2.0 / n_in) ** 0.5
        return Linear(name, w, torch.randn(n_out, generator=gen, dtype=torch.float64) * 0.1)

    layers = (conv("conv0", 3, 8), Activation("act0", ActKind.RELU), conv("conv1", 8, 16), Activation("act1", ActKind.RELU),
              Reshape("flatten", (576,)), lin("fc0", 576, 64), Activation("act2", ActKind.RELU), lin("fc1", 64, 10))
    return Network(layers, (3, 32, 32), "cifar_cnn")


# ---- hand-built ONNX graphs

def hand_onnx(nodes, inits, in_shape, out_shape, elem=TensorProto.DOUBLE, outputs=("y",), opset=17) -> onnx.ModelProto:
    """A hand-built ONNX model: input "x" (N, *in_shape), outputs (N, *out_shape), initializers in
    ``elem``'s precision (integer arrays kept as they are), checked by onnx."""
    np_dt = np.float64 if elem == TensorProto.DOUBLE else np.float32

    def arr(v):
        v = np.asarray(v)
        return v if v.dtype.kind in "iub" else v.astype(np_dt)

    graph = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("x", elem, ["N", *in_shape])],
        [helper.make_tensor_value_info(o, elem, ["N", *out_shape]) for o in outputs],
        [numpy_helper.from_array(arr(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
