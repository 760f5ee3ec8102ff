"""Interval bound propagation of the gradient graph (Wicker et al., ICLR 2023): the baseline.

Forward: every node's output box by its interval rule (``Node.ibp_forward``). Seed at the
logits: e_c (logit), [softmax bounds] − e_c (loss), or the range of p_c(e_c − p) (probability).
Backward in reverse topological order: each node's gradient interval rule (``Node.ibp_vjp``),
e.g. g ← Wᵀ([σ'(z_l..z_u)] ⊙ g); the intervals arriving at a tensor from its consumers are
summed. Products of an interval with a point matrix are exact IBP (centre W·c, radius |W|·r).
Interval × interval (parameter boxes) uses either
  - ``midpoint_radius``: the paper's Lemma 1, A·B ∈ AμBμ ± (|Aμ|Br + Ar|Bμ| + ArBr), or
  - ``exact``: the exact interval of every scalar product a_k·b_k, summed — never wider.

With ``outward=True`` (the ``ibp`` engine of :mod:`verigrad.bounds`) the propagation is a
rigorous enclosure of the exact (real-arithmetic) gradient range, by emulated directed
rounding: each rule runs in round-to-nearest, then every end moves outward by the rule's
a-priori error bound (``Node.ibp_forward_error`` / ``ibp_vjp_error``: Higham, *Accuracy and
Stability of Numerical Algorithms*, §3.1, for the reductions of the affine kinds; fixed ulp
allowances for library functions) and one ulp (``nextafter``). Every node then receives
enclosures of its exact inputs, so mask decisions (ReLU, max-pool argmax) are made on rigorous
bounds too. Matmuls and convolutions run in IEEE float32 there (no TF32, no cuDNN; see
:func:`ieee_float32`).
"""
from __future__ import annotations

import contextlib
import math
from enum import Enum
from typing import TYPE_CHECKING, Iterator

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
    round_outward,
    single_rounding,
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


# the seeds' error, in multiples of u·(1 + max |logit bound|) per sample, for K classes: the
# log-sum-exp of K − 1 terms (the shift by the max, K exps at ≤ 16u each, a K-term sum, one
# log; absolute error ≤ (K + 36)·u·(1 + |z|max)), the difference l_i − LSE (2u·(1 + |z|max)),
# sigmoid (≤ ¼ of the argument's error plus 16u), then p − e_c or the probability seed's
# products of values in [0, 1] (≤ 3 such errors + 4u): 4K + 256 is generous
def _seed_error_factor(k: int) -> float:
    return 4.0 * k + 256.0


def _outward_seed(logits: Interval, target: torch.Tensor, output: Output, num_classes: int,
                  dtype: torch.dtype, device: torch.device) -> Interval:
    """The loss / probability seed enclosing the exact one: computed in float64 from the
    (exactly converted) logit bounds, widened by its a-priori error there, rounded outward to
    ``dtype``."""
    wide = torch.float64
    lo64, up64 = logits[0].to(wide), logits[1].to(wide)
    s_lo, s_up = output_seed_bounds((lo64, up64), target, output, num_classes, wide, device)
    batch = s_lo.shape[0]
    zmag = torch.maximum(lo64.abs(), up64.abs()).reshape(batch, -1).max(dim=1, keepdim=True).values
    err = _seed_error_factor(num_classes) * (torch.finfo(wide).eps / 2) * (1 + zmag)
    s_lo, s_up = s_lo - err, s_up + err
    lo, up = s_lo.to(dtype), s_up.to(dtype)
    # the cast rounds to nearest: step down / up where it rounded inward
    lo = torch.where(lo.to(wide) > s_lo, torch.nextafter(lo, torch.full_like(lo, -math.inf)), lo)
    up = torch.where(up.to(wide) < s_up, torch.nextafter(up, torch.full_like(up, math.inf)), up)
    return lo, up


def _set_matmul_tf32(on: bool | str) -> bool | str:
    """Set cuBLAS float32 matmuls to TF32 (True) or IEEE (False) and return the previous setting,
    through whichever of PyTorch's two flag APIs the process uses (it refuses to mix them)."""
    m = torch.backends.cuda.matmul
    try:
        old: bool | str = m.allow_tf32
        m.allow_tf32 = bool(on)
    except RuntimeError:  # the process set fp32_precision (the newer API): use that one
        old = m.fp32_precision  # type: ignore[attr-defined]
        m.fp32_precision = on if isinstance(on, str) else ("tf32" if on else "ieee")  # type: ignore[attr-defined]
    return old


