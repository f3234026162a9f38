"""Stage check_dataset: stop with one line, before any stage removes its outputs, when the dataset is not there.

Params: ``dataset.name``, ``dataset.root`` and ``dataset.split``. DVC removes a stage's outputs before it runs and
only then finds a missing input, so this check runs first and every later stage depends on its small report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from etesvs.data.layout import DatasetLayout, check_dataset
from etesvs.errors import run_main
from etesvs.io import check_output_file, write_json
from etesvs.params import stage_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON of what was found")
    args = parser.parse_args(argv)
    dataset = stage_params("check_dataset")["dataset"]
    check_output_file(args.out, suffixes=(".json",))
    found = check_dataset(DatasetLayout(Path(dataset["root"])), name=dataset["name"], split=dataset["split"])
    write_json(args.out, {"dataset": dataset["name"], "root": dataset["root"], "split": dataset["split"], **found})
    print(f"check_dataset: {dataset['name']} at {dataset['root']}: {found['videos']} videos, "
          f"{found['label_files']} label files, {found['classes']} classes")


if __name__ == "__main__":
    run_main(main)
