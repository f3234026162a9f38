"""Pure metric functions on integer label arrays and probability arrays (no file I/O)."""

from etesvs.metrics.classification import PerClassScores, confusion_matrix, per_class_scores
from etesvs.metrics.localization import (
    TIOU_THRESHOLDS,
    LocalizationScores,
    Segments,
    average_precision,
    average_recall,
    concatenate_segments,
    localization_metrics,
    segments_from_labels,
    segments_from_probabilities,
)
from etesvs.metrics.segmentation import (
    DEFAULT_OVERLAPS,
    SegmentationScores,
    edit_score,
    f1_counts,
    f1_from_counts,
    f1_score,
    frame_accuracy,
    levenshtein,
    segmentation_metrics,
)

__all__ = [
    "DEFAULT_OVERLAPS",
    "TIOU_THRESHOLDS",
    "LocalizationScores",
    "PerClassScores",
    "SegmentationScores",
    "Segments",
    "average_precision",
    "average_recall",
    "concatenate_segments",
    "confusion_matrix",
    "edit_score",
    "f1_counts",
    "f1_from_counts",
    "f1_score",
    "frame_accuracy",
    "levenshtein",
    "localization_metrics",
    "per_class_scores",
    "segmentation_metrics",
    "segments_from_labels",
    "segments_from_probabilities",
]
