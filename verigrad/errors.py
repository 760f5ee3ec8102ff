"""Exception types shared across layers (a leaf module: it imports nothing from verigrad)."""
from __future__ import annotations

from typing import Any


class ModelError(ValueError):
    """A model that verigrad cannot represent (unsupported op, bad shapes, bad graph)."""


class EngineUnsupported(Exception):
    """An engine cannot bound this configuration (e.g. auto_LiRPA and perturbed conv
    weights). The pipeline falls back to ``ibp`` and records why."""


class OpUnsupported(EngineUnsupported):
    """An engine has no rule for an operator kind (or for this instance of it); names the
    engine, the op and the node."""

    def __init__(self, engine: str, node: Any, why: str = "") -> None:
        self.engine, self.op, self.node = engine, node.op, node.name
        msg = f"engine {engine!r} cannot handle op {node.op!r} at node {node.name!r}"
        super().__init__(msg + (f": {why}" if why else ""))
