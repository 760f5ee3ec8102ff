"""Hostile spec files are bad input (exit 2, one line naming the file), never a hang, a
RecursionError, a raw Unicode/YAML error or an allocation the run cannot make: size, file
type and encoding are checked before parsing; nesting, aliases and keys while composing;
counts that size an allocation have a declared maximum; a training config writes only
inside its results directory and refuses labels its model has no class for."""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from verigrad.cli import main
from verigrad.spec import MAX_DEPTH, MAX_FILE_BYTES, MAX_VALUES, SpecError, load_spec
from verigrad.training.trainer import load_train_config, train

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples/models/mnist_fc.onnx")

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _base(tmp_path: Path) -> dict:
    return {"model": {"path": FC}, "data": {"dataset": "mnist_sample", "start": 0, "end": 1},
            "perturbation": {"input": {"epsilon": 0.01}},
            "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1000.0}],
            "bounds": {"methods": ["ibp"]}, "attack": {"order": "skip"},
            "general": {"results": str(tmp_path / "res")}}


def _write(tmp_path: Path, content: str | bytes, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def _with(tmp_path: Path, dotted: str, value: Any) -> str:
    d = copy.deepcopy(_base(tmp_path))
    node = d
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return yaml.safe_dump(d)


def _bad_input(path: Path, *must: str, command: str = "verify") -> str:
    """Run the CLI on ``path``: exit 2, one line 'error: <file>: ...' with no traceback."""
    r = CliRunner().invoke(main, [command, str(path)])
    out = r.output
    assert r.exit_code == 2, out
    assert "Traceback" not in out and "INTERNAL ERROR" not in out, out
    lines = out.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert str(path) in lines[0], out
    for m in must:
        assert m in lines[0], out
    return lines[0]


def _spec_error(path: Path, key: str = "", *must: str, loader=load_spec) -> SpecError:
    with pytest.raises(SpecError) as info:
        loader(path)
    e = info.value
    assert e.source == str(path) and e.key == key, (e.key, str(e))
    for m in must:
        assert m in e.message, e.message
    return e


def test_the_base_spec_is_valid(tmp_path):
    p = _write(tmp_path, yaml.safe_dump(_base(tmp_path)))
    assert load_spec(p).data.end == 1
    # a UTF-8 byte-order mark is fine, and so are anchors and aliases used sensibly
    _write(tmp_path, "\ufeff" + yaml.safe_dump(_base(tmp_path)))
    assert load_spec(p).data.end == 1
    d = _base(tmp_path)
    text = yaml.safe_dump(d).replace("epsilon: 0.01", "epsilon: &eps 0.01")
    assert "&eps" in text
    _write(tmp_path, text + "radius:\n  eps_max: *eps\n")
    assert load_spec(p).radius.eps_max == 0.01


# ----------------------------------------------------------------------------------------
# 1. the file itself: size, type, encoding (checked before YAML sees it)


def test_an_oversized_file_fails_fast_before_it_is_parsed(tmp_path):
    text = yaml.safe_dump(_base(tmp_path)) + "# " + "x" * (8 << 20) + "\n"  # 8 MB
    p = _write(tmp_path, text)
    t = time.perf_counter()
    _spec_error(p, "", f"more than the limit of {MAX_FILE_BYTES} bytes", str(len(text)))
    _bad_input(p, "1 MiB")
    assert time.perf_counter() - t < 2.0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_opening_it(tmp_path):
    p = tmp_path / "spec.yaml"
    os.mkfifo(p)  # opening it for reading would block until a writer came
    t = time.perf_counter()
    _spec_error(p, "", "not a regular file")
    _bad_input(p, "not a regular file")
    assert time.perf_counter() - t < 2.0


def test_a_directory_is_refused(tmp_path):
    d = tmp_path / "spec.yaml"
    d.mkdir()
    _spec_error(d, "", "is a directory")
    with pytest.raises(SpecError, match="is a directory"):
        load_train_config(d)


def test_a_missing_file_is_bad_input(tmp_path):
    _spec_error(tmp_path / "nope.yaml", "", "cannot read spec file")


@pytest.mark.parametrize("encode, must", [
    (lambda t: (t + "# café\n").encode("latin-1"), ["not UTF-8 text", "byte 0xe9 at byte offset"]),
    (lambda t: t.encode("utf-16"), ["UTF-16", "byte offset 0"]),
    (lambda t: t.encode("utf-16-le"), ["binary", "NUL byte at byte offset 1"]),  # no BOM
    (lambda t: t.encode() + bytes(range(256)), ["binary", "NUL byte at byte offset"]),
    (lambda t: t.encode() + b"\x89PNG\r\n\x1a\n", ["not UTF-8 text", "byte 0x89"]),
    (lambda t: t.encode() + b"x: \x07\n", ["YAML error at line", "#x0007"]),  # a control character
])
def test_text_that_is_not_utf8_names_the_byte_offset(tmp_path, encode, must):
    p = _write(tmp_path, encode(yaml.safe_dump(_base(tmp_path))))
    _spec_error(p, "", *must)
    _bad_input(p, *must)


def test_the_latin1_offset_is_the_offending_byte(tmp_path):
    text = yaml.safe_dump(_base(tmp_path))
    data = (text + "# café\n").encode("latin-1")
    e = _spec_error(_write(tmp_path, data), "")
    assert f"byte offset {data.index(0xE9)} " in e.message


# ----------------------------------------------------------------------------------------
# 2. YAML structure: keys, nesting, aliases, unreadable scalars


@pytest.mark.parametrize("snippet, key, must", [
    ("model:\n  ? [a, b]\n  : 1\n", "model", ["a list key"]),
    ("model:\n  ? {a: 1}\n  : 1\n", "model", ["a mapping key"]),
    ("? [a, b]\n: 1\n", "", ["a list key"]),
    ("bounds:\n  alpha_crown:\n    1: 2\n", "bounds.alpha_crown", ["the int key 1"]),
    ("attack:\n  null: 2\n", "attack", ["the null key"]),
    ("properties:\n- kind: sign\n  true: 1\n", "properties[0]", ["the bool key true"]),
])
def test_complex_and_non_string_keys_name_the_key_path(tmp_path, snippet, key, must):
    d = _base(tmp_path)
    top = snippet.split(":", 1)[0]
    if top in d:
        d.pop(top)
    p = _write(tmp_path, yaml.safe_dump(d) + snippet)
    _spec_error(p, key, "expected a key name (a string)", *must)
    _bad_input(p, "expected a key name (a string)", *must)


@pytest.mark.parametrize("text", ["a: " + "[" * 20_000, "a: " + "{b: " * 20_000, "- " * 20_000 + "1\n"])
def test_deep_nesting_is_refused_without_recursion_error(tmp_path, text):
    p = _write(tmp_path, text)
    t = time.perf_counter()
    _spec_error(p, "", f"nested more than {MAX_DEPTH} levels deep")
    _bad_input(p, "nested more than")
    assert time.perf_counter() - t < 5.0


def test_nesting_within_the_limit_is_still_a_schema_error(tmp_path):
    p = _write(tmp_path, _with(tmp_path, "general.seed", [[[[[[1]]]]]]))
    _spec_error(p, "general.seed", "expected an int")


def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["top", "properties", "seed"])
def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path, where):
    bomb = _alias_bomb()
    if where == "top":
        text = bomb
    else:
        # the bomb inside a key the schema checks (its message would echo the value)
        d = _base(tmp_path)
        key = {"properties": "properties", "seed": "general"}[where]
        d.pop(key)
        body = yaml.safe_dump(d)
        nested = bomb.replace("\n", "\n    ").rstrip()
        text = body + ("x:\n    " + nested + "\nproperties: *a8\n" if where == "properties"
                       else "general:\n  seed:\n    " + nested + "\n")
    p = _write(tmp_path, text)
    t = time.perf_counter()
    e = _spec_error(p, "", f"more than {MAX_VALUES} values with aliases expanded")
    line = _bad_input(p, "alias")
    assert time.perf_counter() - t < 2.0
    assert "lol" not in e.message and "lol" not in line and len(line) < 400


