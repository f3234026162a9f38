"""Frame containers: every video decoded once by ffmpeg into one HDF5 file of JPEG frames.

One file per video, not one per frame, because DVC hashes every file it tracks and a dataset such as
Breakfast has millions of frames. A container ``<frames_dir>/<video>.h5`` holds

- ``jpeg``: uint8 (total bytes,), the JPEG images of all frames one after another (ffmpeg's MJPEG encoder,
  so no re-encoding in Python), and ``offsets``: int64 (N + 1,), frame i is ``jpeg[offsets[i]:offsets[i+1]]``
  (one flat array reads a window in one slice and writes far faster than N variable-length rows);
- attributes ``fps``, ``height``, ``width``, ``num_frames``, ``short_side``, ``source``, ``source_size``,
  ``decoded_frames`` (before reconciliation with the labels) and ``complete``.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch

from etesvs.errors import EtesvsError, Interrupted, signal_name
from etesvs.io import atomic_path, check_plain_name, claim_output_dir, ffmpeg_file_input, path_inside

CONTAINER_SUFFIX = ".h5"


def ffmpeg_exe() -> str:
    """The ffmpeg binary shipped in the imageio-ffmpeg wheel (no system ffmpeg needed)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def frames_path(frames_dir: str | Path, video: str) -> Path:
    """Path of the container of ``video`` in ``frames_dir``; ``video`` must be a plain name."""
    check_plain_name(video, source=frames_dir)
    return path_inside(frames_dir, f"{video}{CONTAINER_SUFFIX}")


def is_frame_container(path: Path) -> bool:
    """True if ``path`` is a container written by :func:`extract_video` (used to adopt directories written before
    output markers existed; anything else in a frames directory makes extract_frames refuse it)."""
    if path.suffix != CONTAINER_SUFFIX or not path.is_file() or path.is_symlink():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return "jpeg" in handle and "offsets" in handle and "source" in handle.attrs
    except (OSError, ValueError):
        return False


def scale_filter_args(short_side: int) -> tuple[str, str]:
    """ffmpeg ``scale`` width and height expressions that resize the short side to ``short_side``.

    The other side keeps the aspect ratio, rounded to an even number (H.264 and MJPEG 4:2:0 need it).
    """
    width = f"if(lt(iw,ih),{short_side},-2)"
    height = f"if(lt(iw,ih),-2,{short_side})"
    return width, height


def split_jpeg_stream(data: bytes | bytearray | memoryview) -> tuple[list[bytes], int]:
    """Split a concatenation of baseline JPEG images into images by walking their marker segments.

    Returns the complete images and the number of bytes consumed (a trailing partial image is left for
    the caller to complete with more data). Inside a header segment a 0xFFD9 pair may occur by chance, so
    the scan follows segment lengths up to the start-of-scan and only then looks for the end-of-image
    marker in the entropy-coded data, where every 0xFF byte is stuffed (0xFF00) or a restart marker.
    """
    buffer = bytes(data)
    images = []
    position = 0
    size = len(buffer)
    while position + 4 <= size:
        if buffer[position] != 0xFF or buffer[position + 1] != 0xD8:
            raise ValueError(f"JPEG stream out of sync at byte {position}")
        cursor = position + 2
        end = -1
        while cursor + 4 <= size:
            if buffer[cursor] != 0xFF:
                raise ValueError(f"JPEG marker expected at byte {cursor}")
            marker = buffer[cursor + 1]
            if marker == 0xFF:  # fill byte
                cursor += 1
                continue
            length = (buffer[cursor + 2] << 8) | buffer[cursor + 3]
            cursor += 2 + length
            if marker == 0xDA:  # start of scan: entropy-coded data follows
                scan = cursor
                while True:
                    found = buffer.find(b"\xff", scan)
                    if found < 0 or found + 1 >= size:
                        break
                    following = buffer[found + 1]
                    if following == 0x00 or 0xD0 <= following <= 0xD7:
                        scan = found + 2
                        continue
                    if following == 0xD9:
                        end = found + 2
                    else:  # another marker (e.g. a second scan of a progressive image)
                        cursor = found
                    break
                if end >= 0 or found < 0 or found + 1 >= size:
                    break
        if end < 0:
            break
        images.append(buffer[position:end])
        position = end
    return images, position


