"""SmoothGrad, Sparsified SmoothGrad and their randomized-smoothing certificates.

Levine, Singla & Feizi (2019), "Certifiably robust interpretation in deep learning".

Explanations (δ_1..δ_n i.i.d. N(0, σ²I), drawn reproducibly from ``seed``):

  SmoothGrad              ĝ(x) = (1/n) Σ_i ∇o(x + δ_i)
  Sparsified SmoothGrad   ĥ(x) = (1/n) Σ_i s(∇o(x + δ_i)),  s(g)_j = 1 if |g_j| is among the
                          K largest of |g|, else 0  (K = ⌈τ·d⌉ for a fraction τ, as the paper)
  relaxed (paper §3.4)    s(g)_j = 1 for the C largest |g_j|, 0 outside the K largest, and
                          linear in between: (|g_j| − a_[K+1]) / (a_[C] − a_[K+1]) clipped to
                          [0, 1], with a_[r] the r-th largest |g| (a_[d+1] := 0, a_[0] := a_[1]).

Ties in |g| are broken by index (a stable descending sort: the lower flat index ranks
first), so s is a fixed, deterministic function of g and the non-relaxed map has exactly K
ones per sample. Which tie rule is used does not matter for the certificate, only that it is
one fixed function: h(x) = E_δ[s(∇o(x + δ))] is then a well-defined function of x.

Certificate (the paper's Theorem 2 + Corollary 1; Salman et al. 2019 give the same Lipschitz
fact). For any measurable s_j with values in [0, 1], x ↦ Φ⁻¹(h_j(x)) is 1/σ-Lipschitz, so for
every ‖x' − x‖₂ ≤ ρ

    Φ(Φ⁻¹(h_j(x)) − ρ/σ)  ≤  h_j(x')  ≤  Φ(Φ⁻¹(h_j(x)) + ρ/σ).

h_j(x) is unknown; the n samples give a confidence interval [h_j^lo, h_j^hi] for it, jointly
over all d coordinates with probability ≥ 1 − p (union bound: each coordinate's two-sided
interval is at level p/d). Both ends are monotone in h_j(x), so plugging in the interval ends
gives bounds on h_j(x') that hold for every x' in the ball at once, with probability ≥ 1 − p
over the sampling (per input; each input of a batch has its own 1 − p).

  hoeffding (the paper)   h^lo/hi = ĥ ∓ c,  c = sqrt(ln(2d/p) / (2n))   (clipped to [0, 1])
  clopper_pearson         exact binomial interval for the {0,1}-valued non-relaxed map, each
                          side at level p/(2d) (same union bound); much tighter near 0 and 1.

Plain SmoothGrad has unbounded coordinates; it is certified through a SOUND global range
|∂o/∂x_j| ≤ G_j for all x ∈ ℝ^d (:func:`global_gradient_range`): (g_j + G_j)/(2G_j) ∈ [0, 1],
the same argument applies (Hoeffding over a range of 2G_j), and the bounds are mapped back.

Deviations from the paper (whose formulas were partly lost in the text we have):
- p here is the FAILURE probability (the paper states success probability p); c is the same.
- Clopper–Pearson is an addition (optional; Hoeffding is the default, as in the paper).
- The relaxed map's zero level is a_[K+1] (the largest excluded magnitude), so exactly the
  top K are eligible; with C = K it reproduces the non-relaxed map.
- Plain SmoothGrad is certified through G (signed values), not the paper's "scaled
  SmoothGrad" |∇|/max|∇|.
- Top-k overlap (:func:`topk_overlap_certificate`): the paper's Corollary 2 with strict
  inequalities (so no tie-breaking assumption is needed); see there for how it relates to the
  ``topk`` rule of :mod:`verigrad.properties`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, TypeGuard

import numpy as np
import torch

from verigrad.bounds.base import Bounds, check_inputs
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.guarantees import Guarantee
from verigrad.ranking import topk_overlap_lower_bound
from verigrad.models.network import Activation, Conv2d, Linear, Network, Reshape, conv_transpose

F64 = torch.float64


class SmoothingInterval(str, Enum):
    """The confidence interval for each coordinate's expected sample."""

    HOEFFDING = "hoeffding"  # the paper's Corollary 1, any [0, 1]-valued samples
    CLOPPER_PEARSON = "clopper_pearson"  # exact binomial, {0, 1}-valued samples only


