"""ONNX → :class:`~verigrad.models.network.Network`, parsing the graph with the ``onnx`` package.

The graph is a DAG: every data tensor (the graph input and whatever is computed from it) is
followed, may feed several nodes, and becomes the input of the network nodes that read it.
Nodes whose inputs are all constants (initializers, ``Constant``, and the ``Shape`` of a data
tensor, whose per-sample part is known) are evaluated here with numpy in two "worlds" with
different batch sizes, which is how the batch arithmetic of ``x.view(x.size(0), -1)`` is
resolved and how a reshape that would mix samples is caught.

One output is lowered: the only one, or the one chosen with ``output`` (a name or an index
into ``graph.output``); nodes that do not feed it are pruned. A ``Softmax`` over the classes
producing that output is stripped (its input are the logits) and recorded in ``Network.notes``.

Lowering, node by node (tested with torch's legacy and dynamo exporters):

* Gemm, MatMul (+ a following Add/Sub of a constant, folded into the bias) → Linear
* Conv (2-D, no dilation, one group, symmetric pads) → Conv2d
* AveragePool / GlobalAveragePool / ReduceMean over (H, W) → a fixed Conv2d with diagonal
  weights 1/(kh·kw)
* MaxPool (2-D, no dilation) → MaxPool
* Flatten, Reshape, Squeeze, Unsqueeze (per sample) → Reshape; Transpose (batch kept first) →
  Transpose; Pad (constant mode) → Pad
* Relu, LeakyRelu, Sigmoid, Tanh, Softplus, PRelu → Activation / PReLU; torch's
  Mul(β)→Softplus→Div(β) and the dynamo exporter's threshold branch
  Where(Greater(β·x, threshold), x, Softplus(β·x)/β) → Activation(softplus, β): we certify the
  exact softplus, which differs from the threshold branch by < log(1 + e^−threshold)/β
* BatchNormalization → folded into the Conv/Gemm it directly follows when nothing else reads
  that output (exact), else a fixed per-channel affine node
* Add/Sub/Mul/Div by a scalar or per-channel constant → a fixed per-channel affine node
  (``<node>/normalize`` at the graph input, ``<node>/affine`` elsewhere); consecutive ones
  are merged into one node
* Add/Sub of two computed tensors → Add/Sub; Concat of computed tensors → Concat
* Identity, Dropout (inference), Cast to float/double → nothing

Every tensor of the result is float64, built exactly from the file's values (float32 values
convert exactly): derived constants (BatchNorm scale/shift and folding, normalization
constants, Gemm α/β, pooling weights) are computed in float64, and float hyperparameters are
the values stored in the file (BatchNorm ε = 9.99999974738e-06 for torch's 1e-5), so the
network is a float64 evaluation of the file's graph. Cast with ``Network.to``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from verigrad.models.network import (
    INPUT,
    ActKind,
    Activation,
    Add,
    AffineLayer,
    Concat,
    Conv2d,
    Layer,
    Linear,
    MaxPool,
    ModelError,
    Network,
    Pad,
    PReLU,
    Reshape,
    Sub,
    Transpose,
    check_loaded,
    named_error,
    one_line,
)

F64 = torch.float64

# ---------------------------------------------------------------------------------------
# Helpers shared with the torch loader: fixed (synthesised) layers and exact folding.
# ---------------------------------------------------------------------------------------


def bn_scale_shift(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm in inference mode as y = s·x + t: s = γ/sqrt(var+eps), t = β − mean·s
    (in float64)."""
    s = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    return s, np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * s


def fold_channel_affine(layer: AffineLayer, scale: np.ndarray, shift: np.ndarray) -> AffineLayer:
    """The affine layer followed by y = s·x + t per output channel, as one layer (exact up to
    float64 rounding): W' = s·W (row-wise), b' = s·b + t. For BatchNorm this is
    b' = (b − mean)·s + β. Everything else of the layer (name, inputs, stride, …) is kept."""
    w64, b64 = layer.weight.detach().double(), layer.bias.detach().double()
    s = torch.as_tensor(np.asarray(scale, np.float64), dtype=torch.float64, device=w64.device)
    t = torch.as_tensor(np.asarray(shift, np.float64), dtype=torch.float64, device=w64.device)
    w = (w64 * s.reshape(-1, *([1] * (w64.dim() - 1)))).to(layer.weight.dtype)
    b = (b64 * s + t).to(layer.bias.dtype)
    return dataclasses.replace(layer, weight=w, bias=b)


def channel_affine_layer(
    name: str, scale: np.ndarray, shift: np.ndarray, shape: Sequence[int], dtype: torch.dtype
) -> AffineLayer:
    """A fixed layer y = s·x + t per channel: a 1x1 Conv2d with diagonal weights for a
    (C, H, W) input, a diagonal Linear for a flat (n,) one. ``perturbable=False``."""
    shape = tuple(shape)
    c = shape[0]
    s = torch.as_tensor(np.broadcast_to(np.asarray(scale, np.float64), (c,)).copy())
    t = torch.as_tensor(np.broadcast_to(np.asarray(shift, np.float64), (c,)).copy())
    if len(shape) == 3:
        w = torch.diag(s).reshape(c, c, 1, 1)
        return Conv2d(name, w.to(dtype), t.to(dtype), perturbable=False)
    if len(shape) == 1:
        return Linear(name, torch.diag(s).to(dtype), t.to(dtype), perturbable=False)
    raise ModelError(
        f"layer {name!r}: a per-channel affine map needs an input of shape (C, H, W) or (n,), "
        f"got {shape}"
    )


def avgpool_layer(
    name: str,
    channels: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dtype: torch.dtype,
) -> Conv2d:
    """AvgPool (zero padding counted in the divisor) as a fixed Conv2d: weight[c, c] = 1/(kh·kw)."""
    kh, kw = kernel
    w = torch.zeros(channels, channels, kh, kw, dtype=torch.float64)
    idx = torch.arange(channels)
    w[idx, idx] = 1.0 / (kh * kw)
    return Conv2d(name, w.to(dtype), torch.zeros(channels, dtype=dtype), stride, padding, perturbable=False)


# ---------------------------------------------------------------------------------------
# The ONNX graph walker.
# ---------------------------------------------------------------------------------------


def _exact(v: float | np.ndarray) -> float:
    """A scalar hyperparameter as the exact value stored in the file (a float32 attribute or
    constant converts exactly to float64: 0.1 is 0.10000000149011612)."""
    return float(np.asarray(v).reshape(-1)[0])


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _str_attr(a: dict, key: str, default: str) -> str:
    v = a.get(key, default)
    return v.decode() if isinstance(v, bytes) else str(v)


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


_MANY = 1 << 30
# (fewest, most) inputs of the standard ops the walker reads (the first ``fewest`` may not be
# empty) and the attributes it needs; checked for every node before the walk relies on them
_ARITY: dict[str, tuple[int, int]] = {
    "Gemm": (2, 3), "MatMul": (2, 2), "Conv": (2, 3), "AveragePool": (1, 1), "GlobalAveragePool": (1, 1),
    "ReduceMean": (1, 2), "MaxPool": (1, 1), "Flatten": (1, 1), "Reshape": (2, 2), "Squeeze": (1, 2),
    "Unsqueeze": (1, 2), "Transpose": (1, 1), "Pad": (1, 4), "Concat": (1, _MANY), "Relu": (1, 1),
    "LeakyRelu": (1, 1), "Softplus": (1, 1), "Sigmoid": (1, 1), "Tanh": (1, 1), "PRelu": (2, 2),
    "BatchNormalization": (5, 5), "Add": (2, 2), "Sub": (2, 2), "Mul": (2, 2), "Div": (2, 2), "Neg": (1, 1),
    "Identity": (1, 1), "Dropout": (1, 3), "Cast": (1, 1), "Softmax": (1, 1), "LogSoftmax": (1, 1),
    "Shape": (1, 1), "Size": (1, 1), "Constant": (0, 0), "Gather": (2, 2), "Slice": (1, 5), "Expand": (2, 2),
    "Abs": (1, 1), "Sqrt": (1, 1), "Max": (1, _MANY), "Min": (1, _MANY), "Equal": (2, 2), "Less": (2, 2),
    "Greater": (2, 2), "Not": (1, 1), "Where": (3, 3), "Range": (3, 3), "Mod": (2, 2), "ConstantOfShape": (1, 1),
}
_REQUIRED_ATTRS: dict[str, tuple[str, ...]] = {
    "AveragePool": ("kernel_shape",), "MaxPool": ("kernel_shape",), "Concat": ("axis",), "Cast": ("to",),
}


