"""VNN-LIB input boxes (perturbation.input.vnnlib) and the data adapters (data.reshape, a data
file without labels): the shipped files read back exactly, a box spec runs end to end with the
box shared by engines and attacks, malformed files are one-line exit-2 errors naming the file
and the line, output constraints are ignored with a note."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import verigrad.verify as vmod
from verigrad.cli import main
from verigrad.data import load_dataset
from verigrad.perturbation import FixedBox, fixed_input_box
from verigrad.reports import ExitCode
from verigrad.spec import SpecError, load_spec
from verigrad.vnnlib import VnnlibError, parse_vnnlib, read_vnnlib

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")
GERMAN = str(ROOT / "examples/models/german_fc_fair.onnx")  # 25 inputs in [0, 1], 2 classes
SHIPPED = {"mnist_fc_0": ROOT / "examples/vnnlib/mnist_fc_0.vnnlib",
           "mnist_fc_1_patch": ROOT / "examples/vnnlib/mnist_fc_1_patch.vnnlib"}
SPECS = [ROOT / "specs/mnist_fc_vnnlib.yaml", ROOT / "specs/mnist_fc_vnnlib_patch.yaml"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _written_bounds(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The bounds as the text writes them, read independently of verigrad.vnnlib."""
    text = path.read_text()
    n = len(re.findall(r"\(declare-const X_\d+ Real\)", text))
    lo, up = np.full(n, np.nan), np.full(n, np.nan)
    for op, i, c in re.findall(r"\((<=|>=) X_(\d+) ([^()\s]+)\)", text):
        (up if op == "<=" else lo)[int(i)] = float(c)
    return lo, up


def _vnnlib_text(n: int = 25, lo: float = 0.2, up: float = 0.4, outputs: bool = True) -> list[str]:
    lines = ["; a test property", *(f"(declare-const X_{i} Real)" for i in range(n))]
    if outputs:
        lines += ["(declare-const Y_0 Real)", "(declare-const Y_1 Real)"]
    for i in range(n):
        lines += [f"(assert (<= X_{i} {up}))", f"(assert (>= X_{i} {lo}))"]
    if outputs:
        lines.append("(assert (or (and (>= Y_1 Y_0)) (and (<= Y_0 -1e-3))))")
    return lines


def _box_spec(tmp_path: Path, vnnlib: Path | str, model: str = GERMAN, **sections) -> Path:
    d: dict = {
        "model": {"path": model, "input_range": [0.0, 1.0]},
        "explanation": {"target": 1},
        "perturbation": {"input": {"vnnlib": str(vnnlib)}},
        "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1000.0}],
        "bounds": {"methods": ["ibp"]},
        "attack": {"order": "skip"},
        "general": {"results": str(tmp_path / "res")},
    }
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


# ---------------------------------------------------------------- the shipped files


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_shipped_files_read_back_exactly_the_bounds_written(name):
    path = SHIPPED[name]
    box = read_vnnlib(path)
    lo, up = _written_bounds(path)
    assert box.size == 784 and box.lower.dtype == np.float64
    assert np.array_equal(box.lower, lo) and np.array_equal(box.upper, up)  # float64, exactly as float() reads
    assert len(box.ignored_lines) == 1 and box.outputs == 10  # the robustness property over Y_j
    # the run's box: exact in float64, rounded outward when cast to float32
    fb = FixedBox(torch.from_numpy(box.lower), torch.from_numpy(box.upper))
    c = torch.from_numpy(box.centre()).reshape(1, 1, 28, 28)
    b64 = fixed_input_box(c, fb, (0.0, 1.0))
    assert torch.equal(b64.lower.flatten(), torch.from_numpy(lo)) and torch.equal(b64.upper.flatten(), torch.from_numpy(up))
    b32 = fixed_input_box(c.float(), fb, (0.0, 1.0))
    assert b32.lower.dtype == torch.float32
    l32, u32 = b32.lower.flatten().double(), b32.upper.flatten().double()
    assert bool((l32 <= fb.lower).all()) and bool((u32 >= fb.upper).all())  # contains the file's box
    cast_l, cast_u = fb.lower.float(), fb.upper.float()
    assert bool(((b32.lower.flatten() == cast_l) | (b32.lower.flatten() == torch.nextafter(cast_l, cast_l - 1))).all())
    assert bool(((b32.upper.flatten() == cast_u) | (b32.upper.flatten() == torch.nextafter(cast_u, cast_u + 1))).all())


