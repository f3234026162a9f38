"""Frame-level classification metrics: confusion matrix and per-class precision, recall and F1."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PerClassScores:
    """Frame-level scores of each class, arrays (C,); precision, recall and F1 in percent (0 when undefined).

    Attributes:
        precision: correct frames of the class / frames predicted as the class.
        recall: correct frames of the class / frames of the class.
        f1: harmonic mean of precision and recall.
        support: frames of the class in the ground truth.
    """

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray


def confusion_matrix(prediction: np.ndarray, ground_truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Count frames by (true class, predicted class).

    Args:
        prediction: (T,) int predicted class per frame, in 0..num_classes-1.
        ground_truth: (T,) int true class per frame, in 0..num_classes-1.
        num_classes: C.

    Returns:
        (C, C) int64, rows = actual class, columns = predicted class.
    """
    prediction = np.asarray(prediction, dtype=np.int64)
    ground_truth = np.asarray(ground_truth, dtype=np.int64)
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"prediction has shape {prediction.shape}, ground truth {ground_truth.shape}")
    for name, values in (("prediction", prediction), ("ground truth", ground_truth)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} has class ids outside 0..{num_classes - 1}")
    counts = np.bincount(ground_truth * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)  # (C * C,) -> (C actual, C predicted)


def per_class_scores(confusion: np.ndarray) -> PerClassScores:
    """Per-class precision, recall and F1 from a confusion matrix.

    Args:
        confusion: (C, C) counts, rows = actual, columns = predicted.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    correct = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, 100.0 * correct / predicted, 0.0)
        recall = np.where(support > 0, 100.0 * correct / support, 0.0)
        f1 = np.where(predicted + support > 0, 200.0 * correct / (predicted + support), 0.0)
    return PerClassScores(precision=precision, recall=recall, f1=f1, support=support.astype(np.int64))
