"""Elementwise activations: σ(z) forward, g ↦ σ'(z) ⊙ g backward.

Interval rules: every :class:`Activation` is nondecreasing, so its forward interval is
[σ(l), σ(u)]; its derivative interval is ``derivative_bounds`` (exact ranges) and the product
with g uses σ' ≥ 0. :class:`PReLU` may have any slope a: f(z) = relu(z) + a·min(z, 0), whose
forward interval is the hull of f(l), f(u) and f(0) = 0 when 0 ∈ [l, u], and whose derivative
lies in {a, 1}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from verigrad.errors import ModelError
from verigrad.graph import ops
from verigrad.operators.base import IbpContext, Node, Shape, Tensors, register
from verigrad.operators.interval import (
    Interval, hull, magnitude, map_ends, mul_interval, mul_nonneg_interval, single_rounding, unit_roundoff,
)


# sigmoid'' = s(1−s)(1−2s); its derivative s(1−s)(6s² − 6s + 1) vanishes at s = (3 ∓ √3)/6,
# i.e. z = ∓ln(2 + √3), where s(1−s) = 1/6 and 1 − 2s = ±√3/3: extrema ±√3/18
_SQRT3 = math.sqrt(3.0)
_SIGMOID_CRIT = math.log(2.0 + _SQRT3)
_SIGMOID_PEAK = _SQRT3 / 18.0
# tanh'' = −2t(1 − t²); its derivative (6t² − 2)(1 − t²) vanishes at t = ∓1/√3,
# z = ∓atanh(1/√3) = ∓ln(2 + √3)/2: extrema ±4/(3√3)
_TANH_CRIT = 0.5 * math.log(2.0 + _SQRT3)
_TANH_PEAK = 4.0 / (3.0 * _SQRT3)

# Rounding-error constants (multiples of the unit roundoff u) of the interval rules. Library
# sigmoid / tanh / exp / log1p are not correctly rounded; every mainstream implementation (glibc,
# SLEEF, CUDA's libdevice) is within 4 ulps, so _LIB = 16 u relative is generous.
_LIB = 16.0
# softplus_β(z) = log1p(exp(βz))/β: the library error (relative), plus the rounding of βz and of
# β itself (2u relative on the argument), which moves the value by ≤ σ(βz)·|βz|·2u/β.
_SOFTPLUS_ARG = 4.0
_SOFTPLUS_CUT = 1.01 * math.exp(-20.0)  # torch's softplus threshold error, see ibp_forward_error
# σ'(z) ≤ 1 computed with cancellation (1 − s, 1 − t²): ABSOLUTE allowances. softplus: σ(βz) with
# 16u relative plus σ'(t)|t|·2u ≤ 0.23·2u from the rounded argument t = βz → 32u on a value ≤ 1;
# sigmoid: s(1 − s) with s 16u off → ≤ ¼·18u + 16u·s² ≤ 21u → 32u; tanh: 1 − t·t with t 16u
# off → ≤ 33u·t² + u → 64u; leaky_relu: the slope rounded to the dtype, ≤ u·α ≤ u → 2u.
_DERIV_ABS = {"softplus": 32.0, "sigmoid": 32.0, "tanh": 64.0, "leaky_relu": 2.0, "relu": 0.0}


class ActKind(str, Enum):
    RELU = "relu"
    LEAKY_RELU = "leaky_relu"
    SOFTPLUS = "softplus"
    SIGMOID = "sigmoid"
    TANH = "tanh"


@register
@dataclass(frozen=True, eq=False)
class Activation(Node):
    """Elementwise σ. ``param`` is the negative slope (leaky_relu) or β (softplus).
    Gradient rule: g_in = σ'(z) ⊙ g_out, z the pre-activation."""

    kind: ActKind
    param: float = 0.0

    op: ClassVar[str] = "activation"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ActKind(self.kind))
        if self.kind == ActKind.SOFTPLUS and not self.param > 0:
            raise ModelError(f"layer {self.name!r}: softplus needs beta > 0, got {self.param}")
        if self.kind == ActKind.LEAKY_RELU and not 0.0 <= self.param <= 1.0:
            raise ModelError(
                f"layer {self.name!r}: leaky_relu negative slope must lie in [0, 1], got {self.param}"
            )

    @property
    def piecewise_linear(self) -> bool:
        return self.kind in (ActKind.RELU, ActKind.LEAKY_RELU)

    # -- concrete ----------------------------------------------------------------------
    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """σ(z)."""
        k = self.kind
        if k == ActKind.RELU:
            return torch.relu(z)
        if k == ActKind.LEAKY_RELU:
            return F.leaky_relu(z, self.param)
        if k == ActKind.SOFTPLUS:
            # exact log(1 + exp(βz))/β (torch's Softplus switches to z above βz > 20; the
            # difference is below 1e-9 and we certify the exact function)
            return ops.softplus(z, self.param)
        if k == ActKind.SIGMOID:
            return torch.sigmoid(z)
        if k == ActKind.TANH:
            return torch.tanh(z)
        raise ModelError(f"layer {self.name!r}: unsupported activation {k}")

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        return self.apply(xs[0])

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        z, k = xs[0], self.kind
        if k == ActKind.RELU:
            return (ops.relu_grad(z, g),)
        if k == ActKind.LEAKY_RELU:
            return (ops.leaky_relu_grad(z, g, self.param),)
        if k == ActKind.SOFTPLUS:
            return (ops.softplus_grad(z, g, self.param),)
        if k == ActKind.SIGMOID:
            return (ops.sigmoid_grad(z, g),)
        return (ops.tanh_grad(z, g),)

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        """σ'(z), with relu'(0) = 0 as autograd has it."""
        k = self.kind
        if k == ActKind.RELU:
            return (z > 0).to(z.dtype)
        if k == ActKind.LEAKY_RELU:
            return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, self.param))
        if k == ActKind.SOFTPLUS:
            return torch.sigmoid(self.param * z)
        if k == ActKind.SIGMOID:
            s = torch.sigmoid(z)
            return s * (1 - s)
        t = torch.tanh(z)
        return 1 - t * t

    # -- abstract ----------------------------------------------------------------------
    def derivative_bounds(self, zl: torch.Tensor, zu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interval of σ'(z) for z ∈ [zl, zu]. relu/leaky/softplus: σ' is monotone
        nondecreasing, so [σ'(zl), σ'(zu)]. sigmoid/tanh: σ' is unimodal with its peak at 0:
        the minimum is at the endpoint farthest from 0, the maximum is σ'(0) if 0 ∈ [zl, zu],
        else at the endpoint nearest 0."""
        k = self.kind
        if k in (ActKind.RELU, ActKind.LEAKY_RELU, ActKind.SOFTPLUS):
            return self.derivative(zl), self.derivative(zu)
        dl, du = self.derivative(zl), self.derivative(zu)
        peak = 0.25 if k == ActKind.SIGMOID else 1.0
        contains0 = (zl <= 0) & (zu >= 0)
        upper = torch.where(contains0, torch.full_like(dl, peak), torch.maximum(dl, du))
        return torch.minimum(dl, du), upper

    # -- second order (smooth kinds; piecewise-linear ones raise ValueError) ------------------
    def _require_smooth(self) -> None:
        if self.piecewise_linear:
            raise ValueError(f"layer {self.name!r}: {self.kind.value} is not twice differentiable "
                             "(its second derivative is a Dirac delta at 0)")

    def second_derivative(self, z: torch.Tensor) -> torch.Tensor:
        """σ''(z): softplus_β: β·s(1−s) with s = sigmoid(βz); sigmoid: s(1−s)(1−2s); tanh: −2t(1−t²)."""
        self._require_smooth()
        k = self.kind
        if k == ActKind.SOFTPLUS:
            s = torch.sigmoid(self.param * z)
            return self.param * s * (1 - s)
        if k == ActKind.SIGMOID:
            s = torch.sigmoid(z)
            return s * (1 - s) * (1 - 2 * s)
        t = torch.tanh(z)
        return -2 * t * (1 - t * t)

    def critical_points(self) -> tuple[tuple[float, float], ...]:
        """(z*, σ''(z*)) at every interior extremum of σ'' (closed forms, see the constants)."""
        self._require_smooth()
        k = self.kind
        if k == ActKind.SOFTPLUS:  # β·s(1−s): even, unimodal, peak β/4 at 0
            return ((0.0, self.param / 4.0),)
        if k == ActKind.SIGMOID:  # odd: max at −a, min at +a
            return ((-_SIGMOID_CRIT, _SIGMOID_PEAK), (_SIGMOID_CRIT, -_SIGMOID_PEAK))
        return ((-_TANH_CRIT, _TANH_PEAK), (_TANH_CRIT, -_TANH_PEAK))

    def second_derivative_bounds(self, zl: torch.Tensor, zu: torch.Tensor) -> Interval:
        """Exact range of σ'' over [zl, zu]: σ'' is continuous and its only interior extrema are
        the critical points, so the range is spanned by the two endpoint values and the values at
        the critical points inside the interval."""
        fl, fu = self.second_derivative(zl), self.second_derivative(zu)
        lo, up = torch.minimum(fl, fu), torch.maximum(fl, fu)
        for z_star, value in self.critical_points():
            inside = (zl <= z_star) & (zu >= z_star)
            v = torch.full_like(lo, value)
            lo = torch.where(inside, torch.minimum(lo, v), lo)
            up = torch.where(inside, torch.maximum(up, v), up)
        return lo, up

    def derivative_sup(self) -> float:
        """Σ1 = sup_z |σ'(z)|: relu/softplus/tanh 1, leaky_relu max(1, slope) (= 1 for a slope in
        [0, 1]), sigmoid 1/4."""
        if self.kind == ActKind.SIGMOID:
            return 0.25
        if self.kind == ActKind.LEAKY_RELU:
            return max(1.0, abs(float(self.param)))
        return 1.0

    def second_derivative_sup(self) -> float:
        """Σ2 = sup_z |σ''(z)| (smooth kinds): softplus_β β/4, sigmoid √3/18, tanh 4√3/9."""
        return max(abs(v) for _, v in self.critical_points())

    # -- abstract, first order ---------------------------------------------------------------
    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        return map_ends(self.apply, xs[0])  # σ is nondecreasing for every kind here

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        return (mul_nonneg_interval(self.derivative_bounds(*xs[0]), g),)

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> torch.Tensor | None:
        """relu: exact. leaky_relu: α·z with α rounded to the dtype and one product rounding,
        ≤ 2u|αz| ≤ 4u|y|. sigmoid / tanh: the library's error, 16u relative. softplus: that plus
        the argument's rounding (see the constants)."""
        k, u = self.kind, unit_roundoff(out[0].dtype)
        if k == ActKind.RELU:
            return None
        tiny = single_rounding(out[0])
        if k == ActKind.LEAKY_RELU:
            return 4 * u * magnitude(out) + tiny
        err = _LIB * u * magnitude(out) + tiny
        if k == ActKind.SOFTPLUS:
            z = xs[0]
            zmag = magnitude(z)
            # σ(βz)·|z| at the larger end (σ is increasing: its upper end bounds both), doubled for
            # σ's own rounding
            err = err + 2 * _SOFTPLUS_ARG * u * zmag * torch.sigmoid(self.param * z[1])
            # torch returns t itself above t = βz > 20 (its threshold): log1p(e^t) − t ≤ e^-20
            err = err + (self.param * z[1] > 20).to(err.dtype) * (_SOFTPLUS_CUT / self.param)
        return err

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[torch.Tensor | None, ...]:
        """[σ'] ⊙ [g] with σ' computed to within an absolute δ (the constants): the product rule
        picks ends of [σ'] by the sign of g, so an end moves by ≤ |g|·δ, and the product rounds
        once (u relative). relu: σ' ∈ {0, 1} and products with it are exact."""
        if self.kind == ActKind.RELU:
            return (None,)
        out = grads[0]
        assert out is not None
        u = unit_roundoff(out[0].dtype)
        delta = _DERIV_ABS[self.kind.value] * u
        return (delta * magnitude(g) + 2 * u * magnitude(out) + single_rounding(out[0]),)


