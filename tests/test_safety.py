"""Issue 10, safety: never delete what the pipeline did not write, contain every path, let ffmpeg open only the file
named, and refuse in one line. Each section is one case of the issue, with variants of its class."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from etesvs.data.frames import ExtractConfig, decode_video_to_jpeg, extract_frames, frames_path
from etesvs.data.labels import activitynet_to_ground_truth, convert_labels, load_label_info, load_labels
from etesvs.data.layout import DatasetLayout, parse_video_path_rules, read_split
from etesvs.errors import EtesvsError, Interrupted, run_main
from etesvs.io import (
    MARKER_NAME,
    atomic_path,
    check_output_file,
    check_plain_name,
    claim_output_dir,
    load_weights_file,
    path_inside,
    write_json,
)
from tests.conftest import ROOT, run_stage, stage_workdir
from tests.test_evaluate import cli_args, tiny_labels, write_predictions, write_text_dataset
from tests.test_frames import make_video
from tests.test_labels import make_dataset
from tests.test_stream import make_checkpoint

CONFIG = ExtractConfig(fps=15, short_side=32, jpeg_quality=3, tolerance=20)


STAGE_PARAMS = {
    "dataset": {"name": "t", "split": 1, "fps": 15, "background": "background", "image_size": 32,
                "video_path_rules": ""},
    "frames": {"jpeg_quality": 3, "tolerance": 5, "workers": 1, "skip_bad_videos": False},
}
PROJECT_FILES = ("dvc.yaml", "params.yaml")  # what a stage reads in its working directory, as under DVC


def stage(name: str, *argv, cwd: Path, **frames) -> tuple[int, list[str]]:
    """``python stages/<name>.py ARGV`` in ``cwd`` with dvc.yaml and params.yaml there; (exit status, stderr lines).

    ``frames`` changes the ``frames`` params (``workers``, ``skip_bad_videos``, ...).
    """
    stage_workdir(cwd, {**STAGE_PARAMS, "frames": {**STAGE_PARAMS["frames"], **frames}})
    result = run_stage(name, *map(str, argv), cwd=cwd)
    return result.returncode, result.stderr.strip().splitlines()


@pytest.fixture
def cli(capsys):
    """Run an entry point as its ``__main__`` does (through run_main); returns (exit status, stderr lines)."""

    def run(main, *argv):
        handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        capsys.readouterr()
        try:
            run_main(lambda: main(list(argv)) if argv else main())
            status = 0
        except SystemExit as exit:
            status = exit.code
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
        return status, capsys.readouterr().err.strip().splitlines()

    return run


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` and its bytes (but the dvc.yaml and params.yaml a stage run needs)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and str(p.relative_to(directory)) not in PROJECT_FILES}


def dataset_with_videos(root: Path) -> Path:
    make_dataset(root)
    for video in ("a", "b", "c"):
        make_video(root / "Videos" / f"{video}.mp4", frames=6)
    return root


# ============================================================================= 1. outputs are owned: no data loss

def convert_args(root, out):
    return ["--root", str(root), "--out", str(out)]


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("root", "it is the input {root}"),
        ("cwd", "it is the current directory"),
        ("parent", "it contains the input {root}"),
        ("inside", "it lies inside the input directory {root}"),
        ("other_dataset", "it is a dataset root (it holds Videos/ or groundTruth/)"),
        ("user_files", "it holds files that convert_labels did not write (notes.txt, photos/cat.jpg)"),
        ("project", "it is a project root (it holds .git)"),
        ("home", "it is your home directory"),
        ("file", "it is a file, not a directory"),
        ("other_owner", "it holds the output of extract_frames"),
    ],
)
def test_convert_labels_refuses_directories_it_does_not_own(tmp_path, monkeypatch, cli, target, reason):
    root = dataset_with_videos(tmp_path / "data" / "raw" / "demo")
    out = {
        "root": root,
        "cwd": Path("."),
        "parent": root.parent,
        "inside": root / "labels",
        "other_dataset": tmp_path / "gtea",
        "user_files": tmp_path / "mine",
        "project": tmp_path / "project",
        "home": tmp_path / "home",
        "file": root / "mapping.txt",
        "other_owner": tmp_path / "frames",
    }[target]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    dataset_with_videos(tmp_path / "gtea")
    (tmp_path / "mine" / "photos").mkdir(parents=True)
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "mine" / "photos" / "cat.jpg").write_bytes(b"cat")
    (tmp_path / "project" / ".git").mkdir(parents=True)
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / MARKER_NAME).write_text('{"owner": "extract_frames", "files": []}')
    before = snapshot(tmp_path)

    status, lines = stage("convert_labels", *convert_args(root, out), cwd=tmp_path)

    assert status == 1
    assert lines == [f"error: {out}: convert_labels will not write here: {reason.format(root=root)}"]
    assert snapshot(tmp_path) == before, "nothing was written or removed"


def test_convert_labels_replaces_only_its_own_files(tmp_path):
    root = make_dataset(tmp_path / "raw")
    out = tmp_path / "labels"
    convert_labels(DatasetLayout(root), out, dataset="t", split=1, fps=15, background=["background"])
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker == {
        "owner": "convert_labels",
        "files": ["info.json", "labels.h5", "localization_test.json", "localization_train.json"],
    }
    # A file the stage wrote earlier and writes no more goes; the rest is replaced.
    (out / "old.json").write_text("{}")
    (out / MARKER_NAME).write_text(json.dumps({**marker, "files": marker["files"] + ["old.json"]}))
    (out / ".info.json.abcd1234.tmp").write_text("left by a killed run")
    (root / "groundTruth" / "c.txt").write_text("take\n" * 5)
    convert_labels(DatasetLayout(root), out, dataset="t", split=1, fps=15, background=["background"])
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, *marker["files"]]
    assert load_labels(out, "c").tolist() == [1] * 5
    # A file the stage did not write stops it, and stays.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EtesvsError, match=r"labels: convert_labels will not write here: it holds files that "
                                          r"convert_labels did not write \(notes.txt\)"):  # fmt: skip
        convert_labels(DatasetLayout(root), out, dataset="t", split=1, fps=15, background=["background"])
    assert (out / "notes.txt").read_text() == "mine"


def test_convert_labels_interrupted_keeps_the_previous_output(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "raw")
    out = tmp_path / "labels"
    convert_labels(DatasetLayout(root), out, dataset="t", split=1, fps=15, background=["background"])
    before = snapshot(out)
    (root / "groundTruth" / "c.txt").write_text("take\n" * 5)
    from etesvs.data import labels as labels_module

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(labels_module, "localization_database", fail)
    with pytest.raises(KeyboardInterrupt):
        convert_labels(DatasetLayout(root), out, dataset="t", split=1, fps=15, background=["background"])
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("data", "it contains the input data/labels"),
        ("features", "it holds files that extract_frames did not write (features.h5)"),
        ("labels", "it is the input data/labels"),
        ("videos", "it is the input raw/Videos"),
        ("nested", "it holds files that extract_frames did not write (cache/labels.h5)"),
    ],
)
def test_extract_frames_never_sweeps_other_files(tmp_path, monkeypatch, cli, target, reason):
    monkeypatch.chdir(tmp_path)
    root = dataset_with_videos(tmp_path / "raw")
    convert_labels(DatasetLayout(root), tmp_path / "data" / "labels", dataset="t", split=1, fps=15,
                   background=["background"])  # fmt: skip
    (tmp_path / "data" / "features").mkdir()
    (tmp_path / "data" / "features" / "features.h5").write_bytes(b"features")
    frames = tmp_path / "data" / "frames"
    status, lines = stage("extract_frames", "--root", "raw", "--labels", "data/labels", "--out", "data/frames",
                          "--report", "report.json", cwd=tmp_path)
    assert status == 0, lines
    (frames / "cache").mkdir()
    (frames / "cache" / "labels.h5").write_bytes(b"someone's labels")
    out = {"data": "data", "features": "data/features", "labels": "data/labels", "videos": "raw/Videos",
           "nested": "data/frames"}[target]  # fmt: skip
    before = snapshot(tmp_path)
    status, lines = stage("extract_frames", "--root", "raw", "--labels", "data/labels", "--out", out,
                          "--report", "report.json", cwd=tmp_path)
    assert status == 1
    if target == "videos":  # an input directory
        reason = "it lies inside the input directory raw"
    assert lines[-1] == f"error: {out}: extract_frames will not write here: {reason}"
    assert snapshot(tmp_path) == before


def test_extract_frames_removes_only_containers_it_wrote(tmp_path):
    videos = {name: make_video(tmp_path / "raw" / f"{name}.mp4", frames=6) for name in ("a", "b")}
    out = tmp_path / "frames"
    extract_frames([(v, path, 6) for v, path in videos.items()], out, CONFIG, workers=1, progress=False)
    assert json.loads((out / MARKER_NAME).read_text()) == {"owner": "extract_frames", "files": ["a.h5", "b.h5"]}
    extract_frames([("a", videos["a"], 6)], out, CONFIG, workers=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "a.h5"]


def test_extract_frames_adopts_a_directory_written_before_markers(tmp_path):
    video = make_video(tmp_path / "raw" / "a.mp4", frames=6)
    out = tmp_path / "frames"
    extract_frames([("a", video, 6)], out, CONFIG, workers=1, progress=False)
    (out / MARKER_NAME).unlink()  # as an older version left it: containers only
    results = extract_frames([("a", video, 6)], out, CONFIG, workers=1, progress=False)
    assert [r.status for r in results] == ["skipped"]
    assert json.loads((out / MARKER_NAME).read_text())["files"] == ["a.h5"]
    # Without a marker, one file that is not a container is enough to refuse.
    (out / MARKER_NAME).unlink()
    (out / "b.h5").write_bytes(b"an HDF5 file of someone else")
    with pytest.raises(EtesvsError, match=r"it holds files that extract_frames did not write \(a.h5, b.h5\)"):
        extract_frames([("a", video, 6)], out, CONFIG, workers=1, progress=False)
    assert (out / "b.h5").read_bytes() == b"an HDF5 file of someone else"


def test_evaluate_stage_owns_only_its_segments_directory(tmp_path):
    from tests.test_evaluate import evaluate_stage, reference_model, write_labels_dir, write_model_predictions

    labels = tiny_labels()
    write_labels_dir(tmp_path / "data" / "labels", labels)
    write_model_predictions(tmp_path / "data" / "predictions" / "reference",
                            reference_model(labels, noise=0.1, seed=1, videos=("video_a", "video_b")))  # fmt: skip
    report = tmp_path / "reports" / "reference"
    (report / "train").mkdir(parents=True)
    (report / "train" / "curves.csv").write_text("epoch\n1\n")  # written by the training stage
    result = evaluate_stage(tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (report / "segments").iterdir()) == ["video_a.png", "video_b.png"]
    # DVC draws every file of segments/ as a plot: the marker is beside it.
    assert json.loads((report / f".segments{MARKER_NAME}").read_text())["owner"] == "evaluate"
    assert (report / "train" / "curves.csv").read_text() == "epoch\n1\n"
    (report / "segments" / "my_notes.txt").write_text("mine")
    result = evaluate_stage(tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        "error: reports/reference/segments: evaluate will not write here: "
        "it holds files that evaluate did not write (my_notes.txt)\n"
    )
    assert (report / "segments" / "my_notes.txt").read_text() == "mine"


def test_stream_out_refuses_a_directory_of_other_files(tmp_path):
    from etesvs.stream import load_stream_model, run_stream

    checkpoint = make_checkpoint(tmp_path / "model.pt")
    video = make_video(tmp_path / "v.mp4", frames=20)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "labels.txt").write_text("my own labels")
    model = load_stream_model(checkpoint)
    with pytest.raises(EtesvsError) as error:
        run_stream(model, video, out_dir=tmp_path / "mine", stdout=io.StringIO())
    assert str(error.value) == (
        f"{tmp_path / 'mine'}: stream will not write here: it holds files that stream did not write (labels.txt)"
    )
    assert (tmp_path / "mine" / "labels.txt").read_text() == "my own labels"
    with pytest.raises(EtesvsError, match="it contains the input"):
        run_stream(model, video, out_dir=tmp_path, stdout=io.StringIO(), inputs=[checkpoint])
    run_stream(model, video, out_dir=tmp_path / "out", stdout=io.StringIO())
    run_stream(model, video, out_dir=tmp_path / "out", stdout=io.StringIO())  # its own: replaced
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        MARKER_NAME, "labels.txt", "segments.jsonl", "segments.png"]  # fmt: skip


def test_claim_output_dir_shared_directory_keeps_foreign_files(tmp_path):
    root = tmp_path / "thumos14"
    (root / "Videos").mkdir(parents=True)
    (root / "Videos" / "v.mp4").write_bytes(b"video")
    (root / "groundTruth").mkdir()
    (root / "groundTruth" / "hand_made.txt").write_text("mine\n")
    output = claim_output_dir(root, owner="converter", exclusive=False)
    with output.replace(["groundTruth/a.txt", "mapping.txt"]) as staged:
        for path in staged.values():
            path.write_text("x\n")
    with pytest.raises(EtesvsError, match=r"hand_made.txt: exists and was not written by converter; it is left alone"):
        output.file("groundTruth/hand_made.txt")
    output = claim_output_dir(root, owner="converter", exclusive=False)
    with output.replace(["mapping.txt"]) as staged:
        staged["mapping.txt"].write_text("y\n")
    assert not (root / "groundTruth" / "a.txt").exists(), "its own file, no longer written, is removed"
    assert (root / "groundTruth" / "hand_made.txt").read_text() == "mine\n"
    assert (root / "Videos" / "v.mp4").read_bytes() == b"video"


def test_atomic_directory_never_replaces_an_existing_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(EtesvsError, match="out: already exists"):
        with atomic_path(tmp_path / "out", directory=True):
            pass
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ============================================================================= 2. names are plain, paths contained


@pytest.mark.parametrize(
    ("line", "fault"),
    [
        ("../features/features.txt", "it leads out of its directory with '..'"),
        ("..", "it leads out of its directory with '..'"),
        ("/etc/passwd", "it is an absolute path"),
        ("C:\\Windows\\x.txt", "it is an absolute path"),
        ("..\\features\\features.txt", "it leads out of its directory with '..'"),
        ("sub/video.txt", "it contains a path separator"),
        ("a\x1bb.txt", "it contains a control character"),
    ],
)
def test_split_names_must_be_plain(tmp_path, line, fault):
    path = tmp_path / "train.split1.bundle"
    path.write_text(f"a.txt\n{line}\n")
    with pytest.raises(EtesvsError) as error:
        read_split(path)
    assert str(error.value) == f"{path}:2: video name {line!r} is not a plain name: {fault}"


def test_traversal_in_a_split_stops_convert_labels(tmp_path, cli):
    root = make_dataset(tmp_path / "raw")
    victim = tmp_path / "features" / "features.txt"
    victim.parent.mkdir()
    victim.write_text("take\n")  # would even parse as a label file
    (root / "splits" / "train.split1.bundle").write_text("a.txt\n../../features/features.txt\n")
    status, lines = stage("convert_labels", *convert_args(root, tmp_path / "labels"), cwd=tmp_path)
    assert status == 1
    assert lines == [
        f"error: {root}/splits/train.split1.bundle:2: video name '../../features/features.txt' is not a plain name: "
        "it leads out of its directory with '..'"
    ]
    assert not (tmp_path / "labels").exists()


def test_traversal_in_labels_info_stops_extract_frames_before_any_write(tmp_path, cli):
    root = dataset_with_videos(tmp_path / "raw")
    convert_labels(DatasetLayout(root), tmp_path / "labels", dataset="t", split=1, fps=15, background=["background"])
    info = json.loads((tmp_path / "labels" / "info.json").read_text())
    info["num_frames"]["../features/features"] = 6
    (tmp_path / "labels" / "info.json").write_text(json.dumps(info))
    victim = tmp_path / "features" / "features.h5"
    victim.parent.mkdir()
    victim.write_bytes(b"features")
    status, lines = stage("extract_frames", "--root", root, "--labels", tmp_path / "labels", "--out",
                          tmp_path / "frames", "--report", tmp_path / "report.json", cwd=tmp_path)
    assert status == 1
    assert lines == [
        f"error: {tmp_path}/labels/info.json: 'num_frames': video name '../features/features' is not a plain name: "
        "it leads out of its directory with '..'"
    ]
    assert victim.read_bytes() == b"features" and not (tmp_path / "frames").exists()
    with pytest.raises(EtesvsError, match=r"'\.\./x' is not a plain name"):
        frames_path(tmp_path / "frames", "../x")


def test_breakfast_nesting_stays_inside_videos(tmp_path):
    rules = parse_video_path_rules(r"(P\d+)_([a-z]*cam\d+)_(.+) -> \1/\2/\3")
    layout = DatasetLayout(tmp_path, video_path_rules=rules)
    target = tmp_path / "Videos" / "P03" / "cam01" / "P03_cereals.avi"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    assert layout.video_file("P03_cam01_P03_cereals") == target
    escaping = DatasetLayout(tmp_path, video_path_rules=parse_video_path_rules(r"(P\d+)_(.+) -> ../../\2"))
    with pytest.raises(EtesvsError) as error:
        escaping.video_file("P03_secret")
    assert str(error.value) == f"video path rule for 'P03_secret': '../../secret' leads outside {tmp_path}/Videos"
    with pytest.raises(EtesvsError, match=r"video name 'P03/../../x' is not a plain name"):
        layout.video_stem("P03/../../x")


@pytest.mark.parametrize(
    ("video", "fault"),
    [
        ("../../../etc/cron.d/job", "it leads out of its directory with '..'"),
        ("/tmp/abs", "it is an absolute path"),
        ("sub/v", "it contains a path separator"),
    ],
)
def test_annotation_json_names_are_contained(tmp_path, video, fault):
    annotations = {"database": {"ok": {"subset": "test", "duration": 1.0, "annotations": []},
                                video: {"subset": "test", "duration": 1.0, "annotations": []}}}  # fmt: skip
    path = tmp_path / "thumos.json"
    path.write_text(json.dumps(annotations, indent=1))
    with pytest.raises(EtesvsError) as error:
        activitynet_to_ground_truth(path, tmp_path / "root", fps=10)
    assert str(error.value) == f"{path}:8: video name {video!r} is not a plain name: {fault}"
    assert not (tmp_path / "root").exists()


def test_annotation_labels_are_single_words(tmp_path):
    path = tmp_path / "thumos.json"
    annotations = {"database": {"v": {"subset": "test", "duration": 1.0,
                                      "annotations": [{"label": "evil\n0 injected", "segment": [0, 1]}]}}}  # fmt: skip
    path.write_text(json.dumps(annotations))
    message = r"thumos.json:1: video 'v' has label 'evil\\n0 injected'; a label is one word"
    with pytest.raises(EtesvsError, match=message):
        activitynet_to_ground_truth(path, tmp_path / "root", fps=10)


def test_evaluate_cli_contains_names(tmp_path, cli):
    from etesvs.evaluate import main

    labels = tiny_labels()
    write_text_dataset(tmp_path / "data", labels)
    write_predictions(tmp_path / "pred", labels)
    (tmp_path / "data" / "splits" / "test.split1.bundle").write_text("video_a.txt\n../pred/video_b.txt\n")
    status, lines = cli(main, *cli_args(tmp_path / "data", tmp_path / "pred"))
    assert status == 1
    assert lines == [
        f"error: {tmp_path}/data/splits/test.split1.bundle:2: video name '../pred/video_b.txt' is not a plain name: "
        "it leads out of its directory with '..'"
    ]


def test_plain_name_and_path_inside_helpers(tmp_path):
    assert check_plain_name("S1_Cheese_C1", source="x") == "S1_Cheese_C1"
    assert check_plain_name("..txt", source="x") == "..txt"  # dots inside a name are fine
    assert path_inside(tmp_path, "P03/cam01/x") == tmp_path / "P03" / "cam01" / "x"
    for relative in ("../x", "a/../../x", "/etc/passwd", ".", ""):
        with pytest.raises(EtesvsError, match="leads outside"):
            path_inside(tmp_path, relative, source="rule")


# ============================================================================= 3. ffmpeg opens exactly the file named


@pytest.fixture(scope="module")
def red_and_blue(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("protocols")
    make_video(directory / "red.mp4", frames=10)
    make_video(directory / "blue.mp4", frames=20)
    return directory


PROTOCOL_NAMES = [
    "concat:red.mp4|blue.mp4",
    "concatf:red.mp4",
    "subfile,,start,0,end,0,,:red.mp4",
    "file:red.mp4",
    "async:red.mp4",
    "cache:red.mp4",
    "crypto:red.mp4",
]


@pytest.mark.parametrize("name", PROTOCOL_NAMES)
def test_extract_frames_reads_a_protocol_looking_name_as_a_file(red_and_blue, monkeypatch, name):
    monkeypatch.chdir(red_and_blue)
    junk = Path(name)
    junk.write_bytes(b"junk, not a video" * 20)
    with pytest.raises(EtesvsError) as error:
        decode_video_to_jpeg(junk, CONFIG)
    assert str(error.value).startswith(f"{name}: ffmpeg could not decode it: ")
    assert "Invalid data found" in str(error.value) or "moov atom not found" in str(error.value)
    assert len(decode_video_to_jpeg(Path("red.mp4"), CONFIG)) == 10  # the same call reads a real file


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("list.mp4", "ffconcat version 1.0\nfile red.mp4\nfile blue.mp4\n"),
        ("playlist.m3u8", "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1,\nred.mp4\n#EXT-X-ENDLIST\n"),
    ],
)
def test_files_that_open_other_files_are_refused(red_and_blue, monkeypatch, name, content):
    monkeypatch.chdir(red_and_blue)
    Path(name).write_text(content)
    with pytest.raises(EtesvsError) as error:
        decode_video_to_jpeg(Path(name), CONFIG)
    assert str(error.value) == (
        f"{name}: ffmpeg could not decode it: not a video file (playlists, concat lists and image sequences, "
        "which open other files, are refused)"
    )


@pytest.mark.parametrize("name", PROTOCOL_NAMES[:3])
def test_stream_reads_a_protocol_looking_name_as_a_file(red_and_blue, monkeypatch, name):
    from etesvs.stream import read_frames

    monkeypatch.chdir(red_and_blue)
    Path(name).write_bytes(b"junk, not a video" * 20)
    with pytest.raises(EtesvsError, match=rf"^{name.replace('|', '[|]')}: ffmpeg could not decode it: "):
        list(read_frames(name, fps=15, image_size=16, chunk=4))
    assert sum(len(chunk) for chunk in read_frames("red.mp4", fps=15, image_size=16, chunk=4)) == 10


def test_stream_live_sources_only_with_live(tmp_path):
    from etesvs.stream import ffmpeg_source

    with pytest.raises(EtesvsError) as error:
        ffmpeg_source("rtsp://camera.local/stream")
    assert str(error.value) == (
        "rtsp://camera.local/stream: video file not found "
        "(to read a live source such as an RTSP URL or a camera, pass --live)"
    )
    with pytest.raises(EtesvsError, match=r"^concat:a.mp4\|b.mp4: video file not found \(to read a live source"):
        ffmpeg_source("concat:a.mp4|b.mp4")
    with pytest.raises(EtesvsError, match="^clip.mp4: video file not found$"):
        ffmpeg_source("clip.mp4")
    args = ffmpeg_source("rtsp://camera.local/stream", live=True)
    assert args[-2:] == ["-i", "rtsp://camera.local/stream"]
    whitelist = args[args.index("-protocol_whitelist") + 1].split(",")
    assert "rtsp" in whitelist and not {"file", "pipe", "fd", "concat", "subfile", "data"} & set(whitelist)
    for source in ("concat:a.mp4|b.mp4", "file:///etc/passwd", "data:video/mp4;base64,AAAA", "pipe:0", "clip.mp4"):
        with pytest.raises(EtesvsError, match="--live expects a URL"):
            ffmpeg_source(source, live=True)


def test_stream_cli_live_refuses_a_local_url(tmp_path, cli):
    from etesvs.stream import main

    checkpoint = make_checkpoint(tmp_path / "model.pt")
    status, lines = cli(main, "file:///etc/passwd", "--checkpoint", str(checkpoint), "--live")
    assert status == 1
    assert lines[0].startswith("error: file:///etc/passwd: --live expects a URL (rtsp://")


def test_demo_encoder_writes_exactly_the_named_file(tmp_path, monkeypatch):
    from etesvs.data.demo import encode_mp4

    monkeypatch.chdir(tmp_path)
    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    for name in ("md5:out.tmp", "tee:a.mp4|b.mp4", "pipe:1"):
        encode_mp4(frames, Path(name), fps=10)
        assert Path(name).read_bytes()[4:8] == b"ftyp", name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["md5:out.tmp", "pipe:1", "tee:a.mp4|b.mp4"]


# ============================================================================= 4. operating-system errors: one line


def test_evaluate_cli_split_is_a_directory(tmp_path, cli):
    from etesvs.evaluate import main

    write_text_dataset(tmp_path / "data", tiny_labels())
    args = cli_args(tmp_path / "data", tmp_path / "pred")
    args[args.index("--split") + 1] = str(tmp_path / "data" / "splits")
    status, lines = cli(main, *args)
    assert (status, lines) == (1, [f"error: {tmp_path}/data/splits: is a directory, expected a file"])


def test_evaluate_cli_out_is_a_directory(tmp_path, cli):
    from etesvs.evaluate import main

    labels = tiny_labels()
    write_text_dataset(tmp_path / "data", labels)
    write_predictions(tmp_path / "pred", labels)
    (tmp_path / "results").mkdir()
    status, lines = cli(main, *cli_args(tmp_path / "data", tmp_path / "pred"), "--out", str(tmp_path / "results"))
    assert (status, lines) == (1, [f"error: {tmp_path}/results: is a directory, expected a file name"])
    mapping = tmp_path / "data" / "mapping.txt"
    status, lines = cli(main, *cli_args(tmp_path / "data", tmp_path / "pred"), "--out", str(mapping))
    assert (status, lines) == (1, [f"error: {mapping}: is an input, it would be overwritten by the output"])
    status, lines = cli(main, *cli_args(tmp_path / "data", tmp_path / "pred"), "--out", f"{mapping}/m.json")
    assert (status, lines) == (1, [f"error: {mapping}: is a file, so {mapping}/m.json cannot be written under it"])


def test_extract_frames_report_is_a_directory_before_any_work(tmp_path, cli):
    root = dataset_with_videos(tmp_path / "raw")
    convert_labels(DatasetLayout(root), tmp_path / "labels", dataset="t", split=1, fps=15, background=["background"])
    (tmp_path / "report").mkdir()
    status, lines = stage("extract_frames", "--root", root, "--labels", tmp_path / "labels", "--out",
                          tmp_path / "frames", "--report", tmp_path / "report", cwd=tmp_path)
    assert (status, lines) == (1, [f"error: {tmp_path}/report: is a directory, expected a file name"])
    assert not (tmp_path / "frames").exists()


def test_out_names_a_file(tmp_path, cli):
    root = dataset_with_videos(tmp_path / "raw")
    (tmp_path / "notes.txt").write_text("mine")
    status, lines = stage("convert_labels", *convert_args(root, tmp_path / "notes.txt"), cwd=tmp_path)
    refusal = f"error: {tmp_path}/notes.txt: convert_labels will not write here: it is a file, not a directory"
    assert (status, lines) == (1, [refusal])
    status, lines = stage("convert_labels", *convert_args(root, tmp_path / "notes.txt" / "labels"), cwd=tmp_path)
    refusal = f"error: {tmp_path}/notes.txt/labels: convert_labels will not write here: {tmp_path}/notes.txt is a file"
    assert (status, lines) == (1, [refusal])
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (FileNotFoundError(2, "No such file or directory", "labels/info.json"), "labels/info.json: not found"),
        (IsADirectoryError(21, "Is a directory", "data/split"), "data/split: is a directory, expected a file"),
        (PermissionError(13, "Permission denied", "/data/raw"), "/data/raw: permission denied"),
        (OSError(28, "No space left on device", "frames/a.h5"), "frames/a.h5: no space left on the device"),
        (OSError(30, "Read-only file system", "/mnt/ro/x"), "/mnt/ro/x: read-only file system"),
        (OSError(122, "Disk quota exceeded", "x"), "x: disk quota exceeded"),
        (OSError(5, "Input/output error"), "input/output error"),
        (OSError("Unable to open file (file signature not found)"), "unable to open file (file signature not found)"),
    ],
)
def test_run_main_turns_os_errors_into_one_line(cli, error, line):
    def main():
        raise error

    status, lines = cli(main)
    assert (status, lines) == (1, [f"error: {line}"])


def test_disk_full_while_writing_names_the_output(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with pytest.raises(EtesvsError) as error:
        with atomic_path(tmp_path / "report.json") as tmp:
            monkeypatch.setattr(Path, "write_text", full)
            tmp.write_text("{}")
    assert str(error.value) == f"{tmp_path}/report.json: no space left on the device"
    assert list(tmp_path.iterdir()) == []


def test_missing_and_unreadable_inputs(tmp_path, cli):
    from etesvs.evaluate import main

    write_text_dataset(tmp_path / "data", tiny_labels())
    args = cli_args(tmp_path / "data", tmp_path / "pred")
    args[args.index("--mapping") + 1] = str(tmp_path / "missing.txt")
    assert cli(main, *args) == (1, [f"error: {tmp_path}/missing.txt: file not found"])
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00junk")
    args[args.index("--mapping") + 1] = str(tmp_path / "binary.txt")
    assert cli(main, *args) == (1, [f"error: {tmp_path}/binary.txt: not a UTF-8 text file"])


# ============================================================================= 5. checkpoints: plain weights only


class Payload:
    """Pickles to a call of os.system: what a malicious checkpoint holds."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


