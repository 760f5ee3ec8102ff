"""Model loading: ONNX files, TorchScript files and ``nn.Module`` objects → :class:`Network`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from verigrad.models.network import ModelError, Network, chain
from verigrad.models.onnx_loader import channel_affine_layer, load_onnx
from verigrad.models.torch_loader import from_module, load_torchscript

__all__ = [
    "ModelError",
    "Network",
    "add_normalization",
    "from_module",
    "load_model",
    "load_onnx",
    "load_torchscript",
]

_ONNX_EXT = (".onnx",)
_TORCHSCRIPT_EXT = (".pt", ".pth", ".ts")


def add_normalization(net: Network, mean: Sequence[float], std: Sequence[float]) -> Network:
    """Prepend a fixed layer x ↦ (x − mean)/std per channel (``perturbable=False``).

    A 1x1 Conv2d with diagonal weights for (C, H, W) inputs, a diagonal Linear for flat
    (n,) ones (each feature a channel). ``mean``/``std`` have length 1 or C; std > 0.
    """
    shape = net.input_shape
    c = shape[0]
    m = np.asarray(mean, np.float64).reshape(-1)
    s = np.asarray(std, np.float64).reshape(-1)
    for what, v in (("mean", m), ("std", s)):
        if v.size not in (1, c):
            raise ModelError(f"{net.source}: normalization {what} has {v.size} values; the input {shape} has {c} channels")
    if np.any(~(s > 0)):
        raise ModelError(f"{net.source}: normalization std must be > 0, got {s.tolist()}")
    name = "input/normalize"
    k = 1
    while any(l.name == name for l in net.layers):
        name = f"input/normalize_{k}"
        k += 1
    # (x − m)/s = (1/s)·x − m/s
    layer = channel_affine_layer(name, 1.0 / s, -m / s, shape, net.dtype)
    out = chain((layer, *net.layers), shape, net.source)
    return out if net.device.type == "cpu" else out.to(device=net.device)


def load_model(
    source: str | Path | nn.Module,
    input_shape: Sequence[int] | None = None,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Network:
    """Load a model as a :class:`Network`, optionally prepending input normalization.

    ``source``: an ``nn.Module`` (``input_shape`` required), a ``.onnx`` file
    (``input_shape`` optional, taken from the file) or a TorchScript file ``.pt``/``.pth``/
    ``.ts`` (``input_shape`` required). ``normalization`` = (mean, std) per channel.
    """
    if isinstance(source, nn.Module):
        if input_shape is None:
            raise ModelError(f"{type(source).__name__}: input_shape is required for an nn.Module")
        net = from_module(source, input_shape)
    else:
        path = Path(source)
        ext = path.suffix.lower()
        if ext not in _ONNX_EXT + _TORCHSCRIPT_EXT:
            raise ModelError(
                f"{path}: unrecognised model file extension {ext or '(none)'!r}; accepted: "
                f"{', '.join(_ONNX_EXT)} (ONNX), {', '.join(_TORCHSCRIPT_EXT)} (TorchScript)"
            )
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        if ext in _ONNX_EXT:
            net = load_onnx(path, input_shape)
        else:
            if input_shape is None:
                raise ModelError(f"{path.name}: input_shape is required for a TorchScript model")
            net = load_torchscript(path, input_shape)
    if normalization is not None:
        mean, std = normalization
        net = add_normalization(net, mean, std)
    return net
