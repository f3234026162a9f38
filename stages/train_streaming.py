"""Stage train_streaming: train the end-to-end streaming model (ETESVS) on frames and predict the test split.

Runs as one process, or under ``torchrun --nproc_per_node N stages/train_streaming.py ...`` with the videos of
every batch shared among the processes (Gloo on the CPU, NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from etesvs.engine import cleanup_distributed, setup_distributed  # noqa: E402
from etesvs.errors import run_main  # noqa: E402
from etesvs.models.streaming import HEADS, NORMS  # noqa: E402
from etesvs.streaming_engine import OutputPaths, StreamingConfig, train_streaming  # noqa: E402


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    paths = parser.add_argument_group("paths")
    paths.add_argument("--frames", type=Path, required=True, help="directory of frame containers")
    paths.add_argument("--labels", type=Path, required=True, help="labels directory")
    paths.add_argument("--checkpoints", type=Path, required=True, help="directory for last.pt and best.pt")
    paths.add_argument("--predictions", type=Path, required=True, help="directory for probs.h5 and model.json")
    paths.add_argument("--curves", type=Path, required=True, help="CSV of the training curves")
    paths.add_argument("--summary", type=Path, required=True, help="JSON summary of the run (DVC metrics)")
    paths.add_argument("--tensorboard", type=Path, required=True, help="TensorBoard log directory")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=StreamingConfig.epochs)
    training.add_argument("--lr", type=float, default=StreamingConfig.lr)
    training.add_argument("--weight-decay", type=float, default=StreamingConfig.weight_decay)
    training.add_argument("--batch-videos", type=int, default=StreamingConfig.batch_videos)
    training.add_argument("--window", type=int, default=StreamingConfig.window, help="frames per window")
    training.add_argument("--sample-rate", type=int, default=StreamingConfig.sample_rate)
    training.add_argument(
        "--image-size", type=int, default=StreamingConfig.image_size, help="side of the square network input"
    )
    training.add_argument("--num-workers", type=int, default=StreamingConfig.num_workers)
    training.add_argument("--val-fraction", type=float, default=StreamingConfig.val_fraction)
    training.add_argument("--update-every", type=int, default=StreamingConfig.update_every,
                          help="optimiser step every N windows (0: once per group of videos)")
    training.add_argument("--interleave", type=int, default=StreamingConfig.interleave,
                          help="groups of videos in flight at once, their windows alternating")
    training.add_argument("--augment", type=_flag, default=StreamingConfig.augment,
                          help="random resized crops and colour jitter in training")
    training.add_argument("--flip", type=_flag, default=StreamingConfig.flip, help="random horizontal flips")
    training.add_argument(
        "--pretrained", default="", help="'' (random init), 'torchvision', or a MobileNetV2 state dict file"
    )
    training.add_argument("--amp", choices=("auto", "off", "bf16"), default="auto")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument(
        "--num-threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)"
    )
    model = parser.add_argument_group("model")
    model.add_argument("--width-mult", type=float, default=1.0)
    model.add_argument("--temporal-shift", type=_flag, default=False)
    model.add_argument("--memory-channels", type=int, default=64)
    model.add_argument("--head", choices=HEADS, default="causal_tcn")
    model.add_argument("--head-layers", type=int, default=6)
    model.add_argument("--head-channels", type=int, default=64)
    model.add_argument("--dropout", type=float, default=0.5)
    model.add_argument("--norm", choices=NORMS, default="batch")
    args = parser.parse_args(argv)

    config = StreamingConfig(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_videos=args.batch_videos,
        window=args.window,
        sample_rate=args.sample_rate,
        image_size=args.image_size,
        num_workers=args.num_workers,
        val_fraction=args.val_fraction,
        augment=args.augment,
        flip=args.flip,
        update_every=args.update_every,
        interleave=args.interleave,
        pretrained=args.pretrained,
        amp=args.amp,
        seed=args.seed,
    )
    model_args = {
        "width_mult": args.width_mult,
        "temporal_shift": args.temporal_shift,
        "memory_channels": args.memory_channels,
        "head": args.head,
        "head_layers": args.head_layers,
        "head_channels": args.head_channels,
        "dropout": args.dropout,
        "norm": args.norm,
    }
    outputs = OutputPaths(
        checkpoint_dir=args.checkpoints,
        curves=args.curves,
        tensorboard_dir=args.tensorboard,
        predictions_dir=args.predictions,
        summary=args.summary,
    )
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    dist = setup_distributed()
    try:
        summary = train_streaming(
            config, model_args, frames_dir=args.frames, labels_dir=args.labels, outputs=outputs, dist=dist
        )
    finally:
        cleanup_distributed()
    if dist.is_main:
        print(
            f"train_streaming: best epoch {summary['best_epoch']} of {config.epochs} "
            f"({summary['train_seconds']:.0f} s of training) -> {args.predictions / 'probs.h5'}"
        )


if __name__ == "__main__":
    run_main(main)
