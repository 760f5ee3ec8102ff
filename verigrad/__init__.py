"""verigrad: sound certificates on how far a network's gradient explanation can move.

Pipeline: spec → model loading → gradient graph → bound engines → properties/verdicts →
reports → CLI. The public API is re-exported here (the pipeline itself: ``verigrad.verify.prepare`` / ``verify``).
"""
__version__ = "0.1.0"

from verigrad.bounds import Bounds, EngineOptions, EngineResult, Method, compute_bounds  # noqa: E402
from verigrad.attr import CertifiedInputXGradient, CertifiedIntegratedGradients, CertifiedSaliency  # noqa: E402
from verigrad.graph.gradient_graph import GradientGraph, Output, saliency  # noqa: E402
from verigrad.models import from_module, load_model  # noqa: E402
from verigrad.perturbation import ParamBoxSpec, Perturbation, input_box, param_box  # noqa: E402
from verigrad.spec import load_spec  # noqa: E402

__all__ = [
    "Bounds", "CertifiedInputXGradient", "CertifiedIntegratedGradients", "CertifiedSaliency", "EngineOptions", "EngineResult", "GradientGraph", "Method", "Output", "ParamBoxSpec", "Perturbation",
    "compute_bounds",
    "from_module", "input_box", "load_model", "load_spec", "param_box", "saliency",
]
