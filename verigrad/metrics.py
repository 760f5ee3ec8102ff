"""Empirical similarity between an original explanation map ``a`` and a perturbed one ``b``.

These are *measurements*, not certificates: they report how far an explanation moved under
random noise or at an attack's point, next to the sound bounds the rest of verigrad computes.
Every metric takes one pair of per-sample maps of equal shape (any shape: (784,),
(1, 28, 28), (3, 32, 32), ...), converts both to float64 and returns a Python float. For
batches use :func:`similarity_batch`. Non-finite values are rejected (ValueError): a NaN would
otherwise silently turn every statistic into NaN.

Metrics (registry :data:`SIMILARITIES`, name → function; ``â``, ``b̂`` are the flattened maps,
n their length):

``pcc``
    Pearson correlation ρ = Σ(âᵢ−ā)(b̂ᵢ−b̄) / (‖â−ā‖·‖b̂−b̄‖). Same value as
    ``scipy.stats.pearsonr`` and quantus's ``correlation_pearson``. **Differs:** if either
    map is constant we return 0.0 (scipy returns NaN with a warning) — a constant map carries
    no ranking information, and 0 keeps means over samples finite.
``mse``
    Mean squared error (1/n)·Σ(âᵢ−b̂ᵢ)². A *distance* (0 = identical); all other metrics
    are similarities (larger = more alike).
``cosine``
    Cosine similarity â·b̂ / (‖â‖·‖b̂‖), computed on the raw (uncentred) maps, as in
    Dombrowski et al.'s and quantus's ``cosine``. **Differs:** 0.0 if either map is all zero
    (no direction to compare), where a plain division gives NaN.
``ssim``
    Structural similarity (Wang et al. 2004) over the last two dims, with scikit-image's
    ``structural_similarity`` defaults: a uniform ``window``×``window`` window (7), K1 = 0.01,
    K2 = 0.03, C1 = (K1·L)², C2 = (K2·L)², sample (co)variances (factor N/(N−1), N = number
    of pixels in the window), and the *mean over the valid window positions only* (the
    border where a window would leave the map is excluded, like skimage's crop of
    (window−1)/2). Per position:
    SSIM = (2μₐμ_b + C1)(2σ_ab + C2) / ((μₐ² + μ_b² + C1)(σₐ² + σ_b² + C2)).
    Leading dims (channels) are flattened and SSIM is averaged over them, like skimage's
    ``channel_axis``; a 1-D map of length n is treated as one row of shape (1, n).
    **Differs from skimage:** (i) L = ``data_range`` defaults to max(a, b) − min(a, b) over
    *both* maps, whereas skimage requires ``data_range`` explicitly for float images
    (attributions have no dtype range); pass it to compare with skimage. (ii) The window is
    clipped per dimension to the largest odd size ≤ min(window, dim) (skimage raises for
    images smaller than the window); so a (1, n) map uses a 1×7 window. (iii) If L = 0
    (both maps constant and equal) we return 1.0 instead of dividing by zero.
``topk_intersection``
    |topk(|â|) ∩ topk(|b̂|)| / k ∈ [0, 1], the top-k intersection of Ghorbani et al. 2019
    ("Interpretation of neural networks is fragile") as used by Dombrowski et al. and
    others, taken on absolute values so a large negative attribution counts as important.
    Ties at the k-th place go to the lower flat index (deterministic, unlike
    ``torch.topk``). k must be an int in 1..n. Through :func:`similarity` /
    :func:`similarity_report` the default is k = max(1, ⌊n/10⌋) (10 % of the features).
``kendall_tau``
    Kendall's τ-b of the flattened maps, τ_b = (P − Q) / √((n₀ − n₁)(n₀ − n₂)), with P/Q
    the concordant/discordant pairs, n₀ = n(n−1)/2, n₁/n₂ the pairs tied in â / in b̂
    (pairs tied in both count in n₁ and n₂ and in neither P nor Q). Equals
    ``scipy.stats.kendalltau``'s default (``variant='b'``). **Differs:** 0.0 when either map
    is constant (scipy returns NaN). Computed exactly in O(n²) time, in row chunks so memory
    stays a few tens of MB (n = 3072 → ~10 chunks of ~8 MB tensors).

Perturbation studies:

:func:`random_perturbation_similarity`
    Dombrowski et al. 2022's random-noise experiment: x̃ = clip(x + σ·z), z ~ N(0, I),
    σ = (max x − min x)·ν for each noise level ν, and the mean of each metric between
    e(x) and e(x̃) over the samples.
:func:`max_sensitivity`
    max over uniform δ ∈ [−r, r]^d of ‖e(clip(x+δ)) − e(x)‖₂ / ‖e(x)‖₂, the Monte-Carlo
    max-sensitivity of Yeh et al. 2019 with quantus's uniform ℓ∞ sampling. **Differs:**
    Yeh et al. report the unnormalised numerator, and quantus's ``MaxSensitivity`` divides by
    a configurable norm (of the *input* x in the releases we checked) and may normalise the
    explanations first; we divide by ‖e(x)‖₂ so the value is a scale-free relative change of
    the explanation (numerator alone if e(x) = 0), and clip the perturbed input to the domain.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = [
    "SIMILARITIES", "DEFAULT_METRICS", "cosine_similarity", "default_k", "kendall_tau", "max_sensitivity", "mse",
    "pcc", "random_perturbation_similarity", "similarity", "similarity_batch", "similarity_report", "ssim",
    "topk_intersection",
    # certified (sound upper-bound) counterparts of quantus' robustness metrics: verigrad.certified_metrics
    "CertifiedLocalLipschitz", "CertifiedMaxSensitivity", "CertifiedRelativeInputStability",
]

# Kendall's τ works on (rows × n) sign matrices; this many elements per chunk keeps each
# float64 temporary at 8 MB, so the handful alive at once stay well under ~100 MB.
_TAU_CHUNK_ELEMENTS = 1 << 20


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps as detached float64 tensors of one shape, finite."""
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"explanation maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("explanation maps are empty")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("explanation maps contain NaN or inf")
    return a, b


