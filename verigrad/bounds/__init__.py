"""Bound engines on the explanation, behind one registry.

Every engine maps (network, input box, classes, output, parameter box) to the same
:class:`Bounds` over v = ∂o/∂x. ``ibp`` is ours; ``crown`` / ``alpha-crown`` run through the
auto_LiRPA adapter (imported lazily, so IBP works without auto_LiRPA installed).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Callable

import torch

from verigrad.bounds.bab import BabOptions
from verigrad.bounds.base import Bounds, BoundsError, EngineResult, EngineUnsupported, with_ibp_fallback
from verigrad.bounds.ibp import Product, ibp_bounds
from verigrad.bounds.options import CrownOptions
from verigrad.graph.gradient_graph import Output
from verigrad.models.network import Network

if TYPE_CHECKING:
    from verigrad.perturbation import ParamBox

__all__ = [
    "Bounds", "BoundsError", "CrownOptions", "EngineResult", "EngineUnsupported", "EngineOptions", "Method",
    "Product", "compute_bounds", "ibp_bounds", "input_product_bounds", "linear_bounds", "domain_engine",
]


class Method(str, Enum):
    IBP = "ibp"
    CROWN = "crown"
    ALPHA_CROWN = "alpha-crown"
    BAB = "bab"  # branch and bound (verigrad.bounds.bab): decides properties, exact in the limit


_CROWN = CrownOptions()  # the one place CROWN / alpha-CROWN defaults are declared


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings a spec can change; defaults live here and in the spec schema only."""

    product: Product = Product.MIDPOINT_RADIUS
    # CROWN / alpha-CROWN settings; their defaults are CrownOptions' (rows per backward pass and
    # the memory budget that sizes them: None = auto, see CrownOptions for the cost model)
    alpha_iterations: int = _CROWN.alpha_iterations
    alpha_lr: float = _CROWN.alpha_lr
    crown_output_chunk: int | None = _CROWN.output_chunk
    crown_memory_mb: float | None = _CROWN.memory_mb
    bab: BabOptions = BabOptions()  # noqa: RUF009 (frozen: a constant)

    def crown(self) -> CrownOptions:
        """The CROWN engine's options object."""
        return CrownOptions(alpha_iterations=self.alpha_iterations, alpha_lr=self.alpha_lr,
                            output_chunk=self.crown_output_chunk, memory_mb=self.crown_memory_mb)


Engine = Callable[[Network, Bounds, torch.Tensor, Output, "ParamBox | None", EngineOptions], EngineResult]


def _ibp(net, box, target, output, params, opts: EngineOptions) -> EngineResult:
    # outward rounding: a rigorous enclosure of the exact gradient range (EngineResult.rigorous)
    return ibp_bounds(net, box, target, output, params, product=opts.product, outward=True)


def _lirpa(alpha: bool, times_input: bool = False) -> Engine:
    def run(net, box, target, output, params, opts: EngineOptions) -> EngineResult:
        from verigrad.bounds import lirpa  # auto_LiRPA is heavy and optional for IBP-only use

        return lirpa.crown_bounds(net, box, target, output, params, alpha=alpha, options=opts.crown(),
                                  times_input=times_input)

    return run


def _bab(net, box, target, output, params, opts: EngineOptions) -> EngineResult:
    from verigrad.bounds.bab import bab_bounds

    root = Method(opts.bab.root)
    if root == Method.BAB:
        raise ValueError("bab cannot be its own root engine")

    rigorous: list[bool] = []

    def engine(b: Bounds, t: torch.Tensor) -> Bounds:
        res = ENGINES[root](net, b, t, output, None, opts)
        rigorous.append(res.rigorous)
        return res.bounds

    res = bab_bounds(net, box, target, engine, output, params, opts.bab, domain_engine(net, output, opts))
    # neuron-split leaves carry their own rigorous allowance; the root (and sub-box) maps are the
    # root engine's: the hull is rigorous when every one of those was
    return dataclasses.replace(res, rigorous=all(rigorous))


def domain_engine(net: Network, output: Output, opts: EngineOptions
                  ) -> Callable[[Bounds, torch.Tensor, dict], Bounds]:
    """Bounds on ∂o/∂x over branch-and-bound domains: CROWN with each domain's pre-activation
    boxes (activation index → (D, *shape)) in place of its own (the ``crown`` leaves of bab)."""
    def run(box: Bounds, target: torch.Tensor, pre: dict) -> Bounds:
        from verigrad.bounds import lirpa

        return lirpa.crown_bounds(net, box, target, output, None, options=opts.crown(), pre_bounds=pre).bounds

    return run


