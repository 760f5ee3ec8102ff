"""``nn.Module`` and TorchScript → :class:`~verigrad.models.network.Network`.

An ``nn.Sequential`` (nested Sequentials flattened) of standard layers is walked directly, and
its layer names are the module paths (``"0"``, ``"features.3"``), as in its ``state_dict``.
Anything else — a custom ``forward``, a custom layer inside a Sequential, a TorchScript
file — is exported to ONNX in memory (legacy TorchScript exporter, ``dynamo=False``) and
lowered by :mod:`verigrad.models.onnx_loader`; layer names are then ONNX node names.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from verigrad.models.network import ActKind, Activation, Conv2d, Layer, Linear, ModelError, Network, Reshape, chain
from verigrad.models.onnx_loader import (
    avgpool_layer,
    bn_scale_shift,
    channel_affine_layer,
    fold_channel_affine,
    from_onnx_model,
)

# Modules that change nothing at inference.
_NOOP = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_KNOWN = (
    nn.Linear, nn.Conv2d, nn.Flatten, nn.Unflatten, nn.ReLU, nn.LeakyReLU, nn.Softplus, nn.Sigmoid,
    nn.Tanh, nn.AvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d, *_NOOP,
)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of a Sequential's layers, nested Sequentials flattened."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, path + ".")
        else:
            yield path, child


class _SequentialWalker:
    def __init__(self, input_shape: tuple[int, ...], dtype: torch.dtype, source: str) -> None:
        self.shape = input_shape
        self.dtype = dtype
        self.source = source
        self.layers: list[Layer] = []
        self.fresh_affine = False  # last layer is a user Linear/Conv2d with nothing after it

    def emit(self, layer: Layer, fresh: bool = False) -> None:
        self.shape = tuple(layer.out_shape(self.shape))
        self.layers.append(layer)
        self.fresh_affine = fresh

    def add(self, name: str, m: nn.Module) -> None:
        d = self.dtype
        if isinstance(m, _NOOP):
            return
        if isinstance(m, nn.Linear):
            b = m.bias.detach().to(d) if m.bias is not None else torch.zeros(m.out_features, dtype=d)
            self.emit(Linear(name, m.weight.detach().to(d).clone(), b.clone()), fresh=True)
        elif isinstance(m, nn.Conv2d):
            self.emit(self._conv(name, m), fresh=True)
        elif isinstance(m, (nn.Flatten, nn.Unflatten)):
            # a pure row-major reshape: run it on a batch of 2 to read the per-sample shape
            out = m(torch.zeros(2, *self.shape))
            if out.shape[0] != 2:
                raise ModelError(f"{self.source}: layer {name!r} ({type(m).__name__}) mixes the batch dimension")
            if tuple(out.shape[1:]) != self.shape:
                self.emit(Reshape(name, tuple(out.shape[1:])))
        elif isinstance(m, nn.ReLU):
            self.emit(Activation(name, ActKind.RELU))
        elif isinstance(m, nn.LeakyReLU):
            self.emit(Activation(name, ActKind.LEAKY_RELU, float(m.negative_slope)))
        elif isinstance(m, nn.Softplus):
            # torch switches to the identity above β·z > threshold; we use the exact function
            # (|difference| ≤ log(1+e^-threshold)/β, 2e-9/β for the default threshold 20)
            self.emit(Activation(name, ActKind.SOFTPLUS, float(m.beta)))
        elif isinstance(m, nn.Sigmoid):
            self.emit(Activation(name, ActKind.SIGMOID))
        elif isinstance(m, nn.Tanh):
            self.emit(Activation(name, ActKind.TANH))
        elif isinstance(m, nn.AvgPool2d):
            self._avgpool(name, m)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self._batchnorm(name, m)
        else:
            raise ModelError(
                f"{self.source}: unsupported module {name!r} ({type(m).__name__}); supported: "
                f"{', '.join(sorted({k.__name__ for k in _KNOWN}))}"
            )

    def _conv(self, name: str, m: nn.Conv2d) -> Conv2d:
        what = f"{self.source}: layer {name!r} (Conv2d)"
        if m.groups != 1 or _pair(m.dilation) != (1, 1):
            raise ModelError(f"{what}: groups={m.groups}, dilation={m.dilation} not supported (need 1, 1)")
        if m.padding_mode != "zeros":
            raise ModelError(f"{what}: padding_mode={m.padding_mode!r} not supported (need 'zeros')")
        if m.padding == "valid":
            pad = (0, 0)
        elif m.padding == "same":
            kh, kw = m.kernel_size
            if kh % 2 == 0 or kw % 2 == 0:
                raise ModelError(f"{what}: padding='same' with an even kernel is asymmetric; not supported")
            pad = (kh // 2, kw // 2)
        else:
            pad = _pair(m.padding)  # type: ignore[arg-type]
        d = self.dtype
        b = m.bias.detach().to(d) if m.bias is not None else torch.zeros(m.out_channels, dtype=d)
        return Conv2d(name, m.weight.detach().to(d).clone(), b.clone(), _pair(m.stride), pad)

    def _avgpool(self, name: str, m: nn.AvgPool2d) -> None:
        what = f"{self.source}: layer {name!r} (AvgPool2d)"
        pad = _pair(m.padding)
        if m.ceil_mode:
            raise ModelError(f"{what}: ceil_mode=True not supported")
        if m.divisor_override is not None:
            raise ModelError(f"{what}: divisor_override not supported")
        if any(pad) and not m.count_include_pad:
            raise ModelError(f"{what}: padding with count_include_pad=False not supported")
        if len(self.shape) != 3:
            raise ModelError(f"{what}: needs input (C, H, W), got {self.shape}")
        kernel = _pair(m.kernel_size)
        stride = _pair(m.stride if m.stride is not None else m.kernel_size)
        self.emit(avgpool_layer(f"{name}/avgpool", self.shape[0], kernel, stride, pad, self.dtype))

    def _batchnorm(self, name: str, m: nn.modules.batchnorm._BatchNorm) -> None:
        if m.running_mean is None or m.running_var is None:
            raise ModelError(f"{self.source}: layer {name!r} ({type(m).__name__}) has no running statistics")
        c = m.num_features
        gamma = m.weight.detach().double().numpy() if m.weight is not None else np.ones(c)
        beta = m.bias.detach().double().numpy() if m.bias is not None else np.zeros(c)
        s, t = bn_scale_shift(gamma, beta, m.running_mean.double().numpy(), m.running_var.double().numpy(), m.eps)
        if self.fresh_affine:
            # exact: W' = W·s, b' = (b − mean)·s + β
            self.layers[-1] = fold_channel_affine(self.layers[-1], s, t)  # type: ignore[arg-type]
            self.fresh_affine = False
            return
        if self.shape[0] != c:
            raise ModelError(f"{self.source}: layer {name!r}: {c} features for input of shape {self.shape}")
        self.emit(channel_affine_layer(f"{name}/batchnorm", s, t, self.shape, self.dtype))


def _module_dtype(module: nn.Module) -> torch.dtype:
    for p in list(module.parameters()) + list(module.buffers()):
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _walkable(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and not isinstance(module, torch.jit.ScriptModule)


def _is_builtin(m: nn.Module) -> bool:
    """A layer class of torch.nn itself (as opposed to a user's custom module)."""
    return type(m).__module__.startswith("torch.nn.")


def _via_onnx(module: nn.Module, input_shape: tuple[int, ...], source: str) -> Network:
    """Export to ONNX in memory (legacy exporter) and lower that."""
    dtype = _module_dtype(module)
    # batch 2 with a dynamic batch axis: the batch size stays symbolic in the graph, so a
    # reshape that would mix samples is caught instead of being frozen for batch 1
    dummy = torch.zeros(2, *input_shape, dtype=dtype)
    buf = io.BytesIO()
    was_training = getattr(module, "training", False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation warning
            torch.onnx.export(
                module, (dummy,), buf, dynamo=False, input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    except Exception as e:
        raise ModelError(f"{source}: could not export to ONNX for conversion: {type(e).__name__}: {e}") from e
    finally:
        module.train(was_training)
    return from_onnx_model(onnx.load_from_string(buf.getvalue()), input_shape, f"{source} (via ONNX export)")


def from_module(module: nn.Module, input_shape: Sequence[int]) -> Network:
    """Lower an ``nn.Module`` (inference semantics: Dropout off, BatchNorm running stats).

    ``input_shape`` is per sample, e.g. (1, 28, 28). An ``nn.Sequential`` of supported
    layers is walked directly (names: module paths); other modules go through an in-memory
    ONNX export (names: ONNX node names). Raises :class:`ModelError` naming the offending
    module or op.
    """
    shape = tuple(int(s) for s in input_shape)
    source = type(module).__name__
    if _walkable(module):
        leaves = list(_leaves(module))
        custom = [(n, m) for n, m in leaves if not isinstance(m, _KNOWN) and not _is_builtin(m)]
        if not custom:
            walker = _SequentialWalker(shape, _module_dtype(module), source)
            for name, m in leaves:
                walker.add(name, m)  # an unsupported torch.nn layer raises here, named
            return chain(walker.layers, shape, source)
        source = f"{source} (custom layer {custom[0][0]!r}: {type(custom[0][1]).__name__})"
    return _via_onnx(module, shape, source)


def load_torchscript(path: str | Path, input_shape: Sequence[int]) -> Network:
    """Load a TorchScript archive (``torch.jit.save``) and lower it through ONNX export.

    ``input_shape`` (per sample) is required: TorchScript does not record it.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise ModelError(
            f"{path.name}: not a TorchScript archive ({type(e).__name__}); a module saved with "
            "torch.save must be loaded by your code and passed to from_module"
        ) from e
    module.eval()
    return _via_onnx(module, tuple(int(s) for s in input_shape), path.name)
