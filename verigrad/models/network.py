"""verigrad's network representation: a chain of layers, each with its concrete forward
and its gradient-graph (transpose) rule side by side.

Every supported source (ONNX, TorchScript, ``nn.Module``) is lowered to a :class:`Network`:
a tuple of :class:`Linear`, :class:`Conv2d`, :class:`Reshape` and :class:`Activation`
layers. Input normalization, BatchNorm and AvgPool are lowered to these by the loaders
(normalization and un-foldable BatchNorm become a fixed 1x1 conv, AvgPool a fixed conv),
so bound engines only ever see four layer kinds.

Shapes are per sample: a batch dimension is always prepended at run time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator, Sequence, Union

import torch
import torch.nn.functional as F


class ModelError(ValueError):
    """A model that verigrad cannot represent (unsupported op, bad shapes, non-chain graph)."""


class ActKind(str, Enum):
    RELU = "relu"
    LEAKY_RELU = "leaky_relu"
    SOFTPLUS = "softplus"
    SIGMOID = "sigmoid"
    TANH = "tanh"


@dataclass(frozen=True, eq=False)
class Linear:
    """y = x Wᵀ + b with W of shape (out, in). Gradient rule: g_in = g_out W."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor
    # False for layers verigrad synthesised (normalization, pooling): never in a parameter box.
    perturbable: bool = True

    def __post_init__(self) -> None:
        if self.weight.dim() != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ModelError(
                f"layer {self.name!r}: Linear needs weight (out, in) and bias (out,), got "
                f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}"
            )

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if in_shape != (self.weight.shape[1],):
            raise ModelError(
                f"layer {self.name!r}: Linear expects input of {self.weight.shape[1]} features, "
                f"the previous layer gives shape {in_shape}"
            )
        return (self.weight.shape[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def backward(self, g: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
        return g @ self.weight


@dataclass(frozen=True, eq=False)
class Conv2d:
    """y = conv2d(x, W, b, stride, zero padding). Gradient rule: a padding-0 transposed
    convolution (output_padding covering rows the forward never read), then a crop of the
    padding: exact, and supported by auto_LiRPA."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    perturbable: bool = True

    def __post_init__(self) -> None:
        if self.weight.dim() != 4 or self.bias.shape != (self.weight.shape[0],):
            raise ModelError(
                f"layer {self.name!r}: Conv2d needs weight (out, in, kh, kw) and bias (out,), got "
                f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}"
            )

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) != 3 or in_shape[0] != self.weight.shape[1]:
            raise ModelError(
                f"layer {self.name!r}: Conv2d expects input (C={self.weight.shape[1]}, H, W), "
                f"the previous layer gives shape {in_shape}"
            )
        _, h, w = in_shape
        kh, kw = self.weight.shape[2:]
        oh = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - kw) // self.stride[1] + 1
        if oh < 1 or ow < 1:
            raise ModelError(f"layer {self.name!r}: kernel larger than padded input {in_shape}")
        return (self.weight.shape[0], oh, ow)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def output_padding(self, in_shape: tuple[int, ...]) -> tuple[int, int]:
        """Rows/cols of the padded input the forward never read (the stride remainder,
        always < stride): the transpose must give them zero gradient."""
        _, h, w = in_shape
        _, oh, ow = self.out_shape(in_shape)
        kh, kw = self.weight.shape[2:]
        return (
            h + 2 * self.padding[0] - ((oh - 1) * self.stride[0] + kh),
            w + 2 * self.padding[1] - ((ow - 1) * self.stride[1] + kw),
        )

    def backward(self, g: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
        return conv_transpose(g, self.weight, self.stride, self.padding, self.output_padding(in_shape), in_shape)


def conv_transpose(
    g: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    output_padding: tuple[int, int],
    in_shape: tuple[int, ...],
) -> torch.Tensor:
    """Wᵀ g for a zero-padded conv: a padding-0 transposed conv over the padded input,
    then a crop of the padding (auto_LiRPA supports only padding-0 ConvTranspose)."""
    _, h, w = in_shape
    full = F.conv_transpose2d(g, weight, None, stride, 0, output_padding)
    return full[:, :, padding[0] : padding[0] + h, padding[1] : padding[1] + w]


@dataclass(frozen=True, eq=False)
class Reshape:
    """Per-sample reshape (Flatten is Reshape to (n,)). Gradient rule: reshape back."""

    name: str
    shape: tuple[int, ...]

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if math.prod(in_shape) != math.prod(self.shape):
            raise ModelError(
                f"layer {self.name!r}: cannot reshape {in_shape} ({math.prod(in_shape)} values) "
                f"to {self.shape}"
            )
        return self.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def backward(self, g: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
        return g.reshape(g.shape[0], *in_shape)


@dataclass(frozen=True, eq=False)
class Activation:
    """Elementwise σ. ``param`` is the negative slope (leaky_relu) or β (softplus).
    Gradient rule: g_in = σ'(z) ⊙ g_out, z the pre-activation."""

    name: str
    kind: ActKind
    param: float = 0.0

    def __post_init__(self) -> None:
        if self.kind == ActKind.SOFTPLUS and not self.param > 0:
            raise ModelError(f"layer {self.name!r}: softplus needs beta > 0, got {self.param}")
        if self.kind == ActKind.LEAKY_RELU and not 0.0 <= self.param <= 1.0:
            raise ModelError(
                f"layer {self.name!r}: leaky_relu negative slope must lie in [0, 1], got {self.param}"
            )

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        return in_shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == ActKind.RELU:
            return torch.relu(z)
        if k == ActKind.LEAKY_RELU:
            return F.leaky_relu(z, self.param)
        if k == ActKind.SOFTPLUS:
            # exact log(1 + exp(βz))/β (torch's Softplus switches to z above βz > 20; the
            # difference is below 1e-9 and we certify the exact function)
            return F.softplus(z * self.param) / self.param
        if k == ActKind.SIGMOID:
            return torch.sigmoid(z)
        if k == ActKind.TANH:
            return torch.tanh(z)
        raise ModelError(f"layer {self.name!r}: unsupported activation {k}")

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        """σ'(z), with relu'(0) = 0 as autograd has it."""
        k = self.kind
        if k == ActKind.RELU:
            return (z > 0).to(z.dtype)
        if k == ActKind.LEAKY_RELU:
            return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, self.param))
        if k == ActKind.SOFTPLUS:
            return torch.sigmoid(self.param * z)
        if k == ActKind.SIGMOID:
            s = torch.sigmoid(z)
            return s * (1 - s)
        if k == ActKind.TANH:
            t = torch.tanh(z)
            return 1 - t * t
        raise ModelError(f"layer {self.name!r}: unsupported activation {k}")

    def derivative_bounds(self, zl: torch.Tensor, zu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interval of σ'(z) for z ∈ [zl, zu]. relu/leaky/softplus: σ' is monotone
        nondecreasing, so [σ'(zl), σ'(zu)]. sigmoid/tanh: σ' is unimodal with its peak at 0:
        the minimum is at the endpoint farthest from 0, the maximum is σ'(0) if 0 ∈ [zl, zu],
        else at the endpoint nearest 0."""
        k = self.kind
        if k in (ActKind.RELU, ActKind.LEAKY_RELU, ActKind.SOFTPLUS):
            return self.derivative(zl), self.derivative(zu)
        if k in (ActKind.SIGMOID, ActKind.TANH):
            dl, du = self.derivative(zl), self.derivative(zu)
            peak = 0.25 if k == ActKind.SIGMOID else 1.0
            contains0 = (zl <= 0) & (zu >= 0)
            upper = torch.where(contains0, torch.full_like(dl, peak), torch.maximum(dl, du))
            return torch.minimum(dl, du), upper
        raise ModelError(f"layer {self.name!r}: unsupported activation {k}")


Layer = Union[Linear, Conv2d, Reshape, Activation]
AffineLayer = Union[Linear, Conv2d]


@dataclass(frozen=True, eq=False)
class Network:
    """A chain of layers ending in an affine layer that produces the logits.

    ``input_shape`` is per sample, e.g. (1, 28, 28) or (784,). ``source`` names the file or
    object it was loaded from, for error messages.
    """

    layers: tuple[Layer, ...]
    input_shape: tuple[int, ...]
    source: str = "<module>"
    shapes: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ModelError(f"{self.source}: the network has no layers")
        shapes = [tuple(self.input_shape)]
        for layer in self.layers:
            shapes.append(tuple(layer.out_shape(shapes[-1])))
        object.__setattr__(self, "shapes", tuple(shapes))
        last = self.layers[-1]
        if not isinstance(last, (Linear, Conv2d)):
            raise ModelError(
                f"{self.source}: the last layer must be affine (it produces the logits); "
                f"it is {type(last).__name__} {last.name!r}"
            )
        names = [l.name for l in self.layers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ModelError(f"{self.source}: duplicate layer names {sorted(dup)}")

    @property
    def num_classes(self) -> int:
        return math.prod(self.shapes[-1])

    @property
    def dtype(self) -> torch.dtype:
        return next(l.weight.dtype for l in self.layers if isinstance(l, (Linear, Conv2d)))

    @property
    def device(self) -> torch.device:
        return next(l.weight.device for l in self.layers if isinstance(l, (Linear, Conv2d)))

    def affine_layers(self) -> Iterator[AffineLayer]:
        return (l for l in self.layers if isinstance(l, (Linear, Conv2d)))

    def layer(self, name: str) -> Layer:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (B, num_classes)."""
        for layer in self.layers:
            x = layer.forward(x)
        return x.reshape(x.shape[0], -1)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Network":
        """A copy with every tensor cast / moved."""

        def cv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        new: list[Layer] = []
        for l in self.layers:
            if isinstance(l, Linear):
                new.append(Linear(l.name, cv(l.weight), cv(l.bias), l.perturbable))
            elif isinstance(l, Conv2d):
                new.append(Conv2d(l.name, cv(l.weight), cv(l.bias), l.stride, l.padding, l.perturbable))
            else:
                new.append(l)
        return Network(tuple(new), self.input_shape, self.source)


def chain(layers: Sequence[Layer], input_shape: Sequence[int], source: str = "<module>") -> Network:
    """Build a :class:`Network`, validating shapes layer by layer."""
    return Network(tuple(layers), tuple(int(s) for s in input_shape), source)
