"""The verification pipeline: spec → model and data → boxes → bound engines → verdicts.

``prepare`` turns a validated spec into loaded objects (bad input raises here, before any
bounding); ``verify_instance`` bounds one input with every engine and decides every
property; ``verify`` runs them all, isolating failures: an instance that errors is recorded
and the rest go on. Nothing here prints or reads global state.
"""
from __future__ import annotations

import builtins
import dataclasses
import functools
import itertools
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from verigrad import properties as props
from verigrad.attacks import AttackMethod, AttackOptions, AttackOrder, AttackOutcome, Point, Threat, attack_property
from verigrad.attacks import evaluate_point, load_witness, outcome
from verigrad.attacks.witness import WitnessError
from verigrad.bounds import (
    Bounds, EngineOptions, EngineResult, EngineUnsupported, Method, bab, compute_bounds, domain_engine, rounding,
)
from verigrad.bounds.options import available_memory_bytes
from verigrad.data import NO_LABEL, load_dataset
from verigrad.errors import InternalError, ModelError, UserError
from verigrad.explanations import (
    Explainer, ExplanationMethod, explain, explanation_bounds, explanation_linear_bounds, jacobian_bounds, pass_bytes,
)
from verigrad.graph.gradient_graph import Output
from verigrad.guarantees import Guarantee
from verigrad.models import load_model
from verigrad.models.network import Network, check_loaded
from verigrad.operators.interval import mul_interval
from verigrad.perturbation import FixedBox, Norm, ParamBox, Perturbation
from verigrad.properties import Direction, Kind, Metric, Property, PropertyResult, Verdict
from verigrad.spec import Combine, Device, OutsideRange, Spec, TargetClass, spec_from_dict

COMBINED = "combined"


class SoundnessError(InternalError):
    """An engine's bounds exclude the explanation at the centre of the box: a bug in
    verigrad (or a dependency), reported loudly and never turned into a verdict."""


class SetupError(UserError):
    """A spec that validates but cannot run with its model and data (e.g. device cuda without
    CUDA, a class index out of range, a layer name the model does not have): names the spec
    file, the key and what was expected."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}")


@dataclass(frozen=True, eq=False)
class Problem:
    """Everything a run needs, loaded and placed on the device in the run's dtype."""

    spec: Spec
    net: Network
    x: torch.Tensor
    y: torch.Tensor
    properties: tuple[Property, ...]
    perturbation: Perturbation  # the threat set's definition; input boxes come from it
    params: ParamBox | None  # its parameter box for ``net``, built once and shared by engines and attacks
    methods: tuple[Method, ...]
    options: EngineOptions
    device: torch.device
    dtype: torch.dtype
    attack_order: AttackOrder = AttackOrder.SKIP
    attack_options: AttackOptions = field(default_factory=AttackOptions)
    attack_methods: tuple[AttackMethod, ...] | None = None  # None: every applicable attack
    empirical: bool = False  # also measure random-perturbation similarity and max-sensitivity
    explainer: Explainer = field(default_factory=Explainer)
    input_notes: tuple[str, ...] = ()  # where the inputs and their box came from (e.g. a VNN-LIB file)


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
    guarantee: Guarantee = Guarantee.SOUND
    failure_probability: float | None = None  # probabilistic certificates only
    # bab only: per property searched, {status, domains, leaves, open, time_s, complete}
    search: dict[str, dict] = field(default_factory=dict)
    # the bounds enclose the exact range in spite of floating point (verigrad.bounds.rounding);
    # a sound run that is not rigorous certifies nothing (its certificates are withheld)
    rigorous: bool = False

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "actual_method": self.actual_method,
            "guarantee": self.guarantee.value,
            "failure_probability": self.failure_probability,
            "time_s": self.time_s,
            "mean_width": self.mean_width,
            "max_width": self.max_width,
            "notes": list(self.notes),
            "properties": [p.to_dict() for p in self.properties],
            "search": self.search,
            "rigorous": self.rigorous,
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
    attacks: dict[str, AttackOutcome] = field(default_factory=dict, compare=False)
    # per property: the tightest certified worst case, the worst attacked value, their ratio
    gap: dict[str, dict] = field(default_factory=dict)
    empirical: dict = field(default_factory=dict)
    # Jacobian (Hessian) bound summaries per engine and the literature's bounds side by side
    second_order: dict = field(default_factory=dict)
    # per property: the largest ε certified by the sound engines (radius.search)
    radius: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "label": self.label if self.label != NO_LABEL else None,
            "prediction": self.prediction,
            "target": self.target,
            "error": self.error,
            "internal_error": self.internal_error,
            "verdicts": {k: v.value for k, v in self.verdicts.items()},
            "engines": {e.method: e.to_dict() for e in self.engines},
            "attacks": {k: a.to_dict() for k, a in self.attacks.items()},
            "gap": self.gap,
            "empirical": self.empirical,
            "second_order": self.second_order,
            "radius": self.radius,
        }


def resolve_device(device: Device | str, source: str = "<spec>") -> torch.device:
    d = Device(device)
    if d == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == Device.CUDA and not torch.cuda.is_available():
        raise SetupError(source, "general.device", "cuda requested but torch.cuda.is_available() is False "
                         "(use device: auto or cpu)")
    return torch.device(d.value)


def prepare(spec: Spec, methods: Sequence[Method | str] | None = None) -> Problem:
    """Resolve ``spec`` into loaded objects (bad input raises here, before any bounding):
    the options each subsystem reads, the model and data on the device, the parameter box
    and the properties. ``methods`` replaces the spec's engines; an empty sequence runs none
    (attacks only)."""
    device = resolve_device(spec.general.device, spec.source)
    src = spec.source
    dtype = torch.float64 if spec.bounds.dtype.value == "float64" else torch.float32
    net, x, y, box, input_notes = _load(spec, device, dtype)
    m = spec.model
    perturbation = spec.perturbation.build(m.input_range, box)
    try:
        params = perturbation.param_box(net)
    except KeyError as e:
        raise SetupError(src, "perturbation.parameters.layers", e.args[0]) from None
    properties = []
    for i, entry in enumerate(spec.properties):
        try:
            properties.append(entry.build(net.input_shape, dtype, device))
        except ValueError as e:  # k or feature indices that do not fit this model's map, a bad target
            raise SetupError(src, f"properties[{i}]", str(e)) from None
    chosen = tuple(Method(getattr(mm, "value", mm)) for mm in (spec.bounds.methods if methods is None else methods))
    lirpa_methods = [mm.value for mm in chosen if mm in (Method.CROWN, Method.ALPHA_CROWN)
                     or (mm == Method.BAB and spec.bounds.bab.root in (Method.CROWN, Method.ALPHA_CROWN))]
    if lirpa_methods:  # before any work: a missing auto_LiRPA is bad setup (exit 2), not a failed instance
        from verigrad.bounds.lirpa_compat import require_auto_lirpa

        require_auto_lirpa(f"{src}: bounds.methods {', '.join(lirpa_methods)}")
    a = spec.attack
    try:
        explainer = spec.explanation.explainer(spec.general.seed)
    except ValueError as err:
        raise SetupError(src, "explanation.smoothing", str(err)) from None
    _check_second_order(spec, net, explainer, params)
    if Method.BAB in chosen and explainer.method not in BAB_EXPLANATIONS:
        raise SetupError(src, "bounds.methods", f"bab decides properties of {' and '.join(sorted(BAB_EXPLANATIONS))} "
                         f"maps, not {explainer.method.value}; remove bab or change explanation.method")
    _check_allocation(spec, net, explainer, dtype, device)
    pin = spec.perturbation.input
    if pin is not None and pin.norm == Norm.L2 and not explainer.probabilistic:
        raise SetupError(src, "perturbation.input.norm", "l2 balls are certified only for smoothgrad / "
                         "sparsified_smoothgrad (the bound engines and attacks work on ℓ∞ boxes); use norm: inf")
    return Problem(spec, net, x, y, tuple(properties), perturbation, params, chosen, spec.bounds.engine_options(),
                   device, dtype, AttackOrder(a.order), a.options(spec.general.seed),
                   None if isinstance(a.methods, str) else tuple(a.methods), explainer=explainer,
                   input_notes=input_notes)


