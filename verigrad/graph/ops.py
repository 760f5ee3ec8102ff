"""Activation-derivative ops of the gradient graph, h = σ'(z) ⊙ g.

Each is a plain function of tensors with the exact semantics; the auto_LiRPA adapter
registers its own relaxations for the ones auto_LiRPA cannot bound by composition.
relu'(0) = 0, as autograd has it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ReluGrad(torch.autograd.Function):
    """h = 1[z > 0] · g as ONE traced node.

    Written as a plain expression, the tracer would emit Greater/Cast/Mul and a bound engine
    would see a comparison of a perturbed tensor; as a Function with an ONNX ``symbolic`` it
    appears as the single custom node ``verigrad::ReluGrad(z, g)`` that the auto_LiRPA adapter
    relaxes jointly in (z, g). Autograd semantics are those of the plain expression:
    ∂h/∂g = 1[z > 0], ∂h/∂z = 0 (almost everywhere)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mask = (z > 0).to(g.dtype)
        ctx.save_for_backward(mask)
        return mask * g

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        # no gradient to z, as for the plain expression (the comparison is not differentiable)
        return None, mask * grad

    @staticmethod
    def symbolic(graph, z, g):  # ONNX export hook used by the tracer of bound engines
        out = graph.op("verigrad::ReluGrad", z, g)
        out.setType(g.type())  # same shape and dtype as g (spares the exporter's shape inference)
        return out


def relu_grad(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """1[z > 0] · g (one custom node when traced, see :class:`ReluGrad`)."""
    if z.shape != g.shape:  # keep the broadcasting of the plain expression
        z, g = torch.broadcast_tensors(z, g)
    return ReluGrad.apply(z, g)


def leaky_relu_grad(z: torch.Tensor, g: torch.Tensor, slope: float) -> torch.Tensor:
    """(a + (1 − a)·1[z > 0]) · g, written through relu_grad so one relaxation serves both."""
    return slope * g + (1.0 - slope) * relu_grad(z, g)


def softplus(z: torch.Tensor, beta: float) -> torch.Tensor:
    """log(1 + exp(βz)) / β."""
    return F.softplus(z * beta) / beta


def softplus_grad(z: torch.Tensor, g: torch.Tensor, beta: float) -> torch.Tensor:
    """sigmoid(βz) · g."""
    return torch.sigmoid(z * beta) * g


def sigmoid_grad(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """s(1 − s) · g with s = sigmoid(z)."""
    s = torch.sigmoid(z)
    return (s - s * s) * g


def tanh_grad(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(1 − t²) · g with t = tanh(z)."""
    t = torch.tanh(z)
    return (1.0 - t * t) * g


class ProbabilitySeed(torch.autograd.Function):
    """s = p_c (e_c − p), p = softmax(z): the gradient of o = p_c at the logits, as ONE traced
    node ``verigrad::ProbabilitySeed(z)`` (bound engines relax it by its interval)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, target: int) -> torch.Tensor:  # type: ignore[override]
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            s = _probability_seed(zz, target)
        ctx.save_for_backward(zz, s)
        return s.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        zz, s = ctx.saved_tensors
        with torch.enable_grad():
            (gz,) = torch.autograd.grad(s, zz, grad)
        return gz, None

    @staticmethod
    def symbolic(graph, z, target):
        out = graph.op("verigrad::ProbabilitySeed", z, target_i=int(target))
        out.setType(z.type())
        return out


def _probability_seed(z: torch.Tensor, target: int) -> torch.Tensor:
    p = torch.softmax(z, dim=1)
    onehot = F.one_hot(torch.full((z.shape[0],), target, device=z.device), z.shape[1]).to(z.dtype)
    return p[:, target : target + 1] * (onehot - p)


def probability_seed(z: torch.Tensor, target: int) -> torch.Tensor:
    """p_c (e_c − p) for logits z (B, K) (one custom node when traced)."""
    return ProbabilitySeed.apply(z, int(target))
