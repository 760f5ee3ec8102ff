"""The YAML spec: round trip, defaults, and one error per class of bad input naming the file
and the key path."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from verigrad.graph.gradient_graph import Output
from verigrad.perturbation import ParamMode
from verigrad.spec import (
    BoundMethod,
    DatasetName,
    Device,
    Dtype,
    GaussianTarget,
    Metric,
    Normalize,
    SpecError,
    SquareTarget,
    TargetClass,
    apply_overrides,
    dump_spec,
    load_spec,
    spec_from_dict,
)

VALID = {
    "model": {"path": "../models/net.onnx", "input_shape": [1, 28, 28], "input_range": [0.0, 1.0],
              "normalization": {"mean": [0.1307], "std": [0.3081]}},
    "data": {"path": "inputs.npz", "start": 0, "end": 10},
    "explanation": {"method": "saliency", "output": "logit", "target": "predicted", "abs": False},
    "perturbation": {"input": {"norm": "inf", "epsilon": 0.01},
                     "parameters": {"mode": "relative", "gamma": 0.01, "layers": "all", "include_bias": True}},
    "properties": [
        {"name": "dev_l2", "kind": "untargeted", "metric": "l2", "threshold": 1.0, "normalize": "none"},
        {"name": "cos", "kind": "untargeted", "metric": "cosine", "threshold": 0.9},
        {"name": "no_blob", "kind": "targeted", "metric": "l2", "threshold": 0.5, "normalize": "l2",
         "target": {"type": "gaussian", "center": [14, 14], "sigma": 3.0, "amplitude": 1.0}},
        {"kind": "targeted", "metric": "linf", "threshold": 0.1,
         "target": {"type": "square", "position": [0, 0], "size": 5, "value": 1.0}},
        {"kind": "targeted", "metric": "cosine", "threshold": 0.5, "target": {"type": "file", "path": "target.npy"}},
    ],
    "bounds": {"methods": ["ibp", "crown"], "dtype": "float64", "combine": "none",
               "ibp": {"product": "midpoint_radius"}, "alpha_crown": {"iterations": 20, "lr": 0.1}},
    "general": {"device": "cpu", "seed": 0, "results": "results"},
}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """specs/ holds the spec and its data; models/ the model (a path relative to the spec)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.onnx").write_bytes(b"")
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    np.savez(spec_dir / "inputs.npz", x=np.zeros((2, 1, 28, 28)), y=np.zeros(2, dtype=int))
    np.save(spec_dir / "target.npy", np.zeros((1, 28, 28)))
    return spec_dir


def write(workdir: Path, doc, name: str = "spec.yaml") -> Path:
    p = workdir / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return p


def edited(**changes) -> dict:
    """VALID with dotted keys set ('perturbation.input.epsilon': -1, 'properties.[2].name': ...);
    the value DELETE removes the key."""
    d = copy.deepcopy(VALID)
    for dotted, val in changes.items():
        node = d
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        last = parts[-1]
        key = int(last[1:-1]) if last.startswith("[") else last
        if val is DELETE:
            del node[key]
        else:
            node[key] = val
    return d


DELETE = object()


def error_for(workdir: Path, doc) -> SpecError:
    path = write(workdir, doc)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value)  # every error names the file
    return e.value


# ----------------------------------------------------------------------------------------
# valid specs


def test_valid_spec_loads_with_resolved_values(workdir):
    s = load_spec(write(workdir, VALID))
    assert s.model.path == (workdir.parent / "models" / "net.onnx").resolve()
    assert s.model.input_shape == (1, 28, 28) and s.model.input_range == (0.0, 1.0)
    assert s.data.path == (workdir / "inputs.npz").resolve() and s.data.dataset is None
    assert s.explanation.output is Output.LOGIT and s.explanation.target is TargetClass.PREDICTED
    assert s.perturbation.parameters.mode is ParamMode.RELATIVE
    assert [p.name for p in s.properties] == ["dev_l2", "cos", "no_blob", "p3_targeted_linf", "p4_targeted_cosine"]
    assert isinstance(s.properties[2].target, GaussianTarget) and s.properties[2].normalize is Normalize.L2
    assert isinstance(s.properties[3].target, SquareTarget) and s.properties[3].metric is Metric.LINF
    assert s.properties[4].target.path == (workdir / "target.npy").resolve()
    assert s.bounds.methods == (BoundMethod.IBP, BoundMethod.CROWN)
    assert s.general.results == (workdir / "results").resolve()


