"""Bad input files (witnesses, results, target maps, report destinations) give exit 2 and one
line naming the file and the entry or key that is wrong: never a traceback, exit 4, click's
"Aborted!" or a silent wrong answer."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

import verigrad.cli
from verigrad import properties as props

ROOT = Path(__file__).resolve().parents[1]
FC = str(ROOT / "examples" / "models" / "mnist_fc.onnx")
L2 = {"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1e-9}


def _spec(folder: Path, **over) -> Path:
    d = {
        "model": {"path": FC},
        "data": {"dataset": "mnist_sample", "start": 0, "end": 2},
        "perturbation": {"input": {"epsilon": 0.02}},
        "properties": [L2],
        "bounds": {"methods": ["ibp"]},
        "attack": {"order": "after"},
        "general": {"results": str(folder / "res")},
        **over,
    }
    p = folder / "spec.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _run(*args):
    return CliRunner().invoke(verigrad.cli.main, [str(a) for a in args])


def _one_line_error(r, code: int, *needles: str) -> None:
    """Exit ``code`` with exactly one line ``error: ...`` that contains every needle."""
    lines = r.output.strip().splitlines()
    assert r.exit_code == code, r.output
    assert isinstance(r.exception, SystemExit), r.exception  # a message, not a traceback
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output and "Aborted" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    """One falsifying ``verify`` run: (results JSON, a witness file)."""
    folder = tmp_path_factory.mktemp("verified")
    r = _run("verify", _spec(folder))
    assert r.exit_code == 1, r.output
    results = folder / "res" / "spec.json"
    doc = json.loads(results.read_text())
    witness = next(a["witness"] for i in doc["instances"] for a in i["attacks"].values() if a["violated"])
    return results, Path(witness)


def _arrays(witness: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(witness) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(str(arrays["meta"]))


# ---------------------------------------------------------------------------------------
# 1. replay of tampered witnesses


def test_replay_of_the_real_witness_confirms(verified):
    r = _run("replay", verified[1])
    assert r.exit_code == 1 and "CONFIRMED" in r.output, r.output


def test_replay_of_an_empty_or_cut_file_is_bad_input(verified, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    _one_line_error(_run("replay", empty), 2, str(empty), "empty")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(verified[1].read_bytes()[:200])
    _one_line_error(_run("replay", cut), 2, str(cut))
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))
    _one_line_error(_run("replay", npy), 2, str(npy), ".npz")


def _meta_set(key, value):
    def f(arrays, meta):
        meta[key] = value
    return f


def _meta_del_spec(key):
    def f(arrays, meta):
        del meta["spec"][key]
    return f


def _raw_meta(text):
    def f(arrays, meta):
        arrays["meta"] = np.array(text)
        return True  # meta written as given
    return f


def _array(key, make):
    def f(arrays, meta):
        arrays[key] = make(arrays[key])
    return f


TAMPERED = {
    "meta-list": (_raw_meta(json.dumps([1, 2])), "'meta'"),
    "meta-not-json": (_raw_meta("not json {"), "'meta'"),
    "meta-number-array": (lambda a, m: a.__setitem__("meta", np.arange(3)) or True, "'meta'"),
    "spec-not-object": (_meta_set("spec", [1]), "'spec'"),
    "spec-without-data": (_meta_del_spec("data"), "spec.data"),
    "index-null": (_meta_set("index", None), "'index'"),
    "index-string": (_meta_set("index", "1"), "'index'"),
    "index-float": (_meta_set("index", 1.5), "'index'"),
    "index-negative": (_meta_set("index", -1), "'index'"),
    "index-outside-data": (_meta_set("index", 10**7), "'index'"),
    "target-null": (_meta_set("target", None), "'target'"),
    "target-bool": (_meta_set("target", True), "'target'"),
    "target-out-of-range": (_meta_set("target", 10), "'target'"),
    "value-null": (_meta_set("value", None), "'value'"),
    "value-string": (_meta_set("value", "2.3"), "'value'"),
    "property-null": (_meta_set("property", None), "'property'"),
    "property-unknown": (_meta_set("property", "nope"), "'property'"),
    "param-arrays-missing": (_meta_set("param_layers", ["/fc3/Gemm"]), "param//fc3/Gemm/weight"),
    "param-layers-not-list": (_meta_set("param_layers", "fc3"), "'param_layers'"),
    "x-strings": (_array("x", lambda x: np.full(x.shape, "a")), "'x'"),
    "x-complex": (_array("x", lambda x: x.astype(np.complex128)), "'x'"),
    "x-bool": (_array("x", lambda x: x > 0.5), "'x'"),
    "x-wrong-shape": (_array("x", lambda x: x.reshape(1, -1)), "'x'"),
    "x-wrong-input-shape": (_array("x", lambda x: x[..., :14]), "'x'"),
    "x-nan": (_array("x", lambda x: np.where(x > 0.5, np.nan, x)), "'x'"),
    "x0-missing": (lambda a, m: a.pop("x0") is None, "x0"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_replay_of_a_tampered_witness_is_one_line_naming_the_entry(verified, tmp_path, case):
    arrays, meta = _arrays(verified[1])
    tamper, needle = TAMPERED[case]
    raw = tamper(arrays, meta)
    if raw is not True:
        arrays["meta"] = np.array(json.dumps(meta))
    bad = tmp_path / f"{case}.npz"
    np.savez(bad, **arrays)
    _one_line_error(_run("replay", bad), 2, str(bad), needle)


def test_replay_of_a_witness_with_wrong_parameter_shapes(tmp_path):
    spec = _spec(tmp_path, perturbation={"input": {"epsilon": 0.02},
                                         "parameters": {"gamma": 0.02, "layers": ["/fc3/Gemm"]}})
    assert _run("verify", spec).exit_code == 1
    witness = next((tmp_path / "res" / "spec.witnesses").glob("*.npz"))
    assert _run("replay", witness).exit_code == 1
    arrays, meta = _arrays(witness)
    arrays["param//fc3/Gemm/bias"] = arrays["param//fc3/Gemm/bias"][:5]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    _one_line_error(_run("replay", bad), 2, str(bad), "param//fc3/Gemm/bias", "(10,)")
    arrays, meta = _arrays(witness)
    arrays["param//fc1/Gemm/weight"] = arrays["param//fc3/Gemm/weight"]
    arrays["param//fc1/Gemm/bias"] = arrays["param//fc3/Gemm/bias"]
    meta["param_layers"] = ["/fc3/Gemm", "/fc1/Gemm"]
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(bad, **arrays)
    _one_line_error(_run("replay", bad), 2, str(bad), "/fc1/Gemm")


# ---------------------------------------------------------------------------------------
# 2. report on malformed results


def _results_copy(verified, tmp_path, change=None, name="r.json") -> Path:
    doc = json.loads(verified[0].read_text())
    if change is not None:
        change(doc)
    out = tmp_path / name
    out.write_text(json.dumps(doc))
    return out


def test_report_of_the_real_results_works(verified, tmp_path):
    r = _run("report", verified[0], "--html", tmp_path / "ok.html")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ok.html").is_file()


def _set(path, value):
    def f(doc):
        *head, last = path
        d = doc
        for k in head:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    return f


MALFORMED = {
    "index-missing": (_set(["instances", 1, "index"], KeyError), "instances[1].index"),
    "index-string": (_set(["instances", 0, "index"], "0"), "instances[0].index"),
    "index-float": (_set(["instances", 0, "index"], 0.5), "instances[0].index"),
    "instances-mapping": (lambda d: d.__setitem__("instances", {"0": d["instances"][0]}), "instances"),
    "instance-string": (_set(["instances", 0], "oops"), "instances[0]"),
    "engines-list": (_set(["instances", 0, "engines"], ["ibp"]), "instances[0].engines"),
    "engine-string": (_set(["instances", 0, "engines", "ibp"], "ibp"), "instances[0].engines.ibp"),
    "engine-property-name": (_set(["instances", 0, "engines", "ibp", "properties", 0, "name"], KeyError),
                             "instances[0].engines.ibp.properties[0].name"),
    "attack-string": (_set(["instances", 0, "attacks", "l2"], "x"), "instances[0].attacks.l2"),
    "witness-number": (_set(["instances", 0, "attacks", "l2", "witness"], 3), "instances[0].attacks.l2.witness"),
    "properties-object": (_set(["properties"], {"l2": {}}), "properties"),
    "property-name-missing": (_set(["properties", 0, "name"], KeyError), "properties[0].name"),
    "spec-string": (_set(["spec"], "spec.yaml"), "spec"),
    "summary-exit-code": (_set(["summary", "exit_code"], "one"), "summary.exit_code"),
    "methods-string": (_set(["methods"], "ibp"), "methods"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_report_of_malformed_results_names_the_json_path(verified, tmp_path, case):
    change, where = MALFORMED[case]
    bad = _results_copy(verified, tmp_path, change)
    _one_line_error(_run("report", bad, "--html", tmp_path / "r.html"), 2, str(bad), where)


def test_report_of_results_that_are_not_json_or_not_utf8(tmp_path):
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"schema": "verigrad.results/1", ')
    _one_line_error(_run("report", garbage), 2, str(garbage), "does not parse")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    _one_line_error(_run("report", binary), 2, str(binary), "not text")


def _batch(verified, tmp_path, **over) -> Path:
    doc = json.loads(verified[0].read_text())
    out = tmp_path / "batch"
    out.mkdir()
    rec = {"spec": doc["spec"]["source"], "spec_sha256": doc["spec"]["sha256"], "data_index": 0, "status": "done",
           "reason": None, "seconds": 1.0, "result": doc["instances"][0]}
    good = {**rec, "data_index": 1, "result": doc["instances"][1]}
    (out / "results.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**rec, **over}) + "\n")
    return out


def test_report_of_a_valid_handmade_batch_works(verified, tmp_path):
    r = _run("report", _batch(verified, tmp_path), "--max-instances", "0")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("over,where", [({"data_index": "0"}, "data_index"), ({"data_index": 1.5}, "data_index"),
                                        ({"data_index": None}, "data_index"), ({"status": 3}, "status"),
                                        ({"result": "done"}, "result"),
                                        ({"result": {"engines": {"ibp": 1}}}, "result.engines.ibp")])
def test_report_of_malformed_batch_records_names_line_and_key(verified, tmp_path, over, where):
    out = _batch(verified, tmp_path, **over)
    _one_line_error(_run("report", out), 2, str(out / "results.jsonl"), "line 2", where)


def test_report_of_batch_records_that_are_not_utf8(tmp_path):
    out = tmp_path / "batch"
    out.mkdir()
    (out / "results.jsonl").write_bytes(b'{"spec": "\xff"}\n')
    _one_line_error(_run("report", out), 2, str(out / "results.jsonl"), "UTF-8")


def test_report_with_a_missing_or_mismatched_npz(verified, tmp_path):
    res = _results_copy(verified, tmp_path)
    gone = tmp_path / "gone.npz"
    _one_line_error(_run("report", res, "--bounds-npz", gone), 2, str(gone))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    _one_line_error(_run("report", res, "--bounds-npz", empty), 2, str(empty), "empty")
    not_zip = tmp_path / "r.npz"  # the default beside the JSON
    not_zip.write_text("hello")
    _one_line_error(_run("report", res), 2, str(not_zip))
    with np.load(verified[0].with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    other = tmp_path / "other.npz"
    np.savez(other, **{k.replace("i0/", "i7/").replace("i1/", "i8/"): v for k, v in arrays.items()})
    _one_line_error(_run("report", res, "--bounds-npz", other), 2, str(other), "another run")
    shapes = tmp_path / "shapes.npz"
    np.savez(shapes, **{**arrays, "i0/ibp/upper": arrays["i0/ibp/upper"][..., :5]})
    _one_line_error(_run("report", res, "--bounds-npz", shapes), 2, str(shapes), "i0/ibp/upper")
    strings = tmp_path / "strings.npz"
    np.savez(strings, **{**arrays, "i0/ibp/lower": np.full(arrays["i0/ibp/lower"].shape, "x")})
    _one_line_error(_run("report", res, "--bounds-npz", strings), 2, str(strings), "i0/ibp/lower")


def test_report_with_a_broken_witness_is_a_note(verified, tmp_path):
    res = _results_copy(verified, tmp_path)
    doc = json.loads(res.read_text())
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"")
    listed = tmp_path / "listed.npz"
    arrays, _ = _arrays(verified[1])
    np.savez(listed, **{**arrays, "meta": np.array("[1]")})
    doc["instances"][0]["attacks"]["l2"]["witness"] = str(broken)
    doc["instances"][1]["attacks"]["l2"]["witness"] = str(listed)
    res.write_text(json.dumps(doc))
    r = _run("report", res, "--html", tmp_path / "w.html")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "w.html").read_text()
    assert f"cannot read {broken}" in text and f"cannot read {listed}" in text


# ---------------------------------------------------------------------------------------
# 3. target maps from files


def _target_file(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"target_{kind}.npy"
    shape = (1, 28, 28)
    if kind == "npz":
        with open(p, "wb") as f:
            np.savez(f, a=np.zeros(shape))
    elif kind == "strings":
        np.save(p, np.full(shape, "a"))
    elif kind == "objects":
        np.save(p, np.empty(shape, dtype=object), allow_pickle=True)
    elif kind == "complex":
        np.save(p, np.zeros(shape, np.complex128) + 1j)
    elif kind == "text":
        p.write_text("0 1 2\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "cut":
        np.save(p, np.zeros(shape))
        p.write_bytes(p.read_bytes()[:100])
    return p


BAD_TARGETS = ["npz", "strings", "objects", "complex", "text", "empty", "cut"]


@pytest.mark.parametrize("kind", BAD_TARGETS)
def test_file_map_rejects_what_is_not_a_real_npy(tmp_path, kind):
    p = _target_file(tmp_path, kind)
    with pytest.raises(ValueError) as e:
        props.file_map(p, (1, 28, 28))
    assert str(p) in str(e.value) and type(e.value) is ValueError


def test_file_map_still_reads_real_arrays(tmp_path):
    for dtype in (np.float32, np.int64, np.bool_):
        p = tmp_path / "ok.npy"
        np.save(p, np.ones((1, 28, 28), dtype))
        t = props.file_map(p, (1, 28, 28))
        assert t.dtype == torch.float64 and float(t.sum()) == 784.0


def test_gaussian_and_square_maps_reject_bad_parameters():
    with pytest.raises(ValueError, match="sigma"):
        props.gaussian_map((1, 4, 4), (1.0, 1.0), 0.0, 1.0)
    with pytest.raises(ValueError, match="finite"):
        props.gaussian_map((1, 4, 4), (1.0, float("nan")), 1.0, 1.0)
    with pytest.raises(ValueError, match="position"):
        props.square_map((1, 4, 4), (-1, 0), 2, 1.0)
    with pytest.raises(ValueError, match="size"):
        props.square_map((1, 4, 4), (0, 0), 0, 1.0)
    assert float(props.square_map((1, 4, 4), (1, 1), 2, 1.0).sum()) == 4.0


@pytest.mark.parametrize("kind", ["npz", "strings", "complex", "text", "empty"])
def test_verify_with_a_bad_target_file_names_the_spec_key(tmp_path, kind):
    p = _target_file(tmp_path, kind)
    spec = _spec(tmp_path, properties=[{"name": "t", "kind": "targeted", "metric": "l2", "threshold": 1.0,
                                        "target": {"type": "file", "path": str(p)}}])
    _one_line_error(_run("verify", spec), 2, "properties[0]", p.name)


# ---------------------------------------------------------------------------------------
# 4. report destinations


def test_report_html_under_a_plain_file(verified, tmp_path):
    res = _results_copy(verified, tmp_path)
    plain = tmp_path / "plain"
    plain.write_text("x")
    page = plain / "sub" / "r.html"
    _one_line_error(_run("report", res, "--html", page), 2, str(page), "is a file")
    assert not list(tmp_path.glob("*_files"))  # nothing rendered


def test_report_html_that_is_a_directory(verified, tmp_path):
    res = _results_copy(verified, tmp_path)
    folder = tmp_path / "page.html"
    folder.mkdir()
    r = _run("report", res, "--html", folder)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output


def test_report_files_folder_is_a_plain_file(verified, tmp_path):
    res = _results_copy(verified, tmp_path)
    (tmp_path / "r_files").write_text("x")
    _one_line_error(_run("report", res, "--html", tmp_path / "r.html"), 2, str(tmp_path / "r_files"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_report_html_in_a_read_only_directory(verified, tmp_path):
    res = _results_copy(verified, tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        page = ro / "r.html"
        _one_line_error(_run("report", res, "--html", page), 2, str(page), "not writable")
    finally:
        ro.chmod(0o755)
        shutil.rmtree(ro)
