"""Quantus-style robustness metrics, certified: sound per-sample upper bounds of what quantus
0.6.0 estimates by sampling (re-exported by :mod:`verigrad.metrics`).

Each metric is called with quantus' signature ``metric(model, x_batch, y_batch, a_batch=None,
explain_func=None, explain_func_kwargs=None, device=None, batch_size=64, **kw)`` and returns a
numpy array with one float per sample (quantus' ``return_aggregate=False`` default; with
``return_aggregate=True`` one aggregated value). ``model`` is a plain ``nn.Module``;
``explain_func`` says which explanation e is bounded: a verigrad certified attribution
(:class:`~verigrad.attr.CertifiedSaliency`, ...), a quantus method name (``"Saliency"`` =
|∂o/∂x|, ``"Gradient"`` = ∂o/∂x, ``"InputXGradient"``, ``"IntegratedGradients"``), or
``quantus.explain`` itself with ``explain_func_kwargs={"method": ...}``; for quantus names its
own settings are reproduced (IG: 10 steps, riemann_trapezoid, baseline 0 or ``baseline``;
inputs of ≥ 3 dims: attributions summed over ``reduce_axes`` = (1,), keepdims). Then, as
quantus' ``explain_batch``: ``normalise`` (quantus' ``normalise_by_max``: divide the whole
batch chunk of maps by its largest |value|) and ``abs``.

quantus perturbs every feature with uniform noise δ_i ∈ [lo, hi] (``lower_bound`` r and
``upper_bound`` None: [−r, r]; both given: [lower_bound, upper_bound]), so every sampled x' lies
in the box X = [x + lo, x + hi]. Every bound below is of the sup over all of X, computed from the
library's bound maps [L, U] ∋ e(x') (:meth:`~verigrad.attr.CertifiedAttribution.box_bounds`,
widened for rounding) and the exact map a = e(x) (or quantus' ``a_batch`` if given), with the
sound per-coordinate deviation D_i = max(|U_i − a_i|, |L_i − a_i|) ≥ |e(x')_i − a_i|. The
bounds are of the exact-arithmetic values; quantus computes in float32, so its samples may
exceed them by float32 rounding. The prediction-change filter (NaN samples) is ignored: a bound
over all of X bounds the filtered max too.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from verigrad.attr import (
    CertifiedAttribution, CertifiedInputXGradient, CertifiedIntegratedGradients, CertifiedSaliency,
)
from verigrad.attr._base import abs_bounds
from verigrad.bounds import Bounds, Method
from verigrad.bounds.hessian import SecondOrderUnsupported, spectral_norm_upper
from verigrad.bounds.rounding import widen
from verigrad.errors import EngineUnsupported
from verigrad.properties import Normalize, normalized_bounds

__all__ = ["CertifiedLocalLipschitz", "CertifiedMaxSensitivity", "CertifiedRelativeInputStability"]

NormLike = str | Callable[..., Any]
# quantus' norm and distance functions (by name) and ours → the ℓp exponent
_NORMS = {"fro_norm": 2.0, "l2_norm": 2.0, "linf_norm": math.inf, "distance_euclidean": 2.0,
          "distance_manhattan": 1.0, "distance_chebyshev": math.inf,
          "fro": 2.0, "l2": 2.0, "l1": 1.0, "linf": math.inf}


def _norm_p(norm: NormLike, what: str) -> float:
    name = norm if isinstance(norm, str) else getattr(norm, "__name__", repr(norm))
    if name not in _NORMS:
        raise ValueError(f"{what}: unsupported norm {name!r}; choose from {sorted(_NORMS)}")
    return _NORMS[name]


def _explainer(model: nn.Module, explain_func: Any, kw: Mapping[str, Any]
               ) -> tuple[CertifiedAttribution, dict[str, Any], tuple[int, ...]]:
    """(attribution, its captum keyword arguments, axes quantus sums the map over)."""
    if isinstance(explain_func, CertifiedAttribution):
        return explain_func, dict(kw), ()
    name: str | None = None
    if isinstance(explain_func, str):
        name = explain_func
    elif callable(explain_func) and getattr(explain_func, "__module__", "").startswith("quantus"):
        name = str(kw.get("method", "Gradient"))
    if name is None:
        raise TypeError("a certified metric must know the explanation it bounds: pass explain_func as a verigrad "
                        "Certified* attribution, a method name (Saliency, Gradient, InputXGradient, "
                        "IntegratedGradients) or quantus.explain with explain_func_kwargs={'method': ...}")
    axes = tuple(int(a) for a in kw.get("reduce_axes", (1,)))
    if name == "Saliency":
        return CertifiedSaliency(model), {"abs": True}, axes
    if name == "Gradient":
        return CertifiedSaliency(model), {"abs": False}, axes
    if name == "InputXGradient":
        return CertifiedInputXGradient(model), {}, axes
    if name == "IntegratedGradients":
        base = kw.get("baseline", 0.0)
        return (CertifiedIntegratedGradients(model),
                {"n_steps": 10, "method": "riemann_trapezoid", "baselines": base}, axes)
    raise ValueError(f"explanation method {name!r} has no certified counterpart (Saliency, Gradient, "
                     "InputXGradient, IntegratedGradients)")


def _reduce(v: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """quantus' reduction: sum over ``axes`` (keepdims) for inputs of ≥ 3 dims, else nothing."""
    if not axes or v.dim() < 3:
        return v
    return v.sum(dim=axes, keepdim=True)


