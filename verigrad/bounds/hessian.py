"""Second-order bounds: the Hessian H = ∂²o/∂x² over an input box, and the mean-value
certificates it gives on how far the explanation v = ∂o/∂x can move.

For a chain of affine maps and elementwise σ, with z_k the pre-activations, J_k = ∂z_k/∂x their
input Jacobians and γ_k = ∂o/∂σ(z_k) the backward (gradient-graph) quantity, differentiating
v = J_1ᵀ(σ'(z_1) ⊙ γ_1) = … once more gives the sum form

    H = Σ_k J_kᵀ diag(σ''(z_k) ⊙ γ_k) J_k  (+ J_Lᵀ (diag(p) − ppᵀ) J_L for the cross-entropy),

J_L the logits' Jacobian and p = softmax(z_L) (the Hessian of log-sum-exp); o = z_c adds
nothing (linear). The IBP engine bounds every factor over the box — z_k by IBP intersected
with the centred form z_k(x0) + [J_k](x − x0), J_k by propagating one interval tangent per
input coordinate, γ_k as :mod:`verigrad.bounds.ibp` does, σ'' by its exact range — then the
products (:func:`_interval_matmul`). H is symmetric, so the result is intersected with its
transpose, and its diagonal with Σ_k Σ_m [J_k,mj]²·[σ''γ]_k,m where squares are never negative.

``crown`` runs auto_LiRPA 0.3 on a module computing the same sum form
(:func:`verigrad.bounds.lirpa.crown_hessian_bounds`): small MLPs (d ≤ 64), o = z_c only; the
result is intersected with IBP. Elsewhere it raises :class:`EngineUnsupported` and
:func:`hessian_bounds` falls back to IBP, recording why.

Only smooth activations (softplus, sigmoid, tanh): for relu / leaky_relu the Hessian is zero
almost everywhere and the gradient jumps, so no Hessian bound implies anything
(:class:`SecondOrderUnsupported`). Input boxes only: there is no parameter box here.
"""
from __future__ import annotations

import functools
import math
import warnings
from enum import Enum
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from verigrad.bounds.base import Bounds, EngineResult, EngineUnsupported, check_inputs, uncross, with_ibp_fallback
from verigrad.bounds.ibp import (
    Interval,
    Product,
    _affine_backward,
    _affine_forward,
    _bilinear_midrad,
    _map_ends,
    mul_interval,
    mul_nonneg_interval,
    softmax_bounds,
)
from verigrad.graph.gradient_graph import Output, logits
from verigrad.models.network import Activation, Conv2d, Linear, Network, Reshape

__all__ = [
    "HessianMethod", "SecondOrderUnsupported", "abs_bound", "frobenius_upper", "hessian", "hessian_bounds",
    "ibp_hessian_bounds", "l2_change_bound", "linf_change_bound", "mean_value_bounds", "require_smooth", "second_derivative",
    "second_derivative_bounds", "spectral_norm_upper",
]

# tangent elements (samples · d · neurons, all layers) per sample group: ~64 MB per float64 tensor
_CHUNK_ELEMENTS = 8_000_000


class SecondOrderUnsupported(ValueError):
    """A network whose Hessian bounds would be meaningless (piecewise-linear activations)."""


class HessianMethod(str, Enum):
    IBP = "ibp"
    CROWN = "crown"


# ---------------------------------------------------------------------------------------------
# σ'' and its range over an interval



def _unsupported_message(layer) -> str:
    what = layer.kind.value if isinstance(layer, Activation) else layer.op
    return (
        f"layer {layer.name!r} is {what}: the Hessian of a ReLU network is zero almost everywhere "
        "and the gradient is discontinuous; mean-value bounds do not apply — use a smooth activation "
        "(softplus surrogate, e.g. the attack option surrogate_beta) for a second-order analysis"
    )


def require_smooth(net: Network, output: Output | str = Output.LOGIT) -> None:
    """Raise :class:`SecondOrderUnsupported` at the first piecewise-linear node (ReLU, leaky
    ReLU, PReLU, MaxPool), and :class:`~verigrad.errors.OpUnsupported` for a graph that is not a
    chain of Linear / Conv / reshape / activation layers (the Hessian engines' representation)."""
    if Output(output) == Output.PROBABILITY:
        raise SecondOrderUnsupported("second-order bounds cover o = z_c and the cross-entropy loss, not "
                                     "the probability output")
    for layer in net.layers:
        if layer.piecewise_linear:
            raise SecondOrderUnsupported(_unsupported_message(layer))
    net.require_chain("hessian")


