"""Compatibility shim: make auto_LiRPA 0.3 (written for torch 1.12 / numpy 1) import and
run on torch 2.13 / 2.14 and numpy 2.

Use :func:`import_auto_lirpa` instead of ``import auto_LiRPA``: it applies the fixes that
must precede the import, imports the package, then patches its classes. Idempotent.

Fixes (each found by running auto_LiRPA 0.3 on these torch / numpy versions):
1. ``torch.onnx.symbolic_helper._set_opset_version`` was removed: re-created as a setter of
   the TorchScript exporter's ``GLOBALS.export_onnx_opset_version``.
2. ``torch._C.Node`` lost ``__getitem__`` (attribute access by name): re-added through the
   typed getter named by ``node.kindOf(name)``.
3. ``nn.Module._named_members`` is now called with ``remove_duplicate=``; auto_LiRPA's
   override does not accept it: wrapped to accept and drop the keyword.
4. torch 2.14 gives clamp a zero gradient AT its bounds. auto_LiRPA clamps ReLU alphas that
   start exactly at 0 or 1, so alpha-CROWN would silently stay equal to CROWN. Detected at
   import; when present, the clamp used on alphas is replaced by one whose gradient passes
   (alphas are projected into [0, 1] after every step anyway, so values are unchanged).
5. numpy 2 removed ``numpy.lib.arraysetops``: aliased to a module providing ``isin``.
6. ``BoundedModule.check_IBP_intermediate`` (bounds of a ReLU / Neg / Transpose node taken by
   IBP from its bounded input) assigns each computed interval to the *input* node instead of the
   node itself: the input's ``interval`` is overwritten — with −[l, u] after a Neg — and every
   later interval rule reading it is wrong (found as an unsound CROWN bound on a residual MLP with a
   parameter box, where the gradient through a Sub is negated). Replaced by the intended code.
"""
from __future__ import annotations

import sys
import types
import warnings
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import torch

_DONE = False
# names of the fixes applied in this process (for diagnostics and tests)
APPLIED: list[str] = []


class _NamedMembersOwner(Protocol):
    """What :func:`_fix_named_members` patches (auto_LiRPA's BoundedModule; untyped)."""

    _named_members: Callable[..., Any]


class _ReluMaskOwner(Protocol):
    """What :func:`_fix_alpha_clamp` patches (auto_LiRPA's BoundRelu; untyped)."""

    _relu_mask_alpha: ClassVar[Callable[..., Any]]


def _is_wrapped(fn: object) -> bool:
    return bool(getattr(fn, "_verigrad_wrapped", False))


def _mark_wrapped(fn: Callable[..., Any]) -> None:
    # a function attribute (what _is_wrapped reads); functions keep them in their __dict__
    vars(fn)["_verigrad_wrapped"] = True


def clamp_blocks_gradient_at_bounds() -> bool:
    """True when d clamp(x, 0, 1)/dx is 0 at x = 0 or x = 1 (torch 2.14 behaviour)."""
    x = torch.tensor([0.0, 1.0], requires_grad=True)
    with torch.enable_grad():
        x.clamp(0.0, 1.0).sum().backward()
    assert x.grad is not None
    return bool((x.grad == 0).any())


