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
    """The first affine chain as a dense matrix: J (n, N), |J|, |K| with K = J Jᵀ (float64), and
    K itself where multiplying by it is cheaper than by J and Jᵀ in turn (n ≤ 2N; else None)."""

    jac: torch.Tensor
    gram: torch.Tensor | None
    abs_gram: torch.Tensor
    abs_jac: torch.Tensor

    @staticmethod
    def of(jac: torch.Tensor) -> "Lift":
        j = jac.to(torch.float64)
        k = j @ j.T
        return Lift(j, k if j.shape[0] <= 2 * j.shape[1] else None, k.abs(), j.abs())

    def gram_mul(self, x: torch.Tensor) -> torch.Tensor:
        """x K for x (..., n): one product with K, or (x J) Jᵀ (a conv layer's n = 4N); the
        rounding magnitudes (:meth:`GradZonotope._reach`) are through |J| either way."""
        if self.gram is not None:
            return x @ self.gram
        return (x @ self.jac) @ self.jac.T


def _box_extra(gens: torch.Tensor, rad: torch.Tensor, max_gens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``max_gens`` generators of largest ℓ1 norm (the batch's max) and box the rest:
    Σ_k ξ_k Γ_k ∈ [−Σ_k |Γ_k|, Σ_k |Γ_k|] per coordinate goes into ρ (order reduction, sound;
    it loses only the dropped generators' correlation). The sum is rounded up by 2γ_{V+1}."""
    v = gens.shape[1]
    if v <= max_gens:
        return gens, rad
    keep = gens.abs().sum(2).amax(0).topk(max_gens).indices
    drop = torch.ones(v, dtype=torch.bool, device=gens.device)
    drop[keep] = False
    rad = (rad + gens[:, drop].abs().sum(1)) * (1 + 2 * gamma(v + 1, torch.float64))
    return gens[:, keep], rad


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
    def from_forms(mid: torch.Tensor, rad: torch.Tensor, lift: Lift, max_gens: int) -> "GradZonotope":
        """From forms y ∈ [m(δ) − r(δ), m(δ) + r(δ)] (``mid`` (D, K, n), ``rad`` (D, Kr, n): slice 0
        the constant, slice k the coefficient of δ_k ∈ [0, 1]): m(δ) = c + Σ_k ξ_k·mid_k/2 with
        c = mid_0 + Σ_k mid_k/2, and r(δ) ≤ r_0 + Σ_k max(0, r_k); at most ``max_gens``
        generators (:func:`_box_extra`); no allowance yet (:meth:`widened`)."""
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
        gens, rho = _box_extra(half[:, keep], rho, max_gens)
        return GradZonotope(centre, gens, rho, torch.zeros(d, lift.jac.shape[1], dtype=torch.float64,
                                                           device=centre.device), lift)

    @staticmethod
    def from_entries(mid0: torch.Tensor, rad0: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                     em: torch.Tensor, er: torch.Tensor, v: int, lift: Lift, max_gens: int) -> "GradZonotope":
        """From sparse forms: m(δ) = mid0 + Σ_e δ_{row_e}·em_e·1_{col_e}, r(δ) likewise with
        rad0, er (``mid0``, ``rad0`` (D, n); entries ``row``, ``col`` (E,), ``em``, ``er`` (D, E);
        v variables): the same zonotope as :meth:`from_forms` of the dense slices, built without
        them — only the ``max_gens`` largest generators are ever dense, the rest are boxed."""
        d, n = mid0.shape[0], mid0.shape[1:].numel()
        f64 = torch.float64
        mid0, rad0 = mid0.reshape(d, n).to(f64), rad0.reshape(d, n).to(f64)
        half, er = em.to(f64) / 2, er.to(f64)
        score = torch.zeros(d, v, dtype=f64, device=mid0.device).index_add_(1, row, half.abs()).amax(0)
        m = min(max_gens, int((score > 0).sum()))
        keep = score.topk(m).indices
        pos = torch.full((v,), -1, dtype=torch.long, device=mid0.device)
        pos[keep] = torch.arange(m, device=mid0.device)
        kept = pos[row] >= 0

        def per_col(vals: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return torch.zeros(d, n, dtype=f64, device=mid0.device).index_add_(1, cols, vals)

        centre = mid0 + per_col(half, col)
        rho = (rad0 + per_col(er.clamp(min=0), col)).clamp(min=0) + per_col(half[:, ~kept].abs(), col[~kept])
        terms = int(torch.bincount(col, minlength=n).max()) if col.numel() else 0
        rho = rho + 2 * gamma(2 * terms + 3, f64) * (mid0.abs() + rad0.abs() + per_col(half.abs() + er.abs(), col))
        gens = torch.zeros(d, m * n, dtype=f64, device=mid0.device)
        gens.index_add_(1, pos[row[kept]] * n + col[kept], half[:, kept])
        return GradZonotope(centre, gens.reshape(d, m, n), rho, torch.zeros(d, lift.jac.shape[1], dtype=f64,
                                                                             device=mid0.device), lift)

    @staticmethod
    def cat(parts: "list[GradZonotope]") -> "GradZonotope":
        """The domains of every part, in order (generators padded with zero ones)."""
        if len(parts) == 1:
            return parts[0]
        v = max(z.gens.shape[1] for z in parts)
        gens = [torch.cat([z.gens, z.gens.new_zeros(len(z), v - z.gens.shape[1], z.gens.shape[2])], 1) for z in parts]
        return GradZonotope(torch.cat([z.centre for z in parts]), torch.cat(gens),
                            torch.cat([z.rad for z in parts]), torch.cat([z.allow for z in parts]), parts[0].lift)

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
        gk = self.lift.gram_mul(self.gens)  # (D, V, n)
        q = ((gk @ self.gens.transpose(1, 2)).abs().sum((1, 2)) + 2 * (gk.abs() * self.rad.unsqueeze(1)).sum((1, 2))
             + ((self.rad @ self.lift.abs_gram) * self.rad).sum(1))
        return gk, self.lift.gram_mul(self.centre), q

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
