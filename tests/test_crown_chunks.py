"""CROWN / alpha-CROWN with the output specification split into row chunks (CrownOptions.output_chunk,
memory_mb): chunked bounds equal the unchunked ones coordinate by coordinate, stay sound, the auto
chunk size follows the memory budget, and a 3×32×32 CNN bounds under a small budget."""
from __future__ import annotations

import math
import re

import pytest
import torch

from tests.helpers import assert_contains_true_gradients, cifar_cnn, random_cnn, random_mlp
from verigrad.bounds import EngineOptions, compute_bounds
from verigrad.bounds.lirpa import CrownOptions, crown_bounds, memory_budget_bytes, pick_output_chunk
from verigrad.graph.gradient_graph import Output
from verigrad.models.network import ActKind, Network
from verigrad.perturbation import input_box, param_box

F64 = torch.float64
CROWN_TOL = 1e-12  # measured: bit-identical on these nets (a selection row of C is a row of I)
ALPHA_TOL = 1e-10  # measured ≤ 1e-15: α is per row, so only round-off in the summed loss differs


def _box(net: Network, eps: float, n: int = 1, seed: int = 1):
    x = torch.randn(n, *net.input_shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return input_box(x, eps, None)


def _assert_same(a, b, tol: float) -> None:
    torch.testing.assert_close(a.bounds.lower, b.bounds.lower, rtol=0, atol=tol)
    torch.testing.assert_close(a.bounds.upper, b.bounds.upper, rtol=0, atol=tol)


def _distinct(res) -> None:
    """The coordinates' bounds differ from each other, so a chunk written to the wrong place
    could not pass an equality check."""
    pairs = torch.stack([res.bounds.lower.flatten(), res.bounds.upper.flatten()], dim=1)
    assert pairs.unique(dim=0).shape[0] == pairs.shape[0]


def _mlp() -> Network:
    return random_mlp(ActKind.RELU, sizes=(6, 16, 16, 3), seed=11)  # d = 6


def _cnn(in_shape=(1, 6, 6), act: ActKind = ActKind.RELU) -> Network:
    return random_cnn(act, seed=2, in_shape=in_shape)  # d = 36


def _chunk_note(res) -> str | None:
    return next((n for n in res.notes if "chunks of" in n), None)


# ---------------------------------------------------------------- chunked == unchunked


@pytest.mark.parametrize("chunk", [1, 4, 6, 50])  # 4: not a divisor of d = 6; 6 and 50: ≥ d
@pytest.mark.parametrize("output", list(Output))
def test_mlp_chunked_equals_unchunked(chunk, output):
    net = _mlp()
    box = _box(net, 0.15, n=2)
    target = torch.tensor([1, 1])
    full = crown_bounds(net, box, target, output)
    res = crown_bounds(net, box, target, output, options=CrownOptions(output_chunk=chunk, max_batch=2))
    _assert_same(res, full, CROWN_TOL)
    _distinct(full)
    note = _chunk_note(res) or ""
    if chunk >= 6:
        assert "output (" not in note  # one output pass, exactly the unchunked path
    else:
        assert f"output (6 coordinates) bounded in {math.ceil(6 / chunk)} chunks of {chunk} rows" in note, res.notes
    opt_full = crown_bounds(net, box, target, output, alpha=True, options=CrownOptions(alpha_iterations=5, max_batch=2))
    opt = crown_bounds(net, box, target, output, alpha=True,
                       options=CrownOptions(alpha_iterations=5, max_batch=2, output_chunk=chunk))
    _assert_same(opt, opt_full, ALPHA_TOL)
    assert opt.bounds.width.sum() < full.bounds.width.sum()  # α really moved in every chunking


@pytest.mark.parametrize("chunk", [1, 7, 36, 100])  # 7: not a divisor of d = 36
@pytest.mark.parametrize("act", [ActKind.RELU, ActKind.TANH], ids=["relu", "tanh"])
def test_cnn_crown_chunked_equals_unchunked(chunk, act):
    net = _cnn(act=act)
    box = _box(net, 0.1, seed=2)
    target = torch.tensor([2])
    full = crown_bounds(net, box, target)
    res = crown_bounds(net, box, target, options=CrownOptions(output_chunk=chunk))
    _assert_same(res, full, CROWN_TOL)
    _distinct(full)


@pytest.mark.parametrize("chunk", [1, 5, 16])  # d = 16; 5 does not divide it
def test_cnn_alpha_chunked_equals_unchunked(chunk):
    net = _cnn(in_shape=(1, 4, 4))
    box = _box(net, 0.2)
    target = torch.tensor([0])
    opts = CrownOptions(alpha_iterations=3)
    full = crown_bounds(net, box, target, alpha=True, options=opts)
    res = crown_bounds(net, box, target, alpha=True, options=CrownOptions(alpha_iterations=3, output_chunk=chunk))
    _assert_same(res, full, ALPHA_TOL)
    _distinct(full)


def test_g_node_specifications_chunked():
    """Chunks smaller than the unstable neurons of a relu'(z)·g input split that specification
    too (recorded in the notes) and change nothing."""
    net = random_mlp(ActKind.RELU, sizes=(6, 40, 40, 3), seed=5)
    box = _box(net, 0.3)
    target = torch.tensor([0])
    full = crown_bounds(net, box, target)
    res = crown_bounds(net, box, target, options=CrownOptions(output_chunk=3))
    _assert_same(res, full, CROWN_TOL)
    assert re.search(r"intermediate specifications in up to \d+ chunks of 3 rows", _chunk_note(res) or ""), res.notes


def test_pre_activation_specifications_chunked_silently(monkeypatch, capsys):
    """auto_LiRPA bounds the ReLU pre-activations of the forward pass itself; with chunks it splits
    those of matrix-mode convs through its batched CROWN (crown_batch_size = the row limit),
    without printing. (Linear pre-activations get an identity eyeC, which it never splits.)"""
    from verigrad.bounds import lirpa

    calls: list[int] = []
    orig = lirpa._GradBoundedModule.batched_backward

    def spy(self, *args, **kwargs):
        calls.append(int(self.bound_opts["crown_batch_size"]))
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(lirpa._GradBoundedModule, "batched_backward", spy)
    net = _cnn()
    box = _box(net, 0.1, seed=2)
    target = torch.tensor([0])
    full = crown_bounds(net, box, target)
    assert not calls
    res = crown_bounds(net, box, target, options=CrownOptions(output_chunk=2))
    assert calls and set(calls) == {2}
    _assert_same(res, full, CROWN_TOL)
    out = capsys.readouterr()
    assert out.out == "" and out.err == "", out


def test_param_box_chunked_equals_unchunked():
    net = _mlp()
    box = _box(net, 0.05)
    params = param_box(net, 0.05)
    target = torch.tensor([2])
    full = crown_bounds(net, box, target, params=params)
    res = crown_bounds(net, box, target, params=params, options=CrownOptions(output_chunk=4))
    _assert_same(res, full, CROWN_TOL)
    assert_contains_true_gradients(res.bounds, net, box, target, Output.LOGIT, params=params, n=20)


def test_per_sample_targets_with_chunks():
    net = _cnn()
    box = _box(net, 0.1, n=3, seed=4)
    target = torch.tensor([1, 0, 1])
    full = crown_bounds(net, box, target)
    res = crown_bounds(net, box, target, options=CrownOptions(output_chunk=10))
    _assert_same(res, full, CROWN_TOL)


# ---------------------------------------------------------------- soundness with chunks


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_chunked_bounds_contain_true_gradients(kind):
    net = _mlp() if kind == "mlp" else _cnn()
    box = _box(net, 0.15 if kind == "mlp" else 0.1, seed=3)
    target = torch.tensor([1])
    for output in Output:
        res = crown_bounds(net, box, target, output, options=CrownOptions(output_chunk=5))
        assert _chunk_note(res) is not None
        assert_contains_true_gradients(res.bounds, net, box, target, output, n=400, seed=7)
    opt = crown_bounds(net, box, target, alpha=True, options=CrownOptions(output_chunk=5, alpha_iterations=4))
    assert_contains_true_gradients(opt.bounds, net, box, target, Output.LOGIT, n=400, seed=8)


# ---------------------------------------------------------------- chunk size


def test_pick_output_chunk():
    mb = 2.0**20
    assert pick_output_chunk(784, 1.0 * mb, 10_000 * mb) == 784  # fits: no chunking
    assert pick_output_chunk(784, 1.0 * mb, 784 * mb) == 784  # exactly fits
    assert pick_output_chunk(784, 1.0 * mb, 783.9 * mb) == 783
    assert pick_output_chunk(3072, 0.5 * mb, 256 * mb) == 512
    assert pick_output_chunk(3072, 1.0 * mb, 0.01 * mb) == 1  # at least one row
    assert pick_output_chunk(1, 1e12, 1.0) == 1
    with pytest.raises(ValueError):
        pick_output_chunk(0, 1.0, 1.0)
    with pytest.raises(ValueError):
        pick_output_chunk(10, 0.0, 1.0)
    assert memory_budget_bytes("cpu", 100) == 100 * mb
    auto = memory_budget_bytes("cpu", None)
    assert auto > 0 and math.isfinite(auto)


def test_options_validated():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="output_chunk"):
            CrownOptions(output_chunk=bad)
    for bad in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="memory_mb"):
            CrownOptions(memory_mb=bad)
    assert CrownOptions().output_chunk is None and CrownOptions().memory_mb is None


