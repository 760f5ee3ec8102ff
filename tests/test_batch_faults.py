"""``verigrad batch`` under faults: a second batch on the same output directory, finished
results never discarded unasked, resume re-running errors and timeouts, timeouts that do
not charge worker start-up, a SIGKILLed worker, SIGTERM to the driver, failed writes, and
JUnit XML from hostile text."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from verigrad import batch as b
from verigrad.cli import main
from verigrad.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")
VERIGRAD = str(Path(sys.executable).with_name("verigrad"))


def _spec(tmp_path: Path, name: str = "s", end: int = 2, slow: bool = False) -> Path:
    """A small MNIST spec; ``slow``: attacks on every property (about 0.5 s an input)."""
    attack = {"order": "both", "steps": 300, "restarts": 2} if slow else {"order": "after", "steps": 5, "restarts": 1}
    d = {"model": {"path": FC}, "data": {"dataset": "mnist_sample", "start": 0, "end": end},
         "perturbation": {"input": {"epsilon": 0.001}},
         "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1000.0}],
         "bounds": {"methods": ["ibp"]}, "attack": attack, "general": {"results": str(tmp_path / "res")}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _run(*args):
    return CliRunner().invoke(main, ["batch", *map(str, args)])


def _lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def _wait_for_lines(out: Path, n: int, proc: subprocess.Popen, limit: float = 120) -> None:
    path = out / "results.jsonl"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} result lines in {path} (batch exit {proc.poll()})")


_DONE = {"verdicts": {"l2": "certified"}, "error": None, "attacks": {}}


class _FakePool:
    """Units run in this process and finish at once (``delay``: after that many seconds from
    their start); ``start_after``: a unit starts that long after submission (a slow worker
    start-up), reported through ``started``."""

    capacity = 2

    def __init__(self, start_after: float = 0.0, delay: float = 0.0, report_start: bool = True) -> None:
        self.start_after, self.delay, self.pending, self.n = start_after, delay, {}, 0
        self.submitted: list[list[int]] = []
        if not report_start:
            self.started = None  # type: ignore[assignment]

    def submit(self, unit):
        self.n += 1
        self.pending[self.n] = (list(unit), time.monotonic())
        self.submitted.append([t.data_index for t in unit])
        return self.n

    def started(self, h):
        if h not in self.pending:
            return None
        t = self.pending[h][1] + self.start_after
        return t if time.monotonic() >= t else None

    def wait(self, seconds):
        time.sleep(seconds)
        done = []
        for h, (unit, at) in list(self.pending.items()):
            if time.monotonic() >= at + self.start_after + self.delay:
                del self.pending[h]
                done.append((h, [b.Outcome("done", None, 0.01, json.loads(json.dumps(_DONE))) for _ in unit]))
        return done

    def kill(self, h):
        self.pending.pop(h, None)

    def close(self):
        pass


def _tasks(n: int, spec: str = "s.yaml", h: str = "S") -> list[b.Task]:
    return [b.Task(spec, h, i, i) for i in range(n)]


# ---------------------------------------------------------------------------------------
# 1. One writer per output directory


def test_a_second_batch_on_the_same_out_is_refused_and_the_first_keeps_everything(tmp_path):
    spec = _spec(tmp_path, "many", end=5, slow=True)
    out = tmp_path / "out"
    first = subprocess.Popen([VERIGRAD, "batch", str(spec), "--out", str(out), "--batch-size", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lines(out, 1, first)
        for extra in ([], ["--resume"], ["--overwrite"]):
            before = (out / "results.jsonl").read_bytes()
            r = _run(spec, "--out", out, "--batch-size", 1, *extra)
            assert r.exit_code == 2, r.output
            assert "in use by another verigrad batch" in r.output and f"pid {first.pid}" in r.output, r.output
            assert len(r.output.strip().splitlines()) == 1
            assert (out / "results.jsonl").read_bytes().startswith(before)  # nothing discarded, nothing cut
        with pytest.raises(b.OutputLocked, match=f"pid {first.pid}"):  # the library refuses too
            b.run_batch(_tasks(1), out, pool=_FakePool())
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    recs = _lines(out)
    assert sorted(x["data_index"] for x in recs) == list(range(5)) and all(x["status"] == "done" for x in recs)
    assert not (out / ".lock").exists()  # released at the end


def test_the_lock_is_per_directory_reentrant_per_thread_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "out"
    held, release = threading.Event(), threading.Event()

    def hold():
        with b.output_lock(out):
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(30)
        with pytest.raises(b.OutputLocked, match=f"pid {os.getpid()}"):
            b.run_batch(_tasks(2), out, pool=_FakePool())
        assert not (out / "results.jsonl").exists()
        b.run_batch(_tasks(2), tmp_path / "other", pool=_FakePool())  # another directory is free
    finally:
        release.set()
        t.join()
    # a lock file left by a killed batch (its holder's pid gone): taken over with a note
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": "here", "started": "then"}))
    notes: list[str] = []
    with b.output_lock(out, on_note=notes.append):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
        assert b.run_batch(_tasks(2), out, pool=_FakePool()) != []  # re-entrant in the holder's thread
    assert len(notes) == 1 and f"pid {dead.pid}" in notes[0] and "no longer running" in notes[0]
    assert not (out / ".lock").exists()


# ---------------------------------------------------------------------------------------
# 2. Nothing finished is deleted without --overwrite


def test_finished_results_are_kept_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    b.run_batch(_tasks(4), out, pool=_FakePool())
    before = (out / "results.jsonl").read_bytes()
    with pytest.raises(UserError, match="has 4 finished results; use --resume to continue or --overwrite"):
        b.run_batch(_tasks(4), out, pool=_FakePool())
    assert (out / "results.jsonl").read_bytes() == before
    with pytest.raises(UserError, match="exclude each other"):
        b.run_batch(_tasks(4), out, pool=_FakePool(), resume=True, overwrite=True)
    (out / "summary.json").write_text("{}")
    recs = b.run_batch(_tasks(2), out, pool=_FakePool(), overwrite=True)
    assert len(recs) == 2 and len(_lines(out)) == 2 and not (out / "summary.json").exists()
    # an empty (or only cut) file holds no results: nothing to protect
    (out / "results.jsonl").write_text('{"spec": "s.ya')
    assert len(b.run_batch(_tasks(2), out, pool=_FakePool())) == 2


def test_cli_refuses_to_discard_results_and_overwrites_when_asked(tmp_path):
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    assert _run(spec, "--out", out).exit_code == 0
    before = (out / "results.jsonl").read_bytes()
    r = _run(spec, "--out", out)
    assert r.exit_code == 2 and r.output.strip() == (
        f"error: {out} has 2 finished results; use --resume to continue or --overwrite to discard them")
    assert (out / "results.jsonl").read_bytes() == before
    assert _run(spec, "--out", out, "--resume", "--overwrite").exit_code == 2
    assert _run(spec, "--out", out, "--overwrite", "--max-inputs", 1).exit_code == 0
    assert len(_lines(out)) == 1
    assert "error or timeout" in " ".join(CliRunner().invoke(main, ["batch", "--help"]).output.split())


# ---------------------------------------------------------------------------------------
# 3. --resume re-runs errors and timeouts


def test_resume_reruns_instances_whose_last_record_is_an_error_or_a_timeout(tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    def rec(i, status, result=None, reason=None):
        return json.dumps({"spec": "s.yaml", "spec_sha256": "S", "data_index": i, "status": status,
                           "reason": reason, "seconds": 0.1, "result": result})

    falsified = {"verdicts": {"l2": "falsified"}, "error": None, "attacks": {}}
    unknown = {"verdicts": {"l2": "unknown"}, "error": None, "attacks": {}}
    failed = {"verdicts": {}, "error": "RuntimeError: boom", "attacks": {}}
    (out / "results.jsonl").write_text("\n".join([
        rec(0, "done", _DONE), rec(1, "error", reason="worker exited with code -9"),
        rec(2, "timeout", reason="timeout after 3 s"), rec(3, "done", falsified), rec(4, "done", unknown),
        rec(5, "done", failed),  # an instance that failed inside the worker
        rec(6, "error", reason="x"), rec(6, "done", _DONE),  # the last record counts
        rec(7, "done", _DONE), rec(7, "timeout", reason="timeout after 1 s"),
    ]) + "\n")
    pool = _FakePool()
    rerun = b.run_batch(_tasks(8), out, resume=True, pool=pool)
    assert sorted(x["data_index"] for x in rerun) == [1, 2, 5, 7]
    assert sorted(i for u in pool.submitted for i in u) == [1, 2, 5, 7]
    assert all(x["status"] == "done" for x in b.load_records(out)) and len(b.load_records(out)) == 8
    assert b.run_batch(_tasks(8), out, resume=True, pool=_FakePool()) == []


# ---------------------------------------------------------------------------------------
# 4. The timeout counts from the start on the worker


def test_the_timeout_does_not_charge_a_slow_worker_start_fake_pool(tmp_path):
    # units start 0.6 s after submission and run 0.05 s: with a 0.3 s timeout none times out
    recs = b.run_batch(_tasks(4), tmp_path / "o", timeout=0.3, batch_size=2, pool=_FakePool(start_after=0.6, delay=0.05))
    assert [x["status"] for x in recs] == ["done"] * 4
    # a pool that cannot say when a unit started: the deadline counts from submission, as before
    recs = b.run_batch(_tasks(1), tmp_path / "p", timeout=0.3,
                       pool=_FakePool(start_after=0.6, delay=0.05, report_start=False))
    assert [x["status"] for x in recs] == ["timeout"]


def _slow_serve(threads, conn):  # a worker that takes 4 s more to start (imported by the spawned worker)
    time.sleep(4)
    b._serve(threads, conn)


class _SlowStartPool(b.LocalPool):
    _target = staticmethod(_slow_serve)


@pytest.mark.slow
def test_the_timeout_does_not_charge_a_slow_worker_start_local_pool(tmp_path):
    tasks = b.expand([_spec(tmp_path, end=3)])
    pool = _SlowStartPool(2)
    recs = b.run_batch(tasks, tmp_path / "out", timeout=3, batch_size=1, pool=pool)
    assert sorted(x["data_index"] for x in recs) == [0, 1, 2]
    assert all(x["status"] == "done" for x in recs), [x["reason"] for x in recs]


# ---------------------------------------------------------------------------------------
# 5. A worker killed mid-run


class _KillingPool(b.LocalPool):
    """SIGKILLs the worker that gets the unit holding input ``victim``, right after handing it over."""

    victim = 1

    def submit(self, unit):
        h = super().submit(unit)
        if any(t.data_index == self.victim for t in unit):
            os.kill(self.pids()[h], signal.SIGKILL)
        return h


def test_a_killed_worker_fails_its_inputs_the_rest_finish_and_resume_reruns_them(tmp_path):
    spec = _spec(tmp_path, end=5)
    tasks = b.expand([spec])
    out = tmp_path / "out"
    recs = b.run_batch(tasks, out, batch_size=1, pool=_KillingPool(2))
    status = {x["data_index"]: (x["status"], x["reason"]) for x in recs}
    assert sorted(status) == [0, 1, 2, 3, 4]
    assert status[1][0] == "error" and "worker exited with code -9" in status[1][1]
    assert all(status[i] == ("done", None) for i in (0, 2, 3, 4))
    rerun = b.run_batch(tasks, out, resume=True, jobs=1)
    assert [(x["data_index"], x["status"]) for x in rerun] == [(1, "done")]
    assert all(x["status"] == "done" for x in b.load_records(out))


def test_a_worker_killed_while_idle_is_replaced(tmp_path):
    tasks = b.expand([_spec(tmp_path, end=3)])
    pool = b.LocalPool(1)
    killed: list[int] = []

    def on_result(rec, progress):
        if not killed:  # the only worker is idle now: the next unit must find a fresh one
            pid = pool.pids()[0]
            os.kill(pid, signal.SIGKILL)
            pool._procs[0].proc.join(10)
            killed.append(pid)

    recs = b.run_batch(tasks, tmp_path / "out", batch_size=1, pool=pool, on_result=on_result)
    assert [x["status"] for x in recs] == ["done"] * 3 and pool.pids()[0] not in killed


# ---------------------------------------------------------------------------------------
# 6. SIGTERM to the driver


@pytest.mark.slow
def test_sigterm_stops_quietly_and_leaves_out_resumable(tmp_path):
    spec = _spec(tmp_path, "many", end=6, slow=True)
    out = tmp_path / "out"
    cmd = [VERIGRAD, "batch", str(spec), "--out", str(out), "--batch-size", "1", "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lines(out, 1, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + 15, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "continue with --resume" in err, err
    assert not (out / ".lock").exists()
    data = (out / "results.jsonl").read_text()
    assert data.endswith("\n") and all(json.loads(x)["status"] == "done" for x in data.splitlines())
    kept = len(data.splitlines())
    assert 1 <= kept < 6
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(x["data_index"] for x in b.load_records(out)) == list(range(6))
    assert len(_lines(out)) == 6  # nothing finished ran twice


# ---------------------------------------------------------------------------------------
# 7. Write failures: before any work, and mid-run


class _FullDisk:
    """``results.jsonl`` on a disk that fills up: the ``room``-th line is cut half-way, ENOSPC."""

    def __init__(self, path: Path, room: int) -> None:
        self.f = open(path, "ab", buffering=0)  # noqa: SIM115
        self.room = room

    def write(self, data):
        self.room -= 1
        if self.room <= 0:
            self.f.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_mid_run_is_bad_output_naming_the_file_and_keeps_what_was_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(b, "_open_lines", lambda path: _FullDisk(path, room=3))
    with pytest.raises(b.OutputError, match=r"results.jsonl: No space left on device; .* keeps the 2 results"):
        b.run_batch(_tasks(6), out, pool=_FakePool(), batch_size=1)
    assert [x["data_index"] for x in _lines(out)] == [0, 1]  # whole lines only: the cut one was taken back
    assert not (out / ".lock").exists()
    monkeypatch.undo()
    rerun = b.run_batch(_tasks(6), out, pool=_FakePool(), resume=True)
    assert sorted(x["data_index"] for x in rerun) == [2, 3, 4, 5]


def test_a_failed_bound_map_write_names_the_file_and_writes_no_line(tmp_path, monkeypatch):
    spec = _spec(tmp_path, end=3)
    out = tmp_path / "out"
    real = b._write_file
    n = {"files": 0}

    def full(path, data):
        n["files"] += 1
        if n["files"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(b, "_write_file", full)
    r = _run(spec, "--out", out, "--batch-size", 1)
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]  # after the progress line of the one instance written
    assert line.startswith("error: cannot write ") and ".npz: No space left on device" in line, line
    assert len(_lines(out)) == 1 and not (out / ".lock").exists()
    monkeypatch.undo()
    assert _run(spec, "--out", out, "--resume").exit_code == 0
    assert len(b.load_records(out)) == 3


class _NoWorkPool(_FakePool):
    def submit(self, unit):
        raise AssertionError("work started")


def test_an_unwritable_out_is_bad_output_before_any_work(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(b.OutputError, match="not a directory"):
        b.run_batch(_tasks(2), plain, pool=_NoWorkPool())
    with pytest.raises(b.OutputError, match="cannot use"):
        b.run_batch(_tasks(2), plain / "sub", pool=_NoWorkPool())
    spec = _spec(tmp_path)
    r = _run(spec, "--out", plain)  # click's own check of --out
    assert r.exit_code == 2 and "is a file" in r.output, r.output
    for target in (plain / "sub", Path("/sys/verigrad-out")):  # under a plain file; where nothing may be made
        r = _run(spec, "--out", target)
        assert r.exit_code == 2 and r.output.startswith(f"error: cannot use {target} as the output directory"), r.output
        assert len(r.output.strip().splitlines()) == 1
    assert plain.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_parent_is_bad_output_before_any_work(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(b.OutputError, match="cannot use"):
            b.run_batch(_tasks(2), ro / "out", pool=_NoWorkPool())
    finally:
        ro.chmod(0o700)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(b.OutputError, match=r"cannot write .*\.lock"):
            b.run_batch(_tasks(2), out, pool=_NoWorkPool())
    finally:
        out.chmod(0o700)


def test_a_read_only_out_is_bad_output_before_any_work_simulated(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = os.open

    def read_only(path, flags, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(b.os, "open", read_only)
    with pytest.raises(b.OutputError, match=r"cannot write .*\.lock: Read-only file system"):
        b.run_batch(_tasks(2), out, pool=_NoWorkPool())


# ---------------------------------------------------------------------------------------
# 8. JUnit XML from hostile text


def test_junit_xml_is_well_formed_whatever_the_names_and_messages(tmp_path):
    nasty = 'a "quoted" <tag> & \'apos\' \x00\x01\x1b[31m\x7f\ufffe end'
    w = str(tmp_path / 'w"<&>.npz')

    def rec(i, status, verdicts, reason=None, spec="s&<\"x\".yaml"):
        return {"spec": spec, "spec_sha256": "S", "data_index": i, "status": status, "reason": reason,
                "seconds": 0.5, "result": {"verdicts": verdicts, "error": None,
                                           "attacks": {n: {"witness": w} for n in verdicts}}}

    recs = [rec(0, "done", {nasty: "certified", "p<2>": "falsified"}),
            rec(1, "done", {nasty: "unknown"}),
            rec(2, "timeout", {nasty: "unknown"}, reason=f"timeout {nasty}"),
            rec(3, "error", {nasty: "unknown"}, reason=f"Traceback \x02 {nasty}\nline two")]
    for unknown_as in ("skipped", "failure"):
        text = b.junit_xml(recs, unknown_as)
        suite = ET.fromstring(text.encode())
        cases = list(suite.iter("testcase"))
        assert len(cases) == 5 and suite.get("tests") == "5"
        names = [c.get("name") for c in cases]
        assert names[0].startswith('input0.a "quoted" <tag> & \'apos\' ') and "\\x00\\x01\\x1b" in names[0]
        assert names[1] == "input0.p<2>" and all(c.get("classname") == 's&<"x"' for c in cases)
        assert cases[0].find("*") is None  # certified: passes
        assert cases[1].find("failure").text == f"witness: {w}"
        err = cases[4].find("error")
        assert err is not None and err.text.startswith("Traceback \\x02 a \"quoted\"") and "line two" in err.text
        kinds = [c[0].tag if len(c) else None for c in cases]
        if unknown_as == "skipped":
            assert kinds == [None, "failure", "skipped", "skipped", "error"]
            assert cases[3].find("skipped").get("message").startswith("timeout a \"quoted\" <tag> &")
            assert (suite.get("failures"), suite.get("skipped"), suite.get("errors")) == ("1", "2", "1")
        else:
            assert kinds == [None, "failure", "failure", "failure", "error"]
            assert (suite.get("failures"), suite.get("skipped"), suite.get("errors")) == ("3", "0", "1")