def test_a_recursive_alias_is_refused(tmp_path):
    p = _write(tmp_path, "a: &x [1, *x]\n")
    _spec_error(p, "", "recursive")


@pytest.mark.parametrize("value, must", [
    ("2020-13-45", "month must be in 1..12"),  # a YAML timestamp that is no date
    ("1" * 5000, "4300 digits"),  # more digits than Python converts
])
def test_unreadable_scalars_are_yaml_errors(tmp_path, value, must):
    text = yaml.safe_dump(_base(tmp_path)).replace("general:\n", f"general:\n  seed: {value}\n")
    p = _write(tmp_path, text)
    e = _spec_error(p, "", "YAML error at line", must)
    assert len(e.message) < 400  # the value is shown truncated
    _bad_input(p, must)


# ----------------------------------------------------------------------------------------
# 3. counts that size an allocation or a loop have a declared maximum


@pytest.mark.parametrize("dotted, value, allowed", [
    ("explanation.integrated_gradients", {"steps": 10**12}, "expected an int in [1, 10000], got 1000000000000"),
    ("explanation.smoothing", {"samples": 10**12}, "expected an int in [1, 10000000]"),
    ("explanation.smoothing", {"batch_size": 10**9}, "expected an int in [1, 65536]"),
    ("explanation.smoothing", {"seed": 2**70}, "expected an int in [0, 4294967295] or null"),
    ("attack.steps", 10**9, "expected an int in [1, 100000]"),
    ("attack.restarts", 10**9, "expected an int in [1, 10000]"),
    ("attack.noise_samples", 10**9, "expected an int in [1, 10000]"),
    ("attack.sensitivity_samples", 10**9, "expected an int in [1, 10000]"),
    ("attack.seed", 2**64, "expected an int in [0, 4294967295] or null"),
    ("radius.iterations", 10**6, "expected an int in [1, 100]"),
    ("second_order.hutchinson_samples", 10**9, "expected an int in [1, 100000]"),
    ("bounds.alpha_crown", {"iterations": 10**9}, "expected an int in [1, 100000]"),
    ("bounds.crown", {"memory_mb": 1e12}, "expected a number > 0 and <= 1048576 or null"),
    ("general.seed", 2**70, "expected an int in [0, 4294967295], got 1180591620717411303424"),
    ("general.seed", -1, "expected an int in [0, 4294967295], got -1"),
])
def test_counts_beyond_what_a_run_can_allocate_are_refused(tmp_path, dotted, value, allowed):
    p = _write(tmp_path, _with(tmp_path, dotted, value))
    key = dotted if not isinstance(value, dict) else f"{dotted}.{next(iter(value))}"
    _spec_error(p, key, allowed)
    _bad_input(p, key, allowed)


