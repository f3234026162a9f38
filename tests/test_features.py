"""Per-frame I3D features: both methods, the HDF5 store, resuming, importing, and the stages end to end."""

from __future__ import annotations

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

from etesvs import features as features_module
from etesvs.data.frames import FrameReader, frames_path, write_frame_container
from etesvs.distributed import DistInfo
from etesvs.errors import EtesvsError, run_main
from etesvs.import_features import main as import_features_main
from etesvs.models.i3d import InceptionI3d
from etesvs.features import (
    extract_dataset_features,
    FeatureConfig,
    build_backbone,
    flops_per_frame,
    extract_features,
    import_npy_features,
    interpolate_to_frames,
    partial_path,
    preprocess,
    read_clamped,
    video_features,
)
from tests.conftest import default_config

pytestmark = pytest.mark.filterwarnings("ignore:no I3D weights given:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
COUNTS = {"v1": 11, "v2": 5, "v3": 9}
# Small chunks keep the tests fast; the defaults (64 + 2 x 16) are exercised by the benchmark.
BASE = dict(method="chunked", batch_size=2, dtype="float32", crop_size=0, short_side=0, window_size=21, chunk_size=8,
            chunk_context=8)


def config_(**changes) -> FeatureConfig:
    return FeatureConfig(**{**BASE, **changes})


TINY = config_()
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_distributed=False)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(root: Path, counts: dict[str, int] = COUNTS, *, size: int = 32) -> tuple[Path, Path]:
    """Frame containers of random 32 x 32 frames and a labels info.json naming them; returns (frames, labels)."""
    rng = np.random.default_rng(0)
    frames_dir, labels_dir = root / "frames", root / "labels"
    frames_dir.mkdir(parents=True)
    labels_dir.mkdir()
    for video, count in counts.items():
        frames = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
        write_frame_container(frames_path(frames_dir, video), frames, fps=15.0)
    videos = list(counts)
    info = {
        "dataset": "tiny", "fps": 15.0, "classes": ["a", "b"], "background": [], "background_ids": [], "split": 1,
        "train": videos[:-1], "test": videos[-1:], "num_frames": counts,
    }
    (labels_dir / "info.json").write_text(json.dumps(info))
    return frames_dir, labels_dir


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(None, seed=0)


