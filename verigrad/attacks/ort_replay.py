"""``verigrad replay --onnxruntime``: a witness re-checked by an independent runtime.

The way VNN-COMP checks a counterexample: nothing of verigrad's own network code is trusted
for the explanation. On top of the checks of ``verigrad replay`` (same input, same class,
inside the box, violated in float64 autograd), the witness must pass these:

1. **forward**: onnxruntime (CPU provider) runs the ONNX file in float32 on the witness's
   point; its logits must agree with verigrad's float64 forward of the loaded network
   (tolerance ``FORWARD_RTOL · max(1, max|z|)``, float32 rounding).
2. **explanation**: the gradient g = ∂o/∂x of the spec's scalar o (the class's logit, the
   cross-entropy loss or the softmax probability, computed in float64 from onnxruntime's
   logits) by central finite differences through onnxruntime, on a float64 copy of the
   model (initializers, Constant/Cast nodes and the input/output types cast to double). The
   step is h_i = 1e-6·max(1, |x_i|) (rounded so that x ± h is exact); where onnxruntime has
   no double kernel for an op of the model (e.g. Conv, Softplus on the CPU provider) the
   float32 model is used instead, with h_i = ε₃₂^(1/3)·max(1, |x_i|) ≈ 5e-3·max(1, |x_i|),
   and the result says so. Each gradient is computed with h and h/2: the h/2 estimate is
   used, |g_h − g_{h/2}| plus a rounding term 2·ε·(|o(x+h)| + |o(x−h)|)/(2h) is its error
   estimate E. The explanation (saliency g, x ⊙ g, or integrated gradients from g at each
   path point) must match the witness's stored v within 2E.
3. **value**: the property's metric recomputed from the finite-difference explanations at
   x0 and at the witness; its tolerance is the spread of the metric when both explanations
   move by ±E (four sign patterns) plus |value_h − value_{h/2}|. The value must agree with the
   witness's claimed value within that tolerance,
4. **violated**: and violate the property by more than it.

Parameter-box witnesses (modified weights) are supported: the witness's weights and biases
are written into an in-memory copy of the ONNX model as new initializers of the node whose
name is the layer's (Gemm with alpha = beta = 1, or Conv), after checking that the original
initializers are exactly the weights verigrad loaded for that layer; a layer whose weights
verigrad changed while loading (a folded BatchNormalization, a MatMul + Add) is refused (a
UserError, exit 2), as is a model that is not an ONNX file and a smoothing explanation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from verigrad import properties as props
from verigrad.attacks.witness import WitnessError, load_witness
from verigrad.errors import UserError
from verigrad.properties import Direction

INSTALL_HINT = "pip install onnxruntime (or pip install verigrad[onnxruntime])"
FD_REL_STEP_FLOAT64 = 1e-6
# float32: the rounding noise of o (measured, see fd_gradient) over h against the ReLU kinks that a
# larger step crosses; 2e-3 measured best on the shipped CNNs (ε₃₂^(1/3) ≈ 5e-3 crosses too many kinks)
FD_REL_STEP_FLOAT32 = 2e-3
# rounding noise of a float32 o, in units of its measured float32-vs-float64 error at x and x0
NOISE_SAFETY = 4.0
FORWARD_RTOL = 1e-4
# points per onnxruntime call (times the per-sample size, elements)
_CHUNK_ELEMENTS = 1 << 22


class OnnxRuntimeMissing(UserError):
    """``--onnxruntime`` without onnxruntime installed."""


def import_onnxruntime() -> Any:
    """The onnxruntime module, or OnnxRuntimeMissing (exit 2) with the install line."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxRuntimeMissing(f"replay --onnxruntime needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it passed, the numbers."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class OrtReplayResult:
    """The checks of ``verigrad replay`` (``base``, a :class:`verigrad.verify.ReplayResult`)
    followed by the onnxruntime checks; confirmed when all pass."""

    base: Any
    checks: tuple[Check, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def confirmed(self) -> bool:
        return bool(self.base.confirmed) and all(c.ok for c in self.checks)


# ------------------------------------------------------------------------------------------
# the ONNX model as onnxruntime runs it

def _model_path(path: str | Path, spec: dict) -> Path:
    model = spec.get("model")
    raw = model.get("path") if isinstance(model, dict) else None
    if not isinstance(raw, str) or not raw:
        raise WitnessError(f"{path}: witness meta 'spec.model.path' is {raw!r}, expected the model file")
    p = Path(raw)
    if p.suffix.lower() != ".onnx":
        raise UserError(f"{path}: model {p} is not an ONNX file: onnxruntime replay needs an ONNX model "
                        "(replay without --onnxruntime re-checks it in verigrad)")
    return p


def _logits_name(model: Any, output: str | int | None, source: str) -> str:
    """The graph tensor verigrad explains: the chosen output, or the input of a final Softmax
    (which verigrad's loader strips too)."""
    names = [o.name for o in model.graph.output]
    if output is None:
        name = names[0] if len(names) == 1 else None
    elif isinstance(output, int):
        name = names[output] if -len(names) <= output < len(names) else None
    else:
        name = output if output in names else None
    if name is None:
        raise UserError(f"{source}: cannot choose the logits among the outputs {names} (model.output {output!r})")
    for n in model.graph.node:
        if name in n.output and n.op_type == "Softmax":
            return str(n.input[0])
    return name


def _data_input(model: Any, source: str) -> Any:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"{source}: onnxruntime replay needs one data input, the model has {[i.name for i in inputs]}")
    return inputs[0]


