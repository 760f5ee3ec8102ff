"""``verigrad batch``: worker processes, per-instance timeouts, streamed and resumable
results, summary and JUnit XML."""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from verigrad import batch as b
from verigrad.cli import main
from verigrad.reports import ExitCode

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")


# attacks on every property, long: an input takes about half a second (a timeout of 0.05 s is hit on
# the input itself; the timeout does not count worker start-up)
SLOW_ATTACK = {"order": "both", "steps": 300, "restarts": 2}


def _spec(tmp_path: Path, name: str, threshold: float, end: int = 2, attack: dict | None = None) -> Path:
    d = {"model": {"path": FC}, "data": {"dataset": "mnist_sample", "start": 0, "end": end},
         "perturbation": {"input": {"epsilon": 0.001}},
         "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": threshold}],
         "bounds": {"methods": ["ibp"]}, "attack": attack or {"order": "after", "steps": 5, "restarts": 1},
         "general": {"results": str(tmp_path / "res")}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _run(*args):
    return CliRunner().invoke(main, ["batch", *map(str, args)])


BACKENDS = ["local", pytest.param("dask", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("distributed") is None, reason="distributed not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_runs_streams_and_reports(tmp_path, backend):
    ok, bad = _spec(tmp_path, "ok", 1000.0), _spec(tmp_path, "bad", 1e-9)
    out = tmp_path / "out"
    r = _run(ok, bad, "--jobs", 2, "--timeout", 120, "--out", out, "--backend", backend)
    assert r.exit_code == 1, r.output  # the tiny threshold is falsified
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(x["status"] == "done" for x in lines)
    import numpy as np

    for x in lines:  # bound maps per instance, as verify writes them
        maps = np.load(x["result"]["bounds_npz"])
        i = x["data_index"]
        assert maps[f"i{i}/ibp/lower"].shape == (1, 28, 28) and f"i{i}/explanation" in maps
    s = json.loads((out / "summary.json").read_text())
    v = s["verdicts"]
    assert v["certified"] == 2 and v["falsified"] >= 1 and v["error"] == 0 and s["exit_code"] == 1
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("tests") == "4" and suite.get("failures") == str(v["falsified"])
    fails = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    for c in fails:  # each failure names a witness that replays
        assert c.get("classname") == "bad"
        w = c.find("failure").text.removeprefix("witness: ")
        assert CliRunner().invoke(main, ["replay", w]).exit_code == ExitCode.FALSIFIED
    # the same verdicts as a plain verify of the same spec
    v = CliRunner().invoke(main, ["verify", str(ok)])
    assert v.exit_code == 0


def test_timeout_is_unknown_not_a_crash(tmp_path):
    out = tmp_path / "out"
    r = _run(_spec(tmp_path, "slow", 1000.0, attack=SLOW_ATTACK), "--timeout", 0.05, "--out", out, "--unknown-as",
             "failure")
    assert r.exit_code == 3, r.output
    recs = b.load_records(out)
    assert len(recs) == 2 and all(x["status"] == "timeout" and "timeout" in x["reason"] for x in recs)
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("failures") == "2"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_skips_what_is_done_and_reruns_cut_lines(tmp_path, backend):
    spec = _spec(tmp_path, "ok", 1000.0, end=3)
    out = tmp_path / "out"
    assert _run(spec, "--out", out, "--jobs", 2, "--backend", backend).exit_code == 0
    path = out / "results.jsonl"
    first = path.read_text().splitlines()
    # a batch killed while writing: one complete line, one cut in half
    path.write_text(first[0] + "\n" + first[1][: len(first[1]) // 2] + "\n")
    tasks = b.expand([spec])
    rerun = b.run_batch(tasks, out, jobs=2, resume=True, backend=backend)
    done_before = json.loads(first[0])["data_index"]
    assert sorted(x["data_index"] for x in rerun) == sorted({0, 1, 2} - {done_before})
    assert len(b.load_records(out)) == 3
    assert b.run_batch(tasks, out, resume=True, backend=backend) == []  # nothing left to do
    # a kill in the middle of the last line leaves it without a newline: the next record must
    # not be glued to it
    full = [json.dumps(x) for x in b.load_records(out)]
    path.write_text("\n".join(full[:2]) + "\n" + full[2][:10])
    rerun = b.run_batch(tasks, out, jobs=1, resume=True, backend=backend)
    assert len(rerun) == 1 and len(b.load_records(out)) == 3
    assert all(json.loads(x) for x in path.read_text().splitlines())


def test_bad_spec_is_bad_input(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model: {path: nope.onnx}\n")
    assert _run(p, "--out", tmp_path / "o").exit_code == 2


# ---------------------------------------------------------------------------------------
# Inputs batched in a unit: the same bounds and verdicts as one at a time


def _problem(tmp_path, **over):
    from verigrad.spec import spec_from_dict
    from verigrad.verify import prepare

    d = yaml.safe_load(_spec(tmp_path, "p", 0.05, end=5).read_text())
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return prepare(spec_from_dict(d, source="test"))


def test_batched_ibp_equals_one_input_at_a_time(tmp_path):
    import torch

    from verigrad import verify as vmod

    cases = [{}, {"explanation": {"method": "integrated_gradients", "integrated_gradients": {"steps": 4}}},
             {"perturbation": {"input": {"epsilon": 0.01}, "parameters": {"gamma": 0.001}}},
             {"explanation": {"output": "loss", "target": "label"}}]
    for over in cases:
        problem = _problem(tmp_path, **over)
        idx = [0, 2, 3, 4]
        pre = vmod.batched_bounds(problem, idx)
        for i, p in zip(idx, pre, strict=True):
            (res, seconds) = p.engines[vmod.Method.IBP]
            alone = vmod.verify_instance(problem, i).engines[0].bounds  # widened for rounding
            batched = vmod.verify_instance(problem, i, p).engines[0].bounds  # the same, from the batch
            assert seconds >= 0
            torch.testing.assert_close(batched.lower, alone.lower, rtol=0, atol=1e-12)
            torch.testing.assert_close(batched.upper, alone.upper, rtol=0, atol=1e-12)
            assert bool((batched.lower <= res.bounds.lower).all()) and bool((batched.upper >= res.bounds.upper).all())
            assert any("one batch of 4 inputs" in n for n in res.notes), over
        many = [r for r, _ in vmod.verify_many(problem, idx)]
        assert [r.verdicts for r in many] == [vmod.verify_instance(problem, i).verdicts for i in idx]
        assert [r.index for r in many] == idx


def test_precomputed_bounds_are_used_only_for_the_class_they_explain(tmp_path):
    import torch

    from verigrad import verify as vmod
    from verigrad.bounds import Bounds, EngineResult

    problem = _problem(tmp_path)
    alone = vmod.verify_instance(problem, 0)
    z = torch.zeros_like(alone.engines[0].bounds.lower)
    fake = {vmod.Method.IBP: (EngineResult(Bounds(z, z), "ibp"), 0.0)}  # wrong bounds: must never be trusted blindly
    other = vmod.verify_instance(problem, 0, vmod.Precomputed((alone.target + 1) % 10, fake))
    assert torch.equal(other.engines[0].bounds.lower, alone.engines[0].bounds.lower)
    with pytest.raises(vmod.SoundnessError):  # same class: used, and the centre check still guards it
        vmod.verify_instance(problem, 0, vmod.Precomputed(alone.target, fake))


def test_a_failing_batched_call_reruns_each_input_alone(tmp_path, monkeypatch):
    from verigrad import verify as vmod

    problem = _problem(tmp_path)

    def broken(*a, **k):
        raise RuntimeError("batched call failed")

    monkeypatch.setattr(vmod, "batched_bounds", broken)
    out = [r for r, _ in vmod.verify_many(problem, [0, 1])]
    assert [r.error for r in out] == [None, None] and all(r.engines for r in out)


def test_planner_units():
    tasks = [b.Task("a.yaml", "A", i, i) for i in range(10)] + [b.Task("b.yaml", "B", i, i) for i in range(3)]
    fixed = b._Planner(tasks, 4, workers=2)
    units = []
    while fixed:
        units.append([t.data_index for t in fixed.next_unit()])
    # the first input of each spec first, then units of consecutive inputs, never across specs
    assert units == [[0], [0], [1, 2, 3, 4], [5, 6, 7, 8], [9], [1, 2]]
    auto = b._Planner(tasks, None, workers=2)
    assert [len(auto.next_unit()) for _ in range(2)] == [1, 1]  # one of each spec, nothing measured yet
    auto.record(tasks[0], 0.001)  # fast: fill UNIT_SECONDS, capped by a fair share of the 9 left
    assert len(auto.next_unit()) == 5
    auto.alone([tasks[1], tasks[2]])  # split off a timed-out unit: one at a time
    assert [len(auto.next_unit()) for _ in range(2)] == [1, 1]
    slow = b._Planner(tasks, None, workers=1)
    slow.record(tasks[0], 10.0)
    assert len(slow.next_unit()) == 1


class _FakePool:
    """Runs units in this process; a unit holding input ``stuck`` never finishes."""

    capacity = 2

    def __init__(self, stuck: int) -> None:
        self.stuck, self.pending, self.killed, self.n = stuck, {}, [], 0

    def submit(self, unit):
        self.n += 1
        self.pending[self.n] = list(unit)
        return self.n

    def wait(self, seconds):
        done = []
        for h, unit in list(self.pending.items()):
            if all(t.data_index != self.stuck for t in unit):
                del self.pending[h]
                done.append((h, [b.Outcome("done", None, 0.01, {"verdicts": {}, "error": None, "attacks": {}})
                                 for _ in unit]))
        if not done:
            time.sleep(seconds)
        return done

    def kill(self, h):
        self.killed.append([t.data_index for t in self.pending.pop(h)])

    def close(self):
        pass


def test_a_timed_out_unit_is_split_and_only_the_slow_input_times_out(tmp_path):
    tasks = [b.Task("s.yaml", "S", i, i) for i in range(4)]
    pool = _FakePool(stuck=2)
    recs = b.run_batch(tasks, tmp_path, timeout=0.2, batch_size=4, pool=pool)
    status = {r["data_index"]: r["status"] for r in recs}
    assert status == {0: "done", 1: "done", 2: "timeout", 3: "done"}
    assert pool.killed == [[0, 1, 2, 3], [2]]  # the whole unit, then the input alone


# ---------------------------------------------------------------------------------------
# The Dask backend, on a loopback LocalCluster


def test_dask_backend_gives_the_local_results_and_stays_on_loopback(tmp_path):
    pytest.importorskip("distributed")
    ok, bad = _spec(tmp_path, "ok", 1000.0, end=3), _spec(tmp_path, "bad", 1e-9, end=3)
    tasks = b.expand([ok, bad])
    pool = b.DaskPool(2)
    try:
        addrs = pool.addresses()
        assert len(addrs) == 3 and all(a.startswith("tcp://127.0.0.1:") for a in addrs), addrs
        dask = b.run_batch(tasks, tmp_path / "dask", batch_size=2, pool=pool)
    finally:
        pool.close()
    local = b.run_batch(tasks, tmp_path / "local", jobs=2, batch_size=2)

    def key(recs):
        return {(r["spec_sha256"], r["data_index"]): r for r in recs}

    d, loc = key(dask), key(local)
    assert d.keys() == loc.keys() and len(d) == 6
    for k in d:
        rd, rl = d[k]["result"], loc[k]["result"]
        assert rd["verdicts"] == rl["verdicts"]
        assert rd["engines"]["ibp"]["mean_width"] == pytest.approx(rl["engines"]["ibp"]["mean_width"], abs=1e-12)
        for _name, a in rd["attacks"].items():  # witnesses written by the driver and replayable
            if a["witness"]:
                assert Path(a["witness"]).is_relative_to(tmp_path / "dask")
                assert CliRunner().invoke(main, ["replay", a["witness"]]).exit_code == ExitCode.FALSIFIED
    assert b.summary(dask)["verdicts"] == b.summary(local)["verdicts"]
    assert b.summary(dask)["verdicts"]["falsified"] >= 1


def test_dask_backend_timeout_restarts_the_worker_and_goes_on(tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "out"
    r = _run(_spec(tmp_path, "slow", 1000.0, attack=SLOW_ATTACK), "--backend", "dask", "--timeout", 0.05, "--out",
             out)
    assert r.exit_code == 3, r.output
    recs = b.load_records(out)
    assert len(recs) == 2 and all(x["status"] == "timeout" for x in recs)


def test_batch_cli_options(tmp_path):
    spec = _spec(tmp_path, "ok", 1000.0)
    r = _run(spec, "--batch-size", "0", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--batch-size" in r.output
    r = _run(spec, "--scheduler", "tcp://127.0.0.1:1", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--backend dask" in r.output
    r = _run(spec, "--progress", "--batch-size", "2", "--out", tmp_path / "o")
    assert r.exit_code == 0 and "2/2" in r.output and "100%" in r.output


def test_eta_prices_each_spec_at_its_own_mean():
    tasks = ([b.Task("f", "fast", i, i) for i in range(11)] + [b.Task("s", "slow", i, i) for i in range(3)]
             + [b.Task("n", "new", 0, 0)])
    plan = b._Planner(tasks, None, workers=2)
    plan.record(tasks[0], 0.1)
    plan.record(tasks[11], 10.0)
    # 10 × 0.1 + 2 × 10 + 1 × the overall mean 5.05, over 2 workers
    assert plan.eta() == pytest.approx((1.0 + 20.0 + 5.05) / 2)



@pytest.mark.slow
def test_the_shipped_suite_runs_as_a_batch(tmp_path):
    specs = sorted((ROOT / "specs").glob("*.yaml"))
    out = tmp_path / "suite"
    r = _run(*specs, "--jobs", 2, "--max-inputs", 1, "--timeout", 600, "--out", out)
    assert r.exit_code in (0, 1, 3), r.output  # certified / falsified / unknown, never an error
    recs = b.load_records(out)
    assert len(recs) == len(specs) and all(x["status"] == "done" and x["result"]["error"] is None for x in recs)
    s = json.loads((out / "summary.json").read_text())
    n_props = sum(len(yaml.safe_load(p.read_text())["properties"]) for p in specs)
    assert sum(s["verdicts"].values()) == n_props and s["verdicts"]["error"] == 0
    assert ET.parse(out / "junit.xml").getroot().get("tests") == str(n_props)


def test_a_killed_batch_resumes_where_it_stopped(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    spec = _spec(tmp_path, "many", 1000.0, end=40)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "verigrad.cli", "batch", str(spec), "--out", str(out), "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    lines = out / "results.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not lines.exists() or len(lines.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, mid-batch
    proc.wait()
    before = b.load_records(out)
    assert 3 <= len(before) < 40
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    after = b.load_records(out)
    assert sorted(x["data_index"] for x in after) == list(range(40))
    # nothing finished before the kill ran again, and every line is whole
    whole = [json.loads(x) for x in lines.read_text().splitlines()]
    assert len(whole) == 40


def test_specs_sharing_a_file_name_keep_their_files_apart(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, bb = _spec(tmp_path / "a", "s", 1e-9, end=1), _spec(tmp_path / "b", "s", 2e-9, end=1)
    recs = b.run_batch(b.expand([a, bb]), tmp_path / "out", jobs=2, batch_size=1)
    paths = {r["spec"]: (r["result"]["bounds_npz"], r["result"]["attacks"]["l2"]["witness"]) for r in recs}
    assert len(paths) == 2 and len({p for pair in paths.values() for p in pair}) == 4
    for spec, (_, w) in paths.items():  # each witness replays against its own spec's threshold
        r = CliRunner().invoke(main, ["replay", w])
        assert r.exit_code == ExitCode.FALSIFIED and ("2e-09" in r.output) == (spec == str(bb)), r.output
