"""Stage make_demo_data: generate the embedded demo dataset in the MS-TCN layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from etesvs.data.demo import DemoConfig, generate_demo_dataset
from etesvs.errors import run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to (re)create, e.g. data/raw/demo")
    parser.add_argument("--num-videos", type=int, default=defaults.num_videos)
    parser.add_argument("--num-subjects", type=int, default=defaults.num_subjects, help="also the number of splits")
    parser.add_argument("--min-seconds", type=float, default=defaults.min_seconds, help="shortest video length")
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds, help="longest video length")
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--height", type=int, default=defaults.height)
    parser.add_argument("--fps", type=float, default=defaults.fps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = DemoConfig(
        num_videos=args.num_videos,
        num_subjects=args.num_subjects,
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
        width=args.width,
        height=args.height,
        fps=args.fps,
        seed=args.seed,
    )
    videos = generate_demo_dataset(args.out, config, progress=not args.no_progress)
    print(f"wrote {len(videos)} videos to {args.out}")


if __name__ == "__main__":
    run_main(main)
