"""Online action segmentation of a video file with a trained streaming model.

    python -m etesvs.stream VIDEO --checkpoint models/etesvs/best.pt [--fps F] [--window N] [--out DIR]
    python -m etesvs.stream --live rtsp://camera.local/stream --checkpoint ...      (or /dev/video0)

ffmpeg decodes the video file (any format it reads) straight to raw RGB frames at the model's frame rate and input size;
the model labels them window by window, carrying only its constant-size state from one window to the next. Each
segment is printed as a JSON line as soon as it is final (when the label changes), ``--windows`` also prints every
window's labels, and a last line lists the segments of the whole video. Nothing grows with the length of the video:
the segments are spooled to a file, and ``--out DIR`` writes ``labels.txt`` (one class name per frame),
``segments.jsonl`` and ``segments.png`` (a coloured bar with a legend) incrementally.

VIDEO is always a file name: ffmpeg opens exactly that file, whatever the name looks like ("concat:a|b",
"http://..."). Live sources (an RTSP, HTTP, UDP, TCP, RTMP or SRT URL, or a camera device) are read only with
``--live``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np
import torch

from etesvs.data.frames import check_ffmpeg_exit, ffmpeg_exe, ffmpeg_reason, stop_ffmpeg
from etesvs.errors import EtesvsError, run_main
from etesvs.io import atomic_path, claim_output_dir, ffmpeg_file_input, load_weights_file
from etesvs.models.streaming import StreamingSegmenter

REQUIRED_KEYS = ("model", "model_args", "classes", "fps", "window", "sample_rate", "image_size", "normalization")
OUTPUT_FILES = ("labels.txt", "segments.jsonl", "segments.png")
# --live: URL schemes, and the ffmpeg protocols they may use (never file, pipe, fd, concat, subfile or data).
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "rtmpt", "rtmpe", "rtmpts", "rtmpte", "http", "https", "udp",
                "tcp", "srt", "rtp")  # fmt: skip
LIVE_PROTOCOLS = LIVE_SCHEMES + ("tls", "httpproxy", "srtp", "crypto", "ffrtmpcrypt", "ffrtmphttp")
URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class StreamModel:
    """A streaming model with everything needed to feed it: classes, frame rate, window, input size, normalisation."""

    model: StreamingSegmenter
    classes: tuple[str, ...]
    background_ids: tuple[int, ...]
    fps: float
    window: int
    sample_rate: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_stream_model(path: str | Path, device: str | torch.device = "cpu") -> StreamModel:
    """Rebuild the model of a self-describing checkpoint (``torch.load(weights_only=True)``) in eval mode."""
    checkpoint = load_weights_file(path, what="checkpoint", map_location=device)
    if not isinstance(checkpoint, dict):
        raise EtesvsError(f"{path}: not a streaming-model checkpoint (not a dictionary)")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise EtesvsError(f"{path}: not a streaming-model checkpoint (missing {', '.join(missing)})")
    try:
        model = StreamingSegmenter(**checkpoint["model_args"])
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0]
        raise EtesvsError(f"{path}: the weights do not fit the model they describe ({reason})") from None
    model.to(device).eval()
    normalization = checkpoint["normalization"]
    return StreamModel(
        model=model,
        classes=tuple(checkpoint["classes"]),
        background_ids=tuple(checkpoint.get("background_ids", ())),
        fps=float(checkpoint["fps"]),
        window=int(checkpoint["window"]),
        sample_rate=int(checkpoint["sample_rate"]),
        image_size=int(checkpoint["image_size"]),
        mean=tuple(normalization["mean"]),
        std=tuple(normalization["std"]),
    )


def ffmpeg_source(video: str | Path, *, live: bool = False) -> list[str]:
    """ffmpeg input arguments for ``video``: exactly that file, or with ``live`` a network URL or a camera device.

    Without ``live`` a name that looks like a URL is a file name like any other; with ``live`` only the network
    protocols of :data:`LIVE_PROTOCOLS` are allowed (never local files through a URL).
    """
    name = str(video)
    if not live:
        if not Path(name).is_file():
            hint = ""
            if URL_LIKE.match(name):
                hint = " (to read a live source such as an RTSP URL or a camera, pass --live)"
            if Path(name).is_dir():
                raise EtesvsError(f"{name}: is a directory, expected a video file")
            raise EtesvsError(f"{name}: video file not found{hint}")
        return ffmpeg_file_input(name)
    scheme = name.split(":", 1)[0].lower() if URL_LIKE.match(name) else ""
    if scheme in LIVE_SCHEMES and "://" in name:
        return ["-protocol_whitelist", ",".join(LIVE_PROTOCOLS), "-i", name]
    if name.startswith("/dev/") and sys.platform.startswith("linux"):
        if not Path(name).exists():
            raise EtesvsError(f"{name}: camera device not found")
        return ["-f", "v4l2", "-i", name]
    raise EtesvsError(
        f"{name}: --live expects a URL (rtsp://, rtmp://, http://, https://, udp://, tcp://, srt://) "
        "or a camera device such as /dev/video0"
    )


def read_frames(
    video: str | Path, *, fps: float, image_size: int, chunk: int, live: bool = False
) -> Iterator[np.ndarray]:
    """Decode ``video`` with ffmpeg at ``fps``, squeezed to ``image_size`` x ``image_size``, ``chunk`` frames at a time.

    ffmpeg runs as a subprocess with an argument list (no shell) and writes raw RGB to a pipe; only one chunk is in
    memory at a time. ``video`` is a file name (see :func:`ffmpeg_source`; ``live`` for a URL or a camera).
    Yields uint8 arrays (n, S, S, 3), n = ``chunk`` except for the last. Raises :class:`EtesvsError` naming the
    file and ffmpeg's reason when it can't be decoded, :class:`Interrupted` when a signal stopped ffmpeg.
    """
    command = [
        ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error",
        *ffmpeg_source(video, live=live), "-an", "-sn",
        "-vf", f"fps={fps:g},scale={image_size}:{image_size}:flags=bilinear",
        "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errors: deque[bytes] = deque(maxlen=64)  # ffmpeg's last messages, bounded
    drain = threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)
    drain.start()
    frame_bytes = image_size * image_size * 3
    decoded = 0
    completed = False
    try:
        while True:
            data = process.stdout.read(frame_bytes * chunk)
            count = len(data) // frame_bytes
            if count:
                decoded += count
                frames = np.frombuffer(bytearray(data[: count * frame_bytes]), dtype=np.uint8)  # writable copy
                yield frames.reshape(count, image_size, image_size, 3)  # (n*S*S*3,) -> (n, S, S, 3)
            if len(data) < frame_bytes * chunk:
                break
        completed = True
    finally:
        code = stop_ffmpeg(process, drain, completed=completed)
    stderr = check_ffmpeg_exit(code, errors, source=str(video))
    if decoded == 0:
        raise EtesvsError(f"{video}: no video frames decoded{f' ({ffmpeg_reason(stderr)})' if stderr.strip() else ''}")


@dataclass(frozen=True)
class WindowLabels:
    """The labels of one window: frames ``start .. start + len(labels) - 1`` at the model's frame rate."""

    index: int
    start: int
    labels: np.ndarray  # (n,) int64