def test_round_trip_through_dump(workdir):
    s = load_spec(write(workdir, VALID))
    text = dump_spec(s)
    # reloadable from anywhere: paths are absolute
    other = workdir.parent / "elsewhere"
    other.mkdir()
    s2 = load_spec(write(other, text, "resolved.yaml"))
    assert s2 == s and s2.hash() == s.hash()
    assert dump_spec(s2).split("\n", 1)[1] == text.split("\n", 1)[1]  # identical but for the header


def test_minimal_spec_gets_every_default(workdir):
    doc = {"model": {"path": "../models/net.onnx"}, "data": {"dataset": "mnist_sample"},
           "perturbation": {"input": {"epsilon": 0.0}},
           "properties": [{"kind": "untargeted", "metric": "l1", "threshold": 2}]}
    s = load_spec(write(workdir, doc))
    assert s.model.input_shape is None and s.model.input_range == (0.0, 1.0) and s.model.normalization is None
    assert s.data.dataset is DatasetName.MNIST_SAMPLE and s.data.start == 0 and s.data.end is None
    assert s.explanation.target is TargetClass.PREDICTED and s.explanation.abs is False
    assert s.perturbation.parameters is None and s.perturbation.input.norm.value == "inf"
    assert s.properties[0].name == "p0_untargeted_l1" and s.properties[0].threshold == 2.0
    assert s.bounds.dtype is Dtype.FLOAT64 and s.bounds.alpha_crown.iterations == 20
    assert s.general.results == (workdir / "results").resolve()
    full = yaml.safe_load(dump_spec(s))
    assert full["bounds"]["ibp"] == {"product": "midpoint_radius"}
    assert full["general"] == {"device": "cpu", "seed": 0, "results": str((workdir / "results").resolve())}


def test_null_input_range_means_unbounded_and_survives_dump(workdir):
    s = load_spec(write(workdir, edited(**{"model.input_range": None})))
    assert s.model.input_range is None
    assert load_spec(write(workdir, dump_spec(s), "again.yaml")).model.input_range is None


def test_crown_chunk_section_defaults_values_and_round_trip(workdir):
    s = load_spec(write(workdir, VALID))
    assert s.bounds.crown.output_chunk == "auto" and s.bounds.crown.chunk is None
    assert s.bounds.crown.memory_mb is None
    assert yaml.safe_load(dump_spec(s))["bounds"]["crown"] == {"output_chunk": "auto", "memory_mb": None}
    t = load_spec(write(workdir, edited(**{"bounds.crown": {"output_chunk": 512, "memory_mb": 1024}}), "t.yaml"))
    assert t.bounds.crown.output_chunk == 512 and t.bounds.crown.chunk == 512 and t.bounds.crown.memory_mb == 1024.0
    assert load_spec(write(workdir, dump_spec(t), "again.yaml")) == t
    u = apply_overrides(t, {"bounds.crown.output_chunk": "auto"})
    assert u.bounds.crown.chunk is None and u.bounds.crown.memory_mb == 1024.0


def test_class_index_target_and_layer_list(workdir):
    s = load_spec(write(workdir, edited(**{"explanation.target": 3, "perturbation.parameters.layers": ["fc0", "fc2"]})))
    assert s.explanation.target == 3 and s.perturbation.parameters.layers == ("fc0", "fc2")


