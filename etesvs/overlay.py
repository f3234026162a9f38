"""The streaming model's labels drawn onto the video it labels (``python -m etesvs.stream VIDEO --overlay OUT.mp4``).

Every frame gets the current label and its confidence in the top-left corner and, along the bottom, a timeline of
the labels of the last seconds in the classes' colours (the same colours as the project's pictures). Frames are
encoded to H.264 by ffmpeg as they come, so memory does not grow with the video.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np

from etesvs.data.frames import check_ffmpeg_exit, ffmpeg_exe
from etesvs.io import atomic_path, ffmpeg_file_output

TIMELINE_SECONDS = 30.0
"""How much of the past the timeline along the bottom of the picture shows."""


class OverlayWriter:
    """Write RGB frames with labels drawn on them to ``path`` (MP4, H.264), atomically; use as a context manager.

    Args:
        path: the video to write (replaced only when the whole video is written).
        width, height: frame size in pixels (even numbers).
        fps: frame rate of the frames given to :meth:`write`.
        classes: class names by id.
        colors: (C, 3) uint8 RGB colour of each class.
    """

    def __init__(self, path: str | Path, *, width: int, height: int, fps: float, classes: Sequence[str],
                 colors: np.ndarray) -> None:
        from PIL import ImageFont

        self.path, self.width, self.height, self.fps = Path(path), width, height, fps
        self.classes, self.colors = list(classes), np.asarray(colors, dtype=np.uint8)
        self.history: deque[int] = deque(maxlen=max(1, round(TIMELINE_SECONDS * fps)))
        self.strip = max(6, height // 30)  # timeline height in pixels
        self.font = ImageFont.load_default(size=max(12, height // 22))
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "OverlayWriter":
        tmp = self._stack.enter_context(atomic_path(self.path))  # renamed onto path only if everything succeeds
        command = [
            ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}", "-r", f"{self.fps:g}",
            "-i", "pipe:0", "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
            "-f", "mp4", ffmpeg_file_output(tmp),
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        self.errors: deque[bytes] = deque(maxlen=64)
        self.drain = threading.Thread(target=lambda: self.errors.extend(self.process.stderr), daemon=True)
        self.drain.start()
        return self

    def write(self, frames: np.ndarray, labels: np.ndarray, confidence: np.ndarray) -> None:
        """Draw and encode ``frames`` (n, H, W, 3) uint8 with their ``labels`` (n,) and ``confidence`` (n,)."""
        for frame, label, score in zip(frames, labels, confidence):
            self.history.append(int(label))
            self.process.stdin.write(self.draw(frame, int(label), float(score)).tobytes())

    def draw(self, frame: np.ndarray, label: int, score: float) -> np.ndarray:
        """One frame with the label box and the timeline: (H, W, 3) uint8 -> (H, W, 3) uint8."""
        from PIL import Image, ImageDraw

        picture = frame.copy()
        # The timeline: the last TIMELINE_SECONDS of labels, oldest on the left, squeezed into the frame's width.
        past = np.fromiter(self.history, dtype=np.int64)
        cells = past[np.linspace(0, len(past) - 1, self.width).round().astype(np.int64)]  # (W,)
        picture[-self.strip:] = self.colors[cells][None, :, :]
        image = Image.fromarray(picture)
        draw = ImageDraw.Draw(image)
        text = f"{self.classes[label]}  {score:.2f}"
        box = draw.textbbox((8, 6), text, font=self.font)
        draw.rectangle((box[0] - 4, box[1] - 3, box[2] + 4, box[3] + 3), fill=tuple(int(c) for c in self.colors[label]))
        draw.text((8, 6), text, font=self.font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        return np.asarray(image)

    def __exit__(self, kind, error, trace) -> bool:
        if error is not None:
            self.process.kill()
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        code = self.process.wait()
        self.drain.join()
        try:
            if error is None:
                check_ffmpeg_exit(code, list(self.errors), source=str(self.path))
        except BaseException:
            if not self._stack.__exit__(*sys.exc_info()):  # removes the partial video
                raise
        return self._stack.__exit__(kind, error, trace)
