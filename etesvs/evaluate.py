"""Evaluate a model's predictions against the ground truth: library functions and a command line.

::

    python -m etesvs.evaluate --ground-truth DIR --predictions DIR --mapping FILE --split FILE \\
        [--background NAME ...] [--probabilities FILE.h5] [--out FILE.json]

Predictions are text files ``<video>.txt`` (or ``<video>``) in either layout: one class name per line like
``groundTruth``, or the MS-TCN results layout (a ``### Frame level recognition: ###`` line, then all class names
space-separated). ``--probabilities`` is an HDF5 file with one (T, C) float dataset per video (``probs.h5``);
with it the localization metrics are computed too. All scores are percentages.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from etesvs.data.layout import read_ground_truth, read_mapping, read_split
from etesvs.errors import EtesvsError, run_main
from etesvs.io import atomic_path, check_output_file, claim_output_dir, path_inside, read_json, read_text, write_json
from etesvs.metrics import (
    LocalizationScores,
    PerClassScores,
    SegmentationScores,
    concatenate_segments,
    confusion_matrix,
    f1_from_counts,
    localization_metrics,
    per_class_scores,
    segmentation_metrics,
    segments_from_labels,
    segments_from_probabilities,
)

MSTCN_HEADER = "###"
SUMMARY_COLUMNS = (
    ("Model", None),
    ("Params", "params_m"),
    ("FLOPs/frame", "mflops"),
    ("F1@10", "f1_10"),
    ("F1@25", "f1_25"),
    ("F1@50", "f1_50"),
    ("Edit", "edit"),
    ("Acc", "acc"),
    ("mAP@0.5", "map_50"),
    ("avg mAP", "map_avg"),
    ("AUC", "auc"),
)


@dataclass(frozen=True)
class EvaluationResult:
    """Everything :func:`evaluate_predictions` computes.

    Attributes:
        videos: V video ids, in evaluation order.
        predictions: predicted class per frame of each video, (T_v,) int64.
        segmentation: Acc, Edit, F1 (with per-video Edit and F1 counts).
        localization: mAP, AR@AN, AUC; None without probabilities.
        confusion: (C, C) frame counts, rows = actual, columns = predicted.
        per_class: frame-level precision, recall, F1 and support of each class.
    """

    videos: tuple[str, ...]
    predictions: dict[str, np.ndarray]
    segmentation: SegmentationScores
    localization: LocalizationScores | None
    confusion: np.ndarray
    per_class: PerClassScores

    def metrics(self) -> dict[str, float]:
        """acc, edit, f1_10, f1_25, f1_50 and, with probabilities, map_50, map_avg, auc (percent)."""
        out = self.segmentation.as_dict()
        if self.localization is not None:
            scores = self.localization.as_dict()
            out.update({key: scores[key] for key in ("map_50", "map_avg", "auc")})
        return out

    def video_f1(self, overlap: float = 0.5) -> dict[str, float]:
        """F1@overlap (percent) of each video; ``overlap`` must be one of the evaluated overlaps."""
        column = list(self.segmentation.f1).index(overlap)
        f1 = f1_from_counts(self.segmentation.f1_counts_by_video[:, column])
        return {video: float(value) for video, value in zip(self.videos, f1)}


def check_probabilities(probabilities: np.ndarray, *, num_frames: int, num_classes: int, source: str) -> None:
    """Raise :class:`EtesvsError` naming ``source`` unless ``probabilities`` is a finite, non-negative (T, C) array."""
    if probabilities.ndim != 2 or probabilities.shape[1] != num_classes:
        raise EtesvsError(f"{source}: expected shape ({num_frames}, {num_classes}), got {probabilities.shape}")
    if probabilities.shape[0] != num_frames:
        raise EtesvsError(f"{source}: has {probabilities.shape[0]} frames, the ground truth has {num_frames}")
    bad = ~np.isfinite(probabilities)
    if bad.any():
        frame = int(np.flatnonzero(bad.any(axis=1))[0])
        raise EtesvsError(f"{source}: NaN or infinite probability at frame {frame}")
    negative = probabilities < 0
    if negative.any():
        frame = int(np.flatnonzero(negative.any(axis=1))[0])
        raise EtesvsError(f"{source}: negative probability at frame {frame}")


def _video_probabilities(probabilities: Mapping[str, np.ndarray], video: str, truth: np.ndarray, *,
                         num_classes: int, source: str) -> np.ndarray:
    """The checked (T, C) probabilities of ``video`` (see :func:`check_probabilities`)."""
    if video not in probabilities:
        raise EtesvsError(f"{source}: no probabilities for video '{video}'")
    scores = np.asarray(probabilities[video])
    check_probabilities(scores, num_frames=len(truth), num_classes=num_classes, source=f"{source}: '{video}'")
    return scores


def _video_labels(predictions: Mapping[str, np.ndarray] | None, scores: np.ndarray | None, video: str,
                  truth: np.ndarray, *, num_classes: int, source: str) -> np.ndarray:
    """The checked (T,) predicted class ids of ``video``: its prediction, or the argmax of its probabilities."""
    if predictions is not None:
        if video not in predictions:
            raise EtesvsError(f"{source}: no prediction for video '{video}'")
        labels = np.asarray(predictions[video], dtype=np.int64)
    else:
        labels = np.argmax(scores, axis=1)
    if labels.shape != truth.shape:
        raise EtesvsError(f"{source}: prediction of '{video}' has {len(labels)} frames, ground truth {len(truth)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise EtesvsError(f"{source}: prediction of '{video}' has class ids outside 0..{num_classes - 1}")
    return labels


def evaluate_predictions(
    ground_truth: Mapping[str, np.ndarray],
    predictions: Mapping[str, np.ndarray] | None = None,
    *,
    num_classes: int,
    background_ids: Sequence[int] = (),
    probabilities: Mapping[str, np.ndarray] | None = None,
    predictions_source: str = "predictions",
    probabilities_source: str = "probabilities",
) -> EvaluationResult:
    """Score the predictions of a set of videos.

    Args:
        ground_truth: video id -> (T,) int true class per frame; its keys are the videos evaluated.
        predictions: video id -> (T,) int predicted class per frame. None: the argmax of ``probabilities``.
        num_classes: C.
        background_ids: classes left out of segments (Edit, F1, localization).
        probabilities: video id -> (T, C) class probabilities (an open ``h5py.File`` works: datasets are read one
            video at a time). Needed for the localization metrics.
        predictions_source, probabilities_source: names used in error messages (e.g. the directory or file).

    Raises:
        EtesvsError: a video without prediction, a length mismatch, a class id out of range, or probabilities
            that are NaN, negative or of the wrong shape; the message names the source and the video.
    """
    videos = tuple(ground_truth)
    if not videos:
        raise EtesvsError(f"{predictions_source}: no videos to evaluate (empty split)")
    if predictions is None and probabilities is None:
        raise ValueError("give predictions, probabilities or both")
    predicted_labels: dict[str, np.ndarray] = {}
    predicted_segments, true_segments = [], []
    for index, video in enumerate(videos):
        truth = np.asarray(ground_truth[video])
        scores = None
        if probabilities is not None:
            scores = _video_probabilities(probabilities, video, truth, num_classes=num_classes,
                                          source=probabilities_source)
            predicted_segments.append(segments_from_probabilities(scores, background_ids, video=index))
            true_segments.append(segments_from_labels(truth, background_ids, video=index))
        predicted_labels[video] = _video_labels(predictions, scores, video, truth, num_classes=num_classes,
                                                source=predictions_source)
    truths = [np.asarray(ground_truth[video], dtype=np.int64) for video in videos]
    segmentation = segmentation_metrics(
        [predicted_labels[video] for video in videos], truths, background_ids=background_ids
    )
    localization = None
    if probabilities is not None:
        localization = localization_metrics(
            concatenate_segments(predicted_segments), concatenate_segments(true_segments)
        )
    confusion = confusion_matrix(np.concatenate(list(predicted_labels.values())), np.concatenate(truths), num_classes)
    return EvaluationResult(
        videos=videos,
        predictions=predicted_labels,
        segmentation=segmentation,
        localization=localization,
        confusion=confusion,
        per_class=per_class_scores(confusion),
    )


# ---------------------------------------------------------------------------------------------------- files


def read_prediction_file(path: str | Path) -> list[str]:
    """Class names per frame from a prediction file (one per line, or the MS-TCN results layout)."""
    path = Path(path)
    lines = read_text(path).splitlines()  # a byte-order mark and CRLF line ends are accepted
    if lines and lines[0].startswith(MSTCN_HEADER):
        names = " ".join(lines[1:]).split()
    else:
        names = [line.strip() for line in lines]
        while names and not names[-1]:
            names.pop()
        if "" in names:
            raise EtesvsError(f"{path}:{names.index('') + 1}: empty label line")
    if not names:
        raise EtesvsError(f"{path}: no labels")
    return names


def find_prediction_file(predictions_dir: str | Path, video: str) -> Path:
    """``<dir>/<video>.txt`` or, as MS-TCN writes them, ``<dir>/<video>``."""
    predictions_dir = Path(predictions_dir)
    for candidate in (path_inside(predictions_dir, f"{video}.txt"), path_inside(predictions_dir, video)):
        if candidate.is_file():
            return candidate
    raise EtesvsError(f"{predictions_dir / video}.txt: prediction of video '{video}' not found")


def class_ids(names: Sequence[str], classes: Sequence[str], *, source: str | Path) -> np.ndarray:
    """(T,) int64 ids of class ``names``; an unknown name is an error naming ``source`` and the frame."""
    index = {name: i for i, name in enumerate(classes)}
    try:
        return np.fromiter((index[name] for name in names), dtype=np.int64, count=len(names))
    except KeyError as error:
        name = error.args[0]
        frame = list(names).index(name) + 1
        raise EtesvsError(f"{source}: frame {frame}: unknown class {name!r} (not in the mapping)") from None


def background_class_ids(background: Sequence[str] | None, classes: Sequence[str], *, mapping: str | Path) -> list[int]:
    """Ids of the background class names; None means ``background`` if the mapping has it, else none."""
    if background is None:
        return [classes.index("background")] if "background" in classes else []
    unknown = [name for name in background if name not in classes]
    if unknown:
        raise EtesvsError(f"{mapping}: background class {unknown[0]!r} is not in the mapping")
    return [classes.index(name) for name in background]


def json_safe(metrics: Mapping[str, object]) -> dict[str, object]:
    """Metrics rounded to 4 decimals, NaN as None (JSON has no NaN)."""
    out: dict[str, object] = {}
    for key, value in metrics.items():
        if isinstance(value, float):
            value = None if math.isnan(value) else round(value, 4)
        out[key] = value
    return out


def rounded_scores(scores: Mapping[str, object]) -> dict[str, object]:
    """Scores in percent with 2 decimals, NaN as None: the numbers of a metrics file."""
    return {key: None if value is None else round(float(value), 2) for key, value in json_safe(scores).items()}


def dvc_metrics(scores: Mapping[str, object], model_info: Mapping[str, object]) -> dict[str, object]:
    """``reports/<model>/metrics.json``: the scores (percent, 2 decimals) and the model's size and cost in readable
    units (``params_m``: millions of parameters; ``mflops``: millions of FLOPs per frame), so that `dvc metrics
    show` puts every model on one short row. Timings never go here: metrics change only when results do."""
    metrics: dict[str, object] = rounded_scores(scores)
    params, flops = model_info.get("params"), model_info.get("flops_per_frame")
    metrics["params_m"] = round(params / 1e6, 3) if params else None
    metrics["mflops"] = round(flops / 1e6, 2) if flops else None
    metrics["pretrained"] = model_info.get("backbone_pretrained")
    origin = model_info.get("weights_origin")
    # the weights file's name (the full origin is in model.json): which backbone weights produced these scores
    metrics["weights"] = Path(origin).name if isinstance(origin, str) and origin.endswith((".pt", ".pth")) else origin
    return metrics


def per_class_csv(result: EvaluationResult, classes: Sequence[str]) -> str:
    """CSV text: class, precision, recall, f1 (percent), support (frames)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", "precision", "recall", "f1", "support"])
    scores = result.per_class
    for c, name in enumerate(classes):
        writer.writerow(
            [
                name,
                f"{scores.precision[c]:.4f}",
                f"{scores.recall[c]:.4f}",
                f"{scores.f1[c]:.4f}",
                int(scores.support[c]),
            ]
        )
    return buffer.getvalue()