@contextlib.contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """Run float32 matmuls and convolutions on ``device`` with IEEE float32 arithmetic, the
    precondition of Higham's bound, and restore the global settings afterwards. On CUDA: cuBLAS
    without TF32, and cuDNN off (it may choose TF32 kernels, and FFT / Winograd convolutions
    whose errors are not those of sums of products), so convolutions run as im2col + GEMM.
    Chosen over refusing to run: PyTorch enables TF32 convolutions by default. The flags are
    process-global: do not run other CUDA work concurrently in other threads meanwhile. On the
    CPU nothing is changed (its float32 GEMMs and direct convolutions are IEEE); a process that
    lowered ``torch.set_float32_matmul_precision`` is set back to "highest" meanwhile."""
    with contextlib.ExitStack() as stack:
        try:
            precision = torch.get_float32_matmul_precision()
        except RuntimeError:  # mixed flag APIs: the CUDA branch below sets what matters there
            precision = "highest"
        if precision != "highest":
            torch.set_float32_matmul_precision("highest")
            stack.callback(torch.set_float32_matmul_precision, precision)
        if device.type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
            old = _set_matmul_tf32(False)
            stack.callback(_set_matmul_tf32, old)
        yield


def ibp_bounds(
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    output: Output = Output.LOGIT,
    params: ParamBox | None = None,
    *,
    product: Product | str = Product.MIDPOINT_RADIUS,
    outward: bool = False,
) -> EngineResult:
    """Bounds on v = ∂o/∂x over x ∈ box (and θ ∈ params), shape (B, *input_shape).

    ``target`` holds the class c per sample. Sound for every operator kind in the registry; at
    a zero-width box with no parameter box, lower = upper = the exact gradient (up to the
    rounding of the computation). ``outward``: round every rule outward by its error bound (see
    the module docstring), so the result encloses the exact gradient range rigorously
    (``EngineResult.rigorous``); at a zero-width box it is then a few hundred ulps of the map's
    scale wide rather than a point. Default False: the plain rules (training and internal use).
    """
    if outward:
        with ieee_float32(box.lower.device):
            return _ibp(net, box, target, output, params, Product(product), True)
    return _ibp(net, box, target, output, params, Product(product), False)


def _ibp(net: Network, box: Bounds, target: torch.Tensor, output: Output, params: "ParamBox | None",
         product: Product, outward: bool) -> EngineResult:
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
        xs = [vals[m] for m in wiring[i]]
        out = nodes[i].ibp_forward(xs, net.in_shapes(i), ctxs[i])
        if outward:
            out = round_outward(out, nodes[i].ibp_forward_error(xs, out, net.in_shapes(i), ctxs[i]))
        vals[nodes[i].name] = out

    batch = box.lower.shape[0]
    dtype, device = box.lower.dtype, box.lower.device
    logits = vals.get(nodes[-1].name)
    if outward and output != Output.LOGIT:  # the logit seed e_c is exact
        assert logits is not None
        seed = _outward_seed(logits, target, output, net.num_classes, dtype, device)
    else:
        seed = output_seed_bounds(logits, target, output, net.num_classes, dtype, device)
    out_shape = net.shapes[-1]
    grads: dict[str, Interval] = {nodes[-1].name: _map_ends(lambda t: t.reshape(batch, *out_shape), seed)}
    for i in range(n - 1, -1, -1):
        node = nodes[i]
        g = grads.pop(node.name)
        xs = [vals[m] for m in wiring[i]]
        res = node.ibp_vjp(xs, g, net.in_shapes(i), ctxs[i])
        if outward:
            errs = node.ibp_vjp_error(xs, g, res, net.in_shapes(i), ctxs[i])
            res = tuple(None if gi is None else round_outward(gi, e) for gi, e in zip(res, errs, strict=True))
        for name, gi in zip(wiring[i], res, strict=True):
            if gi is not None:
                if name not in grads:
                    grads[name] = gi
                else:  # a sum of two contributions: one rounding per end
                    acc = add(grads[name], gi)
                    grads[name] = round_outward(acc, single_rounding(acc[0])) if outward else acc
    g = grads[INPUT]
    notes: tuple[str, ...] = ()
    if params is not None:
        notes = (f"interval x interval product rule: {product.value}",)
    if outward:
        notes += ("outward rounding: every interval rule widened by its a-priori error bound and one ulp "
                  "(a rigorous enclosure of the exact gradient range)",)
    return EngineResult(Bounds(g[0], g[1]), "ibp", notes, rigorous=outward)
