"""Stage evaluate@{model}: score a model's test-set probabilities; write metrics, tables and pictures.

Reads ``--labels`` (info.json, labels.h5) and ``--predictions`` (probs.h5, model.json); writes into ``--out``:
``metrics.json`` (percent, plus the model's size and cost, see :func:`etesvs.evaluate.dvc_metrics`),
``per_class.csv``, ``confusion.csv`` (every pair of classes with its frame count) and ``segments/<video>.png``.
Every input is checked before anything is written.

Predictions made window by window (a ``model.json`` with a ``window``: the streaming model) are scored as the
stream emits them, after the burr suppression of param ``streaming.postprocess`` (:mod:`etesvs.postprocess`);
``metrics.json`` then also holds the scores of the plain argmax under ``argmax``, and ``burr_frames``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import h5py

from etesvs.data.labels import load_label_info, load_labels
from etesvs.errors import EtesvsError, run_main
from etesvs.evaluate import dvc_metrics, evaluate_predictions, rounded_scores, write_report
from etesvs.io import read_json
from etesvs.params import stage_params
from etesvs.postprocess import check_burr_frames, suppress_burrs_by_window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=Path, required=True, help="labels directory (info.json, labels.h5)")
    parser.add_argument("--predictions", type=Path, required=True, help="directory with probs.h5 and model.json")
    parser.add_argument("--model", required=True, help="model name, for messages")
    parser.add_argument("--out", type=Path, required=True, help="report directory, e.g. reports/<model>")
    args = parser.parse_args()
    params = stage_params(f"evaluate@{args.model}")
    window = params["window"]  # ticks at the streaming model's window boundaries
    burr_frames = check_burr_frames(params["streaming"]["postprocess"]["burr_frames"],
                                    where="params.yaml: streaming.postprocess")

    info = load_label_info(args.labels)
    model_info = read_json(args.predictions / "model.json")
    ground_truth = {video: load_labels(args.labels, video) for video in info.test}
    probabilities_file = args.predictions / "probs.h5"
    try:
        handle = h5py.File(probabilities_file, "r")
    except (FileNotFoundError, OSError) as error:
        raise EtesvsError(f"{probabilities_file}: cannot open as HDF5 ({error.__class__.__name__})") from None
    streamed = "window" in model_info and burr_frames > 0
    if streamed and (isinstance(model_info["window"], bool) or not isinstance(model_info["window"], int)
                     or model_info["window"] < 1):
        raise EtesvsError(f"{args.predictions / 'model.json'}: window must be a positive integer, "
                          f"got {model_info['window']!r}")
    with handle:
        result = argmax = evaluate_predictions(
            ground_truth,
            num_classes=info.num_classes,
            background_ids=info.background_ids,
            probabilities=handle,
            probabilities_source=str(probabilities_file),
        )
    if streamed:  # the emitted labels: their own segmentation scores, the localization of the same probabilities
        emitted = {video: suppress_burrs_by_window(labels, model_info["window"], burr_frames)
                   for video, labels in argmax.predictions.items()}
        result = dataclasses.replace(
            evaluate_predictions(ground_truth, emitted, num_classes=info.num_classes,
                                 background_ids=info.background_ids),
            localization=argmax.localization,
        )

    metrics = dvc_metrics(result.metrics(), model_info)
    if streamed:
        metrics["burr_frames"] = burr_frames
        metrics["argmax"] = rounded_scores(argmax.segmentation.as_dict())
    write_report(
        args.out, result, ground_truth, metrics=metrics, classes=info.classes, fps=info.fps,
        background_ids=info.background_ids, model=args.model, window=window, inputs=[args.labels, args.predictions],
    )
    print(f"{args.model}: " + ", ".join(f"{key} {value}" for key, value in metrics.items()))


if __name__ == "__main__":
    run_main(main)
