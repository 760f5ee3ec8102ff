"""Data the model's domain does not admit is bad input, named by input and coordinate; a
box is never silently shrunk to [x, range bound]."""
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import verigrad.verify as vmod
from verigrad.cli import main
from verigrad.reports import ExitCode
from verigrad.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")


def _spec(tmp_path: Path, x: np.ndarray, y: np.ndarray, **data) -> Path:
    np.savez(tmp_path / "d.npz", x=x, y=y)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({
        "model": {"path": FC}, "data": {"path": str(tmp_path / "d.npz"), **data},
        "perturbation": {"input": {"epsilon": 0.01}},
        "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1000.0}],
        "bounds": {"methods": ["ibp"]}, "attack": {"order": "skip"},
        "general": {"results": str(tmp_path / "res")}}))
    return p


def _run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("make, value", [
    (lambda x: x + 5.0, "5."),  # x in [5, 6]
    (lambda x: np.rint(x * 255.0), None),  # uint8-scale pixels with the default range [0, 1]
    (lambda x: x - 0.475, "-0.475"),  # a control net's centred inputs
])
def test_inputs_outside_the_range_are_named_by_index_and_coordinate(tmp_path, make, value):
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 28, 28)) * 0.5 + 0.25
    x[1, 0, 4, 7] = 0.0  # inputs 0 and 2 are made to leave the range below
    x = np.concatenate([make(x[:1]), x[1:2], make(x[2:])])
    if value == "-0.475":
        x[0] = 0.5
        x[0, 0, 3, 9] = 0.5 - 0.975
    r = _run("verify", _spec(tmp_path, x, np.array([0, 1, 2])))
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    line = r.output.strip()
    assert "\n" not in line and "spec.yaml: data: input 0 has value" in line and "outside model.input_range [0, 1]" in line
    assert "data.outside_range: allow" in line
    assert "(2 input(s) affected)" in line
    if value == "-0.475":
        assert "coordinate [0, 3, 9]" in line and "value -0.475" in line


def test_the_opt_out_certifies_the_clipped_box_containing_x(tmp_path):
    x = np.full((1, 1, 28, 28), 0.5)
    x[0, 0, 0, 0] = 1.5
    spec = load_spec(_spec(tmp_path, x, np.array([3]), outside_range="allow"))
    problem = vmod.prepare(spec)
    box = vmod.threat_for(problem, 0, 3).box
    assert float(box.lower[0, 0, 0, 0]) == 1.0 and float(box.upper[0, 0, 0, 0]) == 1.5  # [hi, x]: documented
    assert _run("verify", tmp_path / "spec.yaml").exit_code == ExitCode.CERTIFIED


def test_labels_outside_the_models_classes_are_bad_input(tmp_path):
    x = np.full((2, 1, 28, 28), 0.5)
    r = _run("verify", _spec(tmp_path, x, np.array([3, 10])))
    assert r.exit_code == ExitCode.BAD_INPUT and "input 1 has label 10, out of range" in r.output, r.output
    assert "mnist_fc.onnx with 10 outputs" in r.output


def test_a_weight_beyond_float32_is_refused_in_a_float32_run(tmp_path):
    from onnx import TensorProto, helper

    from tests.helpers import hand_onnx, save_onnx

    w = np.full((10, 4), 0.1)
    w[3, 2] = 1e300  # finite in float64, inf in float32
    model = hand_onnx([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)],
                      {"W": w, "b": np.zeros(10)}, [4], [10], elem=TensorProto.DOUBLE)
    path = save_onnx(model, tmp_path / "big.onnx")
    np.savez(tmp_path / "d.npz", x=np.full((1, 4), 0.5), y=np.array([0]))
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "model": {"path": str(path)}, "data": {"path": str(tmp_path / "d.npz")},
        "perturbation": {"input": {"epsilon": 0.01}},
        "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1.0}],
        "bounds": {"methods": ["ibp"], "dtype": "float32"}, "attack": {"order": "skip"},
        "general": {"results": str(tmp_path / "res")}}))
    r = _run("verify", spec)
    assert r.exit_code == ExitCode.BAD_INPUT and "bounds.dtype" in r.output and "float32" in r.output, r.output
    assert _run("verify", spec, "--dtype", "float64").exit_code != ExitCode.BAD_INPUT


@pytest.mark.parametrize("explanation, key", [
    ({"method": "integrated_gradients", "integrated_gradients": {"steps": 2000}},
     "explanation.integrated_gradients.steps"),
    ({"method": "smoothgrad", "smoothing": {"batch_size": 4096, "samples": 8}}, "explanation.smoothing.batch_size"),
])
def test_a_pass_that_would_not_fit_in_memory_is_refused_by_its_key(tmp_path, monkeypatch, explanation, key):
    """The limit is derived from the run: points per pass × the model's activations against the
    memory available now (here made 64 MiB), not a fixed cap."""
    x = np.full((1, 1, 28, 28), 0.5)
    p = _spec(tmp_path, x, np.array([3]))
    d = yaml.safe_load(p.read_text())
    d["explanation"] = explanation
    p.write_text(yaml.safe_dump(d))
    monkeypatch.setattr(vmod, "available_memory_bytes", lambda device: 64 * 2.0**20)
    r = _run("verify", p)
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    line = r.output.strip()
    assert "\n" not in line and f"spec.yaml: {key}:" in line and "GiB, more than the 0.06 GiB available" in line
    fit = int(line.rsplit("at most about ", 1)[1].split()[0])
    d["explanation"][next(k for k in explanation if k != "method")][key.rsplit(".", 1)[1]] = fit
    p.write_text(yaml.safe_dump(d))
    r = _run("verify", p)  # the suggested size fits: the run goes on to a verdict
    assert r.exit_code in (ExitCode.CERTIFIED, ExitCode.UNKNOWN), r.output
