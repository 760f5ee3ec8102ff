"""The spec → verdict pipeline for the methods beyond saliency: smoothing certificates
(probabilistic, ℓ2 balls), second-order engines and the literature's bounds, the certified
radius search, and the errors that keep them from running where they do not apply."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import verigrad.verify as vmod
from tests.helpers import box_points
from verigrad.bounds import Bounds
from verigrad.cli import main
from verigrad.explanations import explain
from verigrad.reports import ExitCode
from verigrad.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")
SOFTPLUS = str(ROOT / "examples/models/mnist_softplus.onnx")


def _spec(tmp_path, model=FC, **sections) -> Path:
    d = {
        "model": {"path": model},
        "data": {"dataset": "mnist_sample", "start": 0, "end": 1},
        "perturbation": {"input": {"epsilon": 0.001}},
        "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1.0}],
        "bounds": {"methods": ["ibp"]},
        "attack": {"order": "skip"},
        "general": {"results": str(tmp_path / "res")},
    }
    d.update(sections)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------- smoothing


def test_sparsified_smoothgrad_is_certified_probabilistically(tmp_path):
    spec = _spec(tmp_path, explanation={"method": "sparsified_smoothgrad",
                                        "smoothing": {"sigma": 0.25, "samples": 200, "sparsify": 0.1}},
                 perturbation={"input": {"norm": "l2", "epsilon": 0.05}},
                 properties=[{"name": "top", "kind": "topk", "k": 78, "threshold": 0.3},
                             {"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 100.0}],
                 attack={"order": "both"})
    r = _run("verify", spec)
    assert r.exit_code == ExitCode.CERTIFIED, r.output
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    assert doc["explanation"]["guarantee"] == "probabilistic"
    inst = doc["instances"][0]
    eng = inst["engines"]
    assert list(eng) == ["smoothing"]
    assert eng["smoothing"]["guarantee"] == "probabilistic" and eng["smoothing"]["failure_probability"] == 0.05
    assert any("ℓ2 radius certified: 0.05" in n for n in eng["smoothing"]["notes"])
    # sampled maps are not attacked (a witness could not be replayed): nothing tried
    assert all(a["tried"] == [] and a["value"] is None for a in inst["attacks"].values())
    # the stored reference map is the sampled explanation, reproducible from the seed
    problem = vmod.prepare(load_spec(spec))
    v = explain(problem.explainer, problem.net, problem.x[:1], torch.tensor([inst["target"]]))
    stored = np.load(tmp_path / "res/spec.npz")["i0/explanation"]
    np.testing.assert_allclose(stored, v[0].numpy(), rtol=0, atol=1e-12)


def test_smoothing_radius_of_a_clipped_box_encloses_it(tmp_path):
    spec = _spec(tmp_path, explanation={"method": "smoothgrad", "smoothing": {"sigma": 0.1, "samples": 50}},
                 perturbation={"input": {"epsilon": 0.01}})
    problem = vmod.prepare(load_spec(spec))
    threat = vmod.threat_for(problem, 0, 0)
    rho = vmod.smoothing_radius(problem, threat)
    pts = box_points(threat.box, 50, 50)
    assert float((pts - threat.x).flatten(1).norm(dim=1).max()) <= rho + 1e-12
    corner = torch.where(threat.x - threat.box.lower > threat.box.upper - threat.x, threat.box.lower, threat.box.upper)
    assert abs(float((corner - threat.x).norm()) - rho) < 1e-12  # and no larger than needed


def test_l2_ball_only_for_smoothing_and_bad_smoothing_keys(tmp_path):
    r = _run("verify", _spec(tmp_path, perturbation={"input": {"norm": "l2", "epsilon": 0.1}}))
    assert r.exit_code == ExitCode.BAD_INPUT and "perturbation.input.norm" in r.output
    bad = _spec(tmp_path, explanation={"method": "sparsified_smoothgrad",
                                       "smoothing": {"relaxed": True}})
    r = _run("verify", bad)
    assert r.exit_code == ExitCode.BAD_INPUT and "explanation.smoothing.clip" in r.output


# ---------------------------------------------------------------- second order


def test_second_order_refuses_relu_and_parameter_boxes(tmp_path):
    r = _run("verify", _spec(tmp_path, second_order={"hessian": ["ibp"]}))
    assert r.exit_code == ExitCode.BAD_INPUT
    assert "second_order.hessian" in r.output and "zero almost everywhere" in r.output
    r = _run("verify", _spec(tmp_path, model=SOFTPLUS, second_order={"hessian": ["ibp"]},
                             perturbation={"input": {"epsilon": 0.001}, "parameters": {"gamma": 0.01}}))
    assert r.exit_code == ExitCode.BAD_INPUT and "input boxes only" in r.output
    r = _run("verify", _spec(tmp_path, second_order={"hessian": ["alpha-crown"]}))
    assert r.exit_code == ExitCode.BAD_INPUT and "second_order.hessian" in r.output


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient"])
def test_second_order_engine_and_literature_side_by_side(tmp_path, method):
    spec = _spec(tmp_path, model=SOFTPLUS, explanation={"method": method},
                 properties=[{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1.0},
                             {"name": "cos", "kind": "untargeted", "metric": "cosine", "threshold": 0.9}],
                 second_order={"hessian": ["ibp"], "literature": True, "hutchinson_samples": 8})
    r = _run("compare", spec, "--method", "ibp", "--attack-order", "skip")
    # the mean-value engine meets both thresholds, but its Hessian bounds are computed in
    # round-to-nearest with an a-priori allowance only: its certificates are withheld
    assert r.exit_code == ExitCode.UNKNOWN, r.output
    assert "hessian-ibp" in r.output and "explanation-change bounds" in r.output
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    inst = doc["instances"][0]
    hess = inst["engines"]["hessian-ibp"]
    assert hess["guarantee"] == "sound" and hess["rigorous"] is False and inst["engines"]["ibp"]["rigorous"] is True
    assert all(p["verdict"] == "unknown" and p["worst_case"] <= p["threshold"] for p in hess["properties"][:1])
    assert any(n.startswith("certificates withheld (l2, cos)") for n in hess["notes"])
    jac = inst["second_order"]["jacobian"]["ibp"]
    assert jac["spectral_norm_upper"] > 0 and 0 < jac["l2_change_bound"] <= jac["l2_change_spectral"]
    bounds = {b["name"]: b for b in inst["second_order"]["bounds"]}
    assert {b["guarantee"] for b in bounds.values()} == {"sound", "estimate"}
    assert bounds["car_thm2_linf"]["guarantee"] == "estimate" and bounds["direct_ibp"]["guarantee"] == "sound"
    # the mean-value engine's l2 worst case is the direct bound reported beside the others
    assert bounds["direct_hessian-ibp"]["value"] == pytest.approx(
        inst["engines"]["hessian-ibp"]["properties"][0]["worst_case"], rel=1e-12)
    # every sound change bound holds at sampled points of the box (the estimates need not)
    problem = vmod.prepare(load_spec(spec))
    threat = vmod.threat_for(problem, 0, inst["target"])
    pts = box_points(threat.box, 100, 100)
    v0 = explain(problem.explainer, problem.net, threat.x, threat.target_tensor)
    v = explain(problem.explainer, problem.net, pts, threat.target_tensor.expand(len(pts)))
    worst = float((v - v0).flatten(1).norm(dim=1).max())
    for b in bounds.values():
        if b["guarantee"] == "sound" and b["quantity"] == "linf_ball_l2_change":
            assert b["value"] >= worst, b["name"]
    npz = np.load(tmp_path / "res/spec.npz")
    mv = Bounds(torch.as_tensor(npz["i0/hessian-ibp/lower"])[None], torch.as_tensor(npz["i0/hessian-ibp/upper"])[None])
    assert bool(mv.contains(v, tol=1e-9).all())


# ---------------------------------------------------------------- certified radius


def test_radius_search_returns_a_certified_radius(tmp_path):
    spec = _spec(tmp_path, model=SOFTPLUS,
                 properties=[{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 0.5}],
                 radius={"search": True, "methods": ["ibp"], "eps_max": 0.01, "iterations": 6})
    r = _run("compare", spec, "--method", "ibp", "--attack-order", "skip")
    assert r.exit_code in (ExitCode.CERTIFIED, ExitCode.UNKNOWN), r.output
    assert "certified radius" in r.output
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    rad = doc["instances"][0]["radius"]["l2"]
    eps = rad["certified_radius"]
    assert 0 < eps < 0.01 and rad["engine"] == "ibp"
    # the property holds (is certified) at the returned radius, and fails to certify at 2x
    at = _run("verify", spec, "--epsilon", eps, "--method", "ibp")
    assert at.exit_code == ExitCode.CERTIFIED, at.output
    above = _run("verify", spec, "--epsilon", 2 * eps + 1e-6, "--method", "ibp")
    assert above.exit_code == ExitCode.UNKNOWN


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_crown_hessian_engine_on_a_small_tabular_model(tmp_path):
    """A 6-feature softplus MLP (TorchScript): CROWN bounds the Hessian itself (no fallback),
    and the mean-value engine it yields contains the saliency map at sampled points."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Softplus(beta=2.0), torch.nn.Linear(8, 3)).double()
    torch.jit.save(torch.jit.trace(model, torch.zeros(2, 6, dtype=torch.float64)), str(tmp_path / "m.pt"))
    x = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=np.array([0, 1, 2]))
    spec = _spec(tmp_path, model=str(tmp_path / "m.pt"),
                 data={"path": str(tmp_path / "d.npz")},
                 perturbation={"input": {"epsilon": 0.05}},
                 second_order={"hessian": ["ibp", "crown"]})
    spec.write_text(spec.read_text().replace("model:\n", "model:\n  input_shape: [6]\n  input_range: null\n", 1))
    r = _run("verify", spec)
    assert r.exit_code in (ExitCode.CERTIFIED, ExitCode.UNKNOWN), r.output
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    problem = vmod.prepare(load_spec(spec))
    npz = np.load(tmp_path / "res/spec.npz")
    for inst in doc["instances"]:
        eng = inst["engines"]
        assert eng["hessian-crown"]["actual_method"] == "hessian-crown", eng["hessian-crown"]["notes"]
        # never looser than IBP's Hessian (it is intersected with it)
        assert eng["hessian-crown"]["mean_width"] <= eng["hessian-ibp"]["mean_width"] + 1e-12
        i = inst["index"]
        threat = vmod.threat_for(problem, i, inst["target"])
        pts = box_points(threat.box, 200, 200, seed=i)
        v = explain(problem.explainer, problem.net, pts, threat.target_tensor.expand(len(pts)))
        mv = Bounds(torch.as_tensor(npz[f"i{i}/hessian-crown/lower"])[None],
                    torch.as_tensor(npz[f"i{i}/hessian-crown/upper"])[None])
        assert bool(mv.contains(v, tol=1e-9).all())