def _normalise(v: torch.Tensor) -> torch.Tensor:
    """quantus' normalise_by_max: the whole chunk over max |v| (unchanged if all zero)."""
    m = v.abs().max()
    return v if bool(m == 0) else v / m


def _normalise_bounds(b: Bounds) -> Bounds:
    """Exact per-coordinate bounds of v / max|v| with the max over the whole chunk (every map of
    the chunk moves in its own box), from the library's :func:`normalized_bounds`."""
    one = Bounds(b.lower.reshape(1, -1), b.upper.reshape(1, -1))
    nb = normalized_bounds(one, Normalize.MAX)
    return Bounds(nb.lower.reshape(b.shape), nb.upper.reshape(b.shape))


def _to_tensor(a: Any) -> torch.Tensor:
    t = a.detach().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t.to(torch.float64)


class _CertifiedMetric:
    """Shared settings and the per-chunk pipeline of the certified metrics."""

    lower_bound: float
    upper_bound: float | None

    def __init__(self, abs: bool = False, normalise: bool = False, return_aggregate: bool = False,
                 aggregate_func: Callable[[np.ndarray], Any] | None = None, method: Method | str = Method.CROWN,
                 **kwargs: Any) -> None:
        self.abs = bool(abs)
        self.normalise = bool(normalise)
        self.return_aggregate = bool(return_aggregate)
        self.aggregate_func = aggregate_func if aggregate_func is not None else np.mean
        self.method = Method(getattr(method, "value", method))
        self.ignored = dict(kwargs)  # quantus settings that do not change a sup over the box (nr_samples, ...)

    def offsets(self) -> tuple[float, float]:
        """[lo, hi]: quantus' uniform noise interval per feature."""
        r, up = float(self.lower_bound), self.upper_bound
        if up is None:
            if not r >= 0:
                raise ValueError(f"{type(self).__name__}: the noise radius must be >= 0, got {r}")
            return -r, r
        if not float(up) > r:
            raise ValueError(f"{type(self).__name__}: upper_bound {up} must exceed lower_bound {r} (as in quantus)")
        return r, float(up)

    def __call__(self, model: nn.Module, x_batch: Any, y_batch: Any, a_batch: Any = None, s_batch: Any = None,
                 channel_first: bool | None = None, explain_func: Any = None,
                 explain_func_kwargs: Mapping[str, Any] | None = None, model_predict_kwargs: Any = None,
                 softmax: bool | None = False, device: str | torch.device | None = None, batch_size: int = 64,
                 **kwargs: Any) -> np.ndarray:
        """Per-sample sound upper bounds (numpy, one float per sample; see the class docstring)."""
        if softmax:
            raise ValueError(f"{type(self).__name__}: explanations of softmax outputs are not bounded here")
        attr, ckw, axes = _explainer(model, explain_func, explain_func_kwargs or {})
        x = _to_tensor(x_batch)
        y = torch.as_tensor(np.asarray(y_batch.cpu() if isinstance(y_batch, torch.Tensor) else y_batch))
        y = y.reshape(-1).to(torch.long)
        if y.numel() != x.shape[0]:
            raise ValueError(f"y_batch has {y.numel()} labels for {x.shape[0]} inputs")
        given = None
        if a_batch is not None:  # quantus normalises the whole given a_batch at once, then abs
            given = _to_tensor(a_batch)
            given = _normalise(given) if self.normalise else given
            given = given.abs() if self.abs else given
        out = []
        for s in range(0, x.shape[0], int(batch_size)):
            rows = slice(s, s + int(batch_size))
            a = None if given is None else given[rows]
            out.append(self._chunk(attr, ckw, axes, x[rows], y[rows], a))
        scores = np.concatenate(out) if out else np.zeros(0)
        return np.asarray([self.aggregate_func(scores)]) if self.return_aggregate else scores

    # -- the maps ------------------------------------------------------------------------------
    def _centre(self, attr: CertifiedAttribution, ckw: Mapping[str, Any], axes: tuple[int, ...],
                x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = _reduce(attr.attribute(x, y, **ckw).to(torch.float64), axes)
        a = _normalise(a) if self.normalise else a
        return a.abs() if self.abs else a

    def _map_bounds(self, attr: CertifiedAttribution, ckw: Mapping[str, Any], axes: tuple[int, ...],
                    box: Bounds, y: torch.Tensor) -> Bounds:
        """Bounds of quantus' processed map e(x') over ``box`` (float64, widened for rounding)."""
        b, _, _ = attr.box_bounds(box, y, self.method, captum_kwargs=ckw)
        b, _ = widen(attr.network, b, torch.float64, attr.extra_roundings(ckw))
        b = attr._post(b, ckw)  # captum's abs for Saliency
        if axes and b.lower.dim() >= 3:
            b = Bounds(b.lower.sum(dim=axes, keepdim=True), b.upper.sum(dim=axes, keepdim=True))
        b = _normalise_bounds(b) if self.normalise else b
        return abs_bounds(b) if self.abs else b

    def _deviation(self, attr: CertifiedAttribution, ckw: Mapping[str, Any], axes: tuple[int, ...],
                   x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a = e(x) flat (B, n), D = the sound bound of |e(x') − a| per coordinate over X)."""
        lo, hi = self.offsets()
        centre = self._centre(attr, ckw, axes, x, y) if a is None else a
        b = self._map_bounds(attr, ckw, axes, Bounds(x + lo, x + hi), y)
        flat_a = centre.reshape(x.shape[0], -1)
        if flat_a.shape[1] != b.lower[0].numel():
            raise ValueError(f"a_batch has {flat_a.shape[1]} values per sample, the explanation {b.lower[0].numel()}")
        dev = torch.maximum((b.upper.reshape(flat_a.shape) - flat_a).abs(), (b.lower.reshape(flat_a.shape) - flat_a).abs())
        return flat_a, dev

    def _chunk(self, attr: CertifiedAttribution, ckw: Mapping[str, Any], axes: tuple[int, ...],
               x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None) -> np.ndarray:
        raise NotImplementedError


class CertifiedMaxSensitivity(_CertifiedMetric):
    """Sound upper bound of quantus' ``MaxSensitivity`` (Yeh et al. 2019):

        MS(x) = sup_{x' ∈ X} ‖e(x') − e(x)‖_num / ‖e(x)‖_den ≤ ‖D‖_num / ‖a‖_den,

    X = [x − r, x + r] (r = ``perturb_radius``, quantus' ``lower_bound``, default 0.2; or
    [x + lower_bound, x + upper_bound] with ``upper_bound``), e quantus' processed explanation
    (defaults as quantus: ``abs=False``, ``normalise=False``), norms ``fro``/``l2``/``linf``
    (quantus' fro_norm, l2_norm, linf_norm; default ℓ2 both). Sound since every ℓp norm is
    monotone in the coordinates' magnitudes and |e(x')_i − a_i| ≤ D_i. ‖a‖ = 0: inf (quantus'
    value is inf or NaN there). At r = 0 the bound is 0 up to the rounding allowance, as quantus'.
    """

    def __init__(self, perturb_radius: float = 0.2, norm_numerator: NormLike = "fro",
                 norm_denominator: NormLike = "fro", upper_bound: float | None = None, abs: bool = False,
                 normalise: bool = False, **kwargs: Any) -> None:
        super().__init__(abs=abs, normalise=normalise, **kwargs)
        self.lower_bound, self.upper_bound = float(perturb_radius), upper_bound
        self.p_num = _norm_p(norm_numerator, "norm_numerator")
        self.p_den = _norm_p(norm_denominator, "norm_denominator")
        self.offsets()

    def _chunk(self, attr: CertifiedAttribution, ckw: Mapping[str, Any], axes: tuple[int, ...],
               x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None) -> np.ndarray:
        flat_a, dev = self._deviation(attr, ckw, axes, x, y, a)
        num = torch.linalg.vector_norm(dev, ord=self.p_num, dim=1)
        den = torch.linalg.vector_norm(flat_a, ord=self.p_den, dim=1)
        out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, math.inf))
        return out.numpy()


class CertifiedLocalLipschitz(_CertifiedMetric):
    """Sound upper bound of a local Lipschitz estimate (quantus' ``LocalLipschitzEstimate``,
    Alvarez-Melis & Jaakkola 2018) over the box X = [x − r, x + r] (r = ``perturb_radius``):

        LLE(x) = sup_{x' ∈ X, x' ≠ x} ‖e(x') − e(x)‖_num / ‖x' − x‖₂.

    quantus samples Gaussian noise (std 0.1), which leaves every box with positive probability,
    so its own quantity has no finite certificate; this bounds the same quotient over X, the set
    quantus samples with ``perturb_func=batch_uniform_noise, perturb_func_kwargs={"lower_bound": r}``
    (its regulariser, ‖x' − x‖ + 1e-10, only lowers its value). Two sound bounds, the smaller
    one taken:

    * mean value theorem (smooth activations: softplus, sigmoid, tanh): e(x') − e(x) = Ĵ (x' − x)
      with Ĵ entrywise in the Jacobian bounds [J_l, J_u] over X
      (:func:`verigrad.explanations.jacobian_bounds`; summed over quantus' channel reduction),
      so with M = max(|J_l|, |J_u|): ‖Ĵδ‖₂ ≤ ‖M‖₂‖δ‖₂ (spectral norm, ``spectral_norm_upper``),
      ‖Ĵδ‖₁ ≤ Σ_i ‖M_i‖₂‖δ‖₂, ‖Ĵδ‖_∞ ≤ max_i ‖M_i‖₂‖δ‖₂. |·| (``abs``, captum's saliency
      abs) is 1-Lipschitz per coordinate, so it keeps the bound.
    * with ``min_distance`` = ρ > 0: over the annulus X ∩ {‖x' − x‖₂ ≥ ρ} (where quantus'
      samples lie when ρ is below their norms, e.g. ρ ≪ σ√d) the quotient is ≤ ‖D‖_num / ρ.
      This also covers ReLU networks, whose gradient jumps (no finite bound as x' → x).

    A non-smooth network without ``min_distance`` raises ValueError. ``normalise=True`` (quantus'
    default) is refused: the chunk-wise max normalisation has no Jacobian bound here. At r = 0
    the set is empty (quantus' value at zero noise is 0 by its 1e-10 regulariser); as r → 0 the
    bound tends to ‖|J(x)|‖₂, the bound at the point itself.
    """

    def __init__(self, perturb_radius: float = 0.1, norm_numerator: NormLike = "distance_euclidean",
                 norm_denominator: NormLike = "distance_euclidean", min_distance: float | None = None,
                 abs: bool = False, normalise: bool = False, hessian_method: str = "crown", **kwargs: Any) -> None:
        if normalise:
            raise ValueError("CertifiedLocalLipschitz: normalise=True is not supported (pass normalise=False to "
                             "quantus too)")
        super().__init__(abs=abs, normalise=False, **kwargs)
        self.lower_bound, self.upper_bound = float(perturb_radius), None
        self.p_num = _norm_p(norm_numerator, "norm_numerator")
        if _norm_p(norm_denominator, "norm_denominator") != 2.0:
            raise ValueError("CertifiedLocalLipschitz: only the euclidean norm of x' − x is supported")
        self.min_distance = None if min_distance is None else float(min_distance)
        if self.min_distance is not None and not self.min_distance > 0:
            raise ValueError(f"min_distance must be > 0, got {min_distance}")
        self.hessian_method = hessian_method
        self.offsets()

    def _operator_bound(self, m: torch.Tensor) -> torch.Tensor:
        """(B,) sup ‖Ĵδ‖_num / ‖δ‖₂ over 0 ≤ |Ĵ| ≤ M (B, n, d)."""
        if self.p_num == 2.0:
            return spectral_norm_upper(Bounds(-m, m))
        rows = torch.linalg.vector_norm(m, ord=2, dim=2) * (1 + 1e-12)
        return rows.sum(1) if self.p_num == 1.0 else rows.amax(1)

    def _chunk(self, attr: CertifiedAttribution, ckw: Mapping[str, Any], axes: tuple[int, ...],
               x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None) -> np.ndarray:
        lo, hi = self.offsets()
        best = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
        smooth_error: Exception | None = None
        try:
            attr._net_for(x, torch.float64)
            jb = attr.box_jacobian_bounds(Bounds(x + lo, x + hi), y.to(attr.network.device), self.hessian_method,
                                         captum_kwargs=ckw)
            jb, _ = widen(attr.network, jb, torch.float64, attr.extra_roundings(ckw))
            m = torch.maximum(jb.lower.abs(), jb.upper.abs())
            if axes and x.dim() >= 3:  # channel sum: rows of the reduced map add up
                shape = (x.shape[0], *x.shape[1:], m.shape[-1])
                m = m.reshape(shape).sum(dim=axes, keepdim=True).reshape(x.shape[0], -1, m.shape[-1])
            best = torch.minimum(best, self._operator_bound(m))
        except (SecondOrderUnsupported, EngineUnsupported) as e:
            smooth_error = e
        if self.min_distance is not None:
            _, dev = self._deviation(attr, ckw, axes, x, y, a)
            best = torch.minimum(best, torch.linalg.vector_norm(dev, ord=self.p_num, dim=1) / self.min_distance)
        elif smooth_error is not None:
            raise ValueError(f"CertifiedLocalLipschitz: {smooth_error}; the quotient is unbounded as x' → x for "
                             "such networks: pass min_distance to bound it over an annulus") from smooth_error
        return best.numpy()


class CertifiedRelativeInputStability(_CertifiedMetric):
    """Sound upper bound of quantus' ``RelativeInputStability`` (Agarwal et al. 2022):

        RIS(x) = sup_{x' ∈ X} ‖(e(x) − e(x')) / ẽ‖₂ / max(‖(x − x') / x̃‖₂, ε)

    with quantus' guards ẽ = e(x) + ε·[e(x) = 0], x̃ = x + ε·[x = 0], ε = ``eps_min`` (1e-6), and
    its default noise δ ∈ [0.02, 0.2] per feature (``lower_bound``, ``upper_bound``), so
    X = [x + 0.02, x + 0.2]. Bound: numerator ≤ ‖D / |ẽ|‖₂; denominator ≥ ‖m / |x̃|‖₂ with
    m_i = min |δ_i| over [lo, hi] (0.02 by default); the quotient of the two (quantus adds ε
    only to a denominator that is exactly 0, which cannot happen when m > 0). When
    0 ∈ [lo, hi] (symmetric noise) the denominator can approach 0 without being 0 and no box
    bound controls the quotient: inf. Not defined at zero noise (quantus' interval must have
    upper_bound > lower_bound).
    """

    def __init__(self, lower_bound: float = 0.02, upper_bound: float | None = 0.2, eps_min: float = 1e-6,
                 abs: bool = False, normalise: bool = False, **kwargs: Any) -> None:
        super().__init__(abs=abs, normalise=normalise, **kwargs)
        self.lower_bound, self.upper_bound = float(lower_bound), upper_bound
        self.eps_min = float(eps_min)
        self.offsets()

    def _chunk(self, attr: CertifiedAttribution, ckw: Mapping[str, Any], axes: tuple[int, ...],
               x: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None) -> np.ndarray:
        lo, hi = self.offsets()
        flat_a, dev = self._deviation(attr, ckw, axes, x, y, a)
        e_guard = (flat_a + (flat_a == 0) * self.eps_min).abs()
        num = torch.linalg.vector_norm(dev / e_guard, ord=2, dim=1)
        xf = x.reshape(x.shape[0], -1)
        x_guard = (xf + (xf == 0) * self.eps_min).abs()
        m = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
        den = torch.linalg.vector_norm(torch.full_like(xf, m) / x_guard, ord=2, dim=1)
        out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, math.inf))
        return out.numpy()
