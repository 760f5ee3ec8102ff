"""Falsification: attacks that search the certificate's own box for a violating point.

``attack_property`` runs every applicable attack (registry ``ATTACKS``) on one property and
re-evaluates each attack's worst point in float64 on the real network
(:func:`evaluate_point`). The property is violated — and a :class:`Witness` returned — only
if that float64 value violates it at a point that lies in the box.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from verigrad.explanations import explain
from verigrad.properties import Property, direction_text

from verigrad.attacks.search import ATTACKS, AttackMethod, AttackOptions, AttackOrder, Found, applicable, run_attack, score, worse
from verigrad.attacks.threat import Point, Threat
from verigrad.attacks.witness import (
    Evaluation,
    LoadedWitness,
    Witness,
    evaluate_point,
    load_witness,
    save_witness,
    witness_bytes,
)


@dataclass(frozen=True, eq=False)
class AttackOutcome:
    """All attacks on one property of one input: the worst float64 value any reached (None
    when no attack applies), by which attack, and the witness if it violates."""

    property: str
    value: float | None
    attack: str | None
    violated: bool
    witness: Witness | None
    tried: tuple[str, ...]
    time_s: float
    values: dict[str, float] = field(default_factory=dict)  # per attack, float64
    similarity: dict[str, float] = field(default_factory=dict)  # v at the worst point vs v0

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "attack": self.attack, "violated": self.violated, "tried": list(self.tried),
                "values": self.values, "time_s": self.time_s, "similarity": self.similarity}


def _similarity(v0: torch.Tensor, v: torch.Tensor) -> dict[str, float]:
    from verigrad.metrics import similarity_report

    return similarity_report(v0[0], v[0])


def attack_property(threat: Threat, prop: Property, options: AttackOptions,
                    methods: Sequence[AttackMethod | str] | None = None,
                    start: torch.Tensor | None = None) -> AttackOutcome:
    """Run the applicable attacks on ``prop`` and judge their worst points in float64 (against
    the threat's definition: a search confined to a sub-box of it yields witnesses of the whole
    box). ``start``: the input point every attack's first restart starts from."""
    t0 = time.perf_counter()
    chosen = applicable(prop, threat, None if methods is None else tuple(AttackMethod(m) for m in methods))
    v0 = None
    best: tuple[str, Evaluation] | None = None
    values: dict[str, float] = {}
    for m in chosen:
        if v0 is None:
            v0 = explain(threat.explainer, threat.net, threat.x, threat.target_tensor, threat.output)
        first = start
        if ATTACKS[m].chained and best is not None:
            first = best[1].point.x  # refine the worst point so far
        found = run_attack(m, threat, prop, v0, options, first)
        ev = evaluate_point(threat, prop, found.point)
        values[m.value] = ev.value
        # a violation found in float64 outranks a larger value that was not in the box
        if best is None or (ev.violated, ) > (best[1].violated, ) or (
                ev.violated == best[1].violated and worse(prop, ev.value, best[1].value)):
            best = (m.value, ev)
    dt = time.perf_counter() - t0
    if best is None:
        return AttackOutcome(prop.name, None, None, False, None, (), dt)
    return outcome(threat, prop, best[0], best[1], tuple(m.value for m in chosen), dt, values)


def outcome(threat: Threat, prop: Property, name: str, ev: Evaluation, tried: tuple[str, ...], dt: float,
            values: dict[str, float] | None = None) -> AttackOutcome:
    """The outcome of a search whose worst point, judged in float64, is ``ev`` (found by
    ``name``): a witness when it violates the property."""
    sim = _similarity(ev.v0, ev.v)
    witness = None
    if ev.violated:
        t64 = threat.astype(torch.float64)
        base = {n: (w, b) for n, (w, b) in t64.centre().params.items() if n in ev.point.params}
        witness = Witness(prop.name, name, threat.target, t64.x, ev.point, base, ev.v0, ev.v, ev.value,
                          prop.threshold, direction_text(prop), sim)
    return AttackOutcome(prop.name, ev.value, name, ev.violated, witness, tried, dt,
                         {name: ev.value} if values is None else values, sim)


__all__ = [
    "ATTACKS", "AttackMethod", "AttackOptions", "AttackOrder", "AttackOutcome", "Evaluation", "Found", "LoadedWitness", "Point",
    "Threat", "Witness", "applicable", "attack_property", "evaluate_point", "load_witness", "outcome", "run_attack",
    "save_witness", "score", "witness_bytes",
]