@pytest.mark.parametrize("kind", ["payload", "module", "raw_pickle"])
def test_code_in_a_checkpoint_is_refused_in_one_short_line(tmp_path, cli, kind):
    from etesvs.stream import main

    flag = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    if kind == "payload":
        torch.save({"model": Payload(flag), "epoch": 1}, path)
    elif kind == "module":
        torch.save(torch.nn.Linear(2, 2), path)
    else:
        path.write_bytes(pickle.dumps(Payload(flag)))
    video = make_video(tmp_path / "v.mp4", frames=4)
    status, lines = cli(main, str(video), "--checkpoint", str(path))
    assert (status, lines) == (
        1, [f"error: {path}: not loaded: the file holds code or objects that are not plain weights"]
    )
    assert len(lines[0]) < 80 + len(str(path))
    assert not flag.exists()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "checkpoint not found"),
        ("directory", "is a directory, expected a checkpoint"),
        ("empty", "empty or truncated checkpoint"),
        ("truncated", "truncated or not a PyTorch checkpoint"),
        ("text", "truncated or not a PyTorch checkpoint"),
    ],
)
def test_damaged_checkpoints(tmp_path, kind, message):
    path = tmp_path / "best.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"model": {"w": torch.zeros(100)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "text":
        path.write_text("hello world\n" * 10)
    with pytest.raises(EtesvsError) as error:
        load_weights_file(path, what="checkpoint")
    assert str(error.value) == f"{path}: {message}"


