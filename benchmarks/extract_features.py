"""Benchmark of the two I3D feature methods at the demo resolution (short side 96 px: 128 x 96 frames).

For each method it prints the measured frames/s of the whole per-video path (JPEG decoding, scaling to
[-1, 1], I3D, interpolation), the fvcore FLOPs per output frame (one multiply-add counted as one FLOP) and
the achieved GFLOP/s. The best of ``--repeats`` timed runs is reported, after one warm-up run, because the
machine is shared.

    python benchmarks/extract_features.py [--height 96 --width 128 --threads 2 --json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from etesvs.data.frames import FrameReader, write_frame_container
from etesvs.errors import run_main
from etesvs.features import FeatureConfig, build_backbone, flops_per_frame, prepare_model, video_features
from etesvs.io import read_yaml, write_json

ROOT = Path(__file__).resolve().parents[1]


def time_method(model, reader: FrameReader, config: FeatureConfig, device: torch.device, repeats: int) -> float:
    """Best frames/s of ``repeats`` runs over the whole video in ``reader`` (after one warm-up run)."""
    video_features(model, reader, config, device)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        video_features(model, reader, config, device)
        best = min(best, time.perf_counter() - began)
    return reader.num_frames / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--window-frames", type=int, default=8, help="video length timed for the window method")
    parser.add_argument("--chunked-frames", type=int, default=128, help="video length timed for the chunked method")
    parser.add_argument("--window-batch-size", type=int, default=4)
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="window and chunk sizes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are fine for timing
        backbone = build_backbone(None, seed=0)
    model = prepare_model(backbone.model, device)
    features = {key: value for key, value in read_yaml(args.params)["features"].items() if key != "weights"}
    features["crop_size"] = 0  # the whole frame at --width x --height
    methods = {
        "window": (FeatureConfig(**{**features, "method": "window", "batch_size": args.window_batch_size}),
                   args.window_frames),
        "chunked": (FeatureConfig(**{**features, "method": "chunked"}), args.chunked_frames),
    }
    print(
        f"I3D features at {args.width} x {args.height}, {torch.get_num_threads()} threads, device {device}, "
        f"best of {args.repeats}"
    )
    results = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, num_frames) in methods.items():
            path = Path(tmp) / f"{name}.h5"
            frames = rng.integers(0, 256, (num_frames, args.height, args.width, 3), dtype=np.uint8)
            write_frame_container(path, frames, fps=15.0)
            flops = flops_per_frame(model, config, height=args.height, width=args.width)
            with FrameReader(path) as reader:
                fps = time_method(model, reader, config, device, args.repeats)
            results[name] = {
                "frames_per_second": fps,
                "flops_per_frame": flops,
                "gflops_per_second": flops * fps / 1e9,
                "batch_size": config.batch_size,
                "frames_timed": num_frames,
            }
            print(
                f"{name:8s} {fps:8.2f} frames/s  {flops / 1e9:7.3f} GFLOP/frame  {flops * fps / 1e9:6.1f} GFLOP/s  "
                f"(batch {config.batch_size}, {num_frames} frames)",
                flush=True,
            )
    faster = max(results, key=lambda name: results[name]["frames_per_second"])
    ratio = results[faster]["frames_per_second"] / min(r["frames_per_second"] for r in results.values())
    print(f"faster: {faster} ({ratio:.1f}x)")
    if args.json is not None:
        write_json(args.json, {"height": args.height, "width": args.width, "threads": torch.get_num_threads(),
                               "methods": results, "faster": faster})


if __name__ == "__main__":
    run_main(main)
