"""MaxPool: y_w = max_{p ∈ w} x_p over each window w; its gradient goes to the argmax.

Concrete: the input is padded with −∞ (pads, and extra bottom/right rows for ``ceil_mode``),
windows are read by ``unfold``, and the gradient rule routes g_w to the FIRST maximal tap of
window w (torch's choice), summing over overlapping windows (``fold``).

Abstract, over a box x ∈ [l, u]: tap p of window w is a *candidate* argmax iff
u_p ≥ M_w = max_q l_q; it is *certain* iff it is the only candidate (then x_p > x_q for every
q ≠ p at every point), *impossible* iff u_p < M_w; when every candidate is a point (l_p = u_p
= M_w: tied at every point of the box) the first of them is certain, as torch routes ties.
The gradient term m_{w,p}·g_w is then
g_w, 0, or — for an uncertain tap — any of {0, g_w}: interval [min(0, g_l), max(0, g_u)],
linear planes the chords of min(0, g) / max(0, g) (``maxpool_grad_planes``). So the bound covers
every candidate, ties included. The forward is monotone ([max l, max u]); its linear planes
(``maxpool_planes``) are y_w ≥ x_{j*} with j* = argmax_p l_p, and y_w ≤ x_{j*} when j* dominates
(l_{j*} ≥ u_q for all q ≠ j*), else y_w ≤ max_p u_p.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

from verigrad.errors import ModelError
from verigrad.operators.base import IbpContext, Node, Shape, Tensors, register
from verigrad.operators.interval import Interval, magnitude, reduction_error

Geometry = tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]]  # kernel, stride, (t, l, b, r)


def pool_out_size(n: int, k: int, s: int, before: int, after: int, ceil_mode: bool) -> int:
    """Windows along one axis (torch / ONNX rule: with ceil_mode, a last window must start
    inside the input or its leading padding)."""
    span = n + before + after - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + before:
        out -= 1
    return out


def _geometry_pads(shape: Shape, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                   ceil_mode: bool) -> tuple[int, int, int, int, int, int]:
    """(oh, ow, t, l, b', r'): the output size and the −∞ padding that realises it, b' and r'
    including the extra rows/cols of ceil_mode (or fewer, when floor drops a remainder)."""
    _, h, w = shape
    t, le, b, r = pads
    oh = pool_out_size(h, kernel[0], stride[0], t, b, ceil_mode)
    ow = pool_out_size(w, kernel[1], stride[1], le, r, ceil_mode)
    bb = (oh - 1) * stride[0] + kernel[0] - h - t
    rr = (ow - 1) * stride[1] + kernel[1] - w - le
    return oh, ow, t, le, bb, rr


def _padded(x: torch.Tensor, t: int, le: int, bb: int, rr: int, value: float) -> torch.Tensor:
    """Pad with ``value``; negative bb / rr (rows floor mode never reads) crop instead."""
    x = F.pad(x, [le, max(rr, 0), t, max(bb, 0)], value=value)
    if bb < 0:
        x = x[:, :, : x.shape[2] + bb]
    if rr < 0:
        x = x[:, :, :, : x.shape[3] + rr]
    return x


def _windows(x: torch.Tensor, geo: "MaxPool", value: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, kh·kw, L) taps of every window, and the padded size."""
    b, c, h, w = x.shape
    oh, ow, t, le, bb, rr = _geometry_pads((c, h, w), geo.kernel, geo.stride, geo.pads, geo.ceil_mode)
    xp = _padded(x, t, le, bb, rr, value)
    cols = F.unfold(xp, geo.kernel, stride=geo.stride)  # (B, C·kk, L)
    kk = geo.kernel[0] * geo.kernel[1]
    return cols.reshape(b, c, kk, -1), (xp.shape[2], xp.shape[3])


