"""Exact oracle for the input gradient of a small piecewise-linear chain over an input box.

For a chain z_1 = W_1 x + b_1, a_k = σ(z_k), z_{k+1} = W_{k+1} a_k + b_{k+1} with σ = relu,
leaky_relu(α) or PReLU (a slope a_j per unit, any sign), the logits are affine on each
activation region (sign pattern s of every hidden unit): z_L = J_s x + c_s with
J_s = W_L D_{L-1} … W_2 D_1 W_1, D_k = diag(1 where s = +, α or a_j where s = −). So ∂z_c/∂x
= J_s[c] is piecewise constant, and its exact range over the box B = [l, u] is [min, max] of
J_s[c] over the patterns s whose region meets B. Conv2d layers are taken as their dense
matrices, reshapes as identities, and a MaxPool step y_w = max_p z_p is one more piece of the
pattern: the argmax tap t of every window (its rows of the current map are selected), whose
region is the linear set z_t − z_s > 0 for every other tap s (open), or z_t > z_s before t and
z_t ≥ z_s after (closed; a difference constant on the box decides by autograd's rule, the
first maximal tap).

Which patterns count (ties): by default (``interior=True``) s is included iff some x ∈ B has
s_j·z_j(x) > 0 for every hidden unit j — an open region, so it is met by a set of positive
measure of the box (relative to the box's affine hull when some coordinates have l = u), and
autograd returns exactly J_s[c] on it. Numerically the strict inequality is a margin: the
LP  max t  s.t.  x ∈ B,  s_j (a_j·x + β_j) ≥ t  (a_j = unit normal, β_j scaled alike, so t is
a distance to the hyperplanes z_j = 0) must reach t > TOL = 1e-9; the x it returns is kept as
the region's witness (re-checked exactly). Patterns met only on a lower-dimensional set (a face
z_j = 0) are left out: the gradient at such tie points (relu'(0) = 0) is not an essential
value of the gradient, and for generic weights every point of B but a null set lies in an
included region. ``interior=False`` uses closed half-spaces s_j z_j ≥ 0 instead (t ≥ −TOL),
which adds those degenerate patterns and can only widen the range. Every value of the interior
range is autograd's gradient at some point of B, so a sound engine must contain it (the
engines' bounds also cover tie points; the interior range is the part of that every box
point but a null set produces).

A unit whose pre-activation is constant on the box given the earlier pattern (e.g. a relu of
a dead unit) takes autograd's convention σ'(z) (relu'(0) = 0) — with ``interior=False`` and
z ≡ 0 both sides are taken.

Cost: the regions are enumerated depth first over the units, layer by layer; a unit is
branched on only when its interval over the whole box (exact for the affine z_j) straddles 0,
and a branch is kept when the parent's witness already lies strictly on that side or an LP
(scipy's HiGHS) finds a point with margin. Exponential in the number of units: refused beyond
MAX_INPUTS inputs, MAX_HIDDEN_LAYERS activation / MaxPool layers of MAX_UNITS units (windows).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linprog

from verigrad.models.network import ActKind, Activation, Conv2d, Linear, MaxPool, Network, PReLU, Reshape
from verigrad.operators.pooling import _windows

TOL = 1e-9  # LP tolerance: a region counts when some point of it is this far (ℓ2) from every face
MAX_INPUTS = 12
MAX_HIDDEN_LAYERS = 3
MAX_UNITS = 12
MAX_REGIONS = 200_000  # a guard against runaway enumeration (the limits above keep far below)
_T_CAP = 1.0  # the LP's margin is capped so that it is bounded with few constraints
# HiGHS' default feasibility tolerance (1e-7) is far above TOL; 1e-10 is its finest setting
_LP_OPTIONS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}
_ZERO_NORM = 1e-12  # a pre-activation whose gradient (over the box's free coordinates) is below this is constant


@dataclass(frozen=True)
class Region:
    """One activation region meeting the box: ``pattern[k][j]`` is True where unit j of
    activation layer k is active (slope 1), ``jacobian`` = ∂z/∂x (classes, n_inputs) on it,
    ``point`` a witness x in box ∩ region (input shape), ``margin`` its distance to the nearest
    face z_j = 0 (capped at 1; the region's pattern is autograd's at ``point`` when margin > TOL)."""

    pattern: tuple[tuple[bool, ...], ...]
    jacobian: np.ndarray
    point: np.ndarray
    margin: float

    def gradient(self, target: int) -> np.ndarray:
        """∂z_target/∂x on the region (flat, n_inputs)."""
        return self.jacobian[target]


def _dense(node: Conv2d, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A convolution as (W, b) on the flattened tensor: W from the bias-free convolution of each
    basis image (every output a single product, so W is exact)."""
    n = int(np.prod(shape))
    free = dataclasses.replace(node, bias=torch.zeros_like(node.bias, dtype=torch.float64),
                               weight=node.weight.detach().to(torch.float64))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    w = free.forward([basis]).reshape(n, -1).T.numpy()
    b = node.bias.detach().to(torch.float64)[:, None].expand(-1, w.shape[0] // node.bias.numel())
    return w, b.reshape(-1).numpy()


def _pool_windows(node: MaxPool, shape: tuple[int, ...]) -> list[list[int]]:
    """Each output window of a MaxPool (flattened output order) as the flat input coordinates
    of its real taps, in tap order (padding left out: it never holds the maximum)."""
    n = int(np.prod(shape))
    coords, _ = _windows(torch.arange(n, dtype=torch.float64).reshape(1, *shape), node, -1.0)
    c, kk, nw = coords.shape[1:]
    taps = coords[0].permute(0, 2, 1).reshape(c * nw, kk).long().tolist()
    return [[q for q in win if q >= 0] for win in taps]


def _steps(net: Network) -> list[tuple]:
    """The network as ("linear", W, b), ("act", negative slope per unit or scalar) and ("pool",
    windows) steps, float64; ValueError for anything the oracle does not handle (or that would
    make it too slow)."""
    if not net.is_chain:
        raise ValueError("exact oracle: the network must be a chain")
    n_in = int(np.prod(net.input_shape))
    if n_in > MAX_INPUTS:
        raise ValueError(f"exact oracle: {n_in} inputs > {MAX_INPUTS} (the enumeration is exponential)")
    steps: list[tuple] = []
    width, shape = n_in, tuple(net.input_shape)
    for node in net.layers:
        if isinstance(node, Linear):
            w = node.weight.detach().cpu().to(dtype=torch.float64).numpy()
            b = node.bias.detach().cpu().to(dtype=torch.float64).numpy()
            if w.ndim != 2 or w.shape[1] != width or len(shape) != 1:
                raise ValueError(f"exact oracle: layer {node.name!r} expects {w.shape[1:]} inputs, gets {shape}")
            steps.append(("linear", w, b))
            width = w.shape[0]
        elif isinstance(node, Conv2d):
            w, b = _dense(node, shape)
            steps.append(("linear", w, b))
            width = w.shape[0]
        elif isinstance(node, Reshape):
            pass  # a per-sample reshape keeps the flattened (C-order) tensor
        elif isinstance(node, MaxPool):
            wins = _pool_windows(node, shape)
            if len(wins) > MAX_UNITS:
                raise ValueError(f"exact oracle: MaxPool {node.name!r} has {len(wins)} windows > {MAX_UNITS}")
            steps.append(("pool", wins))
            width = len(wins)
        elif isinstance(node, Activation) and node.kind in (ActKind.RELU, ActKind.LEAKY_RELU) or isinstance(node, PReLU):
            if width > MAX_UNITS:
                raise ValueError(f"exact oracle: activation {node.name!r} has {width} units > {MAX_UNITS}")
            if isinstance(node, PReLU):
                slope = torch.broadcast_to(node.slope.detach().to(torch.float64), shape).reshape(-1).numpy()
                steps.append(("act", slope))
            else:
                steps.append(("act", 0.0 if node.kind == ActKind.RELU else float(node.param)))
        else:
            raise ValueError(f"exact oracle: layer {node.name!r} ({type(node).__name__}"
                             f"{' ' + node.kind.value if isinstance(node, Activation) else ''}) is not "
                             "Linear / Conv2d / Reshape / MaxPool or a relu / leaky_relu / PReLU activation")
        shape = tuple(net.shape_of[node.name])
    if not isinstance(net.layers[-1], Linear):
        raise ValueError("exact oracle: the last layer must be Linear (the logits)")
    n_act = sum(1 for s in steps if s[0] != "linear")
    if n_act > MAX_HIDDEN_LAYERS:
        raise ValueError(f"exact oracle: {n_act} activation / pool layers > {MAX_HIDDEN_LAYERS}")
    return steps


class _Enumerator:
    """Depth-first enumeration of the regions (see the module docstring). The search state is
    the affine map x ↦ M x + c of the current tensor, the pattern so far, the margin
    constraints of the units branched on (rows r·y ≤ h − t over the box's free coordinates y,
    i.e. s(a·y + β) ≥ t), and a witness y with its verified margin."""

    def __init__(self, steps: Sequence, lower: np.ndarray, upper: np.ndarray, interior: bool, tol: float) -> None:
        self.steps = steps
        self.lower, self.upper = lower, upper
        self.free = upper > lower
        self.lo_f, self.up_f = lower[self.free], upper[self.free]
        self.mid_f, self.rad_f = (self.lo_f + self.up_f) / 2, (self.up_f - self.lo_f) / 2
        self.interior = interior
        self.tol = tol
        # a branch is kept when its best margin exceeds thr: > 0 (open regions) or ≥ 0 (closed)
        self.thr = tol if interior else -tol
        self.regions: list[Region] = []
        self.lp_calls = 0

    # -- search ----------------------------------------------------------------------------
    def run(self) -> list[Region]:
        n = self.lower.size
        self._advance(0, np.eye(n), np.zeros(n), (), [], [], self.mid_f.copy(), _T_CAP)
        return self.regions

    def _advance(self, k: int, m: np.ndarray, c: np.ndarray, pattern: tuple, rows: list, rhs: list,
                 y: np.ndarray, margin: float) -> None:
        """Apply the linear steps from step k on; at an activation, branch over its units."""
        while k < len(self.steps) and self.steps[k][0] == "linear":
            _, w, b = self.steps[k]
            m, c = w @ m, w @ c + b
            k += 1
        if k == len(self.steps):
            x = self.lower.copy()
            x[self.free] = y
            self.regions.append(Region(pattern, m, x, margin))
            if len(self.regions) > MAX_REGIONS:
                raise ValueError(f"exact oracle: more than {MAX_REGIONS} regions")
            return
        # z = M x + c restricted to the box: free coordinates y, the fixed ones folded into c
        m_f = m[:, self.free]
        c_f = c + m[:, ~self.free] @ self.lower[~self.free]
        norm = np.linalg.norm(m_f, axis=1)
        centre = c_f + m_f @ self.mid_f
        spread = np.abs(m_f) @ self.rad_f
        # exact range of each z_j over the whole box (z_j is affine there): the cheap filter
        box = (centre - spread, centre + spread)
        if self.steps[k][0] == "pool":
            self._window(k, 0, m, c, (m_f, c_f), pattern, (), rows, rhs, y, margin)
        else:
            self._unit(k, 0, m, c, (m_f, c_f, norm, box), pattern, (), rows, rhs, y, margin)

    def _window(self, k: int, w: int, m: np.ndarray, c: np.ndarray, layer: tuple, pattern: tuple,
                chosen: tuple, rows: list, rhs: list, y: np.ndarray, margin: float) -> None:
        """Branch over the argmax tap of window w of a MaxPool: tap t is the (first) argmax where
        d_s = z_t − z_s > 0 for the taps s before t and ≥ 0 for those after (open: > 0 for every
        s, ties being a null set; closed: ≥ 0). A d_s constant on the box decides by itself
        (autograd's tie rule: the first maximal tap)."""
        wins = self.steps[k][1]
        if w == len(wins):
            sel = [win[t] for win, t in zip(wins, chosen, strict=True)]
            self._advance(k + 1, m[sel], c[sel], pattern + (chosen,), rows, rhs, y, margin)
            return
        m_f, c_f = layer
        taps = wins[w]
        for t, zt in enumerate(taps):
            added, ok, here = 0, True, np.inf
            for s, zs in enumerate(taps):
                if s == t:
                    continue
                dm, dc = m_f[zt] - m_f[zs], c_f[zt] - c_f[zs]
                norm = float(np.linalg.norm(dm))
                if norm <= _ZERO_NORM:
                    ok = (dc > 0 if s < t else dc >= 0) if self.interior else dc >= -self.tol
                else:
                    lo_d = dc + dm @ self.mid_f - np.abs(dm) @ self.rad_f
                    hi_d = dc + dm @ self.mid_f + np.abs(dm) @ self.rad_f
                    if hi_d <= (0.0 if self.interior else -self.tol * norm):
                        ok = False
                    elif lo_d <= (0.0 if self.interior else self.tol * norm):  # not certain on the box
                        a, beta = dm / norm, dc / norm
                        rows.append(-a)
                        rhs.append(beta)
                        added += 1
                        here = min(here, float(a @ y + beta))
                if not ok:
                    break
            if ok:
                if added == 0:
                    child_y, child_margin = y, margin
                elif here > self.thr:  # the parent's witness already lies in this tap's region
                    child_y, child_margin = y, min(margin, here)
                else:
                    child_y, child_margin = self._lp(rows, rhs)
                if child_margin > self.thr:
                    self._window(k, w + 1, m, c, layer, pattern, chosen + (t,), rows, rhs, child_y, child_margin)
            for _ in range(added):
                rows.pop()
                rhs.pop()

    def _unit(self, k: int, j: int, m: np.ndarray, c: np.ndarray, layer: tuple, pattern: tuple,
              active: tuple, rows: list, rhs: list, y: np.ndarray, margin: float) -> None:
        m_f, c_f, norm, (zlo, zhi) = layer
        if j == len(c):
            slope = self.steps[k][1]
            d = np.where(np.array(active, dtype=bool), 1.0, slope)
            self._advance(k + 1, d[:, None] * m, d * c, pattern + (active,), rows, rhs, y, margin)
            return
        nxt = (k, j + 1, m, c, layer, pattern)
        if norm[j] <= _ZERO_NORM:
            # constant on the box: autograd's σ'(c) (relu'(0) = 0); both sides for a closed tie
            val = c_f[j]
            if self.interior:
                sides = [bool(val > 0)]
            else:
                sides = [True] if val > self.tol else [False] if val < -self.tol else [True, False]
            for s in sides:
                self._unit(*nxt, active + (s,), rows, rhs, y, margin)
            return
        if self.interior:
            fixed = True if zlo[j] >= 0 else False if zhi[j] <= 0 else None
        else:
            fixed = True if zlo[j] > self.tol * norm[j] else False if zhi[j] < -self.tol * norm[j] else None
        if fixed is not None:  # one sign on the whole box: no constraint needed
            self._unit(*nxt, active + (fixed,), rows, rhs, y, margin)
            return
        a, beta = m_f[j] / norm[j], c_f[j] / norm[j]
        for s in (True, False):
            sg = 1.0 if s else -1.0
            # s(a·y + β) ≥ t  ⇔  (−s a)·y + t ≤ s β
            rows.append(-sg * a)
            rhs.append(sg * beta)
            here = sg * (a @ y + beta)
            if here > self.thr:  # the parent's witness already lies on this side
                child_y, child_margin = y, min(margin, here)
            else:
                child_y, child_margin = self._lp(rows, rhs)
            if child_margin > self.thr:
                self._unit(*nxt, active + (s,), rows, rhs, child_y, child_margin)
            rows.pop()
            rhs.pop()

    def _lp(self, rows: list, rhs: list) -> tuple[np.ndarray, float]:
        """max t s.t. y ∈ box, rows·y + t ≤ rhs: the best witness and its margin, re-evaluated
        exactly at the (box-clipped) solution so that a kept region is never an LP artefact."""
        self.lp_calls += 1
        nf = self.lo_f.size
        a_ub = np.hstack([np.array(rows), np.ones((len(rows), 1))])
        b_ub = np.array(rhs)
        cost = np.zeros(nf + 1)
        cost[-1] = -1.0
        bounds = [(float(lo), float(up)) for lo, up in zip(self.lo_f, self.up_f, strict=True)] + [(None, _T_CAP)]
        res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs", options=_LP_OPTIONS)
        if res.status != 0:  # always feasible (t → −∞) and bounded (t ≤ cap): a solver failure
            raise RuntimeError(f"exact oracle: linprog failed: {res.message}")
        y = np.clip(res.x[:nf], self.lo_f, self.up_f)
        verified = float(np.min(b_ub - np.array(rows) @ y))
        return y, min(verified, _T_CAP)


def activation_regions(net: Network, lower: np.ndarray, upper: np.ndarray, *, interior: bool = True,
                       tol: float = TOL) -> list[Region]:
    """Every activation region of ``net`` meeting the box [lower, upper] (one sample, input
    shape), with its Jacobian ∂z/∂x and a witness point; see the module docstring for which
    patterns count (``interior``)."""
    steps = _steps(net)
    lo = np.asarray(lower, dtype=np.float64).reshape(-1)
    up = np.asarray(upper, dtype=np.float64).reshape(-1)
    if lo.size != int(np.prod(net.input_shape)) or up.shape != lo.shape:
        raise ValueError(f"exact oracle: box of {lo.size} / {up.size} values for input shape {net.input_shape}")
    if not bool(np.all(lo <= up)):
        raise ValueError("exact oracle: lower > upper somewhere")
    regions = _Enumerator(steps, lo, up, interior, tol).run()
    shape = tuple(net.input_shape)
    return [Region(r.pattern, r.jacobian, r.point.reshape(shape), r.margin) for r in regions]


def gradient_range(regions: Sequence[Region], target: int, input_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """[min, max] over the regions of ∂z_target/∂x, per coordinate (input shape)."""
    if not regions:
        raise ValueError("exact oracle: no region meets the box")
    g = np.stack([r.gradient(target) for r in regions])
    shape = tuple(input_shape)
    return g.min(0).reshape(shape), g.max(0).reshape(shape)


def exact_gradient_range(net: Network, lower: np.ndarray, upper: np.ndarray, target: int,
                         *, interior: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact range of every coordinate of ∂z_target/∂x over the box [lower, upper] (one sample):
    (min, max) in the input shape — min/max of J_s[target] over the regions s meeting the box —
    and the number of regions enumerated."""
    if not 0 <= target < net.num_classes:
        raise ValueError(f"exact oracle: target {target} out of range for {net.num_classes} classes")
    regions = activation_regions(net, lower, upper, interior=interior)
    lo, hi = gradient_range(regions, target, net.input_shape)
    return lo, hi, len(regions)


def containment_violations(lower: np.ndarray, upper: np.ndarray, exact_lo: np.ndarray, exact_hi: np.ndarray,
                           tol: float = TOL) -> list[str]:
    """The coordinates where bounds [lower, upper] fail to contain the exact range
    [exact_lo, exact_hi] (lower > exact_lo + tol or upper < exact_hi − tol), one line each."""
    lower, upper = np.asarray(lower).reshape(-1), np.asarray(upper).reshape(-1)
    exact_lo, exact_hi = np.asarray(exact_lo).reshape(-1), np.asarray(exact_hi).reshape(-1)
    out = []
    for i in np.flatnonzero((lower > exact_lo + tol) | (upper < exact_hi - tol)):
        out.append(f"coordinate {i}: bounds [{lower[i]:.12g}, {upper[i]:.12g}] miss the exact range "
                   f"[{exact_lo[i]:.12g}, {exact_hi[i]:.12g}] (by {max(lower[i] - exact_lo[i], exact_hi[i] - upper[i]):.3e})")
    return out
