"""Stage convert_labels: groundTruth text to class-id and boundary arrays and localization JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etesvs.data.labels import convert_labels  # noqa: E402
from etesvs.data.layout import DatasetLayout  # noqa: E402
from etesvs.errors import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="dataset root in the MS-TCN layout")
    parser.add_argument("--out", type=Path, required=True, help="labels directory to write")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", type=int, required=True)
    parser.add_argument("--fps", type=float, required=True)
    parser.add_argument("--background", default="", help="comma-separated background class names")
    args = parser.parse_args(argv)
    background = [name.strip() for name in args.background.split(",") if name.strip()]
    layout = DatasetLayout(args.root)
    info = convert_labels(layout, args.out, dataset=args.dataset, split=args.split, fps=args.fps, background=background)
    frames = sum(info.num_frames.values())
    print(
        f"convert_labels: {len(info.num_frames)} videos, {frames} frames, {info.num_classes} classes; "
        f"split {info.split}: {len(info.train)} train, {len(info.test)} test -> {args.out}"
    )


if __name__ == "__main__":
    run_main(main)