def test_hash_is_stable_and_sensitive(workdir):
    a = load_spec(write(workdir, VALID))
    b = load_spec(write(workdir, VALID, "copy.yaml"))
    assert a.hash() == b.hash() and len(a.hash()) == 64
    c = load_spec(write(workdir, edited(**{"perturbation.input.epsilon": 0.02}), "c.yaml"))
    assert c.hash() != a.hash()


def test_spec_from_dict_resolves_against_base_dir(workdir):
    s = spec_from_dict(VALID, base_dir=workdir)
    assert s.source == "<dict>" and s.data.path == (workdir / "inputs.npz").resolve()
    with pytest.raises(SpecError, match=r"^<dict>: model.path: file not found"):
        spec_from_dict(VALID, base_dir=workdir.parent)


def test_apply_overrides_revalidates(workdir):
    s = load_spec(write(workdir, VALID))
    t = apply_overrides(s, {"bounds.methods": ["alpha-crown"], "perturbation.input.epsilon": 0.05,
                            "general.device": Device.AUTO})
    assert t.bounds.methods == (BoundMethod.ALPHA_CROWN,) and t.perturbation.input.epsilon == 0.05
    assert t.general.device.value == "auto" and s.bounds.methods == (BoundMethod.IBP, BoundMethod.CROWN)
    assert t.model == s.model and t.properties == s.properties
    with pytest.raises(SpecError, match=r"command-line overrides\): bounds\.methods\[0\]: expected one of "
                                        r"ibp \| crown \| alpha-crown \| bab, got 'foo'"):
        apply_overrides(s, {"bounds.methods": ["foo"]})
    with pytest.raises(SpecError, match=r"bounds\.methods: expected a list of at least 1"):
        apply_overrides(s, {"bounds.methods": []})
    with pytest.raises(SpecError, match=r"perturbation\.parameters\.gamma: expected a number >= 0, got -1"):
        apply_overrides(s, {"perturbation.parameters.gamma": -1})
    u = apply_overrides(s, {"bounds.combine": "intersect"})
    assert u.bounds.combine.value == "intersect"
    # an input box can be added on the command line to a parameter-only spec
    p_only = load_spec(write(workdir, edited(**{"perturbation.input": DELETE}), "p.yaml"))
    assert apply_overrides(p_only, {"perturbation.input.epsilon": 0.1}).perturbation.input.epsilon == 0.1


# ----------------------------------------------------------------------------------------
# errors: each names the file, the key path and what was expected