def _with_output(model: Any, name: str) -> Any:
    """A copy of ``model`` whose only graph output is tensor ``name`` (type float, shape free)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if [o.name for o in m.graph.output] != [name]:
        del m.graph.output[:]
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return m


def to_double(model: Any) -> Any:
    """A float64 copy of a float32 ONNX model: float initializers, Constant / ConstantOfShape
    values, Cast-to-float targets and the float types of inputs, outputs and value_info."""
    import onnx
    from onnx import AttributeProto, TensorProto, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)

    def cast(t: Any) -> None:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    def walk(g: Any) -> None:
        for init in g.initializer:
            cast(init)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
                vi.type.tensor_type.elem_type = TensorProto.DOUBLE
        for n in g.node:
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.DOUBLE
                elif a.type == AttributeProto.TENSOR:
                    cast(a.t)
                elif a.type == AttributeProto.GRAPH:
                    walk(a.g)

    walk(m.graph)
    onnx.checker.check_model(m)
    return m


def write_params(model: Any, net: Any, params: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 source: str) -> Any:
    """A copy of ``model`` with the weights and biases of ``params`` (verigrad's layout: Linear
    (out, in), Conv (out, in, kh, kw)) as new initializers of the nodes named like the layers.
    UserError where a layer cannot be mapped onto its node's initializers exactly."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    nodes = {n.name: n for n in g.node if n.name}
    taken = set(inits) | {t for n in g.node for t in list(n.input) + list(n.output)}

    def refuse(layer: str, why: str) -> UserError:
        return UserError(f"{source}: onnxruntime replay cannot write the witness's parameters of layer {layer!r} "
                         f"into the ONNX model: {why} (replay without --onnxruntime re-checks it in verigrad)")

    def fresh(base: str) -> str:
        name, k = f"{base}/verigrad_witness", 1
        while name in taken:
            name, k = f"{base}/verigrad_witness_{k}", k + 1
        taken.add(name)
        return name

    for layer, (wt, bs) in params.items():
        node = nodes.get(layer)
        if node is None or node.op_type not in ("Gemm", "Conv"):
            what = "no node of that name" if node is None else f"node of op {node.op_type}"
            raise refuse(layer, f"{what} (supported: Gemm, Conv)")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        transpose = node.op_type == "Gemm" and not attrs.get("transB", 0)
        if node.op_type == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            raise refuse(layer, "Gemm with alpha or beta != 1")
        w_init = inits.get(node.input[1])
        b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        b_init = inits.get(b_name) if b_name else None
        if w_init is None or (b_name and b_init is None):
            raise refuse(layer, "its weight or bias is not an initializer")
        base = net.affine_layer(layer)
        w_net = base.weight.detach().cpu().numpy()
        b_net = base.bias.detach().cpu().numpy()
        w0 = numpy_helper.to_array(w_init).astype(np.float64)
        b0 = numpy_helper.to_array(b_init).astype(np.float64) if b_init is not None else np.zeros_like(b_net)
        if not (np.array_equal(w0.T if transpose else w0, w_net) and b0.size == b_net.size
                and np.array_equal(b0.reshape(-1), b_net)):
            raise refuse(layer, "its initializers are not the weights verigrad loaded for it (verigrad folded "
                                "another node into it)")
        dtype = numpy_helper.to_array(w_init).dtype
        w_new = wt.detach().cpu().numpy()
        w_new = (w_new.T if transpose else w_new).astype(dtype)
        b_new = bs.detach().cpu().numpy().astype(dtype)
        w_out = fresh(node.input[1])
        g.initializer.append(numpy_helper.from_array(w_new, w_out))
        node.input[1] = w_out
        b_out = fresh(b_name or f"{layer}/bias")
        g.initializer.append(numpy_helper.from_array(b_new.reshape(b0.shape if b_init is not None else (-1,)), b_out))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = b_out
    onnx.checker.check_model(m)
    return m


