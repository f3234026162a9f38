"""Stage extract_frames: decode every labelled video into one JPEG frame container per video.

Params: ``dataset.fps``, ``dataset.image_size`` (short side), ``dataset.video_path_rules`` and ``frames``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from etesvs.data.frames import ExtractConfig, extract_frames, video_jobs
from etesvs.data.labels import load_label_info
from etesvs.data.layout import DatasetLayout, parse_video_path_rules
from etesvs.errors import run_main
from etesvs.io import check_output_file, write_json
from etesvs.params import stage_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="dataset root in the MS-TCN layout")
    parser.add_argument("--labels", type=Path, required=True, help="labels directory (the videos and frame counts)")
    parser.add_argument("--out", type=Path, required=True, help="directory of frame containers")
    parser.add_argument("--report", type=Path, required=True, help="JSON report of the run")
    args = parser.parse_args(argv)
    check_output_file(args.report, inputs=[args.root, args.labels], suffixes=(".json",))
    params = stage_params("extract_frames")
    dataset, frames = params["dataset"], params["frames"]
    layout = DatasetLayout(args.root, video_path_rules=parse_video_path_rules(dataset["video_path_rules"]))
    config = ExtractConfig(fps=dataset["fps"], short_side=dataset["image_size"], jpeg_quality=frames["jpeg_quality"],
                           tolerance=frames["tolerance"])
    jobs = video_jobs(layout, load_label_info(args.labels).num_frames, skip_missing=frames["skip_bad_videos"],
                      listed_in=args.labels / "info.json")
    results = extract_frames(jobs, args.out, config,
                             workers=frames["workers"], skip_bad_videos=frames["skip_bad_videos"],
                             inputs=[args.root, args.labels])
    reconciled = [warning for result in results for warning in result.warnings]
    failed = [result for result in results if result.status == "failed"]
    if reconciled:
        print(f"warning: frame count reconciled with the labels for {len(reconciled)} videos:", file=sys.stderr)
        for warning in reconciled:
            print(f"  {warning}", file=sys.stderr)
    for result in failed:
        print(f"warning: skipped {result.message}", file=sys.stderr)
    write_json(args.report, {
        "videos": len(results),
        "frames": sum(r.label_frames for r in results if r.status != "failed"),
        "reconciled": reconciled,
        "skipped_bad_videos": [{"video": r.video, "reason": r.message} for r in failed],
    })
    done = sum(r.status == "done" for r in results)
    print(f"extract_frames: {done} decoded, {len(results) - done - len(failed)} already done, {len(failed)} skipped "
          f"-> {args.out}")


if __name__ == "__main__":
    run_main(main)
