"""The operator-kind registry: one class per kind, each holding its concrete semantics beside
its abstract ones.

A :class:`Node` is one operator applied to named input tensors. Every kind declares
  - ``out_shape``   the per-sample output shape from the input shapes,
  - ``forward``     y = f(x₁, …, x_k) (the concrete semantics),
  - ``vjp``         the gradient rule gᵢ = (∂f/∂xᵢ)ᵀ g, written with ops auto_LiRPA 0.3 can trace
                    and bound (so the gradient graph built from it is also its auto_LiRPA lowering),
  - ``ibp_forward`` / ``ibp_vjp``: interval rules of both passes, and
    ``ibp_forward_error`` / ``ibp_vjp_error``: bounds on their rounding errors (the IBP engine
    rounds outward by them, :func:`verigrad.bounds.ibp.ibp_bounds` with ``outward=True``),
  - ``tensors``     the tensors its forward and vjp read (parameters and constants), so the
                    gradient graph can register them once and a parameter box can replace them,
  - ``check_engine``: raises :class:`OpUnsupported` for an engine that cannot handle it.
A kind an engine meets without a rule raises :class:`OpUnsupported` naming the op, the node
and the engine; there is no silent fallback inside an engine.

Shapes are per sample; at run time every tensor has a batch dimension first.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping, Sequence, TypeVar

import torch

from verigrad.errors import OpUnsupported
from verigrad.operators.interval import Interval

if TYPE_CHECKING:
    from verigrad.perturbation import LayerParamBox

Shape = tuple[int, ...]
Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class IbpContext:
    """What interval rules of parameterised kinds need: the parameter box of this node (None:
    exact parameters) and the interval × interval product rule ("midpoint_radius" — Lemma 1
    of Wicker et al. 2023 — or "exact")."""

    params: "LayerParamBox | None" = None
    product: str = "midpoint_radius"


@dataclass(frozen=True, eq=False)
class Node:
    """Base of every operator kind. ``inputs`` names the tensors it reads: node names, or
    ``"input"`` for the network input; empty means "the previous node" (a chain)."""

    name: str
    inputs: tuple[str, ...] = field(default=(), kw_only=True)

    op: ClassVar[str] = "?"
    arity: ClassVar[int] = 1  # number of inputs; 0 = any number ≥ 1
    # fields holding tensors (cast by Network.to); parameter-box capable ones in param_keys
    tensor_fields: ClassVar[tuple[str, ...]] = ()
    param_keys: ClassVar[tuple[str, ...]] = ()
    # piecewise-linear kinds (their second derivative is 0 almost everywhere); a kind whose
    # answer depends on its settings (Activation) overrides the property
    piecewise: ClassVar[bool] = False

    @property
    def piecewise_linear(self) -> bool:
        return self.piecewise

    # -- concrete semantics ------------------------------------------------------------
    def out_shape(self, in_shapes: Sequence[Shape]) -> Shape:
        return tuple(in_shapes[0])

    def tensors(self, in_shapes: Sequence[Shape]) -> dict[str, torch.Tensor]:
        """Tensors ``forward``/``vjp`` read, by key (default: the ``tensor_fields``)."""
        return {k: getattr(self, k) for k in self.tensor_fields}

    def forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        raise NotImplementedError(f"op {self.op!r} has no forward")

    def graph_forward(self, xs: Sequence[torch.Tensor], t: Tensors | None = None) -> torch.Tensor:
        """The forward as the gradient graph writes it for auto_LiRPA (default: ``forward``)."""
        return self.forward(xs, t)

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.forward(xs)

    def vjp(self, xs: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[Shape],
            t: Tensors | None = None) -> tuple[torch.Tensor | None, ...]:
        """(∂y/∂xᵢ)ᵀ g for each input (None: no gradient flows to that input)."""
        raise OpUnsupported("gradient graph", self, "no gradient rule")

    # -- abstract semantics ------------------------------------------------------------
    def ibp_forward(self, xs: Sequence[Interval], in_shapes: Sequence[Shape], ctx: IbpContext) -> Interval:
        raise OpUnsupported("ibp", self, "no forward interval rule")

    def ibp_vjp(self, xs: Sequence[Interval], g: Interval, in_shapes: Sequence[Shape],
                ctx: IbpContext) -> tuple[Interval | None, ...]:
        raise OpUnsupported("ibp", self, "no gradient interval rule")

    # -- rounding-error models of the interval rules (outward-rounding IBP) ----------------
    def ibp_forward_error(self, xs: Sequence[Interval], out: Interval, in_shapes: Sequence[Shape],
                          ctx: IbpContext) -> torch.Tensor | None:
        """An upper bound (per output coordinate, broadcastable) on |computed end − exact end| of
        ``ibp_forward`` on the exact input intervals ``xs``, computed in round-to-nearest and
        returned as ``out``. None: the rule is exact (no rounding at all). A tensor ``e``: the
        engine moves each end outward by ``e`` and then one ulp (so a single correctly rounded
        operation needs ``e`` = :func:`~verigrad.operators.interval.single_rounding`). Default:
        no error model, so the rigorous engine refuses the kind rather than guess."""
        raise OpUnsupported("ibp (outward rounding)", self, "no rounding-error model of its forward interval rule")

    def ibp_vjp_error(self, xs: Sequence[Interval], g: Interval, grads: tuple[Interval | None, ...],
                      in_shapes: Sequence[Shape], ctx: IbpContext) -> tuple[torch.Tensor | None, ...]:
        """The same bound for each input gradient ``grads`` of ``ibp_vjp`` (None where exact or
        where no gradient flows). Default: no error model (the rigorous engine refuses)."""
        raise OpUnsupported("ibp (outward rounding)", self, "no rounding-error model of its gradient interval rule")

    def check_engine(self, engine: str, in_shapes: Sequence[Shape], perturbed: bool = False) -> None:
        """Raise :class:`OpUnsupported` when ``engine`` cannot bound this node (``perturbed``:
        its parameters are in a parameter box). Default: every engine can."""

    # -- helpers -----------------------------------------------------------------------
    def _t(self, t: Tensors | None, key: str) -> torch.Tensor:
        return getattr(self, key) if t is None or key not in t else t[key]

    def cast(self, f: Callable[[torch.Tensor], torch.Tensor]) -> "Node":
        """A copy with ``f`` applied to every tensor field."""
        if not self.tensor_fields:
            return self
        changes: dict = {k: f(getattr(self, k)) for k in self.tensor_fields}
        return dataclasses.replace(self, **changes)

    def renamed(self, name: str | None = None, inputs: Sequence[str] | None = None) -> "Node":
        return dataclasses.replace(self, name=self.name if name is None else name,
                                   inputs=self.inputs if inputs is None else tuple(inputs))

    @property
    def dtype(self) -> torch.dtype | None:
        for k in self.tensor_fields:
            return getattr(self, k).dtype
        return None


OPS: dict[str, type[Node]] = {}

N = TypeVar("N", bound="type[Node]")


def register(cls: N) -> N:
    """Class decorator: add an operator kind to :data:`OPS` under its ``kind``."""
    kind = cls.op
    if kind in OPS and OPS[kind] is not cls:
        raise ValueError(f"operator kind {kind!r} registered twice")
    OPS[kind] = cls
    return cls
