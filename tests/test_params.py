"""Parameters flow conf/ -> params.yaml -> the stage: composition, the stage helper, keyword arguments."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys

import pytest
import yaml

from etesvs.errors import EtesvsError
from etesvs.params import call_with, stage_params
from tests.conftest import ROOT, composed_params


def test_params_yaml_equals_composed_conf(tmp_path):
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert committed == composed_params(tmp_path), "params.yaml is stale: run `python -m etesvs.params`"


def test_dataset_switch_changes_every_dataset_fact(tmp_path):
    demo = composed_params(tmp_path)
    for name, fps, background in [("gtea", 15, "background"), ("50salads", 30, ""), ("breakfast", 15, "SIL"),
                                  ("thumos14", 30, "background")]:
        params = composed_params(tmp_path, f"dataset={name}")
        assert params["dataset"]["name"] == name and params["dataset"]["root"] == f"data/raw/{name}"
        assert params["dataset"]["fps"] == fps and params["dataset"]["background"] == background
        assert params["window"] == params["dataset"]["window"]
        assert set(params["dataset"]) == set(demo["dataset"])
    assert composed_params(tmp_path, "dataset=50salads")["dataset"]["sample_rate"] == 2


def test_window_override(tmp_path):
    params = composed_params(tmp_path, "window=120")
    assert params["window"] == 120 and params["dataset"]["window"] == 64


def _changes(base, other, prefix=""):
    """Dotted keys whose values differ between two nested dicts."""
    keys = set(base) | set(other)
    changed = set()
    for key in keys:
        a, b = base.get(key), other.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed |= _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.add(f"{prefix}{key}")
    return changed


def test_an_experiment_changes_only_what_its_file_holds(tmp_path):
    base = composed_params(tmp_path)
    tiny = composed_params(tmp_path, "experiment=tiny")
    held = yaml.safe_load((ROOT / "conf" / "experiment" / "tiny.yaml").read_text())

    def leaves(tree, prefix=""):
        return {k for key, value in tree.items()
                for k in (leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"})}

    # ${demo.num_subjects}: the demo's splits follow its subjects; the pretrained MobileNetV2 is made for the
    # streaming model's input size
    derived = {"dataset.num_splits", "pretrain.mobilenet_v2.model.image_size"}
    assert _changes(base, tiny) <= leaves(held) | derived and "demo.num_videos" in _changes(base, tiny)
    assert composed_params(tmp_path, "experiment=none") == base


def test_an_unknown_group_option_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "etesvs.params", "experiment=nope", "--out", str(tmp_path / "p")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and not (tmp_path / "p").exists()
    assert result.stderr.count("\n") == 1 and "Could not find 'experiment/nope'" in result.stderr


def test_stage_params_give_exactly_what_dvc_yaml_declares(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    temporal = stage_params("train_temporal@asrf")
    assert temporal == {"cpu_kernels": params["cpu_kernels"], "seed": params["seed"],
                        "dataset": {"sample_rate": params["dataset"]["sample_rate"]}, "asrf": params["asrf"]}
    assert stage_params("convert_labels")["dataset"].keys() == {"name", "split", "fps", "background"}
    monkeypatch.setenv("DVC_STAGE", "evaluate@etesvs")  # under DVC, the stage DVC runs wins
    assert stage_params("train_streaming") == {"window": params["window"],
                                               "streaming": {"postprocess": params["streaming"]["postprocess"]}}
    monkeypatch.setenv("DVC_STAGE", "train_streaming")  # training declares every streaming sub-section but this one
    assert stage_params("x")["streaming"] == {k: v for k, v in params["streaming"].items() if k != "postprocess"}


@pytest.mark.parametrize("stage, message", [
    ("train_temporal", "stage 'train_temporal' is a matrix"),
    ("train_temporal@transformer", "stage 'train_temporal' has no matrix item 'transformer'"),
    ("convert_labels@x", "stage 'convert_labels' has no matrix"),
    ("fly", "no stage 'fly'"),
])
def test_stage_params_refuse_unknown_stages(monkeypatch, stage, message):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    with pytest.raises(EtesvsError, match=re.escape(message)):
        stage_params(stage)


def test_every_declared_param_exists_and_commands_carry_paths_only():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for variable in re.findall(r"\$\{([^}]+)\}", stage["cmd"]):
            assert variable.startswith("item.") or variable == "dataset.root", (name, variable)
        matrix = stage.get("matrix", {})
        items = [dict(zip(matrix, values)) for values in itertools.product(*matrix.values())]
        for item in items:
            for declared in stage.get("params", []):
                value = params
                for part in re.sub(r"\$\{item\.(\w+)\}", lambda m: item[m.group(1)], declared).split("."):
                    assert part in value, (name, declared)
                    value = value[part]


def test_call_with_checks_the_section_in_one_line():
    def build(*, num_classes: int, width: float, depth: int = 2) -> tuple:
        return num_classes, width, depth

    assert call_with(build, {"width": 0.5}, where="p: m", num_classes=3) == (3, 0.5, 2)
    with pytest.raises(EtesvsError, match=r"^p: m: unknown key wings \(known keys: depth, width\)$"):
        call_with(build, {"width": 0.5, "wings": 2}, where="p: m", num_classes=3)
    with pytest.raises(EtesvsError, match=r"^p: m: missing key width$"):
        call_with(build, {}, where="p: m", num_classes=3)
    with pytest.raises(EtesvsError, match=r"^p: m: num_classes is set from the data"):
        call_with(build, {"width": 1.0, "num_classes": 2}, where="p: m", num_classes=3)


def test_the_streaming_loss_section_is_checked_once_before_training():
    from etesvs.losses import streaming_loss
    from etesvs.params import check_section

    fixed = ("outputs", "labels", "mask", "frame_weights", "window_weights")
    check_section(streaming_loss, {"smoothing_weight": 0.15, "smooth_across_windows": True}, where="p: l", fixed=fixed)
    with pytest.raises(EtesvsError, match=r"^p: l: unknown key smoothing \(known keys: clamp, smooth_across_windows, "):
        check_section(streaming_loss, {"smoothing": 0.15, "smooth_across_windows": True}, where="p: l", fixed=fixed)
    with pytest.raises(EtesvsError, match=r"^p: l: missing key smooth_across_windows$"):
        check_section(streaming_loss, {"smoothing_weight": 0.15}, where="p: l", fixed=fixed)
