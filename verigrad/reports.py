"""Results as data: the JSON document (schema ``verigrad.results/1``, see docs/results-schema.md),
bound maps as ``.npz``, and the text tables the CLI prints.

Writers are incremental: after every instance the JSON and npz files are rewritten
atomically, so nothing already computed is lost if a later instance fails or the run dies.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import tempfile
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from verigrad.attacks import witness_bytes
from verigrad.errors import OutputError
from verigrad.properties import Property, Verdict, direction_text
from verigrad.verify import COMBINED, InstanceResult, Problem

SCHEMA = "verigrad.results/1"


class ExitCode(IntEnum):
    """Process exit codes of ``verigrad verify`` (CI acts on them)."""

    CERTIFIED = 0  # every property certified on every instance
    FALSIFIED = 1  # some property falsified
    BAD_INPUT = 2  # invalid spec, model or data
    UNKNOWN = 3  # some property neither certified nor falsified
    ERROR = 4  # an instance failed (including a detected soundness failure)


def versions() -> dict[str, str]:
    import torch

    import verigrad

    out = {"verigrad": verigrad.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version

        out["auto_LiRPA"] = version("auto-LiRPA")
    except Exception:  # noqa: BLE001 - optional dependency, absent is fine
        out["auto_LiRPA"] = "not installed"
    return out


def exit_code_for_counts(counts: Mapping[str, int]) -> ExitCode:
    """The exit code for counts of ``error`` (failed instances or verdicts), ``falsified`` and
    ``unknown``: the worst present, in that order; certified when none is."""
    if counts.get("error", 0):
        return ExitCode.ERROR
    if counts.get(Verdict.FALSIFIED.value, 0):
        return ExitCode.FALSIFIED
    if counts.get(Verdict.UNKNOWN.value, 0):
        return ExitCode.UNKNOWN
    return ExitCode.CERTIFIED


def exit_code(results: Sequence[InstanceResult]) -> ExitCode:
    verdicts = [v.value for r in results for v in r.verdicts.values()]
    return exit_code_for_counts({"error": sum(r.error is not None for r in results),
                                 **{v.value: verdicts.count(v.value) for v in Verdict}})


def summary(problem: Problem, results: Sequence[InstanceResult]) -> dict:
    """Per engine: instances run, mean width, mean time, and per property the counts of each
    verdict; plus the overall counts over the best-of-engines verdicts."""
    ok = [r for r in results if r.error is None]
    engines: dict[str, dict] = {}
    names = [p.name for p in problem.properties]
    for r in ok:
        for e in r.engines:
            s = engines.setdefault(e.method, {"instances": 0, "width_sum": 0.0, "time_sum": 0.0,
                                              "fallbacks": 0, "properties": {}})
            s["instances"] += 1
            s["width_sum"] += e.mean_width
            s["time_sum"] += e.time_s
            s["fallbacks"] += e.actual_method != e.method and e.method != COMBINED
            for pr in e.properties:
                c = s["properties"].setdefault(pr.name, {v.value: 0 for v in Verdict})
                c[pr.verdict.value] += 1
    per_engine = {
        m: {
            "instances": s["instances"],
            "mean_width": s["width_sum"] / s["instances"],
            "time_per_instance_s": s["time_sum"] / s["instances"],
            "fallbacks_to_ibp": s["fallbacks"],
            "properties": s["properties"],
        }
        for m, s in engines.items()
    }
    overall = {n: {v.value: sum(r.verdicts.get(n) == v for r in ok) for v in Verdict} for n in names}
    return {
        "instances": len(results),
        "errors": sum(r.error is not None for r in results),
        "internal_errors": sum(r.internal_error for r in results),
        "per_engine": per_engine,
        "per_property": overall,
        "gap": gap_summary(problem, results),
        "exit_code": int(exit_code(results)),
    }


def gap_summary(problem: Problem, results: Sequence[InstanceResult]) -> dict:
    """Per property: the median gap ratio (certified worst / attacked worst, oriented so that
    1 = tight; see ``properties.gap_ratio``) over instances where both exist, and how many."""
    out = {}
    for p in problem.properties:
        ratios = [r.gap[p.name]["ratio"] for r in results if p.name in r.gap and r.gap[p.name]["ratio"] is not None]
        out[p.name] = {"instances": len(ratios), "median_ratio": float(np.median(ratios)) if ratios else None}
    return out


def explanation_info(problem: Problem) -> dict:
    """The explained map and what its certificates promise (``Guarantee``)."""
    e = problem.explainer
    return {"method": e.method.value, "description": e.describe(), "guarantee": e.guarantee.value}


def _describe(p: Property) -> dict:
    return {"name": p.name, "kind": p.kind.value, "metric": None if p.metric is None else p.metric.value,
            "threshold": p.threshold, "normalize": p.normalize.value, "direction": direction_text(p)}


def results_document(problem: Problem, results: Sequence[InstanceResult], started: str, complete: bool,
                     witnesses: Mapping[tuple[int, str], str] | None = None) -> dict:
    """The whole JSON document; ``witnesses`` maps (index, property) to a witness file path."""
    spec = problem.spec
    instances = [r.to_dict() for r in results]
    for doc in instances:
        for name, a in doc["attacks"].items():
            a["witness"] = (witnesses or {}).get((doc["index"], name))
    return {
        "schema": SCHEMA,
        "complete": complete,
        "started": started,
        "spec": {"source": spec.source, "sha256": spec.hash(), "resolved": spec.to_dict()},
        "versions": versions(),
        "device": str(problem.device),
        "dtype": str(problem.dtype).replace("torch.", ""),
        "model": model_info(problem.net),
        "input_notes": list(problem.input_notes),
        "methods": [m.value for m in problem.methods],
        "explanation": explanation_info(problem),
        "properties": [_describe(p) for p in problem.properties],
        "attack": {"order": problem.attack_order.value,
                   "methods": "auto" if problem.attack_methods is None else [m.value for m in problem.attack_methods],
                   "options": dict(problem.attack_options.__dict__)},
        "instances": instances,
        "summary": summary(problem, results),
    }


def model_info(net) -> dict:
    """The loaded graph in brief: its operator kinds (node counts), whether it is a chain, and
    what the loader did that changes what is explained (e.g. a final Softmax stripped)."""
    kinds: dict[str, int] = {}
    for node in net.layers:
        kinds[node.op] = kinds.get(node.op, 0) + 1
    return {"source": net.source, "nodes": len(net.layers), "chain": net.is_chain, "operators": kinds,
            "classes": net.num_classes, "notes": list(net.notes)}


def witness_meta(problem: Problem, index: int) -> dict:
    """What ``verigrad replay`` needs besides the point: the data index and the resolved spec."""
    spec = problem.spec
    return {"index": index, "spec_source": spec.source, "spec_sha256": spec.hash(), "spec": spec.to_dict(),
            "versions": versions()}


def witness_filename(index: int, prop: str) -> str:
    """``i{index}_{property}.npz``, the property name made safe for a file name."""
    return f"i{index}_{_safe_name(prop)}.npz"


def witness_files(problem: Problem, r: InstanceResult) -> dict[str, tuple[str, bytes]]:
    """The instance's witness files, not yet written: property → (file name, content)."""
    return {name: (witness_filename(r.index, name), witness_bytes(a.witness, witness_meta(problem, r.index)))
            for name, a in r.attacks.items() if a.witness is not None}


