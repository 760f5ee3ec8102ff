"""Certified input × gradient (captum's ``InputXGradient``)."""
from __future__ import annotations

from verigrad.attr._base import CertifiedAttribution
from verigrad.explanations import ExplanationMethod

__all__ = ["CertifiedInputXGradient"]


class CertifiedInputXGradient(CertifiedAttribution):
    """Input × gradient A(x) = x ⊙ ∂o_c/∂x (signed, as captum's ``InputXGradient``).

    Bounds: the library's rule (:func:`verigrad.explanations.explanation_bounds`): the exact
    interval product of the input box with the engine's gradient bounds, intersected, for
    CROWN / alpha-CROWN, with x ⊙ g bounded jointly as one product.
    """

    method = ExplanationMethod.INPUT_X_GRADIENT
