"""Witnesses: a concrete (input, parameters) in the box at which a property fails, judged
only in float64 with autograd on the real network, and stored as ``.npz``.

A witness file holds arrays ``x0`` (the original input), ``x`` (the adversarial input),
``v0`` / ``v`` (the explanations there), ``param/{layer}/weight|bias`` (the adversarial
values of boxed parameters) with ``dparam/{layer}/weight|bias`` (their change), and
``meta``: a JSON string with the property, attack, class, value, threshold, the similarity
metrics of v against v0, the data index and the resolved spec — everything
``verigrad replay`` needs to re-check it from the model file and the data alone.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from verigrad import properties as props
from verigrad.data import read_npz
from verigrad.errors import UserError
from verigrad.explanations import explain
from verigrad.properties import Property, Verdict

from verigrad.attacks.threat import Point, Threat

class WitnessError(UserError):
    """A witness file that cannot be replayed: unreadable, not a witness, or inconsistent
    with the model, data and spec it names."""


WITNESS_SCHEMA = "verigrad.witness/1"


@dataclass(frozen=True, eq=False)
class Evaluation:
    """A point judged in float64: the projected point, whether it lies in the box, the
    explanations and the property's metric value, and whether that value violates it."""

    point: Point
    in_box: bool
    v0: torch.Tensor
    v: torch.Tensor
    value: float
    violated: bool


def evaluate_point(threat: Threat, prop: Property, point: Point) -> Evaluation:
    """Re-evaluate ``point`` on the real network in float64: the threat box is rebuilt in
    float64 from its definition, the point clipped into it (removing rounding from a float32
    search), containment checked exactly, and v0, v computed by autograd."""
    t64 = threat.astype(torch.float64)
    p = t64.project(point.to(torch.float64)).detach()
    in_box = t64.contains(p)
    target = t64.target_tensor
    v0 = explain(t64.explainer, t64.net, t64.x, target, t64.output)
    v = explain(t64.explainer, t64.net, p.x, target, t64.output, params=p.params or None)
    value = props.metric(prop, v0, v)
    # decide() calls NaN "not certified"; a NaN must never count as a counterexample
    violated = in_box and bool(torch.isfinite(value).all()) and props.decide(prop, value)[0] != Verdict.CERTIFIED
    return Evaluation(p, in_box, v0, v, float(value[0]), violated)


@dataclass(frozen=True, eq=False)
class Witness:
    """A confirmed violation of property ``property`` found by ``attack``."""

    property: str
    attack: str
    target: int
    x0: torch.Tensor
    point: Point
    base_params: dict[str, tuple[torch.Tensor, torch.Tensor]]
    v0: torch.Tensor
    v: torch.Tensor
    value: float
    threshold: float
    direction: str
    similarity: dict[str, float] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"x0": self.x0.cpu().numpy(), "x": self.point.x.cpu().numpy(), "v0": self.v0.cpu().numpy(),
               "v": self.v.cpu().numpy()}
        for name, (w, b) in self.point.params.items():
            w0, b0 = self.base_params[name]
            out[f"param/{name}/weight"] = w.cpu().numpy()
            out[f"param/{name}/bias"] = b.cpu().numpy()
            out[f"dparam/{name}/weight"] = (w - w0).cpu().numpy()
            out[f"dparam/{name}/bias"] = (b - b0).cpu().numpy()
        return out

    def meta(self) -> dict[str, Any]:
        return {"property": self.property, "attack": self.attack, "target": self.target, "value": self.value,
                "threshold": self.threshold, "direction": self.direction, "similarity": self.similarity,
                "max_input_change": float((self.point.x - self.x0).abs().max()),
                "param_layers": sorted(self.point.params)}


def witness_bytes(witness: Witness, extra: dict[str, Any]) -> bytes:
    """The witness file's content (an .npz); ``extra`` (index, spec, versions) is merged into
    ``meta``. Bytes let a remote worker hand the file to the process that writes results."""
    meta = {"schema": WITNESS_SCHEMA, **witness.meta(), **extra}
    buf = io.BytesIO()
    # allow_pickle spelled out (numpy's default): the array names can then never be taken for it
    np.savez_compressed(buf, meta=np.array(json.dumps(meta)), allow_pickle=True, **witness.arrays())
    return buf.getvalue()


