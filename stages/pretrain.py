"""Stage pretrain@{i3d,mobilenet_v2}: supervised pretraining of a backbone on the corpus, weights in the real format.

Params: ``seed`` and ``pretrain.<backbone>``. Writes the weights (pytorch-i3d ``rgb_imagenet.pt`` layout for I3D, a
torchvision MobileNetV2 state dict), checkpoints (an interrupted run resumes), curves (DVC plots), TensorBoard logs
a metrics JSON with the held-out corpus scores and a report of the weights (origin, SHA-256, epochs, corpus).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from etesvs.distributed import DistInfo
from etesvs.errors import run_main
from etesvs.io import check_output_file, write_json
from etesvs.numerics import use_cpu_kernels
from etesvs.params import stage_params
from etesvs.pretrain import BACKBONES, pretrain_backbone
from etesvs.training import RunPaths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True, choices=BACKBONES)
    parser.add_argument("--corpus", type=Path, required=True, help="corpus file of make_pretrain_data")
    parser.add_argument("--weights", type=Path, required=True, help="weights file to write")
    parser.add_argument("--checkpoints", type=Path, required=True, help="directory for last.pt and best.pt")
    parser.add_argument("--curves", type=Path, required=True, help="CSV of the training curves")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON of the held-out scores (a DVC metric)")
    parser.add_argument("--report", type=Path, required=True, help="JSON saying what the weights are")
    parser.add_argument("--tensorboard", type=Path, required=True, help="TensorBoard log directory")
    args = parser.parse_args(argv)
    params = stage_params(f"pretrain@{args.backbone}")
    kernels = use_cpu_kernels(params["cpu_kernels"])
    for path in (args.metrics, args.report):
        check_output_file(path, inputs=[args.corpus], suffixes=(".json",))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_distributed=False)
    paths = RunPaths(checkpoints=args.checkpoints, predictions=args.checkpoints, curves=args.curves,
                     tensorboard=args.tensorboard)  # fmt: skip
    result = pretrain_backbone(args.backbone, params["pretrain"][args.backbone], seed=params["seed"],
                               corpus_path=args.corpus, weights_path=args.weights, paths=paths, dist=dist)
    write_json(args.report, {**result["weights"], "cpu_kernels": kernels})
    write_json(args.metrics, result["metrics"])
    metrics = result["metrics"]
    print(f"pretrain {args.backbone}: held-out motion error {metrics['motion_err']:.4f}, motion-class "
          f"accuracy {metrics['corpus_acc']:.1f} % (best epoch {result['weights']['best_epoch']}) -> {args.weights}")


if __name__ == "__main__":
    run_main(main)
