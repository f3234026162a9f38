"""Segmentation metrics of the MS-TCN protocol: frame accuracy, Edit score and F1@k.

All functions take per-frame class ids as 1-D integer arrays. Background classes are given as ids and are left
out of the segments (Edit, F1) but count as ordinary frames for the accuracy.

Conventions, chosen to reproduce the numbers of the MS-TCN evaluation script exactly:

- a segment is a maximal run of equal labels, ``[start, end)`` in frames. (The MS-TCN script ends a segment that
  reaches the last frame at ``T - 1`` instead of ``T``; that changes a score only when a non-background segment
  touches the end of the video, and none of the reference values in ``shared/data/README.md``; the consistent
  end is used here and in the localization metrics);
- Edit is ``100 * (1 - levenshtein / max(len(pred), len(gt)))`` over the segment label sequences, 100 when both
  are empty, and is averaged over videos;
- for F1@k each predicted segment, in temporal order, looks up the ground-truth segment of the same label with the
  highest IoU; it is a true positive if that IoU >= k and that segment is not matched yet, otherwise a false
  positive (as in MS-TCN it does not fall back to its second-best segment); unmatched ground-truth segments are
  false negatives. TP, FP and FN are summed over videos before precision, recall and F1 are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

DEFAULT_OVERLAPS = (0.10, 0.25, 0.50)


@dataclass(frozen=True)
class LabelRuns:
    """Segments of a label sequence.

    Attributes:
        labels: (S,) int64 class id of each segment.
        starts: (S,) int64 first frame.
        ends: (S,) int64 one past the last frame.
    """

    labels: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class SegmentationScores:
    """Aggregate segmentation scores, all in percent.

    Attributes:
        accuracy: frame accuracy pooled over all frames of all videos.
        edit: mean over videos of the per-video Edit score.
        f1: F1 per IoU overlap, e.g. ``{0.1: 64.3, 0.25: 61.8, 0.5: 51.7}``.
        num_videos: number of videos scored.
        num_frames: number of frames scored.
        edit_by_video: (V,) Edit of each video, in input order.
        f1_counts_by_video: (V, K, 3) TP, FP, FN of each video at each overlap.
    """

    accuracy: float
    edit: float
    f1: dict[float, float]
    num_videos: int
    num_frames: int
    edit_by_video: np.ndarray
    f1_counts_by_video: np.ndarray

    def as_dict(self) -> dict[str, float]:
        """Flat dict with the keys used in metrics files: acc, edit, f1_10, f1_25, f1_50 (percent)."""
        out = {"acc": self.accuracy, "edit": self.edit}
        for overlap, value in self.f1.items():
            out[f"f1_{round(overlap * 100):02d}"] = value
        return out


def _check_pair(prediction: np.ndarray, ground_truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction = np.asarray(prediction)
    ground_truth = np.asarray(ground_truth)
    if prediction.ndim != 1 or ground_truth.ndim != 1:
        raise ValueError(f"expected 1-D label arrays, got shapes {prediction.shape} and {ground_truth.shape}")
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"prediction has {len(prediction)} frames, ground truth {len(ground_truth)}")
    return prediction, ground_truth


def label_runs(labels: np.ndarray, background_ids: Iterable[int] = ()) -> LabelRuns:
    """Split a label sequence into segments, dropping background segments.

    Args:
        labels: (T,) int class id per frame.
        background_ids: class ids that form no segment.

    Returns:
        The non-background runs, in temporal order.
    """
    labels = np.asarray(labels)
    num_frames = len(labels)
    if num_frames == 0:
        empty = np.zeros(0, dtype=np.int64)
        return LabelRuns(empty, empty, empty)
    starts = np.flatnonzero(np.concatenate(([True], labels[1:] != labels[:-1])))
    ends = np.append(starts[1:], num_frames)
    run_labels = labels[starts].astype(np.int64)
    background = np.asarray(tuple(background_ids), dtype=np.int64)
    # (S, 1) == (1, B): cheaper than np.isin for the few background ids
    keep = ~np.any(run_labels[:, None] == background[None, :], axis=1)
    return LabelRuns(run_labels[keep], starts[keep].astype(np.int64), ends[keep].astype(np.int64))


def frame_accuracy(prediction: np.ndarray, ground_truth: np.ndarray) -> float:
    """Percentage of frames whose predicted class equals the ground truth.

    Args:
        prediction: (T,) int predicted class per frame.
        ground_truth: (T,) int true class per frame.
    """
    prediction, ground_truth = _check_pair(prediction, ground_truth)
    if len(ground_truth) == 0:
        return 0.0
    return 100.0 * float(np.count_nonzero(prediction == ground_truth)) / len(ground_truth)


def levenshtein(first: np.ndarray, second: np.ndarray) -> int:
    """Edit distance between two integer sequences (insertions, deletions, substitutions cost 1).

    The dynamic programme runs one row per element of the shorter sequence; each row is vectorised (the
    insertion chain within a row is a running minimum), so the cost is O(min(m, n)) numpy calls.

    Args:
        first: (M,) int sequence.
        second: (N,) int sequence.
    """
    first = np.asarray(first)
    second = np.asarray(second)
    if len(first) > len(second):
        first, second = second, first
    if len(first) == 0:
        return len(second)
    cost = (first[:, None] != second[None, :]).astype(np.int64)  # (M, N) substitution costs
    positions = np.arange(len(second) + 1)
    previous = positions.copy()  # row 0: distance from the empty prefix
    current = np.empty_like(previous)
    for row in range(1, len(first) + 1):
        current[0] = row
        np.minimum(previous[1:] + 1, previous[:-1] + cost[row - 1], out=current[1:])
        # current[j] = min over k <= j of current[k] + (j - k): the chain of insertions along the row.
        previous = np.minimum.accumulate(current - positions) + positions
    return int(previous[-1])


def edit_score(prediction: np.ndarray, ground_truth: np.ndarray, background_ids: Iterable[int] = ()) -> float:
    """Normalised Levenshtein score (percent) of the segment label sequences of one video.

    Args:
        prediction: (T,) int predicted class per frame.
        ground_truth: (T,) int true class per frame.
        background_ids: class ids left out of the segments.
    """
    prediction, ground_truth = _check_pair(prediction, ground_truth)
    background_ids = tuple(background_ids)
    return _edit_from_runs(label_runs(prediction, background_ids), label_runs(ground_truth, background_ids))


def _edit_from_runs(predicted: LabelRuns, true: LabelRuns) -> float:
    longest = max(len(predicted), len(true))
    if longest == 0:
        return 100.0
    return 100.0 * (1.0 - levenshtein(predicted.labels, true.labels) / longest)


def _segment_iou(predicted: LabelRuns, true: LabelRuns) -> np.ndarray:
    """(P, G) IoU between every predicted and true segment, 0 where the labels differ."""
    # (P, 1) against (1, G)
    intersection = np.minimum(predicted.ends[:, None], true.ends[None, :]) - np.maximum(
        predicted.starts[:, None], true.starts[None, :]
    )
    union = np.maximum(predicted.ends[:, None], true.ends[None, :]) - np.minimum(
        predicted.starts[:, None], true.starts[None, :]
    )
    iou = intersection / union  # segments are never empty, so union >= 1
    same_label = predicted.labels[:, None] == true.labels[None, :]
    return np.where(same_label, iou, 0.0)


def f1_counts(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    overlaps: Sequence[float] = DEFAULT_OVERLAPS,
    background_ids: Iterable[int] = (),
) -> np.ndarray:
    """True positives, false positives and false negatives of one video at each IoU overlap.

    Args:
        prediction: (T,) int predicted class per frame.
        ground_truth: (T,) int true class per frame.
        overlaps: K IoU thresholds.
        background_ids: class ids left out of the segments.

    Returns:
        (K, 3) int64 array, columns TP, FP, FN.
    """
    prediction, ground_truth = _check_pair(prediction, ground_truth)
    background_ids = tuple(background_ids)
    predicted, true = label_runs(prediction, background_ids), label_runs(ground_truth, background_ids)
    return _f1_counts_from_runs(predicted, true, overlaps)


def _f1_counts_from_runs(predicted: LabelRuns, true: LabelRuns, overlaps: Sequence[float]) -> np.ndarray:
    overlaps = np.asarray(overlaps, dtype=np.float64)
    counts = np.zeros((len(overlaps), 3), dtype=np.int64)
    if len(true) == 0:
        counts[:, 1] = len(predicted)
        return counts
    if len(predicted) == 0:
        counts[:, 2] = len(true)
        return counts
    iou = _segment_iou(predicted, true)  # (P, G)
    best = np.argmax(iou, axis=1)  # (P,)
    best_iou = iou[np.arange(len(predicted)), best]
    for k, overlap in enumerate(overlaps):
        passing = best_iou >= overlap
        # Predictions are visited in temporal order and the first one to claim a segment keeps it, so the number
        # of true positives is the number of distinct segments claimed by passing predictions.
        true_positives = len(np.unique(best[passing]))
        counts[k] = (true_positives, len(predicted) - true_positives, len(true) - true_positives)
    return counts


def f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """F1 (percent) from TP, FP, FN counts.

    Args:
        counts: (..., 3) TP, FP, FN.

    Returns:
        (...,) F1 in percent, 0 where there are no true positives.
    """
    counts = np.asarray(counts, dtype=np.float64)
    true_positives, false_positives, false_negatives = counts[..., 0], counts[..., 1], counts[..., 2]
    denominator = 2 * true_positives + false_positives + false_negatives
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(denominator > 0, 200.0 * true_positives / denominator, 0.0)
    return f1


def f1_score(
    prediction: np.ndarray,
    ground_truth: np.ndarray,
    overlap: float = 0.5,
    background_ids: Iterable[int] = (),
) -> float:
    """F1@overlap (percent) of one video.

    Args:
        prediction: (T,) int predicted class per frame.
        ground_truth: (T,) int true class per frame.
        overlap: IoU threshold.
        background_ids: class ids left out of the segments.
    """
    counts = f1_counts(prediction, ground_truth, (overlap,), background_ids)
    return float(f1_from_counts(counts[0]))


def segmentation_metrics(
    predictions: Sequence[np.ndarray],
    ground_truths: Sequence[np.ndarray],
    *,
    background_ids: Iterable[int] = (),
    overlaps: Sequence[float] = DEFAULT_OVERLAPS,
) -> SegmentationScores:
    """Accuracy, Edit and F1@overlaps over a set of videos.

    Args:
        predictions: V arrays (T_v,) int, predicted class per frame.
        ground_truths: V arrays (T_v,) int, true class per frame, same lengths as ``predictions``.
        background_ids: class ids left out of the segments.
        overlaps: IoU thresholds of the F1 scores.

    Returns:
        Scores in percent (accuracy pooled over frames, Edit averaged over videos, F1 from summed counts).
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions for {len(ground_truths)} ground truths")
    if len(ground_truths) == 0:
        raise ValueError("no videos to score")
    background_ids = tuple(background_ids)
    correct = 0
    num_frames = 0
    edits = np.zeros(len(ground_truths))
    counts = np.zeros((len(ground_truths), len(overlaps), 3), dtype=np.int64)
    for video, (prediction, ground_truth) in enumerate(zip(predictions, ground_truths)):
        prediction, ground_truth = _check_pair(prediction, ground_truth)
        correct += int(np.count_nonzero(prediction == ground_truth))
        num_frames += len(ground_truth)
        predicted, true = label_runs(prediction, background_ids), label_runs(ground_truth, background_ids)
        edits[video] = _edit_from_runs(predicted, true)
        counts[video] = _f1_counts_from_runs(predicted, true, overlaps)
    f1 = f1_from_counts(counts.sum(axis=0))
    return SegmentationScores(
        accuracy=100.0 * correct / num_frames if num_frames else 0.0,
        edit=float(edits.mean()),
        f1={float(overlap): float(value) for overlap, value in zip(overlaps, f1)},
        num_videos=len(ground_truths),
        num_frames=num_frames,
        edit_by_video=edits,
        f1_counts_by_video=counts,
    )
