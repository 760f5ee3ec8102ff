"""Every command maps failures to exit codes in one place (verigrad.cli._Guarded): bad input
exits 2 with one line, an internal error exits 4 with one line and its traceback in a file
(or on stderr with --debug); 1 and 3 come only from verdicts; no traceback on the terminal."""
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import verigrad.verify as vmod
from verigrad.cli import main
from verigrad.errors import UserError
from verigrad.reports import ExitCode

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")


def _spec(tmp_path) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({
        "model": {"path": FC}, "data": {"dataset": "mnist_sample", "start": 0, "end": 1},
        "perturbation": {"input": {"epsilon": 0.001}},
        "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1000.0}],
        "bounds": {"methods": ["ibp"]}, "general": {"results": str(tmp_path / "res")}}))
    return p


def _run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _fail_prepare(monkeypatch, exc: BaseException) -> None:
    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(vmod, "prepare", boom)


def test_internal_error_is_one_line_exit_4_with_the_traceback_in_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _fail_prepare(monkeypatch, RuntimeError("deep inside\nsomething broke"))
    r = _run("verify", _spec(tmp_path))
    assert r.exit_code == ExitCode.ERROR
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("INTERNAL ERROR") and "deep inside; something broke" in lines[0]
    assert "Traceback" not in r.output
    (crash,) = tmp_path.glob("verigrad-crash-*.txt")
    assert str(crash) in lines[0] and "Traceback" in crash.read_text() and "RuntimeError" in crash.read_text()


def test_debug_prints_the_traceback(tmp_path, monkeypatch):
    _fail_prepare(monkeypatch, KeyError("k"))
    r = _run("--debug", "verify", _spec(tmp_path))
    assert r.exit_code == ExitCode.ERROR and "Traceback" in r.output and "traceback above" in r.output


@pytest.mark.parametrize("exc", [EOFError(), ZeroDivisionError("x"), MemoryError(), RecursionError()])
def test_no_internal_error_exits_1_or_3(tmp_path, monkeypatch, exc):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _fail_prepare(monkeypatch, exc)
    r = _run("verify", _spec(tmp_path))
    assert r.exit_code == ExitCode.ERROR and "Aborted" not in r.output, r.output


def test_user_errors_and_named_os_errors_exit_2_on_one_line(tmp_path, monkeypatch):
    _fail_prepare(monkeypatch, UserError("spec.yaml: model.path: expected a file\nsecond line"))
    r = _run("verify", _spec(tmp_path))
    assert r.exit_code == ExitCode.BAD_INPUT and r.output.strip() == "error: spec.yaml: model.path: expected a file; second line"
    _fail_prepare(monkeypatch, PermissionError(13, "Permission denied", "/root/x.json"))
    r = _run("verify", _spec(tmp_path))
    assert r.exit_code == ExitCode.BAD_INPUT and r.output.strip() == "error: /root/x.json: Permission denied"


def test_interrupt_is_not_a_verdict(tmp_path, monkeypatch):
    _fail_prepare(monkeypatch, KeyboardInterrupt())
    r = _run("verify", _spec(tmp_path))
    assert r.exit_code == 130 and "interrupted" in r.output


def test_usage_errors_exit_2(tmp_path):
    r = _run("batch", _spec(tmp_path), "--scheduler", "tcp://x:1")
    assert r.exit_code == 2 and "--scheduler needs --backend dask" in r.output


# ---------------------------------------------------------------- output locations


def test_outputs_under_a_plain_file_fail_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "plain").write_text("x")
    _fail_prepare(monkeypatch, AssertionError("prepare must not run"))
    for flag in ("--out", "--bounds-npz"):
        r = _run("verify", _spec(tmp_path), flag, tmp_path / "plain" / "r.json")
        assert r.exit_code == ExitCode.BAD_INPUT, r.output
        assert r.output.startswith("error: cannot write ") and "plain" in r.output and "\n" not in r.output.strip()


def test_a_read_only_output_directory_fails_before_any_work(tmp_path, monkeypatch):
    import errno

    import verigrad.reports as rmod

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    _fail_prepare(monkeypatch, AssertionError("prepare must not run"))
    monkeypatch.setattr(rmod.tempfile, "mkstemp", read_only)
    r = _run("verify", _spec(tmp_path))
    assert r.exit_code == ExitCode.BAD_INPUT and "Read-only file system" in r.output, r.output


def test_a_full_disk_mid_run_exits_2_and_keeps_what_was_written(tmp_path, monkeypatch):
    import errno
    import json

    import verigrad.reports as rmod

    spec = _spec(tmp_path)
    d = yaml.safe_load(spec.read_text())
    d["data"]["end"] = 3
    spec.write_text(yaml.safe_dump(d))
    real, calls = rmod._atomic_write, []

    def fill_up(path, write):
        calls.append(path)
        if len(calls) > 2:  # the JSON and npz of the first instance fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, write)

    monkeypatch.setattr(rmod, "_atomic_write", fill_up)
    r = _run("verify", spec)
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    assert "No space left on device" in r.output and "keeps the 1 instance(s)" in r.output and "Traceback" not in r.output
    doc = json.loads((tmp_path / "res/spec.json").read_text())
    assert [i["index"] for i in doc["instances"]] == [0] and doc["complete"] is False
    assert not list((tmp_path / "res").glob("*.tmp"))


@pytest.mark.parametrize("args, text", [
    (["verify", "/"], "is a directory"),
    (["verify", "--bogus", "x"], "No such option '--bogus'"),
    (["bogus"], "No such command 'bogus'"),
])
def test_usage_errors_are_one_line(args, text):
    r = _run(*args)
    assert r.exit_code == 2 and r.output.startswith("error: ") and text in r.output and r.output.count("\n") == 1
