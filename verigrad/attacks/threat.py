"""The threat set an attack searches — the same clipped input box and parameter box that the
certificate covers — and points inside it.

A :class:`Threat` keeps what it was built from (ε, domain, parameter-box settings), so that
it can be rebuilt exactly in float64 for re-evaluating a witness: converting a float32 box
would carry float32 rounding of x ± ε into the check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from verigrad.bounds.base import Bounds
from verigrad.explanations import SALIENCY, Explainer
from verigrad.graph.gradient_graph import Output
from verigrad.models.network import Network
from verigrad.perturbation import ParamBox, ParamMode, input_box, param_box

ParamValues = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ParamThreat:
    """How the parameter box was specified (see ``perturbation.param_box``)."""

    gamma: float
    mode: ParamMode = ParamMode.RELATIVE
    layers: tuple[str, ...] | None = None  # None = every perturbable affine layer
    include_bias: bool = True


@dataclass(frozen=True, eq=False)
class Point:
    """A candidate: an input (1, *S) and the values of the boxed parameters (name → (W, b));
    layers not listed keep the network's own parameters."""

    x: torch.Tensor
    params: ParamValues = field(default_factory=dict)

    def detach(self) -> "Point":
        return Point(self.x.detach(), {k: (w.detach(), b.detach()) for k, (w, b) in self.params.items()})

    def to(self, dtype: torch.dtype) -> "Point":
        return Point(self.x.to(dtype), {k: (w.to(dtype), b.to(dtype)) for k, (w, b) in self.params.items()})


@dataclass(frozen=True, eq=False)
class Threat:
    """x (batch of 1) explained (by ``explainer``) for class ``target``, perturbed within the ℓ∞ box of radius
    ``epsilon`` clipped to ``domain`` and, if ``param`` is given, within the parameter box."""

    net: Network
    x: torch.Tensor
    target: int
    output: Output
    epsilon: float
    domain: tuple[float, float] | None
    param: ParamThreat | None = None
    explainer: Explainer = SALIENCY  # the explanation method whose map is attacked
    box: Bounds = field(init=False, repr=False)
    params: ParamBox | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.x.shape[0] != 1:
            raise ValueError(f"a threat holds one input, got a batch of {self.x.shape[0]}")
        object.__setattr__(self, "box", input_box(self.x, self.epsilon, self.domain))
        pb = None
        if self.param is not None:
            p = self.param
            pb = param_box(self.net, p.gamma, p.mode, list(p.layers) if p.layers is not None else None,
                           p.include_bias)
        object.__setattr__(self, "params", pb)

    @property
    def target_tensor(self) -> torch.Tensor:
        return torch.tensor([self.target], device=self.x.device)

    @property
    def moves_input(self) -> bool:
        return bool((self.box.width > 0).any())

    @property
    def moves_params(self) -> bool:
        return self.params is not None and any(
            bool((lb.weight.width > 0).any()) or bool((lb.bias.width > 0).any()) for lb in self.params.layers.values())

    def astype(self, dtype: torch.dtype) -> "Threat":
        """The same threat rebuilt from its definition in ``dtype``."""
        return Threat(self.net.to(dtype=dtype), self.x.to(dtype), self.target, self.output, self.epsilon,
                      self.domain, self.param, self.explainer)

    def centre(self) -> Point:
        return Point(self.x, {n: (self.net.layer(n).weight, self.net.layer(n).bias)  # type: ignore[union-attr]
                              for n in (self.params.layers if self.params is not None else {})})

    def project(self, point: Point) -> Point:
        """The nearest point of the box, coordinate by coordinate (clip)."""
        x = torch.minimum(torch.maximum(point.x, self.box.lower), self.box.upper)
        params = {}
        for name, (w, b) in point.params.items():
            lb = self._layer_box(name)
            params[name] = (torch.minimum(torch.maximum(w, lb.weight.lower), lb.weight.upper),
                            torch.minimum(torch.maximum(b, lb.bias.lower), lb.bias.upper))
        return Point(x, params)

    def contains(self, point: Point) -> bool:
        """Whether the point lies in the box (exactly, no tolerance)."""
        if point.x.shape != self.x.shape or not bool(self.box.contains(point.x).all()):
            return False
        for name, (w, b) in point.params.items():
            lb = self.params.get(name) if self.params is not None else None
            if lb is None or w.shape != lb.weight.shape or b.shape != lb.bias.shape:
                return False
            if not (bool(lb.weight.contains(w[None]).all()) and bool(lb.bias.contains(b[None]).all())):
                return False
        return True

    def random_point(self, gen: torch.Generator) -> Point:
        """Uniform in the box (input and boxed parameters)."""

        def draw(b: Bounds) -> torch.Tensor:
            u = torch.rand(b.lower.shape, generator=gen, dtype=b.lower.dtype).to(b.lower.device)
            return b.lower + u * (b.upper - b.lower)

        params = {}
        for name, lb in (self.params.layers.items() if self.params is not None else ()):
            params[name] = (draw(lb.weight), draw(lb.bias))
        return Point(draw(self.box), params)

    def _layer_box(self, name: str):
        lb = self.params.get(name) if self.params is not None else None
        if lb is None:
            raise KeyError(f"parameters of layer {name!r} are not in the parameter box")
        return lb


def param_names(threat: Threat) -> Sequence[str]:
    return list(threat.params.layers) if threat.params is not None else []
