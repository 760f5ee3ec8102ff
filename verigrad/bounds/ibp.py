"""Interval bound propagation of the gradient graph (Wicker et al., ICLR 2023): the baseline.

Forward: every node's output box by its interval rule (``Node.ibp_forward``). Seed at the
logits: e_c (logit), [softmax bounds] − e_c (loss), or the range of p_c(e_c − p) (probability).
Backward in reverse topological order: each node's gradient interval rule (``Node.ibp_vjp``),
e.g. g ← Wᵀ([σ'(z_l..z_u)] ⊙ g); the intervals arriving at a tensor from its consumers are
summed. Products of an interval with a point matrix are exact IBP (centre W·c, radius |W|·r).
Interval × interval (parameter boxes) uses either
  - ``midpoint_radius``: the paper's Lemma 1, A·B ∈ AμBμ ± (|Aμ|Br + Ar|Bμ| + ArBr), or
  - ``exact``: the exact interval of every scalar product a_k·b_k, summed — never wider.
"""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from verigrad.bounds.base import Bounds, EngineResult
from verigrad.graph.gradient_graph import Output
from verigrad.models.network import INPUT, Conv2d, Linear, Network
from verigrad.operators.base import IbpContext
from verigrad.operators.interval import (  # noqa: F401  (re-exported for the other engines)
    Interval,
    add,
    bilinear_midrad as _bilinear_midrad,
    map_ends as _map_ends,
    mul_interval,
    mul_nonneg_interval,
)

if TYPE_CHECKING:  # perturbation imports bounds.base: a runtime import would be circular
    from verigrad.perturbation import ParamBox


class Product(str, Enum):
    """Rule for interval × interval products (only matters with a parameter box)."""

    MIDPOINT_RADIUS = "midpoint_radius"
    EXACT = "exact"


def _ctx(layer, params: "ParamBox | None", product: Product | str) -> IbpContext:
    return IbpContext(params.get(layer.name) if params is not None else None, Product(product).value)


def _affine_forward(layer: Linear | Conv2d, x: Interval, params: "ParamBox | None", product: Product) -> Interval:
    """The interval rule of one affine layer (for chain engines)."""
    return layer.ibp_forward([x], [tuple(x[0].shape[1:])], _ctx(layer, params, product))


def _affine_backward(layer: Linear | Conv2d, g: Interval, in_shape: tuple[int, ...], params: "ParamBox | None",
                     product: Product) -> Interval:
    """The gradient interval rule of one affine layer (for chain engines)."""
    return layer.ibp_vjp([], g, [in_shape], _ctx(layer, params, product))[0]


def softmax_bounds(lo: torch.Tensor, up: torch.Tensor, dim: int = 1) -> Interval:
    """p_i = softmax(z)_i over z ∈ [lo, up] (along ``dim``): p_i is increasing in z_i and
    decreasing in z_j, so p_i ≥ sigmoid(l_i − LSE_{j≠i} u_j) and p_i ≤ sigmoid(u_i − LSE_{j≠i} l_j)
    (tight: each end is attained at a corner)."""
    lo_m, up_m = lo.movedim(dim, -1), up.movedim(dim, -1)
    k = lo_m.shape[-1]
    eye = torch.eye(k, dtype=torch.bool, device=lo.device)
    neg_inf = torch.tensor(float("-inf"), dtype=lo.dtype, device=lo.device)
    others_u = torch.logsumexp(torch.where(eye, neg_inf, up_m.unsqueeze(-2)), dim=-1)
    others_l = torch.logsumexp(torch.where(eye, neg_inf, lo_m.unsqueeze(-2)), dim=-1)
    return torch.sigmoid(lo_m - others_u).movedim(-1, dim), torch.sigmoid(up_m - others_l).movedim(-1, dim)


