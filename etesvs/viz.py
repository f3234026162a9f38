"""Pictures of segmentations: a ground-truth bar above a prediction bar, one colour per class.

Figures are drawn on matplotlib's Agg canvas directly (``FigureCanvasAgg``), without pyplot, so nothing depends
on a display, on the configured backend or on global pyplot state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter

from etesvs.io import atomic_path

BACKGROUND_COLOR = (0.88, 0.88, 0.88, 1.0)
MAX_LABELLED_TICKS = 12
MAX_MINOR_TICKS = 400


def class_colors(num_classes: int, background_ids: Iterable[int] = ()) -> np.ndarray:
    """A fixed colour per class id, so that a class has the same colour in every picture.

    Background classes are light grey; the others take the qualitative tab20, tab20b and tab20c palettes in turn
    (the strong shade of each tab20 pair first, so that the first ten classes differ in hue) and, beyond 60
    classes, evenly spaced hues.

    Returns:
        (C, 4) float RGBA in 0..1.
    """
    background = set(background_ids)
    foreground = [c for c in range(num_classes) if c not in background]
    tab20 = matplotlib.colormaps["tab20"](np.arange(20))
    palette = np.concatenate(
        [tab20[0::2], tab20[1::2]] + [matplotlib.colormaps[name](np.arange(20)) for name in ("tab20b", "tab20c")]
    )
    if len(foreground) > len(palette):
        palette = matplotlib.colormaps["hsv"](np.linspace(0.0, 1.0, len(foreground), endpoint=False))
    colors = np.tile(np.asarray(BACKGROUND_COLOR), (num_classes, 1))
    colors[foreground] = palette[: len(foreground)]
    return colors


def _window_ticks(duration: float, window_seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Major (labelled) and minor tick positions at multiples of the window length, in seconds."""
    boundaries = np.arange(0.0, duration + 1e-9, window_seconds)
    step = max(1, int(np.ceil(len(boundaries) / MAX_LABELLED_TICKS)))
    major = boundaries[::step]
    minor = boundaries if len(boundaries) <= MAX_MINOR_TICKS else np.zeros(0)
    return major, minor


def _time_axis(ax: Any, *, duration: float, window: int | None, fps: float) -> None:
    """Seconds on the x axis, with ticks at the sliding-window boundaries when ``window`` (frames) is given."""
    if window:
        major, minor = _window_ticks(duration, window / fps)
        ax.xaxis.set_major_locator(FixedLocator(major))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda seconds, _: f"{seconds:.2f}".rstrip("0").rstrip(".")))
        ax.xaxis.set_minor_locator(FixedLocator(minor))
    ax.set_xlim(0.0, duration)
    ax.set_xlabel("time (s)" + (f", ticks at {window}-frame window boundaries" if window else ""))


def plot_segments(
    ground_truth: np.ndarray,
    prediction: np.ndarray,
    *,
    class_names: Sequence[str],
    fps: float,
    window: int | None = None,
    title: str = "",
    background_ids: Iterable[int] = (),
) -> Figure:
    """Draw the ground truth above the prediction of one video.

    Args:
        ground_truth: (T,) int true class per frame.
        prediction: (T,) int predicted class per frame.
        class_names: C names, by class id.
        fps: frames per second of the label arrays, for the time axis.
        window: frames per sliding window; ticks are put at window boundaries (every few labelled when there are
            many windows). None or 0 leaves matplotlib's ticks.
        title: figure title.
        background_ids: classes drawn in light grey.

    Returns:
        A matplotlib Figure on an Agg canvas.
    """
    ground_truth = np.asarray(ground_truth)
    prediction = np.asarray(prediction)
    if ground_truth.shape != prediction.shape or ground_truth.ndim != 1:
        raise ValueError(f"expected two equal (T,) arrays, got {ground_truth.shape} and {prediction.shape}")
    num_classes = len(class_names)
    colors = class_colors(num_classes, background_ids)
    present = np.flatnonzero(np.bincount(np.concatenate([ground_truth, prediction]), minlength=num_classes))
    legend_columns = 4
    legend_rows = max(1, int(np.ceil(len(present) / legend_columns)))
    figure = Figure(figsize=(12, 2.4 + 0.22 * legend_rows), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(3, 1, height_ratios=(1.0, 1.0, 0.32 * legend_rows + 0.2))
    bars = [figure.add_subplot(grid[0])]
    bars.append(figure.add_subplot(grid[1], sharex=bars[0]))
    duration = len(ground_truth) / fps
    for ax, labels, name in zip(bars, (ground_truth, prediction), ("ground truth", "prediction")):
        ax.imshow(
            labels[None, :],  # (T,) -> (1, T): one row of pixels, stretched into a bar
            aspect="auto",
            cmap=ListedColormap(colors),
            vmin=-0.5,
            vmax=num_classes - 0.5,
            interpolation="nearest",
            extent=(0.0, duration, 0.0, 1.0),
        )
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    bars[0].tick_params(labelbottom=False)
    _time_axis(bars[1], duration=duration, window=window, fps=fps)
    legend_axes = figure.add_subplot(grid[2])
    legend_axes.axis("off")
    handles = [Patch(facecolor=colors[c], label=class_names[c]) for c in present]
    legend_axes.legend(handles=handles, loc="upper center", ncol=legend_columns, fontsize="small", frameon=False)
    figure.suptitle(title)
    return figure


def save_segments_figure(path: str | Path, ground_truth: np.ndarray, prediction: np.ndarray, **kwargs) -> None:
    """Draw :func:`plot_segments` and write it as PNG to ``path`` atomically (keywords as for plot_segments)."""
    figure = plot_segments(ground_truth, prediction, **kwargs)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