def _scatter_taps(vals: torch.Tensor, geo: "MaxPool", in_shape: Shape) -> torch.Tensor:
    """Σ over windows of per-tap values (B, C, kk, L) into the input shape (fold, then crop)."""
    c, h, w = in_shape
    _, _, t, le, bb, rr = _geometry_pads(in_shape, geo.kernel, geo.stride, geo.pads, geo.ceil_mode)
    size = (t + h + max(bb, 0), le + w + max(rr, 0))
    b = vals.shape[0]
    full = F.fold(vals.reshape(b, c * vals.shape[2], -1), size, geo.kernel, stride=geo.stride)
    return full[:, :, t : t + h, le : le + w]


def _spread_taps(a: torch.Tensor, geo: "MaxPool", in_shape: Shape) -> torch.Tensor:
    """The transpose of ``_scatter_taps``: an input-shaped tensor (N, C, H, W) read at every
    window's taps, (N, C, kk, L) (zero at padding)."""
    c, h, w = in_shape
    _, _, t, le, bb, rr = _geometry_pads(in_shape, geo.kernel, geo.stride, geo.pads, geo.ceil_mode)
    ap = _padded(a, t, le, bb, rr, 0.0)
    cols = F.unfold(ap, geo.kernel, stride=geo.stride)
    return cols.reshape(a.shape[0], c, geo.kernel[0] * geo.kernel[1], -1)


def tap_states(lo: torch.Tensor, up: torch.Tensor, geo: "MaxPool") -> tuple[torch.Tensor, torch.Tensor]:
    """(certain, possible) masks (B, C, kk, L) of the argmax taps over the box [lo, up]."""
    wl, _ = _windows(lo, geo, float("-inf"))
    wu, _ = _windows(up, geo, float("-inf"))
    m = wl.max(dim=2, keepdim=True).values
    possible = wu >= m
    # candidates that are all points (l = u = M) are tied at every point of the box: the argmax is
    # the first of them, as torch routes it (a constant image region at ε = 0, say)
    fixed = (possible <= (wl == wu)).all(dim=2, keepdim=True)
    first = torch.zeros_like(possible).scatter_(2, possible.to(torch.uint8).argmax(dim=2, keepdim=True), True)
    possible = torch.where(fixed, first & possible, possible)
    certain = possible & (possible.sum(dim=2, keepdim=True) == 1)
    return certain, possible


def route_interval(certain: torch.Tensor, possible: torch.Tensor, g: Interval, geo: "MaxPool",
                   in_shape: Shape) -> Interval:
    """The interval of the routed gradient Σ_w m_w·g_w (input-shaped) for argmax indicators m: a
    certain tap receives g_w, an uncertain one any of {0, g_w}, an impossible one 0; summed
    over overlapping windows."""
    b, c = g[0].shape[:2]
    gl, gu = g[0].reshape(b, c, 1, -1), g[1].reshape(b, c, 1, -1)
    uncertain = possible & ~certain
    zero = torch.zeros((), dtype=gl.dtype, device=gl.device)
    lo = torch.where(certain, gl, torch.where(uncertain, gl.clamp(max=0), zero))
    up = torch.where(certain, gu, torch.where(uncertain, gu.clamp(min=0), zero))
    return _scatter_taps(lo, geo, in_shape), _scatter_taps(up, geo, in_shape)


