"""ONNX → :class:`~verigrad.models.network.Network`, parsing the graph with the ``onnx`` package.

The graph must be a chain: one input, one output, and every data node reads the tensor the
previous data node wrote. Nodes whose inputs are all constants (initializers, ``Constant``,
and the ``Shape`` of a data tensor, whose per-sample part is known) are evaluated here with
numpy, which is how the batch-size arithmetic of ``x.view(x.size(0), -1)`` is resolved.

Lowering, node by node:

* Gemm, MatMul (+ a following Add/Sub of a constant, folded into the bias) → Linear
* Conv (2-D, no dilation, one group, symmetric pads) → Conv2d
* AveragePool / GlobalAveragePool → a fixed Conv2d with diagonal weights 1/(kh·kw)
* Flatten, Reshape (per sample) → Reshape
* Relu, LeakyRelu, Sigmoid, Tanh, Softplus, and torch's Mul(β)→Softplus→Div(β) → Activation
* BatchNormalization → folded into the Conv/Gemm it directly follows (exact), else
  a fixed per-channel affine layer
* Add/Sub/Mul/Div by a scalar or per-channel constant → a fixed per-channel affine layer
  (``<node>/normalize`` at the graph input, ``<node>/affine`` elsewhere); consecutive ones
  are merged into one layer
* Identity, Dropout → nothing
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from verigrad.models.network import (
    ActKind,
    Activation,
    AffineLayer,
    Conv2d,
    Layer,
    Linear,
    ModelError,
    Network,
    Reshape,
    chain,
)

# ---------------------------------------------------------------------------------------
# Helpers shared with the torch loader: fixed (synthesised) layers and exact folding.
# ---------------------------------------------------------------------------------------


def bn_scale_shift(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNorm in inference mode as y = s·x + t: s = γ/sqrt(var+eps), t = β − mean·s."""
    s = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    return s, np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * s


def fold_channel_affine(layer: AffineLayer, scale: np.ndarray, shift: np.ndarray) -> AffineLayer:
    """The affine layer followed by y = s·x + t per output channel, as one layer (exact):
    W' = s·W (row-wise), b' = s·b + t. For BatchNorm this is b' = (b − mean)·s + β."""
    w64, b64 = layer.weight.detach().double(), layer.bias.detach().double()
    s = torch.as_tensor(scale, dtype=torch.float64, device=w64.device)
    t = torch.as_tensor(shift, dtype=torch.float64, device=w64.device)
    w = (w64 * s.reshape(-1, *([1] * (w64.dim() - 1)))).to(layer.weight.dtype)
    b = (b64 * s + t).to(layer.bias.dtype)
    if isinstance(layer, Linear):
        return Linear(layer.name, w, b, layer.perturbable)
    return Conv2d(layer.name, w, b, layer.stride, layer.padding, layer.perturbable)


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
    return Conv2d(name, w.to(dtype), torch.zeros(channels, dtype=dtype), tuple(stride), tuple(padding), perturbable=False)


# ---------------------------------------------------------------------------------------
# The ONNX graph walker.
# ---------------------------------------------------------------------------------------

_NP_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


@dataclass
class _Pending:
    """Elementwise y = scale·x + shift per channel, accumulated until a non-elementwise node."""

    name: str
    scale: np.ndarray
    shift: np.ndarray


def _hyper(v: float | np.ndarray) -> float:
    """A scalar hyperparameter (LeakyRelu α, Gemm α/β, BatchNorm ε, Softplus β) stored as
    float32 by ONNX: the shortest decimal that rounds to the same float32, i.e. the value the
    user wrote (0.1 rather than 0.10000000149), so the ONNX route agrees with the torch one."""
    return float(np.format_float_positional(np.float32(np.asarray(v).reshape(-1)[0]), unique=True, trim="-"))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


