"""``verigrad batch``: many specs, their inputs verified by a pool of workers (local
processes, or a Dask cluster) with a wall-clock timeout per input, results streamed to a
JSON-lines file so nothing finished is lost.

An instance is one input of one spec: every property and engine of the spec runs on it
(the engines share the input's forward pass, the attacks its box; splitting them further
would repeat both). Instances of one spec travel to a worker in *units* of consecutive
inputs, so that engines that batch (IBP) run once per unit and fast instances do not pay a
round trip each; ``batch_size=None`` sizes units from the time the spec's finished
instances took (about ``UNIT_SECONDS`` per unit, one input at first).

Each line of ``results.jsonl`` is one finished instance:
``{spec, spec_sha256, data_index, status, reason, seconds, result}``, ``status`` one of ``done``,
``timeout``, ``error``; ``result`` is the instance object of docs/results-schema.md (null
unless done) plus ``bounds_npz``, the path of its bound maps. Workers return files as bytes
and the driver writes them, then the line: a remote worker needs no access to ``out``, and
a line is never written before its files. ``resume`` skips instances whose (spec hash,
index) already has a line. A unit gets ``timeout`` seconds per input; a unit that runs out
is killed with its worker and, if it held several inputs, split and re-run one input at a
time, so a timeout is charged to one input only. A crashed worker makes its unit's inputs
``error`` and the batch goes on. ``summary.json`` and a JUnit XML (one test case per
instance × property) follow.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence
from xml.sax.saxutils import escape

from verigrad.data import load_dataset
from verigrad.errors import UserError
from verigrad.spec import load_spec

UNIT_SECONDS = 0.5  # target wall time of an auto-sized unit
MAX_UNIT = 32  # at most this many inputs per auto-sized unit


class BackendError(UserError):
    """The backend cannot start (a missing package, an unreachable scheduler)."""


class Backend(str, Enum):
    """Where instances run: ``local`` worker processes, or a ``dask`` cluster (a loopback
    LocalCluster, or an existing scheduler's address)."""

    LOCAL = "local"
    DASK = "dask"


class UnknownAs(str, Enum):
    """How an unknown verdict appears in the JUnit XML."""

    SKIPPED = "skipped"
    FAILURE = "failure"


@dataclass(frozen=True)
class BatchDefaults:
    """The defaults of a batch run, declared once: :func:`run_batch`, :func:`junit_xml` and
    the ``verigrad batch`` flags read them from here."""

    jobs: int = 1
    threads: int = 1  # torch threads per worker
    backend: Backend = Backend.LOCAL
    unknown_as: UnknownAs = UnknownAs.SKIPPED
    out: str = "results/batch"


DEFAULTS = BatchDefaults()


@dataclass(frozen=True)
class Task:
    spec_path: str
    spec_sha256: str
    index: int  # into the loaded data (0 = data.start)
    data_index: int  # the data set's index, as results report it


@dataclass(frozen=True)
class Outcome:
    """One instance as a worker returns it: ``files`` maps paths relative to the output
    directory to their bytes; ``result`` names them by those relative paths."""

    status: str  # done | error
    reason: str | None
    seconds: float
    result: dict | None
    files: dict[str, bytes] = field(default_factory=dict)


def expand(spec_paths: Sequence[str | Path], max_inputs: int | None = None) -> list[Task]:
    """One task per input of every spec, or of its first ``max_inputs`` (bad specs raise
    SpecError here, before any work)."""
    tasks = []
    for p in spec_paths:
        spec = load_spec(p)
        d = spec.data
        x, _ = load_dataset(d.dataset.value if d.dataset is not None else None, d.path, d.start, d.end)
        h = spec.hash()
        n = len(x) if max_inputs is None else min(len(x), max_inputs)
        tasks += [Task(str(Path(p).resolve()), h, i, d.start + i) for i in range(n)]
    return tasks


def _error_text(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()


def run_unit(tasks: Sequence[Task], problems: dict) -> list[Outcome]:
    """Verify inputs of one spec together (in a worker). ``problems`` caches the loaded spec
    (model, data, boxes) across calls; a spec that fails to load fails each of its inputs."""
    import io

    import numpy as np

    from verigrad.reports import npz_arrays, witness_files
    from verigrad.verify import prepare, verify_many

    first = tasks[0]
    key = (first.spec_path, first.spec_sha256)
    start = time.perf_counter()
    try:
        if key not in problems:
            problems[key] = prepare(load_spec(first.spec_path))
        problem = problems[key]
    except Exception as e:  # noqa: BLE001 - every input of the unit reports it; the batch goes on
        return [Outcome("error", _error_text(e), time.perf_counter() - start, None) for _ in tasks]
    # two specs may share a file name (a/spec.yaml, b/spec.yaml), and an edited spec is another
    # spec: its hash keeps their files apart
    stem = f"{Path(first.spec_path).stem}-{first.spec_sha256[:8]}"
    out = []
    for r, seconds in verify_many(problem, [t.index for t in tasks]):
        doc = r.to_dict()
        files = {}
        for a in doc["attacks"].values():
            a["witness"] = None
        for prop, (name, data) in witness_files(problem, r).items():
            files[f"witnesses/{stem}/{name}"] = data
            doc["attacks"][prop]["witness"] = f"witnesses/{stem}/{name}"
        arrays = npz_arrays([r])
        if arrays:  # the bound maps, as verify writes them (keys i{index}/{engine}/lower|upper)
            buf = io.BytesIO()
            # allow_pickle spelled out (numpy's default): the array names can then never be taken for it
            np.savez_compressed(buf, allow_pickle=True, **arrays)
            rel = f"bounds/{stem}/i{r.index}.npz"
            files[rel] = buf.getvalue()
            doc["bounds_npz"] = rel
        out.append(Outcome("done", None, seconds, doc, files))
    return out


# ---------------------------------------------------------------------------------------
# Backends: submit units, wait for any to finish, kill one that overran


class _Pool(Protocol):
    capacity: int

    def submit(self, unit: Sequence[Task]) -> Any: ...

    def wait(self, seconds: float) -> list[tuple[Any, list[Outcome] | str]]:
        """Finished units: (handle, outcomes) or (handle, why the unit failed as a whole)."""
        ...

    def kill(self, handle: Any) -> None: ...

    def close(self) -> None: ...


def _serve(threads: int, conn) -> None:
    """Local worker process: run units received on ``conn`` until it gets None. Starting
    Python and torch costs more than most instances, so a worker lives for the whole batch
    unless a timeout kills it."""
    import torch

    torch.set_num_threads(threads)
    problems: dict = {}
    while True:
        unit = conn.recv()
        if unit is None:
            break
        try:
            conn.send(run_unit(unit, problems))
        except Exception as e:  # noqa: BLE001 - reported for the unit's inputs, the batch goes on
            conn.send(_error_text(e))
    conn.close()


@dataclass
class _Proc:
    proc: Any
    conn: Any
    busy: bool = False


class LocalPool:
    """``jobs`` spawned worker processes (a clean interpreter each: no inherited torch
    threads or locks), one unit at a time per process, answered over a pipe."""

    def __init__(self, jobs: int, threads: int = DEFAULTS.threads) -> None:
        self._ctx = mp.get_context("spawn")
        self._threads = threads
        self._procs = [self._spawn() for _ in range(jobs)]
        self.capacity = jobs

    def _spawn(self) -> _Proc:
        here, there = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(self._threads, there), daemon=True)
        proc.start()
        there.close()
        return _Proc(proc, here)

    def submit(self, unit: Sequence[Task]) -> int:
        k = next(k for k, p in enumerate(self._procs) if not p.busy)
        self._procs[k].busy = True
        self._procs[k].conn.send(list(unit))
        return k

    def wait(self, seconds: float) -> list[tuple[int, list[Outcome] | str]]:
        busy = {k: p for k, p in enumerate(self._procs) if p.busy}
        ready = set(mpc.wait([p.conn for p in busy.values()] + [p.proc.sentinel for p in busy.values()], seconds))
        done = []
        for k, p in busy.items():
            if p.conn in ready or p.proc.sentinel in ready:
                try:
                    answer = p.conn.recv() if p.conn.poll() else None
                except EOFError:
                    answer = None
                if answer is None:  # the process died before answering
                    p.proc.join()
                    answer = f"worker exited with code {p.proc.exitcode} before returning a result"
                    self._procs[k] = self._spawn()
                else:
                    p.busy = False
                done.append((k, answer))
        return done

    def kill(self, handle: int) -> None:
        p = self._procs[handle]
        p.proc.kill()
        p.proc.join()
        self._procs[handle] = self._spawn()

    def close(self) -> None:
        for p in self._procs:
            try:
                p.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self._procs:
            p.proc.join(10)
            if p.proc.is_alive():
                p.proc.kill()


def _dask_unit(unit: Sequence[Task], threads: int) -> list[Outcome]:
    """A unit on a Dask worker; the loaded specs are cached on the worker object, the way a
    local worker keeps them for the whole batch."""
    import torch
    from distributed import get_worker

    torch.set_num_threads(threads)
    worker = get_worker()
    # the cache lives in the worker object's own attributes (Worker declares no such field)
    problems: dict = vars(worker).setdefault("verigrad_problems", {})
    return run_unit(unit, problems)


class DaskPool:
    """Units as Dask futures. Without ``scheduler`` a LocalCluster of ``jobs`` single-threaded
    worker processes is started on 127.0.0.1 (no dashboard, nothing leaves the machine); with
    one (``tcp://host:8786``) its workers are used, and they must see the specs, models and
    data at the same paths (results come back to this process, which writes them). A unit
    that overruns is cancelled and its worker restarted (through its nanny) to stop it."""

    def __init__(self, jobs: int, threads: int = DEFAULTS.threads, scheduler: str | None = None) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise BackendError("backend dask needs the 'distributed' package: pip install 'verigrad[dask]'") from None
        self._threads = threads
        self._cluster = None
        if scheduler is None:
            self._cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, host="127.0.0.1",
                                         dashboard_address=None, silence_logs=logging.ERROR)
            self._client = Client(self._cluster)
        else:
            try:
                self._client = Client(scheduler, timeout=10)
            except (OSError, TimeoutError, ValueError) as e:
                raise BackendError(f"cannot reach the Dask scheduler at {scheduler!r}: {e}") from None
        self.capacity = max(1, sum(self._client.nthreads().values()))
        self._futures: dict[Any, Any] = {}

    def submit(self, unit: Sequence[Task]) -> Any:
        fut = self._client.submit(_dask_unit, list(unit), self._threads, pure=False)
        self._futures[fut.key] = fut
        return fut.key

    def wait(self, seconds: float) -> list[tuple[Any, list[Outcome] | str]]:
        from distributed import wait

        if not self._futures:
            time.sleep(seconds)
            return []
        try:
            wait(list(self._futures.values()), timeout=seconds, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return []
        done = []
        for key, fut in list(self._futures.items()):
            if fut.done():
                del self._futures[key]
                try:
                    done.append((key, fut.result()))
                except Exception as e:  # noqa: BLE001 - e.g. KilledWorker: the unit fails, the batch goes on
                    done.append((key, _error_text(e)))
        return done

    def kill(self, handle: Any) -> None:
        fut = self._futures.pop(handle, None)
        if fut is None:
            return
        where = [w for w, keys in self._client.processing().items() if handle in keys]
        fut.cancel()
        if where:
            self._client.restart_workers(where)

    def addresses(self) -> list[str]:
        """The scheduler's and the workers' addresses (a test checks they are loopback)."""
        return [self._client.scheduler.address, *self._client.nthreads()]

    def close(self) -> None:
        self._client.close()
        if self._cluster is not None:
            self._cluster.close()


def make_pool(backend: Backend | str, jobs: int, threads: int = DEFAULTS.threads, scheduler: str | None = None) -> _Pool:
    b = Backend(backend)
    if b == Backend.DASK:
        return DaskPool(jobs, threads, scheduler)
    if scheduler is not None:
        raise BackendError("a scheduler address applies to the dask backend only")
    return LocalPool(jobs, threads)


# ---------------------------------------------------------------------------------------
# The driver


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


def _drop_cut_tail(path: Path) -> None:
    """A kill while a line was being written leaves it without its newline; appending would
    glue the next record to it and lose both. Cut the file back to its last full line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class _Planner:
    """Orders the tasks (the first input of every spec, then the rest in order) and cuts them
    into units of consecutive inputs of one spec: ``size`` inputs each, or
    (``size=None``) as many as fill ``UNIT_SECONDS`` at the spec's mean time per instance so
    far, never more than a fair share of what is left of the spec for ``workers`` workers.
    Inputs split off a timed-out unit run alone."""

    def __init__(self, tasks: Sequence[Task], size: int | None, workers: int) -> None:
        # one input of every spec first: each spec's time is measured early (unit sizes and the
        # ETA depend on it) and a spec that cannot run shows up at once, not at the end
        seen: set[tuple[str, str]] = set()
        firsts: list[Task] = []
        rest: list[Task] = []
        for t in tasks:
            key = (t.spec_path, t.spec_sha256)
            (rest if key in seen else firsts).append(t)
            seen.add(key)
        self._queue: deque[tuple[Task, bool]] = deque((t, False) for t in firsts + rest)
        self._size, self._workers = size, workers
        self._seconds: dict[str, list[float]] = {}  # spec hash → [total seconds, instances]
        self._left = Counter(t.spec_sha256 for t in tasks)  # not yet finished, per spec

    def __bool__(self) -> bool:
        return bool(self._queue)

    def record(self, task: Task, seconds: float) -> None:
        """``task`` finished (done, failed or timed out) after ``seconds``."""
        s = self._seconds.setdefault(task.spec_sha256, [0.0, 0.0])
        s[0] += seconds
        s[1] += 1
        self._left[task.spec_sha256] -= 1

    def eta(self) -> float:
        """Seconds left: each unfinished input at its spec's mean time so far (the overall mean
        for a spec not yet timed), spread over the workers. Instances of different specs differ
        by orders of magnitude, so one mean over all of them would mislead."""
        total = sum(t for t, _ in self._seconds.values())
        n = sum(k for _, k in self._seconds.values())
        overall = total / n if n else 0.0
        left = 0.0
        for spec, k in self._left.items():
            t, m = self._seconds.get(spec, (0.0, 0.0))
            left += k * (t / m if m else overall)
        return left / max(self._workers, 1)

    def alone(self, tasks: Sequence[Task]) -> None:
        self._queue.extendleft((t, True) for t in reversed(tasks))

    def _wanted(self, spec: str, left: int) -> int:
        if self._size is not None:
            return self._size
        total, n = self._seconds.get(spec, (0.0, 0.0))
        if n == 0:
            return 1
        fill = int(UNIT_SECONDS / max(total / n, 1e-6))
        return max(1, min(fill, MAX_UNIT, math.ceil(left / self._workers)))

    def next_unit(self) -> list[Task]:
        task, alone = self._queue.popleft()
        unit = [task]
        if alone:
            return unit
        left = 1 + sum(1 for t, _ in self._queue if t.spec_sha256 == task.spec_sha256)
        want = self._wanted(task.spec_sha256, left)
        while len(unit) < want and self._queue:
            t, a = self._queue[0]
            if a or t.spec_path != task.spec_path or t.spec_sha256 != task.spec_sha256:
                break
            unit.append(self._queue.popleft()[0])
        return unit


@dataclass(frozen=True)
class Progress:
    """Where a batch stands after a finished instance (``eta_s``: :meth:`_Planner.eta`)."""

    done: int
    total: int
    eta_s: float


def run_batch(tasks: Sequence[Task], out: Path, jobs: int = DEFAULTS.jobs, timeout: float | None = None,
              resume: bool = False, threads: int = DEFAULTS.threads,
              on_result: Callable[[dict, Progress], None] | None = None,
              backend: Backend | str = DEFAULTS.backend, batch_size: int | None = None,
              scheduler: str | None = None, pool: _Pool | None = None) -> list[dict]:
    """Run ``tasks`` on ``jobs`` workers of ``backend``; append each finished instance to
    ``out/results.jsonl`` as it finishes (its files first). Returns this run's records
    (with ``resume``, nothing for the skipped ones: they are already in the file).
    ``batch_size``: inputs per unit (None: sized from measured times). ``on_result(record,
    progress)`` is called after each line is written. ``pool`` replaces the backend's
    (any object with ``capacity``, ``submit``, ``wait``, ``kill``, ``close``)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = out / "results.jsonl"
    if not resume and lines.exists():
        lines.unlink()
    if resume:
        _drop_cut_tail(lines)
    skip = _done_keys(lines) if resume else set()
    todo = [t for t in tasks if (t.spec_sha256, t.data_index) not in skip]
    records: list[dict] = []
    if not todo:
        return records
    if pool is None:
        pool = make_pool(backend, min(jobs, len(todo)), threads, scheduler)
    plan = _Planner(todo, batch_size, pool.capacity)
    running: dict[Any, tuple[list[Task], float, float]] = {}  # handle → (unit, start, deadline)
    with lines.open("a") as f:

        def finish(t: Task, status: str, reason: str | None, seconds: float, result: dict | None,
                   files: dict[str, bytes] | None = None) -> None:
            for rel, data in (files or {}).items():
                path = out / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            if result is not None:  # name the files by their paths as seen from here
                if result.get("bounds_npz"):
                    result["bounds_npz"] = str(out / result["bounds_npz"])
                for a in result.get("attacks", {}).values():
                    if a.get("witness"):
                        a["witness"] = str(out / a["witness"])
            record = {"spec": t.spec_path, "spec_sha256": t.spec_sha256, "data_index": t.data_index,
                      "status": status, "reason": reason, "seconds": seconds, "result": result}
            f.write(json.dumps(record) + "\n")
            f.flush()
            records.append(record)
            plan.record(t, seconds)
            if on_result is not None:
                on_result(record, Progress(len(records), len(todo), plan.eta()))

        try:
            while plan or running:
                while plan and len(running) < pool.capacity:
                    unit = plan.next_unit()
                    allowed = math.inf if timeout is None else timeout * len(unit)
                    now = time.monotonic()
                    running[pool.submit(unit)] = (unit, now, now + allowed)
                for handle, answer in pool.wait(0.05):
                    unit, began, _ = running.pop(handle)
                    if isinstance(answer, str):
                        for t in unit:
                            finish(t, "error", answer, (time.monotonic() - began) / len(unit), None)
                        continue
                    for t, o in zip(unit, answer, strict=True):  # run_unit: one outcome per task
                        finish(t, o.status, o.reason, o.seconds, o.result, o.files)
                now = time.monotonic()
                for handle, (unit, _, deadline) in list(running.items()):
                    if now > deadline:
                        pool.kill(handle)
                        del running[handle]
                        if len(unit) > 1:
                            plan.alone(unit)  # find the slow input: each alone, with its own timeout
                        else:
                            finish(unit[0], "timeout", f"timeout after {timeout:g} s", float(timeout or 0), None)
        finally:
            pool.close()
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


