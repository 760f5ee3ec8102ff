"""The gradient graph: an explicit ``nn.Module`` x ↦ v(x) = ∂o/∂x built from ordinary ops.

Forward pass z_k = W_k a_{k−1} + b_k, a_k = σ(z_k); then the backward pass
g_L = ∂o/∂z_L (one-hot e_c for o = z_c; softmax(z_L) − e_c for o = CE(z_L, c)),
g_{k−1} = W_kᵀ (σ'(z_k) ⊙ g_k), down to v = g_0. The weights are the same
``nn.Parameter`` in both passes, so a parameter box perturbs them consistently.
"""
from __future__ import annotations

from enum import Enum
from typing import Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from verigrad.graph import ops
from verigrad.models.network import ActKind, Activation, Conv2d, Linear, Network, Reshape


class Output(str, Enum):
    """The scalar o whose input gradient is the explanation."""

    LOGIT = "logit"  # o = z_c (captum's Saliency before its abs)
    LOSS = "loss"  # o = softmax cross-entropy at class c


def output_seed(logits: torch.Tensor, target: torch.Tensor, output: Output) -> torch.Tensor:
    """∂o/∂z_L: e_c for the logit, softmax(z) − e_c for the cross-entropy loss."""
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    if Output(output) == Output.LOGIT:
        return onehot
    return torch.softmax(logits, dim=1) - onehot


ParamOverride = Mapping[str, Tuple[torch.Tensor, torch.Tensor]]


def _smooth(layer: Activation, z: torch.Tensor, beta: float | None) -> torch.Tensor:
    """σ(z), or for a piecewise-linear σ with ``beta`` its softplus(β) surrogate:
    relu → softplus_β, leaky_relu(a) → a·z + (1 − a)·softplus_β(z). The surrogate has a
    non-zero second derivative, which gradient-based explanation attacks need."""
    if beta is not None and layer.kind == ActKind.RELU:
        return ops.softplus(z, beta)
    if beta is not None and layer.kind == ActKind.LEAKY_RELU:
        return layer.param * z + (1.0 - layer.param) * ops.softplus(z, beta)
    return layer.forward(z)


def logits(net: Network, x: torch.Tensor, params: ParamOverride | None = None,
           smooth_beta: float | None = None) -> torch.Tensor:
    """The network's logits (B, classes), with the weights and biases of the layers named in
    ``params`` replaced (name → (weight, bias)) and, with ``smooth_beta``, piecewise-linear
    activations replaced by their softplus surrogate (see ``_smooth``)."""
    h = x
    for layer in net.layers:
        if isinstance(layer, (Linear, Conv2d)):
            w, b = params[layer.name] if params is not None and layer.name in params else (layer.weight, layer.bias)
            h = F.linear(h, w, b) if isinstance(layer, Linear) else F.conv2d(h, w, b, layer.stride, layer.padding)
        elif isinstance(layer, Activation):
            h = _smooth(layer, h, smooth_beta)
        else:
            h = layer.forward(h)
    return h.reshape(h.shape[0], -1)


def saliency(net: Network, x: torch.Tensor, target: torch.Tensor, output: Output = Output.LOGIT, *,
             params: ParamOverride | None = None, smooth_beta: float | None = None,
             create_graph: bool = False) -> torch.Tensor:
    """Reference explanation by autograd (signed saliency ∂o/∂x), per sample class ``target``.

    ``params`` / ``smooth_beta`` as in :func:`logits`. With ``create_graph`` the result is
    differentiable with respect to x and the overriding parameters (attacks use this); x is
    then used as given (it must require grad), otherwise a detached copy is taken."""
    if not create_graph:
        x = x.detach().clone().requires_grad_(True)
    elif not x.requires_grad:
        raise ValueError("saliency(create_graph=True) needs an input that requires grad")
    with torch.enable_grad():
        z = logits(net, x, params, smooth_beta)
        if Output(output) == Output.LOGIT:
            o = z.gather(1, target[:, None]).sum()
        else:
            o = F.cross_entropy(z, target, reduction="sum")
        (g,) = torch.autograd.grad(o, x, create_graph=create_graph)
    return g


