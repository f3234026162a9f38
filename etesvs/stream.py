"""Online action segmentation of a video file with a trained streaming model.

    python -m etesvs.stream VIDEO --checkpoint data/models/etesvs/best.pt [--fps F] [--window N] [--out DIR]
                                  [--overlay OUT.mp4] [--windows] [--burr-frames N]
    python -m etesvs.stream --live rtsp://camera.local/stream --checkpoint ...      (or /dev/video0)

ffmpeg decodes the video file (any format it reads) straight to raw RGB frames at the model's frame rate and input size;
the model labels them window by window, carrying only its constant-size state from one window to the next, and
removes the burrs inside each window it has read (label runs of at most ``--burr-frames`` frames, default
``streaming.postprocess.burr_frames`` of ./params.yaml, as the evaluation; see :mod:`etesvs.postprocess`). Each
segment is printed as a JSON line as soon as it is final (when the label changes), with its confidence (the mean
probability of its label over its frames); ``--windows`` also prints every window's labels, and a last line lists
the segments of the whole video. Nothing grows with the length of the video: the segments are spooled to a file,
``--out DIR`` writes ``labels.txt`` (one class name per frame), ``segments.jsonl`` and ``segments.png`` (a coloured
bar with a legend), and ``--overlay OUT.mp4`` the video with the current label and a timeline drawn on it.

VIDEO is always a file name: ffmpeg opens exactly that file, whatever the name looks like ("concat:a|b",
"http://..."). Live sources (an RTSP, HTTP, UDP, TCP, RTMP or SRT URL, or a camera device) are read only with
``--live``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections import deque
from queue import Empty, Full, Queue
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Sequence, TypeVar

import numpy as np
import torch

from etesvs.data.frames import check_ffmpeg_exit, ffmpeg_exe, ffmpeg_reason, stop_ffmpeg
from etesvs.errors import EtesvsError, run_main
from etesvs.io import (atomic_path, check_output_file, claim_output_dir, ffmpeg_file_input, load_weights_file,
                       read_yaml)
from etesvs.models.streaming import StreamingSegmenter, prepare_for_inference
from etesvs.overlay import OverlayWriter
from etesvs.params import PARAMS_FILE
from etesvs.postprocess import check_burr_frames, suppress_burrs

REQUIRED_KEYS = ("model", "model_args", "classes", "fps", "window", "sample_rate", "image_size", "normalization")
OUTPUT_FILES = ("labels.txt", "segments.jsonl", "segments.png")
# --live: URL schemes, and the ffmpeg protocols they may use (never file, pipe, fd, concat, subfile or data).
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "rtmpt", "rtmpe", "rtmpts", "rtmpte", "http", "https", "udp",
                "tcp", "srt", "rtp")  # fmt: skip
LIVE_PROTOCOLS = LIVE_SCHEMES + ("tls", "httpproxy", "srtp", "crypto", "ffrtmpcrypt", "ffrtmphttp")
URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
FRAME_SIZE = re.compile(r"\b(\d{2,5})x(\d{2,5})\b")  # "640x480" in ffmpeg's description of a video stream
DISPLAY_HEIGHT = 360  # --overlay frames are at most this high
T = TypeVar("T")


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


def _single_stage_head_names(state: dict) -> dict:
    """A state dict with an older single-stage head's tensors (``head.conv_in.*``, ``head.stack.*``,
    ``head.conv_out.*``) renamed as stage 0 of the multi-stage head; newer state dicts are returned as they are."""
    old = ("head.conv_in.", "head.stack.", "head.conv_out.")
    return {("head.stages.0." + key.removeprefix("head.") if key.startswith(old) else key): value
            for key, value in state.items()}


def load_stream_model(path: str | Path, device: str | torch.device = "cpu") -> StreamModel:
    """Rebuild the model of a self-describing checkpoint (plain weights only), prepared for inference (see
    :func:`etesvs.models.streaming.prepare_for_inference`)."""
    checkpoint = load_weights_file(path, what="checkpoint", map_location=device)
    if not isinstance(checkpoint, dict):
        raise EtesvsError(f"{path}: not a streaming-model checkpoint (not a dictionary)")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise EtesvsError(f"{path}: not a streaming-model checkpoint (missing {', '.join(missing)})")
    try:
        # Older files: no stem shift, a single head stage whose tensors were named head.* (now head.stages.0.*).
        model = StreamingSegmenter(**{"stem_shift": False, "head_stages": 1, "shift_across_windows": False,
                                      **checkpoint["model_args"]})
        model.load_state_dict(_single_stage_head_names(checkpoint["model"]))
    except (TypeError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0]
        raise EtesvsError(f"{path}: the weights do not fit the model they describe ({reason})") from None
    prepare_for_inference(model.to(device))
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


def probe_frame_size(video: str | Path, *, live: bool = False) -> tuple[int, int]:
    """(width, height) of ``video``'s frames, read from what ffmpeg says of its input (no frame is decoded)."""
    command = [ffmpeg_exe(), "-nostdin", "-hide_banner", *ffmpeg_source(video, live=live)]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                          timeout=60)  # fmt: skip
    for line in done.stderr.splitlines():
        if "Video:" in line:
            found = FRAME_SIZE.search(line.split("Video:", 1)[1])
            if found:
                return int(found.group(1)), int(found.group(2))
    raise EtesvsError(f"{video}: no video stream found ({ffmpeg_reason(done.stderr) or 'ffmpeg gave no reason'})")