@register
@dataclass(frozen=True, eq=False)
class PReLU(Node):
    """f(z) = relu(z) + a ⊙ min(z, 0) with a learned slope ``slope`` broadcast against the
    per-sample shape (one per channel, or a scalar). Written as relu(z) + a ⊙ (z − relu(z)),
    which is exact in floating point and made of ops auto_LiRPA bounds; gradient rule
    g_in = r + a ⊙ (g − r) with r = 1[z > 0]·g (exact likewise). The slope is not in
    parameter boxes."""

    slope: torch.Tensor

    op: ClassVar[str] = "prelu"
    tensor_fields: ClassVar[tuple[str, ...]] = ("slope",)
    piecewise: ClassVar[bool] = True

    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        shape = tuple(in_shapes[0])
        try:
            torch.broadcast_shapes(tuple(self.slope.shape), shape)
        except RuntimeError:
            raise ModelError(f"layer {self.name!r}: PReLU slope of shape {tuple(self.slope.shape)} does not "
                             f"broadcast to its input's shape {shape}") from None
        if torch.broadcast_shapes(tuple(self.slope.shape), shape) != shape:
            raise ModelError(f"layer {self.name!r}: PReLU slope of shape {tuple(self.slope.shape)} is larger "
                             f"than its input's shape {shape}")
        return shape

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        z, a = xs[0], self._t(t, "slope")
        r = torch.relu(z)
        return r + a * (z - r)

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        a = self._t(t, "slope")
        r = ops.relu_grad(xs[0], g)
        return (r + a * (g - r),)

    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        lo, up = xs[0]
        a = self.slope

        def f(z: torch.Tensor) -> torch.Tensor:
            return torch.relu(z) + a * (z - torch.relu(z))

        fl, fu = f(lo), f(up)
        zero = torch.where((lo <= 0) & (up >= 0), torch.zeros_like(fl), fl)
        return hull([fl, fu, zero])

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        zl, zu = xs[0]
        a = self.slope.expand_as(zl)
        one = torch.ones_like(zl)
        dl = torch.where(zl > 0, one, torch.where(zu <= 0, a, torch.minimum(a, one)))
        du = torch.where(zl > 0, one, torch.where(zu <= 0, a, torch.maximum(a, one)))
        return (mul_interval((dl, du), g),)

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> torch.Tensor:
        """z for z ≥ 0 (exact), a·z for z < 0 (one rounding; the slope is a stored tensor)."""
        return single_rounding(out[0])

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[torch.Tensor, ...]:
        """Each end is one product of an end of g with a stored slope or 1: one rounding."""
        return (single_rounding(g[0]),)
