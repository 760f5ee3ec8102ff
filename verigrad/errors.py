"""Exception types shared across layers (a leaf module: it imports nothing from verigrad)."""
from __future__ import annotations

from typing import Any


class VerigradError(Exception):
    """Root of verigrad's own errors. Every command maps them to exit codes in one place:
    :class:`UserError` → 2, anything else (including :class:`InternalError`) → 4; exit codes
    1 and 3 are reserved for falsified / unknown verdicts."""


class UserError(VerigradError, ValueError):
    """Bad input — a spec, model, data set, option, witness, results file or output location —
    with a one-line message naming the file, the key path or node, and what was expected."""


class InternalError(VerigradError, RuntimeError):
    """A verigrad bug (or one of a dependency's) detected at run time: never a verdict."""


class OutputError(UserError):
    """An output location that cannot be written (a plain file in its place, read-only, disk
    full); names the path. Checked before any work; a failure mid-run keeps what was written."""


class ModelError(UserError):
    """A model that verigrad cannot represent (unsupported op, bad shapes, bad graph)."""


class EngineUnsupported(VerigradError):
    """An engine cannot bound this configuration (e.g. auto_LiRPA and perturbed conv
    weights). The pipeline falls back to ``ibp`` and records why."""


class OpUnsupported(EngineUnsupported):
    """An engine has no rule for an operator kind (or for this instance of it); names the
    engine, the op and the node."""

    def __init__(self, engine: str, node: Any, why: str = "") -> None:
        self.engine, self.op, self.node = engine, node.op, node.name
        msg = f"engine {engine!r} cannot handle op {node.op!r} at node {node.name!r}"
        super().__init__(msg + (f": {why}" if why else ""))
