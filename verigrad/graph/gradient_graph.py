"""The gradient graph: an explicit ``nn.Module`` x ↦ v(x) = ∂o/∂x built from ordinary ops.

Forward pass: every node's value in topological order. Seed g = ∂o/∂z at the logits z
(e_c for o = z_c; softmax(z) − e_c for o = CE(z, c); p_c(e_c − p) for o = p_c = softmax(z)_c).
Backward pass in reverse order: each node's gradient rule (``Node.vjp``) maps the gradient at
its output to its inputs, and the gradients arriving at a tensor from all its consumers are
summed; v is the gradient at the network input. The parameters are the same ``nn.Parameter``
in both passes, so a parameter box perturbs them consistently.
"""
from __future__ import annotations

from enum import Enum
from typing import Mapping, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from verigrad.graph import ops
from verigrad.models.network import INPUT, ActKind, Activation, Linear, Network, Node, PReLU


class Output(str, Enum):
    """The scalar o whose input gradient is the explanation."""

    LOGIT = "logit"  # o = z_c (captum's Saliency before its abs)
    LOSS = "loss"  # o = softmax cross-entropy at class c
    PROBABILITY = "probability"  # o = softmax(z)_c (for a model whose file ends in a Softmax)


def output_seed(logits: torch.Tensor, target: torch.Tensor, output: Output) -> torch.Tensor:
    """∂o/∂z_L: e_c for the logit, softmax(z) − e_c for the cross-entropy loss, p_c(e_c − p)
    for the probability p_c."""
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    output = Output(output)
    if output == Output.LOGIT:
        return onehot
    p = torch.softmax(logits, dim=1)
    if output == Output.LOSS:
        return p - onehot
    return p.gather(1, target[:, None]) * (onehot - p)


ParamOverride = Mapping[str, Tuple[torch.Tensor, torch.Tensor]]


def _smooth(layer: Node, xs: list[torch.Tensor], beta: float | None) -> torch.Tensor:
    """The node's output, or for a piecewise-linear activation with ``beta`` its softplus(β)
    surrogate: relu → softplus_β, leaky_relu / prelu(a) → a·z + (1 − a)·softplus_β(z). The
    surrogate has a non-zero second derivative, which gradient-based explanation attacks need.
    (MaxPool keeps its exact form: its gradient still moves with x through the argmax.)"""
    if beta is not None and isinstance(layer, Activation) and layer.kind == ActKind.RELU:
        return ops.softplus(xs[0], beta)
    if beta is not None and isinstance(layer, Activation) and layer.kind == ActKind.LEAKY_RELU:
        return layer.param * xs[0] + (1.0 - layer.param) * ops.softplus(xs[0], beta)
    if beta is not None and isinstance(layer, PReLU):
        return layer.slope * xs[0] + (1.0 - layer.slope) * ops.softplus(xs[0], beta)
    return layer.forward(xs)


def logits(net: Network, x: torch.Tensor, params: ParamOverride | None = None,
           smooth_beta: float | None = None) -> torch.Tensor:
    """The network's logits (B, classes), with the weights and biases of the layers named in
    ``params`` replaced (name → (weight, bias)) and, with ``smooth_beta``, piecewise-linear
    activations replaced by their softplus surrogate (see ``_smooth``)."""

    def apply(i: int, node: Node, xs: list[torch.Tensor]) -> torch.Tensor:
        if params is not None and node.name in params:
            w, b = params[node.name]
            return node.forward(xs, {"weight": w, "bias": b})
        return _smooth(node, xs, smooth_beta)

    h = net.evaluate(x, apply)[net.layers[-1].name]
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
        out = Output(output)
        if out == Output.LOGIT:
            o = z.gather(1, target[:, None]).sum()
        elif out == Output.LOSS:
            o = F.cross_entropy(z, target, reduction="sum")
        else:
            o = torch.softmax(z, dim=1).gather(1, target[:, None]).sum()
        (g,) = torch.autograd.grad(o, x, create_graph=create_graph)
    return g