def _structure_problem(node: onnx.NodeProto) -> str | None:
    """What is wrong with a node's inputs, outputs or required attributes (None if nothing):
    the one check of the arity and attribute presence every handler relies on."""
    if not any(node.output):
        return "has no outputs"
    if node.domain not in ("", "ai.onnx"):
        return None  # refused as an unsupported op if the output needs it
    arity = _ARITY.get(node.op_type)
    if arity is not None:
        lo, hi = arity
        n = len(node.input)
        if not lo <= n <= hi or not all(node.input[:lo]):
            want = f"{lo}" if lo == hi else (f"at least {lo}" if hi == _MANY else f"{lo} to {hi}")
            got = [str(x) for x in node.input]
            return f"expects {want} input{'s' if hi != 1 else ''}, got {n} {got}"
    names = {a.name for a in node.attribute}
    missing = [k for k in _REQUIRED_ATTRS.get(node.op_type, ()) if k not in names]
    if missing:
        return f"the required attribute {missing[0]!r} is missing"
    return None


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal arrays, NaN equal to NaN (a NaN weight is the same in both batch worlds)."""
    try:
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    except TypeError:
        return bool(np.array_equal(a, b))


@dataclass(eq=False)
class _Val:
    """A data tensor: the output of network node ``src`` (or the input), optionally followed by
    a pending per-channel affine map y = scale·x + shift (elementwise constant ops are merged
    there and materialised as one fixed node when something else reads the tensor)."""

    src: str
    shape: tuple[int, ...]
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    label: str = ""  # the node that started the pending map (names the fixed node)
    foldable: bool = False  # src is a user Linear/Conv2d a following channel affine may fold into
    names: list[str] = field(default_factory=list)  # ONNX tensors that are this value


@dataclass
class _SoftplusPattern:
    """torch's exports of nn.Softplus(β, threshold) around one ONNX Softplus node."""

    data: str  # the softplus input x
    result: str  # the tensor that equals softplus_β(x) (up to the threshold branch)
    beta: float
    threshold: float | None
    label: str  # the Softplus node's label
    nodes: frozenset[int]


