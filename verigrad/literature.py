"""The literature's first-order and Hessian-norm bounds on how far an explanation moves,
each labelled by what it actually guarantees.

Notation (ours, used in every docstring below). An explanation (attribution) is a map
g : R^d → R^d, e.g. saliency g = ∇_x o, gradient×input or integrated gradients. Its
Jacobian is J(x) ∈ R^{d×d} with J_ij = ∂g_i/∂x_j (numerator layout), so that to first order
g(x + δ) − g(x) ≈ J δ. For saliency J is the Hessian of o and is symmetric; for
gradient×input or IG it is not, and the orientation matters (see ``first_order_linf``).

Sources (cited by tag below):

- [CAR] "Certification of attribution robustness for Euclidean distance and cosine
  similarity measure" (anonymous ICLR submission, Wang & Kong line of work): Theorem 1
  (eq. 5), Corollary 1 (eq. 16), Theorem 2 (eq. 6 / 18), Proposition 1 (eq. 7) and §4.3,
  Corollary 2 (eq. 9), Appendix E (eqs. 47–51). The paper writes H = ∇g^y with
  g(x + δ) = g(x) + Hᵀδ (its eq. 19), i.e. H = Jᵀ in our layout, and P = H Hᵀ = JᵀJ.
- [DOM] Dombrowski et al. 2022, "Towards robust explanations for deep neural networks":
  eq. (5) (change ≤ sup ‖H‖_F · path length), §3.1 (stochastic Frobenius estimator),
  Theorem 1 / eq. (8) and its proof in Appendix A (eqs. 16–19), eq. (10) (softplus Σ1, Σ2).
- [JOO] Joo et al. 2023, "Towards more robust interpretation via local gradient
  alignment": Definition 4 (cosine robust criterion), Theorem 6 (eq. 3) and its proof in
  Appendix B (steps (1)–(3)).

Guarantees (``verigrad.guarantees``):

- ESTIMATE: every formula built on the point Jacobian J(x) ([CAR] Thms 1–2, Cor. 1, the
  label-constraint variant, the inverse problem; [JOO] Thm 6; [DOM]'s Hutchinson estimate).
  They assume g is linear on the ball ("locally linear", [CAR] §4.1) and are not bounds on
  the true change; [CAR] itself needs a fudge factor c ≥ 1 (its eq. 10) when they fail.
- SOUND: the same formulas with J(x) replaced by a bound on J over the whole box
  (``sound_l2``, ``sound_linf``), the cosine conversion of a sound Euclidean bound, the
  nested-box radius search, and [DOM] Theorem 1 (a global bound on ‖∇²o‖_F from the
  weights) with the path-length bound eq. (5).

All arithmetic on bounds is done in float64; sound results are multiplied by
``1 + SAFETY_REL`` to absorb the rounding of that arithmetic (sums, SVDs, square roots),
which is what "sound up to floating point" means here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from verigrad.bounds.base import Bounds
from verigrad.errors import EngineUnsupported
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.guarantees import Guarantee
from verigrad.models.network import ActKind, Activation, Conv2d, Linear, Network, Reshape

__all__ = [
    "Explain", "Norm", "LiteratureBound", "SAFETY_REL",
    "saliency_explainer", "input_x_gradient_explainer",
    "attribution_jacobian",
    "first_order_l2", "first_order_linf", "label_constrained", "cosine_from_l2", "cosine_bound",
    "sound_cosine",
    "inverse_radius", "joo_cosine_bound", "hutchinson_frobenius_sq", "hutchinson_frobenius",
    "sound_l2", "sound_linf", "certified_radius",
    "activation_sigma", "weight_norm_hessian_bound", "hessian_change_bound",
    "all_bounds",
]

Explain = Callable[[torch.Tensor], torch.Tensor]
"""An explanation: (B, *S) → (B, *S), per sample, differentiable in x (built with
``create_graph=True``) so that its Jacobian can be taken by a second backward pass."""

Norm = Literal["l2", "linf"]

# Relative inflation of every SOUND number: covers float64 rounding in the bound arithmetic
# (LAPACK's SVD is backward stable: |σ̂ − σ| ≤ c·d·2^-53·‖A‖, far below 1e-9 for d ≤ 1e5).
SAFETY_REL = 1e-9

# sources, cited verbatim in every LiteratureBound
_CAR = "Certified attribution robustness (Euclidean/cosine)"
_DOM = "Dombrowski et al. 2022"
_JOO = "Joo et al. 2023"


@dataclass(frozen=True)
class LiteratureBound:
    """One number from the literature, with what it promises.

    ``quantity`` names what ``value`` bounds or estimates:
      - ``l2_change``: ‖g(x') − g(x)‖₂ over an ℓ2 ball,
      - ``linf_ball_l2_change``: ‖g(x') − g(x)‖₂ over an ℓ∞ ball (box),
      - ``cosine_distance``: 1 − cos(g(x'), g(x)) over the ball,
      - ``hessian_frobenius``: ‖∇²o‖_F (saliency) / ‖J‖_F (any attribution),
      - ``radius``: the largest ball radius for a tolerance ω.
    ``value`` may be ``math.inf`` (a formula that is vacuous here; ``note`` says why).
    """

    name: str
    quantity: str
    value: float
    guarantee: Guarantee
    source: str
    note: str = ""

    def to_dict(self) -> dict:
        """JSON-ready: a non-finite value becomes ``None`` (strict JSON has no inf)."""
        v = float(self.value)
        return {
            "name": self.name,
            "quantity": self.quantity,
            "value": v if math.isfinite(v) else None,
            "guarantee": Guarantee(self.guarantee).value,
            "source": self.source,
            "note": self.note,
        }


# --------------------------------------------------------------------------------------
# explanations as differentiable callables
# --------------------------------------------------------------------------------------


def saliency_explainer(net: Network, target: int, output: Output = Output.LOGIT) -> Explain:
    """g(x) = ∂o/∂x for class ``target`` (o the logit or the CE loss), differentiable in x."""

    def explain(x: torch.Tensor) -> torch.Tensor:
        t = torch.full((x.shape[0],), int(target), dtype=torch.long, device=x.device)
        return saliency(net, _requiring_grad(x), t, output, create_graph=True)

    return explain


def input_x_gradient_explainer(net: Network, target: int, output: Output = Output.LOGIT) -> Explain:
    """g(x) = x ⊙ ∂o/∂x ([CAR] Table 1, "gradient*input")."""
    sal = saliency_explainer(net, target, output)

    def explain(x: torch.Tensor) -> torch.Tensor:
        x = _requiring_grad(x)
        return x * sal(x)

    return explain


def _requiring_grad(x: torch.Tensor) -> torch.Tensor:
    # saliency(create_graph=True) needs an input in the autograd graph; a leaf that does
    # not require grad is promoted (a non-leaf already carries the graph we must keep)
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _one(x: torch.Tensor) -> torch.Tensor:
    if x.dim() < 2 or x.shape[0] != 1:
        raise ValueError(f"expected one input with a batch dimension of 1, got shape {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------
# point Jacobian
# --------------------------------------------------------------------------------------


def attribution_jacobian(explain: Explain, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """J(x) ∈ R^{d×d}, J_ij = ∂g_i/∂x_j, by autograd at one input x of shape (1, *S).

    One batched double backward per ``chunk`` rows: copies x_k of x are explained together
    and ∂(Σ_k g_k(x_k)_k)/∂x_k is row k of J, because sample k's explanation depends on
    x_k only (``explain`` must be per-sample, which every explanation here is).
    """
    x = _one(x).detach()
    d = x[0].numel()
    rows = []
    for start in range(0, d, chunk):
        idx = torch.arange(start, min(start + chunk, d), device=x.device)
        xs = x.expand(len(idx), *x.shape[1:]).clone().requires_grad_(True)
        with torch.enable_grad():
            g = explain(xs)
            if g.shape != xs.shape:
                raise ValueError(f"explain must return the input's shape {tuple(xs.shape)}, got {tuple(g.shape)}")
            sel = g.reshape(len(idx), d).gather(1, idx[:, None]).sum()
            (grad,) = torch.autograd.grad(sel, xs, allow_unused=True)
        rows.append(torch.zeros(len(idx), d, dtype=x.dtype, device=x.device) if grad is None
                    else grad.reshape(len(idx), d))
    return torch.cat(rows).detach()


def _spectral(a: torch.Tensor) -> float:
    """Largest singular value (float64 SVD)."""
    return float(torch.linalg.matrix_norm(a.to(torch.float64), ord=2))


def _top_right_singular(j: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(ξ_max, v_max): the maximiser of ‖J v‖₂ over unit v ([CAR] eq. 4: δ* = ±ε v_max)."""
    _, s, vh = torch.linalg.svd(j.to(torch.float64), full_matrices=False)
    return float(s[0]), vh[0]


def _abs_sum_jtj(j: torch.Tensor, e: torch.Tensor | None = None) -> float:
    """Σ_ij |P_ij| e_i e_j with P = JᵀJ (e = 1 when None)."""
    p = (j.to(torch.float64).T @ j.to(torch.float64)).abs()
    if e is None:
        return float(p.sum())
    e = e.to(torch.float64)
    return float(e @ p @ e)


# --------------------------------------------------------------------------------------
# [CAR]: first-order estimates from the point Jacobian
# --------------------------------------------------------------------------------------


_ZERO_J = "; J(x) = 0 (piecewise-linear net?): the estimate is meaningless there"


def first_order_l2(j: torch.Tensor, eps: float) -> LiteratureBound:
    """[CAR] Theorem 1, eq. (5): ‖g(x + δ) − g(x)‖₂ ≤ ξ_max ε for ‖δ‖₂ ≤ ε, ξ_max the largest
    singular value of J (= of H = Jᵀ). Exact and attained at δ = ±ε v_max when g is linear;
    otherwise a first-order ESTIMATE (the Taylor remainder is ignored)."""
    xi = _spectral(j)
    return LiteratureBound(
        "car_thm1_l2", "l2_change", xi * eps, Guarantee.ESTIMATE, f"{_CAR}, Theorem 1 (eq. 5)",
        f"xi_max={xi:.6g}, eps={eps:g}; assumes g linear on the ball" + (_ZERO_J if xi == 0 else ""),
    )


def first_order_linf(j: torch.Tensor, eps: float) -> tuple[LiteratureBound, LiteratureBound]:
    """ℓ∞ ball ‖δ‖∞ ≤ ε, two first-order ESTIMATES of max ‖g(x + δ) − g(x)‖₂:

    - [CAR] Theorem 2, eq. (6)/(18): ε·sqrt(Σ_ij |P_ij|) with P = JᵀJ. Orientation: the
      paper's P = H Hᵀ with H = ∇g^y defined by g(x + δ) = g(x) + Hᵀδ (eq. 19), so H = Jᵀ
      and P = JᵀJ — the Gram matrix of the columns, since ‖Jδ‖² = δᵀ(JᵀJ)δ. The other
      orientation J Jᵀ is wrong for non-symmetric J (gradient×input, IG): for
      J = [[1, 1], [0, 0]] it gives √2·ε while the corner (ε, ε) moves g by 2ε.
      The paper's claim that equality holds at the corners is only true when the signs
      of P factor as s_i s_j (e.g. J ≥ 0); in general it is an upper bound on the
      linearised maximum, and not always tighter than Corollary 1.
    - [CAR] Corollary 1 with p = ∞, eq. (16): √d·ξ_max·ε (from ‖δ‖₂ ≤ √d‖δ‖∞).
    """
    d = j.shape[1]
    s = _abs_sum_jtj(j)
    xi = _spectral(j)
    thm2 = LiteratureBound(
        "car_thm2_linf", "linf_ball_l2_change", eps * math.sqrt(s), Guarantee.ESTIMATE,
        f"{_CAR}, Theorem 2 (eq. 6)",
        f"sum|P_ij|={s:.6g} with P = J^T J (paper: H H^T, H = J^T); assumes g linear on the box"
        + (_ZERO_J if xi == 0 else ""),
    )
    cor1 = LiteratureBound(
        "car_cor1_linf", "linf_ball_l2_change", math.sqrt(d) * xi * eps, Guarantee.ESTIMATE,
        f"{_CAR}, Corollary 1 (eq. 16, p = inf)",
        f"sqrt(d)={math.sqrt(d):.6g}, xi_max={xi:.6g}; assumes g linear on the box",
    )
    return thm2, cor1


def label_constrained(j_y: torch.Tensor, j_other: torch.Tensor, f_y: float, f_other: float,
                      eps: float, norm: Norm) -> LiteratureBound:
    """[CAR] §4.3 (Proposition 1, eq. 7, problem 8): the bound restricted to perturbations
    that keep the label y against the runner-up y'.

    For an attribution with completeness (Σ_i g^y_i = f_y, e.g. IG with a zero baseline and
    f(0) = 0), the linearised label condition is Mᵀδ < b with
    M = (J_{y'} − J_y)ᵀ 1 (paper: (∇g^{y'} − ∇g^y)Δ, Δ = all ones; our J = Hᵀ) and
    b = f_y(x) − f_{y'}(x) > 0. The linearised objective ‖Jδ‖² is even in δ and the ball is
    symmetric, so of ±δ* at least one satisfies Mᵀδ ≤ 0 < b: the constrained optimum equals
    the unconstrained one (ℓ2: ξ_max ε, Thm 1; ℓ∞: ε·sqrt(Σ|P_ij|), Thm 2) — the paper's
    conclusion, which we reproduce rather than improve. What the variant adds is the check
    and the feasible maximiser (in ``note``), and whether the linearised constraint is
    inactive on the whole ball (ε‖M‖_dual < b). ESTIMATE, like Theorems 1–2.

    Raises ValueError when b ≤ 0 (x is not classified y over y': the constraint set
    would not contain δ = 0).
    """
    b = float(f_y) - float(f_other)
    if not b > 0:
        raise ValueError(f"label constraint needs f_y > f_y' at x (margin b = {b:g}): x is not classified as y")
    m = (j_other.to(torch.float64) - j_y.to(torch.float64)).T @ torch.ones(j_y.shape[0], dtype=torch.float64)
    if norm == "l2":
        xi, v = _top_right_singular(j_y)
        value = xi * eps
        sign = 1.0 if float(m @ (eps * v)) < b else -1.0
        dual = float(m.norm(2))
        src = f"{_CAR}, Sec. 4.3 (Prop. 1 eq. 7, problem 8) with Theorem 1"
        where = f"maximiser {'+' if sign > 0 else '-'}eps*v_max is feasible"
    elif norm == "linf":
        value = eps * math.sqrt(_abs_sum_jtj(j_y))
        dual = float(m.norm(1))
        src = f"{_CAR}, Sec. 4.3 (Prop. 1 eq. 7) with Theorem 2"
        where = "of each corner pair ±c one is feasible"
    else:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    inactive = eps * dual < b
    return LiteratureBound(
        f"car_label_{norm}", "l2_change" if norm == "l2" else "linf_ball_l2_change", value,
        Guarantee.ESTIMATE, src,
        f"margin b={b:.6g}, ||M||_dual={dual:.6g}; {where}; constraint "
        f"{'inactive on the whole ball' if inactive else 'active somewhere on the ball'}; "
        "same value as the unconstrained bound (even objective); assumes completeness and linearity",
    )


def cosine_from_l2(t: float, g_norm: float) -> float:
    """[CAR] Corollary 2, eq. (9): if ‖g(x') − g(x)‖₂ ≤ T ≤ ‖g(x)‖₂ then
    1 − cos(g(x'), g(x)) ≤ 1 − sqrt(1 − T²/‖g(x)‖²). Returns ``math.inf`` when T > ‖g‖
    (the ball around g(x) then contains 0 and any direction is possible: only the trivial
    cosine distance ≤ 2 holds)."""
    if t < 0 or g_norm < 0:
        raise ValueError("T and ||g|| must be non-negative")
    if t > g_norm:
        return math.inf
    if g_norm == 0:
        return 1.0  # T = ||g|| = 0: g' = g = 0, cosine undefined; eq. (9) reads 1 − 0
    r = min(1.0, (t / g_norm) ** 2)
    return 1.0 - math.sqrt(1.0 - r)


def cosine_bound(t: LiteratureBound, g_norm: float) -> LiteratureBound:
    """The cosine-distance bound of a Euclidean bound ``t`` ([CAR] Corollary 2, eq. 9), with
    the SAME guarantee as ``t``.

    Why a sound T gives a sound cosine bound: if ‖g' − g‖ ≤ T < ‖g‖ then g' lies in a ball
    around g that excludes 0, so ⟨g', g⟩ ≥ ‖g‖² − T‖g‖ > 0 (angle θ < 90°) and
    sin θ ≤ T/‖g‖ (the tangent cone of that ball); hence cos θ ≥ sqrt(1 − T²/‖g‖²). This is
    a deterministic implication, attained by the tangent point, so it transfers soundness
    (and is exact given only T)."""
    value = cosine_from_l2(t.value, g_norm) if math.isfinite(t.value) else math.inf
    if t.guarantee == Guarantee.SOUND and math.isfinite(value):
        value = min(2.0, value * (1 + SAFETY_REL))
    note = f"from {t.name} (T={t.value:.6g}), ||g(x)||={g_norm:.6g}"
    if not math.isfinite(value):
        note += "; vacuous: T > ||g(x)|| (cosine distance <= 2 trivially)"
    return LiteratureBound(f"{t.name}_cosine", "cosine_distance", value, t.guarantee,
                           f"{_CAR}, Corollary 2 (eq. 9) applied to {t.source}", note)


def sound_cosine(t: LiteratureBound, g_norm: float) -> LiteratureBound:
    """``cosine_bound`` for a SOUND Euclidean bound (ValueError otherwise): the cosine
    conversion of a sound T is sound (see ``cosine_bound`` for why)."""
    if t.guarantee != Guarantee.SOUND:
        raise ValueError(f"{t.name} is {Guarantee(t.guarantee).value}, not sound")
    return cosine_bound(t, g_norm)


def inverse_radius(j: torch.Tensor, omega: float, norm: Norm, metric: Literal["l2", "cosine"] = "l2",
                   g_norm: float | None = None) -> LiteratureBound:
    """[CAR] Appendix E (problem 47): the largest ε whose first-order bound stays ≤ ω.

    - metric "l2": ε = ω/ξ_max (ℓ2 ball, eq. 49) or ω/sqrt(Σ|P_ij|) (ℓ∞ ball, Theorem 2).
    - metric "cosine": invert eq. (9): 1 − sqrt(1 − T²/‖g‖²) ≤ ω ⟺ T ≤ ‖g‖·sqrt(1 − (1 − ω)²)
      for ω < 1 (T ≤ ‖g‖, the corollary's range, for ω ≥ 1), then ε = T/ξ_max (or /sqrt(Σ|P|)).
      The paper's eqs. (50)–(51) drop the squares (ξε/‖g‖² inside the root, and
      ε ≤ ‖g‖²(1 − (1 − ω)²)/ξ), which does not invert its own eq. (9); we invert eq. (9).
    ESTIMATE (it inherits the linearity assumption). A zero slope gives ``math.inf``.
    """
    if omega < 0:
        raise ValueError(f"omega must be >= 0, got {omega}")
    if norm == "l2":
        slope = _spectral(j)
    elif norm == "linf":
        slope = math.sqrt(_abs_sum_jtj(j))
    else:
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if metric == "l2":
        t_max = omega
        src = f"{_CAR}, Appendix E (eq. 49)" if norm == "l2" else f"{_CAR}, Appendix E with Theorem 2"
    elif metric == "cosine":
        if g_norm is None:
            raise ValueError("metric='cosine' needs g_norm = ||g(x)||")
        t_max = g_norm * (math.sqrt(1.0 - (1.0 - omega) ** 2) if omega < 1 else 1.0)
        src = f"{_CAR}, Appendix E (eq. 50 corrected: inverse of eq. 9)"
    else:
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    eps = math.inf if slope == 0 else t_max / slope
    return LiteratureBound(f"car_radius_{norm}_{metric}", "radius", eps, Guarantee.ESTIMATE, src,
                           f"omega={omega:g}, slope={slope:.6g}, T_max={t_max:.6g}")


# --------------------------------------------------------------------------------------
# [JOO]: cosine robust criterion
# --------------------------------------------------------------------------------------


def joo_cosine_bound(explain: Explain, x: torch.Tensor, delta: torch.Tensor,
                     j: torch.Tensor | None = None, form: Literal["direction", "frobenius"] = "direction"
                     ) -> LiteratureBound:
    """[JOO] Theorem 6 for one perturbation δ = ε δ̂ (ε = ‖δ‖₂, δ̂ = δ/‖δ‖₂ the unit direction):

        Γ(x, εδ̂) = ½(1 − cos(g(x + εδ̂), g(x)))  ≤  ε‖J δ̂‖₂ / ‖g(x + εδ̂)‖₂ + O(ε²)

    (``form="direction"``: step (2) of the proof in Appendix B, the term plotted in Fig. 3b;
    ``form="frobenius"``: the theorem's eq. (3) with ‖J‖_F ≥ ‖J δ̂‖). [JOO] writes it for
    saliency (J = H_g, the Hessian); the proof only uses the Taylor step g(x + εδ̂) =
    g(x) + εJδ̂ + O(ε²), so it holds for any attribution's Jacobian. Returned as a bound on
    the cosine DISTANCE 1 − cos = 2Γ (so it sits beside [CAR]'s eq. 9): 2ε‖Jδ̂‖/‖g(x + εδ̂)‖.
    Exact inequality when g is affine; otherwise an ESTIMATE (O(ε²) dropped). It bounds one
    direction, not the ball.
    """
    x = _one(x).detach()
    delta = delta.reshape(x.shape).to(x.dtype)
    eps = float(delta.norm())
    if eps == 0:
        return LiteratureBound(f"joo_thm6_{form}", "cosine_distance", 0.0, Guarantee.ESTIMATE,
                               f"{_JOO}, Theorem 6", "delta = 0")
    if j is None:
        j = attribution_jacobian(explain, x)
    dhat = (delta / eps).reshape(-1).to(torch.float64)
    with torch.enable_grad():
        gp = explain((x + delta).clone().requires_grad_(True)).detach()
    gp_norm = float(gp.to(torch.float64).norm())
    if form == "direction":
        num = float((j.to(torch.float64) @ dhat).norm())
        src = f"{_JOO}, Theorem 6 (Appendix B proof, step 2)"
    elif form == "frobenius":
        num = float(torch.linalg.matrix_norm(j.to(torch.float64), "fro"))
        src = f"{_JOO}, Theorem 6 (eq. 3)"
    else:
        raise ValueError(f"form must be 'direction' or 'frobenius', got {form!r}")
    value = math.inf if gp_norm == 0 else 2.0 * eps * num / gp_norm
    return LiteratureBound(
        f"joo_thm6_{form}", "cosine_distance", value, Guarantee.ESTIMATE, src,
        f"eps=||delta||_2={eps:.6g}, numerator={num:.6g}, ||g(x+delta)||={gp_norm:.6g}; "
        "Joo's criterion Gamma = half this value; one direction, O(eps^2) dropped",
    )


# --------------------------------------------------------------------------------------
# [DOM]: stochastic Frobenius norm (Hutchinson)
# --------------------------------------------------------------------------------------


def hutchinson_frobenius_sq(explain: Explain, x: torch.Tensor, samples: int, seed: int = 0,
                            batch: int = 256, distribution: Literal["gaussian", "rademacher"] = "gaussian"
                            ) -> tuple[float, float]:
    """[DOM] §3.1: ‖J‖_F² = E_v ‖Jᵀ v‖₂² for v with E[v_i v_j] = δ_ij (Gaussian in the paper).
    Jᵀv = ∇_x (vᵀ g(x)) costs one extra backward pass through the explanation (two in all
    for saliency, as the paper says). Returns (unbiased mean, its standard error) over
    ``samples`` draws. For saliency ‖J‖_F = ‖∇²o‖_F.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    x = _one(x).detach()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    vals = []
    done = 0
    while done < samples:
        b = min(batch, samples - done)
        v = torch.randn((b, *x.shape[1:]), generator=gen, dtype=torch.float64)
        if distribution == "rademacher":
            v = torch.sign(v)
        elif distribution != "gaussian":
            raise ValueError(f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}")
        v = v.to(dtype=x.dtype, device=x.device)
        xs = x.expand(b, *x.shape[1:]).clone().requires_grad_(True)
        with torch.enable_grad():
            s = (explain(xs) * v).sum()
            (jtv,) = torch.autograd.grad(s, xs, allow_unused=True)
        if jtv is None:
            jtv = torch.zeros_like(xs)
        vals.append(jtv.detach().reshape(b, -1).to(torch.float64).pow(2).sum(1))
        done += b
    allv = torch.cat(vals)
    mean = float(allv.mean())
    se = float(allv.std(unbiased=True) / math.sqrt(samples)) if samples > 1 else math.inf
    return mean, se


def hutchinson_frobenius(explain: Explain, x: torch.Tensor, samples: int = 256, seed: int = 0,
                         batch: int = 256) -> LiteratureBound:
    """[DOM] §3.1 stochastic estimate of ‖J(x)‖_F (= ‖∇²o(x)‖_F for saliency): the square
    root of ``hutchinson_frobenius_sq`` (biased low by Jensen; the square is unbiased).
    ESTIMATE, and at the point x only."""
    mean, se = hutchinson_frobenius_sq(explain, x, samples, seed, batch)
    return LiteratureBound(
        "dom_hutchinson", "hessian_frobenius", math.sqrt(max(mean, 0.0)), Guarantee.ESTIMATE,
        f"{_DOM}, Sec. 3.1 (stochastic Frobenius norm)",
        f"||J||_F^2 ~= {mean:.6g} +- {se:.2g} (std. error, {samples} Gaussian samples, seed {seed}); at x only",
    )


# --------------------------------------------------------------------------------------
# sound variants: a bound on J over the whole box
# --------------------------------------------------------------------------------------


def _jacobian_box(jb: Bounds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, C, R) in float64 from jb of shape (d, d) or (1, d, d): M = max(|l|, |u|),
    C the centre, R the radius."""
    lo, up = jb.lower, jb.upper
    if lo.dim() == 3 and lo.shape[0] == 1:
        lo, up = lo[0], up[0]
    if lo.dim() != 2:
        raise ValueError(f"jb must have shape (d, d) or (1, d, d), got {tuple(jb.shape)}")
    lo, up = lo.detach().to(torch.float64), up.detach().to(torch.float64)
    m = torch.maximum(lo.abs(), up.abs())
    return m, (lo + up) / 2, (up - lo) / 2


def _spectral_upper(a: torch.Tensor) -> float:
    """An upper bound on ‖A‖₂: min(SVD value, ‖A‖_F, sqrt(‖A‖₁‖A‖∞)); all three are ≥ ‖A‖₂
    (the SVD up to rounding, covered by SAFETY_REL)."""
    a = a.to(torch.float64)
    fro = float(torch.linalg.matrix_norm(a, "fro"))
    holder = math.sqrt(float(a.abs().sum(0).max()) * float(a.abs().sum(1).max())) if a.numel() else 0.0
    return min(_spectral(a), fro, holder)


def sound_l2(jb: Bounds, radius_l2: float) -> LiteratureBound:
    """SOUND bound on ‖g(x') − g(x)‖₂ for ‖x' − x‖₂ ≤ r, given jb ∋ J(z) (J_ij = ∂g_i/∂x_j)
    for every z of a convex set containing the ℓ2 ball (e.g. the box [x − r, x + r]).

    Mean value theorem: g(x + δ) − g(x) = J̄δ with J̄ = ∫₀¹ J(x + tδ) dt, and every entry of
    J̄ is an average of values in [l_ij, u_ij], so J̄ ∈ jb. Then ‖J̄δ‖ ≤ ‖J̄‖₂ r with
    ‖J̄‖₂ ≤ ‖M‖₂ (0 ≤ |J̄| ≤ M entrywise, and ‖A‖₂ ≤ ‖|A|‖₂ ≤ ‖M‖₂ — the spectral norm is
    monotone on non-negative matrices) and ‖J̄‖₂ ≤ ‖C‖₂ + ‖R‖₂ (|J̄ − C| ≤ R). The min of the
    two is returned: [CAR] Theorem 1 (eq. 5) with ξ_max replaced by a bound over the box.

    Precondition: g is continuously differentiable on the box (smooth activations). The
    saliency of a ReLU network jumps where a neuron switches while its Jacobian is 0 almost
    everywhere: the mean value theorem fails and a Jacobian box proves nothing about it.
    """
    m, c, r = _jacobian_box(jb)
    via_m = _spectral_upper(m)
    via_cr = _spectral_upper(c) + _spectral_upper(r)
    value = radius_l2 * min(via_m, via_cr) * (1 + SAFETY_REL)
    return LiteratureBound(
        "sound_l2", "l2_change", value, Guarantee.SOUND,
        f"{_CAR}, Theorem 1 (eq. 5) with a Jacobian bound over the box (mean value theorem)",
        f"||M||_2<={via_m:.6g}, ||C||_2+||R||_2<={via_cr:.6g}, r={radius_l2:g}",
    )


def sound_linf(jb: Bounds, eps: float | torch.Tensor) -> LiteratureBound:
    """SOUND bound on ‖g(x') − g(x)‖₂ over the box |x'_j − x_j| ≤ e_j (e = ε·1 or a tensor of
    per-coordinate radii, e.g. a box clipped to the input domain), given jb ∋ J(z) on it.

    With g(x + δ) − g(x) = J̄δ, J̄ ∈ jb (see ``sound_l2``):
    |(J̄δ)_i| ≤ Σ_j M_ij e_j, so ‖J̄δ‖₂ ≤ ‖M e‖₂ = sqrt(eᵀ(MᵀM)e) — for e = ε1 that is
    ε·sqrt(Σ_ij (MᵀM)_ij), [CAR] Theorem 2 (eq. 6) with P = MᵀM ≥ 0 (orientation as in
    ``first_order_linf``; M Mᵀ would sum column sums instead of row sums and is wrong).
    Also ‖J̄δ‖ ≤ ‖Cδ‖ + ‖(J̄ − C)δ‖ ≤ min(sqrt(Σ|CᵀC|_jk e_j e_k), ‖C‖₂‖e‖₂) + ‖R e‖₂, exact
    inequalities (δᵀCᵀCδ ≤ Σ|CᵀC|_jk e_j e_k). The min of the two is returned.
    Same precondition as ``sound_l2``: g continuously differentiable on the box.
    """
    m, c, r = _jacobian_box(jb)
    d = m.shape[1]
    e = torch.full((d,), float(eps), dtype=torch.float64) if not torch.is_tensor(eps) \
        else eps.detach().reshape(-1).to(torch.float64)
    if e.shape != (d,) or bool((e < 0).any()):
        raise ValueError(f"eps must be a non-negative float or a tensor of {d} radii")
    via_m = float((m @ e).norm())
    via_c = min(math.sqrt(max(_abs_sum_jtj(c, e), 0.0)), _spectral_upper(c) * float(e.norm()))
    via_cr = via_c + float((r @ e).norm())
    value = min(via_m, via_cr) * (1 + SAFETY_REL)
    return LiteratureBound(
        "sound_linf", "linf_ball_l2_change", value, Guarantee.SOUND,
        f"{_CAR}, Theorem 2 (eq. 6) with a Jacobian bound over the box (mean value theorem)",
        f"||M e||_2={via_m:.6g}, centre+radius={via_cr:.6g}",
    )


def certified_radius(check: Callable[[float], bool], eps_max: float, tol: float = 1e-4,
                     max_iter: int = 50) -> float:
    """The largest ε found by bisection on [0, eps_max] for which ``check(ε)`` returned True
    (0.0 if it never did). ``check(ε)`` must be a SOUND certificate for the ε-ball/box
    (e.g. ``sound_linf(jb(ε), ε).value <= ω`` with jb computed over that box).

    Sound even if ``check`` is not monotone (relaxations need not be: a looser box can
    happen to certify while a smaller one fails): the returned ε is one at which ``check``
    itself certified, and the boxes are nested, so the certificate at ε also covers every
    smaller radius. Non-monotonicity can only make the search miss a larger certifiable ε,
    never return an uncertified one. Stops when the bracket is narrower than ``tol`` or
    after ``max_iter`` calls of ``check``.
    """
    if not eps_max > 0 or not tol > 0 or max_iter < 1:
        raise ValueError("need eps_max > 0, tol > 0 and max_iter >= 1")
    if check(eps_max):
        return float(eps_max)
    best, lo, hi = 0.0, 0.0, float(eps_max)
    for _ in range(max_iter - 1):
        if hi - lo <= tol:
            break
        mid = (lo + hi) / 2
        if check(mid):
            best, lo = mid, mid
        else:
            hi = mid
    return best


# --------------------------------------------------------------------------------------
# [DOM] Theorem 1: global weight-norm bound on the Hessian
# --------------------------------------------------------------------------------------


def activation_sigma(layer: Activation) -> tuple[float, float]:
    """(Σ1, Σ2) = (sup|σ'|, sup|σ''|), [DOM] eq. (7).

    softplus_β: σ' = sigmoid(βz) < 1, σ'' = β s(1 − s) ≤ β/4 ([DOM] eq. 10);
    sigmoid: σ' = s(1 − s) ≤ 1/4, |σ''| = |s(1 − s)(1 − 2s)| ≤ √3/18 (at s = (3 ± √3)/6);
    tanh: σ' = 1 − t² ≤ 1, |σ''| = 2|t|(1 − t²) ≤ 4√3/9 (at t = 1/√3);
    leaky_relu with slope 1 is the identity (1, 0). ReLU / leaky ReLU: σ'' is a Dirac delta
    (not bounded): ValueError — Theorem 1 needs a twice-differentiable σ.
    """
    if layer.kind == ActKind.LEAKY_RELU and layer.param == 1.0:
        return 1.0, 0.0
    if layer.piecewise_linear:
        raise ValueError(
            f"layer {layer.name!r}: {layer.kind.value} is not twice differentiable (sigma'' is a Dirac delta at 0); "
            "Dombrowski et al.'s Theorem 1 needs smooth activations (use softplus, sigmoid or tanh)"
        )
    return layer.derivative_sup(), layer.second_derivative_sup()


@dataclass(frozen=True)
class _AffineNorms:
    spec: float  # ≥ ‖A‖₂
    fro: float  # ‖A‖_F
    rho: float  # sqrt(Σ_i ‖a_i‖⁴) over the rows a_i of A
    row_norms: torch.Tensor  # ‖a_i‖₂ per output (flattened)


_EXPLICIT_CONV_ENTRIES = 4_000_000  # unfold a conv into a dense matrix (exact SVD) below this


def _affine_norms(layer: Linear | Conv2d, in_shape: tuple[int, ...]) -> _AffineNorms:
    """Norms of the linear part A of an affine layer as a matrix on the flattened input.

    Linear: from W. Conv2d (zero padding, stride): row norms exactly from conv2d(1, K²)
    (row (o, p) holds the kernel entries that fall inside the image); ‖A‖₂ bounded by
    min over: the exact SVD of the unfolded matrix (small layers), the circulant bound
    max_ω ‖K̂(ω)‖₂ (the padded conv is a restriction of a circular conv on an n×n grid with
    n ≥ H + 2p — no wrap-around for valid outputs — and a stride subsamples rows, so
    ‖A‖₂ ≤ ‖circ‖₂ = max over the n² DFT frequencies of the C_out×C_in symbol's norm,
    Sedghi et al. 2019), ‖A‖_F and sqrt(‖A‖₁‖A‖∞) (exact abs column/row sums by convolving
    ones with |K|)."""
    if isinstance(layer, Linear):
        w = layer.weight.detach().to(torch.float64)
        rn = w.norm(dim=1)
        return _AffineNorms(_spectral(w), float(rn.norm()), float(rn.pow(2).norm()), rn)
    k = layer.weight.detach().to(torch.float64)
    c, h, wd = in_shape
    ones = torch.ones(1, c, h, wd, dtype=torch.float64)
    rn2 = F.conv2d(ones, k * k, None, layer.stride, layer.padding).reshape(-1)
    rn = rn2.clamp_min(0).sqrt()
    fro = float(rn.norm())
    rho = float(rn2.norm())
    out_numel = rn.numel()
    in_numel = c * h * wd
    bounds = [fro]
    row_abs = F.conv2d(ones, k.abs(), None, layer.stride, layer.padding)
    col_abs = F.conv_transpose2d(torch.ones_like(row_abs), k.abs(), None, layer.stride, 0,
                                 layer.output_padding(in_shape))
    # crop the padding: columns of padded positions are not inputs
    ph, pw = layer.padding
    col_abs = col_abs[:, :, ph:ph + h, pw:pw + wd]
    bounds.append(math.sqrt(float(row_abs.max()) * float(col_abs.max())))
    n_h = h + 2 * layer.padding[0]
    n_w = wd + 2 * layer.padding[1]
    sym = torch.fft.fft2(k, s=(n_h, n_w))  # (O, I, n_h, n_w)
    bounds.append(float(torch.linalg.matrix_norm(sym.permute(2, 3, 0, 1), ord=2).max()))
    if in_numel * max(out_numel, in_numel) <= _EXPLICIT_CONV_ENTRIES:
        eye = torch.eye(in_numel, dtype=torch.float64).reshape(in_numel, c, h, wd)
        a_t = F.conv2d(eye, k, None, layer.stride, layer.padding).reshape(in_numel, -1)
        bounds.append(_spectral(a_t))
    return _AffineNorms(min(bounds), fro, rho, rn)


def weight_norm_hessian_bound(net: Network, output: Output = Output.LOGIT, target: int | None = None,
                              norms: Literal["frobenius", "spectral"] = "frobenius") -> LiteratureBound:
    """[DOM] Theorem 1 (eq. 8, proof Appendix A eqs. 16–19): a GLOBAL bound H* ≥ ‖∇²_x o(x)‖_F
    for every x, from the weights alone. SOUND (for smooth activations).

    What the theorem states: g : R^N → R a fully-connected net whose every layer, the last
    included, is σ(W⁽ˡ⁾·) (no output layer without σ, biases irrelevant), the same σ with
    |σ'| ≤ Σ1, |σ''| ≤ Σ2, Frobenius norms of the weights:
        ‖H(g)‖_F ≤ Σ_{m=1}^{L} (Π_{l≤m} ‖W⁽ˡ⁾‖_F²)(Π_{l>m} ‖W⁽ˡ⁾‖_F) Σ1^{L+m−2} Σ2.
    It is about a scalar network output, not a loss. Our networks end in an affine logit
    layer without σ, may mix activations, convolutions and reshapes; we therefore run the
    recursion of the proof layer by layer, tracking j ≥ ‖∂a/∂x‖₂, t ≥ ‖∂²a/∂x²‖_F (a
    3-tensor) and q ≥ sqrt(Σ_i ‖∂z_i/∂x‖⁴):
        affine z = A a + b:  j ← ‖A‖ j,  t ← ‖A‖ t,  q ← ρ(A) j²
        σ:                   j ← Σ1 j,  t ← Σ2 q + Σ1 t,  q ← Σ1² q
    (from ∂²a_i = σ''(z_i) ∇z_i ∇z_iᵀ + σ'(z_i) ∂²z_i and ‖∇z_i‖ ≤ ‖a_i‖ j), starting from
    j = 1, t = 0, q = √N. ``norms="frobenius"`` uses ‖A‖ = ‖A‖_F and ρ(A) = ‖A‖_F², which for
    a chain of K activated layers and a logit row w_c reproduces eq. (8) over those K
    layers times ‖w_c‖ (exponent Σ1^{K+m−2}); ``norms="spectral"`` uses ‖A‖₂ and
    ρ(A) = sqrt(Σ_i ‖a_i‖⁴) (≤ the former, also sound). Applying eq. (8) literally with the
    logit layer counted as an activated layer would overcount when Σ1 ≥ 1 and UNDERcount
    for sigmoid (Σ1 = 1/4 < 1 = the identity's slope), which is why we do not.

    output LOGIT: o = z_c, ‖∇²o‖_F ≤ ‖w_c‖ t (``target`` None: the max over classes).
    output LOSS (our extension, not in [DOM]): o = CE(z, c), ∇²o = J_zᵀ(diag p − ppᵀ)J_z +
    Σ_k (p − e_c)_k ∇²z_k with ‖diag p − ppᵀ‖₂ ≤ 1/2 (Gershgorin) and ‖p − e_c‖₂ ≤ √2:
    ‖∇²o‖_F ≤ ½‖A_L‖‖A_L‖_F j² + √2‖A_L‖ t (A_L the logit layer), for every class.
    Raises ValueError for ReLU / leaky ReLU networks (see ``activation_sigma``).
    """
    output = Output(output)
    if norms not in ("frobenius", "spectral"):
        raise ValueError(f"norms must be 'frobenius' or 'spectral', got {norms!r}")
    if output == Output.PROBABILITY:
        raise ValueError("[DOM] Theorem 1 is implemented for o = z_c and the cross-entropy loss, not the probability")
    net.require_chain("literature (weight-norm Hessian bound)")
    for layer in net.layers:  # refuse before any work
        if isinstance(layer, Activation):
            activation_sigma(layer)
    layers = net.layers
    n_in = math.prod(net.input_shape)
    j, t, q = 1.0, 0.0, math.sqrt(n_in)
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, (Linear, Conv2d)):
            nm = _affine_norms(layer, net.shapes[i])
            op = nm.spec if norms == "spectral" else nm.fro
            rho = nm.rho if norms == "spectral" else nm.fro ** 2
            q = rho * j * j
            j, t = op * j, op * t
        elif isinstance(layer, Activation):
            s1, s2 = activation_sigma(layer)
            t = s2 * q + s1 * t
            j, q = s1 * j, s1 * s1 * q
        elif isinstance(layer, Reshape):
            continue
        else:  # pragma: no cover - Network only holds the four kinds
            raise ValueError(f"unsupported layer {type(layer).__name__}")
    last = layers[-1]
    assert isinstance(last, (Linear, Conv2d))  # require_chain: the logits come from an affine layer
    nm = _affine_norms(last, net.shapes[-2])
    op = nm.spec if norms == "spectral" else nm.fro
    if output == Output.LOGIT:
        rows = nm.row_norms
        if target is not None:
            if not 0 <= int(target) < rows.numel():
                raise ValueError(f"target class {target} out of range for {rows.numel()} classes")
            w_c = float(rows[int(target)])
        else:
            w_c = float(rows.max())
        value = w_c * t
        detail = f"||w_c||={w_c:.6g}, t={t:.6g}"
    else:
        value = 0.5 * op * nm.fro * j * j + math.sqrt(2.0) * op * t
        detail = f"j={j:.6g}, t={t:.6g}, ||A_L||={op:.6g}"
    value *= 1 + SAFETY_REL
    return LiteratureBound(
        f"dom_thm1_{norms}", "hessian_frobenius", value, Guarantee.SOUND,
        f"{_DOM}, Theorem 1 (eq. 8; recursion of Appendix A)",
        f"global over all inputs; {output.value} output, class "
        f"{'max over classes' if target is None or output == Output.LOSS else target}; {norms} weight norms; {detail}",
    )


def hessian_change_bound(h_star: LiteratureBound, radius_l2: float, quantity: str = "l2_change") -> LiteratureBound:
    """[DOM] eq. (5) on the straight path: ‖∇o(x') − ∇o(x)‖₂ ≤ sup‖∇²o‖_F·‖x' − x‖₂
    (‖H‖₂ ≤ ‖H‖_F). With a global H* (Theorem 1) this is SOUND for the saliency of the
    same output; with a point estimate (Hutchinson, or ‖J(x)‖_F) it is an ESTIMATE. Pass
    radius_l2 = ε√d for an ℓ∞ ball of radius ε (the ball's ℓ2 diameter/2), with
    quantity "linf_ball_l2_change"."""
    value = h_star.value * radius_l2
    if h_star.guarantee == Guarantee.SOUND:
        value *= 1 + SAFETY_REL
    return LiteratureBound(f"{h_star.name}_change", quantity, value, h_star.guarantee,
                           f"{_DOM}, eq. (5) with {h_star.source}",
                           f"H*={h_star.value:.6g} x path length {radius_l2:.6g}")


# --------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------


def all_bounds(
    explain: Explain,
    x: torch.Tensor,
    eps: float,
    norm: Norm = "linf",
    jb: Bounds | None = None,
    *,
    net: Network | None = None,
    target: int | None = None,
    output: Output = Output.LOGIT,
    omega: float | None = None,
    label_constraint: tuple[Explain, float] | None = None,
    hutchinson_samples: int = 256,
    seed: int = 0,
) -> list[LiteratureBound]:
    """Every applicable literature bound for one input x (shape (1, *S)) and ball radius
    ``eps`` in ``norm``, side by side, each with its guarantee.

    - always (ESTIMATE, from the point Jacobian): [CAR] Thm 1 (l2) or Thm 2 and Cor. 1
      (linf), each with its cosine conversion (eq. 9); [JOO] Thm 6 at the worst first-order
      direction (l2: ε v_max; linf: the corner ε·sign(v_max)); the exact ‖J(x)‖_F and the
      Hutchinson estimate of it ([DOM] §3.1); with ``omega``: [CAR] App. E radii.
    - ``label_constraint`` = (explanation for the runner-up class y', margin
      f_y(x) − f_{y'}(x)): [CAR] §4.3.
    - ``jb`` (bounds on J over the box): ``sound_l2`` / ``sound_linf`` and their cosine
      conversions (SOUND).
    - ``net`` (+ ``target``): [DOM] Theorem 1 for ``net``'s ``output`` (both weight norms;
      SOUND; left out for ReLU / leaky ReLU nets, where it does not apply), and, if
      ``explain(x)`` is the saliency of that output (checked at x), the SOUND change bound
      eq. (5) and its cosine conversion.

    For ReLU networks J(x) = 0 almost everywhere, so every first-order estimate is 0 (the
    reason [CAR] and [DOM] switch to softplus); they say nothing there.
    """
    x = _one(x).detach()
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    out: list[LiteratureBound] = []
    with torch.enable_grad():
        g = explain(x.clone().requires_grad_(True)).detach()
    g_norm = float(g.to(torch.float64).norm())
    j = attribution_jacobian(explain, x)
    d = j.shape[1]
    quantity = "l2_change" if norm == "l2" else "linf_ball_l2_change"
    radius_l2 = eps if norm == "l2" else eps * math.sqrt(d)

    if norm == "l2":
        first = [first_order_l2(j, eps)]
    else:
        first = list(first_order_linf(j, eps))
    for b in first:
        out += [b, cosine_bound(b, g_norm)]

    if label_constraint is not None:
        explain_other, margin = label_constraint
        j_other = attribution_jacobian(explain_other, x)
        # f_y − f_y' is only needed as the margin; pass f_y = margin, f_y' = 0
        out.append(label_constrained(j, j_other, margin, 0.0, eps, norm))

    _, v = _top_right_singular(j)
    direction = v if norm == "l2" else torch.sign(v) + (v == 0).to(v.dtype)
    delta = (eps * (direction if norm == "linf" else direction / direction.norm())).to(x.dtype).reshape(x.shape)
    out.append(joo_cosine_bound(explain, x, delta, j=j, form="direction"))

    jf = float(torch.linalg.matrix_norm(j.to(torch.float64), "fro"))
    point_fro = LiteratureBound("jacobian_frobenius_at_x", "hessian_frobenius", jf, Guarantee.ESTIMATE,
                                f"{_DOM}, Sec. 3.1 (exact value of the estimated quantity)",
                                "exact ||J(x)||_F at x by autograd; not a bound over the ball")
    out.append(point_fro)
    out.append(hutchinson_frobenius(explain, x, hutchinson_samples, seed))
    est_change = hessian_change_bound(point_fro, radius_l2, quantity)
    out += [est_change, cosine_bound(est_change, g_norm)]

    if omega is not None:
        out.append(inverse_radius(j, omega, norm, "l2"))
        out.append(inverse_radius(j, omega, norm, "cosine", g_norm))

    if jb is not None:
        sb = sound_l2(jb, eps) if norm == "l2" else sound_linf(jb, eps)
        out += [sb, cosine_bound(sb, g_norm)]

    if net is not None:
        try:
            dom = [weight_norm_hessian_bound(net, output, target, n) for n in ("frobenius", "spectral")]
        except (ValueError, EngineUnsupported):
            dom = []  # ReLU / leaky ReLU, or a graph that is not a chain: Theorem 1 does not apply
        out += dom
        if dom and target is not None:
            ref = saliency(net, x, torch.tensor([int(target)], device=x.device), output)
            tol = 1e-6 * (1.0 + float(ref.abs().max()))
            if bool(((ref - g).abs() <= tol).all()):
                best = min(dom, key=lambda b: b.value)
                ch = hessian_change_bound(best, radius_l2, quantity)
                out += [ch, cosine_bound(ch, g_norm)]
    return out
