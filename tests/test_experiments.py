"""conf/experiment/: one file per row of the papers' tables, each composing to the published settings and holding
only what differs from what it builds on."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import ROOT, composed_params

EXPERIMENTS = ROOT / "conf" / "experiment"
DATASETS = ("gtea", "50salads", "breakfast")

# The published settings each row must compose to (values as cited in the experiment files).
PUBLISHED = {
    "i3d": {"features.method": "window", "features.window_size": 21, "features.crop_size": 224,
            "features.weights": "data/pretrained/rgb_imagenet.pt"},
    "mstcn": {"mstcn.model.num_stages": 4, "mstcn.model.num_layers": 10, "mstcn.model.num_feature_maps": 64,
              "mstcn.loss.smoothing_weight": 0.15, "mstcn.train.lr": 0.0005, "mstcn.train.batch_size": 1,
              "mstcn.train.epochs": 50, "mstcn.train.optimizer": "adam", "mstcn.train.weight_decay": 0.0},
    "asrf": {"asrf.model.num_stages_segmentation": 4, "asrf.model.num_stages_boundary": 4,
             "asrf.model.num_layers": 10, "asrf.model.num_feature_maps": 64, "asrf.model.boundary_threshold": 0.5,
             "asrf.loss.smoothing_weight": 1.0, "asrf.loss.boundary_weight": 0.1, "asrf.train.lr": 0.0005,
             "asrf.train.batch_size": 1, "asrf.train.epochs": 50, "asrf.train.weight_decay": 0.0},
    "asformer": {"asformer.model.num_decoders": 3, "asformer.model.num_layers": 10,
                 "asformer.model.num_feature_maps": 64, "asformer.train.batch_size": 1, "asformer.train.epochs": 120,
                 "asformer.train.weight_decay": 0.00001, "asformer.train.scheduler": "plateau"},
    "etesvs": {"streaming.model.width_mult": 1.0, "streaming.model.temporal_shift": True,
               "streaming.model.head_stages": 1, "streaming.model.head_layers": 4, "streaming.model.head_channels": 64,
               "streaming.model.shift_across_windows": False, "streaming.loss.smooth_across_windows": False,
               "streaming.data.image_size": 224, "streaming.model.norm": "batch",
               "streaming.pretrained": "data/pretrained/mobilenet_v2-b0353104.pth"},
}
PER_DATASET = {
    ("mstcn", "50salads"): {"dataset.sample_rate": 2},
    ("asformer", "gtea"): {"asformer.train.lr": 0.0005, "asformer.model.channel_dropout": 0.5},
    ("asformer", "50salads"): {"asformer.train.lr": 0.0005, "asformer.model.channel_dropout": 0.3},
    ("asformer", "breakfast"): {"asformer.train.lr": 0.0001, "asformer.model.channel_dropout": 0.3},
    ("etesvs", "gtea"): {"window": 128, "streaming.data.sample_rate": 4, "streaming.model.shift_divisor": 8,
                         "streaming.train.optimizer": "sgd", "streaming.train.momentum": 0.9,
                         "streaming.train.lr": 0.0005, "streaming.train.weight_decay": 0.0001,
                         "streaming.train.milestones": [10, 30], "streaming.train.gamma": 0.1,
                         "streaming.train.epochs": 50, "streaming.train.batch_videos": 2},
    ("etesvs", "50salads"): {"window": 640, "streaming.data.sample_rate": 20, "streaming.model.shift_divisor": 30,
                             "streaming.train.optimizer": "adam", "streaming.train.lr": 0.0005,
                             "streaming.train.weight_decay": 0.0005, "streaming.train.epochs": 70,
                             "streaming.train.batch_videos": 2},
    ("etesvs", "breakfast"): {"window": 120, "streaming.data.sample_rate": 4, "streaming.model.shift_divisor": 30,
                              "streaming.train.optimizer": "adam", "streaming.train.lr": 0.001,
                              "streaming.train.weight_decay": 0.0005, "streaming.train.epochs": 50,
                              "streaming.train.batch_videos": 4},
}


def _get(params: dict, key: str):
    for part in key.split("."):
        params = params[part]
    return params


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("row", sorted(PUBLISHED))
def test_every_row_composes_to_the_published_settings(tmp_path, row, dataset):
    params = composed_params(tmp_path, f"experiment={row}_{dataset}")
    assert params["dataset"]["name"] == dataset and params["window"] % params["streaming"]["data"]["sample_rate"] == 0
    expected = {**PUBLISHED[row], **(PUBLISHED["i3d"] if row in ("mstcn", "asrf", "asformer") else {}),
                **PER_DATASET.get((row, dataset), {})}
    for key, value in expected.items():
        assert _get(params, key) == value, key


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*_*.yaml")), ids=lambda path: path.stem)
def test_an_experiment_holds_only_what_it_changes(tmp_path, path):
    """Every value an experiment file writes differs from what the configuration it builds on already says."""
    content = yaml.safe_load(path.read_text())
    defaults = content.pop("defaults", [])
    parents = [f"experiment={item}" for item in defaults if isinstance(item, str) and item != "_self_"]
    parents += [f"dataset={item['override /dataset']}" for item in defaults if isinstance(item, dict)]
    base = composed_params(tmp_path, *parents)
    for key, value in _leaves(content).items():
        try:
            before = _get(base, key)
        except KeyError:  # a key the defaults do not have (momentum of SGD, milestones of a schedule)
            continue
        assert before != value, f"{path.name}: {key} repeats {value!r}"
    assert path.read_text().splitlines()[1].startswith("# "), "a comment says where the values come from"
