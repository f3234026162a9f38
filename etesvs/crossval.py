"""Cross-validation the way the papers report it: every split of a dataset, then mean and spread over splits.

    python -m etesvs.crossval run [OVERRIDE ...]      # one queued DVC experiment per split, then run the queue
    python -m etesvs.crossval report [OVERRIDE ...]   # reports/crossval.md and reports/crossval.json

``run`` queues ``dvc exp run --queue -S dataset.split=K [OVERRIDE ...]`` for K = 1 .. ``dataset.num_splits`` of
the composed configuration (with the overrides, e.g. ``dataset=gtea experiment=mstcn_gtea``), names each
experiment ``cv-<dataset>-<experiment>-split<K>`` and runs the queue one experiment at a time. ``report`` reads
those experiments' metrics (``dvc exp show``) and writes, per model, the mean and standard deviation over splits
of every metric, with the per-split values in the JSON. ``make crossval`` does both.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from etesvs.errors import EtesvsError, run_main
from etesvs.evaluate import SUMMARY_COLUMNS
from etesvs.io import atomic_path, check_output_file, read_yaml, write_json
from etesvs.params import compose, project_root

METRICS = [key for _, key in SUMMARY_COLUMNS if key not in (None, "params_m", "mflops")]
LABELS = {key: label for label, key in SUMMARY_COLUMNS if key is not None}


def plan(overrides: Sequence[str], root: Path) -> dict[str, Any]:
    """What a cross-validation covers: dataset, experiment, splits and the experiment names (one per split)."""
    with tempfile.TemporaryDirectory() as tmp:
        composed = Path(tmp) / "params.yaml"
        compose(list(overrides), out=composed, root=root)
        params = read_yaml(composed)
    dataset = params["dataset"]["name"]
    experiment = next((item.split("=", 1)[1] for item in overrides if item.startswith("experiment=")), "none")
    splits = list(range(1, int(params["dataset"]["num_splits"]) + 1))
    return {"dataset": dataset, "experiment": experiment, "splits": splits,
            "names": {split: f"cv-{dataset}-{experiment}-split{split}" for split in splits}}


def run(overrides: Sequence[str], root: Path) -> dict[str, Any]:
    """Queue one experiment per split and run the queue; the experiments' results stay in DVC."""
    covered = plan(overrides, root)
    run_experiments({name: [*overrides, f"dataset.split={split}"] for split, name in covered["names"].items()}, root)
    return covered


def run_experiments(experiments: dict[str, list[str]], root: Path) -> None:
    """Queue one DVC experiment per name with its ``-S`` overrides and run the queue, one at a time.

    Experiments of the same names from an earlier run are replaced. Not with ``exp run --force``: that would also
    re-run every stage, while stages whose inputs did not change (data, pretraining) come from the cache.
    """
    earlier = set(_dvc(["exp", "list", "--name-only"], root, capture=True).split())
    stale = [name for name in experiments if name in earlier]
    if stale:
        _dvc(["exp", "remove", *stale], root)
    for name, overrides in experiments.items():
        _dvc(["exp", "run", "--queue", "--name", name, *[arg for item in overrides for arg in ("-S", item)]], root)
    _dvc(["exp", "run", "--run-all", "--jobs", "1"], root)


def _dvc(args: list[str], root: Path, *, capture: bool = False) -> str:
    """``dvc ARGS`` in ``root``; its output goes to the terminal, or with ``capture`` is returned."""
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=capture, text=True)
    if done.returncode != 0:
        reason = done.stderr.strip()[-500:] if capture else "see its output above"
        raise EtesvsError(f"dvc {' '.join(args)}: exited with {done.returncode} ({reason})")
    return done.stdout or ""


def collect(names: dict[int, str], root: Path) -> dict[int, dict[str, dict[str, float]]]:
    """``{split: {model: {metric: value}}}`` of the named experiments (``dvc exp show``)."""
    import dvc.api

    rows = dvc.api.exp_show(repo=str(root), force=True)
    by_name = {row.get("Experiment"): row for row in rows if row.get("Experiment")}
    results: dict[int, dict[str, dict[str, float]]] = {}
    for split, name in names.items():
        if name not in by_name:
            raise EtesvsError(f"{root}: no experiment '{name}' (run `python -m etesvs.crossval run` first)")
        models: dict[str, dict[str, float]] = {}
        for key, value in by_name[name].items():
            path, _, metric = key.partition(":")
            parts = Path(path).parts
            if len(parts) == 3 and parts[0] == "reports" and parts[2] == "metrics.json" and metric in METRICS:
                models.setdefault(parts[1], {})[metric] = value
        results[split] = models
    return results


def aggregate(results: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per model and metric: mean, sample standard deviation (0 for one split) and the per-split values."""
    models = sorted({model for per_split in results.values() for model in per_split})
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for model in models:
        summary[model] = {}
        for metric in METRICS:
            values = [results[s].get(model, {}).get(metric) for s in sorted(results)]
            present = [float(v) for v in values if v is not None]
            mean = sum(present) / len(present) if present else None
            spread = (math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))
                      if len(present) > 1 else 0.0 if present else None)
            summary[model][metric] = {"mean": mean, "std": spread, "values": values}
    return summary


def markdown(covered: dict[str, Any], summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The table as the papers print it: mean ± standard deviation over splits, one row per model."""
    splits = ", ".join(str(s) for s in covered["splits"])
    lines = [
        f"Cross-validation on {covered['dataset']} (experiment {covered['experiment']}), splits {splits}: "
        f"mean ± standard deviation over {len(covered['splits'])} splits, in percent.",
        "",
        "| Model | " + " | ".join(LABELS[m] for m in METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for model, metrics in summary.items():
        cells = [f"{m['mean']:.1f} ± {m['std']:.1f}" if m["mean"] is not None else "-" for m in metrics.values()]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(overrides: Sequence[str], root: Path, *, out: Path, out_json: Path) -> str:
    """Write the Markdown table and the JSON of the cross-validation selected by ``overrides``."""
    check_output_file(out, suffixes=(".md",))
    check_output_file(out_json, suffixes=(".json",))
    covered = plan(overrides, root)
    summary = aggregate(collect(covered["names"], root))
    text = markdown(covered, summary)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    write_json(out_json, {"dataset": covered["dataset"], "experiment": covered["experiment"],
                          "splits": covered["splits"], "models": summary})
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=gtea experiment=mstcn_gtea")
    parser.add_argument("--out", type=Path, default=Path("reports/crossval.md"))
    parser.add_argument("--json", type=Path, default=Path("reports/crossval.json"))
    args = parser.parse_args(argv)
    root = project_root()
    if args.action == "run":
        covered = run(args.overrides, root)
        print(f"crossval: {len(covered['splits'])} experiments {', '.join(covered['names'].values())}")
    else:
        print(report(args.overrides, root, out=args.out, out_json=args.json), end="")


if __name__ == "__main__":
    run_main(main)
