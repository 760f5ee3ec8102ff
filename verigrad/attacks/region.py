"""The region walk: an exact local search over the linear regions of a piecewise-linear network.

On a ReLU / LeakyReLU / PReLU network the saliency map is constant on each linear region (a
fixed activation pattern), so gradient steps on x see nothing of it and the PGD attacks go
through a smooth surrogate. The walk moves between regions instead. At a point x with pattern
P, flipping one neuron j of sign node i (slope s_j → s'_j, the other slopes kept) changes the
gradient exactly by

    Δg_j = (s'_j − s_j) · (∂o/∂y_j) · ∇ₓz_j,

since g is affine in each slope separately (every path through the network passes neuron j
once): ∂o/∂y_j is the backward signal at the node's output, ∇ₓz_j the row of the affine map of
its input on the region. Every neuron that is unstable on the box (its pre-activation bounds,
:func:`verigrad.bounds.bab.pre_activation_boxes`, straddle 0) is scored by the property's metric
on g + Δg_j in one batch; the best flips are tried in turn, each by an LP over the box for the
deepest point of the region with the new pattern on every unstable neuron
(:func:`verigrad.bounds.bab.lp_deepest_point`). The first region that exists and is worse for
the property (its real metric at the LP point; ties broken by the attack score) becomes the
current one; the walk ends after ``steps`` moves or where no tried flip helps, and restarts from
a random point of the box. Like every attack its points are judged on the real network.
"""
from __future__ import annotations

import math

import torch

from typing import Callable

from verigrad import properties as props
from verigrad.attacks.threat import Point, Threat
from verigrad.bounds.bab import SIGN_NODES, affine_pre, lp_deepest_point, neg_slope, neuron_split_reason, pre_activation_boxes
from verigrad.bounds.base import Bounds
from verigrad.explanations import ExplanationMethod
from verigrad.graph.gradient_graph import Output
from verigrad.models.network import MaxPool, Network
from verigrad.properties import Property

# flips tried (one LP each) per move: the best-scored ones, in order
TRIES_PER_MOVE = 8
# the most unstable sign neurons a walk scores at once (its Δg matrix is this × input size)
MAX_CANDIDATES = 4096
# the largest network (sign neurons in all) the walk runs on by default: its LPs grow with the
# network (~0.05 s each on the 512-neuron FC net, ~0.6 s on the 8644-neuron CNN, where PGD
# reaches further in the same time); naming the attack runs it on any size
DEFAULT_MAX_NEURONS = 2048


def region_walk_default(threat: Threat) -> bool:
    """Whether the walk is among the default attacks for ``threat``'s network (its size)."""
    net = threat.net
    return sum(math.prod(net.in_shapes(i)[0]) for i, n in enumerate(net.layers)
               if isinstance(n, SIGN_NODES)) <= DEFAULT_MAX_NEURONS


def region_walk_applies(prop: Property, threat: Threat) -> bool:
    """An input-only threat on the saliency of a logit of a network whose every nonlinearity is
    a sign node (relu, leaky relu, PReLU; MaxPool regions are not walked)."""
    net = threat.net
    return (threat.moves_input and not threat.moves_params and threat.output == Output.LOGIT
            and threat.explainer.method == ExplanationMethod.SALIENCY and neuron_split_reason(net) is None
            and not any(isinstance(n, MaxPool) for n in net.layers))


def _gradient(net: Network, signs: list[int], x: torch.Tensor, target: int
              ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """At x (1, *S): the logit's gradient (1, *S), each sign node's input z_i and the backward
    signal ∂o/∂y_i at its output (both (1, *shape))."""
    xx = x.detach().clone().requires_grad_(True)
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}

    def apply(i: int, node: object, xs: list[torch.Tensor]) -> torch.Tensor:
        y = node.forward(xs)  # type: ignore[attr-defined]
        if i in signs:
            ins[i], outs[i] = xs[0].detach(), y
        return y

    o = net.evaluate(xx, apply)[net.layers[-1].name].reshape(1, -1)[0, target]
    grads = torch.autograd.grad(o, [xx, *(outs[i] for i in signs)])
    return grads[0].detach(), ins, {i: g.detach() for i, g in zip(signs, grads[1:], strict=True)}