def _smooth_layer(layer: Activation) -> Activation:
    if layer.piecewise_linear:
        raise SecondOrderUnsupported(_unsupported_message(layer))
    return layer


def second_derivative(layer: Activation, z: torch.Tensor) -> torch.Tensor:
    """σ''(z) of a smooth activation (the kind's own rule, ``Activation.second_derivative``)."""
    return _smooth_layer(layer).second_derivative(z)


def second_derivative_bounds(layer: Activation, zl: torch.Tensor, zu: torch.Tensor) -> Interval:
    """Exact range of σ'' over [zl, zu] (``Activation.second_derivative_bounds``)."""
    return _smooth_layer(layer).second_derivative_bounds(zl, zu)


# ---------------------------------------------------------------------------------------------
# autograd reference


def hessian(net: Network, x: torch.Tensor, target: torch.Tensor, output: Output = Output.LOGIT) -> torch.Tensor:
    """H[b] = ∂²o_b/∂x∂x (flattened input, shape (B, d, d), d = prod(input_shape)) by autograd:
    the forward-mode Jacobian of the reverse-mode gradient (torch.func, vmapped over samples,
    samples in groups capping memory), o as in :func:`~verigrad.graph.gradient_graph.saliency`.
    For relu / leaky_relu networks this is the almost-everywhere Hessian (zero curvature)."""
    b, d = x.shape[0], math.prod(net.input_shape)
    output = Output(output)

    def objective(xi: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z = logits(net, xi.unsqueeze(0))
        if output == Output.LOGIT:
            return z[0].gather(0, c.unsqueeze(0)).sum()
        if output == Output.PROBABILITY:
            return torch.softmax(z[0], dim=0).gather(0, c.unsqueeze(0)).sum()
        return F.cross_entropy(z, c.unsqueeze(0))

    second = torch.func.vmap(torch.func.jacfwd(torch.func.grad(objective)))
    step = _sample_chunk(net, d)
    xd = x.detach()
    with warnings.catch_warnings():
        # torch's first forward-mode call loads jit-scripted decompositions (deprecated in torch 2.x)
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning)
        parts = [second(xd[s : s + step], target[s : s + step]) for s in range(0, b, step)]
    return torch.cat(parts).reshape(b, d, d) if parts else xd.new_zeros(0, d, d)


# ---------------------------------------------------------------------------------------------
# IBP on the sum form


def _add(a: Interval, b: Interval) -> Interval:
    return a[0] + b[0], a[1] + b[1]


def _square(a: Interval) -> Interval:
    """Exact range of t² over [l, u]: 0 when the interval straddles 0."""
    sl, su = a[0] * a[0], a[1] * a[1]
    straddle = (a[0] < 0) & (a[1] > 0)
    return torch.where(straddle, torch.zeros_like(sl), torch.minimum(sl, su)), torch.maximum(sl, su)


def _tangent_forward(layer: Linear | Conv2d, t: Interval) -> Interval:
    """A·t for the layer's linear part (tangents carry no bias): exact with a point matrix."""
    w = (layer.weight, layer.weight)
    if isinstance(layer, Linear):
        return _bilinear_midrad(lambda a, m: F.linear(a, m), t, w)
    return _bilinear_midrad(lambda a, m: F.conv2d(a, m, None, layer.stride, layer.padding), t, w)


def _flat(t: Interval) -> Interval:
    """(B, k, *shape) → (B·k, *shape): tangent columns become batch rows for layer ops."""
    return _map_ends(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), t)


def _unflat(t: Interval, b: int) -> Interval:
    return _map_ends(lambda a: a.reshape(b, -1, *a.shape[1:]), t)


def _rows(t: Interval) -> Interval:
    """(B, d, *shape) → (B, d, n): one row per input coordinate, one column per neuron."""
    return _map_ends(lambda a: a.reshape(a.shape[0], a.shape[1], -1), t)


