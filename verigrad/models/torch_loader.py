"""``nn.Module`` and TorchScript → :class:`~verigrad.models.network.Network`.

One converter, :func:`module_network`, serves two callers:

* :func:`from_module` (``live=False``): a detached float64 copy for verification. An
  ``nn.Sequential`` (nested Sequentials flattened) of standard layers is walked directly and
  its layer names are the module paths (``"0"``, ``"features.3"``), as in its ``state_dict``;
  every tensor is built in float64 on the CPU, derived constants (BatchNorm folding) computed
  in float64 from the module's values (the caller casts with ``net.to(dtype)``). Anything
  else — a custom ``forward`` (e.g. a residual block), a custom layer inside a Sequential, a
  TorchScript file — is exported to ONNX in memory (legacy TorchScript exporter,
  ``dynamo=False``) and lowered by :mod:`verigrad.models.onnx_loader`; layer names are then
  ONNX node names.
* training's :func:`~verigrad.training.regularizers.network_from_module` (``live=True``): a
  live view whose nodes hold the module's own ``nn.Parameter`` tensors (no copy, detach or
  cast), so saliency and bounds computed on it back-propagate into the module and follow
  optimiser updates. Only an ``nn.Sequential`` of torch.nn layers can be viewed; layers that
  would need constants derived from trainable parameters (BatchNorm) and active Dropout are
  refused, naming the layer.

Walked layers: Linear, Conv2d (zero padding, groups 1, dilation 1), Flatten / Unflatten,
ReLU, LeakyReLU, Softplus, Sigmoid, Tanh, PReLU, MaxPool2d (dilation 1), AvgPool2d,
AdaptiveAvgPool2d (output sizes dividing the input), BatchNorm1d/2d (``live=False`` only:
folded into a preceding Linear/Conv2d, else a fixed per-channel affine layer), Identity and
Dropout (no-ops at inference), and a final Softmax over the classes (stripped, with a note:
the logits are its input).
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

from verigrad.models.network import (
    ActKind, Activation, Conv2d, Layer, Linear, MaxPool, ModelError, Network, PReLU, Reshape, check_loaded,
    named_error, one_line,
)
from verigrad.models.onnx_loader import (
    avgpool_layer,
    bn_scale_shift,
    channel_affine_layer,
    fold_channel_affine,
    from_onnx_model,
)

__all__ = ["LayerRefused", "from_module", "load_torchscript", "module_network"]

# Modules that change nothing at inference.
_NOOP = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_KNOWN = (
    nn.Linear, nn.Conv2d, nn.Flatten, nn.Unflatten, nn.ReLU, nn.LeakyReLU, nn.Softplus, nn.Sigmoid,
    nn.Tanh, nn.PReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.Softmax, *_NOOP,
)
_KNOWN_NAMES = ", ".join(sorted({k.__name__ for k in _KNOWN}))


class LayerRefused(ModelError):
    """A module layer the converter cannot represent: ``path`` (its module path), ``kind``
    (its class name) and ``reason`` are kept apart so callers can phrase their own error."""

    def __init__(self, source: str, path: str, kind: str, reason: str) -> None:
        super().__init__(f"{source}: layer {path!r} ({kind}): {reason}")
        self.source, self.path, self.kind, self.reason = source, path, kind, reason


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
    """Lowers the leaves of an ``nn.Sequential`` one by one (see the module docstring).

    ``live``: node tensors are the module's parameters themselves and fixed constants are made
    in ``dtype`` on ``device`` (the module's); otherwise everything is a float64 CPU copy."""

    def __init__(self, input_shape: tuple[int, ...], source: str, live: bool,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> None:
        self.shape = input_shape
        self.source = source
        self.live = live
        self.dtype = dtype if live else torch.float64
        self.device = torch.device(device) if live else torch.device("cpu")
        self.layers: list[Layer] = []
        self.notes: list[str] = []
        self.fresh_affine = False  # last layer is a user Linear/Conv2d with nothing after it

    # -- helpers -----------------------------------------------------------------------
    def refuse(self, name: str, m: nn.Module, reason: str) -> LayerRefused:
        return LayerRefused(self.source, name, type(m).__name__, reason)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A module tensor as a node holds it: itself (live) or a detached float64 CPU copy."""
        if self.live:
            return t
        return t.detach().to(device="cpu", dtype=torch.float64).clone()

    def const(self, t: torch.Tensor) -> torch.Tensor:
        """A synthesised constant in the walker's dtype and device."""
        return t.to(device=self.device, dtype=self.dtype)

    def fixed(self, layer: Layer) -> Layer:
        """A synthesised layer (pooling weights) moved to the walker's device."""
        return layer if self.device.type == "cpu" else layer.cast(lambda t: t.to(device=self.device))

    def bias(self, m: nn.Linear | nn.Conv2d, n: int) -> torch.Tensor:
        if m.bias is not None:
            return self.tensor(m.bias)
        # a bias-free layer gets a constant zero bias (nothing to train there)
        return self.const(torch.zeros(n, dtype=torch.float64))

    def emit(self, layer: Layer, fresh: bool = False) -> None:
        self.shape = tuple(layer.out_shape([self.shape]))
        self.layers.append(layer)
        self.fresh_affine = fresh

    # -- the walk ----------------------------------------------------------------------
    def walk(self, leaves: Sequence[tuple[str, nn.Module]]) -> None:
        # the last module that does anything (trailing Identity / Dropout do not count)
        last = max((i for i, (_, m) in enumerate(leaves) if not isinstance(m, _NOOP)), default=-1)
        for i, (name, m) in enumerate(leaves):
            if isinstance(m, nn.Softmax):
                self._softmax(name, m, final=i == last)
            else:
                self.add(name, m)

    def add(self, name: str, m: nn.Module) -> None:
        if isinstance(m, _DROPOUT):
            if self.live and m.p > 0:
                raise self.refuse(name, m, f"p={m.p} is random during training, which a live view cannot "
                                           "reproduce (use p=0 or remove it)")
            return
        if isinstance(m, _NOOP):
            return
        if isinstance(m, nn.Linear):
            self.emit(Linear(name, self.tensor(m.weight), self.bias(m, m.out_features)), fresh=True)
        elif isinstance(m, nn.Conv2d):
            self.emit(self._conv(name, m), fresh=True)
        elif isinstance(m, (nn.Flatten, nn.Unflatten)):
            # a pure row-major reshape: run it on a batch of 2 to read the per-sample shape
            try:
                out = m(torch.zeros(2, *self.shape))
            except RuntimeError as e:
                raise self.refuse(name, m, f"cannot apply to per-sample shape {self.shape} ({one_line(e)})") from None
            if out.shape[0] != 2:
                raise self.refuse(name, m, "mixes the batch dimension")
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
        elif isinstance(m, nn.PReLU):
            self._prelu(name, m)
        elif isinstance(m, nn.MaxPool2d):
            self._maxpool(name, m)
        elif isinstance(m, nn.AvgPool2d):
            self._avgpool(name, m)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self._adaptive_avgpool(name, m)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self._batchnorm(name, m)
        else:
            raise self.refuse(name, m, f"not supported; supported: {_KNOWN_NAMES}")

    def _conv(self, name: str, m: nn.Conv2d) -> Conv2d:
        if m.groups != 1 or _pair(m.dilation) != (1, 1):
            raise self.refuse(name, m, f"groups={m.groups}, dilation={m.dilation} not supported (need 1, 1)")
        if m.padding_mode != "zeros":
            raise self.refuse(name, m, f"padding_mode={m.padding_mode!r} not supported (need 'zeros')")
        if m.padding == "valid":
            pad = (0, 0)
        elif m.padding == "same":
            kh, kw = m.kernel_size
            if kh % 2 == 0 or kw % 2 == 0:
                raise self.refuse(name, m, "padding='same' with an even kernel is asymmetric; not supported")
            pad = (kh // 2, kw // 2)
        else:
            assert not isinstance(m.padding, str)  # "valid" / "same" handled above
            pad = _pair(m.padding)
        return Conv2d(name, self.tensor(m.weight), self.bias(m, m.out_channels), _pair(m.stride), pad)

    def _needs_image(self, name: str, m: nn.Module) -> None:
        if len(self.shape) != 3:
            raise self.refuse(name, m, f"needs input (C, H, W), got {self.shape}")

    def _prelu(self, name: str, m: nn.PReLU) -> None:
        n = m.num_parameters
        if n == 1:
            slope = self.tensor(m.weight)  # shape (1,): broadcasts against any shape
        else:
            if not self.shape or self.shape[0] != n:
                raise self.refuse(name, m, f"{n} slopes for input of shape {self.shape} (need {n} channels first)")
            # one slope per channel (dim 1 of the batch): (C, 1, …, 1); reshape is a view, so a
            # live view still reads (and back-propagates into) the module's parameter
            slope = self.tensor(m.weight).reshape(n, *([1] * (len(self.shape) - 1)))
        self.emit(PReLU(name, slope))

    def _maxpool(self, name: str, m: nn.MaxPool2d) -> None:
        if _pair(m.dilation) != (1, 1):
            raise self.refuse(name, m, f"dilation={m.dilation} not supported (need 1)")
        if m.return_indices:
            raise self.refuse(name, m, "return_indices=True not supported")
        self._needs_image(name, m)
        kernel = _pair(m.kernel_size)
        stride = _pair(m.stride) if m.stride is not None and m.stride != () else kernel
        ph, pw = _pair(m.padding)
        self.emit(MaxPool(name, kernel, stride, (ph, pw, ph, pw), bool(m.ceil_mode)))

    def _avgpool(self, name: str, m: nn.AvgPool2d) -> None:
        pad = _pair(m.padding)
        if m.ceil_mode:
            raise self.refuse(name, m, "ceil_mode=True not supported")
        if m.divisor_override is not None:
            raise self.refuse(name, m, "divisor_override not supported")
        if any(pad) and not m.count_include_pad:
            raise self.refuse(name, m, "padding with count_include_pad=False not supported")
        self._needs_image(name, m)
        kernel = _pair(m.kernel_size)
        stride = _pair(m.stride if m.stride is not None else m.kernel_size)
        layer = avgpool_layer(f"{name}/avgpool", self.shape[0], kernel, stride, pad, self.dtype)
        self.emit(self.fixed(layer))

    def _adaptive_avgpool(self, name: str, m: nn.AdaptiveAvgPool2d) -> None:
        """An output size dividing the input size: windows of size n/out, stride n/out (exactly
        torch's adaptive windows then), as a fixed average conv."""
        self._needs_image(name, m)
        c, h, w = self.shape
        size = m.output_size
        oh, ow = (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[arg-type]
        oh, ow = h if oh is None else int(oh), w if ow is None else int(ow)
        if h % oh or w % ow:
            raise self.refuse(name, m, f"output size {(oh, ow)} does not divide the input size {(h, w)}")
        kernel = (h // oh, w // ow)
        self.emit(self.fixed(avgpool_layer(f"{name}/avgpool", c, kernel, kernel, (0, 0), self.dtype)))

    def _batchnorm(self, name: str, m: nn.modules.batchnorm._BatchNorm) -> None:
        if self.live:
            raise self.refuse(name, m, "BatchNorm needs constants derived from its trainable parameters and "
                                       "running statistics (folding), which a live view cannot hold; train "
                                       "without BatchNorm, or load the trained module with from_module")
        if m.running_mean is None or m.running_var is None:
            raise self.refuse(name, m, "has no running statistics")
        c = m.num_features
        gamma = m.weight.detach().double().cpu().numpy() if m.weight is not None else np.ones(c)
        beta = m.bias.detach().double().cpu().numpy() if m.bias is not None else np.zeros(c)
        mean = m.running_mean.detach().double().cpu().numpy()
        var = m.running_var.detach().double().cpu().numpy()
        s, t = bn_scale_shift(gamma, beta, mean, var, m.eps)
        if self.fresh_affine:
            # exact: W' = W·s, b' = (b − mean)·s + β, in float64
            last = self.layers[-1]
            assert isinstance(last, (Linear, Conv2d))  # fresh_affine: the last layer is affine
            self.layers[-1] = fold_channel_affine(last, s, t)
            self.fresh_affine = False
            return
        if not self.shape or self.shape[0] != c:
            raise self.refuse(name, m, f"{c} features for input of shape {self.shape}")
        self.emit(channel_affine_layer(f"{name}/batchnorm", s, t, self.shape, self.dtype))

    def _softmax(self, name: str, m: nn.Softmax, final: bool) -> None:
        if not final:
            raise self.refuse(name, m, "Softmax is supported only as the last layer (it is stripped there: "
                                       "the logits are its input)")
        if len(self.shape) != 1 or m.dim not in (None, 1, -1):
            raise self.refuse(name, m, f"a final Softmax must run over the classes (dim=1 or -1 of a flat "
                                       f"output); got dim={m.dim} for per-sample shape {self.shape}")
        self.notes.append(f"final Softmax {name!r} stripped: the logits are its input (explain the "
                          f"probabilities with output 'probability')")


def _module_dtype(module: nn.Module) -> torch.dtype:
    for p in list(module.parameters()) + list(module.buffers()):
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _module_device(module: nn.Module) -> torch.device:
    for p in list(module.parameters()) + list(module.buffers()):
        return p.device
    return torch.device("cpu")


def _walkable(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and not isinstance(module, torch.jit.ScriptModule)


def _is_builtin(m: nn.Module) -> bool:
    """A layer class of torch.nn itself (as opposed to a user's custom module)."""
    return type(m).__module__.startswith("torch.nn.")


def _exc_line(e: BaseException) -> str:
    """``Type: first meaningful line`` of an exception from torch (no pasted TorchScript trace)."""
    line = one_line(e)
    if not line:
        return type(e).__name__
    return line if line.split(":", 1)[0].endswith(("Error", "Exception")) else f"{type(e).__name__}: {line}"


def _via_onnx(module: nn.Module, input_shape: tuple[int, ...], source: str,
              output: str | int | None = None) -> Network:
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
                module, (dummy,), buf,  # type: ignore[arg-type]  # torch accepts a file object
                dynamo=False, input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    except Exception as e:
        raise ModelError(f"{source}: could not export to ONNX for conversion: {_exc_line(e)}") from e
    finally:
        module.train(was_training)
    return from_onnx_model(onnx.load_from_string(buf.getvalue()), input_shape, f"{source} (via ONNX export)", output)


def module_network(module: nn.Module, input_shape: Sequence[int], *, live: bool,
                   source: str | None = None) -> Network:
    """The one ``nn.Module`` → :class:`Network` converter (see the module docstring).

    ``live=False``: a detached float64 CPU copy (inference semantics: Dropout off, BatchNorm
    running statistics folded in float64); a module that is not a walkable Sequential goes
    through an in-memory ONNX export. ``live=True``: a view whose nodes hold the module's own
    parameters (an ``nn.Sequential`` of torch.nn layers only; BatchNorm and active Dropout
    refused). Raises :class:`LayerRefused` (a :class:`ModelError`) naming the offending layer.
    """
    name = type(module).__name__
    if source is None:
        source = f"<{name} view>" if live else name
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ModelError(f"{source}: input_shape must be a sequence of ints, got {input_shape!r}") from None
    try:
        net = _module_network(module, shape, live, source)
    except ModelError as e:
        raise named_error(e, source) from e.__cause__
    # a live view follows the module's training: only a copy is checked once, here
    return net if live else check_loaded(net)


def _module_network(module: nn.Module, shape: tuple[int, ...], live: bool, source: str) -> Network:
    name = type(module).__name__
    if _walkable(module):
        leaves = list(_leaves(module))
        custom = [(n, m) for n, m in leaves if not isinstance(m, _KNOWN) and not _is_builtin(m)]
        if not custom:
            if live:
                walker = _SequentialWalker(shape, source, True, _module_dtype(module), _module_device(module))
            else:
                walker = _SequentialWalker(shape, source, False)
            walker.walk(leaves)  # an unsupported torch.nn layer raises here, named
            return Network(tuple(walker.layers), shape, source, tuple(walker.notes))
        path, m = custom[0]
        if live:
            raise LayerRefused(source, path, type(m).__name__, "a custom module cannot be viewed live (only "
                               "torch.nn layers of an nn.Sequential)")
        source = f"{source} (custom layer {path!r}: {type(m).__name__})"
    elif live:
        raise ModelError(f"{source}: a live view needs an nn.Sequential of torch.nn layers, got {name}")
    return _via_onnx(module, shape, source)


def from_module(module: nn.Module, input_shape: Sequence[int]) -> Network:
    """Lower an ``nn.Module`` (inference semantics: Dropout off, BatchNorm running stats).

    ``input_shape`` is per sample, e.g. (1, 28, 28). An ``nn.Sequential`` of supported
    layers is walked directly (names: module paths; a float64 network, cast it with
    ``net.to(dtype)``); other modules go through an in-memory ONNX export (names: ONNX node
    names). Raises :class:`ModelError` naming the offending module or op.
    """
    return module_network(module, input_shape, live=False)


def load_torchscript(path: str | Path, input_shape: Sequence[int], output: str | int | None = None) -> Network:
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
            f"{path.name}: not a TorchScript archive ({_exc_line(e)}); a module saved with "
            "torch.save must be loaded by your code and passed to from_module"
        ) from e
    if not isinstance(module, nn.Module):
        raise ModelError(f"{path.name}: the TorchScript archive holds a {type(module).__name__}, not a module")
    module.eval()
    return _via_onnx(module, tuple(int(s) for s in input_shape), path.name, output)
