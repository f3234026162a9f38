import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from etesvs.data.frames import (
    ExtractConfig,
    FrameReader,
    decode_video_to_jpeg,
    extract_frames,
    ffmpeg_exe,
    frames_path,
    reconcile,
    split_jpeg_stream,
    write_frame_container,
)
from etesvs.errors import EtesvsError
from tests.conftest import ROOT, run_stage, stage_workdir


def make_video(path: Path, frames: int, fps: int = 15, size: str = "64x48") -> Path:
    """A small H.264 test video made by ffmpeg's own test source."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         f"testsrc=size={size}:rate={fps}", "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )
    return path


def test_split_jpeg_stream_ignores_fake_end_markers_in_headers():
    from torchvision.io import encode_jpeg

    images = [bytes(encode_jpeg(torch.full((3, 8, 8), v, dtype=torch.uint8)).numpy().tobytes()) for v in (0, 128, 255)]
    # An application segment whose payload contains 0xFFD9 must not end the image.
    trap = b"\xff\xe1\x00\x06\xff\xd9\xff\xd9"
    crafted = images[1][:2] + trap + images[1][2:]
    stream = images[0] + crafted + images[2]
    found, used = split_jpeg_stream(stream)
    assert found == [images[0], crafted, images[2]]
    assert used == len(stream)
    partial, used = split_jpeg_stream(stream[: len(images[0]) + 10])
    assert partial == [images[0]] and used == len(images[0])


def test_container_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 16, 24, 3), dtype=np.uint8)
    frames[:] = frames[:, :1, :1]  # flat colours survive JPEG almost exactly
    write_frame_container(tmp_path / "v.h5", frames, fps=15)
    with FrameReader(tmp_path / "v.h5") as reader:
        assert (reader.num_frames, reader.height, reader.width, reader.fps) == (5, 16, 24, 15.0)
        window = reader.read(1, 4)
        assert window.shape == (3, 3, 16, 24) and window.dtype == torch.uint8
        expected = torch.from_numpy(frames[1:4]).permute(0, 3, 1, 2)
        assert (window.int() - expected.int()).abs().max() <= 3
        assert reader.read(2, 2).shape == (0, 3, 16, 24)
        with pytest.raises(IndexError):
            reader.read(3, 9)


def test_decode_real_videos(shared_data):
    config = ExtractConfig(fps=15, short_side=96, jpeg_quality=3, tolerance=5)
    videos = sorted((shared_data / "videos" / "asl_gestures").glob("*.mkv"))[:2] + [shared_data / "videos" / "mmaction2-demo.mp4"]
    for video in videos:
        images = decode_video_to_jpeg(video, config)
        assert len(images) > 20, video
        frames = FrameReader.__new__(FrameReader)  # decode through the same path as the reader
        from torchvision.io import decode_jpeg

        first = decode_jpeg(torch.frombuffer(bytearray(images[0]), dtype=torch.uint8))
        assert first.shape[0] == 3 and min(first.shape[1:]) == 96, (video, first.shape)
    # mmaction2's demo: 280 frames at 28 fps = 10 s, so 150 frames at 15 fps; 340x256 -> 128x96.
    images = decode_video_to_jpeg(shared_data / "videos" / "mmaction2-demo.mp4", config)
    assert abs(len(images) - 150) <= 1
    from torchvision.io import decode_jpeg

    assert tuple(decode_jpeg(torch.frombuffer(bytearray(images[0]), dtype=torch.uint8)).shape) == (3, 96, 128)


def test_reconcile():
    frames = [b"a", b"b", b"c"]
    assert reconcile(frames, 3, tolerance=2, video="v") == (frames, "")
    trimmed, warning = reconcile(frames, 2, tolerance=2, video="v")
    assert trimmed == [b"a", b"b"] and "trimmed 1" in warning
    padded, warning = reconcile(frames, 5, tolerance=2, video="v")
    assert padded == frames + [b"c", b"c"] and "padded 2" in warning
    with pytest.raises(EtesvsError, match="video 'v': 3 decoded frames but 9 labels"):
        reconcile(frames, 9, tolerance=2, video="v")


@pytest.mark.parametrize(
    "kind, reason",
    [("missing", "video file not found"), ("empty", "empty video file"), ("corrupt", "Invalid data found")],
)
def test_bad_videos_are_named(tmp_path, kind, reason):
    path = tmp_path / "bad.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"not a video" * 50)
    with pytest.raises(EtesvsError) as error:
        decode_video_to_jpeg(path, ExtractConfig(fps=15, short_side=32, jpeg_quality=3, tolerance=5))
    assert str(error.value).startswith(str(path)) and reason in str(error.value)


def test_extract_frames_resumes_and_skips(tmp_path):
    good = make_video(tmp_path / "raw" / "good.mp4", frames=12)
    other = make_video(tmp_path / "raw" / "other.mp4", frames=10)
    bad = tmp_path / "raw" / "bad.mp4"
    bad.write_bytes(b"garbage" * 100)
    config = ExtractConfig(fps=15, short_side=32, jpeg_quality=3, tolerance=2)
    out = tmp_path / "frames"
    results = extract_frames([("good", good, 12)], out, config, workers=1, progress=False)
    assert [r.status for r in results] == ["done"]
    stamp = frames_path(out, "good").stat().st_mtime_ns
    # A second run, as after an interruption: the finished video is not decoded again.
    (out / ".good.h5.abcd1234.tmp").write_bytes(b"half-written")  # left by a run killed while writing
    results = extract_frames([("good", good, 12), ("other", other, 11)], out, config, workers=2, progress=False)
    assert [r.status for r in results] == ["skipped", "done"]
    assert results[1].warnings == ["other: padded 1 frames (10 -> 11)"]
    assert frames_path(out, "good").stat().st_mtime_ns == stamp
    assert not list(out.glob(".*.tmp"))
    assert FrameReader(frames_path(out, "other")).num_frames == 11
    with pytest.raises(EtesvsError, match="bad.mp4: ffmpeg could not decode it"):
        extract_frames([("good", good, 12), ("bad", bad, 5)], out, config, workers=1, progress=False)
    assert not frames_path(out, "bad").exists()
    results = extract_frames([("good", good, 12), ("bad", bad, 5)], out, config, workers=1, skip_bad_videos=True, progress=False)
    assert [r.status for r in results] == ["skipped", "failed"]
    assert not frames_path(out, "other").exists(), "containers of videos no longer listed are removed"
    # Different settings make the container stale, so it is decoded again.
    results = extract_frames([("good", good, 12)], out, ExtractConfig(fps=15, short_side=24, jpeg_quality=3, tolerance=2), workers=1, progress=False)
    assert [r.status for r in results] == ["done"] and FrameReader(frames_path(out, "good")).height == 24


def _stage(tmp_path, *, skip_bad_videos=False):
    params = {"dataset": {"fps": 15, "image_size": 32, "video_path_rules": ""},
              "frames": {"jpeg_quality": 3, "tolerance": 1, "workers": 2, "skip_bad_videos": skip_bad_videos}}
    return run_stage("extract_frames", "--root", str(tmp_path / "raw"), "--labels", str(tmp_path / "labels"),
                     "--out", str(tmp_path / "frames"), "--report", str(tmp_path / "report.json"),
                     cwd=stage_workdir(tmp_path / "work", params))


def _labels(tmp_path, counts):
    from etesvs.io import write_json

    (tmp_path / "labels").mkdir()
    write_json(tmp_path / "labels" / "info.json", {
        "dataset": "t", "fps": 15, "classes": ["background"], "background": ["background"], "background_ids": [0],
        "split": 1, "train": list(counts)[:-1], "test": list(counts)[-1:], "num_frames": counts})


def test_stage_one_line_errors_and_report(tmp_path):
    make_video(tmp_path / "raw" / "Videos" / "v1.mp4", frames=8)
    (tmp_path / "raw" / "Videos" / "v2.mp4").write_bytes(b"")
    _labels(tmp_path, {"v1": 8, "v2": 8})
    result = _stage(tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'raw' / 'Videos' / 'v2.mp4'}: empty video file"
    assert "Traceback" not in result.stderr and not (tmp_path / "report.json").exists()
    result = _stage(tmp_path, skip_bad_videos=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["skipped_bad_videos"][0]["video"] == "v2" and report["videos"] == 2 and report["frames"] == 8
    assert "0 decoded, 1 already done, 1 skipped" in result.stdout, "the good video was kept from the first run"


def test_stage_frame_count_beyond_tolerance(tmp_path):
    make_video(tmp_path / "raw" / "Videos" / "v1.mp4", frames=8)
    _labels(tmp_path, {"v1": 12})
    result = _stage(tmp_path)
    assert result.returncode == 1
    assert "error: video 'v1': 8 decoded frames but 12 labels" in result.stderr
    assert not list((tmp_path / "frames").glob("*.h5"))
