"""Stage convert_labels: groundTruth text to class-id and boundary arrays and localization JSON.

Params: ``dataset.name``, ``dataset.split``, ``dataset.fps``, ``dataset.background`` (comma-separated names).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from etesvs.data.labels import convert_labels
from etesvs.data.layout import DatasetLayout
from etesvs.errors import run_main
from etesvs.params import stage_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="dataset root in the MS-TCN layout")
    parser.add_argument("--out", type=Path, required=True, help="labels directory to write")
    args = parser.parse_args(argv)
    dataset = stage_params("convert_labels")["dataset"]
    background = [name.strip() for name in dataset["background"].split(",") if name.strip()]
    info = convert_labels(DatasetLayout(args.root), args.out, dataset=dataset["name"], split=dataset["split"],
                          fps=dataset["fps"], background=background)
    print(
        f"convert_labels: {len(info.num_frames)} videos, {sum(info.num_frames.values())} frames, "
        f"{info.num_classes} classes; split {info.split}: {len(info.train)} train, {len(info.test)} test -> {args.out}"
    )


if __name__ == "__main__":
    run_main(main)
