"""Malformed models are refused with one-line ModelErrors that name the model file, the node
(name and op) and what was expected: malformed ONNX nodes and graphs, non-finite parameters
(ONNX, TorchScript, nn.Module), files that are not models at all, and TorchScript failures —
never an IndexError/KeyError/onnx/torch exception, a multi-line message or a silently wrong
network. Valid models are unaffected (the loader suites cover them)."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from tests.helpers import hand_onnx, save_onnx
from verigrad.cli import main
from verigrad.errors import ModelError, UserError
from verigrad.models import add_normalization, from_module, load_model
from verigrad.models.network import ActKind, Activation, Linear, Network, check_loaded, one_line
from verigrad.reports import ExitCode

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")


def raw_onnx(nodes, inits, in_shape, outputs=(("y", ["N", 2]),), opset=17) -> onnx.ModelProto:
    """A hand-built ONNX model that is *not* run through onnx's checker (so it may be malformed)."""
    graph = helper.make_graph(
        nodes, "raw",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", *in_shape])],
        [helper.make_tensor_value_info(o, TensorProto.DOUBLE, shape) for o, shape in outputs],
        [numpy_helper.from_array(np.asarray(v) if np.asarray(v).dtype.kind in "iub" else np.asarray(v, np.float64), k)
         for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def refused(path: Path, *needles: str, **kw) -> str:
    """load_model(path) raises a one-line ModelError naming the file and every needle."""
    with pytest.raises(ModelError) as info:
        load_model(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert path.name in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def save(model: onnx.ModelProto, tmp_path: Path, name: str = "bad.onnx") -> Path:
    return save_onnx(model, tmp_path / name)


# -- 1. malformed ONNX nodes and graphs ------------------------------------------------------


def test_gemm_with_1d_weight(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")]
    refused(save(raw_onnx(nodes, dict(w=np.ones(4)), [4]), tmp_path), "'fc' (Gemm)", "2-D", "'w'")


def test_add_with_one_input(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"), helper.make_node("Add", ["h"], ["y"], name="plus")]
    refused(save(raw_onnx(nodes, dict(w=np.ones((4, 2))), [4]), tmp_path), "'plus' (Add)", "expects 2 inputs")


def test_mul_with_one_input_before_softplus_pattern(tmp_path):
    # the Softplus pattern looks at a Mul's two inputs before the walk: still a named refusal
    nodes = [helper.make_node("Mul", ["x"], ["m"], name="scale"), helper.make_node("Softplus", ["m"], ["s"], name="sp"),
             helper.make_node("Gemm", ["s", "w"], ["y"], name="fc")]
    refused(save(raw_onnx(nodes, dict(w=np.ones((4, 2))), [4]), tmp_path), "'scale' (Mul)", "expects 2 inputs")


def test_node_without_outputs(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], [], name="dead"), helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")]
    refused(save(raw_onnx(nodes, dict(w=np.ones((4, 2))), [4]), tmp_path), "'dead' (Relu)", "has no outputs")


def test_softmax_without_input(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"), helper.make_node("Softmax", [], ["y"], name="sm")]
    refused(save(raw_onnx(nodes, dict(w=np.ones((4, 2))), [4]), tmp_path), "'sm' (Softmax)", "expects 1 input")


def _pool_graph(op: str, **attrs):
    return [helper.make_node(op, ["x"], ["p"], name="pool", **attrs), helper.make_node("Flatten", ["p"], ["y"], name="flat")]


def test_averagepool_without_kernel_shape(tmp_path):
    path = save(raw_onnx(_pool_graph("AveragePool"), {}, [2, 4, 4], (("y", ["N", 8]),)), tmp_path)
    refused(path, "'pool' (AveragePool)", "'kernel_shape' is missing")


@pytest.mark.parametrize("attrs,needle", [
    (dict(kernel_shape=[2, 2, 2]), "only 2-D pooling"),
    (dict(kernel_shape=[2, 2], strides=[2]), "only 2-D strides"),
    (dict(kernel_shape=[2, 2], strides=[0, 2]), "strides [0, 2] must be positive"),
    (dict(kernel_shape=[0, 2]), "kernel_shape [0, 2] must be positive"),
    (dict(kernel_shape=[2, 2], dilations=[1]), "dilations [1] must have 2 values"),
    (dict(kernel_shape=[2, 2], pads=[0, 0]), "only 2-D pads"),
    (dict(kernel_shape=[2, 2], pads=[-1, 0, 0, 0]), "negative pads"),
    (dict(), "'kernel_shape' is missing"),
])
def test_maxpool_wrong_attributes(attrs, needle, tmp_path):
    path = save(raw_onnx(_pool_graph("MaxPool", **attrs), {}, [2, 4, 4], (("y", ["N", 8]),)), tmp_path)
    refused(path, "'pool' (MaxPool)", needle)


@pytest.mark.parametrize("attrs,inits,needle", [
    (dict(dilations=[1, 1, 1]), {}, "dilations [1, 1, 1] must have 2 values"),
    (dict(strides=[1]), {}, "only 2-D strides"),
    (dict(pads=[1, 1]), {}, "only 2-D pads"),
    (dict(kernel_shape=[2, 2]), {}, "kernel_shape [2, 2] does not match the weight 'w'"),
    ({}, dict(b=np.zeros(2)), "bias 'b' of shape (2,) for 3 output channels"),
])
def test_conv_wrong_attributes(attrs, inits, needle, tmp_path):
    ins = ["x", "w", *inits]
    nodes = [helper.make_node("Conv", ins, ["c"], name="conv", **attrs), helper.make_node("Flatten", ["c"], ["y"], name="flat")]
    inits = dict(w=np.ones((3, 2, 3, 3)), **inits)
    refused(save(raw_onnx(nodes, inits, [2, 5, 5], (("y", ["N", 27]),)), tmp_path), "'conv' (Conv)", needle)


@pytest.mark.parametrize("target,needle", [
    ([-1, 7], "cannot reshape the input"),
    ([0, -1, -1, 12], "at most one -1"),
    ([0, -2], "invalid"),
    ([0, 0, 0, 0, 0], "does not have"),
])
def test_reshape_to_impossible_shape(target, needle, tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="rs"),
             helper.make_node("Flatten", ["r"], ["y"], name="flat")]
    path = save(raw_onnx(nodes, dict(shape=np.array(target, np.int64)), [3, 4], (("y", ["N", 12]),)), tmp_path)
    refused(path, "'rs' (Reshape)", needle)


def test_reshape_without_target(tmp_path):
    nodes = [helper.make_node("Reshape", ["x"], ["y"], name="rs")]
    refused(save(raw_onnx(nodes, {}, [3, 4], (("y", ["N", 12]),)), tmp_path), "'rs' (Reshape)", "expects 2 inputs")


@pytest.mark.parametrize("axis,needle", [(5, "axis=5 is out of range"), (-7, "axis=-7 is out of range"),
                                         (0, "batch dimension")])
def test_concat_on_bad_axis(axis, needle, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"),
             helper.make_node("Concat", ["x", "a"], ["c"], name="cat", axis=axis),
             helper.make_node("Flatten", ["c"], ["y"], name="flat")]
    refused(save(raw_onnx(nodes, {}, [2, 3], (("y", ["N", 12]),)), tmp_path), "'cat' (Concat)", needle)


def test_concat_without_axis(tmp_path):
    nodes = [helper.make_node("Concat", ["x", "x"], ["c"], name="cat"),
             helper.make_node("Flatten", ["c"], ["y"], name="flat")]
    refused(save(raw_onnx(nodes, {}, [2, 3], (("y", ["N", 12]),)), tmp_path), "'cat' (Concat)", "'axis' is missing")


def test_missing_initializer(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")]
    refused(save(raw_onnx(nodes, {}, [4]), tmp_path), "'fc' (Gemm)", "'w'")


def test_output_not_produced_by_any_node(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc")]
    refused(save(raw_onnx(nodes, dict(w=np.ones((4, 2))), [4]), tmp_path), "'y'", "not produced by any node")


def test_output_is_an_initializer(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc")]
    path = save(raw_onnx(nodes, dict(w=np.ones((4, 2)), y=np.ones(2)), [4]), tmp_path)
    refused(path, "'y'", "initializer")


def test_zero_outputs(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc")]
    refused(save(raw_onnx(nodes, dict(w=np.ones((4, 2))), [4], outputs=()), tmp_path), "no outputs")


def test_zero_classes(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")]
    refused(save(raw_onnx(nodes, dict(w=np.ones((4, 0))), [4], (("y", ["N", 0]),)), tmp_path), "0 classes")


def test_batchnorm_statistics_of_wrong_shape(tmp_path):
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Flatten", ["n"], ["y"], name="flat")]
    inits = dict(g=np.ones(2), b=np.zeros(2), m=np.zeros(3), v=np.ones(2))
    refused(save(raw_onnx(nodes, inits, [2, 3, 3], (("y", ["N", 18]),)), tmp_path), "'bn' (BatchNormalization)",
            "mean 'm' has shape (3,)")


def test_batchnorm_with_too_few_inputs(tmp_path):
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b"], ["n"], name="bn"),
             helper.make_node("Flatten", ["n"], ["y"], name="flat")]
    path = save(raw_onnx(nodes, dict(g=np.ones(2), b=np.zeros(2)), [2, 3, 3], (("y", ["N", 18]),)), tmp_path)
    refused(path, "'bn' (BatchNormalization)", "expects 5 inputs")


def test_pad_without_pads(tmp_path):
    nodes = [helper.make_node("Pad", ["x"], ["p"], name="pad"), helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    refused(save(raw_onnx(nodes, {}, [2, 3, 3], (("y", ["N", 18]),)), tmp_path), "'pad' (Pad)", "pads")


def test_cast_without_to(tmp_path):
    nodes = [helper.make_node("Cast", ["x"], ["c"], name="cast"), helper.make_node("Gemm", ["c", "w"], ["y"], name="fc")]
    refused(save(raw_onnx(nodes, dict(w=np.ones((4, 2))), [4]), tmp_path), "'cast' (Cast)", "'to' is missing")


# -- 2. non-finite parameters -------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_gemm_bias_and_weight(bad, tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")]
    b = np.array([0.0, bad])
    msg = refused(save(hand_onnx(nodes, dict(w=np.ones((4, 2)), b=b), [4], [2]), tmp_path), "'fc' (Gemm)", "'b'",
                  "1 non-finite value of 2")
    assert "depends on the batch size" not in msg
    w = np.ones((4, 2))
    w[0, 0] = w[1, 1] = bad
    refused(save(hand_onnx(nodes, dict(w=w, b=np.zeros(2)), [4], [2]), tmp_path), "'fc' (Gemm)", "'w'",
            "2 non-finite values of 8")


def test_nan_weight_is_not_reported_as_batch_dependent(tmp_path):
    w = np.ones((4, 2))
    w[2, 1] = np.nan
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    msg = refused(save(hand_onnx(nodes, dict(w=w), [4], [2]), tmp_path), "'mm' (MatMul)", "1 NaN")
    assert "batch size" not in msg


def test_non_finite_batchnorm_statistic(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Flatten", ["n"], ["y"], name="flat")]
    inits = dict(w=np.ones((2, 1, 1, 1)), g=np.ones(2), b=np.zeros(2), m=np.array([0.0, np.nan]), v=np.ones(2))
    refused(save(hand_onnx(nodes, inits, [1, 2, 2], [8]), tmp_path), "'bn' (BatchNormalization)", "'m'", "1 NaN")


def test_non_finite_normalisation_constant(tmp_path):
    nodes = [helper.make_node("Sub", ["x", "mean"], ["s"], name="sub"),
             helper.make_node("Gemm", ["s", "w"], ["y"], name="fc")]
    inits = dict(mean=np.array(np.inf), w=np.ones((4, 2)))
    refused(save(hand_onnx(nodes, inits, [4], [2]), tmp_path), "'sub' (Sub)", "'mean'", "+inf")


def test_non_finite_folded_constant(tmp_path):
    # the weight is computed by a constant subgraph (Transpose of an initializer)
    w = np.ones((2, 4))
    w[0, 3] = -np.inf
    nodes = [helper.make_node("Transpose", ["wt"], ["w"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    refused(save(hand_onnx(nodes, dict(wt=w), [4], [2]), tmp_path), "'mm' (MatMul)", "'w'", "-inf")


def test_non_finite_attribute_caught_on_the_network(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", alpha=float("inf"))]
    refused(save(hand_onnx(nodes, dict(w=np.ones((4, 2))), [4], [2]), tmp_path), "'fc' (Linear)", "weight",
            "8 non-finite values of 8")


def test_non_finite_module_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with pytest.raises(ModelError, match=r"^Sequential: layer '2' \(Linear\): bias has 1 non-finite value of 2 \(1 \+inf\)$"):
        load_model(model, input_shape=(4,))
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        bn[1].running_mean[0] = float("nan")
    with pytest.raises(ModelError, match=r"Sequential: layer '0' \(Linear\): bias has 1 non-finite value"):
        from_module(bn, (4,))


def test_non_finite_custom_module_via_onnx():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc(x)

    m = Res().double()
    with torch.no_grad():
        m.fc.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"Res \(via ONNX export\): node .*1 non-finite value of 16 \(1 NaN\)"):
        from_module(m, (4,))


def test_non_finite_torchscript_parameters(tmp_path):
    m = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        m[0].weight[0, 0] = float("-inf")
    path = tmp_path / "inf.pt"
    torch.jit.save(torch.jit.script(m), str(path))
    refused(path, "non-finite", "-inf", input_shape=(4,))


def test_non_finite_added_normalisation():
    net = load_model(nn.Sequential(nn.Linear(2, 2)), input_shape=(2,))
    with pytest.raises(ModelError, match=r"Sequential: layer 'input/normalize' \(Linear\): weight has 1 non-finite"):
        add_normalization(net, [0.0, 0.0], [1.0, 1e-320])


def test_check_loaded_on_hand_built_networks():
    ok = Network((Linear("fc", torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)),), (3,), "f.onnx")
    assert check_loaded(ok) is ok
    act = Network((Activation("sp", ActKind.SOFTPLUS, math.inf),), (3,), "f.onnx")
    with pytest.raises(ModelError, match=r"^f\.onnx: layer 'sp' \(Activation\): param is inf \(must be finite\)$"):
        check_loaded(act)
    empty = Network((Activation("r", ActKind.RELU),), (0,), "f.onnx")
    with pytest.raises(ModelError, match=r"f\.onnx: the input shape \(0,\) has no values"):
        check_loaded(empty)


# -- 3. Dropout in training mode ------------------------------------------------------------


def test_dropout_training_mode_refused_by_name(tmp_path):
    nodes = [helper.make_node("Constant", [], ["train"], name="mode", value=numpy_helper.from_array(np.array(True))),
             helper.make_node("Dropout", ["x", "", "train"], ["d"], name="drop"),
             helper.make_node("Gemm", ["d", "w"], ["y"], name="fc")]
    refused(save(hand_onnx(nodes, dict(w=np.ones((4, 2))), [4], [2]), tmp_path), "'drop' (Dropout)", "training_mode=1")


def test_batchnorm_training_mode_refused_by_name(tmp_path):
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], name="bn", training_mode=1),
             helper.make_node("Flatten", ["n"], ["y"], name="flat")]
    inits = dict(g=np.ones(2), b=np.zeros(2), m=np.zeros(2), v=np.ones(2))
    refused(save(raw_onnx(nodes, inits, [2, 2, 2], (("y", ["N", 8]),)), tmp_path), "'bn' (BatchNormalization)",
            "training_mode=1")


# -- 4. layer errors name the model file ----------------------------------------------------


def test_operator_errors_name_the_source():
    # Activation's own check raises without a source: the converter adds it
    with pytest.raises(ModelError, match=r"^Sequential: layer '0': leaky_relu negative slope"):
        from_module(nn.Sequential(nn.LeakyReLU(2.0), nn.Linear(2, 2)), (2,))
    # a shape error from a node's out_shape inside Network names the source
    with pytest.raises(ModelError, match=r"^m\.onnx: layer 'fc'"):
        Network((Activation("a", ActKind.RELU), Linear("fc", torch.ones(2, 3), torch.zeros(2))), (4,), "m.onnx")


def test_unflatten_error_is_named():
    with pytest.raises(ModelError, match=r"^Sequential: layer '0' \(Unflatten\): cannot apply"):
        from_module(nn.Sequential(nn.Unflatten(1, (3, 3)), nn.Flatten(), nn.Linear(8, 2)), (8,))


def test_normalization_on_a_2d_input_names_the_source():
    net = Network((Activation("r", ActKind.RELU),), (2, 3), "two.onnx")
    with pytest.raises(ModelError, match=r"^two\.onnx: layer 'input/normalize'"):
        add_normalization(net, [0.0, 0.0], [1.0, 1.0])


# -- 5. TorchScript loading failures ---------------------------------------------------------


def _torchscript(tmp_path: Path) -> Path:
    path = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(4, 3))), str(path))
    return path


@pytest.mark.parametrize("kind", ["state_dict", "pickled_module", "truncated", "random", "empty"])
def test_torchscript_load_failures_are_one_line(kind, tmp_path):
    path = tmp_path / f"{kind}.pt"
    if kind == "state_dict":
        torch.save(nn.Linear(4, 3).state_dict(), path)
    elif kind == "pickled_module":
        torch.save(nn.Linear(4, 3), path)
    elif kind == "truncated":
        path.write_bytes(_torchscript(tmp_path).read_bytes()[:300])
    elif kind == "random":
        path.write_bytes(os.urandom(256))
    else:
        path.write_bytes(b"")
    msg = refused(path, "not a TorchScript archive", input_shape=(4,))
    assert "Traceback" not in msg


def test_torchscript_runtime_failure_is_one_line(tmp_path):
    path = _torchscript(tmp_path)
    msg = refused(path, "mat1 and mat2 shapes cannot be multiplied", input_shape=(5,))
    assert "Traceback" not in msg and "TorchScript interpreter" not in msg


def test_one_line_extracts_the_error_from_a_trace():
    trace = ("The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript:\n"
             "  File \"x.py\", line 3\n    return f(x)\nRuntimeError: shapes do not match\n")
    assert one_line(trace) == "RuntimeError: shapes do not match"
    assert one_line("first line\nsecond line") == "first line"
    assert len(one_line("x" * 1000)) == 300


# -- 6. files that are not ONNX ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "text"])
def test_not_an_onnx_file(kind, tmp_path):
    path = tmp_path / f"{kind}.onnx"
    good = (ROOT / "examples/models/mnist_fc.onnx").read_bytes()
    path.write_bytes({"random": os.urandom(300), "truncated": good[: len(good) // 3], "empty": b"",
                      "text": b"this is not a model\n"}[kind])
    msg = refused(path)
    assert any(k in msg for k in ("not a readable ONNX file", "not an ONNX model")), msg


# -- through the command line: exit 2, one line --------------------------------------------


def _cli_spec(tmp_path: Path, model: Path) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({
        "model": {"path": str(model)}, "data": {"dataset": "mnist_sample", "start": 0, "end": 1},
        "perturbation": {"input": {"epsilon": 0.001}},
        "properties": [{"name": "l2", "kind": "untargeted", "metric": "l2", "threshold": 1000.0}],
        "bounds": {"methods": ["ibp"]}, "general": {"results": str(tmp_path / "res")}}))
    return p


def _mnist_gemm(bias: np.ndarray, weight_shape=(784, 10)) -> onnx.ModelProto:
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"), helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="fc")]
    return raw_onnx(nodes, dict(w=np.full(weight_shape, 0.01), b=bias), [1, 28, 28], (("y", ["N", 10]),))


def _cli_refuses(tmp_path: Path, model: Path, *needles: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = CliRunner().invoke(main, ["verify", str(_cli_spec(tmp_path, model))])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    for n in (model.name, *needles):
        assert n in lines[0], r.output


def test_cli_inf_bias_exits_2(tmp_path):
    b = np.zeros(10)
    b[3] = math.inf
    _cli_refuses(tmp_path, save(_mnist_gemm(b), tmp_path, "inf.onnx"), "'fc' (Gemm)", "+inf")


def test_cli_gemm_1d_weight_exits_2(tmp_path):
    _cli_refuses(tmp_path, save(_mnist_gemm(np.zeros(10), (784,)), tmp_path, "w1d.onnx"), "'fc' (Gemm)", "2-D")


def test_cli_random_bytes_onnx_exits_2(tmp_path):
    path = tmp_path / "noise.onnx"
    path.write_bytes(os.urandom(400))
    _cli_refuses(tmp_path, path)


def test_cli_state_dict_pt_exits_2(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(784, 10).state_dict(), path)
    spec = _cli_spec(tmp_path, path)
    d = yaml.safe_load(spec.read_text())
    d["model"]["input_shape"] = [1, 28, 28]
    spec.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["verify", str(spec)])
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "weights.pt" in lines[0] and "not a TorchScript archive" in lines[0], r.output


def test_model_error_is_a_user_error():
    assert issubclass(ModelError, UserError)
