"""``verigrad replay --onnxruntime``: witnesses of a shipped spec are confirmed by onnxruntime
(forward in float32, explanation by float64 finite differences), tampered ones are not,
parameter-box witnesses are written into the ONNX model, models without double kernels fall
back to float32, and what cannot be checked there exits 2 with one line."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from verigrad.cli import main
from verigrad.reports import ExitCode

ROOT = Path(__file__).resolve().parents[1]
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime is not installed (pip install onnxruntime)")


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def shipped_witnesses(tmp_path_factory) -> list[Path]:
    """The witnesses of specs/mnist_fc_attacks.yaml (the vanilla FC model, every property kind)
    on its first input, IBP only."""
    out = tmp_path_factory.mktemp("fc") / "fc.json"
    r = _run("verify", ROOT / "specs/mnist_fc_attacks.yaml", "--end", 1, "--method", "ibp", "--out", out)
    assert r.exit_code == ExitCode.FALSIFIED, r.output
    doc = json.loads(out.read_text())
    paths = [Path(a["witness"]) for i in doc["instances"] for a in i["attacks"].values() if a["violated"]]
    assert len(paths) >= 3
    return paths


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _rewrite(src: Path, dst: Path, **meta_changes) -> Path:
    arrays = _arrays(src)
    meta = json.loads(str(arrays["meta"]))
    for k, v in meta_changes.items():
        meta[k] = v
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(dst, **arrays)
    return dst


@needs_ort
def test_shipped_spec_witnesses_are_confirmed_by_onnxruntime(shipped_witnesses):
    for path in shipped_witnesses:
        r = _run("replay", "--onnxruntime", path)
        assert r.exit_code == ExitCode.FALSIFIED and "CONFIRMED" in r.output, r.output
        for name in ("forward", "explanation", "value", "violated"):
            assert f"onnxruntime {name}: yes" in r.output, r.output
        assert "float64" in r.output  # the FC model has double kernels: no fallback


@needs_ort
def test_a_witness_whose_point_was_moved_is_not_confirmed(shipped_witnesses, tmp_path):
    src = next(p for p in shipped_witnesses if p.name.endswith("_shape.npz"))
    arrays = _arrays(src)
    x, x0 = arrays["x"], arrays["x0"]
    # inside the box, but not the point the search found: its explanation is not the stored v
    arrays["x"] = np.clip(x0 + 0.5 * (x - x0)[..., ::-1, :], 0.0, 1.0)
    bad = tmp_path / "moved.npz"
    np.savez(bad, **arrays)
    r = _run("replay", "--onnxruntime", bad)
    assert r.exit_code == ExitCode.UNKNOWN and "NOT CONFIRMED" in r.output, r.output
    assert "onnxruntime explanation: NO" in r.output and "onnxruntime forward: yes" in r.output
    arrays["x"] = x + 0.5  # outside the box
    np.savez(bad, **arrays)
    r = _run("replay", "--onnxruntime", bad)
    assert r.exit_code == ExitCode.UNKNOWN and "inside the box: NO" in r.output, r.output


@needs_ort
def test_a_witness_whose_claimed_violation_was_changed_is_not_confirmed(shipped_witnesses, tmp_path):
    src = next(p for p in shipped_witnesses if p.name.endswith("_shape.npz"))
    meta = json.loads(str(_arrays(src)["meta"]))
    bad = _rewrite(src, tmp_path / "claimed.npz", value=meta["value"] + 0.05)
    r = _run("replay", "--onnxruntime", bad)
    # replay alone recomputes the value and ignores the claim; onnxruntime replay checks it
    assert _run("replay", bad).exit_code == ExitCode.FALSIFIED
    assert r.exit_code == ExitCode.UNKNOWN and "onnxruntime value: NO" in r.output, r.output
    assert "onnxruntime violated: yes" in r.output


@needs_ort
def test_parameter_box_witness_is_written_into_the_onnx_model(tmp_path):
    import onnx
    import onnxruntime as ort

    from verigrad.attacks import load_witness
    from verigrad.attacks.ort_replay import _Runner, write_params
    from verigrad.models import load_onnx

    fc = ROOT / "examples/models/mnist_fc.onnx"
    spec = {"model": {"path": str(fc)}, "data": {"dataset": "mnist_sample", "start": 2, "end": 3},
            "perturbation": {"input": {"epsilon": 0.01}, "parameters": {"gamma": 0.02, "layers": ["/fc3/Gemm"]}},
            "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 0.3}],
            "bounds": {"methods": ["ibp"]}, "attack": {"order": "before", "methods": ["params"], "steps": 10,
                                                       "restarts": 1},
            "general": {"results": str(tmp_path / "res")}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    assert _run("verify", tmp_path / "p.yaml").exit_code == ExitCode.FALSIFIED
    (path,) = (tmp_path / "res/p.witnesses").glob("*.npz")
    r = _run("replay", "--onnxruntime", path)
    assert r.exit_code == ExitCode.FALSIFIED and "onnxruntime explanation: yes" in r.output, r.output
    # the weights really are the witness's: the model's logits move with them
    w = load_witness(path)
    model = onnx.load(str(fc))
    x = w.x.numpy()
    z0 = _Runner(ort, model, np.float32, None)(x)
    z = _Runner(ort, write_params(model, load_onnx(fc), w.params, fc.name), np.float32, None)(x)
    assert float(np.abs(z - z0).max()) > 1e-3


@needs_ort
def test_a_model_without_double_kernels_falls_back_to_float32(tmp_path):
    """onnxruntime's CPU provider has no double Softplus: the finite differences run in float32
    with a larger step, the result says so, and the witness is still confirmed."""
    spec = {"model": {"path": str(ROOT / "examples/models/mnist_softplus.onnx")},
            "data": {"dataset": "mnist_sample", "start": 0, "end": 1},
            "explanation": {"method": "integrated_gradients", "output": "probability",
                            "integrated_gradients": {"steps": 4, "rule": "riemann_middle"}},
            "perturbation": {"input": {"epsilon": 0.01}},
            "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1e-6}],
            "bounds": {"methods": ["ibp"]}, "attack": {"steps": 5, "restarts": 1},
            "general": {"results": str(tmp_path / "res")}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert _run("verify", tmp_path / "s.yaml").exit_code == ExitCode.FALSIFIED
    (path,) = (tmp_path / "res/s.witnesses").glob("*.npz")
    r = _run("replay", "--onnxruntime", path)
    assert r.exit_code == ExitCode.FALSIFIED, r.output
    assert "no float64 version" in r.output and "Softplus" in r.output and "float32, h = 0.002" in r.output


@needs_ort
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_a_model_that_is_not_onnx_exits_2_naming_it(shipped_witnesses, tmp_path):
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)))
    pt = tmp_path / "model.pt"
    torch.jit.save(net, str(pt))
    src = shipped_witnesses[0]
    meta = json.loads(str(_arrays(src)["meta"]))
    spec = {**meta["spec"], "model": {**meta["spec"]["model"], "path": str(pt), "input_shape": [1, 28, 28]}}
    bad = _rewrite(src, tmp_path / "ts.npz", spec=spec)
    r = _run("replay", "--onnxruntime", bad)
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    assert "model.pt" in r.output and "onnxruntime replay needs an ONNX model" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_without_onnxruntime_replay_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # an import of it now fails
    w = tmp_path / "w.npz"
    np.savez(w, x=np.zeros(2))
    r = _run("replay", "--onnxruntime", w)
    assert r.exit_code == ExitCode.BAD_INPUT and "pip install onnxruntime" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_central_differences_and_their_error_estimate():
    """On a known smooth f the h/2 estimate is accurate, within its error estimate, and the
    error estimate is small; every step is exact in the model's dtype."""
    from verigrad.attacks.ort_replay import fd_gradient, scalar_output

    a = np.linspace(-1.0, 2.0, 6)
    f = lambda p: np.sin(p.reshape(len(p), -1) @ a) + (p.reshape(len(p), -1) ** 3).sum(1)  # noqa: E731
    x = np.linspace(-0.7, 1.3, 6).reshape(1, 2, 3)
    exact = np.cos(x.reshape(-1) @ a) * a + 3 * x.reshape(-1) ** 2
    r = fd_gradient(f, x, 1e-6, float(np.finfo(np.float64).eps), np.float64)
    err = np.abs(r.g.reshape(-1) - exact)
    assert err.max() < 1e-8 and np.all(err <= 2 * r.err.reshape(-1)) and r.err.max() < 1e-7
    z = np.array([[1.0, 3.0, -2.0]])
    p = np.exp(z) / np.exp(z).sum()
    assert scalar_output(z, 1, "logit")[0] == 3.0
    assert scalar_output(z, 1, "probability")[0] == pytest.approx(p[0, 1])
    assert scalar_output(z, 1, "loss")[0] == pytest.approx(-np.log(p[0, 1]))
