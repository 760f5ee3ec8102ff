"""The pipeline and the command line: exit codes, the JSON/npz results, bad input, isolation
of a failing instance, soundness-failure detection."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import verigrad.explanations as emod
import verigrad.verify as vmod
from verigrad.bounds import Bounds, EngineResult
from verigrad.cli import main
from verigrad.reports import SCHEMA, ExitCode, ResultWriter
from verigrad.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")
CNN = str(ROOT / "examples/models/mnist_cnn.onnx")


def _spec(tmp_path, **over) -> Path:
    d = {
        "model": {"path": FC},
        "data": {"dataset": "mnist_sample", "start": 0, "end": 3},
        "perturbation": {"input": {"epsilon": 0.001}},
        "properties": [
            {"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1000.0},
            {"name": "cos", "kind": "untargeted", "metric": "cosine", "threshold": -1.0},
        ],
        "bounds": {"methods": ["ibp"]},
        "general": {"results": str(tmp_path / "res")},
    }
    for k, v in over.items():
        sec, _, key = k.partition(".")
        if key:
            d[sec][key] = v
        else:
            d[sec] = v
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_verify_all_certified_writes_json_and_npz(tmp_path):
    r = _run("verify", _spec(tmp_path))
    assert r.exit_code == ExitCode.CERTIFIED, r.output
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    assert doc["schema"] == SCHEMA and doc["complete"] is True
    assert set(doc) >= {"spec", "versions", "instances", "summary", "methods", "properties", "device", "dtype"}
    assert len(doc["spec"]["sha256"]) == 64 and doc["versions"]["torch"] == torch.__version__
    assert [i["index"] for i in doc["instances"]] == [0, 1, 2]
    inst = doc["instances"][0]
    assert inst["verdicts"] == {"l2": "certified", "cos": "certified"}
    eng = inst["engines"]["ibp"]
    assert eng["actual_method"] == "ibp" and eng["mean_width"] > 0 and eng["time_s"] > 0
    l2 = eng["properties"][0]
    assert l2["name"] == "l2" and 0 < l2["worst_case"] <= 1000.0
    arrays = np.load(tmp_path / "res/spec.npz")
    assert arrays["i0/ibp/lower"].shape == (1, 28, 28)
    assert np.all(arrays["i0/ibp/lower"] <= arrays["i0/explanation"])
    assert np.all(arrays["i0/explanation"] <= arrays["i0/ibp/upper"])
    assert "certified" in r.output


def test_verify_unknown_exit_code_and_worst_case_reported(tmp_path):
    spec = _spec(tmp_path, properties=[{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1e-6}])
    r = _run("verify", spec, "--out", tmp_path / "o.json", "--attack-order", "skip")
    assert r.exit_code == ExitCode.UNKNOWN
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["summary"]["per_property"]["l2"]["unknown"] == 3
    assert all(i["engines"]["ibp"]["properties"][0]["worst_case"] > 1e-6 for i in doc["instances"])
    assert (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("edit,needle", [
    ({"perturbation": {"input": {"epsilon": -1}}}, "perturbation.input.epsilon"),
    ({"bogus": 1}, "bogus"),
    ({"model": {"path": "missing.onnx"}}, "model.path"),
    ({"explanation": {"target": 12}}, "explanation.target"),
    ({"perturbation": {"parameters": {"gamma": 0.1, "layers": ["nope"]}}}, "nope"),
    ({"properties": [{"kind": "topk", "k": 1000, "threshold": 0.5}]}, "properties[0]: property 'p0_topk': k = 1000"),
    ({"properties": [{"kind": "sign", "features": [784], "threshold": 0}]}, "feature index 784 out of range"),
])
def test_bad_input_exit_2_names_key(tmp_path, edit, needle):
    spec = _spec(tmp_path)
    d = yaml.safe_load(spec.read_text())
    d.update(edit)
    spec.write_text(yaml.safe_dump(d))
    r = _run("verify", spec)
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_unsupported_model_is_bad_input(tmp_path):
    # (MaxPool is supported now: an ELU is not)
    torch.onnx.export(torch.nn.Sequential(torch.nn.ELU(), torch.nn.Flatten(), torch.nn.Linear(784, 10)),
                      torch.zeros(1, 1, 28, 28), tmp_path / "elu.onnx", dynamo=False)
    r = _run("verify", _spec(tmp_path, **{"model.path": str(tmp_path / "elu.onnx")}))
    assert r.exit_code == ExitCode.BAD_INPUT and "Elu" in r.output


def test_dump_config_round_trips(tmp_path):
    r = _run("verify", _spec(tmp_path), "--dump-config", "--method", "crown")
    assert r.exit_code == 0
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(r.output)
    again = load_spec(dumped)
    assert [m.value for m in again.bounds.methods] == ["crown"]
    # the dump is the resolved spec with the CLI override applied: nothing else changed
    expected = load_spec(_spec(tmp_path)).to_dict()
    expected["bounds"]["methods"] = ["crown"]
    assert again.to_dict() == expected
    # and dumping the dump reproduces it (the header names the source file; the content hash agrees)
    r2 = _run("verify", dumped, "--dump-config")
    body = [l for l in r.output.splitlines() if not l.startswith("#")]
    assert r2.exit_code == 0 and [l for l in r2.output.splitlines() if not l.startswith("#")] == body
    assert again.hash() in r2.output.splitlines()[0]


def _problem(tmp_path, **over):
    return vmod.prepare(load_spec(_spec(tmp_path, **over)))


def test_failing_instance_is_reported_and_others_go_on(tmp_path, monkeypatch):
    problem = _problem(tmp_path)
    real = emod.compute_bounds
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(emod, "compute_bounds", flaky)
    writer = ResultWriter(problem, tmp_path / "r.json", tmp_path / "r.npz")
    results = vmod.verify(problem, on_instance=writer)
    doc = writer.finish()
    assert [r.error is None for r in results] == [True, False, True]
    assert "boom" in results[1].error and results[1].internal_error
    assert doc["summary"]["exit_code"] == ExitCode.ERROR
    assert "i2/ibp/lower" in np.load(tmp_path / "r.npz")


def test_unsound_engine_is_caught_not_certified(tmp_path, monkeypatch):
    problem = _problem(tmp_path)

    def liar(method, net, box, target, output, params, options):
        z = torch.zeros(1, *net.input_shape, dtype=box.lower.dtype)
        return EngineResult(Bounds(z, z), "ibp")

    monkeypatch.setattr(emod, "compute_bounds", liar)
    results = vmod.verify(problem)
    assert all(r.internal_error and "outside the bounds" in r.error for r in results)
    assert all(not r.verdicts for r in results)


def test_combine_intersect_is_never_wider(tmp_path):
    problem = _problem(tmp_path, bounds={"methods": ["ibp", "crown"], "combine": "intersect"})
    r = vmod.verify_instance(problem, 0)
    by = {e.method: e for e in r.engines}
    assert set(by) == {"ibp", "crown", "combined"}
    assert by["combined"].mean_width <= min(by["ibp"].mean_width, by["crown"].mean_width) + 1e-12


def test_conv_parameter_box_falls_back_to_ibp_and_says_so(tmp_path):
    problem = _problem(tmp_path, **{"model.path": CNN, "data.end": 1},
                       perturbation={"parameters": {"gamma": 0.001}},
                       bounds={"methods": ["crown"]})
    r = vmod.verify_instance(problem, 0)
    (e,) = r.engines
    assert e.method == "crown" and e.actual_method == "ibp"
    assert any("fell back to ibp" in n for n in e.notes)


def test_compare_prints_ratio_table(tmp_path):
    r = _run("compare", _spec(tmp_path, **{"data.end": 1}), "--method", "ibp", "--method", "crown")
    assert r.exit_code in (ExitCode.CERTIFIED, ExitCode.UNKNOWN), r.output
    assert "width/ibp" in r.output and "crown" in r.output


@pytest.mark.parametrize("method", ["input_x_gradient", "integrated_gradients"])
def test_verify_other_explanation_methods_end_to_end(tmp_path, method):
    """The spec's method reaches the engines, the attack and replay: witnesses of x ⊙ g / IG
    replay, and the result names the method and its guarantee."""
    explanation = {"method": method, "integrated_gradients": {"steps": 4, "rule": "riemann_middle"}}
    props = [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1e-6}]
    spec = _spec(tmp_path, explanation=explanation, properties=props, **{"data.end": 1, "perturbation.input":
                                                                         {"epsilon": 0.01}},
                 attack={"steps": 5, "restarts": 1})
    r = _run("verify", spec)
    assert r.exit_code == ExitCode.FALSIFIED, r.output
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    assert doc["explanation"]["method"] == method and doc["explanation"]["guarantee"] == "sound"
    assert doc["instances"][0]["engines"]["ibp"]["guarantee"] == "sound"
    w = doc["instances"][0]["attacks"]["l2"]["witness"]
    assert w and _run("replay", w).exit_code == ExitCode.FALSIFIED  # confirmed: the property is falsified
    bad = _spec(tmp_path, explanation={"method": method, "integrated_gradients": {"steps": 1, "rule": "riemann_left"}})
    r = _run("verify", bad)
    assert r.exit_code == ExitCode.BAD_INPUT and "explanation.integrated_gradients.steps" in r.output


def test_cli_flags_are_the_schemas(tmp_path):
    """Each override flag is declared once (verigrad.spec.CLI_FLAGS): it names a real spec key, its
    choices are that key's enum, and the verify, compare and attack commands all offer it."""
    from enum import Enum

    from verigrad.spec import CLI_FLAGS, flag_overrides

    resolved = load_spec(_spec(tmp_path)).to_dict()
    for fl in CLI_FLAGS:
        node = resolved
        for part in fl.key.split(".")[:-1]:
            node = node[part]
        assert fl.key.split(".")[-1] in node, fl.key
        for cmd in ("verify", "compare", "attack"):
            opts = {o.name: o for o in main.commands[cmd].params}
            assert fl.dest in opts, (cmd, fl.flag)
            if isinstance(fl.type, type) and issubclass(fl.type, Enum):
                assert list(opts[fl.dest].type.choices) == [m.value for m in fl.type]
    assert flag_overrides({"epsilon": 0.1, "methods": ("crown",), "device": None}) == {
        "perturbation.input.epsilon": 0.1, "bounds.methods": ["crown"]}


def test_batch_flag_defaults_are_the_librarys():
    import inspect

    from verigrad import batch as b

    opts = {o.name: o for o in main.commands["batch"].params}
    for name in ("jobs", "threads", "out"):
        assert opts[name].default == getattr(b.DEFAULTS, name)
    assert opts["backend"].default == b.DEFAULTS.backend.value
    assert opts["unknown_as"].default == b.DEFAULTS.unknown_as.value
    assert list(opts["unknown_as"].type.choices) == [u.value for u in b.UnknownAs]
    run = inspect.signature(b.run_batch).parameters
    assert run["jobs"].default == b.DEFAULTS.jobs and run["threads"].default == b.DEFAULTS.threads
    assert run["backend"].default == b.DEFAULTS.backend
