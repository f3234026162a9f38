"""Cross-validation: aggregation over splits, and `python -m etesvs.crossval` on queued DVC experiments."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from etesvs.crossval import aggregate, markdown, plan
from tests.conftest import ROOT

PROJECT_FILES = ["etesvs", "stages", "conf", "dvc.yaml", ".dvcignore", "pyproject.toml", "params.yaml"]


def test_plan_names_one_experiment_per_split():
    covered = plan(["experiment=tiny"], ROOT)
    assert covered["splits"] == [1, 2] and covered["dataset"] == "demo"
    assert covered["names"] == {1: "cv-demo-tiny-split1", 2: "cv-demo-tiny-split2"}
    assert plan([], ROOT)["splits"] == [1, 2, 3, 4]


def test_mean_and_sample_standard_deviation_over_splits():
    results = {1: {"mstcn": {"acc": 70.0, "f1_50": 50.0}}, 2: {"mstcn": {"acc": 80.0, "f1_50": 60.0}},
               3: {"mstcn": {"acc": 90.0, "f1_50": 40.0}}}
    summary = aggregate(results)
    assert summary["mstcn"]["acc"] == {"mean": 80.0, "std": pytest.approx(10.0), "values": [70.0, 80.0, 90.0]}
    assert summary["mstcn"]["f1_50"]["mean"] == pytest.approx(50.0)
    assert summary["mstcn"]["edit"] == {"mean": None, "std": None, "values": [None, None, None]}
    table = markdown({"dataset": "demo", "experiment": "none", "splits": [1, 2, 3]}, summary).splitlines()
    assert table[0].startswith("Cross-validation on demo (experiment none), splits 1, 2, 3")
    assert table[2].startswith("| Model | F1@10 | F1@25 | F1@50 | Edit | Acc |")
    assert "| mstcn | - | - | 50.0 ± 10.0 | - | 80.0 ± 10.0 |" in table[4]


def _run(args, cwd):
    env = {**{k: v for k, v in os.environ.items() if k != "DVC_STAGE"},
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_crossval_runs_every_split_as_an_experiment_and_reports(tmp_path):
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / name)
    (tmp_path / ".gitignore").write_text("/data/\n/logs/\n__pycache__/\n")
    # A user's project: the pipeline was run (split 1) and its dvc.lock committed.
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "hydra.enabled", "true"],
                    [sys.executable, "-m", "etesvs.params", "experiment=tiny"], ["dvc", "repro", "-q"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        done = _run(command, tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The generators and the pretraining do not depend on the split: no experiment re-runs them. (Frames and
    # features are extracted again: their stages read the labels directory, which holds the split, and a randomly
    # initialised I3D calibrates its BatchNorm on the split's training videos.)
    for _ in range(2):  # the second run replaces the first one's experiments
        done = _run([sys.executable, "-m", "etesvs.crossval", "run", "experiment=tiny"], tmp_path)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-6000:]
        ran = [line for line in output.splitlines() if line.startswith("Running stage")]
        assert "Running stage 'train_temporal@mstcn'" in output, output[-3000:]
        assert not [line for line in ran if re.search(r"'(make_demo_data|make_pretrain_data|pretrain@)", line)], ran
    done = _run([sys.executable, "-m", "etesvs.crossval", "report", "experiment=tiny"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "reports" / "crossval.json").read_text())
    assert result["splits"] == [1, 2] and set(result["models"]) == {"mstcn", "asrf", "asformer", "frame_classifier",
                                                                    "etesvs"}
    for model in result["models"].values():
        values = model["acc"]["values"]
        assert len(values) == 2 and all(0 <= v <= 100 for v in values)
    assert (tmp_path / "reports" / "crossval.md").read_text() == done.stdout