class GradientGraph(nn.Module):
    """x ↦ ∂o/∂x for one class ``target`` (every sample of a batch shares it).

    The tensors node i reads are registered once: its parameters as ``w{i}`` / ``b{i}`` (see
    ``param_names``), its constants as buffers ``{key}{i}``. With o = z_c and a Linear last
    node, the backward pass starts from the row W_L[c] at that node's input, held as
    ``seed_row`` (a buffer, or a parameter when ``seed_row_parameter`` — used when the last
    layer's weights are in a parameter box; the logits themselves are then never formed).
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
        self._keys: list[dict[str, str]] = []
        dtype, device = net.dtype, net.device
        for i, node in enumerate(net.layers):
            keys: dict[str, str] = {}
            for key, value in node.tensors(net.in_shapes(i)).items():
                value = value.detach().clone().to(dtype=dtype, device=device)
                if key in node.param_keys:
                    attr = f"{key[0]}{i}"
                    self.register_parameter(attr, nn.Parameter(value, requires_grad=False))
                else:
                    attr = f"{key}{i}"
                    self.register_buffer(attr, value)
                keys[key] = attr
            self._keys.append(keys)
            if "weight" in node.param_keys:
                self.param_names[node.name] = (keys["weight"], keys["bias"])
        last = net.layers[-1]
        self._row_seed = self.output == Output.LOGIT and isinstance(last, Linear)
        if isinstance(last, Linear) and self._row_seed:
            row = last.weight[self.target : self.target + 1].detach().clone()
            if seed_row_parameter:
                self.register_parameter("seed_row", nn.Parameter(row, requires_grad=False))
            else:
                self.register_buffer("seed_row", row)
        else:
            onehot = F.one_hot(torch.tensor([self.target]), net.num_classes).to(dtype)
            self.register_buffer("onehot", onehot.to(device))

    @property
    def uses_row_seed(self) -> bool:
        """True when the backward pass starts from the row W_L[c] (logit output, Linear last
        layer); ``forward`` then accepts per-sample seed rows."""
        return self._row_seed

    def _tensors(self, i: int) -> dict[str, torch.Tensor]:
        return {k: getattr(self, attr) for k, attr in self._keys[i].items()}

    def _seed(self, logits: torch.Tensor) -> torch.Tensor:
        """∂o/∂z at the logits (B, K)."""
        b = logits.shape[0]
        onehot = cast(torch.Tensor, self.onehot)  # a registered buffer
        if self.output == Output.LOGIT:
            return onehot.expand(b, -1)
        if self.output == Output.LOSS:
            return torch.softmax(logits, dim=1) - onehot
        return ops.probability_seed(logits, self.target)

    def forward(self, x: torch.Tensor, seed: torch.Tensor | None = None) -> torch.Tensor:
        """v = ∂o/∂x for each sample of x. ``seed`` (row-seed graphs only): per-sample rows
        (B, n) replacing ``seed_row`` — a bound engine passes it as a second input so that it is
        batched like x (and can carry its own box when the last layer is perturbed)."""
        net = self.net
        nodes, wiring = net.layers, net.wiring
        n = len(nodes)
        if seed is not None and not self._row_seed:
            raise ValueError("a seed can only be given to a row-seed graph (logit output, Linear last layer)")
        stop = n - 1 if self._row_seed else n
        vals: dict[str, torch.Tensor] = {INPUT: x}
        for i in range(stop):
            vals[nodes[i].name] = nodes[i].graph_forward([vals[m] for m in wiring[i]], self._tensors(i))
        grads: dict[str, torch.Tensor] = {}
        if self._row_seed:
            row = cast(torch.Tensor, self.seed_row)  # a registered buffer or parameter
            grads[wiring[-1][0]] = row.expand(x.shape[0], -1) if seed is None else seed
        else:
            z = vals[nodes[-1].name]
            g = self._seed(z.reshape(z.shape[0], -1))
            grads[nodes[-1].name] = g.reshape(g.shape[0], *net.shapes[-1])
        for i in range(stop - 1, -1, -1):
            node = nodes[i]
            g = grads.pop(node.name)
            xs = [vals[m] for m in wiring[i]]
            for name, gi in zip(wiring[i], node.vjp(xs, g, net.in_shapes(i), self._tensors(i)), strict=True):
                if gi is not None:
                    grads[name] = grads[name] + gi if name in grads else gi
        return grads[INPUT]
