"""Falsification inside branch and bound (issue 16): the attacks run from the worst open
domains — confined to a sub-box, or started at a point of a neuron-split domain — within their
share of the search's time, and a witness they find ends the search as falsified, judged and
replayed against the whole box."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("scipy")

import torch  # noqa: E402
import yaml  # noqa: E402
from click.testing import CliRunner  # noqa: E402

import verigrad.verify as vmod  # noqa: E402
from tests.helpers import random_mlp  # noqa: E402
from verigrad.attacks import AttackOutcome  # noqa: E402
from verigrad.bounds import Bounds, compute_bounds  # noqa: E402
from verigrad.bounds import bab as babmod  # noqa: E402
from verigrad.bounds.bab import BabOptions, Mode, Objective, search  # noqa: E402
from verigrad.cli import main  # noqa: E402
from verigrad.graph.gradient_graph import Output  # noqa: E402
from verigrad.models.network import ActKind  # noqa: E402
from verigrad.perturbation import input_box  # noqa: E402
from verigrad.reports import ExitCode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")


def _never(calls: list, witness_at: int | None = None, pause: float = 0.0) -> Objective:
    """A width objective that never holds, with an attack that records what it is given and
    returns a witness on call number ``witness_at``."""
    def attack(box: Bounds, start: torch.Tensor | None) -> object | None:
        calls.append((box, start))
        time.sleep(pause)
        return "witness" if witness_at is not None and len(calls) == witness_at else None

    return Objective(worst=lambda maps, boxes: maps.width.flatten(1).sum(1), holds=lambda w: w < -1.0,
                     attack=attack)


def _crown(net):
    return lambda b, t: compute_bounds("crown", net, b, t).bounds


def _smooth_case():
    """A sigmoid net (input splits), its box, class and CROWN root map."""
    net = random_mlp(ActKind.SIGMOID, sizes=(3, 8, 8, 3), seed=3)
    box = input_box(torch.full((1, 3), 0.4, dtype=torch.float64), 0.4, None)
    t = torch.tensor([1])
    return net, box, t, compute_bounds("crown", net, box, t).bounds


def test_input_split_attacks_are_confined_to_a_worst_sub_box_and_a_witness_ends_the_search():
    net, box, t, root = _smooth_case()
    calls: list = []
    r = search(net, box, t, Output.LOGIT, root, _never(calls, witness_at=2),
               BabOptions(timeout_s=30, batch=2, attack_share=0.9), engine=_crown(net))
    assert r.mode == Mode.INPUT and r.status == "falsified" and r.witness == "witness" and r.attacks == 2
    for sub, start in calls:
        assert bool((sub.lower >= box.lower).all() and (sub.upper <= box.upper).all())
        assert float(sub.width.sum()) < float(box.width.sum())  # a split domain, not the whole box
        torch.testing.assert_close(start, sub.center, rtol=0, atol=0)


def test_neuron_split_attacks_start_at_a_point_of_their_domain():
    """The start point lies in the box and on the split side of every split neuron whose
    pre-activation is affine in x (the first layer here, checked at the point)."""
    net = random_mlp(ActKind.RELU, sizes=(5, 12, 8, 3), seed=21)
    gen = torch.Generator().manual_seed(0)
    box = input_box(torch.rand(1, 5, generator=gen, dtype=torch.float64), 0.4, None)
    t = torch.tensor([0])
    root = compute_bounds("crown", net, box, t).bounds
    seen: list = []
    real = babmod._domain_point

    def spy(s, dom):
        point = real(s, dom)
        seen.append((dict(dom.splits), point))
        return point

    objective = _never([])
    try:
        babmod._domain_point = spy
        r = search(net, box, t, Output.LOGIT, root, objective,
                   BabOptions(timeout_s=3, batch=2, attack_share=0.9, lp=False))
    finally:
        babmod._domain_point = real
    assert r.mode == Mode.NEURONS and r.attacks >= 1 and seen
    first = net.layers[0]
    checked = 0
    for splits, point in seen:
        if point is None:  # the LP found the domain empty: nothing to start from
            continue
        assert bool(box.contains(point.to(box.lower.dtype)).all())
        s = splits.get(1)  # the first activation (after the first Linear)
        if s is None:
            continue
        z = first.forward([point]).flatten()
        for j in (s.flatten() != 0).nonzero().flatten().tolist():
            side = int(s.flatten()[j])
            assert (z[j] > 0) if side > 0 else (z[j] <= 0), (j, side, float(z[j]))
            checked += 1
    assert checked >= 1


def test_attacks_keep_to_their_share_of_the_time_and_zero_turns_them_off():
    net, box, t, root = _smooth_case()
    calls: list = []
    r = search(net, box, t, Output.LOGIT, root, _never(calls, pause=0.05),
               BabOptions(timeout_s=1.5, batch=2, attack_share=0.2), engine=_crown(net))
    assert r.status == "unknown" and len(calls) == r.attacks >= 2
    # each attack starts only while the attacks' time is within the share: at most one over it
    assert 0.05 * (len(calls) - 1) <= 0.2 * r.time_s + 1e-3, (len(calls), r.time_s)
    none: list = []
    r0 = search(net, box, t, Output.LOGIT, root, _never(none), BabOptions(timeout_s=0.5, batch=2, attack_share=0.0),
                engine=_crown(net))
    assert r0.attacks == 0 and not none
    with pytest.raises(ValueError, match="attack_share"):
        BabOptions(attack_share=1.0)


@pytest.mark.slow
def test_pipeline_witness_found_from_a_domain_is_judged_on_the_whole_box_and_replays(tmp_path, monkeypatch):
    """The spec's own attacks are made to find nothing on the whole box; the ℓ∞ property is
    then falsified by an attack started inside one of bab's domains, and the witness replays."""
    def nothing(problem, threat, i, which):
        return {p.name: AttackOutcome(p.name, None, None, False, None, (), 0.0) for p in which}

    monkeypatch.setattr(vmod, "_run_attacks", nothing)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "model": {"path": FC, "input_range": [0.0, 1.0]},
        "data": {"dataset": "mnist_sample", "start": 2, "end": 3},
        "perturbation": {"input": {"norm": "inf", "epsilon": 0.003}},
        "properties": [{"name": "linf", "kind": "untargeted", "metric": "linf", "threshold": 0.05}],
        "bounds": {"methods": ["crown", "bab"], "bab": {"timeout_s": 20, "attack_share": 0.5}},
        "attack": {"order": "after", "steps": 10, "restarts": 1},
        "general": {"results": str(tmp_path / "res")},
    }))
    res = CliRunner().invoke(main, ["verify", str(spec)])
    assert res.exit_code == ExitCode.FALSIFIED, res.output
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    inst = doc["instances"][0]
    bab = inst["engines"]["bab"]
    assert bab["search"]["linf"]["status"] == "falsified" and bab["search"]["linf"]["attacks"] >= 1
    a = inst["attacks"]["linf"]
    assert inst["verdicts"]["linf"] == "falsified" and a["violated"] and a["attack"] in ("pgd", "region")
    rr = CliRunner().invoke(main, ["replay", a["witness"]])
    assert rr.exit_code == ExitCode.FALSIFIED and "CONFIRMED" in rr.output, rr.output
