"""Feature sequences: subsampled boundaries, the dataset's samples and collation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from etesvs.data.feature_sequences import FeatureDataset, collate_features, subsample_boundaries
from etesvs.errors import EtesvsError
from tests.synthetic import DIM, NUM_CLASSES, make_feature_data


@pytest.fixture(scope="module")
def feature_data(tmp_path_factory):
    return make_feature_data(tmp_path_factory.mktemp("features"))


def test_subsample_boundaries_keeps_starts_between_kept_frames():
    boundaries = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0], dtype=np.uint8)  # segments start at 0, 3, 7
    # Kept frames 0, 2, 4, 6, 8: the start at 3 moves to kept frame 4, the one at 7 to kept frame 8.
    np.testing.assert_array_equal(subsample_boundaries(boundaries, 2), [1, 0, 1, 0, 1])
    np.testing.assert_array_equal(subsample_boundaries(boundaries, 1), boundaries)
    np.testing.assert_array_equal(subsample_boundaries(boundaries, 4), [1, 1, 1])


def test_feature_dataset_samples_and_collate(feature_data):
    features, labels = feature_data
    dataset = FeatureDataset(features, labels, ["video00", "video01"], sample_rate=2)
    sample = dataset[0]
    with h5py.File(features) as handle:
        raw = handle["video00"][()]
    full = len(dataset.full_rate_labels("video00"))
    assert sample["num_frames"] == full == raw.shape[0]
    assert sample["features"].shape == (DIM, (full + 1) // 2) and sample["features"].dtype == torch.float32
    np.testing.assert_array_equal(sample["features"].numpy(), raw[::2].T)
    np.testing.assert_array_equal(sample["labels"].numpy(), dataset.full_rate_labels("video00")[::2])
    assert sample["mask"].all() and sample["video"] == "video00"
    batch = collate_features([dataset[0], dataset[1]])
    length = max(len(dataset[0]["labels"]), len(dataset[1]["labels"]))
    assert batch["features"].shape == (2, DIM, length)
    assert batch["mask"].sum().item() == len(dataset[0]["labels"]) + len(dataset[1]["labels"])
    assert (batch["labels"][~batch["mask"]] == -100).all()
    assert batch["video"] == ["video00", "video01"]
    counts = dataset.label_counts(NUM_CLASSES)
    assert counts.class_counts.sum() == counts.num_frames == batch["mask"].sum().item()
    # The published ASRF code counts the full-rate label arrays instead.
    full_rate = dataset.full_rate_labels("video00"), dataset.full_rate_labels("video01")
    full_counts = dataset.label_counts(NUM_CLASSES, full_rate=True)
    assert full_counts.num_frames == sum(len(labels) for labels in full_rate)
    per_class = sum(np.bincount(labels, minlength=NUM_CLASSES) for labels in full_rate)
    np.testing.assert_array_equal(full_counts.class_counts, per_class)
    assert full_counts.num_boundaries == sum(1 + int((x[1:] != x[:-1]).sum()) for x in full_rate)


def test_feature_dataset_rejects_length_mismatch(tmp_path):
    features, labels = make_feature_data(tmp_path, num_train=2, num_test=1)
    with h5py.File(features, "a") as handle:
        data = handle["video01"][()]
        del handle["video01"]
        handle.create_dataset("video01", data=data[:-3])
    with pytest.raises(EtesvsError, match="'video01' has .* feature frames but"):
        FeatureDataset(features, labels, ["video00", "video01"])
    with h5py.File(features, "a") as handle:
        del handle["video00"]
    with pytest.raises(EtesvsError, match="features.h5: no features for video 'video00'"):
        FeatureDataset(features, labels, ["video00"])