class _Walker:
    """One pass over the (topologically sorted) nodes that feed the chosen output."""

    def __init__(self, model: onnx.ModelProto, input_shape: Sequence[int] | None, source: str,
                 output: str | int | None = None) -> None:
        self.source = source
        g = model.graph
        self.graph = g
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.consts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for init in g.initializer:
            a = numpy_helper.to_array(init)
            self.consts[init.name] = (a, a)
        self.notes: list[str] = []
        self.out_name = self._choose_output(output)
        self.nodes = list(g.node)
        self.producer: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            problem = _structure_problem(n)
            if problem:
                raise ModelError(f"{source}: node {_node_label(n, i)!r} ({n.op_type}): {problem}")
            for o in n.output:
                if o:
                    self.producer[o] = i
        self._check_output_source()
        self.softmax: tuple[str, int] | None = None  # a stripped final Softmax: (label, axis)
        self._strip_softmax()
        self.keep = self._needed(self.out_name)
        inputs = [i for i in g.input if i.name not in self.consts]
        read = {n for i in self.keep for n in self.nodes[i].input} | {self.out_name}
        used = [i for i in inputs if i.name in read]
        if len(used) != 1:
            what = "no graph input" if not used else f"{len(used)} graph inputs {[i.name for i in used]}"
            raise ModelError(
                f"{source}: output {self.out_name!r} depends on {what}; verigrad needs a single data input"
            )
        inp = used[0]
        self.input_name = inp.name
        self.input_shape = self._input_shape(inp, input_shape)
        tt = inp.type.tensor_type
        batch = tt.shape.dim[0].dim_value if tt.shape.dim[0].HasField("dim_value") else None
        # Two "worlds" with different batch sizes: shape arithmetic evaluated in both shows
        # whether a Reshape keeps the batch dimension apart. A fixed batch size in the file
        # means the graph was traced for that size only, and both worlds use it.
        self.batches: tuple[int, int] = (batch, batch) if batch is not None and batch > 0 else (2, 3)
        self.vals: dict[str, _Val] = {}
        self._new_val(inp.name, INPUT, self.input_shape)
        self.layers: list[Layer] = []
        self.index: dict[str, int] = {}  # network node name → position in self.layers
        self.shapes: dict[str, tuple[int, ...]] = {INPUT: self.input_shape}
        self.names: set[str] = {INPUT}
        # readers of each tensor among the kept nodes (Shape/Size only read the shape, which
        # folding keeps), the chosen output counting as one
        self.nconsumers: dict[str, int] = {self.out_name: 1}
        self.consumers: dict[str, list[int]] = {}
        for i in self.keep:
            n = self.nodes[i]
            for name in n.input:
                if not name:
                    continue
                self.consumers.setdefault(name, []).append(i)
                if n.op_type not in ("Shape", "Size"):
                    self.nconsumers[name] = self.nconsumers.get(name, 0) + 1
        self.skip: set[int] = set()
        # Constant nodes up front: patterns look ahead at constants that the node order
        # defines only later
        for i in self.keep:
            n = self.nodes[i]
            if n.op_type == "Constant":
                self.eval_const(n, _node_label(n, i))
                self.skip.add(i)
        self.patterns: dict[int, _SoftplusPattern] = {}
        for i in self.keep:
            if self.nodes[i].op_type == "Softplus":
                p = self._softplus_pattern(i)
                if p is not None:
                    for k in p.nodes:
                        self.patterns[k] = p

    # -- setup -------------------------------------------------------------------------
    def _choose_output(self, output: str | int | None) -> str:
        names = [o.name for o in self.graph.output]
        if not names:
            raise ModelError(f"{self.source}: the graph has no outputs (expected one output, the logits)")
        if output is None:
            if len(names) != 1:
                raise ModelError(
                    f"{self.source}: the graph has {len(names)} outputs {names}; pass model.output "
                    "(an output name or index) to choose the logits"
                )
            return names[0]
        if isinstance(output, (int, np.integer)) and not isinstance(output, bool):
            if not -len(names) <= int(output) < len(names):
                raise ModelError(f"{self.source}: output index {output} out of range for the outputs {names}")
            return names[int(output)]
        if output not in names:
            raise ModelError(f"{self.source}: no graph output named {output!r}; the outputs are {names}")
        return str(output)

    def _check_output_source(self) -> None:
        """The chosen output must be computed by a node (or be the graph input)."""
        name = self.out_name
        if name in self.producer:
            return
        if name in self.consts:
            raise ModelError(f"{self.source}: output {name!r} is an initializer (a constant), not computed from "
                             "the input")
        if name not in {i.name for i in self.graph.input}:
            raise ModelError(f"{self.source}: output {name!r} is not produced by any node (nor is it a graph input)")

    def _strip_softmax(self) -> None:
        i = self.producer.get(self.out_name)
        if i is None:
            return
        n = self.nodes[i]
        label = _node_label(n, i)
        if n.op_type == "LogSoftmax":
            raise ModelError(
                f"{self.source}: the output {self.out_name!r} is a LogSoftmax (node {label!r}); verigrad "
                "explains logits or probabilities: export the model without the final LogSoftmax "
                "(explanation.output: loss explains the cross-entropy −log p)"
            )
        if n.op_type == "Softmax":
            self.softmax = (label, int(_attrs(n).get("axis", 1 if self.opset < 13 else -1)))
            self.out_name = n.input[0]

    def _needed(self, out: str) -> list[int]:
        need, stack, keep = {out}, [out], set()
        while stack:
            t = stack.pop()
            i = self.producer.get(t)
            if i is None or i in keep:
                continue
            keep.add(i)
            for name in self.nodes[i].input:
                if name and name not in need:
                    need.add(name)
                    stack.append(name)
        return sorted(keep)

    def _input_shape(self, inp: onnx.ValueInfoProto, input_shape: Sequence[int] | None) -> tuple[int, ...]:
        source = self.source
        tt = inp.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        if len(dims) < 2:
            raise ModelError(
                f"{source}: input {inp.name!r} has shape {dims}; expected a batch dimension "
                "followed by the per-sample shape"
            )
        declared = dims[1:]
        if input_shape is not None:
            shape = tuple(int(s) for s in input_shape)
            if len(shape) != len(declared) or any(
                isinstance(d, int) and d > 0 and d != s for d, s in zip(declared, shape, strict=True)
            ):
                raise ModelError(
                    f"{source}: input_shape {shape} does not match the model's declared "
                    f"per-sample input shape {tuple(declared)} (input {inp.name!r}, batch "
                    "dimension dropped)"
                )
            return shape
        if not all(isinstance(d, int) and d > 0 for d in declared):
            raise ModelError(
                f"{source}: input {inp.name!r} has symbolic per-sample dims "
                f"{tuple(declared)}; pass input_shape"
            )
        return tuple(int(d) for d in declared)

    # -- errors ------------------------------------------------------------------------
    def err(self, node: onnx.NodeProto, label: str, msg: str) -> ModelError:
        return ModelError(f"{self.source}: node {label!r} ({node.op_type}): {msg}")

    # -- values, naming, emission ------------------------------------------------------
    def _new_val(self, tensor: str, src: str, shape: tuple[int, ...], **kw) -> _Val:
        v = _Val(src, tuple(int(s) for s in shape), names=[tensor], **kw)
        self.vals[tensor] = v
        return v

    def alias(self, tensor: str, v: _Val) -> None:
        """``tensor`` is the same value as ``v`` (Identity, Dropout, a no-op reshape, a fold)."""
        self.vals[tensor] = v
        v.names.append(tensor)

    def unique(self, name: str) -> str:
        base, k = name, 1
        while name in self.names:
            name = f"{base}_{k}"
            k += 1
        self.names.add(name)
        return name

    def emit(self, layer: Layer, ins: Sequence[str], node: onnx.NodeProto | None = None,
             label: str = "") -> tuple[int, ...]:
        """Append ``layer`` reading the network tensors ``ins``; returns its output shape."""
        layer = layer.renamed(inputs=tuple(ins))
        try:
            shape = tuple(int(s) for s in layer.out_shape([self.shapes[n] for n in ins]))
        except ModelError as e:
            if node is None:
                raise
            raise self.err(node, label, str(e)) from None
        self.index[layer.name] = len(self.layers)
        self.layers.append(layer)
        self.shapes[layer.name] = shape
        return shape

    def emit_out(self, node: onnx.NodeProto, label: str, layer: Layer, ins: Sequence[str],
                 foldable: bool = False) -> None:
        """Emit ``layer`` and make it the value of the node's first output."""
        shape = self.emit(layer, ins, node, label)
        self._new_val(node.output[0], layer.name, shape, foldable=foldable)

    def use(self, tensor: str) -> str:
        """The network tensor holding ``tensor``, materialising a pending affine map."""
        v = self.vals[tensor]
        if v.scale is not None:
            assert v.shift is not None  # a pending map sets scale and shift together
            suffix = "normalize" if v.src == INPUT else "affine"
            try:
                layer = channel_affine_layer(self.unique(f"{v.label}/{suffix}"), v.scale, v.shift, v.shape, F64)
            except ModelError as e:
                raise ModelError(f"{self.source}: {e}") from None
            self.emit(layer, [v.src])
            v.src, v.scale, v.shift, v.foldable = layer.name, None, None, False
        return v.src

    def _exclusive(self, v: _Val) -> bool:
        """Exactly one node reads the value (aliases created by pass-through nodes discounted)."""
        return sum(self.nconsumers.get(n, 0) for n in v.names) - (len(v.names) - 1) == 1

    def channel_affine(self, node: onnx.NodeProto, label: str, data: str, scale: np.ndarray,
                       shift: np.ndarray, fold_ok: bool) -> None:
        """out = scale·data + shift per channel: folded into the Linear/Conv2d that produced
        ``data`` when ``fold_ok`` and nothing else reads it (bias Add after MatMul, BatchNorm
        after Conv/Gemm), else merged into the value's pending affine map."""
        v = self.vals[data]
        c = v.shape[0]
        scale = np.broadcast_to(np.asarray(scale, np.float64), (c,)).copy()
        shift = np.broadcast_to(np.asarray(shift, np.float64), (c,)).copy()
        if fold_ok and v.foldable and v.scale is None and self._exclusive(v):
            k = self.index[v.src]
            producer = self.layers[k]
            assert isinstance(producer, (Linear, Conv2d))  # foldable: src is a user Linear/Conv2d
            self.layers[k] = fold_channel_affine(producer, scale, shift)
            self.alias(node.output[0], v)
            return
        s0: np.ndarray
        t0: np.ndarray
        if v.scale is None:
            s0, t0, name = np.ones(c), np.zeros(c), label
        else:
            assert v.shift is not None  # a pending map sets scale and shift together
            s0, t0, name = v.scale, v.shift, v.label
        # s2·(s1·x + t1) + t2
        self._new_val(node.output[0], v.src, v.shape, scale=scale * s0, shift=scale * t0 + shift, label=name)

    # -- constants ---------------------------------------------------------------------
    def const(self, name: str, node: onnx.NodeProto, label: str) -> np.ndarray:
        """A batch-independent constant input (weights, shapes without the batch size)."""
        if name not in self.consts:
            raise self.err(node, label, f"needs a constant for input {name!r}")
        a, b = self.consts[name]
        if a.shape != b.shape or not _same(a, b):
            raise self.err(node, label, f"input {name!r} depends on the batch size")
        if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
            n_nan, n_pos, n_neg = int(np.isnan(a).sum()), int(np.sum(a == np.inf)), int(np.sum(a == -np.inf))
            kinds = ", ".join(f"{k} {w}" for k, w in ((n_nan, "NaN"), (n_pos, "+inf"), (n_neg, "-inf")) if k)
            n = n_nan + n_pos + n_neg
            raise self.err(node, label, f"input {name!r} has {n} non-finite value{'s' if n != 1 else ''} of "
                                        f"{a.size} ({kinds}); expected finite parameters")
        return a

    def opt_const(self, node: onnx.NodeProto, label: str, k: int) -> np.ndarray | None:
        """Optional constant input k (None when absent or empty)."""
        if len(node.input) > k and node.input[k]:
            return self.const(node.input[k], node, label)
        return None

    @staticmethod
    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.array(a, dtype=np.float64))

    def channel_vector(self, c: np.ndarray, shape: tuple[int, ...], node: onnx.NodeProto, label: str) -> np.ndarray:
        """A constant broadcast against a (B, *shape) tensor, as one value per channel
        (dim 0 of the per-sample shape); per-element constants are refused."""
        c = np.asarray(c, np.float64)
        if c.ndim == len(shape) + 1:
            if c.shape[0] != 1:
                raise self.err(node, label, f"constant of shape {c.shape} varies over the batch")
            c = c[0]
        try:
            if np.broadcast_shapes(c.shape, shape) != shape:
                raise ValueError
            full = np.broadcast_to(c, shape)
        except ValueError:
            raise self.err(node, label, f"constant of shape {c.shape} does not broadcast to the data shape {shape}") from None
        per = full.reshape(shape[0], -1)
        if not np.all(per == per[:, :1]):
            raise self.err(node, label, f"only scalar or per-channel constants are supported, got one of shape "
                                        f"{c.shape} for data of shape {shape}")
        return per[:, 0].copy()

    # -- the walk ----------------------------------------------------------------------
    def run(self) -> Network:
        for i in self.keep:
            if i in self.skip:
                continue
            node = self.nodes[i]
            label = _node_label(node, i)
            if i in self.patterns:
                self._emit_softplus(self.patterns[i])
                continue
            ins = [n for n in node.input if n]
            unknown = [n for n in ins if n not in self.vals and n not in self.consts]
            if unknown:
                raise ModelError(
                    f"{self.source}: node {label!r} ({node.op_type}) reads {unknown[0]!r}, which no "
                    "earlier node produced in a form verigrad follows"
                )
            data_ins = [n for n in ins if n in self.vals]
            if node.op_type in ("Shape", "Size") and data_ins:
                self.shape_of(node, data_ins[0])
                continue
            if not data_ins:
                self.eval_const(node, label)
                continue
            handler = _HANDLERS.get(node.op_type)
            if handler is None:
                raise ModelError(
                    f"{self.source}: unsupported ONNX op {node.op_type!r} at node {label!r} "
                    f"(supported: {', '.join(sorted(_HANDLERS))}, and constant shape arithmetic)"
                )
            extra = [o for o in node.output[1:] if o and (o in self.consumers or o == self.out_name)]
            if extra:
                raise self.err(node, label, f"its output {extra[0]!r} is used; only the first output of a "
                                            "data node is supported")
            try:
                handler(self, node, i, label)
            except (IndexError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
                # a malformed node that no explicit check above caught: still named, one line
                raise self.err(node, label, f"malformed node ({type(e).__name__}: {one_line(e)})") from e
            except ValueError as e:
                if isinstance(e, ModelError):
                    raise
                raise self.err(node, label, f"malformed node ({type(e).__name__}: {one_line(e)})") from e
        if self.out_name not in self.vals:
            raise ModelError(f"{self.source}: output {self.out_name!r} does not depend on the input {self.input_name!r}")
        return self._finish(self.use(self.out_name))

    def _finish(self, out: str) -> Network:
        if out == INPUT:
            raise ModelError(f"{self.source}: output {self.out_name!r} is the input itself: the network has no layers")
        # only what feeds the output (a node read only through Shape is dropped)
        need = {out}
        keep: list[Layer] = []
        for layer in reversed(self.layers):
            if layer.name in need:
                keep.append(layer)
                need.update(layer.inputs)
        layers = keep[::-1]
        # logits are flattened by Network.forward anyway, so a trailing reshape is a no-op
        while len(layers) > 1 and isinstance(layers[-1], Reshape) and layers[-1].inputs[0] != INPUT:
            layers.pop()
        if self.softmax is not None:
            label, axis = self.softmax
            shape = self.vals[self.out_name].shape  # the Softmax's input
            rank = len(shape) + 1
            ax = axis + rank if axis < 0 else axis
            # opset < 13 softmaxes the flattened dims from `axis` on; from 13, along `axis` only
            over_classes = ax == 1 and (self.opset < 13 or all(d == 1 for d in shape[1:]))
            if ax == len(shape) and all(d == 1 for d in shape[:-1]):
                over_classes = True
            if not over_classes:
                raise ModelError(
                    f"{self.source}: the final Softmax at node {label!r} (axis={axis}) is not over the classes of "
                    f"logits of shape {shape}"
                )
            self.notes.append(
                f"final Softmax at node {label!r} stripped: the logits are its input "
                "(explanation.output: probability explains the probabilities)"
            )
        return Network(tuple(layers), self.input_shape, self.source, tuple(self.notes))

    def shape_of(self, node: onnx.NodeProto, data: str) -> None:
        per = self.vals[data].shape
        a = _attrs(node)

        def value(b: int) -> np.ndarray:  # the node's output in the world of batch size b
            if node.op_type == "Size":
                return np.array(b * math.prod(per), np.int64)
            return np.array([b, *per], np.int64)[a.get("start", 0) : a.get("end", None)]

        self.consts[node.output[0]] = (value(self.batches[0]), value(self.batches[1]))

    def eval_const(self, node: onnx.NodeProto, label: str) -> None:
        fn = _CONST_OPS.get(node.op_type)
        if fn is None:
            raise ModelError(
                f"{self.source}: unsupported ONNX op {node.op_type!r} at node {label!r} on constant "
                f"inputs (supported there: {', '.join(sorted(_CONST_OPS))})"
            )
        a = _attrs(node)
        worlds = []
        for w in range(2):
            args = [self.consts[n][w] if n else None for n in node.input]
            try:
                worlds.append(fn(args, a))
            except ModelError as e:
                raise ModelError(f"{self.source}: node {label!r} ({node.op_type}): {e}") from e
            except Exception as e:  # numpy errors on malformed constant subgraphs
                raise ModelError(f"{self.source}: cannot evaluate constant node {label!r} ({node.op_type}): {one_line(e)}") from e
        self.consts[node.output[0]] = (np.asarray(worlds[0]), np.asarray(worlds[1]))

    def data_input(self, node: onnx.NodeProto, label: str, k: int = 0) -> _Val:
        """Input k, which must be a data tensor (and the only one, besides constants)."""
        if len(node.input) <= k or node.input[k] not in self.vals:
            raise self.err(node, label, f"the data must be input {k}")
        others = [n for j, n in enumerate(node.input) if j != k and n in self.vals]
        if others:
            raise self.err(node, label, f"reads the computed tensors {[node.input[k], *others]}; only input {k} "
                                        "may be computed, the others must be constants")
        return self.vals[node.input[k]]

    # -- data-node handlers ------------------------------------------------------------
    def h_passthrough(self, node: onnx.NodeProto, i: int, label: str) -> None:
        v = self.data_input(node, label)
        if node.op_type == "Dropout":
            mode = self.opt_const(node, label, 2)
            if mode is not None and bool(np.asarray(mode).reshape(-1)[0]):
                raise self.err(node, label, "training_mode=1 is not supported (export the model in eval mode)")
        if node.op_type == "Cast":
            to = _attrs(node).get("to")
            if to not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
                raise self.err(node, label, f"a cast of data to {onnx.TensorProto.DataType.Name(to)} is not supported")
        self.alias(node.output[0], v)

    def h_gemm(self, node: onnx.NodeProto, i: int, label: str) -> None:
        a = _attrs(node)
        v = self.data_input(node, label)
        if a.get("transA", 0):
            raise self.err(node, label, "transA=1 would mix the batch dimension")
        if len(v.shape) != 1:
            raise self.err(node, label, f"needs flat input, got shape {v.shape}")
        b = self.const(node.input[1], node, label).astype(np.float64)
        if b.ndim != 2:
            raise self.err(node, label, f"weight {node.input[1]!r} must be 2-D, got shape {b.shape}")
        b = b.T if a.get("transB", 0) else b  # (in, out)
        out = b.shape[1]
        w = _exact(a.get("alpha", 1.0)) * b.T
        bias = np.zeros(out)
        c = self.opt_const(node, label, 2)
        if c is not None:
            try:
                bias = _exact(a.get("beta", 1.0)) * np.broadcast_to(np.asarray(c, np.float64), (1, out)).reshape(out)
            except ValueError:
                raise self.err(node, label, f"bias of shape {c.shape} for {out} outputs") from None
        src = self.use(node.input[0])
        self.emit_out(node, label, Linear(self.unique(label), self.tensor(w), self.tensor(bias)), [src], foldable=True)

    def h_matmul(self, node: onnx.NodeProto, i: int, label: str) -> None:
        v = self.data_input(node, label)
        if len(v.shape) != 1:
            raise self.err(node, label, f"needs flat input, got shape {v.shape}")
        w = self.const(node.input[1], node, label)
        if w.ndim != 2:
            raise self.err(node, label, f"weight {node.input[1]!r} must be 2-D, got shape {w.shape}")
        # the bias of a following Add is folded in by h_elementwise
        src = self.use(node.input[0])
        layer = Linear(self.unique(label), self.tensor(w.T), torch.zeros(w.shape[1], dtype=F64))
        self.emit_out(node, label, layer, [src], foldable=True)

    def h_conv(self, node: onnx.NodeProto, i: int, label: str) -> None:
        a = _attrs(node)
        self.data_input(node, label)
        w = self.const(node.input[1], node, label)
        if w.ndim != 4:
            raise self.err(node, label, f"only 2-D convolutions are supported, weight {w.shape}")
        if "kernel_shape" in a and [int(k) for k in a["kernel_shape"]] != list(w.shape[2:]):
            raise self.err(node, label, f"kernel_shape {list(a['kernel_shape'])} does not match the weight "
                                        f"{node.input[1]!r} of shape {w.shape}")
        self._dilations(node, label, a)
        if a.get("group", 1) != 1:
            raise self.err(node, label, f"group={a['group']} is not supported")
        pads = self._sym_pads(node, label, a)
        strides = self._strides(node, label, a)
        bias = self.opt_const(node, label, 2)
        bias = np.zeros(w.shape[0]) if bias is None else bias
        if bias.shape != (w.shape[0],):
            raise self.err(node, label, f"bias {node.input[2]!r} of shape {bias.shape} for {w.shape[0]} output "
                                        f"channels (expected ({w.shape[0]},))")
        src = self.use(node.input[0])
        layer = Conv2d(self.unique(label), self.tensor(w), self.tensor(bias), strides, pads)
        self.emit_out(node, label, layer, [src], foldable=True)

    def _two(self, node: onnx.NodeProto, label: str, values: Sequence[int], what: str,
             key: str = "") -> tuple[int, int]:
        """A 2-D attribute (kernel_shape, strides) as a pair of ints; ``what``: the error otherwise.
        With ``key`` (the attribute's name) both must be ≥ 1."""
        v = tuple(int(x) for x in values)
        if len(v) != 2:
            raise self.err(node, label, f"{what}, got {key or 'attribute'} {list(v)}" if key else what)
        if key and min(v) < 1:
            raise self.err(node, label, f"{key} {list(v)} must be positive")
        return v[0], v[1]

    def _strides(self, node: onnx.NodeProto, label: str, a: dict) -> tuple[int, int]:
        strides = a.get("strides", [1, 1])
        return self._two(node, label, strides, "only 2-D strides are supported", "strides")

    def _kernel(self, node: onnx.NodeProto, label: str, a: dict) -> tuple[int, int]:
        return self._two(node, label, a["kernel_shape"], "only 2-D pooling is supported", "kernel_shape")

    def _dilations(self, node: onnx.NodeProto, label: str, a: dict) -> None:
        d = [int(x) for x in a.get("dilations", [1, 1])]
        if len(d) != 2:
            raise self.err(node, label, f"dilations {d} must have 2 values (2-D)")
        if any(x != 1 for x in d):
            raise self.err(node, label, f"dilations {d} are not supported (need 1)")

    def _pads4(self, node: onnx.NodeProto, label: str, a: dict) -> list[int]:
        auto = _str_attr(a, "auto_pad", "NOTSET")
        if auto not in ("NOTSET", "VALID"):
            raise self.err(node, label, f"auto_pad={auto} is not supported (only NOTSET and VALID)")
        pads = [int(p) for p in a.get("pads", [0, 0, 0, 0])] if auto == "NOTSET" else [0, 0, 0, 0]
        if len(pads) != 4:
            raise self.err(node, label, f"only 2-D pads are supported, got {pads}")
        if min(pads) < 0:
            raise self.err(node, label, f"negative pads {pads} are not supported")
        return pads

    def _sym_pads(self, node: onnx.NodeProto, label: str, a: dict) -> tuple[int, int]:
        pads = self._pads4(node, label, a)
        if pads[0] != pads[2] or pads[1] != pads[3]:
            raise self.err(node, label, f"only symmetric 2-D pads are supported, got {pads}")
        return pads[0], pads[1]

    def _spatial(self, node: onnx.NodeProto, label: str) -> _Val:
        v = self.data_input(node, label)
        if len(v.shape) != 3:
            raise self.err(node, label, f"needs input (C, H, W), got {v.shape}")
        return v

    def h_avgpool(self, node: onnx.NodeProto, i: int, label: str) -> None:
        v = self._spatial(node, label)
        a = _attrs(node)
        kernel: tuple[int, int]
        strides: tuple[int, int]
        pads: tuple[int, int]
        if node.op_type == "GlobalAveragePool":
            kernel, strides, pads = (v.shape[1], v.shape[2]), (1, 1), (0, 0)  # v: (C, H, W)
        else:
            kernel = self._kernel(node, label, a)
            if a.get("ceil_mode", 0):
                raise self.err(node, label, "ceil_mode=1 is not supported")
            self._dilations(node, label, a)
            pads = self._sym_pads(node, label, a)
            # ONNX's default count_include_pad is 0: the divisor near a padded border is then
            # not 1/(kh·kw), which a fixed conv cannot express
            if any(pads) and not a.get("count_include_pad", 0):
                raise self.err(node, label, "padding with count_include_pad=0 is not supported")
            strides = self._strides(node, label, a)
        layer = avgpool_layer(self.unique(f"{label}/avgpool"), v.shape[0], kernel, strides, pads, F64)
        # a fixed pooling layer: never fold a following BN/Add into it
        self.emit_out(node, label, layer, [self.use(node.input[0])])

    def h_reducemean(self, node: onnx.NodeProto, i: int, label: str) -> None:
        v = self.data_input(node, label)
        a = _attrs(node)
        const_axes = self.opt_const(node, label, 1)
        axes: list[int] | None = (
            [int(x) for x in np.asarray(const_axes).reshape(-1)] if const_axes is not None else a.get("axes"))
        rank = len(v.shape) + 1
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                self.alias(node.output[0], v)
                return
            axes = list(range(rank))
        norm = sorted({ax + rank if ax < 0 else ax for ax in axes})
        if norm != [2, 3] or rank != 4:
            raise self.err(node, label, f"ReduceMean over axes {list(axes)} of a tensor of per-sample shape {v.shape} "
                                        "is not supported (only the spatial axes [2, 3] of an (N, C, H, W) tensor)")
        pool = avgpool_layer(self.unique(f"{label}/avgpool"), v.shape[0], (v.shape[1], v.shape[2]), (1, 1), (0, 0), F64)
        if a.get("keepdims", 1):
            self.emit_out(node, label, pool, [self.use(node.input[0])])
            return
        self.emit(pool, [self.use(node.input[0])], node, label)
        self.emit_out(node, label, Reshape(self.unique(label), (v.shape[0],)), [pool.name])

    def h_maxpool(self, node: onnx.NodeProto, i: int, label: str) -> None:
        self._spatial(node, label)
        a = _attrs(node)
        kernel = self._kernel(node, label, a)
        self._dilations(node, label, a)
        p = self._pads4(node, label, a)  # ONNX order [top, left, bottom, right], as MaxPool's
        strides = self._strides(node, label, a)
        layer = MaxPool(self.unique(label), kernel, strides, (p[0], p[1], p[2], p[3]), bool(a.get("ceil_mode", 0)))
        self.emit_out(node, label, layer, [self.use(node.input[0])])

    def h_flatten(self, node: onnx.NodeProto, i: int, label: str) -> None:
        v = self.data_input(node, label)
        axis = _attrs(node).get("axis", 1)
        rank = len(v.shape) + 1
        if (axis + rank if axis < 0 else axis) != 1:
            raise self.err(node, label, f"axis={axis} would mix the batch dimension")
        self._reshape(node, label, v, (math.prod(v.shape),))

    def h_reshape(self, node: onnx.NodeProto, i: int, label: str) -> None:
        v = self.data_input(node, label)
        if node.input[1] not in self.consts:
            raise self.err(node, label, "the target shape must be constant")
        allowzero = _attrs(node).get("allowzero", 0)
        per_sample = []
        for b, target in zip(self.batches, self.consts[node.input[1]], strict=True):
            full = (b, *v.shape)
            dims = [int(t) for t in np.asarray(target).reshape(-1)]
            if any(t < -1 for t in dims) or dims.count(-1) > 1:
                raise self.err(node, label, f"target shape {dims} is invalid (dims must be ≥ -1, at most one -1)")
            if any(t == 0 and k >= len(full) and not allowzero for k, t in enumerate(dims)):
                raise self.err(node, label, f"target shape {dims} copies (0) a dimension that the input "
                                            f"{tuple(full)} does not have")
            out = [full[k] if (t == 0 and not allowzero) else t for k, t in enumerate(dims)]
            if out.count(-1) == 1:
                known = math.prod(d for d in out if d != -1)
                if not known or math.prod(full) % known:
                    raise self.err(node, label, f"cannot reshape the input {tuple(full)} ({math.prod(full)} values) "
                                                f"to {dims}")
                out[out.index(-1)] = math.prod(full) // known
            if out and out[0] == b and math.prod(out) != math.prod(full):
                raise self.err(node, label, f"cannot reshape the input {tuple(full)} ({math.prod(full)} values) "
                                            f"to {dims}")
            if not out or out[0] != b or math.prod(out) != math.prod(full):
                raise self.err(node, label, f"target {dims} does not keep the batch dimension of input {tuple(full)} "
                                            "separate (only per-sample reshapes are supported)")
            per_sample.append(tuple(out[1:]))
        if per_sample[0] != per_sample[1]:
            raise self.err(node, label, "the per-sample shape depends on the batch size")
        self._reshape(node, label, v, per_sample[0])

    def h_squeeze(self, node: onnx.NodeProto, i: int, label: str) -> None:
        """Squeeze / Unsqueeze of data: evaluated on zero-stride dummies of both worlds."""
        v = self.data_input(node, label)
        fn = _c_squeeze if node.op_type == "Squeeze" else _c_unsqueeze
        a = _attrs(node)
        per_sample = []
        for b in self.batches:
            args: list = [np.broadcast_to(np.zeros((), np.int8), (b, *v.shape))]
            if len(node.input) > 1 and node.input[1]:
                args.append(self.const(node.input[1], node, label))
            try:
                out = fn(args, a).shape
            except Exception as e:
                raise self.err(node, label, f"cannot apply to per-sample shape {v.shape}: {e}") from None
            if not out or out[0] != b or math.prod(out[1:]) != math.prod(v.shape):
                raise self.err(node, label, f"would mix the batch dimension: {(b, *v.shape)} → {tuple(out)}")
            per_sample.append(tuple(out[1:]))
        if per_sample[0] != per_sample[1]:
            raise self.err(node, label, "the per-sample shape depends on the batch size")
        self._reshape(node, label, v, per_sample[0])

    def _reshape(self, node: onnx.NodeProto, label: str, v: _Val, shape: tuple[int, ...]) -> None:
        shape = tuple(int(s) for s in shape)
        if shape == v.shape:  # a no-op reshape is left out
            self.alias(node.output[0], v)
            return
        self.emit_out(node, label, Reshape(self.unique(label), shape), [self.use(node.input[0])])

    def h_transpose(self, node: onnx.NodeProto, i: int, label: str) -> None:
        v = self.data_input(node, label)
        rank = len(v.shape) + 1
        perm = [int(p) for p in _attrs(node).get("perm", list(range(rank))[::-1])]
        if sorted(perm) != list(range(rank)):
            raise self.err(node, label, f"permutation {perm} does not fit a tensor of rank {rank}")
        if perm[0] != 0:
            raise self.err(node, label, f"permutation {perm} moves the batch dimension (only perm[0] = 0 is supported)")
        per = tuple(p - 1 for p in perm[1:])
        if per == tuple(range(len(per))):
            self.alias(node.output[0], v)
            return
        self.emit_out(node, label, Transpose(self.unique(label), per), [self.use(node.input[0])])

    def h_pad(self, node: onnx.NodeProto, i: int, label: str) -> None:
        v = self.data_input(node, label)
        a = _attrs(node)
        mode = _str_attr(a, "mode", "constant")
        if mode != "constant":
            raise self.err(node, label, f"mode={mode} is not supported (only constant)")
        rank = len(v.shape) + 1
        if self.opset < 11 or "pads" in a:
            if "pads" not in a:
                raise self.err(node, label, "the required attribute 'pads' is missing")
            pads = [int(p) for p in a["pads"]]
            value = float(a.get("value", 0.0))
            axes = list(range(rank))
        else:
            if len(node.input) < 2 or not node.input[1]:
                raise self.err(node, label, "the pads input (input 1) is missing")
            pads = [int(p) for p in np.asarray(self.const(node.input[1], node, label)).reshape(-1)]
            cv = self.opt_const(node, label, 2)
            value = 0.0 if cv is None else _exact(cv)
            const_axes = self.opt_const(node, label, 3)
            axes = list(range(rank)) if const_axes is None else [int(x) + rank if int(x) < 0 else int(x)
                                                                 for x in np.asarray(const_axes).reshape(-1)]
        if len(pads) != 2 * len(axes):
            raise self.err(node, label, f"{len(pads)} pads for {len(axes)} axes")
        full = [(0, 0)] * rank
        for k, ax in enumerate(axes):
            full[ax] = (pads[k], pads[k + len(axes)])
        if any(p < 0 for pair in full for p in pair):
            raise self.err(node, label, f"negative pads {pads} (cropping) are not supported")
        if full[0] != (0, 0):
            raise self.err(node, label, f"pads {pads} pad the batch dimension")
        if all(p == (0, 0) for p in full):
            self.alias(node.output[0], v)
            return
        self.emit_out(node, label, Pad(self.unique(label), tuple(full[1:]), value), [self.use(node.input[0])])

    def h_concat(self, node: onnx.NodeProto, i: int, label: str) -> None:
        consts = [n for n in node.input if n and n not in self.vals]
        if consts:
            raise self.err(node, label, f"concatenates the constant {consts[0]!r} with computed tensors "
                                        "(only computed tensors are supported)")
        rank = len(self.vals[node.input[0]].shape) + 1
        axis = int(_attrs(node)["axis"])
        if not -rank <= axis < rank:
            raise self.err(node, label, f"axis={axis} is out of range for tensors of rank {rank}")
        axis = axis + rank if axis < 0 else axis
        if axis < 1:
            raise self.err(node, label, "concatenation along the batch dimension is not supported")
        if len(node.input) == 1:
            self.alias(node.output[0], self.vals[node.input[0]])
            return
        srcs = [self.use(n) for n in node.input]
        self.emit_out(node, label, Concat(self.unique(label), axis - 1), srcs)

    def h_prelu(self, node: onnx.NodeProto, i: int, label: str) -> None:
        v = self.data_input(node, label)
        slope = np.asarray(self.const(node.input[1], node, label), np.float64)
        shape = v.shape
        # unidirectional (numpy, right-aligned) broadcast of the slope to (N, *shape)
        if slope.ndim == len(shape) + 1:
            if slope.shape[0] != 1:
                raise self.err(node, label, f"slope of shape {slope.shape} varies over the batch")
            slope = slope[0]
        try:
            ok = np.broadcast_shapes(slope.shape, shape) == shape
        except ValueError:
            ok = False
        if not ok or slope.ndim > len(shape):
            raise self.err(node, label, f"slope of shape {slope.shape} does not broadcast to the data shape {shape}")
        if slope.size == 1:
            slope = slope.reshape((1,) * len(shape))
        self.emit_out(node, label, PReLU(self.unique(label), self.tensor(slope)), [self.use(node.input[0])])

    def h_activation(self, node: onnx.NodeProto, i: int, label: str) -> None:
        self.data_input(node, label)
        op = node.op_type
        if op == "LeakyRelu":
            alpha = _exact(_attrs(node).get("alpha", 0.01))
            if not 0.0 <= alpha <= 1.0:  # outside [0, 1] it is not monotone: a PReLU handles it
                layer: Layer = PReLU(self.unique(label), torch.full((1,) * len(self.vals[node.input[0]].shape),
                                                                    alpha, dtype=F64))
            else:
                layer = Activation(self.unique(label), ActKind.LEAKY_RELU, alpha)
        else:
            kind = {"Relu": ActKind.RELU, "Sigmoid": ActKind.SIGMOID, "Tanh": ActKind.TANH,
                    "Softplus": ActKind.SOFTPLUS}[op]
            layer = Activation(self.unique(label), kind, 1.0 if kind == ActKind.SOFTPLUS else 0.0)
        self.emit_out(node, label, layer, [self.use(node.input[0])])

    def h_batchnorm(self, node: onnx.NodeProto, i: int, label: str) -> None:
        a = _attrs(node)
        v = self.data_input(node, label)
        if a.get("training_mode", 0):
            raise self.err(node, label, "training_mode=1 is not supported")
        gamma, beta, mean, var = (self.const(n, node, label) for n in node.input[1:5])
        c = v.shape[0] if v.shape else 0
        for what, name, arr in zip(("scale", "B", "mean", "var"), node.input[1:5], (gamma, beta, mean, var),
                                   strict=True):
            if arr.shape != (c,):
                raise self.err(node, label, f"{what} {name!r} has shape {arr.shape}; expected ({c},) for data of "
                                            f"shape {v.shape} ({c} channels)")
        eps = _exact(a.get("epsilon", 1e-5))
        if not np.all(np.asarray(var, np.float64) + eps > 0):
            raise self.err(node, label, f"var {node.input[4]!r} + epsilon {eps} must be > 0")
        s, t = bn_scale_shift(gamma, beta, mean, var, eps)
        self.channel_affine(node, label, node.input[0], s, t, fold_ok=True)

    def h_neg(self, node: onnx.NodeProto, i: int, label: str) -> None:
        v = self.data_input(node, label)
        c = v.shape[0]
        self.channel_affine(node, label, node.input[0], -np.ones(c), np.zeros(c), fold_ok=False)

    def h_elementwise(self, node: onnx.NodeProto, i: int, label: str) -> None:
        op = node.op_type
        if len(node.input) != 2:
            raise self.err(node, label, f"expects 2 inputs, got {len(node.input)}")
        data = [k for k in range(2) if node.input[k] in self.vals]
        if len(data) == 2:
            if op not in ("Add", "Sub"):
                raise self.err(node, label, f"{op} of two computed tensors is not supported (not affine)")
            sa, sb = (self.vals[n].shape for n in node.input)
            if sa != sb:
                raise self.err(node, label, f"{op} of computed tensors of shapes {sa} and {sb} (no broadcasting "
                                            "between computed tensors)")
            cls = Add if op == "Add" else Sub
            srcs = [self.use(n) for n in node.input]
            self.emit_out(node, label, cls(self.unique(label)), srcs)
            return
        di = data[0]
        dname = node.input[di]
        v = self.vals[dname]
        c = self.const(node.input[1 - di], node, label)
        vec = self.channel_vector(c, v.shape, node, label)
        one, zero = np.ones_like(vec), np.zeros_like(vec)
        if op == "Add":
            self.channel_affine(node, label, dname, one, vec, fold_ok=True)
        elif op == "Sub":
            # x − c folds into a bias; c − x flips the sign, which only a fixed layer expresses
            if di == 0:
                self.channel_affine(node, label, dname, one, -vec, fold_ok=True)
            else:
                self.channel_affine(node, label, dname, -one, vec, fold_ok=False)
        elif op == "Mul":
            self.channel_affine(node, label, dname, vec, zero, fold_ok=False)
        else:  # Div
            if di != 0:
                raise self.err(node, label, "constant / data is not affine")
            if np.any(vec == 0):
                raise self.err(node, label, "division by zero")
            self.channel_affine(node, label, dname, 1.0 / vec, zero, fold_ok=False)

    # -- torch's Softplus(β, threshold) ------------------------------------------------
    def _scalar_const(self, name: str) -> float | None:
        if name not in self.consts:
            return None
        a, b = self.consts[name]
        if a.size != 1 or not np.array_equal(a, b):
            return None
        return _exact(a)

    def _only(self, tensor: str) -> list[int]:
        return self.consumers.get(tensor, [])

    def _softplus_pattern(self, k: int) -> _SoftplusPattern | None:
        """Recognise around Softplus node k:
          legacy (β ≠ 1):  Div(Softplus(Mul(x, β)), β)
          dynamo (β ≠ 1):  Where(Greater(Mul(x, β), thr), x, Div(Softplus(Mul(x, β)), β))
          dynamo (β = 1):  Where(Greater(x, thr), x, Softplus(x))
        (a bare Softplus is β = 1 with no pattern). Anything else is lowered node by node."""
        nodes = self.nodes
        sp = nodes[k]
        u = sp.input[0]
        beta, x, result, members = 1.0, u, sp.output[0], {k}
        mi = self.producer.get(u)
        if mi is not None and nodes[mi].op_type == "Mul":
            mul = nodes[mi]
            ci = [j for j in range(2) if self._scalar_const(mul.input[j]) is not None]
            after = self._only(sp.output[0])
            if len(ci) == 1 and len(after) == 1 and nodes[after[0]].op_type == "Div":
                div = nodes[after[0]]
                b = self._scalar_const(mul.input[ci[0]])
                if div.input[0] == sp.output[0] and b is not None and b > 0 and self._scalar_const(div.input[1]) == b:
                    beta, x, result = b, mul.input[1 - ci[0]], div.output[0]
                    members |= {mi, after[0]}
        gts = [j for j in self._only(u) if nodes[j].op_type == "Greater" and nodes[j].input[0] == u]
        after = self._only(result)
        if len(gts) == 1 and len(after) == 1 and nodes[after[0]].op_type == "Where":
            gt, wh = nodes[gts[0]], nodes[after[0]]
            thr = self._scalar_const(gt.input[1])
            if thr is not None and list(wh.input) == [gt.output[0], x, result] and self._only(gt.output[0]) == [after[0]]:
                members |= {gts[0], after[0]}
                result = wh.output[0]
                threshold: float | None = thr
            else:
                threshold = None
        else:
            threshold = None
        if members == {k}:
            return None
        if beta != 1.0 and any(j not in members for j in self._only(u)):
            return None  # β·x is also read elsewhere: lowered node by node (still exact)
        return _SoftplusPattern(x, result, beta, threshold, _node_label(sp, k), frozenset(members))

    def _emit_softplus(self, p: _SoftplusPattern) -> None:
        if p.result in self.vals:
            return  # emitted at an earlier member
        if p.data not in self.vals:
            raise ModelError(f"{self.source}: node {p.label!r} (Softplus): its input {p.data!r} is not a computed tensor")
        layer = Activation(self.unique(p.label), ActKind.SOFTPLUS, p.beta)
        shape = self.emit(layer, [self.use(p.data)])
        self._new_val(p.result, layer.name, shape)
        if p.threshold is not None:
            gap = math.log1p(math.exp(-p.threshold)) / p.beta if p.threshold < 700 else 0.0
            if gap > 1e-6:
                self.notes.append(
                    f"softplus at node {p.label!r}: the file's threshold branch (x where β·x > {p.threshold:g}) differs "
                    f"from the exact softplus verigrad certifies by up to {gap:.3g}"
                )


_HANDLERS: dict[str, Callable[[_Walker, onnx.NodeProto, int, str], None]] = {
    "Gemm": _Walker.h_gemm,
    "MatMul": _Walker.h_matmul,
    "Conv": _Walker.h_conv,
    "AveragePool": _Walker.h_avgpool,
    "GlobalAveragePool": _Walker.h_avgpool,
    "ReduceMean": _Walker.h_reducemean,
    "MaxPool": _Walker.h_maxpool,
    "Flatten": _Walker.h_flatten,
    "Reshape": _Walker.h_reshape,
    "Squeeze": _Walker.h_squeeze,
    "Unsqueeze": _Walker.h_squeeze,
    "Transpose": _Walker.h_transpose,
    "Pad": _Walker.h_pad,
    "Concat": _Walker.h_concat,
    "Relu": _Walker.h_activation,
    "LeakyRelu": _Walker.h_activation,
    "Softplus": _Walker.h_activation,
    "Sigmoid": _Walker.h_activation,
    "Tanh": _Walker.h_activation,
    "PRelu": _Walker.h_prelu,
    "BatchNormalization": _Walker.h_batchnorm,
    "Add": _Walker.h_elementwise,
    "Sub": _Walker.h_elementwise,
    "Mul": _Walker.h_elementwise,
    "Div": _Walker.h_elementwise,
    "Neg": _Walker.h_neg,
    "Identity": _Walker.h_passthrough,
    "Dropout": _Walker.h_passthrough,
    "Cast": _Walker.h_passthrough,
}

# -- constant evaluation: numpy versions of the ops that shape arithmetic uses ------------


def _axes(args: list, a: dict) -> list[int] | None:
    if len(args) > 1 and args[1] is not None:
        return [int(x) for x in np.asarray(args[1]).reshape(-1)]
    return list(a["axes"]) if "axes" in a else None


def _c_constant(args: list, a: dict) -> np.ndarray:
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return np.asarray(a[key], dt)
    raise ModelError(f"Constant node with unsupported attributes {sorted(a)}")


def _c_unsqueeze(args: list, a: dict) -> np.ndarray:
    x = np.asarray(args[0]) if not isinstance(args[0], np.ndarray) else args[0]
    axes = _axes(args, a) or []
    rank = x.ndim + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = np.expand_dims(x, ax)
    return x


def _c_squeeze(args: list, a: dict) -> np.ndarray:
    axes = _axes(args, a)
    x = args[0] if isinstance(args[0], np.ndarray) else np.asarray(args[0])
    return np.squeeze(x, axis=tuple(ax % max(x.ndim, 1) for ax in axes) if axes is not None else None)


def _c_slice(args: list, a: dict) -> np.ndarray:
    x = np.asarray(args[0])
    axes: Sequence[int] | np.ndarray
    steps: Sequence[int] | np.ndarray
    if len(args) > 1:
        starts, ends = (np.asarray(v).reshape(-1) for v in args[1:3])
        axes = np.asarray(args[3]).reshape(-1) if len(args) > 3 and args[3] is not None else np.arange(len(starts))
        steps = np.asarray(args[4]).reshape(-1) if len(args) > 4 and args[4] is not None else np.ones(len(starts), int)
    else:  # opset < 10: attributes
        starts, ends = a["starts"], a["ends"]
        axes, steps = a.get("axes", list(range(len(starts)))), [1] * len(starts)
    idx = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        idx[int(ax)] = slice(int(s), int(e), int(st))
    return x[tuple(idx)]


def _c_div(args: list, a: dict) -> np.ndarray:
    x, y = np.asarray(args[0]), np.asarray(args[1])
    if np.issubdtype(x.dtype, np.integer):
        return np.trunc(x / y).astype(x.dtype)  # ONNX integer Div truncates
    return x / y


def _c_reshape(args: list, a: dict) -> np.ndarray:
    x = np.asarray(args[0])
    shape = [x.shape[k] if (s == 0 and not a.get("allowzero", 0)) else int(s) for k, s in enumerate(np.asarray(args[1]).reshape(-1))]
    return x.reshape(shape)


def _c_expand(args: list, a: dict) -> np.ndarray:
    x = np.asarray(args[0])
    shape = tuple(int(d) for d in np.asarray(args[1]).reshape(-1))
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, shape)).copy()


