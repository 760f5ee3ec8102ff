"""The YAML run specification: one declarative schema, validated, resolved and dumpable.

Every key is declared once, on a frozen dataclass field (``_opt(check, default)``): its
type, range, choices and default live in that declaration and nowhere else. Loading walks
the dataclasses, rejects unknown keys, fills defaults, resolves paths against the spec
file's directory and raises :class:`SpecError` naming the file, the key path
(``properties[1].threshold``) and what was expected. ``dump_spec`` writes the resolved
spec (every default filled in, absolute paths) so that a run can be reproduced from it.

There is no global config object: the loaded :class:`Spec` is passed to whoever needs it.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, Sequence, Union

import torch
import yaml

from verigrad.bounds import EngineOptions, Method, Product
from verigrad.bounds.bab import BabOptions, Branching
from verigrad.bounds.bab import Leaf as BabLeaf
from verigrad.bounds.bab import Mode as BabMode
from verigrad.errors import UserError
from verigrad.explanations import SMOOTHING_METHODS, Explainer, ExplanationMethod, IGRule
from verigrad.graph.gradient_graph import Output
from verigrad.attacks.search import AttackMethod, AttackOptions, AttackOrder
from verigrad.smoothing import SmoothingConfig, SmoothingInterval
from verigrad.perturbation import FixedBox, Norm, ParamBoxSpec, ParamMode, Perturbation
from verigrad.properties import METRIC_KINDS, Kind, Metric, Normalize, Property
from verigrad import properties as _props


class SpecError(UserError):
    """An invalid spec: ``source`` (file or '<dict>'), ``key`` (e.g. 'properties[1].threshold',
    '' for the whole document) and ``message`` (what was expected, what was found)."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


# ----------------------------------------------------------------------------------------
# Choices (str Enums: the value is what appears in YAML and on the command line)


class OutsideRange(str, Enum):
    """What an input outside ``model.input_range`` is."""

    ERROR = "error"  # bad input: the ε-box the spec asks for is not the box that would be certified
    ALLOW = "allow"  # certify the clipped box [max(x − ε, lo), min(x + ε, hi)] ∪ {x} anyway


class DatasetName(str, Enum):
    MNIST_SAMPLE = "mnist_sample"
    GERMAN_CREDIT = "german_credit"


class TargetClass(str, Enum):
    """Which class's output is explained (an int in the spec picks a fixed class)."""

    PREDICTED = "predicted"
    LABEL = "label"


class TargetType(str, Enum):
    GAUSSIAN = "gaussian"
    SQUARE = "square"
    FILE = "file"


BoundMethod = Method  # one enum for engine names, owned by verigrad.bounds


class Dtype(str, Enum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class Combine(str, Enum):
    NONE = "none"
    INTERSECT = "intersect"


IbpProduct = Product  # the interval × interval rule, owned by verigrad.bounds.ibp


class Device(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"
    AUTO = "auto"


# ----------------------------------------------------------------------------------------
# Schema machinery


class _Invalid(Exception):
    """Raised by checks and section validators; ``key`` is relative to the current path
    ('' = this value, 'end', '[1].name')."""

    def __init__(self, message: str, key: str = "", type_error: bool = False) -> None:
        super().__init__(message)
        # type_error: a plain "expected <what>, got <value>" that a wrapper may rephrase
        self.message, self.key, self.type_error = message, key, type_error


@dataclass(frozen=True)
class _At:
    """Where in the document a value sits, plus what resolving it needs."""

    source: str
    base_dir: Path
    path: str = ""

    def join(self, rel: str) -> "_At":
        if not rel:
            return self
        if rel.startswith("[") or not self.path:
            return dataclasses.replace(self, path=self.path + rel)
        return dataclasses.replace(self, path=f"{self.path}.{rel}")

    def error(self, message: str, rel: str = "") -> SpecError:
        return SpecError(self.source, self.join(rel).path, message)


def _show(v: Any) -> str:
    """A found value as the user wrote it (YAML spelling), truncated."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Enum):
        v = v.value
    if isinstance(v, str):
        s = repr(v)
        return s if len(s) <= 60 else s[:56] + "...'"
    if isinstance(v, Mapping):
        s = "a mapping {" + ", ".join(map(str, list(v)[:5])) + ("...}" if len(v) > 5 else "}")
        return s
    s = str(list(v) if isinstance(v, tuple) else v)
    return s if len(s) <= 60 else s[:57] + "..."


def _expected(what: str, got: Any) -> _Invalid:
    return _Invalid(f"expected {what}, got {_show(got)}", type_error=True)


class Check:
    """Parses one YAML value (raising _Invalid) and dumps it back to plain YAML data."""

    @property
    def what(self) -> str:
        """What a valid value is, as error messages say it ("a number > 0")."""
        return "a value"

    def parse(self, value: Any, at: _At) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        return value


def _range_text(gt=None, ge=None, lt=None, le=None) -> str:
    parts = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else "",
             f"< {lt}" if lt is not None else "", f"<= {le}" if le is not None else ""]
    if ge is not None and le is not None and gt is None and lt is None:
        return f"in [{ge}, {le}]"
    return " and ".join(p for p in parts if p)


def _in_range(x: float, gt=None, ge=None, lt=None, le=None) -> bool:
    return not ((gt is not None and not x > gt) or (ge is not None and not x >= ge)
                or (lt is not None and not x < lt) or (le is not None and not x <= le))


@dataclass(frozen=True)
class Num(Check):
    """A finite real number (ints accepted, bools rejected) in an optional range."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    @property
    def what(self) -> str:
        r = _range_text(self.gt, self.ge, self.lt, self.le)
        return f"a number {r}" if r else "a number"

    def parse(self, value: Any, at: _At) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _expected(self.what, value)
        if not _in_range(float(value), self.gt, self.ge, self.lt, self.le):
            raise _expected(self.what, value)
        return float(value)


@dataclass(frozen=True)
class Int(Check):
    """An int (integral floats accepted, bools rejected) in an optional range. Counts that
    size an allocation or a loop declare ``le`` (see the *_MAX limits below)."""

    gt: int | None = None
    ge: int | None = None
    le: int | None = None

    @property
    def what(self) -> str:
        r = _range_text(self.gt, self.ge, None, self.le)
        return f"an int {r}" if r else "an int"

    def parse(self, value: Any, at: _At) -> int:
        # YAML writes 3.0 for some tools; accept integral floats but not 3.5 or true
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not _in_range(value, self.gt, self.ge,
                                                                                   None, self.le):
            raise _expected(self.what, value)
        return value


@dataclass(frozen=True)
class FileName(Check):
    """A string used as a file name (stem) inside an output directory: letters, digits, '.',
    '_' and '-', not starting with '.' (no path separators, no '..'), at most 128 characters."""

    pattern: str = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}"

    @property
    def what(self) -> str:
        return "a file name of letters, digits, '.', '_' or '-' (not starting with '.', at most 128 characters)"

    def parse(self, value: Any, at: _At) -> str:
        if not isinstance(value, str) or re.fullmatch(self.pattern, value) is None:
            raise _expected(self.what, value)
        return value


@dataclass(frozen=True)
class Bool(Check):
    @property
    def what(self) -> str:
        return "true or false"

    def parse(self, value: Any, at: _At) -> bool:
        if not isinstance(value, bool):
            raise _expected(self.what, value)
        return value


@dataclass(frozen=True)
class Str(Check):
    @property
    def what(self) -> str:
        return "a non-empty string"

    def parse(self, value: Any, at: _At) -> str:
        if not isinstance(value, str) or not value:
            raise _expected(self.what, value)
        return value


@dataclass(frozen=True)
class Const(Check):
    """Exactly one literal string (e.g. layers: all)."""

    value: str

    @property
    def what(self) -> str:
        return repr(self.value)

    def parse(self, value: Any, at: _At) -> str:
        if value != self.value:
            raise _expected(self.what, value)
        return value


@dataclass(frozen=True)
class Choice(Check):
    """One value of a str Enum. ``aliases`` map other YAML spellings (e.g. .inf) to values."""

    enum: type[Enum]
    aliases: tuple[tuple[Any, str], ...] = ()

    @property
    def what(self) -> str:
        return "one of " + " | ".join(str(m.value) for m in self.enum)

    def parse(self, value: Any, at: _At) -> Enum:
        if isinstance(value, self.enum):
            return value
        for alias, target in self.aliases:
            if not isinstance(value, bool) and value == alias:
                value = target
        try:
            return self.enum(value)
        except (ValueError, TypeError):
            raise _expected(self.what, value) from None

    def dump(self, value: Enum) -> str:
        return value.value


@dataclass(frozen=True)
class Nullable(Check):
    inner: Check

    @property
    def what(self) -> str:
        return f"{self.inner.what} or null"

    def parse(self, value: Any, at: _At) -> Any:
        if value is None:
            return None
        try:
            return self.inner.parse(value, at)
        except _Invalid as e:
            if e.type_error and not e.key:
                raise _expected(self.what, value) from None  # say that null is allowed too
            raise

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)