def probability_seed_bounds(lo: torch.Tensor, up: torch.Tensor, target: torch.Tensor) -> Interval:
    """Range of s = p_c(e_c − p) over logits z ∈ [lo, up] (B, K), per coordinate: from the exact
    ranges [a_j, b_j] of p_j (``softmax_bounds``), s_c = t(1 − t) with t ∈ [a_c, b_c] (concave:
    minimum at an end, maximum 1/4 if ½ lies inside) and s_j = −p_c p_j ∈ [−b_c b_j, −a_c a_j]."""
    pl, pu = softmax_bounds(lo, up)
    idx = target.reshape(-1, 1).to(lo.device)
    al, bu = pl.gather(1, idx), pu.gather(1, idx)
    lo_s, up_s = -bu * pu, -al * pl
    fa, fb = al * (1 - al), bu * (1 - bu)
    c_lo = torch.minimum(fa, fb)
    c_up = torch.where((al <= 0.5) & (bu >= 0.5), torch.full_like(fa, 0.25), torch.maximum(fa, fb))
    return lo_s.scatter(1, idx, c_lo), up_s.scatter(1, idx, c_up)


def output_seed_bounds(logits: Interval | None, target: torch.Tensor, output: Output, num_classes: int,
                       dtype: torch.dtype, device: torch.device) -> Interval:
    """Interval of ∂o/∂z at the logits (B, K); ``logits`` (their box) is needed except for LOGIT."""
    onehot = F.one_hot(target.to(device), num_classes).to(dtype)
    if output == Output.LOGIT:
        return onehot, onehot  # a point: the first backward step is exact
    assert logits is not None
    lo, up = logits[0].reshape(onehot.shape[0], -1), logits[1].reshape(onehot.shape[0], -1)
    if output == Output.LOSS:
        pl, pu = softmax_bounds(lo, up)
        return pl - onehot, pu - onehot
    return probability_seed_bounds(lo, up, target)


def ibp_bounds(
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    output: Output = Output.LOGIT,
    params: ParamBox | None = None,
    *,
    product: Product | str = Product.MIDPOINT_RADIUS,
) -> EngineResult:
    """Bounds on v = ∂o/∂x over x ∈ box (and θ ∈ params), shape (B, *input_shape).

    ``target`` holds the class c per sample. Sound for every operator kind in the registry; at
    a zero-width box with no parameter box, lower = upper = the exact gradient.
    """
    product = Product(product)
    output = Output(output)
    if params is not None and params.empty:
        params = None
    nodes, wiring = net.layers, net.wiring
    n = len(nodes)
    ctxs = [_ctx(node, params, product) for node in nodes]
    # the logits' box is needed only for the loss / probability seeds
    stop = n if output != Output.LOGIT else n - 1
    vals: dict[str, Interval] = {INPUT: (box.lower, box.upper)}
    for i in range(stop):
        vals[nodes[i].name] = nodes[i].ibp_forward([vals[m] for m in wiring[i]], net.in_shapes(i), ctxs[i])

    batch = box.lower.shape[0]
    seed = output_seed_bounds(vals.get(nodes[-1].name), target, output, net.num_classes, box.lower.dtype,
                              box.lower.device)
    out_shape = net.shapes[-1]
    grads: dict[str, Interval] = {nodes[-1].name: _map_ends(lambda t: t.reshape(batch, *out_shape), seed)}
    for i in range(n - 1, -1, -1):
        node = nodes[i]
        g = grads.pop(node.name)
        xs = [vals[m] for m in wiring[i]]
        for name, gi in zip(wiring[i], node.ibp_vjp(xs, g, net.in_shapes(i), ctxs[i]), strict=True):
            if gi is not None:
                grads[name] = add(grads[name], gi) if name in grads else gi
    g = grads[INPUT]
    notes: tuple[str, ...] = ()
    if params is not None:
        notes = (f"interval x interval product rule: {product.value}",)
    return EngineResult(Bounds(g[0], g[1]), "ibp", notes)