def confusion_csv(confusion: np.ndarray, classes: Sequence[str]) -> str:
    """CSV text ``actual,predicted,count``: one row for every pair of classes (zeros included), so that a class a
    model never predicts keeps its column in DVC's plot (template ``.dvc/plots/confusion_counts.json``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["actual", "predicted", "count"])
    for actual, row in enumerate(np.asarray(confusion)):
        writer.writerows((classes[actual], classes[predicted], int(count)) for predicted, count in enumerate(row))
    return buffer.getvalue()


def format_table(metrics: Mapping[str, float | None]) -> str:
    """Two-line plain-text table of the metrics, for the terminal."""
    headers = {"acc": "Acc", "edit": "Edit", "f1_10": "F1@10", "f1_25": "F1@25", "f1_50": "F1@50"}
    headers.update({"map_50": "mAP@0.5", "map_avg": "avg mAP", "auc": "AUC"})
    keys = [key for key in headers if key in metrics]
    cells = ["-" if metrics[key] is None else f"{metrics[key]:.2f}" for key in keys]
    widths = [max(len(headers[key]), len(cell)) for key, cell in zip(keys, cells)]
    return "\n".join(
        [
            "  ".join(headers[key].rjust(width) for key, width in zip(keys, widths)),
            "  ".join(cell.rjust(width) for cell, width in zip(cells, widths)),
        ]
    )


def format_count(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}{unit}"
    return f"{value:g}{unit}"


def summary_markdown(reports: Mapping[str, Mapping[str, object]]) -> str:
    """Markdown table, one row per model: Model, Params, FLOPs/frame, F1@{10,25,50}, Edit, Acc, mAP@0.5, avg mAP, AUC.

    Args:
        reports: model name -> its metrics (the content of ``reports/<model>/metrics.json``).
    """
    lines = ["| " + " | ".join(name for name, _ in SUMMARY_COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in SUMMARY_COLUMNS) + "|")
    for model, metrics in reports.items():
        lines.extend("| " + " | ".join(cells) + " |" for cells in summary_rows(model, metrics))
    return "\n".join(lines) + "\n"


def summary_rows(model: str, metrics: dict) -> list[list[str]]:
    """A model's rows of the summary table: its scores, and for a streaming model whose labels are burr-suppressed
    (``argmax`` in its metrics, see stage evaluate) a second row ``<model> (argmax)`` with the plain argmax's
    segmentation scores (the localization columns come from the probabilities and are the same)."""
    rows = [summary_cells(model, metrics)]
    if isinstance(metrics.get("argmax"), dict):
        rows.append(summary_cells(f"{model} (argmax)", {**metrics, **metrics["argmax"]}))
    return rows


def summary_cells(model: str, metrics: dict) -> list[str]:
    """One model's cells in the columns of SUMMARY_COLUMNS: sizes in readable units, scores with one decimal."""
    cells = [model]
    for _, key in SUMMARY_COLUMNS[1:]:
        value = metrics.get(key)
        if key in ("params_m", "mflops"):
            cells.append(format_count(None if value is None else value * 1e6))
        else:
            cells.append("-" if value is None else f"{value:.1f}")
    return cells