def _load(spec: Spec, device: torch.device, dtype: torch.dtype
          ) -> tuple[Network, torch.Tensor, torch.Tensor, FixedBox | None, tuple[str, ...]]:
    """The model and the data, checked against each other, on ``device`` in ``dtype``; with
    perturbation.input.vnnlib, the file's box (and its centre as the one input) instead of
    data; and notes on where the inputs came from."""
    m = spec.model
    norm = (m.normalization.mean, m.normalization.std) if m.normalization is not None else None
    net = load_model(m.path, m.input_shape, norm, m.output)
    try:  # a float64 weight beyond float32's range becomes inf in a float32 run
        net = check_loaded(net.to(dtype=dtype, device=device))
    except ModelError as e:
        raise SetupError(spec.source, "bounds.dtype", f"model {m.path} in {str(dtype).removeprefix('torch.')}: {e}") from None
    src = spec.source
    box: FixedBox | None = None
    notes: tuple[str, ...] = ()
    if spec.vnnlib is not None:
        x, y, box, notes = _vnnlib_input(spec, net)
    else:
        x, y = _data_input(spec)
    target = spec.explanation.target
    if target == TargetClass.LABEL and bool((y == NO_LABEL).any()):
        where = (f"the input comes from perturbation.input.vnnlib {spec.vnnlib}" if spec.vnnlib is not None
                 else f"data file {spec.data.path} has no array 'y'")
        raise SetupError(src, "explanation.target", f"label needs the inputs' labels, but {where}; give a class "
                                                   "index or predicted (or add the labels 'y')")
    if tuple(x.shape[1:]) != net.input_shape:
        hint = (f"; set data.reshape: {list(net.input_shape)} to reshape each sample"
                if x[0].numel() == torch.Size(net.input_shape).numel() else "")
        raise SetupError(src, "data", f"inputs have shape {tuple(x.shape[1:])} per sample but model {m.path} "
                                      f"expects {net.input_shape}{hint}")
    if isinstance(target, int) and not isinstance(target, bool) and target >= net.num_classes:
        raise SetupError(src, "explanation.target", f"class {target} out of range for model {m.path} with "
                                                    f"{net.num_classes} outputs")
    if len(y) and int(y.max()) >= net.num_classes:
        k = int(torch.nonzero(y >= net.num_classes)[0, 0])
        raise SetupError(src, "data", f"input {spec.data.start + k} has label {int(y[k])}, out of range for model "
                                      f"{m.path} with {net.num_classes} outputs")
    if m.input_range is not None and spec.data.outside_range == OutsideRange.ERROR and spec.vnnlib is None:
        _check_in_range(src, x, m.input_range, spec.data.start)
    return net, x.to(device=device, dtype=dtype), y.to(device), box, notes


