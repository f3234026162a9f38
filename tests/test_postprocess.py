"""Burr suppression (etesvs.postprocess): short runs inside a window read go, nothing emitted is changed."""

from __future__ import annotations

import numpy as np
import pytest

from etesvs.errors import EtesvsError
from etesvs.postprocess import check_burr_frames, suppress_burrs, suppress_burrs_by_window


def runs(*pieces: tuple[int, int]) -> np.ndarray:
    """Labels from (label, length) pairs."""
    return np.concatenate([np.full(length, label, dtype=np.int64) for label, length in pieces])


def test_a_short_run_that_ends_inside_the_window_takes_the_label_before_it():
    labels = runs((1, 6), (2, 2), (1, 6), (3, 3), (4, 5))
    np.testing.assert_array_equal(suppress_burrs(labels, 3), runs((1, 17), (4, 5)))
    np.testing.assert_array_equal(suppress_burrs(labels, 2), runs((1, 14), (3, 3), (4, 5)))
    np.testing.assert_array_equal(suppress_burrs(labels, 0), labels)
    assert suppress_burrs(labels, 3) is not labels and labels[6] == 2, "a new array, the input untouched"


def test_consecutive_burrs_all_take_the_label_before_them():
    labels = runs((1, 5), (2, 1), (3, 2), (2, 1), (4, 6))
    np.testing.assert_array_equal(suppress_burrs(labels, 2), runs((1, 9), (4, 6)))


def test_runs_at_the_edges_are_kept_unless_their_label_before_is_known():
    # the last run may go on in the next window; the first run of a video has no label before it
    labels = runs((2, 2), (1, 8), (3, 2))
    np.testing.assert_array_equal(suppress_burrs(labels, 3), labels)
    # in a later window the first run takes the label emitted before the window
    np.testing.assert_array_equal(suppress_burrs(labels, 3, previous=1), runs((1, 10), (3, 2)))
    np.testing.assert_array_equal(suppress_burrs(np.array([], dtype=np.int64), 3, previous=1), [])


def test_a_video_window_by_window_as_a_stream_emits_it():
    labels = runs((1, 7), (2, 2), (1, 5), (3, 2), (2, 8), (5, 1), (2, 3), (4, 4))
    window = 8  # windows [0, 8) [8, 16) [16, 24) [24, 32)
    out = suppress_burrs_by_window(labels, window, 2)
    expected = labels.copy()
    # frames 7-8 (the 2) straddle a window boundary: frame 7 reached its window's end and was emitted, frame 8
    # continues it; frames 14-15 (the 3) reach their window's end and are kept; frame 24 (the 5) ends inside
    # its window and takes the label emitted before it
    expected[24] = 2
    np.testing.assert_array_equal(out, expected)
    by_hand, previous = [], None
    for start in range(0, len(labels), window):
        by_hand.append(suppress_burrs(labels[start:start + window], 2, previous))
        previous = int(by_hand[-1][-1])
    np.testing.assert_array_equal(out, np.concatenate(by_hand))
    # a window that reads the whole video removes every inner burr
    np.testing.assert_array_equal(suppress_burrs_by_window(labels, len(labels), 2),
                                  runs((1, 16), (2, 12), (4, 4)))
    with pytest.raises(ValueError, match="window must be positive"):
        suppress_burrs_by_window(labels, 0, 2)


@pytest.mark.parametrize("value", [-1, 1.5, "7", None, True])
def test_bad_burr_values_are_one_line_errors(value):
    with pytest.raises(EtesvsError, match=r"^params.yaml: streaming.postprocess: burr_frames must be an integer"):
        check_burr_frames(value, where="params.yaml: streaming.postprocess")
    assert check_burr_frames(0, where="x") == 0 and check_burr_frames(7, where="x") == 7
