"""Engine: checkpoints, seeds, DDP helpers, the feature dataset, training to high accuracy, resume, prediction,
and the train_temporal stage end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from etesvs.data.feature_sequences import FeatureDataset, collate_features, subsample_boundaries
from etesvs.data.labels import boundaries_from_ids
from etesvs.engine import (
    build_loss,
    build_model,
    evaluate,
    fit,
    load_checkpoint,
    predict,
    save_checkpoint,
    seed_everything,
    setup_distributed,
    shard,
    upsample,
)
from etesvs.errors import EtesvsError, run_main

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES, DIM = 4, 12


def make_feature_data(root: Path, *, num_train=10, num_test=3, seed=0, noise=0.8) -> tuple[Path, Path]:
    """A tiny easy problem: each class has a random prototype; a frame's feature is its class prototype plus noise.

    Writes ``root/features.h5`` and ``root/labels/{labels.h5,info.json}`` as extract_features and convert_labels do.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(NUM_CLASSES, DIM)).astype(np.float32) * 2
    videos = [f"video{i:02d}" for i in range(num_train + num_test)]
    labels = {}
    for video in videos:
        segments = [np.full(rng.integers(8, 20), rng.integers(NUM_CLASSES)) for _ in range(rng.integers(3, 6))]
        labels[video] = np.concatenate(segments).astype(np.int64)
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    with h5py.File(root / "features.h5", "w") as handle:
        handle.attrs["extractor"] = "synthetic"
        handle.attrs["backbone_pretrained"] = False
        for video, ids in labels.items():
            feats = prototypes[ids] + noise * rng.normal(size=(len(ids), DIM)).astype(np.float32)
            handle.create_dataset(video, data=feats.astype(np.float32))
    with h5py.File(root / "labels" / "labels.h5", "w") as handle:
        for video, ids in labels.items():
            group = handle.create_group(video)
            group.create_dataset("classes", data=ids)
            group.create_dataset("boundaries", data=boundaries_from_ids(ids))
    info = {
        "dataset": "synthetic", "fps": 15.0, "classes": [f"class{c}" for c in range(NUM_CLASSES)],
        "background": ["class0"], "background_ids": [0], "split": 1,
        "train": videos[:num_train], "test": videos[num_train:],
        "num_frames": {video: int(len(ids)) for video, ids in labels.items()},
    }
    (root / "labels" / "info.json").write_text(json.dumps(info))
    return root / "features.h5", root / "labels"


@pytest.fixture(scope="module")
def feature_data(tmp_path_factory) -> tuple[Path, Path]:
    return make_feature_data(tmp_path_factory.mktemp("features"))


# -------------------------------------------------------------------------------- checkpoints, seeds, DDP helpers