@pytest.mark.parametrize("changes,key,message", [
    # unknown keys, at top level and nested (with a suggestion)
    ({"modle": {}}, "modle", r"unknown key 'modle' \(allowed: model, data, .*\); did you mean 'model'\?"),
    ({"perturbation.input.epsilonn": 0.1}, "perturbation.input.epsilonn", "unknown key 'epsilonn'"),
    ({"properties.[2].target.sigmaa": 1}, r"properties\[2\].target.sigmaa",
     r"unknown key 'sigmaa' \(allowed: type, center, sigma, amplitude\); did you mean 'sigma'\?"),
    # wrong types
    ({"perturbation.input.epsilon": "small"}, "perturbation.input.epsilon", "expected a number >= 0 or null, got 'small'"),
    ({"model.input_shape": [1, 28.5, 28]}, r"model.input_shape\[1\]", "expected an int > 0, got 28.5"),
    ({"explanation.abs": "yes"}, "explanation.abs", "expected true or false, got 'yes'"),
    ({"properties": {"name": "x"}}, "properties", "expected a list"),
    ({"general.seed": True}, "general.seed", r"expected an int in \[0, 4294967295\], got true"),
    # out of range
    ({"perturbation.input.epsilon": -0.1}, "perturbation.input.epsilon", "expected a number >= 0 or null, got -0.1"),
    ({"perturbation.parameters.gamma": -1}, "perturbation.parameters.gamma", "expected a number >= 0, got -1"),
    ({"properties.[1].threshold": 1.5}, r"properties\[1\].threshold", r"expected a number in \[-1, 1\] for metric cosine, got 1.5"),
    ({"properties.[0].threshold": -1}, r"properties\[0\].threshold", "expected a number > 0, got -1"),
    ({"model.normalization.std": [0.0]}, r"model.normalization.std\[0\]", "expected a number > 0, got 0.0"),
    ({"model.normalization.std": [0.3, 0.3]}, "model.normalization.std", r"expected as many values as mean \(1\), got 2"),
    ({"model.input_range": [1.0, 0.0]}, "model.input_range", "lo < hi"),
    ({"data.end": 0}, "data.end", "expected an int >= 1 or null, got 0"),
    ({"data.start": 5, "data.end": 5}, "data.end", r"expected an int > start \(5\) or null, got 5"),
    ({"bounds.alpha_crown.lr": 0}, "bounds.alpha_crown.lr", "expected a number > 0, got 0"),
    # CROWN chunking
    ({"bounds.crown": {"output_chunk": 0}}, "bounds.crown.output_chunk", "expected 'auto' or an int >= 1, got 0"),
    ({"bounds.crown": {"output_chunk": "big"}}, "bounds.crown.output_chunk", "expected 'auto' or an int >= 1, got 'big'"),
    ({"bounds.crown": {"output_chunk": 2.5}}, "bounds.crown.output_chunk", "expected 'auto' or an int >= 1, got 2.5"),
    ({"bounds.crown": {"output_chunk": True}}, "bounds.crown.output_chunk", "expected 'auto' or an int >= 1, got true"),
    ({"bounds.crown": {"output_chunk": None}}, "bounds.crown.output_chunk", "expected 'auto' or an int >= 1, got null"),
    ({"bounds.crown": {"memory_mb": 0}}, "bounds.crown.memory_mb", "expected a number > 0 and <= 1048576 or null, got 0"),
    ({"bounds.crown": {"memory_mb": "4GB"}}, "bounds.crown.memory_mb", "expected a number > 0 and <= 1048576 or null, got '4GB'"),
    ({"bounds.crown": {"chunk": 64}}, "bounds.crown.chunk",
     r"unknown key 'chunk' \(allowed: output_chunk, memory_mb\)"),
    ({"bounds.crown": {"memory": 64}}, "bounds.crown.memory", r"unknown key 'memory' .*; did you mean 'memory_mb'\?"),
    ({"bounds.crown": 512}, "bounds.crown", "expected a mapping, got 512"),
    ({"explanation.target": -1}, "explanation.target", "expected one of predicted | label or an int >= 0, got -1"),
    # bad choices
    ({"bounds.methods": ["ibp", "zonotope"]}, r"bounds.methods\[1\]", "expected one of ibp | crown | alpha-crown, got 'zonotope'"),
    ({"bounds.methods": ["ibp", "ibp"]}, r"bounds.methods\[1\]", r"duplicate entry 'ibp' \(also at \[0\]\)"),
    ({"properties.[0].metric": "l3"}, r"properties\[0\].metric", "expected one of l1 | l2 | linf | cosine, got 'l3'"),
    ({"perturbation.input.norm": 1}, "perturbation.input.norm", "expected one of inf \\| l2, got 1"),
    ({"properties.[3].target.type": "circle"}, r"properties\[3\].target.type", "expected one of gaussian | square | file"),
    # missing required
    ({"model.path": DELETE}, "model.path", "missing required key"),
    ({"properties": []}, "properties", "expected a list of at least 1"),
    ({"properties.[0].kind": DELETE}, r"properties\[0\].kind", "missing required key"),
    ({"properties.[2].target": DELETE}, r"properties\[2\].target", "missing required key for kind targeted"),
    ({"properties.[0].target": {"type": "square", "position": [0, 0], "size": 2}}, r"properties\[0\].target",
     "only used by kind targeted"),
    ({"perturbation": {}}, "perturbation", "expected at least one of 'input' or 'parameters'"),
    ({"perturbation.input.epsilon": DELETE}, "perturbation.input.epsilon", "missing required key"),
    # files
    ({"model.path": "missing.onnx"}, "model.path", "file not found: 'missing.onnx'"),
    ({"model.path": "inputs.npz"}, "model.path", r"expected a path ending in \.onnx or \.pt or \.pth, got 'inputs.npz'"),
    ({"properties.[4].target.path": "nope.npy"}, r"properties\[4\].target.path", "file not found"),
    # both / neither data source
    ({"data.dataset": "mnist_sample"}, "data", "expected exactly one of 'dataset' or 'path', got both"),
    ({"data.path": DELETE}, "data", "got neither"),
    # names and cosine + normalize
    ({"properties.[1].name": "dev_l2"}, r"properties\[1\].name", r"duplicate property name 'dev_l2' \(also properties\[0\]\)"),
    ({"properties.[1].normalize": "l2"}, r"properties\[1\].normalize", "expected none for metric cosine, got 'l2': cosine similarity is scale-invariant"),
    # rank / feature kinds
    ({"properties.[0].metric": DELETE}, r"properties\[0\].metric", "missing required key for kind untargeted"),
    ({"properties.[0].kind": "topk"}, r"properties\[0\].metric", "expected null for kind topk"),
    ({"properties.[0]": {"kind": "topk", "threshold": 0.5}}, r"properties\[0\].k", "missing required key for kind topk"),
    ({"properties.[0]": {"kind": "topk", "k": 0, "threshold": 0.5}}, r"properties\[0\].k", "expected an int >= 1 or null, got 0"),
    ({"properties.[0]": {"kind": "topk", "k": 5, "threshold": 1.5}}, r"properties\[0\].threshold", r"in \(0, 1\]"),
    ({"properties.[0].k": 3}, r"properties\[0\].k", "only used by kind topk"),
    ({"properties.[0]": {"kind": "sign", "threshold": 0}}, r"properties\[0\].features", "missing required key for kind sign"),
    ({"properties.[0]": {"kind": "sign", "features": [1, 1], "threshold": 0}}, r"properties\[0\].features\[1\]", "duplicate entry"),
    ({"properties.[0]": {"kind": "sign", "features": "some", "threshold": 0}}, r"properties\[0\].features", "expected 'all' or a list"),
    ({"properties.[0]": {"kind": "sign", "features": "all", "threshold": -1}}, r"properties\[0\].threshold", "allowed sign flips"),
    ({"properties.[0]": {"kind": "feature_bound", "features": [3], "threshold": 0}}, r"properties\[0\].threshold", "expected a number > 0"),
    ({"properties.[0]": {"kind": "feature_bound", "features": [3], "threshold": 1, "normalize": "l2"}}, r"properties\[0\].normalize", "expected none for kind feature_bound"),
    ({"properties.[0].features": [1]}, r"properties\[0\].features", "only used by kinds sign and feature_bound"),
    ({"properties.[0].metric": None}, r"properties\[0\].metric", "missing required key for kind untargeted"),
    ({"properties.[2].metric": DELETE}, r"properties\[2\].metric", "missing required key for kind targeted"),
    ({"properties.[0]": {"kind": "topk", "k": 5, "threshold": 0}}, r"properties\[0\].threshold", r"in \(0, 1\]"),
    ({"properties.[0]": {"kind": "topk", "k": 2.5, "threshold": 1}}, r"properties\[0\].k", "expected an int >= 1 or null, got 2.5"),
    ({"properties.[0]": {"kind": "topk", "k": 2, "threshold": 1, "features": "all"}}, r"properties\[0\].features", "only used by kinds sign"),
    ({"properties.[0]": {"kind": "topk", "k": 2, "threshold": 1, "target": {"type": "square", "position": [0, 0], "size": 2}}},
     r"properties\[0\].target", "only used by kind targeted"),
    ({"properties.[0]": {"kind": "sign", "features": [], "threshold": 0}}, r"properties\[0\].features", "expected a list of at least 1"),
    ({"properties.[0]": {"kind": "sign", "features": [2, -1], "threshold": 0}}, r"properties\[0\].features\[1\]", "expected an int >= 0, got -1"),
    ({"properties.[0]": {"kind": "sign", "features": "all", "threshold": 0, "k": 3}}, r"properties\[0\].k", "only used by kind topk"),
    ({"properties.[0]": {"kind": "sign", "features": "all", "threshold": 0, "normalize": "max"}}, r"properties\[0\].normalize", "expected none for kind sign"),
    ({"properties.[0]": {"kind": "sign", "features": "all", "threshold": 0, "metric": "cosine"}}, r"properties\[0\].metric", "expected null for kind sign"),
    ({"properties.[0]": {"kind": "feature_bound", "threshold": 0.1}}, r"properties\[0\].features", "missing required key for kind feature_bound"),
    ({"properties.[0]": {"kind": "feature_bound", "features": [0], "threshold": 0.1, "metric": "l2"}}, r"properties\[0\].metric", "expected null for kind feature_bound"),
    ({"properties.[0]": {"kind": "feature_bound", "features": "all", "threshold": -0.5}}, r"properties\[0\].threshold", "expected a number > 0, got -0.5"),
    ({"properties.[0]": {"kind": "rank", "threshold": 1}}, r"properties\[0\].kind", "expected one of untargeted | targeted | topk | sign | feature_bound"),
    # attack section
    ({"attack": {"order": "sometimes"}}, "attack.order", "expected one of before | after | both | skip"),
    ({"attack": {"methods": ["pgd", "fgsm"]}}, r"attack.methods\[1\]", "expected one of pgd | targeted"),
    ({"attack": {"steps": 0}}, "attack.steps", r"expected an int in \[1, 100000\], got 0"),
    ({"attack": {"step_size": 0}}, "attack.step_size", "expected a number > 0, got 0"),
])
def test_bad_spec_errors(workdir, changes, key, message):
    err = error_for(workdir, edited(**changes))
    assert re.fullmatch(key, err.key), (err.key, str(err))
    assert re.search(message, str(err)), str(err)
    assert str(err).startswith(f"{workdir / 'spec.yaml'}: {err.key}: ")


