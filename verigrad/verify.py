"""The verification pipeline: spec → model and data → boxes → bound engines → verdicts.

``prepare`` turns a validated spec into loaded objects (bad input raises here, before any
bounding); ``verify_instance`` bounds one input with every engine and decides every
property; ``verify`` runs them all, isolating failures: an instance that errors is recorded
and the rest go on. Nothing here prints or reads global state.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from verigrad import properties as props
from verigrad.bounds import Bounds, BoundsError, EngineOptions, Method, compute_bounds
from verigrad.data import load_dataset
from verigrad.graph.gradient_graph import Output, saliency
from verigrad.models import load_model
from verigrad.models.network import Network
from verigrad.perturbation import ParamBox, input_box, param_box
from verigrad.properties import Property, PropertyResult, Verdict
from verigrad.spec import Combine, Device, Spec, TargetClass

COMBINED = "combined"


class SoundnessError(RuntimeError):
    """An engine's bounds exclude the explanation at the centre of the box: a bug in
    verigrad (or a dependency), reported loudly and never turned into a verdict."""


class SetupError(ValueError):
    """A spec that validates but cannot run (e.g. device cuda without CUDA, a class index
    out of range, a layer name the model does not have)."""


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything a run needs, loaded and placed on the device in the run's dtype."""

    spec: Spec
    net: Network
    x: torch.Tensor
    y: torch.Tensor
    properties: tuple[Property, ...]
    params: ParamBox | None
    methods: tuple[Method, ...]
    options: EngineOptions
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class EngineRun:
    """One engine on one instance."""

    method: str
    actual_method: str
    time_s: float
    mean_width: float
    max_width: float
    notes: tuple[str, ...]
    properties: tuple[PropertyResult, ...]
    bounds: Bounds = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "actual_method": self.actual_method,
            "time_s": self.time_s,
            "mean_width": self.mean_width,
            "max_width": self.max_width,
            "notes": list(self.notes),
            "properties": [p.to_dict() for p in self.properties],
        }


@dataclass(frozen=True)
class InstanceResult:
    index: int
    label: int
    prediction: int | None = None
    target: int | None = None
    engines: tuple[EngineRun, ...] = ()
    # best verdict per property over the engines (all are sound: one certificate suffices)
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    explanation: torch.Tensor | None = field(default=None, repr=False, compare=False)
    error: str | None = None
    internal_error: bool = False

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "label": self.label,
            "prediction": self.prediction,
            "target": self.target,
            "error": self.error,
            "internal_error": self.internal_error,
            "verdicts": {k: v.value for k, v in self.verdicts.items()},
            "engines": {e.method: e.to_dict() for e in self.engines},
        }


def resolve_device(device: Device | str) -> torch.device:
    d = Device(device)
    if d == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == Device.CUDA and not torch.cuda.is_available():
        raise SetupError("general.device: cuda requested but torch.cuda.is_available() is False "
                         "(use device: auto or cpu)")
    return torch.device(d.value)


def prepare(spec: Spec, methods: Sequence[Method | str] | None = None) -> Problem:
    """Load model, data, boxes and properties for ``spec`` (raises on bad input)."""
    device = resolve_device(spec.general.device)
    dtype = torch.float64 if spec.bounds.dtype.value == "float64" else torch.float32
    m = spec.model
    norm = (m.normalization.mean, m.normalization.std) if m.normalization is not None else None
    net = load_model(m.path, m.input_shape, norm).to(dtype=dtype, device=device)
    x, y = load_dataset(
        spec.data.dataset.value if spec.data.dataset is not None else None, spec.data.path, spec.data.start, spec.data.end
    )
    if tuple(x.shape[1:]) != net.input_shape:
        raise SetupError(
            f"data: inputs have shape {tuple(x.shape[1:])} per sample but model {m.path} expects {net.input_shape}"
        )
    target = spec.explanation.target
    if isinstance(target, int) and not isinstance(target, bool) and target >= net.num_classes:
        raise SetupError(f"explanation.target: class {target} out of range for a model with {net.num_classes} outputs")
    params = None
    pp = spec.perturbation.parameters
    if pp is not None:
        layers = None if pp.layers == "all" else list(pp.layers)
        try:
            params = param_box(net, pp.gamma, pp.mode, layers, pp.include_bias)
        except KeyError as e:
            raise SetupError(f"perturbation.parameters.layers: {e.args[0]}") from None
    properties = tuple(props.from_spec(p, net.input_shape, dtype, device) for p in spec.properties)
    chosen = tuple(Method(getattr(mm, "value", mm)) for mm in (methods or spec.bounds.methods))
    options = EngineOptions(
        product=spec.bounds.ibp.product.value,
        alpha_iterations=spec.bounds.alpha_crown.iterations,
        alpha_lr=spec.bounds.alpha_crown.lr,
    )
    return Problem(spec, net, x.to(device=device, dtype=dtype), y.to(device), properties, params, chosen,
                   options, device, dtype)