def _step_sum(t: Interval, a: torch.Tensor, c: torch.Tensor) -> Interval:
    """Σ_j [t_jm]·[a_j, c_j] for tangents t (B, d, n) and steps a ≤ 0 ≤ c (B, d), each product
    exact: its ends are min(t_l·c, t_u·a) and max(t_l·a, t_u·c)."""
    a, c = a.unsqueeze(-1), c.unsqueeze(-1)
    lo = torch.minimum(t[0] * c, t[1] * a).sum(1)
    up = torch.maximum(t[0] * a, t[1] * c).sum(1)
    return lo, up


def _interval_matmul(a: Interval, b: Interval) -> Interval:
    """[A]·[B] for batched interval matrices (…, i, m) × (…, m, j). A point A: midpoint-radius,
    exact. Otherwise A = [A⁺] + [A⁻] with [A⁺] = [max(A_l, 0), max(A_u, 0)] ≥ 0 and
    [A⁻] = [min(A_l, 0), min(A_u, 0)] ≤ 0; a sign-definite [p] times [q] has the exact ends
    p_u q_l⁻ + p_l q_l⁺ and p_u q_u⁺ + p_l q_u⁻ (p ≥ 0), and linear in the split parts, so
    eight matrix products give every term exactly unless both factors straddle 0 (then the
    term's ends are sums of the two candidate products instead of their min / max)."""
    if a[0] is a[1]:
        bm, br = (b[0] + b[1]) / 2, (b[1] - b[0]) / 2
        mid, rad = a[0] @ bm, a[0].abs() @ br
        return mid - rad, mid + rad
    pl, pu = a[0].clamp(min=0), a[1].clamp(min=0)
    nl, nu = a[0].clamp(max=0), a[1].clamp(max=0)
    ql_p, ql_n = b[0].clamp(min=0), b[0].clamp(max=0)
    qu_p, qu_n = b[1].clamp(min=0), b[1].clamp(max=0)
    # a negative part [n] times [q] is −([−n]·[q]): ends n_l q_u⁺ + n_u q_u⁻ and n_l q_l⁻ + n_u q_l⁺
    lo = pu @ ql_n + pl @ ql_p + nl @ qu_p + nu @ qu_n
    up = pu @ qu_p + pl @ qu_n + nl @ ql_n + nu @ ql_p
    return lo, up


def _softmax_hessian_bounds(pl: torch.Tensor, pu: torch.Tensor) -> Interval:
    """Interval of Q = diag(p) − ppᵀ (B, C, C) for p ∈ [pl, pu] entrywise:
    Q_mm = p_m(1 − p_m) (concave in p_m, peak 1/4 at 1/2), Q_mn = −p_m p_n ∈ [−pu_m pu_n, −pl_m pl_n]."""
    ql, qu = pl * (1 - pl), pu * (1 - pu)
    half = (pl <= 0.5) & (pu >= 0.5)
    dlo = torch.minimum(ql, qu)
    dup = torch.where(half, torch.full_like(ql, 0.25), torch.maximum(ql, qu))
    lo = -pu.unsqueeze(2) * pu.unsqueeze(1)
    up = -pl.unsqueeze(2) * pl.unsqueeze(1)
    eye = torch.eye(pl.shape[1], dtype=torch.bool, device=pl.device)
    lo = torch.where(eye, torch.diag_embed(dlo), lo)
    up = torch.where(eye, torch.diag_embed(dup), up)
    return lo, up


def _loss_diag_bounds(jl: Interval, pu: torch.Tensor) -> Interval:
    """Interval of the softmax term's diagonal J_jᵀ(diag(p) − ppᵀ)J_j = Var_p(J_j) for each
    row J_j ∈ R^C of the logit Jacobian ((B, d, C)): ≥ 0, ≤ E_p[J²] ≤ Σ_m pu_m·max J_m², and
    ≤ (max J − min J)²/4 (Popoviciu)."""
    sq = torch.maximum(jl[0] * jl[0], jl[1] * jl[1])
    moment = (pu.unsqueeze(1) * sq).sum(-1)
    spread = (jl[1].amax(-1) - jl[0].amin(-1)) ** 2 / 4
    up = torch.minimum(moment, spread)
    return torch.zeros_like(up), up


