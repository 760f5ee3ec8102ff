"""Activation-derivative ops of the gradient graph, h = σ'(z) ⊙ g.

Each is a plain function of tensors with the exact semantics; the auto_LiRPA adapter
registers its own relaxations for the ones auto_LiRPA cannot bound by composition.
relu'(0) = 0, as autograd has it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def relu_grad(z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """1[z > 0] · g."""
    return (z > 0).to(g.dtype) * g


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
