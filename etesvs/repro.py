"""`dvc repro` with stages side by side where they leave cores idle (what `make repro` runs).

DVC runs one stage at a time, but several of ours use fewer cores than a machine has: the temporal models train on
one thread each (their ``train.num_threads``), so a plain `dvc repro` leaves the second core of a 2-core machine
idle for minutes. This runs every stage as ``dvc --wait-for-lock repro --single-item STAGE``, as soon as the stages
it depends on have finished and enough cores are free. DVC releases its repository lock while a stage's command
runs and locks each stage's dependencies and outputs on its own, so these processes share the repository safely;
the outputs, dvc.lock and the metrics are those of a plain `dvc repro`.

A stage's cores are the ``num_threads`` found in the params sections it declares in dvc.yaml, capped at the cores
available (0, torch's default, takes them all); a stage without one takes the ``cores`` of its dvc.yaml ``meta``
(which DVC ignores), or else every core. Of the stages ready to start, those with a higher ``priority`` in their
``meta`` go first (default 0: for a long stage that should not wait behind shorter ones ready at the same time),
then those that more stages wait for (ties in dvc.yaml's order); a later one starts first only when an earlier one
waits for cores that a smaller one can use meanwhile. Each stage's output goes to ``logs/repro/STAGE.log``; the
terminal shows one line per stage and the last line of each running one. After a failure no new stage starts, the
running ones finish, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from etesvs.errors import EtesvsError

LOG_DIR = Path("logs") / "repro"
SKIPPED = re.compile(r"Stage '[^']+' didn't change, skipping")


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: its name (``train_temporal@mstcn``), the stages it depends on and its cores."""

    name: str
    upstream: tuple[str, ...]
    cores: int
    priority: int = 0


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_in(value: Any) -> list[int]:
    """Every ``num_threads`` value inside a params section (nested mappings searched)."""
    if not isinstance(value, Mapping):
        return []
    found = [value["num_threads"]] if isinstance(value.get("num_threads"), int) else []
    for key, child in value.items():
        if key != "num_threads":
            found += threads_in(child)
    return found


def stage_cores(sections: Mapping[str, Any], total: int, meta: Any = None) -> int:
    """Cores a stage uses, at most ``total``: the largest ``num_threads`` of the params sections it declares (0 is
    torch's default: every core); without one, the ``cores`` of its dvc.yaml ``meta`` (a stage that runs on one
    thread whatever the params, such as numpy's evaluation); else every core."""
    threads = [n for section in sections.values() for n in threads_in(section)]
    if threads:
        return total if min(threads) <= 0 else min(max(threads), total)
    if isinstance(meta, Mapping) and isinstance(meta.get("cores"), int) and meta["cores"] > 0:
        return min(meta["cores"], total)
    return total


def stage_priority(meta: Any) -> int:
    """The ``priority`` of a stage's dvc.yaml ``meta`` (an integer; 0 without one)."""
    if isinstance(meta, Mapping) and "priority" in meta:
        if not isinstance(meta["priority"], int) or isinstance(meta["priority"], bool):
            raise EtesvsError(f"dvc.yaml: meta priority must be an integer, got {meta['priority']!r}")
        return meta["priority"]
    return 0


def pipeline(root: Path, total: int, targets: Sequence[str] = ()) -> list[Stage]:
    """The stages of ``root``'s dvc.yaml (those ``targets`` need, when given) with their cores, in the order to
    start them (:func:`by_priority`)."""
    import networkx  # DVC's pipeline graph is a networkx DiGraph
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        order = list(graph.nodes)
        names = {stage: stage.addressing for stage in order}
        if targets:
            unknown = sorted(set(targets) - set(names.values()))
            if unknown:
                raise EtesvsError(f"{root / 'dvc.yaml'}: no stage named {', '.join(unknown)}")
            wanted = {stage for stage in order if names[stage] in targets}
            for stage in list(wanted):
                wanted |= networkx.descendants(graph, stage)  # descendants along the edges: its upstream stages
            order = [stage for stage in order if stage in wanted]
        stages = []
        for stage in order:
            sections: dict[str, Any] = {}
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    sections.update(dep.read_params(flatten=False))
            upstream = tuple(sorted(names[up] for up in graph.successors(stage) if up in order))
            stages.append(Stage(names[stage], upstream, stage_cores(sections, total, stage.meta),
                                stage_priority(stage.meta)))
    return by_priority(stages)


def by_priority(stages: Sequence[Stage]) -> list[Stage]:
    """``stages`` in the order to start them when several are ready: a higher ``priority`` first, then those that
    more stages wait for (a stage before everything after it), ties in the given order. So the stage that feature
    extraction needs runs before a pretraining only the streaming model needs, and the streaming model, marked with
    priority 1, starts before the temporal models that are ready at the same time."""
    downstream: dict[str, set[str]] = {stage.name: set() for stage in stages}
    for stage in reversed(topological(stages)):
        for up in stage.upstream:
            downstream[up] |= {stage.name} | downstream[stage.name]
    position = {stage.name: index for index, stage in enumerate(stages)}
    return sorted(stages, key=lambda stage: (-stage.priority, -len(downstream[stage.name]), position[stage.name]))