def _group_bounds(net: Network, box: Bounds, target: torch.Tensor, output: Output) -> tuple[Interval, Interval]:
    """Bounds on H (B, d, d) and, separately, on its diagonal (B, d) for a group of samples.

    Forward: pre-activation intervals by IBP, each intersected with the centred form
    z(x0) + [J]·[box − x0] (x0 the box centre; mean value theorem), and the input Jacobians
    J (tangents, one per input coordinate) by interval propagation. Backward: γ = ∂o/∂a by
    IBP as in :func:`~verigrad.bounds.ibp.ibp_bounds`. Then the sum form."""
    layers, n = net.layers, len(net.layers)
    b, d = box.lower.shape[0], math.prod(net.input_shape)
    x0 = box.center
    da, dc = (box.lower - x0).reshape(b, d), (box.upper - x0).reshape(b, d)
    eye = torch.eye(d, dtype=x0.dtype, device=x0.device).expand(b, d, d).reshape(b, d, *net.input_shape)
    t: Interval = (eye, eye)
    h: Interval = (box.lower, box.upper)
    h0 = x0
    pre: dict[int, Interval] = {}
    tangents: dict[int, Interval] = {}
    dsig: dict[int, Interval] = {}
    stop = n if output == Output.LOSS else n - 1
    for i in range(stop):
        layer = layers[i]
        if isinstance(layer, Activation):
            pre[i], tangents[i] = h, t
            dsig[i] = layer.derivative_bounds(*h)
            h, h0 = _map_ends(layer, h), layer(h0)  # every σ is nondecreasing
            t = mul_nonneg_interval((dsig[i][0].unsqueeze(1), dsig[i][1].unsqueeze(1)), t)
        elif isinstance(layer, Reshape):
            h, h0 = _map_ends(layer, h), layer(h0)
            t = _unflat(_map_ends(layer, _flat(t)), b)
        else:
            assert isinstance(layer, (Linear, Conv2d))  # require_smooth admitted chains of the four kinds only
            h, h0 = _affine_forward(layer, h, None, Product.MIDPOINT_RADIUS), layer(h0)
            t = _unflat(_tangent_forward(layer, _flat(t)), b)
            # centred form: h(x') = h(x0) + Ĵ(x' − x0) with Ĵ an average of Jacobians over the box
            cl, cu = _step_sum(_rows(t), da, dc)
            h = _uncross(torch.maximum(h[0], h0 + cl.reshape(h0.shape)), torch.minimum(h[1], h0 + cu.reshape(h0.shape)))

    onehot = F.one_hot(target.to(x0.device), net.num_classes).to(x0.dtype)
    hl = torch.zeros(b, d, d, dtype=x0.dtype, device=x0.device)
    hu = torch.zeros_like(hl)
    diag: Interval = (torch.zeros(b, d, dtype=x0.dtype, device=x0.device),) * 2
    if output == Output.LOGIT:
        seed: Interval = (onehot, onehot)
    else:
        pl, pu = softmax_bounds(h[0].reshape(b, -1), h[1].reshape(b, -1))
        seed = (pl - onehot, pu - onehot)
        q = _softmax_hessian_bounds(pl, pu)
        jl = _rows(t)  # (B, d, C)
        # Q·J_Lᵀ (B, C, d), each of its C terms exact
        jt = (jl[0].transpose(1, 2).unsqueeze(1), jl[1].transpose(1, 2).unsqueeze(1))  # (B, 1, C, d)
        prod = mul_interval((q[0].unsqueeze(-1), q[1].unsqueeze(-1)), jt)
        qj = (prod[0].sum(2), prod[1].sum(2))
        hl, hu = _interval_matmul(jl, qj)
        diag = _loss_diag_bounds(jl, pu)
    g: Interval = _map_ends(lambda v: v.reshape(b, *net.shapes[-1]), seed)
    for i in range(n - 1, -1, -1):
        layer = layers[i]
        if isinstance(layer, Activation):
            s = mul_interval(second_derivative_bounds(layer, *pre[i]), g)  # σ''(z) ⊙ γ
            g = mul_nonneg_interval(dsig[i], g)
            jk = _rows(tangents[i])
            sf = (s[0].reshape(b, 1, -1), s[1].reshape(b, 1, -1))
            sj = mul_interval(sf, jk)  # (B, d, n): s_m J_mj, exact
            tl, tu = _interval_matmul(jk, (sj[0].transpose(1, 2), sj[1].transpose(1, 2)))
            hl, hu = hl + tl, hu + tu
            sq = mul_interval(_square(jk), sf)  # diagonal Σ_m J_mj² s_m, squares never negative
            diag = _add(diag, (sq[0].sum(-1), sq[1].sum(-1)))
        elif isinstance(layer, Reshape):
            sh = net.shapes[i]
            g = _map_ends(functools.partial(_per_sample, shape=sh), g)
        else:
            assert isinstance(layer, (Linear, Conv2d))
            g = _affine_backward(layer, g, net.shapes[i], None, Product.MIDPOINT_RADIUS)
    return (hl, hu), diag


