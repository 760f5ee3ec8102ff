"""Branch and bound on the explanation: split the box until every domain decides.

Complete verification of a property P of v = ∂o/∂x over a box B. B is covered by domains D;
each domain's bound map V_D ⊇ {v(x) : x ∈ D} is sound, so P holds on B when it holds on every
V_D, and the worst case of P over B is at most the worst over the leaves (they cover B).

Two kinds of domain:

- **Neuron splits** (networks whose only nonlinear nodes are ReLU / LeakyReLU): a domain is B
  with a side fixed for some pre-activations z_j — active z_j > 0 or inactive z_j ≤ 0 (the side
  of relu'(0) = 0, autograd's convention). It is bounded by interval propagation with the split
  pre-activations clamped to their side and their σ' fixed to 1 or α (exact), intersected with
  the root map of a tighter engine (sound on every domain, since D ⊆ B). With every unstable
  neuron split, the gradient of a logit is one constant J_s[c] on the domain (exact), and an LP
  over x ∈ B with the split constraints (affine in x once every earlier activation is fixed)
  drops domains that meet no point of B. Run to completion, the hull of the leaves is the exact
  range of every gradient coordinate over B (cf. the activation-region enumeration of exact
  Lipschitz methods, Jordan & Dimakis, NeurIPS 2020). The sign split is the ReLU split of
  beta-CROWN (Wang et al., NeurIPS 2021); here a split domain is re-bounded with the fixed
  pattern rather than with split constraints inside the linear relaxation.
- **Input splits** (every other network, e.g. sigmoid / tanh / softplus): a domain is a
  sub-box, bounded by the root engine (CROWN by default) on the sub-box, and a coordinate is
  halved.

Branching is driven by the property: K candidates (neurons with the largest |g_j|·min(u_j, −l_j),
the gradient mass through an unstable neuron times its ambiguity; or the widest input
coordinates weighted by how strongly they drive the first layer) are each split tentatively,
and the one whose worse child has the best worst case is kept (strong branching; its children
are already bounded). Domains are bounded in batches (the batch dimension of the engines).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from verigrad.bounds.base import Bounds, EngineResult, EngineUnsupported
from verigrad.bounds.ibp import output_seed_bounds
from verigrad.bounds.rounding import chain_length, gamma
from verigrad.graph.gradient_graph import Output
from verigrad.models.network import INPUT, ActKind, Activation, Network
from verigrad.operators.affine import Conv2d, Linear
from verigrad.operators.base import IbpContext
from verigrad.operators.interval import Interval, add, mul_nonneg_interval, round_outward
from verigrad.operators.shape import Add, Concat, Pad, Reshape, Sub, Transpose

if TYPE_CHECKING:
    from verigrad.perturbation import ParamBox

# node kinds a neuron-split domain can be bounded through (exact interval rules up to rounding,
# and affine between the activations, so a fixed pattern makes the network affine)
NEURON_SPLIT_KINDS = (Linear, Conv2d, Reshape, Transpose, Pad, Concat, Add, Sub)
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
    candidates: int = 4  # strong-branching candidates per domain
    mode: Mode = Mode.AUTO
    root: str = "crown"  # the engine whose map every domain is intersected with (and input splits use)
    lp: bool | None = None  # LP feasibility of partly split domains; None = when the input has ≤ 256 coordinates
    leaf: Leaf = Leaf.INTERVAL  # measured: more domains decide more within a budget (README)

    def __post_init__(self) -> None:
        object.__setattr__(self, "branching", Branching(self.branching))
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "leaf", Leaf(self.leaf))
        if not (self.timeout_s > 0 and self.max_domains >= 1 and self.batch >= 1 and self.candidates >= 1):
            raise ValueError("bab: timeout_s > 0, max_domains >= 1, batch >= 1 and candidates >= 1 are required")


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
        raise EngineUnsupported(f"bab: neuron splits need ReLU / LeakyReLU networks of affine nodes: {reason}")
    if opts.mode == Mode.AUTO:
        return Mode.NEURONS if reason is None else Mode.INPUT
    return opts.mode


# ------------------------------------------------------------------------------------------
# Neuron-split domains: interval propagation with a fixed partial pattern


@dataclass
class _Pass:
    grad: Interval  # (D, *S)
    pre: dict[int, Interval]  # activation index → its pre-activation box (clamped)
    gout: dict[int, Interval]  # activation index → the gradient box at its output
    empty: torch.Tensor  # (D,) bool: the split pattern contradicts the boxes


# elements of the coefficient matrices one back-substitution chunk may hold (rows × input size)
BACKSUB_ELEMENTS = 20_000_000


def _relu_planes(node: Activation, lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear bounds a ≥ sl·z and a ≤ su·z + iu of a = σ(z) for z ∈ [lo, up] (σ = relu or leaky
    relu with slope α): exact lines on stable or split neurons; on unstable ones the chord
    through (l, αl) and (u, u) above and the steeper of z, αz (by |u| vs |l|) below (CROWN)."""
    alpha = node.param if node.kind == ActKind.LEAKY_RELU else 0.0
    one, a = torch.ones_like(lo), torch.full_like(lo, alpha)
    active = lo >= 0 if s is None else (lo >= 0) | (s > 0)
    inactive = up <= 0 if s is None else (up <= 0) | (s < 0)
    unstable = ~(active | inactive)
    span = torch.where(unstable, up - lo, one)
    chord = torch.where(unstable, (up - alpha * lo) / span, one)
    su = torch.where(active, one, torch.where(inactive, a, chord))
    iu = torch.where(unstable, alpha * lo - chord * lo, torch.zeros_like(lo))
    sl = torch.where(active, one, torch.where(inactive, a, torch.where(up > -lo, one, a)))
    return sl, su, iu


