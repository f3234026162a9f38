"""Online inference (etesvs.stream): real videos through ffmpeg, incremental segments, bounded memory."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from etesvs.data.frames import ffmpeg_exe
from etesvs.checkpoints import save_checkpoint
from etesvs.errors import EtesvsError
from etesvs.models.streaming import StreamingSegmenter
from etesvs.stream import SegmentTracker, load_stream_model, run_stream

ROOT = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"
CLASSES = ["background", "wave", "point"]
MODEL_ARGS = {"num_classes": 3, "width_mult": 0.35, "temporal_shift": False, "shift_divisor": 8, "stem_shift": False,
              "shift_across_windows": False, "memory_channels": 8,
              "head": "causal_tcn", "head_stages": 1, "head_layers": 3, "head_channels": 8, "dropout": 0.0, "norm": "group"}


def make_checkpoint(
    path: Path, *, fps: float = 15.0, window: int = 16, sample_rate: int = 2, image_size: int = 32
) -> Path:
    """A self-describing checkpoint of a tiny randomly initialised model, as train_streaming writes one."""
    torch.manual_seed(0)
    model = StreamingSegmenter(**MODEL_ARGS)
    save_checkpoint(
        path, model=model, optimizer=None, epoch=1, model_args=MODEL_ARGS, classes=CLASSES, background_ids=[0],
        fps=fps, window=window, sample_rate=sample_rate, image_size=image_size,
        normalization={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    )  # fmt: skip
    return path


def test_a_checkpoint_from_before_multi_stage_heads_still_loads(tmp_path):
    """Files written before ``head_stages`` and ``shift_across_windows`` existed: no such model arguments,
    single-stage tensors named head.*."""
    path = make_checkpoint(tmp_path / "new.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_args"].pop("head_stages")
    checkpoint["model_args"].pop("shift_across_windows")
    checkpoint["model"] = {key.replace("head.stages.0.", "head."): value for key, value in checkpoint["model"].items()}
    assert "head.conv_in.weight" in checkpoint["model"]
    torch.save(checkpoint, tmp_path / "old.pt")
    old, new = load_stream_model(tmp_path / "old.pt"), load_stream_model(path)
    frames, mask = torch.randn(1, 4, 3, 32, 32), torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(old.model(frames, mask)[0]["head_logits"], new.model(frames, mask)[0]["head_logits"])


def test_segment_tracker_reports_segments_once_final_with_their_mean_confidence():
    tracker = SegmentTracker()
    assert tracker.update(0, np.array([0, 0, 1]), np.array([0.5, 0.7, 0.9])) == [(0, 0, 2, pytest.approx(0.6))]
    assert tracker.update(3, np.array([1, 1, 1]), np.array([0.5, 0.5, 0.5])) == []
    assert tracker.update(6, np.array([2, 0]), np.array([1.0, 0.4])) == [(1, 2, 6, pytest.approx(0.6)),
                                                                        (2, 6, 7, pytest.approx(1.0))]
    assert tracker.finish() == [(0, 7, 8, pytest.approx(0.4))]
    assert tracker.finish() == []


def test_stream_a_real_video(tmp_path, shared_data):
    video = shared_data / "videos" / "mmaction2-demo.mp4"  # 280 frames at 28 fps: 10 s, 150 frames at 15 fps
    checkpoint = make_checkpoint(tmp_path / "model.pt")
    stdout = io.StringIO()
    model = load_stream_model(checkpoint)
    summary = run_stream(model, video, out_dir=tmp_path / "out", print_windows=True, stdout=stdout)
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    windows = [line for line in lines if line["event"] == "window"]
    segments = [line for line in lines if line["event"] == "segment"]
    assert lines[-1]["event"] == "video" and lines[-1]["segments"] == [
        {key: value for key, value in segment.items() if key != "event"} for segment in segments
    ]
    frames = lines[-1]["num_frames"]
    assert 145 <= frames <= 155 and summary["frames"] == frames
    assert [w["start_frame"] for w in windows] == list(range(0, frames, 16))
    # Segments tile the video, and agree with the per-frame labels written to --out.
    assert segments[0]["start_frame"] == 0 and segments[-1]["end_frame"] == frames
    assert all(a["end_frame"] == b["start_frame"] for a, b in zip(segments, segments[1:]))
    labels = (tmp_path / "out" / "labels.txt").read_text().split("\n")[:-1]
    assert len(labels) == frames and set(labels) <= set(CLASSES)
    for segment in segments:
        assert set(labels[segment["start_frame"] : segment["end_frame"]]) == {segment["label"]}
    assert (tmp_path / "out" / "segments.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "out" / "segments.jsonl").read_text().splitlines()) == len(segments)
    assert all(1.0 / len(CLASSES) <= segment["confidence"] <= 1.0 for segment in segments)


def test_stream_emits_the_burr_suppressed_labels_the_evaluation_scores(tmp_path, shared_data):
    """The stream removes burrs window by window as stage evaluate does to the saved predictions, with no delay."""
    from etesvs.postprocess import suppress_burrs_by_window
    from etesvs.stream import default_burr_frames, stream_labels

    video = shared_data / "videos" / "mmaction2-demo.mp4"
    class Hopping(torch.nn.Module):
        """Hops between the classes from frame to frame as the picture changes (a trained model's transitions)."""

        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(60.0))

        def forward(self, frames, mask, state=None, reset=None):
            brightness = frames.mean(dim=(2, 3, 4))  # (1, T)
            phases = torch.arange(len(CLASSES), dtype=torch.float32)[None, :, None] * 2.1
            return {"head_logits": torch.sin(self.scale * brightness[:, None, :] + phases)}, state

    model = dataclasses.replace(load_stream_model(make_checkpoint(tmp_path / "model.pt", sample_rate=1)),
                                model=Hopping())
    plain = list(stream_labels(model, video, fps=30))
    raw = np.concatenate([item.labels for item in plain])
    for burr in (2, 5):
        items = list(stream_labels(model, video, fps=30, burr_frames=burr))
        assert [(item.start, len(item.labels)) for item in items] == [(item.start, len(item.labels)) for item in plain]
        labels = np.concatenate([item.labels for item in items])
        np.testing.assert_array_equal(labels, suppress_burrs_by_window(raw, model.window, burr))
        for item, before in zip(items, plain):
            same = item.labels == before.labels
            np.testing.assert_allclose(item.confidence[same], before.confidence[same])
            assert (item.confidence[~same] <= before.confidence[~same] + 1e-6).all(), "the argmax was the most likely"
    assert (labels != raw).any(), "this random model flickers: a test that could not fail otherwise"

    assert default_burr_frames(tmp_path / "none.yaml") == 0
    (tmp_path / "params.yaml").write_text("streaming:\n  postprocess:\n    burr_frames: 4\n")
    assert default_burr_frames(tmp_path / "params.yaml") == 4
    (tmp_path / "params.yaml").write_text("streaming:\n  postprocess:\n    burr_frames: -4\n")
    with pytest.raises(EtesvsError, match="params.yaml: streaming.postprocess: burr_frames must be an integer >= 0"):
        default_burr_frames(tmp_path / "params.yaml")
    assert default_burr_frames(ROOT / "params.yaml") == 7


