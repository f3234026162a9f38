"""Effect of each deviation from the published code on the demo: one DVC experiment per row of the README's
deviation tables, switched back to the published behaviour, scored beside the committed defaults.

    python benchmarks/deviations.py run       # queue and run the experiments (DVC reuses every unchanged stage)
    python benchmarks/deviations.py report    # Markdown table: Acc / Edit / F1@50 and the change from the default

Run after `make repro` (the experiments start from the committed pipeline). Each experiment is named
``dev-<row>`` and stays in DVC (`dvc exp show`), so the table can be rebuilt at any time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from etesvs.crossval import collect, run_experiments
from etesvs.errors import run_main
from etesvs.params import project_root
from etesvs.results import workspace_metrics

# row name -> (model, overrides that give the published behaviour)
ROWS = {
    "mstcn-50ep": ("mstcn", ["mstcn.train.epochs=50"]),
    "asrf-50ep": ("asrf", ["asrf.train.epochs=50"]),
    "asrf-4x4-stages": ("asrf", ["asrf.model.num_stages_segmentation=4", "asrf.model.num_stages_boundary=4"]),
    "asrf-softmax-time": ("asrf", ["asrf.loss.smoothing_softmax_over=time"]),
    "asrf-tie-published": ("asrf", ["asrf.model.tie_break=published"]),
    "asformer-120ep": ("asformer", ["asformer.train.epochs=120"]),
    "asformer-mask-published": ("asformer", ["asformer.model.attention_mask=published"]),
    "asformer-3x10": ("asformer", ["asformer.model.num_decoders=3", "asformer.model.num_layers=10"]),
    # this project's behaviour before the defaults became the published code's (issue 13), for comparison
    "asrf-previous": ("asrf", ["asrf.loss.smoothing_weight=0.15", "asrf.loss.similarity_distance=mean_squared",
                               "asrf.loss.smoothing_detach_previous=true", "asrf.loss.stage_reduction=sum",
                               "asrf.loss.class_weighting=inverse_frequency",
                               "asrf.loss.boundary_pos_weighting=negative_ratio", "asrf.model.boundary_min_distance=8",
                               "asrf.model.tie_break=lowest_class"]),
    "asformer-previous": ("asformer", ["asformer.model.decoder_query_key=concat", "asformer.train.weight_decay=0",
                                       "asformer.train.scheduler=none"]),
}
SHOWN = (("acc", "Acc"), ("edit", "Edit"), ("f1_50", "F1@50"))


def run(root: Path) -> None:
    run_experiments({f"dev-{row}": overrides for row, (_, overrides) in ROWS.items()}, root)


def report(root: Path) -> str:
    results = collect({row: f"dev-{row}" for row in ROWS}, root)
    base = workspace_metrics(root, sorted({model for model, _ in ROWS.values()}))
    lines = ["| row | overrides | " + " | ".join(label for _, label in SHOWN) + " |", "|---|---|---|---|---|"]
    for model in sorted(base):
        cells = " | ".join(f"{base[model][key]:.1f}" for key, _ in SHOWN)
        lines.append(f"| {model} (default) | | {cells} |")
    for row, (model, overrides) in ROWS.items():
        scores = results[row].get(model, {})
        cells = " | ".join(f"{scores[key]:.1f} ({scores[key] - base[model][key]:+.1f})" if key in scores else "-"
                           for key, _ in SHOWN)
        lines.append(f"| {row} | `{' '.join(overrides)}` | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "report"))
    args = parser.parse_args(argv)
    root = project_root()
    if args.action == "run":
        run(root)
    sys.stdout.write(report(root))


if __name__ == "__main__":
    run_main(main)
