"""Branch and bound on the explanation: split the box until every domain decides.

Complete verification of a property P of v = ∂o/∂x over a box B. B is covered by domains D;
each domain's bound map V_D ⊇ {v(x) : x ∈ D} is sound, so P holds on B when it holds on every
V_D, and the worst case of P over B is at most the worst over the leaves (they cover B).

Two kinds of domain:

- **Neuron splits** (networks whose only nonlinear nodes are ReLU / LeakyReLU / PReLU and
  MaxPool): a domain is B with some pieces of the piecewise-linear nodes fixed. A sign split
  fixes the side of a pre-activation z_j — active z_j > 0 or inactive z_j ≤ 0 (the side of
  f'(0) = a, autograd's convention; f(z) = z or a·z, a = 0 relu, α leaky relu, PReLU's per-
  channel slope of any sign). A window split fixes which tap t of a MaxPool window is its FIRST
  argmax (as torch routes ties): x_t > x_s for the taps s before t, x_t ≥ x_s after; a window's
  children are one per possible tap, and they cover the box. A domain is bounded by interval
  propagation with split pre-activations clamped to their side and f' fixed to 1 or a, a split
  window's output x_t ∈ [max_p l_p, u_t] and its gradient routed to t alone (all exact; a
  window child whose boxes contradict its tap is empty), split-node inputs behind mixing
  layers tightened by back-substitution through the CROWN relaxations of the earlier ones
  (PReLU with a > 1 is concave: the chord bounds it below), the gradient map also bounded by
  a symbolic pass in the relaxed f' of the last free layer (``_symbolic_grad``: CROWN-style
  chords below it, so that coordinates sharing a free neuron stay correlated), and the maps
  intersected with the root map of a tighter engine (sound on every domain, since D ⊆ B).
  With every unstable neuron and every
  ambiguous window split, the gradient of a logit is one constant J_s[c] on the domain
  (exact), and an LP over x ∈ B with the split constraints (s·z_j and x_t − x_s, affine in x
  once every earlier split node is fixed; taken closed, a superset) drops domains that meet
  no point of B. Run to completion, the hull of the leaves is the exact range of every
  gradient coordinate over B (cf. the activation-region enumeration of exact Lipschitz
  methods, Jordan & Dimakis, NeurIPS 2020). The sign split is the ReLU split of beta-CROWN
  (Wang et al., NeurIPS 2021); here a split domain is re-bounded with the fixed pattern rather
  than with split constraints inside the linear relaxation.
- **Input splits** (every other network, e.g. sigmoid / tanh / softplus): a domain is a
  sub-box, bounded by the root engine (CROWN by default) on the sub-box, and a coordinate is
  halved.

Branching: the top candidate by score is split (neurons with the largest |g_j|·min(u_j, −l_j),
the gradient mass through an unstable neuron times its ambiguity, and windows by
|g_w|·(u_(2) − max_p l_p), the runner-up tap's reach past the leader's floor; or the widest input
coordinates weighted by how strongly they drive the first layer); with K > 1 candidates each of
the top K is split tentatively and the one whose worse child has the best worst case of the
property is kept (strong branching; its children are already bounded), which costs 2K
children per split and decided less within a budget than K = 1 (the default). Domains are
bounded in batches (the batch dimension of the engines).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from verigrad.bounds.base import Bounds, EngineResult, EngineUnsupported
from verigrad.bounds.ibp import output_seed_bounds
from verigrad.bounds.rounding import chain_length, gamma
from verigrad.bounds.zonotope import GradZonotope, Lift
from verigrad.graph.gradient_graph import Output
from verigrad.models.network import INPUT, ActKind, Activation, MaxPool, Network, PReLU
from verigrad.operators.affine import Conv2d, Linear
from verigrad.operators.base import IbpContext
from verigrad.operators.interval import Interval, add, mul_interval, mul_nonneg_interval, round_outward
from verigrad.operators.pooling import _scatter_taps, _windows, maxpool_planes, route_interval, tap_states
from verigrad.operators.shape import Add, Concat, Pad, Reshape, Sub, Transpose

if TYPE_CHECKING:
    from verigrad.perturbation import ParamBox

# node kinds a neuron-split domain can be bounded through besides relu / leaky relu activations:
# affine nodes (exact interval rules up to rounding) and the piecewise-linear split nodes PReLU
# (split by the sign of its input) and MaxPool (split by the argmax tap of a window); a fixed
# pattern makes the network affine
NEURON_SPLIT_KINDS = (Linear, Conv2d, Reshape, Transpose, Pad, Concat, Add, Sub, PReLU, MaxPool)
# an LP optimum below this (a distance in input units to the split hyperplanes) means the
# domain meets no point of the box; between it and 0 the domain is kept (degenerate: a face)
LP_DROP = 1e-9
_LP_OPTIONS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}
_ZERO_ROW = 1e-12  # a pre-activation whose gradient norm is below this is constant on the domain


class Branching(str, Enum):
    """How a domain is split: ``property`` = strong branching on the property's worst case
    among the candidates; ``layer`` = the top-scoring neuron of the first activation with an
    unstable one (input splits: the top-weighted coordinate), no tentative bounds — layer by
    layer, so the LP sees every split as soon as it is affine (the fastest way to exactness)."""

    PROPERTY = "property"
    LAYER = "layer"


class Mode(str, Enum):
    """Which domains: ``auto`` = neuron splits where the network allows them, else input splits."""

    AUTO = "auto"
    NEURONS = "neurons"
    INPUT = "input"


class Leaf(str, Enum):
    """How a neuron-split domain's gradient is bounded: ``crown`` = CROWN on the gradient graph
    with the domain's pre-activation boxes, intersected with the interval pass; ``interval`` =
    the interval pass alone (faster per domain, much looser)."""

    CROWN = "crown"
    INTERVAL = "interval"


@dataclass(frozen=True)
class BabOptions:
    """Search budget and strategy (per input and property)."""

    timeout_s: float = 30.0
    max_domains: int = 20_000  # domains bounded (the root and every tentative child counted)
    batch: int = 32  # domains split per step (their children are bounded in one call)
    branching: Branching = Branching.PROPERTY
    # strong-branching candidates per domain; 1 = the top-scored neuron alone (within a budget the
    # search then goes deeper: measured to decide more than 2 or 4, README)
    candidates: int = 1
    mode: Mode = Mode.AUTO
    root: str = "crown"  # the engine whose map every domain is intersected with (and input splits use)
    lp: bool | None = None  # LP feasibility of partly split domains; None = when the input has ≤ 256 coordinates
    leaf: Leaf = Leaf.INTERVAL  # measured: more domains decide more within a budget (README)
    attack_share: float = 0.1  # at most this share of the search's time runs attacks from its worst domains

    def __post_init__(self) -> None:
        object.__setattr__(self, "branching", Branching(self.branching))
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "leaf", Leaf(self.leaf))
        if not (self.timeout_s > 0 and self.max_domains >= 1 and self.batch >= 1 and self.candidates >= 1):
            raise ValueError("bab: timeout_s > 0, max_domains >= 1, batch >= 1 and candidates >= 1 are required")
        if not 0.0 <= self.attack_share < 1.0:
            raise ValueError(f"bab: attack_share must lie in [0, 1), got {self.attack_share}")


@dataclass(frozen=True)
class Objective:
    """What a search decides on one sample. ``worst(maps, boxes)`` is the property's sound
    worst case (D,) over each domain's map of v (boxes: the domains' input boxes, for
    explanations that multiply by x); ``holds(worst)`` says where the property is decided;
    ``sign`` orders worst cases (sign·worst larger = worse); ``check(x)`` judges a point in
    float64 and returns a witness (anything) when the property is violated there."""

    worst: Callable[[Bounds, Bounds], torch.Tensor]
    holds: Callable[[torch.Tensor], torch.Tensor]
    sign: float = 1.0
    check: Callable[[torch.Tensor], object | None] | None = None
    # an exact leaf (every neuron fixed) is decided whatever its map (the width objective: its
    # map is a point up to the rounding allowance, so "width 0" is never met literally)
    exact_decides: bool = False
    # attack(box, start): attacks confined to a domain's input box (1, *S), from ``start`` (a
    # point of the domain, or None) → a witness (judged in float64) or None; the search runs it
    # from its worst open domains (BabOptions.attack_share)
    attack: Callable[[Bounds, torch.Tensor | None], object | None] | None = None
    # sets(z, maps): a sound worst case (D,) from the domains' gradient sets as zonotopes
    # (:class:`~verigrad.bounds.zonotope.GradZonotope`, where the network has them); each
    # domain's worst case is the better of it and worst(maps, boxes)
    sets: Callable[[GradZonotope, Bounds], torch.Tensor] | None = None


@dataclass
class BabResult:
    """The outcome of one search. ``status``: certified (every leaf decides), falsified (a
    witness), unknown (budget exhausted or an undecidable leaf); ``complete``: every leaf is
    exact or decided. ``bounds``: the hull of the leaves' maps (1, *S)."""

    status: str
    worst: float
    bounds: Bounds
    domains: int
    leaves: int
    open: int  # domains left undecided (in the queue or exact but unconfirmed)
    time_s: float
    complete: bool
    mode: Mode
    witness: object | None = None
    notes: tuple[str, ...] = ()
    attacks: int = 0  # attacks run from domains



@dataclass(eq=False)
class _Domain:
    key: float  # sign·worst: larger = worse (split first)
    splits: Any  # neuron mode: {activation index: int8 (*shape)}; input mode: its box, Bounds (1, *S)
    lower: torch.Tensor
    upper: torch.Tensor
    full: bool = False  # neuron mode: no free unstable neuron left
    point: torch.Tensor | None = None  # a point of the domain (an LP optimum)
    info: "tuple[_Pass, int] | None" = None  # neuron mode: (its pass, its row there), for scores and the LP


# ------------------------------------------------------------------------------------------
# Which networks


def neuron_split_reason(net: Network) -> str | None:
    """None when neuron splits apply to ``net``, else why not (naming the node)."""
    for node in net.layers:
        if isinstance(node, Activation):
            if node.kind not in (ActKind.RELU, ActKind.LEAKY_RELU):
                return f"node {node.name!r} is a {node.kind.value} activation (smooth: split the input instead)"
        elif not isinstance(node, NEURON_SPLIT_KINDS):
            return f"node {node.name!r} ({node.op}) has no neuron split rule"
    return None


def _mode(net: Network, opts: BabOptions) -> Mode:
    reason = neuron_split_reason(net)
    if opts.mode == Mode.NEURONS and reason is not None:
        raise EngineUnsupported("bab: neuron splits need piecewise-linear networks (ReLU / LeakyReLU / PReLU, "
                                f"MaxPool, affine nodes): {reason}")
    if opts.mode == Mode.AUTO:
        return Mode.NEURONS if reason is None else Mode.INPUT
    return opts.mode


# ------------------------------------------------------------------------------------------
# Neuron-split domains: interval propagation with a fixed partial pattern


@dataclass
class _Pass:
    grad: Interval  # (D, *S)
    pre: dict[int, Interval]  # split node index → its input box (clamped to the split side for sign splits)
    gout: dict[int, Interval]  # split node index → the gradient box at its output
    empty: torch.Tensor  # (D,) bool: the split pattern contradicts the boxes
    zono: GradZonotope | None = None  # the gradient sets as zonotopes (``_neuron_pass(zonotope=True)``)


# elements of the coefficient matrices one back-substitution chunk may hold (rows × input size)
BACKSUB_ELEMENTS = 20_000_000
# the largest first hidden layer whose gradient sets are kept as zonotopes (its |Gram| is n² floats:
# 79 MB for the CNN's 3136), and the most generators a domain's zonotope keeps (the rest boxed)
ZONOTOPE_WIDTH = 4096
ZONOTOPE_GENERATORS = 128
SIGN_NODES = (Activation, PReLU)  # split by the sign of their input (relu / leaky relu activations, PReLU)


def neg_slope(node: Activation | PReLU, like: torch.Tensor) -> torch.Tensor:
    """The slope a of f(z) = a·z on z ≤ 0, broadcast to ``like``: 0 (relu), α (leaky relu), or
    PReLU's per-channel / scalar slope (any sign, possibly > 1)."""
    if isinstance(node, PReLU):
        return torch.broadcast_to(node.slope.to(dtype=like.dtype, device=like.device), like.shape)
    return torch.full_like(like, node.param if node.kind == ActKind.LEAKY_RELU else 0.0)


