"""``verigrad batch``: many specs, one instance (input) at a time, in a pool of worker
processes with a wall-clock timeout per instance, results streamed to a JSON-lines file so
nothing finished is lost.

An instance is one input of one spec: every property and engine of the spec runs on it in
the worker (the engines share the input's forward pass; splitting them further would repeat
it). Each line of ``results.jsonl`` is one finished instance:
``{spec, spec_sha256, data_index, status, reason, seconds, result}``, ``status`` one of ``done``,
``timeout``, ``error``; ``result`` is the instance object of docs/results-schema.md (null
unless done). ``resume`` skips instances whose (spec hash, index) already has a line.
A timed-out or crashed worker makes its instance ``unknown`` (with the reason) and the batch
goes on. ``summary.json`` and a JUnit XML (one test case per instance × property) follow.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from xml.sax.saxutils import escape

from verigrad.data import load_dataset
from verigrad.spec import load_spec


@dataclass(frozen=True)
class Task:
    spec_path: str
    spec_sha256: str
    index: int  # into the loaded data (0 = data.start)
    data_index: int  # the data set's index, as results report it


def expand(spec_paths: Sequence[str | Path]) -> list[Task]:
    """One task per input of every spec (bad specs raise SpecError here, before any work)."""
    tasks = []
    for p in spec_paths:
        spec = load_spec(p)
        d = spec.data
        x, _ = load_dataset(d.dataset.value if d.dataset is not None else None, d.path, d.start, d.end)
        h = spec.hash()
        tasks += [Task(str(Path(p).resolve()), h, i, d.start + i) for i in range(len(x))]
    return tasks


def _one(task: Task, problems: dict, witness_dir: str) -> dict:
    """Verify one instance (the spec's Problem is loaded once per worker and reused)."""
    import numpy as np

    from verigrad.reports import npz_arrays, save_instance_witnesses
    from verigrad.verify import prepare, verify_instance

    key = (task.spec_path, task.spec_sha256)
    if key not in problems:
        problems[key] = prepare(load_spec(task.spec_path))
    problem = problems[key]
    r = verify_instance(problem, task.index)
    doc = r.to_dict()
    stem = Path(task.spec_path).stem
    paths = save_instance_witnesses(problem, r, Path(witness_dir) / stem)
    for name, a in doc["attacks"].items():
        a["witness"] = paths.get(name)
    arrays = npz_arrays([r])
    if arrays:  # the bound maps, as verify writes them (keys i{index}/{engine}/lower|upper)
        maps = Path(witness_dir).parent / "bounds" / stem / f"i{r.index}.npz"
        maps.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(maps, **arrays)
        doc["bounds_npz"] = str(maps)
    return doc


def _serve(threads: int, witness_dir: str, conn) -> None:
    """Worker process: verify tasks received on ``conn`` until it gets None, answering each
    with (status, reason, result). Starting Python and torch costs more than most instances,
    so a worker lives for the whole batch unless a timeout kills it."""
    import torch

    torch.set_num_threads(threads)
    problems: dict = {}
    while True:
        task = conn.recv()
        if task is None:
            break
        try:
            conn.send(("done", None, _one(task, problems, witness_dir)))
        except Exception as e:  # noqa: BLE001 - reported as the instance's error, the batch goes on
            conn.send(("error", "".join(traceback.format_exception_only(type(e), e)).strip(), None))
    conn.close()


@dataclass
class _Worker:
    proc: mp.Process
    conn: object
    task: Task | None = None
    start: float = 0.0


def _done_keys(path: Path) -> set[tuple[str, int]]:
    keys = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                keys.add((rec["spec_sha256"], rec["data_index"]))
            except (ValueError, KeyError):
                continue  # a line cut off by a kill: that instance runs again
    return keys


def run_batch(tasks: Sequence[Task], out: Path, jobs: int = 1, timeout: float | None = None, resume: bool = False,
              threads: int = 1, on_result: Callable[[dict, int, int], None] | None = None) -> list[dict]:
    """Run ``tasks`` with at most ``jobs`` worker processes; append each finished instance to
    ``out/results.jsonl`` as it finishes. Returns this run's records (plus, with ``resume``,
    nothing for the skipped ones: they are already in the file)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = out / "results.jsonl"
    if not resume and lines.exists():
        lines.unlink()
    skip = _done_keys(lines) if resume else set()
    todo = [t for t in tasks if (t.spec_sha256, t.data_index) not in skip]
    ctx = mp.get_context("spawn")  # a clean interpreter: no inherited torch threads or locks
    witness_dir = str(out / "witnesses")

    def spawn() -> _Worker:
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(threads, witness_dir, there), daemon=True)
        proc.start()
        there.close()
        return _Worker(proc, here)

    records: list[dict] = []
    queue = list(todo)
    workers = [spawn() for _ in range(min(jobs, len(queue)))]
    with lines.open("a") as f:

        def finish(w: _Worker, status: str, reason: str | None, result: dict | None) -> None:
            t = w.task
            assert t is not None
            record = {"spec": t.spec_path, "spec_sha256": t.spec_sha256, "data_index": t.data_index,
                      "status": status, "reason": reason, "seconds": time.monotonic() - w.start, "result": result}
            f.write(json.dumps(record) + "\n")
            f.flush()
            records.append(record)
            w.task = None
            if on_result is not None:
                on_result(record, len(records), len(todo))

        while queue or any(w.task is not None for w in workers):
            for w in workers:
                if w.task is None and queue:
                    w.task, w.start = queue.pop(0), time.monotonic()
                    w.conn.send(w.task)
            time.sleep(0.02)
            for k, w in enumerate(workers):
                if w.task is None:
                    continue
                if w.conn.poll():
                    try:
                        status, reason, result = w.conn.recv()
                    except EOFError:
                        status, reason, result = "error", "worker exited without a result", None
                    finish(w, status, reason, result)
                elif not w.proc.is_alive():
                    finish(w, "error", f"worker exited with code {w.proc.exitcode}", None)
                    workers[k] = spawn()
                elif timeout is not None and time.monotonic() - w.start > timeout:
                    w.proc.kill()
                    w.proc.join()
                    finish(w, "timeout", f"timeout after {timeout:g} s", None)
                    workers[k] = spawn()
        for w in workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(10)
            if w.proc.is_alive():
                w.proc.kill()
    return records


def load_records(out: Path) -> list[dict]:
    """Every complete line of ``out/results.jsonl`` (the last one per instance)."""
    by: dict[tuple[str, int], dict] = {}
    path = out / "results.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        by[(rec["spec_sha256"], rec["data_index"])] = rec
    return list(by.values())


def verdict_rows(records: Sequence[dict]) -> list[tuple[dict, str, str]]:
    """(record, property, verdict) with verdict certified / falsified / unknown / error;
    a timed-out instance is unknown for each property of its spec."""
    rows = []
    names_of: dict[str, list[str]] = {}  # spec path → property names (read once per spec)
    for rec in records:
        if rec["status"] == "done" and rec["result"]["error"] is None:
            for name, v in rec["result"]["verdicts"].items():
                rows.append((rec, name, v))
        else:
            if rec["spec"] not in names_of:
                names_of[rec["spec"]] = [p.name for p in load_spec(rec["spec"]).properties]
            names = names_of[rec["spec"]]
            verdict = "unknown" if rec["status"] == "timeout" else "error"
            rows += [(rec, n, verdict) for n in names]
    return rows


def summary(records: Sequence[dict]) -> dict:
    rows = verdict_rows(records)
    counts = {v: sum(r[2] == v for r in rows) for v in ("certified", "falsified", "unknown", "error")}
    code = 4 if counts["error"] else 1 if counts["falsified"] else 3 if counts["unknown"] else 0
    return {"instances": len(records), "timeouts": sum(r["status"] == "timeout" for r in records),
            "errors": sum(r["status"] == "error" or (r["result"] or {}).get("error") is not None for r in records),
            "verdicts": counts, "exit_code": code}


def junit_xml(records: Sequence[dict], unknown_as: str = "skipped") -> str:
    """One test case per instance × property: certified passes, falsified fails (with the
    witness path), unknown is skipped (or a failure with ``unknown_as='failure'``), errors
    and crashes are errors."""
    rows = verdict_rows(records)
    cases = []
    for rec, name, v in rows:
        cls = escape(Path(rec["spec"]).stem)
        attrs = f'classname="{cls}" name="input{rec["data_index"]}.{escape(name)}" time="{rec["seconds"]:.3f}"'
        if v == "certified":
            cases.append(f"<testcase {attrs}/>")
        elif v == "falsified":
            w = ((rec["result"].get("attacks") or {}).get(name) or {}).get("witness")
            cases.append(f'<testcase {attrs}><failure message="falsified">witness: {escape(str(w))}</failure></testcase>')
        elif v == "unknown" and unknown_as == "skipped":
            reason = rec["reason"] or "neither certified nor falsified"
            cases.append(f'<testcase {attrs}><skipped message="{escape(reason)}"/></testcase>')
        elif v == "unknown":
            cases.append(f'<testcase {attrs}><failure message="unknown">{escape(rec["reason"] or "")}</failure></testcase>')
        else:
            err = rec["reason"] or (rec["result"] or {}).get("error") or ""
            cases.append(f'<testcase {attrs}><error message="error">{escape(err)}</error></testcase>')
    failures = sum("<failure" in c for c in cases)
    errors = sum("<error" in c for c in cases)
    skipped = sum("<skipped" in c for c in cases)
    body = "\n  ".join(cases)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="verigrad" tests="{len(cases)}" '
            f'failures="{failures}" errors="{errors}" skipped="{skipped}">\n  {body}\n</testsuite>\n')


__all__ = ["Task", "expand", "run_batch", "load_records", "summary", "junit_xml", "verdict_rows"]