def test_plain_weights_load(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3, "classes": ["a", "b"]}, tmp_path / "ok.pt")
    state = load_weights_file(tmp_path / "ok.pt", what="checkpoint")
    assert state["epoch"] == 3 and state["model"]["w"].tolist() == [1.0, 1.0]


# ============================================================================= 6. processes and signals


def fake_ffmpeg(tmp_path: Path, body: str) -> Path:
    """A stand-in for ffmpeg (IMAGEIO_FFMPEG_EXE) that runs ``body`` in sh."""
    path = tmp_path / "fake_ffmpeg.sh"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def descendants(pid: int) -> set[int]:
    """Process ids of every descendant of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def start_stage(tmp_path: Path, ffmpeg: Path, *, skip_bad_videos: bool = False) -> subprocess.Popen:
    """extract_frames on two videos with a fake ffmpeg, in its own session (so signals reach only it)."""
    root = dataset_with_videos(tmp_path / "raw")
    convert_labels(DatasetLayout(root), tmp_path / "labels", dataset="t", split=1, fps=15, background=["background"])
    stage_workdir(tmp_path, {**STAGE_PARAMS, "frames": {**STAGE_PARAMS["frames"], "workers": 2,
                                                         "skip_bad_videos": skip_bad_videos}})
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    env.update(IMAGEIO_FFMPEG_EXE=str(ffmpeg), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / "extract_frames.py"), "--root", str(root), "--labels",
         str(tmp_path / "labels"), "--out", str(tmp_path / "frames"), "--report", str(tmp_path / "report.json")],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return b""


def wait_for_children(process: subprocess.Popen, count: int, timeout: float = 60) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = alive(descendants(process.pid))
        # the pool's workers and one fake ffmpeg (sleep) under each
        if sum(1 for pid in found if b"sleep" in command_line(pid)) >= count:
            return found
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the stage did not start {count} decoders: {process.communicate()}")


def gone(children: set[int], timeout: float = 10) -> bool:
    """Wait until none of ``children`` lives; kill the survivors (so a failing test leaves none) and say so."""
    deadline = time.monotonic() + timeout
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = alive(children)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    return not survivors


def test_workers_and_ffmpeg_die_with_a_killed_parent(tmp_path):
    process = start_stage(tmp_path, fake_ffmpeg(tmp_path, "exec sleep 300"))
    children = wait_for_children(process, 2)
    assert len(children) >= 4  # two workers, two "ffmpeg"
    process.kill()
    process.wait()
    assert gone(children), "workers or ffmpeg outlived the killed stage"


@pytest.mark.parametrize(
    ("sent", "status", "line"),
    [
        (signal.SIGTERM, 143, r"error: interrupted by SIGTERM"),  # to the stage alone, as DVC or a scheduler does
        # Ctrl-C reaches the whole process group: the stage, or first the ffmpeg it stopped, reports it.
        (signal.SIGINT, 130, r"error: (interrupted|.*/Videos/[abc]\.mp4: ffmpeg was stopped by SIGINT)"),
    ],
)
def test_a_signal_stops_the_stage_with_one_line(tmp_path, sent, status, line):
    process = start_stage(tmp_path, fake_ffmpeg(tmp_path, "exec sleep 300"), skip_bad_videos=True)
    children = wait_for_children(process, 2)
    os.killpg(process.pid, sent) if sent == signal.SIGINT else process.send_signal(sent)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == status
    assert re.fullmatch(line, stderr.strip().splitlines()[-1])
    assert gone(children)
    assert "Traceback" not in stderr
    assert not (tmp_path / "report.json").exists(), "an interrupted run is not reported as done"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("kill -KILL $$", 137, "ffmpeg was stopped by SIGKILL"),
        ("kill -TERM $$", 143, "ffmpeg was stopped by SIGTERM"),
        ("exit 255", 143, "ffmpeg was interrupted by a signal"),
    ],
)
def test_a_signalled_ffmpeg_is_an_interruption_not_a_bad_video(tmp_path, body, status, message):
    process = start_stage(tmp_path, fake_ffmpeg(tmp_path, body), skip_bad_videos=True)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and last.endswith(message)
    assert "Traceback" not in stderr
    assert not (tmp_path / "report.json").exists(), "no report listing good videos as bad"


def test_a_killed_worker_is_an_interruption(tmp_path):
    process = start_stage(tmp_path, fake_ffmpeg(tmp_path, "kill -KILL $PPID; sleep 5"), skip_bad_videos=True)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 137, stderr
    assert stderr.strip().splitlines()[-1] == "error: extract_frames: a worker process was killed (out of memory?)"
    assert not (tmp_path / "report.json").exists()


def test_interrupted_is_not_a_bad_input():
    assert not issubclass(Interrupted, EtesvsError)
    error = pickle.loads(pickle.dumps(Interrupted("v.mp4: ffmpeg was stopped by SIGKILL", 9)))
    assert (str(error), error.signal_number) == ("v.mp4: ffmpeg was stopped by SIGKILL", 9)


# ============================================================================= 7. BOM, CRLF, and the right bundle


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    plain = make_dataset(tmp_path / "plain")
    windows = make_dataset(tmp_path / "windows")
    for path in [windows / "mapping.txt", *(windows / "splits").iterdir(), *(windows / "groundTruth").iterdir()]:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    options = dict(dataset="t", split=1, fps=15, background=["background"])
    expected = convert_labels(DatasetLayout(plain), tmp_path / "a", **options)
    got = convert_labels(DatasetLayout(windows), tmp_path / "b", **options)
    assert got == expected
    for video in ("a", "b", "c"):
        assert load_labels(tmp_path / "b", video).tolist() == load_labels(tmp_path / "a", video).tolist()


def test_evaluate_cli_accepts_bom_and_crlf(tmp_path):
    from etesvs.evaluate import main

    labels = tiny_labels()
    write_text_dataset(tmp_path / "data", labels)
    write_predictions(tmp_path / "pred", labels)
    expected = main(cli_args(tmp_path / "data", tmp_path / "pred"))
    for path in [*(tmp_path / "data").rglob("*.*"), *(tmp_path / "pred").iterdir()]:
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    assert main(cli_args(tmp_path / "data", tmp_path / "pred")) == expected
    assert expected["acc"] == 100.0


def test_annotation_json_with_bom(tmp_path):
    path = tmp_path / "thumos.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"database": {"v": {"subset": "test", "duration": 1.0,
                                                                       "annotations": []}}}).encode())  # fmt: skip
    assert activitynet_to_ground_truth(path, tmp_path / "root", fps=10) == ["v"]


@pytest.mark.parametrize(
    ("bundle", "text", "line"),
    [
        ("train.split2.bundle", "a.txt\nb.txt\nzzz.txt\n", 3),
        ("test.split3.bundle", "zzz\n", 1),
        ("test.split1.bundle", "c.txt\n\nzzz.txt\n", 3),
    ],
)
def test_a_missing_video_names_the_bundle_that_listed_it(tmp_path, bundle, text, line):
    root = make_dataset(tmp_path / "raw")
    (root / "splits" / bundle).write_text(text)
    with pytest.raises(EtesvsError) as error:
        convert_labels(DatasetLayout(root), tmp_path / "labels", dataset="t", split=1, fps=15, background=[])
    assert str(error.value) == (
        f"{root}/splits/{bundle}:{line}: names video 'zzz' but {root}/groundTruth/zzz.txt does not exist"
    )


def test_labels_info_video_names_are_checked(tmp_path):
    write_json(tmp_path / "info.json", {"dataset": "t", "fps": 15, "classes": ["x"], "background": [],
                                        "background_ids": [], "split": 1, "train": ["/abs"], "test": [],
                                        "num_frames": {}})  # fmt: skip
    with pytest.raises(EtesvsError, match=r"info.json: 'train': video name '/abs' is not a plain name: it is an abs"):
        load_label_info(tmp_path)


def test_a_failed_first_run_leaves_no_output_directory(tmp_path):
    output = claim_output_dir(tmp_path / "new" / "labels", owner="test")
    with pytest.raises(RuntimeError):
        with output.replace(["a.txt", "sub/b.txt"]) as staged:
            staged["a.txt"].write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.rglob("*")) == [tmp_path / "new"]


FORKED_CHILD = """
import os, signal, sys, time
from etesvs.errors import run_main

