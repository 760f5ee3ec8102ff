"""Attacks and witnesses: a known violation is found and replays; a witness is judged only in
float64 inside the box; attacks never beat a certificate (no input is both certified and
falsified) on many random networks; a certified-and-falsified conflict is an internal error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import verigrad.explanations as emod
import verigrad.verify as vmod
from tests.helpers import ACT_IDS, ACTS, box_points, random_cnn, random_mlp
from verigrad import properties as props
from verigrad.attacks import (
    AttackMethod,
    ATTACKS,
    AttackOptions,
    Point,
    Threat,
    applicable,
    attack_property,
    evaluate_point,
    load_witness,
    run_attack,
)
from verigrad.bounds import Bounds, EngineResult, Method, compute_bounds
from verigrad.cli import main
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.models.network import ActKind, Activation, Linear, Network
from verigrad.perturbation import ParamBoxSpec, Perturbation
from verigrad.properties import Direction, Property
from verigrad.reports import ExitCode, ResultWriter
from verigrad.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")
F64 = torch.float64
FAST = AttackOptions(steps=15, restarts=2, step_size=0.3, seed=0)


def hinge_net(act: ActKind = ActKind.RELU, param: float = 0.0) -> Network:
    """z0 = σ(x1 − 0.05), z1 = 0 on x ∈ R²: at x = 0 the unit is off (relu: v0 = 0) and for
    x1 > 0.05 it is on, v = (1, 0) — a violation of ‖v − v0‖₂ ≤ 0.5 whenever ε > 0.05."""
    l1 = Linear("fc0", torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([-0.05], dtype=F64))
    l2 = Linear("fc1", torch.tensor([[1.0], [0.0]], dtype=F64), torch.zeros(2, dtype=F64))
    return Network((l1, Activation("act0", act, param), l2), (2,), "hinge")


def test_known_violation_is_found_and_confirmed_in_float64():
    net = hinge_net()
    th = Threat.around(net, torch.zeros(1, 2, dtype=F64), 0, Output.LOGIT, Perturbation(0.1, None))
    prop = Property("l2", "untargeted", "l2", 0.5)
    out = attack_property(th, prop, FAST)
    assert out.violated and out.attack == "pgd" and out.value == pytest.approx(1.0)
    w = out.witness
    assert w is not None and th.astype(F64).contains(w.point)
    assert float(w.point.x[0, 0]) > 0.05  # it crossed the hinge
    assert torch.equal(w.v, saliency(net, w.point.x, torch.tensor([0]), Output.LOGIT))


def test_relu_needs_the_surrogate_and_the_witness_is_scored_on_the_real_net():
    net = hinge_net()
    th = Threat.around(net, torch.zeros(1, 2, dtype=F64), 0, Output.LOGIT, Perturbation(0.1, None))
    prop = Property("l2", "untargeted", "l2", 0.5)
    v0 = saliency(net, th.x, th.target_tensor)
    # without the surrogate the explanation's gradient is 0 in x: only the random start moves
    flat = run_attack("pgd", th, prop, v0, AttackOptions(steps=10, restarts=1, surrogate_beta=None))
    assert flat.value == 0.0
    smooth = run_attack("pgd", th, prop, v0, AttackOptions(steps=10, restarts=1, surrogate_beta=20.0))
    assert smooth.value == 1.0  # the real relu gradient, not softplus's sigmoid(βz) < 1


def test_no_violation_inside_a_box_that_excludes_it():
    # ε = 0.04 < 0.05: the hinge is never crossed, nothing may be reported
    th = Threat.around(hinge_net(), torch.zeros(1, 2, dtype=F64), 0, Output.LOGIT, Perturbation(0.04, None))
    out = attack_property(th, Property("l2", "untargeted", "l2", 0.5), FAST)
    assert not out.violated and out.witness is None and out.value == 0.0


def test_evaluate_point_projects_and_rejects_nothing_outside():
    th = Threat.around(hinge_net(), torch.zeros(1, 2, dtype=F64), 0, Output.LOGIT, Perturbation(0.1, (-1.0, 1.0)))
    far = Point(torch.tensor([[5.0, -5.0]], dtype=F64))
    ev = evaluate_point(th, Property("l2", "untargeted", "l2", 0.5), far)
    assert ev.in_box and float(ev.point.x[0, 0]) == 0.1 and float(ev.point.x[0, 1]) == -0.1
    assert not th.contains(far) and th.contains(ev.point)


def test_witness_is_rejudged_in_float64_not_trusted_from_float32():
    """A float32 search value that violates only by rounding must not be reported."""
    net = hinge_net(ActKind.SOFTPLUS, 4.0)
    th = Threat.around(net.to(dtype=torch.float32), torch.zeros(1, 2), 0, Output.LOGIT, Perturbation(0.1, None))
    prop64 = Property("l2", "untargeted", "l2", 1.0)
    out = attack_property(th, prop64, FAST)
    exact = evaluate_point(th, prop64, out.witness.point if out.witness else Point(th.box.upper))
    assert out.value == pytest.approx(exact.value, abs=1e-12) or not out.violated
    # threshold set exactly at the float64 value reached: not a violation (≤ holds)
    at = Property("l2", "untargeted", "l2", out.value)
    assert not evaluate_point(th, at, out.witness.point if out.witness else Point(th.x)).violated


def test_a_nan_value_is_never_a_counterexample(monkeypatch):
    import verigrad.attacks.witness as wmod

    th = Threat.around(hinge_net(), torch.zeros(1, 2, dtype=F64), 0, Output.LOGIT, Perturbation(0.1, None))
    prop = Property("l2", "untargeted", "l2", 0.5)
    monkeypatch.setattr(wmod.props, "metric", lambda p, v0, v: torch.full((v.shape[0],), float("nan"), dtype=F64))
    ev = evaluate_point(th, prop, Point(th.box.upper))
    assert ev.in_box and not ev.violated


@pytest.mark.parametrize("kind,extra", [
    ("topk", {"k": 1, "threshold": 1.0}),
    ("sign", {"features": (0, 1), "threshold": 0.0}),
    ("feature_bound", {"features": (0,), "threshold": 0.48}),
])
def test_new_property_kinds_are_attacked(kind, extra):
    # z0 = sp(x1 − .05) − ½ sp(x1 + 1) + .3 sp(x2 + 1), β = 60: at x = 0, v ≈ (−.45, .3);
    # near x1 = .05 the first attribution passes through 0 (top-1 changes to feature 1, its
    # sign flips for x1 > .05) and it reaches +.5 at x1 = .2 (|v_0| > .48)
    l1 = Linear("fc0", torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64),
                torch.tensor([-0.05, 1.0, 1.0], dtype=F64))
    l2 = Linear("fc1", torch.tensor([[1.0, -0.5, 0.3], [0.0, 0.0, 0.0]], dtype=F64), torch.zeros(2, dtype=F64))
    net = Network((l1, Activation("a", ActKind.SOFTPLUS, 60.0), l2), (2,), "hinges")
    th = Threat.around(net, torch.zeros(1, 2, dtype=F64), 0, Output.LOGIT, Perturbation(0.2, None))
    prop = Property("p", kind, None, normalize="none", **extra)
    assert applicable(prop, th)
    out = attack_property(th, prop, FAST)
    assert out.violated, out
    # the witness's value is the property's own metric at the point, recomputed here
    w = out.witness
    v0 = saliency(net, th.x, th.target_tensor)
    assert float(props.metric(prop, v0, saliency(net, w.point.x, th.target_tensor))[0]) == pytest.approx(w.value)


def test_registry_and_applicability():
    th_in = Threat.around(hinge_net(), torch.zeros(1, 2, dtype=F64), 0, Output.LOGIT, Perturbation(0.1, None))
    th_par = Threat.around(hinge_net(), torch.zeros(1, 2, dtype=F64), 0, Output.LOGIT, Perturbation(0.0, None, ParamBoxSpec(0.1)))
    assert set(ATTACKS) == set(AttackMethod)
    unt = Property("u", "untargeted", "l2", 0.5)
    tgt = Property("t", "targeted", "l2", 0.5, target=torch.tensor([1.0, 0.0], dtype=F64))
    top = Property("k", "topk", None, 1.0, k=1)
    # the relu hinge is piecewise linear: the region walk applies to its input box (tests/test_region_walk.py)
    assert applicable(unt, th_in) == [AttackMethod.PGD, AttackMethod.REGION]
    assert applicable(tgt, th_in) == [AttackMethod.PGD, AttackMethod.TARGETED, AttackMethod.REGION]
    assert set(applicable(top, th_in)) == {AttackMethod.PGD, AttackMethod.IFIA, AttackMethod.LEVINE_TOPK,
                                           AttackMethod.REGION}
    assert applicable(unt, th_par) == [AttackMethod.PARAMS]  # no input box: input attacks do not apply
    with pytest.raises(ValueError, match="unknown attack"):
        run_attack("nope", th_in, unt, torch.zeros(1, 2, dtype=F64), FAST)


def test_parameter_attack_moves_weights_inside_the_box_only():
    net = hinge_net()
    # relative box on fc0: the bias −0.05 can move to −0.05·(1 − 1.2) = +0.01 > 0: unit on at x = 0
    th = Threat.around(net, torch.zeros(1, 2, dtype=F64), 0, Output.LOGIT,
                       Perturbation(0.0, None, ParamBoxSpec(1.2, layers=("fc0",))))
    out = attack_property(th, Property("l2", "untargeted", "l2", 0.5), FAST)
    assert out.violated and out.attack == "params"
    (w, b), = out.witness.point.params.values()
    assert th.astype(F64).contains(out.witness.point)
    assert float(b[0]) > 0 and torch.equal(out.witness.point.x, th.x)


def test_joint_attack_moves_input_and_weights_and_replays_through_the_pipeline(tmp_path):
    """Input and parameter boxes together: the params attack moves both, the witness lies in
    both boxes, and replay re-checks the stored weights."""
    spec = _spec(tmp_path, perturbation={"input": {"epsilon": 0.01},
                                         "parameters": {"gamma": 0.02, "layers": ["/fc3/Gemm"]}},
                 properties=[{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 0.3}],
                 attack={"order": "before", "methods": ["params"], "steps": 10, "restarts": 1},
                 data={"dataset": "mnist_sample", "start": 2, "end": 3})
    problem = vmod.prepare(load_spec(spec))
    r = vmod.verify_instance(problem, 0)
    a = r.attacks["l2"]
    assert a.violated and a.attack == "params", a
    w = a.witness
    (wt, bs), = w.point.params.values()
    assert float((w.point.x - w.x0).abs().max()) > 0 and not torch.equal(wt, w.base_params["/fc3/Gemm"][0])
    writer = ResultWriter(problem, tmp_path / "j.json", None)
    writer(r)
    (path,) = writer.witnesses.values()
    rr = _run("replay", path)
    assert rr.exit_code == ExitCode.FALSIFIED, rr.output
    z = dict(np.load(path))
    assert "dparam//fc3/Gemm/weight" in z and float(np.abs(z["dparam//fc3/Gemm/weight"]).max()) > 0


def test_levine_backtracking_keeps_the_class(monkeypatch):
    """Every iterate the Levine attack accepts keeps the centre's predicted class; without
    keep_class the same search leaves it (so the check is not vacuous)."""
    import verigrad.attacks.search as smod

    seen: list = []
    real = smod._real_value
    monkeypatch.setattr(smod, "_real_value", lambda th, p, v0, pt: seen.append(pt) or real(th, p, v0, pt))
    changed = {True: 0, False: 0}
    for seed in range(4):
        net = random_mlp(ActKind.SOFTPLUS, 3.0, sizes=(8, 16, 3), seed=seed)
        x = torch.rand(1, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)
        pred = int(net.forward(x).argmax(1))
        th = Threat.around(net, x, pred, Output.LOGIT, Perturbation(0.5, None))
        prop = Property("top", "topk", None, 1.0, k=2)
        v0 = saliency(net, x, th.target_tensor)
        for keep in (True, False):
            seen.clear()
            run_attack("levine_topk", th, prop, v0, AttackOptions(steps=15, restarts=2, seed=seed, keep_class=keep))
            changed[keep] += sum(smod._predicted(th, pt) != pred for pt in seen)
    assert changed[True] == 0 and changed[False] > 0


def test_attacks_are_reproducible_with_a_seed():
    net = random_mlp(ActKind.SOFTPLUS, 2.0, sizes=(6, 8, 3), seed=3)
    th = Threat.around(net, torch.rand(1, 6, dtype=F64), 0, Output.LOGIT, Perturbation(0.2, None))
    prop = Property("l2", "untargeted", "l2", 10.0)
    a, b = attack_property(th, prop, FAST), attack_property(th, prop, FAST)
    assert a.value == b.value


# ---------------------------------------------------------------------------------------
# never both: attacks against certificates on random networks

def _props_for(v0: torch.Tensor, n: int) -> list[Property]:
    t = torch.zeros_like(v0[0])
    t.view(-1)[0] = 1.0
    return [
        Property("l2", "untargeted", "l2", 1.0),
        Property("cos", "untargeted", "cosine", 0.0),
        Property("tl2", "targeted", "l2", 0.1, target=t),
        Property("tcos", "targeted", "cosine", 0.5, target=t),
        Property("top", "topk", None, 1.0, k=2),
        Property("sign", "sign", None, 0.0, features=tuple(range(min(n, 4)))),
        Property("feat", "feature_bound", None, 1.0, features=(0, 1)),
    ]


@pytest.mark.parametrize("act,param", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_attacks_never_beat_the_certified_worst_case(act, param, arch):
    checked = 0
    for seed in range(3):
        net = random_mlp(act, param, sizes=(5, 7, 6, 3), seed=seed) if arch == "mlp" else \
            random_cnn(act, param, seed=seed, in_shape=(1, 6, 6))
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(1, *net.input_shape, generator=gen, dtype=F64)
        th = Threat.around(net, x, int(seed % 3), Output.LOGIT, Perturbation(0.05, (0.0, 1.0)))
        methods = [Method.IBP, Method.CROWN] if arch == "mlp" else [Method.IBP]
        bounds = [compute_bounds(m, net, th.box, th.target_tensor, Output.LOGIT, None).bounds for m in methods]
        v0 = saliency(net, x, th.target_tensor)
        pts = box_points(th.box, 100, 100, seed)  # sampled explanations, independent of the attacks
        v_pts = saliency(net, pts, th.target_tensor.expand(len(pts)))
        for prop in _props_for(v0, v0[0].numel()):
            cert = [float(props.worst_case(prop, v0, b)[0]) for b in bounds]
            sampled = props.metric(prop, v0, v_pts)
            for c in cert:
                ok = sampled <= c + 1e-9 if prop.rule.direction == Direction.AT_MOST else sampled >= c - 1e-9
                assert bool(ok.all()), f"{prop.name}: a sampled point beats the certified worst case {c}"
            out = attack_property(th, prop, AttackOptions(steps=8, restarts=2, seed=seed))
            for c in cert:
                ok = out.value <= c + 1e-9 if prop.rule.direction == Direction.AT_MOST else out.value >= c - 1e-9
                assert ok, f"{prop.name}: attack reached {out.value} beyond the certified worst case {c}"
                g = props.gap_ratio(prop, c, out.value)
                assert g is None or g >= 1 - 1e-9
            checked += 1
    assert checked == 21


# ---------------------------------------------------------------------------------------
# the pipeline: verdicts, witnesses on disk, replay, conflicts

def _spec(tmp_path, **over) -> Path:
    d = {
        "model": {"path": FC},
        "data": {"dataset": "mnist_sample", "start": 0, "end": 2},
        "perturbation": {"input": {"epsilon": 0.02}},
        "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 0.5},
                       {"name": "top", "kind": "topk", "k": 20, "threshold": 0.9}],
        "bounds": {"methods": ["ibp"]},
        "attack": {"steps": 10, "restarts": 1},
        "general": {"results": str(tmp_path / "res")},
    }
    d.update(over)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_verify_falsifies_the_vanilla_model_and_every_witness_replays(tmp_path):
    r = _run("verify", _spec(tmp_path))
    assert r.exit_code == ExitCode.FALSIFIED, r.output
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    paths = [a["witness"] for i in doc["instances"] for a in i["attacks"].values() if a["violated"]]
    assert paths and all(Path(p).is_file() for p in paths)
    for inst in doc["instances"]:
        for name, a in inst["attacks"].items():
            assert (inst["verdicts"][name] == "falsified") == a["violated"]
            assert inst["verdicts"][name] != "certified" or not a["violated"]
    for p in paths:
        rr = _run("replay", p)
        assert rr.exit_code == ExitCode.FALSIFIED and "CONFIRMED" in rr.output, rr.output
    w = load_witness(paths[0])
    assert w.meta["index"] in (0, 1) and float((w.x - w.x0).abs().max()) <= 0.02 + 1e-12
    assert {"pcc", "kendall_tau"} <= set(w.meta["similarity"])


def test_replay_rejects_a_tampered_witness(tmp_path):
    assert _run("verify", _spec(tmp_path)).exit_code == ExitCode.FALSIFIED
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    path = next(a["witness"] for i in doc["instances"] for a in i["attacks"].values() if a["violated"])
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["x"] = arrays["x"] + 0.5  # outside the ε-box
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    rr = _run("replay", bad)
    assert rr.exit_code == ExitCode.UNKNOWN and "inside the box: NO" in rr.output
    arrays["x0"] = arrays["x0"] * 0.5  # not the data set's input
    np.savez(bad, **arrays)
    assert "same input as the data set: NO" in _run("replay", bad).output
    np.savez(bad, x=arrays["x"])
    assert _run("replay", bad).exit_code == 2


def test_certified_and_falsified_is_an_internal_error(tmp_path, monkeypatch):
    """An engine that (wrongly) returns point bounds at v0, claiming them rigorous, certifies l2;
    the attack's witness contradicts it: the instance must fail loudly, with no verdict."""
    problem = vmod.prepare(load_spec(_spec(tmp_path, attack={"order": "both", "steps": 10, "restarts": 1})))

    def liar(method, net, box, target, output, params, options):
        v0 = saliency(net, problem.x[0:1], target, output)  # the clipped box's centre is not x
        return EngineResult(Bounds(v0, v0), "ibp", rigorous=True)

    monkeypatch.setattr(emod, "compute_bounds", liar)
    r = vmod.verify_instance(problem, 0)
    assert r.internal_error and "certified and falsified" in r.error and not r.verdicts
    writer = ResultWriter(problem, tmp_path / "r.json", None)
    writer(r)
    assert writer.finish()["summary"]["exit_code"] == ExitCode.ERROR
    assert writer.witnesses  # the contradicting witness is kept for the bug report


