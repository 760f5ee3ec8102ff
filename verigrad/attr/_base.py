"""The shared machinery of the captum-style certified attribution classes.

A class is built from a plain ``nn.Module``; on first use the module is converted once by
the loaders' converter (:func:`verigrad.models.from_module`: a detached float64 copy with
inference semantics), so the user's module, its parameters, their ``.grad`` fields and its
train/eval mode are never touched. Everything else is the library's pipeline:
:func:`verigrad.explanations.explain` for the attribution,
:func:`verigrad.explanations.explanation_bounds` (which is
:func:`verigrad.bounds.compute_bounds` for saliency) on :func:`verigrad.perturbation.input_box`
for the bounds, and :func:`verigrad.properties.evaluate` on rounding-widened bounds
(:func:`verigrad.bounds.rounding.widen`, as the pipeline does) for the verdicts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from verigrad.bounds import Bounds, EngineOptions, Method
from verigrad.bounds.rounding import widen
from verigrad.errors import InternalError
from verigrad.explanations import Explainer, ExplanationMethod, explain, explanation_bounds, jacobian_bounds
from verigrad.graph.gradient_graph import Output
from verigrad.models import ModelError, Network, from_module
from verigrad.perturbation import ParamBox, ParamBoxSpec, input_box
from verigrad.properties import Property, PropertyResult, evaluate

__all__ = ["AttributionBounds", "CertifiedAttribution", "PropertyLike", "TargetLike", "abs_bounds",
           "outward_cast", "parse_properties"]

TargetLike = Union[int, Sequence[int], torch.Tensor, np.ndarray, None]
PropertyLike = Union[Property, Mapping[str, Any]]


@dataclass(frozen=True, eq=False)
class AttributionBounds(Bounds):
    """Bounds lower ≤ attribution ≤ upper (the input's shape, device and dtype), with the
    engine that produced them and its notes (e.g. an IBP fallback)."""

    method: str = ""
    notes: tuple[str, ...] = ()


def abs_bounds(b: Bounds) -> Bounds:
    """Exact bounds of |v| from l ≤ v ≤ u: [0, max(|l|, |u|)] if l ≤ 0 ≤ u, else
    [min(|l|, |u|), max(|l|, |u|)] (the library's rule, ``properties._abs_range``)."""
    lo, up = b.lower, b.upper
    amin = torch.where(lo > 0, lo, torch.where(up < 0, -up, torch.zeros_like(lo)))
    return Bounds(amin, torch.maximum(lo.abs(), up.abs()))


def outward_cast(b: Bounds, dtype: torch.dtype, device: torch.device) -> Bounds:
    """``b`` in ``dtype`` on ``device``, each end rounded outward where the cast rounded it
    inward (a float64 → float32 cast rounds to nearest, which may shrink the interval)."""
    lo, up = b.lower.to(dtype=dtype), b.upper.to(dtype=dtype)
    if dtype != b.lower.dtype and dtype.is_floating_point:
        wide = torch.promote_types(dtype, b.lower.dtype)
        lo = torch.where(lo.to(wide) > b.lower.to(wide), torch.nextafter(lo, torch.full_like(lo, -torch.inf)), lo)
        up = torch.where(up.to(wide) < b.upper.to(wide), torch.nextafter(up, torch.full_like(up, torch.inf)), up)
    return Bounds(lo.to(device), up.to(device))


def parse_properties(properties: PropertyLike | Sequence[PropertyLike], shape: Sequence[int]) -> list[Property]:
    """Property objects, or dicts in the spec's ``properties`` format (parsed and validated by
    the spec's own schema; default names ``p{i}_{kind}[_{metric}]``), built for maps of ``shape``."""
    from verigrad import spec as _spec  # the spec schema: only needed for dicts

    items: list[PropertyLike] = [properties] if isinstance(properties, (Property, Mapping)) else list(properties)
    if not items:
        raise ValueError("certify: no properties given")
    dicts: list[tuple[int, Mapping[str, Any]]] = []
    for i, p in enumerate(items):
        if isinstance(p, Mapping):
            dicts.append((i, p))
        elif not isinstance(p, Property):
            raise TypeError(f"properties[{i}]: expected a Property or a dict in the spec's format, got "
                            f"{type(p).__name__}")
    out: dict[int, Property] = {i: p for i, p in enumerate(items) if isinstance(p, Property)}
    if dicts:
        check = _spec.ListOf(_spec.Section(_spec.PropertySpec), min_len=1, post=_spec._name_properties)
        at = _spec._At("<properties>", Path.cwd(), "properties")
        parsed = _spec._parse_at(check, [dict(p) for _, p in dicts], at)
        for (i, given), ps in zip(dicts, parsed, strict=True):
            if "name" not in given:  # the default name counts every property, objects included
                suffix = f"_{ps.metric.value}" if ps.metric is not None else ""
                ps = dataclasses.replace(ps, name=f"p{i}_{ps.kind.value}{suffix}")
            out[i] = ps.build(shape, torch.float64)
    props = [out[i] for i in range(len(items))]
    for p in props:
        p.check_fits(shape)
    names = [p.name for p in props]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"certify: duplicate property names {dup}")
    return props


def _as_tensor(inputs: Any) -> torch.Tensor:
    if isinstance(inputs, tuple):
        if len(inputs) != 1:
            raise ValueError("verigrad explains models of one input tensor; got a tuple of "
                             f"{len(inputs)} inputs")
        inputs = inputs[0]
    x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.dim() < 2:
        raise ValueError(f"inputs must be batched (B, *input_shape), got shape {tuple(x.shape)}")
    return x.detach()


class CertifiedAttribution:
    """Base class: a gradient attribution of ``model`` (captum's call conventions) with sound
    bounds over an ℓ∞ input box and certified properties. Subclasses set ``method`` and parse
    their captum keyword arguments."""

    method: ExplanationMethod = ExplanationMethod.SALIENCY
    _CAPTUM_KWARGS: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, input_shape: Sequence[int] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs an nn.Module, got {type(model).__name__}")
        self.forward_func = model  # captum's attribute name
        self._net64: Network | None = None
        self._nets: dict[tuple[torch.dtype, torch.device], Network] = {}
        self.input_shape: tuple[int, ...] | None = None
        if input_shape is not None:
            self._convert(tuple(int(s) for s in input_shape))

    # -- conversion -------------------------------------------------------------------------
    def _convert(self, shape: tuple[int, ...]) -> Network:
        """The module as a float64 Network (once); ModelError names an unsupported layer."""
        if self._net64 is None:
            try:
                self._net64 = from_module(self.forward_func, shape)
            except ModelError as e:
                raise ModelError(f"{type(self).__name__}: cannot convert the model: {e}") from e
            self.input_shape = shape
        return self._net64

    @property
    def network(self) -> Network:
        """The converted float64 network (after the first call or a given ``input_shape``)."""
        if self._net64 is None:
            raise ValueError(f"{type(self).__name__}: the input shape is not known yet: pass input_shape "
                             "or call attribute first")
        return self._net64

    def _net_for(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> Network:
        shape = tuple(int(s) for s in x.shape[1:])
        net = self._convert(shape)
        if shape != net.input_shape:
            raise ValueError(f"{type(self).__name__}: inputs have per-sample shape {shape}, the model was "
                             f"converted for {net.input_shape}")
        key = (dtype or x.dtype, x.device)
        if key == (torch.float64, torch.device("cpu")):
            return net
        if key not in self._nets:
            self._nets[key] = net.to(dtype=key[0], device=key[1])
        return self._nets[key]

    def _targets(self, target: TargetLike, batch: int, net: Network, device: torch.device) -> torch.Tensor:
        """One class per sample (B,) from an int, a list, an array or a tensor (captum's forms)."""
        if target is None:
            if net.num_classes != 1:
                raise ValueError(f"{type(self).__name__}: target is required: the model has {net.num_classes} "
                                 "outputs (captum needs it too)")
            return torch.zeros(batch, dtype=torch.long, device=device)
        t = torch.as_tensor(np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target))
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"target must hold integer classes, got {t.dtype}")
        t = t.reshape(-1).to(torch.long)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"target has {t.numel()} classes for a batch of {batch} inputs")
        if batch and (int(t.min()) < 0 or int(t.max()) >= net.num_classes):
            raise ValueError(f"target classes must lie in [0, {net.num_classes}), got {t.tolist()}")
        return t.clone().to(device)

    # -- per-method hooks --------------------------------------------------------------------
    def _check_kwargs(self, kwargs: Mapping[str, Any]) -> None:
        bad = sorted(set(kwargs) - set(self._CAPTUM_KWARGS))
        if bad:
            allowed = ", ".join(self._CAPTUM_KWARGS) or "none"
            raise TypeError(f"{type(self).__name__}: unsupported argument(s) {bad} (captum arguments "
                            f"supported here: {allowed})")

    def _groups(self, x: torch.Tensor, kwargs: Mapping[str, Any]) -> list[tuple[slice, Explainer]]:
        """(rows of the batch, explainer for them): one group unless settings differ per sample."""
        return [(slice(None), Explainer(self.method))]

    def _engine(self, method: Method | str, kwargs: Mapping[str, Any]) -> tuple[Method, Mapping[str, Any]]:
        """The bound engine named by ``method`` (subclasses may also read their own settings from it)."""
        try:
            return Method(getattr(method, "value", method)), kwargs
        except ValueError:
            raise ValueError(f"unknown bound method {method!r}; choose from {[m.value for m in Method]}") from None

    def _post(self, b: Bounds, kwargs: Mapping[str, Any]) -> Bounds:
        """Bounds of the captum map from bounds of the library's (signed) map."""
        return b

    def _post_point(self, v: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor:
        return v

    # -- public API --------------------------------------------------------------------------
    def attribute(self, inputs: Any, target: TargetLike = None, **kwargs: Any) -> torch.Tensor:
        """The attribution (captum's ``attribute`` for this method), shaped, placed and typed like
        ``inputs``; computed on the converted network (inference semantics, i.e. eval mode)."""
        self._check_kwargs(kwargs)
        x = _as_tensor(inputs)
        net = self._net_for(x)
        t = self._targets(target, x.shape[0], net, x.device)
        parts = [explain(e, net, x[rows], t[rows], Output.LOGIT) for rows, e in self._groups(x, kwargs)]
        return self._post_point(torch.cat(parts), kwargs).detach()

    def box_bounds(self, box: Bounds, target: torch.Tensor, method: Method | str = Method.CROWN,
                   params: ParamBox | None = None, options: EngineOptions | None = None,
                   captum_kwargs: Mapping[str, Any] | None = None) -> tuple[Bounds, str, tuple[str, ...]]:
        """Bounds of the signed library map (before this class's post-processing, e.g. captum's
        abs) over any float64 input box on the converted network's device, for classes
        ``target`` (B,); with the engine that produced them and its notes. ``captum_kwargs``: the
        method's captum settings, as given to :meth:`attribute`."""
        method, kwargs = self._engine(method, captum_kwargs or {})
        self._check_kwargs(kwargs)
        net = self._net_for(box.lower, torch.float64)
        lows: list[torch.Tensor] = []
        ups: list[torch.Tensor] = []
        notes: list[str] = []
        used = method.value
        for rows, e in self._groups(box.lower, kwargs):
            res = explanation_bounds(e, method, net, box[rows], target[rows], Output.LOGIT, params,
                                     options if options is not None else EngineOptions())
            lows.append(res.bounds.lower)
            ups.append(res.bounds.upper)
            notes.extend(n for n in res.notes if n not in notes)
            used = res.actual_method or res.method
        return Bounds(torch.cat(lows), torch.cat(ups)), used, tuple(notes)

    def box_jacobian_bounds(self, box: Bounds, target: torch.Tensor, method: str = "crown",
                            captum_kwargs: Mapping[str, Any] | None = None) -> Bounds:
        """Bounds (B, n, d) on the Jacobian ∂A/∂x' of the signed library map at every x' of the
        float64 box (:func:`verigrad.explanations.jacobian_bounds`; smooth activations only)."""
        _, kwargs = self._engine(Method.CROWN, captum_kwargs or {})
        self._check_kwargs(kwargs)
        net = self._net_for(box.lower, torch.float64)
        lows: list[torch.Tensor] = []
        ups: list[torch.Tensor] = []
        for rows, e in self._groups(box.lower, kwargs):
            res = jacobian_bounds(e, method, net, box[rows], target[rows], Output.LOGIT)
            lows.append(res.bounds.lower)
            ups.append(res.bounds.upper)
        return Bounds(torch.cat(lows), torch.cat(ups))

    def extra_roundings(self, kwargs: Mapping[str, Any]) -> int:
        """Roundings the attribution adds to the gradient's (the pipeline's rounding allowance)."""
        return 2

    def _bounds64(self, x: torch.Tensor, target: TargetLike, epsilon: float, method: Method | str,
                  params: ParamBox | ParamBoxSpec | None, domain: tuple[float, float] | None,
                  options: EngineOptions | None, kwargs: Mapping[str, Any]
                  ) -> tuple[Network, torch.Tensor, Bounds, str, tuple[str, ...]]:
        """float64 bounds of the signed library map over [x − ε, x + ε] ∩ domain."""
        net = self._net_for(x, torch.float64)
        x64 = x.to(dtype=torch.float64, device=net.device)
        t = self._targets(target, x.shape[0], net, net.device)
        box = input_box(x64, float(epsilon), domain)
        pb = params.build(net) if isinstance(params, ParamBoxSpec) else params
        b, used, notes = self.box_bounds(box, t, method, pb, options, kwargs)
        return net, t, b, used, notes

    def attribute_bounds(self, inputs: Any, target: TargetLike = None, epsilon: float = 0.0,
                         method: Method | str = Method.CROWN, params: ParamBox | ParamBoxSpec | None = None,
                         *, domain: tuple[float, float] | None = None, options: EngineOptions | None = None,
                         **kwargs: Any) -> AttributionBounds:
        """Sound bounds lower ≤ A(x') ≤ upper for every x' in [x − ε, x + ε] ∩ domain (and every
        parameter in ``params``), A this class's attribution, by bound engine ``method``
        (``ibp`` | ``crown`` | ``alpha-crown``); computed in float64, rounded outward to the
        input's dtype, on the input's device. These are the engine's bounds as returned (the
        verdicts of :meth:`certify` add the pipeline's rounding allowance)."""
        x = _as_tensor(inputs)
        _, _, b, used, notes = self._bounds64(x, target, epsilon, method, params, domain, options, kwargs)
        b = outward_cast(self._post(b, kwargs), x.dtype, x.device)
        return AttributionBounds(b.lower, b.upper, used, notes)

    def certify(self, inputs: Any, properties: PropertyLike | Sequence[PropertyLike], target: TargetLike = None,
                epsilon: float = 0.0, method: Method | str = Method.CROWN,
                params: ParamBox | ParamBoxSpec | None = None, *, domain: tuple[float, float] | None = None,
                options: EngineOptions | None = None, **kwargs: Any) -> list[list[PropertyResult]]:
        """Per sample, per property: ``certified`` when the sound worst case of the property
        over the box (:func:`verigrad.properties.worst_case` on the bounds widened for rounding,
        as the pipeline decides) meets its threshold, else ``unknown`` (no attack is run, so
        never ``falsified``). ``properties``: Property objects or dicts in the spec's format."""
        x = _as_tensor(inputs)
        net, t, b, _, _ = self._bounds64(x, target, epsilon, method, params, domain, options, kwargs)
        _, kw = self._engine(method, kwargs)  # the method's own settings (IG: a rule given as method)
        shape = b.shape[1:]
        props = parse_properties(properties, shape)
        x64 = x.to(dtype=torch.float64, device=net.device)
        v0 = torch.cat([explain(e, net, x64[rows], t[rows]) for rows, e in self._groups(x64, kw)])
        v0 = self._post_point(v0, kw)
        b, _ = widen(net, self._post(b, kw), torch.float64, self.extra_roundings(kw))
        tol = 1e-9 * (1 + v0.abs())
        if bool(((v0 < b.lower - tol) | (v0 > b.upper + tol)).any()):
            raise InternalError(f"{type(self).__name__}: the attribution at the box centre lies outside its "
                                "bounds; this is a verigrad bug, please report it")
        rows: list[list[PropertyResult]] = [[] for _ in range(x.shape[0])]
        for p in props:
            for i, r in enumerate(evaluate(p, v0, b)):
                rows[i].append(r)
        return rows