ENGINES: dict[Method, Engine] = {
    Method.IBP: _ibp,
    Method.CROWN: _lirpa(alpha=False),
    Method.ALPHA_CROWN: _lirpa(alpha=True),
    Method.BAB: _bab,
}
# engines that bound x ⊙ ∂o/∂x as one product (a joint relaxation of x and g)
INPUT_PRODUCT_ENGINES: dict[Method, Engine] = {
    Method.CROWN: _lirpa(alpha=False, times_input=True),
    Method.ALPHA_CROWN: _lirpa(alpha=True, times_input=True),
}


def input_product_bounds(
    method: Method | str,
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    output: Output = Output.LOGIT,
    params: ParamBox | None = None,
    options: EngineOptions = EngineOptions(),  # noqa: B008 (a frozen dataclass of immutable fields: a constant)
) -> EngineResult | None:
    """Bounds on x ⊙ ∂o/∂x bounded as one product (a joint relaxation of x and g), from the
    engines that can (CROWN, alpha-CROWN); None for the others and where the engine cannot
    handle the configuration — callers then take the interval product of the box and g's bounds."""
    engine = INPUT_PRODUCT_ENGINES.get(Method(method))
    if engine is None:
        return None
    try:
        return engine(net, box, target, output, params, options)
    except EngineUnsupported:
        return None


LinearEngine = Callable[[Network, Bounds, torch.Tensor, torch.Tensor, Output, "ParamBox | None", EngineOptions],
                        Bounds]


def _lirpa_linear(alpha: bool, times_input: bool) -> LinearEngine:
    def run(net, box, target, spec, output, params, opts: EngineOptions) -> Bounds:
        from verigrad.bounds import lirpa

        return lirpa.crown_linear_bounds(net, box, target, spec, output, params, alpha=alpha, options=opts.crown(),
                                         times_input=times_input)

    return run


# engines that bound linear functionals c·v of the map directly (a back-substitution from the
# functional itself); keyed by (method, map is x ⊙ g)
LINEAR_ENGINES: dict[tuple[Method, bool], LinearEngine] = {
    (m, t): _lirpa_linear(m == Method.ALPHA_CROWN, t) for m in (Method.CROWN, Method.ALPHA_CROWN) for t in (False, True)
}


def linear_bounds(
    method: Method | str,
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    spec: torch.Tensor,
    output: Output = Output.LOGIT,
    params: ParamBox | None = None,
    options: EngineOptions = EngineOptions(),  # noqa: B008 (a frozen dataclass of immutable fields: a constant)
    times_input: bool = False,
) -> Bounds | None:
    """Rigorous bounds (B, m) on spec·v for spec (B, m, d), v = ∂o/∂x (or x ⊙ ∂o/∂x with
    ``times_input``) over the box, from the engines that bound a functional as a whole (CROWN,
    alpha-CROWN, which then optimises its α for these rows); None for the others and where the
    engine cannot handle the configuration (callers keep the coordinatewise bound Σ c_i [l_i, u_i])."""
    engine = LINEAR_ENGINES.get((Method(method), times_input))
    if engine is None:
        return None
    try:
        return engine(net, box, target, spec, output, params, options)
    except EngineUnsupported:
        return None


def compute_bounds(
    method: Method | str,
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    output: Output = Output.LOGIT,
    params: ParamBox | None = None,
    options: EngineOptions = EngineOptions(),
) -> EngineResult:
    """Bounds on the explanation over the box with engine ``method``.

    When an engine cannot handle the configuration (:class:`EngineUnsupported`, e.g. perturbed
    conv weights under auto_LiRPA) the run falls back to ``ibp``; the result records it in
    ``actual_method`` and ``notes``.
    """
    try:
        m = Method(method)
    except ValueError:
        raise ValueError(f"unknown bound method {method!r}; choose from {[x.value for x in Method]}") from None
    return with_ibp_fallback(m.value, lambda: ENGINES[m](net, box, target, output, params, options),
                             lambda: ENGINES[Method.IBP](net, box, target, output, params, options))
