"""Gradient sets as zonotopes in the first hidden layer, and the property bounds they give.

When the input gradient of a network is g = Jᵀy, with J the Jacobian (n × N) of the affine
chain from the input to the first sign node's input and y the gradient at that node's input
(the first pre-activations), every bound on y that keeps its coordinates correlated carries
over to g without the |J|ᵀ of a coordinatewise map. A neuron-split domain's symbolic pass
(:func:`verigrad.bounds.bab._symbolic_grad`) ends with y between linear forms in δ ∈ [0, 1]^V,
the relaxed f′ of the basis neurons: y = m(δ) + e, |e| ≤ r(δ). With ξ = 2δ − 1 that set lies in

    Z = { c + Γξ + diag(ρ)·η : ξ ∈ [−1, 1]^V, η ∈ [−1, 1]^n },   ρ = max_δ r(δ),

a zonotope with V shared generators (the columns of Γ) and one private generator per neuron.
Linear functionals of g are then bounded exactly over Z (a·g = (Ja)·y), and quadratic ones
(‖g‖², ‖t·g − â‖²) by their centre value, the exact maximum of their linear part, and the
absolute sum of the Gram matrix (Γ, diag ρ)ᵀ K (Γ, diag ρ), K = J Jᵀ, for the quadratic part:
second order in the generators, where a coordinatewise map loses first-order terms. The
cosine's ball bound: if every t·g (t > 0) lies in the ball about the unit vector â of radius
ρ_t < 1, the ball excludes 0 and every g makes an angle θ with â of sin θ ≤ ρ_t.

Rounding: the computed (c, Γ, ρ) define an exact zonotope Z̃, and the caller's allowance E
(per input coordinate) covers the pass's round-off: the exact gradient lies in JᵀZ̃ ⊕ [−E, E].
Each bound below is a nested sum of products whose absolute evaluation is at most S (the same
expression with every term replaced by its magnitude), so it is moved outward by γ_n·S
(Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1) with n the total number of
roundings along the nesting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from verigrad.bounds.rounding import gamma


@dataclass(frozen=True)
class Lift:
    """The first affine chain as a dense matrix: J (n, N), K = J Jᵀ and |K| (float64)."""

    jac: torch.Tensor
    gram: torch.Tensor
    abs_gram: torch.Tensor
    abs_jac: torch.Tensor

    @staticmethod
    def of(jac: torch.Tensor) -> "Lift":
        j = jac.to(torch.float64)
        k = j @ j.T
        return Lift(j, k, k.abs(), j.abs())


@dataclass(frozen=True)
class GradZonotope:
    """Input gradients g ∈ Jᵀ Z ⊕ [−E, E] of D domains; Z as in the module docstring:
    ``centre`` (D, n), ``gens`` (D, V, n), ``rad`` (D, n) ≥ 0, ``allow`` E (D, N) ≥ 0."""

    centre: torch.Tensor
    gens: torch.Tensor
    rad: torch.Tensor
    allow: torch.Tensor
    lift: Lift

    @staticmethod
    def from_forms(mid: torch.Tensor, rad: torch.Tensor, allow: torch.Tensor, lift: Lift) -> "GradZonotope":
        """From forms y ∈ [m(δ) − r(δ), m(δ) + r(δ)] (``mid`` (D, K, n), ``rad`` (D, Kr, n): slice 0
        the constant, slice k the coefficient of δ_k ∈ [0, 1]): m(δ) = c + Σ_k ξ_k·mid_k/2 with
        c = mid_0 + Σ_k mid_k/2, and r(δ) ≤ r_0 + Σ_k max(0, r_k)."""
        d = mid.shape[0]
        m = mid.reshape(d, mid.shape[1], -1).to(torch.float64)
        r = rad.reshape(d, rad.shape[1], -1).to(torch.float64)
        half = m[:, 1:] / 2
        centre = m[:, 0] + half.sum(1)
        rho = (r[:, 0] + r[:, 1:].clamp(min=0).sum(1)).clamp(min=0)
        # the computed c and ρ define Z̃ exactly; their own sums' round-off goes into ρ
        n_sum = mid.shape[1] + rad.shape[1] + 2
        rho = rho + gamma(n_sum, torch.float64) * (m[:, 0].abs() + half.abs().sum(1) + r.abs().sum(1))
        keep = half.abs().amax((0, 2)) > 0  # drop generators no domain of the batch uses
        return GradZonotope(centre, half[:, keep], rho, allow.reshape(d, -1).to(torch.float64), lift)

    def widened(self, extra: torch.Tensor) -> "GradZonotope":
        """The same set ⊕ [−extra, extra] per input coordinate (``extra`` (D, *S) ≥ 0)."""
        return replace(self, allow=self.allow + extra.reshape(self.allow.shape).to(self.allow))

    def __len__(self) -> int:
        return self.centre.shape[0]

    def _gamma(self) -> float:
        n_in, n = self.lift.jac.shape[1], self.lift.jac.shape[0]
        v = self.gens.shape[1]
        return gamma(4 * (n_in + n) + v * v + 64, torch.float64)

    def _reach(self) -> torch.Tensor:
        """|J|ᵀ(|c| + Σ_k |Γ_k| + ρ) + E (D, N): a bound on |g| used for the magnitudes S."""
        a = self.centre.abs() + self.gens.abs().sum(1) + self.rad
        return a @ self.lift.abs_jac + self.allow

    def dot_lower(self, a: torch.Tensor) -> torch.Tensor:
        """min over the set of a·g for a (D, N) or (N,): (Ja)·c − Σ_k |(Ja)·Γ_k| − |Ja|·ρ − |a|·E."""
        a = a.to(torch.float64).expand(len(self), -1)
        ja = a @ self.lift.jac.T  # (D, n)
        val = ((ja * self.centre).sum(1) - (self.gens @ ja.unsqueeze(2)).squeeze(2).abs().sum(1)
               - (ja.abs() * self.rad).sum(1) - (a.abs() * self.allow).sum(1))
        mag = (a.abs() * self._reach()).sum(1)
        return val - 4 * self._gamma() * mag

    def _quadratic(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ΓK (D, V, n), Kc (D, n), Q (D,)): Q ≥ max over ξ, η of the quadratic part
        wᵀKw, w = Γξ + ρ⊙η: Σ_kl |Γ_kᵀKΓ_l| + 2 Σ_k Σ_j |(Γ_kᵀK)_j| ρ_j + ρᵀ|K|ρ."""
        gk = self.gens @ self.lift.gram  # (D, V, n)
        q = ((gk @ self.gens.transpose(1, 2)).abs().sum((1, 2)) + 2 * (gk.abs() * self.rad.unsqueeze(1)).sum((1, 2))
             + ((self.rad @ self.lift.abs_gram) * self.rad).sum(1))
        return gk, self.centre @ self.lift.gram, q

    def norm_upper(self) -> torch.Tensor:
        """max ‖g‖ ≤ √(cᵀKc + 2 Σ_k |Γ_kᵀKc| + 2 |Kc|·ρ + Q) + ‖E‖."""
        gk, kc, q = self._quadratic()
        sq = ((self.centre * kc).sum(1) + 2 * (gk * self.centre.unsqueeze(1)).sum(2).abs().sum(1)
              + 2 * (kc.abs() * self.rad).sum(1) + q)
        sq = sq.clamp(min=0) + 8 * self._gamma() * self._reach().pow(2).sum(1)
        return sq.sqrt() * (1 + 4 * 2.0 ** -52) + self.allow.norm(dim=1)

    def cos_lower(self, a: torch.Tensor, iterations: int = 30) -> torch.Tensor:
        """A lower bound (D,) of min over the set of cos(a, g), a (N,) ≠ 0; the max of

        ratio: s / (‖a‖·n_hi) with s = :meth:`dot_lower` (when s ≥ 0) and n_hi = :meth:`norm_upper`;
        ball: for any t > 0 with ρ_t < 1, cos ≥ √(1 − ρ_t²), where ρ_t ≥ max ‖t·g − â‖ is
          √(‖u‖² + 2t(Σ_k |(Ju)·Γ_k| + |Ju|·ρ) + t²Q) + t‖E‖ with u = t·Jᵀc − â
          (t chosen by golden-section search; every t is sound). −1 where neither applies."""
        a = a.to(torch.float64).reshape(-1)
        na = a.norm()
        if not bool(na > 0):
            return torch.full((len(self),), -1.0, dtype=torch.float64, device=a.device)
        ahat = a / na
        s = self.dot_lower(a)
        n_hi = self.norm_upper()
        ratio = torch.where((s >= 0) & (n_hi > 0), s / (na * n_hi) * (1 - 4 * 2.0 ** -52),
                            torch.full_like(s, -1.0))
        lift = self.lift
        gk, kc, q = self._quadratic()
        g0 = self.centre @ lift.jac  # (D, N): Jᵀc
        ja = lift.jac @ ahat  # (n,)
        gen_ja = self.gens @ ja  # (D, V): Γ_k·Jâ
        gen_kc = (gk * self.centre.unsqueeze(1)).sum(2)  # (D, V): Γ_kᵀKc
        e_norm = self.allow.norm(dim=1)
        reach = self._reach()
        gam = self._gamma()

        def radius(t: torch.Tensor) -> torch.Tensor:  # t (D,) → ρ_t
            tt = t.unsqueeze(1)
            u = tt * g0 - ahat
            ju = tt * kc - ja  # J u = t·Kc − Jâ
            lin = (tt * gen_kc - gen_ja).abs().sum(1) + (ju.abs() * self.rad).sum(1)
            sq = (u * u).sum(1) + 2 * t * lin + t * t * q
            mag = (tt * reach + ahat.abs()).pow(2).sum(1)
            return (sq.clamp(min=0) + 8 * gam * mag).sqrt() * (1 + 4 * 2.0 ** -52) + t * e_norm

        g2 = (g0 * g0).sum(1)
        t0 = torch.where(g2 > 0, (g0 @ ahat).clamp(min=0) / torch.where(g2 > 0, g2, torch.ones_like(g2)),
                         torch.zeros_like(g2))
        lo_t, hi_t = 0.25 * t0, 1.5 * t0
        r = (math.sqrt(5.0) - 1.0) / 2.0
        x1, x2 = hi_t - r * (hi_t - lo_t), lo_t + r * (hi_t - lo_t)
        f1, f2 = radius(x1), radius(x2)
        for _ in range(iterations):
            left = f1 <= f2
            lo_t, hi_t = torch.where(left, lo_t, x1), torch.where(left, x2, hi_t)
            new = torch.where(left, hi_t - r * (hi_t - lo_t), lo_t + r * (hi_t - lo_t))
            fn = radius(new)
            x1, x2, f1, f2 = (torch.where(left, new, x2), torch.where(left, x1, new),
                              torch.where(left, fn, f2), torch.where(left, f1, fn))
        t = (lo_t + hi_t) / 2
        rho_t = radius(t)
        ok = (t > 0) & (rho_t < 1)
        # 2⁻⁴⁸ covers the roundings of 1 − ρ² and of the square root
        ball = torch.where(ok, (1 - rho_t.clamp(max=1) ** 2).clamp(min=0).sqrt() - 2.0 ** -48,
                           torch.full_like(rho_t, -1.0))
        return torch.maximum(ratio, ball).clamp(-1.0, 1.0)