_INTERVALS = tuple(i.value for i in SmoothingInterval)
# float64 rounding in ndtr/ndtri: widen every certified interval outward by this much
_ROUND = 1e-12
# noise is drawn in blocks of at most this many values (rows × d), each block from its own
# seed sequence (seed, block index), so the stream does not depend on batch_size
_NOISE_BLOCK_VALUES = 1 << 20
_NOISE_BLOCK_ROWS = 256


# ----------------------------------------------------------------------------------------
# Configuration


def _is_int(v: object) -> TypeGuard[int | np.integer]:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: object) -> TypeGuard[int | float | np.integer | np.floating]:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclass(frozen=True)
class SmoothingConfig:
    """How to sample and certify a smoothed explanation.

    sigma               std of the Gaussian noise, in input units (> 0).
    samples             n, the number of noise draws (≥ 1).
    seed                seeds the noise (≥ 0); the same seed gives the same δ_1..δ_n for every
                        input and every batch_size.
    batch_size          noisy inputs per forward/backward pass (memory only, not the result).
    sparsify            K: a float in (0, 1] is a fraction of the d features (K = ⌈τ·d⌉,
                        the paper's ceiling), an int ≥ 1 a count.
    relaxed             relaxed Sparsified SmoothGrad (paper §3.4); needs ``clip``.
    clip                C for the relaxed map: float in [0, 1] (fraction, C = ⌈γ·d⌉) or int
                        ≥ 0 (count); C ≤ K. Only with ``relaxed``.
    failure_probability p in (0, 1): the certificate fails with probability ≤ p per input.
    interval            "hoeffding" (the paper's Corollary 1) or "clopper_pearson" (exact
                        binomial; only for the non-relaxed sparsified map).
    """

    sigma: float = 0.15
    samples: int = 1000
    seed: int = 0
    batch_size: int = 256
    sparsify: float | int = 0.1
    relaxed: bool = False
    clip: float | int | None = None
    failure_probability: float = 0.05
    interval: SmoothingInterval | str = SmoothingInterval.HOEFFDING

    def __post_init__(self) -> None:
        if not _is_real(self.sigma) or not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if not _is_int(self.samples) or self.samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {self.samples!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        _check_count("sparsify", self.sparsify, allow_zero=False)
        if not isinstance(self.relaxed, bool):
            raise ValueError(f"relaxed must be a bool, got {self.relaxed!r}")
        if self.relaxed and self.clip is None:
            raise ValueError("relaxed=True needs clip (how many of the K kept features are clipped to 1)")
        if not self.relaxed and self.clip is not None:
            raise ValueError("clip is only used by the relaxed map (relaxed=True)")
        if self.clip is not None:
            _check_count("clip", self.clip, allow_zero=True)
        p = self.failure_probability
        if not _is_real(p) or not 0 < p < 1:
            raise ValueError(f"failure_probability must lie in (0, 1), got {p!r}")
        if self.interval not in _INTERVALS:
            raise ValueError(f"interval must be one of {_INTERVALS}, got {self.interval!r}")
        object.__setattr__(self, "interval", SmoothingInterval(self.interval))
        if self.interval == "clopper_pearson" and self.relaxed:
            raise ValueError("interval='clopper_pearson' needs {0,1}-valued samples: not with relaxed=True "
                             "(use 'hoeffding')")

    def kept(self, d: int) -> int:
        """K for a map of d features."""
        return _resolve_count("sparsify", self.sparsify, d)

    def clipped(self, d: int) -> int:
        """C for a map of d features (relaxed only); C ≤ K."""
        if self.clip is None:
            raise ValueError("clip is not set (relaxed=False)")
        c, k = _resolve_count("clip", self.clip, d), self.kept(d)
        if c > k:
            raise ValueError(f"clip resolves to C = {c} features, more than the K = {k} kept by sparsify")
        return c


def _check_count(name: str, v: object, allow_zero: bool) -> None:
    if _is_int(v):
        if v < (0 if allow_zero else 1):
            raise ValueError(f"{name} as a count must be >= {0 if allow_zero else 1}, got {v}")
    elif _is_real(v):
        lo_ok = v >= 0 if allow_zero else v > 0
        if not (math.isfinite(v) and lo_ok and v <= 1):
            rng = "[0, 1]" if allow_zero else "(0, 1]"
            raise ValueError(f"{name} as a fraction must lie in {rng}, got {v}")
    else:
        raise ValueError(f"{name} must be a fraction (float) or a count (int), got {v!r}")


def _resolve_count(name: str, v: float | int, d: int) -> int:
    if _is_int(v):
        if v > d:
            raise ValueError(f"{name} = {v} exceeds the {d} features of the map")
        return int(v)
    # the paper: "if τd is not an integer, the ceiling is used"; round first so that 0.1·780
    # is 78, not 79 from 78.00000000000001
    return min(d, math.ceil(round(float(v) * d, 9)))


# ----------------------------------------------------------------------------------------
# Sparsification


def _top_mask(a: torch.Tensor, m: int, mth: torch.Tensor) -> torch.Tensor:
    """The m largest entries of each row of a ≥ 0 (mth = the m-th largest value, (N, 1)),
    ties at the m-th value going to the lowest indices: what a stable descending sort would
    keep, without sorting (O(d) after one topk)."""
    if m == 0:
        return torch.zeros_like(a, dtype=torch.bool)
    gt = a > mth
    eq = a == mth
    need = m - gt.sum(1, keepdim=True)
    return gt | (eq & (torch.cumsum(eq, 1) <= need))


def sparsify_map(g: torch.Tensor, kept: int, relaxed_clip: int | None = None) -> torch.Tensor:
    """s(g) per row of g (N, d): the K largest |g_j| → 1, the rest → 0; with ``relaxed_clip``
    = C the relaxed map (C largest → 1, ranks C+1..K linear in |g_j| between a_[K+1] and
    a_[C], the rest 0). Ties: as a stable descending sort, the lower index ranks first."""
    n, d = g.shape
    if not 1 <= kept <= d:
        raise ValueError(f"K = {kept} must lie in [1, {d}]")
    a = g.abs()
    top = a.topk(min(kept + 1, d), dim=1).values  # a_[1] ≥ … ≥ a_[K] (≥ a_[K+1])
    in_k = _top_mask(a, kept, top[:, kept - 1 : kept])
    if relaxed_clip is None:
        return in_k.to(g.dtype)
    c = relaxed_clip
    if not 0 <= c <= kept:
        raise ValueError(f"C = {c} must lie in [0, K = {kept}]")
    in_c = _top_mask(a, c, top[:, max(c, 1) - 1 : max(c, 1)])
    hi = top[:, max(c, 1) - 1 : max(c, 1)]
    lo = top[:, kept : kept + 1] if kept < d else torch.zeros_like(hi)
    span = hi - lo
    # span = 0: every eligible magnitude equals the clip level, so it maps to 1
    lin = torch.where(span > 0, (a - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.ones_like(a))
    mid = lin.clamp(0.0, 1.0)
    return torch.where(in_c, torch.ones_like(a), torch.where(in_k, mid, torch.zeros_like(a)))


# ----------------------------------------------------------------------------------------
# Sampling


def _noise_rows(d: int) -> int:
    return max(1, min(_NOISE_BLOCK_ROWS, _NOISE_BLOCK_VALUES // d))


def _noise(seed: int, lo: int, hi: int, d: int) -> torch.Tensor:
    """Standard normal δ for sample indices lo..hi−1, shape (hi − lo, d), float64 on CPU.

    Sample i is row i mod R of block i // R, block b drawn from SeedSequence([seed, b]): any
    chunking of the indices gives the same values."""
    rows = _noise_rows(d)
    parts = []
    for b in range(lo // rows, (hi - 1) // rows + 1):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, b])))
        block = rng.standard_normal((rows, d))
        s, e = max(lo, b * rows) - b * rows, min(hi, (b + 1) * rows) - b * rows
        parts.append(block[s:e])
    return torch.from_numpy(np.concatenate(parts, axis=0))


def _sample_mean(net: Network, x: torch.Tensor, target: torch.Tensor, output: Output, cfg: SmoothingConfig,
                 transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(1/n) Σ_i transform(∇o(x + σδ_i)) per input, float64, shape (B, *S).

    Every input of the batch sees the same δ_i (so its result does not depend on the other
    inputs); chunks of max(1, batch_size // B) draws go through one autograd pass."""
    check_inputs(net, Bounds.point(x), target, check_dtype=False)
    b = x.shape[0]
    d = math.prod(net.input_shape)
    xf = x.detach().to(dtype=net.dtype, device=net.device).reshape(b, d)
    tgt = target.to(net.device)
    per_pass = max(1, cfg.batch_size // max(b, 1))
    total = torch.zeros(b, d, dtype=F64, device=net.device)
    for lo in range(0, cfg.samples, per_pass):
        hi = min(cfg.samples, lo + per_pass)
        m = hi - lo
        delta = (cfg.sigma * _noise(cfg.seed, lo, hi, d)).to(dtype=net.dtype, device=net.device)
        xs = (xf[:, None, :] + delta[None]).reshape(b * m, *net.input_shape)
        g = saliency(net, xs, tgt.repeat_interleave(m), output).reshape(b * m, d)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("non-finite gradient at a noisy input: the smoothed map is undefined")
        total += transform(g.to(F64)).reshape(b, m, d).sum(1)
    return (total / cfg.samples).reshape(b, *net.input_shape)


def _sparsifier(cfg: SmoothingConfig, d: int) -> Callable[[torch.Tensor], torch.Tensor]:
    kept = cfg.kept(d)
    clip = cfg.clipped(d) if cfg.relaxed else None
    return lambda g: sparsify_map(g, kept, clip)


def smoothgrad(net: Network, x: torch.Tensor, target: torch.Tensor, output: Output | str,
               cfg: SmoothingConfig) -> torch.Tensor:
    """SmoothGrad ĝ(x) = (1/n) Σ_i ∇o(x + δ_i), δ_i ~ N(0, σ²I): signed, float64, (B, *S)."""
    return _sample_mean(net, x, target, Output(output), cfg, lambda g: g)


def sparsified_smoothgrad(net: Network, x: torch.Tensor, target: torch.Tensor, output: Output | str,
                          cfg: SmoothingConfig) -> torch.Tensor:
    """Sparsified SmoothGrad (1/n) Σ_i s(∇o(x + δ_i)) (relaxed s when ``cfg.relaxed``): values
    in [0, 1], float64, (B, *S). See the module docstring for s and its tie rule."""
    d = math.prod(net.input_shape)
    return _sample_mean(net, x, target, Output(output), cfg, _sparsifier(cfg, d))


# ----------------------------------------------------------------------------------------
# Global gradient range


def _abs_backward(layer, b: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """A bound on |Wᵀ g| from a bound b ≥ |g| (per coordinate): |W|ᵀ b."""
    if isinstance(layer, Linear):
        return b @ layer.weight.to(F64).abs()
    if isinstance(layer, Conv2d):
        return conv_transpose(b, layer.weight.to(F64).abs(), layer.stride, layer.padding,
                              layer.output_padding(in_shape), in_shape)
    if isinstance(layer, Reshape):
        return b.reshape(b.shape[0], *in_shape)
    if isinstance(layer, Activation):
        return b * layer.derivative_sup()
    raise ValueError(f"no gradient-range rule for layer {type(layer).__name__}")


def global_gradient_range(net: Network, output: Output | str, target: torch.Tensor | None = None) -> torch.Tensor:
    """G ≥ 0 with |∂o/∂x_j| ≤ G_j for EVERY x ∈ ℝ^d, float64.

    Backward pass g_{k−1} = W_kᵀ(σ'(z_k) ⊙ g_k) in absolute values: b_{k−1} = |W_k|ᵀ(Σ1_k b_k),
    Σ1 = sup|σ'|. The last affine layer is done exactly over the set of possible seeds:
    logit o = z_c has seed e_c, so b = |A e_c| with A the last layer's transpose; loss
    o = CE(z, c) has seed softmax(z) − e_c ∈ conv{0, e_j − e_c : j ≠ c}, so (a convex
    function is maximised at a vertex) b = max_{j≠c} |A(e_j − e_c)|.
    Shape: (B, *S) for ``target`` (B,), else S (valid for every class: max over c)."""
    output = Output(output)
    net.require_chain("smoothing (global gradient range)")
    layers = net.layers
    last, shapes = layers[-1], net.shapes
    assert isinstance(last, (Linear, Conv2d))  # require_chain: the chain ends in an affine layer
    ncls = net.num_classes
    eye = torch.eye(ncls, dtype=F64, device=net.device).reshape(ncls, *shapes[-1])
    w64 = last.weight.to(F64)
    if isinstance(last, Linear):
        cols = eye @ w64  # row j = W[j]: the gradient at the last layer's input for seed e_j
    else:
        cols = conv_transpose(eye, w64, last.stride, last.padding, last.output_padding(shapes[-2]), shapes[-2])
    cols = cols.reshape(ncls, -1)  # (C, n_{L−1})
    if output == Output.LOGIT:
        per_class = cols.abs()  # (C, n)
    elif output == Output.PROBABILITY:
        # seed s = p_c(e_c − p) has ‖s‖₁ = 2p_c(1 − p_c) ≤ 1/2, so |(Aᵀs)_i| ≤ ½ max_j |A_ji|
        per_class = 0.5 * cols.abs().max(dim=0, keepdim=True).values.expand(ncls, -1)
    else:
        diff = (cols[None, :, :] - cols[:, None, :]).abs()  # [c, j] = |A e_j − A e_c|
        per_class = diff.amax(1)  # j = c gives 0, harmless: 0 is a vertex too
    if target is None:
        b = per_class.amax(0, keepdim=True)
    else:
        b = per_class[target.to(net.device)]
    b = b.reshape(b.shape[0], *shapes[-2])
    for i in range(len(layers) - 2, -1, -1):
        b = _abs_backward(layers[i], b, shapes[i])
    return b if target is not None else b[0]


# ----------------------------------------------------------------------------------------
# Confidence intervals


def hoeffding_halfwidth(samples: int, coordinates: int, failure_probability: float) -> float:
    """c with P(∃j: |ĥ_j − h_j| ≥ c) ≤ p for n i.i.d. samples in [0, 1] per coordinate:
    Hoeffding 2·exp(−2nc²) per coordinate, union bound over d: c = sqrt(ln(2d/p) / (2n))."""
    return math.sqrt(math.log(2.0 * coordinates / failure_probability) / (2.0 * samples))


def _binom_log_cdf(m: torch.Tensor, n: int, p: torch.Tensor, logc: torch.Tensor) -> torch.Tensor:
    """log P(X ≤ m) for X ~ Bin(n, p), per row (m, p of shape (u,), p ∈ (0, 1));
    logc[j] = log C(n, j) for j = 0..max(m) (only those terms enter)."""
    j = torch.arange(logc.shape[0], dtype=F64, device=p.device)
    # log pmf = log C(n, j) + j·logit(p) + n·log(1 − p)
    lp = torch.addcmul(logc[None], j[None], (torch.log(p) - torch.log1p(-p))[:, None])
    lp = lp.masked_fill(j[None] > m[:, None], -math.inf)
    return torch.logsumexp(lp, dim=1) + n * torch.log1p(-p)


_CP_TABLES: dict[tuple[int, float], torch.Tensor] = {}
_CP_TABLE_MAX_N = 1 << 16  # keep a table of p_U(0..n) (n + 1 floats) up to this n


def _cp_upper(m: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    """One-sided Clopper–Pearson upper limit p_U(m): P(X ≤ m; n, p_U) = α (1 for m = n).

    Bisection on [m/n, min(1, m/n + sqrt(ln(1/α)/(2n)))]: at m/n the cdf is ≥ 1/2 > α (the
    median of Bin(n, p) is np when np is an integer; checked anyway, else the bracket starts
    at 0), and at the right end Hoeffding gives cdf ≤ exp(−2n(p − m/n)²) = α. Stops at a bracket of 1e-10 and returns its
    upper end, so the limit is never too small (conservative)."""
    out = torch.ones(m.shape, dtype=F64)
    todo = m < n
    if not bool(todo.any()):
        return out
    mm = m[todo].to(F64)
    la = math.log(alpha)
    jmax = int(mm.max())
    j = torch.arange(jmax + 1, dtype=F64)
    logc = math.lgamma(n + 1.0) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
    order = torch.argsort(mm)
    ms = mm[order]
    step = max(1, (1 << 21) // (jmax + 1))
    res = torch.empty_like(ms)
    width = math.sqrt(math.log(1.0 / alpha) / (2.0 * n))
    for s in range(0, len(ms), step):
        mc = ms[s : s + step]
        top = int(mc.max())
        lc = logc[: top + 1]
        lo = mc / n
        hi = (lo + width).clamp(max=1.0)
        bad = _binom_log_cdf(mc, n, lo.clamp(1e-300, 1 - 1e-16), lc) < la
        lo = torch.where(bad, torch.zeros_like(lo), lo)
        while bool(((hi - lo) > 1e-10).any()):
            mid = (lo + hi) / 2
            above = _binom_log_cdf(mc, n, mid.clamp(1e-300, 1 - 1e-16), lc) > la  # cdf(mid) > α: p_U > mid
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        res[s : s + step] = hi
    back = torch.empty_like(res)
    back[order] = res
    out[todo] = back
    return out


def _cp_upper_cached(m: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    """_cp_upper with a per-(n, α) table over the counts 0..n, filled lazily (only counts
    not seen before are computed), when n is small enough to keep one."""
    if n > _CP_TABLE_MAX_N:
        return _cp_upper(m, n, alpha)
    key = (n, float(alpha))
    table = _CP_TABLES.setdefault(key, torch.full((n + 1,), math.nan, dtype=F64))
    missing = m[torch.isnan(table[m])]
    if missing.numel():
        table[missing] = _cp_upper(missing, n, alpha)
    return table[m]


def clopper_pearson(counts: torch.Tensor, n: int, alpha_each_side: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (Clopper–Pearson) interval for a binomial proportion from integer ``counts`` of
    n draws, each side at level α: P(h < lo) ≤ α and P(h > hi) ≤ α. lo(m) = 1 − hi(n − m)
    by the symmetry X ↔ n − X. Computed once per distinct count."""
    if not 0 < alpha_each_side < 0.5:
        raise ValueError(f"alpha per side must lie in (0, 0.5), got {alpha_each_side}")
    c = counts.to(torch.long)
    uniq, inv = torch.unique(torch.cat([c.reshape(-1), n - c.reshape(-1)]).cpu(), return_inverse=True)
    up = _cp_upper_cached(uniq, n, alpha_each_side)
    k = c.numel()
    hi = up[inv[:k]].reshape(c.shape).to(counts.device)
    lo = (1.0 - up[inv[k:]]).reshape(c.shape).to(counts.device)
    return lo.clamp(0.0, 1.0), hi.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------
# Certificate


@dataclass(frozen=True, eq=False)
class SmoothingCertificate:
    """A randomized-smoothing certificate for a smoothed explanation h (shape (B, *S), float64).

    estimate            the sampled map at x (v0): ĝ or ĥ.
    bounds              per coordinate: h(x') ∈ bounds for EVERY ‖x' − x‖₂ ≤ radius, jointly
                        over all coordinates, with probability ≥ 1 − failure_probability per
                        input over the sampling.
    at_x                the confidence interval for h(x) itself (radius 0), same event.
    failure_probability p;  samples n;  radius ρ;  sigma σ.
    method              'smoothgrad', 'sparsified_smoothgrad' or 'relaxed_sparsified_smoothgrad'.
    interval            'hoeffding' or 'clopper_pearson' (the confidence interval used).
    scale               for plain SmoothGrad the global range G (map value v ↔ (v + G)/(2G) ∈
                        [0, 1]); None for the sparsified maps (already in [0, 1]).
    notes               what a user must know to read the numbers.
    """

    estimate: torch.Tensor
    bounds: Bounds
    at_x: Bounds
    failure_probability: float
    samples: int
    radius: float
    sigma: float
    method: str
    interval: str
    scale: torch.Tensor | None = None
    notes: tuple[str, ...] = ()
    guarantee: Guarantee = Guarantee.PROBABILISTIC


def _shift(q: torch.Tensor, t: float) -> torch.Tensor:
    """Φ(Φ⁻¹(q) + t) for q ∈ [0, 1] (Φ⁻¹(0) = −∞ ↦ 0, Φ⁻¹(1) = +∞ ↦ 1)."""
    return torch.special.ndtr(torch.special.ndtri(q) + t)


def smoothing_bounds(net: Network, x: torch.Tensor, target: torch.Tensor, output: Output | str,
                     cfg: SmoothingConfig, radius: float, sparsified: bool) -> SmoothingCertificate:
    """Certify the smoothed map h over the ℓ2 ball of ``radius`` around each input.

    h = E[s(∇o(x + δ))] (``sparsified``; relaxed s when ``cfg.relaxed``) or E[∇o(x + δ)]
    (plain, through :func:`global_gradient_range`). With [lo, hi] a joint (1 − p) confidence
    interval for the [0, 1]-valued map at x: h(x') ∈ [Φ(Φ⁻¹(lo) − ρ/σ), Φ(Φ⁻¹(hi) + ρ/σ)]."""
    if not _is_real(radius) or not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    output = Output(output)
    d = math.prod(net.input_shape)
    n, p = cfg.samples, float(cfg.failure_probability)
    if not sparsified and cfg.interval != "hoeffding":
        raise ValueError("plain SmoothGrad has real-valued samples: only interval='hoeffding' applies")
    notes = [f"probabilistic: holds for every x' with ‖x' − x‖₂ ≤ {radius:g}, jointly over all {d} coordinates, "
             f"with probability ≥ {1 - p:g} per input over the {n} noise draws (σ = {cfg.sigma:g}, seed {cfg.seed})",
             "the probability is over the seed: choosing seeds after looking at results voids it; "
             "a batch of B inputs holds jointly with probability ≥ 1 − B·p",
             "x' ranges over the whole ℓ2 ball (not clipped to the input domain): a superset"]
    scale = None
    if sparsified:
        kept = cfg.kept(d)
        est = sparsified_smoothgrad(net, x, target, output, cfg)
        q = est.reshape(est.shape[0], d)
        method = "relaxed_sparsified_smoothgrad" if cfg.relaxed else "sparsified_smoothgrad"
        notes.append(f"map: s(∇o) with the top K = {kept} of |∇o| → 1"
                     + (f", top C = {cfg.clipped(d)} clipped to 1, ranks C+1..K linear" if cfg.relaxed else ""))
    else:
        est = smoothgrad(net, x, target, output, cfg)
        g = global_gradient_range(net, output, target).to(est.device)
        scale = g
        gf = g.reshape(est.shape[0], d)
        pos = gf > 0
        # G_j = 0 means ∂o/∂x_j ≡ 0; park those at 1/2 and zero them when mapping back
        q = torch.where(pos, (est.reshape(-1, d) + gf) / (2 * torch.where(pos, gf, torch.ones_like(gf))),
                        torch.full_like(gf, 0.5)).clamp(0.0, 1.0)
        method = "smoothgrad"
        notes.append(f"map: signed ∇o, scaled to [0, 1] with the global range G (max G = {float(g.max()):.4g}); "
                     "a sound but loose range makes this certificate wide")
    if cfg.interval == "hoeffding":
        c = hoeffding_halfwidth(n, d, p)
        lo, hi = (q - c).clamp(0.0, 1.0), (q + c).clamp(0.0, 1.0)
        notes.append(f"interval: Hoeffding with a union bound over {d} coordinates, half-width "
                     f"c = sqrt(ln(2d/p)/(2n)) = {c:.4g} (in [0, 1] units)")
    else:
        counts = torch.round(q * n)
        lo, hi = clopper_pearson(counts, n, p / (2 * d))
        notes.append(f"interval: Clopper–Pearson, each side at level p/(2d) = {p / (2 * d):.3g} "
                     f"(union bound over {d} coordinates)")
    t = float(radius) / cfg.sigma
    lo_x, hi_x = (lo - _ROUND).clamp(0.0, 1.0), (hi + _ROUND).clamp(0.0, 1.0)
    lo_r = (_shift(lo, -t) - _ROUND).clamp(0.0, 1.0)
    hi_r = (_shift(hi, t) + _ROUND).clamp(0.0, 1.0)
    shape = est.shape

    def back(v: torch.Tensor) -> torch.Tensor:
        if scale is None:
            return v.reshape(shape)
        gf = scale.reshape(shape[0], d)
        return ((2 * v - 1) * gf).reshape(shape)  # v ↦ 2Gv − G; G = 0 gives exactly 0

    return SmoothingCertificate(
        estimate=est, bounds=Bounds(back(lo_r), back(hi_r)), at_x=Bounds(back(lo_x), back(hi_x)),
        failure_probability=p, samples=n, radius=float(radius), sigma=float(cfg.sigma), method=method,
        interval=cfg.interval, scale=scale, notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------
# Top-k overlap (the paper's Corollary 2)


def topk_overlap_certificate(cert: SmoothingCertificate, k: int) -> torch.Tensor:
    """The certified top-k overlap count K* (B,) of a smoothing certificate (paper, Cor. 2).

    With probability ≥ 1 − p, for every ‖x' − x‖₂ ≤ ρ:
      (a) |topk(|v0|) ∩ topk(|h(x')|)| ≥ K*, v0 = the estimate (what the ``topk`` property
          of :mod:`verigrad.properties` measures), and
      (b) for the sparsified maps also |topk(h(x)) ∩ topk(h(x'))| ≥ K* (the paper's statement,
          population vs population): the bounds are a nondecreasing function of the estimate
          (L = F(ĥ), U = G(ĥ)), the order statistics of h(x) are within the interval of
          those of ĥ, and h_i(x') ≥ Φ(Φ⁻¹(h_i(x)) − ρ/σ) pointwise, so the same pigeonhole
          argument runs with ranks in h(x).

    Comparison with ``properties._topk_worst`` on the same bounds: that rule counts members of
    topk(v0) that stay in the top k for EVERY v in the box, one at a time: with bounds
    monotone in ĥ it certifies the top K' with L_{K'} > U_{k+1}. Corollary 2 needs only
    L_K > U_{2k−K+1} ≤ U_{k+1}, so K* ≥ K' here (it uses that one outsider cannot displace
    several members at the same v). Both are sound; they coincide at K = k (threshold 1)."""
    return topk_overlap_lower_bound(cert.estimate, cert.bounds, k)


__all__ = [
    "SmoothingConfig", "SmoothingCertificate", "smoothgrad", "sparsified_smoothgrad", "sparsify_map",
    "global_gradient_range", "hoeffding_halfwidth", "clopper_pearson", "smoothing_bounds",
    "topk_overlap_lower_bound", "topk_overlap_certificate",
]
