"""The two-stage family: every temporal model trains and predicts through the driver; the stage end to end."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from etesvs.checkpoints import load_checkpoint
from etesvs.data.feature_sequences import FeatureDataset, collate_features
from etesvs.distributed import setup_distributed
from etesvs.errors import EtesvsError
from etesvs.models.registry import TEMPORAL_MODELS
from etesvs.params import call_with
from etesvs.temporal_training import _build, build_scheduler, predict, train_temporal, upsample
from etesvs.training import RunPaths
from tests.conftest import ROOT
from tests.synthetic import DIM, NUM_CLASSES, make_feature_data

SMALL = {
    "mstcn": dict(num_stages=2, num_layers=3, num_feature_maps=8),
    "asrf": dict(num_layers=3, num_feature_maps=8, num_stages_segmentation=2, num_stages_boundary=2),
    "asformer": dict(num_layers=3, num_feature_maps=8, num_decoders=1),
    "frame_classifier": dict(num_feature_maps=8),
}
STAGE = ROOT / "stages" / "train_temporal.py"


@pytest.fixture(scope="module")
def feature_data(tmp_path_factory) -> tuple[Path, Path]:
    return make_feature_data(tmp_path_factory.mktemp("features"))


def small_params(default_params: dict, name: str, *, epochs: int = 2, lr: float = 0.01, sample_rate: int = 2,
                 val_fraction: float = 0.2) -> dict:
    """The stage's params as conf/ composes them, with a small model and a short, fast training (by default with a
    hold-out for checkpoint selection)."""
    section = copy.deepcopy(default_params[name])
    section["model"].update(SMALL[name])
    section["train"].update(epochs=epochs, lr=lr, num_threads=0, val_fraction=val_fraction)
    return {"cpu_kernels": default_params["cpu_kernels"], "seed": 0, "dataset": {"sample_rate": sample_rate},
            name: section}


def _paths(root: Path, name: str) -> RunPaths:
    return RunPaths(checkpoints=root / "models" / name, predictions=root / "predictions" / name,
                    curves=root / "reports" / name / "curves.csv", tensorboard=root / "logs" / name)


def _check_outputs(root: Path, labels: Path, name: str, epochs: int) -> dict:
    info = json.loads((labels / "info.json").read_text())
    with h5py.File(root / "predictions" / name / "probs.h5") as handle:
        assert sorted(handle) == sorted(info["test"])
        for video in info["test"]:
            assert handle[video].shape == (info["num_frames"][video], NUM_CLASSES)
            np.testing.assert_allclose(handle[video][()].sum(axis=1), 1.0, rtol=1e-5)
    summary = json.loads((root / "predictions" / name / "model.json").read_text())
    assert summary["model"] == name and summary["params"] > 0 and summary["flops_per_frame"] > 0
    assert set(summary["val_videos"]) <= set(info["train"]) and len(summary["val_videos"]) == 2
    curves = (root / "reports" / name / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("epoch,train_loss,") and curves[0].endswith(",val_acc,val_edit,val_f1_50")
    assert [line.split(",")[0] for line in curves[1:]] == [str(e) for e in range(1, epochs + 1)]
    assert any((root / "logs" / name).iterdir())
    assert {p.name for p in (root / "models" / name).iterdir()} == {"best.pt", "last.pt", ".etesvs-output.json"}
    return summary


@pytest.mark.parametrize("name", sorted(TEMPORAL_MODELS))
def test_every_model_trains_and_predicts(feature_data, default_params, tmp_path, name):
    features, labels = feature_data
    summary = train_temporal(name, small_params(default_params, name), features_file=features, labels_dir=labels,
                             paths=_paths(tmp_path, name), dist=setup_distributed())
    assert _check_outputs(tmp_path, labels, name, 2) == json.loads(
        (tmp_path / "predictions" / name / "model.json").read_text())
    assert summary["sample_rate"] == 2 and summary["model_args"]["in_channels"] == DIM


def test_without_hold_out_the_whole_train_split_trains_and_the_last_epoch_is_kept(feature_data, default_params,
                                                                                 tmp_path):
    assert default_params["mstcn"]["train"]["val_fraction"] == 0  # the published code's protocol is the default
    features, labels = feature_data
    params = small_params(default_params, "mstcn", val_fraction=0.0)
    train_temporal("mstcn", params, features_file=features, labels_dir=labels, paths=_paths(tmp_path, "mstcn"),
                   dist=setup_distributed())
    summary = json.loads((tmp_path / "predictions" / "mstcn" / "model.json").read_text())
    assert summary["val_videos"] == []
    best = load_checkpoint(tmp_path / "models" / "mstcn" / "best.pt")
    assert best["epoch"] == 2 and not any(key.startswith("val_") for key in best["history"][-1])


def test_mstcn_learns_an_easy_problem(feature_data, default_params, tmp_path):
    features, labels = feature_data
    params = small_params(default_params, "mstcn", epochs=12, sample_rate=1)
    train_temporal("mstcn", params, features_file=features, labels_dir=labels, paths=_paths(tmp_path, "mstcn"),
                   dist=setup_distributed())
    history = load_checkpoint(tmp_path / "models" / "mstcn" / "last.pt")["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(row["val_acc"] for row in history) > 90.0


@pytest.mark.parametrize("name", sorted(TEMPORAL_MODELS))
def test_predict_gives_full_rate_probabilities(feature_data, default_params, name):
    features, labels = feature_data
    model = call_with(TEMPORAL_MODELS[name], {**default_params[name]["model"], **SMALL[name]}, where=name,
                      in_channels=DIM, num_classes=NUM_CLASSES)
    dataset = FeatureDataset(features, labels, ["video10", "video11", "video12"], sample_rate=3)
    probabilities = predict(model, DataLoader(dataset, batch_size=2, collate_fn=collate_features),
                            device=torch.device("cpu"), sample_rate=3)
    assert sorted(probabilities) == ["video10", "video11", "video12"]
    for video, probs in probabilities.items():
        assert probs.shape == (len(dataset.full_rate_labels(video)), NUM_CLASSES) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(probs[0], probs[2])  # frames 0..2 share one model step


def test_optimiser_and_schedule_follow_the_train_section(feature_data, default_params):
    """ASFormer as published: Adam, weight decay 1e-5, learning rate halved after 3 epochs without improvement of
    the training loss; MS-TCN and ASRF: Adam without weight decay or schedule."""
    features, labels = feature_data
    train_set = FeatureDataset(features, labels, ["video00", "video01"])
    for name, weight_decay, plateau in (("asformer", 1e-5, True), ("asrf", 0.0, False), ("mstcn", 0.0, False)):
        section = small_params(default_params, name)[name]
        section["train"]["lr"] = 0.0005
        _, _, _, optimizer, scheduler = _build(name, section, train_set=train_set, num_classes=NUM_CLASSES,
                                               dist=setup_distributed())
        assert isinstance(optimizer, torch.optim.Adam)
        assert optimizer.param_groups[0]["weight_decay"] == weight_decay
        assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau) == plateau
        if plateau:
            for loss in (2.0, 2.0, 2.0, 2.0):  # the best, then 3 epochs without improvement: patience used up
                scheduler.step(loss)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0005)
            scheduler.step(2.0)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(0.00025)


def test_schedule_errors_name_the_key():
    optimizer = torch.optim.Adam(torch.nn.Linear(1, 1).parameters())
    with pytest.raises(EtesvsError, match=r"params.yaml: mstcn.train.scheduler: expected none, plateau, multistep, cosine, got 'linear'"):
        build_scheduler(optimizer, {"scheduler": "linear"}, where="params.yaml: mstcn.train")
    with pytest.raises(EtesvsError, match=r"mstcn.train: scheduler plateau needs plateau_patience"):
        build_scheduler(optimizer, {"scheduler": "plateau", "plateau_factor": 0.5}, where="params.yaml: mstcn.train")


def test_upsample_repeats_and_trims():
    probabilities = torch.tensor([[0.1, 0.2, 0.3]])
    torch.testing.assert_close(upsample(probabilities, 2, 5), torch.tensor([[0.1, 0.1, 0.2, 0.2, 0.3]]))


def _stage_dir(tmp_path: Path, params: dict) -> Path:
    """A working directory as DVC runs the stage in: dvc.yaml and params.yaml."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def _stage_args(features: Path, labels: Path) -> list[str]:
    return ["--model", "mstcn", "--features", str(features), "--labels", str(labels),
            "--checkpoints", "data/models/mstcn", "--predictions", "data/predictions/mstcn",
            "--curves", "reports/mstcn/train/curves.csv", "--tensorboard", "logs/tensorboard/mstcn"]


