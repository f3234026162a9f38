"""The results as a person reads them: the models side by side, and the experiments with only what matters.

    python -m etesvs.results        (or `make results`)

First the models of the workspace (``reports/<model>/metrics.json``: every metric, sizes in readable units), then
one line per DVC experiment and baseline commit with the params it changed and each model's F1@50 / Edit / Acc,
instead of `dvc exp show`'s hundreds of columns.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from etesvs.errors import EtesvsError, run_main
from etesvs.evaluate import SUMMARY_COLUMNS, format_count
from etesvs.io import read_json
from etesvs.params import project_root

MODELS = ("mstcn", "asrf", "asformer", "frame_classifier", "etesvs")
EXPERIMENT_METRICS = ("f1_50", "edit", "acc")
_META = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain text columns, left-aligned first column, right-aligned others."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = []
    for row in (header, *rows):
        cells = [str(row[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def models_table(root: Path) -> str:
    """Every model's metrics in the workspace, one row each."""
    rows = []
    for model in MODELS:
        path = root / "reports" / model / "metrics.json"
        if not path.is_file():
            continue
        metrics = read_json(path)
        cells = [model]
        for _, key in SUMMARY_COLUMNS[1:]:
            value = metrics.get(key)
            if key in ("params_m", "mflops"):
                cells.append(format_count(None if value is None else value * 1e6))
            else:
                cells.append("-" if value is None else f"{value:.1f}")
        rows.append(cells)
    if not rows:
        raise EtesvsError(f"{root / 'reports'}: no reports/<model>/metrics.json yet (run `make repro`)")
    return _table([name for name, _ in SUMMARY_COLUMNS], rows)


def _changed(rows: list[dict[str, Any]]) -> list[str]:
    """Params whose value differs between the rows."""
    keys = [key for key in rows[0] if key not in _META and ":" not in key]
    return [key for key in keys if len({repr(row.get(key)) for row in rows}) > 1]


def experiments_table(root: Path) -> str:
    """One row for the workspace, each baseline commit and each experiment: its name, the params that differ
    between the rows, and each model's F1@50/Edit/Acc."""
    import dvc.api

    rows = dvc.api.exp_show(repo=str(root))
    if not rows:  # a repository without commits
        return "(nothing to compare yet: commit the results, or run `dvc exp run -S ...`)"
    changed = _changed(rows)
    header = ["experiment", *changed, *(f"{model} F1@50/Edit/Acc" for model in MODELS)]
    lines = []
    for row in rows:
        rev = str(row.get("rev"))
        name = row.get("Experiment") or (rev if rev == "workspace" else rev[:7])  # a commit by its short hash
        cells = [name if row.get("typ") == "baseline" else f"  {name}", *(str(row.get(key)) for key in changed)]
        for model in MODELS:
            values = [row.get(f"reports/{model}/metrics.json:{metric}") for metric in EXPERIMENT_METRICS]
            cells.append("/".join("-" if v is None else f"{float(v):.1f}" for v in values))
        lines.append(cells)
    return _table(header, lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-experiments", action="store_true", help="only the models of the workspace")
    args = parser.parse_args(argv)
    root = project_root()
    print(f"Models ({root / 'reports'}, percent):\n")
    print(models_table(root))
    if not args.no_experiments:
        print("\nCommits and experiments (`dvc exp show` for every column):\n")
        print(experiments_table(root))


if __name__ == "__main__":
    run_main(main)
