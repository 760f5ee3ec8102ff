"""Rigorous rounding allowance of a CROWN pass: the magnitude of the back-substituted bound.

A CROWN bound of node y is a sum of products Σ_paths Π (relaxation coefficient) · (input or
intercept), accumulated by back-substitution in round-to-nearest. Whatever the order and
blocking of those sums, its computed value differs from the exact one by at most

    γ_n · M(y),   M(y) = the same sum evaluated with every term replaced by its absolute value

(Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1 and Lemma 3.5: each term passes
at most n roundings; n is :func:`verigrad.bounds.rounding.crown_chain_length`). M is computed
forward, node by node, from upper bounds on the coefficients of every linear relaxation the node
uses, written ``M(out) ≥ Σ_i |α_i| M(x_i) + |β|`` over both planes:

- affine / bilinear ops (Linear, MatMul, Conv, ConvTranspose, Mul, Div by a constant): the op
  itself applied to the magnitudes (it is monotone in nonnegative arguments); two perturbed
  operands a·b are relaxed by McCormick planes, whose coefficients are the other operand's
  bounds: M = f(M_a, B*) + f(A*, M_b) + f(A*, B*), A* = max(|a_l|, |a_u|);
- shape ops: the op applied to the magnitudes; Add, Sub: M_a + M_b;
- ReLU / LeakyReLU(a): slopes in [min(a, 1), max(a, 1)], intercepts ≤ |1 − a|·X*;
  sigmoid: slope ≤ 1/4, intercept ≤ 1 + X*/4 + 1/4 (tangent or chord lines through a point
  of the graph; sup|t·σ'(t)| < 1/4); tanh: slope ≤ 1, intercept ≤ 1 + X* + 1/2; our softplus
  planes: slopes in [0, 1], intercepts ≤ 2X* + 1;
- our relu'(z)·g and MaxPool planes: their own coefficients, at both ends of α ∈ [0, 1];
  softmax / probability seeds: constant planes of terms at most 1 in magnitude (M = 2).

A coefficient computed in floating point is itself off by a few roundings relative to its
magnitude, so the relaxation it defines is valid only up to that: ``crown_chain_length`` counts
LIB_ROUNDINGS more roundings per node for it. This is the one module besides
:mod:`verigrad.bounds.lirpa` and :mod:`verigrad.bounds.lirpa_ops` that touches auto_LiRPA nodes.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from verigrad.bounds.lirpa_compat import import_auto_lirpa
from verigrad.errors import InternalError
from verigrad.operators.pooling import _scatter_taps

import_auto_lirpa()
from auto_LiRPA.operators import (  # noqa: E402
    BoundAdd,
    BoundConcat,
    BoundConstantOfShape,
    BoundConv,
    BoundConvTranspose,
    BoundDiv,
    BoundExpand,
    BoundFlatten,
    BoundLeakyRelu,
    BoundLinear,
    BoundMatMul,
    BoundMul,
    BoundNeg,
    BoundPad,
    BoundRelu,
    BoundReshape,
    BoundShape,
    BoundSigmoid,
    BoundSlice,
    BoundSqueeze,
    BoundSub,
    BoundTanh,
    BoundTranspose,
    BoundUnsqueeze,
    BoundWhere,
)

from verigrad.bounds.lirpa_ops import (  # noqa: E402
    BoundMaxPoolGrad,
    BoundMaxPoolOp,
    BoundProbabilitySeed,
    BoundReluGrad,
    BoundSoftmaxBox,
    BoundSoftplusRelaxed,
    relu_grad_planes,
)

# ops whose relaxation is the op itself (exact, linear in the perturbed input); magnitudes pass
# through the op
_SHAPE_OPS = (BoundReshape, BoundUnsqueeze, BoundSqueeze, BoundFlatten, BoundSlice, BoundConcat, BoundTranspose,
              BoundExpand, BoundPad)
# unperturbed float ops whose value is exact (selection, broadcasting, filling): |value|
_EXACT_CONSTANT_OPS = (BoundWhere, BoundConstantOfShape, BoundExpand, BoundShape)
# bilinear ops f(a, b[, bias]): linear in each operand
_PRODUCT_OPS = (BoundLinear, BoundMatMul, BoundConv, BoundConvTranspose, BoundMul, BoundDiv)


class MagnitudeError(InternalError):
    """A perturbed auto_LiRPA node of a kind without a magnitude rule (a verigrad bug: every op our
    gradient graphs lower to has one)."""


def _call(node: Any, *args: Any) -> Tensor:
    """``node.forward(*args)`` without the state auto_LiRPA's forwards store on the node (input
    shapes, saved operands), which later bound passes read."""
    state = dict(node.__dict__)
    try:
        return node.forward(*args)
    finally:
        node.__dict__.clear()
        node.__dict__.update(state)


def _end_max(node: Any) -> Tensor | None:
    """max(|l|, |u|) of a node's bounds, None without bounds."""
    lo, up = getattr(node, "lower", None), getattr(node, "upper", None)
    if isinstance(lo, Tensor) and isinstance(up, Tensor):
        return torch.maximum(lo.abs(), up.abs())
    return None


