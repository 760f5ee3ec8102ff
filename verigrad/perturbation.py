"""Threat sets: the ℓ∞ input box T = [x − ε, x + ε] ∩ domain and the parameter box
M = [θ − γ|θ|, θ + γ|θ|] (relative) or [θ − γ, θ + γ] (absolute), per layer."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Mapping, Sequence

import torch

from verigrad.bounds.base import Bounds
from verigrad.models.network import Conv2d, Linear, Network


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