@dataclass(frozen=True)
class ExtractConfig:
    """How to decode videos: target fps, short side in pixels, JPEG quality (ffmpeg -q:v, 2 best .. 31)."""

    fps: float
    short_side: int
    jpeg_quality: int
    tolerance: int
    ffmpeg_threads: int = 1


@dataclass
class ExtractResult:
    """Outcome of one video: ``status`` is ``done``, ``skipped`` (already there) or ``failed``."""

    video: str
    status: str
    message: str = ""
    decoded_frames: int = 0
    label_frames: int = 0
    warnings: list[str] = field(default_factory=list)


# PR_SET_PDEATHSIG from <linux/prctl.h>: the kernel sends the signal to a process when its parent dies.
_PR_SET_PDEATHSIG = 1
_in_pool_worker = False


def set_parent_death_signal(signal_number: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``signal_number`` to this process when its parent dies; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    # prctl of the C library already loaded in this process (no library search: this also runs between fork and
    # exec of ffmpeg, where nothing slow or allocating belongs).
    return ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal_number), 0, 0, 0) == 0


def _pool_worker_init(parent_pid: int) -> None:
    """Initializer of extract_frames' pool workers: die with the parent, even when it is SIGKILLed.

    Ctrl-C reaches the whole process group; the parent handles it by stopping the workers, so they ignore it.
    SIGTERM, by which the parent stops them, ends them at once (the parent's handler, inherited through fork,
    would print a traceback from each worker).
    """
    global _in_pool_worker
    _in_pool_worker = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)


def _ffmpeg_dies_with_worker() -> None:
    # Runs in the forked ffmpeg child before exec. Only used from pool workers, which have a single thread, where
    # Popen's preexec_fn is safe; elsewhere ffmpeg stops with its reader through the broken pipe.
    set_parent_death_signal(signal.SIGKILL)


def ffmpeg_interruption(code: int, stderr: str, what: str) -> Interrupted | None:
    """The :class:`Interrupted` error for an ffmpeg that a signal stopped, or None for an ordinary exit.

    A process killed by a signal has a negative return code; ffmpeg catches SIGINT and SIGTERM itself and exits
    with 255 without an error message. Neither says anything about the video.
    """
    if code < 0:
        return Interrupted(f"{what}: ffmpeg was stopped by {signal_name(-code)}", -code)
    if code == 255 and not _ffmpeg_reasons(stderr):
        return Interrupted(f"{what}: ffmpeg was interrupted by a signal", signal.SIGTERM)
    return None


def _ffmpeg_reasons(stderr: str) -> list[str]:
    if "not on whitelist" in stderr:  # ffmpeg would list the whole whitelist; say what it means instead
        return ["not a video file (playlists, concat lists and image sequences, which open other files, are refused)"]
    reasons: list[str] = []
    for line in stderr.splitlines():
        line = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*", "", line.strip())
        if not line or line.startswith(("Conversion failed", "Exiting normally", "Error opening input file")):
            continue
        line = re.sub(r"^Error opening input(?: files)?:\s*", "", line)
        if line not in reasons:
            reasons.append(line)
    return reasons


def ffmpeg_reason(stderr: str) -> str:
    """ffmpeg's own words for a failure, on one line: its specific messages, without the generic ones."""
    reasons = _ffmpeg_reasons(stderr)
    return "; ".join(reasons[:3]) if reasons else "ffmpeg failed without a message"


def decode_command(video_file: Path, config: ExtractConfig) -> list[str]:
    """The ffmpeg command that decodes exactly ``video_file`` to MJPEG images on stdout."""
    width, height = (expression.replace(",", "\\,") for expression in scale_filter_args(config.short_side))
    return [
        ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error",
        "-threads", str(config.ffmpeg_threads), *ffmpeg_file_input(video_file),
        "-vf", f"fps=fps={config.fps},scale={width}:{height}",
        "-f", "image2pipe", "-vcodec", "mjpeg", "-pix_fmt", "yuvj420p",
        "-q:v", str(config.jpeg_quality), "-threads", str(config.ffmpeg_threads), "pipe:1",
    ]  # fmt: skip


def stop_ffmpeg(process: subprocess.Popen, drain: threading.Thread, *, completed: bool) -> int:
    """End an ffmpeg whose stdout has been read: killed if its reader stopped early, waited for, its stderr drained
    by ``drain``; returns its exit code."""
    process.stdout.close()
    if not completed:  # interrupted or stopped early: don't leave ffmpeg running
        process.kill()
    code = process.wait()
    drain.join()
    return code