def passthrough_clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Value clamp(x, lo, hi) with gradient 1 everywhere (straight-through): an alpha that
    sits exactly on a bound can still move inward."""
    return x + (x.clamp(lo, hi) - x).detach()


def _fix_opset_setter() -> None:
    import torch.onnx.symbolic_helper as sh

    if hasattr(sh, "_set_opset_version"):
        return
    try:
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # older layouts kept GLOBALS here
        from torch.onnx._globals import GLOBALS as _OLD_GLOBALS

        GLOBALS = _OLD_GLOBALS

    def _set_opset_version(opset_version: int) -> None:
        GLOBALS.export_onnx_opset_version = opset_version

    # re-adds a module attribute that torch (and so its stubs) no longer has
    vars(sh)["_set_opset_version"] = _set_opset_version
    APPLIED.append("opset_setter")


def _fix_node_getitem() -> None:
    node_cls = torch._C.Node
    if hasattr(node_cls, "__getitem__"):
        return

    def __getitem__(self: Any, key: str) -> Any:
        # kindOf gives the attribute's type tag ('i', 'f', 's', 't', 'is', ...); the node
        # has a getter method of that name
        return getattr(self, self.kindOf(key))(key)

    # torch's stub still declares Node.__getitem__, which its runtime no longer has
    node_cls.__getitem__ = __getitem__  # type: ignore[method-assign]
    APPLIED.append("node_getitem")


def _fix_numpy_arraysetops() -> None:
    try:
        import numpy.lib.arraysetops  # noqa: F401
        return
    except ImportError:
        pass
    mod = types.ModuleType("numpy.lib.arraysetops")
    vars(mod)["isin"] = np.isin  # the module's namespace (a new module: no declared attributes)
    sys.modules["numpy.lib.arraysetops"] = mod
    APPLIED.append("numpy_arraysetops")


def _fix_named_members(bounded_module_cls: type[_NamedMembersOwner]) -> None:
    orig = bounded_module_cls._named_members
    if _is_wrapped(orig):
        return

    def _named_members(self: Any, get_members_fn: Any, prefix: str = "", recurse: bool = True,
                       remove_duplicate: bool = True) -> Any:
        # auto_LiRPA's override always removes duplicates, which is what callers ask for by default
        return orig(self, get_members_fn, prefix, recurse)

    _mark_wrapped(_named_members)
    bounded_module_cls._named_members = _named_members
    APPLIED.append("named_members")


def _relu_mask_alpha_passthrough(lower: torch.Tensor, upper: torch.Tensor, lb_lower_d: torch.Tensor | None,
                                 ub_lower_d: torch.Tensor | None
                                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """BoundRelu's alpha masking (stable neurons get slope 1 or 0, unstable ones alpha),
    with the straight-through clamp so gradients reach alphas sitting at 0 or 1."""
    lower_mask = (lower >= 0).to(lower.dtype)
    upper_mask = upper <= 0
    zero_coeffs = upper_mask.all()
    unstable = (1.0 - lower_mask) * (1.0 - upper_mask.to(upper.dtype))
    if lb_lower_d is not None:
        lb_lower_d = passthrough_clamp(lb_lower_d, 0.0, 1.0) * unstable + lower_mask
    if ub_lower_d is not None:
        ub_lower_d = passthrough_clamp(ub_lower_d, 0.0, 1.0) * unstable + lower_mask
    return lb_lower_d, ub_lower_d, zero_coeffs


def _fix_alpha_clamp(bound_relu_cls: type[_ReluMaskOwner], force: bool = False) -> None:
    if not (force or clamp_blocks_gradient_at_bounds()):
        return
    if _is_wrapped(bound_relu_cls._relu_mask_alpha):
        return
    fn = staticmethod(_relu_mask_alpha_passthrough)
    _mark_wrapped(_relu_mask_alpha_passthrough)
    bound_relu_cls._relu_mask_alpha = fn
    APPLIED.append("alpha_clamp")


def _check_ibp_intermediate(self: Any, node: Any) -> bool:
    """auto_LiRPA's check_IBP_intermediate as intended: if ``node`` and its unbounded ancestors
    up to a bounded one are all of the kinds in ``self.ibp_intermediate`` (one input each), give
    each of them its IBP bounds, in order, and leave the bounded ancestor as it is."""
    chain = []
    while not hasattr(node, "lower") or not hasattr(node, "upper"):
        if type(node) not in self.ibp_intermediate:
            return False
        chain.append(node)
        node = node.inputs[0]
    for n in reversed(chain):
        self.IBP_general(n)
    return True


def _fix_check_ibp_intermediate(bounded_module_cls: type) -> None:
    if getattr(bounded_module_cls, "check_IBP_intermediate", None) is _check_ibp_intermediate:
        return
    bounded_module_cls.check_IBP_intermediate = _check_ibp_intermediate  # type: ignore[attr-defined]
    APPLIED.append("check_IBP_intermediate")


def import_auto_lirpa() -> types.ModuleType:
    """Apply the fixes and return the ``auto_LiRPA`` package (idempotent)."""
    global _DONE
    if _DONE:
        return sys.modules["auto_LiRPA"]
    _fix_opset_setter()
    _fix_node_getitem()
    _fix_numpy_arraysetops()
    # auto_LiRPA decorates helpers with torch.jit.script (deprecated in torch 2.x) and calls
    # warnings.simplefilter('once') at import, which would change the filters of the whole
    # process: import under catch_warnings (restores the filters), drop the jit deprecations
    # and pass any other warning on
    with warnings.catch_warnings(record=True) as caught:
        import auto_LiRPA
        from auto_LiRPA.operators import BoundRelu
    for w in caught:
        if not (issubclass(w.category, DeprecationWarning) and "torch.jit.script" in str(w.message)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    _fix_named_members(auto_LiRPA.BoundedModule)
    _fix_check_ibp_intermediate(auto_LiRPA.BoundedModule)
    _fix_alpha_clamp(BoundRelu)
    _DONE = True
    return auto_LiRPA


# how a user who installed verigrad without the Makefile gets auto_LiRPA (its metadata pins
# torch<1.13, so it is installed without its dependencies; setup.cfg declares what it needs)
INSTALL_HINT = "pip install --no-deps auto-lirpa==0.3"


def self_checks() -> list[tuple[str, bool, str]]:
    """Apply the shim and check that each fix took effect: (name, ok, detail) per check, for
    ``verigrad doctor``. A failed import is one failing check naming the install command."""
    try:
        lirpa = import_auto_lirpa()
        from auto_LiRPA.operators import BoundRelu
    except Exception as e:  # noqa: BLE001 - any failure of the import is what is reported
        return [("auto_LiRPA import", False, f"{type(e).__name__}: {e} (install: {INSTALL_HINT})")]
    import torch.onnx.symbolic_helper as sh

    out = [("auto_LiRPA import", True, f"auto_LiRPA {getattr(lirpa, '__version__', '?')}; fixes applied: "
                                       f"{', '.join(APPLIED) or 'none needed'}")]
    out.append(("opset setter", hasattr(sh, "_set_opset_version"),
                "torch.onnx.symbolic_helper._set_opset_version present"))
    out.append(("torch._C.Node.__getitem__", hasattr(torch._C.Node, "__getitem__"), "node attribute access by name"))
    try:
        import numpy.lib.arraysetops as aso

        out.append(("numpy.lib.arraysetops", hasattr(aso, "isin"), "importable, with isin"))
    except ImportError as e:
        out.append(("numpy.lib.arraysetops", False, str(e)))
    named = lirpa.BoundedModule._named_members
    out.append(("BoundedModule._named_members", _is_wrapped(named) or "remove_duplicate" in named.__code__.co_varnames,
                "accepts remove_duplicate="))
    out.append(("BoundedModule.check_IBP_intermediate",
                lirpa.BoundedModule.check_IBP_intermediate is _check_ibp_intermediate,
                "IBP bounds of ReLU / Neg / Transpose nodes leave their input's interval as it is"))
    blocked = clamp_blocks_gradient_at_bounds()
    relu_ok = not blocked or _is_wrapped(BoundRelu._relu_mask_alpha)
    out.append(("clamp gradient", relu_ok,
                "torch's clamp blocks the gradient at its bounds: alpha clamp replaced" if blocked
                else "torch's clamp passes the gradient at its bounds: no fix needed"))
    return out


def require_auto_lirpa(what: str) -> None:
    """Import auto_LiRPA (through the shim) for ``what`` (e.g. 'bounds.methods crown'), or
    raise a UserError (exit 2) with the one-line install instruction."""
    from verigrad.errors import UserError

    try:
        import_auto_lirpa()
    except ImportError as e:
        raise UserError(f"{what} needs auto_LiRPA, which is not importable ({e}): {INSTALL_HINT}") from None
