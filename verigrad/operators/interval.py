"""Interval arithmetic shared by the operators' interval rules (pure tensor functions).

An interval is a pair (lower, upper) of tensors of one shape. A *point* is the same tensor as
both ends; the rules keep points points, so an unperturbed branch stays exact.
"""
from __future__ import annotations

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
