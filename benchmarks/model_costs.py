"""Benchmark: parameters and FLOPs per frame of every row of the papers' tables, at the papers' resolution.

No training: each model is built from its experiment's configuration (``conf/experiment/<row>_<dataset>.yaml``)
with random weights and counted with fvcore (:func:`etesvs.profiling.count_flops`: one multiply-add = one FLOP).
Beside each row stand the figures the ETESVS authors published (SVTAS doc/benckmark.md @dfa1f9c, README @0c4a8f0),
and what each count includes.

    python benchmarks/model_costs.py [--dataset gtea] [--length 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

from etesvs.io import read_yaml
from etesvs.models.i3d import FEATURE_DIM, InceptionI3d
from etesvs.models.registry import TEMPORAL_MODELS
from etesvs.models.streaming import StreamingSegmenter, WindowLogits
from etesvs.params import compose
from etesvs.profiling import count_flops, count_parameters

ROOT = Path(__file__).resolve().parents[1]
CLASSES = {"gtea": 11, "50salads": 19, "breakfast": 48}
# (params in millions, GFLOPs per frame) as the ETESVS authors list them, with what their count includes.
PUBLISHED = {
    "mstcn": (25.372, 4.0863, "two-stream I3D (24.575M) on 64 frames / 64 + MS-TCN head"),
    "asrf": (25.875, 4.0913, "two-stream I3D + ASRF head"),
    "asformer": (25.706, None, "two-stream I3D + ASFormer head (FLOPs not given)"),
    "etesvs": (2.372, 0.3191, "TSM + memory TCN (SETE), one 32-frame window / 32 fed frames"),
}


def experiment_params(row: str, dataset: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        compose([f"experiment={row}_{dataset}"], out=Path(tmp) / "params.yaml", root=ROOT)
        return read_yaml(Path(tmp) / "params.yaml")


def i3d_costs(params: dict) -> tuple[int, float, float]:
    """I3D RGB: parameters, FLOPs per frame with the 21-frame window (one clip per frame), and the seed's way of
    counting (one 64-frame clip divided by 64)."""
    model = InceptionI3d(in_channels=3, num_classes=None)
    crop = params["features"]["crop_size"]
    window = params["features"]["window_size"]
    per_window_clip = count_flops(model, (torch.zeros(1, 3, window, crop, crop),))
    per_64 = count_flops(model, (torch.zeros(1, 3, 64, crop, crop),))
    return count_parameters(model), per_window_clip, per_64 / 64


def temporal_costs(row: str, params: dict, *, num_classes: int, length: int, in_channels: int) -> tuple[int, float]:
    """A temporal model: parameters and FLOPs per step on a sequence of ``length`` steps of ``in_channels``."""
    model = TEMPORAL_MODELS[row](in_channels=in_channels, num_classes=num_classes, **params[row]["model"])
    flops = count_flops(model, (torch.zeros(1, in_channels, length), torch.ones(1, 1, length)))
    return count_parameters(model), flops / length


def streaming_costs(params: dict, *, num_classes: int) -> tuple[int, float, float]:
    """ETESVS: parameters, FLOPs per video frame and per fed frame of one window."""
    model = StreamingSegmenter(num_classes=num_classes, **params["streaming"]["model"]).eval()
    fed = params["window"] // params["streaming"]["data"]["sample_rate"]
    size = params["streaming"]["data"]["image_size"]
    flops = count_flops(WindowLogits(model), (torch.zeros(1, fed, 3, size, size), torch.ones(1, fed, dtype=torch.bool)))
    return count_parameters(model), flops / params["window"], flops / fed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(CLASSES), default="gtea")
    parser.add_argument("--length", type=int, default=1000, help="sequence length (steps) for the temporal models")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)
    classes = CLASSES[args.dataset]
    base = experiment_params("mstcn", args.dataset)
    i3d_params, i3d_window, i3d_amortized = i3d_costs(base)
    print(f"{args.dataset}, {classes} classes, fvcore FLOPs (multiply-adds), paper resolution, random weights\n")
    print(f"I3D RGB (224 crop): {i3d_params / 1e6:.2f}M params; {i3d_window / 1e9:.2f} GFLOPs per frame with the "
          f"21-frame window (a whole clip per frame), {i3d_amortized / 1e9:.3f} GFLOPs per frame as one 64-frame "
          f"clip / 64 (how the seed counts); two-stream (RGB + flow, the papers' 2048-d features) is about twice both\n")
    header = f"{'row':<10}{'params':>10}{'GFLOPs/frame':>14}   {'seed params':>11}{'seed GFLOPs':>12}   seed counts"
    print(header)
    print("-" * len(header))
    for row in ("mstcn", "asrf", "asformer"):
        params = experiment_params(row, args.dataset)
        head_params, head_flops = temporal_costs(row, params, num_classes=classes, length=args.length,
                                                 in_channels=2 * FEATURE_DIM)
        total_params, total_flops = 2 * i3d_params + head_params, 2 * i3d_amortized + head_flops
        seed_params, seed_flops, what = PUBLISHED[row]
        print(f"{row:<10}{total_params / 1e6:>9.2f}M{total_flops / 1e9:>14.3f}   {seed_params:>10.3f}M"
              f"{'-' if seed_flops is None else f'{seed_flops:.4f}':>12}   {what}")
        print(f"{'':<10}(head alone: {head_params / 1e6:.3f}M params, {head_flops / 1e6:.2f} MFLOPs per step of "
              f"{args.length}; I3D counted two-stream, 64-frame clips / 64, as the seed does)")
    params = experiment_params("etesvs", args.dataset)
    total_params, per_frame, per_fed = streaming_costs(params, num_classes=classes)
    seed_params, seed_flops, what = PUBLISHED["etesvs"]
    print(f"{'etesvs':<10}{total_params / 1e6:>9.2f}M{per_frame / 1e9:>14.3f}   {seed_params:>10.3f}M"
          f"{seed_flops:>12.4f}   {what}")
    print(f"{'':<10}(per fed frame: {per_fed / 1e9:.3f} GFLOPs; window {params['window']} frames at sample rate "
          f"{params['streaming']['data']['sample_rate']}; MobileNetV2 x{params['streaming']['model']['width_mult']} TSM at "
          f"{params['streaming']['data']['image_size']} px)")


if __name__ == "__main__":
    main()