def display_size(width: int, height: int, *, max_height: int = DISPLAY_HEIGHT) -> tuple[int, int]:
    """The size of ``--overlay`` frames: the video's aspect, at most ``max_height`` high, even numbers (H.264)."""
    scale = min(1.0, max_height / height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def read_frames(
    video: str | Path, *, fps: float, image_size: int | None = None, frame_size: tuple[int, int] | None = None,
    chunk: int, live: bool = False,
) -> Iterator[np.ndarray]:
    """Decode ``video`` with ffmpeg at ``fps``, ``chunk`` frames at a time, squeezed to ``image_size`` x
    ``image_size`` or scaled to ``frame_size`` (width, height).

    ffmpeg runs as a subprocess with an argument list (no shell) and writes raw RGB to a pipe; only one chunk is in
    memory at a time. ``video`` is a file name (see :func:`ffmpeg_source`; ``live`` for a URL or a camera).
    Yields uint8 arrays (n, H, W, 3), n = ``chunk`` except for the last. Raises :class:`EtesvsError` naming the
    file and ffmpeg's reason when it can't be decoded, :class:`Interrupted` when a signal stopped ffmpeg.
    """
    width, height = frame_size or (image_size, image_size)
    command = [
        ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error",
        *ffmpeg_source(video, live=live), "-an", "-sn",
        "-vf", f"fps={fps:g},scale={width}:{height}:flags=bilinear",
        "-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errors: deque[bytes] = deque(maxlen=64)  # ffmpeg's last messages, bounded
    drain = threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True)
    drain.start()
    frame_bytes = width * height * 3
    decoded = 0
    completed = False
    try:
        while True:
            data = process.stdout.read(frame_bytes * chunk)
            count = len(data) // frame_bytes
            if count:
                decoded += count
                frames = np.frombuffer(bytearray(data[: count * frame_bytes]), dtype=np.uint8)  # writable copy
                yield frames.reshape(count, height, width, 3)  # (n*H*W*3,) -> (n, H, W, 3)
            if len(data) < frame_bytes * chunk:
                break
        completed = True
    finally:
        code = stop_ffmpeg(process, drain, completed=completed)
    stderr = check_ffmpeg_exit(code, errors, source=str(video))
    if decoded == 0:
        raise EtesvsError(f"{video}: no video frames decoded{f' ({ffmpeg_reason(stderr)})' if stderr.strip() else ''}")


def read_ahead(items: Iterator[T], *, depth: int = 2) -> Iterator[T]:
    """``items`` produced by a background thread up to ``depth`` ahead, so that ffmpeg decodes the next windows while
    the model labels this one. Errors of ``items`` are raised here; leaving early stops the thread and closes
    ``items`` (which stops ffmpeg)."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        queue.put((item, None), timeout=0.1)
                        break
                    except Full:
                        continue
                if stop.is_set():
                    break
            queue.put((end, None))
        except BaseException as error:  # handed to the consumer, which raises it
            queue.put((end, error))
        finally:
            items.close()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        while True:
            item, error = queue.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        while producer.is_alive():
            with contextlib.suppress(Empty):
                queue.get(timeout=0.1)
        producer.join()


@dataclass(frozen=True)
class WindowLabels:
    """The labels of one window: frames ``start .. start + len(labels) - 1`` at the model's frame rate.

    ``confidence`` (n,) is the probability of each frame's label; ``frames`` (n, H, W, 3) uint8 are the decoded
    frames at display size when they were asked for (``--overlay``), else None.
    """

    index: int
    start: int
    labels: np.ndarray  # (n,) int64
    confidence: np.ndarray  # (n,) float32
    frames: np.ndarray | None = None


class _Normalizer:
    """uint8 frames (n, H, W, 3) -> the model's input (1, n, 3, S, S) float, each frame channels-last, and its mask.

    (x / 255 - mean) / std is one multiply-add per pixel, done in ffmpeg's (H, W, 3) order; frames of another size
    (display frames) are first squeezed to S x S like the training frames. A video's last window, shorter than the
    others, is not padded: the model labels its real frames exactly as it would in a padded window (padding frames
    only ever contribute zeros), so a short window costs only its own frames.
    """

    def __init__(self, stream_model: StreamModel, device: torch.device) -> None:
        std = torch.tensor(stream_model.std, dtype=torch.float32, device=device)
        self.scale, self.shift = 1.0 / (255.0 * std), -torch.tensor(stream_model.mean, device=device) / std
        self.size, self.device = stream_model.image_size, device

    def __call__(self, fed: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        frames = torch.from_numpy(fed).to(self.device)  # (n, H, W, 3) uint8
        if frames.shape[1:3] != (self.size, self.size):
            from torchvision.transforms.v2 import functional as TF

            frames = TF.resize(frames.permute(0, 3, 1, 2), [self.size, self.size], antialias=True)  # (n, 3, S, S)
            frames = frames.permute(0, 2, 3, 1)  # (n, 3, S, S) -> (n, S, S, 3)
        values = torch.empty(1, len(frames), self.size, self.size, 3, device=self.device)
        values[0].copy_(frames).mul_(self.scale).add_(self.shift)
        mask = torch.ones(1, len(frames), dtype=torch.bool, device=self.device)
        return values.permute(0, 1, 4, 2, 3), mask  # (1, n, S, S, 3) -> (1, n, 3, S, S)


@torch.inference_mode()
def stream_labels(
    stream_model: StreamModel,
    video: str | Path,
    *,
    window: int | None = None,
    fps: float | None = None,
    live: bool = False,
    display: tuple[int, int] | None = None,
    burr_frames: int = 0,
) -> Iterator[WindowLabels]:
    """Label ``video`` window by window with constant memory: yields one :class:`WindowLabels` per window.

    ``video`` is a file name; with ``live``, a URL or a camera device (see :func:`ffmpeg_source`). With ``display``
    (width, height) the video is decoded at that size, handed back with the labels, and squeezed for the model.
    ``burr_frames`` > 0 removes each window's burrs (:func:`etesvs.postprocess.suppress_burrs`); a relabelled
    frame's confidence is then the probability of its new label.
    """
    window = window or stream_model.window
    sample_rate = stream_model.sample_rate
    if window % sample_rate:
        raise EtesvsError(f"window {window} is not a multiple of the model's sample rate {sample_rate}")
    model = stream_model.model
    device = next(model.parameters()).device
    normalize = _Normalizer(stream_model, device)
    size = None if display else stream_model.image_size
    chunks = read_ahead(read_frames(video, fps=fps or stream_model.fps, image_size=size, frame_size=display,
                                    chunk=window, live=live))  # fmt: skip
    state, start, previous = None, 0, None
    for index, chunk in enumerate(chunks):
        frames, mask = normalize(chunk[::sample_rate])
        outputs, state = model(frames, mask, state, torch.tensor([index == 0], device=device))
        probabilities = torch.softmax(outputs["head_logits"][0].float(), dim=0).cpu()  # (C, T')
        every = torch.arange(len(chunk)) // sample_rate  # full-rate frame -> its fed frame
        labels = suppress_burrs(probabilities.argmax(dim=0)[every].numpy().astype(np.int64), burr_frames, previous)
        confidence = probabilities[torch.from_numpy(labels), every].numpy()
        yield WindowLabels(index=index, start=start, labels=labels, confidence=confidence,
                           frames=chunk if display else None)
        start, previous = start + len(chunk), int(labels[-1])


class SegmentTracker:
    """Turns a stream of per-frame labels into segments, each reported once it can no longer grow.

    A segment is ``(label, start, end, confidence)``: frames ``[start, end)`` and the mean probability of its
    label over them.
    """

    def __init__(self) -> None:
        self.label: int | None = None
        self.start = 0
        self.end = 0
        self.score = 0.0  # sum of the current segment's confidences

    def update(self, start: int, labels: np.ndarray, confidence: np.ndarray) -> list[tuple[int, int, int, float]]:
        """Add the labels (and their confidences) of frames ``start ..``; returns the segments that ended."""
        finished = []
        labels, confidence = np.asarray(labels), np.asarray(confidence, dtype=np.float64)
        if len(labels) == 0:
            return finished
        run_starts = np.concatenate([[0], np.flatnonzero(labels[1:] != labels[:-1]) + 1])  # where runs begin
        run_ends = np.append(run_starts[1:], len(labels))
        for run_start, run_end in zip(run_starts.tolist(), run_ends.tolist()):
            label = int(labels[run_start])
            if self.label is not None and label != self.label:
                finished.append(self._close(start + run_start))
            if self.label is None or label != self.label:
                self.label, self.start, self.score = label, start + run_start, 0.0
            self.score += float(confidence[run_start:run_end].sum())
        self.end = start + len(labels)
        return finished

    def _close(self, end: int) -> tuple[int, int, int, float]:
        return self.label, self.start, end, self.score / max(end - self.start, 1)

    def finish(self) -> list[tuple[int, int, int, float]]:
        """The last segment (at the end of the stream)."""
        if self.label is None:
            return []
        segment = self._close(self.end)
        self.label = None
        return [segment]


def segment_record(segment: tuple[int, int, int, float], classes: Sequence[str], fps: float) -> dict:
    """A segment as it is printed: its label, frames, times and confidence (mean probability of its label)."""
    label, start, end, confidence = segment
    return {
        "label": classes[label],
        "start_frame": start,
        "end_frame": end,
        "start_time": round(start / fps, 3),
        "end_time": round(end / fps, 3),
        "confidence": round(confidence, 4),
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


@contextlib.contextmanager
def _text_file(path: Path | None) -> Iterator[IO[str]]:
    """A text file written to a temporary path and renamed onto ``path`` when the block succeeds; an anonymous
    temporary file for None."""
    if path is None:
        with tempfile.TemporaryFile("w+", encoding="utf-8") as handle:
            yield handle
        return
    with atomic_path(path) as tmp, open(tmp, "w+", encoding="utf-8") as handle:
        yield handle


def _emit_video_line(stdout: IO[str], spool: IO[str], *, video: str, frames: int, fps: float) -> None:
    """The last line: every segment of the video, copied from the spool without holding them all in memory."""
    spool.flush()
    spool.seek(0)
    stdout.write(json.dumps({"event": "video", "video": video, "num_frames": frames, "fps": fps})[:-1])
    stdout.write(', "segments": [')
    for number, line in enumerate(spool):
        stdout.write((", " if number else "") + line.rstrip("\n"))
    stdout.write("]}\n")
    stdout.flush()


def _overlay_writer(path: Path, stream_model: StreamModel, *, size: tuple[int, int], fps: float) -> OverlayWriter:
    from etesvs.viz import class_colors

    colors = (class_colors(len(stream_model.classes), stream_model.background_ids)[:, :3] * 255).round()
    return OverlayWriter(path, width=size[0], height=size[1], fps=fps, classes=stream_model.classes, colors=colors)


def run_stream(
    stream_model: StreamModel,
    video: str | Path,
    *,
    out_dir: str | Path | None = None,
    overlay: str | Path | None = None,
    window: int | None = None,
    fps: float | None = None,
    print_windows: bool = False,
    stdout: IO[str] = sys.stdout,
    live: bool = False,
    inputs: Sequence[str | Path] = (),
    burr_frames: int = 0,
) -> dict:
    """Stream ``video``: JSON lines on ``stdout`` as segments become final, the whole video's segments at the end.

    ``video`` is a file name; with ``live``, a URL or a camera device (see :func:`ffmpeg_source`). ``out_dir``
    must be new, empty or an earlier ``--out`` of this command (see :func:`etesvs.io.claim_output_dir`; ``inputs``,
    such as the checkpoint, must stay outside it); ``overlay`` is a video to write with the labels drawn on it.
    Returns a small summary (frames, segments, windows) without the labels themselves.
    """
    classes, rate = stream_model.classes, fps or stream_model.fps
    sources = [*inputs, *([] if live else [video])]
    ffmpeg_source(video, live=live)  # a missing file or a bad --live source fails before anything is written
    output = claim_output_dir(out_dir, owner="stream", inputs=sources) if out_dir is not None else None
    if output is not None:
        output.expect(OUTPUT_FILES)
    display = None
    if overlay is not None:
        check_output_file(overlay, inputs=sources, new_only=True)  # never a user's video
        display = display_size(*probe_frame_size(video, live=live))
    tracker, counts = SegmentTracker(), {"frames": 0, "segments": 0, "windows": 0}
    with contextlib.ExitStack() as stack:
        spool = stack.enter_context(_text_file(output.file("segments.jsonl") if output else None))
        labels_file = stack.enter_context(_text_file(output.file("labels.txt"))) if output else None
        writer = (stack.enter_context(_overlay_writer(Path(overlay), stream_model, size=display, fps=rate))
                  if overlay is not None else None)

        def report(found: list[tuple[int, int, int, float]]) -> None:
            for segment in found:
                record = segment_record(segment, classes, rate)
                _emit(stdout, {"event": "segment", **record})
                spool.write(json.dumps(record) + "\n")
                counts["segments"] += 1

        for item in stream_labels(stream_model, video, window=window, fps=fps, live=live, display=display,
                                  burr_frames=burr_frames):
            counts["windows"] += 1
            counts["frames"] = item.start + len(item.labels)
            if print_windows:
                _emit(stdout, {"event": "window", "window": item.index, "start_frame": item.start,
                               "end_frame": counts["frames"], "labels": [classes[i] for i in item.labels]})  # fmt: skip
            if labels_file is not None:
                labels_file.write("".join(classes[i] + "\n" for i in item.labels))
            if writer is not None:
                writer.write(item.frames, item.labels, item.confidence)
            report(tracker.update(item.start, item.labels, item.confidence))
        report(tracker.finish())
        _emit_video_line(stdout, spool, video=str(video), frames=counts["frames"], fps=rate)
    if output is not None:
        _save_label_picture(output, stream_model, title=str(video) if live else Path(video).name, fps=rate)
    return counts


def _save_label_picture(output: Any, stream_model: StreamModel, *, title: str, fps: float) -> None:
    """segments.png of ``--out`` from its labels.txt."""
    classes = stream_model.classes
    names = output.file("labels.txt").read_text(encoding="utf-8").splitlines()
    index = {name: i for i, name in enumerate(classes)}
    labels = np.fromiter((index[name] for name in names), dtype=np.int64, count=len(names))
    save_label_bar(output.file("segments.png"), labels, classes=classes, fps=fps,
                   background_ids=stream_model.background_ids, title=title)  # fmt: skip


def default_burr_frames(params_file: str | Path = PARAMS_FILE) -> int:
    """``streaming.postprocess.burr_frames`` of ``params_file`` (the pipeline's, so that the stream emits the labels
    the evaluation scored); 0 (off) when there is no such file or key."""
    params_file = Path(params_file)
    if not params_file.is_file():
        return 0
    value = read_yaml(params_file) or {}
    for key in ("streaming", "postprocess", "burr_frames"):
        if not isinstance(value, dict) or key not in value:
            return 0
        value = value[key]
    return check_burr_frames(value, where=f"{params_file}: streaming.postprocess")


def default_threads() -> int:
    """Torch threads for streaming: every core but one, left to ffmpeg, which decodes while the model labels."""
    return max(1, (os.cpu_count() or 2) - 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m etesvs.stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("video", help="a video file (any format ffmpeg reads); with --live a URL or a camera device")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a streaming-model checkpoint (best.pt)")
    parser.add_argument("--fps", type=float, default=None, help="frames per second to label (default: the model's)")
    parser.add_argument("--window", type=int, default=None, help="frames per window (default: the model's)")
    parser.add_argument("--out", type=Path, default=None, help="directory for labels.txt, segments.jsonl, segments.png")
    parser.add_argument("--windows", action="store_true", help="also print every window's labels")
    parser.add_argument("--overlay", type=Path, default=None,
                        help="also write this video (MP4) with the current label and a timeline drawn on it")
    parser.add_argument("--live", action="store_true",
                        help="VIDEO is a live source: an rtsp/http/https/udp/tcp/rtmp/srt URL or a device such as "
                             "/dev/video0 (without it, VIDEO is always read as a file name)")  # fmt: skip
    parser.add_argument("--burr-frames", type=int, default=None,
                        help="remove label runs of at most N frames that end inside a window (0: off; default: "
                             "streaming.postprocess.burr_frames of ./params.yaml, else 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="torch CPU threads (default: all cores but one, which ffmpeg decodes on)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fps is not None and not args.fps > 0:
        raise EtesvsError(f"--fps must be positive (got {args.fps})")
    if args.window is not None and args.window < 1:
        raise EtesvsError(f"--window must be positive (got {args.window})")
    burr_frames = (default_burr_frames() if args.burr_frames is None
                   else check_burr_frames(args.burr_frames, where="--burr-frames"))
    stream_model = load_stream_model(args.checkpoint, device=args.device)
    summary = run_stream(stream_model, args.video, out_dir=args.out, overlay=args.overlay, window=args.window,
                         fps=args.fps, print_windows=args.windows, live=args.live, inputs=[args.checkpoint],
                         burr_frames=burr_frames)
    print(f"stream: {summary['frames']} frames, {summary['windows']} windows, {summary['segments']} segments"
          + (f" -> {args.out}" if args.out else "") + (f", {args.overlay}" if args.overlay else ""),
          file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