def test_auto_chunk_follows_budget_and_engine_options():
    net = _cnn()
    box = _box(net, 0.1)
    target = torch.tensor([1])
    big = compute_bounds("crown", net, box, target, options=EngineOptions(crown_memory_mb=1e6))
    assert _chunk_note(big) is None  # d rows fit: the unchunked path
    tiny = compute_bounds("crown", net, box, target, options=EngineOptions(crown_memory_mb=1e-3))
    note = _chunk_note(tiny)
    assert note is not None and "bounded in 36 chunks of 1 rows" in note and "auto: " in note, tiny.notes
    _assert_same(tiny, big, CROWN_TOL)
    fixed = compute_bounds("crown", net, box, target, options=EngineOptions(crown_output_chunk=12))
    assert "bounded in 3 chunks of 12 rows" in (_chunk_note(fixed) or "") and "(output_chunk)" in _chunk_note(fixed)
    _assert_same(fixed, big, CROWN_TOL)


# ---------------------------------------------------------------- a 3×32×32 input


@pytest.mark.slow
def test_cifar_sized_cnn_small_budget_equals_full():
    """d = 3072: unchunked, the final pass holds ~1.6 GB of A matrices (float64); a 400 MiB
    budget splits it (about 0.96 MiB estimated per row → 417 rows, 8 chunks). ~10 s on 2 cores."""
    net = cifar_cnn()
    x = torch.rand(1, 3, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    box = input_box(x, 0.01, (0.0, 1.0))
    target = torch.tensor([3])
    small = crown_bounds(net, box, target, options=CrownOptions(memory_mb=400))
    note = _chunk_note(small)
    assert note is not None and "output (3072 coordinates) bounded in" in note and "auto: 400 MiB budget" in note
    full = crown_bounds(net, box, target, options=CrownOptions(output_chunk=3072))
    assert _chunk_note(full) is None
    _assert_same(small, full, CROWN_TOL)
    assert_contains_true_gradients(small.bounds, net, box, target, Output.LOGIT, n=50, seed=9)


def test_spec_chunk_reaches_the_engine():
    """bounds.crown.output_chunk in a spec changes how verify runs CROWN, not what it returns."""
    from pathlib import Path

    from verigrad.spec import spec_from_dict
    from verigrad.verify import prepare, verify_instance

    root = Path(__file__).resolve().parents[1]
    base = {"model": {"path": str(root / "examples/models/mnist_fc.onnx"), "input_range": [0.0, 1.0]},
            "data": {"dataset": "mnist_sample", "start": 0, "end": 1},
            "perturbation": {"input": {"epsilon": 0.001}},
            "properties": [{"kind": "untargeted", "metric": "l2", "threshold": 1.0}],
            "bounds": {"methods": ["crown"]}, "attack": {"order": "skip"}}
    runs = {}
    for chunk in ("auto", 300):
        d = {**base, "bounds": {**base["bounds"], "crown": {"output_chunk": chunk}}}
        (runs[chunk],) = verify_instance(prepare(spec_from_dict(d, source="test")), 0).engines
    assert any("3 chunks of 300 rows" in n for n in runs[300].notes), runs[300].notes
    assert not any("chunks" in n for n in runs["auto"].notes)
    assert torch.equal(runs[300].bounds.lower, runs["auto"].bounds.lower)
    assert torch.equal(runs[300].bounds.upper, runs["auto"].bounds.upper)
