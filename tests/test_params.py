"""params.yaml, which plain `dvc repro` reads, must equal what conf/ composes to (what `dvc exp run` writes)."""

import yaml

from tests.conftest import ROOT


def _compose(tmp_path, *overrides):
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(ROOT), list(overrides))
    return yaml.safe_load(out.read_text())


def test_params_yaml_equals_composed_conf(tmp_path):
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == _compose(tmp_path), "params.yaml is stale: run `python stages/compose_params.py`"


def test_dataset_switch_changes_every_dataset_fact(tmp_path):
    demo = _compose(tmp_path)
    for name, fps, background in [("gtea", 15, "background"), ("50salads", 30, ""), ("breakfast", 15, "SIL"), ("thumos14", 30, "background")]:
        params = _compose(tmp_path, f"dataset={name}")
        assert params["dataset"]["name"] == name and params["dataset"]["root"] == f"data/raw/{name}"
        assert params["dataset"]["fps"] == fps and params["dataset"]["background"] == background
        assert params["window"] == params["dataset"]["window"]
        assert set(params["dataset"]) == set(demo["dataset"])
    assert _compose(tmp_path, "dataset=50salads")["dataset"]["sample_rate"] == 2


def test_window_override(tmp_path):
    params = _compose(tmp_path, "window=120")
    assert params["window"] == 120 and params["dataset"]["window"] == 16
