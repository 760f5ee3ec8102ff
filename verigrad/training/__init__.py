"""Training with explanation-robustness regularisers (GradCert and literature baselines)."""
from verigrad.training.regularizers import (
    REGULARIZERS,
    Regularizer,
    RegularizerConfig,
    gradcert_penalty,
    network_from_module,
    ramp,
    training_loss,
)

__all__ = [
    "REGULARIZERS", "Regularizer", "RegularizerConfig", "gradcert_penalty", "network_from_module",
    "ramp", "training_loss",
]
