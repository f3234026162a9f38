"""The training driver: hold-out, selection, resume, curves and prediction files, with a toy model family."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from etesvs.checkpoints import load_checkpoint
from etesvs.distributed import setup_distributed
from etesvs.errors import EtesvsError
from etesvs.training import (
    RunPaths,
    fit,
    hold_out,
    predict_test,
    run_fingerprint,
    segmentation_validation,
    selection_score,
    write_curves,
)

NUM_CLASSES, DIM = 3, 5


def _toy_data(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Six videos whose frames are a class prototype plus noise: (T, DIM) features and (T,) labels."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(NUM_CLASSES, DIM)) * 2
    features, labels = {}, {}
    for index in range(6):
        ids = np.repeat(rng.integers(NUM_CLASSES, size=4), rng.integers(5, 10, size=4))
        labels[f"v{index}"] = ids
        features[f"v{index}"] = (prototypes[ids] + rng.normal(size=(len(ids), DIM))).astype(np.float32)
    return features, labels


class _ToyFamily:
    """A per-frame linear classifier with dropout, trained in a random video order: a family for the driver."""

    def __init__(self, features, labels, train_videos):
        self.features, self.labels, self.train_videos = features, labels, train_videos
        self.model = nn.Sequential(nn.Dropout(0.3), nn.Linear(DIM, NUM_CLASSES))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        total = 0.0
        for index in torch.randperm(len(self.train_videos)).tolist():  # drawn from the epoch's seed
            video = self.train_videos[index]
            logits = self.model(torch.from_numpy(self.features[video]))
            loss = nn.functional.cross_entropy(logits, torch.from_numpy(self.labels[video]))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
        return {"loss": total / len(self.train_videos)}

    def predict(self, model: nn.Module, videos) -> dict[str, np.ndarray]:
        model.eval()
        with torch.no_grad():
            return {v: torch.softmax(model(torch.from_numpy(self.features[v])), dim=1).numpy() for v in videos}


def _paths(root: Path) -> RunPaths:
    return RunPaths(checkpoints=root / "models", predictions=root / "predictions", curves=root / "curves.csv",
                    tensorboard=root / "tb")


def _fit(root: Path, epochs: int, *, fingerprint: str = "same", messages: list | None = None, validate_every=1):
    features, labels = _toy_data()
    family = _ToyFamily(features, labels, ["v0", "v1", "v2", "v3"])
    torch.manual_seed(0)
    family.model = nn.Sequential(nn.Dropout(0.3), nn.Linear(DIM, NUM_CLASSES))
    family.optimizer = torch.optim.SGD(family.model.parameters(), lr=0.1)
    result = fit(
        name="toy", model=family.model, optimizer=family.optimizer, train_one_epoch=family.train_one_epoch,
        validate=segmentation_validation(family.predict, {v: labels[v] for v in ("v4", "v5")}, [0]),
        epochs=epochs, seed=3, paths=_paths(root), fingerprint=fingerprint, model_args={"in": DIM},
        metadata={"classes": ["a", "b", "c"]}, dist=setup_distributed(),
        log=(messages.append if messages is not None else lambda line: None), validate_every=validate_every,
    )
    return family, result


def test_hold_out_is_seeded_and_never_empty():
    videos = [f"v{i}" for i in range(10)]
    train, val = hold_out(videos, 0.2, seed=1)
    assert len(val) == 2 and sorted(train + val) == videos and not set(train) & set(val)
    assert hold_out(videos, 0.2, seed=1) == (train, val)
    assert hold_out(videos, 0.2, seed=2) != (train, val)
    assert hold_out(videos, 0.01, seed=1)[1], "at least one validation video"
    assert hold_out(["only"], 0.5, seed=0) == (["only"], [])
    assert hold_out(videos, 0.0, seed=0) == (videos, [])
    with pytest.raises(EtesvsError, match="val_fraction must be in"):
        hold_out(videos, 1.0, seed=0)


def test_selection_score_is_the_mean_of_accuracy_edit_and_f1():
    assert selection_score({"acc": 90.0, "edit": 60.0, "f1_50": 30.0, "loss": 5.0}) == pytest.approx(60.0)


def test_curves_leave_out_timings(tmp_path):
    write_curves(tmp_path / "c.csv", [{"epoch": 1, "train_loss": 0.5, "seconds": 3.2, "val_acc": 40.0},
                                      {"epoch": 2, "train_loss": 0.25, "seconds": 2.9, "val_acc": 50.0}])
    assert (tmp_path / "c.csv").read_text() == "epoch,train_loss,val_acc\n1,0.5,40\n2,0.25,50\n"


def test_fingerprint_follows_the_configuration():
    assert run_fingerprint({"lr": 0.1}) == run_fingerprint({"lr": 0.1})
    assert run_fingerprint({"lr": 0.1}) != run_fingerprint({"lr": 0.2})


def test_fit_learns_selects_and_writes_every_output(tmp_path):
    messages: list[str] = []
    family, result = _fit(tmp_path, 6, messages=messages)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5, 6]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert {"val_acc", "val_edit", "val_f1_50"} <= set(result.history[-1])
    best = max(result.history, key=lambda row: selection_score({k[4:]: row[k] for k in row if k.startswith("val_")}))
    assert result.best_epoch == best["epoch"]
    assert load_checkpoint(tmp_path / "models" / "best.pt")["epoch"] == result.best_epoch
    last = load_checkpoint(tmp_path / "models" / "last.pt")
    assert last["epoch"] == 6 and last["classes"] == ["a", "b", "c"] and last["model_args"] == {"in": DIM}
    assert (tmp_path / "curves.csv").read_text().startswith("epoch,train_loss,val_acc,val_edit,val_f1_50\n")
    assert any((tmp_path / "tb").iterdir()) and len(messages) == 6 and messages[0].startswith("toy epoch 1/6: loss")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()  # the tags every model writes, so all overlay
    assert {"train/loss", "val/acc", "val/edit", "val/f1_50"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("val/acc")] == [1, 2, 3, 4, 5, 6]

    features, labels = _toy_data()
    summary = predict_test(name="toy", model=family.model, predict=family.predict, test_videos=["v5", "v4"],
                           classes=["a", "b", "c"], paths=_paths(tmp_path), result=result,
                           describe=lambda model: {"params": 18}, device=torch.device("cpu"))
    assert summary["model"] == "toy" and summary["params"] == 18 and summary["best_epoch"] == result.best_epoch
    assert json.loads((tmp_path / "predictions" / "model.json").read_text()) == summary
    with h5py.File(tmp_path / "predictions" / "probs.h5") as handle:
        assert sorted(handle) == ["v4", "v5"] and handle["v4"].shape == (len(labels["v4"]), NUM_CLASSES)
        np.testing.assert_allclose(handle["v4"][()].sum(axis=1), 1.0, rtol=1e-5)


def test_validating_every_third_epoch_trains_the_same_and_selects_among_the_validated(tmp_path):
    every, every_result = _fit(tmp_path / "every", 7)
    third, result = _fit(tmp_path / "third", 7, validate_every=3)
    for a, b in zip(every.model.state_dict().values(), third.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    validated = [row["epoch"] for row in result.history if "val_acc" in row]
    assert validated == [3, 6, 7] and result.best_epoch in validated
    scores = {row["epoch"]: row["val_acc"] for row in every_result.history}
    assert [scores[epoch] for epoch in validated] == [row["val_acc"] for row in result.history if "val_acc" in row]
    assert load_checkpoint(tmp_path / "third" / "models" / "best.pt")["epoch"] == result.best_epoch
    lines = (tmp_path / "third" / "curves.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,val_acc") and lines[1].split(",")[2] == ""  # epoch 1: no score


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight, _ = _fit(tmp_path / "straight", 4)
    _fit(tmp_path / "resumed", 2)
    messages: list[str] = []
    resumed, result = _fit(tmp_path / "resumed", 4, messages=messages)  # a fresh "process": new model and optimizer
    assert result.resumed_from == 2 and messages[0].startswith("toy: resuming from")
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path):
    _fit(tmp_path, 1)
    messages: list[str] = []
    _, result = _fit(tmp_path, 1, fingerprint="other", messages=messages)
    assert result.resumed_from == 0 and "training from scratch" in messages[0]


def test_a_run_with_more_epochs_than_asked_is_not_resumed(tmp_path):
    _fit(tmp_path, 3)
    messages: list[str] = []
    _, result = _fit(tmp_path, 2, messages=messages)  # the same fingerprint, fewer epochs: trained afresh
    assert result.resumed_from == 0 and "training from scratch" in messages[0]
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_epochs_identify_a_run_only_where_the_schedule_reads_them():
    from etesvs.training import resume_settings

    cosine = {"scheduler": "cosine", "warmup_epochs": 1, "epochs": 24, "num_workers": 2, "num_threads": 1}
    assert resume_settings(cosine) == {"scheduler": "cosine", "warmup_epochs": 1, "epochs": 24, "num_threads": 1}
    constant = {"scheduler": "none", "epochs": 30, "num_threads": 1, "num_workers": 0}
    assert resume_settings(constant) == {"scheduler": "none", "num_threads": 1}  # more epochs: resumes
    one_cycle = {"epochs": 13, "warmup_fraction": 0.15, "num_threads": 2}  # the pretraining: no scheduler key
    assert resume_settings(one_cycle) == one_cycle
    assert run_fingerprint({"train": resume_settings(cosine)}) != run_fingerprint(
        {"train": resume_settings(dict(cosine, epochs=20))})
    assert run_fingerprint({"train": resume_settings(cosine)}) == run_fingerprint(
        {"train": resume_settings(dict(cosine, num_workers=4))})


def test_optimiser_and_schedule_come_from_the_train_section():
    from etesvs.training import build_optimizer, build_scheduler

    parameters = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(parameters, {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "momentum": 0.9},
                          where="p: m.train")
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    with pytest.raises(EtesvsError, match="^p: m.train: optimizer sgd needs momentum$"):
        build_optimizer(parameters, {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0}, where="p: m.train")
    with pytest.raises(EtesvsError, match="^p: m.train.optimizer: expected adam, adamw, sgd, got 'lion'$"):
        build_optimizer(parameters, {"optimizer": "lion", "lr": 0.1, "weight_decay": 0.0}, where="p: m.train")
    steps = build_scheduler(sgd, {"scheduler": "multistep", "milestones": [2, 3], "gamma": 0.1}, where="p: m.train")
    rates = []
    for _ in range(4):
        rates.append(sgd.param_groups[0]["lr"])
        sgd.step()  # an epoch's updates, then the schedule's step (as fit does)
        steps.step()
    assert rates == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert build_scheduler(sgd, {"scheduler": "none"}, where="p") is None
    with pytest.raises(EtesvsError, match="^p: scheduler multistep needs milestones and gamma$"):
        build_scheduler(sgd, {"scheduler": "multistep"}, where="p")
