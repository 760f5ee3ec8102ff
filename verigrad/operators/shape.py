"""Linear kinds without parameters: Reshape, Transpose, Pad, Concat, Add, Sub.

Each is a linear map with coefficients in {0, ±1}, so its gradient rule is its transpose
(reshape back, inverse permutation, crop, split, copy, negate) and its interval rules are exact:
nonnegative maps act on both ends, negation swaps them. All are exact in floating point except
the sums and differences of Add / Sub (one rounding per end).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F

from verigrad.errors import ModelError, OpUnsupported
from verigrad.operators.base import IbpContext, Node, Shape, Tensors, register
from verigrad.operators.interval import Interval, add, map_ends, neg, single_rounding

# entries of the dense 0/1 matrix that lowers a non-spatial Pad for auto_LiRPA
_MAX_EMBED = 4_000_000


@register
@dataclass(frozen=True, eq=False)
class Reshape(Node):
    """Per-sample reshape (Flatten, Squeeze, Unsqueeze are reshapes). Gradient rule: reshape back."""

    shape: tuple[int, ...]

    op: ClassVar[str] = "reshape"

    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        in_shape = tuple(in_shapes[0])
        if math.prod(in_shape) != math.prod(self.shape):
            raise ModelError(
                f"layer {self.name!r}: cannot reshape {in_shape} ({math.prod(in_shape)} values) "
                f"to {self.shape}"
            )
        return tuple(self.shape)

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        x = xs[0]
        return x.reshape(x.shape[0], *self.shape)

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        return (g.reshape(g.shape[0], *in_shapes[0]),)

    def backward(self, g: torch.Tensor, in_shape: Shape) -> torch.Tensor:
        return g.reshape(g.shape[0], *in_shape)

    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        return map_ends(lambda v: self.forward([v]), xs[0])

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        return (map_ends(lambda v: v.reshape(v.shape[0], *in_shapes[0]), g),)

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> None:
        return None  # a reshape moves values: exact

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[None, ...]:
        return (None,) * len(grads)  # reshaped back: exact


@register
@dataclass(frozen=True, eq=False)
class Transpose(Node):
    """Permutation of the per-sample dimensions: y = x.permute(0, 1 + perm). Gradient rule:
    the inverse permutation."""

    perm: tuple[int, ...]

    op: ClassVar[str] = "transpose"

    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        in_shape = tuple(in_shapes[0])
        if sorted(self.perm) != list(range(len(in_shape))):
            raise ModelError(f"layer {self.name!r}: permutation {self.perm} does not fit input shape {in_shape}")
        return tuple(in_shape[p] for p in self.perm)

    def _inverse(self) -> tuple[int, ...]:
        inv = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inv[p] = i
        return tuple(inv)

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        return xs[0].permute(0, *(p + 1 for p in self.perm))

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        return (g.permute(0, *(p + 1 for p in self._inverse())),)

    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        return map_ends(lambda v: self.forward([v]), xs[0])

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        return (map_ends(lambda v: self.vjp([v], v, in_shapes)[0], g),)

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> None:
        return None  # a permutation moves values: exact

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[None, ...]:
        return (None,) * len(grads)  # the inverse permutation: exact


@register
@dataclass(frozen=True, eq=False)
class Pad(Node):
    """Constant padding of the per-sample dimensions: ``pads[i] = (before, after)`` for
    dimension i (≥ 0), filled with ``value``. Gradient rule: the crop of the padding.

    For auto_LiRPA (which cannot read a traced Pad node) the forward of a (C, H, W) pad on H and
    W is written as a transposed conv with the constant square kernel E[c, c, top, left] = 1 (a
    shift into a larger array, exact) and a crop to the padded size; any other pad of a small
    tensor as the flattened tensor times a constant 0/1 matrix; then plus the constant fill."""

    pads: tuple[tuple[int, int], ...]
    value: float = 0.0

    op: ClassVar[str] = "pad"

    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        in_shape = tuple(in_shapes[0])
        if len(self.pads) != len(in_shape) or any(a < 0 or b < 0 for a, b in self.pads):
            raise ModelError(f"layer {self.name!r}: pads {self.pads} must give (before, after) >= 0 for each of "
                             f"the {len(in_shape)} dimensions of its input {in_shape}")
        return tuple(s + a + b for s, (a, b) in zip(in_shape, self.pads, strict=True))

    def _flat_pads(self) -> list[int]:
        out: list[int] = []
        for a, b in reversed(self.pads):  # F.pad lists the last dimension first
            out += [a, b]
        return out

    def _lowering(self, in_shape: Shape) -> str | None:
        """How ``graph_forward`` writes this pad for auto_LiRPA: "shift" (a transposed conv, for
        H/W pads of a (C, H, W) tensor), "embed" (a 0/1 matrix, small tensors) or None (neither)."""
        if len(in_shape) == 3 and self.pads[0] == (0, 0):
            return "shift"
        return "embed" if math.prod(in_shape) * math.prod(self.out_shape([in_shape])) <= _MAX_EMBED else None

    def tensors(self, in_shapes: Sequence[Shape]) -> dict[str, torch.Tensor]:
        in_shape = tuple(in_shapes[0])
        how = self._lowering(in_shape)
        if how is None:
            return {}
        fill = F.pad(torch.zeros(1, *in_shape, dtype=torch.float64), self._flat_pads(), value=float(self.value))
        if how == "shift":
            c = in_shape[0]
            (t, b), (le, r) = self.pads[1], self.pads[2]
            # square (auto_LiRPA's ConvTranspose asserts it); graph_forward crops the surplus rows / cols
            k = max(t + b, le + r) + 1
            e = torch.zeros(c, c, k, k, dtype=torch.float64)
            e[torch.arange(c), torch.arange(c), t, le] = 1.0
            return {"shift": e, "fill": fill}
        n, m = math.prod(in_shape), fill.numel()
        # any other pad as a constant 0/1 matrix on the flattened tensor: row i holds input i's place
        where = F.pad(torch.arange(1, n + 1, dtype=torch.float64).reshape(1, *in_shape), self._flat_pads()).reshape(-1)
        e = torch.zeros(n, m, dtype=torch.float64)
        j = where.nonzero().flatten()
        e[(where[j] - 1).long(), j] = 1.0
        return {"embed": e, "fill": fill}

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        return F.pad(xs[0], self._flat_pads(), value=float(self.value))

    def graph_forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        x = xs[0]
        if t is not None and "shift" in t:
            (t0, b0), (l0, r0) = self.pads[1], self.pads[2]
            y = F.conv_transpose2d(x, t["shift"])[:, :, : x.shape[2] + t0 + b0, : x.shape[3] + l0 + r0]
        elif t is not None and "embed" in t:
            y = torch.matmul(x.reshape(x.shape[0], -1), t["embed"]).reshape(x.shape[0], *t["fill"].shape[1:])
        else:
            return self.forward(xs)
        return y + t["fill"] if self.value != 0 else y

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        idx = [slice(None)] + [slice(a, a + s) for (a, _), s in zip(self.pads, in_shapes[0], strict=True)]
        return (g[tuple(idx)],)

    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        return map_ends(lambda v: self.forward([v]), xs[0])

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        return (map_ends(lambda v: self.vjp([v], v, in_shapes)[0], g),)

    def check_engine(self, engine: str, in_shapes: Sequence[Shape], perturbed: bool = False) -> None:
        if engine in ("crown", "alpha-crown") and self._lowering(tuple(in_shapes[0])) is None:
            raise OpUnsupported(engine, self, f"a pad of a {tuple(in_shapes[0])} tensor other than on H and W of "
                                f"(C, H, W) is lowered as a dense matrix, limited to {_MAX_EMBED} entries")

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> torch.Tensor | None:
        """Copies: exact; the fill is exact when ``value`` is representable in the dtype, else
        it is rounded once (≤ u·|value|)."""
        dtype = out[0].dtype
        if float(torch.tensor(self.value, dtype=dtype)) == float(self.value):
            return None
        return torch.tensor(abs(float(self.value)) * torch.finfo(dtype).eps, dtype=dtype, device=out[0].device)

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[None, ...]:
        return (None,) * len(grads)  # a crop: exact


@register
@dataclass(frozen=True, eq=False)
class Concat(Node):
    """y = concatenation of the inputs along per-sample dimension ``axis``. Gradient rule: the
    slices of g."""

    axis: int

    op: ClassVar[str] = "concat"
    arity: ClassVar[int] = 0

    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        shapes = [tuple(s) for s in in_shapes]
        ref = shapes[0]
        if not 0 <= self.axis < len(ref) or any(
            len(s) != len(ref) or any(a != b for i, (a, b) in enumerate(zip(s, ref, strict=True)) if i != self.axis) for s in shapes
        ):
            raise ModelError(f"layer {self.name!r}: cannot concatenate shapes {shapes} along per-sample axis {self.axis}")
        return ref[: self.axis] + (sum(s[self.axis] for s in shapes),) + ref[self.axis + 1 :]

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        return torch.cat(list(xs), dim=self.axis + 1)

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        return self._split(g, in_shapes)

    def _split(self, g: torch.Tensor, in_shapes: Sequence[Shape]) -> tuple[torch.Tensor, ...]:
        out, start = [], 0
        for s in in_shapes:
            n = s[self.axis]
            idx = [slice(None)] * (self.axis + 1) + [slice(start, start + n)]
            out.append(g[tuple(idx)])
            start += n
        return tuple(out)

    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        if all(x[0] is x[1] for x in xs):
            v = self.forward([x[0] for x in xs])
            return v, v
        return self.forward([x[0] for x in xs]), self.forward([x[1] for x in xs])

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        lo = self._split(g[0], in_shapes)
        if g[0] is g[1]:
            return tuple((p, p) for p in lo)
        return tuple(zip(lo, self._split(g[1], in_shapes), strict=True))

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> None:
        return None  # copies: exact

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[None, ...]:
        return (None,) * len(grads)  # slices: exact


def _same_shapes(node: Node, in_shapes: Sequence[Shape]) -> Shape:
    a, b = (tuple(s) for s in in_shapes)
    if a != b:
        raise ModelError(f"layer {node.name!r}: {node.op} of tensors of shapes {a} and {b} (no broadcasting "
                         "between computed tensors)")
    return a


@register
@dataclass(frozen=True, eq=False)
class Add(Node):
    """y = a + b of two computed tensors (residual connections). Gradient rule: (g, g)."""

    op: ClassVar[str] = "add"
    arity: ClassVar[int] = 2

    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        return _same_shapes(self, in_shapes)

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        return xs[0] + xs[1]

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        return (g, g)

    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        return add(xs[0], xs[1])

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        return (g, g)

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> torch.Tensor:
        return single_rounding(out[0])  # one correctly rounded sum per end

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[None, None]:
        return None, None  # copies of g: exact


@register
@dataclass(frozen=True, eq=False)
class Sub(Node):
    """y = a − b of two computed tensors. Gradient rule: (g, −g)."""

    op: ClassVar[str] = "sub"
    arity: ClassVar[int] = 2

    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        return _same_shapes(self, in_shapes)

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        return xs[0] - xs[1]

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor, ...]:
        return (g, -g)

    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        return add(xs[0], neg(xs[1]))

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval, ...]:
        return (g, neg(g))

    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> torch.Tensor:
        return single_rounding(out[0])  # one correctly rounded difference per end

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[None, None]:
        return None, None  # g and its negation: exact