def read_store(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {video: handle[video][()] for video in handle}


# ---------------------------------------------------------------------------------------------------------------
# Frames to features
# ---------------------------------------------------------------------------------------------------------------


def test_preprocess_scales_to_minus_one_one_and_crops():
    frames = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(3 * 40 * 60).reshape(2, 3, 40, 60)
    scaled = preprocess(frames, crop_size=None)
    assert scaled.dtype == torch.float32 and scaled.shape == (2, 3, 40, 60)
    assert scaled[0].eq(-1).all() and scaled[1].eq(1).all()
    assert preprocess(frames, crop_size=32).shape == (2, 3, 32, 32)
    assert preprocess(frames, crop_size=None, short_side=20).shape == (2, 3, 20, 30)  # aspect ratio kept
    assert preprocess(frames, crop_size=16, short_side=20).shape == (2, 3, 16, 16)


def test_short_side_settings_are_checked_and_change_the_cost():
    with pytest.raises(EtesvsError, match=r"features.crop_size \(32\) exceeds features.short_side \(24\)"):
        config_(crop_size=32, short_side=24)
    with pytest.raises(EtesvsError, match="features.short_side: must be positive, or 0"):
        config_(short_side=-1)
    model = InceptionI3d(num_classes=None, width_mult=0.25)
    full = flops_per_frame(model, config_(), height=48, width=64)
    half = flops_per_frame(model, config_(short_side=24), height=48, width=64)
    assert half == pytest.approx(full / 4, rel=0.15)


def test_read_clamped_repeats_the_edge_frames(dataset):
    frames_dir, _ = dataset
    with FrameReader(frames_path(frames_dir, "v2")) as reader:
        everything = reader.read(0, 5)
        clip = read_clamped(reader, -3, 8)
    assert clip.shape == (11, 3, 32, 32)
    assert torch.equal(clip[:4], everything[:1].expand(4, -1, -1, -1))
    assert torch.equal(clip[3:8], everything)
    assert torch.equal(clip[7:], everything[-1:].expand(4, -1, -1, -1))


def test_interpolation_uses_the_centre_of_each_i3d_step():
    steps = torch.arange(4, dtype=torch.float32).reshape(1, 1, 4)  # step j has value j, centred on frame 8j + 5
    frames = interpolate_to_frames(steps, 0, 32)[0, 0]
    assert frames[5] == 0 and frames[13] == 1 and frames[29] == 3
    assert frames[9] == pytest.approx(0.5) and frames[0] == 0 and frames[31] == 3  # clamped beyond the ends


@pytest.mark.parametrize("method", ["window", "chunked"])
def test_both_methods_give_one_1024_feature_per_frame(dataset, backbone, method):
    frames_dir, _ = dataset
    config = config_(method=method, batch_size=3)
    with FrameReader(frames_path(frames_dir, "v2")) as reader:
        features = video_features(backbone.model, reader, config, CPU)
    assert features.shape == (5, 1024) and features.dtype == np.float32
    assert np.isfinite(features).all() and features.std(axis=1).min() > 0


def test_window_feature_is_the_clip_centred_on_its_frame(dataset, backbone):
    frames_dir, _ = dataset
    config = config_(method="window", batch_size=4)
    with FrameReader(frames_path(frames_dir, "v2")) as reader:
        features = video_features(backbone.model, reader, config, CPU)
        frames = reader.read(0, 5)
    # Frame 1: 21 frames from -9 to 11, i.e. frame 0 ten times, frames 0..4, then frame 4 six times.
    clip = torch.cat([frames[:1].expand(9, -1, -1, -1), frames, frames[-1:].expand(7, -1, -1, -1)])
    clip = preprocess(clip, crop_size=None).permute(1, 0, 2, 3)[None]  # (21, 3, H, W) -> (1, 3, 21, H, W)
    with torch.inference_mode():
        expected = backbone.model(clip).mean(dim=2)[0].numpy()
    np.testing.assert_allclose(features[1], expected, rtol=1e-4, atol=1e-5)


def test_chunked_features_do_not_depend_on_the_batch_size(dataset, backbone):
    frames_dir, _ = dataset
    with FrameReader(frames_path(frames_dir, "v1")) as reader:  # 11 frames: two chunks of 8
        one = video_features(backbone.model, reader, config_(batch_size=1), CPU)
        two = video_features(backbone.model, reader, config_(batch_size=2), CPU)
    np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-5)
    assert not np.allclose(one[3], one[9])


def test_random_backbone_is_deterministic_from_the_seed(dataset, backbone):
    frames_dir, _ = dataset
    results = []
    for model in (backbone.model, build_backbone(None, seed=0).model, build_backbone(None, seed=1).model):
        with FrameReader(frames_path(frames_dir, "v2")) as reader:
            results.append(video_features(model, reader, TINY, CPU))
    assert np.array_equal(results[0], results[1])
    assert not np.allclose(results[0], results[2])


def test_without_weights_a_warning_says_the_backbone_is_not_pretrained():
    with pytest.warns(UserWarning, match="randomly initialised"):
        backbone = build_backbone("", seed=1)
    assert backbone.pretrained is False and backbone.weights_hash == "random-init-seed1"