def test_the_shipped_files_are_what_the_tool_writes(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "tools/make_vnnlib_examples.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name, path in SHIPPED.items():
        assert (tmp_path / path.name).read_text() == path.read_text(), name
    x, _ = load_dataset("mnist_sample", start=0, end=1)
    box = read_vnnlib(SHIPPED["mnist_fc_0"])
    x64 = x[0].double().numpy().reshape(-1)
    assert np.array_equal(box.lower, np.clip(x64 - 0.01, 0, 1)) and np.array_equal(box.upper, np.clip(x64 + 0.01, 0, 1))


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.stem)
def test_a_shipped_vnnlib_spec_runs_end_to_end_with_a_verdict_and_a_note(tmp_path, spec):
    out = tmp_path / "r.json"
    r = _run("verify", spec, "--out", out, "--method", "ibp", "--attack-order", "skip")
    assert r.exit_code in (ExitCode.CERTIFIED, ExitCode.FALSIFIED, ExitCode.UNKNOWN), r.output
    assert "output constraint(s) (assert over Y_j" in r.output and "ignored" in r.output
    doc = json.loads(out.read_text())
    (inst,) = doc["instances"]
    assert inst["error"] is None and inst["label"] is None and inst["verdicts"]
    assert set(inst["verdicts"].values()) <= {"certified", "falsified", "unknown"}
    assert any("ignored" in n for n in doc["input_notes"]) and any("input box" in n for n in doc["input_notes"])


def test_engines_and_attacks_get_the_files_box_and_its_centre(tmp_path, monkeypatch):
    spec = load_spec(_box_spec(tmp_path, SHIPPED["mnist_fc_1_patch"], model=FC, explanation={"target": "predicted"},
                               attack={"order": "after", "steps": 2, "restarts": 1},
                               properties=[{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1e-9}]))
    problem = vmod.prepare(spec)
    vb = read_vnnlib(SHIPPED["mnist_fc_1_patch"])
    assert problem.x.shape == (1, 1, 28, 28) and torch.equal(problem.x.flatten(), torch.from_numpy(vb.centre()))
    seen_engine, seen_attack = [], []
    real_bounds, real_attack = vmod.explanation_bounds, vmod.attack_property

    def engine_spy(explainer, m, net, box, *rest):
        seen_engine.append(box)
        return real_bounds(explainer, m, net, box, *rest)

    def attack_spy(threat, *rest):
        seen_attack.append(threat)
        return real_attack(threat, *rest)

    monkeypatch.setattr(vmod, "explanation_bounds", engine_spy)
    monkeypatch.setattr(vmod, "attack_property", attack_spy)
    r = vmod.verify_instance(problem, 0)
    assert r.error is None and seen_engine and seen_attack
    for box in [*seen_engine, *(t.box for t in seen_attack)]:
        assert torch.equal(box.lower.flatten(), torch.from_numpy(vb.lower))
        assert torch.equal(box.upper.flatten(), torch.from_numpy(vb.upper))
    assert seen_attack[0].epsilon == 0.0 and seen_attack[0].moves_input  # the box, not an ε-ball
    # a witness the attack finds is re-checked in the same (float64) box
    assert seen_attack[0].astype(torch.float64).box.lower.equal(seen_engine[0].lower)


def test_the_box_outside_the_input_range_is_an_error_naming_the_coordinate_unless_allowed(tmp_path):
    lines = _vnnlib_text()
    k = lines.index("(assert (<= X_7 0.4))")
    lines[k] = "(assert (<= X_7 1.5))"
    f = tmp_path / "p.vnnlib"
    f.write_text("\n".join(lines) + "\n")
    r = _run("verify", _box_spec(tmp_path, f))
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    (line,) = r.output.strip().splitlines()
    assert line.startswith(f"error: {f}: line {k + 1}: X_7 (coordinate [7]) has bounds [0.2, 1.5], outside "
                           "model.input_range [0, 1]"), line
    assert "data.outside_range: allow" in line
    spec = load_spec(_box_spec(tmp_path, f, data={"outside_range": "allow"}))
    problem = vmod.prepare(spec)
    box = vmod.threat_for(problem, 0, 1).box
    assert float(box.upper[0, 7]) == 1.0 and float(box.lower[0, 7]) == 0.2  # clipped to the range
    assert float(problem.x[0, 7]) == 0.85  # the centre of the file's box


