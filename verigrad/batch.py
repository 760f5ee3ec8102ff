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
index) last line is a complete result (certified / falsified / unknown verdicts) and re-runs
those that ended in ``error`` or ``timeout``; without ``resume`` a directory that already
holds results is refused unless ``overwrite`` discards them. One batch at a time writes to
``out``: it holds ``out/.lock`` (an ``flock``, with the holder's pid, host and start time).
A unit gets ``timeout`` seconds per input, counted from when a worker starts it (its spec
loaded), not from its submission: worker start-up is not charged to the inputs. A unit that
runs out is killed with its worker and, if it held several inputs, split and re-run one input
at a time, so a timeout is charged to one input only. A crashed (or killed) worker makes its
unit's inputs ``error`` and the batch goes on. SIGTERM stops the workers and leaves ``out``
resumable; a failed write (disk full) is a :class:`~verigrad.errors.UserError` naming the
file, with everything finished before kept. ``summary.json`` and a JUnit XML (one test case
per instance × property) follow.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import re
import signal
import socket
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Protocol, Sequence

from verigrad.data import load_dataset
from verigrad.errors import OutputError, UserError
from verigrad.spec import load_spec

UNIT_SECONDS = 0.5  # target wall time of an auto-sized unit
MAX_UNIT = 32  # at most this many inputs per auto-sized unit
START_SECONDS = 600.0  # with a timeout: a unit no worker has started this long after submission fails

log = logging.getLogger(__name__)


class BackendError(UserError):
    """The backend cannot start (a missing package, an unreachable scheduler)."""


class OutputLocked(OutputError):
    """Another batch holds the output directory's lock; names the holder."""


class Terminated(KeyboardInterrupt):
    """The driver got SIGTERM: the workers were stopped, what finished is kept (resume)."""


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
        if spec.vnnlib is not None:  # the VNN-LIB box's centre is the one input
            count = 1
        else:
            count = len(load_dataset(d.dataset.value if d.dataset is not None else None, d.path, d.start, d.end,
                                     require_labels=False)[0])
        h = spec.hash()
        n = count if max_inputs is None else min(count, max_inputs)
        tasks += [Task(str(Path(p).resolve()), h, i, d.start + i) for i in range(n)]
    return tasks


def _error_text(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()


def run_unit(tasks: Sequence[Task], problems: dict, on_start: Callable[[], None] | None = None) -> list[Outcome]:
    """Verify inputs of one spec together (in a worker). ``problems`` caches the loaded spec
    (model, data, boxes) across calls; a spec that fails to load fails each of its inputs.
    ``on_start()`` is called once the spec is loaded, when the inputs start (the driver's
    timeout counts from there)."""
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
    if on_start is not None:
        on_start()
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
    """What :func:`run_batch` needs of a backend. A pool may also have ``started(handle)``:
    the ``time.monotonic()`` at which a worker started the unit (None while it has not), from
    which the unit's timeout counts (without it: from submission); and ``terminate()``: stop
    at once (SIGTERM, a failed write), not after the running units."""

    capacity: int

    def submit(self, unit: Sequence[Task]) -> Any: ...

    def wait(self, seconds: float) -> list[tuple[Any, list[Outcome] | str]]:
        """Finished units: (handle, outcomes) or (handle, why the unit failed as a whole)."""
        ...

    def kill(self, handle: Any) -> None: ...

    def close(self) -> None: ...


_STARTED = ("started",)  # a local worker's message: the unit's spec is loaded, its inputs start


def _serve(threads: int, conn) -> None:
    """Local worker process: run units received on ``conn`` until it gets None. Starting
    Python and torch costs more than most instances, so a worker lives for the whole batch
    unless a timeout kills it. Ctrl-C (sent to the whole process group) is the driver's to
    handle: it stops the workers; a driver gone away ends the worker without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        torch.set_num_threads(threads)
        problems: dict = {}
        while True:
            unit = conn.recv()
            if unit is None:
                break
            try:
                answer: list[Outcome] | str = run_unit(unit, problems, on_start=lambda: conn.send(_STARTED))
            except Exception as e:  # noqa: BLE001 - reported for the unit's inputs, the batch goes on
                answer = _error_text(e)
            conn.send(answer)
    except (EOFError, OSError):  # the driver is gone (killed, or it stopped us): nobody to answer
        pass
    finally:
        with contextlib.suppress(OSError):
            conn.close()


@dataclass
class _Proc:
    proc: Any
    conn: Any
    busy: bool = False
    started: float | None = None  # monotonic time the running unit started (its "started" message)


class LocalPool:
    """``jobs`` spawned worker processes (a clean interpreter each: no inherited torch
    threads or locks), one unit at a time per process, answered over a pipe. A worker
    reports when it starts a unit (``started``); one that dies (killed, out of memory) fails
    its unit and is replaced."""

    _target: Callable[..., None] = staticmethod(_serve)  # the worker's main loop

    def __init__(self, jobs: int, threads: int = DEFAULTS.threads) -> None:
        self._ctx = mp.get_context("spawn")
        self._threads = threads
        self._procs = [self._spawn() for _ in range(jobs)]
        self.capacity = jobs

    def _spawn(self) -> _Proc:
        here, there = self._ctx.Pipe()
        proc = self._ctx.Process(target=type(self)._target, args=(self._threads, there), daemon=True)
        proc.start()
        there.close()
        return _Proc(proc, here)

    def _replace(self, k: int) -> None:
        p = self._procs[k]
        if p.proc.is_alive():
            p.proc.kill()
        p.proc.join()
        with contextlib.suppress(OSError):
            p.conn.close()
        self._procs[k] = self._spawn()

    def pids(self) -> list[int]:
        """The worker processes' ids, by handle (the slot a unit runs in)."""
        return [p.proc.pid for p in self._procs]

    def submit(self, unit: Sequence[Task]) -> int:
        k = next(k for k, p in enumerate(self._procs) if not p.busy)
        try:
            self._procs[k].conn.send(list(unit))
        except OSError:  # the idle worker died (killed from outside): a fresh one takes the unit
            self._replace(k)
            self._procs[k].conn.send(list(unit))
        self._procs[k].busy, self._procs[k].started = True, None
        return k

    def started(self, handle: int) -> float | None:
        return self._procs[handle].started

    def wait(self, seconds: float) -> list[tuple[int, list[Outcome] | str]]:
        busy = {k: p for k, p in enumerate(self._procs) if p.busy}
        ready = set(mpc.wait([p.conn for p in busy.values()] + [p.proc.sentinel for p in busy.values()], seconds))
        done: list[tuple[int, list[Outcome] | str]] = []
        for k, p in busy.items():
            if p.conn not in ready and p.proc.sentinel not in ready:
                continue
            answer: list[Outcome] | str | None = None
            dead = p.proc.sentinel in ready
            try:
                while answer is None and p.conn.poll():
                    msg = p.conn.recv()
                    if isinstance(msg, tuple) and msg == _STARTED:
                        p.started = time.monotonic()
                    else:
                        answer = msg
            except (EOFError, OSError):  # the process died before answering
                dead = True
            if answer is not None:
                p.busy = False
                done.append((k, answer))
            elif dead:
                p.proc.join()
                done.append((k, f"worker exited with code {p.proc.exitcode} before returning a result"))
                self._replace(k)
        return done

    def kill(self, handle: int) -> None:
        self._replace(handle)

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
                p.proc.join()

    def terminate(self) -> None:
        """Kill every worker now (their running units are lost; resume re-runs them)."""
        for p in self._procs:
            if p.proc.is_alive():
                p.proc.kill()
        for p in self._procs:
            p.proc.join()
            with contextlib.suppress(OSError):
                p.conn.close()


def _dask_unit(unit: Sequence[Task], threads: int, topic: str | None = None) -> list[Outcome]:
    """A unit on a Dask worker; the loaded specs are cached on the worker object, the way a
    local worker keeps them for the whole batch. Its start is logged as an event on
    ``topic`` (the driver's timeout counts from there)."""
    import torch
    from distributed import get_worker

    torch.set_num_threads(threads)
    worker = get_worker()
    # the cache lives in the worker object's own attributes (Worker declares no such field)
    problems: dict = vars(worker).setdefault("verigrad_problems", {})
    key = worker.get_current_task()
    on_start = None if topic is None else (lambda: worker.log_event(topic, str(key)))
    return run_unit(unit, problems, on_start)


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
        self._started: dict[str, float] = {}  # str(future key) → monotonic time its unit started
        self._topic = f"verigrad-started-{self._client.id}"
        self._client.subscribe_topic(self._topic, self._on_started)

    def _on_started(self, event: tuple[float, Any]) -> None:
        self._started[str(event[1])] = time.monotonic()

    def submit(self, unit: Sequence[Task]) -> Any:
        fut = self._client.submit(_dask_unit, list(unit), self._threads, self._topic, pure=False)
        self._futures[fut.key] = fut
        return fut.key

    def started(self, handle: Any) -> float | None:
        return self._started.get(str(handle))

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
                self._started.pop(str(key), None)
                try:
                    done.append((key, fut.result()))
                except Exception as e:  # noqa: BLE001 - e.g. KilledWorker: the unit fails, the batch goes on
                    done.append((key, _error_text(e)))
        return done

    def kill(self, handle: Any) -> None:
        fut = self._futures.pop(handle, None)
        self._started.pop(str(handle), None)
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


def _complete(rec: dict) -> bool:
    """A record that resume keeps: a finished result with verdicts (certified / falsified /
    unknown), not an error, a failed instance or a timeout."""
    result = rec.get("result")
    return rec.get("status") == "done" and isinstance(result, dict) and result.get("error") is None


def _done_keys(path: Path) -> set[tuple[str, int]]:
    """(spec hash, data index) of the instances whose last line is a complete result: resume
    runs the others (errors and timeouts too) again."""
    last: dict[tuple[str, int], bool] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                last[(rec["spec_sha256"], rec["data_index"])] = _complete(rec)
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line cut off by a kill: that instance runs again
    return {k for k, ok in last.items() if ok}


# ---------------------------------------------------------------------------------------
# The output directory: one writer at a time, SIGTERM at a safe point, writes that fail cleanly


_HELD: dict[tuple[str, int], int] = {}  # (lock path, thread) → depth: the lock is re-entrant per thread


class _TermGuard:
    """While a batch holds its output directory (main thread only), SIGTERM raises
    :class:`Terminated`, deferred to the end of a line being written so no record is cut."""

    def __init__(self) -> None:
        self.critical = 0
        self.pending = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.critical:
            self.pending = True
        else:
            raise Terminated(f"terminated by signal {signum}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.critical += 1
        try:
            yield
        finally:
            self.critical -= 1
        if not self.critical and self.pending:
            self.pending = False
            raise Terminated("terminated by SIGTERM")


_TERM = _TermGuard()


def _holder_text(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _acquire(out: Path, on_note: Callable[[str], None]) -> int:
    """Make ``out`` and take its lock (an exclusive ``flock`` on ``out/.lock``, which the kernel
    drops when its holder dies, so a lock left by a killed batch is taken over); writing the
    holder into the file doubles as the check that ``out`` is writable."""
    import fcntl

    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot use {out} as the output directory: it exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot use {out} as the output directory: {e.strerror or e}") from None
    if not out.is_dir():
        raise OutputError(f"cannot use {out} as the output directory: it exists and is not a directory")
    path = out / ".lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputLocked(f"{out} is in use by another verigrad batch ({_holder_text(holder)}); wait for it "
                               "to finish, stop it, or use another --out") from None
        except OSError as e:
            os.close(fd)
            raise OutputError(f"cannot lock {path}: {e.strerror or e}") from None
        try:  # a holder releasing the lock unlinks the file: the one locked must still be the one there
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    old = _read_holder(fd)
    if old:
        on_note(f"took over the lock of {out}: its holder ({_holder_text(old)}) is no longer running")
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
    except OSError as e:
        _release(path, fd)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    return fd


def _release(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def output_lock(out: Path, on_note: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``out`` for one batch: create it, take ``out/.lock`` (:class:`OutputLocked`,
    naming the holder, if another batch has it; :class:`OutputError` if ``out`` cannot be
    written), and, in the main thread, turn SIGTERM into :class:`Terminated`. Re-entrant in
    one thread (the CLI holds it around :func:`run_batch`, which takes it too)."""
    key = (str((Path(out) / ".lock").absolute()), threading.get_ident())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(Path(out), on_note or log.warning)
    _HELD[key] = 1
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _TERM.handler) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
        del _HELD[key]
        _release(Path(out) / ".lock", fd)


def _write_error(path: Path, e: OSError, lines: Path, kept: int) -> OutputError:
    return OutputError(f"cannot write {path}: {e.strerror or e}; {lines} keeps the {kept} results finished before "
                       "it (continue with --resume once it can be written)")


def _open_lines(path: Path) -> BinaryIO:
    """``results.jsonl`` for appending, unbuffered: a record is on disk (or failed) when written."""
    return open(path, "ab", buffering=0)  # noqa: SIM115 - closed by run_batch


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _append(f: BinaryIO, data: bytes) -> None:
    """Write ``data`` whole or raise, cutting the file back to where it was (no partial line)."""
    pos = os.fstat(f.fileno()).st_size
    try:
        view = memoryview(data)
        while view:
            n = f.write(view)
            if not n:
                raise OSError(errno.EIO, "short write")
            view = view[n:]
    except OSError:
        with contextlib.suppress(OSError):
            f.truncate(pos)
        raise


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


def _count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _prepare_output(out: Path, resume: bool, overwrite: bool) -> set[tuple[str, int]]:
    """Refuse to discard finished results unasked; return the instances resume skips."""
    lines = out / "results.jsonl"
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: continue the results, or discard them")
    if resume:
        _drop_cut_tail(lines)
        return _done_keys(lines)
    if lines.exists():
        n = len(load_records(out))
        if n and not overwrite:
            raise UserError(f"{out} has {n} finished results; use --resume to continue or --overwrite to discard them")
        for name in ("results.jsonl", "summary.json", "junit.xml"):  # the summaries of what is discarded
            (out / name).unlink(missing_ok=True)
    return set()


def _stop(pool: _Pool, now: bool) -> None:
    terminate = getattr(pool, "terminate", None)
    if now and terminate is not None:
        terminate()
    else:
        pool.close()


def run_batch(tasks: Sequence[Task], out: Path, jobs: int = DEFAULTS.jobs, timeout: float | None = None,
              resume: bool = False, threads: int = DEFAULTS.threads,
              on_result: Callable[[dict, Progress], None] | None = None,
              backend: Backend | str = DEFAULTS.backend, batch_size: int | None = None,
              scheduler: str | None = None, pool: _Pool | None = None, overwrite: bool = False,
              on_note: Callable[[str], None] | None = None) -> list[dict]:
    """Run ``tasks`` on ``jobs`` workers of ``backend``; append each finished instance to
    ``out/results.jsonl`` as it finishes (its files first). Returns this run's records
    (with ``resume``, nothing for the skipped ones: they are already in the file).
    ``resume`` skips instances whose last line is a complete result and re-runs errors and
    timeouts; without it, a ``results.jsonl`` holding results is a :class:`UserError` unless
    ``overwrite`` (discard them). ``out`` is locked for the run (:func:`output_lock`;
    ``on_note`` hears of a stale lock taken over). ``batch_size``: inputs per unit (None:
    sized from measured times). ``on_result(record, progress)`` is called after each line is
    written. ``pool`` replaces the backend's (any object with ``capacity``, ``submit``,
    ``wait``, ``kill``, ``close``; optionally ``started`` and ``terminate``, see
    :class:`_Pool`). A write that fails raises :class:`OutputError` naming the file; SIGTERM
    raises :class:`Terminated`; either way the workers are stopped and every line written
    before stays."""
    out = Path(out)
    with output_lock(out, on_note):
        return _run_locked(tasks, out, jobs, timeout, resume, threads, on_result, backend, batch_size, scheduler,
                           pool, overwrite)


@dataclass
class _Running:
    unit: list[Task]
    submitted: float
    started: float | None = None


def _run_locked(tasks: Sequence[Task], out: Path, jobs: int, timeout: float | None, resume: bool, threads: int,
                on_result: Callable[[dict, Progress], None] | None, backend: Backend | str,
                batch_size: int | None, scheduler: str | None, pool: _Pool | None,
                overwrite: bool) -> list[dict]:
    lines = out / "results.jsonl"
    skip = _prepare_output(out, resume, overwrite)
    todo = [t for t in tasks if (t.spec_sha256, t.data_index) not in skip]
    records: list[dict] = []
    if not todo:
        return records
    try:
        f = _open_lines(lines)
    except OSError as e:
        raise OutputError(f"cannot write {lines}: {e.strerror or e}") from None
    kept = _count_lines(lines)
    with f:
        if pool is None:
            pool = make_pool(backend, min(jobs, len(todo)), threads, scheduler)
        plan = _Planner(todo, batch_size, pool.capacity)
        started_of: Callable[[Any], float | None] | None = getattr(pool, "started", None)
        running: dict[Any, _Running] = {}

        def finish(t: Task, status: str, reason: str | None, seconds: float, result: dict | None,
                   files: dict[str, bytes] | None = None) -> None:
            nonlocal kept
            for rel, data in (files or {}).items():
                path = out / rel
                try:
                    _write_file(path, data)
                except OSError as e:
                    raise _write_error(path, e, lines, kept) from None
            if result is not None:  # name the files by their paths as seen from here
                if result.get("bounds_npz"):
                    result["bounds_npz"] = str(out / result["bounds_npz"])
                for a in result.get("attacks", {}).values():
                    if a.get("witness"):
                        a["witness"] = str(out / a["witness"])
            record = {"spec": t.spec_path, "spec_sha256": t.spec_sha256, "data_index": t.data_index,
                      "status": status, "reason": reason, "seconds": seconds, "result": result}
            with _TERM.deferred():  # SIGTERM waits for the line: a record is written whole or not at all
                try:
                    _append(f, (json.dumps(record) + "\n").encode())
                except OSError as e:
                    raise _write_error(lines, e, lines, kept) from None
            kept += 1
            records.append(record)
            plan.record(t, seconds)
            if on_result is not None:
                on_result(record, Progress(len(records), len(todo), plan.eta()))

        clean = False
        try:
            while plan or running:
                while plan and len(running) < pool.capacity:
                    unit = plan.next_unit()
                    now = time.monotonic()
                    running[pool.submit(unit)] = _Running(unit, now, None if started_of else now)
                for handle, answer in pool.wait(0.05):
                    r = running.pop(handle)
                    if isinstance(answer, str):
                        began = r.started if r.started is not None else r.submitted
                        for t in r.unit:
                            finish(t, "error", answer, (time.monotonic() - began) / len(r.unit), None)
                        continue
                    for t, o in zip(r.unit, answer, strict=True):  # run_unit: one outcome per task
                        finish(t, o.status, o.reason, o.seconds, o.result, o.files)
                if timeout is None:
                    continue
                now = time.monotonic()
                for handle, r in list(running.items()):
                    if r.started is None and started_of is not None:
                        r.started = started_of(handle)
                    if r.started is None:  # not started yet: worker start-up and spec loading are not charged
                        if now - r.submitted > START_SECONDS:
                            pool.kill(handle)
                            del running[handle]
                            for t in r.unit:
                                finish(t, "error", f"no worker started it within {START_SECONDS:g} s", 0.0, None)
                        continue
                    if now > r.started + timeout * len(r.unit):
                        pool.kill(handle)
                        del running[handle]
                        if len(r.unit) > 1:
                            plan.alone(r.unit)  # find the slow input: each alone, with its own timeout
                        else:
                            finish(r.unit[0], "timeout", f"timeout after {timeout:g} s", float(timeout), None)
            clean = True
        finally:
            _stop(pool, now=not clean)
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


# characters XML 1.0 cannot hold, not even as references: shown as \\xNN / \\uNNNN instead
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(value: object) -> str:
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        str(value))


def junit_xml(records: Sequence[dict], unknown_as: UnknownAs | str = DEFAULTS.unknown_as) -> str:
    """One test case per instance × property: certified passes, falsified fails (with the
    witness path), unknown is skipped (or a failure with ``unknown_as='failure'``), errors
    and crashes are errors. Built with ElementTree: any name or message gives well-formed XML."""
    suite = ET.Element("testsuite", name="verigrad")
    counts = Counter[str]()
    for rec, name, v in verdict_rows(records):
        case = ET.SubElement(suite, "testcase", classname=_xml_text(Path(rec["spec"]).stem),
                             name=_xml_text(f"input{rec['data_index']}.{name}"), time=f"{rec['seconds']:.3f}")
        if v == "certified":
            continue
        if v == "falsified":
            w = ((rec["result"].get("attacks") or {}).get(name) or {}).get("witness")
            kind, message, text = "failure", "falsified", f"witness: {w}"
        elif v == "unknown" and UnknownAs(unknown_as) == UnknownAs.SKIPPED:
            kind, message, text = "skipped", rec["reason"] or "neither certified nor falsified", None
        elif v == "unknown":
            kind, message, text = "failure", "unknown", rec["reason"] or ""
        else:
            kind, message, text = "error", "error", rec["reason"] or (rec["result"] or {}).get("error") or ""
        child = ET.SubElement(case, kind, message=_xml_text(message))
        if text is not None:
            child.text = _xml_text(text)
        counts[kind] += 1
    for k, attr in (("tests", None), ("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
        suite.set(attr or k, str(len(suite) if attr is None else counts[k]))
    ET.indent(suite, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"


__all__ = ["Backend", "BackendError", "DaskPool", "LocalPool", "OutputError", "OutputLocked", "Outcome",
           "Progress", "Task", "Terminated", "output_lock", "expand", "instance_verdicts", "make_pool", "run_batch", "run_unit", "load_records", "summary", "junit_xml", "verdict_rows"]