def _slopes(net: Network, active: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each sign node's slope on the region: 1 where active, its negative-side slope elsewhere."""
    out = {}
    for i, a in active.items():
        node = net.layers[i]
        assert isinstance(node, SIGN_NODES)
        out[i] = torch.where(a, torch.ones_like(a, dtype=torch.float64), neg_slope(node, a.to(torch.float64)))
    return out


def flip_deltas(net: Network, x: torch.Tensor, active: dict[int, torch.Tensor], signal: dict[int, torch.Tensor],
                neurons: dict[int, torch.Tensor]) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """For each neuron j of ``neurons`` ({sign node index: flat coordinates}) flipped alone on
    the region of x whose pattern is ``active`` (bool, each node's input shape): (node, j) and
    Δg_j = (s'_j − s_j)·(∂o/∂y_j)·∇ₓz_j (rows of a (J, n_in) tensor), the exact change of the
    gradient. ``signal``: ∂o/∂y at each sign node's output (:func:`_gradient`)."""
    slopes = _slopes(net, active)
    flipped = _slopes(net, {i: ~a for i, a in active.items()})
    maps = affine_pre(net, x, slopes, max(neurons))
    keys: list[tuple[int, int]] = []
    deltas = []
    for i, idx in neurons.items():
        step = (flipped[i].reshape(-1)[idx] - slopes[i].reshape(-1)[idx]) * signal[i].reshape(-1)[idx]
        deltas.append(step[:, None] * maps[i][idx, :-1])
        keys += [(i, int(j)) for j in idx.tolist()]
    return keys, torch.cat(deltas)


def region_walk(threat: Threat, prop: Property, v0: torch.Tensor, steps: int, restarts: int,
                gen: torch.Generator, start: torch.Tensor | None,
                score: Callable[[Property, torch.Tensor, torch.Tensor], torch.Tensor],
                worse: Callable[[Property, float, float], bool]) -> tuple[Point, float]:
    """The worst point the walk reached and the property's metric there (float64). ``v0``: the
    real map at the centre; ``start``: the first walk's starting point (None: the centre).
    Each of the ``restarts`` walks solves at most 2·``steps`` LPs. ``score`` (higher = worse,
    the attacks' objective) breaks ties of the metric; ``worse(prop, a, b)``: a is further
    toward violation than b (the attacks' own, passed in: they import this module)."""
    f64 = torch.float64
    net = threat.net.memo(("region-walk", "float64"), lambda: threat.net.to(f64))
    box = Bounds(threat.box.lower.to(f64), threat.box.upper.to(f64))
    target = threat.target
    v0 = v0.to(f64)
    signs = [i for i, n in enumerate(net.layers) if isinstance(n, SIGN_NODES)]
    pre = pre_activation_boxes(net, box, threat.target_tensor, threat.output)
    unstable = {i: ((pre[i][0] < 0) & (pre[i][1] > 0)).reshape(-1).nonzero().flatten() for i in signs}
    unstable = {i: idx for i, idx in unstable.items() if idx.numel()}
    worse_first = 1.0 if prop.rule.direction == props.Direction.AT_MOST else -1.0

    def judged(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (metric, attack score) per map
        return props.metric(prop, v0, g), score(prop, v0, g)

    def better(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return worse(prop, a[0], b[0]) or (a[0] == b[0] and a[1] > b[1])

    def at(x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor], tuple[float, float]]:
        g, z, sig = _gradient(net, signs, x, target)
        m, s = judged(g)
        return g, {i: z[i][0] > 0 for i in signs}, sig, (float(m[0]), float(s[0]))

    centre = threat.centre()
    best_x = threat.x.to(f64)
    best = at(best_x)[3]
    if not unstable or sum(int(idx.numel()) for idx in unstable.values()) > MAX_CANDIDATES:
        return Point(best_x.to(threat.x.dtype), centre.params), best[0]
    for r in range(restarts):
        if r == 0:
            x = best_x if start is None else start.to(f64).reshape(best_x.shape)
        else:
            x = threat.random_point(gen).x.to(f64)
        g, active, sig, cur = at(x)
        lps, tabu = 0, set()
        while lps < 2 * steps:
            keys, deltas = flip_deltas(net, x, active, sig, unstable)
            cm, cs = judged((g.reshape(1, -1) + deltas).reshape(-1, *g.shape[1:]))
            order = sorted(range(len(keys)), key=lambda k: (-worse_first * float(cm[k]), -float(cs[k])))
            moved, tried = False, 0
            for k in order:
                if tried >= TRIES_PER_MOVE or lps >= 2 * steps or not better((float(cm[k]), float(cs[k])), cur):
                    break
                if keys[k] in tabu:
                    continue
                tried += 1
                lps += 1
                tabu.add(keys[k])
                i, j = keys[k]
                want = {n: a.clone() for n, a in active.items()}
                want[i].reshape(-1)[j] = ~want[i].reshape(-1)[j]
                cons = [(n, idx, torch.where(want[n].reshape(-1)[idx], 1, -1).to(torch.int8))
                        for n, idx in unstable.items()]
                depth, point = lp_deepest_point(net, box, cons, _slopes(net, want))
                if point is None or not depth > 0:
                    continue  # that region does not meet the box
                point = torch.minimum(torch.maximum(point.to(box.lower.device), box.lower), box.upper)
                gn, an, sn, val = at(point)
                if better(val, cur):
                    x, g, active, sig, cur = point, gn, an, sn, val
                    moved, tabu = True, set()
                    break
            if not moved:
                break
        if better(cur, best):
            best, best_x = cur, x
    return Point(best_x.to(threat.x.dtype), centre.params), best[0]
