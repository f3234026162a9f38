"""The evaluation CLI, the library function, and the evaluate and summarize stages end to end."""

from __future__ import annotations

import csv
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from etesvs.errors import EtesvsError
from etesvs.evaluate import (
    confusion_csv,
    evaluate_predictions,
    main,
    read_prediction_file,
    summary_markdown,
)
from tests.conftest import ROOT, stage_workdir

SHARED = Path(__file__).resolve().parents[2] / "shared"
GTEA = SHARED / "data" / "edtcn" / "gtea"
CLASSES = ["background", "cut", "pour", "stir"]
FPS = 15.0


def reference_probabilities(labels: np.ndarray, num_classes: int, *, noise: float, seed: int) -> np.ndarray:
    """A stand-in for a model: the ground truth with controlled noise, as per-frame probabilities.

    A fraction ``noise`` of the frames, in blocks of 3 to 8 frames, is relabelled with a random class; the
    probabilities are a softmax whose largest entry is always the (relabelled) class, so their argmax is known.

    Returns:
        (T, C) float32, rows sum to 1.
    """
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    changed = 0
    while changed < noise * len(labels):
        start, length = int(rng.integers(0, len(labels))), int(rng.integers(3, 9))
        noisy[start : start + length] = rng.integers(0, num_classes)
        changed += length
    logits = 3.0 * np.eye(num_classes)[noisy] + rng.random((len(labels), num_classes))  # margin > 2: argmax = noisy
    probabilities = np.exp(logits)
    return (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32)


