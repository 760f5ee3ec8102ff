"""The threat set an attack searches — the same clipped input box and parameter box that the
certificate covers — and points inside it.

A :class:`Threat` keeps the :class:`~verigrad.perturbation.Perturbation` it was built from, so
that it can be rebuilt exactly in float64 for re-evaluating a witness: converting a float32
box would carry float32 rounding of x ± ε into the check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from verigrad.bounds.base import Bounds
from verigrad.explanations import SALIENCY, Explainer
from verigrad.graph.gradient_graph import Output
from verigrad.models.network import Network
from verigrad.perturbation import LayerParamBox, ParamBox, Perturbation

ParamValues = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


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
    """x (batch of 1) explained (by ``explainer``) for class ``target``, perturbed within
    ``box`` and, where ``perturbation`` has a parameter box, within ``params``: the boxes of
    ``perturbation`` for this input and network (build it with :meth:`around`)."""

    net: Network
    x: torch.Tensor
    target: int
    output: Output
    perturbation: Perturbation
    box: Bounds = field(repr=False)
    params: ParamBox | None = field(repr=False)
    explainer: Explainer = SALIENCY  # the explanation method whose map is attacked

    @classmethod
    def around(cls, net: Network, x: torch.Tensor, target: int, output: Output, perturbation: Perturbation,
               explainer: Explainer = SALIENCY, params: ParamBox | None = None) -> "Threat":
        """The threat of ``perturbation`` at ``x``. ``params``: its parameter box when the
        caller has already built it for ``net`` (one box for engines and attacks alike)."""
        if params is None:
            params = perturbation.param_box(net)
        return cls(net, x, target, output, perturbation, perturbation.input_box(x), params, explainer)

    def __post_init__(self) -> None:
        if self.x.shape[0] != 1:
            raise ValueError(f"a threat holds one input, got a batch of {self.x.shape[0]}")
        if self.box.lower.shape != self.x.shape:
            raise ValueError(f"input box of shape {tuple(self.box.lower.shape)} for an input of shape "
                             f"{tuple(self.x.shape)}")
        if (self.params is None) != (self.perturbation.param is None):
            raise ValueError("a parameter box is given exactly when the perturbation defines one")

    @property
    def epsilon(self) -> float:
        return self.perturbation.epsilon

    @property
    def domain(self) -> tuple[float, float] | None:
        return self.perturbation.domain

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
        return Threat.around(self.net.to(dtype=dtype), self.x.to(dtype), self.target, self.output, self.perturbation,
                             self.explainer)

    def centre(self) -> Point:
        layers = [self.net.affine_layer(n) for n in (self.params.layers if self.params is not None else ())]
        return Point(self.x, {l.name: (l.weight, l.bias) for l in layers})

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

    def _layer_box(self, name: str) -> LayerParamBox:
        lb = self.params.get(name) if self.params is not None else None
        if lb is None:
            raise KeyError(f"parameters of layer {name!r} are not in the parameter box")
        return lb


def param_names(threat: Threat) -> Sequence[str]:
    return list(threat.params.layers) if threat.params is not None else []