# ---------------------------------------------------------------- malformed files


def _edit(lines: list[str], old: str, new: str | None) -> tuple[list[str], int]:
    k = lines.index(old)
    out = lines[:k] + ([new] if new is not None else []) + lines[k + 1:]
    return out, k + 1


def _case(name: str) -> tuple[list[str], int, str]:
    """(file lines, the line the error must name, what the message must say)."""
    base = _vnnlib_text()
    if name == "missing_upper_bound":
        lines, _ = _edit(base, "(assert (<= X_3 0.4))", None)
        return lines, base.index("(declare-const X_3 Real)") + 1, "X_3 (declared here) has no upper bound"
    if name == "missing_lower_bound":
        lines, _ = _edit(base, "(assert (>= X_24 0.2))", None)
        return lines, base.index("(declare-const X_24 Real)") + 1, "X_24 (declared here) has no lower bound"
    if name == "lower_above_upper":
        lines, k = _edit(base, "(assert (>= X_5 0.2))", "(assert (>= X_5 0.5))")
        return lines, k, "expected lower <= upper for X_5, got lower bound 0.5"
    if name == "wrong_count":
        lines = _vnnlib_text(n=24)
        return lines, lines.index("(declare-const X_23 Real)") + 1, "expected 25 input variables X_0..X_24"
    if name == "garbage_token":
        lines, k = _edit(base, "(assert (<= X_0 0.4))", "@#! (assert (<= X_0 0.4))")
        return lines, k, "expected '(' starting a command, got '@#!'"
    if name == "garbage_in_assert":
        lines, k = _edit(base, "(assert (<= X_0 0.4))", "(assert (<= X_0 0.4 ~~))")
        return lines, k, "expected (<= X_i c) with two arguments, got 3"
    if name == "unclosed_paren":
        lines, k = _edit(base, "(assert (<= X_9 0.4))", "(assert (<= X_9 0.4)")
        return lines, k, "unbalanced parentheses: the '(' on this line is never closed"
    if name == "extra_paren":
        lines, k = _edit(base, "(assert (<= X_9 0.4))", "(assert (<= X_9 0.4)))")
        return lines, k, "unbalanced parentheses: ')' without a matching '('"
    if name == "undeclared_variable":
        lines, k = _edit(base, "(assert (<= X_9 0.4))", "(assert (<= X_90 0.4))")
        return lines, k, "X_90 is not declared"
    if name == "non_numeric_constant":
        lines, k = _edit(base, "(assert (<= X_9 0.4))", "(assert (<= X_9 zero.4))")
        return lines, k, "expected a number (e.g. 0.5, -1e-3), got 'zero.4'"
    if name == "strict_inequality":
        lines, k = _edit(base, "(assert (<= X_9 0.4))", "(assert (< X_9 0.4))")
        return lines, k, "got the strict inequality '<'"
    if name == "disjunction_over_inputs":
        lines, k = _edit(base, "(assert (<= X_9 0.4))", "(assert (or (<= X_9 0.4) (<= X_9 0.3)))")
        return lines, k, "got a disjunction (or ...)"
    if name == "inputs_and_outputs_mixed":
        lines, k = _edit(base, "(assert (<= X_9 0.4))", "(assert (and (<= X_9 0.4) (>= Y_0 0)))")
        return lines, k, "mixing both"
    if name == "declared_twice":
        lines, k = _edit(base, "(declare-const Y_0 Real)", "(declare-const X_4 Real)")
        return lines, k, "X_4 is declared twice (first on line 6)"
    if name == "not_real":
        lines, k = _edit(base, "(declare-const X_2 Real)", "(declare-const X_2 Int)")
        return lines, k, "expected type Real for X_2, got 'Int'"
    if name == "unknown_command":
        lines = [*base, "(check-sat)"]
        return lines, len(lines), "expected (declare-const ...) or (assert ...), got (check-sat ...)"
    raise AssertionError(name)


