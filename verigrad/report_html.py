"""``verigrad report``: a self-contained HTML page of a ``verigrad verify`` results file or a
``verigrad batch`` output directory.

Everything the page shows is embedded in it (PNG heatmaps as base64 data URIs, plots as
inline SVG, CSS in a ``<style>`` element), so it opens offline and can be attached or
archived as one file; the PNGs are also written to ``<page stem>_files/`` beside it.

Nothing here needs more than numpy: the PNG encoder and the colour maps are written out
below, the plots are hand-written SVG, and every piece of text from the results is passed
through :func:`html.escape`. :func:`write_report` is the entry point; :func:`encode_png`,
:func:`diverging` and :func:`sequential` are exposed because they are useful (and tested)
on their own.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from verigrad.data import NPZ_ERRORS, open_npz, read_npz
from verigrad.errors import UserError

__all__ = ["write_report", "ReportError", "encode_png", "diverging", "sequential", "NAN_COLOUR"]

RESULTS_SCHEMA = "verigrad.results/1"
WITNESS_SCHEMA = "verigrad.witness/1"
VERDICTS = ("certified", "falsified", "unknown", "error")
EXIT_MEANING = {
    0: "every property certified on every input",
    1: "some property falsified (a witness violates it inside the box)",
    2: "bad input (spec, model or data; nothing was run)",
    3: "some property unknown (neither certified nor falsified; batch timeouts count here)",
    4: "an input failed (including a certified-and-falsified conflict)",
}


class ReportError(UserError):
    """The results path cannot be reported on: missing, unreadable, or not verigrad results.
    The message names the path and what was expected (the CLI prints it and exits 2)."""


# ---------------------------------------------------------------------------------------
# PNG


def _chunk(kind: bytes, data: bytes) -> bytes:
    # length, type, data, CRC-32 over type + data (PNG spec, section 5.3)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as an 8-bit RGB PNG (no interlace, filter type 0
    on every row: the heatmaps are small, so filtering would buy little)."""
    a = np.asarray(rgb)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"encode_png expects a non-empty (H, W, 3) uint8 array, got {a.shape} {a.dtype}")
    h, w, _ = a.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(a).reshape(h, w * 3)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 = RGB
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
            + _chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------
# Colour maps: piecewise linear between anchor colours (t in [0, 1])

# blue (negative) - white (0) - red (positive): white in the middle so that "no gradient"
# reads as blank and the sign reads as hue
DIVERGING_ANCHORS = np.array([[33, 64, 154], [103, 169, 207], [247, 247, 247], [239, 138, 98], [178, 24, 43]],
                             dtype=np.float64)
# dark violet - teal - yellow: monotone in lightness, so a wider bound is always brighter
SEQUENTIAL_ANCHORS = np.array([[20, 11, 52], [84, 33, 120], [33, 124, 142], [94, 201, 98], [250, 231, 35]],
                              dtype=np.float64)
# NaN pixels: a colour neither map contains
NAN_COLOUR = (255, 0, 255)


