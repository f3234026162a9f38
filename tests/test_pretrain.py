"""Pretraining on the procedural corpus: schedule, augmentation, export formats that the real loaders read, and a
whole run through the training driver that resumes and exports."""

import json

import numpy as np
import pytest
import torch

from etesvs.data import pretrain_corpus as pc
from etesvs.distributed import DistInfo
from etesvs.errors import EtesvsError
from etesvs.features import build_backbone
from etesvs.models.i3d import InceptionI3d
from etesvs.models.streaming import StreamingSegmenter, load_pretrained_backbone
from etesvs import pretrain as pretrain_module
from etesvs.pretrain import (
    augment_clips,
    build_pretrainer,
    motion_targets,
    one_cycle_lr,
    pretrain_backbone,
)
from etesvs.training import RunPaths

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_distributed=False)


def test_one_cycle_warms_up_then_decays_to_almost_nothing():
    rates = [one_cycle_lr(step, 100, max_lr=1.0, warmup_fraction=0.2) for step in range(100)]
    peak = int(np.argmax(rates))
    assert peak == 20 and rates[peak] == pytest.approx(1.0)
    assert rates[0] == pytest.approx(1 / 25)
    assert all(a <= b for a, b in zip(rates[:peak], rates[1 : peak + 1]))
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1 :]))
    assert rates[-1] < 0.01


def test_augmentation_maps_labels_with_the_frames():
    generator = torch.Generator().manual_seed(0)
    t, h, w = torch.meshgrid(torch.arange(6), torch.arange(2), torch.arange(3), indexing="ij")
    code = (10 * t + 100 * h + w).float()  # (T, H, W): tells time, up/down and left/right apart
    clips = code[None, ..., None].expand(8, 6, 2, 3, 3).to(torch.uint8).clone()
    motion = code[None].expand(8, 6, 2, 3).clone()
    left, right = pc.CLASSES.index("carry_left"), pc.CLASSES.index("carry_right")
    seen = set()
    for _ in range(6):
        out, labels, moved = augment_clips(clips, torch.full((8,), left), motion, num_frames=4, generator=generator)
        assert out.shape == (8, 4, 2, 3, 3) and moved.shape == (8, 4, 2, 3)
        np.testing.assert_array_equal(out[..., 0].float().numpy(), moved.numpy())  # maps follow the frames
        for row in range(8):
            reversed_ = bool(out[row, 0, 0, 0, 0] > out[row, -1, 0, 0, 0])
            mirrored = bool(out[row, 0, 0, 0, 0] > out[row, 0, 0, -1, 0])
            seen.add((reversed_, mirrored))
            assert int(labels[row]) == (right if reversed_ != mirrored else left)
    assert len(seen) == 4


def test_motion_targets_average_spans():
    motion = torch.arange(8, dtype=torch.float32).view(1, 8, 1, 1).expand(1, 8, 2, 2)
    target = motion_targets(motion, 2)  # (1, 4 cells, 2 steps)
    assert target.shape == (1, 4, 2)
    assert target[0, 0].tolist() == [1.5, 5.5]


