"""``verigrad doctor`` and a missing auto_LiRPA: the doctor prints one line per check and exits
0 here, 2 naming a failed shim check; without auto_LiRPA, IBP still verifies and CROWN exits 2
with the one-line install instruction."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from verigrad import doctor
from verigrad.bounds import lirpa_compat
from verigrad.cli import main
from verigrad.reports import ExitCode

ROOT = Path(__file__).resolve().parents[1]


def test_doctor_passes_here_and_prints_every_check():
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    for name in ("python:", "verigrad:", "torch:", "numpy:", "onnx:", "auto_LiRPA shim: auto_LiRPA import:",
                 "auto_LiRPA shim: clamp gradient:", "cuda", "threads:", "memory:"):
        assert any(name in line for line in lines), (name, r.output)
    assert not any(line.startswith("FAIL") for line in lines)
    assert len(lines) == len(doctor.run_checks())  # one line per check


def test_a_failing_shim_check_exits_2_naming_it(monkeypatch):
    # torch now blocking clamp's gradient at its bounds, after the shim decided no fix was needed
    monkeypatch.setattr(lirpa_compat, "clamp_blocks_gradient_at_bounds", lambda: True)
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    (bad,) = [line for line in r.output.splitlines() if line.startswith("FAIL")]
    assert "clamp gradient" in bad


def test_a_missing_optional_package_does_not_fail(monkeypatch):
    monkeypatch.setitem(sys.modules, "quantus", None)
    checks = doctor.run_checks()
    (q,) = [c for c in checks if c.name == "quantus"]
    assert not q.ok and not q.required and doctor.exit_code(checks) == 0


_WITHOUT_LIRPA = "import sys; sys.modules['auto_LiRPA'] = None; from verigrad.cli import main; main()"


def _verify_without_lirpa(tmp_path: Path, method: str) -> subprocess.CompletedProcess:
    spec = {"model": {"path": str(ROOT / "examples/models/mnist_fc.onnx")},
            "data": {"dataset": "mnist_sample", "start": 0, "end": 1},
            "perturbation": {"input": {"epsilon": 0.001}},
            "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 0.5}],
            "attack": {"order": "skip"}, "general": {"results": str(tmp_path / "res")}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-c", _WITHOUT_LIRPA, "verify", str(path), "--method", method],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_without_auto_lirpa_ibp_verifies_and_crown_says_how_to_install_it(tmp_path):
    ibp = _verify_without_lirpa(tmp_path, "ibp")
    assert ibp.returncode in (ExitCode.CERTIFIED, ExitCode.UNKNOWN), ibp.stderr
    crown = _verify_without_lirpa(tmp_path, "crown")
    assert crown.returncode == ExitCode.BAD_INPUT, crown.stderr
    assert "pip install --no-deps auto-lirpa==0.3" in crown.stderr
    assert len(crown.stderr.strip().splitlines()) == 1 and "Traceback" not in crown.stderr
