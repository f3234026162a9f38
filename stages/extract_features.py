"""Stage extract_features: per-frame I3D RGB features (Mixed_5c, 1024-d) of every labelled video into HDF5.

Params: ``seed`` (random initialisation without weights) and ``features``. Runs as one process or under torchrun
(each rank extracts videos[rank::world_size], rank 0 merges):

    torchrun --nproc_per_node 2 --standalone stages/extract_features.py --frames data/frames ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from etesvs.distributed import cleanup_distributed, setup_distributed
from etesvs.errors import run_main
from etesvs.features import FEATURES_FILE, extract_dataset_features
from etesvs.numerics import use_cpu_kernels
from etesvs.params import stage_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=Path, required=True, help="directory of frame containers")
    parser.add_argument("--labels", type=Path, required=True, help="labels directory (info.json: train + test videos)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (features.h5, info.json)")
    args = parser.parse_args(argv)
    params = stage_params("extract_features")
    print(f"extract_features: CPU kernels {use_cpu_kernels(params['cpu_kernels'])}")
    dist = setup_distributed()
    try:
        result = extract_dataset_features(params["features"], seed=params["seed"], frames_dir=args.frames,
                                          labels_dir=args.labels, out_dir=args.out, dist=dist)
    finally:
        cleanup_distributed()
    if result is not None:
        info, speed = result
        rate = f"{speed['frames_per_second']:.1f} frames/s" if speed["frames_per_second"] else "nothing to compute"
        print(f"extract_features: {info['videos']} videos ({speed['videos_computed']} computed, "
              f"{speed['videos_reused']} reused), {info['method']}, {rate}, "
              f"{(info['flops_per_frame'] or 0) / 1e9:.3f} GFLOP/frame -> {args.out / FEATURES_FILE}")


if __name__ == "__main__":
    run_main(main)