def reference_model(
    labels: dict[str, np.ndarray], *, noise: float, seed: int, videos: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Probabilities of :func:`reference_probabilities` for ``videos`` (default all), (T, C) each."""
    videos = videos or tuple(labels)
    return {
        video: reference_probabilities(labels[video], len(CLASSES), noise=noise, seed=seed + i)
        for i, video in enumerate(videos)
    }


def argmax_labels(probabilities: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {video: np.argmax(values, axis=1) for video, values in probabilities.items()}


def tiny_labels(seed: int = 0) -> dict[str, np.ndarray]:
    """Three test videos of 60 to 100 frames, background between actions."""
    rng = np.random.default_rng(seed)
    videos = {}
    for name in ("video_a", "video_b", "video_c"):
        pieces = []
        while sum(len(piece) for piece in pieces) < 60:
            pieces.append(np.zeros(int(rng.integers(3, 10)), dtype=np.int64))
            pieces.append(np.full(int(rng.integers(8, 25)), int(rng.integers(1, len(CLASSES))), dtype=np.int64))
        videos[name] = np.concatenate(pieces)
    return videos


def write_text_dataset(root: Path, labels: dict[str, np.ndarray]) -> None:
    """MS-TCN layout: mapping.txt, groundTruth/<video>.txt, splits/test.split1.bundle."""
    (root / "groundTruth").mkdir(parents=True)
    (root / "splits").mkdir()
    (root / "mapping.txt").write_text("".join(f"{i} {name}\n" for i, name in enumerate(CLASSES)))
    for video, ids in labels.items():
        (root / "groundTruth" / f"{video}.txt").write_text("".join(f"{CLASSES[i]}\n" for i in ids))
    (root / "splits" / "test.split1.bundle").write_text("".join(f"{video}.txt\n" for video in labels))


def write_predictions(directory: Path, predictions: dict[str, np.ndarray], *, mstcn: bool = False) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for video, ids in predictions.items():
        names = [CLASSES[i] for i in ids]
        if mstcn:  # MS-TCN results layout: no extension, a header line, labels on one line
            (directory / video).write_text("### Frame level recognition: ###\n" + " ".join(names) + "\n")
        else:
            (directory / f"{video}.txt").write_text("\n".join(names) + "\n")


def write_probabilities(path: Path, probabilities: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        for video, values in probabilities.items():
            handle.create_dataset(video, data=values)


def cli_args(root: Path, predictions: Path, *extra: str) -> list[str]:
    return [
        "--ground-truth", str(root / "groundTruth"),
        "--predictions", str(predictions),
        "--mapping", str(root / "mapping.txt"),
        "--split", str(root / "splits" / "test.split1.bundle"),
        *extra,
    ]  # fmt: skip


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------------------------ CLI


@pytest.mark.skipif(not GTEA.is_dir(), reason=f"reference data {GTEA} is absent")
def test_cli_reproduces_reference_values_on_gtea(tmp_path, capsys):
    out = tmp_path / "metrics.json"
    main(
        [
            "--ground-truth", str(GTEA / "groundTruth"),
            "--predictions", str(GTEA / "prediction"),
            "--mapping", str(GTEA / "mapping.txt"),
            "--split", str(GTEA / "splits" / "test.split1.bundle"),
            "--out", str(out),
        ]
    )  # fmt: skip
    metrics = json.loads(out.read_text())
    assert metrics == pytest.approx(
        {"acc": 62.5810, "edit": 67.3385, "f1_10": 68.4783, "f1_25": 61.4130, "f1_50": 44.5652}, abs=1e-4
    )
    printed = capsys.readouterr().out
    assert "F1@50" in printed and "44.57" in printed


def test_cli_reads_both_prediction_layouts_alike(tmp_path):
    labels = tiny_labels()
    write_text_dataset(tmp_path / "data", labels)
    predictions = argmax_labels(reference_model(labels, noise=0.2, seed=1))
    write_predictions(tmp_path / "lines", predictions)
    write_predictions(tmp_path / "mstcn", predictions, mstcn=True)
    from_lines = main(cli_args(tmp_path / "data", tmp_path / "lines"))
    from_mstcn = main(cli_args(tmp_path / "data", tmp_path / "mstcn"))
    assert from_lines == from_mstcn
    assert set(from_lines) == {"acc", "edit", "f1_10", "f1_25", "f1_50"}
    assert 50 < from_lines["acc"] < 100


def test_cli_with_probabilities_adds_localization(tmp_path):
    labels = tiny_labels()
    write_text_dataset(tmp_path / "data", labels)
    write_predictions(tmp_path / "pred", labels)
    write_probabilities(tmp_path / "probs.h5", reference_model(labels, noise=0.0, seed=2))
    metrics = main(cli_args(tmp_path / "data", tmp_path / "pred", "--probabilities", str(tmp_path / "probs.h5")))
    assert metrics["map_50"] == 100.0 and metrics["map_avg"] == 100.0
    assert metrics["acc"] == metrics["edit"] == metrics["f1_50"] == 100.0
    assert 0 < metrics["auc"] <= 99.0


def test_background_option_changes_segments(tmp_path):
    labels = tiny_labels()
    write_text_dataset(tmp_path / "data", labels)
    predictions = argmax_labels(reference_model(labels, noise=0.3, seed=3))
    write_predictions(tmp_path / "pred", predictions)
    default = main(cli_args(tmp_path / "data", tmp_path / "pred"))
    explicit = main(cli_args(tmp_path / "data", tmp_path / "pred", "--background", "background"))
    other = main(cli_args(tmp_path / "data", tmp_path / "pred", "--background", "stir"))
    assert default == explicit
    assert other["acc"] == default["acc"] and other["edit"] != default["edit"]


def test_read_prediction_file_layouts(tmp_path):
    (tmp_path / "a.txt").write_text("cut\ncut\npour\n\n")
    (tmp_path / "b").write_text("### Frame level recognition: ###\ncut cut pour \n")
    assert read_prediction_file(tmp_path / "a.txt") == read_prediction_file(tmp_path / "b") == ["cut", "cut", "pour"]


# ------------------------------------------------------------------------------------ bad input


def _bad_case(tmp_path: Path, fault: str) -> list[str]:
    """A tiny dataset with one fault; returns the CLI arguments."""
    labels = tiny_labels()
    write_text_dataset(tmp_path / "data", labels)
    predictions = dict(labels)
    extra: list[str] = []
    if fault == "length":
        predictions["video_b"] = labels["video_b"][:-2]
    if fault == "missing":
        del predictions["video_c"]
    write_predictions(tmp_path / "pred", predictions)
    if fault == "unknown":
        (tmp_path / "pred" / "video_a.txt").write_text("cut\nwhisk\n")
    if fault == "empty_split":
        (tmp_path / "data" / "splits" / "test.split1.bundle").write_text("\n")
    if fault in ("nan", "negative"):
        probabilities = {video: np.full((len(ids), 4), 0.25, dtype=np.float32) for video, ids in labels.items()}
        probabilities["video_b"][7, 2] = np.nan if fault == "nan" else -0.1
        write_probabilities(tmp_path / "probs.h5", probabilities)
        extra = ["--probabilities", str(tmp_path / "probs.h5")]
    return cli_args(tmp_path / "data", tmp_path / "pred", *extra, "--out", str(tmp_path / "out.json"))


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("length", r"pred/video_b\.txt: \d+ frames, but .*groundTruth/video_b\.txt has \d+"),
        ("missing", r"video_c\.txt: prediction of video 'video_c' not found"),
        ("unknown", r"video_a\.txt: frame 2: unknown class 'whisk'"),
        ("empty_split", r"test\.split1\.bundle: empty split"),
        ("nan", r"probs\.h5: 'video_b': NaN or infinite probability at frame 7"),
        ("negative", r"probs\.h5: 'video_b': negative probability at frame 7"),
    ],
)
def test_bad_input_is_one_line_error_naming_the_file(tmp_path, fault, message):
    with pytest.raises(EtesvsError, match=message) as error:
        main(_bad_case(tmp_path, fault))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out.json").exists()


def test_cli_exits_nonzero_with_one_line_on_bad_input(tmp_path):
    result = run_script("-m", "etesvs.evaluate", *_bad_case(tmp_path, "length"), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "video_b.txt" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_library_rejects_missing_probabilities_and_bad_shapes():
    labels = {"v": np.array([0, 1, 1, 2])}
    with pytest.raises(EtesvsError, match="no probabilities for video 'v'"):
        evaluate_predictions(labels, num_classes=3, probabilities={}, probabilities_source="p.h5")
    with pytest.raises(EtesvsError, match=r"p\.h5: 'v': expected shape \(4, 3\)"):
        evaluate_predictions(labels, num_classes=3, probabilities={"v": np.ones((4, 2))}, probabilities_source="p.h5")
    with pytest.raises(EtesvsError, match="has 3 frames, the ground truth has 4"):
        evaluate_predictions(labels, num_classes=3, probabilities={"v": np.ones((3, 3))}, probabilities_source="p.h5")
    with pytest.raises(EtesvsError, match="empty split"):
        evaluate_predictions({}, {}, num_classes=3)


def test_library_takes_argmax_of_probabilities_when_no_labels_given():
    truth = {"v": np.array([0, 1, 1, 1, 2, 2])}
    probabilities = {"v": np.eye(3)[[0, 1, 1, 2, 2, 2]] * 0.8 + 0.2 / 3}
    result = evaluate_predictions(truth, num_classes=3, background_ids=[0], probabilities=probabilities)
    np.testing.assert_array_equal(result.predictions["v"], [0, 1, 1, 2, 2, 2])
    assert result.metrics()["acc"] == pytest.approx(100 * 5 / 6)
    assert result.video_f1(0.5) == {"v": pytest.approx(100.0)}  # IoU 2/3 for both segments
    np.testing.assert_array_equal(result.confusion, [[1, 0, 0], [0, 2, 1], [0, 0, 2]])


# ------------------------------------------------------------------------------------ stages


def write_labels_dir(directory: Path, labels: dict[str, np.ndarray]) -> None:
    """A labels directory as convert_labels writes it: info.json and labels.h5."""
    directory.mkdir(parents=True)
    with h5py.File(directory / "labels.h5", "w") as handle:
        for video, ids in labels.items():
            group = handle.create_group(video)
            group.create_dataset("classes", data=ids.astype(np.int64))
            starts = np.ones(len(ids), dtype=np.uint8)
            starts[1:] = ids[1:] != ids[:-1]
            group.create_dataset("boundaries", data=starts)
    info = {
        "dataset": "tiny",
        "fps": FPS,
        "classes": CLASSES,
        "background": ["background"],
        "background_ids": [0],
        "split": 1,
        "train": ["video_c"],
        "test": ["video_a", "video_b"],
        "num_frames": {video: int(len(ids)) for video, ids in labels.items()},
    }
    (directory / "info.json").write_text(json.dumps(info))


def write_model_predictions(directory: Path, probabilities: dict[str, np.ndarray], **extra) -> None:
    write_probabilities(directory / "probs.h5", probabilities)
    model = {"model": "reference", "params": 1234567, "flops_per_frame": 2.5e9, "backbone_pretrained": False, **extra}
    (directory / "model.json").write_text(json.dumps(model))


def evaluate_stage(tmp_path: Path, burr_frames: object = 7) -> subprocess.CompletedProcess:
    """The stage as DVC runs item ``evaluate@mstcn`` of its matrix, on a reference model's predictions."""
    stage_workdir(tmp_path, {"window": 16, "streaming": {"postprocess": {"burr_frames": burr_frames}}})
    env = dict(os.environ, MPLBACKEND="Agg", DVC_STAGE="evaluate@mstcn")
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "evaluate.py"), "--labels", "data/labels",
         "--predictions", "data/predictions/reference", "--model", "reference", "--out", "reports/reference"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_evaluate_stage_writes_metrics_tables_and_pictures(tmp_path):
    labels = tiny_labels()
    write_labels_dir(tmp_path / "data" / "labels", labels)
    probabilities = reference_model(labels, noise=0.15, seed=4, videos=("video_a", "video_b"))
    write_model_predictions(tmp_path / "data" / "predictions" / "reference", probabilities)

    result = evaluate_stage(tmp_path)
    assert result.returncode == 0, result.stderr

    report = tmp_path / "reports" / "reference"
    metrics = json.loads((report / "metrics.json").read_text())
    expected = evaluate_predictions(
        {video: labels[video] for video in ("video_a", "video_b")},
        num_classes=4,
        background_ids=[0],
        probabilities=probabilities,
    ).metrics()
    assert set(metrics) == set(expected) | {"params_m", "mflops", "pretrained", "weights"}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=0.005)  # 2 decimals
    assert (metrics["params_m"], metrics["mflops"], metrics["pretrained"]) == (1.235, 2500.0, False)
    assert 0 < metrics["acc"] < 100

    with open(report / "per_class.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class"] for row in rows] == CLASSES
    support = sum(int(row["support"]) for row in rows)
    assert support == len(labels["video_a"]) + len(labels["video_b"])

    with open(report / "confusion.csv") as handle:
        confusion = list(csv.DictReader(handle))
    assert len(confusion) == len(CLASSES) ** 2, "every pair of classes, never-predicted ones included"
    assert set(confusion[0]) == {"actual", "predicted", "count"}
    assert sum(int(row["count"]) for row in confusion) == support

    pictures = sorted(path.name for path in (report / "segments").iterdir())
    assert pictures == ["video_a.png", "video_b.png"]
    assert (report / "segments" / "video_a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def burr_labels() -> dict[str, np.ndarray]:
    """Two test videos (and a training one) whose actions last 10 to 24 frames."""
    return {name: np.repeat([0, 1, 2, 0, 3, 1, 0, 2], [12, 20, 14, 10, 24, 16, 11, 18]) for name in
            ("video_a", "video_b", "video_c")}


def flickering(labels: np.ndarray, seed: int) -> np.ndarray:
    """One-hot probabilities of ``labels`` with 1- to 3-frame wrong runs right after some of the changes."""
    rng = np.random.default_rng(seed)
    predicted = labels.copy()
    for change in np.flatnonzero(np.diff(labels)) + 1:
        if rng.random() < 0.7:
            predicted[change:change + int(rng.integers(1, 4))] = labels[change - 1]
            predicted[change + 3] = (labels[change] % 3) + 1
    return np.eye(len(CLASSES), dtype=np.float32)[predicted] * 0.9 + 0.025


def test_evaluate_stage_scores_a_stream_after_its_burr_suppression(tmp_path):
    from etesvs.postprocess import suppress_burrs_by_window

    labels = burr_labels()
    probabilities = {video: flickering(labels[video], seed) for seed, video in enumerate(("video_a", "video_b"))}
    write_labels_dir(tmp_path / "data" / "labels", labels)
    write_model_predictions(tmp_path / "data" / "predictions" / "reference", probabilities, window=32)
    result = evaluate_stage(tmp_path, burr_frames=3)
    assert result.returncode == 0, result.stderr

    metrics = json.loads((tmp_path / "reports" / "reference" / "metrics.json").read_text())
    truth = {video: labels[video] for video in ("video_a", "video_b")}
    plain = evaluate_predictions(truth, num_classes=4, background_ids=[0], probabilities=probabilities).metrics()
    emitted = {video: suppress_burrs_by_window(values.argmax(1), 32, 3) for video, values in probabilities.items()}
    suppressed = evaluate_predictions(truth, emitted, num_classes=4, background_ids=[0],
                                      probabilities=probabilities).metrics()
    assert metrics["burr_frames"] == 3
    for key in ("acc", "edit", "f1_10", "f1_25", "f1_50"):
        assert metrics[key] == pytest.approx(suppressed[key], abs=0.005)
        assert metrics["argmax"][key] == pytest.approx(plain[key], abs=0.005)
    assert metrics["map_50"] == pytest.approx(plain["map_50"], abs=0.005), "localization: from the probabilities"
    assert metrics["edit"] > metrics["argmax"]["edit"] + 10 and metrics["f1_50"] > metrics["argmax"]["f1_50"]
    table = summary_markdown({"reference": metrics}).splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == ["| reference", "| reference (argmax)"]
    assert table[3].split(" | ")[5] == f"{metrics['argmax']['f1_50']:.1f}"

    # a two-stage model (no window in model.json) is scored on its argmax, whatever the param says
    write_model_predictions(tmp_path / "data" / "predictions" / "reference", probabilities)
    assert evaluate_stage(tmp_path, burr_frames=3).returncode == 0
    metrics = json.loads((tmp_path / "reports" / "reference" / "metrics.json").read_text())
    assert "argmax" not in metrics and metrics["f1_50"] == pytest.approx(plain["f1_50"], abs=0.005)


@pytest.mark.parametrize("burr_frames", [-1, 2.5, "7", True])
def test_evaluate_stage_rejects_a_bad_burr_param(tmp_path, burr_frames):
    labels = burr_labels()
    write_labels_dir(tmp_path / "data" / "labels", labels)
    write_model_predictions(tmp_path / "data" / "predictions" / "reference",
                            {video: flickering(labels[video], 0) for video in ("video_a", "video_b")}, window=32)
    result = evaluate_stage(tmp_path, burr_frames=burr_frames)
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: params.yaml: streaming.postprocess: burr_frames must be an integer")
    assert not (tmp_path / "reports" / "reference").exists()


def test_evaluate_stage_bad_probabilities_fail_without_output(tmp_path):
    labels = tiny_labels()
    write_labels_dir(tmp_path / "data" / "labels", labels)
    probabilities = reference_model(labels, noise=0.1, seed=7, videos=("video_a", "video_b"))
    probabilities["video_b"][5, 1] = np.nan
    write_model_predictions(tmp_path / "data" / "predictions" / "reference", probabilities)
    result = evaluate_stage(tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: data/predictions/reference/probs.h5: 'video_b': NaN")
    assert not (tmp_path / "reports" / "reference" / "metrics.json").exists()
    assert not (tmp_path / "reports" / "reference" / "segments").exists()


def test_summary_table_and_stage(tmp_path):
    reports = {
        "mstcn": {"acc": 80.0, "edit": 70.5, "f1_10": 75.0, "f1_25": 72.0, "f1_50": 60.04, "map_50": 40.0,
                  "map_avg": 30.0, "auc": 55.0, "params_m": 0.799, "mflops": None},
        "etesvs": {"acc": 82.0, "edit": 71.0, "f1_10": 76.0, "f1_25": 73.0, "f1_50": 61.0, "map_50": None,
                   "map_avg": None, "auc": None, "params_m": 3.5, "mflops": 310.0},
    }  # fmt: skip
    table = summary_markdown(reports).splitlines()
    assert table[0] == "| Model | Params | FLOPs/frame | F1@10 | F1@25 | F1@50 | Edit | Acc | mAP@0.5 | avg mAP | AUC |"
    assert table[2] == "| mstcn | 799.00k | - | 75.0 | 72.0 | 60.0 | 70.5 | 80.0 | 40.0 | 30.0 | 55.0 |"
    assert table[3] == "| etesvs | 3.50M | 310.00M | 76.0 | 73.0 | 61.0 | 71.0 | 82.0 | - | - | - |"

    for model, metrics in reports.items():
        (tmp_path / "reports" / model).mkdir(parents=True)
        (tmp_path / "reports" / model / "metrics.json").write_text(json.dumps(metrics))
    for name in ("dvc.yaml", "params.yaml"):  # the stage reads its caption's params as under DVC
        shutil.copy(ROOT / name, tmp_path / name)
    result = run_script(
        str(ROOT / "stages" / "summarize.py"),
        "--metrics", "reports/mstcn/metrics.json", "reports/etesvs/metrics.json",
        "--out", "reports/summary.md",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    caption, blank, *rest = (tmp_path / "reports" / "summary.md").read_text().splitlines()
    assert caption.startswith("Test-split scores (%) on the embedded demo dataset") and not blank and rest == table


def test_confusion_csv_lists_every_pair_of_classes():
    confusion = np.array([[3, 0, 1], [0, 2, 0], [0, 0, 0]])
    rows = confusion_csv(confusion, ["background", "cut", "pour"]).splitlines()
    assert rows[0] == "actual,predicted,count" and len(rows) == 1 + 9
    assert "background,pour,1" in rows and "pour,pour,0" in rows and "cut,cut,2" in rows


def test_summary_caption_says_what_the_table_is():
    from etesvs.evaluate import summary_caption

    params = {"seed": 0, "cpu_kernels": "avx2", "dataset": {"name": "demo", "split": 1}, "demo": {"seed": 3},
              "features": {"weights": "data/pretrained/i3d_demo.pt"},
              "streaming": {"pretrained": "data/pretrained/mobilenet_v2_demo.pt"}}
    caption = summary_caption(params)
    assert "demo seed 3), split 1" in caption and "training seed 0" in caption
    assert "generated corpus" in caption and "include its I3D feature extractor" in caption
    real = summary_caption({**params, "dataset": {"name": "gtea", "split": 2},
                            "features": {"weights": "data/pretrained/rgb_imagenet.pt"},
                            "streaming": {"pretrained": ""}})
    assert real.startswith("Test-split scores (%) on gtea, split 2;") and "generated corpus" not in real
    assert "random initialisation" in real
    assert "pinned to AVX2" in caption and "native kernels" in summary_caption({**params, "cpu_kernels": "native"})