CASES = ["missing_upper_bound", "missing_lower_bound", "lower_above_upper", "wrong_count", "garbage_token",
         "garbage_in_assert", "unclosed_paren", "extra_paren", "undeclared_variable", "non_numeric_constant",
         "strict_inequality", "disjunction_over_inputs", "inputs_and_outputs_mixed", "declared_twice", "not_real",
         "unknown_command"]


@pytest.mark.parametrize("name", CASES)
def test_a_malformed_file_is_one_line_naming_the_file_and_line(tmp_path, name):
    lines, line, what = _case(name)
    f = tmp_path / f"{name}.vnnlib"
    f.write_text("\n".join(lines) + "\n")
    if name != "wrong_count":  # the count is checked against the model
        with pytest.raises(VnnlibError) as info:
            read_vnnlib(f)
        assert info.value.line == line and what in info.value.message, str(info.value)
    r = _run("verify", _box_spec(tmp_path, f))
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    out = r.output.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"error: {f}: line {line}: "), r.output
    assert what in out[0] and "Traceback" not in r.output, out[0]


def test_the_parser_reads_the_subset_it_documents():
    text = """; comment (with parentheses)
    (declare-const X_0 Real) (declare-const X_1 Real)
    (declare-const X_2 Real)  ; trailing comment
    (assert (and (>= X_0 -1.5E-2) (<= X_0 +2.)))
    (assert (<= 0.25 X_1)) (assert (>= 0.75 X_1)) (assert (>= X_1 0.3))   ; repeated bounds intersect
    (assert (= X_2 (- .5)))
    """
    box = parse_vnnlib(text, "t.vnnlib")
    assert box.lower.tolist() == [-0.015, 0.3, -0.5] and box.upper.tolist() == [2.0, 0.75, -0.5]
    assert box.lower_lines == (4, 5, 6) and box.ignored_lines == () and box.outputs == 0
    for bad, why in [("", "got none"), ("(declare-const X_1 Real)(assert (<= X_1 1))(assert (>= X_1 0))",
                                        "X_0 is not declared"),
                     ("(declare-const X_0 Real)(assert (<= X_0 1e999))", "expected a finite number"),
                     ("(declare-const Z Real)", "expected a variable named X_i or Y_j"),
                     ("(" * 300, "nested parentheses")]:
        with pytest.raises(VnnlibError, match=re.escape(why)):
            parse_vnnlib(bad, "t.vnnlib")


def test_output_constraints_are_ignored_and_counted():
    text = "\n".join(_vnnlib_text(n=2)) + "\n(assert (<= Y_0 Y_1))\n"
    box = parse_vnnlib(text, "t.vnnlib")
    assert box.ignored_lines == (10, 11) and box.size == 2
    assert any("2 output constraint(s)" in n and "10, 11" in n for n in box.notes())
    with pytest.raises(VnnlibError, match=r"line 11: .*got 'banana'"):
        parse_vnnlib(text.replace("(<= Y_0 Y_1)", "(<= Y_0 banana)"), "t.vnnlib")


# ---------------------------------------------------------------- spec interplay


def test_epsilon_and_vnnlib_together_is_an_error_naming_both(tmp_path):
    p = _box_spec(tmp_path, SHIPPED["mnist_fc_0"], model=FC,
                  perturbation={"input": {"vnnlib": str(SHIPPED["mnist_fc_0"]), "epsilon": 0.01}})
    with pytest.raises(SpecError) as info:
        load_spec(p)
    assert info.value.key == "perturbation.input.vnnlib"
    assert "perturbation.input.epsilon" in info.value.message and "perturbation.input.vnnlib" in info.value.message
    r = _run("verify", p)
    assert r.exit_code == ExitCode.BAD_INPUT and len(r.output.strip().splitlines()) == 1, r.output
    # so does --epsilon on a box spec
    r = _run("verify", _box_spec(tmp_path, SHIPPED["mnist_fc_0"], model=FC), "--epsilon", 0.1)
    assert r.exit_code == ExitCode.BAD_INPUT and "got both" in r.output, r.output