@dataclass(frozen=True)
class OneOf(Check):
    """The first alternative that accepts the value."""

    options: tuple[Check, ...]

    @property
    def what(self) -> str:
        return " or ".join(o.what for o in self.options)

    def parse(self, value: Any, at: _At) -> Any:
        for o in self.options:
            try:
                return o.parse(value, at)
            except _Invalid as e:
                if not e.type_error:  # the right shape with a bad detail (e.g. a duplicate): say that
                    raise
        raise _expected(self.what, value)

    def dump(self, value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, tuple):
            return [v.value if isinstance(v, Enum) else v for v in value]
        return value


@dataclass(frozen=True)
class ListOf(Check):
    """A YAML list, stored as a tuple. ``post`` checks the whole list (may raise _Invalid
    with a key like '[2].name') and may return a rewritten tuple."""

    item: Check
    min_len: int = 0
    max_len: int | None = None
    unique: bool = False
    post: Callable[[tuple], tuple] | None = None

    @property
    def what(self) -> str:
        n = (f"{self.min_len}" if self.max_len == self.min_len
             else f"at least {self.min_len}" if self.max_len is None
             else f"{self.min_len} to {self.max_len}")
        return f"a list of {n} item(s), each {self.item.what}"

    def parse(self, value: Any, at: _At) -> tuple:
        if not isinstance(value, (list, tuple)):
            raise _expected(self.what, value)
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            raise _Invalid(f"expected {self.what}, got {len(value)} item(s)")
        out = []
        for i, v in enumerate(value):
            out.append(_parse_at(self.item, v, at.join(f"[{i}]")))
        if self.unique:
            seen: dict[Any, int] = {}
            for i, v in enumerate(out):
                if v in seen:
                    raise _Invalid(f"duplicate entry {_show(v)} (also at [{seen[v]}])", f"[{i}]")
                seen[v] = i
        result = tuple(out)
        return self.post(result) if self.post is not None else result

    def dump(self, value: tuple) -> list:
        return [self.item.dump(v) for v in value]


@dataclass(frozen=True)
class PathCheck(Check):
    """A path relative to the spec file's directory, resolved to an absolute Path."""

    suffixes: tuple[str, ...] = ()
    must_exist: bool = True

    @property
    def what(self) -> str:
        return "a path" + (f" ending in {' or '.join(self.suffixes)}" if self.suffixes else "")

    def parse(self, value: Any, at: _At) -> Path:
        if isinstance(value, Path):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise _expected(self.what, value)
        p = Path(value).expanduser()
        p = (p if p.is_absolute() else at.base_dir / p).resolve()
        if self.suffixes and p.suffix.lower() not in self.suffixes:
            raise _expected(self.what, value)
        if self.must_exist and not p.is_file():
            raise _Invalid(f"file not found: {value!r} (resolved to {p})")
        return p

    def dump(self, value: Path) -> str:
        return str(value)


SEED = Int(ge=0, le=2**32 - 1)  # what numpy's legacy seeding accepts; torch.Generator takes it (+ instance index)


def _parse_at(check: Check, value: Any, at: _At) -> Any:
    """Run a check, turning its _Invalid into a SpecError at the right key path."""
    try:
        return check.parse(value, at)
    except _Invalid as e:
        raise at.error(e.message, e.key) from None


_MISSING = dataclasses.MISSING


def _opt(check: Check, default: Any = _MISSING, doc: str = "") -> Any:
    """Declare one spec key: its check, its default written as in YAML (absent = required)
    and a doc line. A default goes through the same check as a user's value (so a default
    path resolves against the spec's directory and a default section fills its own
    defaults); constructing the dataclass directly gets it parsed relative to the cwd."""
    meta = {"check": check, "doc": doc, "default": default}
    if default is _MISSING:
        return field(metadata=meta)
    return field(default_factory=lambda: check.parse(default, _At("<default>", Path.cwd())), metadata=meta)


def _schema_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "check" in f.metadata]


@dataclass(frozen=True)
class Section(Check):
    """A mapping parsed into the frozen dataclass ``cls``. Unknown keys are rejected; a
    ``validate()`` method on ``cls`` checks relations between keys (raising _Invalid)."""

    cls: type
    optional: bool = False  # null/absent means "not given" (None) instead of "all defaults"
    extra_keys: tuple[str, ...] = ()  # keys handled by a wrapper (Tagged's type), listed as allowed

    @property
    def what(self) -> str:
        return "a mapping" + (" or null" if self.optional else "")

    def parse(self, value: Any, at: _At) -> Any:
        if value is None:
            if self.optional:
                return None
            value = {}
        if isinstance(value, self.cls):
            value = _dump_section(value)  # re-validate a programmatic object
        if not isinstance(value, Mapping):
            raise _expected(self.what, value)
        fields = _schema_fields(self.cls)
        names = [f.name for f in fields]
        for key in value:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                allowed = ", ".join([*self.extra_keys, *names])
                raise at.error(f"unknown key {str(key)!r} (allowed: {allowed}){hint}", str(key))
        kwargs = {}
        for f in fields:
            if f.name in value:
                kwargs[f.name] = _parse_at(f.metadata["check"], value[f.name], at.join(f.name))
            elif f.metadata["default"] is not _MISSING:
                kwargs[f.name] = _parse_at(f.metadata["check"], f.metadata["default"], at.join(f.name))
            else:
                raise at.error(f"missing required key ({f.metadata['check'].what})", f.name)
        obj = self.cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            try:
                validate()
            except _Invalid as e:
                raise at.error(e.message, e.key) from None
        return obj

    def dump(self, value: Any) -> Any:
        return None if value is None else _dump_section(value)


