"""verigrad's network representation: a graph of operator nodes in topological order.

Every supported source (ONNX, TorchScript, ``nn.Module``) is lowered to a :class:`Network`:
nodes of the kinds in :data:`verigrad.operators.OPS`, each reading named tensors (the network
input ``"input"`` or earlier nodes); a tensor may feed several nodes. The last node's output is
the logits. A chain is the special case where every node reads the previous one (``inputs``
left empty). Input normalization, BatchNorm and AvgPool are lowered to fixed affine nodes by
the loaders.

Shapes are per sample: a batch dimension is always prepended at run time.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Mapping, Sequence, TypeVar, Union, cast

import torch

from verigrad.errors import ModelError, OpUnsupported
from verigrad.operators import OPS, Node
from verigrad.operators.activation import ActKind, Activation, PReLU
from verigrad.operators.affine import Conv2d, Linear, conv_transpose
from verigrad.operators.pooling import MaxPool
from verigrad.operators.shape import Add, Concat, Pad, Reshape, Sub, Transpose

__all__ = [
    "INPUT", "ActKind", "Activation", "Add", "AffineLayer", "Concat", "Conv2d", "Layer", "Linear", "MaxPool",
    "ModelError", "Network", "Node", "OPS", "PReLU", "Pad", "Reshape", "Sub", "Transpose", "chain",
    "check_loaded", "conv_transpose", "named_error", "one_line",
]

INPUT = "input"  # the name of the network's input tensor

Layer = Node
AffineLayer = Union[Linear, Conv2d]
# the kinds of the original chain representation (what chain-only engines understand)
CHAIN_KINDS = (Linear, Conv2d, Reshape, Activation)
# derived objects a network keeps (Network.memo): a traced graph per class and output for the
# batch sizes in use, a few MB each on the shipped models
MEMO_SIZE = 32
T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class Network:
    """Nodes in topological order; the last one produces the logits.

    ``input_shape`` is per sample, e.g. (1, 28, 28) or (784,). ``source`` names the file or
    object it was loaded from, for error messages. ``notes`` records what the loader did that a
    user should know (e.g. a final Softmax stripped: its input are the logits).
    """

    layers: tuple[Node, ...]
    input_shape: tuple[int, ...]
    source: str = "<module>"
    notes: tuple[str, ...] = ()
    # shapes[0] = input shape, shapes[i + 1] = output shape of node i
    shapes: tuple[tuple[int, ...], ...] = field(init=False)
    wiring: tuple[tuple[str, ...], ...] = field(init=False)  # resolved input names per node
    shape_of: Mapping[str, tuple[int, ...]] = field(init=False)
    # what engines derive from this network once (see memo); not part of its value
    _memo: "OrderedDict[Hashable, object]" = field(init=False, repr=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ModelError(f"{self.source}: the network has no layers")
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        names = [l.name for l in self.layers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ModelError(f"{self.source}: duplicate layer names {sorted(dup)}")
        if INPUT in names:
            raise ModelError(f"{self.source}: a layer may not be named {INPUT!r} (the network input)")
        shape_of: dict[str, tuple[int, ...]] = {INPUT: self.input_shape}
        wiring: list[tuple[str, ...]] = []
        prev = INPUT
        for node in self.layers:
            if not isinstance(node, Node):
                raise ModelError(f"{self.source}: {node!r} is not an operator node")
            ins = tuple(node.inputs) if node.inputs else (prev,)
            if node.arity and len(ins) != node.arity:
                raise ModelError(f"{self.source}: layer {node.name!r} ({node.op}) takes {node.arity} input(s), "
                                 f"got {len(ins)}: {list(ins)}")
            for i in ins:
                if i not in shape_of:
                    raise ModelError(f"{self.source}: layer {node.name!r} ({node.op}) reads {i!r}, which is neither "
                                     f"{INPUT!r} nor an earlier layer")
            try:
                shape_of[node.name] = tuple(int(s) for s in node.out_shape([shape_of[i] for i in ins]))
            except ModelError as e:
                raise named_error(e, self.source) from None
            wiring.append(ins)
            prev = node.name
        # every node must feed the logits (the last node): a dangling branch is a loader bug
        needed = {self.layers[-1].name}
        for node, ins in zip(reversed(self.layers), reversed(wiring), strict=True):
            if node.name in needed:
                needed.update(ins)
            else:
                raise ModelError(f"{self.source}: layer {node.name!r} ({node.op}) does not feed the output")
        if INPUT not in needed:
            raise ModelError(f"{self.source}: the output does not depend on the input")
        object.__setattr__(self, "shape_of", shape_of)
        object.__setattr__(self, "wiring", tuple(wiring))
        object.__setattr__(self, "shapes", (self.input_shape, *(shape_of[n.name] for n in self.layers)))

    # -- structure ---------------------------------------------------------------------
    @property
    def nodes(self) -> tuple[Node, ...]:
        return self.layers

    def in_shapes(self, i: int) -> tuple[tuple[int, ...], ...]:
        return tuple(self.shape_of[n] for n in self.wiring[i])

    @property
    def is_chain(self) -> bool:
        prev = INPUT
        for node, ins in zip(self.layers, self.wiring, strict=True):
            if ins != (prev,):
                return False
            prev = node.name
        return True

    def require_chain(self, engine: str, kinds: tuple[type, ...] = CHAIN_KINDS, last_affine: bool = True) -> None:
        """Raise :class:`OpUnsupported` unless the network is a chain of ``kinds`` (ending in an
        affine layer when ``last_affine``): for engines written for the chain representation."""
        prev = INPUT
        for node, ins in zip(self.layers, self.wiring, strict=True):
            if ins != (prev,):
                raise OpUnsupported(engine, node, f"it reads {list(ins)}: this engine handles chains only")
            if not isinstance(node, kinds):
                raise OpUnsupported(engine, node, "this engine handles only "
                                    + ", ".join(sorted(getattr(k, "op", k.__name__) for k in kinds)))
            prev = node.name
        last = self.layers[-1]
        if last_affine and not isinstance(last, (Linear, Conv2d)):
            raise OpUnsupported(engine, last, "this engine needs an affine last layer (the logits)")

    @property
    def num_classes(self) -> int:
        return math.prod(self.shapes[-1])

    def _first_tensor(self) -> torch.Tensor | None:
        for l in self.layers:
            for k in l.tensor_fields:
                return getattr(l, k)
        return None

    @property
    def dtype(self) -> torch.dtype:
        t = self._first_tensor()
        return t.dtype if t is not None else torch.float64

    @property
    def device(self) -> torch.device:
        t = self._first_tensor()
        return t.device if t is not None else torch.device("cpu")

    def affine_layers(self) -> Iterator[AffineLayer]:
        return (l for l in self.layers if isinstance(l, (Linear, Conv2d)))

    def layer(self, name: str) -> Node:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def affine_layer(self, name: str) -> AffineLayer:
        """The affine layer ``name`` (KeyError if there is none of that name)."""
        l = self.layer(name)
        if not isinstance(l, (Linear, Conv2d)):
            raise KeyError(f"layer {name!r} is a {l.op}, not an affine layer")
        return l

    # -- derived objects ---------------------------------------------------------------
    def memo(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()``, computed once per ``key`` for this network and kept while it lives (at
        most MEMO_SIZE objects, the least recently used dropped first): e.g. a traced auto_LiRPA
        graph per class, reused across inputs. The key also holds every tensor's version
        counter, so an in-place change of a weight rebuilds instead of reusing a stale object."""
        full = (key, tuple(getattr(l, k)._version for l in self.layers for k in l.tensor_fields))
        memo = self._memo
        if full in memo:
            memo.move_to_end(full)
            return cast(T, memo[full])
        value = build()
        memo[full] = value
        while len(memo) > MEMO_SIZE:
            memo.popitem(last=False)
        return value

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, x: torch.Tensor,
                 apply: Callable[[int, Node, list[torch.Tensor]], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Every node's value for input x (B, *input_shape); ``apply(i, node, inputs)`` replaces
        ``node.forward`` (e.g. with other parameters)."""
        vals: dict[str, torch.Tensor] = {INPUT: x}
        for i, (node, ins) in enumerate(zip(self.layers, self.wiring, strict=True)):
            xs = [vals[n] for n in ins]
            vals[node.name] = node.forward(xs) if apply is None else apply(i, node, xs)
        return vals

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (B, num_classes)."""
        y = self.evaluate(x)[self.layers[-1].name]
        return y.reshape(y.shape[0], -1)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Network":
        """A copy with every tensor cast / moved."""
        return Network(tuple(l.cast(lambda t: t.to(device=device, dtype=dtype)) for l in self.layers),
                       self.input_shape, self.source, self.notes)


def chain(layers: Sequence[Node], input_shape: Sequence[int], source: str = "<module>") -> Network:
    """Build a :class:`Network`, validating shapes layer by layer."""
    return Network(tuple(layers), tuple(int(s) for s in input_shape), source)


# -- hygiene of loaded networks ----------------------------------------------------------

_EXC_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (\S.*)$")


def one_line(text: object, limit: int = 300) -> str:
    """The first meaningful line of a (possibly multi-line) message: for a pasted traceback
    (TorchScript's "Traceback of TorchScript …") the last ``SomeError: …`` line, else the first
    non-empty line; cut to ``limit`` characters."""
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    if not lines:
        return ""
    line = lines[0]
    if len(lines) > 1:
        exc = [m for m in (_EXC_LINE.match(l) for l in lines) if m]
        if exc:
            line = f"{exc[-1].group(1)}: {exc[-1].group(2)}"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def named_error(e: ModelError, source: str) -> ModelError:
    """``e`` as a one-line :class:`ModelError` whose message starts with ``source`` (the model
    file): the one place loaders make sure a layer's error names the file."""
    msg = str(e)
    flat = msg if "\n" not in msg else "; ".join(l.strip() for l in msg.splitlines() if l.strip())
    if flat.startswith(source) and flat == msg:
        return e
    return ModelError(flat if flat.startswith(source) else f"{source}: {flat}")


def _count_bad(t: torch.Tensor) -> str | None:
    """'3 non-finite values of 12 (2 NaN, 1 +inf)' for a float tensor with NaN/±inf, else None."""
    if not (t.is_floating_point() or t.is_complex()):
        return None
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    n_nan = int(torch.isnan(t).sum())
    n_pos = int((t == math.inf).sum())
    n_neg = int((t == -math.inf).sum())
    n = n_nan + n_pos + n_neg
    kinds = ", ".join(f"{k} {w}" for k, w in ((n_nan, "NaN"), (n_pos, "+inf"), (n_neg, "-inf")) if k)
    return f"{n} non-finite value{'s' if n != 1 else ''} of {t.numel()} ({kinds})"


def check_loaded(net: Network) -> Network:
    """Refuse what a loader must never hand on (returns ``net``): NaN or ±inf in any node
    tensor (weights, biases, folded BatchNorm and normalisation constants, slopes) or float
    hyperparameter, a Linear/Conv2d bias that does not match its outputs, an empty tensor
    anywhere, and logits with no classes. Called once at the end of every loader (ONNX,
    TorchScript, ``nn.Module``, added normalisation)."""
    src = net.source
    for l in net.layers:
        kind = type(l).__name__
        for k in l.tensor_fields:
            t = getattr(l, k)
            if isinstance(t, torch.Tensor):
                bad = _count_bad(t)
                if bad:
                    raise ModelError(f"{src}: layer {l.name!r} ({kind}): {k} has {bad}")
        for f in dataclasses.fields(l):
            v = getattr(l, f.name, None)
            if isinstance(v, float) and not math.isfinite(v):
                raise ModelError(f"{src}: layer {l.name!r} ({kind}): {f.name} is {v} (must be finite)")
        if isinstance(l, (Linear, Conv2d)) and tuple(l.bias.shape) != (l.weight.shape[0],):
            raise ModelError(f"{src}: layer {l.name!r} ({kind}): bias of shape {tuple(l.bias.shape)} for "
                             f"{l.weight.shape[0]} outputs (expected ({l.weight.shape[0]},))")
    if math.prod(net.input_shape) == 0:
        raise ModelError(f"{src}: the input shape {net.input_shape} has no values")
    for l, shape in zip(net.layers, net.shapes[1:], strict=True):
        if math.prod(shape) == 0:
            what = "the output" if l is net.layers[-1] else f"layer {l.name!r} ({kind})"
            raise ModelError(f"{src}: {what} has shape {shape}: an empty tensor"
                             + (" (0 classes)" if l is net.layers[-1] else ""))
    return net