def _run_stage(workdir: Path, features: Path, labels: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "DVC_STAGE"}
    return subprocess.run([sys.executable, str(STAGE), *_stage_args(features, labels)], cwd=workdir,
                          capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=300)


@pytest.mark.slow
def test_stage_end_to_end_and_resume(feature_data, default_params, tmp_path):
    """The script as DVC runs it, then a rerun with more epochs that resumes from last.pt."""
    features, labels = feature_data
    workdir = _stage_dir(tmp_path, small_params(default_params, "mstcn"))
    done = _run_stage(workdir, features, labels)
    assert done.returncode == 0, done.stderr
    assert "train_temporal: mstcn, " in done.stdout and "best epoch" in done.stdout
    assert json.loads((workdir / "data/predictions/mstcn/model.json").read_text())["epochs"] == 2

    (workdir / "params.yaml").write_text(yaml.safe_dump(small_params(default_params, "mstcn", epochs=3)))
    again = _run_stage(workdir, features, labels)
    assert again.returncode == 0, again.stderr
    assert "mstcn: resuming from data/models/mstcn/last.pt after epoch 2" in again.stdout
    assert load_checkpoint(workdir / "data/models/mstcn/last.pt")["epoch"] == 3
    curves = (workdir / "reports/mstcn/train/curves.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curves[1:]] == ["1", "2", "3"]


def test_stage_refuses_unknown_model_params_in_one_line(feature_data, default_params, tmp_path, capsys,
                                                          monkeypatch):
    features, labels = feature_data
    params = small_params(default_params, "mstcn")
    params["mstcn"]["model"]["wings"] = 3
    monkeypatch.chdir(_stage_dir(tmp_path, params))
    monkeypatch.delenv("DVC_STAGE", raising=False)
    with pytest.raises(EtesvsError, match=r"params.yaml: mstcn.model: unknown key wings \(known keys: "):
        train_temporal("mstcn", params, features_file=features, labels_dir=labels,
                       paths=_paths(tmp_path, "mstcn"), dist=setup_distributed())
    assert not (tmp_path / "models").exists()