class _Walker:
    """One pass over the (topologically sorted) nodes, emitting layers."""

    def __init__(self, model: onnx.ModelProto, input_shape: Sequence[int] | None, source: str) -> None:
        self.source = source
        g = model.graph
        self.graph = g
        self.consts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for init in g.initializer:
            a = numpy_helper.to_array(init)
            self.consts[init.name] = (a, a)
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise ModelError(
                f"{source}: the graph has {len(inputs)} inputs {[i.name for i in inputs]}; "
                "verigrad needs a chain with a single input"
            )
        if len(g.output) != 1:
            raise ModelError(
                f"{source}: the graph has {len(g.output)} outputs {[o.name for o in g.output]}; "
                "verigrad needs a chain with a single output"
            )
        inp = inputs[0]
        self.input_name = inp.name
        tt = inp.type.tensor_type
        self.dtype = torch.float64 if tt.elem_type == onnx.TensorProto.DOUBLE else torch.float32
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        if len(dims) < 2:
            raise ModelError(
                f"{source}: input {inp.name!r} has shape {dims}; expected a batch dimension "
                "followed by the per-sample shape"
            )
        batch, declared = dims[0], dims[1:]
        if input_shape is not None:
            shape = tuple(int(s) for s in input_shape)
            if len(shape) != len(declared) or any(
                isinstance(d, int) and d > 0 and d != s for d, s in zip(declared, shape)
            ):
                raise ModelError(
                    f"{source}: input_shape {shape} does not match the model's declared "
                    f"per-sample input shape {tuple(declared)} (input {inp.name!r}, batch "
                    "dimension dropped)"
                )
        else:
            if not all(isinstance(d, int) and d > 0 for d in declared):
                raise ModelError(
                    f"{source}: input {inp.name!r} has symbolic per-sample dims "
                    f"{tuple(declared)}; pass input_shape"
                )
            shape = tuple(int(d) for d in declared)  # type: ignore[arg-type]
        self.input_shape = shape
        # Two "worlds" with different batch sizes: shape arithmetic evaluated in both shows
        # whether a Reshape keeps the batch dimension apart. A fixed batch size in the file
        # means the graph was traced for that size only, and both worlds use it.
        fixed = isinstance(batch, int) and batch > 0
        self.batches = (batch, batch) if fixed else (2, 3)
        self.data = inp.name
        self.shape: tuple[int, ...] = shape
        self.data_shapes: dict[str, tuple[int, ...]] = {inp.name: shape}
        self.layers: list[Layer] = []
        self.names: set[str] = set()
        self.pending: _Pending | None = None
        self.fresh_affine = False  # the last emitted layer is affine and nothing came after it
        self.at_input = True  # no layer emitted yet: elementwise ops are input normalization
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(g.node):
            for name in n.input:
                self.consumers.setdefault(name, []).append(i)
        self.skip: set[int] = set()
        # Constant nodes up front: a pattern (Mul(β)→Softplus→Div(β)) looks ahead at
        # constants that the node order defines only later
        for i, n in enumerate(g.node):
            if n.op_type == "Constant":
                self.eval_const(n, _node_label(n, i))
                self.skip.add(i)

    # -- naming, emission --------------------------------------------------------------
    def unique(self, name: str) -> str:
        base, k = name, 1
        while name in self.names:
            name = f"{base}_{k}"
            k += 1
        self.names.add(name)
        return name

    def emit(self, layer: Layer) -> None:
        self.flush()
        self.shape = tuple(layer.out_shape(self.shape))
        self.layers.append(layer)
        self.fresh_affine = isinstance(layer, (Linear, Conv2d))
        self.at_input = False

    def flush(self) -> None:
        """Materialise a pending elementwise affine map as one fixed layer."""
        p, self.pending = self.pending, None
        if p is not None:
            layer = channel_affine_layer(p.name, p.scale, p.shift, self.shape, self.dtype)
            self.shape = tuple(layer.out_shape(self.shape))
            self.layers.append(layer)
            self.at_input = False
            self.fresh_affine = False

    def add_channel_affine(self, label: str, scale: np.ndarray, shift: np.ndarray, fold_ok: bool) -> None:
        """y = scale·x + shift per channel: folded into the affine layer just emitted when
        ``fold_ok`` (bias Add after MatMul, BatchNorm after Conv/Gemm), else accumulated."""
        c = self.shape[0]
        scale = np.broadcast_to(scale, (c,)).astype(np.float64)
        shift = np.broadcast_to(shift, (c,)).astype(np.float64)
        if fold_ok and self.fresh_affine and self.pending is None:
            self.layers[-1] = fold_channel_affine(self.layers[-1], scale, shift)  # type: ignore[arg-type]
            return
        if self.pending is None:
            suffix = "normalize" if self.at_input else "affine"
            self.pending = _Pending(self.unique(f"{label}/{suffix}"), np.ones(c), np.zeros(c))
        p = self.pending
        # s2·(s1·x + t1) + t2
        p.scale, p.shift = scale * p.scale, scale * p.shift + shift
        self.fresh_affine = False

    # -- constants ---------------------------------------------------------------------
    def const(self, name: str, node: onnx.NodeProto, label: str) -> np.ndarray:
        """A batch-independent constant input (weights, shapes without the batch size)."""
        if name not in self.consts:
            raise ModelError(f"{self.source}: node {label!r} ({node.op_type}) needs a constant for input {name!r}")
        a, b = self.consts[name]
        if a.shape != b.shape or not np.array_equal(a, b):
            raise ModelError(f"{self.source}: node {label!r} ({node.op_type}): input {name!r} depends on the batch size")
        return a

    def tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.array(a, dtype=np.float64)).to(self.dtype)

    def channel_vector(self, c: np.ndarray, label: str, op: str) -> np.ndarray:
        """A constant broadcast against a (B, *shape) tensor, as one value per channel
        (dim 0 of the per-sample shape); per-element constants are refused."""
        c = np.asarray(c, np.float64)
        shape = self.shape
        if c.ndim == len(shape) + 1:
            if c.shape[0] != 1:
                raise ModelError(f"{self.source}: node {label!r} ({op}): constant of shape {c.shape} varies over the batch")
            c = c[0]
        try:
            full = np.broadcast_to(c, shape)
        except ValueError:
            raise ModelError(
                f"{self.source}: node {label!r} ({op}): constant of shape {c.shape} does not "
                f"broadcast to the data shape {shape}"
            ) from None
        per = full.reshape(shape[0], -1)
        if not np.all(per == per[:, :1]):
            raise ModelError(
                f"{self.source}: node {label!r} ({op}): only scalar or per-channel constants are "
                f"supported, got one of shape {c.shape} for data of shape {shape}"
            )
        return per[:, 0].copy()

    # -- the walk ----------------------------------------------------------------------
    def run(self) -> Network:
        for i, node in enumerate(self.graph.node):
            if i in self.skip:
                continue
            label = _node_label(node, i)
            ins = [n for n in node.input if n]
            data_ins = [n for n in ins if n in self.data_shapes]
            unknown = [n for n in ins if n not in self.data_shapes and n not in self.consts]
            if unknown:
                raise ModelError(
                    f"{self.source}: node {label!r} ({node.op_type}) reads {unknown[0]!r}, which no "
                    "earlier node produced in a form verigrad follows"
                )
            if node.op_type == "Shape" and data_ins:
                self.shape_of(node, data_ins[0])
                continue
            if not data_ins:
                self.eval_const(node, label)
                continue
            if len(data_ins) > 1:
                raise ModelError(
                    f"{self.source}: the graph is not a chain: node {label!r} ({node.op_type}) "
                    f"combines the tensors {data_ins} (a residual/skip connection?)"
                )
            if data_ins[0] != self.data:
                raise ModelError(
                    f"{self.source}: the graph is not a chain: node {label!r} ({node.op_type}) "
                    f"reads {data_ins[0]!r}, an earlier tensor that another node already consumed "
                    "(a branch or skip connection?)"
                )
            handler = _HANDLERS.get(node.op_type)
            if handler is None:
                raise ModelError(
                    f"{self.source}: unsupported ONNX op {node.op_type!r} at node {label!r} "
                    f"(supported: {', '.join(sorted(_HANDLERS))}, and constant shape arithmetic)"
                )
            out = handler(self, node, i, label)
            self.data = out
            self.data_shapes[out] = self.shape
        out_name = self.graph.output[0].name
        if out_name != self.data:
            raise ModelError(
                f"{self.source}: the graph output {out_name!r} is not the end of the chain "
                f"(the last data tensor is {self.data!r})"
            )
        self.flush()
        layers = list(self.layers)
        # logits are flattened by Network.forward anyway, so a trailing reshape is a no-op
        while layers and isinstance(layers[-1], Reshape):
            layers.pop()
        return chain(layers, self.input_shape, self.source)

    def shape_of(self, node: onnx.NodeProto, data: str) -> None:
        a = _attrs(node)
        per = self.data_shapes[data]
        vals = tuple(np.array([b, *per], np.int64)[a.get("start", 0) : a.get("end", None)] for b in self.batches)
        self.consts[node.output[0]] = vals  # type: ignore[assignment]

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
            except ModelError:
                raise
            except Exception as e:  # numpy errors on malformed constant subgraphs
                raise ModelError(f"{self.source}: cannot evaluate constant node {label!r} ({node.op_type}): {e}") from e
        self.consts[node.output[0]] = (np.asarray(worlds[0]), np.asarray(worlds[1]))

    # -- data-node handlers (each returns the name of its data output) -----------------
    def h_passthrough(self, node: onnx.NodeProto, i: int, label: str) -> str:
        return node.output[0]

    def h_gemm(self, node: onnx.NodeProto, i: int, label: str) -> str:
        a = _attrs(node)
        if node.input[0] != self.data:
            raise ModelError(f"{self.source}: node {label!r} (Gemm): the data must be the first operand")
        if a.get("transA", 0):
            raise ModelError(f"{self.source}: node {label!r} (Gemm): transA=1 would mix the batch dimension")
        if len(self.shape) != 1:
            raise ModelError(f"{self.source}: node {label!r} (Gemm) needs flat input, got shape {self.shape}")
        b = self.const(node.input[1], node, label).astype(np.float64)
        b = b.T if a.get("transB", 0) else b  # (in, out)
        out = b.shape[1]
        w = _hyper(a.get("alpha", 1.0)) * b.T
        bias = np.zeros(out)
        if len(node.input) > 2 and node.input[2]:
            c = self.const(node.input[2], node, label).astype(np.float64)
            try:
                bias = _hyper(a.get("beta", 1.0)) * np.broadcast_to(c, (1, out)).reshape(out)
            except ValueError:
                raise ModelError(f"{self.source}: node {label!r} (Gemm): bias of shape {c.shape} for {out} outputs") from None
        self.emit(Linear(self.unique(label), self.tensor(w), self.tensor(bias)))
        return node.output[0]

    def h_matmul(self, node: onnx.NodeProto, i: int, label: str) -> str:
        if node.input[0] != self.data:
            raise ModelError(f"{self.source}: node {label!r} (MatMul): the data must be the first operand")
        if len(self.shape) != 1:
            raise ModelError(f"{self.source}: node {label!r} (MatMul) needs flat input, got shape {self.shape}")
        w = self.const(node.input[1], node, label)
        if w.ndim != 2:
            raise ModelError(f"{self.source}: node {label!r} (MatMul): weight must be 2-D, got {w.shape}")
        # the bias of a following Add is folded in by h_elementwise (fresh_affine)
        self.emit(Linear(self.unique(label), self.tensor(w.T), torch.zeros(w.shape[1], dtype=self.dtype)))
        return node.output[0]

    def h_conv(self, node: onnx.NodeProto, i: int, label: str) -> str:
        a = _attrs(node)
        w = self.const(node.input[1], node, label)
        if w.ndim != 4:
            raise ModelError(f"{self.source}: node {label!r} (Conv): only 2-D convolutions are supported, weight {w.shape}")
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise ModelError(f"{self.source}: node {label!r} (Conv): dilation {a['dilations']} is not supported")
        if a.get("group", 1) != 1:
            raise ModelError(f"{self.source}: node {label!r} (Conv): group={a['group']} is not supported")
        kh, kw = w.shape[2:]
        pads = self._pads(node, label, a, (kh, kw))
        strides = tuple(a.get("strides", [1, 1]))
        bias = np.zeros(w.shape[0])
        if len(node.input) > 2 and node.input[2]:
            bias = self.const(node.input[2], node, label)
        self.emit(Conv2d(self.unique(label), self.tensor(w), self.tensor(bias), strides, pads))  # type: ignore[arg-type]
        return node.output[0]

    def _pads(self, node: onnx.NodeProto, label: str, a: dict, kernel: tuple[int, int]) -> tuple[int, int]:
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto not in ("NOTSET", "VALID"):
            raise ModelError(f"{self.source}: node {label!r} ({node.op_type}): auto_pad={auto} is not supported")
        pads = list(a.get("pads", [0, 0, 0, 0])) if auto == "NOTSET" else [0, 0, 0, 0]
        if len(pads) != 4 or pads[0] != pads[2] or pads[1] != pads[3]:
            raise ModelError(f"{self.source}: node {label!r} ({node.op_type}): only symmetric 2-D pads are supported, got {pads}")
        return int(pads[0]), int(pads[1])

    def h_avgpool(self, node: onnx.NodeProto, i: int, label: str) -> str:
        if len(self.shape) != 3:
            raise ModelError(f"{self.source}: node {label!r} ({node.op_type}) needs input (C, H, W), got {self.shape}")
        a = _attrs(node)
        if node.op_type == "GlobalAveragePool":
            kernel, strides, pads = tuple(self.shape[1:]), (1, 1), (0, 0)
        else:
            kernel = tuple(a["kernel_shape"])
            if len(kernel) != 2:
                raise ModelError(f"{self.source}: node {label!r} (AveragePool): only 2-D pooling is supported")
            if a.get("ceil_mode", 0):
                raise ModelError(f"{self.source}: node {label!r} (AveragePool): ceil_mode=1 is not supported")
            if any(d != 1 for d in a.get("dilations", [1, 1])):
                raise ModelError(f"{self.source}: node {label!r} (AveragePool): dilation is not supported")
            pads = self._pads(node, label, a, kernel)  # type: ignore[arg-type]
            # ONNX's default count_include_pad is 0: the divisor near a padded border is then
            # not 1/(kh·kw), which a fixed conv cannot express
            if any(pads) and not a.get("count_include_pad", 0):
                raise ModelError(
                    f"{self.source}: node {label!r} (AveragePool): padding with count_include_pad=0 "
                    "is not supported"
                )
            strides = tuple(a.get("strides", [1, 1]))
        layer = avgpool_layer(self.unique(f"{label}/avgpool"), self.shape[0], kernel, strides, pads, self.dtype)  # type: ignore[arg-type]
        self.emit(layer)
        self.fresh_affine = False  # a fixed pooling layer: never fold a following BN/Add into it
        return node.output[0]

    def h_flatten(self, node: onnx.NodeProto, i: int, label: str) -> str:
        axis = _attrs(node).get("axis", 1)
        rank = len(self.shape) + 1
        if (axis + rank if axis < 0 else axis) != 1:
            raise ModelError(f"{self.source}: node {label!r} (Flatten): axis={axis} would mix the batch dimension")
        self._reshape(label, (math.prod(self.shape),))
        return node.output[0]

    def h_reshape(self, node: onnx.NodeProto, i: int, label: str) -> str:
        if node.input[1] not in self.consts:
            raise ModelError(f"{self.source}: node {label!r} (Reshape): the target shape must be constant")
        allowzero = _attrs(node).get("allowzero", 0)
        per_sample = []
        for b, target in zip(self.batches, self.consts[node.input[1]]):
            full = (b, *self.shape)
            dims = [int(t) for t in np.asarray(target).reshape(-1)]
            out = [full[k] if (t == 0 and not allowzero) else t for k, t in enumerate(dims)]
            if out.count(-1) == 1:
                known = math.prod(d for d in out if d != -1)
                out[out.index(-1)] = math.prod(full) // known if known else 0
            if not out or out[0] != b or math.prod(out) != math.prod(full):
                raise ModelError(
                    f"{self.source}: node {label!r} (Reshape): target {dims} does not keep the "
                    f"batch dimension of input {tuple(full)} separate (only per-sample reshapes are supported)"
                )
            per_sample.append(tuple(out[1:]))
        if per_sample[0] != per_sample[1]:
            raise ModelError(f"{self.source}: node {label!r} (Reshape): the per-sample shape depends on the batch size")
        self._reshape(label, per_sample[0])
        return node.output[0]

    def _reshape(self, label: str, shape: tuple[int, ...]) -> None:
        if shape != self.shape:  # a no-op reshape is left out
            self.emit(Reshape(self.unique(label), tuple(int(s) for s in shape)))

    def h_activation(self, node: onnx.NodeProto, i: int, label: str) -> str:
        kind, param = {
            "Relu": (ActKind.RELU, 0.0),
            "Sigmoid": (ActKind.SIGMOID, 0.0),
            "Tanh": (ActKind.TANH, 0.0),
            "Softplus": (ActKind.SOFTPLUS, 1.0),
            "LeakyRelu": (ActKind.LEAKY_RELU, _hyper(_attrs(node).get("alpha", 0.01))),
        }[node.op_type]
        self.emit(Activation(self.unique(label), kind, param))
        return node.output[0]

    def h_batchnorm(self, node: onnx.NodeProto, i: int, label: str) -> str:
        a = _attrs(node)
        if a.get("training_mode", 0):
            raise ModelError(f"{self.source}: node {label!r} (BatchNormalization): training_mode=1 is not supported")
        gamma, beta, mean, var = (self.const(n, node, label) for n in node.input[1:5])
        s, t = bn_scale_shift(gamma, beta, mean, var, _hyper(a.get("epsilon", 1e-5)))
        if s.shape != (self.shape[0],):
            raise ModelError(
                f"{self.source}: node {label!r} (BatchNormalization): {s.shape[0]} channels for data of shape {self.shape}"
            )
        self.add_channel_affine(label, s, t, fold_ok=True)
        return node.output[0]

    def h_elementwise(self, node: onnx.NodeProto, i: int, label: str) -> str:
        op = node.op_type
        di = list(node.input).index(self.data)
        c = self.consts[node.input[1 - di]][0]
        if not np.array_equal(c, self.consts[node.input[1 - di]][1]):
            raise ModelError(f"{self.source}: node {label!r} ({op}): constant depends on the batch size")
        if op == "Mul" and self._softplus_beta(node, i, label, c):
            return self.data
        v = self.channel_vector(c, label, op)
        one, zero = np.ones_like(v), np.zeros_like(v)
        if op == "Add":
            self.add_channel_affine(label, one, v, fold_ok=True)
        elif op == "Sub":
            # x − c folds into a bias; c − x flips the sign, which only a fixed layer expresses
            if di == 0:
                self.add_channel_affine(label, one, -v, fold_ok=True)
            else:
                self.add_channel_affine(label, -one, v, fold_ok=False)
        elif op == "Mul":
            self.add_channel_affine(label, v, zero, fold_ok=False)
        else:  # Div
            if di != 0:
                raise ModelError(f"{self.source}: node {label!r} (Div): constant / data is not affine")
            if np.any(v == 0):
                raise ModelError(f"{self.source}: node {label!r} (Div): division by zero")
            self.add_channel_affine(label, 1.0 / v, zero, fold_ok=False)
        return node.output[0]

    def _softplus_beta(self, node: onnx.NodeProto, i: int, label: str, c: np.ndarray) -> bool:
        """torch exports nn.Softplus(beta=β) (β ≠ 1) as Mul(β) → Softplus → Div(β), dropping
        its threshold. Recognise it and emit one Activation(softplus, β) named after the
        Softplus node."""
        if c.size != 1:
            return False
        nodes = self.graph.node
        c1 = self.consumers.get(node.output[0], [])
        if len(c1) != 1 or nodes[c1[0]].op_type != "Softplus":
            return False
        sp = nodes[c1[0]]
        c2 = self.consumers.get(sp.output[0], [])
        if len(c2) != 1 or nodes[c2[0]].op_type != "Div":
            return False
        div = nodes[c2[0]]
        if div.input[0] != sp.output[0] or div.input[1] not in self.consts:
            return False
        d0, d1 = self.consts[div.input[1]]
        if d0.size != 1 or not np.array_equal(d0, d1) or d0.reshape(-1)[0] != np.asarray(c).reshape(-1)[0]:
            return False
        # torch writes β as a float32 constant even for float64 models
        beta = _hyper(c) if np.asarray(c).dtype == np.float32 else float(np.asarray(c).reshape(-1)[0])
        if not beta > 0:
            return False
        self.emit(Activation(self.unique(_node_label(sp, c1[0])), ActKind.SOFTPLUS, beta))
        self.skip.update((c1[0], c2[0]))
        self.data = div.output[0]
        return True


