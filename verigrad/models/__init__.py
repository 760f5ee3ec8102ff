"""Model loading: ONNX files, TorchScript files and ``nn.Module`` objects → :class:`Network`."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn

from verigrad.models.network import INPUT, ModelError, Network, check_loaded, named_error
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
    try:
        layer = channel_affine_layer(name, 1.0 / s, -m / s, shape, net.dtype)
    except ModelError as e:
        raise named_error(e, net.source) from None
    # nodes reading the network input now read the normalized input
    rest = tuple(l.renamed(inputs=[name if i == INPUT else i for i in l.inputs]) if INPUT in l.inputs else l
                 for l in net.layers)
    out = check_loaded(Network((layer, *rest), shape, net.source, net.notes))
    return out if net.device.type == "cpu" else out.to(device=net.device)


def load_model(
    source: str | Path | nn.Module,
    input_shape: Sequence[int] | None = None,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    output: str | int | None = None,
) -> Network:
    """Load a model as a :class:`Network`, optionally prepending input normalization.

    ``source``: an ``nn.Module`` (``input_shape`` required), a ``.onnx`` file
    (``input_shape`` optional, taken from the file) or a TorchScript file ``.pt``/``.pth``/
    ``.ts`` (``input_shape`` required). ``normalization`` = (mean, std) per channel.
    ``output`` chooses the logits among several outputs of an ONNX/TorchScript model (an
    output name or an index; see :func:`load_onnx`).
    """
    if isinstance(source, nn.Module):
        if output is not None:
            raise ModelError(f"{type(source).__name__}: output selection applies to ONNX and TorchScript files; "
                             "for an nn.Module wrap it so that forward returns the logits")
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
            net = load_onnx(path, input_shape, output)
        else:
            if input_shape is None:
                raise ModelError(f"{path.name}: input_shape is required for a TorchScript model")
            net = load_torchscript(path, input_shape, output=output)
    if normalization is not None:
        mean, std = normalization
        net = add_normalization(net, mean, std)
    return net