def maxpool_grad_planes(certain: torch.Tensor, possible: torch.Tensor, gl: torch.Tensor,
                        gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tap (B, C, kk, L), planes lg·g_w + lb ≤ m·g_w ≤ ug·g_w + ub for m the tap's argmax
    indicator: certain m = 1 (exact), impossible m = 0 (exact), uncertain m ∈ {0, 1}: the chords
    of min(0, g) below and max(0, g) above over [gl, gu] (g_w broadcast over the taps)."""
    gl, gu = gl.unsqueeze(2), gu.unsqueeze(2)
    uncertain = possible & ~certain
    cross = (gl < 0) & (gu > 0)
    width = torch.where(cross, gu - gl, torch.ones_like(gu))
    ug = torch.where(cross, gu / width, (gl >= 0).to(gl.dtype))
    ub = torch.where(cross, -gu * gl / width, torch.zeros_like(gu))
    lg = torch.where(cross, -gl / width, (gu <= 0).to(gl.dtype))
    lb = torch.where(cross, gl * gu / width, torch.zeros_like(gl))
    un, ce = uncertain.to(gl.dtype), certain.to(gl.dtype)
    return un * lg + ce, un * lb, un * ug + ce, un * ub


def maxpool_planes(lo: torch.Tensor, up: torch.Tensor, geo: "MaxPool") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(onehot_j* (B, C, kk, L), dominated (B, C, 1, L), upper constant (B, C, 1, L)): y_w ≥ x_{j*};
    y_w ≤ x_{j*} where dominated, else y_w ≤ max_p u_p."""
    wl, _ = _windows(lo, geo, float("-inf"))
    wu, _ = _windows(up, geo, float("-inf"))
    j = wl.argmax(dim=2, keepdim=True)
    onehot = torch.zeros_like(wl).scatter_(2, j, 1.0)
    others = torch.where(onehot > 0, torch.full_like(wu, float("-inf")), wu).max(dim=2, keepdim=True).values
    dominated = wl.gather(2, j) >= others
    return onehot, dominated, wu.max(dim=2, keepdim=True).values


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    """Run without the JIT tracer: the forward of a traced custom node reads shapes (traced as
    ``aten::size`` of values the node's subgraph does not own), which breaks the exporter's passes;
    the node's value is all the trace needs."""
    c: Any = torch._C  # the tracer's state accessors are private (and untyped)
    state = c._get_tracing_state()
    c._set_tracing_state(None)
    try:
        yield
    finally:
        c._set_tracing_state(state)


_FunctionType = type[torch.autograd.Function]


def _functions(geo: "MaxPool") -> tuple[_FunctionType, _FunctionType]:
    """MaxPool and its gradient as ONE traced node each, ``verigrad::MaxPool(x)`` and
    ``verigrad::MaxPoolGrad(x, g)`` (auto_LiRPA 0.3's MaxPool has no ceil_mode and symmetric
    pads only; a comparison-based routing would reach it as ops it cannot bound). The geometry is
    a class attribute: the tracer accepts tensor arguments only. Autograd semantics are those of
    the plain ops (∂ routing/∂x = 0 almost everywhere)."""
    key = (geo.kernel, geo.stride, geo.pads, geo.ceil_mode)
    if key in _FUNCTIONS:
        return _FUNCTIONS[key]
    attrs = dict(kernel_i=list(geo.kernel), stride_i=list(geo.stride), pads_i=list(geo.pads), ceil_i=int(geo.ceil_mode))

    class Pool(torch.autograd.Function):
        @staticmethod
        def forward(ctx: FunctionCtx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            ctx.save_for_backward(x)
            with _untraced():
                return geo.forward([x])

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            (x,) = ctx.saved_tensors
            return geo.route(x, g, tuple(x.shape[1:]))

        @staticmethod
        def symbolic(graph: Any, x: torch._C.Value) -> torch._C.Value:
            out = graph.op("verigrad::MaxPool", x, **attrs)
            xt: Any = x.type()  # a TensorType (its stub declares sizes() optional, JitType has none)
            sizes = xt.sizes()  # (B, C, H, W): the output type the exporter cannot infer
            out.setType(xt.with_sizes([sizes[0], *geo.out_shape([tuple(sizes[1:])])]))
            return out

    class PoolGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: FunctionCtx, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            ctx.save_for_backward(x)
            with _untraced():
                return geo.route(x, g, tuple(x.shape[1:]))

        @staticmethod
        def backward(ctx: Any, gh: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
            (x,) = ctx.saved_tensors
            shape = tuple(x.shape[1:])
            # the transpose of the routing: read gh at each window's argmax tap
            gg = (geo.argmax_onehot(x) * _spread_taps(gh, geo, shape)).sum(dim=2)
            return None, gg.reshape(gg.shape[0], *geo.out_shape([shape]))

        @staticmethod
        def symbolic(graph: Any, x: torch._C.Value, g: torch._C.Value) -> torch._C.Value:
            out = graph.op("verigrad::MaxPoolGrad", x, g, **attrs)
            out.setType(x.type())
            return out

    _FUNCTIONS[key] = (Pool, PoolGrad)
    return Pool, PoolGrad


_FUNCTIONS: dict[tuple, tuple[_FunctionType, _FunctionType]] = {}


@register
@dataclass(frozen=True, eq=False)
class MaxPool(Node):
    """2-D max pooling of a (C, H, W) tensor: kernel (kh, kw), stride, pads (top, left, bottom,
    right), dilation 1, ``ceil_mode``."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    ceil_mode: bool = False

    op: ClassVar[str] = "maxpool"
    piecewise: ClassVar[bool] = True

    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        shape = tuple(in_shapes[0])
        if len(shape) != 3:
            raise ModelError(f"layer {self.name!r}: MaxPool needs a (C, H, W) input, got {shape}")
        if any(p > k // 2 for p, k in zip(self.pads, self.kernel * 2, strict=True)):
            raise ModelError(f"layer {self.name!r}: MaxPool pads {self.pads} exceed half the kernel {self.kernel}")
        oh, ow, *_ = _geometry_pads(shape, self.kernel, self.stride, self.pads, self.ceil_mode)
        if oh < 1 or ow < 1:
            raise ModelError(f"layer {self.name!r}: MaxPool kernel {self.kernel} larger than its padded input {shape}")
        return (shape[0], oh, ow)

    # -- concrete ----------------------------------------------------------------------
    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        x = xs[0]
        b, c = x.shape[:2]
        oh, ow, tp, le, bb, rr = _geometry_pads(tuple(x.shape[1:]), self.kernel, self.stride, self.pads, self.ceil_mode)
        xp = _padded(x, tp, le, bb, rr, float("-inf"))
        return F.max_pool2d(xp, self.kernel, self.stride)

    def graph_forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        return _functions(self)[0].apply(xs[0])

    def argmax_onehot(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, kk, L) one-hot of the first maximal tap of each window."""
        wins, _ = _windows(x, self, float("-inf"))
        j = wins.argmax(dim=2, keepdim=True)
        return torch.zeros_like(wins).scatter_(2, j, 1.0)

    def route(self, x: torch.Tensor, g: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        """Σ_w onehot(argmax_w x)·g_w, input-shaped."""
        onehot = self.argmax_onehot(x)
        return _scatter_taps(onehot * g.reshape(g.shape[0], g.shape[1], 1, -1), self, in_shape)

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        return (_functions(self)[1].apply(xs[0], g),)

    # -- abstract ----------------------------------------------------------------------
    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        lo, up = xs[0]
        if lo is up:
            v = self.forward([lo])
            return v, v
        return self.forward([lo]), self.forward([up])  # max is nondecreasing in each tap

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        return (route_interval(*tap_states(*xs[0], self), g, self, tuple(in_shapes[0])),)

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> None:
        return None  # a max selects one of its inputs: exact

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[torch.Tensor | None, ...]:
        """Routing selects ends of g (exact); overlapping windows (stride < kernel) sum up to
        kh·kw of them per input coordinate (Higham's bound on |g| scattered to every tap, an
        upper bound on the selected terms' magnitudes). Without overlap the fold adds zeros."""
        if all(s >= k for s, k in zip(self.stride, self.kernel, strict=True)):
            return (None,)
        b, c = g[0].shape[:2]
        kk = self.kernel[0] * self.kernel[1]
        taps = magnitude(g).reshape(b, c, 1, -1).expand(b, c, kk, -1)
        return (reduction_error(_scatter_taps(taps, self, tuple(in_shapes[0])), kk + 8),)