class Magnitudes:
    """M(node) for the nodes of one bounded model, memoised until :meth:`reset` (the bounds a
    rule reads are those the relaxations use: every node's inputs are bounded before any
    backward pass crosses the node)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.memo: dict[str, Tensor] = {}

    def reset(self) -> None:
        self.memo.clear()

    def __call__(self, node: Any) -> Tensor:
        m = self.memo.get(node.name)
        if m is None:
            with torch.no_grad():
                m = self._compute(node)
            if isinstance(m, Tensor) and m.is_floating_point():
                # an overflow (inf, or inf − inf) only loosens: the allowance becomes infinite
                m = torch.nan_to_num(m.detach(), nan=math.inf)
            self.memo[node.name] = m
        return m

    def _value_or_m(self, node: Any) -> Tensor:
        """X* = max|x| over the box: from the node's bounds, else its magnitude (M ≥ |x|)."""
        e = _end_max(node) if node.perturbed else None
        return e if e is not None else self(node)

    def _compute(self, node: Any) -> Tensor:
        ins = node.inputs
        if not ins:  # a root: the input box, a parameter box, or a constant
            pert = getattr(node, "perturbation", None) if node.perturbed else None
            if pert is None:
                v = self.model.get_forward_value(node)
                return v.abs() if isinstance(v, Tensor) and v.is_floating_point() else v
            lo, up = getattr(pert, "x_L", None), getattr(pert, "x_U", None)
            if isinstance(lo, Tensor) and isinstance(up, Tensor):
                return torch.maximum(lo.abs(), up.abs())
            e = _end_max(node)
            if e is None:
                raise MagnitudeError(f"perturbed root {node.name} has no box")
            return e
        if not node.perturbed:
            v = self.model.get_forward_value(node)
            if not (isinstance(v, Tensor) and v.is_floating_point()):
                return v  # shape arithmetic (sizes, indices, masks): exact, passed on as is
            if isinstance(node, _EXACT_CONSTANT_OPS):
                return v.abs()
        # a computed value (perturbed or not) is off by γ_n times the absolute evaluation of its sum
        if isinstance(node, _SHAPE_OPS):
            return _call(node, *[self(i) for i in ins]).abs()
        if isinstance(node, BoundNeg):
            return self(ins[0])
        if isinstance(node, (BoundAdd, BoundSub)):
            return self(ins[0]) + self(ins[1])
        if isinstance(node, _PRODUCT_OPS):
            return self._product(node)
        if isinstance(node, BoundRelu):
            return self(ins[0]) + self._value_or_m(ins[0])
        if isinstance(node, BoundLeakyRelu):
            a = float(node.alpha)
            return max(1.0, abs(a)) * self(ins[0]) + abs(1.0 - a) * self._value_or_m(ins[0])
        if isinstance(node, BoundSigmoid):
            return 0.25 * (self(ins[0]) + self._value_or_m(ins[0])) + 1.25
        if isinstance(node, BoundTanh):
            return self(ins[0]) + self._value_or_m(ins[0]) + 1.5
        if isinstance(node, BoundSoftplusRelaxed):
            return self(ins[0]) + 2.0 * self._value_or_m(ins[0]) + 1.0
        if isinstance(node, BoundReluGrad):
            return self._relu_grad(node)
        if isinstance(node, BoundMaxPoolOp):
            return 2.0 * _call(node, self(ins[0]))
        if isinstance(node, BoundMaxPoolGrad):
            return self._maxpool_grad(node)
        if isinstance(node, (BoundSoftmaxBox, BoundProbabilitySeed)):
            return torch.full_like(self._value_or_m(ins[0]), 2.0)
        raise MagnitudeError(f"no rounding-magnitude rule for the auto_LiRPA node {node.name} "
                             f"({type(node).__name__})")

    def _product(self, node: Any) -> Tensor:
        """f(M_a, |b|) + M_bias with one perturbed operand; the McCormick sum with two."""
        ins = node.inputs
        a, b = ins[0], ins[1]
        bias = list(ins[2:])
        f: Callable[..., Tensor]
        if isinstance(node, BoundMatMul):  # its forward stores the operands (as parameters, some)
            f = torch.matmul
        elif isinstance(node, BoundMul):
            f = torch.mul
        elif isinstance(node, BoundDiv):
            f = torch.div
        else:
            f = lambda *args: _call(node, *args)  # noqa: E731
        if isinstance(node, BoundDiv) and (b.perturbed or b.inputs):
            # M_a / |b| bounds the quotient's terms only for an exact divisor
            raise MagnitudeError(f"auto_LiRPA node {node.name}: division by a computed tensor")
        bias_m = [self(c) for c in bias]
        if not (a.perturbed and b.perturbed):
            return f(self(a), self(b), *bias_m).abs()
        a_max, b_max = self._value_or_m(a), self._value_or_m(b)
        zero_bias = [torch.zeros_like(c) for c in bias_m]
        return (f(self(a), b_max, *bias_m) + f(a_max, self(b), *zero_bias) + f(a_max, b_max, *zero_bias)).abs()

    def _relu_grad(self, node: Any) -> Tensor:
        z, g = node.inputs
        mz, mg = self(z), self(g)
        worst = None
        for alpha in (0.0, 1.0):  # the planes are affine in α: the worst magnitude is at an end
            p = relu_grad_planes(z.lower, z.upper, g.lower, g.upper, alpha, alpha)
            for cz, cg, cb in ((p.lz, p.lg, p.lb), (p.uz, p.ug, p.ub)):
                m = cz.abs() * mz + cg.abs() * mg + cb.abs()
                worst = m if worst is None else torch.maximum(worst, m)
        assert worst is not None
        return worst

    def _maxpool_grad(self, node: Any) -> Tensor:
        """Every tap of a window receives coefficient ≤ 1 on g_w and an intercept ≤ |g_w|: the
        sum over the windows covering it of M(g_w) + G*_w."""
        x, g = node.inputs
        per_window = self(g) + self._value_or_m(g)
        b, c = per_window.shape[:2]
        kk = node.geo.kernel[0] * node.geo.kernel[1]
        taps = per_window.reshape(b, c, 1, -1).expand(b, c, kk, -1)
        return _scatter_taps(taps.contiguous(), node.geo, tuple(x.lower.shape[1:]))