def save_instance_witnesses(problem: Problem, r: InstanceResult, directory: Path) -> dict[str, str]:
    """Write the instance's witnesses as ``directory/i{index}_{property}.npz``; property → path."""
    out = {}
    for name, (fname, data) in witness_files(problem, r).items():
        path = directory / fname
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out[name] = str(path)
    return out


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def check_writable(path: Path) -> None:
    """Raise OutputError unless a file can be created at ``path`` (its directory is made)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_file():
            raise OutputError(f"cannot write {path}: it exists and is not a file")
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".verigrad-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, allow_pickle=False, **arrays)


def npz_arrays(results: Sequence[InstanceResult]) -> dict[str, np.ndarray]:
    """Keys ``i{index}/explanation`` (the map at the box centre) and
    ``i{index}/{engine}/lower`` / ``upper`` (same shape as the input)."""
    out: dict[str, np.ndarray] = {}
    for r in results:
        if r.explanation is not None:
            out[f"i{r.index}/explanation"] = r.explanation.numpy()
        for e in r.engines:
            out[f"i{r.index}/{e.method}/lower"] = e.bounds.lower[0].detach().cpu().numpy()
            out[f"i{r.index}/{e.method}/upper"] = e.bounds.upper[0].detach().cpu().numpy()
    return out


@dataclass
class ResultWriter:
    """Rewrites the JSON (and npz) after every instance; call ``finish`` at the end."""

    problem: Problem
    json_path: Path
    npz_path: Path | None
    results: list[InstanceResult] = field(default_factory=list)
    started: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    witnesses: dict[tuple[int, str], str] = field(default_factory=dict)

    @property
    def witness_dir(self) -> Path:
        """``<results>.witnesses/`` beside the JSON file."""
        return self.json_path.with_name(self.json_path.stem + ".witnesses")

    def __post_init__(self) -> None:
        # witnesses of an earlier run of the same results file would be mistaken for this run's
        if self.witness_dir.is_dir():
            for old in self.witness_dir.glob("i*_*.npz"):
                old.unlink()

    def __call__(self, r: InstanceResult) -> None:
        self.results.append(r)
        try:
            saved = save_instance_witnesses(self.problem, r, self.witness_dir)
        except OSError as e:
            raise OutputError(f"writing a witness of input {r.index} to {self.witness_dir} failed "
                              f"({e.strerror or e}); {self.json_path.name} keeps the {len(self.results) - 1} "
                              "instance(s) written before") from None
        for name, path in saved.items():
            self.witnesses[(r.index, name)] = path
        self._write(complete=False)

    def finish(self) -> dict:
        return self._write(complete=True)

    def _write(self, complete: bool) -> dict:
        doc = results_document(self.problem, self.results, self.started, complete, self.witnesses)
        target = self.json_path
        try:
            _atomic_write(target, lambda p: Path(p).write_text(json.dumps(doc, indent=1)))
            if self.npz_path is not None:
                target = self.npz_path
                arrays: dict = npz_arrays(self.results)
                _atomic_write(target, lambda p: _savez(p, arrays))
        except OSError as e:
            kept = len(self.results) - (0 if complete else 1)
            raise OutputError(f"writing {target} failed ({e.strerror or e}); {target.name} keeps the "
                              f"{kept} instance(s) written before") from None
        return doc


# ---------------------------------------------------------------------------------------
# Text tables


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns. A short row (an ERROR row has fewer cells than the header) is
    padded with empty cells, so it neither drops the other rows' columns nor loses its own."""
    n = max([len(header), *(len(r) for r in rows)])
    cells = [[str(c) for c in r] + [""] * (n - len(r)) for r in [header, *rows]]
    widths = [max(len(r[j]) for r in cells) for j in range(n)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def verify_table(problem: Problem, results: Sequence[InstanceResult]) -> str:
    """One row per instance × engine: prediction, then per property the verdict and the
    certified worst-case value."""
    names = [p.name for p in problem.properties]
    header = ["input", "label", "pred", "engine", "guarantee", "time(s)", "width"] + names
    rows = []
    for r in results:
        if r.error is not None:
            rows.append([str(r.index), (str(r.label) if r.label >= 0 else "-"), "-", "ERROR", "-", "-", "-", r.error.splitlines()[-1][:80]])
            continue
        for e in r.engines:
            eng = e.method if e.actual_method == e.method or e.method == COMBINED else f"{e.method}->{e.actual_method}"
            cells = [f"{pr.verdict.value} {pr.worst_case:.4g}" for pr in e.properties]
            guarantee = e.guarantee.value + (f" (p={e.failure_probability:g})" if e.failure_probability else "")
            rows.append([str(r.index), (str(r.label) if r.label >= 0 else "-"), str(r.prediction), eng, guarantee, f"{e.time_s:.3f}",
                         f"{e.mean_width:.4g}"] + cells)
        if r.attacks:
            cells = []
            for n in names:
                a = r.attacks.get(n)
                cells.append("-" if a is None or a.value is None else
                             f"{'falsified' if a.violated else 'held'} {a.value:.4g}")
            rows.append([str(r.index), (str(r.label) if r.label >= 0 else "-"), str(r.prediction), "attack", "witness",
                         f"{sum(a.time_s for a in r.attacks.values()):.3f}", "-"] + cells)
    return f"explanation: {problem.explainer.describe()}\n" + _table(header, rows)


def compare_table(problem: Problem, results: Sequence[InstanceResult]) -> str:
    """Per engine: mean width, width ratio against ibp, time per instance, certified fraction
    per property."""
    s = summary(problem, results)["per_engine"]
    names = [p.name for p in problem.properties]
    base = s.get("ibp", {}).get("mean_width")
    header = ["engine", "mean width", "width/ibp", "time/inst (s)", "fallbacks"] + [f"cert {n}" for n in names]
    header += [f"gap {n}" for n in names]
    rows = []
    for m, e in s.items():
        ratio = f"{e['mean_width'] / base:.4f}" if base else "-"
        fr = []
        for n in names:
            c = e["properties"].get(n, {})
            tot = sum(c.values()) or 1
            fr.append(f"{c.get('certified', 0) / tot:.2f}")
        gaps = [_median_gap(problem, results, m, n) for n in names]
        rows.append([m, f"{e['mean_width']:.4g}", ratio, f"{e['time_per_instance_s']:.3f}", str(e["fallbacks_to_ibp"])]
                    + fr + gaps)
    out = _table(header, rows) + "\n" + GAP_NOTE
    for extra in (literature_table(results), radius_table(problem, results)):
        if extra:
            out += "\n\n" + extra
    return out


def literature_table(results: Sequence[InstanceResult]) -> str:
    """``second_order.literature``: every bound side by side — the direct engines, the
    Hessian (mean-value) bounds and the literature's — with its guarantee, as the median over
    inputs ('inf' where a formula is vacuous)."""
    values: dict[str, list[float]] = {}
    meta: dict[str, dict] = {}
    for r in results:
        for b in r.second_order.get("bounds", []):
            values.setdefault(b["name"], []).append(math.inf if b["value"] is None else b["value"])
            meta[b["name"]] = b
    if not values:
        return ""
    order = {"sound": 0, "probabilistic": 1, "estimate": 2}
    names = sorted(values, key=lambda n: (meta[n]["quantity"], order[meta[n]["guarantee"]], np.median(values[n])))
    rows = [[n, meta[n]["guarantee"], meta[n]["quantity"], f"{float(np.median(values[n])):.4g}", str(len(values[n])),
             meta[n]["source"][:60]] for n in names]
    return ("explanation-change bounds over the box (median over inputs; sound = holds on the whole box, "
            "estimate = first-order, no guarantee)\n"
            + _table(["bound", "guarantee", "quantity", "median", "inputs", "source"], rows))


def radius_table(problem: Problem, results: Sequence[InstanceResult]) -> str:
    """``radius.search``: per property, the certified radius (largest ε certified) over inputs."""
    rows = []
    for p in problem.properties:
        rs = [r.radius[p.name]["certified_radius"] for r in results if p.name in r.radius]
        if rs:
            rows.append([p.name, f"{min(rs):.4g}", f"{float(np.median(rs)):.4g}", f"{max(rs):.4g}", str(len(rs))])
    if not rows:
        return ""
    return ("certified radius: the largest ε (bisection up to radius.eps_max) at which some engine certifies\n"
            + _table(["property", "min", "median", "max", "inputs"], rows))


GAP_NOTE = ("gap = median over inputs of (this engine's certified worst case) / (worst value any attack "
            "reached), oriented so that 1 is tight (see properties.gap_ratio); '-' where attacks did not run "
            "(attack.order: both measures it everywhere)")


def _median_gap(problem: Problem, results: Sequence[InstanceResult], engine: str, name: str) -> str:
    from verigrad.properties import gap_ratio

    prop = next(p for p in problem.properties if p.name == name)
    ratios = []
    for r in results:
        a = r.attacks.get(name)
        run = next((e for e in r.engines if e.method == engine), None)
        if a is None or a.value is None or run is None:
            continue
        cert = next(pr.worst_case for pr in run.properties if pr.name == name)
        g = gap_ratio(prop, cert, a.value)
        if g is not None:
            ratios.append(g)
    return f"{float(np.median(ratios)):.3g}" if ratios else "-"


def attack_table(problem: Problem, results: Sequence[InstanceResult]) -> str:
    """``verigrad attack``: per input and property, the strongest attack, its value and the
    similarity of the attacked explanation to the original; then per input the
    random-perturbation PCC at each noise level and the max-sensitivity."""
    header = ["input", "property", "attack", "value", "status", "pcc", "ssim", "kendall_tau", "topk"]
    rows = []
    for r in results:
        if r.error is not None:
            rows.append([str(r.index), "ERROR", r.error.splitlines()[-1][:80]])
            continue
        for n, a in r.attacks.items():
            sim = a.similarity
            f = lambda k, sim=sim: f"{sim[k]:.3f}" if k in sim else "-"  # noqa: E731
            rows.append([str(r.index), n, a.attack or "-", "-" if a.value is None else f"{a.value:.4g}",
                         "-" if a.value is None else ("falsified" if a.violated else "held"),
                         f("pcc"), f("ssim"), f("kendall_tau"), f("topk_intersection")])
    out = [_table(header, rows)]
    emp_rows = []
    levels: list[str] = []
    for r in results:
        e = r.empirical
        if not e:
            continue
        rp = e.get("random_perturbation", {})
        levels = list(rp)
        ms = e.get("max_sensitivity")
        emp_rows.append([str(r.index)] + [f"{rp[lv]['pcc']:.3f}" for lv in levels]
                        + ["-" if ms is None else f"{ms:.4g}"])
    if emp_rows:
        out.append(_table(["input"] + [f"pcc@ν={lv}" for lv in levels] + ["max-sensitivity"], emp_rows))
    return "\n\n".join(out)
