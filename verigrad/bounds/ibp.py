"""Interval bound propagation of the gradient graph (Wicker et al., ICLR 2023): the baseline.

Forward: pre-activation boxes [z_l, z_u] by interval arithmetic. Seed: g_L = e_c (logit) or
[softmax bounds] − e_c (loss). Backward: g ← Wᵀ([σ'(z_l..z_u)] ⊙ g) with interval products.
Products of an interval with a point matrix are exact IBP (centre W·c, radius |W|·r).
Interval × interval (parameter boxes) uses either
  - ``midpoint_radius``: the paper's Lemma 1, A·B ∈ AμBμ ± (|Aμ|Br + Ar|Bμ| + ArBr), or
  - ``exact``: the exact interval of every scalar product a_k·b_k, summed — never wider.
"""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from verigrad.bounds.base import Bounds, EngineResult
from verigrad.graph.gradient_graph import Output
from verigrad.models.network import Activation, Conv2d, Linear, Network, Reshape, conv_transpose

if TYPE_CHECKING:  # perturbation imports bounds.base: a runtime import would be circular
    from verigrad.perturbation import ParamBox

# elements of a broadcast product tensor per chunk in the exact rule (memory cap, ~64 MB in float64 with the 4 endpoint products)
_EXACT_CHUNK = 2_000_000


class Product(str, Enum):
    """Rule for interval × interval products (only matters with a parameter box)."""

    MIDPOINT_RADIUS = "midpoint_radius"
    EXACT = "exact"


Interval = tuple[torch.Tensor, torch.Tensor]


def mul_interval(a: Interval, b: Interval) -> Interval:
    """Exact elementwise product of intervals: [min, max] of the four endpoint products."""
    p = torch.stack([a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]])
    return p.min(dim=0).values, p.max(dim=0).values


def mul_nonneg_interval(d: Interval, g: Interval) -> Interval:
    """[d]·[g] for d ≥ 0 (activation derivatives): the lower end is g_l times d_u when
    g_l < 0 else d_l; the upper end g_u times d_u when g_u > 0 else d_l. Exact, and cheaper
    than the four-product rule on the hot path."""
    lo = g[0] * torch.where(g[0] < 0, d[1], d[0])
    up = g[1] * torch.where(g[1] > 0, d[1], d[0])
    return lo, up


def _bilinear_midrad(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: Interval, w: Interval) -> Interval:
    """Lemma 1 for a bilinear map op(x, w): op(xμ, wμ) ± (op(|xμ|, wr) + op(xr, |wμ|) + op(xr, wr)).
    With a point w (wr = 0) this is ordinary exact IBP; point operands (the same tensor as
    both ends) skip the radius terms they cannot contribute."""
    w_point = w[0] is w[1]
    if x[0] is x[1] and w_point:
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


def _sum_exact_terms(a: Interval, b: Interval, dim: int) -> Interval:
    """Σ_k [a_k]·[b_k] along ``dim`` of broadcast tensors, each term's interval exact."""
    lo, up = mul_interval(a, b)
    return lo.sum(dim), up.sum(dim)


