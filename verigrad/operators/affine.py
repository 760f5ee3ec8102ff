"""Affine kinds with parameters: Linear and Conv2d (the only kinds a parameter box perturbs).

Interval rules: a point weight gives exact IBP (centre W·c, radius |W|·r). An interval weight
(parameter box) uses the product rule of the context: ``midpoint_radius`` (Wicker et al. 2023,
Lemma 1) or ``exact`` (the exact interval of every scalar product a_k·w_k, summed — never wider).
Their rounding errors are bounded by Higham's a-priori bound for sums of products (see
:mod:`verigrad.operators.interval`), with Σ|a_k||w_k| from one pass of the absolute operator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F

from verigrad.errors import ModelError, OpUnsupported
from verigrad.operators.base import IbpContext, Node, Shape, Tensors, register
from verigrad.operators.interval import Interval, bilinear_midrad, magnitude, mul_interval, reduction_error

# elements of a broadcast product tensor per chunk in the exact rule (memory cap, ~64 MB in
# float64 with the 4 endpoint products)
_EXACT_CHUNK = 2_000_000


def _sum_exact_terms(a: Interval, b: Interval, dim: int) -> Interval:
    """Σ_k [a_k]·[b_k] along ``dim`` of broadcast tensors, each term's interval exact."""
    lo, up = mul_interval(a, b)
    return lo.sum(dim), up.sum(dim)


