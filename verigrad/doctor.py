"""``verigrad doctor``: what this environment has, and whether verigrad can run in it.

One :class:`DoctorCheck` per line: the versions of Python, verigrad and its dependencies
(required: torch, numpy, onnx, click, pyyaml; optional: onnxruntime, captum, quantus,
reported when present), auto_LiRPA and the self-checks of its compatibility shim
(:func:`verigrad.bounds.lirpa_compat.self_checks`; required: crown and alpha-crown run on
it), CUDA (availability, device, whether TF32 is enabled: float32 matmuls on CUDA then lose
precision), the BLAS / intra-op thread count and the free memory. The exit code is
:data:`ExitCode.BAD_INPUT` (2) when a required check fails, else 0.
"""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable

MIN_PYTHON = (3, 10)
REQUIRED = (("torch", "torch"), ("numpy", "numpy"), ("onnx", "onnx"), ("click", "click"), ("yaml", "pyyaml"))
OPTIONAL = (("onnxruntime", "onnxruntime"), ("captum", "captum"), ("quantus", "quantus"))


@dataclass(frozen=True)
class DoctorCheck:
    """One line of ``verigrad doctor``: ``ok`` False on a ``required`` check fails the run."""

    name: str
    ok: bool
    detail: str
    required: bool = True

    def line(self) -> str:
        mark = "ok" if self.ok else ("FAIL" if self.required else "--")
        return f"{mark:<5}{self.name}: {self.detail}"


def _module_version(module: str, dist: str) -> tuple[bool, str]:
    """(importable, version or the import error)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return False, f"not importable ({type(e).__name__}: {e})"
    try:
        from importlib.metadata import version as dist_version

        return True, dist_version(dist)
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source tree): the module's own
        return True, str(vars(mod).get("__version__", "?"))


def _versions() -> list[DoctorCheck]:
    py = sys.version_info
    out = [DoctorCheck("python", py[:2] >= MIN_PYTHON,
                       f"{platform.python_version()} ({sys.executable}; needs >= {'.'.join(map(str, MIN_PYTHON))})")]
    try:
        import verigrad

        out.append(DoctorCheck("verigrad", True, f"{verigrad.__version__} ({os.path.dirname(verigrad.__file__)})"))
    except Exception as e:  # noqa: BLE001
        out.append(DoctorCheck("verigrad", False, f"not importable ({type(e).__name__}: {e})"))
    for module, dist in REQUIRED:
        ok, detail = _module_version(module, dist)
        out.append(DoctorCheck(dist, ok, detail))
    for module, dist in OPTIONAL:
        ok, detail = _module_version(module, dist)
        out.append(DoctorCheck(dist, ok, detail if ok else "not installed (optional)", required=False))
    return out


def _lirpa() -> list[DoctorCheck]:
    from verigrad.bounds import lirpa_compat

    return [DoctorCheck(f"auto_LiRPA shim: {name}", ok, detail) for name, ok, detail in lirpa_compat.self_checks()]


def _cuda() -> list[DoctorCheck]:
    import torch

    if not torch.cuda.is_available():
        return [DoctorCheck("cuda", True, "not available (device: auto runs on the CPU)", required=False)]
    idx = torch.cuda.current_device()
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
    return [
        DoctorCheck("cuda", True, f"available: {torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(idx)} "
                                  f"(CUDA {torch.version.cuda})", required=False),
        DoctorCheck("cuda tf32", True, f"matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn "
                                       f"{torch.backends.cudnn.allow_tf32}"
                                       + (" (float32 runs on CUDA lose precision; bounds.dtype float64 is unaffected)"
                                          if tf32 else ""), required=False),
    ]


def _threads() -> list[DoctorCheck]:
    import torch

    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                    if k in os.environ) or "no thread variables set"
    return [DoctorCheck("threads", True, f"torch intra-op (BLAS) {torch.get_num_threads()}, inter-op "
                                         f"{torch.get_num_interop_threads()}, {os.cpu_count()} CPU(s); {env}",
                        required=False)]


def _memory() -> list[DoctorCheck]:
    import torch

    from verigrad.bounds.options import available_memory_bytes

    gib = lambda b: "unknown" if b is None else f"{b / 2**30:.1f} GiB"  # noqa: E731
    out = [DoctorCheck("memory", True, f"free {gib(available_memory_bytes('cpu'))} (CPU)", required=False)]
    if torch.cuda.is_available():
        out.append(DoctorCheck("cuda memory", True, f"free {gib(available_memory_bytes('cuda'))}", required=False))
    return out


SECTIONS: tuple[Callable[[], list[DoctorCheck]], ...] = (_versions, _lirpa, _cuda, _threads, _memory)


def run_checks() -> list[DoctorCheck]:
    """Every check, in order; a section that raises is one failed required check naming it."""
    out: list[DoctorCheck] = []
    for section in SECTIONS:
        try:
            out.extend(section())
        except Exception as e:  # noqa: BLE001 - the doctor reports, it does not crash
            out.append(DoctorCheck(section.__name__.strip("_"), False, f"{type(e).__name__}: {e}"))
    return out


def exit_code(checks: list[DoctorCheck]) -> int:
    """2 when a required check failed, else 0."""
    from verigrad.reports import ExitCode

    failed = any(c.required and not c.ok for c in checks)
    return int(ExitCode.BAD_INPUT if failed else ExitCode.CERTIFIED)
