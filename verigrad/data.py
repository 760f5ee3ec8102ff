"""Datasets to certify on: built-in samples shipped with the package, or a user's ``.npz``.

A dataset is a pair ``(x, y)``: ``x`` a float tensor of shape (N, *input_shape) and ``y`` a
long tensor of N class labels. A user file is an ``.npz`` archive holding arrays named ``x``
and ``y`` (``numpy.savez(path, x=..., y=...)``); where labels are not needed
(``require_labels=False``) ``y`` may be left out and every label is then :data:`NO_LABEL`. Every problem with a file is reported as a
:class:`DataError` naming the file and what is wrong, so the CLI can show it as is.
"""
from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from verigrad.errors import UserError

__all__ = ["BUILTIN_DATASETS", "NO_LABEL", "DataError", "NPZ_ERRORS", "open_npz", "read_npz", "BuiltinDataset", "load_dataset", "describe"]


class DataError(UserError):
    """A dataset that cannot be loaded: unknown name, unreadable file, bad arrays or range."""


NO_LABEL = -1  # the label of every sample of a file without 'y' (no class is negative)

NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)  # what a bad .npz raises


def open_npz(path: str | Path) -> np.lib.npyio.NpzFile:
    """The .npz archive at ``path``, opened without unpickling (close it, e.g. ``with``);
    ValueError saying why for anything else: an empty or cut file, a single .npy array."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except EOFError:  # numpy's answer to an empty file
        raise ValueError("the file is empty") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"not an .npz archive ({e})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("a single .npy array, not an .npz archive")
    return loaded


def read_npz(path: str | Path, prefix: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of the .npz archive at ``path`` (those whose key starts with ``prefix``);
    ValueError as :func:`open_npz`, or for an entry that cannot be read."""
    archive = open_npz(path)
    try:
        with archive as z:
            return {k: z[k] for k in z.files if prefix is None or k.startswith(prefix)}
    except NPZ_ERRORS as e:
        raise ValueError(f"an entry cannot be read ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset shipped as package data under :mod:`verigrad.datasets`."""

    name: str
    resource: str  # file name inside the verigrad.datasets package
    description: str
    input_shape: tuple[int, ...]
    num_classes: int
    # The valid input range: certified boxes are clipped to it (MNIST pixels are in [0, 1]).
    domain: tuple[float, float]


_REGISTRY: dict[str, BuiltinDataset] = {
    "mnist_sample": BuiltinDataset(
        name="mnist_sample",
        resource="mnist_sample.npz",
        description=(
            "100 real MNIST test images, 10 per class, labels interleaved 0..9; pixels in [0, 1]; "
            "held out from the training of examples/models/*.onnx"
        ),
        input_shape=(1, 28, 28),
        num_classes=10,
        domain=(0.0, 1.0),
    ),
    "german_credit": BuiltinDataset(
        name="german_credit",
        resource="german_credit.npz",
        description=(
            "German credit (1000 applicants, 25 features in [0, 1], label 1 = good credit); feature 0 is "
            "sex (1 = female), 1 age; written by tools/make_german_credit.py"
        ),
        input_shape=(25,),
        num_classes=2,
        domain=(0.0, 1.0),
    ),
}

BUILTIN_DATASETS: tuple[str, ...] = tuple(sorted(_REGISTRY))


def builtin(name: str) -> BuiltinDataset:
    """The registry entry for a built-in dataset name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DataError(
            f"unknown built-in dataset {name!r}; available: {', '.join(BUILTIN_DATASETS)}"
        ) from None


def describe(name: str | None = None) -> str:
    """One line per built-in dataset (or just ``name``'s): name, shape, classes, description."""
    names = [builtin(name).name] if name is not None else list(BUILTIN_DATASETS)
    lines = []
    for n in names:
        d = _REGISTRY[n]
        shape = "×".join(map(str, d.input_shape))
        lines.append(f"{n}: inputs {shape} in [{d.domain[0]:g}, {d.domain[1]:g}], "
                     f"{d.num_classes} classes; {d.description}")
    return "\n".join(lines)


def load_dataset(
    name: str | None = None,
    path: str | Path | None = None,
    start: int = 0,
    end: int | None = None,
    *,
    require_labels: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load samples ``start:end`` of a built-in dataset (``name``) or an ``.npz`` file (``path``).

    Exactly one of ``name`` and ``path`` must be given. ``end=None`` means the last sample;
    unlike Python slicing, a range that does not fit the data is an error, not silently
    shortened, so a certificate never covers fewer samples than asked for.

    Returns ``x`` as a float tensor (float64 kept if the file stores float64, float32
    otherwise) and ``y`` as an int64 tensor; both are fresh, contiguous copies. With
    ``require_labels=False`` a file may hold ``x`` only; ``y`` is then all :data:`NO_LABEL`.

    Raises:
        DataError: unknown name, missing or unreadable file, missing ``x`` or ``y``, length
            mismatch, non-integer or negative labels, non-finite inputs, bad range.
    """
    if (name is None) == (path is None):
        raise DataError("give exactly one of a built-in dataset name and an .npz path")
    if name is not None:
        entry = builtin(name)
        label = f"built-in dataset {name!r}"
        ref = resources.files("verigrad.datasets").joinpath(entry.resource)
        # as_file gives a real path even if the package is installed zipped.
        with resources.as_file(ref) as real:
            x, y = _read_npz(Path(real), label, require_labels)
    else:
        assert path is not None  # exactly one of name and path, checked above
        p = Path(path)
        label = str(p)
        x, y = _read_npz(p, label, require_labels)

    n = x.shape[0]
    stop = n if end is None else end
    if not (isinstance(start, (int, np.integer)) and isinstance(stop, (int, np.integer))):
        raise DataError(f"{label}: start and end must be integers, got {start!r} and {end!r}")
    if start < 0 or stop > n or start >= stop:
        raise DataError(
            f"{label}: sample range {start}:{stop} is out of range; the dataset has {n} samples "
            f"(need 0 <= start < end <= {n})"
        )
    xs = torch.from_numpy(np.ascontiguousarray(x[start:stop]))
    ys = torch.from_numpy(np.ascontiguousarray(y[start:stop]).astype(np.int64))
    return xs, ys


def _read_npz(path: Path, label: str, require_labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate the ``x`` / ``y`` arrays of an .npz archive (without ``y`` where
    labels are not required: then every label is NO_LABEL)."""
    if not path.exists():
        raise DataError(f"{label}: no such file")
    if not path.is_file():
        raise DataError(f"{label}: not a file")
    try:
        # allow_pickle=False: a data file must never be able to run code on load.
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{label}: cannot read it as an .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        # np.load also reads a bare .npy array: it has no x/y names to go by.
        raise DataError(f"{label}: is a single .npy array, expected an .npz archive with arrays 'x' and 'y'")
    with archive:
        if not require_labels and "y" not in archive.files and "x" in archive.files:
            try:
                x = archive["x"]
            except (ValueError, OSError, zipfile.BadZipFile) as exc:
                raise DataError(f"{label}: cannot read array 'x' ({exc})") from None
            y = np.full(x.shape[:1], NO_LABEL, dtype=np.int64)
            return _check_arrays(x, y, label, labelled=False)
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise DataError(
                f"{label}: missing array(s) {', '.join(repr(k) for k in missing)}; the archive has "
                f"{archive.files or 'no arrays'} (save with numpy.savez(path, x=..., y=...))"
            )
        try:
            x, y = archive["x"], archive["y"]
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            # object arrays need pickle, which is refused; a truncated member fails here too.
            raise DataError(f"{label}: cannot read arrays 'x'/'y' ({exc})") from None
    return _check_arrays(x, y, label, labelled=True)


def _check_arrays(x: np.ndarray, y: np.ndarray, label: str, labelled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``x`` and ``y`` (``labelled=False``: ``y`` is NO_LABEL filler, not checked)."""
    if x.ndim < 2:
        raise DataError(f"{label}: 'x' must have shape (N, *input_shape), got {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{label}: 'y' must be one label per sample, shape (N,), got {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{label}: length mismatch: 'x' has {x.shape[0]} samples, 'y' has {y.shape[0]}")
    if x.shape[0] == 0:
        raise DataError(f"{label}: the dataset is empty")
    # bool labels are rejected too (np.bool_ is not a numpy integer type): likely a mask.
    if labelled and not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{label}: 'y' must hold integer class labels, got dtype {y.dtype}")
    if labelled and y.min() < 0:
        raise DataError(f"{label}: 'y' has negative labels (min {int(y.min())})")
    if np.issubdtype(x.dtype, np.floating):
        if x.dtype != np.float64:
            x = x.astype(np.float32)  # float16 too: torch bound engines work in 32/64 bits
    elif np.issubdtype(x.dtype, np.integer):
        # Raw integers (e.g. uint8 pixels) are taken at face value, not rescaled: the
        # model's input domain is the user's to state, and guessing 1/255 could be wrong.
        x = x.astype(np.float32)
    else:
        raise DataError(f"{label}: 'x' must be numeric, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise DataError(f"{label}: 'x' contains NaN or infinite values")
    return x, y
