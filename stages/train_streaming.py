"""Stage train_streaming: train the end-to-end streaming model (ETESVS) on frames and predict the test split.

Params: ``seed``, ``window`` and ``streaming``. Runs as one process, or under
``torchrun --nproc_per_node N stages/train_streaming.py ...`` with the videos of every batch shared among the
processes (Gloo on the CPU, NCCL on GPUs).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from etesvs.distributed import cleanup_distributed, setup_distributed
from etesvs.errors import run_main
from etesvs.numerics import use_cpu_kernels
from etesvs.params import stage_params
from etesvs.streaming_training import train_streaming
from etesvs.training import RunPaths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=Path, required=True, help="directory of frame containers")
    parser.add_argument("--labels", type=Path, required=True, help="labels directory")
    parser.add_argument("--checkpoints", type=Path, required=True, help="directory for last.pt and best.pt")
    parser.add_argument("--predictions", type=Path, required=True, help="directory for probs.h5 and model.json")
    parser.add_argument("--curves", type=Path, required=True, help="CSV of the training curves")
    parser.add_argument("--tensorboard", type=Path, required=True, help="TensorBoard log directory")
    args = parser.parse_args(argv)
    params = stage_params("train_streaming")
    print(f"train_streaming: CPU kernels {use_cpu_kernels(params['cpu_kernels'])}")
    paths = RunPaths(checkpoints=args.checkpoints, predictions=args.predictions, curves=args.curves,
                     tensorboard=args.tensorboard)
    dist = setup_distributed()
    try:
        summary = train_streaming(params, frames_dir=args.frames, labels_dir=args.labels, paths=paths, dist=dist)
    finally:
        cleanup_distributed()
    if summary:
        print(f"train_streaming: {summary['params']:,} parameters, best epoch {summary['best_epoch']} of "
              f"{summary['epochs']} -> {args.predictions / 'probs.h5'}")


if __name__ == "__main__":
    run_main(main)
