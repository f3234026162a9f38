"""Exact values of the segmentation, localization and classification metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from etesvs.metrics import (
    Segments,
    average_precision,
    average_recall,
    concatenate_segments,
    confusion_matrix,
    edit_score,
    f1_counts,
    f1_score,
    frame_accuracy,
    levenshtein,
    localization_metrics,
    per_class_scores,
    segmentation_metrics,
    segments_from_labels,
    segments_from_probabilities,
)
from etesvs.metrics.localization import area_under_curve

SHARED = Path(__file__).resolve().parents[2] / "shared"
EDTCN = SHARED / "data" / "edtcn"


def runs(*pieces: tuple[int, int]) -> np.ndarray:
    """Labels from (class, length) pieces: runs((1, 3), (0, 2)) -> [1, 1, 1, 0, 0]."""
    return np.concatenate([np.full(length, label, dtype=np.int64) for label, length in pieces])


def make_segments(rows: list[tuple[int, int, int, int, float]]) -> Segments:
    """Segments from (video, label, start, end, score) rows."""
    columns = list(zip(*rows)) if rows else [[], [], [], [], []]
    ints = [np.asarray(column, dtype=np.int64) for column in columns[:4]]
    return Segments(*ints, np.asarray(columns[4], dtype=np.float64))


# ------------------------------------------------------------------------------------ segmentation: reference


def _read_edtcn(dataset: str, splits: list[int]) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    root = EDTCN / dataset
    names = [line.split()[1] for line in (root / "mapping.txt").read_text().splitlines() if line.strip()]
    index = {name: i for i, name in enumerate(names)}
    videos = [
        line.strip()
        for split in splits
        for line in (root / "splits" / f"test.split{split}.bundle").read_text().splitlines()
        if line.strip()
    ]

    def load(path: Path) -> np.ndarray:
        return np.array([index[name] for name in path.read_text().split()], dtype=np.int64)

    truths = [load(root / "groundTruth" / video) for video in videos]
    predictions = [load(root / "prediction" / video) for video in videos]
    return predictions, truths, index["background"]


@pytest.mark.skipif(not EDTCN.is_dir(), reason=f"reference data {EDTCN} is absent")
@pytest.mark.parametrize(
    ("dataset", "splits", "videos", "expected"),
    [
        ("50salads_mid", [1], 10, (74.7166, 52.7176, 64.2857, 61.7647, 51.6807)),
        ("50salads_mid", [1, 2, 3, 4, 5], 50, (64.4291, 49.5182, 56.6387, 52.7731, 41.7647)),
        ("gtea", [1], 7, (62.5810, 67.3385, 68.4783, 61.4130, 44.5652)),
        ("gtea", [1, 2, 3], 21, (63.2526, 67.3814, 66.4298, 58.9698, 45.6483)),
    ],
)
def test_segmentation_metrics_reproduce_published_reference(dataset, splits, videos, expected):
    predictions, truths, background = _read_edtcn(dataset, splits)
    scores = segmentation_metrics(predictions, truths, background_ids=[background])
    assert scores.num_videos == videos
    values = scores.as_dict()
    got = tuple(values[key] for key in ("acc", "edit", "f1_10", "f1_25", "f1_50"))
    np.testing.assert_allclose(got, expected, atol=1e-4)


# ------------------------------------------------------------------------------------ segmentation: hand cases


def _naive_levenshtein(first, second) -> int:
    table = np.zeros((len(first) + 1, len(second) + 1), dtype=int)
    table[:, 0] = np.arange(len(first) + 1)
    table[0, :] = np.arange(len(second) + 1)
    for i in range(1, len(first) + 1):
        for j in range(1, len(second) + 1):
            table[i, j] = min(
                table[i - 1, j] + 1, table[i, j - 1] + 1, table[i - 1, j - 1] + (first[i - 1] != second[j - 1])
            )
    return int(table[-1, -1])


def test_levenshtein_known_and_random_cases():
    kitten, sitting = [ord(c) for c in "kitten"], [ord(c) for c in "sitting"]
    assert levenshtein(np.array(kitten), np.array(sitting)) == 3
    assert levenshtein(np.array([], dtype=int), np.array([1, 2, 3])) == 3
    assert levenshtein(np.array([4, 5]), np.array([], dtype=int)) == 2
    rng = np.random.default_rng(0)
    for _ in range(50):
        first = rng.integers(0, 4, size=rng.integers(0, 12))
        second = rng.integers(0, 4, size=rng.integers(0, 12))
        assert levenshtein(first, second) == _naive_levenshtein(first, second)
        assert levenshtein(second, first) == _naive_levenshtein(first, second)


def test_edit_score_ignores_background_and_scores_empty_as_perfect():
    truth = runs((0, 3), (1, 4), (0, 2), (2, 5), (0, 1))
    prediction = runs((1, 5), (0, 1), (3, 2), (2, 7))  # segments [1, 3, 2] vs [1, 2]: one insertion
    assert edit_score(prediction, truth, background_ids=[0]) == pytest.approx(100 * (1 - 1 / 3))
    assert edit_score(truth, truth, background_ids=[0]) == 100.0
    background_only = np.zeros(5, dtype=np.int64)
    assert edit_score(background_only, background_only, background_ids=[0]) == 100.0
    # without background ids, background is a class like the others: [0,1,0,2,0] vs [1,0,3,2] needs 3 edits
    assert edit_score(prediction, truth) == pytest.approx(100 * (1 - 3 / 5))


def test_frame_accuracy_counts_background_frames():
    truth = runs((0, 5), (1, 5))
    prediction = runs((1, 2), (0, 3), (1, 5))
    assert frame_accuracy(prediction, truth) == 80.0


def test_f1_half_overlap_passes_at_50_and_shorter_fails():
    truth = runs((1, 10), (0, 10))
    half = runs((1, 5), (0, 15))  # IoU 5/10 = 0.5
    np.testing.assert_array_equal(f1_counts(half, truth, (0.1, 0.25, 0.5), [0]), [[1, 0, 0]] * 3)
    shorter = runs((1, 4), (0, 16))  # IoU 0.4
    np.testing.assert_array_equal(f1_counts(shorter, truth, (0.1, 0.25, 0.5), [0]), [[1, 0, 0], [1, 0, 0], [0, 1, 1]])
    assert f1_score(shorter, truth, 0.5, [0]) == 0.0
    assert f1_score(truth, truth, 0.5, [0]) == 100.0


def test_f1_wrong_label_is_false_positive_and_false_negative():
    truth = runs((1, 10))
    prediction = runs((2, 10))
    np.testing.assert_array_equal(f1_counts(prediction, truth, (0.1,)), [[0, 1, 1]])


def test_f1_match_to_already_matched_segment_is_false_positive():
    # Ground truth 1:[0,10) and 1:[12,14). Predictions 1:[0,5) (IoU 0.5 with the first) and 1:[6,14), whose best
    # segment is the first (IoU 4/14 > 2/8) which is already taken: MS-TCN counts it as a false positive rather
    # than falling back to the second segment.
    truth = runs((1, 10), (0, 2), (1, 2), (0, 6))
    prediction = runs((1, 5), (0, 1), (1, 8), (0, 6))
    np.testing.assert_array_equal(f1_counts(prediction, truth, (0.1,), [0]), [[1, 1, 1]])
    assert f1_score(prediction, truth, 0.1, [0]) == pytest.approx(50.0)


def test_segmentation_metrics_pool_frames_and_sum_counts():
    truths = [runs((1, 10)), runs((1, 10), (2, 10), (3, 10), (4, 70))]
    predictions = [runs((2, 10)), truths[1].copy()]
    scores = segmentation_metrics(predictions, truths, background_ids=[0])
    assert scores.accuracy == pytest.approx(100 * 100 / 110)  # pooled, not the mean of 0 and 100
    assert scores.edit == pytest.approx(50.0)  # mean of 0 and 100
    # counts summed: TP 4, FP 1, FN 1 -> F1 = 8 / 10 (the mean of the per-video F1 would be 50)
    assert scores.f1 == pytest.approx({0.1: 80.0, 0.25: 80.0, 0.5: 80.0})
    assert set(scores.as_dict()) == {"acc", "edit", "f1_10", "f1_25", "f1_50"}
    np.testing.assert_array_equal(scores.f1_counts_by_video[:, 2], [[0, 1, 1], [4, 0, 0]])


def test_segmentation_metrics_reject_length_mismatch():
    with pytest.raises(ValueError, match="frames"):
        segmentation_metrics([np.zeros(3, dtype=int)], [np.zeros(4, dtype=int)])


# ------------------------------------------------------------------------------------ localization


def test_segments_from_probabilities_scores_mean_class_probability():
    probabilities = np.array(
        [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.0, 0.2, 0.8], [0.0, 0.4, 0.6]], dtype=np.float32
    )
    segments = segments_from_probabilities(probabilities, background_ids=[0], video=3)
    np.testing.assert_array_equal(segments.labels, [1, 2])
    np.testing.assert_array_equal(segments.starts, [1, 3])
    np.testing.assert_array_equal(segments.ends, [3, 5])
    np.testing.assert_array_equal(segments.videos, [3, 3])
    np.testing.assert_allclose(segments.scores, [0.6, 0.7], rtol=1e-6)


def test_perfect_prediction_gives_map_100_and_known_recall():
    truth = runs((0, 10), (1, 10), (0, 5), (2, 10))
    probabilities = np.eye(3)[truth] * 0.9 + 0.1 / 3
    probabilities[10:20, 1] -= 0.05  # class 1 scores lower than class 2, so ranks second in the video
    probabilities[10:20, 0] += 0.05
    scores = localization_metrics(
        segments_from_probabilities(probabilities, [0]), segments_from_labels(truth, [0])
    )
    assert scores.map_by_tiou == pytest.approx({t: 100.0 for t in scores.map_by_tiou})
    assert scores.average_map == 100.0
    # AR@1 = 1 of 2 segments, AR@AN>=2 = 100; AUC = 100 * (0.75 + 98) / 100
    assert scores.average_recall[0] == pytest.approx(50.0)
    np.testing.assert_allclose(scores.average_recall[1:], 100.0)
    assert scores.auc == pytest.approx(98.75)
    assert scores.as_dict()["ar_1"] == pytest.approx(50.0)


def test_half_overlap_counts_at_050_only():
    truth = make_segments([(0, 1, 0, 10, 1.0), (0, 2, 20, 30, 1.0)])
    predicted = make_segments([(0, 1, 0, 5, 0.9), (0, 2, 20, 30, 0.8)])  # class 1 at tIoU 0.5, class 2 perfect
    scores = localization_metrics(predicted, truth)
    assert scores.map_by_tiou[0.5] == pytest.approx(100.0)
    assert scores.map_by_tiou[0.55] == pytest.approx(50.0)
    assert scores.average_map == pytest.approx((100 + 9 * 50) / 10)
    np.testing.assert_array_equal(scores.classes, [1, 2])
    np.testing.assert_allclose(scores.ap_by_class[0], [100.0] + [0.0] * 9)


def test_average_precision_uses_interpolated_precision():
    # Class 1, two videos: ranked TP (0.9), FP (0.8), TP (0.7): precision 1, 1/2, 2/3 -> AP = (1 + 2/3) / 2.
    truth = make_segments([(0, 1, 0, 10, 1.0), (1, 1, 0, 10, 1.0)])
    predicted = make_segments([(0, 1, 0, 10, 0.9), (0, 1, 20, 30, 0.8), (1, 1, 0, 10, 0.7)])
    classes, ap = average_precision(predicted, truth, tiou_thresholds=(0.5,))
    np.testing.assert_array_equal(classes, [1])
    assert ap[0, 0] == pytest.approx(100 * (1 + 2 / 3) / 2)
    # with the false positive ranked first, interpolation cannot help: precision 1/2 and 2/3
    predicted = make_segments([(0, 1, 0, 10, 0.5), (0, 1, 20, 30, 0.8), (1, 1, 0, 10, 0.7)])
    _, ap = average_precision(predicted, truth, tiou_thresholds=(0.5,))
    assert ap[0, 0] == pytest.approx(100 * (2 / 3 + 2 / 3) / 2)


def test_tie_at_threshold_goes_to_the_higher_score():
    # Both halves reach tIoU 0.5 with the one segment; only the better-scored one is a true positive.
    truth = make_segments([(0, 1, 0, 10, 1.0), (0, 1, 20, 40, 1.0)])
    predicted = make_segments([(0, 1, 0, 5, 0.6), (0, 1, 5, 10, 0.9)])
    _, ap = average_precision(predicted, truth, tiou_thresholds=(0.5,))
    assert ap[0, 0] == pytest.approx(100 * 0.5 * 1.0)  # recall 1/2 at precision 1


def test_predictions_of_classes_without_ground_truth_are_ignored():
    truth = make_segments([(0, 1, 0, 10, 1.0)])
    predicted = make_segments([(0, 1, 0, 10, 0.5), (0, 3, 10, 20, 0.99)])
    scores = localization_metrics(predicted, truth)
    assert scores.average_map == pytest.approx(100.0)


def test_proposals_are_class_agnostic_and_ranked_by_score():
    truth = make_segments([(0, 1, 0, 10, 1.0), (0, 2, 10, 20, 1.0), (1, 1, 0, 10, 1.0)])
    # video 0: the wrong-class proposal on [10,20) has the best score, then a proposal on [0,10)
    proposals = make_segments([(0, 1, 0, 10, 0.5), (0, 3, 10, 20, 0.9), (0, 1, 30, 40, 0.7), (1, 2, 0, 10, 0.1)])
    numbers, recall = average_recall(proposals, truth, max_proposals=5)
    np.testing.assert_array_equal(numbers, [1, 2, 3, 4, 5])
    # AN=1: [10,20) of video 0 and video 1's only proposal -> 2/3; AN=2: still 2/3; AN>=3: 3/3
    np.testing.assert_allclose(recall, [200 / 3, 200 / 3, 100, 100, 100])
    assert area_under_curve(numbers, recall) == pytest.approx(100 * (2 / 3 + 5 / 6 + 1 + 1) / 5)


def test_no_ground_truth_gives_nan():
    scores = localization_metrics(make_segments([(0, 1, 0, 4, 0.5)]), make_segments([]))
    assert np.isnan(scores.average_map) and np.isnan(scores.auc)


def _naive_average_precision(predicted: Segments, truth: Segments, threshold: float) -> dict[int, float]:
    """ActivityNet detection AP written as plain loops, to cross-check the vectorised version."""
    result = {}
    for label in np.unique(truth.labels):
        mine = [i for i in range(len(predicted)) if predicted.labels[i] == label]
        mine.sort(key=lambda i: (-predicted.scores[i], predicted.videos[i], predicted.starts[i]))
        true_indices = [j for j in range(len(truth)) if truth.labels[j] == label]
        used = set()
        hits = []
        for i in mine:
            candidates = []
            for j in true_indices:
                if truth.videos[j] != predicted.videos[i]:
                    continue
                inter = min(predicted.ends[i], truth.ends[j]) - max(predicted.starts[i], truth.starts[j])
                union = (predicted.ends[i] - predicted.starts[i]) + (truth.ends[j] - truth.starts[j]) - max(inter, 0)
                candidates.append((max(inter, 0) / union, j))
            candidates.sort(key=lambda pair: -pair[0])
            hit = False
            for tiou, j in candidates:
                if tiou < threshold:
                    break
                if j not in used:
                    used.add(j)
                    hit = True
                    break
            hits.append(hit)
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1) if hits else np.zeros(0)
        ap = 0.0
        for k, hit in enumerate(hits):
            if hit:
                ap += precision[k:].max() / len(true_indices)
        result[int(label)] = 100 * ap
    return result


def test_average_precision_matches_plain_loops_on_random_videos():
    rng = np.random.default_rng(1)
    truth_parts, predicted_parts = [], []
    for video in range(6):
        truth = rng.integers(0, 4, size=60).repeat(rng.integers(1, 6, size=60))[:120]
        noisy = truth.copy()
        noisy[rng.random(len(noisy)) < 0.1] = rng.integers(0, 4)
        probabilities = np.eye(4)[noisy] + rng.random((len(noisy), 4)) * 0.3
        truth_parts.append(segments_from_labels(truth, [0], video=video))
        predicted_parts.append(segments_from_probabilities(probabilities, [0], video=video))
    truth, predicted = concatenate_segments(truth_parts), concatenate_segments(predicted_parts)
    thresholds = (0.3, 0.5, 0.7)
    classes, ap = average_precision(predicted, truth, tiou_thresholds=thresholds)
    for k, threshold in enumerate(thresholds):
        expected = _naive_average_precision(predicted, truth, threshold)
        np.testing.assert_allclose(ap[:, k], [expected[int(c)] for c in classes], atol=1e-9)


# ------------------------------------------------------------------------------------ classification


def test_confusion_matrix_and_per_class_scores():
    truth = np.array([0, 0, 0, 1, 1, 2])
    prediction = np.array([0, 1, 0, 1, 1, 1])
    confusion = confusion_matrix(prediction, truth, num_classes=4)
    np.testing.assert_array_equal(confusion, [[2, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    scores = per_class_scores(confusion)
    np.testing.assert_allclose(scores.precision, [100, 50, 0, 0])
    np.testing.assert_allclose(scores.recall, [100 * 2 / 3, 100, 0, 0])
    np.testing.assert_allclose(scores.f1, [80, 100 * 2 / 3, 0, 0])
    np.testing.assert_array_equal(scores.support, [3, 2, 1, 0])


def test_confusion_matrix_rejects_ids_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), num_classes=3)
