"""Stage summarize: one Markdown table comparing the models' reports/<model>/metrics.json, under a caption saying
what the table is (params: ``seed``, ``cpu_kernels``, ``dataset.name``, ``dataset.split``, ``demo.seed``,
``features.weights``, ``streaming.pretrained``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from etesvs.errors import run_main
from etesvs.evaluate import summary_caption, write_summary
from etesvs.io import check_output_file
from etesvs.params import stage_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", type=Path, nargs="+", required=True, help="reports/<model>/metrics.json files")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file, e.g. reports/summary.md")
    args = parser.parse_args()
    check_output_file(args.out, inputs=args.metrics, suffixes=(".md",))
    caption = summary_caption(stage_params("summarize"))
    print(write_summary(args.metrics, args.out, caption=caption), end="")


if __name__ == "__main__":
    run_main(main)