@torch.inference_mode()
def stream_labels(
    stream_model: StreamModel,
    video: str | Path,
    *,
    window: int | None = None,
    fps: float | None = None,
    live: bool = False,
) -> Iterator[WindowLabels]:
    """Label ``video`` window by window with constant memory: yields one :class:`WindowLabels` per window.

    ``video`` is a file name; with ``live``, a URL or a camera device (see :func:`ffmpeg_source`).
    """
    window = window or stream_model.window
    sample_rate = stream_model.sample_rate
    if window % sample_rate:
        raise EtesvsError(f"window {window} is not a multiple of the model's sample rate {sample_rate}")
    model = stream_model.model
    device = next(model.parameters()).device
    mean = torch.tensor(stream_model.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(stream_model.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    frames_per_window = window // sample_rate
    size = stream_model.image_size
    state = None
    start = 0
    chunks = read_frames(video, fps=fps or stream_model.fps, image_size=size, chunk=window, live=live)
    for index, chunk in enumerate(chunks):
        count = len(chunk)
        fed = torch.from_numpy(chunk[::sample_rate]).to(device)  # (n', S, S, 3) uint8
        fed = fed.permute(0, 3, 1, 2)  # (n', S, S, 3) -> (n', 3, S, S)
        fed = fed.to(torch.float32).div_(255.0).sub_(mean).div_(std)
        frames = torch.zeros(1, frames_per_window, 3, size, size, device=device)
        frames[0, : len(fed)] = fed
        mask = torch.zeros(1, frames_per_window, dtype=torch.bool, device=device)
        mask[0, : len(fed)] = True
        reset = torch.tensor([index == 0], device=device)
        outputs, state = model(frames, mask, state, reset)
        predicted = outputs["head_logits"][0].argmax(dim=0).cpu()  # (C, T') -> (T',)
        labels = predicted[torch.arange(count) // sample_rate].numpy().astype(np.int64)  # back to every frame
        yield WindowLabels(index=index, start=start, labels=labels)
        start += count


class SegmentTracker:
    """Turns a stream of per-frame labels into segments, each reported once it can no longer grow."""

    def __init__(self) -> None:
        self.label: int | None = None
        self.start = 0
        self.end = 0

    def update(self, start: int, labels: np.ndarray) -> list[tuple[int, int, int]]:
        """Add the labels of frames ``start ..``; returns the segments ``(label, start, end)`` that ended."""
        finished = []
        labels = np.asarray(labels)
        if len(labels) == 0:
            return finished
        changes = np.flatnonzero(labels[1:] != labels[:-1]) + 1  # positions where a new run starts
        run_starts = np.concatenate([[0], changes])
        for run_start in run_starts:
            label = int(labels[run_start])
            if self.label is not None and label != self.label:
                finished.append((self.label, self.start, start + int(run_start)))
                self.start = start + int(run_start)
            elif self.label is None:
                self.start = start + int(run_start)
            self.label = label
        self.end = start + len(labels)
        return finished

    def finish(self) -> list[tuple[int, int, int]]:
        """The last segment (at the end of the stream)."""
        if self.label is None:
            return []
        segment = (self.label, self.start, self.end)
        self.label = None
        return [segment]


def segment_record(segment: tuple[int, int, int], classes: Sequence[str], fps: float) -> dict:
    label, start, end = segment
    return {
        "label": classes[label],
        "start_frame": start,
        "end_frame": end,
        "start_time": round(start / fps, 3),
        "end_time": round(end / fps, 3),
    }


def save_label_bar(path: str | Path, labels: np.ndarray, *, classes: Sequence[str], fps: float,
                   background_ids: Sequence[int] = (), title: str = "") -> None:
    """A coloured bar of per-frame labels with a legend, as PNG (matplotlib's Agg canvas), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from etesvs.viz import class_colors

    colors = class_colors(len(classes), background_ids)
    present = np.flatnonzero(np.bincount(labels, minlength=len(classes)))
    rows = max(1, int(np.ceil(len(present) / 4)))
    figure = Figure(figsize=(12, 1.6 + 0.22 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 1, height_ratios=(1.0, 0.32 * rows + 0.2))
    bar = figure.add_subplot(grid[0])
    duration = max(len(labels), 1) / fps
    bar.imshow(
        labels[None, :],  # (T,) -> (1, T): one row of pixels stretched into a bar
        aspect="auto", cmap=ListedColormap(colors), vmin=-0.5, vmax=len(classes) - 0.5,
        interpolation="nearest", extent=(0.0, duration, 0.0, 1.0),
    )  # fmt: skip
    bar.set_yticks([])
    bar.set_xlabel("time (s)")
    legend = figure.add_subplot(grid[1])
    legend.axis("off")
    legend.legend(
        handles=[Patch(facecolor=colors[c], label=classes[c]) for c in present],
        loc="upper center", ncol=4, fontsize="small", frameon=False,
    )  # fmt: skip
    figure.suptitle(title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def _emit(stream: IO[str], record: dict) -> None:
    stream.write(json.dumps(record) + "\n")
    stream.flush()


def run_stream(
    stream_model: StreamModel,
    video: str | Path,
    *,
    out_dir: str | Path | None = None,
    window: int | None = None,
    fps: float | None = None,
    print_windows: bool = False,
    stdout: IO[str] = sys.stdout,
    live: bool = False,
    inputs: Sequence[str | Path] = (),
) -> dict:
    """Stream ``video``: JSON lines on ``stdout`` as segments become final, the whole video's segments at the end.

    ``video`` is a file name; with ``live``, a URL or a camera device (see :func:`ffmpeg_source`). ``out_dir``
    must be new, empty or an earlier ``--out`` of this command (see :func:`etesvs.io.claim_output_dir`; ``inputs``,
    such as the checkpoint, must stay outside it). Returns a small summary (frames, segments, windows) without
    the labels themselves.
    """
    classes = stream_model.classes
    rate = fps or stream_model.fps
    tracker = SegmentTracker()
    ffmpeg_source(video, live=live)  # a missing file or a bad --live source fails before anything is written
    output = None
    if out_dir is not None:
        sources = [*inputs, *([] if live else [video])]
        output = claim_output_dir(out_dir, owner="stream", inputs=sources)
        output.expect(OUTPUT_FILES)
    # With --out, labels and segments go to temporary files renamed into place at the end; without, the segments
    # are spooled to an anonymous temporary file.
    labels_context = atomic_path(output.file("labels.txt")) if output is not None else contextlib.nullcontext()
    spool_context = atomic_path(output.file("segments.jsonl")) if output is not None else contextlib.nullcontext()
    frames = windows = segments = 0
    with labels_context as labels_tmp, spool_context as spool_tmp:
        if spool_tmp is None:
            spool = tempfile.TemporaryFile("w+", encoding="utf-8")
        else:
            spool = open(spool_tmp, "w+", encoding="utf-8")
        labels_file = open(labels_tmp, "w", encoding="utf-8") if labels_tmp is not None else None
        try:
            def finished(found: list[tuple[int, int, int]]) -> None:
                nonlocal segments
                for segment in found:
                    record = segment_record(segment, classes, rate)
                    _emit(stdout, {"event": "segment", **record})
                    spool.write(json.dumps(record) + "\n")
                    segments += 1

            for item in stream_labels(stream_model, video, window=window, fps=fps, live=live):
                windows += 1
                frames = item.start + len(item.labels)
                if print_windows:
                    _emit(stdout, {"event": "window", "window": item.index, "start_frame": item.start,
                                   "end_frame": frames, "labels": [classes[i] for i in item.labels]})  # fmt: skip
                if labels_file is not None:
                    labels_file.write("".join(classes[i] + "\n" for i in item.labels))
                finished(tracker.update(item.start, item.labels))
            finished(tracker.finish())
            # The last line: every segment of the video, copied from the spool without holding them all.
            spool.flush()
            spool.seek(0)
            stdout.write(json.dumps({"event": "video", "video": str(video), "num_frames": frames, "fps": rate})[:-1])
            stdout.write(', "segments": [')
            for number, line in enumerate(spool):
                stdout.write((", " if number else "") + line.rstrip("\n"))
            stdout.write("]}\n")
            stdout.flush()
        finally:
            spool.close()
            if labels_file is not None:
                labels_file.close()
    if output is not None:
        names = output.file("labels.txt").read_text(encoding="utf-8").splitlines()
        index = {name: i for i, name in enumerate(classes)}
        labels = np.fromiter((index[name] for name in names), dtype=np.int64, count=len(names))
        title = str(video) if live else Path(video).name
        save_label_bar(output.file("segments.png"), labels, classes=classes, fps=rate,
                       background_ids=stream_model.background_ids, title=title)  # fmt: skip
    return {"frames": frames, "segments": segments, "windows": windows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m etesvs.stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("video", help="a video file (any format ffmpeg reads); with --live a URL or a camera device")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a streaming-model checkpoint (best.pt)")
    parser.add_argument("--fps", type=float, default=None, help="frames per second to label (default: the model's)")
    parser.add_argument("--window", type=int, default=None, help="frames per window (default: the model's)")
    parser.add_argument("--out", type=Path, default=None, help="directory for labels.txt, segments.jsonl, segments.png")
    parser.add_argument("--windows", action="store_true", help="also print every window's labels")
    parser.add_argument("--live", action="store_true",
                        help="VIDEO is a live source: an rtsp/http/https/udp/tcp/rtmp/srt URL or a device such as "
                             "/dev/video0 (without it, VIDEO is always read as a file name)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fps is not None and not args.fps > 0:
        raise EtesvsError(f"--fps must be positive (got {args.fps})")
    if args.window is not None and args.window < 1:
        raise EtesvsError(f"--window must be positive (got {args.window})")
    stream_model = load_stream_model(args.checkpoint, device=args.device)
    summary = run_stream(stream_model, args.video, out_dir=args.out, window=args.window, fps=args.fps,
                         print_windows=args.windows, live=args.live, inputs=[args.checkpoint])  # fmt: skip
    print(f"stream: {summary['frames']} frames, {summary['windows']} windows, {summary['segments']} segments"
          + (f" -> {args.out}" if args.out else ""), file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    run_main(main)