def save_witness(path: str | Path, witness: Witness, extra: dict[str, Any]) -> Path:
    """Write the witness file (:func:`witness_bytes`) at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(witness_bytes(witness, extra))
    return path


@dataclass(frozen=True, eq=False)
class LoadedWitness:
    """A witness file whose structure :func:`load_witness` has checked: the metadata keys
    ``verigrad replay`` uses are typed below, the arrays are real float64 tensors."""

    meta: dict[str, Any]
    x0: torch.Tensor
    x: torch.Tensor
    params: dict[str, tuple[torch.Tensor, torch.Tensor]]
    v: torch.Tensor
    property: str = ""
    index: int = 0
    target: int = 0
    value: float = math.nan
    spec: dict[str, Any] = field(default_factory=dict)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz at ``path``; WitnessError for anything that is not one."""
    try:
        return read_npz(path)
    except ValueError as e:  # an empty file must not reach click (it would print "Aborted!")
        raise WitnessError(f"{path}: not a readable .npz file ({e})") from None


def _int_meta(path: Path, meta: dict[str, Any], key: str) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise WitnessError(f"{path}: witness meta {key!r} is {v!r}, expected a non-negative integer")
    return v


def _real_array(path: Path, arrays: dict[str, np.ndarray], key: str, finite: bool = True) -> torch.Tensor:
    """Entry ``key`` as a float64 tensor: a real numeric (not bool, complex, string or object),
    non-empty array, finite where ``finite``."""
    a = arrays[key]
    if a.dtype.kind not in "fiu":
        raise WitnessError(f"{path}: witness entry {key!r} has dtype {a.dtype}, expected a real numeric array")
    if a.size == 0:
        raise WitnessError(f"{path}: witness entry {key!r} is empty (shape {a.shape}), expected the input's shape")
    if finite and not bool(np.isfinite(a).all()):
        raise WitnessError(f"{path}: witness entry {key!r} has {int((~np.isfinite(a)).sum())} non-finite "
                           "value(s), expected finite values")
    return torch.as_tensor(a, dtype=torch.float64)


def load_witness(path: str | Path) -> LoadedWitness:
    """Read a witness file (float64 tensors), checking its whole structure here, before any use:
    WitnessError (a UserError) names the file and the entry or metadata key that is wrong and
    what was expected. Consistency with the model and data is checked by ``verify.replay``."""
    path = Path(path)
    arrays = _read_arrays(path)
    if "meta" not in arrays:
        raise WitnessError(f"{path}: not a verigrad witness (no 'meta' entry)")
    raw = arrays["meta"]
    if raw.dtype.kind not in "US" or raw.size != 1:
        raise WitnessError(f"{path}: witness entry 'meta' is a {raw.dtype} array of shape {raw.shape}, "
                           "expected one JSON string")
    try:
        text = raw.reshape(()).item()
        meta = json.loads(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    except (ValueError, UnicodeDecodeError) as e:
        raise WitnessError(f"{path}: witness entry 'meta' is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise WitnessError(f"{path}: witness entry 'meta' is a JSON {type(meta).__name__}, expected an object")
    if meta.get("schema") != WITNESS_SCHEMA:
        raise WitnessError(f"{path}: unsupported witness schema {meta.get('schema')!r} (expected {WITNESS_SCHEMA})")
    name = meta.get("property")
    if not isinstance(name, str) or not name:
        raise WitnessError(f"{path}: witness meta 'property' is {name!r}, expected a property name")
    index, target = _int_meta(path, meta, "index"), _int_meta(path, meta, "target")
    value = meta.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WitnessError(f"{path}: witness meta 'value' is {value!r}, expected a number")
    spec = meta.get("spec")
    if not isinstance(spec, dict):
        raise WitnessError(f"{path}: witness meta 'spec' is {type(spec).__name__}, expected the resolved spec "
                           "(an object)")
    for key in ("data", "bounds"):
        if not isinstance(spec.get(key), dict):
            what = "missing" if key not in spec else f"a {type(spec[key]).__name__}"
            raise WitnessError(f"{path}: witness meta 'spec.{key}' is {what}, expected an object")
    layers = meta.get("param_layers", [])
    if not isinstance(layers, list) or not all(isinstance(n, str) and n for n in layers):
        raise WitnessError(f"{path}: witness meta 'param_layers' is {layers!r}, expected a list of layer names")
    needed = ["x0", "x", "v"] + [f"param/{n}/{k}" for n in layers for k in ("weight", "bias")]
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise WitnessError(f"{path}: witness lacks arrays {missing}")
    x0, x = (_real_array(path, arrays, k) for k in ("x0", "x"))
    v = _real_array(path, arrays, "v", finite=False)
    if x.ndim < 2 or x.shape[0] != 1 or x0.shape != x.shape:
        raise WitnessError(f"{path}: witness entries 'x0' {tuple(x0.shape)} and 'x' {tuple(x.shape)} must have "
                           "one shape (1, *input shape)")
    params = {n: (_real_array(path, arrays, f"param/{n}/weight"), _real_array(path, arrays, f"param/{n}/bias"))
              for n in layers}
    return LoadedWitness(meta, x0, x, params, v, name, index, target, float(value), spec)