# ---------------------------------------------------------------- boxes


def test_engines_and_attacks_share_the_boxes_prepare_built(tmp_path, monkeypatch):
    spec = _spec(tmp_path, data={"dataset": "mnist_sample", "start": 0, "end": 3},
                 perturbation={"input": {"epsilon": 0.01}, "parameters": {"gamma": 0.01, "layers": ["/fc2/Gemm"]}},
                 attack={"order": "after", "steps": 2, "restarts": 1})
    problem = vmod.prepare(load_spec(spec))
    assert problem.params is not None and list(problem.params.layers) == ["/fc2/Gemm"]
    seen_engine, seen_attack = [], []

    def engine_spy(explainer, m, net, box, target, output, params, options):
        seen_engine.append((box, params))
        return real_bounds(explainer, m, net, box, target, output, params, options)

    def attack_spy(threat, prop, opts, methods):
        seen_attack.append(threat)
        return real_attack(threat, prop, opts, methods)

    real_bounds, real_attack = vmod.explanation_bounds, vmod.attack_property
    monkeypatch.setattr(vmod, "explanation_bounds", engine_spy)
    monkeypatch.setattr(vmod, "attack_property", attack_spy)
    r = vmod.verify_instance(problem, 1)
    assert r.error is None and seen_engine and seen_attack
    box, params = seen_engine[0]
    assert params is problem.params  # the parameter box is built once, in prepare
    expect = problem.perturbation.input_box(problem.x[1:2])
    assert torch.equal(box.lower, expect.lower) and torch.equal(box.upper, expect.upper)
    for th in seen_attack:
        assert th.params is problem.params
        assert torch.equal(th.box.lower, box.lower) and torch.equal(th.box.upper, box.upper)
    # the batched path bounds the same per-input boxes
    seen_engine.clear()
    vmod.batched_bounds(problem, [0, 1, 2])
    (batch_box, _), = seen_engine
    assert torch.equal(batch_box.lower[1:2], box.lower) and torch.equal(batch_box.upper[1:2], box.upper)
