"""The results as a person reads them: the models side by side, and the experiments with only what matters.

    python -m etesvs.results        (or `make results`)
    python -m etesvs.results --compare HEAD [--tolerance 3]

First the models of the workspace (``reports/<model>/metrics.json``: every metric, sizes in readable units), then
one line per DVC experiment and baseline commit with the params it changed and each model's F1@50 / Edit / Acc,
instead of `dvc exp show`'s hundreds of columns.

With ``--compare REV`` it checks instead whether this machine reproduced the table committed at REV: after
`make repro`, each model's Acc, Edit and F1@10/25/50 in the workspace beside those committed, and the largest
difference; exit status 1 if any differs by more than ``--tolerance`` points (CI prints it for its own machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any, Sequence

from etesvs.errors import EtesvsError, run_main
from etesvs.evaluate import SUMMARY_COLUMNS, summary_rows
from etesvs.io import read_json
from etesvs.params import project_root

MODELS = ("mstcn", "asrf", "asformer", "frame_classifier", "etesvs")
EXPERIMENT_METRICS = ("f1_50", "edit", "acc")
REPRODUCED_METRICS = ("acc", "edit", "f1_10", "f1_25", "f1_50")
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
    """Every model's metrics in the workspace, one row each (and the streaming model's plain argmax)."""
    rows = []
    for model in MODELS:
        path = root / "reports" / model / "metrics.json"
        if not path.is_file():
            continue
        rows.extend(summary_rows(model, read_json(path)))
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


def committed_metrics(root: Path, rev: str) -> dict[str, dict[str, Any]]:
    """Each model's ``reports/<model>/metrics.json`` as committed at git revision ``rev``."""
    metrics = {}
    for model in MODELS:
        name = f"reports/{model}/metrics.json"
        result = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{name}"], capture_output=True, text=True)
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["git show failed"])[-1]
            raise EtesvsError(f"{name} at {rev}: not committed ({detail})")
        try:
            metrics[model] = json.loads(result.stdout)
        except json.JSONDecodeError as error:
            raise EtesvsError(f"{name} at {rev}: not JSON ({error})") from None
    return metrics


def compare_metrics(
    committed: dict[str, dict[str, Any]], reproduced: dict[str, dict[str, Any]], tolerance: float
) -> tuple[str, bool]:
    """A table of committed vs reproduced scores per model, and whether every difference is within tolerance."""
    header = ["model", *(f"{m} committed/here" for m in REPRODUCED_METRICS), "max |diff|"]
    rows, ok = [], True
    for model in MODELS:
        before, after = committed[model], reproduced[model]
        diffs, cells = [], [model]
        for metric in REPRODUCED_METRICS:
            if metric not in before or metric not in after:
                raise EtesvsError(f"reports/{model}/metrics.json: no {metric!r}")
            diffs.append(abs(float(after[metric]) - float(before[metric])))
            cells.append(f"{float(before[metric]):.1f}/{float(after[metric]):.1f}")
        worst = max(diffs)
        ok = ok and worst <= tolerance
        rows.append([*cells, f"{worst:.1f}" + ("" if worst <= tolerance else " (over)")])
    return _table(header, rows), ok


def workspace_metrics(root: Path, models: Sequence[str] = MODELS) -> dict[str, dict[str, Any]]:
    """Each model's ``reports/<model>/metrics.json`` in the workspace; every one must exist."""
    metrics = {}
    for model in models:
        path = root / "reports" / model / "metrics.json"
        if not path.is_file():
            raise EtesvsError(f"{path}: missing (run `make repro` first)")
        metrics[model] = read_json(path)
    return metrics


def compare(root: Path, rev: str, tolerance: float) -> bool:
    """Print how the workspace's metrics compare with those committed at ``rev``; True if all are within."""
    table, ok = compare_metrics(committed_metrics(root, rev), workspace_metrics(root), tolerance)
    print(f"Reproduced here (workspace) against committed at {rev}, percent points:\n")
    print(table)
    verdict = "every score within" if ok else "NOT every score within"
    print(f"\n{verdict} {tolerance:g} points of the committed table")
    return ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-experiments", action="store_true", help="only the models of the workspace")
    parser.add_argument("--compare", metavar="REV", help="compare the workspace's scores with those committed at REV")
    parser.add_argument("--tolerance", type=float, default=3.0, help="points allowed by --compare (default 3)")
    args = parser.parse_args(argv)
    root = project_root()
    if args.compare:
        if not compare(root, args.compare, args.tolerance):
            raise SystemExit(1)
        return
    print(f"Models ({root / 'reports'}, percent):\n")
    print(models_table(root))
    if not args.no_experiments:
        print("\nCommits and experiments (`dvc exp show` for every column):\n")
        print(experiments_table(root))


if __name__ == "__main__":
    run_main(main)