def _data_input(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """The data's samples (reshaped per data.reshape) and labels (NO_LABEL where the file has
    none and explanation.target does not need them)."""
    d = spec.data
    x, y = load_dataset(d.dataset.value if d.dataset is not None else None, d.path, d.start, d.end,
                        require_labels=False)  # explanation.target: label without labels is refused by _load
    if d.reshape is not None:
        dims, per = tuple(d.reshape), int(x[0].numel())
        want = torch.Size(dims).numel()
        if want != per:
            what = str(d.path) if d.path is not None else f"built-in dataset {getattr(d.dataset, 'value', d.dataset)}"
            raise SetupError(spec.source, "data.reshape", f"expected dims with {per} elements in all (one sample of "
                                                          f"{what} has shape {tuple(x.shape[1:])}, {per} elements), "
                                                          f"got {list(dims)} ({want} elements)")
        x = x.reshape(x.shape[0], *dims)
    return x, y


def _vnnlib_input(spec: Spec, net: Network) -> tuple[torch.Tensor, torch.Tensor, FixedBox, tuple[str, ...]]:
    """perturbation.input.vnnlib: the file's box (float64, checked against the model's input
    size and model.input_range) and its centre, shaped as the model's input, as the one input."""
    from verigrad.vnnlib import VnnlibError, read_vnnlib

    assert spec.vnnlib is not None
    vb = read_vnnlib(spec.vnnlib)
    shape = net.input_shape
    vb.check_size(torch.Size(shape).numel(), shape)
    rng = spec.model.input_range
    if rng is not None and spec.data.outside_range == OutsideRange.ERROR:
        lo, hi = rng
        bad = (vb.lower < lo) | (vb.upper > hi)
        if bool(bad.any()):
            j = int(bad.nonzero()[0][0])
            coord = [int(c) for c in torch.unravel_index(torch.tensor(j), shape)]
            below = bool(vb.lower[j] < lo)
            line = vb.lower_lines[j] if below else vb.upper_lines[j]
            raise VnnlibError(vb.path, line, f"X_{j} (coordinate {coord}) has bounds [{vb.lower[j]:.6g}, "
                                             f"{vb.upper[j]:.6g}], outside model.input_range [{lo:g}, {hi:g}] "
                                             f"({int(bad.sum())} input variable(s) affected); fix the file or the "
                                             "range, or set data.outside_range: allow to certify the clipped box")
    box = FixedBox(torch.from_numpy(vb.lower), torch.from_numpy(vb.upper), vb.path)
    x = torch.from_numpy(vb.centre()).reshape(1, *shape)
    return x, torch.full((1,), NO_LABEL, dtype=torch.long), box, vb.notes()


def _check_in_range(source: str, x: torch.Tensor, domain: tuple[float, float], start: int) -> None:
    """Every input lies in the domain: for one outside it, the clipped box [x − ε, x + ε] ∩
    domain would not be the ε-box the spec asks for (often a sign of unnormalised data)."""
    lo, hi = domain
    bad = (x < lo) | (x > hi) | torch.isnan(x)
    if not bool(bad.any()):
        return
    k = int(torch.nonzero(bad.flatten(1).any(1))[0, 0])
    j = int(torch.nonzero(bad[k].flatten())[0, 0])
    coord = tuple(int(c) for c in torch.unravel_index(torch.tensor(j), tuple(x.shape[1:])))
    raise SetupError(source, "data", f"input {start + k} has value {float(x[k].flatten()[j]):.6g} at coordinate "
                                     f"{list(coord)}, outside model.input_range [{lo:g}, {hi:g}] "
                                     f"({int(bad.flatten(1).any(1).sum())} input(s) affected); fix the data or the "
                                     "range, or set data.outside_range: allow to certify the clipped box")


def _check_allocation(spec: Spec, net: Network, explainer: Explainer, dtype: torch.dtype,
                      device: torch.device) -> None:
    """Refuse, before any work, an explanation whose single pass would not fit in the memory
    available now (:func:`verigrad.explanations.pass_bytes`), naming the key that sizes it."""
    need, avail = pass_bytes(explainer, net, dtype), available_memory_bytes(device)
    if avail is None or need <= avail:
        return
    points = explainer.pass_points
    key = ("explanation.integrated_gradients.steps" if explainer.method == ExplanationMethod.INTEGRATED_GRADIENTS
           else "explanation.smoothing.batch_size" if explainer.probabilistic else "model")
    fit = max(1, int(points * avail / need))
    raise SetupError(spec.source, key, f"{points} points per pass on model {spec.model.path} would allocate about "
                                       f"{need / 2**30:.2f} GiB, more than the {avail / 2**30:.2f} GiB available on "
                                       f"{device}; at most about {fit} fit")


def _check_second_order(spec: Spec, net: Network, explainer: Explainer, params: ParamBox | None) -> None:
    """Second-order bounds need a smooth network, a deterministic map and no parameter box."""
    if not spec.second_order.hessian:
        return
    from verigrad.bounds.hessian import SecondOrderUnsupported, require_smooth

    where = "second_order.hessian"
    if explainer.probabilistic:
        raise SetupError(spec.source, where, f"{explainer.method.value} is sampled; its Jacobian cannot be bounded")
    if params is not None:
        raise SetupError(spec.source, where, "Hessian bounds cover input boxes only; remove perturbation.parameters")
    try:
        require_smooth(net, spec.explanation.output)
    except (SecondOrderUnsupported, EngineUnsupported) as e:
        raise SetupError(spec.source, where, str(e)) from None


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


def _decide_all(problem: Problem, v0: torch.Tensor, bounds: Bounds,
                dots: Mapping[str, torch.Tensor] | None = None) -> tuple[PropertyResult, ...]:
    dots = dots or {}
    return tuple(props.evaluate(p, v0, bounds, dots.get(p.name))[0] for p in problem.properties)


def _engine_run(method: str, actual: str, dt: float, notes, bounds: Bounds, problem: Problem, v0,
                rigorous: bool = False, extra: int | None = None, enclosure: bool | None = None,
                guarantee: Guarantee = Guarantee.SOUND, dots: Mapping[str, torch.Tensor] | None = None) -> EngineRun:
    """One run's record: its bounds widened for rounding (:mod:`verigrad.bounds.rounding`; a
    ``rigorous`` engine's only for the explanation's ``extra`` roundings), and every property
    decided on those widened bounds. ``enclosure`` (default ``rigorous``): whether the widened
    bounds are a rigorous enclosure; a sound run whose bounds are not (an a-priori allowance
    only) has its certificates withheld: a verdict must not rest on an unproven rounding bound.
    ``dots``: rigorous bounds of properties' linear functionals (:func:`_functional_bounds`)."""
    extra = _extra_roundings(problem.explainer) if extra is None else extra
    bounds, note = rounding.widen(problem.net, bounds, problem.dtype, extra, rigorous=rigorous)
    w = bounds.width
    enclosed = rigorous if enclosure is None else enclosure
    decided, notes = _decide_all(problem, v0, bounds, dots), (*notes, note)
    if not enclosed and guarantee == Guarantee.SOUND:
        decided, notes = _withhold(decided, notes)
    return EngineRun(method, actual, dt, float(w.mean()), float(w.max()), notes, decided, bounds,
                     guarantee=guarantee, rigorous=enclosed)


def _withhold(results: Sequence[PropertyResult], notes: tuple[str, ...]
              ) -> tuple[tuple[PropertyResult, ...], tuple[str, ...]]:
    """``certified`` → ``unknown`` for bounds that are not a rigorous enclosure, said in a note."""
    withheld = [r.name for r in results if r.verdict == Verdict.CERTIFIED]
    if withheld:
        notes += (f"certificates withheld ({', '.join(withheld)}): these bounds carry an a-priori rounding "
                  "allowance, not a rigorous one",)
    return tuple(dataclasses.replace(r, verdict=Verdict.UNKNOWN) if r.verdict == Verdict.CERTIFIED else r
                 for r in results), notes


def _extra_roundings(explainer: Explainer) -> int:
    """Roundings the explanation adds to the gradient's: a sum over the quadrature nodes
    (integrated gradients) or the samples (smoothing), a product with the input."""
    if explainer.method == ExplanationMethod.INTEGRATED_GRADIENTS:
        return explainer.steps + 2
    if explainer.smoothing is not None:
        return int(explainer.smoothing.samples) + 2
    return 2


def threat_for(problem: Problem, i: int, target: int) -> Threat:
    """Input ``i`` explained for class ``target`` inside its boxes: the input box built here
    from the problem's perturbation and the parameter box built once by :func:`prepare`. The
    engines bound exactly these boxes and the attacks search them."""
    return Threat.around(problem.net, problem.x[i : i + 1], target, Output(problem.spec.explanation.output),
                         problem.perturbation, problem.explainer, problem.params)


def _run_attacks(problem: Problem, threat: Threat, i: int, which: Sequence[Property]) -> dict[str, AttackOutcome]:
    opts = AttackOptions(**{**problem.attack_options.__dict__, "seed": problem.attack_options.seed + i})
    return {p.name: attack_property(threat, p, opts, problem.attack_methods) for p in which}


def _tightest(prop: Property, runs: Sequence[EngineRun], k: int) -> float | None:
    vals = [r.properties[k].worst_case for r in runs]
    if not vals:
        return None
    return min(vals) if prop.rule.direction == Direction.AT_MOST else max(vals)


def _conflicts(problem: Problem, runs: Sequence[EngineRun], attacks: dict[str, AttackOutcome]) -> list[str]:
    """Certified by an engine yet violated by a float64 witness: one of them is wrong."""
    out = []
    for k, p in enumerate(problem.properties):
        a = attacks.get(p.name)
        if a is None or not a.violated:
            continue
        for r in runs:
            pr = r.properties[k]
            if pr.verdict == Verdict.CERTIFIED:
                out.append(f"property {p.name!r}: {r.method} certified worst case {pr.worst_case:.6g} "
                           f"({pr.direction}) but attack {a.attack} reached {a.value:.6g} at a point in the box")
    return out


def _empirical(problem: Problem, threat: Threat) -> dict:
    """Random-perturbation similarity (σ = (x_max − x_min)·ν) and max-sensitivity at radius ε."""
    from verigrad.metrics import max_sensitivity, random_perturbation_similarity

    a = problem.attack_options
    t = threat.target_tensor

    def explain_at(xb: torch.Tensor) -> torch.Tensor:
        return explain(problem.explainer, problem.net, xb, t.expand(xb.shape[0]), threat.output)

    spec = problem.spec.attack
    rps = random_perturbation_similarity(explain_at, threat.x[0], list(spec.noise_levels), spec.noise_samples,
                                         threat.domain, a.seed)
    out: dict[str, Any] = {"random_perturbation": {str(k): v for k, v in rps.items()}}
    if threat.epsilon > 0:
        out["max_sensitivity"] = max_sensitivity(explain_at, threat.x[0], threat.epsilon, spec.sensitivity_samples,
                                                 threat.domain, a.seed)
        out["max_sensitivity_radius"] = threat.epsilon
    return out


_L2_CHANGE = Property("l2_change", Kind.UNTARGETED, Metric.L2, 1.0)  # only its worst case is used


def _second_order(problem: Problem, threat: Threat, v0: torch.Tensor, runs: list[EngineRun]) -> dict:
    """Per ``second_order.hessian`` engine: bounds on the attribution's Jacobian over the box,
    turned into a sound mean-value engine ``hessian-<engine>`` (appended to ``runs``) and
    summarised (‖J‖₂, ‖J‖_F, change bounds). With ``second_order.literature``: every bound of
    the literature (``verigrad.literature``) beside the direct engines' exact max ‖v − v0‖₂,
    each labelled by its guarantee."""
    from verigrad import literature as lit
    from verigrad.bounds.hessian import (
        frobenius_upper, l2_change_bound, linf_change_bound, mean_value_bounds, spectral_norm_upper,
    )

    so = problem.spec.second_order
    x, t, output = threat.x, threat.target_tensor, threat.output
    radii = torch.maximum(x - threat.box.lower, threat.box.upper - x)
    out: dict = {"jacobian": {}}
    sound: list[lit.LiteratureBound] = []
    jacobians: list[Bounds] = []
    for m in so.hessian:
        start = time.perf_counter()
        jr = jacobian_bounds(problem.explainer, m, problem.net, threat.box, t, output)
        mv = mean_value_bounds(v0, jr.bounds, threat.box, x)
        dt = time.perf_counter() - start
        name = f"hessian-{m.value}"
        _check_contains_centre(name, mv, v0, problem.dtype)
        notes = jr.notes + ("mean value theorem: v(x') ∈ v(x) + [J]·(box − x), J bounded over the box",)
        runs.append(_engine_run(name, f"hessian-{jr.actual_method or m.value}", dt, notes, mv, problem, v0))
        jacobians.append(jr.bounds)
        spectral = float(spectral_norm_upper(jr.bounds)[0])
        # the mean value theorem in its norm form: sup‖J‖₂ · max ‖x' − x‖₂ (the box's enclosing ball)
        l2c = spectral * float(radii.to(torch.float64).norm())
        out["jacobian"][m.value] = {
            "actual_method": jr.actual_method or m.value, "time_s": dt, "notes": list(jr.notes),
            "mean_width": float(jr.bounds.width.mean()),
            "spectral_norm_upper": spectral,
            "frobenius_upper": float(frobenius_upper(jr.bounds)[0]),
            "l2_change_spectral": l2c,
            "l2_change_bound": float(l2_change_bound(jr.bounds, threat.box, x)[0]),
            "linf_change_bound": float(linf_change_bound(jr.bounds, threat.box, x)[0]),
        }
        sound.append(lit.LiteratureBound(f"hessian_{m.value}_spectral", "linf_ball_l2_change", l2c, Guarantee.SOUND,
                                         "mean value theorem", "sup‖J‖₂ over the box (≤ ‖max(|l|,|u|)‖₂) × max ‖x' − x‖₂"))
    if not so.literature:
        return out
    g_norm = float(v0.to(torch.float64).norm())
    for r in runs:  # the direct bounds, engines and mean-value engines alike
        w = float(props.worst_case(_L2_CHANGE, v0, r.bounds)[0])
        sound.append(lit.LiteratureBound(f"direct_{r.method}", "linf_ball_l2_change", w, Guarantee.SOUND,
                                         "verigrad", "exact max ‖v − v0‖₂ over the engine's coordinate bounds"))
    for m, jb in zip(so.hessian, jacobians, strict=True):
        b = lit.sound_linf(jb, radii)
        b = lit.LiteratureBound(f"{b.name}_{m.value}", b.quantity, b.value, b.guarantee, b.source, b.note)
        sound += [b]
    sound += [lit.cosine_bound(b, g_norm) for b in list(sound)]

    def explain_at(z: torch.Tensor) -> torch.Tensor:
        return explain(problem.explainer, problem.net, z, t.expand(z.shape[0]), output, create_graph=True)

    with torch.no_grad():
        z = problem.net.forward(x)[0]
    rest = z.clone()
    rest[threat.target] = -torch.inf
    other = int(rest.argmax())
    margin = float(z[threat.target] - z[other])
    label_constraint = None
    if margin > 0:  # [CAR] §4.3 keeps the label y against the runner-up y' (needs f_y > f_y' at x)
        def explain_other(zz: torch.Tensor) -> torch.Tensor:
            tt = torch.full((zz.shape[0],), other, device=zz.device)
            return explain(problem.explainer, problem.net, zz, tt, output, create_graph=True)

        label_constraint = (explain_other, margin)
    start = time.perf_counter()
    estimates = lit.all_bounds(explain_at, x, threat.epsilon, "linf", None, net=problem.net, target=threat.target,
                               output=output, label_constraint=label_constraint,
                               hutchinson_samples=so.hutchinson_samples, seed=problem.attack_options.seed)
    out["literature_time_s"] = time.perf_counter() - start
    out["bounds"] = [b.to_dict() for b in sound + estimates]
    return out


def smoothing_radius(problem: Problem, threat: Threat) -> float:
    """The ℓ2 radius the smoothing certificate must cover: ε for an ℓ2 ball; for the (clipped)
    ℓ∞ box, the radius of the smallest ball around x that contains it, ‖max(x − l, u − x)‖₂."""
    pin = problem.spec.perturbation.input
    if pin is None:
        return 0.0
    if pin.norm == Norm.L2:
        assert pin.epsilon is not None  # an ℓ2 ball has ε (a VNN-LIB box is ℓ∞, checked by the spec)
        return float(pin.epsilon)
    r = torch.maximum(threat.x - threat.box.lower, threat.box.upper - threat.x)
    return float(r.to(torch.float64).norm())


def _smoothing_run(problem: Problem, threat: Threat) -> tuple[torch.Tensor, EngineRun]:
    """The randomized-smoothing certificate as the one (probabilistic) engine run."""
    from verigrad.smoothing import smoothing_bounds

    start = time.perf_counter()
    radius = smoothing_radius(problem, threat)
    sparsified = problem.explainer.method == ExplanationMethod.SPARSIFIED_SMOOTHGRAD
    cert = smoothing_bounds(problem.net, threat.x, threat.target_tensor, threat.output, problem.explainer.smoothing,
                            radius, sparsified)
    dt = time.perf_counter() - start
    v0 = cert.estimate.to(problem.dtype)
    bounds = Bounds(cert.bounds.lower.to(problem.dtype), cert.bounds.upper.to(problem.dtype))
    _check_contains_centre("smoothing", bounds, v0, problem.dtype)
    notes = cert.notes + (f"ℓ2 radius certified: {radius:.6g}",)
    run = _engine_run("smoothing", "smoothing", dt, (f"map: {cert.method}",) + notes, bounds, problem, v0,
                      guarantee=Guarantee.PROBABILISTIC)
    return v0, dataclasses.replace(run, failure_probability=cert.failure_probability)


def _certified_at(problem: Problem, threat: Threat, v0: torch.Tensor, prop: Property, by: dict[float, str],
                  eps: float) -> bool:
    """Whether some radius engine certifies ``prop`` on the box of radius ``eps`` around the
    threat's input (recorded in ``by``)."""
    box = dataclasses.replace(problem.perturbation, epsilon=float(eps)).input_box(threat.x)
    for m in (Method(mm) for mm in problem.spec.radius.methods):
        res = explanation_bounds(problem.explainer, m, problem.net, box, threat.target_tensor, threat.output,
                                 problem.params, problem.options)
        _check_contains_centre(m.value, res.bounds, v0, problem.dtype)
        # decided as any run is: on the bounds widened for rounding, and only if rigorous
        wide = rounding.widen(problem.net, res.bounds, problem.dtype, _extra_roundings(problem.explainer),
                              rigorous=res.rigorous)[0]
        if res.rigorous and props.evaluate(prop, v0, wide)[0].verdict == Verdict.CERTIFIED:
            by[eps] = m.value
            return True
    return False


def _radius_search(problem: Problem, threat: Threat, v0: torch.Tensor) -> dict[str, dict]:
    """The inverse problem, soundly: per property, bisection on ε ∈ (0, radius.eps_max] for the
    largest ε at which some engine certifies it (same centre, domain and parameter box). Any ε
    that certified is a valid radius whatever the engines' monotonicity: the boxes are nested."""
    from verigrad.literature import certified_radius

    rs = problem.spec.radius
    out = {}
    for prop in problem.properties:
        start = time.perf_counter()
        by: dict[float, str] = {}  # ε → the engine that certified it
        check = functools.partial(_certified_at, problem, threat, v0, prop, by)
        r = certified_radius(check, rs.eps_max, tol=rs.eps_max * 2.0 ** -rs.iterations, max_iter=rs.iterations + 1)
        out[prop.name] = {"certified_radius": r, "engine": by.get(r), "eps_max": rs.eps_max,
                          "time_s": time.perf_counter() - start}
    return out


# Engines whose cost per input falls when inputs share one call (IBP is a few batched matrix
# products; the auto_LiRPA adapter bounds one sample per call anyway, see CrownOptions.max_batch).
BATCHED_METHODS: frozenset[Method] = frozenset({Method.IBP})

@dataclass(frozen=True)
class Precomputed:
    """Engine results for one input computed outside :func:`verify_instance` (by
    :func:`batched_bounds`): engine → (result, seconds attributed to the input). ``target``
    is the class they explain; verify_instance uses them only for that same class."""

    target: int
    engines: Mapping[Method, tuple[EngineResult, float]]


def _timed_bounds(problem: Problem, m: Method, box: Bounds, target: torch.Tensor) -> tuple[EngineResult, float]:
    """Engine ``m`` on ``box`` for classes ``target``, and the wall time it took."""
    start = time.perf_counter()
    res = explanation_bounds(problem.explainer, m, problem.net, box, target, Output(problem.spec.explanation.output),
                             problem.params, problem.options)
    if problem.device.type == "cuda":
        torch.cuda.synchronize()
    return res, time.perf_counter() - start


def batched_bounds(problem: Problem, indices: Sequence[int]) -> list[Precomputed | None]:
    """The engines of ``BATCHED_METHODS`` that ``problem`` runs, each called once on the
    boxes of all ``indices`` (each input explained for its own class); per input, its slice
    and an equal share of the time (None where nothing is batched). The bounds are the
    per-input ones: every engine here is elementwise across the batch."""
    methods = [m for m in problem.methods if m in BATCHED_METHODS]
    if not methods or not indices or problem.explainer.probabilistic:
        return [None] * len(indices)
    idx = list(indices)
    with torch.no_grad():
        preds = problem.net.forward(problem.x[idx]).argmax(dim=1).tolist()
    targets = [_target_class(problem, int(p), int(problem.y[i])) for p, i in zip(preds, idx, strict=True)]
    box = problem.perturbation.input_box(problem.x[idx])  # elementwise: each input's own box
    per: list[dict[Method, tuple[EngineResult, float]]] = [{} for _ in idx]
    for m in methods:
        res, dt = _timed_bounds(problem, m, box, torch.tensor(targets, device=problem.device))
        notes = res.notes + ((f"bounded in one batch of {len(idx)} inputs (time: an equal share)",) if len(idx) > 1 else ())
        for k, engines in enumerate(per):
            engines[m] = (EngineResult(res.bounds[k : k + 1], res.method, notes, res.actual_method, res.rigorous),
                          dt / len(idx))
    return [Precomputed(t, engines) for t, engines in zip(targets, per, strict=True)]


@dataclass(frozen=True, eq=False)
class Instance:
    """One input resolved: its label, the class the model predicts, the class explained, and
    its threat (the boxes the engines bound and the attacks search)."""

    index: int  # into the loaded data
    label: int
    prediction: int
    threat: Threat

    @property
    def target(self) -> int:
        return self.threat.target


def instance(problem: Problem, i: int) -> Instance:
    """Stage *boxes*: input ``i``, its explained class and its threat."""
    label = int(problem.y[i])
    with torch.no_grad():
        pred = int(problem.net.forward(problem.x[i : i + 1]).argmax(dim=1))
    return Instance(i, label, pred, threat_for(problem, i, _target_class(problem, pred, label)))


def _centre_map(problem: Problem, inst: Instance) -> tuple[torch.Tensor, list[EngineRun]]:
    """Stage *explain*: the map v0 at the centre; for a sampled map, its smoothing
    certificate too (the one engine run such maps get)."""
    th = inst.threat
    if problem.explainer.probabilistic:
        v0, run = _smoothing_run(problem, th)
        return v0, [run]
    return explain(problem.explainer, problem.net, th.x, th.target_tensor, th.output), []


def _bound(problem: Problem, inst: Instance, v0: torch.Tensor, precomputed: Precomputed | None,
           found: dict[str, AttackOutcome] | None = None,
           attacked: Mapping[str, AttackOutcome] | None = None) -> list[EngineRun]:
    """Stage *engines*: every engine of the problem on the instance's boxes, each checked to
    contain v0 and its properties decided. ``precomputed`` results replace running an engine
    when they explain the same class (a batched forward pass may break a near-tie differently).
    Branch and bound (``bab``) searches the properties no earlier engine certified; the
    witnesses it finds go to ``found``; properties ``attacked`` already falsified are not searched."""
    ready = precomputed.engines if precomputed is not None and precomputed.target == inst.target else {}
    runs: list[EngineRun] = []
    for m in problem.methods:
        if m == Method.BAB:
            run, witnesses = _bab_run(problem, inst, v0, runs, attacked or {})
            runs.append(run)
            if found is not None:
                found.update(witnesses)
            continue
        res, dt = ready[m] if m in ready else _timed_bounds(problem, m, inst.threat.box, inst.threat.target_tensor)
        _check_contains_centre(m.value, res.bounds, v0, problem.dtype)
        start = time.perf_counter()
        dots, dot_notes = _functional_bounds(problem, inst.threat, m, v0, res)
        runs.append(_engine_run(m.value, res.actual_method or m.value, dt + time.perf_counter() - start,
                                res.notes + dot_notes, res.bounds, problem, v0, rigorous=res.rigorous, dots=dots))
    return runs


def _functional_bounds(problem: Problem, threat: Threat, m: Method, v0: torch.Tensor, res: EngineResult,
                       coord: Bounds | None = None) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """For each property with a linear functional c·v (cosine: v0·v, or t·v for a target map),
    a rigorous bound of it on the side the property needs, from engine ``m`` bounding the
    functional itself (one specification row; alpha-CROWN optimises its α for it) where that
    engine can (its result fell back to no other engine), and a note comparing it with the
    coordinatewise bound Σ c_i [l_i, u_i] (on ``coord``, default the engine's map)."""
    if res.actual_method not in (None, m.value) or not res.rigorous:
        return {}, ()
    wanted = {}
    for p in problem.properties:
        f = props.functional(p, v0)
        if f is not None and not bool(torch.isnan(f[0]).any()):
            wanted[p.name] = f
    if not wanted:
        return {}, ()
    names = list(wanted)
    spec = torch.stack([wanted[n][0].reshape(-1) for n in names]).unsqueeze(0)  # (1, k, d)
    lin = explanation_linear_bounds(problem.explainer, m, problem.net, threat.box, threat.target_tensor, spec,
                                    threat.output, problem.params, problem.options)
    if lin is None:
        return {}, ()
    ref = res.bounds if coord is None else coord
    lo, up = ref.lower.reshape(1, -1), ref.upper.reshape(1, -1)
    dots, notes = {}, []
    for j, n in enumerate(names):
        c, lower = wanted[n][0].reshape(1, -1), wanted[n][1]
        each = (torch.minimum(c * lo, c * up) if lower else torch.maximum(c * lo, c * up)).sum(-1)
        dots[n] = (lin.lower if lower else lin.upper)[:, j]
        notes.append(f"{n}: its functional bounded as one row ({'≥' if lower else '≤'} {float(dots[n]):.6g}; "
                     f"coordinatewise {float(each):.6g})")
    return dots, tuple(notes)


BAB_EXPLANATIONS = frozenset({ExplanationMethod.SALIENCY.value, ExplanationMethod.INPUT_X_GRADIENT.value})


def _explanation_map(problem: Problem, g: Bounds, boxes: Bounds, rigorous: bool) -> Bounds:
    """The explanation's bounds from the gradient's on each box (saliency: g; input × gradient:
    the exact interval product with the box), widened for rounding (``rigorous``: ``g`` encloses
    the exact gradient already, so only the explanation's own roundings get an allowance)."""
    if problem.explainer.method == ExplanationMethod.INPUT_X_GRADIENT:
        g = Bounds(*mul_interval((boxes.lower, boxes.upper), (g.lower, g.upper)))
    return rounding.widen(problem.net, g, problem.dtype, _extra_roundings(problem.explainer), rigorous=rigorous)[0]


def _bab_objective(problem: Problem, threat: Threat, prop: Property, v0: torch.Tensor,
                   rigorous: bool, dot: torch.Tensor | None = None, index: int = 0) -> bab.Objective:
    """Property ``prop`` as a branch-and-bound objective: its worst case on each domain's
    (widened) explanation map, and a float64 judge of candidate points. ``rigorous``: the leaf
    maps enclose the exact gradient (the root engine is rigorous; neuron-split leaves are).
    ``dot``: a bound of the property's functional over the whole box, valid on every domain.
    Unless attacks are skipped, the objective also runs the spec's attacks from a domain
    (confined to its box, from a point of it; ``index`` seeds them as for input ``index``)."""
    at_most = prop.rule.direction == Direction.AT_MOST
    centre = threat.centre()

    def worst(g: Bounds, boxes: Bounds) -> torch.Tensor:
        return props.worst_case(prop, v0.expand(g.shape[0], *v0.shape[1:]),
                                _explanation_map(problem, g, boxes, rigorous),
                                None if dot is None else dot.expand(g.shape[0]))

    def check(x: torch.Tensor) -> AttackOutcome | None:
        ev = evaluate_point(threat, prop, Point(x.reshape(threat.x.shape), centre.params))
        return outcome(threat, prop, Method.BAB.value, ev, (Method.BAB.value,), 0.0) if ev.violated else None

    seeds = itertools.count(1)

    def attack(box: Bounds, start: torch.Tensor | None) -> AttackOutcome | None:
        # the spec's attacks confined to the domain's box (its witnesses are judged against the
        # whole box: attack_property re-evaluates from the threat's definition), each call with
        # fresh random restarts
        opts = problem.attack_options
        opts = AttackOptions(**{**opts.__dict__, "seed": opts.seed + index + 7919 * next(seeds)})
        sub = dataclasses.replace(threat, box=box)
        found = attack_property(sub, prop, opts, problem.attack_methods, start)
        return found if found.violated else None

    sets = None
    if (problem.explainer.method == ExplanationMethod.SALIENCY and rigorous
            and props.cosine_worst(prop, torch.zeros(1, dtype=torch.float64)) is not None):
        # saliency is the gradient itself: a domain's gradient zonotope bounds cos(v0, v) directly,
        # once widened by the explanation's own roundings as its interval map is (_explanation_map)
        a = v0.reshape(-1)
        extra = _extra_roundings(problem.explainer)

        def sets(z: bab.GradZonotope, g: Bounds) -> torch.Tensor:
            if extra:
                z = z.widened(rounding.allowance(g, extra, problem.dtype))
            w = props.cosine_worst(prop, z.cos_lower(a))
            assert w is not None  # checked above for this property
            return w

    return bab.Objective(worst, lambda w: w <= prop.threshold if at_most else w >= prop.threshold,
                         1.0 if at_most else -1.0, check,
                         attack=attack if problem.attack_order != AttackOrder.SKIP and threat.moves_input else None,
                         sets=sets)


def _bab_run(problem: Problem, inst: Instance, v0: torch.Tensor, earlier: Sequence[EngineRun],
             attacked: Mapping[str, AttackOutcome]) -> tuple[EngineRun, dict[str, AttackOutcome]]:
    """Engine ``bab``: branch and bound on every property that no earlier engine certified (each
    with the budget ``bounds.bab``), on the root engine's map. With ``attack.order: after`` the
    attacks run first on the whole box (a witness makes the search moot); their outcomes, and
    the witnesses the search finds, are returned. The run's bounds are the root map intersected
    with every search's hull of leaves (each covers the box)."""
    th, opts = inst.threat, problem.options.bab
    start = time.perf_counter()
    if problem.params is not None:
        res, dt = _timed_bounds(problem, Method(opts.root), th.box, th.target_tensor)
        run = _engine_run(Method.BAB.value, res.actual_method or opts.root, dt,
                          res.notes + ("bab does not split parameter boxes: the root engine's bounds",), res.bounds,
                          problem, v0, rigorous=res.rigorous)
        return run, {}
    def engine(b: Bounds, t: torch.Tensor) -> Bounds:
        return compute_bounds(opts.root, problem.net, b, t, th.output, None, problem.options).bounds

    root = compute_bounds(opts.root, problem.net, th.box, th.target_tensor, th.output, None, problem.options)
    g = root.bounds
    results, notes = [], list(root.notes)
    witnesses: dict[str, AttackOutcome] = {}
    search: dict[str, dict] = {}
    certified_before = {pr.name for r in earlier for pr in r.properties if pr.verdict == Verdict.CERTIFIED}
    root_map = _explanation_map(problem, root.bounds, th.box, root.rigorous)
    dots, dot_notes = _functional_bounds(problem, th, Method(opts.root), v0, root, root_map)
    notes.extend(dot_notes)
    bases = [props.evaluate(p, v0, root_map, dots.get(p.name))[0] for p in problem.properties]
    settled = [p.name in certified_before or base.verdict == Verdict.CERTIFIED
               or (p.name in attacked and attacked[p.name].violated)
               for p, base in zip(problem.properties, bases, strict=True)]
    pending = settled.count(False)
    budget = opts.timeout_s * pending  # the time one search leaves goes to the searches after it
    for p, base, done in zip(problem.properties, bases, settled, strict=True):
        if done:
            results.append(base)
            continue
        if problem.attack_order == AttackOrder.AFTER:  # a witness from the whole box ends it before any split
            witnesses[p.name] = _run_attacks(problem, th, inst.index, [p])[p.name]
            if witnesses[p.name].violated:
                pending -= 1
                results.append(base)
                notes.append(f"{p.name}: falsified by the {witnesses[p.name].attack} attack before any split")
                continue
        share = max(opts.timeout_s, budget / pending)
        pending -= 1
        r = bab.search(problem.net, th.box, th.target_tensor, th.output, root.bounds,
                       _bab_objective(problem, th, p, v0, root.rigorous, dots.get(p.name), inst.index),
                       dataclasses.replace(opts, timeout_s=share), engine,
                       domain_engine(problem.net, th.output, problem.options))
        budget -= r.time_s
        g = g.intersect(r.bounds)
        verdict = Verdict.CERTIFIED if r.status == "certified" else Verdict.UNKNOWN
        # both are sound worst cases: report the better (a leaf's worst case is not worse than
        # the root's for the shipped rules, but that is each rule's property, not guaranteed)
        better = min if p.rule.direction == Direction.AT_MOST else max
        worst = better(r.worst, base.worst_case) if r.status != "falsified" and r.worst == r.worst else base.worst_case
        results.append(props.PropertyResult(p.name, verdict, worst, p.threshold, base.direction))
        notes.append(f"{p.name}: {r.status}; " + r.notes[0])
        search[p.name] = {"status": r.status, "domains": r.domains, "leaves": r.leaves, "open": r.open,
                          "time_s": r.time_s, "budget_s": share, "complete": r.complete, "mode": r.mode.value,
                          "attacks": r.attacks}
        if r.witness is not None:
            assert isinstance(r.witness, AttackOutcome)  # what the objective's check returns
            witnesses[p.name] = r.witness
    g = _explanation_map(problem, g, th.box, root.rigorous)
    w = g.width
    dt = time.perf_counter() - start
    decided, run_notes = tuple(results), (*notes, f"root engine: {opts.root}")
    if not root.rigorous:
        decided, run_notes = _withhold(decided, run_notes)
    run = EngineRun(Method.BAB.value, Method.BAB.value, dt, float(w.mean()), float(w.max()), run_notes, decided, g,
                    search=search, rigorous=root.rigorous)
    return run, witnesses


def _combined(problem: Problem, runs: Sequence[EngineRun], v0: torch.Tensor) -> list[EngineRun]:
    """``bounds.combine: intersect``: the intersection of every run's bounds, as one more run."""
    if problem.spec.bounds.combine != Combine.INTERSECT or len(runs) < 2:
        return []
    b = runs[0].bounds
    for r in runs[1:]:
        b = b.intersect(r.bounds)
    # every run's bounds are widened for rounding already and max / min are exact: no allowance again
    return [_engine_run(COMBINED, "+".join(r.method for r in runs), sum(r.time_s for r in runs),
                        ("intersection of " + ", ".join(r.method for r in runs),), b, problem, v0,
                        rigorous=True, extra=0, enclosure=all(r.rigorous for r in runs))]


def _verdicts(problem: Problem, runs: Sequence[EngineRun],
              attacks: Mapping[str, AttackOutcome]) -> dict[str, Verdict]:
    """Stage *verdicts*: certified if some (sound) run certifies the property, falsified if a
    float64-confirmed witness violates it, unknown otherwise."""
    out = {}
    for k, p in enumerate(problem.properties):
        a = attacks.get(p.name)
        out[p.name] = (Verdict.CERTIFIED if any(r.properties[k].verdict == Verdict.CERTIFIED for r in runs) else
                       Verdict.FALSIFIED if a is not None and a.violated else Verdict.UNKNOWN)
    return out


def _gaps(problem: Problem, runs: Sequence[EngineRun], attacks: Mapping[str, AttackOutcome]) -> dict[str, dict]:
    """Per property: the tightest certified worst case beside the worst attacked value."""
    gap = {}
    for k, p in enumerate(problem.properties):
        a, cert = attacks.get(p.name), _tightest(p, runs, k)
        if a is not None and a.value is not None and cert is not None:
            gap[p.name] = {"certified": cert, "attacked": a.value, "ratio": props.gap_ratio(p, cert, a.value)}
    return gap


def verify_instance(problem: Problem, i: int, precomputed: Precomputed | None = None) -> InstanceResult:
    """Bound, attack (per ``problem.attack_order``) and decide one input (index ``i`` into
    the loaded data), in stages: boxes → explain → attacks before → engines (and the optional
    radius search, second-order bounds, combination) → attacks after → verdicts. A property
    certified by an engine and violated by a witness is a soundness failure: the instance
    then carries an internal error and no verdicts."""
    spec, order = problem.spec, problem.attack_order
    inst = instance(problem, i)
    threat = inst.threat
    v0, runs = _centre_map(problem, inst)
    attacks: dict[str, AttackOutcome] = {}
    if order in (AttackOrder.BEFORE, AttackOrder.BOTH):
        attacks = _run_attacks(problem, threat, i, problem.properties)
    all_falsified = order == AttackOrder.BEFORE and bool(attacks) and all(a.violated for a in attacks.values())
    found: dict[str, AttackOutcome] = {}
    if not (all_falsified or problem.explainer.probabilistic):
        runs += _bound(problem, inst, v0, precomputed, found, attacks)
    radius = {}
    if spec.radius.search and spec.perturbation.input is not None and not problem.explainer.probabilistic:
        radius = _radius_search(problem, threat, v0)
    second = {}
    if spec.second_order.hessian or spec.second_order.literature:
        second = _second_order(problem, threat, v0, runs)
    runs += _combined(problem, runs, v0)
    attacks.update({k: a for k, a in found.items() if k not in attacks or not attacks[k].violated})
    verdicts = _verdicts(problem, runs, attacks)
    if order == AttackOrder.AFTER:
        rest = [p for p in problem.properties if verdicts[p.name] != Verdict.CERTIFIED and p.name not in found]
        attacks.update(_run_attacks(problem, threat, i, rest))
        verdicts = _verdicts(problem, runs, attacks)
    result = InstanceResult(i + spec.data.start, inst.label, inst.prediction, inst.target, tuple(runs), verdicts,
                            v0[0].detach().cpu(), attacks=attacks, gap=_gaps(problem, runs, attacks),
                            empirical=_empirical(problem, threat) if problem.empirical else {},
                            second_order=second, radius=radius)
    conflicts = _conflicts(problem, runs, attacks)
    if conflicts:
        msg = ("SoundnessError: certified and falsified at once — a verigrad bug, please report it: "
               + "; ".join(conflicts))
        return dataclasses.replace(result, verdicts={}, error=msg, internal_error=True)
    return result


def verify(
    problem: Problem,
    on_instance: Callable[[InstanceResult], None] | None = None,
) -> list[InstanceResult]:
    """Run every instance; one that fails is recorded with its error and the rest go on.
    ``on_instance`` is called after each (e.g. to write results incrementally)."""
    out = []
    for i in range(len(problem.x)):
        r = verify_isolated(problem, i)
        out.append(r)
        if on_instance is not None:
            on_instance(r)
    return out


def verify_isolated(problem: Problem, i: int, precomputed: Precomputed | None = None) -> InstanceResult:
    """:func:`verify_instance`, with a failure turned into a result carrying the error."""
    try:
        return verify_instance(problem, i, precomputed)
    except Exception as e:  # noqa: BLE001 - isolate one instance's failure, report it
        # only bad input is the user's; anything else on an instance is a verigrad bug
        internal = not isinstance(e, UserError)
        detail = "".join(traceback.format_exception_only(type(e), e)).strip()
        return InstanceResult(i + problem.spec.data.start, int(problem.y[i]), error=detail, internal_error=internal)


def verify_many(problem: Problem, indices: Sequence[int]) -> Iterator[tuple[InstanceResult, float]]:
    """Inputs ``indices`` together, yielding each result with the seconds spent on it (its
    share of the batched engines included): the engines of ``BATCHED_METHODS`` run once on
    all the boxes (:func:`batched_bounds`), the rest per input; each input's failure is
    isolated. If the batched call itself fails, every input runs alone, so one bad input
    cannot sink the others."""
    start = time.perf_counter()
    try:
        pre = batched_bounds(problem, indices)
    except Exception:  # noqa: BLE001 - retried per input below, where the failure is reported
        pre = [None] * len(indices)
    share = (time.perf_counter() - start) / max(len(indices), 1)
    for i, p in zip(indices, pre, strict=True):
        t = time.perf_counter()
        r = verify_isolated(problem, i, p)
        yield r, share + time.perf_counter() - t


@dataclass(frozen=True)
class ReplayResult:
    """``verigrad replay``: each check a witness must pass to stand as a counterexample."""

    path: str
    property: str
    index: int
    same_input: bool  # x0 is the data set's input at ``index``
    same_target: bool  # the explained class is the one the spec picks at x0
    in_box: bool  # the adversarial input and parameters lie in the spec's box (exactly)
    value: float  # the property's metric at the witness, float64 autograd on the real network
    stored_value: float
    threshold: float
    direction: str
    violated: bool

    @builtins.property  # the field ``property`` shadows the builtin in this class body
    def confirmed(self) -> bool:
        return self.same_input and self.same_target and self.in_box and self.violated

    def to_dict(self) -> dict:
        return {**self.__dict__, "confirmed": self.confirmed}


def replay(path: str) -> ReplayResult:
    """Re-check a witness file from the model, data and spec it names, in float64 (nothing
    from the search is trusted but the point itself).

    The file's structure is checked by :func:`~verigrad.attacks.witness.load_witness`; its
    consistency with what the embedded spec loads (the data index, the class, the shapes of
    the input and of the boxed parameters) here, before anything is evaluated: an
    inconsistent witness raises WitnessError (exit 2), a consistent one that fails a check
    is "not confirmed"."""
    from verigrad.data import DataError

    w = load_witness(path)
    index, name = w.index, w.property
    spec_dict = {**w.spec, "data": {**w.spec["data"], "start": index, "end": index + 1},
                 "bounds": {**w.spec["bounds"], "dtype": "float64"}}
    spec = spec_from_dict(spec_dict, source=f"{path} (embedded spec)")
    try:
        problem = prepare(spec, methods=())
    except DataError as e:
        raise WitnessError(f"{path}: witness meta 'index' {index} names no input of the embedded spec's data "
                           f"({e})") from None
    by_name = {p.name: p for p in problem.properties}
    if name not in by_name:
        raise WitnessError(f"{path}: witness meta 'property' {name!r} is not a property of the embedded spec "
                           f"(expected one of {sorted(n for n in by_name if n is not None)})")
    prop = by_name[name]
    classes = problem.net.num_classes
    if w.target >= classes:
        raise WitnessError(f"{path}: witness meta 'target' {w.target} is out of range for the model "
                           f"(expected a class in 0..{classes - 1})")
    x0 = problem.x[0:1]
    if tuple(w.x.shape) != tuple(x0.shape):
        raise WitnessError(f"{path}: witness entry 'x' has shape {tuple(w.x.shape)}, expected {tuple(x0.shape)} "
                           "(a batch of one input of the model)")
    for layer, (wt, b) in w.params.items():
        lb = problem.params.get(layer) if problem.params is not None else None
        if lb is None:
            raise WitnessError(f"{path}: witness meta 'param_layers' names layer {layer!r}, which the embedded "
                               "spec's parameter box does not contain")
        for key, a, want in (("weight", wt, tuple(lb.weight.shape)), ("bias", b, tuple(lb.bias.shape))):
            if tuple(a.shape) != want:
                raise WitnessError(f"{path}: witness entry 'param/{layer}/{key}' has shape {tuple(a.shape)}, "
                                   f"expected {want}")
    same_input = bool(torch.equal(x0.cpu(), w.x0))
    with torch.no_grad():
        pred = int(problem.net.forward(x0).argmax(dim=1))
    target = _target_class(problem, pred, int(problem.y[0]))
    threat = threat_for(problem, 0, w.target)
    dev = problem.device
    point = Point(w.x.to(dev), {n: (a.to(dev), b.to(dev)) for n, (a, b) in w.params.items()})
    in_box = threat.contains(point)
    ev = evaluate_point(threat, prop, point)
    return ReplayResult(str(path), name, index, same_input, target == w.target, in_box, ev.value,
                        w.value, prop.threshold, props.direction_text(prop), ev.violated and in_box)
