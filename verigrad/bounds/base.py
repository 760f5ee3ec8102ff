"""The one bound type every engine returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from verigrad.errors import InternalError


class BoundsError(InternalError, ValueError):
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
        """[max(l1, l2), min(u1, u2)]: sound when both are. Intervals disjoint by more than
        round-off mean one engine is unsound, which is reported (BoundsError) rather than
        papered over."""
        lo, up = torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper)
        # intervals that miss each other by round-off only meet at [min, max] of the crossing ends
        return Bounds(*uncross(lo, up, "the intersection of two engines' bounds (one of them is unsound)"))

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
    # True when ``bounds`` enclose the exact (real-arithmetic) range despite floating point (see
    # verigrad.bounds.rounding: IBP's outward rounding, CROWN's and bab's γ_n·M allowances);
    # False: round-to-nearest with an a-priori allowance only, which certifies nothing
    rigorous: bool = False


def check_inputs(net: Any, box: Bounds, target: torch.Tensor, *, check_dtype: bool = True) -> None:
    """What every engine needs of its arguments: a box of the network's per-sample shape (and
    dtype: casting a float64 box to float32 may round it inward, so it is refused rather than
    silently shrunk), and one integer class per sample within the network's classes."""
    if tuple(box.shape[1:]) != tuple(net.input_shape):
        raise ValueError(
            f"box has per-sample shape {tuple(box.shape[1:])}, the network {net.source} expects {net.input_shape}"
        )
    if check_dtype and box.lower.dtype != net.dtype:
        raise ValueError(f"box dtype {box.lower.dtype} differs from the network's {net.dtype}")
    if target.dim() != 1 or target.shape[0] != box.shape[0]:
        raise ValueError(f"target must have shape ({box.shape[0]},), got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be an integer tensor, got {target.dtype}")
    if box.shape[0] and (int(target.min()) < 0 or int(target.max()) >= net.num_classes):
        raise ValueError(f"target classes must lie in [0, {net.num_classes}), got {target.tolist()}")


def uncross(lo: torch.Tensor, up: torch.Tensor, where: str,
            error: type[Exception] = BoundsError) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds come out of different floating-point sums (or intersections of
    sound bounds); on (nearly) point boxes they can cross by a few ulps. A crossing by round-off
    (≤ 1e4·eps·(1 + |bound|)) is widened to [min, max]; a real crossing means an unsound
    relaxation and raises ``error``."""
    crossed = lo > up
    if not bool(crossed.any()):
        return lo, up
    gap = (lo - up)[crossed]
    scale = 1 + torch.maximum(lo.abs(), up.abs())[crossed]
    if bool((gap > 1e4 * torch.finfo(lo.dtype).eps * scale).any()):
        raise error(f"lower > upper by up to {float(gap.max()):.3e} on {where}: an unsound relaxation")
    return torch.minimum(lo, up), torch.maximum(lo, up)


def with_ibp_fallback(method: str, run: Callable[[], EngineResult], ibp: Callable[[], EngineResult]) -> EngineResult:
    """``run()``, or — when the engine cannot handle the configuration (:class:`EngineUnsupported`)
    — ``ibp()``, recording the fallback and its reason in ``notes`` and ``actual_method``."""
    try:
        return run()
    except EngineUnsupported as why:
        res = ibp()
        return EngineResult(res.bounds, method, (f"{method} unsupported here ({why}); fell back to ibp",) + res.notes,
                            "ibp", rigorous=res.rigorous)
