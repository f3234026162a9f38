"""End to end: the whole pipeline on a tiny generated dataset in a temporary git repository, run as `make repro`
runs it (etesvs.repro: `dvc repro` stage by stage, two side by side where they fit into 2 cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# conf/experiment/tiny.yaml: small enough for CI, big enough that every stage has real work.
OVERRIDES = ["experiment=tiny"]
TEMPORAL = ["mstcn", "asrf", "asformer", "frame_classifier"]
MODELS = TEMPORAL + ["etesvs"]
PROJECT_FILES = ["etesvs", "stages", "conf", "dvc.yaml", ".dvcignore", "pyproject.toml"]


def run(args, cwd, **kwargs):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, repo / name)
    from etesvs.params import compose

    compose(OVERRIDES, out=repo / "params.yaml", root=repo)
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "hydra.enabled", "true"],
                    ["dvc", "config", "plots.html_template", "plots_page.html"],
                    [sys.executable, "-m", "etesvs.plots", "--out", ".dvc/plots_page.html"]):
        result = run(command, repo)
        assert result.returncode == 0, result.stderr
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    result = run([sys.executable, "-m", "etesvs.repro", "--cores", "2"], repo, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train_temporal@mstcn (1)" in result.stderr and "summarize: done in" in result.stderr
    return repo


def test_every_output_exists(repo):
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    expected = {"make_demo_data", "convert_labels", "extract_frames", "extract_features", "summarize",
                "make_pretrain_data", "pretrain@i3d", "pretrain@mobilenet_v2"}
    expected |= {f"train_temporal@{m}" for m in TEMPORAL} | {f"evaluate@{m}" for m in MODELS} | {"train_streaming"}
    assert expected <= set(stages)
    for name, stage in stages.items():
        for out in stage.get("outs", []):
            assert (repo / out["path"]).exists(), f"{name}: {out['path']} missing"


def test_raw_labels_and_frames_agree(repo):
    from etesvs.data.frames import FrameReader, frames_path
    from etesvs.data.labels import load_label_info, load_labels

    info = load_label_info(repo / "data" / "labels")
    assert info.dataset == "demo" and info.fps == 15 and info.background == ("background",)
    assert len(info.train) + len(info.test) == 8 and info.test
    for video in info.train + info.test:
        labels = load_labels(repo / "data" / "labels", video)
        text = (repo / "data" / "raw" / "demo" / "groundTruth" / f"{video}.txt").read_text().split()
        assert len(labels) == len(text) == info.num_frames[video]
        with FrameReader(frames_path(repo / "data" / "frames", video)) as reader:
            assert reader.num_frames == len(labels)
            assert reader.height == 48 and reader.width == 64
            window = reader.read(0, 5)
            assert window.shape == (5, 3, 48, 64)
            assert window.float().std() > 1, "frames are not blank"
    report = json.loads((repo / "reports" / "extract_frames.json").read_text())
    assert report["videos"] == 8 and report["skipped_bad_videos"] == [] and report["reconciled"] == []


def test_repro_again_is_a_no_op(repo):
    result = run(["dvc", "status"], repo)
    assert result.returncode == 0 and "up to date" in result.stdout, result.stdout
    again = run([sys.executable, "-m", "etesvs.repro", "--cores", "2"], repo)
    assert again.returncode == 0 and "Data and pipelines are up to date." in again.stderr, again.stderr[-2000:]
    assert "reproducing" not in again.stderr


def test_features_predictions_and_reports(repo):
    import h5py

    from etesvs.data.labels import load_label_info

    info = load_label_info(repo / "data" / "labels")
    extractor = json.loads((repo / "data" / "features" / "info.json").read_text())
    assert extractor["feature_dim"] == 256  # the tiny demo's I3D is a quarter wide
    with h5py.File(repo / "data" / "features" / "features.h5", "r") as features:
        for video in info.train + info.test:
            assert features[video].shape == (info.num_frames[video], 256)
    # the demo's own pretrained weights went through the real loaders, and the runs say which file they used
    i3d = json.loads((repo / "reports" / "pretrain" / "i3d" / "weights.json").read_text())
    assert extractor["backbone_pretrained"] is True and extractor["weights_hash"] == i3d["sha256"]
    assert extractor["weights"] == i3d["file"] == "data/pretrained/i3d_demo.pt"
    assert extractor["flops_per_frame"] > 0
    streaming = json.loads((repo / "data" / "predictions" / "etesvs" / "model.json").read_text())
    assert streaming["backbone_pretrained"] is True
    assert streaming["weights_origin"].endswith("mobilenet_v2_demo.pt")
    for model in MODELS:
        with h5py.File(repo / "data" / "predictions" / model / "probs.h5", "r") as probs:
            assert sorted(probs) == sorted(info.test)
            for video in info.test:
                rows = probs[video][()]
                assert rows.shape == (info.num_frames[video], info.num_classes)
                assert abs(rows.sum(1) - 1).max() < 1e-4
        metrics = json.loads((repo / "reports" / model / "metrics.json").read_text())
        for key in ("acc", "edit", "f1_10", "f1_25", "f1_50", "map_50", "map_avg", "auc"):
            assert 0 <= metrics[key] <= 100, (model, key)
        if model in TEMPORAL:
            assert metrics["params_m"] * 1e6 > extractor["params"], "two-stage cost includes the feature extractor"
        else:
            assert 0 < metrics["params_m"] * 1e6 < extractor["params"] and metrics["mflops"] > 0
        pictures = sorted((repo / "reports" / model / "segments").glob("*.png"))
        assert len(pictures) == len(info.test)
        curves = (repo / "reports" / model / "train" / "curves.csv").read_text().splitlines()
        assert curves[0].startswith("epoch,") and len(curves) == 1 + 2, (model, curves)
    summary = (repo / "reports" / "summary.md").read_text()
    for model in MODELS:
        assert f"| {model} |" in summary


def test_metrics_show_lists_every_model_and_nothing_else(repo):
    result = run(["dvc", "metrics", "show"], repo)
    assert result.returncode == 0, result.stderr
    for model in MODELS:
        assert f"reports/{model}/metrics.json" in result.stdout
    assert "extract_frames" not in result.stdout and "frames_per_second" not in result.stdout
    # one row per model: scores, size, weights, and the streaming model's plain-argmax scores (argmax.*)
    assert max(len(line) for line in result.stdout.splitlines()) <= 300, result.stdout


def test_results_prints_models_and_experiments_in_readable_units(repo):
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "tiny results"]):
        assert run(command, repo).returncode == 0
    result = run([sys.executable, "-m", "etesvs.results"], repo)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2].split()[:5] == ["Model", "Params", "FLOPs/frame", "F1@10", "F1@25"]
    for model in MODELS:
        row = next(line for line in lines if line.startswith(model + " "))
        assert row.split()[1][-1] in "kMG" and row.split()[2][-1] in "kMG", row
    assert "mstcn F1@50/Edit/Acc" in result.stdout and "workspace" in result.stdout
    assert max(len(line) for line in lines) <= 200, result.stdout


def test_stream_command_on_the_trained_checkpoint(repo, tmp_path):
    video = next((repo / "data" / "raw" / "demo" / "Videos").glob("*.mp4"))
    checkpoint = repo / "data" / "models" / "etesvs" / "best.pt"
    result = run([sys.executable, "-m", "etesvs.stream", str(video), "--checkpoint", str(checkpoint), "--out", str(tmp_path)], repo)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert events and events[-1]["event"] == "video", result.stdout[-2000:]
    truth = (repo / "data" / "raw" / "demo" / "groundTruth" / f"{video.stem}.txt").read_text().split()
    # The demo video is decoded at its own 15 fps, so the streamed labels cover every labelled frame.
    assert abs(events[-1]["num_frames"] - len(truth)) <= 1
    labels = (tmp_path / "labels.txt").read_text().split()
    assert len(labels) == events[-1]["num_frames"]
    assert (tmp_path / "segments.png").stat().st_size > 0


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_plots_page_loads_nothing_from_the_network(repo):
    result = run(["dvc", "plots", "show", "-o", "dvc_plots"], repo)
    assert result.returncode == 0, result.stderr
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "window.vegaEmbed=" in page
    assert page.count('<script src=') == 0


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_every_chart_draws_offline_in_headless_chromium(repo, tmp_path):
    import re

    result = run(["dvc", "plots", "show", "-o", "dvc_plots"], repo)
    assert result.returncode == 0, result.stderr
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", (repo / "dvc_plots" / "index.html").as_uri()],
                         capture_output=True, text=True, timeout=300).stdout
    charts = re.split(r'(?=<div id="[^"]+" class="vega-embed)', dom)[1:]
    assert len(charts) >= 2 + len(MODELS), "the two training-curve charts and one confusion matrix per model"
    for chart in charts:
        name = re.match(r'<div id="([^"]+)"', chart).group(1)
        drawn = chart.split("</svg>")[0]
        assert '<svg' in drawn and 'class="marks"' in drawn and "role-mark" in drawn, f"{name} is blank"


def test_an_absent_dataset_stops_the_pipeline_before_anything_is_removed(repo):
    """Last in this module: it switches the dataset and puts params.yaml back afterwards."""
    from etesvs.params import compose

    params = (repo / "params.yaml").read_text()
    before = {path: path.stat().st_mtime_ns for path in (repo / "data" / "labels").iterdir()}
    try:
        compose([*OVERRIDES, "dataset=gtea"], out=repo / "params.yaml", root=repo)
        result = run(["dvc", "repro"], repo)
        parallel = run([sys.executable, "-m", "etesvs.repro", "--cores", "2"], repo)
    finally:
        (repo / "params.yaml").write_text(params)
    assert result.returncode != 0 and parallel.returncode == 1
    expected = ("error: data/raw/gtea: dataset 'gtea' not found; put gtea there in the MS-TCN layout "
                "data/raw/gtea/{Videos,groundTruth,splits,mapping.txt} (README: Real datasets)")
    assert expected in result.stderr.splitlines(), result.stderr[-2000:]
    assert expected in parallel.stderr.splitlines(), parallel.stderr[-2000:]  # the failed stage's log, shown
    assert "Error: stage check_dataset failed" in parallel.stderr
    assert {path: path.stat().st_mtime_ns for path in (repo / "data" / "labels").iterdir()} == before
    assert (repo / "reports" / "summary.md").is_file() and (repo / "data" / "frames").is_dir()