@pytest.mark.parametrize(
    "kwargs", [{"method": "optical"}, {"dtype": "int8"}, {"chunk_size": 12}, {"window_size": 20}, {"batch_size": 0}]
)
def test_bad_settings_are_errors_naming_the_param(kwargs):
    with pytest.raises(EtesvsError, match=f"features.{next(iter(kwargs))}"):
        config_(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The HDF5 store and resuming
# ---------------------------------------------------------------------------------------------------------------


def test_store_has_one_complete_dataset_per_video_with_attributes(tmp_path, dataset, backbone):
    frames_dir, _ = dataset
    config = config_(dtype="float16")
    stats, output = extract_features(
        list(COUNTS), frames_dir=frames_dir, out_dir=tmp_path, backbone=backbone, config=config, dist=SINGLE,
        device=CPU, num_frames=COUNTS, progress=False,
    )
    assert [(s.computed, s.reused, s.frames) for s in stats] == [(3, 0, sum(COUNTS.values()))]
    assert output.retain(["features.h5"]) == ["features.h5.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".etesvs-output.json", "features.h5"]
    with h5py.File(tmp_path / "features.h5", "r") as handle:
        assert list(handle) == sorted(COUNTS)
        for video, count in COUNTS.items():
            dataset_ = handle[video]
            assert dataset_.shape == (count, 1024) and dataset_.dtype == np.float16
            assert dataset_.chunks is not None
            attrs = dict(dataset_.attrs)
            assert attrs["fps"] == 15.0 and attrs["extractor"] == "i3d-rgb-mixed5c" and attrs["method"] == "chunked"
            assert attrs["weights_hash"] == "random-init-seed0" and not attrs["backbone_pretrained"]
            assert attrs["complete"]


def _counting(monkeypatch) -> list[str]:
    """Record the videos whose features are computed."""
    calls: list[str] = []
    original = features_module.video_features

    def counted(model, reader, *args, **kwargs):
        calls.append(reader.path.stem)
        return original(model, reader, *args, **kwargs)

    monkeypatch.setattr(features_module, "video_features", counted)
    return calls


def test_rerun_after_an_interruption_only_computes_the_unfinished_videos(tmp_path, dataset, backbone, monkeypatch):
    frames_dir, _ = dataset
    fresh_dir, resumed_dir = tmp_path / "fresh", tmp_path / "resumed"
    run = dict(frames_dir=frames_dir, backbone=backbone, config=TINY, dist=SINGLE, device=CPU, progress=False)
    extract_features(list(COUNTS), out_dir=fresh_dir, **run)
    fresh = read_store(fresh_dir / "features.h5")

    # An interrupted run: v1 finished, v3 killed while being written (data there, never marked complete).
    resumed_dir.mkdir()
    partial = partial_path(resumed_dir, 0, 1)
    features_module._extract_shard(
        ["v1", "v3"], frames_dir=frames_dir, num_frames=None, partial=partial, backbone=backbone, config=TINY,
        device=CPU, progress=False, description="",
    )
    with h5py.File(partial, "a") as handle:
        handle["v3"].attrs["complete"] = False
        handle["v3"][...] = 0.0
    calls = _counting(monkeypatch)
    stats, output = extract_features(list(COUNTS), out_dir=resumed_dir, **run)  # adopts the unmarked partial file
    output.retain(["features.h5"])
    assert sorted(calls) == ["v2", "v3"]
    assert (stats[0].computed, stats[0].reused) == (2, 1)
    resumed = read_store(resumed_dir / "features.h5")
    assert resumed.keys() == fresh.keys()
    for video in fresh:
        np.testing.assert_allclose(resumed[video], fresh[video], rtol=1e-5, atol=1e-6)
    assert not partial.exists()


def test_partial_file_with_other_settings_or_corrupt_is_started_over(tmp_path, dataset, backbone, monkeypatch, capsys):
    frames_dir, _ = dataset
    partial = partial_path(tmp_path, 0, 1)
    features_module._extract_shard(
        ["v2"], frames_dir=frames_dir, num_frames=None, partial=partial, backbone=backbone,
        config=config_(method="window", batch_size=5), device=CPU, progress=False, description="",
    )
    calls = _counting(monkeypatch)
    run = dict(frames_dir=frames_dir, out_dir=tmp_path, backbone=backbone, config=TINY, dist=SINGLE, device=CPU)
    extract_features(["v2"], progress=False, **run)
    assert calls == ["v2"] and "other settings" in capsys.readouterr().err

    partial.write_bytes(b"\x89HDF\r\n truncated by a crash")
    extract_features(["v2"], progress=False, **run)
    assert calls == ["v2", "v2"] and "unreadable partial file" in capsys.readouterr().err


def test_frame_count_differing_from_the_labels_is_an_error_naming_the_container(tmp_path, dataset, backbone):
    frames_dir, _ = dataset
    with pytest.raises(EtesvsError, match=r"v2\.h5: 5 frames but the labels have 6"):
        extract_features(
            ["v2"], frames_dir=frames_dir, out_dir=tmp_path, backbone=backbone, config=TINY, dist=SINGLE,
            device=CPU, num_frames={"v2": 6}, progress=False,
        )
    assert not (tmp_path / "features.h5").exists()


# ---------------------------------------------------------------------------------------------------------------
# Importing the MS-TCN release features
# ---------------------------------------------------------------------------------------------------------------


def test_import_transposes_npy_features(tmp_path):
    npy_dir = tmp_path / "npy"
    npy_dir.mkdir()
    arrays = {"a": np.random.rand(2048, 7).astype(np.float32), "b": np.random.rand(2048, 3).astype(np.float32)}
    for video, array in arrays.items():
        np.save(npy_dir / f"{video}.npy", array)
    out = tmp_path / "features" / "features.h5"
    import_npy_features(npy_dir, out, fps=15.0)
    stored = read_store(out)
    assert stored.keys() == arrays.keys()
    for video, array in arrays.items():
        np.testing.assert_array_equal(stored[video], array.T)


@pytest.mark.parametrize(
    "shape, message",
    [((7, 2048), r"a\.npy: expected an array of shape \(2048, T\), got \(7, 2048\) \(transposed\?\)"),
     ((2048,), r"a\.npy: expected an array of shape \(2048, T\), got \(2048,\)"),
     ((2048, 6), r"a\.npy: 6 frames but the labels have 7")],
)
def test_import_rejects_wrong_shapes_naming_the_file(tmp_path, shape, message):
    np.save(tmp_path / "a.npy", np.zeros(shape, np.float32))
    with pytest.raises(EtesvsError, match=message):
        import_npy_features(tmp_path, tmp_path / "out.h5", videos=["a"], num_frames={"a": 7}, fps=15.0)
    assert not (tmp_path / "out.h5").exists()


def test_import_can_fix_small_length_differences(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((2048, 6), np.float32))
    notes = import_npy_features(
        tmp_path, tmp_path / "out.h5", videos=["a"], num_frames={"a": 7}, fps=15.0, max_length_mismatch=1
    )
    assert read_store(tmp_path / "out.h5")["a"].shape == (7, 2048) and "a.npy: -1 frames" in notes[0]


# ---------------------------------------------------------------------------------------------------------------
# The stages, end to end
# ---------------------------------------------------------------------------------------------------------------

STAGE_PARAMS = {"seed": 3, "features": {"weights": "", **BASE}}


def _stage_workdir(root: Path, **features) -> Path:
    """A working directory as DVC runs extract_features in (dvc.yaml, params.yaml with small chunks)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    params = {"cpu_kernels": default_config()["cpu_kernels"], "seed": 3,
              "features": {"weights": "", **BASE, **features}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _extract(workdir: Path, frames_dir: Path, labels_dir: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    command = [*launcher, str(ROOT / "stages/extract_features.py"), "--frames", str(frames_dir), "--labels",
               str(labels_dir), "--out", "features"]
    env = {**{k: v for k, v in os.environ.items() if k != "DVC_STAGE"}, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir, timeout=300)


@pytest.mark.slow
def test_torchrun_gives_the_same_features_as_one_process(tmp_path, dataset):
    frames_dir, labels_dir = dataset
    single = _extract(_stage_workdir(tmp_path / "single"), frames_dir, labels_dir, [sys.executable])
    assert single.returncode == 0, single.stderr
    assert "warning: no I3D weights given" in single.stderr and "extract_features: 3 videos (3 computed" in single.stdout
    info = json.loads((tmp_path / "single" / "features" / "info.json").read_text())
    assert info["backbone_pretrained"] is False and info["params"] == 12_287_264 and info["flops_per_frame"] > 0
    assert "frames_per_second" not in info and "videos_computed" not in info, "no timings or run counts in info.json"

    distributed = _extract(_stage_workdir(tmp_path / "ddp"), frames_dir, labels_dir,
                           [TORCHRUN, "--nproc_per_node", "2", "--standalone"])
    assert distributed.returncode == 0, distributed.stderr
    assert sorted(p.name for p in (tmp_path / "ddp" / "features").iterdir()) == [".etesvs-output.json", "features.h5",
                                                                             "info.json"]
    assert json.loads((tmp_path / "ddp" / "features" / "info.json").read_text()) == info
    expected = read_store(tmp_path / "single" / "features" / "features.h5")
    got = read_store(tmp_path / "ddp" / "features" / "features.h5")
    assert got.keys() == expected.keys() == COUNTS.keys()
    for video in expected:
        np.testing.assert_allclose(got[video], expected[video], rtol=1e-5, atol=1e-6)


def test_a_bad_weights_file_fails_with_one_line_and_writes_nothing(tmp_path, dataset):
    frames_dir, labels_dir = dataset
    weights = tmp_path / "rgb_imagenet.pt"
    weights.write_bytes(b"not a torch file")
    with pytest.raises(EtesvsError, match=f"^{weights}: truncated or not a PyTorch I3D weights file$"):
        extract_dataset_features({"weights": str(weights), **BASE}, seed=3, frames_dir=frames_dir,
                                 labels_dir=labels_dir, out_dir=tmp_path / "out", dist=SINGLE)
    assert not (tmp_path / "out" / "features.h5").exists()


def _import(argv: list[str]) -> int:
    """``python -m etesvs.import_features ARGV`` in this process; returns the exit code."""
    try:
        run_main(lambda: import_features_main(argv))
    except SystemExit as exit_:
        return int(exit_.code)
    return 0


def test_import_command_reports_a_bad_file_in_one_line(tmp_path, capsys):
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "v1.npy", np.zeros((3, 2048), np.float32))
    argv = ["--npy-dir", str(tmp_path / "npy"), "--out", str(tmp_path / "features.h5"), "--fps", "15"]
    assert _import(argv) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'npy' / 'v1.npy'}: expected an array of shape (2048, T), got (3, 2048) (transposed?)"
    )
    assert not (tmp_path / "features.h5").exists()
    # the output is never written among the user's files
    assert _import(["--npy-dir", str(tmp_path / "npy"), "--out", str(tmp_path / "npy" / "f.h5"), "--fps", "15"]) == 1
    assert "lies inside the input directory" in capsys.readouterr().err


def test_import_command_writes_features_and_info(tmp_path, dataset):
    _, labels_dir = dataset
    npy_dir = tmp_path / "npy"
    npy_dir.mkdir()
    for video, count in COUNTS.items():
        np.save(npy_dir / f"{video}.npy", np.full((2048, count), count, np.float32))
    out = tmp_path / "features" / "features.h5"
    assert _import(["--npy-dir", str(npy_dir), "--out", str(out), "--labels", str(labels_dir)]) == 0
    assert {video: array.shape for video, array in read_store(out).items()} == {v: (c, 2048) for v, c in COUNTS.items()}
    assert json.loads((out.parent / "info.json").read_text())["backbone_pretrained"] is True


def test_batch_norm_calibration_normalises_a_random_backbone(dataset):
    from etesvs.features import build_backbone, calibrate_batch_norm

    frames_dir, _ = dataset
    random = build_backbone(None, seed=0)
    first = random.model.Conv3d_1a_7x7.bn
    assert torch.equal(first.running_mean, torch.zeros_like(first.running_mean))
    calibrated = calibrate_batch_norm(random, frames_dir, ["v1", "v3"], TINY, num_clips=2, clip_length=8)
    assert calibrated.weights_hash == "random-init-seed0-bn-calibrated2x8" and not calibrated.pretrained
    assert not calibrated.model.training
    assert first.running_mean.abs().sum() > 0 and not torch.allclose(first.running_var, torch.ones_like(first.running_var))
    # Each calibrated layer's output is close to zero mean, unit variance on the calibration clips.
    with FrameReader(frames_path(frames_dir, "v1")) as reader:
        clip = features_module.preprocess(features_module.read_clamped(reader, 0, 8), crop_size=None)
    outputs = {}
    handle = first.register_forward_hook(lambda module, inputs, output: outputs.setdefault("bn", output))
    with torch.no_grad():
        calibrated.model(clip.permute(1, 0, 2, 3)[None])  # (T,3,H,W) -> (1,3,T,H,W)
    handle.remove()
    assert outputs["bn"].mean().abs() < 0.5 and 0.3 < outputs["bn"].std() < 2.0
    pretrained = features_module.Backbone(model=random.model, weights_hash="abc", pretrained=True)
    assert calibrate_batch_norm(pretrained, frames_dir, ["v1"], TINY) is pretrained
