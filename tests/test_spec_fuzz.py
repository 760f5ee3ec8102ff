"""Schema-driven fuzzing of the spec: walk the dataclasses under :class:`verigrad.spec.Spec`
(their fields' ``metadata["check"]``) from a valid base spec and, for every key, write a
spec that is wrong in exactly one place: the key missing (required keys), a value of the
wrong type, a value outside a Choice, a number outside a Num/Int range, a list of the
wrong length or with duplicates, an unknown key in a section. Each must be a SpecError
naming the spec file and the mutated key path (or a path below it); a handful also go
through ``verigrad verify`` (exit 2, one line). If a check stops checking (a range, a
type, an enum), its mutations load and this test fails."""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from click.testing import CliRunner

from verigrad.cli import main
from verigrad.spec import (
    Bool, Check, Choice, Const, Int, ListOf, Nullable, Num, OneOf, PathCheck, Section, Spec, SpecError, Str,
    Tagged, load_spec,
)

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")

BASE: dict = {
    "model": {"path": FC, "normalization": {"mean": [0.1307], "std": [0.3081]}},
    "data": {"dataset": "mnist_sample", "start": 0, "end": 1},
    "perturbation": {"input": {"epsilon": 0.01}, "parameters": {"gamma": 0.01}},
    "properties": [
        {"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1000.0},
        {"name": "blob", "kind": "targeted", "metric": "l2", "threshold": 0.5,
         "target": {"type": "gaussian", "center": [14, 14], "sigma": 3.0}},
        {"name": "sq", "kind": "targeted", "metric": "linf", "threshold": 0.5,
         "target": {"type": "square", "position": [0, 0], "size": 5}},
    ],
    "bounds": {"methods": ["ibp"]},
    "attack": {"order": "skip"},
}

Path_ = tuple  # a key path: str keys and int list indices


def _key(path: Path_) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


@dataclasses.dataclass(frozen=True)
class Mutation:
    path: Path_
    kind: str  # missing | type | choice | range | length | duplicate | unknown_key
    value: Any = None  # None with kind 'missing': delete the key

    @property
    def key(self) -> str:
        return _key(self.path)

    @property
    def id(self) -> str:
        return f"{self.key}-{self.kind}-{self.value!r}"[:90]

    def apply(self, base: dict) -> dict:
        d = copy.deepcopy(base)
        node: Any = d
        for p in self.path[:-1]:
            if isinstance(p, str) and (not isinstance(node, dict) or node.get(p) is None):
                node[p] = {}
            node = node[p]
        if self.kind == "missing":
            del node[self.path[-1]]
        else:
            node[self.path[-1]] = self.value
        return d


def _get(d: Any, path: Path_) -> Any:
    for p in path:
        if isinstance(p, int):
            d = d[p] if isinstance(d, list) and p < len(d) else None
        else:
            d = d.get(p) if isinstance(d, dict) else None
        if d is None:
            return None
    return d


def _valid(check: Check) -> Any:
    """One value ``check`` accepts (for duplicates and list lengths), or None when unknown."""
    if isinstance(check, Choice):
        return next(iter(check.enum)).value
    if isinstance(check, (Num, Int)):
        lo = check.ge if check.ge is not None else (check.gt + 1 if check.gt is not None else 0)
        return int(lo) if isinstance(check, Int) else float(lo) + 0.5
    if isinstance(check, Str):
        return "a"
    return None


def _bad_values(check: Check) -> Iterator[tuple[str, Any]]:
    """(kind, value) for values ``check`` must reject."""
    if isinstance(check, Nullable):
        yield from ((k, v) for k, v in _bad_values(check.inner) if v is not None)
    elif isinstance(check, (Num, Int)):
        is_int = isinstance(check, Int)
        yield from [("type", [1, 2]), ("type", "many"), ("type", True), ("type", None), ("type", {"n": 1})]
        if is_int:
            yield "type", 2.5
        else:
            yield from [("type", math.nan), ("type", math.inf)]
        step = 1 if is_int else 0.5
        if check.gt is not None:
            yield from [("range", check.gt), ("range", check.gt - step)]
        if check.ge is not None:
            yield "range", check.ge - step
        if isinstance(check, Num) and check.lt is not None:
            yield "range", check.lt
        if check.le is not None:
            yield from [("range", check.le + step), ("range", check.le * 1000 + 10**6)]
    elif isinstance(check, Bool):
        yield from [("type", "yes"), ("type", 1), ("type", [True]), ("type", None)]
    elif isinstance(check, Str):
        yield from [("type", 5), ("type", ["a"]), ("type", ""), ("type", None)]
    elif isinstance(check, Choice):
        yield from [("choice", "not_a_choice"), ("choice", 3.5), ("type", [next(iter(check.enum)).value]),
                    ("type", {"x": 1}), ("type", None)]
    elif isinstance(check, OneOf):
        yield from [("type", {"x": 1}), ("type", True), ("type", None)]
        if not any(isinstance(o, ListOf) for o in check.options):
            yield "type", [1]
    elif isinstance(check, ListOf):
        yield from [("type", {"x": 1}), ("type", 7), ("type", None)]
        if check.min_len >= 1:
            yield "length", []
        ok = _valid(check.item)
        if ok is not None:
            if check.max_len is not None:
                yield "length", [ok] * (check.max_len + 1)
            if check.unique:
                yield "duplicate", [ok, ok]
        for kind, bad in _bad_values(check.item):
            if kind != "unknown_key":  # (a section's unknown key is generated by the walk)
                yield kind, [bad] * max(check.min_len, 1)
    elif isinstance(check, PathCheck):
        yield from [("type", [1]), ("type", 5), ("type", ""), ("type", None)]
        if check.suffixes:
            yield "type", "model.txt"
        if check.must_exist:
            yield "missing_file", f"does_not_exist{check.suffixes[0] if check.suffixes else ''}"
    elif isinstance(check, (Section, Tagged)):
        yield from [("type", "a string"), ("type", [1, 2]), ("type", 5)]
        if isinstance(check, Tagged):
            yield from [("missing_tag", {}), ("choice", {check.tag: "not_a_type"})]
    elif isinstance(check, Const):
        yield from [("choice", "other"), ("type", 1)]
    else:  # a new kind of check: teach this test about it
        raise AssertionError(f"the fuzz test does not know {type(check).__name__}")


def _sections(check: Check, value: Any, path: Path_) -> Iterator[tuple[type, Path_, Any]]:
    """The dataclasses below ``check`` (with their key path and base value) to walk into."""
    if isinstance(check, Nullable):
        yield from _sections(check.inner, value, path)
    elif isinstance(check, Section):
        if value is not None or not check.optional:
            yield check.cls, path, value or {}
    elif isinstance(check, Tagged) and isinstance(value, dict):
        cls = dict((k.value, c) for k, c in check.classes)[value[check.tag]]
        yield cls, path, value
    elif isinstance(check, ListOf) and isinstance(value, list):
        for i, v in enumerate(value):
            yield from _sections(check.item, v, (*path, i))


def mutations(cls: type = Spec, path: Path_ = (), value: Any = None) -> Iterator[Mutation]:
    value = BASE if value is None and not path else (value or {})
    fields = [f for f in dataclasses.fields(cls) if "check" in f.metadata]
    yield Mutation((*path, "no_such_key"), "unknown_key", 1)
    for f in fields:
        check, here = f.metadata["check"], (*path, f.name)
        if f.metadata["default"] is dataclasses.MISSING:
            assert f.name in value, f"the base spec lacks the required key {_key(here)}"
            yield Mutation(here, "missing")
        for kind, bad in _bad_values(check):
            yield Mutation(here, kind, bad)
        for sub, sub_path, sub_value in _sections(check, _get(value, (f.name,)), here):
            yield from mutations(sub, sub_path, sub_value)


MUTATIONS = list(mutations())


def _write(tmp_path: Path, d: dict, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_the_base_spec_is_valid_and_the_fuzz_is_broad(tmp_path):
    spec = load_spec(_write(tmp_path, BASE))
    assert len(spec.properties) == 3
    assert len(MUTATIONS) >= 200, len(MUTATIONS)
    kinds = {m.kind for m in MUTATIONS}
    assert {"missing", "type", "choice", "range", "length", "duplicate", "unknown_key"} <= kinds, kinds
    keys = {m.key for m in MUTATIONS}
    for k in ["explanation.integrated_gradients.steps", "bounds.crown.memory_mb", "general.seed",
              "properties[1].target.sigma", "properties[2].target.size", "perturbation.parameters.gamma",
              "model.normalization.std", "explanation.smoothing.sparsify", "attack.seed"]:
        assert k in keys, k
    assert len(set(m.id for m in MUTATIONS)) == len(MUTATIONS)


def test_every_mutation_is_a_spec_error_at_its_key(tmp_path):
    """All mutations in one test (fast: load_spec only); every failure is listed."""
    failures = []
    for i, m in enumerate(MUTATIONS):
        p = _write(tmp_path, m.apply(BASE), f"spec{i}.yaml")
        try:
            load_spec(p)
        except SpecError as e:
            if not (e.key == m.key or e.key.startswith(m.key + ".") or e.key.startswith(m.key + "[")):
                failures.append(f"{m.id}: error at {e.key!r}: {e}")
            elif e.source != str(p) or not str(e).startswith(f"{p}: {e.key}: "):
                failures.append(f"{m.id}: the message does not name the file and key: {e}")
            elif "\n" in str(e):
                failures.append(f"{m.id}: a message of several lines: {e!r}")
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(f"{m.id}: {type(e).__name__} instead of SpecError: {e}")
        else:
            failures.append(f"{m.id}: accepted")
    assert not failures, f"{len(failures)} of {len(MUTATIONS)} mutations:\n" + "\n".join(failures)


@pytest.mark.parametrize("i", range(0, len(MUTATIONS), max(1, len(MUTATIONS) // 10))[:10])
def test_a_sample_through_the_cli_is_one_line_exit_2(tmp_path, i):
    m = MUTATIONS[i]
    p = _write(tmp_path, m.apply(BASE))
    r = CliRunner().invoke(main, ["verify", str(p)])
    assert r.exit_code == 2, (m.id, r.output)
    lines = r.output.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith(f"error: {p}: {m.key}"), (m.id, r.output)
    assert "Traceback" not in r.output


def test_the_fuzz_notices_a_check_that_stops_checking(tmp_path, monkeypatch):
    """Sanity: with Num's range check disabled, its range mutations load (so the test above fails)."""
    import verigrad.spec as spec_mod

    monkeypatch.setattr(spec_mod, "_in_range", lambda *a, **k: True)
    ranged = [m for m in MUTATIONS if m.kind == "range"]
    assert len(ranged) >= 20
    accepted = 0
    for i, m in enumerate(ranged):
        try:
            load_spec(_write(tmp_path, m.apply(BASE), f"r{i}.yaml"))
            accepted += 1
        except SpecError:
            pass  # e.g. a section validator that re-checks (threshold in [-1, 1] for cosine)
    assert accepted >= len(ranged) // 2