def write_report(
    out_dir: str | Path,
    result: EvaluationResult,
    ground_truth: Mapping[str, np.ndarray],
    *,
    metrics: Mapping[str, object],
    classes: Sequence[str],
    fps: float,
    background_ids: Sequence[int],
    model: str,
    window: int = 0,
    inputs: Sequence[str | Path] = (),
) -> None:
    """Write the report of stage evaluate into ``out_dir`` (``reports/<model>``, shared with the training reports).

    ``metrics.json``, ``per_class.csv`` and ``confusion.csv`` are written atomically; ``segments/`` holds one
    picture per video and belongs to this stage (see :func:`etesvs.io.claim_output_dir`; its marker is
    ``.segments.etesvs-output.json`` beside it): pictures of videos no longer evaluated are removed, and a
    ``segments/`` holding anything else is refused before anything is written.
    """
    out_dir = Path(out_dir)
    for name in ("metrics.json", "per_class.csv", "confusion.csv"):
        check_output_file(out_dir / name, inputs=inputs)
    from etesvs.viz import save_segments_figure  # matplotlib only where pictures are drawn, not for the CLI

    # DVC draws every file of segments/ as a plot, so its marker is kept beside it.
    pictures = claim_output_dir(out_dir / "segments", owner="evaluate", inputs=inputs, marker_inside=False)
    video_f1 = result.video_f1(0.5)
    with pictures.replace([f"{video}.png" for video in result.videos]) as staged:
        for video in result.videos:
            save_segments_figure(
                staged[f"{video}.png"],
                ground_truth[video],
                result.predictions[video],
                class_names=classes,
                fps=fps,
                window=window,
                title=f"{model}: {video}   F1@50 = {video_f1[video]:.1f}",
                background_ids=background_ids,
            )
    for name, text in (
        ("per_class.csv", per_class_csv(result, classes)),
        ("confusion.csv", confusion_csv(result.confusion, classes)),
    ):
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    write_json(out_dir / "metrics.json", dict(metrics))


