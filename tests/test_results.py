"""`python -m etesvs.results --compare REV`: does the workspace reproduce the committed table?"""

import json
import subprocess

import pytest

from etesvs.errors import EtesvsError
from etesvs.results import MODELS, compare, compare_metrics

SCORES = {"acc": 70.0, "edit": 60.0, "f1_10": 80.0, "f1_25": 75.0, "f1_50": 50.0}


def _write(root, model, scores):
    path = root / "reports" / model / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**scores, "params_m": 1.0}))


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    for model in MODELS:
        _write(tmp_path, model, SCORES)
    _git(tmp_path, "add", "reports")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "table")
    return tmp_path


def test_identical_scores_reproduce(repo, capsys):
    assert compare(repo, "HEAD", 3.0)
    assert "every score within 3 points" in capsys.readouterr().out


def test_a_difference_over_the_tolerance_fails_and_is_marked(repo, capsys):
    _write(repo, "etesvs", {**SCORES, "f1_50": 46.5})  # 3.5 points below
    assert not compare(repo, "HEAD", 3.0)
    out = capsys.readouterr().out
    assert "NOT every score within" in out
    assert [line for line in out.splitlines() if line.startswith("etesvs")][0].endswith("3.5 (over)")
    assert compare(repo, "HEAD", 4.0)


def test_the_largest_difference_of_each_model_is_reported():
    committed = {model: SCORES for model in MODELS}
    reproduced = {model: {**SCORES, "acc": SCORES["acc"] + 1.0, "edit": SCORES["edit"] - 2.0} for model in MODELS}
    table, ok = compare_metrics(committed, reproduced, 3.0)
    assert ok
    assert all(line.rstrip().endswith("2.0") for line in table.splitlines()[1:])


def test_missing_workspace_metrics_or_revision_are_one_line_errors(repo):
    with pytest.raises(EtesvsError, match="at nosuchrev: not committed"):
        compare(repo, "nosuchrev", 3.0)
    (repo / "reports" / "asrf" / "metrics.json").unlink()
    with pytest.raises(EtesvsError, match="asrf/metrics.json: missing"):
        compare(repo, "HEAD", 3.0)
