"""Burr suppression: the streaming model's label runs too short to be actions, removed without added latency.

A causal model decides each frame without the frames after it, so at a transition its argmax often hops between
the two actions for a few frames ("burrs"; ETSN's Local Burr Suppression, which the ETESVS authors' code offers as
a post-processing with a burr of 7 frames, removes them from a whole video). A stream labels a whole window at
once, after reading it, so inside the window it has just read it already knows where a run ends: a run of at most
``burr_frames`` frames that ends before the window's end takes the label before it. A run that reaches the
window's end may go on in the next window and is kept; labels already emitted are never changed. The stream
(:mod:`etesvs.stream`) and the evaluation (stage ``evaluate``) apply the same function window by window, so the
evaluated labels are the labels the stream emits, with no frame of delay.
"""

from __future__ import annotations

import numpy as np

from etesvs.errors import EtesvsError


def check_burr_frames(burr_frames: object, *, where: str) -> int:
    """``burr_frames`` as an int >= 0, or a one-line error naming ``where``."""
    if isinstance(burr_frames, bool) or not isinstance(burr_frames, int) or burr_frames < 0:
        raise EtesvsError(f"{where}: burr_frames must be an integer >= 0 (0: off), got {burr_frames!r}")
    return burr_frames


def suppress_burrs(labels: np.ndarray, burr_frames: int, previous: int | None = None) -> np.ndarray:
    """The labels of one window with its burrs removed (a new array).

    Args:
        labels: (n,) class ids of the window's frames, at the full frame rate.
        burr_frames: runs of at most this many frames that end inside the window take the label before them;
            0 returns the labels unchanged.
        previous: the label emitted for the frame before the window; None at the start of a video (its first run
            has no label before it and is kept).
    """
    out = np.array(labels, copy=True)
    if burr_frames <= 0 or len(out) == 0:
        return out
    starts = np.concatenate([[0], np.flatnonzero(out[1:] != out[:-1]) + 1])
    ends = np.append(starts[1:], len(out))
    last = previous
    for start, end in zip(starts.tolist(), ends.tolist()):
        if end < len(out) and end - start <= burr_frames and last is not None:
            out[start:end] = last
        last = out[end - 1]
    return out


def suppress_burrs_by_window(labels: np.ndarray, window: int, burr_frames: int) -> np.ndarray:
    """A whole video's labels as the stream emits them: :func:`suppress_burrs` on each ``window`` frames in turn,
    each window continuing from the label emitted before it."""
    if window < 1:
        raise ValueError(f"window must be positive, got {window}")
    labels = np.asarray(labels)
    out = np.empty_like(labels)
    for start in range(0, len(labels), window):
        previous = int(out[start - 1]) if start else None
        out[start:start + window] = suppress_burrs(labels[start:start + window], burr_frames, previous)
    return out