def _dump_section(obj: Any) -> dict:
    return {f.name: f.metadata["check"].dump(getattr(obj, f.name)) for f in _schema_fields(type(obj))}


@dataclass(frozen=True)
class Tagged(Check):
    """A mapping whose ``type`` key picks the dataclass that parses the rest."""

    enum: type[Enum]
    classes: tuple[tuple[Enum, type], ...]
    tag: str = "type"

    @property
    def what(self) -> str:
        return f"a mapping with {self.tag}: " + " | ".join(str(m.value) for m in self.enum)

    def parse(self, value: Any, at: _At) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = self.dump(value)
        if not isinstance(value, Mapping):
            raise _expected(self.what, value)
        if self.tag not in value:
            raise at.error(f"missing required key ({Choice(self.enum).what})", self.tag)
        kind = _parse_at(Choice(self.enum), value[self.tag], at.join(self.tag))
        cls = dict(self.classes)[kind]
        rest = {k: v for k, v in value.items() if k != self.tag}
        return Section(cls, extra_keys=(self.tag,)).parse(rest, at)

    def dump(self, value: Any) -> Any:
        if value is None:
            return None
        tag = next(k for k, c in self.classes if isinstance(value, c))
        return {self.tag: tag.value, **_dump_section(value)}


# ----------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True, kw_only=True)
class NormalizationSpec:
    """Input normalization (x − mean) / std per channel, applied inside the model."""

    mean: tuple[float, ...] = _opt(ListOf(Num(), min_len=1))
    std: tuple[float, ...] = _opt(ListOf(Num(gt=0), min_len=1))

    def validate(self) -> None:
        if len(self.mean) != len(self.std):
            raise _Invalid(f"expected as many values as mean ({len(self.mean)}), got {len(self.std)}", "std")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    path: Path = _opt(PathCheck((".onnx", ".pt", ".pth")), doc="ONNX or TorchScript model")
    input_shape: tuple[int, ...] | None = _opt(Nullable(ListOf(Int(gt=0), min_len=1)), None,
                                               "per-sample shape; null = read from the model file")
    input_range: tuple[float, float] | None = _opt(Nullable(ListOf(Num(), 2, 2)), (0.0, 1.0),
                                                   "input domain [lo, hi]; null = unbounded")
    normalization: NormalizationSpec | None = _opt(Section(NormalizationSpec, optional=True), None)
    output: Union[str, int, None] = _opt(Nullable(OneOf((Int(ge=0), Str()))), None,
                                         "the graph output to explain: its name or index; null = the only one")

    def validate(self) -> None:
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise _Invalid(f"expected [lo, hi] with lo < hi, got {_show(self.input_range)}", "input_range")
        if self.normalization is not None and self.input_shape is not None and len(self.input_shape) > 1:
            n, c = len(self.normalization.mean), self.input_shape[0]
            if n not in (1, c):
                raise _Invalid(f"expected 1 or {c} values (one per channel of input_shape), got {n}",
                               "normalization.mean")


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    dataset: DatasetName | None = _opt(Nullable(Choice(DatasetName)), None, "built-in data set")
    path: Path | None = _opt(Nullable(PathCheck((".npz",))), None, ".npz with arrays x and y")
    start: int = _opt(Int(ge=0), 0)
    end: int | None = _opt(Nullable(Int(ge=1)), None, "exclusive; null = to the end")
    outside_range: OutsideRange = _opt(Choice(OutsideRange), OutsideRange.ERROR,
                                       "an input outside model.input_range: error (default) | allow (its box "
                                       "is then clipped to the range and merely contains it)")

    def validate(self) -> None:
        if (self.dataset is None) == (self.path is None):
            got = "both" if self.dataset is not None else "neither"
            raise _Invalid(f"expected exactly one of 'dataset' or 'path', got {got}")
        if self.end is not None and not self.end > self.start:
            raise _Invalid(f"expected an int > start ({self.start}) or null, got {self.end}", "end")


@dataclass(frozen=True, kw_only=True)
class VerifyDataSpec(DataSpec):
    """The data of a verification run: as :class:`DataSpec`, but the source may be absent
    when ``perturbation.input.vnnlib`` gives the input (checked by :class:`Spec`), samples
    may be reshaped, and the file's ``y`` may be missing unless ``explanation.target`` is
    ``label``."""

    reshape: tuple[int, ...] | None = _opt(Nullable(ListOf(Int(gt=0), min_len=1)), None,
                                          "reshape each sample (C order) to these dims, e.g. [784, 1] for 28×28 "
                                          "samples and a (784, 1) model; null = as stored")

    def validate(self) -> None:
        if self.dataset is not None and self.path is not None:
            raise _Invalid("expected exactly one of 'dataset' or 'path', got both")
        if self.end is not None and not self.end > self.start:
            raise _Invalid(f"expected an int > start ({self.start}) or null, got {self.end}", "end")


_EXPLAINER = Explainer()  # the explanation settings' defaults are the explainer's


@dataclass(frozen=True, kw_only=True)
class IntegratedGradientsSpec:
    """(x − b) ⊙ Σ_k w_k ∂o/∂x(b + α_k(x − b)), nodes and weights as captum builds them."""

    steps: int = _opt(Int(ge=1, le=10_000), _EXPLAINER.steps,
                      "m quadrature nodes (captum's n_steps); all m path points go through one pass")
    rule: IGRule = _opt(Choice(IGRule), _EXPLAINER.rule, "captum's method: gausslegendre | riemann_*")
    baseline: float = _opt(Num(), _EXPLAINER.baseline, "constant baseline b")

    def validate(self) -> None:
        if self.rule != IGRule.GAUSS_LEGENDRE and self.steps < 2:
            raise _Invalid(f"expected an int >= 2 for rule {self.rule.value}, got {self.steps}", "steps")


_SMOOTHING = SmoothingConfig()  # the sampler's defaults are its own


