"""Certified saliency (captum's ``Saliency``)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from verigrad.attr._base import CertifiedAttribution, abs_bounds
from verigrad.bounds import Bounds
from verigrad.explanations import ExplanationMethod

__all__ = ["CertifiedSaliency"]


def _abs_flag(kwargs: Mapping[str, Any]) -> bool:
    return bool(kwargs.get("abs", True))


class CertifiedSaliency(CertifiedAttribution):
    """Saliency A(x) = |∂o_c/∂x| (captum's default ``abs=True``) or the signed ∂o_c/∂x
    (``abs=False``), o_c the logit of the target class c.

    Bounds: the engine bounds [l, u] of the signed gradient over the box
    (:func:`verigrad.bounds.compute_bounds`); with ``abs=True`` they become the exact range of
    |g| over [l, u]: [0 if l ≤ 0 ≤ u else min(|l|, |u|), max(|l|, |u|)].

    >>> sal = CertifiedSaliency(model)                       # doctest: +SKIP
    >>> sal.attribute(x, target=3)                           # == captum Saliency(model).attribute(x, 3)
    >>> b = sal.attribute_bounds(x, target=3, epsilon=0.01)  # b.lower ≤ |∂o/∂x'| ≤ b.upper
    """

    method = ExplanationMethod.SALIENCY
    _CAPTUM_KWARGS = ("abs",)

    def _post(self, b: Bounds, kwargs: Mapping[str, Any]) -> Bounds:
        return abs_bounds(b) if _abs_flag(kwargs) else b

    def _post_point(self, v: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
        return v.abs() if _abs_flag(kwargs) else v
