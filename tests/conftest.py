"""Shared fixtures: the composed configuration, and the real data in ../shared (skipped where absent)."""

from __future__ import annotations

import copy
import functools
import os
import tempfile
from pathlib import Path

import pytest
import torch

from etesvs.io import read_yaml
from etesvs.params import compose

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # The CI machine has 2 cores; keep each test process from oversubscribing them.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def composed_params(tmp_dir: Path, *overrides: str) -> dict:
    """params.yaml as conf/ composes it with Hydra ``overrides`` (as `dvc exp run -S` would)."""
    out = tmp_dir / "params.yaml"
    compose(list(overrides), out=out, root=ROOT)
    return read_yaml(out)


@functools.lru_cache(maxsize=None)
def _default_params() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        return composed_params(Path(tmp))


def default_config() -> dict:
    """The parameters of a plain `dvc repro` (the demo), for tests that build objects outside fixtures."""
    return copy.deepcopy(_default_params())


@pytest.fixture
def default_params() -> dict:
    """The parameters of a plain `dvc repro` (the demo)."""
    return default_config()


@pytest.fixture(scope="session")
def tiny_params(tmp_path_factory) -> dict:
    """The parameters of `-S experiment=tiny` (what the end-to-end tests run)."""
    return composed_params(tmp_path_factory.mktemp("params"), "experiment=tiny")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data beside the project root; tests that need it skip with a reason where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real test data not found at {SHARED} (it sits beside the project root in CI)")
    return SHARED


def stage_workdir(root: Path, params: dict) -> Path:
    """A directory to run a stage script in as DVC does: the project's dvc.yaml beside the given params.yaml."""
    import shutil

    import yaml

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def run_stage(name: str, *args: str, cwd: Path, timeout: float = 300):
    """``python stages/<name>.py ARGS`` in ``cwd`` (see :func:`stage_workdir`), as DVC runs it; returns the result."""
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "DVC_STAGE"}
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