_CONST_OPS: dict[str, Callable[[list, dict], np.ndarray]] = {
    "Constant": _c_constant,
    "Identity": lambda x, a: np.asarray(x[0]),
    "Cast": lambda x, a: np.asarray(x[0]).astype(onnx.helper.tensor_dtype_to_np_dtype(a["to"])),
    "Gather": lambda x, a: np.take(x[0], np.asarray(x[1]), axis=a.get("axis", 0)),
    "Unsqueeze": _c_unsqueeze,
    "Squeeze": _c_squeeze,
    "Concat": lambda x, a: np.concatenate([np.atleast_1d(v) for v in x], axis=a["axis"]),
    "Slice": _c_slice,
    "Reshape": _c_reshape,
    "Expand": _c_expand,
    "Transpose": lambda x, a: np.transpose(x[0], a.get("perm")),
    "Add": lambda x, a: np.asarray(x[0]) + np.asarray(x[1]),
    "Sub": lambda x, a: np.asarray(x[0]) - np.asarray(x[1]),
    "Mul": lambda x, a: np.asarray(x[0]) * np.asarray(x[1]),
    "Div": _c_div,
    "Neg": lambda x, a: -np.asarray(x[0]),
    "Abs": lambda x, a: np.abs(x[0]),
    "Sqrt": lambda x, a: np.sqrt(x[0]),
    "Max": lambda x, a: np.maximum.reduce([np.asarray(v) for v in x]),
    "Min": lambda x, a: np.minimum.reduce([np.asarray(v) for v in x]),
    "Equal": lambda x, a: np.equal(x[0], x[1]),
    "Less": lambda x, a: np.less(x[0], x[1]),
    "Greater": lambda x, a: np.greater(x[0], x[1]),
    "Not": lambda x, a: np.logical_not(x[0]),
    "Where": lambda x, a: np.where(x[0], x[1], x[2]),
    "Range": lambda x, a: np.arange(np.asarray(x[0]).item(), np.asarray(x[1]).item(), np.asarray(x[2]).item()),
    "Mod": lambda x, a: (np.fmod if a.get("fmod", 0) else np.mod)(x[0], x[1]),
    "ConstantOfShape": lambda x, a: np.full(
        tuple(int(d) for d in np.asarray(x[0]).reshape(-1)),
        numpy_helper.to_array(a["value"]).reshape(-1)[0] if "value" in a else np.float32(0),
    ),
}


