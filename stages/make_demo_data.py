"""Stage make_demo_data: generate the embedded demo dataset in the MS-TCN layout (params: ``demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from etesvs.data.demo import DemoConfig, generate_demo_dataset
from etesvs.errors import run_main
from etesvs.params import call_with, stage_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to (re)create, e.g. data/raw/demo")
    args = parser.parse_args(argv)
    config = call_with(DemoConfig, stage_params("make_demo_data")["demo"], where="params.yaml: demo")
    videos = generate_demo_dataset(args.out, config)
    print(f"make_demo_data: {len(videos)} videos -> {args.out}")


if __name__ == "__main__":
    run_main(main)
