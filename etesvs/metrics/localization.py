"""Action localization metrics of the ActivityNet protocol, on segments made from per-frame predictions.

- Segments: the contiguous runs of the per-frame argmax of the class probabilities, background classes left out;
  each is scored by the mean probability of its class over its frames. Ground-truth segments are the runs of the
  labels, background left out. A segment is ``[start, end)`` in frames; tIoU is invariant to the time unit.
- Detection: per class, predictions over all videos are ranked by score; each takes the unmatched ground-truth
  segment of its video and class with the highest tIoU, if that tIoU reaches the threshold (true positive),
  else it is a false positive. AP is the area under the interpolated precision-recall curve (precision made
  monotone from the right), as in ActivityNet's ``compute_average_precision_detection``. mAP is the mean AP over
  the classes that have at least one ground-truth segment; predictions of other classes are ignored. Average mAP
  is the mean mAP over tIoU 0.50:0.05:0.95.
- Proposals: every predicted segment of a video, whatever its class, ranked by score within the video. AR@AN is
  the recall of ground-truth segments (any class) by the AN best proposals of each video, averaged over tIoU
  0.50:0.05:0.95, for AN = 1..100 proposals per video; a ground-truth segment counts as recalled if any of those
  proposals reaches the tIoU (one proposal may recall several). AUC is ``100 * trapz(AR, AN) / AN_max`` as in
  ActivityNet, so its maximum is 99 for AN = 1..100.

Scores are in percent. Ties in score are broken by video order, then time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

TIOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())


@dataclass(frozen=True)
class Segments:
    """Temporal segments of many videos as flat arrays, all (N,).

    Attributes:
        videos: int64 index of the video each segment belongs to.
        labels: int64 class id.
        starts: int64 first frame.
        ends: int64 one past the last frame.
        scores: float64 confidence (1 for ground truth).
    """

    videos: np.ndarray
    labels: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class LocalizationScores:
    """Localization scores in percent (NaN when there is no ground-truth segment at all).

    Attributes:
        map_by_tiou: mAP at each tIoU threshold.
        average_map: mean of ``map_by_tiou``.
        ap_by_class: (C_gt, K) AP of each class present in the ground truth (rows follow ``classes``).
        classes: (C_gt,) the class ids of ``ap_by_class``.
        proposals_per_video: (A,) AN values, 1..max_proposals.
        average_recall: (A,) AR at each AN.
        auc: area under the AR-AN curve, 0..100.
    """

    map_by_tiou: dict[float, float]
    average_map: float
    ap_by_class: np.ndarray
    classes: np.ndarray
    proposals_per_video: np.ndarray
    average_recall: np.ndarray
    auc: float

    def as_dict(self) -> dict[str, float]:
        """Flat dict with the keys used in metrics files: map_50, map_avg, auc, ar_1, ar_10, ar_100 (percent)."""
        out = {"map_50": self.map_by_tiou.get(0.5, float("nan")), "map_avg": self.average_map, "auc": self.auc}
        for proposals in (1, 10, 100):
            if proposals <= len(self.average_recall):
                out[f"ar_{proposals}"] = float(self.average_recall[proposals - 1])
        return out


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends (exclusive) of the maximal runs of equal values of a (T,) array."""
    starts = np.flatnonzero(np.concatenate(([True], labels[1:] != labels[:-1])))
    ends = np.append(starts[1:], len(labels))
    return starts, ends


def _empty_segments() -> Segments:
    empty = np.zeros(0, dtype=np.int64)
    return Segments(empty, empty, empty, empty, np.zeros(0, dtype=np.float64))


def segments_from_labels(labels: np.ndarray, background_ids: Iterable[int] = (), *, video: int = 0) -> Segments:
    """Ground-truth segments of one video: runs of equal labels, background left out, score 1.

    Args:
        labels: (T,) int class id per frame.
        background_ids: class ids that form no segment.
        video: index stored in ``Segments.videos``.
    """
    labels = np.asarray(labels)
    if len(labels) == 0:
        return _empty_segments()
    starts, ends = _runs(labels)
    run_labels = labels[starts].astype(np.int64)
    keep = ~np.isin(run_labels, np.fromiter(background_ids, dtype=np.int64))
    count = int(np.count_nonzero(keep))
    return Segments(
        videos=np.full(count, video, dtype=np.int64),
        labels=run_labels[keep],
        starts=starts[keep].astype(np.int64),
        ends=ends[keep].astype(np.int64),
        scores=np.ones(count, dtype=np.float64),
    )


