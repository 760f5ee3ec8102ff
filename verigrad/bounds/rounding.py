"""Floating-point rounding before a verdict.

The engines compute in the run's dtype with round-to-nearest, so a computed bound can sit on
the wrong side of the exact one. Before any property is decided every bound map must enclose
the exact one (the real-arithmetic range of the network whose weights are the given floats):

- **IBP rounds outward.** The ``ibp`` engine (:func:`verigrad.bounds.ibp.ibp_bounds` with
  ``outward=True``): every interval rule runs in round-to-nearest and each end is then moved
  outward by the rule's a-priori error bound and one ulp — Higham's γ_m·Σ|a_k||b_k| for the
  reductions of the affine kinds, fixed ulp allowances for library functions.
- **CROWN / alpha-CROWN carry a rigorous allowance.** Their arithmetic runs inside auto_LiRPA,
  so every bound it computes (intermediate nodes inside the pass, the final map) is widened by
  γ_n·M, M the absolute evaluation of its back-substituted sum, computed node by node from
  bounds on the coefficients of each relaxation (:mod:`verigrad.bounds.lirpa_magnitude`), and
  n = :func:`crown_chain_length`. The classical forward error bound for sums of products
  (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1),

      |fl(Σ_k a_k b_k) − Σ_k a_k b_k| ≤ γ_n Σ_k |a_k b_k|,   γ_n = n·u / (1 − n·u),

  holds for any order of summation, and compounds through a chain of such sums as γ of the
  total number of roundings: n counts every reduction of both passes four times (forward and
  transposed, final and intermediate specifications) plus LIB_ROUNDINGS per auto_LiRPA node for
  its relaxation's coefficients. What this assumes of auto_LiRPA: its relaxations are valid in
  exact arithmetic for the coefficients it computes (a property of its code, not of rounding).
- **bab's neuron-split leaves** are widened the same way from absolute evaluations of both
  passes (:func:`verigrad.bounds.bab._rounding`).

Each engine's result says so (``EngineResult.rigorous``). What remains is the explanation's own
arithmetic after the engine (a product with the input: ``extra`` roundings, each end off by at
most u·|end|), widened by :func:`widen` for every engine. A run whose bounds are not rigorous (the
mean-value engines of the second-order analysis, whose Hessian bounds get the a-priori allowance
γ_n·(|l| + |u| + s) of :func:`allowance`, s the map's largest |bound|, which strong cancellation can
exceed) certifies nothing: its certificates are withheld. Properties compare the widened bounds
with their threshold, so a case whose margin is within round-off is ``unknown``, never
``certified``.
"""
from __future__ import annotations

import torch

from verigrad.bounds.base import Bounds
from verigrad.models.network import Network
from verigrad.operators.interval import gamma_m, round_outward


def chain_length(net: Network) -> int:
    """n: an upper bound on the roundings along any path of the bound computation."""
    total = 0
    for node in net.layers:
        w = getattr(node, "weight", None)
        reduction = 1
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            fan_in = w[0].numel()  # in-features, or C_in·kh·kw
            fan_out = w.shape[0] * (w[0, 0].numel() if w.dim() > 2 else 1)  # the gradient pass's sum
            reduction = max(fan_in, fan_out)
        total += reduction + 2 + len(node.inputs)
    return 4 * total


# roundings a relaxation's coefficients may carry relative to their magnitude (divisions, products
# and library functions such as sigmoid / exp, each within a few ulps; the IBP rules allow 16 ulps
# for library functions as well)
LIB_ROUNDINGS = 16


def crown_chain_length(net: Network, lirpa_nodes: int) -> int:
    """n for a CROWN pass over the gradient graph of ``net`` lowered to ``lirpa_nodes`` auto_LiRPA
    nodes: every reduction of both passes counted four times (forward and transposed, bounds
    and intermediate specifications), plus LIB_ROUNDINGS for each node's relaxation."""
    return chain_length(net) + LIB_ROUNDINGS * lirpa_nodes


def gamma(n: int, dtype: torch.dtype) -> float:
    """γ_n = n·u / (1 − n·u) for the unit roundoff u of ``dtype``."""
    return gamma_m(n, dtype)


def allowance(bounds: Bounds, n: int, dtype: torch.dtype) -> torch.Tensor:
    """γ_n · (|l| + |u| + s) per coordinate, s the largest |bound| of each sample's map."""
    mag = torch.maximum(bounds.lower.abs(), bounds.upper.abs())
    scale = mag.flatten(1).max(dim=1).values.reshape(-1, *([1] * (mag.dim() - 1)))
    g = gamma(n, dtype)
    return g * (bounds.lower.abs() + bounds.upper.abs() + scale)


def widen(net: Network, bounds: Bounds, dtype: torch.dtype, extra: int = 0, *,
          rigorous: bool = False) -> tuple[Bounds, str]:
    """``bounds`` widened outward by the rounding allowance of a computation in ``dtype`` on
    ``net`` (``extra`` more roundings, e.g. a product with the input), and a note saying so.
    ``rigorous``: ``bounds`` already enclose the exact gradient (every engine but the Hessian
    ones, or an exact intersection of maps each widened already), so only the ``extra``
    roundings get the allowance (none when ``extra`` is 0), then one ulp outward."""
    n = extra if rigorous else chain_length(net) + extra
    lo, up = round_outward((bounds.lower, bounds.upper), allowance(bounds, n, dtype) if n else 0.0)
    name = str(dtype).removeprefix("torch.")
    if not rigorous:
        note = (f"rounding: bounds widened outward by γ_n·(|l|+|u|+max|bound|), n = {n} roundings in "
                f"{name} (γ_n = {gamma(n, dtype):.2e})")
    elif n:
        note = (f"rounding: engine bounds rigorous (outward rounding); the explanation's {n} further roundings "
                f"in {name} widened by γ_n·(|l|+|u|+max|bound|) (γ_n = {gamma(n, dtype):.2e})")
    else:
        note = (f"rounding: no allowance ({name} bounds rigorous, or an exact intersection of bounds each "
                "widened already); one ulp outward")
    return Bounds(lo, up), note