def _target_class(problem: Problem, pred: int, label: int) -> int:
    t = problem.spec.explanation.target
    if t == TargetClass.PREDICTED:
        return pred
    if t == TargetClass.LABEL:
        return label
    return int(t)


def _check_contains_centre(method: str, bounds: Bounds, v0: torch.Tensor, dtype: torch.dtype) -> None:
    tol = (1e-4 if dtype == torch.float32 else 1e-9) * (1 + v0.abs())
    bad = (v0 < bounds.lower - tol) | (v0 > bounds.upper + tol)
    if bool(bad.any()):
        excess = float(torch.maximum(bounds.lower - v0, v0 - bounds.upper).max())
        raise SoundnessError(
            f"{method}: the explanation at the box centre lies outside the bounds at {int(bad.sum())} "
            f"coordinates (by up to {excess:.3g}); this is a verigrad bug, please report it"
        )


def _decide_all(problem: Problem, v0: torch.Tensor, bounds: Bounds) -> tuple[PropertyResult, ...]:
    return tuple(props.evaluate(p, v0, bounds)[0] for p in problem.properties)


def _engine_run(method: str, actual: str, dt: float, notes, bounds: Bounds, problem: Problem, v0) -> EngineRun:
    w = bounds.width
    return EngineRun(method, actual, dt, float(w.mean()), float(w.max()), tuple(notes),
                     _decide_all(problem, v0, bounds), bounds)


def verify_instance(problem: Problem, i: int) -> InstanceResult:
    """Bound and decide one input (index ``i`` into the loaded data)."""
    spec = problem.spec
    x = problem.x[i : i + 1]
    label = int(problem.y[i])
    with torch.no_grad():
        pred = int(problem.net.forward(x).argmax(dim=1))
    target = _target_class(problem, pred, label)
    t = torch.tensor([target], device=problem.device)
    output = Output(spec.explanation.output)
    v0 = saliency(problem.net, x, t, output)
    pin = spec.perturbation.input
    domain = tuple(spec.model.input_range) if spec.model.input_range is not None else None
    box = input_box(x, pin.epsilon if pin is not None else 0.0, domain)
    runs: list[EngineRun] = []
    for m in problem.methods:
        start = time.perf_counter()
        res = compute_bounds(m, problem.net, box, t, output, problem.params, problem.options)
        if problem.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - start
        _check_contains_centre(m.value, res.bounds, v0, problem.dtype)
        runs.append(_engine_run(m.value, res.actual_method or m.value, dt, res.notes, res.bounds, problem, v0))
    if spec.bounds.combine == Combine.INTERSECT and len(runs) > 1:
        b = runs[0].bounds
        for r in runs[1:]:
            b = b.intersect(r.bounds)
        runs.append(_engine_run(COMBINED, "+".join(r.method for r in runs), sum(r.time_s for r in runs),
                                ("intersection of " + ", ".join(r.method for r in runs),), b, problem, v0))
    verdicts = {}
    for k, p in enumerate(problem.properties):
        vs = [r.properties[k].verdict for r in runs]
        verdicts[p.name] = Verdict.CERTIFIED if Verdict.CERTIFIED in vs else (
            Verdict.FALSIFIED if Verdict.FALSIFIED in vs else Verdict.UNKNOWN)
    return InstanceResult(i + spec.data.start, label, pred, target, tuple(runs), verdicts, v0[0].detach().cpu())


def verify(
    problem: Problem,
    on_instance: Callable[[InstanceResult], None] | None = None,
) -> list[InstanceResult]:
    """Run every instance; one that fails is recorded with its error and the rest go on.
    ``on_instance`` is called after each (e.g. to write results incrementally)."""
    out = []
    for i in range(len(problem.x)):
        try:
            r = verify_instance(problem, i)
        except Exception as e:  # noqa: BLE001 - isolate one instance's failure, report it
            # inverted bounds or a centre outside them are verigrad bugs, whatever their base class
            internal = isinstance(e, (SoundnessError, BoundsError)) or not isinstance(e, (ValueError, KeyError))
            detail = "".join(traceback.format_exception_only(type(e), e)).strip()
            r = InstanceResult(i + problem.spec.data.start, int(problem.y[i]), error=detail, internal_error=internal)
        out.append(r)
        if on_instance is not None:
            on_instance(r)
    return out
