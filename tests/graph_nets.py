"""Random graph networks (branches, every operator kind) for the soundness tests."""
from __future__ import annotations

import torch

from verigrad.models.network import (
    INPUT, ActKind, Activation, Add, Concat, Conv2d, Linear, MaxPool, Network, Pad, PReLU, Reshape, Sub, Transpose,
)


class _Gen:
    def __init__(self, seed: int, dtype=torch.float64) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def lin(self, name: str, n_in: int, n_out: int, **kw) -> Linear:
        w = torch.randn(n_out, n_in, generator=self.gen, dtype=self.dtype) * (2.0 / n_in) ** 0.5
        return Linear(name, w, torch.randn(n_out, generator=self.gen, dtype=self.dtype) * 0.1, **kw)

    def conv(self, name: str, ci: int, co: int, k: int, s: int = 1, p: int = 0, **kw) -> Conv2d:
        w = torch.randn(co, ci, k, k, generator=self.gen, dtype=self.dtype) * (2.0 / (ci * k * k)) ** 0.5
        return Conv2d(name, w, torch.randn(co, generator=self.gen, dtype=self.dtype) * 0.1, (s, s), (p, p), **kw)

    def slope(self, shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, dtype=self.dtype) * 1.4 - 0.4  # some negative, some > 1


def residual_mlp(act: ActKind = ActKind.RELU, param: float = 0.0, seed: int = 0, final_act: bool = False) -> Network:
    """fc0 → act → fc1 → act → fc2 (+ skip from act0) → act → (fc3 − fc4 of it) → fc5 [→ tanh]."""
    g = _Gen(seed)
    nodes = [
        g.lin("fc0", 5, 6), Activation("a0", act, param),
        g.lin("fc1", 6, 6), Activation("a1", act, param), g.lin("fc2", 6, 6),
        Add("res", inputs=("fc2", "a0")), Activation("a2", act, param),
        g.lin("fc3", 6, 5, inputs=("a2",)), g.lin("fc4", 6, 5, inputs=("a2",)),
        Sub("diff", inputs=("fc3", "fc4")), g.lin("fc5", 5, 3),
    ]
    if final_act:
        nodes.append(Activation("out_act", ActKind.TANH))
    return Network(tuple(nodes), (5,), "residual_mlp")


def residual_cnn(act: ActKind = ActKind.RELU, param: float = 0.0, seed: int = 0) -> Network:
    """conv(s2) → act → conv(pad 1) → act → conv(pad 1) + skip → act → flatten → fc → act → fc."""
    g = _Gen(seed)
    nodes = [
        g.conv("c0", 2, 3, 3, 2, 1), Activation("a0", act, param),
        g.conv("c1", 3, 3, 3, 1, 1), Activation("a1", act, param), g.conv("c2", 3, 3, 3, 1, 1),
        Add("res", inputs=("c2", "a0")), Activation("a2", act, param),
        Reshape("flat", (3 * 4 * 4,)), g.lin("fc0", 48, 6), Activation("a3", act, param), g.lin("fc1", 6, 3),
    ]
    return Network(tuple(nodes), (2, 7, 7), "residual_cnn")


def maxpool_cnn(act: ActKind = ActKind.RELU, seed: int = 0, ceil_mode: bool = True, pads=(1, 1, 1, 1),
                kernel=(3, 3), stride=(2, 2)) -> Network:
    """conv → act → maxpool(kernel, stride, pads, ceil_mode) → conv → act → maxpool(2) → flatten → fc."""
    g = _Gen(seed)
    c0 = g.conv("c0", 1, 3, 3, 1, 1)
    mp0 = MaxPool("mp0", kernel, stride, pads, ceil_mode)
    s = mp0.out_shape([(3, 9, 9)])
    c1 = g.conv("c1", 3, 2, 2, 1, 0)
    s = c1.out_shape([s])
    mp1 = MaxPool("mp1", (2, 2), (2, 2), (0, 0, 0, 0), True)
    s = mp1.out_shape([s])
    n = s[0] * s[1] * s[2]
    nodes = [c0, Activation("a0", act), mp0, c1, Activation("a1", act), mp1, Reshape("flat", (n,)),
             g.lin("fc", n, 4)]
    return Network(tuple(nodes), (1, 9, 9), "maxpool_cnn")


def prelu_cnn(seed: int = 0, per_channel: bool = True) -> Network:
    """conv → prelu → conv → prelu(scalar or per-channel) → flatten → fc → prelu → fc."""
    g = _Gen(seed)
    nodes = [
        g.conv("c0", 1, 3, 3, 1, 1), PReLU("p0", g.slope((3, 1, 1) if per_channel else (1,))),
        g.conv("c1", 3, 2, 3, 2, 0), PReLU("p1", g.slope((2, 1, 1) if per_channel else (1,))),
        Reshape("flat", (2 * 3 * 3,)), g.lin("fc0", 18, 5), PReLU("p2", g.slope((5,) if per_channel else (1,))),
        g.lin("fc1", 5, 3),
    ]
    return Network(tuple(nodes), (1, 7, 7), "prelu_cnn")