def run_frames(video, fps, size):
    from etesvs.stream import read_frames

    return (chunk.astype(int) for chunk in read_frames(video, fps=fps, frame_size=size, chunk=1))


def test_overlay_writes_the_video_with_labels_drawn(tmp_path, shared_data):
    import imageio_ffmpeg

    from etesvs.stream import probe_frame_size
    from etesvs.viz import class_colors

    video = shared_data / "videos" / "mmaction2-demo.mp4"  # 340 x 256, 28 fps
    assert probe_frame_size(video) == (340, 256)
    model = load_stream_model(make_checkpoint(tmp_path / "model.pt"))
    lines = io.StringIO()
    summary = run_stream(model, video, overlay=tmp_path / "overlay.mp4", stdout=lines)
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "overlay.mp4"))
    assert tuple(next(reader)["size"]) == (340, 256)
    frames = [np.frombuffer(frame, np.uint8).reshape(256, 340, 3).astype(int) for frame in reader]
    assert len(frames) == summary["frames"]
    # The timeline along the bottom shows the colour of the last frames' label (here every frame's label).
    label = json.loads(lines.getvalue().splitlines()[-1])["segments"][-1]["label"]
    colour = class_colors(len(CLASSES), [0])[CLASSES.index(label), :3] * 255
    assert np.abs(frames[-1][-3:, 10:-10].mean(axis=(0, 1)) - colour).max() < 20
    # The label box top-left covers the picture there: it differs from the video itself.
    source = next(iter(run_frames(video, 15.0, (340, 256))))
    assert np.abs(frames[0][8:22, 10:80] - source[0][8:22, 10:80]).mean() > 30
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".overlay")], "no temporary file left"