def test_default_name_collision_is_reported(workdir):
    d = edited(**{"properties.[0].name": "p3_targeted_linf"})
    err = error_for(workdir, d)
    assert err.key == "properties[3].name" and "duplicate property name 'p3_targeted_linf'" in str(err)


def test_yaml_syntax_error_names_file_and_line(workdir):
    text = "model:\n  path: ../models/net.onnx\ndata: {path: inputs.npz\nperturbation: {}\n"
    err = error_for(workdir, text)
    assert err.key == "" and re.search(r"YAML error at line \d+, column \d+", str(err))
    text = "model:\n  path: a.onnx\n    bad: indent\n"
    err = error_for(workdir, text)
    assert "line 3" in str(err)


def test_exponent_without_dot_is_a_number(workdir):
    text = yaml.safe_dump(VALID, sort_keys=False).replace("epsilon: 0.01", "epsilon: 1e-2")
    assert "1e-2" in text
    assert load_spec(write(workdir, text)).perturbation.input.epsilon == 0.01


def test_duplicate_yaml_key_is_an_error(workdir):
    err = error_for(workdir, "model: {path: ../models/net.onnx}\nmodel: {path: x.onnx}\n")
    assert "duplicate key 'model'" in str(err) and "line 2" in str(err)


def test_non_mapping_document_and_missing_file(workdir):
    assert "expected a mapping with sections model, data" in str(error_for(workdir, "- 1\n- 2\n"))
    assert "expected a mapping" in str(error_for(workdir, ""))
    with pytest.raises(SpecError, match="cannot read spec file"):
        load_spec(workdir / "absent.yaml")


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)
    e = SpecError("f.yaml", "a.b", "expected x, got y")
    assert str(e) == "f.yaml: a.b: expected x, got y" and e.key == "a.b"


