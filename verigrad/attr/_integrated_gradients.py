"""Certified integrated gradients (captum's ``IntegratedGradients``)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from verigrad.attr._base import CertifiedAttribution
from verigrad.bounds import Method
from verigrad.explanations import Explainer, ExplanationMethod, IGRule

__all__ = ["CertifiedIntegratedGradients"]


class CertifiedIntegratedGradients(CertifiedAttribution):
    """Integrated gradients A(x) = (x − b) ⊙ Σ_k w_k ∂o_c/∂x(b + α_k (x − b)), with captum's
    quadrature (α_k, w_k) for ``method`` (default ``gausslegendre``) and ``n_steps`` (50), and
    baseline b (``baselines``: None = 0, a number, a tensor of one input's shape or one per
    sample (B, *S)); signed, as captum's ``IntegratedGradients``.

    Bounds: the library's rule (:func:`verigrad.explanations.explanation_bounds`): the
    gradient bounded by the engine on each scaled path box [b + α_k(l − b), b + α_k(u − b)],
    the weighted sum of those intervals, and its exact interval product with x − b.
    ``internal_batch_size`` is accepted and ignored; ``return_convergence_delta`` is refused.

    In ``attribute_bounds`` / ``certify``, ``method`` names the bound engine (``crown``, ...);
    captum's quadrature ``method`` goes there as ``ig_method``, or as ``method`` itself when it
    names a rule (the two sets of names are disjoint; the engine is then ``crown``).
    """

    method = ExplanationMethod.INTEGRATED_GRADIENTS
    _CAPTUM_KWARGS = ("baselines", "n_steps", "method", "internal_batch_size", "return_convergence_delta")

    def _engine(self, method: Method | str, kwargs: Mapping[str, Any]) -> tuple[Method, Mapping[str, Any]]:
        kw = dict(kwargs)
        rule = kw.pop("ig_method", None)
        value = getattr(method, "value", method)
        if value in {r.value for r in IGRule}:
            if rule is not None and IGRule(rule).value != value:
                raise ValueError(f"method {value!r} and ig_method {rule!r} disagree")
            rule, method = value, Method.CROWN
        if rule is not None:
            kw["method"] = rule
        return super()._engine(method, kw)

    def extra_roundings(self, kwargs: Mapping[str, Any]) -> int:
        return int(kwargs.get("n_steps", 50)) + 2  # the sum over the nodes and the product with x − b

    def _groups(self, x: torch.Tensor, kwargs: Mapping[str, Any]) -> list[tuple[slice, Explainer]]:
        if kwargs.get("return_convergence_delta", False):
            raise ValueError(f"{type(self).__name__}: return_convergence_delta is not supported")
        steps = int(kwargs.get("n_steps", 50))
        rule = IGRule(kwargs.get("method", IGRule.GAUSS_LEGENDRE.value))
        base = kwargs.get("baselines")
        if isinstance(base, tuple):
            if len(base) != 1:
                raise ValueError("baselines: one baseline for the one input tensor")
            base = base[0]
        if base is None:
            base = 0.0
        if isinstance(base, (int, float, np.floating, np.integer)):
            return [(slice(None), Explainer(self.method, steps, rule, float(base)))]
        b = torch.as_tensor(np.asarray(base.cpu()) if isinstance(base, torch.Tensor) else np.asarray(base))
        b = b.to(dtype=x.dtype, device=x.device)
        shape = tuple(x.shape[1:])
        if tuple(b.shape) == shape or (b.dim() == x.dim() and b.shape[0] == 1 and tuple(b.shape[1:]) == shape):
            return [(slice(None), Explainer(self.method, steps, rule, b.reshape(shape)))]
        if tuple(b.shape) == tuple(x.shape):
            return [(slice(i, i + 1), Explainer(self.method, steps, rule, b[i])) for i in range(x.shape[0])]
        raise ValueError(f"baselines of shape {tuple(b.shape)} fit neither one input {shape} nor the batch "
                         f"{tuple(x.shape)}")
