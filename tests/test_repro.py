"""etesvs.repro: stages side by side within the cores, in dependency order (the end-to-end run is test_pipeline)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from etesvs.repro import Stage, last_line, next_stages, pipeline, reproduce, stage_cores
from tests.conftest import ROOT


def test_stage_cores_are_the_declared_threads_capped_and_all_without_them():
    assert stage_cores({"mstcn": {"train": {"num_threads": 1, "epochs": 50}}, "seed": 0}, total=2) == 1
    assert stage_cores({"pretrain.i3d": {"model": {}, "train": {"num_threads": 2}}}, total=2) == 2
    assert stage_cores({"pretrain.i3d": {"train": {"num_threads": 8}}}, total=2) == 2
    assert stage_cores({"demo": {"num_videos": 40}}, total=4) == 4  # nothing declared: every core
    assert stage_cores({"x": {"train": {"num_threads": 0}}}, total=4) == 4  # torch's default: every core
    assert stage_cores({"a": {"num_threads": 1}, "b": {"inner": {"num_threads": 3}}}, total=4) == 3
    # without num_threads, dvc.yaml's meta may say how many cores the stage's own code uses
    assert stage_cores({"window": 64}, total=2, meta={"cores": 1}) == 1
    assert stage_cores({"window": 64}, total=2, meta={"cores": 4}) == 2
    assert stage_cores({"x": {"num_threads": 2}}, total=2, meta={"cores": 1}) == 2  # the params decide
    assert stage_cores({}, total=2, meta={"other": "note"}) == 2


def test_next_stages_follow_dependencies_and_fill_idle_cores():
    stages = [Stage("data", (), 2), Stage("big", ("data",), 2), Stage("a", ("data",), 1), Stage("b", ("data",), 1),
              Stage("last", ("a", "b", "big"), 2)]
    assert [s.name for s in next_stages(stages, set(), set(), 2)] == ["data"]
    assert next_stages(stages, set(), {"data"}, 0) == []
    # the first ready stage fits: it goes first, in dvc.yaml order
    assert [s.name for s in next_stages(stages, {"data"}, {"data"}, 2)] == ["big"]
    # one core free: a one-core stage uses it while the two-core one waits
    assert [s.name for s in next_stages(stages, {"data"}, {"data", "a"}, 1)] == ["b"]
    assert [s.name for s in next_stages(stages, {"data", "big", "a"}, {"data", "big", "a", "b"}, 1)] == []
    assert [s.name for s in next_stages(stages, {"data", "big", "a", "b"}, {"data", "big", "a", "b"}, 2)] == ["last"]


def test_the_project_pipeline_runs_the_temporal_models_two_at_a_time():
    stages = {s.name: s for s in pipeline(ROOT, total=2)}
    assert {name: stages[f"train_temporal@{name}"].cores for name in ("mstcn", "asrf", "asformer")} == {
        "mstcn": 1, "asrf": 1, "asformer": 1}
    assert stages["pretrain@i3d"].cores == stages["pretrain@mobilenet_v2"].cores == stages["make_demo_data"].cores == 2
    assert stages["train_streaming"].cores == 1 and stages["train_streaming"].priority == 1  # beside the temporal models
    assert {s.priority for name, s in stages.items() if name != "train_streaming"} == {0}
    assert stages["evaluate@mstcn"].cores == stages["evaluate@etesvs"].cores == 1  # dvc.yaml meta
    assert set(stages["extract_features"].upstream) == {"extract_frames", "convert_labels", "pretrain@i3d"}
    assert "train_temporal@mstcn" in stages["evaluate@mstcn"].upstream
    names = list(stages)
    assert names.index("make_demo_data") < names.index("convert_labels") < names.index("summarize")
    # targets: only what they need
    needed = {s.name for s in pipeline(ROOT, total=2, targets=["evaluate@mstcn"])}
    assert needed == {"make_demo_data", "make_pretrain_data", "pretrain@i3d", "check_dataset", "convert_labels",
                      "extract_frames", "extract_features", "train_temporal@mstcn", "evaluate@mstcn"}
    assert "train_streaming" not in needed
    from etesvs.errors import EtesvsError

    with pytest.raises(EtesvsError, match="no stage named nope"):
        pipeline(ROOT, total=2, targets=["nope"])


FAKE_DVC = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    assert sys.argv[1:4] == ["--wait-for-lock", "repro", "--single-item"], sys.argv
    name = sys.argv[4]
    plan = json.loads(Path("plan.json").read_text())
    with open("events.txt", "a") as f:
        f.write(f"{time.monotonic()} start {name}\\n")
    print(f"progress of {name}\\r50%\\r", end="", flush=True)
    time.sleep(plan["seconds"][name])
    with open("events.txt", "a") as f:
        f.write(f"{time.monotonic()} end {name}\\n")
    if name in plan["fail"]:
        print("Traceback: something broke")
        sys.exit(3)
    print(f"Stage '{name}' didn't change, skipping" if name in plan["unchanged"] else "ran")
""")


def _run_fake(tmp_path, stages, seconds, *, fail=(), unchanged=(), total=2):
    (tmp_path / "fake_dvc.py").write_text(FAKE_DVC)
    (tmp_path / "plan.json").write_text(json.dumps({"seconds": seconds, "fail": list(fail),
                                                    "unchanged": list(unchanged)}))
    with open(tmp_path / "terminal.txt", "w") as out:
        failed = reproduce(tmp_path, stages, total, dvc=[sys.executable, str(tmp_path / "fake_dvc.py")], poll=0.05,
                           out=out)
    events = [line.split() for line in (tmp_path / "events.txt").read_text().splitlines()]
    return failed, sorted((float(t), kind, name) for t, kind, name in events), (tmp_path / "terminal.txt").read_text()


