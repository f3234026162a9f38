"""Segmentation pictures: bars, colours, legend, window ticks and the written PNG."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.image import imread

from etesvs.viz import BACKGROUND_COLOR, class_colors, plot_segments, save_segments_figure

CLASS_NAMES = ["background", "cut", "pour", "stir", "wipe"]


def test_class_colors_are_distinct_and_background_is_grey():
    colors = class_colors(5, background_ids=[0])
    assert colors.shape == (5, 4)
    np.testing.assert_allclose(colors[0], BACKGROUND_COLOR)
    assert len({tuple(row) for row in colors}) == 5
    many = class_colors(70)
    assert len({tuple(np.round(row, 6)) for row in many}) == 70


def test_class_colour_depends_on_its_id_only():
    # the same class keeps its colour in every picture and dataset size (up to 60 classes)
    np.testing.assert_allclose(class_colors(5, [0])[1:], class_colors(48, [0])[1:5])
    assert not np.allclose(class_colors(5, [0])[1], BACKGROUND_COLOR)


def test_plot_segments_draws_two_bars_legend_and_window_ticks():
    truth = np.repeat([0, 1, 0, 2], [30, 60, 15, 45])  # 150 frames, 10 s at 15 fps
    prediction = np.repeat([0, 1, 3, 2], [25, 70, 10, 45])
    figure = plot_segments(
        truth,
        prediction,
        class_names=CLASS_NAMES,
        fps=15.0,
        window=30,
        title="video_a  F1@50 = 66.7",
        background_ids=[0],
    )
    bars = [ax for ax in figure.axes if ax.images]
    assert len(bars) == 2
    assert [ax.get_ylabel() for ax in bars] == ["ground truth", "prediction"]
    np.testing.assert_array_equal(bars[0].images[0].get_array()[0], truth)
    np.testing.assert_array_equal(bars[1].images[0].get_array()[0], prediction)
    assert bars[1].get_xlim() == (0.0, 10.0)
    np.testing.assert_allclose(bars[1].get_xticks(), [0, 2, 4, 6, 8, 10])  # 30-frame windows at 15 fps
    legends = [ax.get_legend() for ax in figure.axes if ax.get_legend() is not None]
    assert [text.get_text() for text in legends[0].get_texts()] == ["background", "cut", "pour", "stir"]
    assert figure._suptitle.get_text() == "video_a  F1@50 = 66.7"


def test_many_windows_label_only_some_ticks():
    truth = np.zeros(10000, dtype=np.int64)
    figure = plot_segments(truth, truth, class_names=CLASS_NAMES, fps=15.0, window=16)
    bars = [ax for ax in figure.axes if ax.images]
    major = bars[1].get_xticks()
    assert len(major) <= 13
    windows = major / (16 / 15)
    np.testing.assert_allclose(windows, np.round(windows), atol=1e-9)  # still on window boundaries
    assert len(bars[1].get_xticks(minor=True)) == 0  # 625 boundaries: too many to mark


def test_save_segments_figure_writes_png(tmp_path):
    truth = np.repeat([0, 1, 2], [20, 20, 20])
    path = tmp_path / "segments" / "video_a.png"
    save_segments_figure(path, truth, truth[::-1].copy(), class_names=CLASS_NAMES, fps=10.0, window=8, title="t")
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 600
    assert sorted(p.name for p in path.parent.iterdir()) == ["video_a.png"]  # no temporary file left


def test_plot_segments_rejects_length_mismatch():
    with pytest.raises(ValueError, match="equal"):
        plot_segments(np.zeros(5, dtype=int), np.zeros(6, dtype=int), class_names=CLASS_NAMES, fps=1.0)
