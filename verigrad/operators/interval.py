"""Interval arithmetic shared by the operators' interval rules (pure tensor functions).

An interval is a pair (lower, upper) of tensors of one shape. A *point* is the same tensor as
both ends; the rules keep points points, so an unperturbed branch stays exact.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Interval = tuple[torch.Tensor, torch.Tensor]


def is_point(x: Interval) -> bool:
    return x[0] is x[1]


def map_ends(f: Callable[[torch.Tensor], torch.Tensor], x: Interval) -> Interval:
    """[f(l), f(u)] for a nondecreasing f (or a linear map with nonnegative coefficients, such
    as a reshape, permutation, zero pad or crop), keeping a point a point."""
    if is_point(x):
        v = f(x[0])
        return v, v
    return f(x[0]), f(x[1])


def add(a: Interval, b: Interval) -> Interval:
    """[a] + [b] = [a_l + b_l, a_u + b_u]."""
    if is_point(a) and is_point(b):
        v = a[0] + b[0]
        return v, v
    return a[0] + b[0], a[1] + b[1]


def neg(a: Interval) -> Interval:
    """−[a] = [−a_u, −a_l]."""
    if is_point(a):
        v = -a[0]
        return v, v
    return -a[1], -a[0]


def mul_interval(a: Interval, b: Interval) -> Interval:
    """Exact elementwise product of intervals: [min, max] of the four endpoint products."""
    p = torch.stack(torch.broadcast_tensors(a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]))
    return p.min(dim=0).values, p.max(dim=0).values


def mul_nonneg_interval(d: Interval, g: Interval) -> Interval:
    """[d]·[g] for d ≥ 0 (activation derivatives): the lower end is g_l times d_u when
    g_l < 0 else d_l; the upper end g_u times d_u when g_u > 0 else d_l. Exact, and cheaper
    than the four-product rule on the hot path."""
    lo = g[0] * torch.where(g[0] < 0, d[1], d[0])
    up = g[1] * torch.where(g[1] > 0, d[1], d[0])
    return lo, up


def linear_map(op: Callable[[torch.Tensor], torch.Tensor], op_abs: Callable[[torch.Tensor], torch.Tensor],
               x: Interval) -> Interval:
    """Exact IBP of a linear map A: A·c ± |A|·r, with ``op`` = A and ``op_abs`` = |A|."""
    if is_point(x):
        v = op(x[0])
        return v, v
    c, r = (x[0] + x[1]) / 2, (x[1] - x[0]) / 2
    mid, rad = op(c), op_abs(r)
    return mid - rad, mid + rad


def bilinear_midrad(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: Interval, w: Interval) -> Interval:
    """Wicker et al. (2023) Lemma 1 for a bilinear map op(x, w):
    op(xμ, wμ) ± (op(xr, |wμ|) + op(|xμ|, wr) + op(xr, wr)). With a point w (wr = 0) this is
    ordinary exact IBP; point operands skip the radius terms they cannot contribute."""
    w_point = is_point(w)
    if is_point(x) and w_point:
        v = op(x[0], w[0])
        return v, v
    xm, xr = (x[0] + x[1]) / 2, (x[1] - x[0]) / 2
    if w_point:
        mid = op(xm, w[0])
        rad = op(xr, w[0].abs())
        return mid - rad, mid + rad
    wm, wr = (w[0] + w[1]) / 2, (w[1] - w[0]) / 2
    mid = op(xm, wm)
    rad = op(xr, wm.abs()) + op(xm.abs(), wr) + op(xr, wr)
    return mid - rad, mid + rad


def hull(values: list[torch.Tensor]) -> Interval:
    """[min, max] over candidate values (elementwise)."""
    s = torch.stack(torch.broadcast_tensors(*values))
    return s.min(dim=0).values, s.max(dim=0).values


# -- rounding-error models of the interval rules (the outward-rounding IBP engine) --------------
#
# Each rule computes its ends in round-to-nearest. ``Node.ibp_forward_error`` / ``ibp_vjp_error``
# bound |computed end − exact end| given exact input intervals; the engine then moves each end
# outward by that bound and one ulp (which covers the rounding of the subtraction / addition
# itself). A reduction of m products obeys Higham's a-priori bound (Higham, *Accuracy and
# Stability of Numerical Algorithms*, 2nd ed., §3.1, Lemma 3.1 and eq. (3.5)):
#     |fl(Σ_k a_k b_k) − Σ_k a_k b_k| ≤ γ_m Σ_k |a_k||b_k|,   γ_m = m·u / (1 − m·u),
# in any summation order and with or without fused multiply-adds, u the unit roundoff.


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2 of ``dtype`` (round-to-nearest)."""
    return torch.finfo(dtype).eps / 2


def gamma_m(m: int, dtype: torch.dtype) -> float:
    """Higham's γ_m = m·u / (1 − m·u) (his §3.1); refuses m·u ≥ ½ (no significant bits left)."""
    u = unit_roundoff(dtype)
    if m * u >= 0.5:
        raise ValueError(f"{m} roundings in {dtype} leave no significant bits: compute in float64")
    return m * u / (1 - m * u)


def single_rounding(like: torch.Tensor) -> torch.Tensor:
    """The error bound of one correctly rounded operation beyond the one ulp the engine adds:
    the smallest normal number (a flush-to-zero of a subnormal result loses at most that)."""
    return torch.tensor(torch.finfo(like.dtype).tiny, dtype=like.dtype, device=like.device)


def magnitude(x: Interval) -> torch.Tensor:
    """max(|l|, |u|): the largest |value| an interval holds."""
    if is_point(x):
        return x[0].abs()
    return torch.maximum(x[0].abs(), x[1].abs())


def reduction_error(mag: torch.Tensor, m: int) -> torch.Tensor:
    """An upper bound on the rounding error of a reduction of ≤ m terms (slack for the
    centre / radius and bias arithmetic included by the caller in m) whose Σ|a_k||b_k| was
    computed — itself in round-to-nearest, a reduction of fewer than m terms, so
    fl(mag) ≥ (1 − γ_m)·Σ|a||b| — as ``mag``: γ_m·Σ|a||b| ≤ γ_m/(1 − γ_m)·fl(mag)
    = m·u/(1 − 2m·u)·fl(mag), times (1 + 4u) for the rounding of this very product, plus m
    smallest normals for underflow (subnormal or flushed to zero)."""
    gamma_m(2 * m, mag.dtype)  # refuses m too large for the dtype
    u = unit_roundoff(mag.dtype)
    coef = m * u / (1 - 2 * m * u) * (1 + 4 * u)
    return coef * mag + m * torch.finfo(mag.dtype).tiny


def round_outward(x: Interval, err: torch.Tensor | float | None) -> Interval:
    """[l − e, u + e] rounded one ulp further outward; an exact rule (``err`` None) keeps ``x``.
    The ulp covers both the rounding of l − e (≤ half the gap below it) and, with e = the
    smallest normal, a single correctly rounded operation; ``err`` 0 moves by the ulp alone."""
    if err is None:
        return x
    lo, up = x[0] - err, x[1] + err
    return (torch.nextafter(lo, torch.full_like(lo, -math.inf)), torch.nextafter(up, torch.full_like(up, math.inf)))