def _chunked(fn: Callable[[slice], Interval], batch: int, per_sample: int) -> Interval:
    step = max(1, _EXACT_CHUNK // max(per_sample, 1))
    parts = [fn(slice(i, i + step)) for i in range(0, batch, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _linear_exact(x: Interval, w: Interval) -> Interval:
    """x (B, in) times Wᵀ (W: out × in), exact per term."""
    wl, wu = w[0][None], w[1][None]

    def part(s: slice) -> Interval:
        return _sum_exact_terms((x[0][s, None, :], x[1][s, None, :]), (wl, wu), dim=2)

    return _chunked(part, x[0].shape[0], w[0].numel())


def _linear_t_exact(g: Interval, w: Interval) -> Interval:
    """g (B, out) times W (out × in), exact per term."""
    wl, wu = w[0][None], w[1][None]

    def part(s: slice) -> Interval:
        return _sum_exact_terms((g[0][s, :, None], g[1][s, :, None]), (wl, wu), dim=1)

    return _chunked(part, g[0].shape[0], w[0].numel())


def _conv_exact(layer: Conv2d, x: Interval, w: Interval) -> Interval:
    """conv2d through im2col: cols (B, C·kh·kw, L) against W (O, C·kh·kw), exact per term."""
    kh, kw = layer.weight.shape[2:]
    o = layer.weight.shape[0]
    cl = F.unfold(x[0], (kh, kw), padding=layer.padding, stride=layer.stride)
    cu = F.unfold(x[1], (kh, kw), padding=layer.padding, stride=layer.stride)
    wl, wu = w[0].reshape(o, -1)[None, :, :, None], w[1].reshape(o, -1)[None, :, :, None]
    b, _, nl = cl.shape
    h_out = (x[0].shape[2] + 2 * layer.padding[0] - kh) // layer.stride[0] + 1

    def part(s: slice) -> Interval:
        return _sum_exact_terms((cl[s, None], cu[s, None]), (wl, wu), dim=2)

    lo, up = _chunked(part, b, wl.numel() * nl)
    return lo.reshape(b, o, h_out, -1), up.reshape(b, o, h_out, -1)


def _conv_t_exact(layer: Conv2d, g: Interval, w: Interval, in_shape: tuple[int, ...]) -> Interval:
    """Wᵀ g for a conv: per-term exact products into im2col columns, then fold (which sums
    overlapping contributions: a sum of intervals), then crop the padding."""
    c, h, wd = in_shape
    o = layer.weight.shape[0]
    kh, kw = layer.weight.shape[2:]
    b = g[0].shape[0]
    gl, gu = g[0].reshape(b, o, 1, -1), g[1].reshape(b, o, 1, -1)
    wl, wu = w[0].reshape(o, -1)[None, :, :, None], w[1].reshape(o, -1)[None, :, :, None]

    def part(s: slice) -> Interval:
        return _sum_exact_terms((gl[s], gu[s]), (wl, wu), dim=1)

    cols_l, cols_u = _chunked(part, b, wl.numel() * gl.shape[-1])
    ph, pw = layer.padding
    size = (h + 2 * ph, wd + 2 * pw)
    fl = F.fold(cols_l, size, (kh, kw), stride=layer.stride)
    fu = F.fold(cols_u, size, (kh, kw), stride=layer.stride)
    return fl[:, :, ph : ph + h, pw : pw + wd], fu[:, :, ph : ph + h, pw : pw + wd]


def _map_ends(f: Callable[[torch.Tensor], torch.Tensor], x: Interval) -> Interval:
    """Apply a monotone or linear-reshaping f to both ends, keeping a point a point."""
    if x[0] is x[1]:
        v = f(x[0])
        return v, v
    return f(x[0]), f(x[1])


def _weights(layer: Linear | Conv2d, params: ParamBox | None) -> tuple[Interval, Interval, bool]:
    box = params.get(layer.name) if params is not None else None
    if box is None:
        return (layer.weight, layer.weight), (layer.bias, layer.bias), False
    return (box.weight.lower, box.weight.upper), (box.bias.lower, box.bias.upper), True


def _affine_forward(layer: Linear | Conv2d, x: Interval, params: ParamBox | None, product: Product) -> Interval:
    w, b, perturbed = _weights(layer, params)
    if perturbed and product == Product.EXACT:
        lo, up = _linear_exact(x, w) if isinstance(layer, Linear) else _conv_exact(layer, x, w)
    elif isinstance(layer, Linear):
        lo, up = _bilinear_midrad(lambda a, m: F.linear(a, m), x, w)
    else:
        lo, up = _bilinear_midrad(lambda a, m: F.conv2d(a, m, None, layer.stride, layer.padding), x, w)
    shape = (1, -1) + (1, 1) * (lo.dim() == 4)
    return lo + b[0].reshape(shape), up + b[1].reshape(shape)


def _affine_backward(
    layer: Linear | Conv2d, g: Interval, in_shape: tuple[int, ...], params: ParamBox | None, product: Product
) -> Interval:
    w, _, perturbed = _weights(layer, params)
    if isinstance(layer, Linear):
        if perturbed and product == Product.EXACT:
            return _linear_t_exact(g, w)
        return _bilinear_midrad(lambda a, m: a @ m, g, w)
    if perturbed and product == Product.EXACT:
        return _conv_t_exact(layer, g, w, in_shape)
    op = layer.output_padding(in_shape)
    return _bilinear_midrad(lambda a, m: conv_transpose(a, m, layer.stride, layer.padding, op, in_shape), g, w)


def softmax_bounds(lo: torch.Tensor, up: torch.Tensor, dim: int = 1) -> Interval:
    """p_i = softmax(z)_i over z ∈ [lo, up] (along ``dim``): p_i is increasing in z_i and
    decreasing in z_j, so p_i ≥ sigmoid(l_i − LSE_{j≠i} u_j) and p_i ≤ sigmoid(u_i − LSE_{j≠i} l_j)
    (tight: each end is attained at a corner)."""
    lo_m, up_m = lo.movedim(dim, -1), up.movedim(dim, -1)
    k = lo_m.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=lo.device)
    neg_inf = torch.tensor(float("-inf"), dtype=lo.dtype, device=lo.device)
    others_u = torch.logsumexp(torch.where(eye, neg_inf, up_m.unsqueeze(-2)), dim=-1)
    others_l = torch.logsumexp(torch.where(eye, neg_inf, lo_m.unsqueeze(-2)), dim=-1)
    return torch.sigmoid(lo_m - others_u).movedim(-1, dim), torch.sigmoid(up_m - others_l).movedim(-1, dim)


def ibp_bounds(
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    output: Output = Output.LOGIT,
    params: ParamBox | None = None,
    *,
    product: Product | str = Product.MIDPOINT_RADIUS,
) -> EngineResult:
    """Bounds on v = ∂o/∂x over x ∈ box (and θ ∈ params), shape (B, *input_shape).

    ``target`` holds the class c per sample. Sound for every activation in the IR; at a
    zero-width box with no parameter box, lower = upper = the exact gradient.
    """
    product = Product(product)
    output = Output(output)
    if params is not None and params.empty:
        params = None
    layers = net.layers
    n = len(layers)
    need_logits = output == Output.LOSS
    stop = n if need_logits else n - 1
    pre: dict[int, Interval] = {}
    h: Interval = (box.lower, box.upper)
    for i in range(stop):
        layer = layers[i]
        if isinstance(layer, Activation):
            pre[i] = h
            # σ is monotone nondecreasing for every supported activation
            h = _map_ends(layer.forward, h)
        elif isinstance(layer, Reshape):
            h = _map_ends(layer.forward, h)
        else:
            h = _affine_forward(layer, h, params, product)

    batch = box.lower.shape[0]
    onehot = F.one_hot(target.to(box.lower.device), net.num_classes).to(box.lower.dtype)
    if output == Output.LOGIT:
        seed: Interval = (onehot, onehot)  # a point: the first backward step is exact W_L[c]
    else:
        pl, pu = softmax_bounds(h[0].reshape(batch, -1), h[1].reshape(batch, -1))
        seed = (pl - onehot, pu - onehot)
    out_shape = net.shapes[-1]
    g: Interval = _map_ends(lambda t: t.reshape(batch, *out_shape), seed)
    for i in range(n - 1, -1, -1):
        layer = layers[i]
        in_shape = net.shapes[i]
        if isinstance(layer, Activation):
            d = layer.derivative_bounds(*pre[i])
            g = mul_nonneg_interval(d, g)
        elif isinstance(layer, Reshape):
            g = _map_ends(lambda t: layer.backward(t, in_shape), g)
        else:
            g = _affine_backward(layer, g, in_shape, params, product)

    notes: tuple[str, ...] = ()
    if params is not None:
        notes = (f"interval x interval product rule: {product.value}",)
    return EngineResult(Bounds(g[0], g[1]), "ibp", notes)