def check_ffmpeg_exit(code: int, errors: list[bytes], *, source: str) -> str:
    """ffmpeg's stderr (from ``errors``), after raising :class:`Interrupted` if a signal stopped it or a one-line
    error naming ``source`` and ffmpeg's reason if it failed."""
    stderr = b"".join(errors).decode("utf-8", errors="replace")
    interruption = ffmpeg_interruption(code, stderr, source)
    if interruption is not None:
        raise interruption
    if code != 0:
        raise EtesvsError(f"{source}: ffmpeg could not decode it: {ffmpeg_reason(stderr)}")
    return stderr


def decode_video_to_jpeg(video_file: Path, config: ExtractConfig) -> list[bytes]:
    """Decode ``video_file`` at ``config.fps``, short side ``config.short_side``, into JPEG bytes per frame.

    ffmpeg runs as a subprocess with an argument list, never through a shell, and opens exactly ``video_file``
    (:func:`etesvs.io.ffmpeg_file_input`). Raises :class:`EtesvsError` naming the file and ffmpeg's reason when
    the video can't be decoded, and :class:`Interrupted` when a signal stopped ffmpeg.
    """
    if not video_file.is_file():
        raise EtesvsError(f"{video_file}: video file not found")
    if video_file.stat().st_size == 0:
        raise EtesvsError(f"{video_file}: empty video file")
    process = subprocess.Popen(
        decode_command(video_file, config),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_ffmpeg_dies_with_worker if _in_pool_worker else None,
    )
    errors: list[bytes] = []
    drain = threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)
    drain.start()
    images: list[bytes] = []
    pending = b""
    completed = False
    try:
        while True:
            chunk = process.stdout.read(1 << 20)
            if not chunk:
                break
            pending += chunk
            complete, used = split_jpeg_stream(pending)
            images.extend(complete)
            pending = pending[used:]
        completed = True
    except ValueError as error:
        process.kill()
        process.wait()
        raise EtesvsError(f"{video_file}: unreadable frame stream from ffmpeg ({error})") from None
    finally:
        code = stop_ffmpeg(process, drain, completed=completed)
    stderr = check_ffmpeg_exit(code, errors, source=str(video_file))
    if pending:
        raise EtesvsError(f"{video_file}: ffmpeg output ended inside a frame")
    if not images:
        reason = ffmpeg_reason(stderr) if stderr.strip() else "no video frames"
        raise EtesvsError(f"{video_file}: no frames decoded ({reason})")
    return images


def reconcile(images: list[bytes], label_frames: int, *, tolerance: int, video: str) -> tuple[list[bytes], str]:
    """Trim or pad (repeating the last frame) ``images`` to ``label_frames``; fail beyond ``tolerance``.

    Returns the frames and a warning ("" when the counts already agree). The public releases of GTEA,
    50Salads and Breakfast differ from their videos by a few frames.
    """
    difference = len(images) - label_frames
    if difference == 0:
        return images, ""
    if abs(difference) > tolerance:
        raise EtesvsError(
            f"video '{video}': {len(images)} decoded frames but {label_frames} labels "
            f"(difference {difference:+d} is beyond the tolerance of {tolerance})"
        )
    if difference > 0:
        return images[:label_frames], f"{video}: trimmed {difference} frames ({len(images)} -> {label_frames})"
    padded = images + [images[-1]] * (-difference)
    return padded, f"{video}: padded {-difference} frames ({len(images)} -> {label_frames})"


def jpeg_size(image: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG's start-of-frame header."""
    position = 2
    while position + 9 < len(image):
        if image[position] != 0xFF:
            break
        marker = image[position + 1]
        length = (image[position + 2] << 8) | image[position + 3]
        if marker in (0xC0, 0xC1, 0xC2):
            height = (image[position + 5] << 8) | image[position + 6]
            width = (image[position + 7] << 8) | image[position + 8]
            return height, width
        position += 2 + length
    raise ValueError("no JPEG start-of-frame header found")


def write_frame_container(
    path: str | Path,
    frames: np.ndarray | Sequence[bytes],
    fps: float,
    *,
    attrs: dict | None = None,
    jpeg_quality: int = 90,
) -> None:
    """Write a container atomically from JPEG bytes per frame, or from uint8 frames (T, H, W, 3)."""
    if isinstance(frames, np.ndarray):
        from torchvision.io import encode_jpeg

        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
        tensors = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # (T,H,W,3) -> (T,3,H,W)
        encoded = [bytes(t.numpy().tobytes()) for t in encode_jpeg(list(tensors), quality=jpeg_quality)]
    else:
        encoded = [bytes(b) for b in frames]
    if not encoded:
        raise ValueError("a frame container needs at least one frame")
    height, width = jpeg_size(encoded[0])
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(image) for image in encoded], out=offsets[1:])
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("jpeg", data=np.frombuffer(b"".join(encoded), dtype=np.uint8))
            handle.create_dataset("offsets", data=offsets)
            handle.attrs.update(
                {"fps": float(fps), "height": int(height), "width": int(width), "num_frames": len(encoded)}
            )
            handle.attrs.update(attrs or {})
            handle.attrs["complete"] = True


