"""Stage make_pretrain_data: render the procedural pretraining corpus, the demo's stand-in for Kinetics / ImageNet.

Params: ``seed`` and ``pretrain_data`` (etesvs.data.pretrain_corpus.write_corpus).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from etesvs.data.pretrain_corpus import write_corpus
from etesvs.errors import run_main
from etesvs.io import check_output_file, write_json
from etesvs.params import call_with, stage_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="corpus file to write, e.g. data/pretrain/corpus.h5")
    parser.add_argument("--report", type=Path, required=True, help="JSON summary of the corpus (a DVC metric)")
    args = parser.parse_args(argv)
    params = stage_params("make_pretrain_data")
    check_output_file(args.report, suffixes=(".json",))
    summary = call_with(write_corpus, params["pretrain_data"], where="params.yaml: pretrain_data",
                        path=check_output_file(args.out, suffixes=(".h5",)), seed=params["seed"])  # fmt: skip
    write_json(args.report, summary)
    print(f"make_pretrain_data: {summary['clips']} clips of {summary['num_frames']} frames, "
          f"{summary['classes']} motion classes -> {args.out}")


if __name__ == "__main__":
    run_main(main)