def _has_activation_before(net: Network, name: str) -> bool:
    index = {node.name: i for i, node in enumerate(net.layers)}
    stack, seen = [name], set()
    while stack:
        n = stack.pop()
        if n == INPUT or n in seen:
            continue
        seen.add(n)
        i = index[n]
        if isinstance(net.layers[i], Activation):
            return True
        stack.extend(net.wiring[i])
    return False


def _backsub(net: Network, box: Bounds, i_act: int, pre: dict[int, Interval], splits: dict[int, torch.Tensor],
             z: Interval) -> Interval:
    """CROWN bounds (back-substitution through the linear relaxations of the earlier
    activations, on their domain-clamped boxes) on the input tensor of activation ``i_act``,
    for each of the D domains: min over the box of Λ·z with Λ = ±e_j, for the coordinates j
    that ``z`` (its interval bounds) leaves unstable in some domain; the others keep ``z``."""
    nodes, wiring = net.layers, net.wiring
    zname = wiring[i_act][0]
    zshape = net.shape_of[zname]
    m, n_in = math.prod(zshape), math.prod(net.input_shape)
    d = box.lower.shape[0]
    dt, dev = box.lower.dtype, box.lower.device
    zl, zu = z[0].reshape(d, m), z[1].reshape(d, m)
    idx = ((zl < 0) & (zu > 0)).any(0).nonzero().flatten()
    out_lo, out_up = zl.clone(), zu.clone()
    sel = idx.numel()
    if sel == 0:
        return z
    width = max(n_in, max(math.prod(sh) for sh in net.shapes))
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
            if isinstance(node, Activation):
                sp = splits.get(j)
                sl, su, iu = (t.unsqueeze(1) for t in _relu_planes(node, pre[j][0][c0:c1], pre[j][1][c0:c1],
                                                                    None if sp is None else sp[c0:c1]))
                gk = g.reshape(k, rows, *g.shape[1:])
                pos, neg = gk.clamp(min=0), gk.clamp(max=0)
                outs: Sequence[torch.Tensor | None] = ((pos * sl + neg * su).reshape(g.shape),)
                const = const + (neg * iu).reshape(k * rows, -1).sum(1)
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
        low = (lx.clamp(min=0) * bl + lx.clamp(max=0) * bu).sum(2) + const.reshape(k, rows)
        out_lo[c0:c1, idx] = torch.maximum(out_lo[c0:c1, idx], low[:, :sel])
        out_up[c0:c1, idx] = torch.minimum(out_up[c0:c1, idx], -low[:, sel:])
    out_up = torch.maximum(out_lo, out_up)  # both sound: crossing only by round-off
    return out_lo.reshape(d, *zshape), out_up.reshape(d, *zshape)