class _Runner:
    """One onnxruntime session: float64 points (n, *S) in, float64 logits (n, C) out; the
    spec's input normalization is applied first; points go in the model's dtype in chunks
    (padded to a fixed batch size where the file fixes one)."""

    def __init__(self, ort: Any, model: Any, dtype: type, normalization: tuple[np.ndarray, np.ndarray] | None):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        self.session = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self.fixed = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        self.dtype = dtype
        self.normalization = normalization

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.normalization is not None:
            mean, std = self.normalization
            x = (x - mean) / std
        x = x.astype(self.dtype)
        per = max(1, _CHUNK_ELEMENTS // max(1, math.prod(x.shape[1:])))
        step = self.fixed or per
        outs = []
        for s in range(0, len(x), step):
            part = x[s:s + step]
            n = len(part)
            if self.fixed and n < self.fixed:
                part = np.concatenate([part, np.repeat(part[-1:], self.fixed - n, axis=0)])
            (z,) = self.session.run(None, {self.input: part})
            outs.append(np.asarray(z, np.float64).reshape(len(part), -1)[:n])
        return np.concatenate(outs)


def _normalization(spec: dict, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    norm = spec.get("model", {}).get("normalization")
    if not norm:
        return None
    mean = np.asarray(norm["mean"], np.float64).reshape(-1)
    std = np.asarray(norm["std"], np.float64).reshape(-1)
    per = (1, -1) + (1,) * (len(shape) - 1)  # per channel (dim 1 of a batch)
    return (mean.reshape(per) if mean.size > 1 else mean, std.reshape(per) if std.size > 1 else std)


# ------------------------------------------------------------------------------------------
# finite differences

def scalar_output(z: np.ndarray, target: int, output: str) -> np.ndarray:
    """The explained scalar o of logits z (n, C) in float64: z_c, the cross-entropy
    −log softmax(z)_c, or softmax(z)_c."""
    z = z.astype(np.float64)
    zmax = z.max(axis=1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(axis=1, keepdims=True)))[:, 0]
    if output == "logit":
        return z[:, target]
    if output == "loss":
        return lse - z[:, target]
    return np.exp(z[:, target] - lse)


@dataclass(frozen=True)
class FDGradient:
    """Central-difference gradients at several points: the h/2 estimate, the h one, and the
    error estimate |g_h − g_{h/2}| + rounding."""

    g: np.ndarray
    g_h: np.ndarray
    err: np.ndarray


def fd_gradient(f: Callable[[np.ndarray], np.ndarray], points: np.ndarray, rel_step: float, eps: float,
                model_dtype: type, noise: float = 0.0) -> FDGradient:
    """∂f/∂x at each of ``points`` (m, *S) (f: (n, *S) → (n,)), by central differences with
    h_i = rel_step·max(1, |x_i|) and h_i/2; each step is the exact difference of the two
    evaluation points after rounding them to the model's dtype. The rounding term of the
    error is (2·ε·(|o(x+h)| + |o(x−h)|) + 2·noise) / (2h): ``noise`` is an absolute noise level
    of f's values (measured for a float32 model)."""
    m, shape = points.shape[0], points.shape[1:]
    d = math.prod(shape)
    flat = points.reshape(m, d).astype(np.float64)
    per = max(1, _CHUNK_ELEMENTS // (2 * d))  # coordinates per call
    est = []
    for scale in (1.0, 0.5):
        g, rnd = np.empty((m, d)), np.empty((m, d))
        for k in range(m):
            x = flat[k]
            h = scale * rel_step * np.maximum(1.0, np.abs(x))
            for s in range(0, d, per):
                idx = np.arange(s, min(d, s + per))
                plus, minus = np.repeat(x[None], len(idx), 0), np.repeat(x[None], len(idx), 0)
                rows = np.arange(len(idx))
                plus[rows, idx] += h[idx]
                minus[rows, idx] -= h[idx]
                plus = plus.astype(model_dtype).astype(np.float64)
                minus = minus.astype(model_dtype).astype(np.float64)
                step = plus[rows, idx] - minus[rows, idx]
                o = f(np.concatenate([plus, minus]).reshape(2 * len(idx), *shape))
                op, om = o[: len(idx)], o[len(idx):]
                g[k, idx] = (op - om) / step
                rnd[k, idx] = (2.0 * eps * (np.abs(op) + np.abs(om)) + 2.0 * noise) / step
        est.append((g, rnd))
    (g_h, _), (g2, rnd2) = est
    return FDGradient(g2.reshape(points.shape), g_h.reshape(points.shape),
                      (np.abs(g_h - g2) + rnd2).reshape(points.shape))


@dataclass(frozen=True)
class FDExplanation:
    """The explanation from the h/2 gradients, the one from the h gradients, its error estimate."""

    v: np.ndarray
    v_h: np.ndarray
    err: np.ndarray


def fd_explanation(problem: Any, f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, rel_step: float,
                   eps: float, model_dtype: type, noise: float = 0.0) -> FDExplanation:
    """The spec's explanation at x (1, *S) from finite-difference gradients: saliency g,
    input_x_gradient x ⊙ g, integrated gradients (x − b) ⊙ Σ_k w_k g(b + α_k (x − b))."""
    from verigrad.explanations import ExplanationMethod, ig_nodes

    ex = problem.explainer
    if ex.method == ExplanationMethod.SALIENCY:
        r = fd_gradient(f, x, rel_step, eps, model_dtype, noise)
        return FDExplanation(r.g, r.g_h, r.err)
    if ex.method == ExplanationMethod.INPUT_X_GRADIENT:
        r = fd_gradient(f, x, rel_step, eps, model_dtype, noise)
        return FDExplanation(x * r.g, x * r.g_h, np.abs(x) * r.err)
    if ex.method == ExplanationMethod.INTEGRATED_GRADIENTS:
        alpha, w = ig_nodes(ex.rule, ex.steps)
        b = ex.baseline_like(torch.as_tensor(x, dtype=torch.float64)).cpu().numpy()
        shape = (len(alpha),) + (1,) * (x.ndim - 1)
        path = b + alpha.reshape(shape) * (x - b)
        r = fd_gradient(f, path, rel_step, eps, model_dtype, noise)
        ws = w.reshape(shape)
        return FDExplanation((x - b) * (ws * r.g).sum(0, keepdims=True), (x - b) * (ws * r.g_h).sum(0, keepdims=True),
                             np.abs(x - b) * (ws * r.err).sum(0, keepdims=True))
    raise UserError(f"onnxruntime replay supports the saliency, input_x_gradient and integrated_gradients "
                    f"explanations, not {ex.method.value}")


def _metric(prop: Any, v0: np.ndarray, v: np.ndarray) -> float:
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    return float(props.metric(prop, t(v0), t(v))[0])


def value_with_tolerance(prop: Any, e0: FDExplanation, e: FDExplanation) -> tuple[float, float]:
    """The metric of the FD explanations and its tolerance: |value_h − value_{h/2}| plus the
    largest change of the metric when v0 and v move by ±their error estimates."""
    value = _metric(prop, e0.v, e.v)
    spread = abs(_metric(prop, e0.v_h, e.v_h) - value)
    moved = [abs(_metric(prop, e0.v + s0 * e0.err, e.v + s * e.err) - value) for s0 in (1, -1) for s in (1, -1)]
    tol = spread + max(moved)
    return value, (tol if math.isfinite(tol) else math.inf)


# ------------------------------------------------------------------------------------------
# the replay

def _fmt(v: float) -> str:
    return f"{v:.6g}"


def replay_onnxruntime(path: str | Path) -> OrtReplayResult:
    """Re-check the witness at ``path`` with ``verigrad replay``'s checks, then through
    onnxruntime (see the module docstring). UserError (exit 2): onnxruntime missing, a model
    that is not ONNX, parameters that cannot be written into the model, an unsupported
    explanation; the witness's own structure errors as in ``verigrad replay``."""
    ort = import_onnxruntime()
    import onnx

    from verigrad.graph.gradient_graph import Output, logits
    from verigrad.spec import spec_from_dict
    from verigrad.verify import prepare, replay

    w = load_witness(path)
    model_path = _model_path(path, w.spec)
    base = replay(str(path))  # structure and consistency errors (exit 2) come from here
    spec = spec_from_dict({**w.spec, "data": {**w.spec["data"], "start": w.index, "end": w.index + 1},
                           "bounds": {**w.spec["bounds"], "dtype": "float64"}},
                          source=f"{path} (embedded spec)")
    problem = prepare(spec, methods=())
    prop = next(p for p in problem.properties if p.name == w.property)
    net = problem.net.to(device="cpu")
    source = model_path.name
    model = onnx.load(str(model_path))
    _data_input(model, source)
    model = _with_output(model, _logits_name(model, spec.model.output, source))
    model_w = write_params(model, net, w.params, source) if w.params else model
    norm = _normalization(w.spec, tuple(w.x.shape[1:]))
    notes: list[str] = []
    checks: list[Check] = []

    # (b) forward in float32 against verigrad's float64 forward
    x = w.x.numpy()
    try:
        run32 = _Runner(ort, model_w, np.float32, norm)
    except Exception as err:  # noqa: BLE001 - onnxruntime's own errors name no common base
        raise UserError(f"{source}: onnxruntime cannot load the model ({type(err).__name__}: "
                        f"{'; '.join(str(err).splitlines())})") from None
    z_ort = run32(x)
    with torch.no_grad():
        z_net = logits(net, w.x, {n: (a, b) for n, (a, b) in w.params.items()} or None).numpy()
    diff = float(np.abs(z_ort - z_net).max()) if z_ort.shape == z_net.shape else math.inf
    tol = FORWARD_RTOL * max(1.0, float(np.abs(z_net).max()))
    checks.append(Check("forward", diff <= tol,
                        f"onnxruntime {ort.__version__} float32 logits vs verigrad float64: max |Δ| = {_fmt(diff)} "
                        f"(tolerance {_fmt(tol)})"))

    output, target = Output(spec.explanation.output).value, w.target
    # (c) the explanations by central differences, float64 where onnxruntime can
    dtype: type = np.float64
    try:
        run0, run = _Runner(ort, to_double(model), np.float64, norm), _Runner(ort, to_double(model_w), np.float64, norm)
        rel, eps, prec = FD_REL_STEP_FLOAT64, float(np.finfo(np.float64).eps), "float64"
        noise = 0.0
    except Exception as err:  # noqa: BLE001 - typically NOT_IMPLEMENTED: no double kernel for an op
        reason = "; ".join(str(err).splitlines()).split(" : ")[-1][:200]
        run0, run = _Runner(ort, model, np.float32, norm), run32
        rel, eps, dtype, prec = FD_REL_STEP_FLOAT32, float(np.finfo(np.float32).eps), np.float32, "float32"
        # o's rounding noise: NOISE_SAFETY times its float32 error at x and x0, measured
        with torch.no_grad():
            z0_net = logits(net, w.x0).numpy()
        o_err = max(float(np.abs(scalar_output(z_ort, target, output) - scalar_output(z_net, target, output))[0]),
                    float(np.abs(scalar_output(run0(w.x0.numpy()), target, output)
                                 - scalar_output(z0_net, target, output))[0]))
        o_mag = float(np.abs(scalar_output(z_net, target, output))[0])
        noise = NOISE_SAFETY * max(o_err, eps * max(1.0, o_mag))
        notes.append(f"onnxruntime has no float64 version of an op of the model ({reason}): finite differences "
                     f"in float32 with h = {rel:.2g}·max(1, |x|), rounding noise of o taken as {noise:.2g}")
    f0 = lambda pts: scalar_output(run0(pts), target, output)  # noqa: E731
    f = lambda pts: scalar_output(run(pts), target, output)  # noqa: E731
    ex0 = fd_explanation(problem, f0, w.x0.numpy(), rel, eps, dtype, noise)
    ex = fd_explanation(problem, f, x, rel, eps, dtype, noise)
    v_stored = w.v.numpy().reshape(ex.v.shape)
    dv = np.abs(ex.v - v_stored)
    within = bool(np.all(dv <= 2 * ex.err + 1e-12 * (1 + np.abs(v_stored))))
    checks.append(Check("explanation", within,
                        f"{problem.explainer.method.value} by central differences ({prec}, h = {rel:.2g}·max(1, |x|) "
                        f"and h/2) vs the stored v: max |Δ| = {_fmt(float(dv.max()))}, FD error estimate "
                        f"max {_fmt(float(ex.err.max()))}"))

    # (d) the property from the FD explanations
    value, vtol = value_with_tolerance(prop, ex0, ex)
    agrees = math.isfinite(value) and abs(value - w.value) <= vtol + 1e-12 * max(1.0, abs(w.value))
    checks.append(Check("value", agrees, f"{prop.name} from the FD explanations: {_fmt(value)} ± {_fmt(vtol)} "
                                         f"(claimed {_fmt(w.value)})"))
    at_most = prop.rule.direction == Direction.AT_MOST
    margin = (value - prop.threshold) if at_most else (prop.threshold - value)
    violated = math.isfinite(value) and margin > vtol
    checks.append(Check("violated", violated, f"property {props.direction_text(prop)} violated by {_fmt(margin)} "
                                              f"({'>' if violated else 'not >'} the tolerance {_fmt(vtol)})"))
    return OrtReplayResult(base, tuple(checks), tuple(notes))
