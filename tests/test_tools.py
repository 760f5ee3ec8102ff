"""The benchmark tools run: the CUDA check skips cleanly on a machine without CUDA (CI), and the
CROWN profile's stage split adds up (its figures go into README)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check itself runs instead")
def test_the_cuda_check_skips_cleanly_without_cuda():
    r = subprocess.run([sys.executable, str(ROOT / "tools/check_cuda.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("skipped: no CUDA device") and r.stderr == ""


def test_the_crown_profile_splits_a_call_into_stages():
    cmd = [sys.executable, str(ROOT / "tools/profile_crown.py"), "--worker", "small_mlp", "--n", "3", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert row["model"] == "small_mlp" and row["d"] == 8
    assert row["cold_convert_s"] > 0  # the first input converts the graph ...
    # ... the later ones reuse it: a warm call costs less than the conversion plus its bounds
    assert row["warm_s"] < row["cold_s"]
    assert 0 < row["warm_final_s"] and row["warm_intermediate_s"] >= 0