def _act_grad(layer: Activation, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    k = layer.kind
    if k == ActKind.RELU:
        return ops.relu_grad(z, g)
    if k == ActKind.LEAKY_RELU:
        return ops.leaky_relu_grad(z, g, layer.param)
    if k == ActKind.SOFTPLUS:
        return ops.softplus_grad(z, g, layer.param)
    if k == ActKind.SIGMOID:
        return ops.sigmoid_grad(z, g)
    if k == ActKind.TANH:
        return ops.tanh_grad(z, g)
    raise ValueError(f"layer {layer.name!r}: no gradient rule for activation {k}")


def _conv_backward(g: torch.Tensor, weight: torch.Tensor, layer: Conv2d, in_shape: tuple[int, ...],
                   embed: torch.Tensor | None) -> torch.Tensor:
    """Wᵀ g for a zero-padded conv, as ops auto_LiRPA 0.3 can bound: a transposed conv with
    padding 0 and output_padding 0 (its ConvTranspose asserts both); when the stride leaves
    input rows the forward never read (``layer.output_padding``), a second transposed conv with
    the constant kernel ``embed`` (identity at its top-left tap) appends those zero rows — a
    Pad node would reach auto_LiRPA in a form it cannot read; then the crop of the padding.
    Equal to ``network.conv_transpose``."""
    _, h, w = in_shape
    ph, pw = layer.padding
    full = F.conv_transpose2d(g, weight, None, layer.stride, 0)
    if embed is not None:
        full = F.conv_transpose2d(full, embed)
    return full[:, :, ph : ph + h, pw : pw + w]


def _zero_row_embedding(layer: Conv2d, in_shape: tuple[int, ...]) -> torch.Tensor | None:
    """Kernel E (C, C, 1 + e_h, 1 + e_w) with E[c, c, 0, 0] = 1: conv_transpose2d(t, E) is t
    followed by e_h zero rows and e_w zero columns."""
    eh, ew = layer.output_padding(in_shape)
    if eh == 0 and ew == 0:
        return None
    c = in_shape[0]
    e = torch.zeros(c, c, 1 + eh, 1 + ew, dtype=layer.weight.dtype, device=layer.weight.device)
    e[torch.arange(c), torch.arange(c), 0, 0] = 1
    return e


def _act_forward(layer: Activation, z: torch.Tensor) -> torch.Tensor:
    if layer.kind == ActKind.SOFTPLUS:
        return ops.softplus(z, layer.param)
    return layer.forward(z)


class GradientGraph(nn.Module):
    """x ↦ ∂o/∂x for one class ``target`` (every sample of a batch shares it).

    Parameters are registered as ``w{i}`` / ``b{i}`` for layer i (see ``param_names``).
    With o = z_c and a Linear last layer, the backward pass starts from the row W_L[c],
    held as ``seed_row`` (a buffer, or a parameter when ``seed_row_parameter`` — used when
    the last layer's weights are in a parameter box; the logits themselves are never needed).
    """

    def __init__(
        self,
        net: Network,
        target: int,
        output: Output = Output.LOGIT,
        seed_row_parameter: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= target < net.num_classes:
            raise ValueError(f"target class {target} out of range for {net.num_classes} classes")
        self.net = net
        self.target = int(target)
        self.output = Output(output)
        self.param_names: dict[str, tuple[str, str]] = {}
        for i, layer in enumerate(net.layers):
            if isinstance(layer, (Linear, Conv2d)):
                self.register_parameter(f"w{i}", nn.Parameter(layer.weight.detach().clone(), requires_grad=False))
                self.register_parameter(f"b{i}", nn.Parameter(layer.bias.detach().clone(), requires_grad=False))
                self.param_names[layer.name] = (f"w{i}", f"b{i}")
            if isinstance(layer, Conv2d):
                embed = _zero_row_embedding(layer, net.shapes[i])
                if embed is not None:
                    self.register_buffer(f"embed{i}", embed)
        last = net.layers[-1]
        self._row_seed = self.output == Output.LOGIT and isinstance(last, Linear)
        if self._row_seed:
            row = last.weight[self.target : self.target + 1].detach().clone()
            if seed_row_parameter:
                self.register_parameter("seed_row", nn.Parameter(row, requires_grad=False))
            else:
                self.register_buffer("seed_row", row)
        else:
            onehot = F.one_hot(torch.tensor([self.target]), net.num_classes).to(net.dtype)
            self.register_buffer("onehot", onehot.to(net.device))

    @property
    def uses_row_seed(self) -> bool:
        """True when the backward pass starts from the row W_L[c] (logit output, Linear last
        layer); ``forward`` then accepts per-sample seed rows."""
        return self._row_seed

    def _affine_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.net.layers[i]
        w, b = getattr(self, f"w{i}"), getattr(self, f"b{i}")
        if isinstance(layer, Linear):
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, layer.stride, layer.padding)

    def _affine_backward(self, i: int, g: torch.Tensor) -> torch.Tensor:
        layer = self.net.layers[i]
        w = getattr(self, f"w{i}")
        if isinstance(layer, Linear):
            return torch.matmul(g, w)
        in_shape = self.net.shapes[i]
        return _conv_backward(g, w, layer, in_shape, getattr(self, f"embed{i}", None))

    def forward(self, x: torch.Tensor, seed: torch.Tensor | None = None) -> torch.Tensor:
        """v = ∂o/∂x for each sample of x. ``seed`` (row-seed graphs only): per-sample rows
        (B, n) replacing ``seed_row`` — a bound engine passes it as a second input so that it is
        batched like x (and can carry its own box when the last layer is perturbed)."""
        layers = self.net.layers
        n = len(layers)
        stop = n - 1 if self._row_seed else n
        pre: dict[int, torch.Tensor] = {}
        h = x
        for i in range(stop):
            layer = layers[i]
            if isinstance(layer, Activation):
                pre[i] = h
                h = _act_forward(layer, h)
            elif isinstance(layer, Reshape):
                h = layer.forward(h)
            else:
                h = self._affine_forward(i, h)
        if seed is not None and not self._row_seed:
            raise ValueError("a seed can only be given to a row-seed graph (logit output, Linear last layer)")
        if self._row_seed:
            g = self.seed_row.expand(x.shape[0], -1) if seed is None else seed
        else:
            logits = h.reshape(h.shape[0], -1)
            if self.output == Output.LOGIT:
                g = self.onehot.expand(x.shape[0], -1)
            else:
                g = torch.softmax(logits, dim=1) - self.onehot
            g = g.reshape(g.shape[0], *self.net.shapes[-1])
            g = self._affine_backward(n - 1, g)
        for i in range(n - 2, -1, -1):
            layer = layers[i]
            if isinstance(layer, Activation):
                g = _act_grad(layer, pre[i], g)
            elif isinstance(layer, Reshape):
                g = layer.backward(g, self.net.shapes[i])
            else:
                g = self._affine_backward(i, g)
        return g
