"""Stage train_temporal@{model}: train a two-stage temporal model on per-frame features, predict the test split.

Params: ``seed``, ``dataset.sample_rate`` and the model's own section (``model``, ``loss``, ``train``). The best
epoch is chosen on a seeded hold-out of the training videos, never on the test split. Runs under torchrun too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from etesvs.distributed import cleanup_distributed, setup_distributed
from etesvs.errors import run_main
from etesvs.models.registry import TEMPORAL_MODELS
from etesvs.numerics import use_cpu_kernels
from etesvs.params import stage_params
from etesvs.temporal_training import train_temporal
from etesvs.training import RunPaths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(TEMPORAL_MODELS))
    parser.add_argument("--features", type=Path, required=True, help="features.h5 (one (T, D) dataset per video)")
    parser.add_argument("--labels", type=Path, required=True, help="labels directory (labels.h5, info.json)")
    parser.add_argument("--checkpoints", type=Path, required=True, help="directory for last.pt and best.pt")
    parser.add_argument("--predictions", type=Path, required=True, help="directory for probs.h5 and model.json")
    parser.add_argument("--curves", type=Path, required=True, help="CSV of the training curves")
    parser.add_argument("--tensorboard", type=Path, required=True, help="TensorBoard log directory")
    args = parser.parse_args(argv)
    params = stage_params(f"train_temporal@{args.model}")
    print(f"train_temporal@{args.model}: CPU kernels {use_cpu_kernels(params['cpu_kernels'])}")
    paths = RunPaths(checkpoints=args.checkpoints, predictions=args.predictions, curves=args.curves,
                     tensorboard=args.tensorboard)
    dist = setup_distributed()
    try:
        summary = train_temporal(args.model, params, features_file=args.features, labels_dir=args.labels,
                                 paths=paths, dist=dist)
    finally:
        cleanup_distributed()
    if summary:
        print(f"train_temporal: {args.model}, {summary['params']:,} parameters, best epoch {summary['best_epoch']} "
              f"(val acc {summary['val_acc'] or 0:.1f}, F1@50 {summary['val_f1_50'] or 0:.1f}) "
              f"-> {args.predictions / 'probs.h5'}")


if __name__ == "__main__":
    run_main(main)