def concat_cnn(act: ActKind = ActKind.RELU, param: float = 0.0, seed: int = 0) -> Network:
    """Channels-last input (H, W, C) → transpose → pad → two conv branches → concat → act → flatten → fc."""
    g = _Gen(seed)
    nodes = [
        Transpose("to_chw", (2, 0, 1)),
        Pad("pad", ((0, 0), (1, 0), (0, 2)), 0.0),
        g.conv("b0", 2, 2, 3, 1, 1, inputs=("pad",)), Activation("ab0", act, param),
        g.conv("b1", 2, 3, 1, 1, 0, inputs=("pad",)),
        Concat("cat", 0, inputs=("ab0", "b1")), Activation("a", act, param),
        Pad("pad2", ((0, 0), (0, 1), (1, 0)), 0.5),
        Transpose("to_hwc", (1, 2, 0)), Reshape("flat", (7 * 9 * 5,)), g.lin("fc0", 315, 6),
        Activation("a1", act, param), g.lin("fc1", 6, 3),
    ]
    return Network(tuple(nodes), (5, 6, 2), "concat_cnn")


def input_fanout_mlp(act: ActKind = ActKind.SOFTPLUS, param: float = 2.0, seed: int = 0) -> Network:
    """The input read by two branches, summed, and an activation after the last affine layer."""
    g = _Gen(seed)
    nodes = [
        g.lin("fa", 4, 5, inputs=(INPUT,)), Activation("aa", act, param),
        g.lin("fb", 4, 5, inputs=(INPUT,)),
        Add("sum", inputs=("aa", "fb")), Activation("as", act, param), g.lin("out", 5, 3),
        Activation("sig", ActKind.SIGMOID),
    ]
    return Network(tuple(nodes), (4,), "input_fanout_mlp")


GRAPHS = {
    "residual_mlp": lambda: residual_mlp(),
    "residual_mlp_leaky_final": lambda: residual_mlp(ActKind.LEAKY_RELU, 0.1, seed=1, final_act=True),
    "residual_mlp_tanh": lambda: residual_mlp(ActKind.TANH, seed=2),
    "residual_cnn": lambda: residual_cnn(),
    "residual_cnn_softplus": lambda: residual_cnn(ActKind.SOFTPLUS, 2.0, seed=3),
    "maxpool_cnn": lambda: maxpool_cnn(),
    "maxpool_cnn_floor": lambda: maxpool_cnn(ActKind.SIGMOID, seed=4, ceil_mode=False, pads=(0, 1, 1, 0),
                                             kernel=(2, 3), stride=(2, 1)),
    "prelu_cnn": lambda: prelu_cnn(),
    "prelu_cnn_scalar": lambda: prelu_cnn(seed=5, per_channel=False),
    "concat_cnn": lambda: concat_cnn(),
    "input_fanout_mlp": lambda: input_fanout_mlp(),
}


# -- small nets for the exact oracle (≤ 12 inputs): branch and bound through MaxPool and PReLU -----

def tiny_pool_net(seed: int = 0, variant: int = 0) -> Network:
    """≤ 12 inputs, a MaxPool among relu / leaky relu layers. variant 0: (1, 3, 4) → conv 2×2 →
    relu → maxpool 2×2 s1 (overlapping windows) → fc; 1: (2, 2, 3) → conv 1×1 → leaky relu →
    maxpool 2×2 s2 ceil (a window with padding taps) → fc → relu → fc; 2: (1, 3, 4) → maxpool
    2×2 s2 on the input → fc → relu → fc."""
    g = _Gen(seed)
    if variant == 0:
        nodes = [g.conv("c0", 1, 2, 2), Activation("a0", ActKind.RELU),
                 MaxPool("mp", (2, 2), (1, 1)), Reshape("flat", (4,)), g.lin("fc", 4, 3)]
        return Network(tuple(nodes), (1, 3, 4), "tiny_pool_overlap")
    if variant == 1:
        nodes = [g.conv("c0", 2, 2, 1), Activation("a0", ActKind.LEAKY_RELU, 0.2),
                 MaxPool("mp", (2, 2), (2, 2), (0, 0, 0, 1), True), Reshape("flat", (4,)), g.lin("fc0", 4, 6),
                 Activation("a1", ActKind.RELU), g.lin("fc1", 6, 3)]
        return Network(tuple(nodes), (2, 2, 3), "tiny_pool_padded")
    nodes = [MaxPool("mp", (2, 2), (2, 2)), Reshape("flat", (2,)), g.lin("fc0", 2, 6),
             Activation("a0", ActKind.RELU), g.lin("fc1", 6, 3)]
    return Network(tuple(nodes), (1, 3, 4), "tiny_pool_input")


def prelu_mlp(seed: int = 0, sizes: tuple[int, ...] = (5, 7, 6, 3),
              slopes: tuple[tuple[float, ...], ...] = ((-0.5, 0.3, 1.6, 0.0, 2.0, -1.2, 0.9), (1.5,))) -> Network:
    """fc → prelu → fc → prelu → … → fc with the given slopes (one per unit, or a scalar):
    negative ones (f non-monotone), ones above 1 (f concave) and ones in [0, 1]."""
    g = _Gen(seed)
    nodes: list = []
    for i in range(len(sizes) - 1):
        nodes.append(g.lin(f"fc{i}", sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            nodes.append(PReLU(f"p{i}", torch.tensor(slopes[i], dtype=torch.float64)))
    return Network(tuple(nodes), (sizes[0],), "prelu_mlp")