_HANDLERS: dict[str, Callable[[_Walker, onnx.NodeProto, int, str], str]] = {
    "Gemm": _Walker.h_gemm,
    "MatMul": _Walker.h_matmul,
    "Conv": _Walker.h_conv,
    "AveragePool": _Walker.h_avgpool,
    "GlobalAveragePool": _Walker.h_avgpool,
    "Flatten": _Walker.h_flatten,
    "Reshape": _Walker.h_reshape,
    "Relu": _Walker.h_activation,
    "LeakyRelu": _Walker.h_activation,
    "Softplus": _Walker.h_activation,
    "Sigmoid": _Walker.h_activation,
    "Tanh": _Walker.h_activation,
    "BatchNormalization": _Walker.h_batchnorm,
    "Add": _Walker.h_elementwise,
    "Sub": _Walker.h_elementwise,
    "Mul": _Walker.h_elementwise,
    "Div": _Walker.h_elementwise,
    "Identity": _Walker.h_passthrough,
    "Dropout": _Walker.h_passthrough,
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
    x = np.asarray(args[0])
    axes = _axes(args, a) or []
    rank = x.ndim + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = np.expand_dims(x, ax)
    return x


def _c_squeeze(args: list, a: dict) -> np.ndarray:
    axes = _axes(args, a)
    return np.squeeze(args[0], axis=tuple(axes) if axes is not None else None)


def _c_slice(args: list, a: dict) -> np.ndarray:
    x = np.asarray(args[0])
    if len(args) > 1:
        starts, ends = (np.asarray(v).reshape(-1) for v in args[1:3])
        axes = np.asarray(args[3]).reshape(-1) if len(args) > 3 and args[3] is not None else np.arange(len(starts))
        steps = np.asarray(args[4]).reshape(-1) if len(args) > 4 and args[4] is not None else np.ones(len(starts), int)
    else:  # opset < 10: attributes
        starts, ends = a["starts"], a["ends"]
        axes, steps = a.get("axes", list(range(len(starts)))), [1] * len(starts)
    idx = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
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
    "Transpose": lambda x, a: np.transpose(x[0], a.get("perm")),
    "Add": lambda x, a: np.asarray(x[0]) + np.asarray(x[1]),
    "Sub": lambda x, a: np.asarray(x[0]) - np.asarray(x[1]),
    "Mul": lambda x, a: np.asarray(x[0]) * np.asarray(x[1]),
    "Div": _c_div,
    "Neg": lambda x, a: -np.asarray(x[0]),
    "Sqrt": lambda x, a: np.sqrt(x[0]),
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
    model: onnx.ModelProto, input_shape: Sequence[int] | None = None, source: str = "<onnx>"
) -> Network:
    """Lower an in-memory ONNX model to a :class:`Network` (see :func:`load_onnx`)."""
    return _Walker(model, input_shape, source).run()


def load_onnx(path: str | Path, input_shape: Sequence[int] | None = None) -> Network:
    """Load a chain-structured ONNX model as a :class:`Network`.

    ``input_shape`` is per sample (no batch dim); by default it is the ONNX input's declared
    shape with its (possibly symbolic) batch dimension dropped, and a given one must agree
    with the declared dims. Layer names are the ONNX node names (made unique); layers that
    verigrad synthesises (normalization, pooling, stand-alone BatchNorm) carry a suffix
    (``/normalize``, ``/affine``, ``/avgpool``) and ``perturbable=False``.
    Raises :class:`ModelError` for unsupported ops, non-chain graphs and shape mismatches.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelError(f"{path.name}: not a readable ONNX file ({e})") from e
    return from_onnx_model(model, input_shape, path.name)