@pytest.mark.parametrize("section,key,what", [
    ({"data": {"dataset": "mnist_sample"}}, "data", "expected either data.dataset or perturbation.input.vnnlib"),
    ({"data": {"end": 3}}, "data", "expected start 0 and end null or 1"),
    ({"data": {"reshape": [784]}}, "data.reshape", "expected null with perturbation.input.vnnlib"),
    ({"radius": {"search": True}}, "radius.search", "there is no ε to search"),
    ({"second_order": {"literature": True}}, "second_order.literature", "ε-ball"),
    ({"perturbation": {"input": {"vnnlib": "VNN", "norm": "l2"}}}, "perturbation.input.norm", "expected inf"),
    ({"perturbation": {"input": {"vnnlib": "p.onnx"}}}, "perturbation.input.vnnlib", "ending in .vnnlib"),
])
def test_what_a_box_spec_refuses(tmp_path, section, key, what):
    if "perturbation" in section:
        v = section["perturbation"]["input"]["vnnlib"]
        section["perturbation"]["input"]["vnnlib"] = str(SHIPPED["mnist_fc_0"]) if v == "VNN" else v
    p = _box_spec(tmp_path, SHIPPED["mnist_fc_0"], model=FC, **section)
    with pytest.raises(SpecError) as info:
        load_spec(p)
    assert info.value.key == key and what in info.value.message, str(info.value)


def test_a_spec_without_data_or_vnnlib_still_needs_data(tmp_path):
    p = _box_spec(tmp_path, SHIPPED["mnist_fc_0"], model=FC, perturbation={"input": {"epsilon": 0.01}})
    with pytest.raises(SpecError) as info:
        load_spec(p)
    assert info.value.key == "data" and "got neither" in info.value.message
    p = _box_spec(tmp_path, SHIPPED["mnist_fc_0"], model=FC, perturbation={"input": {"norm": "inf"}})
    with pytest.raises(SpecError, match="perturbation.input.epsilon: missing required key"):
        load_spec(p)


def test_target_label_with_a_box_is_an_error_naming_the_key(tmp_path):
    r = _run("verify", _box_spec(tmp_path, SHIPPED["mnist_fc_0"], model=FC, explanation={"target": "label"}))
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    (line,) = r.output.strip().splitlines()
    assert "spec.yaml: explanation.target: label needs the inputs' labels" in line and "vnnlib" in line


def test_the_resolved_box_spec_round_trips_and_batches_one_input(tmp_path):
    from verigrad.batch import expand
    from verigrad.spec import dump_spec

    p = _box_spec(tmp_path, SHIPPED["mnist_fc_0"], model=FC)
    spec = load_spec(p)
    again = tmp_path / "again.yaml"
    again.write_text(dump_spec(spec))
    assert load_spec(again) == spec and spec.vnnlib == SHIPPED["mnist_fc_0"].resolve()
    (task,) = expand([p])
    assert task.index == 0 and task.data_index == 0


def test_a_float32_run_certifies_a_box_containing_the_files(tmp_path):
    spec = load_spec(_box_spec(tmp_path, SHIPPED["mnist_fc_0"], model=FC, bounds={"methods": ["ibp"],
                                                                                  "dtype": "float32"}))
    problem = vmod.prepare(spec)
    box = vmod.threat_for(problem, 0, 0).box
    vb = read_vnnlib(SHIPPED["mnist_fc_0"])
    assert box.lower.dtype == torch.float32
    assert bool((box.lower.flatten().double() <= torch.from_numpy(vb.lower)).all())
    assert bool((box.upper.flatten().double() >= torch.from_numpy(vb.upper)).all())


# ---------------------------------------------------------------- data adapters


