"""Captum-style certified attributions: ``attribute`` (captum's value), ``attribute_bounds``
(sound bounds over an ℓ∞ box) and ``certify`` (property verdicts), one class per method as
in captum's ``attr/_core``; and quantus-style certified robustness metrics."""
from verigrad.attr._base import AttributionBounds, CertifiedAttribution
from verigrad.attr._input_x_gradient import CertifiedInputXGradient
from verigrad.attr._integrated_gradients import CertifiedIntegratedGradients
from verigrad.attr._saliency import CertifiedSaliency

__all__ = [
    "AttributionBounds", "CertifiedAttribution", "CertifiedInputXGradient", "CertifiedIntegratedGradients",
    "CertifiedSaliency",
]