@pytest.mark.parametrize("backbone", ["i3d", "mobilenet_v2"])
def test_exported_weights_load_with_the_real_loaders(tmp_path, backbone):
    if backbone == "i3d":
        args = {"width_mult": 0.25, "height": 32, "width": 32, "dropout": 0.0}
    else:
        args = {"width_mult": 0.35, "image_size": 32, "shift_divisor": 8, "stem_shift": True, "dropout": 0.0}
    model, to_input, export = build_pretrainer(backbone, num_classes=16, motion_cells=12, model_args=args)
    out = model(to_input(torch.zeros(2, 8, 32, 32, 3, dtype=torch.uint8)))
    assert out["clip"].shape == (2, 16) and out["motion"].shape[:2] == (2, 12)
    path = tmp_path / "weights.pt"
    export(model, path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert all(value.is_contiguous() for value in saved.values())  # plain tensors, though training ran channels-last
    if backbone == "i3d":
        loaded = build_backbone(path, seed=0)  # reads the width back from the file
        assert loaded.pretrained and loaded.model.width_mult == 0.25
        reference = model.i3d.state_dict()
        assert all(torch.equal(value, reference[key]) for key, value in loaded.model.state_dict().items())
    else:
        streaming = StreamingSegmenter(num_classes=3, width_mult=0.35, temporal_shift=True, shift_divisor=8, stem_shift=True,
                                       shift_across_windows=True, memory_channels=8, head="tcn", head_stages=1, head_layers=2, head_channels=8, dropout=0.0,
                                       norm="batch")
        load_pretrained_backbone(streaming, str(path))
        reference = model.mobilenet.features.state_dict()
        assert all(torch.equal(value, reference[key]) for key, value in streaming.backbone.state_dict().items())


def test_a_foreign_width_is_refused_in_one_line(tmp_path):
    path = tmp_path / "narrow.pt"
    torch.save(InceptionI3d(num_classes=None, width_mult=0.25).state_dict(), path)
    with pytest.raises(EtesvsError, match="shape"):
        from etesvs.models.i3d import load_i3d_weights

        load_i3d_weights(InceptionI3d(num_classes=None, width_mult=0.5), path)


SECTION = {
    "model": {"width_mult": 0.25, "height": 32, "width": 48, "dropout": 0.0},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.001, "weight_decay": 0.0001, "warmup_fraction": 0.15,
              "motion_weight": 1.0, "num_frames": 8, "calibration_clips": 8, "validate_every": 1, "amp": "auto",
              "num_threads": 0},
}


def _run(tmp_path, corpus, epochs):
    section = {"model": SECTION["model"], "train": dict(SECTION["train"], epochs=epochs)}
    paths = RunPaths(checkpoints=tmp_path / "models", predictions=tmp_path / "models",
                     curves=tmp_path / "curves.csv", tensorboard=tmp_path / "tb")
    return pretrain_backbone("i3d", section, seed=0, corpus_path=corpus, weights_path=tmp_path / "i3d.pt",
                             paths=paths, dist=CPU)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.h5"
    pc.write_corpus(path, num_clips=48, num_frames=8, height=32, width=48, fps=15.0, holdout_fraction=0.25, seed=0,
                    workers=1, progress=False)
    return path


def test_pretraining_runs_resumes_and_exports(tmp_path, corpus, monkeypatch):
    whole = _run(tmp_path / "whole", corpus, epochs=2)
    assert whole["weights"]["backbone"] == "i3d" and whole["weights"]["corpus_holdout_clips"] == 16
    metrics = whole["metrics"]
    assert 0.0 <= metrics["motion_err"] <= 1.0 and 0.0 <= metrics["corpus_acc"] <= 100.0
    assert "seconds" not in json.dumps(whole)  # no timing in what becomes a DVC metric
    header = (tmp_path / "whole" / "curves.csv").read_text().splitlines()[0]
    assert "val_motion_error" in header and "seconds" not in header
    # interrupted after one epoch, then run to the end: the same weights as the uninterrupted run
    def interrupted_fit(**kwargs):
        def stop(line):
            raise KeyboardInterrupt(line)  # after the first epoch's checkpoint is written

        return real_fit(**dict(kwargs, log=stop))

    real_fit = pretrain_module.fit
    monkeypatch.setattr(pretrain_module, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "split", corpus, epochs=2)
    assert not (tmp_path / "split" / "i3d.pt").exists()
    monkeypatch.setattr(pretrain_module, "fit", real_fit)
    resumed = _run(tmp_path / "split", corpus, epochs=2)
    assert resumed["weights"]["sha256"] == whole["weights"]["sha256"] and resumed["metrics"] == metrics
    assert build_backbone(tmp_path / "split" / "i3d.pt", seed=0).pretrained


def test_settings_that_cannot_run_are_refused(tmp_path, corpus):
    section = {"model": SECTION["model"], "train": dict(SECTION["train"], num_frames=16)}
    paths = RunPaths(checkpoints=tmp_path / "m", predictions=tmp_path / "m", curves=tmp_path / "c.csv",
                     tensorboard=tmp_path / "tb")
    with pytest.raises(EtesvsError, match="num_frames: 16 frames, but .*corpus.h5 has clips of 8"):
        pretrain_backbone("i3d", section, seed=0, corpus_path=corpus, weights_path=tmp_path / "w.pt", paths=paths,
                          dist=CPU)
    assert not (tmp_path / "w.pt").exists()