def _per_sample(v: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return v.reshape(v.shape[0], *shape)


def _sample_chunk(net: Network, d: int) -> int:
    """Samples per group so that one group's tangents (d per neuron) stay near _CHUNK_ELEMENTS."""
    per_sample = d * sum(math.prod(s) for s in net.shapes)
    return max(1, _CHUNK_ELEMENTS // per_sample)


def _uncross(lo: torch.Tensor, up: torch.Tensor) -> Interval:
    return uncross(lo, up, "Hessian bounds")


def _settle(lo: torch.Tensor, up: torch.Tensor) -> Bounds:
    return Bounds(*_uncross(lo, up))


def ibp_hessian_bounds(net: Network, box: Bounds, target: torch.Tensor, output: Output = Output.LOGIT) -> EngineResult:
    """Bounds (B, d, d) on H(x') = ∂²o/∂x'² for every x' in ``box``: interval evaluation of
    H = Σ_k J_kᵀ diag(σ''(z_k) ⊙ γ_k) J_k (+ J_Lᵀ(diag(p) − ppᵀ)J_L), samples in groups
    capping memory. Exact (up to round-off) on a zero-width box. Memory: the result holds
    2·B·d² numbers; a group holds d tangents per neuron of the network.

    Measured (float64, one CPU thread): MNIST MLP 784-256-256-10 (softplus) ~0.1 s per input;
    an MNIST-size CNN (conv 16@4×4 s2 → conv 32@4×4 → fc 100 → 10, softplus) 1.4 s (two
    threads) to 2.5 s (one) per input and ~1 GB peak (d × 8644 tangents, eight 784 × 5408 × 784 products)."""
    require_smooth(net, output)
    check_inputs(net, box, target)
    output = Output(output)
    b, d = box.lower.shape[0], math.prod(net.input_shape)
    lo = torch.empty(b, d, d, dtype=box.lower.dtype, device=box.lower.device)
    up = torch.empty_like(lo)
    dl = torch.empty(b, d, dtype=lo.dtype, device=lo.device)
    du = torch.empty_like(dl)
    step = _sample_chunk(net, d)
    for s0 in range(0, b, step):
        sl = slice(s0, min(b, s0 + step))
        (lo[sl], up[sl]), (dl[sl], du[sl]) = _group_bounds(net, box[sl], target[sl], output)
    # H is symmetric: H_ij lies in both [l_ij, u_ij] and [l_ji, u_ji]
    lo, up = torch.maximum(lo, lo.transpose(1, 2)), torch.minimum(up, up.transpose(1, 2))
    idx = torch.arange(d, device=lo.device)
    lo[:, idx, idx] = torch.maximum(lo[:, idx, idx], dl)
    up[:, idx, idx] = torch.minimum(up[:, idx, idx], du)
    notes = (
        "interval Hessian H = Σ_k J_kᵀ diag(σ''(z_k)·γ_k) J_k (+ the softmax term for the loss): "
        "pre-activations by IBP ∩ centred form, Jacobians and γ by IBP, products split by sign; "
        "intersected with its transpose, diagonal with exact squares",
    )
    return EngineResult(_settle(lo, up), "ibp", notes)


# ---------------------------------------------------------------------------------------------
# engines


HessianEngine = Callable[[Network, Bounds, torch.Tensor, Output], EngineResult]


def _crown(net: Network, box: Bounds, target: torch.Tensor, output: Output) -> EngineResult:
    """auto_LiRPA's CROWN on the sum-form Hessian graph (small MLPs, logit output), intersected
    with IBP (both sound) and with its own transpose."""
    try:
        from verigrad.bounds import lirpa  # heavy and optional
    except ImportError as e:
        raise EngineUnsupported(f"auto_LiRPA is not available ({e})") from e
    require_smooth(net, output)
    crown = lirpa.crown_hessian_bounds(net, box, target, output)
    ibp = ibp_hessian_bounds(net, box, target, output)
    lo = torch.maximum(crown.bounds.lower, ibp.bounds.lower)
    up = torch.minimum(crown.bounds.upper, ibp.bounds.upper)
    lo, up = torch.maximum(lo, lo.transpose(1, 2)), torch.minimum(up, up.transpose(1, 2))
    notes = crown.notes + ("intersected with the IBP Hessian bounds and with its transpose",)
    return EngineResult(_settle(lo, up), "crown", notes)


HESSIAN_ENGINES: dict[HessianMethod, HessianEngine] = {
    HessianMethod.IBP: ibp_hessian_bounds,
    HessianMethod.CROWN: _crown,
}


def hessian_bounds(
    method: HessianMethod | str,
    net: Network,
    box: Bounds,
    target: torch.Tensor,
    output: Output = Output.LOGIT,
) -> EngineResult:
    """Bounds (B, d, d) holding H(x') = ∂²o/∂x'² (flattened input) for every x' in ``box``,
    for class target[b] of each sample. Input boxes only (no parameter box).

    Raises :class:`SecondOrderUnsupported` for relu / leaky_relu networks. An engine that
    cannot handle the configuration (:class:`EngineUnsupported`) falls back to ``ibp``; the
    result records it in ``actual_method`` and ``notes``.
    """
    try:
        m = HessianMethod(method)
    except ValueError:
        raise ValueError(f"unknown Hessian bound method {method!r}; choose from {[x.value for x in HessianMethod]}") from None
    require_smooth(net, output)
    output = Output(output)
    return with_ibp_fallback(m.value, lambda: HESSIAN_ENGINES[m](net, box, target, output),
                             lambda: ibp_hessian_bounds(net, box, target, output))


# ---------------------------------------------------------------------------------------------
# certificates (mean value theorem)


def abs_bound(hb: Bounds) -> torch.Tensor:
    """M = max(|l|, |u|) entrywise: |H_ij(x')| ≤ M_ij over the box."""
    return torch.maximum(hb.lower.abs(), hb.upper.abs())


def frobenius_upper(hb: Bounds) -> torch.Tensor:
    """(B,) sound upper bound on sup ‖H‖_F over the box: ‖M‖_F."""
    return torch.linalg.matrix_norm(abs_bound(hb).double(), ord="fro").to(hb.lower.dtype)


def spectral_norm_upper(hb: Bounds) -> torch.Tensor:
    """(B,) sound upper bound on sup ‖H‖₂ over the box: ‖H‖₂ ≤ ‖|H|‖₂ ≤ ‖M‖₂ (|Hx| ≤ |H||x|
    and, for 0 ≤ A ≤ M, ‖A‖₂ = max_{x,y ≥ 0} yᵀAx ≤ ‖M‖₂). ‖M‖₂ is the largest singular value in
    float64 plus a backward-error margin (a few d·eps·‖M‖_F), capped by the provable
    min(‖M‖_F, sqrt(‖M‖₁‖M‖_∞))."""
    m = abs_bound(hb).double()
    d = m.shape[-1]
    fro = torch.linalg.matrix_norm(m, ord="fro")
    sigma = torch.linalg.matrix_norm(m, ord=2) + 8 * d * torch.finfo(torch.float64).eps * fro
    holder = torch.sqrt(m.sum(-2).amax(-1) * m.sum(-1).amax(-1))
    return torch.minimum(sigma, torch.minimum(fro, holder)).to(hb.lower.dtype)


def _batched(t: torch.Tensor, box: Bounds, what: str) -> torch.Tensor:
    """x0 / v0 as (B, *input_shape): one input's shape (*input_shape) is shared by every sample."""
    if t.shape == box.lower.shape[1:]:
        t = t.unsqueeze(0).expand_as(box.lower)
    if t.shape != box.lower.shape:
        raise ValueError(
            f"{what} must have the box's shape {tuple(box.lower.shape)} or one input's {tuple(box.lower.shape[1:])}, "
            f"got {tuple(t.shape)}"
        )
    return t


def _flat_box(box: Bounds, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Δx = x' − x0 ∈ [a, b] per coordinate (B, d), with a ≤ 0 ≤ b since x0 is in the box."""
    x0 = _batched(x0, box, "x0")
    if not bool(box.contains(x0).all()):
        # the segment x0 → x' must stay inside the box, where the Hessian bounds hold
        raise ValueError("x0 must lie in the box")
    b = x0.shape[0]
    return (box.lower - x0).reshape(b, -1), (box.upper - x0).reshape(b, -1)


def _radius(box: Bounds, x0: torch.Tensor) -> torch.Tensor:
    a, c = _flat_box(box, x0)
    return torch.maximum(-a, c)


def _change_intervals(hb: Bounds, box: Bounds, x0: torch.Tensor) -> Interval:
    """Δv = v(x') − v(x0) ∈ Σ_j [l_ij, u_ij]·[a_j, c_j] (B, d), [a, c] = box − x0, each product
    exact: with a_j ≤ 0 ≤ c_j its ends are min(l c, u a) and max(l a, u c)."""
    a, c = _flat_box(box, x0)
    a, c = a.unsqueeze(1), c.unsqueeze(1)
    lo = torch.minimum(hb.lower * c, hb.upper * a).sum(-1)
    up = torch.maximum(hb.lower * a, hb.upper * c).sum(-1)
    return lo, up


def mean_value_bounds(v0: torch.Tensor, hb: Bounds, box: Bounds, x0: torch.Tensor) -> Bounds:
    """Bounds on v(x') for every x' in ``box`` from v0 = v(x0), x0 a point of the box (not
    necessarily its centre: the input itself when the box is clipped to the domain); v0, x0 of
    shape (B, *input_shape) or (*input_shape), hb the Hessian bounds over the box.

    v(x') − v(x0) = Ĥ(x' − x0) with Ĥ = ∫₀¹ H(x0 + t(x' − x0)) dt; the segment lies in the box
    (convex), so Ĥ ∈ [l, u] entrywise and Δv_i ∈ Σ_j [l_ij, u_ij]·[box_l,j − x0_j, box_u,j − x0_j].
    """
    v0 = _batched(v0, box, "v0")
    lo, up = _change_intervals(hb, box, x0)
    return Bounds(v0 + lo.reshape(v0.shape), v0 + up.reshape(v0.shape))


def l2_change_bound(hb: Bounds, box: Bounds, x0: torch.Tensor) -> torch.Tensor:
    """(B,) bound on sup_{x' ∈ box} ‖v(x') − v(x0)‖₂: the ℓ2 norm of max(|Δl_i|, |Δu_i|) over
    the mean-value intervals of :func:`mean_value_bounds`. Never above ‖M r‖₂ ≤ ‖M‖₂‖r‖₂
    (|Δv| ≤ M r entrywise, r_j = max(x0_j − l_j, u_j − x0_j)), the spectral form, which is
    also taken (min) so the result is never looser than it either."""
    lo, up = _change_intervals(hb, box, x0)
    coord = torch.maximum(-lo, up).norm(dim=1)
    spectral = spectral_norm_upper(hb) * _radius(box, x0).norm(dim=1)
    return torch.minimum(coord, spectral)


def linf_change_bound(hb: Bounds, box: Bounds, x0: torch.Tensor) -> torch.Tensor:
    """(B,) bound on sup_{x' ∈ box} ‖v(x') − v(x0)‖_∞: max_i max(|Δl_i|, |Δu_i|) over the
    mean-value intervals, ≤ max_i Σ_j M_ij r_j ≤ ‖M‖_∞ · max_j r_j. :func:`mean_value_bounds`
    is never looser (this is its largest deviation)."""
    lo, up = _change_intervals(hb, box, x0)
    return torch.maximum(-lo, up).amax(dim=1)
