"""What a reported number promises, attached to every certificate and bound verigrad prints.

- ``sound``: holds for every point of the box (a proof, up to floating point).
- ``probabilistic``: holds with probability ≥ 1 − p over the sampling the tool did (p is
  reported beside it), e.g. randomized-smoothing certificates.
- ``estimate``: a local-linearity (first-order) approximation; no guarantee at all.
"""
from __future__ import annotations

from enum import Enum


class Guarantee(str, Enum):
    SOUND = "sound"
    PROBABILISTIC = "probabilistic"
    ESTIMATE = "estimate"


__all__ = ["Guarantee"]