def _interpolate(t: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    pos = np.clip(t, 0.0, 1.0) * (len(anchors) - 1)
    k = np.minimum(np.floor(pos).astype(int), len(anchors) - 2)
    f = (pos - k)[..., None]
    rgb = anchors[k] * (1 - f) + anchors[k + 1] * f
    return np.rint(rgb).astype(np.uint8)


def _with_nan(values: np.ndarray, t: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    nan = np.isnan(values)
    out = _interpolate(np.where(nan, 0.0, t), anchors)
    out[nan] = NAN_COLOUR
    return out


def diverging(values: np.ndarray, vmax: float) -> np.ndarray:
    """RGB (uint8, shape ``values.shape + (3,)``) of a signed map on the symmetric scale
    [−vmax, vmax]: 0 is the white midpoint, −vmax the blue end, +vmax the red end; values
    beyond (including ±inf) are clipped to the ends, NaN is :data:`NAN_COLOUR`."""
    v = np.asarray(values, dtype=np.float64)
    if vmax > 0 and math.isfinite(vmax):
        with np.errstate(invalid="ignore"):
            t = 0.5 + 0.5 * np.clip(v / vmax, -1.0, 1.0)
    else:  # no scale (a map that is zero everywhere): everything at the midpoint, signs by the ends
        t = np.where(v > 0, 1.0, np.where(v < 0, 0.0, 0.5))
    return _with_nan(v, t, DIVERGING_ANCHORS)


def sequential(values: np.ndarray, vmax: float, vmin: float = 0.0) -> np.ndarray:
    """RGB (uint8) of a non-negative map (bound widths) on [vmin, vmax]: dark at vmin,
    bright yellow at vmax, clipped beyond; NaN is :data:`NAN_COLOUR`."""
    v = np.asarray(values, dtype=np.float64)
    span = vmax - vmin
    if not span > 0 or not math.isfinite(span):
        t = np.where(v > vmin, 1.0, 0.0)
    else:
        with np.errstate(invalid="ignore"):
            t = np.clip((v - vmin) / span, 0.0, 1.0)
    return _with_nan(v, t, SEQUENTIAL_ANCHORS)


def _gradient_bar(cmap: Callable[[np.ndarray], np.ndarray], width: int = 160, height: int = 10) -> np.ndarray:
    return np.repeat(cmap(np.linspace(0.0, 1.0, width))[None], height, axis=0)


# ---------------------------------------------------------------------------------------
# Loading


@dataclass
class _Instance:
    """One input as the report sees it: the schema's instance object (None for a batch
    timeout or crash), its bound maps, its input, and the witness files."""

    index: int
    doc: dict | None
    status: str = "done"  # batch: done | timeout | error
    reason: str | None = None
    seconds: float | None = None
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # explanation, {engine}/lower|upper
    maps_file: Path | None = None  # read only for the inputs shown (see _load_maps)
    maps_note: str | None = None
    x: np.ndarray | None = None
    x_note: str | None = None
    witnesses: dict[str, Path | str] = field(default_factory=dict)  # property → file or why not


@dataclass
class _Run:
    """One spec's results: the pieces of the results document the page shows."""

    title: str
    source: str
    sha256: str | None
    properties: list[dict]
    methods: list[str]
    explanation: dict
    instances: list[_Instance]
    complete: bool = True
    exit_code: int | None = None
    started: str | None = None
    device: str | None = None
    dtype: str | None = None
    input_range: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)
    batch: bool = False


# Validation: the parts of the documented schema (docs/results-schema.md) that the report
# reads, walked once when a file is loaded, so that a malformed file is a ReportError naming
# the file and the JSON path (``instances[2].index``) instead of a crash while rendering.
# Keys the report only prints (through _num / _e) are left unchecked; unknown keys are allowed.


class _Bad(Exception):
    def __init__(self, path: str, expected: str, got: Any, missing: bool = False) -> None:
        super().__init__(path)
        self.path, self.expected, self.got, self.missing = path, expected, got, missing

    def message(self, file: Path | str) -> str:
        if self.missing:
            return f"{file}: {self.path} is missing (expected {self.expected})"
        return f"{file}: {self.path} is {_json_kind(self.got)}, expected {self.expected}"


def _json_kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


class _Schema:
    expected = "anything"

    def check(self, v: Any, path: str) -> None:
        pass


class _Scalar(_Schema):
    def __init__(self, expected: str, ok: Callable[[Any], bool]) -> None:
        self.expected, self.ok = expected, ok

    def check(self, v: Any, path: str) -> None:
        if not self.ok(v):
            raise _Bad(path, self.expected, v)


class _Nullable(_Schema):
    def __init__(self, inner: _Schema) -> None:
        self.inner, self.expected = inner, f"{inner.expected} or null"

    def check(self, v: Any, path: str) -> None:
        if v is not None:
            try:
                self.inner.check(v, path)
            except _Bad as e:
                if e.path == path:
                    e.expected = self.expected
                raise


class _List(_Schema):
    def __init__(self, item: _Schema) -> None:
        self.item, self.expected = item, f"a list (of {item.expected})"

    def check(self, v: Any, path: str) -> None:
        if not isinstance(v, list):
            raise _Bad(path, self.expected, v)
        for i, x in enumerate(v):
            self.item.check(x, _child(path, i))


class _Map(_Schema):
    def __init__(self, value: _Schema, what: str) -> None:
        self.value, self.expected = value, f"an object ({what} → {value.expected})"

    def check(self, v: Any, path: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(path, self.expected, v)
        for k, x in v.items():
            self.value.check(x, _child(path, k))


class _Obj(_Schema):
    def __init__(self, what: str, fields: dict[str, _Schema], required: Sequence[str] = ()) -> None:
        self.fields, self.required, self.expected = fields, tuple(required), what

    def check(self, v: Any, path: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(path, self.expected, v)
        for k in self.required:
            if k not in v:
                raise _Bad(_child(path, k), self.fields[k].expected, None, missing=True)
        for k, schema in self.fields.items():
            if k in v:
                schema.check(v[k], _child(path, k))


_ANY = _Schema()
_STR = _Scalar("a string", lambda v: isinstance(v, str))
_BOOL = _Scalar("a boolean", lambda v: isinstance(v, bool))
_INT = _Scalar("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
_INDEX = _Scalar("a non-negative integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
_NUMBER = _Scalar("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
_ENGINE = _Obj("an engine object", {
    "properties": _Nullable(_List(_Obj("a property result object", {"name": _STR, "verdict": _Nullable(_STR)},
                                       required=("name",)))),
    "notes": _Nullable(_List(_STR)),
})
_ATTACK = _Nullable(_Obj("an attack object", {"witness": _Nullable(_STR)}))


def _instance_schema(required: Sequence[str]) -> _Obj:
    return _Obj("an instance object", {
        "index": _INDEX,
        "error": _Nullable(_STR),
        "verdicts": _Nullable(_Map(_STR, "property name → verdict")),
        "engines": _Nullable(_Map(_ENGINE, "engine name → engine object")),
        "attacks": _Nullable(_Map(_ATTACK, "property name → attack object")),
        "gap": _Nullable(_Map(_Nullable(_Obj("a gap object", {})), "property name → gap object")),
        "bounds_npz": _Nullable(_STR),
    }, required=required)


_RESULTS = _Obj("a verigrad results document", {
    "complete": _BOOL,
    "started": _Nullable(_STR),
    "device": _Nullable(_STR),
    "dtype": _Nullable(_STR),
    "spec": _Obj("an object (source, sha256, resolved)", {"source": _Nullable(_STR), "sha256": _Nullable(_STR)}),
    "properties": _List(_Obj("a property object", {"name": _STR}, required=("name",))),
    "methods": _List(_STR),
    "explanation": _Nullable(_Obj("an explanation object", {"method": _Nullable(_STR),
                                                            "guarantee": _Nullable(_STR)})),
    "instances": _List(_instance_schema(("index",))),
    "summary": _Nullable(_Obj("a summary object", {"exit_code": _Nullable(_INT)})),
}, required=("spec", "properties", "instances"))

_RECORD = _Obj("a batch record object", {
    "spec": _STR, "spec_sha256": _STR, "data_index": _INDEX, "status": _STR, "reason": _Nullable(_STR),
    "seconds": _Nullable(_NUMBER), "result": _Nullable(_instance_schema(())),
}, required=("spec", "spec_sha256", "data_index", "status"))


def _validate(doc: Any, schema: _Schema, file: Path | str, where: str = "") -> None:
    """ReportError naming ``file`` and the JSON path of the first value not matching ``schema``."""
    try:
        schema.check(doc, where)
    except _Bad as e:
        raise ReportError(e.message(file)) from None


_NPZ_ERRORS = NPZ_ERRORS


def _npz_keys(path: Path) -> list[str]:
    with open_npz(path) as z:
        return list(z.files)


def _check_npz(npz: Path, indices: Sequence[int]) -> None:
    """The bound maps file of a results JSON must be an .npz of this run: readable, with
    verigrad's keys, and (when it holds any maps) holding those of at least one of its inputs."""
    try:
        keys = _npz_keys(npz)
    except _NPZ_ERRORS as e:
        raise ReportError(f"{npz}: not a verigrad bound maps .npz ({e})") from None
    have = sorted({int(k[1:].split("/", 1)[0]) for k in keys
                   if k.startswith("i") and "/" in k and k[1:].split("/", 1)[0].isdigit()})
    if not have and keys:
        raise ReportError(f"{npz}: not a verigrad bound maps .npz (expected keys i{{index}}/explanation, "
                          f"i{{index}}/{{engine}}/lower|upper; got {keys[:3]})")
    if indices and have and not set(have) & set(indices):
        raise ReportError(f"{npz}: holds the bound maps of inputs {have[:5]}, none of the results' inputs "
                          f"{list(indices)[:5]} (bound maps of another run?)")


def _check_maps(inst: _Instance) -> None:
    """The maps of one input: real numeric arrays, and every engine's lower / upper of the
    explanation's shape."""
    assert inst.maps_file is not None
    shape = None
    for k, a in inst.maps.items():
        if a.dtype.kind not in "fiu":
            raise ReportError(f"{inst.maps_file}: entry i{inst.index}/{k} has dtype {a.dtype}, expected real numbers")
        if shape is None:
            shape = a.shape
        elif a.shape != shape:
            raise ReportError(f"{inst.maps_file}: entry i{inst.index}/{k} has shape {a.shape}, expected {shape} "
                              f"(the shape of the other maps of input {inst.index})")


def _load_maps(inst: _Instance) -> None:
    """Read the instance's bound maps (keys ``i{index}/...``) from its npz; failure is a note."""
    if inst.maps_file is None or inst.maps:
        return
    pre = f"i{inst.index}/"
    try:
        inst.maps = {k[len(pre):]: v for k, v in read_npz(inst.maps_file, pre).items()}
    except _NPZ_ERRORS as e:
        raise ReportError(f"{inst.maps_file}: not a readable bound maps .npz ({e})") from None
    _check_maps(inst)
    if not inst.maps:
        inst.maps_note = f"no bound maps for input {inst.index} in {inst.maps_file}"


def _locate(raw: str | None, candidates: Sequence[Path]) -> Path | None:
    """A file named in a results document: as written (absolute, or relative to where the run
    was started), else the same name in the places the writers put it."""
    if not raw:
        return None
    p = Path(raw)
    for c in [p, *candidates]:
        if c.is_file():
            return c
    return None


def _spec_inputs(spec: Any, indices: Sequence[int], expected_sha: str | None) -> tuple[dict[int, np.ndarray], str | None]:
    """The data set's inputs at ``indices`` (data set indices), or why they are unavailable."""
    from verigrad.data import load_dataset

    if expected_sha is not None and spec.hash() != expected_sha:
        return {}, "input unavailable: the spec has changed since the run (hash differs)"
    if not indices:
        return {}, None
    d = spec.data
    lo, hi = min(indices), max(indices) + 1
    x, _ = load_dataset(d.dataset.value if d.dataset is not None else None, d.path, lo, hi)
    xs = x.double().numpy()
    return {i: xs[i - lo] for i in indices}, None


def _attach_inputs(run: _Run, spec_factory: Callable[[], Any], shown: Sequence[_Instance]) -> None:
    """Fill ``x`` of the shown instances from the spec's data; a failure becomes a note on each
    instance ("input unavailable"), never an error of the report."""
    try:
        spec = spec_factory()
        if spec.model.input_range is not None:
            run.input_range = (float(spec.model.input_range[0]), float(spec.model.input_range[1]))
        xs, note = _spec_inputs(spec, [i.index for i in shown], run.sha256)
    except Exception as e:  # noqa: BLE001 - any failure to rebuild the input only costs the picture
        xs, note = {}, f"input unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for inst in shown:
        if inst.index in xs:
            inst.x = xs[inst.index]
        else:
            inst.x_note = note or "input unavailable"


def _load_json(path: Path, bounds_npz: Path | None) -> tuple[_Run, Callable[[], Any]]:
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ReportError(f"{path}: cannot read it ({e})") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a verigrad results file (expected JSON with schema {RESULTS_SCHEMA!r}; "
                          "it is not text)") from None
    except ValueError as e:
        raise ReportError(f"{path}: not a verigrad results file (expected JSON with schema "
                          f"{RESULTS_SCHEMA!r}; it does not parse: {e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != RESULTS_SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ReportError(f"{path}: not a verigrad results file (expected a JSON document with schema "
                          f"{RESULTS_SCHEMA!r}, got {got!r}; or a verigrad batch directory with results.jsonl)")
    missing = [k for k in ("spec", "properties", "instances") if k not in doc]
    if missing:
        raise ReportError(f"{path}: verigrad results file lacks {missing}")
    _validate(doc, _RESULTS, path)
    if bounds_npz is not None and not bounds_npz.is_file():
        raise ReportError(f"{bounds_npz}: no such file (expected the bound maps .npz given by --bounds-npz)")
    npz = bounds_npz or path.with_suffix(".npz")
    maps_note = None if npz.is_file() else f"bound maps unavailable: no {npz}"
    if maps_note is None:
        _check_npz(npz, [d["index"] for d in doc["instances"]])
    witness_dir = path.with_name(path.stem + ".witnesses")
    instances = []
    for d in doc["instances"]:
        inst = _Instance(index=d["index"], doc=d, maps_note=maps_note,
                         maps_file=npz if maps_note is None else None)
        _attach_witnesses(inst, [witness_dir])
        instances.append(inst)
    spec = doc["spec"]
    run = _Run(title=path.stem, source=str(spec.get("source")),
               sha256=spec.get("sha256"), properties=list(doc["properties"]), methods=list(doc.get("methods", [])),
               explanation=dict(doc.get("explanation") or {}), instances=instances,
               complete=bool(doc.get("complete", True)), exit_code=(doc.get("summary") or {}).get("exit_code"),
               started=doc.get("started"), device=doc.get("device"), dtype=doc.get("dtype"))
    if not run.complete:
        run.notes.append("the run had not finished when this file was written (complete: false)")

    def factory() -> Any:
        from verigrad.spec import spec_from_dict

        return spec_from_dict(spec["resolved"], source=str(spec.get("source")))

    return run, factory


def _attach_witnesses(inst: _Instance, dirs: Sequence[Path], base: Path | None = None) -> None:
    """Resolve each attack's witness path: as written, relative to ``base`` (a batch directory),
    or by its name in ``dirs`` (where the writers put them), so a moved results folder works."""
    for name, a in ((inst.doc or {}).get("attacks") or {}).items():
        raw = (a or {}).get("witness")
        if not raw:
            continue
        found = _locate(raw, ([base / raw] if base is not None else []) + [d / Path(raw).name for d in dirs])
        inst.witnesses[name] = found if found is not None else f"witness file not found: {raw}"


def _validate_lines(lines: Path) -> None:
    """Every line of a batch ``results.jsonl`` that parses must be a record of the documented
    schema (a line that does not parse is one cut by a kill, which ``load_records`` skips)."""
    try:
        text = lines.read_bytes().decode("utf-8")
    except OSError as e:
        raise ReportError(f"{lines}: cannot read it ({e})") from None
    except UnicodeDecodeError as e:
        raise ReportError(f"{lines}: not verigrad batch records (not UTF-8 text: {e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        _validate(rec, _RECORD, f"{lines} line {n}", "record")


def _load_batch(out: Path) -> list[tuple[_Run, Callable[[], Any]]]:
    from verigrad.batch import load_records

    lines = out / "results.jsonl"
    if not lines.is_file():
        raise ReportError(f"{out}: not a verigrad batch directory (expected {lines}) nor a results JSON file")
    _validate_lines(lines)
    try:
        records = load_records(out)
    except (KeyError, TypeError) as e:
        raise ReportError(f"{lines}: not verigrad batch records (a line lacks {e}; expected "
                          "{spec, spec_sha256, data_index, status, reason, seconds, result})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{lines}: cannot read it ({e})") from None
    need = ("spec", "spec_sha256", "data_index", "status")
    bad = [r for r in records if not isinstance(r, dict) or any(k not in r for k in need)]
    if bad or not records:
        raise ReportError(f"{lines}: {'no complete records' if not records else 'not verigrad batch records'} "
                          f"(expected one JSON object per line with keys {list(need)} + result)")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["spec"], r["spec_sha256"]), []).append(r)
    stems = [Path(s).stem for s, _ in groups]
    runs: list[tuple[_Run, Callable[[], Any]]] = []
    for (spec_path, sha), recs in groups.items():
        recs.sort(key=lambda r: r["data_index"])
        stem = Path(spec_path).stem
        title = stem if stems.count(stem) == 1 else f"{stem}-{sha[:8]}"
        instances = []
        props: list[dict] = []
        methods: list[str] = []
        explanation: dict = {}
        for r in recs:
            d = r.get("result")
            inst = _Instance(index=r["data_index"], doc=d, status=str(r["status"]), reason=r.get("reason"),
                             seconds=r.get("seconds"))
            if d is not None:
                for engine in d.get("engines") or {}:
                    if engine not in methods:
                        methods.append(engine)
                if not props:
                    props = _properties_of(d)
                folder = f"{stem}-{sha[:8]}"  # verigrad batch's per-spec folder (older batches: the stem)
                npz = _locate(d.get("bounds_npz"), [out / str(d.get("bounds_npz")),
                                                    out / "bounds" / folder / f"i{inst.index}.npz",
                                                    out / "bounds" / stem / f"i{inst.index}.npz"])
                inst.maps_file = npz
                if npz is None:
                    inst.maps_note = f"bound maps unavailable: no {d.get('bounds_npz')}"
                _attach_witnesses(inst, [out / "witnesses" / folder, out / "witnesses" / stem], out)
            instances.append(inst)
        run = _Run(title=title, source=spec_path, sha256=sha, properties=props, methods=methods,
                   explanation=explanation, instances=instances, batch=True)

        def factory(spec_path: str = spec_path) -> Any:
            from verigrad.spec import load_spec

            return load_spec(spec_path)

        _complete_from_spec(run, factory)
        runs.append((run, factory))
    return runs


def _properties_of(d: dict) -> list[dict]:
    """Property descriptions from an instance object (batch records carry no property list)."""
    out: dict[str, dict] = {}
    for e in (d.get("engines") or {}).values():
        for p in e.get("properties") or []:
            out.setdefault(p["name"], {"name": p["name"], "threshold": p.get("threshold"),
                                       "direction": p.get("direction")})
    for n in d.get("verdicts") or {}:
        out.setdefault(n, {"name": n})
    return list(out.values())


def _complete_from_spec(run: _Run, factory: Callable[[], Any]) -> None:
    """Batch records hold no property list or explanation description: take them from the spec
    (if it still loads), so that timed-out specs still list their properties."""
    try:
        spec = factory()
    except Exception as e:  # noqa: BLE001 - the records alone still make a page
        run.notes.append(f"the spec no longer loads ({type(e).__name__}); properties are taken from the records")
        return
    if spec.hash() != run.sha256:
        # its properties may differ from those that ran: keep the records' own
        run.notes.append("the spec file has changed since the batch ran; inputs are not shown")
        return
    known = {p["name"]: p for p in run.properties}
    props = []
    for p in spec.properties:
        d = {"name": p.name, "kind": getattr(p.kind, "value", p.kind), "threshold": p.threshold}
        d.update({k: v for k, v in known.get(p.name, {}).items() if v is not None})
        props.append(d)
    run.properties = props
    run.explanation = {"method": getattr(spec.explanation.method, "value", str(spec.explanation.method))}


# ---------------------------------------------------------------------------------------
# Counting


def _instance_verdicts(inst: _Instance, names: Sequence[str]) -> dict[str, str]:
    """property → certified / falsified / unknown / error for one instance, by batch's rule."""
    from verigrad.batch import instance_verdicts

    return instance_verdicts(inst.status, inst.doc, names)


def _counts(run: _Run) -> dict[str, dict[str, int]]:
    names = [p["name"] for p in run.properties]
    out = {n: {v: 0 for v in VERDICTS} for n in names}
    for inst in run.instances:
        for n, v in _instance_verdicts(inst, names).items():
            out[n][v if v in VERDICTS else "unknown"] += 1
    return out


def _exit_code(counts: dict[str, dict[str, int]]) -> int:
    from verigrad.reports import exit_code_for_counts

    return int(exit_code_for_counts({v: sum(c[v] for c in counts.values()) for v in VERDICTS}))


def _ok_engines(inst: _Instance) -> dict[str, dict]:
    if inst.doc is None or inst.doc.get("error") is not None:
        return {}
    return dict(inst.doc.get("engines") or {})


def _engine_stats(run: _Run) -> dict[str, dict]:
    stats: dict[str, dict] = {}
    for inst in run.instances:
        for name, e in _ok_engines(inst).items():
            s = stats.setdefault(name, {"n": 0, "width": [], "max_width": [], "time": [], "fallbacks": 0,
                                        "guarantee": e.get("guarantee"), "certified": {}})
            s["n"] += 1
            s["width"].append(_f(e.get("mean_width")))
            s["max_width"].append(_f(e.get("max_width")))
            s["time"].append(_f(e.get("time_s")))
            s["fallbacks"] += e.get("actual_method") not in (None, name) and name != "combined"
            for p in e.get("properties") or []:
                s["certified"][p["name"]] = s["certified"].get(p["name"], 0) + (p.get("verdict") == "certified")
    return stats


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# ---------------------------------------------------------------------------------------
# Formatting


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return _e(x)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{digits}g}"


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _verdict_cell(v: str, text: str | None = None) -> str:
    cls = v if v in VERDICTS else "unknown"
    return f'<td class="v-{cls}">{_e(text if text is not None else v)}</td>'


def _range_text(a: np.ndarray) -> str:
    a = np.asarray(a, dtype=np.float64)
    fin = a[np.isfinite(a)]
    parts = [f"[{_num(fin.min())}, {_num(fin.max())}]" if fin.size else "no finite values"]
    n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    if n_nan:
        parts.append(f"{n_nan} NaN")
    if n_inf:
        parts.append(f"{n_inf} ±∞")
    return ", ".join(parts)


def _abs_max(arrays: Sequence[np.ndarray]) -> float:
    m = 0.0
    for a in arrays:
        a = np.abs(np.asarray(a, dtype=np.float64))
        fin = a[np.isfinite(a)]
        if fin.size:
            m = max(m, float(fin.max()))
    return m


# ---------------------------------------------------------------------------------------
# Pictures


def _kind(shape: tuple[int, ...]) -> str:
    """image (C, H, W) / (H, W), or vector (1-D, e.g. tabular), or other (no picture)."""
    if len(shape) == 3 or len(shape) == 2:
        return "image"
    if len(shape) == 1:
        return "vector"
    return "other"


def _as_chw(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a[None] if a.ndim == 2 else a


def _upscale(rgb: np.ndarray, target: int = 112) -> np.ndarray:
    # nearest-neighbour, integer factor: a 28×28 map becomes 112×112 with crisp pixels
    k = max(1, target // max(rgb.shape[0], rgb.shape[1]))
    return np.repeat(np.repeat(rgb, k, axis=0), k, axis=1) if k > 1 else rgb


def _tile_channels(rgbs: Sequence[np.ndarray]) -> np.ndarray:
    # channels side by side with a white gap, each coloured on the same scale
    gap = np.full((rgbs[0].shape[0], max(1, rgbs[0].shape[1] // 14), 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for k, c in enumerate(rgbs):
        parts += ([gap] if k else []) + [c]
    return np.concatenate(parts, axis=1)


def _map_rgb(a: np.ndarray, colour: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A map as an RGB picture: channels of a (C, H, W) map tiled, a 1-D map wrapped into a
    strip of cells (≤ 50 per row)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        n = a.size
        per_row = min(n, 50)
        rows = -(-n // per_row)
        cells = np.full((rows * per_row, 3), 255, np.uint8)
        cells[:n] = colour(a)
        grid = cells.reshape(rows, per_row, 3)
        cw = max(6, min(12, 480 // per_row))  # ≤ 12 px a cell: lower, upper and width fit on one row
        return np.repeat(np.repeat(grid, 2 * cw if rows == 1 else cw, axis=0), cw, axis=1)
    chw = _as_chw(a)
    return _upscale(_tile_channels([colour(c) for c in chw]))


def _input_rgb(x: np.ndarray, rng: tuple[float, float] | None) -> np.ndarray:
    """An image-shaped input in its domain: grey for one channel, colour for three (the
    domain [lo, hi] of the spec maps to black…white), other channel counts tiled grey."""
    chw = _as_chw(x)
    lo, hi = rng if rng is not None else (float(np.nanmin(chw)), float(np.nanmax(chw)))
    t = np.clip((chw - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(chw)
    g = np.rint(np.nan_to_num(t) * 255).astype(np.uint8)
    if chw.shape[0] == 3:
        return _upscale(np.transpose(g, (1, 2, 0)))
    return _upscale(_tile_channels([np.repeat(c[..., None], 3, axis=2) for c in g]))


class _Images:
    """Writes each picture to the page's ``_files`` folder and returns its ``<img>`` with the
    same PNG inline (the page must not depend on the folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.names: set[str] = set()
        self.cache: dict[str, str] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):  # pictures of an earlier report would look current
            old.unlink()

    def img(self, rgb: np.ndarray, name: str, alt: str, once: bool = False) -> str:
        """``once``: the picture is the same wherever ``name`` is used (the colour scales), so it
        is encoded and written a single time."""
        if once and name in self.cache:
            return self.cache[name]
        data = encode_png(rgb)
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        fname, k = f"{base}.png", 1
        while fname in self.names:
            k += 1
            fname = f"{base}-{k}.png"
        self.names.add(fname)
        (self.folder / fname).write_bytes(data)
        self.count += 1
        b64 = base64.b64encode(data).decode("ascii")
        tag = (f'<img src="data:image/png;base64,{b64}" alt="{_e(alt)}" title="{_e(alt)}" '
               f'width="{rgb.shape[1]}" height="{rgb.shape[0]}">')
        if once:
            self.cache[name] = tag
        return tag


def _figure(body: str, caption: str, sub: str = "") -> str:
    return (f'<figure>{body}<figcaption><b>{_e(caption)}</b>'
            f'{"<br>" + _e(sub) if sub else ""}</figcaption></figure>')


def _signed_fig(images: _Images, a: np.ndarray, vmax: float, name: str, caption: str) -> str:
    rgb = _map_rgb(a, lambda v: diverging(v, vmax))
    return _figure(images.img(rgb, name, caption), caption, _range_text(a))


def _width_fig(images: _Images, a: np.ndarray, vmax: float, name: str, caption: str) -> str:
    rgb = _map_rgb(a, lambda v: sequential(v, vmax))
    return _figure(images.img(rgb, name, caption), caption, _range_text(a))


def _input_fig(images: _Images, x: np.ndarray | None, note: str | None, rng: tuple[float, float] | None,
               name: str, caption: str) -> str:
    if x is None:
        return _figure(f'<div class="na">{_e(note or "input unavailable")}</div>', caption)
    if _kind(x.shape) == "image":
        return _figure(images.img(_input_rgb(x, rng), name, caption), caption, _range_text(x))
    if _kind(x.shape) == "vector":
        return _figure(_svg_bars(x, rng), caption, _range_text(x))
    return _figure(f'<div class="na">no picture for shape {_e(x.shape)}</div>', caption, _range_text(x))


def _scale_legend(images: _Images, vmax_signed: float | None, vmax_width: float | None) -> str:
    out = []
    if vmax_signed is not None:
        bar = images.img(_gradient_bar(lambda t: diverging(2 * t - 1, 1.0)), "scale_signed", "diverging scale",
                         once=True)
        out.append(f'<span class="legend">{_e("−" + _num(vmax_signed))} {bar} {_e("+" + _num(vmax_signed))}'
                   " (signed maps of this input: centre, lower, upper)</span>")
    if vmax_width is not None:
        bar = images.img(_gradient_bar(lambda t: sequential(t, 1.0)), "scale_width", "sequential scale", once=True)
        out.append(f'<span class="legend">0 {bar} {_e(_num(vmax_width))} (bound width upper − lower, '
                   "all engines of this input)</span>")
    nan = "rgb({},{},{})".format(*NAN_COLOUR)
    out.append(f'<span class="legend"><span class="swatch" style="background:{nan}"></span> NaN</span>')
    return '<div class="legends">' + " ".join(out) + "</div>"


# ---------------------------------------------------------------------------------------
# SVG plots

ENGINE_COLOURS = {"ibp": "#d95f02", "crown": "#1b9e77", "alpha-crown": "#7570b3", "combined": "#e7298a"}
_MORE_COLOURS = ["#66a61e", "#e6ab02", "#a6761d", "#666666"]


def _colour(engine: str, order: Sequence[str]) -> str:
    if engine in ENGINE_COLOURS:
        return ENGINE_COLOURS[engine]
    others = [e for e in order if e not in ENGINE_COLOURS]
    return _MORE_COLOURS[others.index(engine) % len(_MORE_COLOURS)] if engine in others else "#333333"


def _svg_bars(x: np.ndarray, rng: tuple[float, float] | None, width: int = 420, height: int = 130) -> str:
    """A 1-D input (tabular features) as a bar chart on its domain."""
    v = np.nan_to_num(np.asarray(x, dtype=np.float64).ravel())
    lo = min(0.0, float(v.min()), rng[0] if rng else 0.0)
    hi = max(0.0, float(v.max()), rng[1] if rng else 0.0)
    hi = hi if hi > lo else lo + 1.0
    ml, mb, mt = 34, 16, 6
    pw, ph = width - ml - 4, height - mb - mt
    y = lambda t: mt + ph * (hi - t) / (hi - lo)  # noqa: E731
    bw = pw / len(v)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="bars">',
             f'<line x1="{ml}" y1="{y(0):.1f}" x2="{ml + pw}" y2="{y(0):.1f}" stroke="#888"/>',
             f'<text x="{ml - 3}" y="{y(hi) + 8:.1f}" text-anchor="end">{_e(_num(hi, 3))}</text>',
             f'<text x="{ml - 3}" y="{y(lo):.1f}" text-anchor="end">{_e(_num(lo, 3))}</text>']
    for i, t in enumerate(v):
        top, bot = sorted((y(t), y(0)))
        parts.append(f'<rect x="{ml + i * bw + bw * 0.1:.1f}" y="{top:.1f}" width="{bw * 0.8:.1f}" '
                     f'height="{max(bot - top, 0.5):.1f}" fill="#4a6fa5"><title>feature {i}: {_e(_num(t))}'
                     "</title></rect>")
    step = max(1, len(v) // 10)
    for i in range(0, len(v), step):
        parts.append(f'<text x="{ml + (i + 0.5) * bw:.1f}" y="{height - 3}" text-anchor="middle">{i}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_intervals(centre: np.ndarray | None, bounds: dict[str, tuple[np.ndarray, np.ndarray]],
                   order: Sequence[str], width: int = 720, height: int = 200) -> str:
    """1-D maps: per feature, each engine's certified interval [lower, upper] as a bar and the
    explanation at the centre as a dot, on one linear scale."""
    vals = [a for lo_up in bounds.values() for a in lo_up] + ([centre] if centre is not None else [])
    fin = np.concatenate([np.asarray(a, np.float64).ravel() for a in vals])
    fin = fin[np.isfinite(fin)]
    if not fin.size:
        return '<div class="na">no finite bounds to plot</div>'
    lo, hi = min(0.0, float(fin.min())), max(0.0, float(fin.max()))
    hi = hi if hi > lo else lo + 1.0
    if bounds:
        n = len(next(iter(bounds.values()))[0])
    else:
        assert centre is not None  # without bounds the centre is all there is to plot (vals is not empty)
        n = len(centre)
    ml, mb, mt, mr = 56, 18, 8, 110
    pw, ph = width - ml - mr, height - mb - mt
    y = lambda t: mt + ph * (hi - min(max(t, lo), hi)) / (hi - lo)  # noqa: E731
    slot = pw / n
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="plot">',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>',
             f'<line x1="{ml}" y1="{y(0):.1f}" x2="{ml + pw}" y2="{y(0):.1f}" stroke="#999" stroke-dasharray="3,3"/>',
             f'<text x="{ml - 4}" y="{mt + 8}" text-anchor="end">{_e(_num(hi, 3))}</text>',
             f'<text x="{ml - 4}" y="{mt + ph}" text-anchor="end">{_e(_num(lo, 3))}</text>']
    engines = [e for e in order if e in bounds]
    bw = slot * 0.8 / max(1, len(engines))
    for k, e in enumerate(engines):
        lower, upper = (np.asarray(a, np.float64).ravel() for a in bounds[e])
        col = _colour(e, order)
        for i in range(n):
            x0 = ml + i * slot + slot * 0.1 + k * bw
            a, b = sorted((y(lower[i]), y(upper[i])))
            parts.append(f'<rect x="{x0:.1f}" y="{a:.1f}" width="{max(bw * 0.9, 1):.1f}" height="{max(b - a, 1):.1f}" '
                         f'fill="{col}" fill-opacity="0.55"><title>{_e(e)} feature {i}: [{_e(_num(lower[i]))}, '
                         f'{_e(_num(upper[i]))}]</title></rect>')
        parts.append(f'<rect x="{ml + pw + 10}" y="{mt + 14 * k}" width="10" height="10" fill="{col}"/>'
                     f'<text x="{ml + pw + 24}" y="{mt + 14 * k + 9}">{_e(e)}</text>')
    if centre is not None:
        c = np.asarray(centre, np.float64).ravel()
        for i in range(n):
            parts.append(f'<circle cx="{ml + (i + 0.5) * slot:.1f}" cy="{y(c[i]):.1f}" r="2.5" fill="#000">'
                         f"<title>centre feature {i}: {_e(_num(c[i]))}</title></circle>")
        k = len(engines)
        parts.append(f'<circle cx="{ml + pw + 15}" cy="{mt + 14 * k + 5}" r="3" fill="#000"/>'
                     f'<text x="{ml + pw + 24}" y="{mt + 14 * k + 9}">centre</text>')
    step = max(1, n // 12)
    for i in range(0, n, step):
        parts.append(f'<text x="{ml + (i + 0.5) * slot:.1f}" y="{height - 4}" text-anchor="middle">{i}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_log_series(series: dict[str, list[float]], labels: Sequence[str], order: Sequence[str], ylabel: str,
                    reference: float | None = None, width: int = 760, height: int = 250) -> str:
    """Per-instance values of several series on a log y axis (decade grid); a value ≤ 0 is
    drawn as a hollow marker on the bottom edge (log scale has no place for it), NaN is left
    out. ``reference`` draws a dashed horizontal line (e.g. ratio 1)."""
    vals = [v for s in series.values() for v in s if v > 0 and math.isfinite(v)]
    if reference is not None:
        vals.append(reference)
    if not vals:
        return '<div class="na">no positive values to plot on a log scale</div>'
    lo_d, hi_d = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
    if hi_d == lo_d:
        hi_d += 1
    n = len(labels)
    ml, mr, mt, mb = 64, 120, 10, 34
    pw, ph = width - ml - mr, height - mt - mb

    def ypos(v: float) -> float:
        return mt + ph * (hi_d - math.log10(v)) / (hi_d - lo_d)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="plot">',
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fff" stroke="#bbb"/>']
    for d in range(lo_d, hi_d + 1):
        yy = ypos(10.0 ** d)
        parts.append(f'<line x1="{ml}" y1="{yy:.1f}" x2="{ml + pw}" y2="{yy:.1f}" stroke="#eee"/>'
                     f'<text x="{ml - 4}" y="{yy + 4:.1f}" text-anchor="end">1e{d}</text>')
    if reference is not None:
        yy = ypos(reference)
        parts.append(f'<line x1="{ml}" y1="{yy:.1f}" x2="{ml + pw}" y2="{yy:.1f}" stroke="#555" '
                     f'stroke-dasharray="5,4"/><text x="{ml + pw + 4}" y="{yy + 4:.1f}">{_e(_num(reference))}</text>')
    step = max(1, n // 20)
    for i in range(0, n, step):
        parts.append(f'<text x="{ml + pw * (i + 0.5) / n:.1f}" y="{mt + ph + 14}" '
                     f'text-anchor="middle">{_e(labels[i])}</text>')
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 4}" text-anchor="middle">input</text>'
                 f'<text x="14" y="{mt + ph / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {mt + ph / 2:.1f})">{_e(ylabel)}</text>')
    for k, (name, s) in enumerate(series.items()):
        col = _colour(name.split(" / ")[0], order)
        # a small horizontal offset per series, so that equal values (e.g. crown = ibp) stay visible
        shift = (k - (len(series) - 1) / 2) * min(5.0, pw / n / (2 * len(series)))

        def xpos(i: int, shift: float = shift) -> float:
            return ml + pw * (i + 0.5) / n + shift

        pts = [(xpos(i), ypos(v)) for i, v in enumerate(s) if v > 0 and math.isfinite(v)]
        if len(pts) > 1:
            parts.append(f'<polyline points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}" fill="none" '
                         f'stroke="{col}" stroke-opacity="0.5"/>')
        for i, v in enumerate(s):
            tip = f"<title>input {_e(labels[i])}, {_e(name)}: {_e(_num(v))}</title>"
            if v > 0 and math.isfinite(v):
                parts.append(f'<circle cx="{xpos(i):.1f}" cy="{ypos(v):.1f}" r="3.5" fill="{col}">{tip}</circle>')
            elif v == 0 or (math.isfinite(v) and v < 0):
                parts.append(f'<circle cx="{xpos(i):.1f}" cy="{mt + ph:.1f}" r="3.5" fill="#fff" stroke="{col}" '
                             f'stroke-width="1.5">{tip}</circle>')
        parts.append(f'<circle cx="{ml + pw + 14}" cy="{mt + 10 + 16 * k}" r="4" fill="{col}"/>'
                     f'<text x="{ml + pw + 22}" y="{mt + 14 + 16 * k}">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------
# Page sections

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222;
background:#fafafa;max-width:1400px}
h1{font-size:22px;margin:0 0 6px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px;background:#fff}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top} th{background:#eef1f5}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.v-certified{background:#d9f2d9} .v-falsified{background:#f8d0d0} .v-unknown{background:#fbeec2}
.v-error{background:#ddd}
.meta{font-size:13px;color:#555} .note{font-size:13px;color:#8a4b00}
figure{display:inline-block;margin:4px 10px 8px 0;vertical-align:top;text-align:center;font-size:12px}
figure img{display:block;margin:0 auto;image-rendering:pixelated;border:1px solid #ccc}
figcaption{max-width:260px} .na{width:112px;height:112px;display:flex;align-items:center;justify-content:center;
border:1px dashed #aaa;color:#777;font-size:12px;padding:4px;box-sizing:border-box}
.instance{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:12px 0}
.row{display:flex;flex-wrap:wrap;align-items:flex-start}
.engine{border-left:3px solid #ccc;padding-left:8px;margin-right:12px}
.legends{font-size:12px;color:#444;margin:4px 0} .legend{margin-right:18px;white-space:nowrap}
.legend img{vertical-align:middle;border:1px solid #ccc}
.swatch{display:inline-block;width:10px;height:10px;vertical-align:middle;border:1px solid #999}
svg text{font-size:11px;fill:#333;font-family:inherit}
.witness{background:#fff7f7;border:1px solid #f0c8c8;border-radius:6px;padding:6px 10px;margin:8px 0}
"""


def _html_page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit code: unknown"
    return f"exit code {code}: {EXIT_MEANING.get(int(code), '?')}"


def _exit_legend() -> str:
    rows = "".join(f"<tr><td class=\"n\">{c}</td><td>{_e(m)}</td></tr>" for c, m in EXIT_MEANING.items())
    return f'<table class="exit"><tr><th>exit code</th><th>meaning</th></tr>{rows}</table>'


def _summary_section(run: _Run) -> str:
    counts = _counts(run)
    code = run.exit_code if run.exit_code is not None else _exit_code(counts)
    rows = []
    for p in run.properties:
        c = counts[p["name"]]
        cells = "".join(f'<td class="n{" v-" + v if c[v] else ""}">{c[v]}</td>' for v in VERDICTS)
        rows.append(f"<tr><td>{_e(p['name'])}</td><td>{_e(p.get('kind') or '')}</td>"
                    f"<td>{_e(p.get('direction') or _threshold_text(p))}</td>{cells}</tr>")
    props = ('<table class="summary" id="summary"><tr><th>property</th><th>kind</th><th>certified when</th>'
             + "".join(f"<th>{v}</th>" for v in VERDICTS) + "</tr>" + "".join(rows) + "</table>")
    stats = _engine_stats(run)
    names = [p["name"] for p in run.properties]
    base = _mean(stats["ibp"]["width"]) if "ibp" in stats else math.nan
    erows = []
    for name in _engine_order(run, stats):
        s = stats[name]
        w = _mean(s["width"])
        ratio = _num(w / base) if base > 0 and name != "ibp" else "–"
        cert = "".join(f'<td class="n">{s["certified"].get(n, 0)}/{s["n"]}</td>' for n in names)
        erows.append(f"<tr><td>{_e(name)}</td><td>{_e(s['guarantee'] or '')}</td><td class=\"n\">{s['n']}</td>"
                     f"<td class=\"n\">{_num(w)}</td><td class=\"n\">{ratio}</td>"
                     f"<td class=\"n\">{_num(_mean(s['max_width']))}</td><td class=\"n\">{_num(_mean(s['time']))}</td>"
                     f"<td class=\"n\">{s['fallbacks']}</td>{cert}</tr>")
    engines = ('<table class="engines"><tr><th>engine</th><th>guarantee</th><th>inputs</th><th>mean width</th>'
               "<th>width / ibp</th><th>mean max width</th><th>time per input (s)</th><th>fallbacks</th>"
               + "".join(f"<th>certified {_e(n)}</th>" for n in names) + "</tr>" + "".join(erows) + "</table>")
    status = ""
    if run.batch:
        st = {s: sum(i.status == s for i in run.instances) for s in ("done", "timeout", "error")}
        status = (f'<p class="meta">instances: {st["done"]} done, {st["timeout"]} timed out (unknown), '
                  f'{st["error"]} crashed (error)</p>')
    errors = sum(1 for i in run.instances if i.doc is not None and i.doc.get("error") is not None)
    return (f'<h2>Summary</h2><p><b>{_e(_exit_text(code))}</b>; {len(run.instances)} inputs'
            f'{f", {errors} failed" if errors else ""}. Counts per property are the best verdict over the '
            "engines (certified if any sound engine certified it; falsified only by a float64 witness).</p>"
            f"{status}{props}<h3>Engines</h3>"
            + (engines if stats else '<p class="meta">no engine results</p>')
            + "<p class=\"meta\">mean width: mean over inputs of the mean of upper − lower over the map; "
              "time per input: bound computation only.</p>" + _exit_legend())


def _threshold_text(p: dict) -> str:
    return "" if p.get("threshold") is None else f"threshold {_num(p['threshold'])}"


def _engine_order(run: _Run, stats: dict) -> list[str]:
    return [m for m in run.methods if m in stats] + [m for m in stats if m not in run.methods]


def _comparison_section(run: _Run) -> str:
    stats = _engine_stats(run)
    order = _engine_order(run, stats)
    insts = [i for i in run.instances if _ok_engines(i)][:2000]
    if not insts:
        return ""
    labels = [str(i.index) for i in insts]
    widths = {e: [_f(_ok_engines(i).get(e, {}).get("mean_width")) for i in insts] for e in order}
    out = ["<h2>Engine comparison: mean bound width per input</h2>",
           _svg_log_series(widths, labels, order, "mean width (log)"),
           '<p class="meta">hollow markers on the bottom edge: width 0 (exact bounds, e.g. every ReLU stable).</p>']
    base = "ibp" if "ibp" in widths else (order[0] if order else None)
    others = [e for e in order if e != base]
    if base is not None and others:
        ratios = {}
        stat_rows = []
        for e in others:
            r = [w / b if b > 0 else math.nan for w, b in zip(widths[e], widths[base], strict=True)]
            ratios[f"{e} / {base}"] = r
            fin = [v for v in r if math.isfinite(v)]
            pos = [v for v in fin if v > 0]
            gm = math.exp(sum(map(math.log, pos)) / len(pos)) if pos else math.nan
            stat_rows.append(f"<tr><td>{_e(e)} / {_e(base)}</td><td class=\"n\">{len(fin)}</td>"
                             f"<td class=\"n\">{_num(float(np.median(fin)) if fin else math.nan)}</td>"
                             f"<td class=\"n\">{_num(gm)}</td><td class=\"n\">{_num(min(fin) if fin else None)}</td>"
                             f"<td class=\"n\">{_num(max(fin) if fin else None)}</td></tr>")
        out += [f"<h3>Width ratio against {_e(base)} (below 1: tighter than {_e(base)})</h3>",
                _svg_log_series(ratios, labels, order, "width ratio (log)", reference=1.0),
                '<table class="ratios"><tr><th>ratio</th><th>inputs</th><th>median</th><th>geometric mean '
                "(ratio &gt; 0)</th><th>min</th><th>max</th></tr>" + "".join(stat_rows) + "</table>"]
    elif base is not None:
        out.append(f'<p class="meta">only {_e(base)} ran: nothing to compare it with '
                   "(add crown to bounds.methods).</p>")
    return "".join(out)


def _verdict_table(run: _Run, inst: _Instance) -> str:
    d = inst.doc or {}
    engines = _ok_engines(inst)
    names = [p["name"] for p in run.properties]
    best = _instance_verdicts(inst, names)
    head = ("<tr><th>property</th><th>certified when</th><th>verdict</th>"
            + "".join(f"<th>{_e(e)}: verdict, certified worst case</th>" for e in engines)
            + "<th>attack: worst value reached</th><th>gap ratio</th></tr>")
    rows = []
    for p in run.properties:
        n = p["name"]
        cells = []
        direction = p.get("direction") or ""
        for e in engines.values():
            pr = next((q for q in e.get("properties") or [] if q.get("name") == n), None)
            if pr is None:
                cells.append("<td>–</td>")
            else:
                direction = direction or pr.get("direction") or ""
                cells.append(_verdict_cell(pr.get("verdict", "unknown"),
                                           f"{pr.get('verdict')} {_num(pr.get('worst_case'))}"))
        a = (d.get("attacks") or {}).get(n)
        if a is None or a.get("value") is None:
            att = "<td>–</td>"
        else:
            # an attack that held proves nothing: only a violation gets a colour
            text = (f"{'violated' if a.get('violated') else 'held'} {_num(a.get('value'))} "
                    f"({a.get('attack')})")
            att = _verdict_cell("falsified", text) if a.get("violated") else f"<td>{_e(text)}</td>"
        g = ((d.get("gap") or {}).get(n) or {}).get("ratio")
        rows.append(f"<tr><td>{_e(n)}</td><td>{_e(direction)}</td>{_verdict_cell(best[n])}{''.join(cells)}"
                    f"{att}<td class=\"n\">{_num(g)}</td></tr>")
    return f'<table class="verdicts">{head}{"".join(rows)}</table>'


def _witness_section(images: _Images, run: _Run, inst: _Instance) -> str:
    out = []
    for prop, where in inst.witnesses.items():
        tag = f"i{inst.index}_{prop}_witness"
        if not isinstance(where, Path):
            out.append(f'<div class="witness"><h3>witness for {_e(prop)}</h3><p class="note">{_e(where)}</p></div>')
            continue
        try:
            w = read_npz(where)
            meta = json.loads(str(w["meta"]))
            if (not isinstance(meta, dict) or meta.get("schema") != WITNESS_SCHEMA
                    or any(k not in w or w[k].dtype.kind not in "fiu" or w[k].size == 0
                           for k in ("x0", "x", "v0", "v"))):
                raise ValueError(f"not a {WITNESS_SCHEMA} file")
            if len({w[k].size for k in ("x0", "x", "v0", "v")}) != 1:
                raise ValueError("its arrays x0, x, v0, v differ in size")
        except _NPZ_ERRORS as e:
            out.append(f'<div class="witness"><h3>witness for {_e(prop)}</h3>'
                       f'<p class="note">cannot read {_e(where)}: {_e(e)}</p></div>')
            continue
        shape = _map_shape(inst) or w["v0"].shape[1:]
        x0, x, v0, v = (_fit(w[k], shape) for k in ("x0", "x", "v0", "v"))
        vmax = _abs_max([v0, v])
        dv, dx = v - v0, x - x0
        figs = [_input_fig(images, x0, None, run.input_range, f"{tag}_x0", "original input x0"),
                _input_fig(images, x, None, run.input_range, f"{tag}_x", "adversarial input x"),
                _signed_fig(images, dx, _abs_max([dx]), f"{tag}_dx", "x − x0 (own scale)"),
                _signed_fig(images, v0, vmax, f"{tag}_v0", "explanation v0 at x0"),
                _signed_fig(images, v, vmax, f"{tag}_v", "explanation v at x"),
                _signed_fig(images, dv, _abs_max([dv]), f"{tag}_dv", "v − v0 (own scale)")]
        sim = meta.get("similarity")
        sim_text = ", ".join(f"{k} {_num(val, 3)}" for k, val in sim.items()) if isinstance(sim, dict) else ""
        raw_layers = meta.get("param_layers")
        layers = [str(n) for n in raw_layers] if isinstance(raw_layers, list) else []
        out.append(
            f'<div class="witness"><h3>witness for {_e(prop)}: {_e(meta.get("direction", ""))} is violated</h3>'
            f'<p class="meta">attack {_e(meta.get("attack"))}: value {_num(meta.get("value"))} (threshold '
            f'{_num(meta.get("threshold"))}), max |x − x0| = {_num(meta.get("max_input_change"))}'
            f'{"; perturbed layers " + _e(", ".join(layers)) if layers else ""}; similarity of v to v0: '
            f'{_e(sim_text) or "–"}.<br>file: {_e(where)} (check it with <code>verigrad replay</code>)</p>'
            f'<div class="row">{"".join(figs)}</div>'
            '<p class="meta">v0 and v share one symmetric scale.</p></div>')
    return "".join(out)


def _map_shape(inst: _Instance) -> tuple[int, ...] | None:
    if "explanation" in inst.maps:
        return tuple(inst.maps["explanation"].shape)
    if inst.x is not None:
        return tuple(inst.x.shape)
    return None


def _fit(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    # witness arrays carry a batch axis of 1: reshape to the per-sample map shape when sizes match
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(shape) if a.size == int(np.prod(shape)) else a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape)


def _instance_section(images: _Images, run: _Run, inst: _Instance) -> str:
    d = inst.doc
    head = f'<div class="instance" id="input-{inst.index}"><h3>input {inst.index}'
    if d is not None:
        head += (f": label {_e(d.get('label'))}, prediction {_e(d.get('prediction'))}, "
                 f"explained class {_e(d.get('target'))}")
    head += "</h3>"
    if inst.seconds is not None:
        head += f'<p class="meta">{_e(inst.status)} in {_num(inst.seconds, 3)} s</p>'
    if d is None:
        return head + f'<p class="note">{_e(inst.status)}: {_e(inst.reason or "no result")}</p></div>'
    if d.get("error") is not None:
        kind = "internal error" if d.get("internal_error") else "error"
        head += f'<p class="note">{kind}: {_e(d["error"])}</p>'
    if inst.x is not None and "explanation" in inst.maps and inst.x.size == inst.maps["explanation"].size:
        inst.x = inst.x.reshape(inst.maps["explanation"].shape)
    centre = inst.maps.get("explanation")
    engines = [e for e in (run.methods + [m for m in (d.get("engines") or {}) if m not in run.methods])
               if f"{e}/lower" in inst.maps and f"{e}/upper" in inst.maps]
    bounds = {e: (np.asarray(inst.maps[f"{e}/lower"], np.float64), np.asarray(inst.maps[f"{e}/upper"], np.float64))
              for e in engines}
    signed = ([centre] if centre is not None else []) + [a for lu in bounds.values() for a in lu]
    vmax = _abs_max(signed) if signed else None
    widths = {e: up - lo for e, (lo, up) in bounds.items()}
    wmax = _abs_max(list(widths.values())) if widths else None
    tag = f"i{inst.index}"
    top = [_input_fig(images, inst.x, inst.x_note, run.input_range, f"{tag}_input", "input")]
    if centre is not None:
        top.append(_signed_fig(images, centre, vmax or 0.0, f"{tag}_explanation", "explanation at the centre"))
        # on the bounds' scale a loose engine washes the map out: show its pattern as well
        top.append(_signed_fig(images, centre, _abs_max([centre]), f"{tag}_explanation_own",
                               "explanation at the centre (own scale)"))
    body = [head, _verdict_table(run, inst)]
    if inst.maps_note:
        body.append(f'<p class="note">{_e(inst.maps_note)}</p>')
    if signed:
        body.append(_scale_legend(images, vmax, wmax))
    body.append(f'<div class="row">{"".join(top)}</div>')
    for e in engines:
        lo, up = bounds[e]
        info = (d.get("engines") or {}).get(e) or {}
        sub = f"{e}" + (f" → {info.get('actual_method')}" if info.get("actual_method") not in (None, e) else "")
        figs = [_signed_fig(images, lo, vmax or 0.0, f"{tag}_{e}_lower", f"{e} lower"),
                _signed_fig(images, up, vmax or 0.0, f"{tag}_{e}_upper", f"{e} upper"),
                _width_fig(images, widths[e], wmax or 0.0, f"{tag}_{e}_width", f"{e} width")]
        body.append(f'<div class="engine" style="border-color:{_colour(e, run.methods)}"><b>{_e(sub)}</b> '
                    f'<span class="meta">mean width {_num(info.get("mean_width"))}, max '
                    f'{_num(info.get("max_width"))}, {_num(info.get("time_s"), 3)} s'
                    f'{"; " + _e("; ".join(info.get("notes") or [])) if info.get("notes") else ""}</span>'
                    f'<div class="row">{"".join(figs)}</div></div>')
    if centre is not None and centre.ndim == 1 and bounds:
        body.append("<h3>certified intervals per feature</h3>" + _svg_intervals(centre, bounds, run.methods))
    body.append(_witness_section(images, run, inst))
    return "".join(body) + "</div>"


def _overview_section(run: _Run, shown: Sequence[_Instance], limit: int = 1000) -> str:
    """One row per input (the first ``limit``): best verdict per property, linked to the
    input's section when it is shown, so the falsified ones can be found among many."""
    names = [p["name"] for p in run.properties]
    ids = {id(i) for i in shown}
    rows = []
    for inst in run.instances[:limit]:
        d = inst.doc or {}
        label = (f'<a href="#input-{inst.index}">{inst.index}</a>' if id(inst) in ids else str(inst.index))
        status = inst.status if inst.doc is None else ("error" if d.get("error") is not None else "done")
        cells = "".join(_verdict_cell(v) for v in _instance_verdicts(inst, names).values())
        rows.append(f'<tr><td class="n">{label}</td><td class="n">{_e(d.get("label", "–"))}</td>'
                    f'<td class="n">{_e(d.get("prediction", "–"))}</td><td>{_e(status)}</td>{cells}</tr>')
    more = len(run.instances) - limit
    return ("<h2>Verdicts per input</h2><table class=\"overview\"><tr><th>input</th><th>label</th>"
            "<th>prediction</th><th>status</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + "</tr>"
            + "".join(rows) + "</table>"
            + (f'<p class="meta">{more} more inputs not listed.</p>' if more > 0 else ""))


def _render_run(run: _Run, images: _Images, shown: Sequence[_Instance], back: str | None = None) -> str:
    ex = run.explanation
    header = [f"<h1>verigrad report: {_e(run.title)}</h1>"]
    if back:
        header.append(f'<p><a href="{_e(back)}">← all specs</a></p>')
    meta = [f"spec {_e(run.source)}", f"sha256 {_e((run.sha256 or '?')[:16])}…"]
    if ex.get("method"):
        meta.append(f"explanation {_e(ex.get('description') or ex['method'])}"
                    + (f" ({_e(ex['guarantee'])})" if ex.get("guarantee") else ""))
    for k, v in (("started", run.started), ("device", run.device), ("dtype", run.dtype)):
        if v:
            meta.append(f"{k} {_e(v)}")
    if run.methods:
        meta.append("engines " + _e(", ".join(run.methods)))
    header.append('<p class="meta">' + " · ".join(meta) + "</p>")
    header += [f'<p class="note">{_e(n)}</p>' for n in run.notes]
    parts = header + [_summary_section(run), _comparison_section(run), _overview_section(run, shown)]
    omitted = len(run.instances) - len(shown)
    parts.append(f"<h2>Inputs ({len(shown)} shown"
                 + (f", {omitted} omitted: raise --max-instances to see them" if omitted else "") + ")</h2>")
    parts.append('<p class="meta">Signed maps (explanation, lower and upper bounds) are blue for negative, white '
                 "for 0, red for positive, on one symmetric scale per input shared by all its signed maps; widths "
                 "(upper − lower) are dark for 0 and yellow for the largest width of the input over all engines. "
                 "The numbers under each picture are its minimum and maximum.</p>")
    parts += [_instance_section(images, run, i) for i in shown]
    return "".join(parts)


def _index_page(runs: Sequence[_Run], links: Sequence[str], summary: dict | None, out: Path) -> str:
    rows = []
    for run, link in zip(runs, links, strict=True):
        counts = _counts(run)
        tot = {v: sum(c[v] for c in counts.values()) for v in VERDICTS}
        st = {s: sum(i.status == s for i in run.instances) for s in ("done", "timeout", "error")}
        cells = "".join(f'<td class="n{" v-" + v if tot[v] else ""}">{tot[v]}</td>' for v in VERDICTS)
        rows.append(f'<tr><td><a href="{_e(link)}">{_e(run.title)}</a></td><td>{_e(run.source)}</td>'
                    f'<td class="n">{len(run.instances)}</td><td class="n">{st["done"]}</td>'
                    f'<td class="n">{st["timeout"]}</td><td class="n">{st["error"]}</td>{cells}'
                    f'<td class="n">{_exit_code(counts)}</td></tr>')
    all_counts = {f"{k}:{n}": c for k, r in enumerate(runs) for n, c in _counts(r).items()}
    code = (summary or {}).get("exit_code", _exit_code(all_counts))
    table = ('<table class="summary" id="summary"><tr><th>spec</th><th>file</th><th>inputs</th><th>done</th>'
             "<th>timed out</th><th>crashed</th>" + "".join(f"<th>{v}</th>" for v in VERDICTS)
             + "<th>exit code</th></tr>" + "".join(rows) + "</table>")
    note = ("" if summary is not None else
            f'<p class="note">no {_e(out / "summary.json")}: the batch may not have finished; counts are from '
            "results.jsonl</p>")
    return (f"<h1>verigrad batch report</h1><p class=\"meta\">{_e(out)}</p>{note}"
            f"<p><b>{_e(_exit_text(code))}</b>. Verdict counts are over inputs × properties.</p>"
            f"{table}{_exit_legend()}")


# ---------------------------------------------------------------------------------------
# Entry point


def _write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ReportError(f"{path}: cannot write the report ({e})") from None


def _check_writable(page: Path) -> None:
    """ReportError naming ``page`` unless it (and its ``_files`` folder beside it) can be
    written: checked before anything is rendered, so a bad ``--html`` costs no work."""
    if page.is_dir():
        raise ReportError(f"{page}: cannot write the report there (it is a directory; expected an .html file path)")
    folder = page.with_name(page.stem + "_files")
    if folder.exists() and not folder.is_dir():
        raise ReportError(f"{page}: cannot write the report's pictures to {folder} (it is a file, expected a folder)")
    parent = page.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ReportError(f"{page}: cannot write the report there ({parent} is a file, not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ReportError(f"{page}: cannot write the report there ({parent} is not writable)")
    if page.exists() and not os.access(page, os.W_OK):
        raise ReportError(f"{page}: cannot write the report there (the file is not writable)")


def write_report(results_path: str | Path, html_path: str | Path | None = None, *, max_instances: int = 20,
                 bounds_npz: str | Path | None = None) -> list[Path]:
    """Write the HTML report of ``results_path`` and return the pages written.

    ``results_path`` is a ``verigrad verify`` results JSON (its bound maps are read from
    ``bounds_npz``, by default the ``.npz`` of the same stem beside it) or a ``verigrad
    batch`` output directory (or its ``results.jsonl``). ``html_path`` defaults to
    ``<results stem>.html`` beside a JSON and ``OUT/report.html`` for a batch directory.

    A page shows: a summary table (per property the counts of certified / falsified /
    unknown / error, per engine the mean width and time per input, the exit code and its
    meaning); the mean width per input per engine and the ratio of each engine to IBP as
    log-scale SVG plots; and for the first ``max_instances`` inputs the input, the
    explanation at the centre, each engine's certified lower / upper maps and bound width,
    every property's verdict with its certified worst case, and every witness (original and
    adversarial input and explanation). A batch with several specs gets one page per spec
    (``<html stem>_<spec>.html``) and an index page at ``html_path`` linking to them; the
    first returned path is the page to open. The PNGs of each page are also written to
    ``<page stem>_files/``.

    Raises:
        ReportError: ``results_path`` is missing or not verigrad results, or a page cannot
            be written.
    """
    src = Path(results_path)
    if not src.exists():
        raise ReportError(f"{src}: no such file or directory (expected a verigrad results JSON or a batch "
                          "output directory)")
    if max_instances < 0:
        raise ReportError(f"max_instances must be >= 0, got {max_instances}")
    if src.is_file() and src.name == "results.jsonl":
        src = src.parent
    if src.is_dir():
        runs = _load_batch(src)
        out = Path(html_path) if html_path is not None else src / "report.html"
        summary = None
        try:
            summary = json.loads((src / "summary.json").read_text())
        except (OSError, ValueError):
            pass
    else:
        run, factory = _load_json(src, Path(bounds_npz) if bounds_npz is not None else None)
        runs = [(run, factory)]
        out = Path(html_path) if html_path is not None else src.with_suffix(".html")

    _check_writable(out)
    if len(runs) > 1:
        for run, _ in runs:
            _check_writable(out.with_name(f"{out.stem}_{run.title}.html"))

    def page(run: _Run, factory: Callable[[], Any], path: Path, back: str | None) -> None:
        shown = run.instances[:max_instances]
        for inst in shown:
            _load_maps(inst)
        _attach_inputs(run, factory, [i for i in shown if i.doc is not None])
        images = _Images(path.with_name(path.stem + "_files"))
        _write(path, _html_page(f"verigrad report: {run.title}", _render_run(run, images, shown, back)))

    if len(runs) == 1:
        page(*runs[0], out, None)
        return [out]
    pages = [out.with_name(f"{out.stem}_{run.title}.html") for run, _ in runs]
    _write(out, _html_page("verigrad batch report", _index_page([r for r, _ in runs], [p.name for p in pages],
                                                                  summary, src)))
    for (run, factory), path in zip(runs, pages, strict=True):
        page(run, factory, path, out.name)
    return [out, *pages]