def test_attack_order_after_skips_certified_and_before_can_skip_bounds(tmp_path):
    spec = _spec(tmp_path, properties=[{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1e4}])
    problem = vmod.prepare(load_spec(spec))
    r = vmod.verify_instance(problem, 0)
    assert r.verdicts == {"l2": "certified"} and r.attacks == {}
    spec = _spec(tmp_path, properties=[{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 0.01}],
                 attack={"order": "before", "steps": 5, "restarts": 1})
    r = vmod.verify_instance(vmod.prepare(load_spec(spec)), 0)
    assert r.verdicts == {"l2": "falsified"} and r.engines == ()  # bounding skipped


def test_compare_reports_the_gap(tmp_path):
    r = _run("compare", _spec(tmp_path, data={"dataset": "mnist_sample", "start": 0, "end": 1}),
             "--method", "ibp", "--method", "crown")
    assert r.exit_code in (ExitCode.FALSIFIED, ExitCode.UNKNOWN), r.output
    assert "gap l2" in r.output
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    g = doc["instances"][0]["gap"]["l2"]
    assert g["certified"] >= g["attacked"] and g["ratio"] >= 1
    assert doc["summary"]["gap"]["l2"]["median_ratio"] == pytest.approx(g["ratio"])


def test_attack_command_reports_empirical_metrics(tmp_path):
    r = _run("attack", _spec(tmp_path, data={"dataset": "mnist_sample", "start": 0, "end": 1}))
    assert r.exit_code == ExitCode.FALSIFIED, r.output
    assert "max-sensitivity" in r.output and "kendall_tau" in r.output
    doc = json.loads((tmp_path / "res/spec.attack.json").read_text())
    emp = doc["instances"][0]["empirical"]
    assert set(emp["random_perturbation"]) == {"0.01", "0.05", "0.1"}
    pcc = [emp["random_perturbation"][k]["pcc"] for k in ("0.01", "0.05", "0.1")]
    assert -1 <= min(pcc) and max(pcc) <= 1 and emp["max_sensitivity"] > 0
    assert doc["methods"] == []


