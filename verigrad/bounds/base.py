"""The one bound type every engine returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch


class BoundsError(ValueError):
    """Bounds that violate lower <= upper (an engine bug, never a user error)."""


from verigrad.errors import EngineUnsupported, OpUnsupported  # noqa: E402,F401  (re-exported)


@dataclass(frozen=True, eq=False)
class Bounds:
    """Elementwise bounds lower <= v <= upper on a tensor v (batch dimension first).

    Immutable: engines build new Bounds instead of editing one. Construction checks
    lower <= upper (NaN fails too), so an engine cannot hand out an inverted interval.
    """

    lower: torch.Tensor
    upper: torch.Tensor

    def __post_init__(self) -> None:
        if self.lower.shape != self.upper.shape:
            raise BoundsError(f"lower {tuple(self.lower.shape)} and upper {tuple(self.upper.shape)} differ in shape")
        bad = ~(self.lower <= self.upper)
        if bool(bad.any()):
            i = int(bad.flatten().nonzero()[0])
            raise BoundsError(
                f"lower > upper (or NaN) at {int(bad.sum())} of {bad.numel()} coordinates, e.g. flat index {i}: "
                f"{self.lower.flatten()[i].item()} > {self.upper.flatten()[i].item()}"
            )

    @staticmethod
    def point(v: torch.Tensor) -> "Bounds":
        return Bounds(v, v)

    @property
    def shape(self) -> torch.Size:
        return self.lower.shape

    @property
    def width(self) -> torch.Tensor:
        return self.upper - self.lower

    @property
    def center(self) -> torch.Tensor:
        return (self.upper + self.lower) / 2

    @property
    def radius(self) -> torch.Tensor:
        return (self.upper - self.lower) / 2

    def contains(self, v: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
        """Per batch element: whether every coordinate of v lies in [lower - tol, upper + tol]."""
        ok = (v >= self.lower - tol) & (v <= self.upper + tol)
        return ok.reshape(ok.shape[0], -1).all(dim=1)

    def intersect(self, other: "Bounds") -> "Bounds":
        """[max(l1, l2), min(u1, u2)]: sound when both are. Disjoint intervals mean one engine
        is unsound, which is reported rather than papered over."""
        lo, up = torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper)
        if bool((lo > up).any()):
            raise BoundsError("intersecting disjoint bounds: one of the engines is unsound")
        return Bounds(lo, up)

    def __getitem__(self, idx) -> "Bounds":
        return Bounds(self.lower[idx], self.upper[idx])

    def to(self, *args, **kwargs) -> "Bounds":
        return Bounds(self.lower.to(*args, **kwargs), self.upper.to(*args, **kwargs))

    def detach(self) -> "Bounds":
        return Bounds(self.lower.detach(), self.upper.detach())


@dataclass(frozen=True, eq=False)
class EngineResult:
    """What a bound engine returns: the bounds on the explanation (shape (B, *input_shape)),
    the engine that produced them, and notes a user must see (e.g. a fallback, the product
    rule used). ``bounds`` must be sound for every sample of the batch."""

    bounds: Bounds
    method: str
    notes: tuple[str, ...] = ()
    # the engine that actually produced the bounds, when it is not ``method`` (fallback)
    actual_method: str | None = None