@dataclass(frozen=True)
class _Rounding:
    """Rigorous round-off allowances of a neuron pass on one box: γ_n·M with M the absolute
    evaluation of each computed sum (Higham §3.1): ``fwd[name]`` for the interval (and
    back-substituted) bounds of a node's value, ``grad`` for the input gradient (the interval
    pass and a fixed pattern's exact map alike). M is computed once per box: every domain's
    boxes lie inside it, and split neurons only fix slopes within the same ranges."""

    fwd: dict[str, torch.Tensor]
    grad: torch.Tensor


def _act_slope_max(node: Activation) -> tuple[float, float]:
    """(max |slope|, max |intercept| / |z|) over the lines _relu_planes and the exact σ' use."""
    a = node.param if node.kind == ActKind.LEAKY_RELU else 0.0
    return max(1.0, abs(a)), abs(1.0 - a)


def _rounding(net: Network, box: Bounds, output: Output) -> _Rounding:
    """M of both passes by interval rules on the symmetric boxes [−M, M] (an affine rule there
    gives exactly |W|·M + |b|), activations by their largest slope and intercept."""
    nodes, wiring, ctx = net.layers, net.wiring, IbpContext()
    g = gamma(chain_length(net), box.lower.dtype)
    mag: dict[str, torch.Tensor] = {INPUT: torch.maximum(box.lower.abs(), box.upper.abs())}
    for i, node in enumerate(nodes):
        ms = [mag[m] for m in wiring[i]]
        if isinstance(node, Activation):
            slope, icpt = _act_slope_max(node)
            mag[node.name] = (slope + icpt) * ms[0]
        else:
            lo, up = node.ibp_forward([(-m, m) for m in ms], net.in_shapes(i), ctx)
            mag[node.name] = torch.maximum(lo.abs(), up.abs())
    # the seed's terms are at most 1 (e_c, softmax probabilities, their products)
    last = nodes[-1].name
    grads: dict[str, torch.Tensor] = {last: torch.full_like(mag[last], 1.0 if output == Output.LOGIT else 2.0)}
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        gm = grads.pop(node.name)
        if isinstance(node, Activation):
            outs: Sequence[torch.Tensor | None] = (_act_slope_max(node)[0] * gm,)
        else:
            ivs = node.ibp_vjp([(-mag[m], mag[m]) for m in wiring[i]], (-gm, gm), net.in_shapes(i), ctx)
            outs = tuple(None if iv is None else torch.maximum(iv[0].abs(), iv[1].abs()) for iv in ivs)
        for name, gi in zip(wiring[i], outs, strict=True):
            if gi is not None:
                grads[name] = grads[name] + gi if name in grads else gi
    return _Rounding({k: g * v for k, v in mag.items()}, g * grads[INPUT])