def test_threat_rejects_boxes_that_do_not_match_its_definition():
    net = hinge_net()
    x = torch.zeros(1, 2, dtype=F64)
    ok = Threat.around(net, x, 0, Output.LOGIT, Perturbation(0.1, None, ParamBoxSpec(0.1)))
    assert ok.params is not None and ok.epsilon == 0.1 and ok.domain is None
    with pytest.raises(ValueError, match="parameter box is given exactly when"):
        Threat(net, x, 0, Output.LOGIT, Perturbation(0.1), ok.box, ok.params)
    with pytest.raises(ValueError, match="parameter box is given exactly when"):
        Threat(net, x, 0, Output.LOGIT, Perturbation(0.1, None, ParamBoxSpec(0.1)), ok.box, None)
    with pytest.raises(ValueError, match="input box of shape"):
        Threat(net, x, 0, Output.LOGIT, Perturbation(0.1), Perturbation(0.1).input_box(torch.zeros(1, 3, dtype=F64)),
               None)
    shared = ok.params
    again = Threat.around(net, x, 0, Output.LOGIT, ok.perturbation, params=shared)
    assert again.params is shared
    f32 = ok.astype(torch.float32)  # rebuilt from the definition, not converted
    assert f32.box.lower.dtype == torch.float32 and torch.equal(f32.box.lower, (x - 0.1).float())
