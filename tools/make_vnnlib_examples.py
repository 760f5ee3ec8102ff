"""Write the VNN-LIB example properties under examples/vnnlib/ (reproducibly).

Both are input boxes for ``examples/models/mnist_fc.onnx`` (input 1×28×28, X_i flattened in C
order) around images of the built-in ``mnist_sample`` data set, with the usual VNN-COMP
robustness output property (the negation: some other logit reaches the label's), which
verigrad ignores with a note:

* ``mnist_fc_0.vnnlib``: the ℓ∞ box of radius 0.01 around image 0, clipped to [0, 1], one
  ``(assert (<= X_i c))`` / ``(assert (>= X_i c))`` per bound;
* ``mnist_fc_1_patch.vnnlib``: image 1 fixed except a 4×4 patch at rows/cols 12..15 that
  moves by ±0.05 (clipped to [0, 1]), one ``(assert (and (>= X_i l) (<= X_i u)))`` per pixel.

Bounds are written with ``repr`` of the float64 value, so the file reads back exactly.

    python tools/make_vnnlib_examples.py [--out examples/vnnlib]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from verigrad.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10


def _header(title: str, n: int) -> list[str]:
    lines = [f"; {title}", "; written by tools/make_vnnlib_examples.py; do not edit", ""]
    lines += [f"(declare-const X_{i} Real)" for i in range(n)]
    lines += [f"(declare-const Y_{j} Real)" for j in range(CLASSES)]
    return lines + [""]


def _output_property(label: int) -> list[str]:
    """The negated robustness property: some class j != label scores at least the label."""
    terms = " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(CLASSES) if j != label)
    return ["", "; output constraint (unsafe if some other logit reaches the label's)", f"(assert (or {terms}))"]


def _image(index: int) -> tuple[np.ndarray, int]:
    x, y = load_dataset("mnist_sample", start=index, end=index + 1)
    return x[0].double().numpy().reshape(-1), int(y[0])


def box_around(index: int, eps: float) -> str:
    x, label = _image(index)
    lo, up = np.clip(x - eps, 0.0, 1.0), np.clip(x + eps, 0.0, 1.0)
    lines = _header(f"mnist_sample[{index}] (label {label}): l-inf box of radius {eps} clipped to [0, 1]", x.size)
    for i in range(x.size):
        lines += [f"(assert (<= X_{i} {float(up[i])!r}))", f"(assert (>= X_{i} {float(lo[i])!r}))"]
    return "\n".join(lines + _output_property(label)) + "\n"


def patch_box(index: int, eps: float, rows: range, cols: range) -> str:
    x, label = _image(index)
    img = x.reshape(28, 28)
    lo, up = img.copy(), img.copy()
    for r in rows:
        for c in cols:
            lo[r, c], up[r, c] = max(img[r, c] - eps, 0.0), min(img[r, c] + eps, 1.0)
    lo, up = lo.reshape(-1), up.reshape(-1)
    lines = _header(f"mnist_sample[{index}] (label {label}): fixed except rows {rows.start}..{rows.stop - 1}, cols "
                    f"{cols.start}..{cols.stop - 1} moving by +-{eps} within [0, 1]", x.size)
    for i in range(x.size):
        lines.append(f"(assert (and (>= X_{i} {float(lo[i])!r}) (<= X_{i} {float(up[i])!r})))")
    return "\n".join(lines + _output_property(label)) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "vnnlib")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = {"mnist_fc_0.vnnlib": box_around(0, 0.01),
             "mnist_fc_1_patch.vnnlib": patch_box(1, 0.05, range(12, 16), range(12, 16))}
    for name, text in files.items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
