"""The demo dataset generator: layout, exact frame counts, determinism, splits, coverage and ambiguity."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from etesvs.data import demo
from etesvs.data.demo import (
    ACTIONS,
    AMBIGUOUS_PAIRS,
    CLASSES,
    RECIPES,
    DemoConfig,
    generate_demo_dataset,
    plan_demo_video,
    render_demo_video,
)
from etesvs.data.layout import read_ground_truth, read_mapping, read_split
from etesvs.errors import EtesvsError
from tests.conftest import run_stage, stage_workdir

ROOT = Path(__file__).resolve().parents[1]
TINY = DemoConfig(num_videos=4, num_subjects=2, min_seconds=3, max_seconds=4, width=64, height=48, fps=10, seed=7)


def decode(path: Path, width: int, height: int) -> np.ndarray:
    """Every frame of a video as (T, H, W, 3) uint8, decoded without dropping or duplicating frames."""
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(path),
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-fps_mode", "passthrough", "pipe:1",
    ]  # fmt: skip
    data = subprocess.run(command, capture_output=True, check=True).stdout
    assert len(data) % (width * height * 3) == 0
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, height, width, 3)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("raw") / "demo"
    return out, generate_demo_dataset(out, TINY, progress=False)


def test_layout_is_ms_tcn(tiny_dataset):
    out, videos = tiny_dataset
    assert videos == ["S1_Tea_1", "S2_Tea_2", "S1_Coffee_3", "S2_Coffee_4"]
    assert sorted(path.name for path in out.iterdir()) == [
        ".etesvs-output.json", "README.txt", "Videos", "demo.json", "groundTruth", "mapping.txt", "splits",
    ]  # fmt: skip
    assert json.loads((out / ".etesvs-output.json").read_text())["owner"] == "make_demo_data"
    assert sorted(path.stem for path in (out / "Videos").glob("*.mp4")) == sorted(videos)
    assert sorted(path.stem for path in (out / "groundTruth").glob("*.txt")) == sorted(videos)
    assert read_mapping(out / "mapping.txt") == list(CLASSES)
    assert (out / "mapping.txt").read_text().splitlines()[0] == "0 background"
    assert json.loads((out / "demo.json").read_text())["config"] == {
        "num_videos": 4, "num_subjects": 2, "min_seconds": 3, "max_seconds": 4,
        "width": 64, "height": 48, "fps": 10, "seed": 7,
    }  # fmt: skip
    readme = (out / "README.txt").read_text()
    assert "Seed: 7." in readme and "64x48 pixels" in readme
    # The temporary files were renamed onto the outputs: nothing else is left beside them.
    assert [path.name for path in out.parent.iterdir()] == ["demo"]
    assert not [path for path in out.rglob("*.tmp")]


def test_videos_have_exactly_one_label_per_frame(tiny_dataset):
    out, videos = tiny_dataset
    for video in videos:
        labels = read_ground_truth(out / "groundTruth" / f"{video}.txt")
        frames = decode(out / "Videos" / f"{video}.mp4", TINY.width, TINY.height)
        assert len(frames) == len(labels), video
        assert TINY.min_frames <= len(labels) <= TINY.max_frames
        assert set(labels) <= set(CLASSES)
        assert frames.std() > 10  # a real picture, not a blank frame


def test_videos_are_h264_yuv420p(tiny_dataset):
    out, videos = tiny_dataset
    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(out / "Videos" / f"{videos[0]}.mp4")],
        capture_output=True,
        text=True,
        check=False,  # ffmpeg exits 1 when given no output file; the stream description is all we want
    ).stderr
    assert "Video: h264" in probe and "yuv420p" in probe and "64x48" in probe


def test_splits_leave_one_subject_out(tiny_dataset):
    out, videos = tiny_dataset
    info = json.loads((out / "demo.json").read_text())["videos"]
    for split in (1, 2):
        lines = (out / "splits" / f"test.split{split}.bundle").read_text().splitlines()
        assert all(line.endswith(".txt") for line in lines)  # MS-TCN bundles name the label files
        test = read_split(out / "splits" / f"test.split{split}.bundle")
        train = read_split(out / "splits" / f"train.split{split}.bundle")
        assert not set(test) & set(train)
        assert sorted(test + train) == sorted(videos)
        assert {info[video]["subject"] for video in test} == {split}
        assert all(video.startswith(f"S{split}_") for video in test)
    assert not (out / "splits" / "test.split3.bundle").exists()


def test_same_seed_gives_the_same_dataset(tiny_dataset, tmp_path):
    out, videos = tiny_dataset
    again = tmp_path / "demo"
    assert generate_demo_dataset(again, TINY, progress=False) == videos
    for video in videos:
        name = f"{video}.txt"
        assert (again / "groundTruth" / name).read_text() == (out / "groundTruth" / name).read_text()
        first = decode(out / "Videos" / f"{video}.mp4", TINY.width, TINY.height)[0]
        assert np.array_equal(decode(again / "Videos" / f"{video}.mp4", TINY.width, TINY.height)[0], first)
        # Byte-identical files, so DVC sees no change when nothing changed.
        assert (again / "Videos" / f"{video}.mp4").read_bytes() == (out / "Videos" / f"{video}.mp4").read_bytes()


def test_different_seed_gives_different_videos():
    first, second = render_demo_video(TINY, 0), render_demo_video(TINY, 0)
    other = render_demo_video(dataclasses.replace(TINY, seed=8), 0)
    assert first.labels == second.labels and np.array_equal(first.frames, second.frames)
    assert other.labels != first.labels
    assert not np.array_equal(other.frames[0], first.frames[0])


def test_interrupted_run_keeps_the_old_dataset(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    shutil.copytree(tiny_dataset[0], out)
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    encode = demo.encode_mp4
    calls = []

    def failing_encode(frames, path, fps):
        calls.append(path)
        if len(calls) == 2:
            raise EtesvsError(f"{path}: simulated failure")
        encode(frames, path, fps)

    monkeypatch.setattr(demo, "encode_mp4", failing_encode)
    with pytest.raises(EtesvsError, match="simulated failure"):
        generate_demo_dataset(out, dataclasses.replace(TINY, seed=8), progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["demo"]
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_refuses_a_directory_it_did_not_write(tmp_path):
    out = tmp_path / "mydata"
    (out / "Videos").mkdir(parents=True)
    (out / "Videos" / "holiday.mp4").write_bytes(b"precious")
    with pytest.raises(EtesvsError) as error:
        generate_demo_dataset(out, TINY, progress=False)
    assert str(error.value) == (
        f"{out}: make_demo_data will not write here: it is a dataset root (it holds Videos/ or groundTruth/)"
    )
    (out / "Videos" / "holiday.mp4").unlink()
    (out / "Videos").rmdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EtesvsError, match=r"it holds files that make_demo_data did not write \(notes.txt\)"):
        generate_demo_dataset(out, TINY, progress=False)
    assert [path.name for path in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 63}, "width and height must be even"),
        ({"num_subjects": 1}, "num_subjects must be at least 2"),
        ({"num_videos": 1}, "num_videos (1) must be at least num_subjects (2)"),
        ({"min_seconds": 1.0}, "to hold a whole recipe"),
        ({"min_seconds": 5.0}, "min_seconds <= max_seconds"),
    ],
)
def test_config_rejects_impossible_sizes(changes, message):
    with pytest.raises(EtesvsError, match="demo dataset config: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(TINY, **changes)


def test_default_size_covers_every_class_and_recipe(default_params):
    config = DemoConfig(**default_params["demo"])
    plans = [plan_demo_video(config, index) for index in range(config.num_videos)]
    labels = {segment.label for plan in plans for segment in plan.segments}
    assert labels == set(CLASSES)
    for subject in range(config.num_subjects):
        assert {plan.recipe for plan in plans if plan.subject == subject} == set(RECIPES)
    assert all(config.min_frames <= plan.num_frames <= config.max_frames for plan in plans)
    # Actions last from a few frames to several seconds.
    lengths = [
        segment.stop - segment.start for plan in plans for segment in plan.segments if segment.label != "background"
    ]
    assert min(lengths) <= config.fps / 2 and max(lengths) >= 5 * config.fps
    # Segments tile each video, and no two neighbours carry the same label.
    for plan in plans:
        assert plan.segments[0].start == 0
        assert all(a.stop == b.start and a.label != b.label for a, b in zip(plan.segments, plan.segments[1:]))


@pytest.fixture(scope="module")
def subject_videos() -> list[demo.DemoVideo]:
    """Twenty-four 12-second videos of one subject, six of each recipe."""
    config = DemoConfig(num_videos=48, num_subjects=2, min_seconds=12, max_seconds=12, width=64, height=48, fps=10,
                        seed=0)
    return [render_demo_video(config, index) for index in range(0, 48, 2)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _class_statistics(videos) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per class: mean appearance (frame minus its video's mean frame) and mean motion (frame difference).

    Frames are divided by their local mean brightness (16x16 blocks) to remove the lighting drift, and the result
    is pooled to 4x4 cells: (H, W, 3) -> (H / 4, W / 4, 3).
    """
    appearance, motion = {}, {}
    for video in videos:
        frames = video.frames.astype(np.float32)
        count, height, width, _ = frames.shape
        blocks = frames.reshape(count, height // 16, 16, width // 16, 16, 3)
        frames = (blocks / blocks.mean(axis=(2, 4, 5), keepdims=True)).reshape(frames.shape)
        deviation = frames - frames.mean(axis=0)
        labels = np.array(video.labels)
        steps = np.diff(frames, axis=0)  # (T - 1, H, W, 3)
        for label in set(video.labels):
            appearance.setdefault(label, []).append(deviation[labels == label])
            motion.setdefault(label, []).append(steps[(labels[1:] == label) & (labels[:-1] == label)])

    def pooled(parts):
        mean = np.concatenate(parts).mean(axis=0)  # (H, W, 3)
        return mean.reshape(height // 4, 4, width // 4, 4, 3).mean(axis=(1, 3))

    return {c: pooled(p) for c, p in appearance.items()}, {c: pooled(p) for c, p in motion.items()}


@pytest.mark.parametrize("pair", AMBIGUOUS_PAIRS)
def test_paired_classes_look_alike_but_move_oppositely(subject_videos, pair):
    appearance, motion = _class_statistics(subject_videos)
    first, second = pair
    others = [label for label in ACTIONS if label not in pair]
    similarity = _cosine(appearance[first], appearance[second])
    # Where things are on the screen: the pair is alike, and unlike every other action.
    assert similarity > 0.6
    for other in others:
        assert similarity > 0.25 + max(_cosine(appearance[first], appearance[other]),
                                       _cosine(appearance[second], appearance[other])), other  # fmt: skip
    # How things change from frame to frame: the pair is opposite.
    assert _cosine(motion[first], motion[second]) < -0.7


def test_paired_classes_follow_one_path_in_opposite_directions(subject_videos):
    def velocity(label, name, column):
        steps = []
        for video in subject_videos:
            for segment in video.segments:
                if segment.label == label:
                    steps.append(np.diff(video.trajectories[name][segment.start : segment.stop, column]))
        return np.concatenate(steps)

    # The cup travels from its place on the right to the work spot and back: x falls, then rises.
    take, put = velocity("take_cup", "cup", 0), velocity("put_cup", "cup", 0)
    assert take.sum() < 0 < put.sum() and (take <= 1e-9).all() and (put >= -1e-9).all()
    # The lid unscrews counter-clockwise (angle falls, y points down) and screws back clockwise.
    unscrew, screw = velocity("open_jar", "lid", 2), velocity("close_jar", "lid", 2)
    assert unscrew.sum() < 0 < screw.sum() and (unscrew <= 1e-9).all() and (screw >= -1e-9).all()


@pytest.mark.slow
def test_stage_script_writes_the_dataset_and_reports_bad_params(tmp_path):
    demo = dict(num_videos=2, num_subjects=2, min_seconds=3, max_seconds=3, width=64, height=48, fps=10, seed=1)
    done = run_stage("make_demo_data", "--out", str(tmp_path / "demo"),
                     cwd=stage_workdir(tmp_path / "good", {"demo": demo}))
    assert done.returncode == 0, done.stderr
    assert read_split(tmp_path / "demo" / "splits" / "test.split2.bundle") == ["S2_Tea_2"]
    bad = run_stage("make_demo_data", "--out", str(tmp_path / "bad"),
                    cwd=stage_workdir(tmp_path / "odd", {"demo": {**demo, "width": 63}}))
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: demo dataset config: width and height must be even")
    assert not (tmp_path / "bad").exists()
