"""Explanation methods built on the input gradient g(x) = ∂o/∂x, and their bounds over a box.

  saliency              v = g(x)                                         (signed; captum's Saliency(abs=False))
  input_x_gradient      v = x ⊙ g(x)                                     (captum's InputXGradient)
  integrated_gradients  v = (x − b) ⊙ Σ_k w_k g(b + α_k (x − b))          (captum's IntegratedGradients)
  smoothgrad            v = mean_i g(x + δ_i),      δ_i ~ N(0, σ²I)       (sampled; verigrad.smoothing)
  sparsified_smoothgrad v = mean_i s_K(g(x + δ_i))                        (Levine et al. 2019)

The first three are deterministic: every bound engine bounds them soundly over the box by
composing its bounds on g. Over x ∈ [l, u], the path point b + α(x − b) ranges over the box
[b + α(l − b), b + α(u − b)] (α ≥ 0), so g at node k is bounded by the engine on that box;
the weighted sum of intervals (w_k > 0) bounds Σ_k w_k g_k; and the product with x or x − b
is the exact interval product of two intervals. The correlation between the factors (both
depend on the same x) is dropped, which is sound, and exact when the box is a point.
The smoothing methods are certified by randomized smoothing instead (probabilistic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch

from verigrad.bounds import (
    Bounds, EngineOptions, EngineResult, EngineUnsupported, Method, compute_bounds, input_product_bounds, linear_bounds,
)
from verigrad.bounds.ibp import mul_interval
from verigrad.operators.interval import gamma_m, round_outward
from verigrad.graph.gradient_graph import Output, ParamOverride, saliency
from verigrad.guarantees import Guarantee
from verigrad.models.network import Network


class ExplanationMethod(str, Enum):
    SALIENCY = "saliency"
    INPUT_X_GRADIENT = "input_x_gradient"
    INTEGRATED_GRADIENTS = "integrated_gradients"
    SMOOTHGRAD = "smoothgrad"
    SPARSIFIED_SMOOTHGRAD = "sparsified_smoothgrad"


SMOOTHING_METHODS = (ExplanationMethod.SMOOTHGRAD, ExplanationMethod.SPARSIFIED_SMOOTHGRAD)


class IGRule(str, Enum):
    """Quadrature nodes α_k and weights w_k on [0, 1], exactly as captum builds them
    (captum.attr._utils.approximation_methods), so that our IG equals captum's."""

    GAUSS_LEGENDRE = "gausslegendre"
    RIEMANN_LEFT = "riemann_left"
    RIEMANN_RIGHT = "riemann_right"
    RIEMANN_MIDDLE = "riemann_middle"
    RIEMANN_TRAPEZOID = "riemann_trapezoid"