# ---------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------


def from_onnx_model(
    model: onnx.ModelProto, input_shape: Sequence[int] | None = None, source: str = "<onnx>",
    output: str | int | None = None,
) -> Network:
    """Lower an in-memory ONNX model to a float64 :class:`Network` (see :func:`load_onnx`)."""
    if not model.HasField("graph"):
        raise ModelError(f"{source}: not an ONNX model (the file holds no graph)")
    try:
        net = _Walker(model, input_shape, source, output).run()
        return check_loaded(net)
    except ModelError as e:
        raise named_error(e, source) from e.__cause__


def load_onnx(path: str | Path, input_shape: Sequence[int] | None = None, output: str | int | None = None) -> Network:
    """Load an ONNX model as a float64 :class:`Network` (a DAG of verigrad's node kinds).

    ``input_shape`` is per sample (no batch dim); by default it is the ONNX input's declared
    shape with its (possibly symbolic) batch dimension dropped, and a given one must agree
    with the declared dims. ``output`` picks the logits among several graph outputs (a name
    or an index into ``graph.output``); nodes that do not feed it are dropped, and a final
    Softmax over the classes is stripped (noted in ``Network.notes``). Node names are the
    ONNX node names (made unique); nodes that verigrad synthesises (normalization, pooling,
    stand-alone BatchNorm) carry a suffix (``/normalize``, ``/affine``, ``/avgpool``) and
    ``perturbable=False``. Raises :class:`ModelError` for unsupported ops (naming the file,
    node and op) and shape mismatches.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelError(f"{path.name}: not a readable ONNX file ({one_line(e) or type(e).__name__})") from e
    return from_onnx_model(model, input_shape, path.name, output)
