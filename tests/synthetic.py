"""Tiny synthetic inputs shared by several test modules."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from etesvs.data.labels import boundaries_from_ids

NUM_CLASSES, DIM = 4, 12


def make_feature_data(root: Path, *, num_train=10, num_test=3, seed=0, noise=0.8) -> tuple[Path, Path]:
    """A tiny easy problem: each class has a random prototype; a frame's feature is its class prototype plus noise.

    Writes ``root/features.h5`` and ``root/labels/{labels.h5,info.json}`` as extract_features and convert_labels do.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(NUM_CLASSES, DIM)).astype(np.float32) * 2
    videos = [f"video{i:02d}" for i in range(num_train + num_test)]
    labels = {}
    for video in videos:
        segments = [np.full(rng.integers(8, 20), rng.integers(NUM_CLASSES)) for _ in range(rng.integers(3, 6))]
        labels[video] = np.concatenate(segments).astype(np.int64)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "features.h5", "w") as handle:
        handle.attrs["extractor"] = "synthetic"
        handle.attrs["backbone_pretrained"] = False
        for video, ids in labels.items():
            feats = prototypes[ids] + noise * rng.normal(size=(len(ids), DIM)).astype(np.float32)
            handle.create_dataset(video, data=feats.astype(np.float32))
    with h5py.File(root / "labels" / "labels.h5", "w") as handle:
        for video, ids in labels.items():
            group = handle.create_group(video)
            group.create_dataset("classes", data=ids)
            group.create_dataset("boundaries", data=boundaries_from_ids(ids))
    info = {
        "dataset": "synthetic", "fps": 15.0, "classes": [f"class{c}" for c in range(NUM_CLASSES)],
        "background": ["class0"], "background_ids": [0], "split": 1,
        "train": videos[:num_train], "test": videos[num_train:],
        "num_frames": {video: int(len(ids)) for video, ids in labels.items()},
    }
    (root / "labels" / "info.json").write_text(json.dumps(info))
    return root / "features.h5", root / "labels"
