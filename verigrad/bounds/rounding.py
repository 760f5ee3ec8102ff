"""Floating-point rounding before a verdict.

The engines compute in the run's dtype, so a computed bound can sit on the wrong side of the
exact one. Before any property is decided every bound map must enclose the exact one:

- **IBP is rigorous.** The ``ibp`` engine rounds outward (:func:`verigrad.bounds.ibp.ibp_bounds`
  with ``outward=True``): every interval rule runs in round-to-nearest and each end is then
  moved outward by the rule's a-priori error bound and one ulp — Higham's bound for the
  reductions of the affine kinds (below), fixed ulp allowances for library functions. Its
  result (``EngineResult.rigorous``) needs no allowance for the gradient; ReLU masks and
  max-pool argmaxes are decided on rigorous bounds as well.
- **CROWN / alpha-CROWN carry an allowance.** Their arithmetic runs inside auto_LiRPA and
  cannot be instrumented, so their maps are widened by the a-priori allowance of this module
  (and so are their intermediate bounds inside the pass, :mod:`verigrad.bounds.lirpa`, so a
  ReLU mask is not decided by round-off).

The allowance follows the classical forward error bound for sums of products (Higham,
*Accuracy and Stability of Numerical Algorithms*, §3.1):

    |fl(Σ_k a_k b_k) − Σ_k a_k b_k| ≤ γ_n Σ_k |a_k b_k|,   γ_n = n·u / (1 − n·u),

with u the unit roundoff of the dtype and n the longest chain of roundings. Here n is
taken as 4·Σ_nodes (reduction length + 2) — every node of the network on one path, two
passes (values and gradients), each an interval product — and the magnitude Σ|a_k b_k| as
|l_i| + |u_i| + s, with s the largest |bound| of the sample's map, so that a coordinate
whose bound cancels to near 0 still gets an allowance on the scale of the map. This is an
allowance, not a proof (strong cancellation can exceed it). In float64 it is ~1e-12 of the
map's scale; in float32 ~1e-3. The explanation's own arithmetic after the engine (an
integrated-gradients sum, a product with the input: ``extra`` roundings) is widened the same
way for every engine, rigorous or not. Properties compare the widened bounds with their
threshold, so a case whose margin is within round-off is ``unknown``, never ``certified``.
"""
from __future__ import annotations

import torch

from verigrad.bounds.base import Bounds
from verigrad.models.network import Network
from verigrad.operators.interval import gamma_m


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
    ``net`` (``extra`` more roundings, e.g. an integrated-gradients sum), and a note saying so.
    ``rigorous``: ``bounds`` already enclose the exact gradient (outward-rounded IBP, or an
    exact intersection of maps each widened already), so only the ``extra`` roundings get the
    allowance (none when ``extra`` is 0), then one ulp outward."""
    n = extra if rigorous else chain_length(net) + extra
    if n:
        a = allowance(bounds, n, dtype)
        lo, up = bounds.lower - a, bounds.upper + a
    else:
        lo, up = bounds.lower, bounds.upper
    lo = torch.nextafter(lo, torch.full_like(lo, -torch.inf))
    up = torch.nextafter(up, torch.full_like(up, torch.inf))
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
