"""``verigrad batch``: worker processes, per-instance timeouts, streamed and resumable
results, summary and JUnit XML."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml
from click.testing import CliRunner

from verigrad import batch as b
from verigrad.cli import main

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")


def _spec(tmp_path: Path, name: str, threshold: float, end: int = 2) -> Path:
    d = {"model": {"path": FC}, "data": {"dataset": "mnist_sample", "start": 0, "end": end},
         "perturbation": {"input": {"epsilon": 0.001}},
         "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": threshold}],
         "bounds": {"methods": ["ibp"]}, "attack": {"order": "after", "steps": 5, "restarts": 1},
         "general": {"results": str(tmp_path / "res")}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _run(*args):
    return CliRunner().invoke(main, ["batch", *map(str, args)])


def test_batch_runs_streams_and_reports(tmp_path):
    ok, bad = _spec(tmp_path, "ok", 1000.0), _spec(tmp_path, "bad", 1e-9)
    out = tmp_path / "out"
    r = _run(ok, bad, "--jobs", 2, "--timeout", 120, "--out", out)
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
        assert CliRunner().invoke(main, ["replay", w]).exit_code == 0
    # the same verdicts as a plain verify of the same spec
    v = CliRunner().invoke(main, ["verify", str(ok)])
    assert v.exit_code == 0


def test_timeout_is_unknown_not_a_crash(tmp_path):
    out = tmp_path / "out"
    r = _run(_spec(tmp_path, "slow", 1000.0), "--timeout", 0.05, "--out", out, "--unknown-as", "failure")
    assert r.exit_code == 3, r.output
    recs = b.load_records(out)
    assert len(recs) == 2 and all(x["status"] == "timeout" and "timeout" in x["reason"] for x in recs)
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("failures") == "2"


def test_resume_skips_what_is_done_and_reruns_cut_lines(tmp_path):
    spec = _spec(tmp_path, "ok", 1000.0, end=3)
    out = tmp_path / "out"
    assert _run(spec, "--out", out, "--jobs", 2).exit_code == 0
    path = out / "results.jsonl"
    first = path.read_text().splitlines()
    # a batch killed while writing: one complete line, one cut in half
    path.write_text(first[0] + "\n" + first[1][: len(first[1]) // 2] + "\n")
    tasks = b.expand([spec])
    rerun = b.run_batch(tasks, out, jobs=2, resume=True)
    done_before = json.loads(first[0])["data_index"]
    assert sorted(x["data_index"] for x in rerun) == sorted({0, 1, 2} - {done_before})
    assert len(b.load_records(out)) == 3
    assert b.run_batch(tasks, out, resume=True) == []  # nothing left to do


def test_bad_spec_is_bad_input(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model: {path: nope.onnx}\n")
    assert _run(p, "--out", tmp_path / "o").exit_code == 2
