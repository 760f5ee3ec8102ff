"""Threat sets: the ℓ∞ input box T = [x − ε, x + ε] ∩ domain (or a fixed box ∩ domain, e.g.
from a VNN-LIB file) and the parameter box
M = [θ − γ|θ|, θ + γ|θ|] (relative) or [θ − γ, θ + γ] (absolute), per layer.

:class:`Perturbation` is the definition (ε, domain, parameter-box settings); the boxes are
built from it here and only here, and the same boxes go to the bound engines and the attacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Sequence

import torch

from verigrad.bounds.base import Bounds
from verigrad.models.network import Conv2d, Linear, Network


class Norm(str, Enum):
    """The input ball: ℓ∞ (a box) or ℓ2."""

    LINF = "inf"
    L2 = "l2"  # the ℓ2 ball: randomized-smoothing certificates only (engines and attacks use boxes)


class ParamMode(str, Enum):
    RELATIVE = "relative"
    ABSOLUTE = "absolute"


def input_box(x: torch.Tensor, epsilon: float, domain: tuple[float, float] | None) -> Bounds:
    """[x − ε, x + ε] clipped to the input domain [lo, hi] (the reference code forgot the
    clip for certificates; attacks and certificates must share this box)."""
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    lo, up = x - epsilon, x + epsilon
    if domain is not None:
        lo = lo.clamp(min=domain[0], max=domain[1])
        up = up.clamp(min=domain[0], max=domain[1])
        # a centre outside the domain would make the clipped box miss it
        lo, up = torch.minimum(lo, x), torch.maximum(up, x)
    return Bounds(lo, up)


@dataclass(frozen=True, eq=False)
class FixedBox:
    """An input box given as is (e.g. read from a VNN-LIB file) rather than as x ± ε: float64
    bounds, flattened in C order, the same for every input."""

    lower: torch.Tensor  # float64, shape (n,)
    upper: torch.Tensor
    source: str = ""

    def __post_init__(self) -> None:
        if self.lower.shape != self.upper.shape or self.lower.dim() != 1:
            raise ValueError(f"a fixed box needs flat lower and upper bounds of one shape, got "
                             f"{tuple(self.lower.shape)} and {tuple(self.upper.shape)}")
        if not bool((self.lower <= self.upper).all()):
            raise ValueError("a fixed box needs lower <= upper")

    @property
    def size(self) -> int:
        return int(self.lower.shape[0])


def _round_outward(t: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """``t`` (float64) in ``dtype``, rounded down (``down``) or up, so that a box cast to a
    narrower dtype still contains the float64 one."""
    c = t.to(dtype)
    if dtype == t.dtype:
        return c
    back = c.to(t.dtype)
    if down:
        return torch.where(back > t, torch.nextafter(c, torch.full_like(c, -torch.inf)), c)
    return torch.where(back < t, torch.nextafter(c, torch.full_like(c, torch.inf)), c)


def fixed_input_box(x: torch.Tensor, box: FixedBox, domain: tuple[float, float] | None) -> Bounds:
    """``box`` for each input of the batch ``x`` (shape (B, *S) with prod(S) = box.size), in
    x's dtype (rounded outward) on x's device, clipped to the domain like :func:`input_box`
    (and then widened to contain x)."""
    shape = tuple(x.shape[1:])
    if x.dim() < 1 or x[0].numel() != box.size:
        raise ValueError(f"a fixed box of {box.size} coordinates for inputs of shape {shape}")
    lo = _round_outward(box.lower, x.dtype, True).to(x.device).reshape(shape).expand_as(x).clone()
    up = _round_outward(box.upper, x.dtype, False).to(x.device).reshape(shape).expand_as(x).clone()
    if domain is not None:
        lo = lo.clamp(min=domain[0], max=domain[1])
        up = up.clamp(min=domain[0], max=domain[1])
    lo, up = torch.minimum(lo, x), torch.maximum(up, x)
    return Bounds(lo, up)


@dataclass(frozen=True, eq=False)
class LayerParamBox:
    weight: Bounds
    bias: Bounds


@dataclass(frozen=True, eq=False)
class ParamBox:
    """Intervals on the weights and biases of some affine layers, keyed by layer name.
    Layers not listed keep their exact parameters."""

    layers: Mapping[str, LayerParamBox]

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def get(self, name: str) -> LayerParamBox | None:
        return self.layers.get(name)

    @property
    def empty(self) -> bool:
        return not self.layers


def param_box(
    net: Network,
    gamma: float,
    mode: ParamMode | str = ParamMode.RELATIVE,
    layers: Sequence[str] | None = None,
    include_bias: bool = True,
) -> ParamBox:
    """Box of relative (γ|θ|) or absolute (γ) radius around the parameters of ``layers``
    (names; None = every perturbable affine layer)."""
    mode = ParamMode(mode)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    affine = {l.name: l for l in net.affine_layers() if l.perturbable}
    if layers is None:
        names = list(affine)
    else:
        names = list(layers)
        unknown = [n for n in names if n not in affine]
        if unknown:
            raise KeyError(
                f"no perturbable affine layer named {unknown}; the network has {sorted(affine)}"
            )

    def box(t: torch.Tensor, on: bool) -> Bounds:
        if not on:
            return Bounds.point(t)
        r = gamma * t.abs() if mode == ParamMode.RELATIVE else torch.full_like(t, gamma)
        return Bounds(t - r, t + r)

    out = {}
    for n in names:
        l = affine[n]
        assert isinstance(l, (Linear, Conv2d))
        out[n] = LayerParamBox(box(l.weight, True), box(l.bias, include_bias))
    return ParamBox(out)


@dataclass(frozen=True)
class ParamBoxSpec:
    """How a parameter box is defined (the arguments of :func:`param_box`)."""

    gamma: float
    mode: ParamMode = ParamMode.RELATIVE
    layers: tuple[str, ...] | None = None  # None = every perturbable affine layer
    include_bias: bool = True

    def build(self, net: Network) -> ParamBox:
        return param_box(net, self.gamma, self.mode, list(self.layers) if self.layers is not None else None,
                         self.include_bias)


@dataclass(frozen=True)
class Perturbation:
    """The threat set's definition: every input moves within ``input_box(x, epsilon, domain)``
    (with ``box``: within that fixed box, :func:`fixed_input_box`; ``epsilon`` is then 0)
    and, with ``param``, the network's parameters within ``param.build(net)``. Kept as a
    definition so that the boxes can be rebuilt exactly in another dtype (a float64 re-check
    must not inherit float32 rounding of x ± ε)."""

    epsilon: float = 0.0
    domain: tuple[float, float] | None = None
    param: ParamBoxSpec | None = None
    box: FixedBox | None = None

    def input_box(self, x: torch.Tensor) -> Bounds:
        if self.box is not None:
            return fixed_input_box(x, self.box, self.domain)
        return input_box(x, self.epsilon, self.domain)

    def param_box(self, net: Network) -> ParamBox | None:
        return self.param.build(net) if self.param is not None else None