def test_the_limits_admit_their_maximum(tmp_path):
    d = _base(tmp_path)
    d["explanation"] = {"integrated_gradients": {"steps": 10_000}, "smoothing": {"seed": 2**32 - 1}}
    d["general"]["seed"] = 2**32 - 1
    d["radius"] = {"iterations": 100}
    p = _write(tmp_path, yaml.safe_dump(d))
    s = load_spec(p)
    assert s.explanation.integrated_gradients.steps == 10_000 and s.general.seed == 2**32 - 1


# ----------------------------------------------------------------------------------------
# 4. the training config


def _train_cfg(tmp_path: Path, **over: Any) -> dict:
    d = {"model": {"input_shape": [1, 28, 28], "architecture": {"kind": "fc", "hidden": [4]}},
         "data": {"dataset": "mnist_sample", "start": 0, "end": 20},
         "optimizer": {"epochs": 1, "batch_size": 20},
         "regularizer": {"name": "none"},
         "general": {"name": "tiny", "results": str(tmp_path / "out"), "progress": False}}
    for dotted, v in over.items():
        node = d
        parts = dotted.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = v
    return d


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", ".hidden", "..", "x" * 200, "", "a b", "naïve"])
def test_a_training_name_cannot_leave_the_results_directory(tmp_path, name):
    p = _write(tmp_path, yaml.safe_dump(_train_cfg(tmp_path, general__name=name)), "train.yaml")
    _spec_error(p, "general.name", "expected a file name", loader=load_train_config)
    _bad_input(p, "general.name", command="train")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "x.onnx").exists()


def test_ordinary_training_names_are_fine(tmp_path):
    for name in ["model", "mnist_fc-v2.1", "A_b-3"]:
        p = _write(tmp_path, yaml.safe_dump(_train_cfg(tmp_path, general__name=name)), "train.yaml")
        assert load_train_config(p).general.name == name


@pytest.mark.parametrize("dotted, value, allowed", [
    ("optimizer__epochs", 10**9, "expected an int in [1, 100000]"),
    ("optimizer__batch_size", 10**9, "expected an int in [1, 65536]"),
    ("general__seed", 2**70, "expected an int in [0, 4294967295]"),
    ("model__classes", 10**9, "expected an int in [2, 100000]"),
    ("model__architecture__hidden", [10**6], "expected an int in [1, 16384]"),
    ("model__architecture__channels", [10**6], "expected an int in [1, 1024]"),
    ("regularizer__pgd_steps", 10**9, "expected an int in [1, 1000]"),
    ("regularizer__samples", 10**9, "expected an int in [1, 1000]"),
])
def test_training_counts_have_a_maximum(tmp_path, dotted, value, allowed):
    p = _write(tmp_path, yaml.safe_dump(_train_cfg(tmp_path, **{dotted: value})), "train.yaml")
    key = dotted.replace("__", ".") + ("[0]" if isinstance(value, list) else "")
    _spec_error(p, key, allowed, loader=load_train_config)
    _bad_input(p, key, allowed, command="train")


def test_too_few_classes_for_the_labels_is_refused_before_training(tmp_path):
    p = _write(tmp_path, yaml.safe_dump(_train_cfg(tmp_path, model__classes=3)), "train.yaml")
    cfg = load_train_config(p)  # the schema cannot know the labels: train() checks before any work
    with pytest.raises(SpecError) as info:
        train(cfg)
    assert info.value.key == "model.classes" and "largest label (9)" in info.value.message, str(info.value)
    assert not (tmp_path / "out").exists()
    _bad_input(p, "model.classes", "largest label (9)", "got 3", command="train")


def test_the_training_config_reader_is_the_hardened_one(tmp_path):
    p = _write(tmp_path, _alias_bomb(), "train.yaml")
    _spec_error(p, "", "aliases expanded", loader=load_train_config)
    p = _write(tmp_path, "a: " + "[" * 20_000, "train.yaml")
    _spec_error(p, "", "nested more than", loader=load_train_config)
    p = _write(tmp_path, yaml.safe_dump(_train_cfg(tmp_path)).encode("utf-16"), "train.yaml")
    _spec_error(p, "", "UTF-16", loader=load_train_config)