def _is_constant(v: torch.Tensor) -> bool:
    # Exact test: the mean of n equal floats need not equal them, so ‖v − mean‖ could be a
    # tiny non-zero number and would make ρ pure rounding noise instead of the 0 convention.
    return bool((v == v.reshape(-1)[0]).all())


def default_k(n: int) -> int:
    """The default top-k size: max(1, ⌊n/10⌋) — 10 % of the n features."""
    return max(1, n // 10)


# ---------------------------------------------------------------------------------------------
# Metrics on one pair of maps
# ---------------------------------------------------------------------------------------------

def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson ρ = Σ(aᵢ−ā)(bᵢ−b̄) / (‖a−ā‖‖b−b̄‖) of the flattened maps; 0.0 if either is constant."""
    a, b = _pair(a, b)
    a, b = a.reshape(-1), b.reshape(-1)
    if _is_constant(a) or _is_constant(b):
        return 0.0
    ac, bc = a - a.mean(), b - b.mean()
    rho = float((ac @ bc) / (ac.norm() * bc.norm()))
    return min(1.0, max(-1.0, rho))  # rounding can overshoot ±1 by an ulp


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error (1/n)·Σ(aᵢ − bᵢ)²."""
    a, b = _pair(a, b)
    return float(((a - b) ** 2).mean())


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine a·b / (‖a‖‖b‖) of the flattened maps; 0.0 if either map is all zero."""
    a, b = _pair(a, b)
    a, b = a.reshape(-1), b.reshape(-1)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    cos = float((a @ b) / (na * nb))
    return min(1.0, max(-1.0, cos))


def _odd_clip(window: int, size: int) -> int:
    w = min(window, size)
    return w if w % 2 == 1 else w - 1


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, data_range: float | None = None) -> float:
    """Mean SSIM = (2μₐμ_b+C1)(2σ_ab+C2)/((μₐ²+μ_b²+C1)(σₐ²+σ_b²+C2)) over valid uniform windows,
    averaged over leading (channel) dims; C1 = (0.01·L)², C2 = (0.03·L)²."""
    a, b = _pair(a, b)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"ssim window must be a positive int, got {window!r}")
    if data_range is None:
        data_range = float(torch.maximum(a.max(), b.max()) - torch.minimum(a.min(), b.min()))
        if data_range == 0.0:
            return 1.0  # both maps constant and equal: identical structure, nothing to scale by
    elif not data_range > 0:
        raise ValueError(f"ssim data_range must be > 0, got {data_range!r}")
    # Shape the maps as (C, 1, H, W): 1-D → one row, ≥3-D → leading dims are channels.
    if a.dim() == 0:
        a, b = a.reshape(1, 1), b.reshape(1, 1)
    elif a.dim() == 1:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    h, w = a.shape[-2:]
    a, b = a.reshape(-1, 1, h, w), b.reshape(-1, 1, h, w)
    wh, ww = _odd_clip(window, h), _odd_clip(window, w)
    n = wh * ww
    # skimage's sample covariance; a 1-pixel window has zero variance, so any factor works.
    cov_norm = n / (n - 1) if n > 1 else 1.0

    def box(t: torch.Tensor) -> torch.Tensor:
        # No padding, stride 1: exactly the valid window positions skimage averages over.
        return torch.nn.functional.avg_pool2d(t, (wh, ww), stride=1)

    mu_a, mu_b = box(a), box(b)
    var_a = cov_norm * (box(a * a) - mu_a * mu_a)
    var_b = cov_norm * (box(b * b) - mu_b * mu_b)
    cov_ab = cov_norm * (box(a * b) - mu_a * mu_b)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    # Mean per channel, then over channels (equal sizes, so this is the overall mean too).
    return float(s.mean())


def topk_intersection(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """|topk(|a|) ∩ topk(|b|)| / k; ties at the k-th place go to the lower flat index."""
    a, b = _pair(a, b)
    n = a.numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"top-k intersection needs an int k in 1..{n} (the number of features), got {k!r}")

    def top(v: torch.Tensor) -> torch.Tensor:
        # A stable descending sort keeps equal values in index order: reproducible tie-break.
        order = torch.sort(v.reshape(-1).abs(), descending=True, stable=True).indices[:k]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order] = True
        return mask

    return int((top(a) & top(b)).sum()) / k


def _tied_pairs(v: torch.Tensor) -> int:
    """Σ t(t−1)/2 over groups of equal values: the number of pairs tied in v."""
    counts = torch.unique(v, return_counts=True)[1].to(torch.int64)
    return int((counts * (counts - 1) // 2).sum())


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kendall τ_b = (P − Q) / √((n₀ − n₁)(n₀ − n₂)) of the flattened maps; 0.0 if either is constant."""
    a, b = _pair(a, b)
    a, b = a.reshape(-1), b.reshape(-1)
    n = a.numel()
    n0 = n * (n - 1) // 2
    n1, n2 = _tied_pairs(a), _tied_pairs(b)
    if n1 == n0 or n2 == n0:  # constant map (or n = 1): every pair tied, τ_b undefined
        return 0.0
    # Σ over ordered pairs (i, j) of sign(aᵢ−aⱼ)·sign(bᵢ−bⱼ) = 2(P − Q); the diagonal adds 0.
    rows = max(1, _TAU_CHUNK_ELEMENTS // n)
    s = 0
    for start in range(0, n, rows):
        sa = torch.sign(a[start:start + rows, None] - a[None, :])
        sb = torch.sign(b[start:start + rows, None] - b[None, :])
        # Products are in {−1, 0, 1} and partial sums < 2^53, so the float64 sum is exact.
        s += int((sa * sb).sum())
    p_minus_q = s // 2
    tau = p_minus_q / math.sqrt((n0 - n1) * (n0 - n2))
    return min(1.0, max(-1.0, tau))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

SIMILARITIES: dict[str, Callable[..., float]] = {
    "pcc": pcc,
    "ssim": ssim,
    "mse": mse,
    "cosine": cosine_similarity,
    "topk_intersection": topk_intersection,
    "kendall_tau": kendall_tau,
}

DEFAULT_METRICS: tuple[str, ...] = ("pcc", "ssim", "mse", "cosine", "topk_intersection", "kendall_tau")


def _check_names(names: Sequence[str]) -> None:
    unknown = [m for m in names if m not in SIMILARITIES]
    if unknown:
        raise ValueError(f"unknown similarity metric(s) {', '.join(map(repr, unknown))}; "
                         f"available: {', '.join(sorted(SIMILARITIES))}")


def similarity(name: str, a: torch.Tensor, b: torch.Tensor, k: int | None = None, **kw) -> float:
    """Metric ``name`` of :data:`SIMILARITIES` on one pair; ``k`` goes to topk_intersection only
    (default max(1, ⌊n/10⌋)), other keywords (e.g. ssim's window, data_range) to the metric."""
    _check_names([name])
    if name == "topk_intersection":
        n = torch.as_tensor(a).numel()
        return topk_intersection(a, b, default_k(n) if k is None else k, **kw)
    # k is accepted and ignored here so callers can pass one k to every metric.
    return SIMILARITIES[name](a, b, **kw)


def similarity_batch(name: str, a: torch.Tensor, b: torch.Tensor, k: int | None = None, **kw) -> torch.Tensor:
    """Metric ``name`` per sample for batches a, b of shape (B, *S): a float64 tensor (B,)."""
    if torch.as_tensor(a).shape != torch.as_tensor(b).shape or torch.as_tensor(a).dim() < 1:
        raise ValueError(f"batched maps must share a shape (B, *S), got {tuple(torch.as_tensor(a).shape)} "
                         f"and {tuple(torch.as_tensor(b).shape)}")
    return torch.tensor([similarity(name, ai, bi, k=k, **kw) for ai, bi in zip(a, b, strict=True)], dtype=torch.float64)


def similarity_report(a: torch.Tensor, b: torch.Tensor, k: int | None = None) -> dict[str, float]:
    """Every registered metric on one pair (a = original, b = perturbed): name → float."""
    return {name: similarity(name, a, b, k=k) for name in SIMILARITIES}


# ---------------------------------------------------------------------------------------------
# Perturbation studies
# ---------------------------------------------------------------------------------------------

def _clip(x: torch.Tensor, domain: tuple[float, float] | None) -> torch.Tensor:
    if domain is None:
        return x
    lo, hi = domain
    return x.clamp(float(lo), float(hi))


def _explain_batch(explain: Callable[[torch.Tensor], torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
    # Not under no_grad: gradient explanations need autograd inside ``explain``.
    e = explain(xb)
    if e.shape[0] != xb.shape[0]:
        raise ValueError(f"explain returned {e.shape[0]} maps for a batch of {xb.shape[0]} inputs")
    return e.detach()


def random_perturbation_similarity(
    explain: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    levels: Sequence[float],
    n_samples: int,
    domain: tuple[float, float] | None,
    seed: int,
    metrics: Sequence[str] = DEFAULT_METRICS,
    k: int | None = None,
) -> dict[float, dict[str, float]]:
    """{ν: {metric: mean over samples of metric(e(x), e(clip(x + σ_ν z)))}}, z ~ N(0, I),
    σ_ν = (max x − min x)·ν (Dombrowski et al. 2022).

    ``x`` is one input of shape S (no batch dim); ``explain`` maps (B, *S) → (B, *S).
    The same standard-normal draws z (from a ``torch.Generator`` seeded with ``seed``) are
    scaled for every level — common random numbers — so a level's result does not depend on
    which other levels are asked for, and levels compare with less Monte-Carlo noise. σ is
    relative to x's own value range (as in Dombrowski et al.), so a constant x gets σ = 0.
    The reference x itself is not clipped. ``k`` goes to topk_intersection (see
    :func:`similarity`).
    """
    metrics = tuple(metrics)
    _check_names(metrics)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    levels = [float(v) for v in levels]
    if any(not (v >= 0 and math.isfinite(v)) for v in levels):
        raise ValueError(f"noise levels must be finite and >= 0, got {levels}")
    x = torch.as_tensor(x).detach()
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    z = torch.randn((n_samples, *x.shape), generator=gen, dtype=x.dtype, device=x.device)
    e0 = _explain_batch(explain, x.unsqueeze(0))[0]
    spread = float(x.max() - x.min())
    out: dict[float, dict[str, float]] = {}
    for nu in levels:
        noisy = _clip(x.unsqueeze(0) + (spread * nu) * z, domain)
        e = _explain_batch(explain, noisy)
        sums = dict.fromkeys(metrics, 0.0)
        for i in range(n_samples):
            for m in metrics:
                sums[m] += similarity(m, e0, e[i], k=k)
        out[nu] = {m: s / n_samples for m, s in sums.items()}
    return out


def max_sensitivity(
    explain: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    radius: float,
    n_samples: int,
    domain: tuple[float, float] | None,
    seed: int,
) -> float:
    """max over δ ~ U[−r, r]^d of ‖e(clip(x+δ)) − e(x)‖₂ / ‖e(x)‖₂ (numerator alone if e(x) = 0).

    ``x`` is one input of shape S; ``explain`` maps (B, *S) → (B, *S). The n_samples draws
    come from a ``torch.Generator`` seeded with ``seed`` and are explained in one batch.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    radius = float(radius)
    if not (radius >= 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be finite and >= 0, got {radius!r}")
    x = torch.as_tensor(x).detach()
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    u = torch.rand((n_samples, *x.shape), generator=gen, dtype=x.dtype, device=x.device)
    xp = _clip(x.unsqueeze(0) + radius * (2 * u - 1), domain)
    e0 = _explain_batch(explain, x.unsqueeze(0))[0].to(torch.float64).reshape(-1)
    e = _explain_batch(explain, xp).to(torch.float64).reshape(n_samples, -1)
    if e.shape[1] != e0.numel():
        raise ValueError(f"explain returned maps of {e.shape[1]} values for perturbed inputs, {e0.numel()} for x")
    num = (e - e0).norm(dim=1).max()
    den = e0.norm()
    return float(num / den) if den > 0 else float(num)


# Certified counterparts of quantus' robustness metrics (defined in verigrad.certified_metrics).
from verigrad.certified_metrics import (  # noqa: E402
    CertifiedLocalLipschitz, CertifiedMaxSensitivity, CertifiedRelativeInputStability,
)