def instance_verdicts(status: str, result: dict | None, names: Sequence[str]) -> dict[str, str]:
    """property → certified / falsified / unknown / error for one instance: its verdicts when
    it ran, unknown for every property when it timed out, error when it crashed or failed."""
    if status == "done" and result is not None and result.get("error") is None:
        verdicts = result.get("verdicts") or {}
        return {n: str(verdicts.get(n, "unknown")) for n in names}
    v = "unknown" if status == "timeout" else "error"
    return {n: v for n in names}


def _property_names(spec_path: str) -> list[str]:
    names = []
    for p in load_spec(spec_path).properties:
        assert p.name is not None  # load_spec fills default names
        names.append(p.name)
    return names


def verdict_rows(records: Sequence[dict]) -> list[tuple[dict, str, str]]:
    """(record, property, verdict) per record and property (:func:`instance_verdicts`); the
    property names of an instance without verdicts come from its spec (read once per spec)."""
    rows = []
    names_of: dict[str, list[str]] = {}
    for rec in records:
        names = list((rec["result"] or {}).get("verdicts") or {})
        if not names:
            if rec["spec"] not in names_of:
                names_of[rec["spec"]] = _property_names(rec["spec"])
            names = names_of[rec["spec"]]
        rows += [(rec, n, v) for n, v in instance_verdicts(rec["status"], rec["result"], names).items()]
    return rows


def summary(records: Sequence[dict]) -> dict:
    from verigrad.reports import exit_code_for_counts

    rows = verdict_rows(records)
    counts = {v: sum(r[2] == v for r in rows) for v in ("certified", "falsified", "unknown", "error")}
    return {"instances": len(records), "timeouts": sum(r["status"] == "timeout" for r in records),
            "errors": sum(r["status"] == "error" or (r["result"] or {}).get("error") is not None for r in records),
            "verdicts": counts, "exit_code": int(exit_code_for_counts(counts))}


def junit_xml(records: Sequence[dict], unknown_as: UnknownAs | str = DEFAULTS.unknown_as) -> str:
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
        elif v == "unknown" and UnknownAs(unknown_as) == UnknownAs.SKIPPED:
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


__all__ = ["Backend", "BackendError", "DaskPool", "LocalPool", "Outcome", "Progress", "Task", "expand", "instance_verdicts", "make_pool", "run_batch", "run_unit", "load_records", "summary", "junit_xml", "verdict_rows"]