@dataclass(frozen=True, kw_only=True)
class SmoothingSpec:
    """SmoothGrad / Sparsified SmoothGrad sampling and their randomized-smoothing certificate
    (Levine et al. 2019): probabilistic, failing with probability ≤ failure_probability."""

    sigma: float = _opt(Num(gt=0), _SMOOTHING.sigma, "noise std in input units")
    samples: int = _opt(Int(ge=1, le=10_000_000), _SMOOTHING.samples, "noise draws n")
    seed: int | None = _opt(Nullable(SEED), None, "null = general.seed")
    batch_size: int = _opt(Int(ge=1, le=65_536), _SMOOTHING.batch_size, "noisy inputs per pass (memory only)")
    sparsify: float = _opt(Num(gt=0, le=1), _SMOOTHING.sparsify, "K as a fraction of the features (top-K of |∇o| → 1)")
    relaxed: bool = _opt(Bool(), _SMOOTHING.relaxed, "relaxed Sparsified SmoothGrad (needs clip)")
    clip: float | None = _opt(Nullable(Num(ge=0, le=1)), None, "relaxed: fraction C of features clipped to 1 (C ≤ K)")
    failure_probability: float = _opt(Num(gt=0, lt=1), _SMOOTHING.failure_probability, "p: the certificate holds with probability ≥ 1 − p")
    interval: SmoothingInterval = _opt(Choice(SmoothingInterval), _SMOOTHING.interval,
                                       "hoeffding (the paper) | clopper_pearson (non-relaxed sparsified only)")

    def validate(self) -> None:
        if self.relaxed != (self.clip is not None):
            raise _Invalid("expected clip with relaxed: true, and no clip otherwise", "clip")
        if self.clip is not None and self.clip > self.sparsify:
            raise _Invalid(f"expected clip <= sparsify ({self.sparsify:g}), got {self.clip:g}", "clip")
        if self.relaxed and self.interval == SmoothingInterval.CLOPPER_PEARSON:
            raise _Invalid("expected hoeffding with relaxed: true (its samples are not 0/1)", "interval")


@dataclass(frozen=True, kw_only=True)
class ExplanationSpec:
    method: ExplanationMethod = _opt(Choice(ExplanationMethod), _EXPLAINER.method,
                                     "saliency | input_x_gradient | integrated_gradients | smoothgrad | "
                                     "sparsified_smoothgrad")
    output: Output = _opt(Choice(Output), Output.LOGIT,
                          "o = logit z_c | loss (cross-entropy at c) | probability (softmax(z)_c)")
    target: Union[TargetClass, int] = _opt(OneOf((Choice(TargetClass), Int(ge=0))), TargetClass.PREDICTED,
                                           "class c: predicted, label, or a fixed index")
    abs: bool = _opt(Bool(), False, "display only: bounds are on the signed map")
    integrated_gradients: IntegratedGradientsSpec = _opt(Section(IntegratedGradientsSpec), {})
    smoothing: SmoothingSpec = _opt(Section(SmoothingSpec), {}, "smoothgrad / sparsified_smoothgrad")

    def explainer(self, seed: int) -> Explainer:
        """The explanation method with its settings (``seed``: general.seed, for a null smoothing.seed).
        Raises ValueError for smoothing settings the sampler rejects."""
        ig, smoothing = self.integrated_gradients, None
        if self.method in SMOOTHING_METHODS:
            s = self.smoothing
            smoothing = SmoothingConfig(s.sigma, s.samples, seed if s.seed is None else s.seed, s.batch_size,
                                        s.sparsify, s.relaxed, s.clip, s.failure_probability, s.interval)
        return Explainer(self.method, ig.steps, ig.rule, ig.baseline, smoothing)


@dataclass(frozen=True, kw_only=True)
class InputPerturbationSpec:
    norm: Norm = _opt(Choice(Norm, aliases=((math.inf, "inf"), (2, "l2"))), Norm.LINF,
                      "inf (the box every engine bounds) | l2 (smoothing methods only)")
    epsilon: float | None = _opt(Nullable(Num(ge=0)), None, "radius of the ball around each input; required "
                                                           "unless vnnlib gives the box")
    vnnlib: Path | None = _opt(Nullable(PathCheck((".vnnlib",))), None,
                               "VNN-LIB file whose input bounds (X_i, C order) are the box, used as is (clipped "
                               "to model.input_range only with data.outside_range: allow); its centre is the "
                               "input, so no data is needed; output constraints (Y_j) are ignored")

    def validate(self) -> None:
        if self.vnnlib is not None and self.epsilon is not None:
            raise _Invalid("expected either 'epsilon' or 'vnnlib', got both (perturbation.input.epsilon and "
                           "perturbation.input.vnnlib: the VNN-LIB box is used as is)", "vnnlib")
        if self.vnnlib is None and self.epsilon is None:
            raise _Invalid("missing required key (a number >= 0), or give 'vnnlib' (a VNN-LIB input box)",
                           "epsilon")
        if self.vnnlib is not None and self.norm != Norm.LINF:
            raise _Invalid(f"expected inf with vnnlib (a VNN-LIB file gives a box), got {_show(self.norm)}", "norm")


@dataclass(frozen=True, kw_only=True)
class ParamPerturbationSpec:
    mode: ParamMode = _opt(Choice(ParamMode), ParamMode.RELATIVE)
    gamma: float = _opt(Num(ge=0))
    layers: Union[str, tuple[str, ...]] = _opt(OneOf((Const("all"), ListOf(Str(), min_len=1, unique=True))), "all")
    include_bias: bool = _opt(Bool(), True)


@dataclass(frozen=True, kw_only=True)
class PerturbationSpec:
    input: InputPerturbationSpec | None = _opt(Section(InputPerturbationSpec, optional=True), None)
    parameters: ParamPerturbationSpec | None = _opt(Section(ParamPerturbationSpec, optional=True), None)

    def validate(self) -> None:
        if self.input is None and self.parameters is None:
            raise _Invalid("expected at least one of 'input' or 'parameters'")

    def build(self, domain: tuple[float, float] | None, box: FixedBox | None = None) -> Perturbation:
        """The threat set's definition (its ℓ∞ input box clipped to ``domain``). With
        ``input.vnnlib``, the fixed box is ``box`` (or else read from the file here; raises
        :class:`~verigrad.vnnlib.VnnlibError`)."""
        pp = self.parameters
        param = None if pp is None else ParamBoxSpec(pp.gamma, pp.mode, None if isinstance(pp.layers, str)
                                                     else tuple(pp.layers), pp.include_bias)
        pin = self.input
        if pin is not None and pin.vnnlib is not None and box is None:
            from verigrad.vnnlib import read_vnnlib

            vb = read_vnnlib(pin.vnnlib)
            box = FixedBox(torch.from_numpy(vb.lower), torch.from_numpy(vb.upper), vb.path)
        eps = pin.epsilon if pin is not None and pin.epsilon is not None else 0.0
        return Perturbation(eps, domain, param, box if pin is not None and pin.vnnlib is not None else None)