class FrameReader:
    """Random access to the frames of one container.

    The HDF5 file is opened on first use, so a reader can be built before DataLoader workers fork.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handle: h5py.File | None = None
        self._attrs: dict | None = None

    def _file(self) -> h5py.File:
        if self._handle is None:
            if not self.path.is_file():
                raise EtesvsError(f"{self.path}: frame container not found")
            try:
                self._handle = h5py.File(self.path, "r")
            except OSError as error:
                raise EtesvsError(f"{self.path}: not a readable frame container ({error})") from None
            if "jpeg" not in self._handle or not self._handle.attrs.get("complete", False):
                raise EtesvsError(f"{self.path}: incomplete frame container")
            self._attrs = dict(self._handle.attrs)
        return self._handle

    @property
    def num_frames(self) -> int:
        return int(self._file().attrs["num_frames"])

    @property
    def fps(self) -> float:
        return float(self._file().attrs["fps"])

    @property
    def height(self) -> int:
        return int(self._file().attrs["height"])

    @property
    def width(self) -> int:
        return int(self._file().attrs["width"])

    def read_jpeg(self, start: int, stop: int) -> list[torch.Tensor]:
        """JPEG bytes of frames ``start..stop-1`` as 1-D uint8 tensors."""
        handle = self._file()
        if not 0 <= start <= stop <= self.num_frames:
            raise IndexError(f"{self.path}: frames {start}..{stop} outside 0..{self.num_frames}")
        if start == stop:
            return []
        offsets = handle["offsets"][start : stop + 1]
        data = torch.from_numpy(handle["jpeg"][offsets[0] : offsets[-1]])
        relative = offsets - offsets[0]
        return [data[relative[i] : relative[i + 1]] for i in range(len(relative) - 1)]

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Frames ``start..stop-1`` decoded with ``torchvision.io.decode_jpeg``: uint8 (T, 3, H, W)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = self.read_jpeg(start, stop)
        if not encoded:
            return torch.empty((0, 3, self.height, self.width), dtype=torch.uint8)
        return torch.stack(decode_jpeg(encoded, mode=ImageReadMode.RGB))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "FrameReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: reopen in the worker
        return {"path": self.path, "_handle": None, "_attrs": None}


def container_is_current(path: Path, *, config: ExtractConfig, source: Path, label_frames: int) -> bool:
    """True when ``path`` is a complete container made from ``source`` with the same settings."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            attrs = handle.attrs
            return bool(
                attrs.get("complete", False)
                and abs(float(attrs["fps"]) - config.fps) < 1e-6
                and int(attrs["short_side"]) == config.short_side
                and int(attrs["jpeg_quality"]) == config.jpeg_quality
                and str(attrs["source"]) == str(source)
                and int(attrs["source_size"]) == source.stat().st_size
                and int(attrs["num_frames"]) == label_frames
            )
    except (OSError, KeyError):
        return False


def extract_video(video: str, video_file: Path, out_file: Path, label_frames: int, config: ExtractConfig) -> ExtractResult:
    """Decode one video into its container (atomically); never raises, the result says what happened."""
    try:
        if container_is_current(out_file, config=config, source=video_file, label_frames=label_frames):
            return ExtractResult(video, "skipped", label_frames=label_frames, decoded_frames=label_frames)
        images = decode_video_to_jpeg(video_file, config)
        frames, warning = reconcile(images, label_frames, tolerance=config.tolerance, video=video)
        attrs = {
            "short_side": config.short_side,
            "jpeg_quality": config.jpeg_quality,
            "source": str(video_file),
            "source_size": video_file.stat().st_size,
            "decoded_frames": len(images),
        }
        out_file.parent.mkdir(parents=True, exist_ok=True)
        write_frame_container(out_file, frames, config.fps, attrs=attrs)
        return ExtractResult(
            video, "done", decoded_frames=len(images), label_frames=label_frames, warnings=[warning] if warning else []
        )
    except EtesvsError as error:
        return ExtractResult(video, "failed", message=str(error), label_frames=label_frames)


