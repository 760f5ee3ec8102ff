"""Properties of explanations and their sound worst cases over coordinate bounds.

An explanation v (shape (B, *S)) is known to lie in a box l ≤ v ≤ u. A property compares
v with the original explanation v0 (untargeted, topk, sign) or with a target map t
(targeted), or bounds v itself (feature_bound):

  untargeted ℓp      max_v ‖N(v) − N(v0)‖_p ≤ δ     (worst case: an upper bound of the max)
  untargeted cosine  min_v cos(v0, v)      ≥ δ     (worst case: a lower bound of the min)
  targeted ℓp        min_v ‖N(v) − N(t)‖_p ≥ δ     (worst case: a lower bound of the min)
  targeted cosine    max_v cos(v, t)       ≤ δ     (worst case: an upper bound of the max)
  topk               min_v |topk(|v|) ∩ K| / k ≥ δ  (K = topk(|v0|); a lower bound of the min)
  sign               max_v #{i ∈ F : sign v_i ≠ sign v0_i} ≤ δ   (exact)
  feature_bound      max_v max_{i ∈ F} |v_i|  ≤ δ     (exact)

N is the optional normalization v / ‖v‖_q (q = 1, 2, ∞; N(0) = 0 by convention); F is the
property's ``features`` (flat indices into the per-sample map, None = all). topk, sign
and feature_bound rank / compare maps flattened per sample and take no metric and no
normalization. Every ``worst_case`` is sound: no v in the box does worse. Without
normalization the ℓp worst cases are exact. ``decide`` turns a worst case into a verdict;
``falsified`` is reserved for attacks, which find a concrete v violating the property.
A NaN in v0 (or in the target) gives a NaN worst case, which never certifies; a NaN in v
gives a NaN metric for the rank and sign kinds, which never falsifies.

``gap_ratio(prop, certified, attacked)`` says how loose a certificate is against the
strongest attack, oriented so that it is ≥ 1 when both are right and 1 when the
certificate is tight (each rule declares its own, ``PropertyRule.gap``):

  deviations ≥ 0 (untargeted ℓp, sign flips, feature bound)     c / a
  similarities ≤ 1 (untargeted cosine, top-k overlap)           (1 − c) / (1 − a)
  targeted ℓp (a distance that must stay large)                 a / c
  targeted cosine (a similarity ≥ −1 that must stay small)      (1 + c) / (1 + a)

It is None when undefined: a zero or negative denominator (e.g. the attack did not move
the value at all), or a non-finite input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from verigrad.bounds.base import Bounds
from verigrad.ranking import topk_overlap_lower_bound


class Kind(str, Enum):
    UNTARGETED = "untargeted"  # stay close to the original explanation
    TARGETED = "targeted"  # stay far from an attacker's target map
    TOPK = "topk"  # the top-k features by |v| stay (mostly) the top-k
    SIGN = "sign"  # chosen features keep their sign
    FEATURE_BOUND = "feature_bound"  # |attribution| of chosen features stays small


METRIC_KINDS = (Kind.UNTARGETED, Kind.TARGETED)  # the kinds that compare maps with a metric


class Metric(str, Enum):
    L1 = "l1"
    L2 = "l2"
    LINF = "linf"
    COSINE = "cosine"


class Normalize(str, Enum):
    NONE = "none"
    L1 = "l1"
    L2 = "l2"
    MAX = "max"


class Verdict(str, Enum):
    CERTIFIED = "certified"  # the sound worst case satisfies the property
    FALSIFIED = "falsified"  # a concrete counterexample was found (attacks)
    UNKNOWN = "unknown"  # neither


class Direction(str, Enum):
    """How the worst case must compare with the threshold for a certificate."""

    AT_MOST = "<="
    AT_LEAST = ">="


# ----------------------------------------------------------------------------------------
# Target maps


def _spatial(shape: Sequence[int]) -> tuple[int, ...]:
    """The (row, col) dims of a per-sample map shape: the last two, or the one dim of a flat map."""
    if not shape:
        raise ValueError("target map: the explanation shape must have at least one dimension")
    return tuple(shape[-2:]) if len(shape) >= 2 else tuple(shape)


def gaussian_map(shape: Sequence[int], center: Sequence[float], sigma: float, amplitude: float,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """amplitude · exp(−‖p − center‖² / (2σ²)) at every (row, col) p of the last two dims of
    ``shape`` (the index of a flat map), the same map for every channel."""
    shape = tuple(int(n) for n in shape)
    spatial = _spatial(shape)
    if len(center) != len(spatial):
        raise ValueError(f"gaussian target: center {list(center)} has {len(center)} coordinate(s), "
                         f"the map's spatial shape {spatial} needs {len(spatial)}")
    if not (math.isfinite(sigma) and sigma > 0) or not math.isfinite(amplitude) \
            or not all(math.isfinite(c) for c in center):
        raise ValueError(f"gaussian target: sigma {sigma} must be finite and > 0, amplitude {amplitude} and "
                         f"center {list(center)} finite")
    grids = torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in spatial], indexing="ij")
    sq = sum(((g - c) ** 2 for g, c in zip(grids, center, strict=True)), torch.zeros(spatial, dtype=dtype))
    return (amplitude * torch.exp(-sq / (2 * sigma**2))).expand(shape).clone()


def square_map(shape: Sequence[int], position: Sequence[int], size: int, value: float,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``value`` on rows [r, r + size) × cols [c, c + size) of the last two dims, 0 elsewhere."""
    shape = tuple(int(n) for n in shape)
    spatial = _spatial(shape)
    if len(position) != len(spatial):
        raise ValueError(f"square target: position {list(position)} has {len(position)} coordinate(s), "
                         f"the map's spatial shape {spatial} needs {len(spatial)}")
    if size < 1 or any(p < 0 for p in position) or not math.isfinite(value):
        raise ValueError(f"square target: size {size} must be >= 1, position {list(position)} non-negative "
                         f"and value {value} finite")
    if any(p + size > n for p, n in zip(position, spatial, strict=True)):
        raise ValueError(f"square target: a square of size {size} at {list(position)} does not fit "
                         f"in the map's spatial shape {spatial}")
    m = torch.zeros(spatial, dtype=dtype)
    m[tuple(slice(p, p + size) for p in position)] = value
    return m.expand(shape).clone()


