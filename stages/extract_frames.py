"""Stage extract_frames: decode every labelled video into one JPEG frame container per video."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from etesvs.data.frames import ExtractConfig, extract_frames, video_jobs  # noqa: E402
from etesvs.data.labels import load_label_info  # noqa: E402
from etesvs.data.layout import DatasetLayout, parse_video_path_rules  # noqa: E402
from etesvs.errors import run_main  # noqa: E402
from etesvs.io import check_output_file, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="dataset root in the MS-TCN layout")
    parser.add_argument("--labels", type=Path, required=True, help="labels directory (for the videos and frame counts)")
    parser.add_argument("--out", type=Path, required=True, help="directory of frame containers")
    parser.add_argument("--report", type=Path, required=True, help="JSON report of the run")
    parser.add_argument("--fps", type=float, required=True)
    parser.add_argument("--short-side", type=int, required=True)
    parser.add_argument("--jpeg-quality", type=int, default=3)
    parser.add_argument("--tolerance", type=int, default=5, help="frames by which video and labels may differ")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-bad-videos", type=lambda s: s.lower() in ("1", "true", "yes"), default=False)
    parser.add_argument("--video-path-rules", default="", help="'PATTERN -> REPLACEMENT; ...' (Breakfast's nesting)")
    args = parser.parse_args(argv)
    check_output_file(args.report)
    layout = DatasetLayout(args.root, video_path_rules=parse_video_path_rules(args.video_path_rules))
    info = load_label_info(args.labels)
    config = ExtractConfig(fps=args.fps, short_side=args.short_side, jpeg_quality=args.jpeg_quality, tolerance=args.tolerance)
    results = extract_frames(
        video_jobs(layout, info.num_frames), args.out, config, workers=args.workers,
        skip_bad_videos=args.skip_bad_videos, inputs=[args.root, args.labels],
    )
    warnings = [warning for result in results for warning in result.warnings]
    failed = [result for result in results if result.status == "failed"]
    if warnings:
        print(f"warning: frame count reconciled with the labels for {len(warnings)} videos:", file=sys.stderr)
        for warning in warnings:
            print(f"  {warning}", file=sys.stderr)
    for result in failed:
        print(f"warning: skipped {result.message}", file=sys.stderr)
    write_json(
        args.report,
        {
            "videos": len(results),
            "extracted": sum(r.status == "done" for r in results),
            "already_done": sum(r.status == "skipped" for r in results),
            "frames": sum(r.label_frames for r in results if r.status != "failed"),
            "reconciled": warnings,
            "skipped_bad_videos": [{"video": r.video, "reason": r.message} for r in failed],
        },
    )
    done = sum(r.status == "done" for r in results)
    print(f"extract_frames: {done} decoded, {len(results) - done - len(failed)} already done, {len(failed)} skipped -> {args.out}")


if __name__ == "__main__":
    run_main(main)