def topological(stages: Sequence[Stage]) -> list[Stage]:
    """``stages`` with each after the stages it depends on (dvc.yaml may list a stage before its upstream)."""
    placed: set[str] = set()
    ordered: list[Stage] = []
    remaining = list(stages)
    while remaining:
        ready = [stage for stage in remaining if set(stage.upstream) <= placed]
        if not ready:
            raise EtesvsError("dvc.yaml: the stages depend on each other in a cycle: "
                              + ", ".join(stage.name for stage in remaining))
        for stage in ready:
            ordered.append(stage)
            placed.add(stage.name)
            remaining.remove(stage)
    return ordered


def next_stages(stages: Sequence[Stage], done: set[str], started: set[str], free: int) -> list[Stage]:
    """The stages to start now: in the order given, each whose upstream stages are ``done`` and whose cores fit into
    what is ``free`` after the ones chosen before it (a smaller later stage may fill cores an earlier one waits for)."""
    chosen = []
    for stage in stages:
        if stage.name in started or not set(stage.upstream) <= done:
            continue
        if stage.cores <= free:
            chosen.append(stage)
            free -= stage.cores
    return chosen


@dataclass
class Running:
    stage: Stage
    process: subprocess.Popen
    log: Path
    start: float


def last_line(log: Path, size: int = 400) -> str:
    """The last non-empty line of a log, progress bars included (their updates end with a carriage return)."""
    try:
        with open(log, "rb") as handle:
            handle.seek(max(0, log.stat().st_size - size))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in re.split(r"[\r\n]+", tail) if line.strip()]
    return lines[-1] if lines else ""


def reproduce(root: Path, stages: Sequence[Stage], total: int, *, dvc: Sequence[str], poll: float = 0.5,
              out=sys.stderr) -> list[str]:
    """Run ``stages`` with at most ``total`` cores busy; returns the names of the stages that failed."""
    from tqdm import tqdm

    log_dir = root / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    started: set[str] = set()
    failed: list[str] = []
    running: list[Running] = []
    bar = tqdm(total=len(stages), desc="stages", unit="stage", file=out, dynamic_ncols=True)
    try:
        while True:
            if not failed:
                free = total - sum(job.stage.cores for job in running)
                for stage in next_stages(stages, done, started, free):
                    log = log_dir / f"{stage.name}.log"
                    with open(log, "wb") as handle:  # the child keeps its own copy of the descriptor
                        process = subprocess.Popen([*dvc, "--wait-for-lock", "repro", "--single-item", stage.name],
                                                   cwd=root, stdout=handle, stderr=subprocess.STDOUT)
                    running.append(Running(stage, process, log, time.monotonic()))
                    started.add(stage.name)
            if not running:
                break
            time.sleep(poll)
            for job in list(running):
                code = job.process.poll()
                if code is None:
                    continue
                running.remove(job)
                seconds = time.monotonic() - job.start
                if code != 0:
                    failed.append(job.stage.name)
                    tail = "\n".join(job.log.read_text(errors="replace").replace("\r", "\n").splitlines()[-25:])
                    bar.write(f"{job.stage.name}: failed after {seconds:.0f} s (exit {code}); its log, "
                              f"{job.log.relative_to(root)}, ends with:\n{tail}", file=out)
                    continue
                done.add(job.stage.name)
                skipped = bool(SKIPPED.search(job.log.read_text(errors="replace")))
                bar.write(f"{job.stage.name}: {'unchanged' if skipped else f'done in {seconds:.0f} s'}", file=out)
                bar.update()
            bar.set_postfix_str(" | ".join(f"{job.stage.name}: {last_line(job.log)[-60:]}" for job in running))
    except KeyboardInterrupt:
        for job in running:  # the terminal's Ctrl-C reached them too; let DVC finish its cleanup
            job.process.wait()
        raise
    finally:
        bar.close()
    return failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="stages to reproduce with what they depend on (default: all)")
    parser.add_argument("--cores", type=int, default=available_cores(),
                        help="cores the stages may keep busy together (default: those this process may use)")
    args = parser.parse_args(argv)
    root = Path.cwd()
    if args.cores < 1:
        parser.error(f"--cores must be at least 1, got {args.cores}")
    try:
        stages = pipeline(root, args.cores, args.targets)
    except EtesvsError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)
    dvc = [sys.executable, "-m", "dvc"]
    # Nothing changed: one `dvc status` (a second or two) instead of a DVC process per stage.
    status = [*dvc, "status", "--quiet", *([*args.targets, "--with-deps"] if args.targets else [])]
    if subprocess.run(status, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
        print("Data and pipelines are up to date.", file=sys.stderr)
        return
    print(f"reproducing {len(stages)} stages on {args.cores} cores: "
          + ", ".join(f"{s.name} ({s.cores})" for s in stages), file=sys.stderr)
    failed = reproduce(root, stages, args.cores, dvc=dvc)
    if failed:
        print(f"Error: stage {', '.join(failed)} failed (log in {LOG_DIR}/); no stage started after it",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
