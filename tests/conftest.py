"""Shared fixtures: the real data in ../shared (skipped where absent, as in a user's clone)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # The CI machine has 2 cores; keep each test process from oversubscribing them.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data beside the project root; tests that need it skip with a reason where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real test data not found at {SHARED} (it sits beside the project root in CI)")
    return SHARED


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests (still run by the default test command)")