def extract_frames(
    jobs: Sequence[tuple[str, Path, int]],
    frames_dir: str | Path,
    config: ExtractConfig,
    *,
    workers: int = 2,
    skip_bad_videos: bool = False,
    progress: bool = True,
    inputs: Sequence[str | Path] | None = None,
) -> list[ExtractResult]:
    """Decode every ``(video, video_file, label_frames)`` job into ``frames_dir`` with a process pool.

    ``frames_dir`` must be new, empty, or hold extract_frames' marker (see :func:`etesvs.io.claim_output_dir`);
    ``inputs`` (default: the video files) are the directories it must stay apart from. Finished containers of an
    interrupted run are kept and not decoded again; containers that this stage wrote for videos no longer listed
    are removed, and nothing else is. A bad video stops the run (after the videos being decoded are finished)
    with one line naming the file and ffmpeg's reason, unless ``skip_bad_videos`` is set, in which case it is
    reported in the results. A signal (Ctrl-C, SIGTERM, a killed ffmpeg or worker) stops the run as
    :class:`Interrupted`, never as a bad video. The workers die with this process, even when it is killed.
    """
    frames_dir = Path(frames_dir)
    output = claim_output_dir(
        frames_dir,
        owner="extract_frames",
        inputs=[video_file for _, video_file, _ in jobs] if inputs is None else inputs,
        adopt=is_frame_container,
    )
    names = [frames_path(".", video).name for video, _, _ in jobs]
    output.retain(names)
    out_files = output.expect(names)
    results = _decode_in_pool(jobs, out_files, config, workers=workers, skip_bad_videos=skip_bad_videos,
                              progress=progress)
    order = {video: i for i, (video, _, _) in enumerate(jobs)}
    return sorted(results, key=lambda r: order[r.video])


def _decode_in_pool(jobs: Sequence[tuple[str, Path, int]], out_files: Sequence[Path], config: ExtractConfig, *,
                    workers: int, skip_bad_videos: bool, progress: bool) -> list[ExtractResult]:
    """Run :func:`extract_video` for every job in a process pool (see :func:`extract_frames` for the rules)."""
    from tqdm import tqdm

    results: list[ExtractResult] = []
    bar = tqdm(total=len(jobs), desc="extract_frames", unit="video", disable=not progress)
    pool = ProcessPoolExecutor(max_workers=max(1, workers), initializer=_pool_worker_init, initargs=(os.getpid(),))
    try:
        futures = [
            pool.submit(extract_video, video, video_file, out_file, label_frames, config)
            for (video, video_file, label_frames), out_file in zip(jobs, out_files)
        ]
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool:
                message = "extract_frames: a worker process was killed (out of memory?)"
                raise Interrupted(message, signal.SIGKILL) from None
            results.append(result)
            bar.update(1)
            if result.status == "failed" and not skip_bad_videos:
                # Start no more videos but finish those being decoded: a rerun then redoes none of them.
                pool.shutdown(wait=True, cancel_futures=True)
                raise EtesvsError(result.message)
    except BaseException:
        _stop_pool(pool)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        bar.close()
    return results


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop at once: cancel what has not started and terminate the workers (their ffmpeg dies with them)."""
    # There is no public way to terminate the workers before Python 3.14's terminate_workers().
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)


def video_jobs(layout, label_counts: dict[str, int], *, skip_missing: bool,
               listed_in: str | Path = "") -> list[tuple[str, Path, int]]:
    """``(video, video_file, label_frames)`` for every labelled video.

    A missing video file stops here, before anything is decoded, with the layout's message (the extensions tried)
    and ``listed_in`` (where the name came from); with ``skip_missing`` it is left to decoding to report and skip.
    """
    jobs = []
    for video, count in label_counts.items():
        stem = layout.video_stem(video)  # a name that is not plain, or leads outside Videos/, stops here
        try:
            jobs.append((video, layout.video_file(video), count))
        except EtesvsError as error:
            if not skip_missing:
                raise EtesvsError(f"{error}; listed in {listed_in}" if listed_in else str(error)) from None
            jobs.append((video, path_inside(layout.videos_dir, stem), count))
    return jobs


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
