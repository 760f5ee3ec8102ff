"""``verigrad train``: fit a small network with a regulariser, export it, and write a ready
verification spec for it.

The config is validated with the same machinery as the verification spec (unknown keys,
types and ranges are errors naming the key). Each epoch logs the loss terms, the training
accuracy and the mean certified gradient-box size (ℓ2 norm of the IBP width map of the
saliency over the ε-box at the target ε, the quantity GradCert shrinks) on a fixed
evaluation batch; the log is rewritten after every epoch.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from verigrad.data import load_dataset
from verigrad.reports import check_writable
from verigrad.spec import (
    SEED, Bool, Choice, DataSpec, Device, FileName, Int, ListOf, Nullable, Num, PathCheck, Section, SpecError, _Invalid,
    _opt, _show, parse_document, read_yaml,
)
from verigrad.training.regularizers import Regularizer, RegularizerConfig, check_applies, gradcert_penalty, network_from_module
from verigrad.training.regularizers import training_loss


class Arch(str, Enum):
    FC = "fc"
    CNN = "cnn"


class Act(str, Enum):
    RELU = "relu"
    SOFTPLUS = "softplus"
    SIGMOID = "sigmoid"
    TANH = "tanh"


@dataclass(frozen=True, kw_only=True)
class ArchitectureSpec:
    kind: Arch = _opt(Choice(Arch), Arch.FC, "fc: Linear layers; cnn: two stride-2 convs, then fc")
    # limits: a 16384 x 16384 Linear is 268M parameters (1 GiB in float32), a 1024 -> 1024 conv 9.4M
    hidden: tuple[int, ...] = _opt(ListOf(Int(ge=1, le=16_384), min_len=1, max_len=64), (128, 128),
                                   "fc widths (cnn: the fc width, first)")
    channels: tuple[int, ...] = _opt(ListOf(Int(ge=1, le=1024), min_len=1, max_len=4), (8, 16), "cnn conv channels")
    activation: Act = _opt(Choice(Act), Act.SOFTPLUS)
    beta: float = _opt(Num(gt=0), 10.0, "softplus β")


@dataclass(frozen=True, kw_only=True)
class TrainModelSpec:
    input_shape: tuple[int, ...] = _opt(ListOf(Int(gt=0), min_len=1))
    classes: int = _opt(Int(ge=2, le=100_000), 10, "at least the data's largest label + 1")
    input_range: tuple[float, float] | None = _opt(Nullable(ListOf(Num(), 2, 2)), (0.0, 1.0))
    architecture: ArchitectureSpec = _opt(Section(ArchitectureSpec), {})

    def validate(self) -> None:
        if self.architecture.kind == Arch.CNN and len(self.input_shape) != 3:
            raise _Invalid(f"expected [channels, height, width] for a cnn, got {_show(self.input_shape)}",
                           "input_shape")


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    lr: float = _opt(Num(gt=0), 1e-3)
    weight_decay: float = _opt(Num(ge=0), 0.0, "plain L2 weight decay (AdamW)")
    epochs: int = _opt(Int(ge=1, le=100_000), 10)
    batch_size: int = _opt(Int(ge=1, le=65_536), 32)


# the regulariser's defaults are declared once, by the options object it consumes
_REG = RegularizerConfig()


@dataclass(frozen=True, kw_only=True)
class RegularizerSpec:
    name: Regularizer = _opt(Choice(Regularizer), Regularizer(_REG.name))
    weight: float = _opt(Num(ge=0), _REG.weight, "α")
    epsilon: float = _opt(Num(ge=0), _REG.epsilon, "input box radius at the end of the ramp")
    gamma: float = _opt(Num(ge=0), _REG.gamma, "relative parameter box radius at the end of the ramp (gradcert)")
    ramp_fraction: float = _opt(Num(ge=0, le=1), _REG.ramp_fraction, "fraction of training over which ε, γ ramp up from 0")
    pgd_steps: int = _opt(Int(ge=1, le=1000), _REG.pgd_steps, "gnorm / pgd_at inner steps (per batch)")
    samples: int = _opt(Int(ge=1, le=1000), _REG.samples, "grad_norm noise draws / hessian probes (per batch)")


@dataclass(frozen=True, kw_only=True)
class TrainGeneralSpec:
    name: str = _opt(FileName(), "model", "output file stem inside results (no path separators)")
    seed: int = _opt(SEED, 0)
    device: Device = _opt(Choice(Device), Device.CPU)
    results: Path = _opt(PathCheck(must_exist=False), "results", "output directory")
    progress: bool = _opt(Bool(), True)


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    model: TrainModelSpec = _opt(Section(TrainModelSpec))
    data: DataSpec = _opt(Section(DataSpec))
    optimizer: OptimizerSpec = _opt(Section(OptimizerSpec), {})
    regularizer: RegularizerSpec = _opt(Section(RegularizerSpec), {})
    general: TrainGeneralSpec = _opt(Section(TrainGeneralSpec), {})
    source: str = field(default="<dict>", compare=False)


def train_config_from_dict(d: Any, source: str = "<dict>", base_dir: str | Path | None = None) -> TrainSpec:
    """Validate a parsed training config (the spec schema machinery, see verigrad.spec)."""
    return parse_document(TrainSpec, d, source, base_dir)


def load_train_config(path: str | Path) -> TrainSpec:
    """Read and validate a training config; paths resolve against its directory."""
    p = Path(path)
    return train_config_from_dict(read_yaml(p, "config"), source=str(p), base_dir=p.resolve().parent)


def _activation(a: ArchitectureSpec) -> nn.Module:
    return {Act.RELU: nn.ReLU, Act.SIGMOID: nn.Sigmoid, Act.TANH: nn.Tanh}.get(
        a.activation, lambda: nn.Softplus(beta=a.beta))()


def build_model(m: TrainModelSpec) -> nn.Sequential:
    """The architecture as an nn.Sequential of layers verigrad verifies."""
    a = m.architecture
    layers: list[nn.Module] = []
    if a.kind == Arch.FC:
        width = 1
        for s in m.input_shape:
            width *= s
        layers.append(nn.Flatten())
        for h in a.hidden:
            layers += [nn.Linear(width, h), _activation(a)]
            width = h
    else:
        c, h, w = m.input_shape
        for co in a.channels:
            layers += [nn.Conv2d(c, co, 3, stride=2, padding=1), _activation(a)]
            c, h, w = co, (h + 1) // 2, (w + 1) // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, a.hidden[0]), _activation(a)]
        width = a.hidden[0]
    layers.append(nn.Linear(width, m.classes))
    return nn.Sequential(*layers)


@dataclass
class TrainResult:
    model: nn.Sequential
    log: list[dict]
    onnx_path: Path
    spec_path: Path
    log_path: Path


def _reg_config(r: RegularizerSpec, domain: tuple[float, float] | None) -> RegularizerConfig:
    return RegularizerConfig(name=r.name, weight=r.weight, epsilon=r.epsilon, gamma=r.gamma,
                             ramp_fraction=r.ramp_fraction, pgd_steps=r.pgd_steps, samples=r.samples,
                             domain=domain)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """Opset-13 ONNX with a dynamic batch axis, through the TorchScript exporter (a flat
    plain-op graph that verigrad's loader reads layer by layer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(model.float().cpu(), (torch.zeros(1, *input_shape),), str(path), dynamo=False,
                          opset_version=13, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _verify_spec(cfg: TrainSpec, onnx_path: Path) -> dict:
    eps = cfg.regularizer.epsilon or 0.01
    d = cfg.data
    data = {"dataset": d.dataset.value} if d.dataset is not None else {"path": str(d.path)}
    return {
        "model": {"path": str(onnx_path.resolve()), "input_shape": list(cfg.model.input_shape),
                  "input_range": None if cfg.model.input_range is None else list(cfg.model.input_range)},
        "data": {**data, "start": 0, "end": 10},
        "explanation": {"method": "saliency", "output": "logit", "target": "predicted"},
        "perturbation": {"input": {"norm": "inf", "epsilon": eps}},
        "properties": [
            {"name": "l2n", "kind": "untargeted", "metric": "l2", "normalize": "l2", "threshold": 0.3},
            {"name": "cos", "kind": "untargeted", "metric": "cosine", "threshold": 0.9},
        ],
        "bounds": {"methods": ["ibp", "crown"], "dtype": "float64"},
        "attack": {"order": "after"},
        "general": {"device": "auto", "results": str(cfg.general.results.resolve())},
    }


def train(cfg: TrainSpec, on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """Train per ``cfg``; write ``<results>/<name>.onnx``, ``<name>.verify.yaml`` (a ready
    verification spec) and ``<name>.train.json`` (per-epoch log, rewritten every epoch)."""
    from verigrad.verify import resolve_device

    device = resolve_device(cfg.general.device, cfg.source)
    torch.manual_seed(cfg.general.seed)
    gen = torch.Generator().manual_seed(cfg.general.seed)
    d = cfg.data
    x, y = load_dataset(d.dataset.value if d.dataset is not None else None, d.path, d.start, d.end)
    if len(y):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise SpecError(cfg.source, "data", f"labels must be >= 0, the data has label {lo}")
        if hi >= cfg.model.classes:
            raise SpecError(cfg.source, "model.classes", f"expected an int > the data's largest label ({hi}), "
                                                         f"got {cfg.model.classes}")
    shape = tuple(cfg.model.input_shape)
    if tuple(x.shape[1:]) != shape:
        raise SpecError(cfg.source, "model.input_shape", f"the data has per-sample shape {tuple(x.shape[1:])}, "
                                                         f"not {_show(shape)}")
    x, y = x.to(device=device, dtype=torch.float32), y.to(device)
    model = build_model(cfg.model).to(device)
    try:
        net = network_from_module(model, shape)
    except ValueError as e:
        raise SpecError(cfg.source, "model", str(e)) from None
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    domain = cfg.model.input_range
    try:
        reg = _reg_config(cfg.regularizer, domain)
        check_applies(net, reg)
    except ValueError as e:  # a combination the schema admits but the regulariser does not
        raise SpecError(cfg.source, "regularizer", str(e)) from None
    n = len(x)
    steps_total = o.epochs * ((n + o.batch_size - 1) // o.batch_size)
    out = cfg.general.results
    stem = cfg.general.name
    for suffix in (".onnx", ".verify.yaml", ".train.json"):  # before training, not after it
        check_writable(out / f"{stem}{suffix}")
    log_path = out / f"{stem}.train.json"
    log: list[dict] = []
    step = 0
    eval_x, eval_y = x[: min(n, 64)], y[: min(n, 64)]
    for epoch in range(o.epochs):
        start = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(device)
        sums = {"loss": 0.0, "ce": 0.0, "penalty": 0.0}
        batches = 0
        model.train()
        for b in range(0, n, o.batch_size):
            idx = perm[b : b + o.batch_size]
            loss, info = training_loss(model, net, x[idx], y[idx], reg, step / max(steps_total, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            batches += 1
            sums["loss"] += float(loss)
            sums["ce"] += float(info.get("ce", 0.0))
            sums["penalty"] += float(info.get("penalty", 0.0))
        model.eval()
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        box = float(gradcert_penalty(net, eval_x, eval_y, reg.epsilon, reg.gamma, domain).detach())
        row = {"epoch": epoch + 1, **{k: v / batches for k, v in sums.items()}, "train_accuracy": acc,
               "certified_box_l2": box, "epsilon": reg.epsilon, "gamma": reg.gamma,
               "time_s": time.perf_counter() - start}
        log.append(row)
        log_path.write_text(json.dumps({"config": cfg.source, "log": log}, indent=1))
        if on_epoch is not None:
            on_epoch(row)
    onnx_path = out / f"{stem}.onnx"
    export_onnx(model, shape, onnx_path)
    spec_path = out / f"{stem}.verify.yaml"
    spec_path.write_text(yaml.safe_dump(_verify_spec(cfg, onnx_path), sort_keys=False))
    return TrainResult(model, log, onnx_path, spec_path, log_path)


__all__ = ["TrainSpec", "TrainResult", "build_model", "export_onnx", "load_train_config", "train",
           "train_config_from_dict"]