def test_reproduce_runs_stages_side_by_side_within_the_cores(tmp_path):
    stages = [Stage("data", (), 2), Stage("a", ("data",), 1), Stage("b", ("data",), 1), Stage("c", ("data",), 1),
              Stage("big", ("a",), 2), Stage("last", ("big", "b", "c"), 2)]
    seconds = {"data": 0.2, "a": 0.6, "b": 0.3, "c": 0.5, "big": 0.3, "last": 0.1}
    failed, events, terminal = _run_fake(tmp_path, stages, seconds, unchanged=["last"])
    assert failed == []
    busy, peak, finished = 0, 0, set()
    cores = {s.name: s.cores for s in stages}
    upstream = {s.name: s.upstream for s in stages}
    for _, kind, name in events:
        if kind == "start":
            assert set(upstream[name]) <= finished, f"{name} started before {upstream[name]} finished"
            busy += cores[name]
            peak = max(peak, busy)
            assert busy <= 2, f"{busy} cores busy when {name} started"
        else:
            busy -= cores[name]
            finished.add(name)
    assert finished == set(cores) and peak == 2
    starts = {name: t for t, kind, name in events if kind == "start"}
    assert abs(starts["a"] - starts["b"]) < 0.3, "two one-core stages ran side by side"
    ends = {name: t for t, kind, name in events if kind == "end"}
    assert starts["big"] >= ends["c"], "big (2 cores) waited for c's core"
    assert "last: unchanged" in terminal and "a: done in" in terminal
    assert (tmp_path / "logs" / "repro" / "a.log").read_text().startswith("progress of a")


def test_a_failed_stage_stops_new_ones_and_shows_its_log(tmp_path):
    stages = [Stage("a", (), 1), Stage("b", (), 1), Stage("c", ("a",), 1), Stage("d", ("b",), 2)]
    failed, events, terminal = _run_fake(tmp_path, stages, {"a": 0.1, "b": 0.5, "c": 0.1, "d": 0.1}, fail=["a"])
    assert failed == ["a"]
    names = {name for _, kind, name in events if kind == "start"}
    assert names == {"a", "b"}, "nothing starts after a failure; the running stage b finishes"
    assert ("end" in {kind for _, kind, name in events if name == "b"})
    assert "a: failed after" in terminal and "Traceback: something broke" in terminal
    assert "logs/repro/a.log" in terminal


def test_last_line_reads_progress_bars(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("Running stage 'x':\n  epochs:  10%|#  | 1/10\r  epochs:  20%|## | 2/10\r")
    assert last_line(log) == "epochs:  20%|## | 2/10"
    assert last_line(tmp_path / "missing.log") == ""


def test_main_names_an_unknown_stage(tmp_path, capsys, monkeypatch):
    from etesvs.repro import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["no_such_stage", "--cores", "2"])
    assert exit_info.value.code == 1
    assert "no stage named no_such_stage" in capsys.readouterr().err


def test_stages_that_more_stages_wait_for_start_first():
    from etesvs.repro import by_priority

    stages = [Stage("corpus", (), 2), Stage("pretrain_small", ("corpus",), 1), Stage("pretrain_big", ("corpus",), 2),
              Stage("features", ("pretrain_big",), 2), Stage("train_a", ("features",), 1),
              Stage("train_b", ("features",), 1), Stage("stream", ("pretrain_small",), 2)]
    order = [s.name for s in by_priority(stages)]
    assert order == ["corpus", "pretrain_big", "features", "pretrain_small", "train_a", "train_b", "stream"]
    # with features done, the small pretraining (one more stage waits for it) pairs with a temporal model
    done = {"corpus", "pretrain_big", "features"}
    assert [s.name for s in next_stages(by_priority(stages), done, set(done), 2)] == ["pretrain_small", "train_a"]


def test_a_stage_with_priority_starts_before_the_others_ready_with_it():
    from etesvs.errors import EtesvsError
    from etesvs.repro import by_priority, stage_priority

    assert stage_priority(None) == stage_priority({"cores": 1}) == 0
    assert stage_priority({"priority": 2}) == 2
    with pytest.raises(EtesvsError, match="priority must be an integer"):
        stage_priority({"priority": "high"})
    stages = [Stage("features", (), 2), Stage("pretrain", (), 2), Stage("a", ("features",), 1),
              Stage("b", ("features",), 1), Stage("stream", ("pretrain",), 1, priority=1),
              Stage("eval_a", ("a",), 1), Stage("eval_b", ("b",), 1)]
    ordered = by_priority(stages)
    assert [s.name for s in ordered][0] == "stream"
    done = {"features", "pretrain"}
    # the long one-core stage and one temporal model side by side, not the two temporal models
    assert [s.name for s in next_stages(ordered, done, set(done), 2)] == ["stream", "a"]
    # without the priority, the stages that more stages wait for (a and b) would go first
    plain = by_priority([Stage(s.name, s.upstream, s.cores) for s in stages])
    assert [s.name for s in next_stages(plain, done, set(done), 2)] == ["a", "b"]


def test_a_cycle_is_named():
    from etesvs.errors import EtesvsError
    from etesvs.repro import by_priority

    with pytest.raises(EtesvsError, match="cycle: a, b"):
        by_priority([Stage("a", ("b",), 1), Stage("b", ("a",), 1)])