def _neuron_pass(net: Network, box: Bounds, target: torch.Tensor, output: Output,
                 splits: dict[int, torch.Tensor], backsub: bool = True, rnd: _Rounding | None = None) -> _Pass:
    """IBP over D domains at once: the box (D, *S), ``splits[i]`` (D, *shape of activation i's
    input) in {+1 active, −1 inactive, 0 free}; with ``backsub``, every pre-activation behind
    another activation is also bounded by back-substitution (``_backsub``) and the two intersected.
    Rigorous: every value bound and the gradient are widened by their round-off allowances
    ``rnd`` (:func:`_rounding` of the box, computed here if not given), so no neuron is fixed
    by round-off and the map encloses the exact one."""
    if rnd is None:
        rnd = _rounding(net, box[0:1], output)
    nodes, wiring = net.layers, net.wiring
    n, ctx = len(nodes), IbpContext()
    d = box.lower.shape[0]
    empty = torch.zeros(d, dtype=torch.bool, device=box.lower.device)
    vals: dict[str, Interval] = {INPUT: (box.lower, box.upper)}
    pre: dict[int, Interval] = {}
    # the activations whose input depends on another activation (the others' boxes are exact)
    behind = net.memo(("bab", "behind"), lambda: frozenset(
        j for j in _acts(net) if _has_activation_before(net, wiring[j][0])))
    stop = n if output != Output.LOGIT else n - 1
    for i in range(stop):
        node, xs = nodes[i], [vals[m] for m in wiring[i]]
        if isinstance(node, Activation):
            lo, up = xs[0]
            if backsub and i in behind:
                lo, up = round_outward(_backsub(net, box, i, pre, splits, (lo, up)), rnd.fwd[wiring[i][0]])
            s = splits.get(i)
            if s is not None:
                bad = ((s > 0) & (up <= 0)) | ((s < 0) & (lo > 0))
                empty |= bad.reshape(d, -1).any(1)
                lo = torch.where(s > 0, lo.clamp(min=0), lo)
                up = torch.where(s < 0, up.clamp(max=0), up)
                lo = torch.minimum(lo, up)  # an empty domain keeps a valid (dropped) box
            pre[i] = (lo, up)
            xs = [(lo, up)]
        vals[node.name] = round_outward(node.ibp_forward(xs, net.in_shapes(i), ctx), rnd.fwd[node.name])
    seed = output_seed_bounds(vals.get(nodes[-1].name), target, output, net.num_classes, box.lower.dtype,
                              box.lower.device)
    grads: dict[str, Interval] = {nodes[-1].name: (seed[0].reshape(d, *net.shapes[-1]),
                                                   seed[1].reshape(d, *net.shapes[-1]))}
    gout: dict[int, Interval] = {}
    for i in range(n - 1, -1, -1):
        node = nodes[i]
        g = grads.pop(node.name)
        if isinstance(node, Activation):
            gout[i] = g
            lo, up = pre[i]
            dl, du = node.derivative_bounds(lo, up)
            s = splits.get(i)
            if s is not None:
                one, slope = torch.ones_like(dl), torch.full_like(dl, node.param if node.kind == ActKind.LEAKY_RELU
                                                                  else 0.0)
                dl = torch.where(s > 0, one, torch.where(s < 0, slope, dl))
                du = torch.where(s > 0, one, torch.where(s < 0, slope, du))
            outs: Sequence[Interval | None] = (mul_nonneg_interval((dl, du), g),)
        else:
            outs = node.ibp_vjp([vals[m] for m in wiring[i]], g, net.in_shapes(i), ctx)
        for name, gi in zip(wiring[i], outs, strict=True):
            if gi is not None:
                grads[name] = add(grads[name], gi) if name in grads else gi
    return _Pass(round_outward(grads[INPUT], rnd.grad), pre, gout, empty)


