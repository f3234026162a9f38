"""Stage extract_features: per-frame I3D RGB features (Mixed_5c, 1024-d) of every labelled video into HDF5.

Runs as one process or under torchrun (each rank extracts videos[rank::world_size], rank 0 merges):

    torchrun --nproc_per_node 2 --standalone stages/extract_features.py --frames data/frames ...
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from etesvs.data.frames import FrameReader, frames_path  # noqa: E402
from etesvs.data.labels import load_label_info  # noqa: E402
from etesvs.engine import cleanup_distributed, setup_distributed  # noqa: E402
from etesvs.errors import EtesvsError, run_main  # noqa: E402
from etesvs.features import (  # noqa: E402
    DTYPES,
    FEATURES_FILE,
    METHODS,
    FeatureConfig,
    build_backbone,
    calibrate_batch_norm,
    extract_features,
    flops_per_frame,
    run_summary,
)
from etesvs.io import write_json  # noqa: E402


def crop_size(text: str) -> int | None:
    """``--crop-size``: a positive int, or 0 / "" / "none" / "null" for the full frame."""
    if text.strip().lower() in ("", "0", "none", "null"):
        return None
    return int(text)


def resolve_device(name: str, default: torch.device) -> torch.device:
    """``auto`` is the device torchrun's set-up chose (CUDA when available, else CPU)."""
    if name == "auto":
        return default
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EtesvsError(f"--device {name}: CUDA is not available on this machine")
    return device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=Path, required=True, help="directory of frame containers")
    parser.add_argument("--labels", type=Path, required=True, help="labels directory (info.json: train + test videos)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (features.h5, info.json)")
    parser.add_argument("--weights", default="", help="I3D RGB checkpoint (pytorch-i3d rgb_imagenet.pt); empty: random")
    parser.add_argument("--method", choices=METHODS, default="chunked")
    parser.add_argument("--batch-size", type=int, default=2, help="clips per forward pass")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--crop-size", type=crop_size, default=None, help="square centre crop; 0 = full frame")
    parser.add_argument("--window-size", type=int, default=21)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--chunk-context", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation without weights")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--metrics", type=Path, default=None, help="also write the run summary here (DVC metrics)")
    args = parser.parse_args(argv)

    config = FeatureConfig(
        method=args.method,
        batch_size=args.batch_size,
        dtype=args.dtype,
        crop_size=args.crop_size,
        window_size=args.window_size,
        chunk_size=args.chunk_size,
        chunk_context=args.chunk_context,
    )
    info = load_label_info(args.labels)
    videos = list(dict.fromkeys(info.train + info.test))
    if not videos:
        raise EtesvsError(f"{args.labels / 'info.json'}: no train or test videos")
    dist = setup_distributed()
    try:
        device = resolve_device(args.device, dist.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backbone = build_backbone(args.weights or None, seed=args.seed)
        backbone = calibrate_batch_norm(backbone, args.frames, info.train, config)
        if dist.is_main:
            for warning in caught:
                print(f"warning: {warning.message}", file=sys.stderr)
        stats = extract_features(
            videos,
            frames_dir=args.frames,
            out_dir=args.out,
            backbone=backbone,
            config=config,
            dist=dist,
            device=device,
            num_frames=info.num_frames,
        )
    finally:
        cleanup_distributed()
    if stats is None:  # not rank 0
        return
    with FrameReader(frames_path(args.frames, videos[0])) as reader:
        height, width = reader.height, reader.width
    flops = flops_per_frame(backbone.model, config, height=height, width=width)
    summary = run_summary(stats, backbone=backbone, config=config, flops=flops, videos=len(videos))
    write_json(args.out / "info.json", summary)
    if args.metrics is not None:
        write_json(args.metrics, summary)
    speed = f"{summary['frames_per_second']:.1f} frames/s" if summary["frames_per_second"] else "nothing to compute"
    print(
        f"extract_features: {len(videos)} videos ({summary['videos_computed']} computed, "
        f"{summary['videos_reused']} reused), {config.method}, {speed}, "
        f"{flops / 1e9:.2f} GFLOP/frame -> {args.out / FEATURES_FILE}"
    )


if __name__ == "__main__":
    run_main(main)
