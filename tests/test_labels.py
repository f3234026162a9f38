import json
import subprocess
import sys

import numpy as np
import pytest

from etesvs.data.labels import (
    activitynet_to_ground_truth,
    boundaries_from_ids,
    convert_labels,
    load_boundaries,
    load_label_info,
    load_labels,
    segments_from_ids,
)
from etesvs.data.layout import DatasetLayout
from etesvs.errors import EtesvsError
from tests.conftest import ROOT, run_stage, stage_workdir


def make_dataset(root, videos=None, mapping="0 background\n1 take\n2 pour\n"):
    videos = videos or {
        "a": ["background"] * 3 + ["take"] * 4 + ["pour"] * 2 + ["background"],
        "b": ["take"] * 2 + ["background"] * 2 + ["take"] * 3,
        "c": ["pour"] * 5,
    }
    (root / "groundTruth").mkdir(parents=True)
    (root / "splits").mkdir()
    for video, labels in videos.items():
        (root / "groundTruth" / f"{video}.txt").write_text("\n".join(labels) + "\n")
    (root / "mapping.txt").write_text(mapping)
    (root / "splits" / "train.split1.bundle").write_text("a.txt\nb.txt\n")
    (root / "splits" / "test.split1.bundle").write_text("c.txt\n")
    return root


def test_segments_and_boundaries():
    ids = np.array([0, 0, 1, 1, 1, 0, 2])
    assert boundaries_from_ids(ids).tolist() == [1, 0, 1, 0, 0, 1, 1]
    assert segments_from_ids(ids) == [(0, 0, 2), (1, 2, 5), (0, 5, 6), (2, 6, 7)]
    assert segments_from_ids(np.array([], dtype=int)) == []


def test_convert_labels_writes_arrays_and_localization(tmp_path):
    root = make_dataset(tmp_path / "raw")
    info = convert_labels(DatasetLayout(root), tmp_path / "labels", dataset="toy", split=1, fps=2.0, background=["background"])
    assert info.classes == ("background", "take", "pour")
    assert info.train == ("a", "b") and info.test == ("c",)
    assert info.num_frames == {"a": 10, "b": 7, "c": 5}
    assert load_labels(tmp_path / "labels", "a").tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 0]
    assert load_boundaries(tmp_path / "labels", "b").tolist() == [1, 0, 1, 0, 1, 0, 0]
    train = json.loads((tmp_path / "labels" / "localization_train.json").read_text())["database"]
    assert train["a"]["subset"] == "train" and train["a"]["frames"] == 10
    assert train["a"]["annotations"] == [
        {"label": "take", "segment": [1.5, 3.5], "start_frame": 3, "end_frame": 7},
        {"label": "pour", "segment": [3.5, 4.5], "start_frame": 7, "end_frame": 9},
    ]
    assert [a["label"] for a in train["b"]["annotations"]] == ["take", "take"]
    test = json.loads((tmp_path / "labels" / "localization_test.json").read_text())["database"]
    assert list(test) == ["c"]
    assert load_label_info(tmp_path / "labels").background_ids == (0,)


@pytest.mark.parametrize(
    "fault, expected",
    [
        ("unknown_class", "groundTruth/a.txt:2: class 'stir' is not in mapping.txt"),
        ("bad_mapping", "mapping.txt:2: expected '<id> <name>'"),
        ("empty_labels", "groundTruth/b.txt: empty label file"),
        ("missing_video", "train.split1.bundle:2: names video 'zzz' but"),
    ],
)
def test_convert_labels_bad_input_stage(tmp_path, fault, expected):
    root = make_dataset(tmp_path / "raw")
    if fault == "unknown_class":
        (root / "groundTruth" / "a.txt").write_text("take\nstir\n")
    elif fault == "bad_mapping":
        (root / "mapping.txt").write_text("0 background\n1take\n")
    elif fault == "empty_labels":
        (root / "groundTruth" / "b.txt").write_text("")
    elif fault == "missing_video":
        (root / "splits" / "train.split1.bundle").write_text("a.txt\nzzz.txt\n")
    out = tmp_path / "labels"
    workdir = stage_workdir(tmp_path / "work", {"dataset": {"name": "toy", "split": 1, "fps": 15,
                                                            "background": "background"}})
    result = run_stage("convert_labels", "--root", str(root), "--out", str(out), cwd=workdir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert expected in lines[0]
    assert not out.exists(), "no half-written output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".labels")], "temporary directory left behind"


def test_thumos_style_json_to_ground_truth_and_back(tmp_path):
    annotations = {
        "database": {
            "video_validation_1": {
                "subset": "validation", "duration": 4.0,
                "annotations": [{"label": "Diving", "segment": [1.0, 2.0]}, {"label": "Shotput", "segment": [2.5, 3.0]}],
            },
            "video_test_1": {"subset": "test", "duration": 2.0, "annotations": [{"label": "Diving", "segment": [0.0, 0.5]}]},
        }
    }
    path = tmp_path / "thumos.json"
    path.write_text(json.dumps(annotations))
    root = tmp_path / "thumos14"
    activitynet_to_ground_truth(path, root, fps=10)
    labels = (root / "groundTruth" / "video_validation_1.txt").read_text().split()
    assert len(labels) == 40
    assert labels[9] == "background" and labels[10:20] == ["Diving"] * 10 and labels[20] == "background"
    assert labels[25:30] == ["Shotput"] * 5
    assert (root / "mapping.txt").read_text() == "0 background\n1 Diving\n2 Shotput\n"
    assert (root / "splits" / "train.split1.bundle").read_text() == "video_validation_1.txt\n"
    info = convert_labels(DatasetLayout(root), tmp_path / "labels", dataset="thumos14", split=1, fps=10, background=["background"])
    database = json.loads((tmp_path / "labels" / "localization_train.json").read_text())["database"]
    assert [a["segment"] for a in database["video_validation_1"]["annotations"]] == [[1.0, 2.0], [2.5, 3.0]]
    assert info.test == ("video_test_1",)


def test_thumos_json_without_duration(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"database": {"v": {"subset": "test", "annotations": []}}}))
    with pytest.raises(EtesvsError, match="bad.json: video 'v' has neither 'duration' nor 'frames'"):
        activitynet_to_ground_truth(path, tmp_path / "out", fps=30)