def segments_from_probabilities(
    probabilities: np.ndarray, background_ids: Iterable[int] = (), *, video: int = 0
) -> Segments:
    """Predicted segments of one video: runs of the per-frame argmax, scored by their class's mean probability.

    Args:
        probabilities: (T, C) float per-frame class probabilities.
        background_ids: class ids that form no segment.
        video: index stored in ``Segments.videos``.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2:
        raise ValueError(f"expected (T, C) probabilities, got shape {probabilities.shape}")
    if len(probabilities) == 0:
        return _empty_segments()
    labels = np.argmax(probabilities, axis=1)  # (T,)
    chosen = probabilities[np.arange(len(labels)), labels].astype(np.float64)  # (T,) probability of the argmax
    cumulative = np.concatenate(([0.0], np.cumsum(chosen)))  # (T + 1,)
    segments = segments_from_labels(labels, background_ids, video=video)
    scores = (cumulative[segments.ends] - cumulative[segments.starts]) / (segments.ends - segments.starts)
    return Segments(segments.videos, segments.labels, segments.starts, segments.ends, scores)


def concatenate_segments(parts: Sequence[Segments]) -> Segments:
    """Join the segments of several videos into one :class:`Segments`."""
    if not parts:
        return _empty_segments()
    return Segments(*(np.concatenate([getattr(part, name) for part in parts]) for name in Segments.__annotations__))


def _overlapping_pairs(
    predicted: Segments, ground_truth: Segments, *, same_class: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (prediction, ground truth) pairs of the same video that overlap, with their tIoU.

    Ground-truth segments of a video must not overlap (they are runs of labels); predictions may. Every video is
    placed on one global time line, so that for each prediction the overlapping ground-truth segments are one
    contiguous range found by binary search, without a loop over videos.

    Returns:
        prediction indices (M,), ground-truth indices (M,) and tIoU (M,) float64, only pairs with tIoU > 0
        (and the same class if ``same_class``).
    """
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
    if len(predicted) == 0 or len(ground_truth) == 0:
        return empty
    span = int(max(predicted.ends.max(), ground_truth.ends.max())) + 1
    true_start = ground_truth.videos * span + ground_truth.starts
    true_end = ground_truth.videos * span + ground_truth.ends
    order = np.argsort(true_start, kind="stable")
    true_start, true_end = true_start[order], true_end[order]
    if np.any(true_start[1:] < true_end[:-1]):
        raise ValueError("ground-truth segments of a video overlap")
    predicted_start = predicted.videos * span + predicted.starts
    predicted_end = predicted.videos * span + predicted.ends
    first = np.searchsorted(true_end, predicted_start, side="right")  # first segment ending after the start
    last = np.searchsorted(true_start, predicted_end, side="left")  # first segment starting at or after the end
    counts = np.maximum(last - first, 0)
    total = int(counts.sum())
    if total == 0:
        return empty
    pair_predicted = np.repeat(np.arange(len(predicted)), counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    pair_sorted = np.repeat(first, counts) + offsets
    intersection = np.minimum(predicted_end[pair_predicted], true_end[pair_sorted]) - np.maximum(
        predicted_start[pair_predicted], true_start[pair_sorted]
    )
    union = (predicted_end[pair_predicted] - predicted_start[pair_predicted]) + (
        true_end[pair_sorted] - true_start[pair_sorted]
    ) - intersection
    tiou = intersection / union
    pair_true = order[pair_sorted]
    keep = tiou > 0
    if same_class:
        keep &= predicted.labels[pair_predicted] == ground_truth.labels[pair_true]
    return pair_predicted[keep], pair_true[keep], tiou[keep]


def _greedy_match(
    pair_predicted: np.ndarray,
    pair_true: np.ndarray,
    pair_tiou: np.ndarray,
    rank: np.ndarray,
    num_predicted: int,
    num_true: int,
) -> np.ndarray:
    """Which predictions are true positives when, in rank order, each takes its best free candidate.

    Args:
        pair_predicted, pair_true, pair_tiou: (M,) candidate pairs, already above the tIoU threshold.
        rank: (num_predicted,) position of each prediction in the visiting order.

    Returns:
        (num_predicted,) bool.
    """
    matched = np.zeros(num_predicted, dtype=bool)
    predicted_degree = np.bincount(pair_predicted, minlength=num_predicted)
    true_degree = np.bincount(pair_true, minlength=num_true)
    # A pair whose prediction and ground truth have no other candidate matches whatever the visiting order.
    alone = (predicted_degree[pair_predicted] == 1) & (true_degree[pair_true] == 1)
    matched[pair_predicted[alone]] = True
    contested = np.flatnonzero(~alone)
    if len(contested) == 0:
        return matched
    # Rare (ties at the threshold): visit contested pairs by prediction rank, best tIoU first.
    contested = contested[np.lexsort((-pair_tiou[contested], rank[pair_predicted[contested]]))]
    taken: set[int] = set()
    for predicted_index, true_index in zip(pair_predicted[contested].tolist(), pair_true[contested].tolist()):
        if matched[predicted_index] or true_index in taken:
            continue
        matched[predicted_index] = True
        taken.add(true_index)
    return matched


def _interpolated_average_precision(true_positive: np.ndarray, num_positives: int) -> np.ndarray:
    """AP of one class from its ranked detections.

    Args:
        true_positive: (K, N) bool, detections in rank order, one row per tIoU threshold.
        num_positives: number of ground-truth segments of the class.

    Returns:
        (K,) AP in 0..1.
    """
    if true_positive.shape[1] == 0:
        return np.zeros(true_positive.shape[0])
    cumulative = np.cumsum(true_positive, axis=1)  # (K, N)
    precision = cumulative / np.arange(1, true_positive.shape[1] + 1)
    # Interpolated precision: the best precision at this recall or any higher one.
    interpolated = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    # Recall grows by 1 / num_positives exactly at each true positive.
    return (interpolated * true_positive).sum(axis=1) / num_positives


def average_precision(
    predicted: Segments,
    ground_truth: Segments,
    *,
    tiou_thresholds: Sequence[float] = TIOU_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray]:
    """AP per class and tIoU threshold (ActivityNet detection protocol).

    Args:
        predicted: scored predicted segments of all videos.
        ground_truth: ground-truth segments of the same videos (non-overlapping within a video).
        tiou_thresholds: K thresholds.

    Returns:
        classes (C_gt,) int64, the classes with ground truth, and AP (C_gt, K) in percent.
    """
    thresholds = np.asarray(tiou_thresholds, dtype=np.float64)
    classes, num_positives = np.unique(ground_truth.labels, return_counts=True)
    # Visiting order: score descending, then video, then time.
    order = np.lexsort((predicted.starts, predicted.videos, -predicted.scores))
    rank = np.empty(len(predicted), dtype=np.int64)
    rank[order] = np.arange(len(predicted))
    pair_predicted, pair_true, pair_tiou = _overlapping_pairs(predicted, ground_truth, same_class=True)
    true_positive = np.zeros((len(thresholds), len(predicted)), dtype=bool)  # (K, N)
    for k, threshold in enumerate(thresholds):
        passing = pair_tiou >= threshold
        true_positive[k] = _greedy_match(
            pair_predicted[passing], pair_true[passing], pair_tiou[passing], rank, len(predicted), len(ground_truth)
        )
    # Group detections by class, in rank order within a class.
    by_class = np.lexsort((rank, predicted.labels))
    sorted_labels = predicted.labels[by_class]
    group_start = np.searchsorted(sorted_labels, classes, side="left")
    group_end = np.searchsorted(sorted_labels, classes, side="right")
    ap = np.zeros((len(classes), len(thresholds)))
    for c in range(len(classes)):
        members = by_class[group_start[c] : group_end[c]]
        ap[c] = _interpolated_average_precision(true_positive[:, members], int(num_positives[c]))
    return classes.astype(np.int64), 100.0 * ap


def average_recall(
    proposals: Segments,
    ground_truth: Segments,
    *,
    max_proposals: int = 100,
    tiou_thresholds: Sequence[float] = TIOU_THRESHOLDS,
) -> tuple[np.ndarray, np.ndarray]:
    """AR@AN: recall of ground-truth segments by the AN best-scored proposals of each video.

    Args:
        proposals: scored segments of all videos (their classes are ignored).
        ground_truth: ground-truth segments (non-overlapping within a video).
        max_proposals: largest AN.
        tiou_thresholds: K thresholds the recall is averaged over.

    Returns:
        AN (A,) = 1..max_proposals and AR (A,) in percent (NaN without ground truth).
    """
    proposals_per_video = np.arange(1, max_proposals + 1)
    if len(ground_truth) == 0:
        return proposals_per_video, np.full(max_proposals, np.nan)
    thresholds = np.asarray(tiou_thresholds, dtype=np.float64)
    # Rank of each proposal within its video: score descending, then time.
    order = np.lexsort((proposals.starts, -proposals.scores, proposals.videos))
    sorted_videos = proposals.videos[order]
    first_of_video = np.searchsorted(sorted_videos, sorted_videos, side="left")
    rank = np.empty(len(proposals), dtype=np.int64)
    rank[order] = np.arange(len(proposals)) - first_of_video
    pair_proposal, pair_true, pair_tiou = _overlapping_pairs(proposals, ground_truth, same_class=False)
    recall = np.zeros((len(thresholds), max_proposals))
    for k, threshold in enumerate(thresholds):
        passing = pair_tiou >= threshold
        best_rank = np.full(len(ground_truth), max_proposals, dtype=np.int64)  # max_proposals = never recalled
        np.minimum.at(best_rank, pair_true[passing], np.minimum(rank[pair_proposal[passing]], max_proposals))
        # recalled with AN proposals <=> best_rank < AN
        recalled = np.cumsum(np.bincount(best_rank, minlength=max_proposals + 1)[:max_proposals])
        recall[k] = recalled / len(ground_truth)
    return proposals_per_video, 100.0 * recall.mean(axis=0)


def area_under_curve(proposals_per_video: np.ndarray, recall: np.ndarray) -> float:
    """ActivityNet's AUC: ``100 * trapz(AR, AN) / AN_max`` with AR in 0..1, so the result is in 0..100.

    Args:
        proposals_per_video: (A,) AN values, increasing.
        recall: (A,) AR in percent.
    """
    recall = np.asarray(recall, dtype=np.float64) / 100.0
    proposals_per_video = np.asarray(proposals_per_video, dtype=np.float64)
    area = np.sum((recall[1:] + recall[:-1]) / 2.0 * np.diff(proposals_per_video))
    return float(100.0 * area / proposals_per_video[-1])


def localization_metrics(
    predicted: Segments,
    ground_truth: Segments,
    *,
    tiou_thresholds: Sequence[float] = TIOU_THRESHOLDS,
    max_proposals: int = 100,
) -> LocalizationScores:
    """mAP at each tIoU, average mAP, AR@AN and AUC.

    Args:
        predicted: scored predicted segments of all videos (:func:`segments_from_probabilities`).
        ground_truth: ground-truth segments of the same videos (:func:`segments_from_labels`).
        tiou_thresholds: thresholds of mAP and of the recall average.
        max_proposals: largest AN.
    """
    classes, ap = average_precision(predicted, ground_truth, tiou_thresholds=tiou_thresholds)
    mean_ap = ap.mean(axis=0) if len(classes) else np.full(len(tiou_thresholds), np.nan)
    proposals_per_video, recall = average_recall(
        predicted, ground_truth, max_proposals=max_proposals, tiou_thresholds=tiou_thresholds
    )
    return LocalizationScores(
        map_by_tiou={round(float(t), 2): float(value) for t, value in zip(tiou_thresholds, mean_ap)},
        average_map=float(mean_ap.mean()),
        ap_by_class=ap,
        classes=classes,
        proposals_per_video=proposals_per_video,
        average_recall=recall,
        auc=area_under_curve(proposals_per_video, recall) if len(ground_truth) else float("nan"),
    )