def _data_spec(tmp_path: Path, data: dict, **over) -> Path:
    d: dict = {
        "model": {"path": FC},
        "data": data,
        "explanation": {"target": 3},
        "perturbation": {"input": {"epsilon": 0.001}},
        "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1000.0}],
        "bounds": {"methods": ["ibp"]},
        "attack": {"order": "skip"},
        "general": {"results": str(tmp_path / "res")},
    }
    d.update(over)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def _mnist(n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_dataset("mnist_sample", start=0, end=n)
    return x.numpy(), y.numpy()


def test_data_reshape_turns_flat_or_2d_samples_into_the_models_shape(tmp_path):
    x, y = _mnist()
    f = tmp_path / "flat.npz"
    np.savez(f, x=x.reshape(2, 784), y=y)
    r = _run("verify", _data_spec(tmp_path, {"path": str(f)}))
    assert r.exit_code == ExitCode.BAD_INPUT and "set data.reshape: [1, 28, 28]" in r.output, r.output
    problem = vmod.prepare(load_spec(_data_spec(tmp_path, {"path": str(f), "reshape": [1, 28, 28]})))
    assert problem.x.shape == (2, 1, 28, 28) and torch.equal(problem.x.float(), torch.from_numpy(x))
    np.savez(f, x=x.reshape(2, 28, 28), y=y)
    r = _run("verify", _data_spec(tmp_path, {"path": str(f), "reshape": [1, 28, 28]}))
    assert r.exit_code == ExitCode.CERTIFIED, r.output


def test_a_data_reshape_of_another_size_is_exit_2_naming_the_key_file_and_sizes(tmp_path):
    x, y = _mnist()
    f = tmp_path / "img.npz"
    np.savez(f, x=x.reshape(2, 28, 28), y=y)
    r = _run("verify", _data_spec(tmp_path, {"path": str(f), "reshape": [1, 28, 27]}))
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    (line,) = r.output.strip().splitlines()
    assert "spec.yaml: data.reshape: expected dims with 784 elements" in line and str(f) in line, line
    assert "got [1, 28, 27] (756 elements)" in line and "(28, 28)" in line


def test_a_data_file_without_labels_works_with_an_index_or_predicted_target(tmp_path):
    x, _ = _mnist()
    f = tmp_path / "x_only.npz"
    np.savez(f, x=x)
    for target in (3, "predicted"):
        out = tmp_path / f"r_{target}.json"
        r = _run("verify", _data_spec(tmp_path, {"path": str(f)}, explanation={"target": target}), "--out", out)
        assert r.exit_code == ExitCode.CERTIFIED, r.output
        doc = json.loads(out.read_text())
        assert [i["label"] for i in doc["instances"]] == [None, None]
        assert target == "predicted" or [i["target"] for i in doc["instances"]] == [3, 3]


def test_target_label_without_labels_is_exit_2_naming_the_key(tmp_path):
    x, _ = _mnist()
    f = tmp_path / "x_only.npz"
    np.savez(f, x=x)
    r = _run("verify", _data_spec(tmp_path, {"path": str(f)}, explanation={"target": "label"}))
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    (line,) = r.output.strip().splitlines()
    assert "spec.yaml: explanation.target: label needs the inputs' labels" in line
    assert f"data file {f} has no array 'y'" in line


def test_training_still_requires_labels(tmp_path):
    x, _ = _mnist()
    f = tmp_path / "x_only.npz"
    np.savez(f, x=x)
    from verigrad.data import DataError

    with pytest.raises(DataError, match="missing array"):
        load_dataset(path=f)
    xs, ys = load_dataset(path=f, require_labels=False)
    assert xs.shape == (2, 1, 28, 28) and ys.tolist() == [-1, -1]


def test_a_witness_in_a_vnnlib_box_replays_as_confirmed(tmp_path):
    p = _box_spec(tmp_path, SHIPPED["mnist_fc_1_patch"], model=FC, explanation={"target": "predicted"},
                  attack={"order": "after", "steps": 5, "restarts": 1},
                  properties=[{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1e-6}])
    r = _run("verify", p)
    assert r.exit_code == ExitCode.FALSIFIED, r.output
    (witness,) = (tmp_path / "res/spec.witnesses").glob("*.npz")
    r = _run("replay", witness)
    assert r.exit_code == 1 and "CONFIRMED" in r.output and "inside the box: yes" in r.output, r.output