def _unstable(lo: torch.Tensor, up: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    free = (lo < 0) & (up > 0)
    return free if s is None else free & (s == 0)


def _acts(net: Network) -> list[int]:
    return [i for i, node in enumerate(net.layers) if isinstance(node, Activation)]


def _stack_splits(net: Network, domains: Sequence[dict[int, torch.Tensor]], device: torch.device
                  ) -> dict[int, torch.Tensor]:
    out = {}
    for i in _acts(net):
        shape = net.in_shapes(i)[0]
        out[i] = torch.stack([dm.get(i, torch.zeros(shape, dtype=torch.int8, device=device)) for dm in domains])
    return out


def _pattern_map(net: Network, pre: dict[int, Interval], splits: dict[int, torch.Tensor], k: int
                 ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """Domain k's LP constraints: (activation index, flat coordinates, signs) for the split
    neurons whose pre-activation is affine in x on the domain (every activation before it has
    a fixed pattern)."""
    cons = []
    for i in _acts(net):
        lo, up = pre[i][0][k], pre[i][1][k]
        s = splits[i][k]
        idx = (s != 0).flatten().nonzero().flatten()
        if idx.numel():
            cons.append((i, idx, s.flatten()[idx]))
        if bool(_unstable(lo, up, s).any()):
            break
    return cons


def _fixed_slopes(net: Network, pre: dict[int, Interval], splits: dict[int, torch.Tensor], k: int
                  ) -> dict[int, torch.Tensor]:
    """σ' of every activation of domain k where it is fixed (split, or stable on its box);
    free neurons get NaN (nothing downstream of them is affine)."""
    out = {}
    for i in _acts(net):
        node = net.layers[i]
        assert isinstance(node, Activation)
        alpha = node.param if node.kind == ActKind.LEAKY_RELU else 0.0
        lo, up, s = pre[i][0][k], pre[i][1][k], splits[i][k]
        slope = torch.full_like(lo, math.nan)
        slope = torch.where((s > 0) | ((s == 0) & (lo > 0)), torch.ones_like(lo), slope)
        slope = torch.where((s < 0) | ((s == 0) & (up <= 0)), torch.full_like(lo, alpha), slope)
        out[i] = slope
    return out


def _affine_pre(net64: Network, x0: torch.Tensor, slopes: dict[int, torch.Tensor], last: int
                ) -> dict[int, torch.Tensor]:
    """Pre-activations of the activations up to index ``last`` as affine maps of x, from the
    network with fixed slopes evaluated at x0 and x0 + e_k (exact for an affine map):
    {i: (n_coords, n_in + 1)} holding [A | c] with z = A x + c."""
    n_in = x0.numel()
    eye = torch.eye(n_in, dtype=torch.float64, device=x0.device).reshape(n_in, *x0.shape[1:])
    xs = torch.cat([x0, x0 + eye])
    vals: dict[str, torch.Tensor] = {INPUT: xs}
    out = {}
    for i, (node, ins) in enumerate(zip(net64.layers, net64.wiring, strict=True)):
        if i > last:
            break
        args = [vals[m] for m in ins]
        if isinstance(node, Activation):
            z = args[0]
            zf = z.reshape(z.shape[0], -1)
            a = (zf[1:] - zf[0:1]).T  # (n_coords, n_in)
            c = zf[0] - a @ x0.reshape(-1)
            out[i] = torch.cat([a, c[:, None]], dim=1)
            vals[node.name] = z * slopes[i].to(torch.float64)
        else:
            vals[node.name] = node.forward(args)
    return out


def _lp_feasible(net64: Network, box: Bounds, cons: list[tuple[int, torch.Tensor, torch.Tensor]],
                 slopes: dict[int, torch.Tensor]) -> tuple[float, torch.Tensor | None]:
    """max t s.t. x ∈ box, s_j·z_j(x) ≥ t·‖∇z_j‖ for every constraint (t ≤ 1): the distance of
    the deepest point of the domain from its split hyperplanes, and that point."""
    from scipy.optimize import linprog  # a dependency of bab only

    if not cons:
        return 1.0, None
    lo = box.lower.to(torch.float64).reshape(-1)
    up = box.upper.to(torch.float64).reshape(-1)
    x0 = ((lo + up) / 2).reshape(1, *box.lower.shape[1:])
    maps = _affine_pre(net64, x0, slopes, max(i for i, _, _ in cons))
    rows, rhs = [], []
    for i, idx, signs in cons:
        ac = maps[i][idx]
        a, c = ac[:, :-1], ac[:, -1]
        sg = signs.to(torch.float64)
        norm = a.norm(dim=1)
        const = norm < _ZERO_ROW
        if bool(const.any()):
            val = sg[const] * c[const]
            # a constant pre-activation: active needs c > 0, inactive c ≤ 0
            ok = torch.where(sg[const] > 0, val > 0, val >= 0)
            if not bool(ok.all()):
                return -math.inf, None
        keep = ~const
        # s·(a·x + c) ≥ t‖a‖  ⇔  −s·a·x + ‖a‖·t ≤ s·c
        rows.append(torch.cat([-(sg[keep, None] * a[keep]), norm[keep, None]], dim=1))
        rhs.append(sg[keep] * c[keep])
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

    # -- budget ---------------------------------------------------------------------------
    def out_of_budget(self) -> bool:
        return (time.perf_counter() - self.start > self.opts.timeout_s) or self.domains >= self.opts.max_domains

    # -- bounding -------------------------------------------------------------------------
    def _judge(self, lo: torch.Tensor, up: torch.Tensor, boxes: Bounds) -> torch.Tensor:
        w = self.obj.worst(Bounds(lo, up), boxes).to(torch.float64)
        return torch.where(torch.isnan(w), torch.full_like(w, math.inf * self.obj.sign), w)

    def bound_neurons(self, splits_list: Sequence[dict[int, torch.Tensor]]) -> list[_Domain | None]:
        """Bound neuron-split domains; None for an empty one."""
        d = len(splits_list)
        self.domains += d
        dev = self.box.lower.device
        box = Bounds(self.box.lower.expand(d, *self.box.lower.shape[1:]),
                     self.box.upper.expand(d, *self.box.upper.shape[1:]))
        splits = _stack_splits(self.net, splits_list, dev)
        p = _neuron_pass(self.net, box, self.target.expand(d), self.output, splits, rnd=self.rounding)
        lo = torch.maximum(p.grad[0], self.root.lower)
        up = torch.minimum(p.grad[1], self.root.upper)
        keep = (~p.empty).nonzero().flatten()
        if self.leaf_engine is not None and keep.numel():
            lo_k, up_k = _leaf_bounds(self.leaf_engine, box, self.target, p, splits, keep)
            lo[keep], up[keep] = torch.maximum(lo[keep], lo_k), torch.minimum(up[keep], up_k)
        up = torch.maximum(lo, up)  # both sound: they meet (crossing only by round-off)
        worst = self._judge(lo, up, box)
        free = torch.zeros(d, dtype=torch.bool, device=dev)  # some unstable neuron left unsplit
        for i, (zl, zu) in p.pre.items():
            free |= _unstable(zl, zu, splits[i]).reshape(d, -1).any(1)
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


def _neuron_candidates(net: Network, dom: _Domain, k: int, first_layer: bool = False) -> list[tuple[int, int]]:
    """The k free unstable neurons (activation index, flat coordinate) of largest
    |g_out|·min(u, −l) (``first_layer``: only in the first activation that has any)."""
    assert dom.info is not None
    p, j = dom.info
    scored = []
    for i, (lo, up) in p.pre.items():
        lo_j, up_j = lo[j].flatten(), up[j].flatten()
        s = dom.splits.get(i)
        free = _unstable(lo_j, up_j, None if s is None else s.flatten())
        if not bool(free.any()):
            continue
        gl, gu = p.gout[i][0][j].flatten(), p.gout[i][1][j].flatten()
        score = torch.maximum(gl.abs(), gu.abs()) * torch.minimum(up_j, -lo_j)
        score = torch.where(free, score + 1e-30, torch.full_like(score, -1.0))
        top = torch.topk(score, min(k, int(free.sum()))).indices
        scored += [(float(score[t]), i, int(t)) for t in top]
        if first_layer:
            break
    scored.sort(reverse=True)
    return [(i, t) for _, i, t in scored[:k]]


def _child(net: Network, splits: dict[int, torch.Tensor], i: int, t: int, side: int, device) -> dict[int, torch.Tensor]:
    out = dict(splits)
    base = out.get(i)
    base = torch.zeros(net.in_shapes(i)[0], dtype=torch.int8, device=device) if base is None else base.clone()
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


def _best_pair(search: _Search, pairs: list[tuple[_Domain | None, _Domain | None]]) -> int:
    """The candidate whose worse child is best (an empty child counts as decided)."""
    def worse(pair: tuple[_Domain | None, _Domain | None]) -> float:
        return max(-math.inf if c is None else c.key for c in pair)
    return min(range(len(pairs)), key=lambda q: worse(pairs[q]))


def _step_neurons(search: _Search, batch: list[_Domain]) -> None:
    net, opts, dev = search.net, search.opts, search.box.lower.device
    layer = opts.branching == Branching.LAYER
    k = 1 if layer else opts.candidates
    plans: list[list[tuple[int, int]]] = []
    kids: list[dict[int, torch.Tensor]] = []
    for dom in batch:
        cands = _neuron_candidates(net, dom, k, layer)
        plans.append(cands)
        for i, t in cands:
            kids += [_child(net, dom.splits, i, t, +1, dev), _child(net, dom.splits, i, t, -1, dev)]
    bounded = search.bound_neurons(kids) if kids else []
    pos = 0
    for dom, cands in zip(batch, plans, strict=True):
        if not cands:  # no free unstable neuron: an exact leaf (handled by _exact_leaf)
            search.stuck.append(dom)
            continue
        pairs = [(bounded[pos + 2 * q], bounded[pos + 2 * q + 1]) for q in range(len(cands))]
        pos += 2 * len(cands)
        for child in pairs[_best_pair(search, pairs)]:
            if child is not None:
                _admit(search, child)


def _admit(search: _Search, dom: _Domain) -> None:
    """Queue or close a bounded neuron domain. An exact leaf (and, with LP on, every undecided
    domain) is first checked for a point of the box; a domain without one is dropped, and the
    point found is judged as a candidate witness."""
    if dom.full or (search.lp and not search.decided(dom)):
        assert dom.info is not None
        p, j = dom.info
        pre = {i: (lo[j:j + 1], up[j:j + 1]) for i, (lo, up) in p.pre.items()}
        splits = _stack_splits(search.net, [dom.splits], search.box.lower.device)
        cons = _pattern_map(search.net, pre, splits, 0)
        t, dom.point = _lp_feasible(search.net64, search.box, cons, _fixed_slopes(search.net, pre, splits, 0))
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


def _leaf_bounds(engine: LeafEngine, box: Bounds, target: torch.Tensor, p: _Pass, splits: dict[int, torch.Tensor],
                 keep: torch.Tensor) -> Interval:
    """The leaf engine on the domains ``keep``, given their pre-activation boxes. A neuron split
    active is handed the box [max(l, tiny), u]: the domain's points with z = 0 exactly (where
    relu′ = 0, as autograd has it) belong to its inactive sibling, which keeps z ≤ 0. The batch
    is padded to a power of two (repeating the first domain) so that the engine sees few batch
    sizes (each is one traced graph)."""
    k = int(keep.numel())
    size = 1 << (k - 1).bit_length()
    idx = torch.cat([keep, keep[:1].expand(size - k)])
    pre = {}
    for i, (lo, up) in p.pre.items():
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
            _admit(s, first)
        else:
            s.settle(first)
        step = _step_neurons if mode == Mode.NEURONS else _step_inputs
        # the batch grows while steps are short against the time left and shrinks when they are
        # not, so that one step (on a CNN, seconds) does not overrun the budget
        size = min(opts.batch, 4)
        while s.open and s.witness is None and not s.out_of_budget():
            t0 = time.perf_counter()
            step(s, [s.pop() for _ in range(min(size, len(s.open)))])
            dt, left = time.perf_counter() - t0, opts.timeout_s - (time.perf_counter() - s.start)
            size = min(opts.batch, 2 * size) if 4 * dt < left else max(1, size // 2) if 2 * dt > left else size
    return _result(s)


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
             f"{len(s.open)} open, {len(s.stuck)} exact undecided, {dt:.2f} s",)
    return BabResult(status, worst, Bounds(s.hull_lo, torch.maximum(s.hull_lo, s.hull_up)), s.domains, s.leaves,
                     len(rest), dt, not s.open, s.mode, s.witness, notes)


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