def test_stream_cli_on_an_mkv(tmp_path, shared_data):
    video = sorted((shared_data / "videos" / "asl_gestures").glob("*.mkv"))[0]
    checkpoint = make_checkpoint(tmp_path / "model.pt")
    result = subprocess.run(
        [sys.executable, "-m", "etesvs.stream", str(video), "--checkpoint", str(checkpoint),
         "--fps", "10", "--window", "8"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout.splitlines()[-1])
    assert final["fps"] == 10 and 25 <= final["num_frames"] <= 45
    assert final["segments"][-1]["end_frame"] == final["num_frames"]


def test_stream_errors_name_the_file(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "model.pt")
    with pytest.raises(EtesvsError, match="missing.mp4: video file not found"):
        run_stream(load_stream_model(checkpoint), tmp_path / "missing.mp4", stdout=io.StringIO())
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    with pytest.raises(EtesvsError, match="broken.mp4: ffmpeg could not decode it"):
        run_stream(load_stream_model(checkpoint), broken, stdout=io.StringIO())
    torch.save({"model": {}, "epoch": 1}, tmp_path / "other.pt")
    with pytest.raises(EtesvsError, match="other.pt: not a streaming-model checkpoint"):
        load_stream_model(tmp_path / "other.pt")


PEAK_MEMORY = """
import io, resource, sys, tracemalloc
import torch
torch.set_num_threads(1)
from etesvs.stream import load_stream_model, run_stream
model = load_stream_model(sys.argv[1])
tracemalloc.start()
run_stream(model, sys.argv[2], stdout=io.StringIO())
python_peak = tracemalloc.get_traced_memory()[1]
print(python_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_memory_does_not_grow_with_the_video_length(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "model.pt", sample_rate=1, image_size=48, window=32)
    peaks = {}
    for seconds in (10, 150):  # 150 and 2250 frames at 15 fps
        video = tmp_path / f"testsrc_{seconds}.mp4"
        subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
             f"testsrc=size=96x64:rate=15:duration={seconds}", "-pix_fmt", "yuv420p", "-c:v", "libx264",
             "-preset", "ultrafast", "-threads", "1", str(video)],
            check=True, timeout=120,
        )  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", PEAK_MEMORY, str(checkpoint), str(video)], capture_output=True, text=True,
            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        python_peak, rss_kib = map(int, result.stdout.split())
        peaks[seconds] = (python_peak, rss_kib)
    (short_python, short_rss), (long_python, long_rss) = peaks[10], peaks[150]
    # The long video's 2100 extra frames would take 2100 x 48 x 48 x 3 bytes = 14.5 MB as uint8 if they were kept,
    # and their labels as Python objects would show in the traced allocations.
    assert long_python - short_python < 200_000, peaks
    assert long_rss - short_rss < 8_000, peaks  # KiB