def test_rank_feature_kinds_and_attack_section_load_and_round_trip(workdir):
    d = edited(**{"properties": [
        {"kind": "topk", "k": 10, "threshold": 0.8},
        {"kind": "sign", "features": [0, 5, 7], "threshold": 0},
        {"kind": "feature_bound", "features": "all", "threshold": 0.1},
        {"kind": "untargeted", "metric": "l2", "threshold": 1.0},
    ]})
    d["attack"] = {"order": "both", "methods": ["pgd", "ifia"], "steps": 5, "seed": 3}
    s = load_spec(write(workdir, d))
    names = [p.name for p in s.properties]
    assert names == ["p0_topk", "p1_sign", "p2_feature_bound", "p3_untargeted_l2"]
    assert s.properties[0].k == 10 and s.properties[1].features == (0, 5, 7) and s.properties[2].features == "all"
    assert s.attack.order.value == "both" and [m.value for m in s.attack.methods] == ["pgd", "ifia"]
    dumped = write(workdir, yaml.safe_load(dump_spec(s)), "dumped.yaml")
    assert load_spec(dumped).hash() == s.hash()
    default = load_spec(write(workdir, edited(), "plain.yaml"))
    assert default.attack.order.value == "after" and default.attack.methods == "auto"


def test_each_rank_kind_alone_loads_dumps_nulls_and_round_trips(workdir):
    props = [{"kind": "topk", "k": 1, "threshold": 1},          # threshold 1: the top-1 never changes
             {"kind": "sign", "features": "all", "threshold": 0},  # 0 flips allowed
             {"kind": "feature_bound", "features": [783], "threshold": 1e-3},
             {"name": "mine", "kind": "topk", "k": 784, "threshold": 0.25, "metric": None, "features": None}]
    s = load_spec(write(workdir, edited(**{"properties": props})))
    assert [p.name for p in s.properties] == ["p0_topk", "p1_sign", "p2_feature_bound", "mine"]
    assert all(p.metric is None and p.normalize is Normalize.NONE and p.target is None for p in s.properties)
    assert s.properties[0].k == 1 and s.properties[0].features is None and s.properties[0].threshold == 1.0
    assert s.properties[1].features == "all" and s.properties[1].k is None and s.properties[1].threshold == 0.0
    assert s.properties[2].features == (783,)
    dumped = yaml.safe_load(dump_spec(s))["properties"]
    assert dumped[0] == {"name": "p0_topk", "kind": "topk", "metric": None, "threshold": 1.0, "normalize": "none",
                         "target": None, "k": 1, "features": None}
    assert dumped[1]["features"] == "all" and dumped[2]["features"] == [783]
    s2 = load_spec(write(workdir, dump_spec(s), "again.yaml"))
    assert s2 == s and s2.hash() == s.hash()
    # the metric kinds dump k and features as null
    plain = yaml.safe_load(dump_spec(load_spec(write(workdir, VALID, "plain.yaml"))))["properties"][0]
    assert plain["metric"] == "l2" and plain["k"] is None and plain["features"] is None


def test_every_shipped_spec_and_training_config_validates():
    """specs/*.yaml and configs/*.yaml load, and every model and data file they name exists."""
    from verigrad.training.trainer import load_train_config
    from verigrad.verify import prepare

    root = Path(__file__).resolve().parents[1]
    specs = sorted((root / "specs").glob("*.yaml"))
    assert len(specs) >= 10
    for p in specs:
        prepare(load_spec(p), methods=())  # loads model, data and properties
    configs = sorted((root / "configs").glob("*.yaml"))
    assert configs
    for p in configs:
        cfg = load_train_config(p)
        assert cfg.data.path is None or cfg.data.path.exists(), p
