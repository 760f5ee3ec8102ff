"""Shared fixtures: every test starts from one global RNG state (a draw without its own generator is
reproducible), a float64 dtype fixture, and the ``slow`` marker (``make test`` runs everything;
``pytest -m "not slow"`` skips the long tests for a quick local loop). Under pytest-xdist
(``make test`` runs ``-n auto``) each worker gets an equal share of the cores for torch's
intra-op threads, so that the workers do not oversubscribe the machine."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a long test (seconds to a minute); deselect with -m 'not slow'")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture
def dtype() -> torch.dtype:
    """The precision soundness tests run in (float64: round-off far below any tolerance)."""
    return torch.float64