def test_checkpoint_round_trip_is_self_describing(tmp_path):
    model = build_model("mstcn", dict(in_channels=3, num_classes=2, num_stages=2, num_layers=2, num_feature_maps=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint(path, model=model, optimizer=optimizer, epoch=3,
                    model_args=dict(in_channels=3, num_classes=2, num_stages=2, num_layers=2, num_feature_maps=4),
                    model_name="mstcn", best_score=0.5)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["model_name"] == "mstcn" and state["best_score"] == 0.5
    rebuilt = build_model(state["model_name"], state["model_args"])
    rebuilt.load_state_dict(state["model"])
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(EtesvsError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(EtesvsError, match="broken.pt: cannot read checkpoint"):
        load_checkpoint(broken)


def test_seed_everything_is_reproducible():
    seed_everything(5)
    first = torch.rand(3), np.random.rand(2)
    generator = seed_everything(5)
    second = torch.rand(3), np.random.rand(2)
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert generator.initial_seed() == 5


def test_shard_and_single_process_setup(monkeypatch):
    assert shard(list("abcde"), 0, 2) == ["a", "c", "e"]
    assert shard(list("abcde"), 1, 2) == ["b", "d"]
    assert shard(list("abc"), 0, 1) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        shard([1], 2, 2)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = setup_distributed()
    assert (info.rank, info.world_size, info.is_distributed, info.is_main) == (0, 1, False, True)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(EtesvsError, match="WORLD_SIZE"):
        setup_distributed()


# -------------------------------------------------------------------------------- feature dataset


def test_subsample_boundaries_keeps_starts_between_kept_frames():
    boundaries = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0], dtype=np.uint8)  # segments start at 0, 3, 7
    # Kept frames 0, 2, 4, 6, 8: the start at 3 moves to kept frame 4, the one at 7 to kept frame 8.
    np.testing.assert_array_equal(subsample_boundaries(boundaries, 2), [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(subsample_boundaries(boundaries, 1), boundaries)
    np.testing.assert_array_equal(subsample_boundaries(boundaries, 4), [1, 1, 1])


def test_feature_dataset_samples_and_collate(feature_data):
    features, labels = feature_data
    dataset = FeatureDataset(features, labels, ["video00", "video01"], sample_rate=2)
    sample = dataset[0]
    with h5py.File(features) as handle:
        raw = handle["video00"][()]
    full = len(dataset.full_rate_labels("video00"))
    assert sample["num_frames"] == full == raw.shape[0]
    assert sample["features"].shape == (DIM, (full + 1) // 2) and sample["features"].dtype == torch.float32
    np.testing.assert_array_equal(sample["features"].numpy(), raw[::2].T)
    np.testing.assert_array_equal(sample["labels"].numpy(), dataset.full_rate_labels("video00")[::2])
    assert sample["mask"].all() and sample["video"] == "video00"
    batch = collate_features([dataset[0], dataset[1]])
    length = max(len(dataset[0]["labels"]), len(dataset[1]["labels"]))
    assert batch["features"].shape == (2, DIM, length)
    assert batch["mask"].sum().item() == len(dataset[0]["labels"]) + len(dataset[1]["labels"])
    assert (batch["labels"][~batch["mask"]] == -100).all()
    assert batch["video"] == ["video00", "video01"]
    counts = dataset.label_counts(NUM_CLASSES)
    assert counts.class_counts.sum() == counts.num_frames == batch["mask"].sum().item()


def test_feature_dataset_rejects_length_mismatch(tmp_path):
    features, labels = make_feature_data(tmp_path, num_train=2, num_test=1)
    with h5py.File(features, "a") as handle:
        data = handle["video01"][()]
        del handle["video01"]
        handle.create_dataset("video01", data=data[:-3])
    with pytest.raises(EtesvsError, match="'video01' has .* feature frames but"):
        FeatureDataset(features, labels, ["video00", "video01"])
    with h5py.File(features, "a") as handle:
        del handle["video00"]
    with pytest.raises(EtesvsError, match="features.h5: no features for video 'video00'"):
        FeatureDataset(features, labels, ["video00"])


def test_upsample_repeats_and_trims():
    probabilities = torch.tensor([[0.1, 0.2, 0.3]])
    torch.testing.assert_close(upsample(probabilities, 2, 5), torch.tensor([[0.1, 0.1, 0.2, 0.2, 0.3]]))


# -------------------------------------------------------------------------------- training, resume, prediction

SMALL_MSTCN = dict(num_stages=2, num_layers=4, num_feature_maps=16, dropout=0.2)


def _training_setup(feature_data, *, seed=0, sample_rate=1):
    features, labels = feature_data
    info = json.loads((labels / "info.json").read_text())
    generator = seed_everything(seed)
    train = FeatureDataset(features, labels, info["train"][:8], sample_rate=sample_rate)
    val = FeatureDataset(features, labels, info["train"][8:], sample_rate=sample_rate)
    model_args = dict(in_channels=DIM, num_classes=NUM_CLASSES, **SMALL_MSTCN)
    model = build_model("mstcn", model_args)
    loss_fn = build_loss("mstcn")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_loader = DataLoader(train, batch_size=2, shuffle=True, generator=generator, collate_fn=collate_features)
    val_loader = DataLoader(val, batch_size=2, collate_fn=collate_features)
    return dict(model=model, optimizer=optimizer, loss_fn=loss_fn, train_loader=train_loader, val_loader=val_loader,
                model_name="mstcn", model_args=model_args, config={"lr": 1e-2}, device=torch.device("cpu"),
                background_ids=[0], generator=generator)


def test_mstcn_learns_an_easy_problem(feature_data, tmp_path):
    setup = _training_setup(feature_data)
    result = fit(epochs=12, checkpoint_dir=tmp_path, **setup)
    assert len(result.history) == 12 and result.history[-1]["epoch"] == 12
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    metrics = evaluate(setup["model"], setup["val_loader"], setup["loss_fn"], device=torch.device("cpu"))
    assert metrics["acc"] > 90.0
    assert result.best_epoch >= 1 and (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()


def test_resume_continues_where_training_stopped(feature_data, tmp_path):
    straight = _training_setup(feature_data)
    fit(epochs=4, checkpoint_dir=tmp_path / "straight", **straight)

    first = _training_setup(feature_data)
    fit(epochs=2, checkpoint_dir=tmp_path / "resumed", **first)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    second = _training_setup(feature_data)  # a fresh process: new model, optimizer and loader
    result = fit(epochs=4, checkpoint_dir=tmp_path / "resumed", **second)
    assert result.resumed_from == 2
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 4
    # Same batches, dropout masks and optimizer state as the uninterrupted run.
    for a, b in zip(straight["model"].state_dict().values(), second["model"].state_dict().values()):
        torch.testing.assert_close(a, b)


def test_resume_ignores_a_checkpoint_of_another_configuration(feature_data, tmp_path):
    fit(epochs=1, checkpoint_dir=tmp_path, **_training_setup(feature_data))
    other = _training_setup(feature_data)
    other["config"] = {"lr": 0.5}
    assert fit(epochs=1, checkpoint_dir=tmp_path, **other).resumed_from == 0


@pytest.mark.parametrize("name", ["mstcn", "asrf", "asformer", "frame_classifier"])
def test_predict_gives_full_rate_probabilities(feature_data, name):
    features, labels = feature_data
    sizes = {"mstcn": SMALL_MSTCN, "asrf": dict(num_layers=3, num_feature_maps=8),
             "asformer": dict(num_layers=3, num_feature_maps=8, num_decoders=1),
             "frame_classifier": dict(num_feature_maps=8)}[name]
    model = build_model(name, dict(in_channels=DIM, num_classes=NUM_CLASSES, **sizes))
    dataset = FeatureDataset(features, labels, ["video10", "video11", "video12"], sample_rate=3)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_features)
    probabilities = predict(model, loader, device=torch.device("cpu"), sample_rate=3)
    assert sorted(probabilities) == ["video10", "video11", "video12"]
    for video, probs in probabilities.items():
        assert probs.shape == (len(dataset.full_rate_labels(video)), NUM_CLASSES) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(probs[0], probs[2])  # frames 0..2 share one model step


# -------------------------------------------------------------------------------- the stage, end to end

STAGE = ROOT / "stages" / "train_temporal.py"
TINY_PARAMS = (
    "mstcn: {num_stages: 2, num_layers: 3, num_feature_maps: 8, smoothing_weight: 0.15}\n"
    "asrf: {num_layers: 3, num_feature_maps: 8, num_stages_segmentation: 2, num_stages_boundary: 2,\n"
    "       boundary_min_distance: 3, boundary_weight: 0.1, similarity_sigma: 1.0}\n"
    "asformer: {num_layers: 3, num_feature_maps: 8, num_decoders: 1}\n"
    "frame_classifier: {num_feature_maps: 8}\n"
)


def _stage_args(workdir: Path, features: Path, labels: Path, model: str, epochs: int) -> list[str]:
    params = workdir / "params.yaml"
    params.write_text(TINY_PARAMS)
    return [
        "--model", model, "--features", str(features), "--labels", str(labels),
        "--out-checkpoint", str(workdir / f"data/models/{model}"),
        "--predictions", str(workdir / f"data/predictions/{model}"),
        "--reports", str(workdir / f"reports/{model}/train"), "--tensorboard", str(workdir / f"logs/{model}"),
        "--model-params", str(params), "--epochs", str(epochs), "--lr", "0.01", "--batch-size", "2",
        "--sample-rate", "2", "--seed", "0", "--val-fraction", "0.2",
    ]


@pytest.fixture(scope="module")
def stage_module():
    """The stage script imported in-process (starting Python and torch again per model would dominate test time)."""
    spec = importlib.util.spec_from_file_location("train_temporal_stage", STAGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_stage_outputs(workdir: Path, labels: Path, model: str, epochs: int) -> None:
    info = json.loads((labels / "info.json").read_text())
    with h5py.File(workdir / f"data/predictions/{model}/probs.h5") as handle:
        assert sorted(handle) == sorted(info["test"])
        for video in info["test"]:
            assert handle[video].shape == (info["num_frames"][video], NUM_CLASSES)
            assert handle[video].dtype == np.float32
            np.testing.assert_allclose(handle[video][()].sum(axis=1), 1.0, rtol=1e-5)
    summary = json.loads((workdir / f"data/predictions/{model}/model.json").read_text())
    assert summary["model"] == model and summary["params"] > 0 and summary["flops_per_frame"] > 0
    assert summary["backbone_pretrained"] is False
    assert set(summary["val_videos"]) <= set(info["train"]) and len(summary["val_videos"]) == 2
    curves = (workdir / f"reports/{model}/train/curves.csv").read_text().splitlines()
    assert curves[0] == "epoch,train_loss,train_acc,train_f1_50,val_loss,val_acc,val_f1_50"
    assert [line.split(",")[0] for line in curves[1:]] == [str(e) for e in range(1, epochs + 1)]
    assert any((workdir / f"logs/{model}").iterdir())
    assert {p.name for p in (workdir / f"data/models/{model}").iterdir()} == {"best.pt", "last.pt"}


@pytest.mark.slow
def test_stage_end_to_end_and_resume(feature_data, tmp_path, stage_module, capsys):
    """The script as DVC runs it, then a rerun with more epochs that resumes from last.pt."""
    features, labels = feature_data
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(STAGE), *_stage_args(tmp_path, features, labels, "mstcn", 2)],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "train_temporal: mstcn" in done.stdout
    _check_stage_outputs(tmp_path, labels, "mstcn", 2)

    stage_module.main(_stage_args(tmp_path, features, labels, "mstcn", 3))
    assert "resuming mstcn" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "data/models/mstcn/last.pt")["epoch"] == 3
    _check_stage_outputs(tmp_path, labels, "mstcn", 3)


@pytest.mark.parametrize("model", ["asrf", "asformer", "frame_classifier"])
def test_stage_trains_every_model(feature_data, tmp_path, stage_module, model):
    features, labels = feature_data
    stage_module.main(_stage_args(tmp_path, features, labels, model, 2))
    _check_stage_outputs(tmp_path, labels, model, 2)


def test_stage_reports_bad_model_params(feature_data, tmp_path, stage_module, capsys, monkeypatch):
    features, labels = feature_data
    args = _stage_args(tmp_path, features, labels, "mstcn", 1)
    (tmp_path / "params.yaml").write_text("mstcn: {num_stages: 2, wings: 3}\n")
    args[args.index("--model-params") + 1] = "params.yaml"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: stage_module.main(args))
    assert stop.value.code == 1
    assert capsys.readouterr().err.startswith("error: params.yaml: unknown key mstcn.wings")
    assert not (tmp_path / "data").exists()