def summary_caption(params: Mapping[str, Any]) -> str:
    """What the summary table is, from the params of stage summarize: ``seed``, ``cpu_kernels``, ``dataset.name``,
    ``dataset.split``, ``demo.seed``, ``features.weights`` and ``streaming.pretrained``."""
    dataset = params["dataset"]
    if dataset["name"] == "demo":
        data = (f"the embedded demo dataset (generated, demo seed {params['demo']['seed']}), split {dataset['split']} "
                "(test videos: one held-out subject)")
    else:
        data = f"{dataset['name']}, split {dataset['split']}"
    features = params["features"]["weights"] or "a randomly initialised I3D"
    streaming = params["streaming"]["pretrained"] or "random initialisation"
    kernels = ("CPU kernels pinned to AVX2 (cpu_kernels avx2: the same numbers on any x86 CPU with AVX2)"
               if params["cpu_kernels"] == "avx2" else "this CPU's native kernels (cpu_kernels native)")
    text = (f"Test-split scores (%) on {data}; training seed {params['seed']}, {kernels}. The two-stage models "
            f"(mstcn, asrf, asformer, frame_classifier) read frozen I3D features computed with {features}; etesvs "
            f"is trained end to end from a MobileNetV2 initialised with {streaming}.")
    if "_demo.pt" in f"{features} {streaming}":
        text += (" The *_demo.pt weights are the demo's stand-ins for Kinetics / ImageNet weights: stages "
                 "pretrain@i3d and pretrain@mobilenet_v2 train them on a generated corpus of motion clips "
                 "(make_pretrain_data) that shares no look with the demo.")
    return text + (" Params and FLOPs/frame (fvcore, per video frame) of a two-stage model include its I3D feature "
                   "extractor; those of etesvs are its whole network (backbone, memory, head).")