def main():
    child = os.fork()
    if child == 0:  # a worker forked by an entry point inherits its SIGTERM handler
        time.sleep(30)
        os._exit(0)
    time.sleep(0.5)
    os.kill(child, signal.SIGTERM)
    _, status = os.waitpid(child, 0)
    print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)

run_main(main)
"""


def test_a_forked_child_ends_on_sigterm_like_a_plain_process():
    result = subprocess.run([sys.executable, "-c", FORKED_CHILD], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "True\n", "")


# ------------------------------------------------------------------------------------------------ single files


def test_a_single_file_output_never_replaces_a_users_file(tmp_path):
    dataset = tmp_path / "ds"
    (dataset / "Videos").mkdir(parents=True)
    video, labels = dataset / "Videos" / "a.mp4", dataset / "groundTruth" / "a.txt"
    labels.parent.mkdir()
    video.write_bytes(b"video"), labels.write_text("take\n")
    with pytest.raises(EtesvsError, match=r"a\.mp4: exists and is not \.json: not replaced \(choose another name\)$"):
        check_output_file(video, suffixes=(".json",))
    with pytest.raises(EtesvsError, match=r"a\.txt: lies inside the input directory .*groundTruth; write the output"):
        check_output_file(labels, inputs=[labels.parent], suffixes=(".json",))
    with pytest.raises(EtesvsError, match=r"report\.json: lies inside the input directory .*ds;"):
        check_output_file(dataset / "report.json", inputs=[dataset], suffixes=(".json",))
    with pytest.raises(EtesvsError, match=r"a\.mp4: exists and is not a new file: not replaced"):
        check_output_file(video, new_only=True)
    assert video.read_bytes() == b"video" and labels.read_text() == "take\n"
    (tmp_path / "old.json").write_text("{}")
    assert check_output_file(tmp_path / "old.json", suffixes=(".json",)) == tmp_path / "old.json"  # its own kind


def test_evaluate_cli_refuses_to_write_over_a_label_file(tmp_path):
    labels = {"video_a": np.array([0, 0, 1, 1])}
    write_text_dataset(tmp_path, labels)
    write_predictions(tmp_path / "pred", labels)
    target = tmp_path / "groundTruth" / "video_a.txt"
    before = target.read_bytes()
    result = subprocess.run([sys.executable, "-m", "etesvs.evaluate", *cli_args(tmp_path, tmp_path / "pred"),
                             "--out", str(target)], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "lies inside the input directory" in result.stderr and target.read_bytes() == before