def _relu_planes(node: Activation | PReLU, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear bounds sl·z + il ≤ f(z) ≤ su·z + iu for z ∈ [lo, up], f(z) = z (z > 0), a·z (z ≤ 0):
    exact lines on stable or split neurons. On unstable ones f = max(z, a·z) is convex for
    a ≤ 1 (relu, leaky relu, most PReLUs) and f = min(z, a·z) concave for a > 1: the chord
    through (l, a·l) and (u, u) bounds the convex case above and the concave case below, and a
    line through the origin with slope 1 or a (the one nearer f, by |u| vs |l| — CROWN's choice)
    the other side (any slope between 1 and a is valid there)."""
    a = neg_slope(node, lo)
    one, zero = torch.ones_like(lo), torch.zeros_like(lo)
    active = lo >= 0 if s is None else (lo >= 0) | (s > 0)
    inactive = up <= 0 if s is None else (up <= 0) | (s < 0)
    unstable = ~(active | inactive)
    span = torch.where(unstable, up - lo, one)
    chord = torch.where(unstable, (up - a * lo) / span, one)
    icpt = torch.where(unstable, a * lo - chord * lo, zero)
    tangent = torch.where(up > -lo, one, a)
    convex = a <= 1
    sl = torch.where(active, one, torch.where(inactive, a, torch.where(convex, tangent, chord)))
    su = torch.where(active, one, torch.where(inactive, a, torch.where(convex, chord, tangent)))
    il = torch.where(convex, zero, icpt)
    iu = torch.where(convex, icpt, zero)
    return sl, il, su, iu


def _deriv_bounds(node: Activation | PReLU, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None
                  ) -> Interval:
    """f'(z) over z ∈ [lo, up] (f' = 1 on z > 0, a on z ≤ 0 as autograd has it): exact on stable
    and split neurons, [min(a, 1), max(a, 1)] on the others."""
    a = neg_slope(node, lo)
    one = torch.ones_like(lo)
    dl = torch.where(lo > 0, one, torch.where(up <= 0, a, torch.minimum(a, one)))
    du = torch.where(lo > 0, one, torch.where(up <= 0, a, torch.maximum(a, one)))
    if s is not None:
        dl = torch.where(s > 0, one, torch.where(s < 0, a, dl))
        du = torch.where(s > 0, one, torch.where(s < 0, a, du))
    return dl, du


def _tap_onehot(node: MaxPool, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fixed (B, C, 1, L), onehot of the fixed tap (B, C, kk, L)) from a window split s (B, C, L)
    in {0 free, t + 1: tap t is the window's first argmax}."""
    b, c = s.shape[:2]
    sw = s.reshape(b, c, 1, -1).long()
    kk = node.kernel[0] * node.kernel[1]
    taps = torch.arange(kk, device=s.device).reshape(1, 1, kk, 1)
    return sw > 0, taps == sw - 1


def _pool_taps(node: MaxPool, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(certain, possible) argmax taps (B, C, kk, L) on a domain: tap_states of the input box,
    and on a split window its fixed tap alone (the domain holds only points where it is the
    first argmax)."""
    certain, possible = tap_states(lo, up, node)
    if s is None:
        return certain, possible
    fixed, onehot = _tap_onehot(node, s)
    return torch.where(fixed, onehot, certain), torch.where(fixed, onehot, possible)


def _pool_free(node: MaxPool, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """(B, C, L): the windows left ambiguous (two or more possible argmax taps, not split)."""
    _, possible = tap_states(lo, up, node)
    amb = possible.sum(2) >= 2
    return amb if s is None else amb & (s.reshape(amb.shape) == 0)


def _pool_forward(node: MaxPool, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None
                  ) -> tuple[Interval, torch.Tensor]:
    """The output box of a MaxPool on D domains and which domains are empty. A free window:
    [max_p l_p, max_p u_p]. A window split to tap t: its output is x_t, in [max_p l_p, u_t]
    (x_t ≥ x_p ≥ l_p); the domain is empty when an earlier tap has l_s ≥ u_t (x_s ≥ x_t, so t
    is not the FIRST argmax) or a later one l_s > u_t. The boxes are sound enclosures, so an
    empty verdict is a proof; a selection is exact (no rounding allowance)."""
    wl, _ = _windows(lo, node, float("-inf"))
    wu, _ = _windows(up, node, float("-inf"))
    m, top = wl.max(dim=2).values, wu.max(dim=2).values  # (D, C, L)
    bad = torch.zeros(lo.shape[0], dtype=torch.bool, device=lo.device)
    if s is not None:
        fixed, onehot = _tap_onehot(node, s)
        ut = torch.where(onehot, wu, torch.full_like(wu, -math.inf)).max(dim=2, keepdim=True).values
        t = onehot.to(torch.int8).argmax(dim=2, keepdim=True)
        taps = torch.arange(wl.shape[2], device=lo.device).reshape(1, 1, -1, 1)
        clash = ((taps < t) & (wl >= ut)) | ((taps > t) & (wl > ut))  # padding (−∞) never clashes
        bad = (fixed & clash.any(dim=2, keepdim=True)).reshape(lo.shape[0], -1).any(1)
        top = torch.where(fixed.squeeze(2), ut.squeeze(2), top)
        m = torch.minimum(m, top)  # an empty domain keeps a valid (dropped) box
    shape = (lo.shape[0], *node.out_shape([tuple(lo.shape[1:])]))
    return (m.reshape(shape), top.reshape(shape)), bad


def _pool_vjp(node: MaxPool, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None, g: Interval) -> Interval:
    """MaxPool's interval gradient rule on a domain: a certain (or split) tap receives g_w, an
    uncertain one any of {0, g_w}, an impossible one 0; summed over overlapping windows."""
    return route_interval(*_pool_taps(node, lo, up, s), g, node, tuple(lo.shape[1:]))


def _pool_planes(node: MaxPool, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per domain (k, C, kk, L) tap coefficients of y_w ≥ Σ_p low_p·x_p and y_w ≤ Σ_p upp_p·x_p +
    cup_w (cup (k, C, 1, L)): a split window y_w = x_t exactly; a free one maxpool_planes'
    y_w ≥ x_{j*} and y_w ≤ x_{j*} (dominated) or ≤ max_p u_p."""
    onehot, dominated, top = maxpool_planes(lo, up, node)
    low, upp = onehot, onehot * dominated.to(onehot.dtype)
    cup = torch.where(dominated, torch.zeros_like(top), top)
    if s is not None:
        fixed, tap = _tap_onehot(node, s)
        tap = tap.to(onehot.dtype)
        low, upp = torch.where(fixed, tap, low), torch.where(fixed, tap, upp)
        cup = torch.where(fixed, torch.zeros_like(cup), cup)
    return low, upp, cup


def _free(node: Any, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """(D, n) per split node: the free unstable neurons (sign splits) or ambiguous windows."""
    if isinstance(node, MaxPool):
        free = _pool_free(node, lo, up, s)
    else:
        free = _unstable(lo, up, s)
    return free.reshape(lo.shape[0], -1)


def _upstream(net: Network, name: str) -> Iterator[tuple[str, Any]]:
    """The nodes (name, node) reached walking back from node ``name`` (itself included), each
    once, without walking past a split node (it is yielded, its inputs are not)."""
    index = {node.name: i for i, node in enumerate(net.layers)}
    stack, seen = [name], set()
    while stack:
        n = stack.pop()
        if n == INPUT or n in seen:
            continue
        seen.add(n)
        node = net.layers[index[n]]
        yield n, node
        if not isinstance(node, (*SIGN_NODES, MaxPool)):
            stack.extend(net.wiring[index[n]])


def _has_activation_before(net: Network, name: str) -> bool:
    """Whether the node ``name`` depends on a nonlinear split node (its interval box is then
    not exact, and back-substitution can tighten it)."""
    return any(isinstance(node, (*SIGN_NODES, MaxPool)) for _, node in _upstream(net, name))


def _elementwise(node: Any) -> bool:
    """Whether ``node`` maps each output coordinate from one input coordinate (a reshape or
    permutation, a pad, a per-channel scale and shift: a 1×1 convolution with a diagonal
    weight, as a folded BatchNorm)."""
    if isinstance(node, (Reshape, Transpose, Pad)):
        return True
    if isinstance(node, Conv2d) and tuple(node.weight.shape[2:]) == (1, 1) and tuple(node.stride) == (1, 1) \
            and tuple(node.padding) == (0, 0) and node.weight.shape[0] == node.weight.shape[1]:
        w = node.weight[:, :, 0, 0]
        return bool((w == torch.diag(torch.diagonal(w))).all())
    return False


def _backsub_helps(net: Network, name: str) -> bool:
    """Whether back-substitution can tighten the interval box of node ``name``: some path back
    from it reaches a split node through a node that mixes coordinates. Through elementwise
    nodes only, each coordinate's interval box is already that of one split node's output, and
    the relaxation back-substituted from it cannot beat that (its planes evaluated at the
    input's own back-substituted bounds)."""
    return any(not isinstance(node, (*SIGN_NODES, MaxPool)) and not _elementwise(node)
               and _has_activation_before(net, n) for n, node in _upstream(net, name))


def _backsub(net: Network, box: Bounds, i_act: int, pre: dict[int, Interval], splits: dict[int, torch.Tensor],
             z: Interval) -> Interval:
    """CROWN bounds (back-substitution through the linear relaxations of the earlier split
    nodes, on their domain-clamped boxes) on the input tensor of split node ``i_act``, for each
    of the D domains: min over the box of Λ·z with Λ = ±e_j, for the coordinates j that ``z``
    (its interval bounds) leaves ambiguous in some domain — unstable neurons of a sign split,
    the possible taps of a window with two or more of them for a MaxPool (skipped when one
    domain's coefficients exceed BACKSUB_ELEMENTS) — the others keep ``z``."""
    nodes, wiring = net.layers, net.wiring
    zname = wiring[i_act][0]
    zshape = net.shape_of[zname]
    m, n_in = math.prod(zshape), math.prod(net.input_shape)
    d = box.lower.shape[0]
    dt, dev = box.lower.dtype, box.lower.device
    zl, zu = z[0].reshape(d, m), z[1].reshape(d, m)
    width = max(n_in, max(math.prod(sh) for sh in net.shapes))
    target = nodes[i_act]
    if isinstance(target, MaxPool):
        _, possible = tap_states(z[0], z[1], target)
        amb = possible & (possible.sum(2, keepdim=True) >= 2)
        idx = (_scatter_taps(amb.to(dt), target, tuple(zshape)) > 0).reshape(d, m).any(0).nonzero().flatten()
        if 2 * idx.numel() * width > BACKSUB_ELEMENTS:
            return z
    else:
        idx = ((zl < 0) & (zu > 0)).any(0).nonzero().flatten()
    out_lo, out_up = zl.clone(), zu.clone()
    sel = idx.numel()
    if sel == 0:
        return z
    tl = net.memo(("bab", "two-level", i_act, dt, str(dev)), lambda: _two_level(net, i_act, dt, dev))
    if tl is not None:  # one sign node between z and the input: its entries only, or a low-rank update
        if isinstance(tl, _TwoLevel):
            e = int((tl.start[idx + 1] - tl.start[idx]).sum()) * tl.a1_idx.shape[1]
            per = max(1, BACKSUB_ELEMENTS // max(1, e + sel * n_in))
        else:
            per = max(1, BACKSUB_ELEMENTS // (2 * sel * (n_in + tl.a1.shape[0])))
        sp_all = splits.get(tl.s)
        for c0 in range(0, d, per):
            c1 = min(d, c0 + per)
            sp = None if sp_all is None else sp_all[c0:c1]
            s_box = (pre[tl.s][0][c0:c1], pre[tl.s][1][c0:c1])
            low, high = (_backsub_two_level(net, tl, box[c0:c1], s_box, sp, idx) if isinstance(tl, _TwoLevel)
                         else _backsub_dense_two_level(net, tl, box[c0:c1], s_box, sp, idx))
            out_lo[c0:c1, idx] = torch.maximum(out_lo[c0:c1, idx], low)
            out_up[c0:c1, idx] = torch.minimum(out_up[c0:c1, idx], high)
        out_up = torch.maximum(out_lo, out_up)  # both sound: crossing only by round-off
        return out_lo.reshape(d, *zshape), out_up.reshape(d, *zshape)
    per = max(1, BACKSUB_ELEMENTS // (2 * sel * width))  # domains per chunk
    for c0 in range(0, d, per):
        c1 = min(d, c0 + per)
        k = c1 - c0
        rows = 2 * sel
        eye = torch.eye(m, dtype=dt, device=dev)[idx]
        lam = torch.cat([eye, -eye]).reshape(1, rows, *zshape).expand(k, rows, *zshape).reshape(k * rows, *zshape)
        lams: dict[str, torch.Tensor] = {zname: lam}
        const = torch.zeros(k * rows, dtype=dt, device=dev)
        last = next(j for j, node in enumerate(nodes) if node.name == zname)
        for j in range(last, -1, -1):
            node = nodes[j]
            g = lams.pop(node.name, None)
            if g is None:
                continue
            sp = splits.get(j)
            spk = None if sp is None else sp[c0:c1]
            outs: Sequence[torch.Tensor | None]
            if isinstance(node, SIGN_NODES):
                sl, il, su, iu = (t.unsqueeze(1) for t in _relu_planes(node, pre[j][0][c0:c1], pre[j][1][c0:c1], spk))
                gk = g.reshape(k, rows, *g.shape[1:])
                pos, neg = gk.clamp(min=0), gk.clamp(max=0)
                outs = ((pos * sl + neg * su).reshape(g.shape),)
                const = const + (pos * il + neg * iu).reshape(k * rows, -1).sum(1)
            elif isinstance(node, MaxPool):
                low, upp, cup = (t.unsqueeze(1) for t in _pool_planes(node, pre[j][0][c0:c1], pre[j][1][c0:c1], spk))
                ch, kk, nw = low.shape[2:]
                gw = g.reshape(k, rows, ch, 1, nw)
                pos, neg = gw.clamp(min=0), gw.clamp(max=0)
                taps = (pos * low + neg * upp).reshape(k * rows, ch, kk, nw)
                outs = (_scatter_taps(taps, node, net.in_shapes(j)[0]),)
                const = const + (neg * cup).reshape(k * rows, -1).sum(1)
            else:
                shapes = net.in_shapes(j)
                zeros = [torch.zeros(1, *sh, dtype=dt, device=dev) for sh in shapes]
                const = const + (g * node.forward(zeros)).flatten(1).sum(1)
                outs = node.vjp(zeros, g, shapes)
            for name, gi in zip(wiring[j], outs, strict=True):
                if gi is not None:
                    lams[name] = lams[name] + gi if name in lams else gi
        lx = lams[INPUT].reshape(k, rows, n_in)
        bl = box.lower[c0:c1].reshape(k, 1, n_in)
        bu = box.upper[c0:c1].reshape(k, 1, n_in)
        low_x = (lx.clamp(min=0) * bl + lx.clamp(max=0) * bu).sum(2) + const.reshape(k, rows)
        out_lo[c0:c1, idx] = torch.maximum(out_lo[c0:c1, idx], low_x[:, :sel])
        out_up[c0:c1, idx] = torch.minimum(out_up[c0:c1, idx], -low_x[:, sel:])
    out_up = torch.maximum(out_lo, out_up)  # both sound: crossing only by round-off
    return out_lo.reshape(d, *zshape), out_up.reshape(d, *zshape)


# dense Jacobian elements (rows × columns) the two-level back-substitution may build while
# sparsifying an affine chain, per chunk, and the density above which it is not worth it
_JAC_CHUNK = 4_000_000
_SPARSE_DENSITY = 0.25


@dataclass(frozen=True)
class _TwoLevel:
    """z = A2·f(A1·x + c1) + c2 for the input z of a split node: two affine chains around one
    sign node ``s`` (index), A2 as its nonzero entries (row, col, val) sorted by row with
    ``start[r]`` the first entry of row r, A1 in ELL form (``a1_idx``, ``a1_val``: (n_s, K1),
    padded with zero values)."""

    s: int
    start: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    c2: torch.Tensor
    a1_idx: torch.Tensor
    a1_val: torch.Tensor
    c1: torch.Tensor


@dataclass(frozen=True)
class _DenseTwoLevel:
    """z = A2·f(A1·x + c1) + c2 as for :class:`_TwoLevel`, with A2 (m, n_s) and A1 (n_s, n_in)
    dense (fully connected layers): bounded by :func:`_backsub_dense_two_level`."""

    s: int
    a2: torch.Tensor
    c2: torch.Tensor
    a1: torch.Tensor
    c1: torch.Tensor


def _affine_chain(net: Network, name: str) -> tuple[list[int], int | None]:
    """The single-input Linear / Conv2d / Reshape nodes walking back from node ``name``, and
    the index of the first node that is not one (None: the chain starts at the input)."""
    index = {node.name: i for i, node in enumerate(net.layers)}
    chain: list[int] = []
    while name != INPUT:
        i = index[name]
        if not isinstance(net.layers[i], (Linear, Conv2d, Reshape)):
            return chain, i
        chain.append(i)
        name = net.wiring[i][0]
    return chain, None


def _chain_jacobian(net: Network, chain: list[int], out_name: str, in_name: str, dtype: torch.dtype,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(row, col, val) of the nonzero entries of ∂out/∂in through the affine ``chain`` (walked
    back from ``out_name``) and its constant term out(0); None past BACKSUB_ELEMENTS entries."""
    m = math.prod(net.shape_of[out_name])
    n = math.prod(net.shape_of[in_name])
    rows, cols, vals = [], [], []
    per = max(1, _JAC_CHUNK // max(n, 1))
    for r0 in range(0, m, per):
        r1 = min(m, r0 + per)
        g = torch.zeros(r1 - r0, m, dtype=dtype, device=device)
        g[torch.arange(r1 - r0, device=device), torch.arange(r0, r1, device=device)] = 1
        g = g.reshape(r1 - r0, *net.shape_of[out_name])
        for i in chain:
            node = net.layers[i]
            shapes = net.in_shapes(i)
            zeros = [torch.zeros(1, *sh, dtype=dtype, device=device) for sh in shapes]
            gi = node.vjp(zeros, g, shapes)[0]
            assert gi is not None  # an affine node passes the gradient to its one input
            g = gi
        j = g.reshape(r1 - r0, n)
        nz = j.nonzero()
        rows.append(nz[:, 0] + r0)
        cols.append(nz[:, 1])
        vals.append(j[nz[:, 0], nz[:, 1]])
        if sum(v.numel() for v in vals) > BACKSUB_ELEMENTS:
            return None
    x = torch.zeros(1, *net.shape_of[in_name], dtype=dtype, device=device)
    for i in reversed(chain):
        x = net.layers[i].forward([x])
    return torch.cat(rows), torch.cat(cols), torch.cat(vals), x.reshape(-1)


def _two_level(net: Network, i_act: int, dtype: torch.dtype, device: torch.device
               ) -> _TwoLevel | _DenseTwoLevel | None:
    """The two-level structure of split node ``i_act``'s input, when it has one: sparse when A1
    or A2 is (convolutions: there the generic back-substitution is dense and slow), dense
    otherwise (the generic pass would multiply identity rows through A2 and every column of
    A1 for every domain)."""
    zname = net.wiring[i_act][0]
    chain2, s = _affine_chain(net, zname)
    if s is None or not chain2 or not isinstance(net.layers[s], SIGN_NODES):
        return None
    chain1, src = _affine_chain(net, net.wiring[s][0])
    if src is not None or not chain1:
        return None
    s_name = net.layers[s].name
    m, n_s, n_in = math.prod(net.shape_of[zname]), math.prod(net.shape_of[s_name]), math.prod(net.input_shape)
    j2 = _chain_jacobian(net, chain2, zname, s_name, dtype, device)
    j1 = None if j2 is None else _chain_jacobian(net, chain1, net.wiring[s][0], INPUT, dtype, device)
    if j2 is None or j1 is None:
        return None
    (r2, c2i, v2, c2), (r1, c1i, v1, c1) = j2, j1
    if min(v2.numel() / (m * n_s), v1.numel() / (n_s * n_in)) > _SPARSE_DENSITY:
        a2 = torch.zeros(m, n_s, dtype=dtype, device=device)
        a1 = torch.zeros(n_s, n_in, dtype=dtype, device=device)
        a2[r2, c2i], a1[r1, c1i] = v2, v1
        return _DenseTwoLevel(s, a2, c2, a1, c1)
    order = torch.argsort(r2, stable=True)
    r2, c2i, v2 = r2[order], c2i[order], v2[order]
    start = torch.searchsorted(r2, torch.arange(m + 1, device=device))
    k1 = int(torch.bincount(r1, minlength=n_s).max()) if r1.numel() else 1
    a1_idx = torch.zeros(n_s, k1, dtype=torch.long, device=device)
    a1_val = torch.zeros(n_s, k1, dtype=dtype, device=device)
    order = torch.argsort(r1, stable=True)
    r1, c1i, v1 = r1[order], c1i[order], v1[order]
    pos = torch.arange(r1.numel(), device=device) - torch.searchsorted(r1, r1)
    a1_idx[r1, pos], a1_val[r1, pos] = c1i, v1
    return _TwoLevel(s, start, c2i, v2, c2, a1_idx, a1_val, c1)


def _row_entries(tl: _TwoLevel, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A2's nonzero entries in rows ``idx``: (the position of each entry's row in idx, its
    column, its value)."""
    counts = tl.start[idx + 1] - tl.start[idx]
    ent = torch.repeat_interleave(tl.start[idx], counts) + (torch.arange(int(counts.sum()), device=idx.device)
                                                            - torch.repeat_interleave(counts.cumsum(0) - counts, counts))
    row = torch.repeat_interleave(torch.arange(idx.numel(), device=idx.device), counts)
    return row, tl.col[ent], tl.val[ent]


def _backsub_two_level(net: Network, tl: _TwoLevel, box: Bounds, s_box: Interval, sp: torch.Tensor | None,
                       idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds (D, |idx|) of z_r = Σ_p A2[r,p]·f(y_p) + c2_r, y = A1·x + c1, over
    the box: f replaced by its lower plane where A2[r,p] > 0 and its upper plane where < 0 (for
    the lower bound; swapped for the upper), then y substituted and minimised over x. The
    same relaxation as the generic :func:`_backsub` through one sign node, summed over the
    sparse entries only."""
    d = box.lower.shape[0]
    n_in = math.prod(net.input_shape)
    node = net.layers[tl.s]
    assert isinstance(node, SIGN_NODES)
    sl, il, su, iu = (t.reshape(d, -1) for t in _relu_planes(node, s_box[0], s_box[1], sp))
    row, col, w = _row_entries(tl, idx)
    pos = w > 0
    lo_s = torch.where(pos, sl[:, col], su[:, col]) * w  # (D, E): coefficient of y_p in the lower bound
    up_s = torch.where(pos, su[:, col], sl[:, col]) * w
    lo_i = torch.where(pos, il[:, col], iu[:, col]) * w
    up_i = torch.where(pos, iu[:, col], il[:, col]) * w
    sel = idx.numel()
    const_lo = tl.c2[idx].expand(d, sel).clone()
    const_up = const_lo.clone()
    const_lo.index_add_(1, row, lo_i + lo_s * tl.c1[col])
    const_up.index_add_(1, row, up_i + up_s * tl.c1[col])
    # x coefficients: Σ_p coef_p·A1[p, :], scattered from the ELL rows of A1
    target = (row.unsqueeze(1) * n_in + tl.a1_idx[col]).reshape(-1)  # (E·K1,)
    a1 = tl.a1_val[col]  # (E, K1)
    lam_lo = torch.zeros(d, sel * n_in, dtype=sl.dtype, device=sl.device)
    lam_up = torch.zeros_like(lam_lo)
    lam_lo.index_add_(1, target, (lo_s.unsqueeze(2) * a1).reshape(d, -1))
    lam_up.index_add_(1, target, (up_s.unsqueeze(2) * a1).reshape(d, -1))
    bl, bu = box.lower.reshape(d, 1, n_in), box.upper.reshape(d, 1, n_in)
    lam_lo, lam_up = lam_lo.reshape(d, sel, n_in), lam_up.reshape(d, sel, n_in)
    low = const_lo + (lam_lo.clamp(min=0) * bl + lam_lo.clamp(max=0) * bu).sum(2)
    high = const_up + (lam_up.clamp(min=0) * bu + lam_up.clamp(max=0) * bl).sum(2)
    return low, high


def _backsub_dense_two_level(net: Network, tl: _DenseTwoLevel, box: Bounds, s_box: Interval,
                             sp: torch.Tensor | None, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_backsub_two_level`'s relaxation with dense A2, A1: the x coefficients of row r are
    Λ_r = Σ_p A2[r,p]·s_p·A1[p,:] with s_p the chosen plane's slope. Columns p with one line in
    every domain (stable neurons: slope 1 or a, no intercept) share one product P, computed
    once per call; each domain adds only its own columns' (split or unstable neurons) rank-|U|
    term, so a domain costs |U|/n_s of the dense product."""
    d = box.lower.shape[0]
    n_in = math.prod(net.input_shape)
    node = net.layers[tl.s]
    assert isinstance(node, SIGN_NODES)
    sl, il, su, iu = (t.reshape(d, -1) for t in _relu_planes(node, s_box[0], s_box[1], sp))
    shared = ((sl == sl[:1]) & (su == sl[:1]) & (il == 0) & (iu == 0)).all(0)
    own = (~shared).nonzero().flatten()
    rows = tl.a2[idx]
    w, ws = rows[:, own], rows[:, shared] * sl[0, shared]  # (sel, |U|), (sel, n_s − |U|)
    base, base_c = ws @ tl.a1[shared], tl.c2[idx] + ws @ tl.c1[shared]  # (sel, n_in), (sel,)
    sl, il, su, iu = sl[:, own, None], il[:, own, None], su[:, own, None], iu[:, own, None]
    pos = (w > 0).T  # (|U|, sel)
    wt = w.T
    # (D, |U|, sel): each own column's coefficient in the lower and the upper bound of row r
    lo_s, up_s = torch.where(pos, sl, su) * wt, torch.where(pos, su, sl) * wt
    c1 = tl.c1[own]
    const_lo = base_c + ((torch.where(pos, il, iu) * wt).sum(1) + (lo_s * c1[:, None]).sum(1))
    const_up = base_c + ((torch.where(pos, iu, il) * wt).sum(1) + (up_s * c1[:, None]).sum(1))
    a1u = tl.a1[own].expand(d, own.numel(), n_in)
    lam_lo = torch.baddbmm(base.expand(d, *base.shape), lo_s.transpose(1, 2), a1u)
    lam_up = torch.baddbmm(base.expand(d, *base.shape), up_s.transpose(1, 2), a1u)
    if box.lower.stride(0) == 0 and box.upper.stride(0) == 0:  # one box for every domain (neuron splits)
        bl, bu = box.lower[0].reshape(n_in), box.upper[0].reshape(n_in)
        low = const_lo + lam_lo.clamp(min=0) @ bl + lam_lo.clamp(max=0) @ bu
        high = const_up + lam_up.clamp(min=0) @ bu + lam_up.clamp(max=0) @ bl
        return low, high
    bl, bu = box.lower.reshape(d, n_in, 1), box.upper.reshape(d, n_in, 1)
    low = const_lo + (lam_lo.clamp(min=0) @ bl + lam_lo.clamp(max=0) @ bu)[:, :, 0]
    high = const_up + (lam_up.clamp(min=0) @ bu + lam_up.clamp(max=0) @ bl)[:, :, 0]
    return low, high


@dataclass(frozen=True)
class _Rounding:
    """Rigorous round-off allowances of a neuron pass on one box: γ_n·M with M the absolute
    evaluation of each computed sum (Higham §3.1): ``fwd[name]`` for the interval (and
    back-substituted) bounds of a node's value, ``grad`` for the input gradient (the interval
    pass and a fixed pattern's exact map alike). M is computed once per box: every domain's
    boxes lie inside it, and split neurons only fix slopes within the same ranges."""

    fwd: dict[str, torch.Tensor]
    grad: torch.Tensor
    sym: torch.Tensor  # the symbolic gradient pass (:func:`_symbolic_grad`)


def _act_slope_max(node: Activation | PReLU) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(max |slope|, max |intercept| / |z|) over the lines _relu_planes and the exact f' use:
    slopes 1, a and chords between them (a convex combination of 1 and a), so ≤ max(1, |a|);
    a chord's intercept a·l − c·l has |a − c| ≤ |1 − a|. PReLU: per element (its slope's shape)."""
    if isinstance(node, PReLU):
        return node.slope.abs().clamp(min=1.0), (1.0 - node.slope).abs()
    alpha = node.param if node.kind == ActKind.LEAKY_RELU else 0.0
    return max(1.0, abs(alpha)), abs(1.0 - alpha)


def _rounding(net: Network, box: Bounds, output: Output) -> _Rounding:
    """M of both passes by interval rules on the symmetric boxes [−M, M] (an affine rule there
    gives exactly |W|·M + |b|), sign-split nodes by their largest slope and intercept. A MaxPool
    selects one input (exact) and its relaxation's constant max_p u_p is at most max_p M_p, so
    its forward M is the window's max; backward a tap may receive the gradient of every window
    that reads it, so its M is their sum (the fold adds up to kh·kw terms: n grows by kh·kw)."""
    nodes, wiring, ctx = net.layers, net.wiring, IbpContext()
    extra = sum(node.kernel[0] * node.kernel[1] for node in nodes if isinstance(node, MaxPool))
    g = gamma(chain_length(net) + extra, box.lower.dtype)
    mag: dict[str, torch.Tensor] = {INPUT: torch.maximum(box.lower.abs(), box.upper.abs())}
    for i, node in enumerate(nodes):
        ms = [mag[m] for m in wiring[i]]
        if isinstance(node, SIGN_NODES):
            slope, icpt = _act_slope_max(node)
            mag[node.name] = (slope + icpt) * ms[0]
        elif isinstance(node, MaxPool):
            mag[node.name] = node.forward([ms[0]])
        else:
            lo, up = node.ibp_forward([(-m, m) for m in ms], net.in_shapes(i), ctx)
            mag[node.name] = torch.maximum(lo.abs(), up.abs())
    # the symbolic pass's forms also sum over the V ≤ (largest sign node) basis variables
    nsign = max((math.prod(net.in_shapes(i)[0]) for i, node in enumerate(nodes) if isinstance(node, SIGN_NODES)),
            default=0)
    g_sym = gamma(chain_length(net) + extra + nsign, box.lower.dtype)
    grad = _grad_magnitude(net, mag, output, False)
    return _Rounding({k: g * v for k, v in mag.items()}, g * grad, g_sym * _grad_magnitude(net, mag, output, True))


def _grad_magnitude(net: Network, mag: dict[str, torch.Tensor], output: Output, chords: bool) -> torch.Tensor:
    """M of the gradient pass given the forward magnitudes ``mag``: a sign node scales by its
    largest slope, and with ``chords`` (the symbolic pass) by slope + intercept, since a chord
    a·y + b has |a| ≤ max slope and |b| ≤ |1 − a_neg|·|y|, and a basis variable's step w_u − w_l
    is at most twice the product's magnitude."""
    nodes, wiring, ctx = net.layers, net.wiring, IbpContext()
    # the seed's terms are at most 1 (e_c, softmax probabilities, their products)
    last = nodes[-1].name
    grads: dict[str, torch.Tensor] = {last: torch.full_like(mag[last], 1.0 if output == Output.LOGIT else 2.0)}
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        gm = grads.pop(node.name)
        outs: Sequence[torch.Tensor | None]
        if isinstance(node, SIGN_NODES):
            slope, icpt = _act_slope_max(node)
            outs = ((2 * slope + icpt if chords else slope) * gm,)
        elif isinstance(node, MaxPool):
            b, c = gm.shape[:2]
            kk = node.kernel[0] * node.kernel[1]
            taps = (3 if chords else 1) * gm.reshape(b, c, 1, -1).expand(b, c, kk, -1)  # a chord of max(0, ·)
            outs = (_scatter_taps(taps, node, net.in_shapes(i)[0]),)
        else:
            ivs = node.ibp_vjp([(-mag[m], mag[m]) for m in wiring[i]], (-gm, gm), net.in_shapes(i), ctx)
            outs = tuple(None if iv is None else torch.maximum(iv[0].abs(), iv[1].abs()) for iv in ivs)
        for name, gi in zip(wiring[i], outs, strict=True):
            if gi is not None:
                grads[name] = grads[name] + gi if name in grads else gi
    return grads[INPUT]


def _neuron_pass(net: Network, box: Bounds, target: torch.Tensor, output: Output,
                 splits: dict[int, torch.Tensor], backsub: bool = True, rnd: _Rounding | None = None,
                 symbolic: bool = True, root_pre: dict[int, Interval] | None = None,
                 zonotope: bool = False) -> _Pass:
    """IBP over D domains at once: the box (D, *S); ``splits[i]`` for a sign-split node (relu,
    leaky relu, PReLU) is (D, *shape of its input) in {+1 active, −1 inactive, 0 free}, for a
    MaxPool (D, C, windows) in {t + 1: tap t is the window's first argmax, 0 free}. With
    ``backsub``, every split node's input behind another split node is also bounded by
    back-substitution (``_backsub``) and the two intersected; with ``symbolic``, the gradient
    map is also bounded by :func:`_symbolic_grad` and the two intersected; ``root_pre`` (the
    split nodes' input boxes of a pass on the whole box, (1, *shape)) is intersected with each
    domain's before back-substitution, so that only the coordinates still ambiguous after both
    are back-substituted (a domain whose boxes cross has no point: it is empty). With
    ``zonotope`` (and ``symbolic``), the pass also keeps each domain's gradient set as a
    :class:`~verigrad.bounds.zonotope.GradZonotope` where :func:`_first_lift` applies (the
    symbolic forms at the first sign node's input, the allowance ``rnd.sym``). Rigorous: every value bound and
    the gradient are widened by their round-off allowances ``rnd`` (:func:`_rounding` of the
    box, computed here if not given), so no neuron is fixed by round-off and the map encloses
    the exact one; relu and MaxPool outputs are exact functions of their input's bounds (max
    with 0, a selection), so they need none."""
    if rnd is None:
        rnd = _rounding(net, box[0:1], output)
    nodes, wiring = net.layers, net.wiring
    n, ctx = len(nodes), IbpContext()
    d = box.lower.shape[0]
    empty = torch.zeros(d, dtype=torch.bool, device=box.lower.device)
    vals: dict[str, Interval] = {INPUT: (box.lower, box.upper)}
    pre: dict[int, Interval] = {}
    # the split nodes whose input back-substitution can tighten (the others' boxes are exact or as good)
    behind = net.memo(("bab", "behind"), lambda: frozenset(
        j for j in _split_nodes(net) if _backsub_helps(net, wiring[j][0])))
    stop = n if output != Output.LOGIT else n - 1
    for i in range(stop):
        node, xs = nodes[i], [vals[m] for m in wiring[i]]
        if isinstance(node, (*SIGN_NODES, MaxPool)):
            lo, up = xs[0]
            if root_pre is not None and i in root_pre:
                lo, up = torch.maximum(lo, root_pre[i][0]), torch.minimum(up, root_pre[i][1])
                empty |= (lo > up).reshape(d, -1).any(1)
                lo = torch.minimum(lo, up)
            if backsub and i in behind:
                lo, up = round_outward(_backsub(net, box, i, pre, splits, (lo, up)), rnd.fwd[wiring[i][0]])
            s = splits.get(i)
            if isinstance(node, MaxPool):
                pre[i] = (lo, up)
                vals[node.name], bad = _pool_forward(node, lo, up, s)
                empty |= bad
                continue
            if s is not None:
                bad = ((s > 0) & (up <= 0)) | ((s < 0) & (lo > 0))
                empty |= bad.reshape(d, -1).any(1)
                lo = torch.where(s > 0, lo.clamp(min=0), lo)
                up = torch.where(s < 0, up.clamp(max=0), up)
                lo = torch.minimum(lo, up)  # an empty domain keeps a valid (dropped) box
            pre[i] = (lo, up)
            xs = [(lo, up)]
            if isinstance(node, Activation) and node.kind == ActKind.RELU:
                # exact: a dead relu's box stays [0, 0], so a MaxPool reading it sees the tie
                vals[node.name] = node.ibp_forward(xs, net.in_shapes(i), ctx)
                continue
        vals[node.name] = round_outward(node.ibp_forward(xs, net.in_shapes(i), ctx), rnd.fwd[node.name])
    seed = output_seed_bounds(vals.get(nodes[-1].name), target, output, net.num_classes, box.lower.dtype,
                              box.lower.device)
    seed = (seed[0].reshape(d, *net.shapes[-1]), seed[1].reshape(d, *net.shapes[-1]))
    grads: dict[str, Interval] = {nodes[-1].name: seed}
    gout: dict[int, Interval] = {}
    for i in range(n - 1, -1, -1):
        node = nodes[i]
        g = grads.pop(node.name)
        outs: Sequence[Interval | None]
        if isinstance(node, MaxPool):
            gout[i] = g
            outs = (_pool_vjp(node, *pre[i], splits.get(i), g),)
        elif isinstance(node, SIGN_NODES):
            gout[i] = g
            dv = _deriv_bounds(node, *pre[i], splits.get(i))
            # a PReLU slope may be negative: the general interval product
            outs = (mul_interval(dv, g) if isinstance(node, PReLU) else mul_nonneg_interval(dv, g),)
        else:
            outs = node.ibp_vjp([vals[m] for m in wiring[i]], g, net.in_shapes(i), ctx)
        for name, gi in zip(wiring[i], outs, strict=True):
            if gi is not None:
                grads[name] = add(grads[name], gi) if name in grads else gi
    glo, gup = round_outward(grads[INPUT], rnd.grad)
    sym, hid = _symbolic(net, seed, pre, splits, zonotope) if symbolic else (None, None)
    if sym is not None:
        slo, sup = round_outward(sym, rnd.sym)
        glo, gup = torch.maximum(glo, slo), torch.minimum(gup, sup)
        gup = torch.maximum(glo, gup)  # both sound: crossing only by round-off
    zono = None if hid is None else hid.widened(rnd.sym.reshape(1, -1).expand(d, -1))
    return _Pass((glo, gup), pre, gout, empty, zono)


# ----------------------------------------------------------------------------------------
# The symbolic gradient pass: linear bounds in the σ′ of one layer's unstable neurons


@dataclass(frozen=True)
class _Form:
    """Bounds on a gradient tensor that are linear in δ ∈ [0, 1]^V: for every δ the value lies
    in [m(δ) − r(δ), m(δ) + r(δ)], m(δ) = mid[:, 0] + Σ_k δ_k·mid[:, k] (r likewise, r(δ) ≥ 0
    on the box). Slices (D, K, *shape): K = 1 is a plain interval (no δ), K = V + 1 otherwise;
    ``rad`` may hold fewer slices than ``mid`` (the missing coefficients are 0: from the basis
    to the next relaxation r is constant, and mapping its zero slices would cost as much as m's)."""

    mid: torch.Tensor
    rad: torch.Tensor

    @staticmethod
    def interval(lo: torch.Tensor, up: torch.Tensor) -> "_Form":
        return _Form(((lo + up) / 2).unsqueeze(1), ((up - lo) / 2).unsqueeze(1))

    def ends(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The coefficients of the lower form m − r and the upper form m + r, (D, K, *shape)."""
        k = self.rad.shape[1]
        lo, up = self.mid.clone(), self.mid.clone()
        lo[:, :k] -= self.rad
        up[:, :k] += self.rad
        return lo, up

    def bounds(self) -> Interval:
        """(min over δ of m(δ) − r(δ), max over δ of m(δ) + r(δ))."""
        lo, up = self.ends()
        return _range(lo)[0][:, 0], _range(up)[1][:, 0]

    def __add__(self, other: "_Form") -> "_Form":
        return _Form(_padded_sum(self.mid, other.mid), _padded_sum(self.rad, other.rad))


def _padded(t: torch.Tensor, k: int) -> torch.Tensor:
    """t with zero slices appended along dim 1 up to k."""
    if t.shape[1] == k:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], k - t.shape[1], *t.shape[2:])], 1)


def _padded_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b over slices (dim 1), the shorter one padded with zero slices."""
    if a.shape[1] < b.shape[1]:
        a, b = b, a
    if a.shape[1] == b.shape[1]:
        return a + b
    out = a.clone()
    out[:, :b.shape[1]] += b
    return out


def _abs_vjp(node: Any, zeros: Sequence[torch.Tensor], g: torch.Tensor, in_shapes: Sequence[tuple[int, ...]]
             ) -> tuple[torch.Tensor | None, ...]:
    """|J|ᵀ g for an affine node with Jacobian J (``zeros``: its inputs at 0, as ``vjp`` takes
    them): |W| for Linear / Conv2d, J itself for the selections and sums whose entries are 0 / 1,
    and |J| = [I, I] for Sub."""
    if isinstance(node, (Linear, Conv2d)):
        t = dict(node.tensors(in_shapes))
        t["weight"] = t["weight"].abs()
        return node.vjp(zeros, g, in_shapes, t)
    if isinstance(node, Sub):
        return (g, g)
    if isinstance(node, (Reshape, Transpose, Pad, Concat, Add)):
        return node.vjp(zeros, g, in_shapes)
    raise EngineUnsupported(f"bab: no symbolic gradient rule for {type(node).__name__} node {node.name!r}")


def _form_affine(node: Any, f: _Form, in_shapes: Sequence[tuple[int, ...]]) -> tuple[_Form | None, ...]:
    """Jᵀ g ∈ [Jᵀm − |J|ᵀr, Jᵀm + |J|ᵀr] for g ∈ [m − r, m + r], slice by slice (both maps are linear)."""
    d, k, kr = f.mid.shape[0], f.mid.shape[1], f.rad.shape[1]
    zeros = [torch.zeros(1, *sh, dtype=f.mid.dtype, device=f.mid.device) for sh in in_shapes]
    mids = node.vjp(zeros, f.mid.reshape(d * k, *f.mid.shape[2:]), in_shapes)
    rads = _abs_vjp(node, zeros, f.rad.reshape(d * kr, *f.rad.shape[2:]), in_shapes)
    out: list[_Form | None] = []
    for m, r in zip(mids, rads, strict=True):
        out.append(None if m is None or r is None
                   else _Form(m.reshape(d, k, *m.shape[1:]), r.reshape(d, kr, *r.shape[1:])))
    return tuple(out)


def _chord(lo_s: torch.Tensor, hi_s: torch.Tensor, p: torch.Tensor, q: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The line a·y + b through (p, h(p)) and (q, h(q)) for h(y) = hi_s·max(0, y) + lo_s·min(0, y),
    or h itself where [p, q] does not straddle 0."""
    h = lambda y: hi_s * y.clamp(min=0) + lo_s * y.clamp(max=0)  # noqa: E731
    straddle = (p < 0) & (q > 0)
    a = torch.where(straddle, (h(q) - h(p)) / torch.where(straddle, q - p, torch.ones_like(p)),
                    torch.where(q <= 0, lo_s, hi_s))
    b = torch.where(straddle, h(p) - a * p, torch.zeros_like(p))
    return a, b


def _basis_products(node: Activation | PReLU, f: _Form, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The basis node's f′ ⊙ g over the hull [w_l, w_u] of each product (g the interval
    ``f``): (the constant c0 and radius r0, (D, *shape); the steps w_u − w_l (D, V) of the V
    neurons ``idx`` (flat) free in some domain). A free neuron k is w_l + δ_k·step_k exactly
    (c0 = w_l, r0 = 0); a fixed one is the interval [c0 − r0, c0 + r0] (its step 0)."""
    assert f.mid.shape[1] == 1  # nothing below the basis node has introduced variables yet
    dl, du = _deriv_bounds(node, lo, up, s)
    wl, wu = mul_interval((dl, du), f.bounds())
    free = dl != du
    idx = free.reshape(free.shape[0], -1).any(0).nonzero().flatten()
    c0 = torch.where(free, wl, (wl + wu) / 2)
    r0 = torch.where(free, torch.zeros_like(wl), (wu - wl) / 2)
    step = torch.where(free, wu - wl, torch.zeros_like(wl)).reshape(free.shape[0], -1)[:, idx]
    return c0, r0, step, idx


def _form_sign(node: Activation | PReLU, f: _Form, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None,
               basis: bool) -> _Form:
    """f′(z) ⊙ g for f′ ∈ [dl, du] (exact where fixed). At the ``basis`` node g is an interval
    and each free neuron k gets its own variable: f′_k·g_k = w_l + δ_k·(w_u − w_l) over the hull
    [w_l, w_u] of the product, exact in δ_k. Elsewhere, with dl ≥ 0, d·y ≤ du·y⁺ + dl·y⁻ is
    convex and increasing in y, so it is at most its chord over the range of the upper form U,
    evaluated at U(δ); the lower side is the concave dl·y⁺ + du·y⁻ at the lower form, above its
    chord (relaxations in the style of CROWN, Zhang et al. 2018). A fixed f′ = c scales
    exactly; a free one with dl < 0 (a negative PReLU slope) falls back to the interval product."""
    if basis:
        c0, r0, step, idx = _basis_products(node, f, lo, up, s)
        d, shape = c0.shape[0], c0.shape[1:]
        mid = torch.zeros(d, 1 + idx.numel(), math.prod(shape), dtype=c0.dtype, device=c0.device)
        mid[:, 0] = c0.reshape(d, -1)
        mid[:, 1 + torch.arange(idx.numel(), device=c0.device), idx] = step
        return _Form(mid.reshape(d, -1, *shape), r0.unsqueeze(1))
    dl, du = (t.unsqueeze(1) for t in _deriv_bounds(node, lo, up, s))
    fixed = dl == du
    ut, lt = _relaxed_product(*f.ends(), dl, du)
    mid, rad = (ut + lt) / 2, (ut - lt) / 2
    c = dl  # a fixed f′ scales exactly (any sign)
    mid = torch.where(fixed, c * f.mid, mid)
    rad = torch.where(fixed, _padded(c.abs() * f.rad, rad.shape[1]), rad)
    neg = ~fixed & (dl < 0)
    if bool(neg.any()):
        il, iu = mul_interval((dl[:, 0], du[:, 0]), f.bounds())
        box = _Form.interval(il, iu)
        mid = torch.where(neg, _padded(box.mid, mid.shape[1]), mid)
        rad = torch.where(neg, _padded(box.rad, rad.shape[1]), rad)
    return _Form(mid, rad)


def _relaxed_product(lo_form: torch.Tensor, up_form: torch.Tensor, dl: torch.Tensor, du: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper and lower forms of d·y for d ∈ [dl, du], 0 ≤ dl, and y between the lower and upper
    forms: the chord of the convex du·y⁺ + dl·y⁻ over the upper form's range, taken at the
    upper form (it is increasing, so at most that at U(δ)), and the chord of the concave
    dl·y⁺ + du·y⁻ over the lower form's range at the lower form."""
    au, bu = _chord(dl, du, *_range(up_form))
    al, bl = _chord(du, dl, *_range(lo_form))
    ut, lt = au * up_form, al * lo_form
    ut[:, 0] += bu[:, 0]
    lt[:, 0] += bl[:, 0]
    return ut, lt


def _form_pool(node: MaxPool, f: _Form, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None,
               in_shape: Sequence[int]) -> _Form:
    """MaxPool's gradient rule on forms: a certain (or split) tap receives its window's g_w, an
    impossible one 0, an uncertain one m·g_w with m ∈ {0, 1}, bounded by the chords of max(0, ·)
    at the upper form and of min(0, ·) at the lower one; the taps are summed over overlapping
    windows (a fold: linear with nonnegative weights)."""
    certain, possible = (t.unsqueeze(1) for t in _pool_taps(node, lo, up, s))
    d, k = f.mid.shape[:2]
    c, kk = certain.shape[2:4]
    lo_form, up_form = (t.reshape(d, k, c, 1, -1) for t in f.ends())
    mid = f.mid.reshape(d, k, c, 1, -1)
    rad = _padded(f.rad, k).reshape(d, k, c, 1, -1)
    zero = torch.zeros_like(mid[:, :1])
    ut, lt = _relaxed_product(lo_form, up_form, zero, zero + 1)  # m ∈ [0, 1]
    uncertain = possible & ~certain
    tm = torch.where(certain, mid, torch.where(uncertain, (ut + lt) / 2, torch.zeros_like(mid)))
    tr = torch.where(certain, rad, torch.where(uncertain, (ut - lt) / 2, torch.zeros_like(rad)))

    def fold(t: torch.Tensor) -> torch.Tensor:
        return _scatter_taps(t.reshape(d * k, c, kk, -1), node, tuple(in_shape)).reshape(d, k, *in_shape)

    return _Form(fold(tm), fold(tr))


def _range(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) over δ ∈ [0, 1]^V of c[:, 0] + Σ_k δ_k c[:, k], kept (D, 1, *shape)."""
    return ((c[:, 0] + c[:, 1:].clamp(max=0).sum(1)).unsqueeze(1),
            (c[:, 0] + c[:, 1:].clamp(min=0).sum(1)).unsqueeze(1))


def _sym_basis(net: Network, pre: dict[int, Interval], splits: dict[int, torch.Tensor]) -> tuple[int, int] | None:
    """(the last sign node with a free f′ in some domain, how many of its neurons are free in
    some domain), or None when every f′ is fixed (the interval pass is then exact)."""
    for i in sorted(pre, reverse=True):
        node = net.layers[i]
        if isinstance(node, SIGN_NODES):
            dl, du = _deriv_bounds(node, *pre[i], splits.get(i))
            free = (dl != du).reshape(dl.shape[0], -1).any(0)
            if bool(free.any()):
                return i, int(free.sum())
    return None


def _symbolic_grad(net: Network, seed: Interval, pre: dict[int, Interval], splits: dict[int, torch.Tensor]
                   ) -> Interval | None:
    """The input gradient's bounds by a backward pass over linear forms in δ, the relaxed f′ of
    the free neurons of the last sign node with any (the basis; :class:`_Form`): exact through
    affine nodes, relaxed by chords at earlier sign nodes and uncertain MaxPool taps; the
    forms are minimised over δ ∈ [0, 1]^V at the input. Unlike the interval pass it keeps the
    correlation between coordinates that share a basis neuron's σ′ (on a two-layer ReLU MLP
    it equals CROWN's map of the gradient graph); never wider than the interval pass. None
    when no f′ is free or one domain's forms exceed BACKSUB_ELEMENTS; chunked over domains."""
    return _symbolic(net, seed, pre, splits)[0]


def _first_lift(net: Network, dtype: torch.dtype, device: torch.device) -> tuple[int, Lift] | None:
    """(the first sign node, the dense Jacobian of the affine chain from the input to its
    input) when that chain is all there is below it and small enough to hold as a Gram matrix
    (≤ ZONOTOPE_WIDTH neurons): the gradient is then Jᵀ of the gradient at that node's input."""
    acts = _acts(net)
    if not acts:
        return None
    first = acts[0]
    zname = net.wiring[first][0]
    chain, src = _affine_chain(net, zname)
    n, n_in = math.prod(net.shape_of[zname]), math.prod(net.input_shape)
    if src is not None or not chain or n > ZONOTOPE_WIDTH or any(
            isinstance(node, (*SIGN_NODES, MaxPool)) for node in net.layers[:first]):
        return None
    j = _chain_jacobian(net, chain, zname, INPUT, dtype, device)
    if j is None:
        return None
    row, col, val, _ = j
    dense = torch.zeros(n, n_in, dtype=dtype, device=device)
    dense[row, col] = val
    return first, Lift.of(dense)


def _symbolic(net: Network, seed: Interval, pre: dict[int, Interval], splits: dict[int, torch.Tensor],
              hidden: bool = False) -> tuple[Interval | None, GradZonotope | None]:
    """:func:`_symbolic_grad`'s bounds and, with ``hidden``, the domains' gradient sets as
    zonotopes at the first sign node's input (through its :func:`_first_lift`; no allowance
    yet), when the pass reaches that node with nothing else pending, else None."""
    found = _sym_basis(net, pre, splits)
    if found is None:
        return None, None
    basis, v = found
    nodes, wiring = net.layers, net.wiring
    d = seed[0].shape[0]
    width = max(math.prod(net.input_shape), max(math.prod(sh) for sh in net.shapes))
    if (v + 1) * width > BACKSUB_ELEMENTS:  # one domain's forms would not fit: intervals only
        return None, None
    per = max(1, BACKSUB_ELEMENTS // ((v + 1) * width))
    dt, dev = seed[0].dtype, seed[0].device
    tl = net.memo(("bab", "two-level", basis, dt, str(dev)), lambda: _two_level(net, basis, dt, dev))
    first, lift = None, None
    if hidden:
        lift = net.memo(("bab", "first-lift", dt, str(dev)), lambda: _first_lift(net, dt, dev))
        first = None if lift is None else lift[0]
    los, ups, zonos = [], [], []
    for c0 in range(0, d, per):
        sl = slice(c0, min(d, c0 + per))
        grads: dict[str, _Form] = {nodes[-1].name: _Form.interval(seed[0][sl], seed[1][sl])}
        for i in range(len(nodes) - 1, -1, -1):
            node = nodes[i]
            f = grads.pop(node.name)
            s = splits.get(i)
            s = None if s is None else s[sl]
            outs: Sequence[_Form | None]
            if i == basis and isinstance(tl, _TwoLevel) and not grads:  # nothing reaches below but through it
                lo, up, z = _symbolic_two_level(net, tl, basis, f, {j: (b[0][sl], b[1][sl]) for j, b in pre.items()},
                                                {j: None if t is None else t[sl] for j, t in splits.items()},
                                                None if lift is None or tl.s != first else lift[1])
                if z is not None:
                    zonos.append(z)
                break
            if isinstance(node, MaxPool):
                outs = (_form_pool(node, f, pre[i][0][sl], pre[i][1][sl], s, net.in_shapes(i)[0]),)
            elif isinstance(node, SIGN_NODES):
                outs = (_form_sign(node, f, pre[i][0][sl], pre[i][1][sl], s, i == basis),)
                if i == first and not grads and outs[0] is not None and lift is not None:
                    zonos.append(GradZonotope.from_forms(outs[0].mid, outs[0].rad, lift[1], ZONOTOPE_GENERATORS))
            else:
                outs = _form_affine(node, f, net.in_shapes(i))
            for name, gi in zip(wiring[i], outs, strict=True):
                if gi is not None:
                    grads[name] = grads[name] + gi if name in grads else gi
        else:
            lo, up = grads[INPUT].bounds()
        los.append(lo)
        ups.append(up)
    bounds = torch.cat(los), torch.cat(ups)
    if len(zonos) != len(los):
        return bounds, None
    return bounds, GradZonotope.cat(zonos)


def _symbolic_two_level(net: Network, tl: _TwoLevel, basis: int, f: _Form, pre: dict[int, Interval],
                        splits: dict[int, torch.Tensor | None], lift: Lift | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, GradZonotope | None]:
    """The symbolic pass from the basis node down, where its input is z = A2·f(A1·x + c1) + c2
    with sparse A1, A2 (:class:`_TwoLevel`; a conv net's second activation): the same forms
    as the dense pass (:func:`_form_affine`, :func:`_form_sign`), with the V variable columns
    kept as A2's entries in the basis rows (column k is step_k·A2[idx_k, :], a kernel's
    support) instead of V dense maps — only the constant column and the radius go through
    the layers densely. At the sign node s between them each entry is scaled by its neuron's
    chord slopes (mid (a_u + a_l)/2, radius (a_u − a_l)/2; c for a fixed f′, 0 for a negative
    slope, which takes the interval product), and A1's rows carry it to the input, where the
    forms are minimised over δ column by column. ``f``: the interval gradient at the basis
    node's output; ``pre`` and ``splits``: the domains' (already sliced). With ``lift`` (s is
    the first sign node) the forms at s's input are also returned as zonotopes
    (:meth:`GradZonotope.from_entries`), else None."""
    nodes, wiring = net.layers, net.wiring
    node_b, node_s = nodes[basis], nodes[tl.s]
    assert isinstance(node_b, SIGN_NODES) and isinstance(node_s, SIGN_NODES)
    c0, r0, step, idx = _basis_products(node_b, f, pre[basis][0], pre[basis][1], splits.get(basis))
    d, n_in = c0.shape[0], math.prod(net.input_shape)
    form = _Form(c0.unsqueeze(1), r0.unsqueeze(1))
    chain2, _ = _affine_chain(net, wiring[basis][0])
    for i in chain2:
        out = _form_affine(nodes[i], form, net.in_shapes(i))[0]
        assert out is not None  # an affine chain passes the gradient to its one input
        form = out
    row, col, a2 = _row_entries(tl, idx)
    ent = a2 * step[:, row]  # (D, E): the δ coefficients at s's output
    lo1, up1 = pre[tl.s]
    dl, du = (t.reshape(d, -1) for t in _deriv_bounds(node_s, lo1, up1, splits.get(tl.s)))
    mid0, rad0 = form.mid[:, 0].reshape(d, -1), form.rad[:, 0].reshape(d, -1)
    c_up, c_lo = mid0 + rad0, mid0 - rad0
    gain = torch.zeros_like(mid0).index_add_(1, col, ent.clamp(min=0))  # Σ_k max(0, coefficient)
    loss = torch.zeros_like(mid0).index_add_(1, col, ent.clamp(max=0))
    au, bu = _chord(dl, du, c_up + loss, c_up + gain)
    al, bl = _chord(du, dl, c_lo + loss, c_lo + gain)
    ut0, lt0 = au * c_up + bu, al * c_lo + bl
    fixed, zero = dl == du, torch.zeros_like(dl)
    neg = ~fixed & (dl < 0)
    il, iu = mul_interval((dl, du), (c_lo + loss, c_up + gain))
    mid0 = torch.where(fixed, dl * mid0, torch.where(neg, (il + iu) / 2, (ut0 + lt0) / 2))
    rad0 = torch.where(fixed, dl.abs() * rad0, torch.where(neg, (iu - il) / 2, (ut0 - lt0) / 2))
    alpha = torch.where(fixed, dl, torch.where(neg, zero, (au + al) / 2))
    beta = torch.where(fixed | neg, zero, (au - al) / 2)
    z1 = net.shape_of[wiring[tl.s][0]]
    form = _Form(mid0.reshape(d, 1, *z1), rad0.reshape(d, 1, *z1))
    chain1, _ = _affine_chain(net, wiring[tl.s][0])
    for i in chain1:
        out = _form_affine(nodes[i], form, net.in_shapes(i))[0]
        assert out is not None
        form = out
    x_lo, x_up = (t[:, 0].reshape(d, n_in) for t in form.ends())
    em, er = alpha[:, col] * ent, beta[:, col] * ent  # (D, E): mid and radius coefficients at s's input
    zono = None if lift is None else GradZonotope.from_entries(mid0, rad0, row, col, em, er, idx.numel(), lift,
                                                               ZONOTOPE_GENERATORS)
    a1i, a1v = tl.a1_idx[col], tl.a1_val[col]  # (E, K1)
    target = (row.unsqueeze(1) * n_in + a1i).reshape(-1)
    v = idx.numel()
    per = max(1, BACKSUB_ELEMENTS // max(1, 2 * a1i.numel() + 2 * v * n_in))
    los, ups = [], []
    for c0_ in range(0, d, per):
        sl = slice(c0_, min(d, c0_ + per))
        k = sl.stop - sl.start
        pm = (em[sl].unsqueeze(2) * a1v).reshape(k, -1)
        pr = (er[sl].unsqueeze(2) * a1v.abs()).reshape(k, -1)
        lo_c = torch.zeros(k, v * n_in, dtype=em.dtype, device=em.device).index_add_(1, target, pm - pr)
        up_c = torch.zeros_like(lo_c).index_add_(1, target, pm + pr)
        los.append(x_lo[sl] + lo_c.reshape(k, v, n_in).clamp(max=0).sum(1))
        ups.append(x_up[sl] + up_c.reshape(k, v, n_in).clamp(min=0).sum(1))
    shape = (d, *net.input_shape)
    return torch.cat(los).reshape(shape), torch.cat(ups).reshape(shape), zono


def pre_activation_boxes(net: Network, box: Bounds, target: torch.Tensor, output: Output) -> dict[int, Interval]:
    """Rigorous bounds of every split node's input over ``box`` (1, *S), by index: the neuron
    pass of the whole box (interval propagation with back-substitution, widened for round-off)."""
    return _neuron_pass(net, box, target, output, {}).pre


def _unstable(lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    free = (lo < 0) & (up > 0)
    return free if s is None else free & (s == 0)


def _acts(net: Network) -> list[int]:
    """The sign-split nodes: relu / leaky relu activations and PReLUs."""
    return [i for i, node in enumerate(net.layers) if isinstance(node, SIGN_NODES)]


def _split_nodes(net: Network) -> list[int]:
    """Every split node in network order: the sign-split nodes and the MaxPools."""
    return [i for i, node in enumerate(net.layers) if isinstance(node, (*SIGN_NODES, MaxPool))]


def _split_shape(net: Network, i: int) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of node i's split tensor: its input's shape (int8 signs) for a sign
    split, (C, windows) (int16 tap + 1) for a MaxPool."""
    if isinstance(net.layers[i], MaxPool):
        c, *rest = net.shape_of[net.layers[i].name]
        return (c, math.prod(rest)), torch.int16
    return tuple(net.in_shapes(i)[0]), torch.int8


def _stack_splits(net: Network, domains: Sequence[dict[int, torch.Tensor]], device: torch.device
                  ) -> dict[int, torch.Tensor]:
    out = {}
    for i in _split_nodes(net):
        shape, dtype = _split_shape(net, i)
        out[i] = torch.stack([dm.get(i, torch.zeros(shape, dtype=dtype, device=device)) for dm in domains])
    return out


def _pattern_map(net: Network, pre: dict[int, Interval], splits: dict[int, torch.Tensor], k: int
                 ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Domain k's LP constraints: (split node index, flat coordinates, signs) for the split
    neurons — (MaxPool index, flat windows, fixed taps) for the split windows — whose input is
    affine in x on the domain (every split node before it is fixed: no free unstable neuron, no
    free ambiguous window)."""
    cons = []
    for i in _split_nodes(net):
        node = net.layers[i]
        lo, up, s = pre[i][0][k:k + 1], pre[i][1][k:k + 1], splits[i][k:k + 1]
        idx = (s != 0).flatten().nonzero().flatten()
        if idx.numel():
            vals = s.flatten()[idx]
            cons.append((i, idx, vals.long() - 1 if isinstance(node, MaxPool) else vals))
        if bool(_free(node, lo, up, s).any()):
            break
    return cons


def _fixed_slopes(net: Network, pre: dict[int, Interval], splits: dict[int, torch.Tensor], k: int
                  ) -> dict[int, torch.Tensor]:
    """The linear map of every split node of domain k where it is fixed: f' of a sign split
    (split, or stable on its box), free neurons NaN; for a MaxPool the one-hot (C, kk, windows)
    of each window's argmax tap where it is split or certain, free windows NaN (nothing
    downstream of a NaN is affine)."""
    out = {}
    for i in _split_nodes(net):
        node = net.layers[i]
        lo, up, s = pre[i][0][k], pre[i][1][k], splits[i][k]
        if isinstance(node, MaxPool):
            certain, _ = _pool_taps(node, lo[None], up[None], s[None])
            known = certain.any(dim=2, keepdim=True)
            out[i] = torch.where(known, certain.to(lo.dtype), torch.full_like(certain, math.nan, dtype=lo.dtype))[0]
            continue
        assert isinstance(node, SIGN_NODES)
        slope = torch.full_like(lo, math.nan)
        slope = torch.where((s > 0) | ((s == 0) & (lo > 0)), torch.ones_like(lo), slope)
        slope = torch.where((s < 0) | ((s == 0) & (up <= 0)), neg_slope(node, lo), slope)
        out[i] = slope
    return out


def affine_pre(net64: Network, x0: torch.Tensor, slopes: dict[int, torch.Tensor], last: int
                ) -> dict[int, torch.Tensor]:
    """Inputs of the split nodes up to index ``last`` as affine maps of x, from the network with
    fixed slopes and fixed argmax taps (``_fixed_slopes``) evaluated at x0 and x0 + e_k (exact
    for an affine map): {i: (n_coords, n_in + 1)} holding [A | c] with z = A x + c."""
    n_in = x0.numel()
    eye = torch.eye(n_in, dtype=torch.float64, device=x0.device).reshape(n_in, *x0.shape[1:])
    xs = torch.cat([x0, x0 + eye])
    vals: dict[str, torch.Tensor] = {INPUT: xs}
    out = {}
    for i, (node, ins) in enumerate(zip(net64.layers, net64.wiring, strict=True)):
        if i > last:
            break
        args = [vals[m] for m in ins]
        if isinstance(node, (*SIGN_NODES, MaxPool)):
            z = args[0]
            zf = z.reshape(z.shape[0], -1)
            a = (zf[1:] - zf[0:1]).T  # (n_coords, n_in)
            c = zf[0] - a @ x0.reshape(-1)
            out[i] = torch.cat([a, c[:, None]], dim=1)
            if isinstance(node, MaxPool):
                wins, _ = _windows(z, node, 0.0)  # padding is never a selected tap
                y = (wins * slopes[i].to(torch.float64)).sum(2)
                vals[node.name] = y.reshape(z.shape[0], *node.out_shape([tuple(z.shape[1:])]))
            else:
                vals[node.name] = z * slopes[i].to(torch.float64)
        else:
            vals[node.name] = node.forward(args)
    return out


def _tap_rows(node: MaxPool, ac: torch.Tensor, in_shape: Sequence[int], idx: torch.Tensor, taps: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The argmax constraints of split windows as rows A x + c ≥ 0: for window w fixed to tap t
    and each other real tap s of it, x_t − x_s > 0 (s before t: t is the FIRST argmax) or ≥ 0
    (s after t); ``ac`` the affine map [A | c] of the pool's input. Returns (A, c, strict)."""
    n = math.prod(in_shape)
    where = torch.arange(n, dtype=torch.float64, device=ac.device).reshape(1, *in_shape)
    coords, _ = _windows(where, node, -1.0)  # (1, C, kk, L): each tap's input coordinate, −1 = padding
    kk = coords.shape[2]
    cmap = coords[0].permute(0, 2, 1).reshape(-1, kk).long()  # window (c·L + l) → its taps
    win = cmap[idx.to(ac.device)]
    taps = taps.to(ac.device)
    order = torch.arange(kk, device=ac.device)[None]
    other = (win >= 0) & (order != taps[:, None])
    w_i, s_i = other.nonzero(as_tuple=True)
    ct = win.gather(1, taps[:, None])[:, 0]
    diff = ac[ct[w_i]] - ac[win[w_i, s_i]]
    return diff[:, :-1], diff[:, -1], s_i < taps[w_i]


def lp_deepest_point(net64: Network, box: Bounds, cons: list[tuple[int, torch.Tensor, torch.Tensor]],
                 slopes: dict[int, torch.Tensor]) -> tuple[float, torch.Tensor | None]:
    """max t s.t. x ∈ box, A_r x + c_r ≥ t·‖A_r‖ for every constraint row r (t ≤ 1): the distance
    of the deepest point of the domain from its split hyperplanes, and that point. Rows: s·z_j
    for a split neuron (active z_j > 0, inactive −z_j ≥ 0) and x_t − x_s for a split window
    (``_tap_rows``); the LP takes every row as closed (a superset of the domain). A row constant
    on the domain is judged by its sign (strict rows need c > 0), in float64."""
    from scipy.optimize import linprog  # a dependency of bab only

    if not cons:
        return 1.0, None
    lo = box.lower.to(torch.float64).reshape(-1)
    up = box.upper.to(torch.float64).reshape(-1)
    x0 = ((lo + up) / 2).reshape(1, *box.lower.shape[1:])
    maps = affine_pre(net64, x0, slopes, max(i for i, _, _ in cons))
    rows, rhs = [], []
    for i, idx, vals in cons:
        node = net64.layers[i]
        if isinstance(node, MaxPool):
            a, c, strict = _tap_rows(node, maps[i], net64.in_shapes(i)[0], idx, vals)
        else:
            ac = maps[i][idx.to(maps[i].device)]
            sg = vals.to(torch.float64).to(ac.device)
            a, c, strict = sg[:, None] * ac[:, :-1], sg * ac[:, -1], sg > 0
        norm = a.norm(dim=1)
        const = norm < _ZERO_ROW
        if bool(const.any()):
            ok = torch.where(strict[const], c[const] > 0, c[const] >= 0)
            if not bool(ok.all()):
                return -math.inf, None
        keep = ~const
        # A·x + c ≥ t‖A‖  ⇔  −A·x + ‖A‖·t ≤ c
        rows.append(torch.cat([-a[keep], norm[keep, None]], dim=1))
        rhs.append(c[keep])
    a_ub = torch.cat(rows).cpu().numpy() if rows else np.zeros((0, lo.numel() + 1))
    b_ub = torch.cat(rhs).cpu().numpy() if rhs else np.zeros(0)
    if a_ub.shape[0] == 0:
        return 1.0, x0
    cost = np.zeros(lo.numel() + 1)
    cost[-1] = -1.0
    bounds = [(float(a), float(b)) for a, b in zip(lo.tolist(), up.tolist(), strict=True)] + [(None, 1.0)]
    res = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs", options=_LP_OPTIONS)
    if res.status != 0:
        # infeasible cannot happen (t is free below); anything else: keep the domain
        return (-math.inf, None) if res.status == 2 else (0.0, None)
    return float(-res.fun), torch.as_tensor(res.x[:-1], dtype=torch.float64).reshape(x0.shape)


# ------------------------------------------------------------------------------------------
# The search


class _Search:
    """State shared by both modes: budget, counters, the open queue and the decided worst."""

    def __init__(self, net: Network, box: Bounds, target: torch.Tensor, output: Output, root: Bounds,
                 objective: Objective, opts: BabOptions, mode: Mode, engine: "BoxEngine | None",
                 leaf_engine: "LeafEngine | None" = None) -> None:
        self.net, self.box, self.target, self.output, self.engine = net, box, target, output, engine
        self.leaf_engine = leaf_engine if opts.leaf == Leaf.CROWN else None
        self.root, self.obj, self.opts, self.mode = root, objective, opts, mode
        self.start = time.perf_counter()
        self.domains = 0
        self.open: list[tuple[float, int, _Domain]] = []  # a heap on −key: the worst first
        self.tie = itertools.count()
        self.decided_key = -math.inf  # the worst key among decided leaves
        self.stuck: list[_Domain] = []  # undecided leaves that cannot be split (exact, not confirmed)
        self.hull_lo = torch.full_like(box.lower, math.inf)
        self.hull_up = torch.full_like(box.lower, -math.inf)
        self.witness: object | None = None
        self.leaves = 0
        self.lp = opts.lp if opts.lp is not None else box.lower[0].numel() <= 256
        self.net64 = net.to(torch.float64) if mode == Mode.NEURONS else net
        self.rounding = _rounding(net, box, output) if mode == Mode.NEURONS else None
        self.attack_s = 0.0  # time spent in attacks from domains
        self.attacks = 0
        self.attacked: set[int] = set()  # ids of the domains attacked from
        self.root_pre: dict[int, Interval] | None = None  # the root domain's split-node input boxes

    # -- budget ---------------------------------------------------------------------------
    def out_of_budget(self) -> bool:
        return (time.perf_counter() - self.start > self.opts.timeout_s) or self.domains >= self.opts.max_domains

    # -- bounding -------------------------------------------------------------------------
    def _judge(self, lo: torch.Tensor, up: torch.Tensor, boxes: Bounds, zono: GradZonotope | None = None
               ) -> torch.Tensor:
        w = self.obj.worst(Bounds(lo, up), boxes).to(torch.float64)
        w = torch.where(torch.isnan(w), torch.full_like(w, math.inf * self.obj.sign), w)
        if zono is not None and self.obj.sets is not None:
            z = self.obj.sets(zono, Bounds(lo, up)).to(w)
            z = torch.where(torch.isnan(z), torch.full_like(z, math.inf * self.obj.sign), z)
            w = torch.minimum(w, z) if self.obj.sign > 0 else torch.maximum(w, z)
        return w

    def bound_neurons(self, splits_list: Sequence[dict[int, torch.Tensor]]) -> list[_Domain | None]:
        """Bound neuron-split domains; None for an empty one."""
        d = len(splits_list)
        self.domains += d
        dev = self.box.lower.device
        box = Bounds(self.box.lower.expand(d, *self.box.lower.shape[1:]),
                     self.box.upper.expand(d, *self.box.upper.shape[1:]))
        splits = _stack_splits(self.net, splits_list, dev)
        p = _neuron_pass(self.net, box, self.target.expand(d), self.output, splits, rnd=self.rounding,
                         root_pre=self.root_pre, zonotope=self.obj.sets is not None)
        lo = torch.maximum(p.grad[0], self.root.lower)
        up = torch.minimum(p.grad[1], self.root.upper)
        keep = (~p.empty).nonzero().flatten()
        if self.leaf_engine is not None and keep.numel():
            lo_k, up_k = _leaf_bounds(self.net, self.leaf_engine, box, self.target, p, splits, keep)
            lo[keep], up[keep] = torch.maximum(lo[keep], lo_k), torch.minimum(up[keep], up_k)
        up = torch.maximum(lo, up)  # both sound: they meet (crossing only by round-off)
        worst = self._judge(lo, up, box, p.zono)
        # some unstable neuron or ambiguous window left unsplit (else the domain is exact)
        free = torch.zeros(d, dtype=torch.bool, device=dev)
        for i, (zl, zu) in p.pre.items():
            free |= _free(self.net.layers[i], zl, zu, splits[i]).any(1)
        out: list[_Domain | None] = []
        for k in range(d):
            if bool(p.empty[k]):
                out.append(None)
                continue
            full = not bool(free[k])
            out.append(_Domain(self.obj.sign * float(worst[k]), splits_list[k], lo[k:k + 1], up[k:k + 1], full,
                               info=(p, k)))
        return out

    def bound_boxes(self, boxes: Sequence[Bounds]) -> list[_Domain]:
        if self.engine is None:
            raise ValueError("bab: input splits need an engine to bound the sub-boxes")
        d = len(boxes)
        self.domains += d
        stacked = Bounds(torch.cat([b.lower for b in boxes]), torch.cat([b.upper for b in boxes]))
        g = self.engine(stacked, self.target.expand(d))
        lo = torch.maximum(g.lower, self.root.lower)
        up = torch.maximum(lo, torch.minimum(g.upper, self.root.upper))
        worst = self._judge(lo, up, stacked)
        return [_Domain(self.obj.sign * float(worst[k]), boxes[k], lo[k:k + 1], up[k:k + 1]) for k in range(d)]

    # -- bookkeeping ----------------------------------------------------------------------
    def decided(self, dom: _Domain) -> bool:
        return bool(self.obj.holds(torch.tensor([dom.key * self.obj.sign], dtype=torch.float64))[0])

    def push(self, dom: _Domain) -> None:
        heapq.heappush(self.open, (-dom.key, next(self.tie), dom))

    def settle(self, dom: _Domain) -> None:
        """Queue ``dom`` or close it as a decided leaf."""
        if self.decided(dom):
            self.close(dom)
        else:
            self.push(dom)

    def close(self, dom: _Domain) -> None:
        self.leaves += 1
        self.decided_key = max(self.decided_key, dom.key)
        self.hull_lo = torch.minimum(self.hull_lo, dom.lower)
        self.hull_up = torch.maximum(self.hull_up, dom.upper)

    def pop(self) -> _Domain:
        return heapq.heappop(self.open)[2]

    def try_point(self, x: torch.Tensor | None) -> bool:
        """Judge x in float64 (a witness ends the search)."""
        if x is None or self.obj.check is None or self.witness is not None:
            return self.witness is not None
        self.witness = self.obj.check(x.to(self.box.lower.dtype))
        return self.witness is not None


def _window_scores(node: MaxPool, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(free (C·L,), ambiguity (C·L,), possible (C, kk, L)) of one domain's MaxPool windows
    (lo, up: (1, C, H, W)). The ambiguity of a window is u_(2) − max_p l_p, the second largest
    upper bound among its taps above the largest lower bound: how far the runner-up can rise
    past the leader's floor, the analogue of min(u, −l) for a neuron (0 or less: one candidate)."""
    _, possible = tap_states(lo, up, node)
    free = _pool_free(node, lo, up, s).flatten()
    wl, _ = _windows(lo, node, float("-inf"))
    wu, _ = _windows(up, node, float("-inf"))
    cand = torch.where(possible, wu, torch.full_like(wu, -math.inf))
    second = cand.topk(2, dim=2).values[:, :, 1] if cand.shape[2] >= 2 else torch.full_like(cand[:, :, 0], -math.inf)
    amb = (second - wl.max(dim=2).values).flatten()
    return free, torch.where(free, amb, torch.zeros_like(amb)), possible[0]


def _neuron_candidates(net: Network, dom: _Domain, k: int, first_layer: bool = False
                       ) -> list[tuple[int, int, list[int]]]:
    """The k free split candidates of largest score, as (split node index, flat coordinate,
    the sides of its children) (``first_layer``: only in the first split node that has any).
    An unstable neuron scores |g_out|·min(u, −l) — the gradient mass through it times its
    ambiguity — and has children +1 (active), −1 (inactive); an ambiguous MaxPool window
    scores |g_w|·(u_(2) − max_p l_p) (``_window_scores``: the gradient mass through the window
    times the pool-input distance the runner-up can rise past the leader's floor, in the same
    units as a neuron's) and has one child t + 1 per possible argmax tap t."""
    assert dom.info is not None
    p, j = dom.info
    scored: list[tuple[float, int, int, list[int]]] = []
    for i, (lo, up) in p.pre.items():
        node = net.layers[i]
        s = dom.splits.get(i)
        gl, gu = p.gout[i][0][j].flatten(), p.gout[i][1][j].flatten()
        mass = torch.maximum(gl.abs(), gu.abs())
        possible: torch.Tensor | None = None
        if isinstance(node, MaxPool):
            free, amb, possible = _window_scores(node, lo[j:j + 1], up[j:j + 1], None if s is None else s[None])
        else:
            lo_j, up_j = lo[j].flatten(), up[j].flatten()
            free = _unstable(lo_j, up_j, None if s is None else s.flatten())
            amb = torch.minimum(up_j, -lo_j)
        if not bool(free.any()):
            continue
        score = torch.where(free, mass * amb + 1e-30, torch.full_like(amb, -1.0))
        for t in torch.topk(score, min(k, int(free.sum()))).indices.tolist():
            if possible is None:
                sides = [1, -1]
            else:  # window t = c·L + l: one child per possible tap
                nw = possible.shape[2]
                sides = [int(q) + 1 for q in possible[t // nw, :, t % nw].nonzero().flatten()]
            scored.append((float(score[t]), i, t, sides))
        if first_layer:
            break
    scored.sort(key=lambda e: e[0], reverse=True)
    return [(i, t, sd) for _, i, t, sd in scored[:k]]


def _child(net: Network, splits: dict[int, torch.Tensor], i: int, t: int, side: int, device) -> dict[int, torch.Tensor]:
    """``splits`` with coordinate t of split node i set to ``side`` (a sign, or a tap + 1)."""
    out = dict(splits)
    base = out.get(i)
    shape, dtype = _split_shape(net, i)
    base = torch.zeros(shape, dtype=dtype, device=device) if base is None else base.clone()
    base.view(-1)[t] = side
    out[i] = base
    return out


def _input_candidates(net: Network, dom_box: Bounds, k: int) -> list[int]:
    """The k widest input coordinates, each width weighted by the ℓ1 norm of its column in the
    first affine layer when that layer reads the input (how strongly it drives the network)."""
    width = (dom_box.upper - dom_box.lower).reshape(-1)
    first = net.layers[0]
    if isinstance(first, Linear) and net.wiring[0] == (INPUT,) and first.weight.shape[1] == width.numel():
        width = width * first.weight.abs().sum(0).to(width.dtype)
    return torch.topk(width, min(k, width.numel())).indices.tolist()


def _halves(b: Bounds, t: int) -> tuple[Bounds, Bounds]:
    lo, up = b.lower.clone().reshape(-1), b.upper.clone().reshape(-1)
    mid = (lo[t] + up[t]) / 2
    l2, u1 = lo.clone(), up.clone()
    u1[t], l2[t] = mid, mid
    shape = b.lower.shape
    return Bounds(lo.reshape(shape), u1.reshape(shape)), Bounds(l2.reshape(shape), up.reshape(shape))


def _best_pair(search: _Search, pairs: Sequence[Sequence[_Domain | None]]) -> int:
    """The candidate whose worse child is best (an empty child counts as decided); a candidate
    has two children (a neuron, a halved coordinate) or one per possible tap (a window)."""
    def worse(pair: Sequence[_Domain | None]) -> float:
        return max(-math.inf if c is None else c.key for c in pair)
    return min(range(len(pairs)), key=lambda q: worse(pairs[q]))


def _step_neurons(search: _Search, batch: list[_Domain]) -> None:
    net, opts, dev = search.net, search.opts, search.box.lower.device
    layer = opts.branching == Branching.LAYER
    k = 1 if layer else opts.candidates
    plans: list[list[tuple[int, int, list[int]]]] = []
    kids: list[dict[int, torch.Tensor]] = []
    for dom in batch:
        cands = _neuron_candidates(net, dom, k, layer)
        plans.append(cands)
        for i, t, sides in cands:
            kids += [_child(net, dom.splits, i, t, side, dev) for side in sides]
    bounded = search.bound_neurons(kids) if kids else []
    pos = 0
    for dom, cands in zip(batch, plans, strict=True):
        if not cands:  # no free unstable neuron or ambiguous window: an exact leaf
            search.stuck.append(dom)
            continue
        groups = []
        for _, _, sides in cands:
            groups.append(bounded[pos:pos + len(sides)])
            pos += len(sides)
        for child in groups[_best_pair(search, groups)]:
            if child is not None:
                _admit(search, child)


def _domain_lp(s: _Search, dom: _Domain) -> tuple[float, torch.Tensor | None]:
    """The LP of ``dom``'s split constraints that are affine in x over the box (lp_deepest_point)."""
    assert dom.info is not None
    p, j = dom.info
    pre = {i: (lo[j:j + 1], up[j:j + 1]) for i, (lo, up) in p.pre.items()}
    splits = _stack_splits(s.net, [dom.splits], s.box.lower.device)
    return lp_deepest_point(s.net64, s.box, _pattern_map(s.net, pre, splits, 0), _fixed_slopes(s.net, pre, splits, 0))


def _admit(search: _Search, dom: _Domain) -> None:
    """Queue or close a bounded neuron domain. An exact leaf (and, with LP on, every undecided
    domain) is first checked for a point of the box; a domain without one is dropped, and the
    point found is judged as a candidate witness."""
    if dom.full or (search.lp and not search.decided(dom)):
        t, dom.point = _domain_lp(search, dom)
        if t < -LP_DROP:
            return  # meets no point of the box
    if search.decided(dom) or (dom.full and search.obj.exact_decides):
        search.close(dom)
    elif not search.try_point(dom.point):
        if dom.full:
            search.stuck.append(dom)  # exact, and not confirmed violated in float64 (e.g. a tie)
        else:
            search.push(dom)


def _step_inputs(search: _Search, batch: list[_Domain]) -> None:
    opts = search.opts
    k = 1 if opts.branching == Branching.LAYER else opts.candidates
    plans, kids = [], []
    for dom in batch:
        cands = _input_candidates(search.net, dom.splits, k)
        plans.append(cands)
        for t in cands:
            kids += list(_halves(dom.splits, t))
    bounded = search.bound_boxes(kids)
    pos, chosen = 0, []
    for cands in plans:
        pairs: list[tuple[_Domain | None, _Domain | None]] = [(bounded[pos + 2 * q], bounded[pos + 2 * q + 1])
                                                             for q in range(len(cands))]
        pos += 2 * len(cands)
        chosen += [c for c in pairs[_best_pair(search, pairs)] if c is not None]
    worst = max(chosen, key=lambda c: c.key)
    if not search.decided(worst) and search.try_point(worst.splits.center):
        return  # the worst sub-box's centre is a witness
    for child in chosen:
        search.settle(child)


BoxEngine = Callable[[Bounds, torch.Tensor], Bounds]  # (boxes (D, *S), classes (D,)) → bounds on ∂o/∂x
# (boxes (D, *S), classes (D,), activation index → (D, *shape) bounds of its input on each domain)
# → bounds on ∂o/∂x at the points of each box where those hold
LeafEngine = Callable[[Bounds, torch.Tensor, dict[int, Interval]], Bounds]


def _leaf_bounds(net: Network, engine: LeafEngine, box: Bounds, target: torch.Tensor, p: _Pass,
                 splits: dict[int, torch.Tensor], keep: torch.Tensor) -> Interval:
    """The leaf engine on the domains ``keep``, given the input boxes of their sign-split nodes
    (relu / leaky relu / PReLU). A neuron split active is handed the box [max(l, tiny), u]: the
    domain's points with z = 0 exactly (where f′ = a, as autograd has it) belong to its inactive
    sibling, which keeps z ≤ 0. MaxPool inputs and window splits are not handed over: the
    engine bounds a pool from its own input bounds over {x ∈ box : every handed box holds}, a
    superset of the domain, so its map is sound there. The batch is padded to a power of two
    (repeating the first domain) so that the engine sees few batch sizes (each is one traced
    graph)."""
    k = int(keep.numel())
    size = 1 << (k - 1).bit_length()
    idx = torch.cat([keep, keep[:1].expand(size - k)])
    pre = {}
    for i, (lo, up) in p.pre.items():
        if not isinstance(net.layers[i], SIGN_NODES):
            continue
        lo, up = lo[idx], up[idx]
        s = splits[i][idx]
        tiny = torch.full_like(lo, torch.finfo(lo.dtype).tiny)
        pre[i] = (torch.where(s > 0, torch.minimum(torch.maximum(lo, tiny), up), lo), up)
    b = engine(Bounds(box.lower[idx], box.upper[idx]), target.expand(len(box.lower))[idx], pre)
    return b.lower[:k], b.upper[:k]


def search(net: Network, box: Bounds, target: torch.Tensor, output: Output, root: Bounds,
           objective: Objective, opts: BabOptions = BabOptions(),  # noqa: B008
           engine: BoxEngine | None = None, leaf_engine: LeafEngine | None = None) -> BabResult:
    """Branch and bound one sample (box (1, *S)) until every leaf decides ``objective``, a
    witness is found, or the budget ends. ``root`` is a sound map over the whole box that every
    domain is intersected with (so no leaf is wider than it); ``engine`` bounds the sub-boxes
    of input splits (the root engine, so that a leaf is never looser than the root method);
    ``leaf_engine`` bounds neuron-split domains given their pre-activation boxes (BabOptions.leaf)."""
    mode = _mode(net, opts)
    s = _Search(net, box, target.reshape(1), output, root, objective, opts, mode, engine, leaf_engine)
    with torch.no_grad():
        first = s.bound_neurons([{}])[0] if mode == Mode.NEURONS else s.bound_boxes([box])[0]
        assert first is not None  # the root domain has no split to contradict
        if mode == Mode.NEURONS:
            assert first.info is not None
            s.root_pre = first.info[0].pre  # valid on every domain: each is a subset of the box
            _admit(s, first)
        else:
            s.settle(first)
        step = _step_neurons if mode == Mode.NEURONS else _step_inputs
        # the batch starts at one domain and grows while steps are short against the time left,
        # shrinks when they are not, and no step starts that the last one's time per domain
        # predicts to end past the budget (on a CNN one domain takes seconds)
        size, per = 1, 0.0  # per: the last step's seconds per domain split
        while s.open and s.witness is None and not s.out_of_budget():
            left = opts.timeout_s - (time.perf_counter() - s.start)
            if per > 0:  # no step predicted to end past the budget: shrink it, or stop
                size = min(size, int(left / per))
                if size < 1:
                    break
            t0 = time.perf_counter()
            n = min(size, len(s.open))
            step(s, [s.pop() for _ in range(n)])
            dt, left = time.perf_counter() - t0, opts.timeout_s - (time.perf_counter() - s.start)
            per = dt / n
            _attack_worst(s)
            size = min(opts.batch, 2 * size) if 4 * dt < left else max(1, size // 2) if 2 * dt > left else size
    return _result(s)


def _attack_worst(s: _Search) -> None:
    """Falsification inside the loop: while attacks have used at most ``attack_share`` of the
    search's time, run the objective's attacks from the worst open domain not attacked yet —
    confined to its sub-box (input splits) or started at a point of it (neuron splits: the LP's
    deepest point of its split constraints over the box). The domain's bound says where the
    property is closest to failing; the attacks look for a point that makes it fail."""
    if s.obj.attack is None or s.opts.attack_share <= 0 or not s.open or s.witness is not None or s.out_of_budget():
        return
    if s.attack_s > s.opts.attack_share * (time.perf_counter() - s.start):
        return
    dom = next((d for _, _, d in heapq.nsmallest(16, s.open) if id(d) not in s.attacked), None)
    if dom is None:
        return
    s.attacked.add(id(dom))
    t0 = time.perf_counter()
    if s.mode == Mode.NEURONS:
        if dom.point is None:
            dom.point = _domain_point(s, dom)
        box, start = s.box, dom.point
    else:
        box, start = dom.splits, dom.splits.center
    with torch.enable_grad():  # the search bounds under no_grad; attacks differentiate
        s.witness = s.obj.attack(box, start)
    s.attacks += 1
    s.attack_s += time.perf_counter() - t0


def _domain_point(s: _Search, dom: _Domain) -> torch.Tensor | None:
    """A point of the box meeting the split constraints of ``dom`` that are affine in x (the LP's
    deepest one; the box's centre when there is none), or None when the LP finds the domain empty."""
    t, point = _domain_lp(s, dom)
    if t < -LP_DROP:
        return None
    return s.box.center if point is None else point  # no affine constraint (or no LP answer): any point


def _result(s: _Search) -> BabResult:
    rest = [d for _, _, d in s.open] + s.stuck
    worst_key = max([s.decided_key] + [d.key for d in rest])
    for d in rest:
        s.hull_lo = torch.minimum(s.hull_lo, d.lower)
        s.hull_up = torch.maximum(s.hull_up, d.upper)
    if not bool(torch.isfinite(s.hull_lo).all()):  # no leaf with a point of the box: cannot happen
        s.hull_lo, s.hull_up = s.root.lower.clone(), s.root.upper.clone()  # for a box; keep the root
    status = "falsified" if s.witness is not None else ("certified" if not rest else "unknown")
    worst = worst_key * s.obj.sign if math.isfinite(worst_key) else math.nan
    dt = time.perf_counter() - s.start
    notes = (f"bab ({s.mode.value} splits): {s.domains} domains bounded, {s.leaves} leaves decided, "
             f"{len(s.open)} open, {len(s.stuck)} exact undecided, {s.attacks} attacks from domains "
             f"({s.attack_s:.2f} s), {dt:.2f} s",)
    return BabResult(status, worst, Bounds(s.hull_lo, torch.maximum(s.hull_lo, s.hull_up)), s.domains, s.leaves,
                     len(rest), dt, not s.open, s.mode, s.witness, notes, s.attacks)


# ------------------------------------------------------------------------------------------
# The engine: coordinate bounds (the hull of the leaves), run toward exactness


def _width_objective() -> Objective:
    """Coordinate mode: a domain is done when its map is a point (an exact leaf); the worst
    domain is the widest."""
    return Objective(worst=lambda maps, boxes: maps.width.flatten(1).sum(1),
                     holds=lambda w: w <= 0, sign=1.0, exact_decides=True)


def bab_bounds(net: Network, box: Bounds, target: torch.Tensor, engine: BoxEngine, output: Output = Output.LOGIT,
               params: "ParamBox | None" = None, opts: BabOptions = BabOptions(),  # noqa: B008
               leaf_engine: LeafEngine | None = None) -> EngineResult:
    """Bounds on v = ∂o/∂x over the box: the hull over branch-and-bound leaves (each sample
    searched on its own), intersected with ``engine``'s map of the whole box (the root engine,
    which also bounds input splits). Complete runs (notes say so) give the exact range on ReLU
    networks for the logit output."""
    if params is not None and not params.empty:
        raise EngineUnsupported("bab does not split parameter boxes")
    root = engine(box, target)
    los, ups, notes = [], [], []
    layer = dataclasses.replace(opts, branching=Branching.LAYER)
    for b in range(box.lower.shape[0]):
        r = search(net, box[b:b + 1], target[b:b + 1], output, root[b:b + 1], _width_objective(), layer, engine,
                   leaf_engine)
        los.append(r.bounds.lower)
        ups.append(r.bounds.upper)
        notes.append(r.notes[0] + (" (complete)" if r.complete else " (budget reached: not exact)"))
    return EngineResult(Bounds(torch.cat(los), torch.cat(ups)), "bab", tuple(notes))