@dataclass(frozen=True, kw_only=True)
class GaussianTarget:
    """amplitude · exp(−‖p − center‖² / (2σ²)) over (row, col) of the last two dims."""

    center: tuple[float, ...] = _opt(ListOf(Num(), 1, 2), doc="(row, col); (index,) for flat maps")
    sigma: float = _opt(Num(gt=0))
    amplitude: float = _opt(Num(), 1.0)

    def map(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return _props.gaussian_map(shape, self.center, self.sigma, self.amplitude, dtype)


@dataclass(frozen=True, kw_only=True)
class SquareTarget:
    """``value`` on rows [r, r+size) × cols [c, c+size) of the last two dims, 0 elsewhere."""

    position: tuple[int, ...] = _opt(ListOf(Int(ge=0), 1, 2), doc="top-left (row, col)")
    size: int = _opt(Int(gt=0))
    value: float = _opt(Num(), 1.0)

    def map(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return _props.square_map(shape, self.position, self.size, self.value, dtype)


@dataclass(frozen=True, kw_only=True)
class FileTarget:
    path: Path = _opt(PathCheck((".npy",)), doc="array with the per-sample explanation shape")

    def map(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return _props.file_map(self.path, shape, dtype)


TargetSpec = Union[GaussianTarget, SquareTarget, FileTarget]
_TARGET = Tagged(TargetType, ((TargetType.GAUSSIAN, GaussianTarget), (TargetType.SQUARE, SquareTarget),
                              (TargetType.FILE, FileTarget)))


@dataclass(frozen=True, kw_only=True)
class PropertySpec:
    """One property. untargeted ℓp: max ‖v − v0‖ ≤ threshold; untargeted cosine: min cos ≥
    threshold; targeted ℓp: min ‖v − t‖ ≥ threshold; targeted cosine: max cos(v, t) ≤ threshold;
    topk: min top-k overlap fraction ≥ threshold; sign: sign flips among ``features`` ≤
    threshold; feature_bound: max |v_i| over ``features`` ≤ threshold."""

    name: str | None = _opt(Nullable(Str()), None, "default p{i}_{kind}_{metric} (p{i}_{kind} without metric)")
    kind: Kind = _opt(Choice(Kind))
    metric: Metric | None = _opt(Nullable(Choice(Metric)), None, "untargeted and targeted only (required there)")
    threshold: float = _opt(Num())
    normalize: Normalize = _opt(Choice(Normalize), Normalize.NONE, "normalize maps before comparing (ℓp only)")
    target: TargetSpec | None = _opt(Nullable(_TARGET), None, "targeted only")
    k: int | None = _opt(Nullable(Int(ge=1)), None, "topk only: how many features")
    features: Union[str, tuple[int, ...], None] = _opt(
        Nullable(OneOf((Const("all"), ListOf(Int(ge=0), min_len=1, unique=True)))), None,
        "sign and feature_bound only: 'all' or flat indices into the per-sample map")

    def validate(self) -> None:
        k = self.kind
        if k in METRIC_KINDS and self.metric is None:
            raise _Invalid(f"missing required key for kind {k.value} ({Choice(Metric).what})", "metric")
        if k not in METRIC_KINDS:
            if self.metric is not None:
                raise _Invalid(f"expected null for kind {k.value} (it has its own measure), got "
                               f"{_show(self.metric)}", "metric")
            if self.normalize != Normalize.NONE:
                raise _Invalid(f"expected none for kind {k.value}, got {_show(self.normalize)}", "normalize")
        if (k == Kind.TOPK) != (self.k is not None):
            raise _Invalid("missing required key for kind topk (an int >= 1)" if k == Kind.TOPK
                           else f"expected null: k is only used by kind topk, got {_show(self.k)}", "k")
        wants_features = k in (Kind.SIGN, Kind.FEATURE_BOUND)
        if wants_features != (self.features is not None):
            raise _Invalid(f"missing required key for kind {k.value} ('all' or a list of flat indices)"
                           if wants_features else
                           f"expected null: features are only used by kinds sign and feature_bound, got "
                           f"{_show(self.features)}", "features")
        if self.metric == Metric.COSINE:
            if not -1.0 <= self.threshold <= 1.0:
                raise _Invalid(f"expected a number in [-1, 1] for metric cosine, got {_show(self.threshold)}",
                               "threshold")
            if self.normalize != Normalize.NONE:
                raise _Invalid(
                    f"expected none for metric cosine, got {_show(self.normalize)}: cosine similarity is "
                    "scale-invariant, so normalizing the maps first changes nothing", "normalize")
        elif k == Kind.TOPK:
            if not 0 < self.threshold <= 1:
                raise _Invalid(f"expected a number in (0, 1] (the minimum overlap fraction) for kind topk, got "
                               f"{_show(self.threshold)}", "threshold")
        elif k == Kind.SIGN:
            if not self.threshold >= 0:
                raise _Invalid(f"expected a number >= 0 (allowed sign flips) for kind sign, got "
                               f"{_show(self.threshold)}", "threshold")
        elif not self.threshold > 0:
            raise _Invalid(f"expected a number > 0, got {_show(self.threshold)}", "threshold")
        if k == Kind.TARGETED and self.target is None:
            raise _Invalid("missing required key for kind targeted (a target map: gaussian | square | file)",
                           "target")
        if k != Kind.TARGETED and self.target is not None:
            raise _Invalid("expected null: a target map is only used by kind targeted", "target")

    def build(self, shape: Sequence[int], dtype: torch.dtype = torch.float64,
              device: torch.device | str | None = None) -> Property:
        """The property on per-sample maps of ``shape`` (its target map built in ``dtype`` on
        ``device``). Raises ValueError when k, the features or the target do not fit the map."""
        assert self.name is not None  # load_spec fills default names
        target = None if self.target is None else self.target.map(shape, dtype).to(device)
        features = None if self.features is None or isinstance(self.features, str) else tuple(self.features)
        prop = Property(self.name, self.kind, self.metric, self.threshold, self.normalize, target, self.k, features)
        prop.check_fits(shape)
        return prop


def _name_properties(props: tuple) -> tuple:
    """Fill default names p{i}_{kind}_{metric} (p{i}_{kind}) and require names to be unique."""
    out: list = []
    seen: dict[str, int] = {}
    for i, p in enumerate(props):
        if p.name is None:
            suffix = f"_{p.metric.value}" if p.metric is not None else ""
            p = dataclasses.replace(p, name=f"p{i}_{p.kind.value}{suffix}")
        if p.name in seen:
            raise _Invalid(f"duplicate property name {p.name!r} (also properties[{seen[p.name]}])", f"[{i}].name")
        seen[p.name] = i
        out.append(p)
    return tuple(out)


_ENGINE = EngineOptions()  # the engines' defaults are declared by their options (CROWN's by CrownOptions)


@dataclass(frozen=True, kw_only=True)
class IbpSpec:
    product: IbpProduct = _opt(Choice(IbpProduct), _ENGINE.product, "interval × interval rule")


@dataclass(frozen=True, kw_only=True)
class AlphaCrownSpec:
    iterations: int = _opt(Int(ge=1, le=100_000), _ENGINE.alpha_iterations)
    lr: float = _opt(Num(gt=0), _ENGINE.alpha_lr)


@dataclass(frozen=True, kw_only=True)
class CrownSpec:
    """How CROWN / alpha-CROWN split the d = prod(input_shape) output rows into backward passes
    (memory ∝ rows; results unchanged)."""

    output_chunk: Union[str, int] = _opt(OneOf((Const("auto"), Int(ge=1))), "auto",
                                         "rows per backward pass; auto = all d when they fit in memory_mb, "
                                         "else as many as fit")
    memory_mb: float | None = _opt(Nullable(Num(gt=0, le=1_048_576)), None,
                                   "budget (MiB) for auto; null = a quarter of the memory available at run "
                                   "time (free GPU memory on cuda), at most 512; a given budget is at most 1 TiB")

    @property
    def chunk(self) -> int | None:
        """output_chunk as the engine takes it: None for auto."""
        return None if self.output_chunk == "auto" else int(self.output_chunk)


_BAB = BabOptions()  # branch and bound's defaults are its options


@dataclass(frozen=True, kw_only=True)
class BabSpec:
    """Branch and bound (engine ``bab``): budget per input and property, and strategy."""

    timeout_s: float = _opt(Num(gt=0, le=86_400), _BAB.timeout_s,
                               "seconds per input and property searched (time a search leaves unused goes "
                               "to the input's later searches)")
    max_domains: int = _opt(Int(ge=1, le=100_000_000), _BAB.max_domains,
                            "domains bounded per input and property (tentative children counted)")
    batch: int = _opt(Int(ge=1, le=100_000), _BAB.batch, "domains split per step (children bounded in one call)")
    branching: Branching = _opt(Choice(Branching), _BAB.branching,
                                "property = strong branching on the property's worst case; layer = first "
                                "unstable layer by score")
    candidates: int = _opt(Int(ge=1, le=1000), _BAB.candidates, "strong-branching candidates per domain")
    mode: BabMode = _opt(Choice(BabMode), _BAB.mode, "auto = neuron splits on ReLU / LeakyReLU / PReLU / MaxPool nets, else input splits")
    root: BoundMethod = _opt(Choice(BoundMethod), BoundMethod(_BAB.root),
                             "engine bounding the whole box (every domain is intersected with it) and input splits")
    leaf: BabLeaf = _opt(Choice(BabLeaf), _BAB.leaf,
                         "crown = neuron-split domains bounded by CROWN with their pre-activation boxes; "
                         "interval = by the interval pass alone (faster per domain, looser)")
    attack_share: float = _opt(Num(ge=0, lt=1), _BAB.attack_share,
                               "at most this share of a search's time runs the attacks from its worst open "
                               "domains (0 = none)")

    def validate(self) -> None:
        if self.root == BoundMethod.BAB:
            raise _Invalid("expected ibp, crown or alpha-crown (bab cannot be its own root)", "root")

    def options(self) -> BabOptions:
        return BabOptions(timeout_s=self.timeout_s, max_domains=self.max_domains, batch=self.batch,
                          branching=self.branching, candidates=self.candidates, mode=self.mode, root=self.root.value,
                          leaf=self.leaf, attack_share=self.attack_share)


@dataclass(frozen=True, kw_only=True)
class BoundsSpec:
    methods: tuple[BoundMethod, ...] = _opt(ListOf(Choice(BoundMethod), min_len=1, unique=True),
                                            (BoundMethod.IBP, BoundMethod.CROWN))
    dtype: Dtype = _opt(Choice(Dtype), Dtype.FLOAT64)
    combine: Combine = _opt(Choice(Combine), Combine.NONE, "intersect the bounds of all methods")
    ibp: IbpSpec = _opt(Section(IbpSpec), {})
    alpha_crown: AlphaCrownSpec = _opt(Section(AlphaCrownSpec), {})
    crown: CrownSpec = _opt(Section(CrownSpec), {}, "chunking of CROWN / alpha-CROWN (both engines)")
    bab: BabSpec = _opt(Section(BabSpec), {}, "branch and bound (engine bab)")

    def engine_options(self) -> EngineOptions:
        """The settings every bound engine reads."""
        return EngineOptions(product=self.ibp.product, alpha_iterations=self.alpha_crown.iterations,
                             alpha_lr=self.alpha_crown.lr, crown_output_chunk=self.crown.chunk,
                             crown_memory_mb=self.crown.memory_mb, bab=self.bab.options())


_ATTACK = AttackOptions()  # the search settings' defaults are the attacks' own


@dataclass(frozen=True, kw_only=True)
class AttackSpec:
    """Falsification: attacks search the same box the certificate covers; a witness counts
    only after re-evaluation at float64 with autograd on the real network."""

    order: AttackOrder = _opt(Choice(AttackOrder), AttackOrder.AFTER, "before | after | both | skip")
    methods: Union[str, tuple[AttackMethod, ...]] = _opt(
        OneOf((Const("auto"), ListOf(Choice(AttackMethod), min_len=1, unique=True))), "auto",
        "auto = every attack that applies to the property and the threat set")
    steps: int = _opt(Int(ge=1, le=100_000), _ATTACK.steps)
    restarts: int = _opt(Int(ge=1, le=10_000), _ATTACK.restarts, "the first start is the box centre, later ones random")
    step_size: float = _opt(Num(gt=0), _ATTACK.step_size, "per step, as a fraction of the box half-width")
    seed: int | None = _opt(Nullable(SEED), None, "null = general.seed")
    surrogate_beta: float | None = _opt(Nullable(Num(gt=0)), _ATTACK.surrogate_beta,
                                        "softplus β replacing relu while attacking; null = none")
    output_weight: float = _opt(Num(ge=0), _ATTACK.output_weight, "penalty on ‖logits − logits0‖² (targeted, params)")
    keep_class: bool = _opt(Bool(), _ATTACK.keep_class, "levine_topk backtracks steps that change the class")
    noise_levels: tuple[float, ...] = _opt(ListOf(Num(ge=0), min_len=1), (0.01, 0.05, 0.1),
                                           "ν for random-perturbation similarity (verigrad attack)")
    noise_samples: int = _opt(Int(ge=1, le=10_000), 8, "draws per noise level, explained in one batch")
    sensitivity_samples: int = _opt(Int(ge=1, le=10_000), 8,
                                    "draws for max-sensitivity (verigrad attack), explained in one batch")

    def options(self, seed: int) -> AttackOptions:
        """The search settings (``seed``: general.seed, for a null attack.seed)."""
        return AttackOptions(steps=self.steps, restarts=self.restarts, step_size=self.step_size,
                             seed=seed if self.seed is None else self.seed, surrogate_beta=self.surrogate_beta,
                             output_weight=self.output_weight, keep_class=self.keep_class)


@dataclass(frozen=True, kw_only=True)
class SecondOrderSpec:
    """Hessian bounds over the box and the literature's first-order bounds (smooth nets)."""

    hessian: tuple[BoundMethod, ...] = _opt(ListOf(Choice(BoundMethod), unique=True), (),
                                            "engines bounding the attribution's Jacobian (Hessian) over the "
                                            "box; each adds a sound mean-value engine 'hessian-<engine>'")
    literature: bool = _opt(Bool(), False, "also report the literature's bounds, each labelled by its guarantee")
    hutchinson_samples: int = _opt(Int(ge=1, le=100_000), 64, "probes for the stochastic Hessian Frobenius estimate")

    def validate(self) -> None:
        if BoundMethod.ALPHA_CROWN in self.hessian or BoundMethod.BAB in self.hessian:
            raise _Invalid("expected ibp and/or crown (alpha-crown and bab do not bound Hessians)", "hessian")


@dataclass(frozen=True, kw_only=True)
class RadiusSpec:
    """The inverse problem: per property, the largest certified ε (bisection with the sound
    engines; any ε that certified is a valid radius because the boxes are nested)."""

    search: bool = _opt(Bool(), False)
    methods: tuple[BoundMethod, ...] = _opt(ListOf(Choice(BoundMethod), min_len=1, unique=True),
                                            (BoundMethod.IBP, BoundMethod.CROWN),
                                            "engines tried at each ε, in order, until one certifies")
    eps_max: float = _opt(Num(gt=0), 0.1, "upper end of the search")
    iterations: int = _opt(Int(ge=1, le=100), 10, "bisection steps (float64 has 53 bits)")

    def validate(self) -> None:
        if BoundMethod.BAB in self.methods:
            raise _Invalid("expected ibp, crown and/or alpha-crown (bab decides properties, it is not bisected)",
                           "methods")


@dataclass(frozen=True, kw_only=True)
class GeneralSpec:
    device: Device = _opt(Choice(Device), Device.CPU)
    seed: int = _opt(SEED, 0)
    results: Path = _opt(PathCheck(must_exist=False), "results", "output directory")


@dataclass(frozen=True, kw_only=True)
class Spec:
    """A whole, validated run specification (build with load_spec / spec_from_dict)."""

    model: ModelSpec = _opt(Section(ModelSpec))
    data: VerifyDataSpec = _opt(Section(VerifyDataSpec), {}, "the inputs; may be left out with "
                                                            "perturbation.input.vnnlib")
    explanation: ExplanationSpec = _opt(Section(ExplanationSpec), {})
    perturbation: PerturbationSpec = _opt(Section(PerturbationSpec))
    properties: tuple[PropertySpec, ...] = _opt(ListOf(Section(PropertySpec), min_len=1, post=_name_properties))
    bounds: BoundsSpec = _opt(Section(BoundsSpec), {})
    attack: AttackSpec = _opt(Section(AttackSpec), {})
    second_order: SecondOrderSpec = _opt(Section(SecondOrderSpec), {})
    radius: RadiusSpec = _opt(Section(RadiusSpec), {})
    general: GeneralSpec = _opt(Section(GeneralSpec), {})
    # where it came from (for messages); not part of the spec's identity
    source: str = field(default="<dict>", compare=False)

    @property
    def vnnlib(self) -> Path | None:
        """perturbation.input.vnnlib: the file whose box (and its centre) replace the data."""
        pin = self.perturbation.input
        return pin.vnnlib if pin is not None else None

    def validate(self) -> None:
        d = self.data
        if self.vnnlib is None:
            if d.dataset is None and d.path is None:
                raise _Invalid("expected exactly one of 'dataset' or 'path', got neither (or give "
                               "perturbation.input.vnnlib, whose box centre is then the input)", "data")
            return
        if d.dataset is not None or d.path is not None:
            raise _Invalid(f"expected either data.{'dataset' if d.dataset is not None else 'path'} or "
                           "perturbation.input.vnnlib (whose box centre is the one input), got both", "data")
        if d.start != 0 or d.end not in (None, 1):
            raise _Invalid("expected start 0 and end null or 1 with perturbation.input.vnnlib (one input), got "
                           f"{d.start}:{_show(d.end)}", "data")
        if d.reshape is not None:
            raise _Invalid("expected null with perturbation.input.vnnlib (X_i are reshaped to the model's input "
                           "shape in C order)", "data.reshape")
        if self.radius.search:
            raise _Invalid("expected false with perturbation.input.vnnlib (its box is fixed, there is no ε to "
                           "search)", "radius.search")
        if self.second_order.literature:
            raise _Invalid("expected false with perturbation.input.vnnlib (the literature's bounds are for an "
                           "ε-ball around the input)", "second_order.literature")

    def to_dict(self) -> dict:
        """The resolved spec as plain YAML/JSON data (enums as values, absolute paths)."""
        return _dump_section(self)

    def hash(self) -> str:
        """sha256 of the canonical JSON of the resolved spec: equal specs hash equal."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------
# Public entry points


# Limits on a spec file before and while it is parsed (a real spec is a few KB, a few hundred values)
MAX_FILE_BYTES = 1 << 20  # 1 MiB, checked before anything is read into memory
MAX_DEPTH = 64  # nesting of mappings / lists
MAX_VALUES = 100_000  # values in the document with every alias expanded (stops "billion laughs")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one), nesting
    deeper than MAX_DEPTH and documents that expand (through aliases) to more than
    MAX_VALUES values; both are counted while composing, before anything is constructed."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._values = 0  # values so far, each alias counted as the size of what it repeats
        self._sizes: dict[int, int] = {}  # id(node) -> its expanded size, once composed

    def _refuse(self, problem: str) -> NoReturn:
        raise yaml.composer.ComposerError(None, None, problem, self.peek_event().start_mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._sizes.get(id(node))
            if size is None:
                self._refuse("an alias inside its own anchor (a recursive structure)")
            self._values += size
        else:
            self._depth += 1
            if self._depth > MAX_DEPTH:
                self._refuse(f"nested more than {MAX_DEPTH} levels deep")
            self._values += 1
            node = super().compose_node(parent, index)
            self._depth -= 1
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._sizes[id(c)] for c in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        if self._values > MAX_VALUES:
            self._refuse(f"more than {MAX_VALUES} values with aliases expanded (an alias bomb?); refusing "
                         "to expand it")
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as e:  # e.g. 2020-13-45, an int of 5000 digits
            what = _show(node.value) if isinstance(node, yaml.ScalarNode) else "this value"
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {what}: {_one_line_text(e)}", node.start_mark) from None


def _one_line_text(e: BaseException) -> str:
    return "; ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, str):  # _check_keys names the key path first; this is the backstop
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a key name (a string), got {_show(key)}", key_node.start_mark)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 reads 1e-2 (no dot) as a string; users mean a number (epsilon: 1e-3)
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_STR_TAG, _MERGE_TAG = "tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _check_keys(root: yaml.Node, source: str) -> None:
    """Every mapping key is a plain string (no ``? [a, b]`` complex keys, no 1: or null: keys);
    the error names the key path of the mapping that holds the bad key. Each node is visited
    once (an anchored node repeated by aliases is checked where it is defined)."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((c, f"{path}[{i}]") for i, c in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag == _MERGE_TAG:
                    stack.append((v, path))
                    continue
                if not isinstance(k, yaml.ScalarNode) or k.tag != _STR_TAG:
                    kind = ("a list" if isinstance(k, yaml.SequenceNode) else "a mapping"
                            if isinstance(k, yaml.MappingNode) else f"the {k.tag.rsplit(':', 1)[-1]}")
                    text = k.value if isinstance(k, yaml.ScalarNode) else ""
                    shown = f" {_show(text)[1:-1]}" if text else ""
                    raise SpecError(source, path, f"expected a key name (a string), got {kind} key{shown} at "
                                                  f"{_where(k.start_mark)}")
                stack.append((v, f"{path}.{k.value}" if path else str(k.value)))


def parse_document(cls: type, d: Any, source: str = "<dict>", base_dir: str | Path | None = None) -> Any:
    """Validate a parsed document against the schema dataclass ``cls`` (which has a
    ``source`` field); relative paths resolve against ``base_dir`` (default: cwd)."""
    at = _At(source, Path(base_dir if base_dir is not None else Path.cwd()).resolve())
    if not isinstance(d, Mapping):
        raise at.error(f"expected a mapping with sections {', '.join(f.name for f in _schema_fields(cls))}, "
                       f"got {_show(d)}")
    return dataclasses.replace(Section(cls).parse(d, at), source=source)


def spec_from_dict(d: Any, source: str = "<dict>", base_dir: str | Path | None = None) -> Spec:
    """Validate a parsed document; relative paths resolve against ``base_dir`` (default: cwd)."""
    return parse_document(Spec, d, source, base_dir)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML spec file; paths in it are relative to its directory."""
    p = Path(path)
    return spec_from_dict(read_yaml(p, "spec"), source=str(p), base_dir=p.resolve().parent)


def _read_bytes(p: Path, what: str) -> bytes:
    """The file's bytes: a regular file (not a directory, FIFO or device: those are refused
    before opening, so a FIFO cannot hang) of at most MAX_FILE_BYTES."""
    def fail(message: str) -> SpecError:
        return SpecError(str(p), "", message)

    def check(st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            raise fail(f"cannot read {what} file: it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise fail(f"cannot read {what} file: not a regular file (a FIFO, socket or device)")
        if st.st_size > MAX_FILE_BYTES:
            raise fail(f"{what} file is {st.st_size} bytes, more than the limit of {MAX_FILE_BYTES} bytes "
                       f"(1 MiB; a {what} is a few KB)")

    try:
        check(os.stat(p))
        # O_NONBLOCK: should the path be swapped for a FIFO after the check, open does not wait
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            check(os.fstat(f.fileno()))
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise fail(f"cannot read {what} file: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise fail(f"{what} file is more than the limit of {MAX_FILE_BYTES} bytes (1 MiB; a {what} is a few KB)")
    return data


def _decode(data: bytes, p: Path, what: str) -> str:
    """Strict UTF-8 (a UTF-8 byte-order mark is dropped); other encodings and binary data are
    refused naming the byte offset."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SpecError(str(p), "", f"{what} file is UTF-16 (byte-order mark at byte offset 0); save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise SpecError(str(p), "", f"{what} file is binary, not YAML text: a NUL byte at byte offset {nul}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SpecError(str(p), "", f"{what} file is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset "
                                    f"{e.start} (line {line}) ({e.reason}); save it as UTF-8") from None


def read_yaml(p: Path, what: str) -> Any:
    """A YAML document (duplicate keys rejected); errors name the file and line. The file is
    read as bytes (at most MAX_FILE_BYTES), decoded as strict UTF-8, composed with nesting
    and alias-expansion limits, its keys checked, and only then constructed."""
    text = _decode(_read_bytes(p, what), p, what)
    loader = None
    try:
        loader = _UniqueKeyLoader(text)  # checks for control characters
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys(node, str(p))
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = _where(mark) if mark is not None else "unknown position"
        raise SpecError(str(p), "", f"YAML error at {where}: {e.problem or e.context}") from None
    except yaml.reader.ReaderError as e:  # a control character
        line = text.count("\n", 0, e.position) + 1
        raise SpecError(str(p), "", f"YAML error at line {line}: {e.reason} (character #x{e.character:04x}); "
                                    "a spec is plain text") from None
    except yaml.YAMLError as e:
        raise SpecError(str(p), "", f"YAML error: {_one_line_text(e)}") from None
    except RecursionError:  # a backstop: compose_node refuses nesting beyond MAX_DEPTH first
        raise SpecError(str(p), "", f"YAML error: nested more than {MAX_DEPTH} levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()


def dump_spec(spec: Spec) -> str:
    """The resolved spec as YAML (all defaults, absolute paths); load_spec reads it back
    to an equal Spec."""
    header = f"# resolved verigrad spec (from {spec.source}); sha256 {spec.hash()}\n"
    return header + yaml.safe_dump(spec.to_dict(), sort_keys=False, default_flow_style=None)


@dataclass(frozen=True)
class Flag:
    """A command-line flag that replaces one spec key; its type (and, for an enum, its choices)
    is the key's, so the CLI declares nothing of its own."""

    flag: str
    dest: str
    key: str
    type: Any  # int, float, or the key's str Enum
    multiple: bool = False

    @property
    def help(self) -> str:
        return f"replace {self.key}" + (" (repeatable)" if self.multiple else "")


CLI_FLAGS: tuple[Flag, ...] = (
    Flag("--method", "methods", "bounds.methods", BoundMethod, multiple=True),
    Flag("--epsilon", "epsilon", "perturbation.input.epsilon", float),
    Flag("--start", "start", "data.start", int),
    Flag("--end", "end", "data.end", int),
    Flag("--device", "device", "general.device", Device),
    Flag("--dtype", "dtype", "bounds.dtype", Dtype),
    Flag("--attack-order", "attack_order", "attack.order", AttackOrder),
)


def flag_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """{spec key: value} for the CLI_FLAGS given in ``values`` (by dest; None or empty = not given),
    ready for :func:`apply_overrides`."""
    out: dict[str, Any] = {}
    for fl in CLI_FLAGS:
        v = values.get(fl.dest)
        if v is None or (fl.multiple and not v):
            continue
        out[fl.key] = [getattr(x, "value", x) for x in v] if fl.multiple else getattr(v, "value", v)
    return out


def apply_overrides(spec: Spec, changes: Mapping[str, Any]) -> Spec:
    """A new Spec with ``changes`` (dotted key path → value, e.g. {'bounds.combine':
    'intersect'}) replacing the file's values (precedence defaults < YAML < command line),
    re-validated as a whole. A missing section on the path is created (with that section's
    defaults), e.g. 'perturbation.input.epsilon' on a parameters-only spec. Relative paths
    given here resolve against the current directory."""
    if not changes:
        return spec
    d = spec.to_dict()
    changes = {k: [getattr(x, "value", x) for x in v] if isinstance(v, (list, tuple)) else getattr(v, "value", v)
               for k, v in changes.items()}
    for dotted, val in changes.items():
        node = d
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict):
                raise SpecError(f"{spec.source} (command-line overrides)", dotted, "not a mapping on this path")
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict):
            raise SpecError(f"{spec.source} (command-line overrides)", dotted, "not a mapping on this path")
        node[parts[-1]] = val
    return spec_from_dict(d, source=f"{spec.source} (with command-line overrides)", base_dir=Path.cwd())


__all__ = [
    "SpecError", "Spec", "ModelSpec", "NormalizationSpec", "DataSpec", "VerifyDataSpec", "ExplanationSpec",
    "InputPerturbationSpec", "ParamPerturbationSpec", "PerturbationSpec", "PropertySpec",
    "GaussianTarget", "SquareTarget", "FileTarget", "TargetSpec", "BoundsSpec", "IbpSpec",
    "AlphaCrownSpec", "CrownSpec", "AttackSpec", "AttackOrder", "AttackMethod", "GeneralSpec", "SecondOrderSpec", "RadiusSpec", "DatasetName", "ExplanationMethod", "IntegratedGradientsSpec", "SmoothingSpec", "TargetClass", "Norm",
    "Kind", "Metric", "Normalize", "TargetType", "BoundMethod", "Dtype", "Combine", "IbpProduct",
    "Device", "load_spec", "spec_from_dict", "dump_spec", "apply_overrides", "CLI_FLAGS", "Flag", "flag_overrides",
]
