"""Shared test helpers: random networks, box sampling, autograd references."""
from __future__ import annotations

import torch

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
    s1 = c1.out_shape(in_shape)
    c2 = conv("conv1", 3, 4, 3, 1, 1)
    s2 = c2.out_shape(s1)
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