def postprocess_caption(model: str, metrics: Mapping[str, Any]) -> str:
    """What the two rows of a burr-suppressed streaming model are (see :func:`summary_rows`)."""
    return (f"Row {model} scores the labels its stream emits: inside each window it has read, a run of at most "
            f"{metrics.get('burr_frames')} frames that ends before the window's end takes the label before it "
            f"(burr suppression, no added latency; streaming.postprocess); row {model} (argmax) scores each frame's "
            "most likely class. Both rows' mAP and AUC come from the same probabilities.")


def write_summary(metrics_files: Sequence[str | Path], out: str | Path, *, caption: str = "") -> str:
    """Write the summary table of ``reports/<model>/metrics.json`` files (model = the parent directory's name),
    under ``caption``."""
    reports = {Path(path).parent.name: read_json(path) for path in metrics_files}
    text = summary_markdown(reports)
    caption = " ".join([caption, *(postprocess_caption(model, metrics) for model, metrics in reports.items()
                                   if isinstance(metrics.get("argmax"), dict))]).strip()
    if caption:
        text = f"{caption}\n\n{text}"
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return text


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Command line: score prediction files against groundTruth files, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m etesvs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ground-truth", type=Path, required=True, help="directory of <video>.txt ground truth")
    parser.add_argument("--predictions", type=Path, required=True, help="directory of <video>.txt predictions")
    parser.add_argument("--mapping", type=Path, required=True, help="mapping.txt: '<id> <name>' per line")
    parser.add_argument("--split", type=Path, required=True, help="bundle of the videos to evaluate")
    parser.add_argument("--background", nargs="+", default=None, help="background class names (default: background)")
    parser.add_argument("--probabilities", type=Path, default=None, help="probs.h5 for the localization metrics")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics (percent) as JSON here")
    args = parser.parse_args(argv)
    if args.out is not None:
        inputs = [args.mapping, args.split, *([args.probabilities] if args.probabilities else [])]
        check_output_file(args.out, inputs=[*inputs, args.ground_truth, args.predictions], suffixes=(".json",))

    classes = read_mapping(args.mapping)
    background_ids = background_class_ids(args.background, classes, mapping=args.mapping)
    videos = read_split(args.split)
    ground_truth, predictions = {}, {}
    for video in videos:
        truth_file = path_inside(args.ground_truth, f"{video}.txt")
        ground_truth[video] = class_ids(read_ground_truth(truth_file), classes, source=truth_file)
        prediction_file = find_prediction_file(args.predictions, video)
        predictions[video] = class_ids(read_prediction_file(prediction_file), classes, source=prediction_file)
        if len(predictions[video]) != len(ground_truth[video]):
            raise EtesvsError(
                f"{prediction_file}: {len(predictions[video])} frames, but {truth_file} has {len(ground_truth[video])}"
            )
    kwargs = dict(num_classes=len(classes), background_ids=background_ids, predictions_source=str(args.predictions))
    if args.probabilities is None:
        result = evaluate_predictions(ground_truth, predictions, **kwargs)
    else:
        try:
            handle = h5py.File(args.probabilities, "r")
        except (FileNotFoundError, OSError) as error:
            raise EtesvsError(f"{args.probabilities}: cannot open as HDF5 ({error.__class__.__name__})") from None
        with handle:
            result = evaluate_predictions(
                ground_truth, predictions, probabilities=handle, probabilities_source=str(args.probabilities), **kwargs
            )
    metrics = json_safe(result.metrics())
    print(f"{len(videos)} videos, background: {', '.join(classes[c] for c in background_ids) or 'none'}")
    print(format_table(metrics))
    if args.out is not None:
        write_json(args.out, metrics)
    return metrics


if __name__ == "__main__":
    run_main(main)
