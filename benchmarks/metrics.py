"""Time the metrics at Breakfast scale on synthetic data.

    python benchmarks/metrics.py [--videos 1712] [--frames 10000] [--classes 48] [--segments 20]

Ground truth: each video is cut into about ``--segments`` segments of random classes (class 0 is background).
Predictions: the ground truth with boundaries moved by up to ±5 % of a segment and short spurious segments
inserted; probabilities are noisy one-hot vectors of the prediction. Only the metric calls are timed; making the
data (one video of probabilities at a time, to bound memory) is not.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from etesvs.metrics import (
    concatenate_segments,
    localization_metrics,
    segmentation_metrics,
    segments_from_labels,
    segments_from_probabilities,
)


def synthetic_video(
    rng: np.random.Generator, *, num_frames: int, num_classes: int, num_segments: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth and a noisy prediction of one video, both (T,) int64."""
    cuts = np.sort(rng.choice(np.arange(1, num_frames), size=num_segments - 1, replace=False))
    segment_classes = rng.integers(0, num_classes, size=num_segments)
    truth = np.repeat(segment_classes, np.diff(np.concatenate(([0], cuts, [num_frames]))))
    lengths = np.diff(np.concatenate(([0], cuts, [num_frames])))
    jitter = rng.integers(-1, 2, size=len(cuts)) * (0.05 * np.minimum(lengths[:-1], lengths[1:])).astype(int)
    moved = np.clip(np.sort(cuts + jitter), 1, num_frames - 1)
    prediction = np.repeat(segment_classes, np.diff(np.concatenate(([0], moved, [num_frames]))))
    for start in rng.integers(0, num_frames - 30, size=num_segments // 2):  # spurious short segments
        prediction[start : start + rng.integers(5, 30)] = rng.integers(0, num_classes)
    return truth.astype(np.int64), prediction.astype(np.int64)


def noisy_probabilities(rng: np.random.Generator, prediction: np.ndarray, num_classes: int) -> np.ndarray:
    """(T, C) float32 probabilities whose argmax is ``prediction``."""
    probabilities = rng.random((len(prediction), num_classes), dtype=np.float32) * 0.5
    probabilities[np.arange(len(prediction)), prediction] += 0.5 + 0.5 * rng.random(len(prediction), dtype=np.float32)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=1712)
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--classes", type=int, default=48)
    parser.add_argument("--segments", type=int, default=20, help="ground-truth segments per video")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    background_ids = (0,)

    truths, predictions = [], []
    for _ in range(args.videos):
        truth, prediction = synthetic_video(
            rng, num_frames=args.frames, num_classes=args.classes, num_segments=args.segments
        )
        truths.append(truth)
        predictions.append(prediction)
    print(f"{args.videos} videos x {args.frames} frames, {args.classes} classes, ~{args.segments} segments a video")

    start = time.perf_counter()
    scores = segmentation_metrics(predictions, truths, background_ids=background_ids)
    segmentation_seconds = time.perf_counter() - start
    print(f"segmentation metrics: {segmentation_seconds:.2f} s  {scores.as_dict()}")

    extraction_seconds = 0.0
    predicted_segments, true_segments = [], []
    for video, (truth, prediction) in enumerate(zip(truths, predictions)):
        probabilities = noisy_probabilities(rng, prediction, args.classes)
        start = time.perf_counter()
        predicted_segments.append(segments_from_probabilities(probabilities, background_ids, video=video))
        true_segments.append(segments_from_labels(truth, background_ids, video=video))
        extraction_seconds += time.perf_counter() - start
    start = time.perf_counter()
    predicted, true = concatenate_segments(predicted_segments), concatenate_segments(true_segments)
    localization = localization_metrics(predicted, true)
    scoring_seconds = time.perf_counter() - start
    print(
        f"localization metrics: {extraction_seconds + scoring_seconds:.2f} s "
        f"(segments from probabilities {extraction_seconds:.2f} s, mAP and AR@AN {scoring_seconds:.2f} s; "
        f"{len(predicted)} predicted, {len(true)} true segments)  {localization.as_dict()}"
    )


if __name__ == "__main__":
    main()
