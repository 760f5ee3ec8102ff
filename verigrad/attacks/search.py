"""Explanation attacks: projected gradient search over the threat box for a point whose
explanation violates a property.

Every attack maximises a differentiable *score* of the explanation v(x', θ') — the
property's own metric where it is differentiable, a surrogate where it is not (top-k, sign)
— minus an optional penalty w·‖z(x', θ') − z(x, θ)‖² on the change of the logits z. Every
iterate is scored on the REAL network with the property's real metric, and the attack
returns the worst point it saw. For piecewise-linear networks v is piecewise constant in x
(∂v/∂x = 0 almost everywhere), so the score's gradient is taken through the softplus(β)
surrogate network (Dombrowski et al. 2019); the witness is never judged on the surrogate.

Attacks (the registry ``ATTACKS``):
  pgd          signed (ℓ∞) steps on the input, score = the property's metric (Madry-style PGD
               with random restarts);
  targeted     Dombrowski et al.: minimise the distance to the target map while keeping the
               logits (penalty weight ``output_weight``);
  ifia         Ghorbani et al.'s iterative feature-importance attack: signed steps that move
               explanation mass out of the original top-k features;
  levine_topk  Levine et al. (appendix C): ℓ2-normalised steps on the same top-k objective,
               halving the step while the predicted class would change;
  params       Heo et al.-style model manipulation: signed steps on the boxed weights (and the
               input, when both boxes are given), logits kept by the penalty.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from verigrad import properties as props
from verigrad.graph.gradient_graph import logits as net_logits
from verigrad.explanations import explain
from verigrad.properties import Direction, Kind, Property

from verigrad.attacks.region import region_walk, region_walk_applies, region_walk_default
from verigrad.attacks.threat import Point, Threat


class AttackOrder(str, Enum):
    """When attacks run relative to bounding."""

    BEFORE = "before"  # attack every property first; bound unless all are falsified
    AFTER = "after"  # bound first; attack only properties left unknown
    BOTH = "both"  # bound and attack everything (needed for the certificate–attack gap)
    SKIP = "skip"  # never attack


class AttackMethod(str, Enum):
    """Attacks by name (the registry in verigrad.attacks maps each to its function)."""

    PGD = "pgd"  # ℓ∞ PGD on the property's own metric
    TARGETED = "targeted"  # Dombrowski et al. 2019: towards the target map, output kept
    IFIA = "ifia"  # Ghorbani et al.: top-k mass of the original map, signed steps
    LEVINE_TOPK = "levine_topk"  # Levine et al.: ℓ2 steps on top-k, backtracking on class change
    PARAMS = "params"  # Heo et al.-style weight manipulation inside the parameter box
    REGION = "region"  # exact walk over the linear regions of a piecewise-linear network (attacks.region)


@dataclass(frozen=True)
class AttackOptions:
    steps: int = 40
    restarts: int = 2
    step_size: float = 0.25  # fraction of the box half-width (ℓ∞) or of its ℓ2 norm (ℓ2 steps)
    seed: int = 0
    surrogate_beta: float | None = 10.0
    output_weight: float = 1.0
    keep_class: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.restarts < 1 or not self.step_size > 0:
            raise ValueError("attack options: steps and restarts must be >= 1 and step_size > 0")


@dataclass(frozen=True, eq=False)
class Found:
    """The worst point an attack saw and the property's real metric there (working dtype)."""

    point: Point
    value: float


# ---------------------------------------------------------------------------------------
# Scores: larger = closer to violating the property


def worse(prop: Property, a: float, b: float) -> bool:
    """Whether metric value a is further toward violation than b."""
    return a > b if prop.rule.direction == Direction.AT_MOST else a < b


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _features(prop: Property, n: int) -> torch.Tensor | slice:
    feats = getattr(prop, "features", None)
    return slice(None) if feats is None else torch.as_tensor(list(feats), dtype=torch.long)