def _chunked(fn: Callable[[slice], Interval], batch: int, per_sample: int) -> Interval:
    step = max(1, _EXACT_CHUNK // max(per_sample, 1))
    parts = [fn(slice(i, i + step)) for i in range(0, batch, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _weights(node: "Linear | Conv2d", ctx: IbpContext) -> tuple[Interval, Interval, bool]:
    box = ctx.params
    if box is None:
        return (node.weight, node.weight), (node.bias, node.bias), False
    return (box.weight.lower, box.weight.upper), (box.bias.lower, box.bias.upper), True


# roundings of an affine rule beyond its reduction of n products: the centre (l + u)/2 and
# radius (u − l)/2 of x (and of W in a parameter box: together ≤ 2u of Σ|a||b|), Lemma 1's two
# additions of its three radius products (2u), midpoint ± radius (u), the bias add (u); the
# magnitude pass (n + 1 roundings) is covered by the same γ: 8 in all, with one to spare
_AFFINE_SLACK = 8


def _abs_params(node: "Linear | Conv2d", ctx: IbpContext) -> tuple[torch.Tensor, torch.Tensor]:
    """max |W| and max |b| over the parameter box (|W|, |b| for exact parameters)."""
    w, b, _ = _weights(node, ctx)
    return magnitude(w), magnitude(b)


def _add_bias(lo: torch.Tensor, up: torch.Tensor, b: Interval) -> Interval:
    shape = (1, -1) + (1, 1) * (lo.dim() == 4)
    return lo + b[0].reshape(shape), up + b[1].reshape(shape)


@register
@dataclass(frozen=True, eq=False)
class Linear(Node):
    """y = x Wᵀ + b with W of shape (out, in). Gradient rule: g_in = g_out W."""

    weight: torch.Tensor
    bias: torch.Tensor
    # False for layers verigrad synthesised (normalization, pooling): never in a parameter box.
    perturbable: bool = True

    op: ClassVar[str] = "linear"
    tensor_fields: ClassVar[tuple[str, ...]] = ("weight", "bias")
    param_keys: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def __post_init__(self) -> None:
        if self.weight.dim() != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ModelError(
                f"layer {self.name!r}: Linear needs weight (out, in) and bias (out,), got "
                f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}"
            )

    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        if tuple(in_shapes[0]) != (self.weight.shape[1],):
            raise ModelError(
                f"layer {self.name!r}: Linear expects input of {self.weight.shape[1]} features, "
                f"its input has shape {tuple(in_shapes[0])}"
            )
        return (self.weight.shape[0],)

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        return F.linear(xs[0], self._t(t, "weight"), self._t(t, "bias"))

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        return (torch.matmul(g, self._t(t, "weight")),)

    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        w, b, perturbed = _weights(self, ctx)
        x = xs[0]
        if perturbed and ctx.product == "exact":
            wl, wu = w[0][None], w[1][None]

            def part(s: slice) -> Interval:
                return _sum_exact_terms((x[0][s, None, :], x[1][s, None, :]), (wl, wu), dim=2)

            lo, up = _chunked(part, x[0].shape[0], w[0].numel())
        else:
            lo, up = bilinear_midrad(lambda a, m: F.linear(a, m), x, w)
        return _add_bias(lo, up, b)

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        w, _, perturbed = _weights(self, ctx)
        if perturbed and ctx.product == "exact":
            wl, wu = w[0][None], w[1][None]

            def part(s: slice) -> Interval:
                return _sum_exact_terms((g[0][s, :, None], g[1][s, :, None]), (wl, wu), dim=1)

            return (_chunked(part, g[0].shape[0], w[0].numel()),)
        return (bilinear_midrad(lambda a, m: a @ m, g, w),)

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> torch.Tensor:
        """Higham's bound γ·(|W|·max(|l|, |u|) + |b|) for the in-features-long reduction (every
        rule here — midpoint-radius, Lemma 1, exact per-term products — sums at most that many
        terms whose |values| add up to no more than this magnitude)."""
        wabs, babs = _abs_params(self, ctx)
        mag = F.linear(magnitude(xs[0]), wabs) + babs
        return reduction_error(mag, self.weight.shape[1] + _AFFINE_SLACK)

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[torch.Tensor, ...]:
        """γ·|g|·|W| for the out-features-long reduction of gᵀW."""
        wabs, _ = _abs_params(self, ctx)
        return (reduction_error(magnitude(g) @ wabs, self.weight.shape[0] + _AFFINE_SLACK),)

    # back-compatible helpers of the chain representation
    def backward(self, g: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        return g @ self.weight


def conv_transpose(
    g: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    output_padding: tuple[int, int],
    in_shape: Shape,
) -> torch.Tensor:
    """Wᵀ g for a zero-padded conv: a padding-0 transposed conv over the padded input,
    then a crop of the padding."""
    _, h, w = in_shape
    full = F.conv_transpose2d(g, weight, None, stride, 0, output_padding)
    return full[:, :, padding[0] : padding[0] + h, padding[1] : padding[1] + w]


def zero_row_embedding(channels: int, extra: tuple[int, int], dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor | None:
    """Kernel E (C, C, 1 + e_h, 1 + e_w) with E[c, c, 0, 0] = 1: conv_transpose2d(t, E) is t
    followed by e_h zero rows and e_w zero columns (None when both are 0)."""
    eh, ew = extra
    if eh == 0 and ew == 0:
        return None
    e = torch.zeros(channels, channels, 1 + eh, 1 + ew, dtype=dtype, device=device)
    e[torch.arange(channels), torch.arange(channels), 0, 0] = 1
    return e


@register
@dataclass(frozen=True, eq=False)
class Conv2d(Node):
    """y = conv2d(x, W, b, stride, zero padding). Gradient rule: a padding-0 transposed
    convolution, zero rows for the stride remainder the forward never read, then a crop of the
    padding: exact, and made of ops auto_LiRPA 0.3 bounds."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    perturbable: bool = True

    op: ClassVar[str] = "conv2d"
    tensor_fields: ClassVar[tuple[str, ...]] = ("weight", "bias")
    param_keys: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def __post_init__(self) -> None:
        if self.weight.dim() != 4 or self.bias.shape != (self.weight.shape[0],):
            raise ModelError(
                f"layer {self.name!r}: Conv2d needs weight (out, in, kh, kw) and bias (out,), got "
                f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}"
            )

    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        in_shape = tuple(in_shapes[0])
        if len(in_shape) != 3 or in_shape[0] != self.weight.shape[1]:
            raise ModelError(
                f"layer {self.name!r}: Conv2d expects input (C={self.weight.shape[1]}, H, W), "
                f"its input has shape {in_shape}"
            )
        _, h, w = in_shape
        kh, kw = self.weight.shape[2:]
        oh = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - kw) // self.stride[1] + 1
        if oh < 1 or ow < 1:
            raise ModelError(f"layer {self.name!r}: kernel larger than padded input {in_shape}")
        return (self.weight.shape[0], oh, ow)

    def output_padding(self, in_shape: Shape) -> tuple[int, int]:
        """Rows/cols of the padded input the forward never read (the stride remainder,
        always < stride): the transpose must give them zero gradient."""
        _, h, w = in_shape
        _, oh, ow = self.out_shape([in_shape])
        kh, kw = self.weight.shape[2:]
        return (
            h + 2 * self.padding[0] - ((oh - 1) * self.stride[0] + kh),
            w + 2 * self.padding[1] - ((ow - 1) * self.stride[1] + kw),
        )

    def tensors(self, in_shapes: Sequence[Shape]) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight, "bias": self.bias}
        embed = zero_row_embedding(in_shapes[0][0], self.output_padding(in_shapes[0]), self.weight.dtype,
                                   self.weight.device)
        if embed is not None:
            out["embed"] = embed
        return out

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        return F.conv2d(xs[0], self._t(t, "weight"), self._t(t, "bias"), self.stride, self.padding)

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        # auto_LiRPA 0.3's ConvTranspose asserts padding 0 and output_padding 0: the stride
        # remainder is appended by a second transposed conv with the constant kernel ``embed``
        _, h, w = in_shapes[0]
        ph, pw = self.padding
        full = F.conv_transpose2d(g, self._t(t, "weight"), None, self.stride, 0)
        embed = t.get("embed") if t is not None else None
        if embed is None:
            embed = zero_row_embedding(in_shapes[0][0], self.output_padding(in_shapes[0]), g.dtype, g.device)
        if embed is not None:
            full = F.conv_transpose2d(full, embed)
        return (full[:, :, ph : ph + h, pw : pw + w],)

    def backward(self, g: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        return conv_transpose(g, self.weight, self.stride, self.padding, self.output_padding(in_shape), in_shape)

    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        w, b, perturbed = _weights(self, ctx)
        x = xs[0]
        if perturbed and ctx.product == "exact":
            lo, up = self._conv_exact(x, w)
        else:
            lo, up = bilinear_midrad(lambda a, m: F.conv2d(a, m, None, self.stride, self.padding), x, w)
        return _add_bias(lo, up, b)

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        w, _, perturbed = _weights(self, ctx)
        in_shape = tuple(in_shapes[0])
        if perturbed and ctx.product == "exact":
            return (self._conv_t_exact(g, w, in_shape),)
        op = self.output_padding(in_shape)
        return (bilinear_midrad(lambda a, m: conv_transpose(a, m, self.stride, self.padding, op, in_shape), g, w),)

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> torch.Tensor:
        """Higham's bound γ·(conv(max(|l|, |u|), |W|) + |b|), reduction length C_in·kh·kw."""
        wabs, babs = _abs_params(self, ctx)
        mag = F.conv2d(magnitude(xs[0]), wabs, None, self.stride, self.padding) + babs.reshape(1, -1, 1, 1)
        return reduction_error(mag, self.weight[0].numel() + _AFFINE_SLACK)

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[torch.Tensor, ...]:
        """γ·(|W|ᵀ max(|g_l|, |g_u|)): each input coordinate sums at most C_out·kh·kw terms (the
        transposed conv's taps, and the fold of overlapping windows in the exact rule)."""
        wabs, _ = _abs_params(self, ctx)
        in_shape = tuple(in_shapes[0])
        mag = conv_transpose(magnitude(g), wabs, self.stride, self.padding, self.output_padding(in_shape), in_shape)
        m = self.weight.shape[0] * self.weight.shape[2] * self.weight.shape[3] + _AFFINE_SLACK
        return (reduction_error(mag, m),)

    def check_engine(self, engine: str, in_shapes: Sequence[Shape], perturbed: bool = False) -> None:
        if engine in ("crown", "alpha-crown"):
            kh, kw = self.weight.shape[2:]
            if kh != kw:
                raise OpUnsupported(engine, self, f"auto_LiRPA 0.3 asserts on a non-square conv kernel ({kh}x{kw})")
            if perturbed:
                raise OpUnsupported(engine, self, "auto_LiRPA 0.3 cannot bound perturbed conv weights")

    def _conv_exact(self, x: Interval, w: Interval) -> Interval:
        """conv2d through im2col: cols (B, C·kh·kw, L) against W (O, C·kh·kw), exact per term."""
        kh, kw = self.weight.shape[2:]
        o = self.weight.shape[0]
        cl = F.unfold(x[0], (kh, kw), padding=self.padding, stride=self.stride)
        cu = F.unfold(x[1], (kh, kw), padding=self.padding, stride=self.stride)
        wl, wu = w[0].reshape(o, -1)[None, :, :, None], w[1].reshape(o, -1)[None, :, :, None]
        b, _, nl = cl.shape
        h_out = (x[0].shape[2] + 2 * self.padding[0] - kh) // self.stride[0] + 1

        def part(s: slice) -> Interval:
            return _sum_exact_terms((cl[s, None], cu[s, None]), (wl, wu), dim=2)

        lo, up = _chunked(part, b, wl.numel() * nl)
        return lo.reshape(b, o, h_out, -1), up.reshape(b, o, h_out, -1)

    def _conv_t_exact(self, g: Interval, w: Interval, in_shape: Shape) -> Interval:
        """Wᵀ g: per-term exact products into im2col columns, then fold (which sums
        overlapping contributions: a sum of intervals), then crop the padding."""
        c, h, wd = in_shape
        o = self.weight.shape[0]
        kh, kw = self.weight.shape[2:]
        b = g[0].shape[0]
        gl, gu = g[0].reshape(b, o, 1, -1), g[1].reshape(b, o, 1, -1)
        wl, wu = w[0].reshape(o, -1)[None, :, :, None], w[1].reshape(o, -1)[None, :, :, None]

        def part(s: slice) -> Interval:
            return _sum_exact_terms((gl[s], gu[s]), (wl, wu), dim=1)

        cols_l, cols_u = _chunked(part, b, wl.numel() * gl.shape[-1])
        ph, pw = self.padding
        size = (h + 2 * ph, wd + 2 * pw)
        fl = F.fold(cols_l, size, (kh, kw), stride=self.stride)
        fu = F.fold(cols_u, size, (kh, kw), stride=self.stride)
        return fl[:, :, ph : ph + h, pw : pw + wd], fu[:, :, ph : ph + h, pw : pw + wd]