def file_map(path: str | Path, shape: Sequence[int], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The target map stored in the .npy file ``path`` (exactly the per-sample shape, real
    numbers, finite). ValueError naming the file for anything else: not a .npy (an .npz
    archive, a text or empty file, pickled objects), strings or complex numbers."""
    shape = tuple(int(n) for n in shape)
    try:
        loaded = np.load(Path(path), allow_pickle=False)
    except EOFError:
        raise ValueError(f"target file {path}: the file is empty, expected a .npy array") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError) or e.filename is not None:
            raise ValueError(f"target file {path}: cannot read it ({e.strerror or e})") from None
        raise ValueError(f"target file {path}: not a .npy array ({e})") from None
    except ValueError as e:  # pickled objects, or a format numpy cannot parse
        raise ValueError(f"target file {path}: not a .npy array of numbers ({e})") from None
    if not isinstance(loaded, np.ndarray):
        if hasattr(loaded, "close"):
            loaded.close()
        raise ValueError(f"target file {path}: an .npz archive, expected a single .npy array")
    arr = loaded
    if arr.dtype.kind not in "fiub":  # booleans are a 0/1 mask
        what = {"c": "complex numbers", "U": "strings", "S": "bytes", "O": "objects", "V": "structured records"}
        raise ValueError(f"target file {path}: holds {what.get(arr.dtype.kind, str(arr.dtype))} (dtype {arr.dtype}), "
                         "expected real numbers")
    if tuple(arr.shape) != shape:
        raise ValueError(f"target file {path}: shape {tuple(arr.shape)} differs from the per-sample "
                         f"explanation shape {shape}")
    t = torch.as_tensor(arr, dtype=dtype).clone()
    if not bool(torch.isfinite(t).all()):
        # a NaN target would make the cosine bounds' "t = 0" branch certify anything
        raise ValueError(f"target file {path}: {int((~torch.isfinite(t)).sum())} non-finite value(s)")
    return t


# ----------------------------------------------------------------------------------------
# Property


@dataclass(frozen=True, eq=False)
class Property:
    """One property to decide (see the module docstring for the forms).

    ``metric`` is required for untargeted / targeted and None for topk / sign /
    feature_bound. ``target`` is the per-sample target map (shape S, or (B, *S) for one map
    per sample); required for targeted properties, forbidden otherwise. ``k`` (≥ 1) is
    required for topk and forbidden otherwise. ``features`` is for sign / feature_bound
    only: the resolved flat indices into the per-sample map, or None for all features (the
    spec's ``features: all`` becomes None). Sizes (k ≤ n, indices < n) are checked against
    the map by ``check_fits`` and again when a metric or worst case is computed.
    """

    name: str
    kind: Kind
    metric: Metric | None
    threshold: float
    normalize: Normalize = Normalize.NONE
    target: torch.Tensor | None = None
    k: int | None = None  # topk: how many features
    features: tuple[int, ...] | None = None  # sign / feature_bound: flat indices; None = all

    def __post_init__(self) -> None:
        # accept plain strings for the enums (direct construction, tests)
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "metric", None if self.metric is None else Metric(self.metric))
        object.__setattr__(self, "normalize", Normalize(self.normalize))
        if self.features is not None:
            object.__setattr__(self, "features", tuple(int(i) for i in self.features))
        metric_kind = self.kind in (Kind.UNTARGETED, Kind.TARGETED)
        if metric_kind == (self.metric is None):
            raise ValueError(f"property {self.name!r}: kind {self.kind.value} "
                             + ("needs a metric" if metric_kind else "takes no metric"))
        if not metric_kind and self.normalize != Normalize.NONE:
            raise ValueError(f"property {self.name!r}: normalize applies to untargeted/targeted kinds only")
        if isinstance(self.k, float) and self.k.is_integer():
            object.__setattr__(self, "k", int(self.k))  # as the spec's Int accepts 3.0
        bad_k = self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1)
        if (self.kind == Kind.TOPK) != (self.k is not None) or bad_k:
            raise ValueError(f"property {self.name!r}: k (>= 1) is required for kind topk and only there")
        if self.kind == Kind.TOPK and not 0 < self.threshold <= 1:
            raise ValueError(f"property {self.name!r}: topk threshold is an overlap fraction in (0, 1]")
        if self.kind == Kind.SIGN and not self.threshold >= 0:
            raise ValueError(f"property {self.name!r}: sign threshold (allowed flips) must be >= 0")
        if self.kind == Kind.FEATURE_BOUND and not self.threshold > 0:
            raise ValueError(f"property {self.name!r}: feature_bound threshold must be > 0")
        if self.features is not None and self.kind not in (Kind.SIGN, Kind.FEATURE_BOUND):
            raise ValueError(f"property {self.name!r}: features are used by kinds sign and feature_bound only")
        if self.features is not None and (not self.features or min(self.features) < 0
                                          or len(set(self.features)) != len(self.features)):
            raise ValueError(f"property {self.name!r}: features must be non-empty, unique flat indices >= 0")
        if self.metric == Metric.COSINE:
            if self.normalize != Normalize.NONE:
                raise ValueError(f"property {self.name!r}: normalize must be none for cosine (scale-invariant)")
            if not -1.0 <= self.threshold <= 1.0:
                raise ValueError(f"property {self.name!r}: cosine threshold must be in [-1, 1], got {self.threshold}")
        if (self.kind == Kind.TARGETED) != (self.target is not None):
            raise ValueError(f"property {self.name!r}: a target map is required for targeted properties "
                             f"and not allowed for untargeted ones")

    def check_fits(self, shape: Sequence[int]) -> None:
        """Raise ValueError unless k and the feature indices fit a per-sample map of ``shape``."""
        _check_size(self, math.prod(int(d) for d in shape))

    @property
    def rule(self) -> "PropertyRule":
        return rule_for(self.kind, self.metric)


@dataclass(frozen=True)
class PropertyResult:
    """The outcome of one property on one sample."""

    name: str
    verdict: Verdict
    worst_case: float
    threshold: float
    direction: str  # e.g. "max ‖v − v0‖_2 <= threshold"

    def to_dict(self) -> dict:
        return {"name": self.name, "verdict": self.verdict.value, "worst_case": self.worst_case,
                "threshold": self.threshold, "direction": self.direction}


# ----------------------------------------------------------------------------------------
# Normalization and its exact per-coordinate bounds

_P = {Metric.L1: 1.0, Metric.L2: 2.0, Metric.LINF: math.inf}
_NORM_P = {Normalize.L1: 1.0, Normalize.L2: 2.0, Normalize.MAX: math.inf}


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _pnorm(x: torch.Tensor, p: float) -> torch.Tensor:
    """‖x‖_p over the last dim."""
    return torch.linalg.vector_norm(x, ord=p, dim=-1)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, with 0 where den == 0 (callers only divide 0 by 0 there: N(0) = 0)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def normalize_map(v: torch.Tensor, how: Normalize | str) -> torch.Tensor:
    """N(v) = v / ‖v‖_q per sample (q = 1, 2, ∞ for l1, l2, max); N(0) = 0; none: v."""
    how = Normalize(how)
    if how == Normalize.NONE:
        return v
    f = _flat(v)
    n = _pnorm(f, _NORM_P[how])[:, None]
    return _safe_div(f, n.expand_as(f)).reshape(v.shape)


def _leave_one_out(x: torch.Tensor, op: str) -> torch.Tensor:
    """For each i the sum (op='sum') or max (op='max') of x_j over j ≠ i (last dim; x ≥ 0),
    from prefix and suffix scans so that no large term is subtracted back out."""
    zero = torch.zeros_like(x[..., :1])
    if op == "sum":
        pre = torch.cat([zero, torch.cumsum(x, -1)[..., :-1]], -1)
        suf = torch.cat([torch.flip(torch.cumsum(torch.flip(x, [-1]), -1), [-1])[..., 1:], zero], -1)
        return pre + suf
    pre = torch.cat([zero, torch.cummax(x, -1).values[..., :-1]], -1)
    suf = torch.cat([torch.flip(torch.cummax(torch.flip(x, [-1]), -1).values, [-1])[..., 1:], zero], -1)
    return torch.maximum(pre, suf)


def _abs_range(b: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
    """min and max of |v_i| over [l_i, u_i] (min is 0 when the interval contains 0)."""
    lo, up = b.lower, b.upper
    amin = torch.where(lo > 0, lo, torch.where(up < 0, -up, torch.zeros_like(lo)))
    return amin, torch.maximum(lo.abs(), up.abs())


def normalized_bounds(bounds: Bounds, how: Normalize | str) -> Bounds:
    """Exact per-coordinate bounds of N(v)_i = v_i / ‖v‖_q over the box.

    Write ‖v‖_q = D(|v_i|, R_i) with R_i the rest: Σ_{j≠i}|v_j| (q=1, D = a + R),
    Σ_{j≠i} v_j² (q=2, D = √(a² + R)), max_{j≠i}|v_j| (q=∞, D = max(a, R)). For fixed R,
    v_i / D(|v_i|, R) is non-decreasing in v_i, and for fixed v_i it moves away from 0 as R
    shrinks; (v_i, R_i) ranges over [l_i, u_i] × [R_lo, R_hi], so
      max N_i = u_i / D(|u_i|, R_lo) if u_i ≥ 0 else u_i / D(|u_i|, R_hi),
      min N_i = l_i / D(|l_i|, R_lo) if l_i ≤ 0 else l_i / D(|l_i|, R_hi).
    This keeps the dependence between v_i and ‖v‖ that interval division would lose, and
    needs no ‖v‖ > 0: a box containing 0 gives values in [−1, 1], never NaN.
    """
    how = Normalize(how)
    if how == Normalize.NONE:
        return bounds
    shape = bounds.shape
    b = Bounds(_flat(bounds.lower), _flat(bounds.upper))
    amin, amax = _abs_range(b)
    if how == Normalize.L1:
        r_lo, r_hi = _leave_one_out(amin, "sum"), _leave_one_out(amax, "sum")

        def den(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return a + r
    elif how == Normalize.L2:
        r_lo, r_hi = _leave_one_out(amin**2, "sum"), _leave_one_out(amax**2, "sum")

        def den(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(a**2 + r)
    else:
        r_lo, r_hi = _leave_one_out(amin, "max"), _leave_one_out(amax, "max")

        def den(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            return torch.maximum(a, r)

    lo, up = b.lower, b.upper
    hi = torch.where(up >= 0, _safe_div(up, den(up.abs(), r_lo)), _safe_div(up, den(up.abs(), r_hi)))
    low = torch.where(lo <= 0, _safe_div(lo, den(lo.abs(), r_lo)), _safe_div(lo, den(lo.abs(), r_hi)))
    # |N_i| ≤ 1 for every q ≥ 1; the clamp only removes rounding beyond it
    hi, low = hi.clamp(-1.0, 1.0), low.clamp(-1.0, 1.0)
    low = torch.minimum(low, hi)  # rounding must not invert a point interval
    return Bounds(low.reshape(shape), hi.reshape(shape))


# ----------------------------------------------------------------------------------------
# Concrete metrics


def _target_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The target as (B, n) in ref's dtype: a per-sample map is shared by the whole batch."""
    t = t.to(dtype=ref.dtype, device=ref.device)
    if t.shape == ref.shape[1:]:
        t = t.expand(ref.shape)
    if t.shape != ref.shape:
        raise ValueError(f"target map of shape {tuple(t.shape)} does not match explanations of shape {tuple(ref.shape)}")
    return _flat(t)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b) = a·b / (‖a‖₂‖b‖₂) per row of (B, n) tensors; 0 if either is 0."""
    num = (a * b).sum(-1)
    den = _pnorm(a, 2.0) * _pnorm(b, 2.0)
    return _safe_div(num, den).clamp(-1.0, 1.0)


def _k(prop: Property) -> int:
    """k of a topk property (required there, checked by Property)."""
    assert prop.k is not None, f"property {prop.name!r}: topk without k"
    return int(prop.k)


def _target(prop: Property) -> torch.Tensor:
    """The target map of a targeted property (required there, checked by Property)."""
    assert prop.target is not None, f"property {prop.name!r}: targeted without a target map"
    return prop.target


def _p(prop: Property) -> float:
    """The ℓp exponent of an ℓp property's metric (untargeted / targeted ℓp only)."""
    assert prop.metric is not None, f"property {prop.name!r}: no metric"
    return _P[prop.metric]


def _lp_metric(prop: Property, v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    other = _target_like(_target(prop), v) if prop.kind == Kind.TARGETED else _flat(v0.expand_as(v))
    a = _flat(normalize_map(other.reshape(v.shape), prop.normalize))
    return _pnorm(_flat(normalize_map(v, prop.normalize)) - a, _p(prop))


def _cos_metric(prop: Property, v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    ref = _target_like(_target(prop), v) if prop.kind == Kind.TARGETED else _flat(v0.expand_as(v))
    return cosine(ref, _flat(v))


# ----------------------------------------------------------------------------------------
# Worst cases


def _unit_chord(prop: Property) -> bool:
    """ℓ2 distance between ℓ2-normalised maps: a chord of the unit sphere, ‖â − b̂‖² = 2 − 2 cos."""
    return prop.normalize == Normalize.L2 and _p(prop) == 2.0


def _untargeted_lp_worst(prop: Property, v0: torch.Tensor, bounds: Bounds,
                         dot: torch.Tensor | None = None) -> torch.Tensor:
    """max over the box of ‖N(v) − N(v0)‖_p ≤ ‖max(|L − a|, |U − a|)‖_p with [L, U] the
    bounds of N(v) and a = N(v0): each coordinate at its endpoint farthest from a_i.
    Exact without normalization (the maximiser is a corner of the box). For ℓ2 on
    ℓ2-normalised maps also ≤ √(2 − 2c) with c ≤ cos(v0, v) (:func:`cosine_lower_bound`, which
    takes ``dot`` ≤ v0·v): the chord identity for v ≠ 0, and at v = 0 (distance ‖a‖ ≤ 1) c ≤ 0."""
    nb = normalized_bounds(bounds, prop.normalize)
    a = _flat(normalize_map(v0, prop.normalize))
    far = torch.maximum((_flat(nb.lower) - a).abs(), (_flat(nb.upper) - a).abs())
    p = _p(prop)
    worst = _pnorm(far, p)
    if prop.normalize != Normalize.NONE and _NORM_P[prop.normalize] == p:
        # ‖N(v)‖_p ≤ 1 when N normalizes in the metric's own norm: triangle inequality
        worst = torch.minimum(worst, 1.0 + _pnorm(a, p))
    if _unit_chord(prop):
        c = cosine_lower_bound(_flat(v0.expand(bounds.shape)), bounds, dot)
        worst = torch.minimum(worst, (2.0 - 2.0 * c).clamp(min=0.0).sqrt())
    return worst


def _targeted_lp_worst(prop: Property, v0: torch.Tensor, bounds: Bounds,
                       dot: torch.Tensor | None = None) -> torch.Tensor:
    """min over the box of ‖N(v) − N(t)‖_p ≥ ‖clip(N(t), L, U) − N(t)‖_p: the nearest point
    of the box [L, U] to N(t), coordinate by coordinate. Exact without normalization. For ℓ2
    on ℓ2-normalised maps also ≥ min(1, √(2 − 2c)) with c ≥ cos(v, t) (:func:`cosine_upper_bound`,
    taking ``dot`` ≥ t·v): the chord identity for v ≠ 0; at v = 0 the distance is ‖N(t)‖ ≤ 1
    (1, or 0 for t = 0, where every distance bound is 0 anyway)."""
    nb = normalized_bounds(bounds, prop.normalize)
    t = _target_like(_target(prop), bounds.lower)
    t = _flat(normalize_map(t.reshape(bounds.shape), prop.normalize))
    near = torch.minimum(torch.maximum(t, _flat(nb.lower)), _flat(nb.upper))
    worst = _pnorm(near - t, _p(prop))
    if _unit_chord(prop):
        raw = _target_like(_target(prop), bounds.lower)
        c = cosine_upper_bound(raw, bounds, dot)
        chord = torch.minimum((2.0 - 2.0 * c).clamp(min=0.0).sqrt(), _pnorm(t, 2.0))
        worst = torch.maximum(worst, chord)
    return worst


def _norm2_range(b: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact min and max of ‖v‖₂ over the box (rows of (B, n))."""
    amin, amax = _abs_range(b)
    return _pnorm(amin, 2.0), _pnorm(amax, 2.0)


def cosine_lower_bound(a: torch.Tensor, bounds: Bounds, dot: torch.Tensor | None = None) -> torch.Tensor:
    """A lower bound of min_{v ∈ box} cos(a, v), rows of (B, n); the max of three sound bounds:

    A (ratio): s = Σ min(a_i l_i, a_i u_i) ≤ a·v (or ``dot`` (B,), a lower bound of a·v over the
       box that an engine computed for the functional itself, where larger) and ‖v‖ ∈ [n_lo, n_hi]:
       cos ≥ s / (‖a‖ n_hi) if s ≥ 0, else s / (‖a‖ n_lo) (−1 when n_lo = 0);
    B (linear in v̂): cos = â·v̂ with v̂ = v/‖v‖ ∈ [L, U] (normalized_bounds, l2):
       cos ≥ Σ min(â_i L_i, â_i U_i);
    C (chord, only when 0 ∉ box): both unit, cos = 1 − ½‖v̂ − â‖² ≥ 1 − ½ Σ max((L−â)², (U−â)²).
       C is second order in the box size, where A and B lose first-order terms;
    D (a ball about â, :func:`_ball_cos`): cos ≥ √(1 − ρ²) with ρ² = min over scales of
       max_box ‖v/μ − â‖², also second order, without C's loss from normalizing each
       coordinate by its own extreme of ‖v‖.
    cos(a, 0) = 0 by convention; a = 0 gives 0.
    """
    b = Bounds(_flat(bounds.lower), _flat(bounds.upper))
    na = _pnorm(a, 2.0)
    n_lo, n_hi = _norm2_range(b)
    s = torch.minimum(a * b.lower, a * b.upper).sum(-1)
    if dot is not None:
        s = torch.maximum(s, dot.to(s))
    ratio = torch.where(
        s >= 0,
        _safe_div(s, na * n_hi),  # s ≥ 0 and n_hi = 0 only for s = 0
        torch.where(n_lo > 0, s / (na * torch.where(n_lo > 0, n_lo, torch.ones_like(n_lo))), -torch.ones_like(s)),
    )
    nb = normalized_bounds(b, Normalize.L2)
    ahat = _safe_div(a, na[:, None].expand_as(a))
    lin = torch.minimum(ahat * nb.lower, ahat * nb.upper).sum(-1)
    far2 = torch.maximum((nb.lower - ahat) ** 2, (nb.upper - ahat) ** 2).sum(-1)
    chord = torch.where(n_lo > 0, 1.0 - far2 / 2, -torch.ones_like(s))
    best = torch.maximum(torch.maximum(torch.maximum(ratio, lin), chord), _ball_cos(ahat, b, n_lo))
    return torch.where(na > 0, best, torch.zeros_like(best)).clamp(-1.0, 1.0)


def _ball_cos(ahat: torch.Tensor, b: Bounds, n_lo: torch.Tensor, iterations: int = 40) -> torch.Tensor:
    """A lower bound of cos(â, v) over the box (rows of (B, n), â unit, n_lo ≤ ‖v‖), or −1.

    For any scale t > 0 the box maps into the ball about â of radius ρ(t), ρ(t)² = g(t) =
    max_box ‖t·v − â‖² = Σ_i max((t·l_i − â_i)², (t·u_i − â_i)²) (separable and convex in v,
    so its maximum is coordinatewise at an endpoint). Where ρ < 1 the ball excludes 0 and every
    v makes an angle θ with â of sin θ ≤ ρ (the tangent from 0), and also sin θ =
    dist(t·v, ℝâ)/‖t·v‖ ≤ ρ/(t·n_lo); so cos θ ≥ √(1 − h), h = g(t)·min(1, 1/(t·n_lo)²). g is
    convex in t, and for t ≥ 1/n_lo, h = max_box ‖v − â/t‖²/n_lo² is convex in 1/t: each
    piece is minimised by golden-section search (any t gives a sound bound; the search only sharpens
    it). Computed in float64 with h enlarged by its rounding bound ((n + 8)·2⁻⁵² relative)."""
    ahat, lo, up, n_lo = ahat.double(), b.lower.double(), b.upper.double(), n_lo.double()
    n = ahat.shape[-1]

    def g(t: torch.Tensor) -> torch.Tensor:  # t (B,) → max_box ‖t·v − â‖²
        t = t[:, None]
        return torch.maximum((t * lo - ahat) ** 2, (t * up - ahat) ** 2).sum(-1)

    one = torch.ones_like(n_lo)
    inv = _safe_div(one, n_lo)  # 1/n_lo, 0 where n_lo = 0 (then no bound)

    def golden(f: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # golden-section search: one evaluation of f per iteration, the bracket shrinks by r
        r = (math.sqrt(5.0) - 1.0) / 2.0
        x1, x2 = c - r * (c - a), a + r * (c - a)
        f1, f2 = f(x1), f(x2)
        for _ in range(iterations):
            left = f1 <= f2  # the minimiser lies in [a, x2], else in [x1, c]
            a, c = torch.where(left, a, x1), torch.where(left, x2, c)
            new = torch.where(left, c - r * (c - a), a + r * (c - a))
            fn = f(new)
            x1, x2, f1, f2 = (torch.where(left, new, x2), torch.where(left, x1, new),
                              torch.where(left, fn, f2), torch.where(left, f1, fn))
        return (a + c) / 2

    zero = torch.zeros_like(n_lo)
    t1 = golden(g, zero, inv)  # t ∈ (0, 1/n_lo]: h = g(t)
    mu = golden(lambda m: g(_safe_div(torch.ones_like(m), m)) * (m * inv) ** 2, zero, n_lo)  # μ = 1/t ≤ n_lo
    t2 = _safe_div(one, mu)
    out = torch.full_like(n_lo, -1.0)
    slack = 1.0 + (n + 8) * 2.0 ** -52
    for t in (t1, t2):
        gt = g(t) * slack
        h = gt * torch.minimum(torch.ones_like(t), (t * n_lo) ** -2)
        ok = (t > 0) & (n_lo > 0) & torch.isfinite(t) & (gt < 1.0)
        # 2⁻⁵⁰ covers the roundings of 1 − h and of the square root
        out = torch.where(ok, torch.maximum(out, (1.0 - h).clamp(min=0.0).sqrt() - 2.0 ** -50), out)
    return out


def cosine_upper_bound(t: torch.Tensor, bounds: Bounds, dot: torch.Tensor | None = None) -> torch.Tensor:
    """An upper bound of max_{v ∈ box} cos(v, t), rows of (B, n); the min of the mirrored bounds:

    A: s = Σ max(t_i l_i, t_i u_i) ≥ t·v (or ``dot``, an upper bound of t·v, where smaller):
       cos ≤ s / (‖t‖ n_hi) if s ≤ 0, else s / (‖t‖ n_lo)
       (+1 when n_lo = 0);
    B: cos ≤ Σ max(t̂_i L_i, t̂_i U_i);
    C: for v ≠ 0, cos = 1 − ½‖v̂ − t̂‖² ≤ 1 − ½ Σ (clip(t̂, L, U) − t̂)². It also covers
       v = 0 (cos = 0): then 0 ∈ [L, U], so the distance is ≤ ‖t̂‖ = 1 and C ≥ ½.
    """
    b = Bounds(_flat(bounds.lower), _flat(bounds.upper))
    nt = _pnorm(t, 2.0)
    n_lo, n_hi = _norm2_range(b)
    s = torch.maximum(t * b.lower, t * b.upper).sum(-1)
    if dot is not None:
        s = torch.minimum(s, dot.to(s))
    ratio = torch.where(
        s <= 0,
        _safe_div(s, nt * n_hi),
        torch.where(n_lo > 0, s / (nt * torch.where(n_lo > 0, n_lo, torch.ones_like(n_lo))), torch.ones_like(s)),
    )
    nb = normalized_bounds(b, Normalize.L2)
    that = _safe_div(t, nt[:, None].expand_as(t))
    lin = torch.maximum(that * nb.lower, that * nb.upper).sum(-1)
    near = torch.minimum(torch.maximum(that, nb.lower), nb.upper)
    chord = 1.0 - ((near - that) ** 2).sum(-1) / 2
    best = torch.minimum(torch.minimum(ratio, lin), chord)
    return torch.where(nt > 0, best, torch.zeros_like(best)).clamp(-1.0, 1.0)


def _untargeted_cos_worst(prop: Property, v0: torch.Tensor, bounds: Bounds,
                          dot: torch.Tensor | None = None) -> torch.Tensor:
    return cosine_lower_bound(_flat(v0.expand(bounds.shape)), bounds, dot)


def _targeted_cos_worst(prop: Property, v0: torch.Tensor, bounds: Bounds,
                        dot: torch.Tensor | None = None) -> torch.Tensor:
    return cosine_upper_bound(_target_like(_target(prop), bounds.lower), bounds, dot)


def _v0_functional(prop: Property, v0: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    if prop.metric != Metric.COSINE and not _unit_chord(prop):
        return None
    return _flat(v0), True


def _target_functional(prop: Property, v0: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    if prop.metric != Metric.COSINE and not _unit_chord(prop):
        return None
    return _target_like(_target(prop), v0), False


# ----------------------------------------------------------------------------------------
# Rank and feature properties (no metric, no normalization)


def _check_size(prop: Property, n: int) -> None:
    """k and the feature indices must fit a map of n features (checked when a spec entry
    becomes a property, and again whenever a map is measured)."""
    if prop.k is not None and prop.k > n:
        raise ValueError(f"property {prop.name!r}: k = {prop.k} exceeds the {n} features of the map")
    if prop.features is not None and max(prop.features) >= n:
        raise ValueError(f"property {prop.name!r}: feature index {max(prop.features)} out of range for a map "
                         f"of {n} features (flat indices 0..{n - 1})")


def _feature_cols(prop: Property, n: int) -> slice | list[int]:
    _check_size(prop, n)
    return slice(None) if prop.features is None else list(prop.features)


def _nan_rows(value: torch.Tensor, *maps: torch.Tensor) -> torch.Tensor:
    """value (B,), NaN on the rows where any of the (B or 1, m) maps has a NaN: a NaN
    explanation has no rank and no sign, so it must neither count as a flip nor as a
    change of the top-k set (that would make a NaN a counterexample)."""
    bad = torch.zeros_like(value, dtype=torch.bool)
    for m in maps:
        bad = bad | torch.isnan(m).any(1)
    return torch.where(bad, torch.full_like(value, math.nan), value)


def _v0_rows(v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v0 as (1 or B, n) rows for explanations v (B, *S): v0 may be (B, *S), (1, *S) or S."""
    return _flat(v0 if v0.dim() == v.dim() else v0[None])


def _topk_set(a: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of each row's k largest magnitudes (torch.topk's tie-breaking);
    metric and worst_case both pick K = topk(|v0|) through here."""
    return a.topk(k, dim=1).indices


def _topk_metric(prop: Property, v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """|topk(|v|) ∩ K| / k with K = topk(|v0|), per sample (ties broken by torch.topk)."""
    k = _k(prop)
    a0, a = _v0_rows(v0, v).abs(), _flat(v).abs()
    _check_size(prop, a.shape[1])
    in_k = torch.zeros_like(a0, dtype=torch.bool).scatter(1, _topk_set(a0, k), True).expand_as(a)
    value = in_k.gather(1, a.topk(k, dim=1).indices).sum(1).to(a.dtype) / k
    return _nan_rows(value, a0.expand_as(a), a)




def _topk_members_that_stay(prop: Property, v0: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """A sound lower bound (a count, B) of the min top-k overlap over the box.

    With [a_i⁻, a_i⁺] the range of |v_i| over [l_i, u_i] (a_i⁻ = 0 when the interval
    contains 0): i ∈ K = topk(|v0|) can leave the top-k of v only if at least k other j have
    |v_j| ≥ |v_i| ≥ a_i⁻, so only j with a_j⁺ ≥ a_i⁻; hence i stays in the top-k of EVERY v in
    the box, whatever the tie-breaking, if #{j ≠ i : a_j⁺ ≥ a_i⁻} ≤ k − 1 (ties are counted
    against us). The bound is the number of such i over k. When v0 lies in the box these i
    are in the top-k of v0 under any tie-breaking too, so the bound holds whichever K
    torch.topk picked among tied features; ties at the k-th place of v0 itself count against
    us (a point box with such a tie gets a bound below the concrete overlap).

    This rule alone is not always the exact minimum: one outsider may be able to displace any
    one of several members of K, but not all of them at the same v; the pigeonhole bound of
    ``topk_overlap_lower_bound`` (Levine et al. 2019, Corollary 2) uses that; ``_topk_worst``
    returns the larger of the two. With threshold 1 it is exact
    (up to ties): "the top-k set never changes" is certified iff
    min_{i∈K} a_i⁻ > max_{j∉K} a_j⁺, and otherwise the weakest member at a⁻ and the strongest
    outsider at a⁺ change the set.

    Vectorised: sort a⁺ once per sample; #{j : a_j⁺ ≥ a_i⁻} = n − searchsorted(a⁺, a_i⁻,
    left), which counts i itself (a_i⁺ ≥ a_i⁻), hence the − 1. O(n log n + k log n).
    """
    k = _k(prop)
    b = Bounds(_flat(bounds.lower), _flat(bounds.upper))
    amin, amax = _abs_range(b)
    n = amax.shape[1]
    _check_size(prop, n)
    idx = _topk_set(_flat(v0).abs(), k)  # K per sample, (B, k)
    sorted_max = torch.sort(amax, dim=1).values
    at_least = n - torch.searchsorted(sorted_max, amin.gather(1, idx).contiguous(), side="left")
    others = at_least - 1  # j = i is always among them: a_i⁺ ≥ a_i⁻
    return (others <= k - 1).sum(1).to(amax.dtype)


def _topk_worst(prop: Property, v0: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """max(one member at a time, Levine et al.'s pigeonhole) / k: both are sound lower bounds
    of the min top-k overlap (see ``_topk_members_that_stay`` and
    ``topk_overlap_lower_bound``)."""
    k = _k(prop)
    one_at_a_time = _topk_members_that_stay(prop, v0, bounds)
    b = Bounds(_flat(bounds.lower), _flat(bounds.upper))
    # Levine et al.'s Corollary 2 (a pigeonhole over outsiders) is often stronger; it needs v0 in
    # the box, which the pipeline checks (centre containment) before deciding
    inside = ((_flat(v0) >= b.lower) & (_flat(v0) <= b.upper)).all(1)
    best = one_at_a_time.clone()
    if bool(inside.any()):  # rows with v0 outside (or NaN) keep the member count
        v0_rows = _flat(v0).expand_as(b.lower)[inside]
        pigeon = topk_overlap_lower_bound(v0_rows, b[inside], k).to(best.dtype)
        best[inside] = torch.maximum(best[inside], pigeon)
    return best / k


def _sign_metric(prop: Property, v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Number of chosen features with sign(v_i) ≠ sign(v0_i) (torch.sign: 0 is its own sign)."""
    a = _flat(v)
    f = _feature_cols(prop, a.shape[1])
    a0 = _v0_rows(v0, v)[:, f].expand(a.shape[0], -1)
    value = (torch.sign(a0) != torch.sign(a[:, f])).sum(1).to(a.dtype)
    return _nan_rows(value, a0, a[:, f])


def _sign_worst(prop: Property, v0: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """Exact max flips over the box (coordinates move independently, each counts on its own):
    v0_i > 0 can flip iff l_i ≤ 0 (v_i = 0 or < 0); v0_i < 0 iff u_i ≥ 0; v0_i = 0 iff
    l_i < 0 or u_i > 0. The corner taking each flippable coordinate to the flipping
    endpoint attains it."""
    lo = _flat(bounds.lower)
    f = _feature_cols(prop, lo.shape[1])
    a0, lo, up = _flat(v0)[:, f], lo[:, f], _flat(bounds.upper)[:, f]
    can = torch.where(a0 > 0, lo <= 0, torch.where(a0 < 0, up >= 0, (lo < 0) | (up > 0)))
    return can.sum(1).to(lo.dtype)


def _feature_metric(prop: Property, v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """max |v_i| over the chosen features (NaN propagates)."""
    a = _flat(v)
    return a[:, _feature_cols(prop, a.shape[1])].abs().amax(1)


def _feature_worst(prop: Property, v0: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """Exact: max over the chosen features of max(|l_i|, |u_i|), attained at the endpoint of
    largest magnitude."""
    lo = _flat(bounds.lower)
    f = _feature_cols(prop, lo.shape[1])
    return torch.maximum(lo[:, f].abs(), _flat(bounds.upper)[:, f].abs()).amax(1)


# ----------------------------------------------------------------------------------------
# Gap ratios: how loose a certified worst case c is against the worst attacked value a,
# oriented so that it is ≥ 1 when both are right and 1 when the certificate is tight


def _ratio(num: float, den: float) -> float | None:
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return None
    return num / den


def _gap_deviation(c: float, a: float) -> float | None:  # max deviation ≤ δ (values ≥ 0)
    return _ratio(c, a)


def _gap_from_one(c: float, a: float) -> float | None:  # min similarity ≥ δ (values ≤ 1)
    return _ratio(1.0 - c, 1.0 - a)


def _gap_distance(c: float, a: float) -> float | None:  # min distance to the target ≥ δ
    return _ratio(a, c)


def _gap_from_minus_one(c: float, a: float) -> float | None:  # max cos to the target ≤ δ (values ≥ −1)
    return _ratio(1.0 + c, 1.0 + a)


# ----------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class PropertyRule:
    """How one (kind, metric) is measured, bounded, decided and compared with attacks."""

    metric: Callable[[Property, torch.Tensor, torch.Tensor], torch.Tensor]
    worst_case: Callable[[Property, torch.Tensor, Bounds], torch.Tensor]
    direction: Direction  # certified iff worst_case <direction> threshold
    text: str  # placeholders {v} {v0} {t} {p} {k} {nf}
    gap: Callable[[float, float], float | None]  # (certified, attacked) → ratio ≥ 1, 1 = tight
    # a linear functional c·v whose bound sharpens the worst case: (c (B, n), True for a lower bound
    # of c·v, False for an upper one) from v0; the worst case then takes that bound as ``dot``
    # (None from the callable: not for this property, e.g. ℓ2 without ℓ2 normalisation)
    functional: Callable[[Property, torch.Tensor], tuple[torch.Tensor, bool] | None] | None = None


RULES: dict[tuple[Kind, Metric | None], PropertyRule] = {}
for _m in (Metric.L1, Metric.L2, Metric.LINF):
    RULES[(Kind.UNTARGETED, _m)] = PropertyRule(_lp_metric, _untargeted_lp_worst, Direction.AT_MOST,
                                                "max ‖{v} − {v0}‖_{p}", _gap_deviation, _v0_functional)
    RULES[(Kind.TARGETED, _m)] = PropertyRule(_lp_metric, _targeted_lp_worst, Direction.AT_LEAST,
                                              "min ‖{v} − {t}‖_{p}", _gap_distance, _target_functional)
RULES[(Kind.UNTARGETED, Metric.COSINE)] = PropertyRule(_cos_metric, _untargeted_cos_worst, Direction.AT_LEAST,
                                                       "min cos(v0, v)", _gap_from_one, _v0_functional)
RULES[(Kind.TARGETED, Metric.COSINE)] = PropertyRule(_cos_metric, _targeted_cos_worst, Direction.AT_MOST,
                                                     "max cos(v, t)", _gap_from_minus_one, _target_functional)
RULES[(Kind.TOPK, None)] = PropertyRule(_topk_metric, _topk_worst, Direction.AT_LEAST,
                                        "min top-{k} overlap(v, v0)", _gap_from_one)
RULES[(Kind.SIGN, None)] = PropertyRule(_sign_metric, _sign_worst, Direction.AT_MOST,
                                        "sign flips of {nf}", _gap_deviation)
RULES[(Kind.FEATURE_BOUND, None)] = PropertyRule(_feature_metric, _feature_worst, Direction.AT_MOST,
                                                 "max |v_i| over {nf}", _gap_deviation)


def rule_for(kind: Kind | str, metric_name: Metric | str | None) -> PropertyRule:
    """The registered rule, or a clear error naming what exists."""
    try:
        key = (Kind(kind), None if metric_name is None else Metric(metric_name))
    except ValueError:
        key = None
    if key is None or key not in RULES:
        have = ", ".join(k.value + (f"/{m.value}" if m is not None else "") for k, m in RULES)
        raise ValueError(f"no property rule for kind {kind!r} and metric {metric_name!r} (available: {have})")
    return RULES[key]


def gap_ratio(prop: Property, certified: float, attacked: float) -> float | None:
    """How loose the certificate is against the strongest attack: ≥ 1 when both are right,
    1 = tight, None when undefined (e.g. the attack did not move the value at all).
    Deviations (ℓp untargeted, sign flips, feature bound): c / a; similarities bounded by 1
    (untargeted cosine, top-k overlap): (1 − c) / (1 − a); targeted ℓp: a / c; targeted
    cosine: (1 + c) / (1 + a)."""
    return prop.rule.gap(float(certified), float(attacked))


def direction_text(prop: Property) -> str:
    """E.g. 'max ‖N(v) − N(v0)‖_2 <= 0.5 (N = l2 normalization)'."""
    rule = prop.rule
    wrap = (lambda s: s) if prop.normalize == Normalize.NONE else (lambda s: f"N({s})")
    p = {Metric.L1: "1", Metric.L2: "2", Metric.LINF: "∞", Metric.COSINE: "", None: ""}[prop.metric]
    nf = "all features" if prop.features is None else f"{len(prop.features)} feature(s)"
    body = rule.text.format(v=wrap("v"), v0=wrap("v0"), t=wrap("t"), p=p, k=prop.k, nf=nf)
    suffix = "" if prop.normalize == Normalize.NONE else f" (N = {prop.normalize.value} normalization)"
    return f"{body} {rule.direction.value} {prop.threshold:g}{suffix}"


# ----------------------------------------------------------------------------------------
# Public functions


def metric(prop: Property, v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The concrete value (B,) for explanations v (perturbed) against v0 (original) —
    deviation, distance or similarity; targeted properties use the target, not v0."""
    return prop.rule.metric(prop, v0, v)


def functional(prop: Property, v0: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """The linear functional c·v (c (B, n)) whose engine bound sharpens ``prop``'s worst case,
    and whether its lower (True) or upper bound is wanted; None for properties without one."""
    f = prop.rule.functional
    return None if f is None else f(prop, v0)


def cosine_worst(prop: Property, cos_lower: torch.Tensor) -> torch.Tensor | None:
    """The sound worst case (B,) of an untargeted property decided by the cosine, given a sound
    lower bound c of cos(v0, v) over a set of maps: c itself for the cosine property, √(2 − 2c)
    for ℓ2 between ℓ2-normalised maps (the chord identity; at v = 0, where cos = 0, the
    distance ‖v̂0‖ = 1 ≤ √(2 − 2c) as c ≤ 0 there). None for other properties."""
    if prop.kind != Kind.UNTARGETED:
        return None
    c = cos_lower.to(torch.float64).clamp(-1.0, 1.0)
    if prop.metric == Metric.COSINE:
        return c
    if _unit_chord(prop):
        # 2⁻⁵⁰ covers the roundings of 2 − 2c and of the square root
        return (2.0 - 2.0 * c).clamp(min=0.0).sqrt() + 2.0 ** -50
    return None


def worst_case(prop: Property, v0: torch.Tensor, bounds: Bounds, dot: torch.Tensor | None = None) -> torch.Tensor:
    """The sound worst case (B,) of ``metric(prop, v0, v)`` over all v in ``bounds``,
    computed in float64 whatever the bounds' dtype (float32 rounding in sums of squares
    would be of the order of the margins being certified). ``dot`` (B,): a sound bound of the
    property's :func:`functional` over the same box, used where it is tighter."""
    if v0.shape != bounds.shape:
        raise ValueError(f"property {prop.name!r}: v0 of shape {tuple(v0.shape)} and bounds of shape "
                         f"{tuple(bounds.shape)} differ")
    v0, bounds = v0.to(torch.float64), bounds.to(torch.float64)
    if dot is not None:
        if functional(prop, v0) is None:
            raise ValueError(f"property {prop.name!r} has no linear functional to take a bound of")
        worst = prop.rule.worst_case(prop, v0, bounds, dot.to(torch.float64))  # type: ignore[call-arg]
    else:
        worst = prop.rule.worst_case(prop, v0, bounds)
    # a NaN in v0 (or the target) makes the property meaningless: never certify it (some
    # bounds, e.g. the cosine ones' "a = 0" branch, would otherwise return a finite value)
    bad = torch.isnan(_flat(v0)).any(1)
    if prop.target is not None:
        bad = bad | bool(torch.isnan(prop.target).any())
    return torch.where(bad, torch.full_like(worst, math.nan), worst)


def decide(prop: Property, worst: torch.Tensor) -> list[Verdict]:
    """certified where the worst case satisfies the property, else unknown (NaN: unknown)."""
    t = prop.threshold
    ok = worst <= t if prop.rule.direction == Direction.AT_MOST else worst >= t
    return [Verdict.CERTIFIED if bool(o) else Verdict.UNKNOWN for o in ok.reshape(-1)]


def evaluate(prop: Property, v0: torch.Tensor, bounds: Bounds, dot: torch.Tensor | None = None
             ) -> list[PropertyResult]:
    """worst_case and decide for each sample of the batch (``dot``: see :func:`worst_case`)."""
    worst = worst_case(prop, v0, bounds, dot)
    text = direction_text(prop)
    return [PropertyResult(prop.name, verdict, float(w), prop.threshold, text)
            for verdict, w in zip(decide(prop, worst), worst.reshape(-1), strict=True)]


__all__ = [
    "Verdict", "Direction", "Property", "PropertyResult", "PropertyRule", "RULES", "rule_for",
    "Kind", "Metric", "Normalize", "METRIC_KINDS", "gaussian_map", "square_map", "file_map", "normalize_map", "normalized_bounds", "cosine", "cosine_lower_bound",
    "cosine_upper_bound", "topk_overlap_lower_bound", "metric", "functional", "worst_case", "decide", "evaluate", "direction_text", "gap_ratio",
]