def ig_nodes(rule: IGRule | str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(α, w) in float64. Gauss–Legendre: α = (1 + t)/2, w = ω/2 for the Legendre nodes t and
    weights ω; Riemann left/right/middle: w = 1/m at α = k/m, (k+1)/m, (k+½)/m; trapezoid:
    α = k/(m−1) with w = 1/m halved at both ends — captum's weights, which sum to 1 − 1/m
    (not the textbook trapezoid); we keep them so that the certified map is captum's."""
    rule = IGRule(rule)
    m = int(steps)
    if m < 1 or (rule != IGRule.GAUSS_LEGENDRE and m < 2):
        raise ValueError(f"integrated gradients: {rule.value} needs steps >= {1 if rule == IGRule.GAUSS_LEGENDRE else 2}, got {m}")
    k = np.arange(m, dtype=np.float64)
    if rule == IGRule.GAUSS_LEGENDRE:
        t, omega = np.polynomial.legendre.leggauss(m)
        return 0.5 * (1.0 + t), 0.5 * omega
    w = np.full(m, 1.0 / m)
    if rule == IGRule.RIEMANN_LEFT:
        return k / m, w
    if rule == IGRule.RIEMANN_RIGHT:
        return (k + 1) / m, w
    if rule == IGRule.RIEMANN_MIDDLE:
        return (k + 0.5) / m, w
    w[0] /= 2
    w[-1] /= 2
    return k / (m - 1), w


@dataclass(frozen=True)
class Explainer:
    """One explanation method with its settings (the spec's ``explanation`` section).

    ``baseline`` (integrated gradients): a constant, or a tensor shaped like one input.
    ``smoothing`` (smoothing methods): a ``verigrad.smoothing.SmoothingConfig``."""

    method: ExplanationMethod = ExplanationMethod.SALIENCY
    steps: int = 50
    rule: IGRule = IGRule.GAUSS_LEGENDRE
    baseline: float | torch.Tensor = 0.0
    smoothing: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", ExplanationMethod(self.method))
        object.__setattr__(self, "rule", IGRule(self.rule))
        if self.method == ExplanationMethod.INTEGRATED_GRADIENTS:
            ig_nodes(self.rule, self.steps)  # validates steps for the rule
        if self.method in SMOOTHING_METHODS and self.smoothing is None:
            raise ValueError(f"explanation method {self.method.value} needs smoothing settings")

    @property
    def guarantee(self) -> Guarantee:
        """What a certificate on this explanation promises."""
        return Guarantee.PROBABILISTIC if self.probabilistic else Guarantee.SOUND

    @property
    def probabilistic(self) -> bool:
        return self.method in SMOOTHING_METHODS

    def describe(self) -> str:
        m = self.method
        if m == ExplanationMethod.INTEGRATED_GRADIENTS:
            return f"integrated_gradients ({self.rule.value}, {self.steps} steps, baseline {self._baseline_text()})"
        if self.probabilistic:
            s = self.smoothing
            extra = "" if m == ExplanationMethod.SMOOTHGRAD else f", K = {s.sparsify:g}" + (
                f", relaxed C = {s.clip:g}" if s.relaxed else "")
            return (f"{m.value} (σ = {s.sigma:g}, n = {s.samples}, seed {s.seed}{extra}; certificate fails with "
                    f"probability ≤ {s.failure_probability:g}, {s.interval} interval)")
        return m.value

    def _baseline_text(self) -> str:
        if isinstance(self.baseline, torch.Tensor):
            return f"tensor {tuple(self.baseline.shape)}"
        return f"{float(self.baseline):g}"

    def baseline_like(self, x: torch.Tensor) -> torch.Tensor:
        """The baseline broadcast to x (B, *S) in x's dtype and device."""
        if isinstance(self.baseline, torch.Tensor):
            b = self.baseline.to(dtype=x.dtype, device=x.device)
            if tuple(b.shape) != tuple(x.shape[1:]):
                raise ValueError(f"integrated gradients: baseline of shape {tuple(b.shape)} does not match "
                                 f"the input shape {tuple(x.shape[1:])}")
            return b.expand_as(x)
        return torch.full_like(x, float(self.baseline))

    @property
    def pass_points(self) -> int:
        """Inputs one pass evaluates per sample: the m path points of integrated gradients, the
        noisy batch of the smoothing methods, else the input itself."""
        if self.method == ExplanationMethod.INTEGRATED_GRADIENTS:
            return self.steps
        if self.probabilistic:
            return int(self.smoothing.batch_size)
        return 1

    def nodes(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        a, w = ig_nodes(self.rule, self.steps)
        return (torch.as_tensor(a, dtype=dtype, device=device), torch.as_tensor(w, dtype=dtype, device=device))


SALIENCY = Explainer()

# tensors one pass keeps per node and point: the value and the gradient, each as the two ends
# of an interval pass and as autograd's saved copies
TENSORS_PER_NODE = 8


def pass_bytes(explainer: Explainer, net: Network, dtype: torch.dtype) -> int:
    """Bytes one pass of ``explainer`` allocates for one sample, estimated as
    points × Σ_nodes numel(node output) × TENSORS_PER_NODE × itemsize (the input included)."""
    numel = sum(math.prod(s) for s in net.shapes)
    return explainer.pass_points * numel * TENSORS_PER_NODE * torch.finfo(dtype).bits // 8


def _ig(explainer: Explainer, net: Network, x: torch.Tensor, target: torch.Tensor, output: Output,
        params: ParamOverride | None, smooth_beta: float | None, create_graph: bool) -> torch.Tensor:
    alpha, w = explainer.nodes(x.dtype, x.device)
    b = explainer.baseline_like(x)
    m, batch = len(alpha), x.shape[0]
    shape = (m,) + (1,) * x.dim()
    path = (b[None] + alpha.reshape(shape) * (x - b)[None]).reshape(m * batch, *x.shape[1:])
    if not create_graph:
        path = path.detach()
    else:
        # the gradient is taken at the path points, which stay functions of x for the attack
        path = path if path.requires_grad else path.requires_grad_(True)
    g = saliency(net, path, target.repeat(m), output, params=params, smooth_beta=smooth_beta,
                 create_graph=create_graph).reshape(m, batch, *x.shape[1:])
    return (x - b) * (w.reshape(shape) * g).sum(0)


def explain(explainer: Explainer, net: Network, x: torch.Tensor, target: torch.Tensor,
            output: Output = Output.LOGIT, *, params: ParamOverride | None = None,
            smooth_beta: float | None = None, create_graph: bool = False) -> torch.Tensor:
    """The explanation (B, *S) of x for class ``target`` by autograd — the reference every
    bound must contain. ``params`` / ``smooth_beta`` / ``create_graph`` as in
    :func:`verigrad.graph.gradient_graph.saliency` (attacks differentiate through this)."""
    m = explainer.method
    if m == ExplanationMethod.SALIENCY:
        return saliency(net, x, target, output, params=params, smooth_beta=smooth_beta, create_graph=create_graph)
    if m == ExplanationMethod.INPUT_X_GRADIENT:
        g = saliency(net, x, target, output, params=params, smooth_beta=smooth_beta, create_graph=create_graph)
        return x * g if create_graph else x.detach() * g
    if m == ExplanationMethod.INTEGRATED_GRADIENTS:
        return _ig(explainer, net, x, target, output, params, smooth_beta, create_graph)
    if create_graph or params is not None or smooth_beta is not None:
        raise ValueError(f"{m.value} is sampled: it cannot be attacked by gradient or evaluated with "
                         "perturbed parameters")
    from verigrad import smoothing  # sampling machinery, only for the smoothing methods

    if m == ExplanationMethod.SMOOTHGRAD:
        return smoothing.smoothgrad(net, x, target, output, explainer.smoothing)
    return smoothing.sparsified_smoothgrad(net, x, target, output, explainer.smoothing)


def _scaled_boxes(explainer: Explainer, box: Bounds) -> tuple[Bounds, torch.Tensor]:
    """The m path boxes [b + α_k(l − b), b + α_k(u − b)] stacked along the batch (k major),
    and the node weights."""
    alpha, w = explainer.nodes(box.lower.dtype, box.lower.device)
    b = explainer.baseline_like(box.lower)
    shape = (len(alpha),) + (1,) * box.lower.dim()
    a = alpha.reshape(shape)
    lo = (b[None] + a * (box.lower - b)[None]).reshape(-1, *box.lower.shape[1:])
    up = (b[None] + a * (box.upper - b)[None]).reshape(-1, *box.lower.shape[1:])
    return Bounds(lo, up), w


def _node_sum(coef: torch.Tensor, stacked: Bounds) -> Bounds:
    """Σ_k c_k [l_k, u_k] for node bounds stacked k-major along the batch; every c_k ≥ 0
    (w_k and w_k α_k), so lower ends pair with lower ends. Rounded outward: each end moves by
    γ_{k+1}·Σ_k c_k·max(|l_k|, |u_k|) (Higham's bound for the sum of k products) and one ulp,
    so the sum of enclosures is an enclosure."""
    k = len(coef)
    lo, up = stacked.lower.reshape(k, -1, *stacked.shape[1:]), stacked.upper.reshape(k, -1, *stacked.shape[1:])
    c = coef.reshape((k,) + (1,) * (lo.dim() - 1))
    err = gamma_m(k + 1, lo.dtype) * (c * torch.maximum(lo.abs(), up.abs())).sum(0)
    return Bounds(*round_outward(((c * lo).sum(0), (c * up).sum(0)), err))


def explanation_bounds(
    explainer: Explainer,
    method: Method | str,
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    output: Output = Output.LOGIT,
    params: Any = None,
    options: EngineOptions = EngineOptions(),  # noqa: B008 (a frozen dataclass of immutable fields: a constant)
) -> EngineResult:
    """Sound bounds (B, *S) on the explanation over the input box (and parameter box) with
    bound engine ``method`` on the gradient; see the module docstring for the composition."""
    m = explainer.method
    if m == ExplanationMethod.SALIENCY:
        return compute_bounds(method, net, box, target, output, params, options)
    if m == ExplanationMethod.INPUT_X_GRADIENT:
        res = compute_bounds(method, net, box, target, output, params, options)
        lo, up = mul_interval((box.lower, box.upper), (res.bounds.lower, res.bounds.upper))
        note = "x ⊙ g: exact interval product of the input box and the engine's gradient bounds"
        joint = input_product_bounds(method, net, box, target, output, params, options)
        if joint is None:
            return EngineResult(Bounds(lo, up), res.method, res.notes + (note,), res.actual_method, res.rigorous)
        both = Bounds(lo, up).intersect(joint.bounds)  # both sound: never wider than either
        note += "; intersected with x ⊙ g bounded jointly (one graph)"
        # the joint bounds are CROWN's (an allowance), but min/max are exact: the intersection keeps
        # no guarantee beyond its parts, so it is rigorous only when both are
        return EngineResult(both, res.method, res.notes + (note,), res.actual_method, res.rigorous and joint.rigorous)
    if m == ExplanationMethod.INTEGRATED_GRADIENTS:
        boxes, w = _scaled_boxes(explainer, box)
        k = len(w)
        res = compute_bounds(method, net, boxes, target.repeat(k), output, params, options)
        s = _node_sum(w, res.bounds)
        b = explainer.baseline_like(box.lower)
        # x − b rounded outward; the product's own rounding (one per end) is the explanation's
        # allowance (verify's extra roundings)
        lo, up = mul_interval(round_outward((box.lower - b, box.upper - b), 0.0), (s.lower, s.upper))
        note = (f"integrated gradients: {explainer.rule.value}, {k} nodes, each bounded on its scaled box "
                "(weighted sum rounded outward); interval product with x − b")
        return EngineResult(Bounds(lo, up), res.method, res.notes + (note,), res.actual_method, res.rigorous)
    raise EngineUnsupported(f"{m.value} is certified by randomized smoothing, not by bound engines")


def explanation_linear_bounds(
    explainer: Explainer,
    method: Method | str,
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    spec: torch.Tensor,
    output: Output = Output.LOGIT,
    params: Any = None,
    options: EngineOptions = EngineOptions(),  # noqa: B008 (a frozen dataclass of immutable fields: a constant)
) -> Bounds | None:
    """Rigorous bounds (B, m) on spec·e for the explanation e over the box, spec (B, m, d), from
    an engine that bounds the functional as a whole (saliency: c·g; gradient × input: c·(x ⊙ g),
    one graph); None where no engine or explanation allows it (integrated gradients, sampled maps)."""
    m = explainer.method
    if m not in (ExplanationMethod.SALIENCY, ExplanationMethod.INPUT_X_GRADIENT):
        return None
    return linear_bounds(method, net, box, target, spec, output, params, options,
                         times_input=m == ExplanationMethod.INPUT_X_GRADIENT)


def _rows_times(x: tuple[torch.Tensor, torch.Tensor], h: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
    """[x_i]·[H_ij] for x (B, *S) and H (B, d, d): exact interval products, row i scaled by x_i."""
    b = x[0].shape[0]
    return mul_interval((x[0].reshape(b, -1, 1), x[1].reshape(b, -1, 1)), (h.lower, h.upper))


def _plus_diagonal(j: tuple[torch.Tensor, torch.Tensor], diag: Bounds) -> Bounds:
    b = diag.lower.shape[0]
    eye = torch.eye(j[0].shape[-1], dtype=j[0].dtype, device=j[0].device)
    return Bounds(j[0] + eye * diag.lower.reshape(b, 1, -1), j[1] + eye * diag.upper.reshape(b, 1, -1))


def jacobian_bounds(
    explainer: Explainer,
    method: Method | str,
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    output: Output = Output.LOGIT,
) -> EngineResult:
    """Bounds (B, d, d) on the attribution's Jacobian J = ∂v/∂x at every point of the input box,
    from Hessian bounds of engine ``method`` (smooth activations only; no parameter box):

      saliency          J = H
      input_x_gradient  J = diag(g) + diag(x) H
      integrated grads  J = diag(S) + diag(x − b) Σ_k w_k α_k H(b + α_k(x − b)),  S = Σ_k w_k g_k

    each factor bounded over its own box and combined by exact interval products (w_k α_k ≥ 0)."""
    from verigrad.bounds.hessian import hessian_bounds  # second order is optional and heavier

    m = explainer.method
    if m == ExplanationMethod.SALIENCY:
        return hessian_bounds(method, net, box, target, output)
    gm = method if Method(method) != Method.ALPHA_CROWN else Method.CROWN
    if m == ExplanationMethod.INPUT_X_GRADIENT:
        h = hessian_bounds(method, net, box, target, output)
        g = compute_bounds(gm, net, box, target, output)
        j = _plus_diagonal(_rows_times((box.lower, box.upper), h.bounds), g.bounds)
        return EngineResult(j, h.method, h.notes + ("J = diag(g) + diag(x) H, interval products",), h.actual_method)
    if m == ExplanationMethod.INTEGRATED_GRADIENTS:
        boxes, w = _scaled_boxes(explainer, box)
        alpha, _ = explainer.nodes(box.lower.dtype, box.lower.device)
        k = len(w)
        h = hessian_bounds(method, net, boxes, target.repeat(k), output)
        g = compute_bounds(gm, net, boxes, target.repeat(k), output)
        b = explainer.baseline_like(box.lower)
        j = _plus_diagonal(_rows_times((box.lower - b, box.upper - b), _node_sum(w * alpha, h.bounds)),
                           _node_sum(w, g.bounds))
        note = f"J = diag(S) + diag(x − b) Σ_k w_k α_k H_k over {k} path boxes, interval products"
        return EngineResult(j, h.method, h.notes + (note,), h.actual_method)
    raise EngineUnsupported(f"{m.value} is sampled: its Jacobian is not bounded (use its smoothing certificate)")


EXPLANATION_METHODS = tuple(m.value for m in ExplanationMethod)

__all__ = [
    "EXPLANATION_METHODS", "Explainer", "ExplanationMethod", "IGRule", "SALIENCY", "SMOOTHING_METHODS", "explain",
    "explanation_bounds", "ig_nodes", "jacobian_bounds",
]
