"""Our own auto_LiRPA operators for the gradient graph, and the relaxations they use.

The relaxations are plain tensor functions (``relu_grad_planes``, ``softplus_planes``) so they
can be tested by sampling without auto_LiRPA; the ``Bound*`` classes only plug them into
auto_LiRPA's backward (CROWN) propagation. Only :mod:`verigrad.bounds.lirpa` imports this
module, after the compat shim.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from verigrad.bounds.lirpa_compat import import_auto_lirpa
from verigrad.bounds.ibp import probability_seed_bounds, softmax_bounds
from verigrad.graph.ops import _probability_seed
from verigrad.operators.base import IbpContext
from verigrad.operators.pooling import (
    MaxPool,
    _scatter_taps,
    _spread_taps,
    maxpool_grad_planes,
    maxpool_planes,
    tap_states,
)

import_auto_lirpa()
from auto_LiRPA.operators import Bound, BoundActivation, BoundOptimizableActivation, BoundTranspose  # noqa: E402
from auto_LiRPA.perturbations import PerturbationLpNorm  # noqa: E402
from auto_LiRPA.utils import eyeC  # noqa: E402

# The g-free planes divide by −z_l and z_u; for nearly-stable neurons these are tiny and the
# plane coefficients explode (and with them rounding error). Any divisor d ≥ −z_l (resp. ≥ z_u)
# keeps the plane valid, so we floor both at this fraction of the interval width.
_MIN_SPLIT_FRACTION = 1e-3


@dataclass(frozen=True)
class Planes:
    """Elementwise linear bounds  lz·z + lg·g + lb ≤ h ≤ uz·z + ug·g + ub."""

    lz: Tensor
    lg: Tensor
    lb: Tensor
    uz: Tensor
    ug: Tensor
    ub: Tensor


def relu_grad_planes(
    zl: Tensor, zu: Tensor, gl: Tensor, gu: Tensor, alpha_lower: Tensor | float = 0.0, alpha_upper: Tensor | float = 0.0
) -> Planes:
    """Linear bounds on h = 1[z > 0]·g over z ∈ [zl, zu], g ∈ [gl, gu].

    Stable neurons are exact: h = g if zl > 0, h = 0 if zu ≤ 0. Unstable ones (zl ≤ 0 < zu) mix
    two valid planes per side with α ∈ [0, 1] (α = 0: z-free chord, upstream's CROWN):
      upper: chord of max(0, g) over [gl, gu]      |  gu⁺·(z + dl)/dl + gu⁻·z/du
      lower: chord of min(0, g) over [gl, gu]      |  gl⁻·(z + dl)/dl + gl⁺·z/du
    with dl ≥ −zl, du ≥ zu (equal to them unless floored, see _MIN_SPLIT_FRACTION). Validity:
    h ≤ max(0, g) ≤ chord (convexity); for z ≤ 0 the g-free upper plane is ≥ 0 = h, for
    z ∈ (0, zu] it is ≥ gu⁺ + gu⁻ = gu ≥ g = h; the lower side is symmetric.
    """
    dtype = gl.dtype
    active = zl > 0
    inactive = zu <= 0
    unstable = ~(active | inactive)

    gu_pos, gu_neg = gu.clamp(min=0), gu.clamp(max=0)
    gl_pos, gl_neg = gl.clamp(min=0), gl.clamp(max=0)
    cross = (gl < 0) & (gu > 0)
    width_g = torch.where(cross, gu - gl, torch.ones_like(gu))
    # z-free chords: g ≥ 0 on the box → max(0,g) = g; g ≤ 0 → 0; crossing → chord
    ug0 = torch.where(cross, gu / width_g, (gl >= 0).to(dtype))
    ub0 = torch.where(cross, -gu * gl / width_g, torch.zeros_like(gu))
    lg0 = torch.where(cross, -gl / width_g, (gu <= 0).to(dtype))
    lb0 = torch.where(cross, gl * gu / width_g, torch.zeros_like(gl))

    floor = _MIN_SPLIT_FRACTION * (zu - zl)
    dl = torch.maximum(-zl, floor)
    du = torch.maximum(zu, floor)
    dl = torch.where(unstable, dl, torch.ones_like(dl))  # avoid 0-division off the unstable set
    du = torch.where(unstable, du, torch.ones_like(du))
    uz1, ub1 = gu_pos / dl + gu_neg / du, gu_pos
    lz1, lb1 = gl_neg / dl + gl_pos / du, gl_neg

    au = torch.as_tensor(alpha_upper, dtype=dtype, device=gl.device)
    al = torch.as_tensor(alpha_lower, dtype=dtype, device=gl.device)
    un = unstable.to(dtype)
    act = active.to(dtype)
    return Planes(
        lz=un * (al * lz1),
        lg=un * ((1 - al) * lg0) + act,
        lb=un * ((1 - al) * lb0 + al * lb1),
        uz=un * (au * uz1),
        ug=un * ((1 - au) * ug0) + act,
        ub=un * ((1 - au) * ub0 + au * ub1),
    )


def softplus_exact(u: Tensor) -> Tensor:
    """log(1 + eᵘ) without overflow (torch's softplus switches to u above 20; this does not)."""
    return u.clamp(min=0) + torch.log1p(torch.exp(-u.abs()))


def softplus_planes(ul: Tensor, uu: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lk, lb, uk, ub) with lk·u + lb ≤ log(1 + eᵘ) ≤ uk·u + ub on [ul, uu].
    Convex function: the chord lies above, the tangent at the midpoint below."""
    fl, fu = softplus_exact(ul), softplus_exact(uu)
    width = uu - ul
    # for (nearly) point intervals the chord slope is 0/0: use the largest derivative on the
    # interval, sigmoid(uu); the line through (ul, f(ul)) with that slope is still above f
    narrow = width <= 1e-12 * (1 + ul.abs())
    safe = torch.where(narrow, torch.ones_like(width), width)
    uk = torch.where(narrow, torch.sigmoid(uu), (fu - fl) / safe)
    ub = fl - uk * ul
    m = (ul + uu) / 2
    lk = torch.sigmoid(m)
    lb = softplus_exact(m) - lk * m
    return lk, lb, uk, ub


def _flat_sum(t: Tensor) -> Tensor:
    """Sum over every dimension after (spec, batch)."""
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


class BoundReluGrad(BoundOptimizableActivation):
    """auto_LiRPA node for ``verigrad::ReluGrad(z, g)`` = 1[z > 0]·g (see relu_grad_planes).

    Without optimisation α = 0 (CROWN). alpha-CROWN owns one α per (plane side, spec, sample,
    neuron) for the lower-bound pass and another for the upper-bound pass:
    alpha[start] has shape (4, spec, batch, *shape): [α_lower, α_upper] for the lower-bound
    pass, then the same for the upper-bound pass. α is projected into [0, 1] after each step
    (clip_alpha_) and used without a clamp, so its gradient is never blocked at 0 or 1."""

    def __init__(self, attr: Any, inputs: Any, output_index: Any, options: Any) -> None:
        super().__init__(attr, inputs, output_index, options)
        self.requires_input_bounds = [0, 1]
        self.alpha_batch_dim = 2

    def forward(self, z: Tensor, g: Tensor) -> Tensor:
        return (z > 0).to(g.dtype) * g

    def interval_propagate(self, *v: Any) -> tuple[Tensor, Tensor]:
        (zl, zu), (gl, gu) = v[0], v[1]
        active = zl > 0
        unstable = (zl <= 0) & (zu > 0)
        zero = torch.zeros_like(gl)
        lo = torch.where(active, gl, torch.where(unstable, gl.clamp(max=0), zero))
        hi = torch.where(active, gu, torch.where(unstable, gu.clamp(min=0), zero))
        return lo, hi

    def init_opt_parameters(self, start_nodes: Any) -> None:
        ref = self.inputs[0].lower
        self.alpha = OrderedDict()
        for name, size, _ in start_nodes:
            spec = int(torch.Size(size).numel()) if isinstance(size, (tuple, list, torch.Size)) else int(size)
            # α = 0 reproduces CROWN, so optimisation starts from CROWN's bounds
            self.alpha[name] = torch.zeros(4, spec, *ref.shape, dtype=ref.dtype, device=ref.device, requires_grad=True)

    def clip_alpha_(self) -> None:
        for v in self.alpha.values():
            v.data = v.data.clamp(0.0, 1.0)

    def dump_optimized_params(self) -> Any:
        return self.alpha

    def restore_optimized_params(self, alpha: Any) -> None:
        self.alpha = alpha

    def _alphas(self, start_node: Any, lower_pass: bool) -> tuple[Tensor | float, Tensor | float]:
        if self.opt_stage not in ("opt", "reuse") or start_node is None or start_node.name not in self.alpha:
            return 0.0, 0.0
        a = self.alpha[start_node.name]
        return (a[0], a[1]) if lower_pass else (a[2], a[3])

    def bound_backward(self, last_lA: Any, last_uA: Any, z: Any, g: Any, start_node: Any = None,
                       start_shape: Any = None, **kwargs: Any) -> Any:
        for a in (last_lA, last_uA):
            if a is not None and not isinstance(a, Tensor):
                raise NotImplementedError(f"ReluGrad node {self.name}: A of type {type(a).__name__} (use conv_mode='matrix')")

        def one_side(last_A: Tensor | None, lower_pass: bool) -> tuple[Tensor | None, Tensor | None, Tensor | float]:
            if last_A is None:
                return None, None, 0.0
            al, au = self._alphas(start_node, lower_pass)
            p = relu_grad_planes(z.lower, z.upper, g.lower, g.upper, al, au)
            # coefficients have shape (batch, *shape) or, with α, (spec, batch, *shape)
            pos, neg = last_A.clamp(min=0), last_A.clamp(max=0)
            if lower_pass:  # lower bound: positive weights take the lower plane
                Az = pos * p.lz + neg * p.uz
                Ag = pos * p.lg + neg * p.ug
                bias = _flat_sum(pos * p.lb + neg * p.ub)
            else:
                Az = pos * p.uz + neg * p.lz
                Ag = pos * p.ug + neg * p.lg
                bias = _flat_sum(pos * p.ub + neg * p.lb)
            return Az, Ag, bias

        lAz, lAg, lbias = one_side(last_lA, True)
        uAz, uAg, ubias = one_side(last_uA, False)
        return [(lAz, uAz), (lAg, uAg)], lbias, ubias


class BoundSoftplusRelaxed(BoundActivation):
    """``onnx::Softplus`` (log(1 + eᵘ); β is a Mul/Div around it) with a linear relaxation:
    chord above, midpoint tangent below (auto_LiRPA 0.3's BoundSoftplus has IBP only)."""

    def forward(self, x: Tensor) -> Tensor:
        return softplus_exact(x)

    def interval_propagate(self, *v: Any) -> tuple[Tensor, Tensor]:
        lo, hi = v[0]
        return softplus_exact(lo), softplus_exact(hi)  # monotone

    def bound_relax(self, x: Any) -> None:
        lk, lb, uk, ub = softplus_planes(x.lower, x.upper)
        # add_linear_relaxation(k, x0, y0) stores slope k and intercept y0 − k·x0
        self.add_linear_relaxation(mask=None, type="lower", k=lk, x0=torch.zeros_like(lb), y0=lb)
        self.add_linear_relaxation(mask=None, type="upper", k=uk, x0=torch.zeros_like(ub), y0=ub)


def _constant_planes_bias(A: Any, lo: Tensor, hi: Tensor, lower: bool, what: str) -> Tensor | float:
    """Σ A·v over v ∈ [lo, hi] at its minimum (``lower``) or maximum: the constant planes v ≥ lo,
    v ≤ hi pushed through A."""
    if A is None:
        return 0.0
    if not isinstance(A, Tensor):
        raise NotImplementedError(f"{what}: A of type {type(A).__name__}")
    pos, neg = A.clamp(min=0), A.clamp(max=0)
    first, second = (lo, hi) if lower else (hi, lo)
    return _flat_sum(pos * first + neg * second)


class BoundSoftmaxBox(Bound):
    """``onnx::Softmax`` (the cross-entropy seed softmax(z) − e_c) relaxed by constant planes:
    the exact range of each p_i over the logit box (ibp.softmax_bounds). Sound and exact at a point;
    it ignores the correlation between logits. auto_LiRPA 0.3's own Softmax is rewritten with
    ReduceMax, which it cannot bound backward."""

    def __init__(self, attr: Any, inputs: Any, output_index: Any, options: Any) -> None:
        super().__init__(attr, inputs, output_index, options)
        self.axis = int(attr.get("axis", -1))
        self.requires_input_bounds = [0]

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(x, dim=self.axis)

    def interval_propagate(self, *v: Any) -> tuple[Tensor, Tensor]:
        lo, hi = v[0]
        return softmax_bounds(lo, hi, self.axis)

    def bound_backward(self, last_lA: Any, last_uA: Any, x: Any, **kwargs: Any) -> Any:
        p_lo, p_hi = softmax_bounds(x.lower, x.upper, self.axis)
        what = f"Softmax node {self.name}"
        # zero slope: no A flows to the logits
        return [(None, None)], _constant_planes_bias(last_lA, p_lo, p_hi, True, what), \
            _constant_planes_bias(last_uA, p_lo, p_hi, False, what)


class BoundProbabilitySeed(Bound):
    """``verigrad::ProbabilitySeed(z)`` = p_c(e_c − p) relaxed by constant planes: its range over
    the logit box (ibp.probability_seed_bounds). Sound, exact at a point."""

    def __init__(self, attr: Any, inputs: Any, output_index: Any, options: Any) -> None:
        super().__init__(attr, inputs, output_index, options)
        self.target = int(attr["target"])
        self.requires_input_bounds = [0]

    def _range(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.full((lo.shape[0],), self.target, dtype=torch.long, device=lo.device)
        return probability_seed_bounds(lo, hi, t)

    def forward(self, z: Tensor) -> Tensor:
        return _probability_seed(z, self.target)

    def interval_propagate(self, *v: Any) -> tuple[Tensor, Tensor]:
        return self._range(*v[0])

    def bound_backward(self, last_lA: Any, last_uA: Any, z: Any, **kwargs: Any) -> Any:
        lo, hi = self._range(z.lower, z.upper)
        what = f"ProbabilitySeed node {self.name}"
        return [(None, None)], _constant_planes_bias(last_lA, lo, hi, True, what), \
            _constant_planes_bias(last_uA, lo, hi, False, what)


def _pool_geometry(attr: Any) -> MaxPool:
    return MaxPool("lirpa", tuple(attr["kernel"]), tuple(attr["stride"]), tuple(attr["pads"]), bool(attr["ceil"]))


def _dense_A(A: Any, what: str) -> None:
    if A is not None and not isinstance(A, Tensor):
        raise NotImplementedError(f"{what}: A of type {type(A).__name__} (use conv_mode='matrix')")


class BoundMaxPoolOp(Bound):
    """``verigrad::MaxPool(x)`` with the planes of ``operators.pooling.maxpool_planes``:
    y_w ≥ x_{j*} (j* the tap with the largest lower bound), y_w ≤ x_{j*} where j* dominates its
    window, else y_w ≤ max_p u_p."""

    def __init__(self, attr: Any, inputs: Any, output_index: Any, options: Any) -> None:
        super().__init__(attr, inputs, output_index, options)
        self.geo = _pool_geometry(attr)
        self.requires_input_bounds = [0]

    def forward(self, x: Tensor) -> Tensor:
        return self.geo.forward([x])

    def interval_propagate(self, *v: Any) -> tuple[Tensor, Tensor]:
        lo, hi = v[0]
        return self.geo.forward([lo]), self.geo.forward([hi])

    def bound_backward(self, last_lA: Any, last_uA: Any, x: Any, **kwargs: Any) -> Any:
        onehot, dominated, ucons = maxpool_planes(x.lower, x.upper, self.geo)
        dom = dominated.to(x.lower.dtype)
        in_shape = tuple(x.lower.shape[1:])

        def one_side(A: Tensor | None, lower_pass: bool) -> tuple[Tensor | None, Tensor | float]:
            if A is None:
                return None, 0.0
            _dense_A(A, f"MaxPool node {self.name}")
            s, b, c = A.shape[:3]
            a = A.reshape(s, b, c, 1, -1)
            pos, neg = a.clamp(min=0), a.clamp(max=0)
            # lower plane: coefficient 1 at j*; upper plane: coefficient dom at j*, constant (1 − dom)·U
            if lower_pass:
                coef, bias = pos + neg * dom, neg * (1 - dom) * ucons
            else:
                coef, bias = pos * dom + neg, pos * (1 - dom) * ucons
            taps = (coef * onehot).reshape(s * b, c, onehot.shape[2], -1)
            ax = _scatter_taps(taps, self.geo, in_shape).reshape(s, b, *in_shape)
            return ax, _flat_sum(bias)

        lA, lbias = one_side(last_lA, True)
        uA, ubias = one_side(last_uA, False)
        return [(lA, uA)], lbias, ubias


class BoundMaxPoolGrad(Bound):
    """``verigrad::MaxPoolGrad(x, g)`` = Σ_w onehot(argmax_w x)·g_w with the z-free planes of
    ``operators.pooling.maxpool_grad_planes`` (every candidate argmax covered; no A flows to x)."""

    def __init__(self, attr: Any, inputs: Any, output_index: Any, options: Any) -> None:
        super().__init__(attr, inputs, output_index, options)
        self.geo = _pool_geometry(attr)
        self.requires_input_bounds = [0, 1]

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        return self.geo.route(x, g, tuple(x.shape[1:]))

    def interval_propagate(self, *v: Any) -> tuple[Tensor, Tensor]:
        x, g = v[0], v[1]
        return self.geo.ibp_vjp([x], g, [tuple(x[0].shape[1:])], IbpContext())[0]

    def bound_backward(self, last_lA: Any, last_uA: Any, x: Any, g: Any, **kwargs: Any) -> Any:
        certain, possible = tap_states(x.lower, x.upper, self.geo)
        b, c = g.lower.shape[:2]
        lg, lb, ug, ub = maxpool_grad_planes(certain, possible, g.lower.reshape(b, c, -1), g.upper.reshape(b, c, -1))
        in_shape = tuple(x.lower.shape[1:])
        g_shape = tuple(g.lower.shape[1:])

        def one_side(A: Tensor | None, lower_pass: bool) -> tuple[Tensor | None, Tensor | float]:
            if A is None:
                return None, 0.0
            _dense_A(A, f"MaxPoolGrad node {self.name}")
            s = A.shape[0]
            taps = _spread_taps(A.reshape(s * b, *in_shape), self.geo, in_shape).reshape(s, b, c, lg.shape[2], -1)
            pos, neg = taps.clamp(min=0), taps.clamp(max=0)
            if lower_pass:
                ag, bias = pos * lg + neg * ug, pos * lb + neg * ub
            else:
                ag, bias = pos * ug + neg * lg, pos * ub + neg * lb
            return ag.sum(dim=3).reshape(s, b, *g_shape), _flat_sum(bias)

        lA, lbias = one_side(last_lA, True)
        uA, ubias = one_side(last_uA, False)
        return [(None, None), (lA, uA)], lbias, ubias


class BoundTransposeContiguous(BoundTranspose):
    """``onnx::Transpose`` whose bounds and A matrices are contiguous: auto_LiRPA 0.3's own
    returns permuted views, which its unstable-neuron bookkeeping later ``view``s and fails on."""

    def interval_propagate(self, *v: Any) -> tuple[Tensor, Tensor]:
        lo, hi = super().interval_propagate(*v)
        return lo.contiguous(), hi.contiguous()

    def bound_backward(self, last_lA: Any, last_uA: Any, x: Any) -> Any:
        [(lA, uA)], lb, ub = super().bound_backward(last_lA, last_uA, x)
        return [(None if lA is None else lA.contiguous(), None if uA is None else uA.contiguous())], lb, ub


class ParamBoxPerturbation(PerturbationLpNorm):
    """Elementwise interval x_L ≤ θ ≤ x_U on a parameter tensor (no batch dimension).

    auto_LiRPA 0.3's PerturbationLpNorm reads the first dimension of x_L as the batch when it
    concretizes, which breaks for parameter-shaped bounds; a parameter's A matrix is
    (batch, spec, numel) and is concretized here against the flattened box:
    min/max of A·θ = A·c ∓ |A|·r with c, r the box's centre and radius."""

    def __init__(self, lower: Tensor, upper: Tensor) -> None:
        super().__init__(norm=float("inf"), x_L=lower, x_U=upper)

    def concretize(self, x: Any, A: Any, sign: int = -1, aux: Any = None, extra_constr: Any = None) -> Any:
        if A is None:
            return None
        if extra_constr is not None:
            raise NotImplementedError("ParamBoxPerturbation: extra constraints (beta-CROWN) are not supported")
        centre = ((self.x_U + self.x_L) / 2).reshape(1, -1)
        radius = ((self.x_U - self.x_L) / 2).reshape(1, -1)
        if isinstance(A, eyeC):  # the bound of the parameter itself
            return centre + sign * radius
        A = A.reshape(A.shape[0], A.shape[1], -1)
        return A.matmul(centre.unsqueeze(-1)).squeeze(-1) + sign * A.abs().matmul(radius.unsqueeze(-1)).squeeze(-1)


CUSTOM_OPS: dict[str, type] = {
    "onnx::Softmax": BoundSoftmaxBox,
    "verigrad::ReluGrad": BoundReluGrad,
    "onnx::Softplus": BoundSoftplusRelaxed,
    "verigrad::ProbabilitySeed": BoundProbabilitySeed,
    "verigrad::MaxPool": BoundMaxPoolOp,
    "verigrad::MaxPoolGrad": BoundMaxPoolGrad,
    "onnx::Transpose": BoundTransposeContiguous,
}