def _topk_score(prop: Property, v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """−(share of |v| on the original top-k): the IFIA / Levine objective."""
    assert prop.k is not None  # a topk property always has k (checked by Property)
    k = int(prop.k)
    idx = _flat(v0).abs().topk(k, dim=1).indices
    a = _flat(v).abs()
    return -(a.gather(1, idx.expand(a.shape[0], -1)).sum(1) / a.sum(1).clamp_min(1e-30))


def _sign_score(prop: Property, v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """−Σ sign(v0_i)·v_i/|v0_i| over the chosen features: each pushed toward its flip, scaled
    so that small attributions (the easiest to flip) count as much as large ones."""
    f = _features(prop, v0[0].numel())
    a0, a = _flat(v0)[:, f], _flat(v)[:, f]
    scale = a0.abs().clamp_min(1e-12 * float(a0.abs().max().clamp_min(1e-30)))
    return -(torch.sign(a0) * a / scale).sum(1)


def _feature_score(prop: Property, v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _flat(v)[:, _features(prop, v0[0].numel())].abs().amax(1)


def score(prop: Property, v0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The differentiable objective (B,) an attack on ``prop`` maximises."""
    kind = Kind(prop.kind).value
    if kind == "topk":
        return _topk_score(prop, v0, v)
    if kind == "sign":
        return _sign_score(prop, v0, v)
    if kind == "feature_bound":
        return _feature_score(prop, v0, v)
    m = props.metric(prop, v0, v)
    return m if prop.rule.direction == Direction.AT_MOST else -m


# ---------------------------------------------------------------------------------------
# The one search loop every attack configures


@dataclass(frozen=True)
class _Search:
    move_input: bool
    move_params: bool
    l2_steps: bool = False  # ℓ2-normalised steps instead of signed steps
    penalty: bool = False  # subtract output_weight·‖Δlogits‖²
    backtrack: bool = False  # halve the step while the predicted class would change


def _real_value(threat: Threat, prop: Property, v0: torch.Tensor, p: Point) -> float:
    v = explain(threat.explainer, threat.net, p.x, threat.target_tensor, threat.output, params=p.params or None)
    return float(props.metric(prop, v0, v)[0])


def _predicted(threat: Threat, p: Point) -> int:
    with torch.no_grad():
        return int(net_logits(threat.net, p.x, p.params or None).argmax(1)[0])


def _step(threat: Threat, p: Point, grads: dict[str, torch.Tensor], how: _Search, size: float) -> Point:
    """One ascent step of relative size ``size`` along the gradients, projected onto the box.
    Each coordinate moves by size × its box half-width (signed steps); ℓ2 steps move by
    size × ‖half-width‖₂ along the normalised gradient, scaled per coordinate by the box."""

    def move(t: torch.Tensor, g: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        if how.l2_steps:
            d = g * half
            n = torch.linalg.vector_norm(d)
            return t if float(n) == 0 else t + size * torch.linalg.vector_norm(half) * d / n
        return t + size * half * torch.sign(g)

    x = p.x
    if how.move_input and "x" in grads:
        x = move(p.x, grads["x"], threat.box.radius)
    params = dict(p.params)
    if how.move_params:
        for name, (w, b) in p.params.items():
            lb = threat.params.get(name) if threat.params is not None else None
            assert lb is not None
            params[name] = (move(w, grads[f"{name}.w"], lb.weight.radius), move(b, grads[f"{name}.b"], lb.bias.radius))
    return threat.project(Point(x, params))


def _run(threat: Threat, prop: Property, v0: torch.Tensor, opts: AttackOptions, how: _Search,
         gen: torch.Generator, start: torch.Tensor | None = None) -> Found:
    net, t, out = threat.net, threat.target_tensor, threat.output
    beta = opts.surrogate_beta
    centre = threat.centre()
    with torch.no_grad():
        z0 = net_logits(net, threat.x, None)
    pred0 = int(z0.argmax(1)[0])
    # the score compares the surrogate's explanation with the surrogate's own at the centre,
    # so the objective starts at its minimum and its gradient points away from v0
    ex = threat.explainer
    v0_score = explain(ex, net, threat.x, t, out, smooth_beta=beta) if beta is not None else v0
    best = Found(centre, _real_value(threat, prop, v0, centre))

    def evaluate(p: Point) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        leaves: dict[str, torch.Tensor] = {}
        x = p.x.detach().clone().requires_grad_(True)
        leaves["x"] = x
        params = {}
        for name, (w, b) in p.params.items():
            w = w.detach().clone().requires_grad_(how.move_params)
            b = b.detach().clone().requires_grad_(how.move_params)
            params[name] = (w, b)
            if how.move_params:
                leaves[f"{name}.w"], leaves[f"{name}.b"] = w, b
        v = explain(ex, net, x, t, out, params=params or None, smooth_beta=beta, create_graph=True)
        s = score(prop, v0_score, v).sum()
        if how.penalty and opts.output_weight > 0:
            z = net_logits(net, x, params or None, beta)
            s = s - opts.output_weight * ((z - z0) ** 2).sum()
        names = list(leaves)
        gs = torch.autograd.grad(s, [leaves[k] for k in names], allow_unused=True)
        return s.detach(), {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(names, gs, strict=True)}

    for r in range(opts.restarts):
        if r == 0 and start is not None:  # a given input point (e.g. one of a branch-and-bound domain)
            p = threat.project(Point(start.to(centre.x.dtype).reshape(centre.x.shape), centre.params))
        elif r == 0:
            # the centre, nudged: at v = v0 a norm's gradient is zero and the search would not start
            rnd = threat.random_point(gen)
            p = threat.project(Point(centre.x + 0.01 * (rnd.x - centre.x),
                                     {n: (w + 0.01 * (rnd.params[n][0] - w), b + 0.01 * (rnd.params[n][1] - b))
                                      for n, (w, b) in centre.params.items()}))
        else:
            p = threat.random_point(gen)
        if not how.move_params:
            p = Point(p.x, centre.params)
        if not how.move_input:
            p = Point(centre.x, p.params)
        for _ in range(opts.steps):
            _, grads = evaluate(p)
            size = opts.step_size
            q = _step(threat, p, grads, how, size)
            if how.backtrack and opts.keep_class:
                tries = 0
                while _predicted(threat, q) != pred0 and tries < 5:
                    size /= 2
                    tries += 1
                    q = _step(threat, p, grads, how, size)
                if _predicted(threat, q) != pred0:
                    break  # no class-preserving step left from here
            p = q.detach()
            val = _real_value(threat, prop, v0, p)
            if worse(prop, val, best.value):
                best = Found(p, val)
    return best


# ---------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class AttackDef:
    """One attack: when it applies to a property and threat, and how it searches."""

    applies: Callable[[Property, Threat], bool]
    search: Callable[[Threat], _Search] | None
    text: str
    # a search of its own instead of the gradient steps of ``search``: (threat, prop, v0, opts,
    # gen, start) → the worst point; ``chained``: it starts from the best point of the attacks
    # that ran before it (a refinement, not a fresh search)
    run: Callable[[Threat, Property, torch.Tensor, AttackOptions, torch.Generator, torch.Tensor | None], Point] | None = None
    chained: bool = False
    # whether it is among the attacks run when none are named (e.g. not where it is too slow)
    default: Callable[[Threat], bool] = lambda th: True


def _input_only(kinds: tuple[str, ...] | None) -> Callable[[Property, Threat], bool]:
    return lambda p, th: th.moves_input and (kinds is None or Kind(p.kind).value in kinds)


_TOPK = ("topk",)

ATTACKS: dict[AttackMethod, AttackDef] = {
    AttackMethod.PGD: AttackDef(_input_only(None), lambda th: _Search(True, False),
                                "ℓ∞ PGD on the property's metric, random restarts"),
    AttackMethod.TARGETED: AttackDef(_input_only((Kind.TARGETED.value,)), lambda th: _Search(True, False, penalty=True),
                                     "Dombrowski et al. 2019: toward the target, logits kept"),
    AttackMethod.IFIA: AttackDef(_input_only(_TOPK), lambda th: _Search(True, False),
                                 "Ghorbani et al.: top-k mass out of the original top-k"),
    AttackMethod.LEVINE_TOPK: AttackDef(_input_only(_TOPK),
                                        lambda th: _Search(True, False, l2_steps=True, backtrack=True),
                                        "Levine et al.: ℓ2 top-k steps, backtracking on class change"),
    AttackMethod.PARAMS: AttackDef(lambda p, th: th.moves_params,
                                   lambda th: _Search(th.moves_input, True, penalty=True),
                                   "Heo et al.-style weight manipulation (joint with the input box)"),
    AttackMethod.REGION: AttackDef(region_walk_applies, None,
                                   "walk over linear regions: exact single-neuron flips, each realised by an LP",
                                   run=lambda th, p, v0, o, gen, start: region_walk(th, p, v0, o.steps, o.restarts,
                                                                                    gen, start, score, worse)[0],
                                   chained=True, default=region_walk_default),
}


def applicable(prop: Property, threat: Threat, methods: tuple[AttackMethod, ...] | None = None) -> list[AttackMethod]:
    """The attacks to run on ``prop`` (``methods`` None = the default ones that apply). None for a sampled
    (smoothing) explanation: its value at a point is random, so no witness could be replayed."""
    if threat.explainer.probabilistic:
        return []
    if methods is None:
        return [m for m, d in ATTACKS.items() if d.applies(prop, threat) and d.default(threat)]
    return [AttackMethod(m) for m in methods if ATTACKS[AttackMethod(m)].applies(prop, threat)]


def run_attack(method: AttackMethod | str, threat: Threat, prop: Property, v0: torch.Tensor,
               opts: AttackOptions, start: torch.Tensor | None = None) -> Found:
    """Run one registered attack; ``v0`` is the real explanation at the centre; ``start``: the
    input point its first restart starts from (default: the centre, nudged)."""
    try:
        d = ATTACKS[AttackMethod(method)]
    except ValueError:
        raise ValueError(f"unknown attack {method!r} (available: {', '.join(m.value for m in ATTACKS)})") from None
    gen = torch.Generator().manual_seed(opts.seed)
    if d.run is not None:
        p = d.run(threat, prop, v0, opts, gen, start)
        return Found(p, _real_value(threat, prop, v0, p))
    assert d.search is not None
    return _run(threat, prop, v0, opts, d.search(threat), gen, start)
