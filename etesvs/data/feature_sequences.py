"""Per-frame feature sequences with their labels, for the two-stage temporal models.

Features come from ``features.h5`` (one float dataset per video id, shape (T, D), written by extract_features);
labels from a labels directory (``labels.h5`` + ``info.json``, written by convert_labels). Models run at a
``sample_rate``: every ``sample_rate``-th frame is kept, T' = ceil(T / sample_rate).

A sample is a dict:

- ``"features"``: (D, T') float32
- ``"labels"``: (T',) int64 class ids
- ``"boundaries"``: (T',) float32, 1 where a segment starts at the model's frame rate
- ``"mask"``: (T',) bool, all True (padding added by :func:`collate_features` is False)
- ``"video"``: str video id
- ``"num_frames"``: int, T at the full frame rate (to upsample predictions back)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from etesvs.data.labels import load_boundaries, load_labels
from etesvs.errors import EtesvsError
from etesvs.losses import IGNORE_INDEX


def subsample_boundaries(boundaries: np.ndarray, sample_rate: int) -> np.ndarray:
    """Segment starts at the subsampled rate: kept frame j is a start if a segment starts in ((j-1)s, js].

    Taking every s-th entry of the boundary array would lose every start that falls between kept frames; this
    moves it to the first kept frame of the new segment, which is where the subsampled labels change.

    Args:
        boundaries: (T,) 0/1, 1 where a segment starts (frame 0 included).

    Returns:
        (ceil(T / s),) float32.
    """
    boundaries = np.asarray(boundaries).astype(bool)
    length = len(boundaries)
    num_kept = -(-length // sample_rate)
    out = np.zeros(num_kept, dtype=np.float32)
    if length == 0:
        return out
    out[0] = float(boundaries[0])
    if num_kept > 1:
        # Frame j*s (j >= 1) closes the interval ((j-1)s, js]; group frames 1..(num_kept-1)*s by that interval.
        inner = boundaries[1 : (num_kept - 1) * sample_rate + 1]  # frames 1 .. (num_kept-1)*s
        out[1:] = inner.reshape(num_kept - 1, sample_rate).any(axis=1)  # (J*s,) -> (J, s) -> (J,)
    return out


@dataclass(frozen=True)
class LabelCounts:
    """Frame statistics of a dataset at its sample rate (for class weights and the boundary pos_weight)."""

    class_counts: np.ndarray  # (C,) int64 frames per class
    num_boundaries: int
    num_frames: int


class FeatureDataset(Dataset):
    """Feature sequences of the given videos; see the module docstring for the sample layout.

    The HDF5 file is opened lazily in the process that reads it (safe with DataLoader workers); labels are read
    once at construction and lengths are checked against the features.
    """

    def __init__(
        self,
        features_path: str | os.PathLike,
        labels_dir: str | os.PathLike,
        videos: Sequence[str],
        *,
        sample_rate: int = 1,
    ) -> None:
        if sample_rate < 1:
            raise ValueError(f"sample_rate must be >= 1, got {sample_rate}")
        self.features_path = Path(features_path)
        self.labels_dir = Path(labels_dir)
        self.videos = list(videos)
        self.sample_rate = sample_rate
        if not self.features_path.is_file():
            raise EtesvsError(f"{self.features_path}: features file not found")
        self._labels = {video: load_labels(self.labels_dir, video) for video in self.videos}
        self._boundaries = {video: load_boundaries(self.labels_dir, video) for video in self.videos}
        dims = set()
        with h5py.File(self.features_path, "r") as handle:
            self.attrs = {key: _plain(value) for key, value in handle.attrs.items()}
            for video in self.videos:
                if video not in handle:
                    raise EtesvsError(f"{self.features_path}: no features for video '{video}'")
                shape = handle[video].shape
                if len(shape) != 2:
                    raise EtesvsError(
                        f"{self.features_path}: features of '{video}' have shape {shape}, expected (T, D)"
                    )
                if shape[0] != len(self._labels[video]):
                    raise EtesvsError(
                        f"{self.features_path}: '{video}' has {shape[0]} feature frames but "
                        f"{len(self._labels[video])} labelled frames in {self.labels_dir / 'labels.h5'}"
                    )
                dims.add(int(shape[1]))
        if len(dims) > 1:
            raise EtesvsError(f"{self.features_path}: videos have different feature sizes {sorted(dims)}")
        self.feature_dim = dims.pop() if dims else 0
        self._handle: h5py.File | None = None
        self._handle_pid: int | None = None

    def __len__(self) -> int:
        return len(self.videos)

    def _file(self) -> h5py.File:
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = h5py.File(self.features_path, "r")
            self._handle_pid = os.getpid()
        return self._handle

    def __getitem__(self, index: int) -> dict[str, Any]:
        video = self.videos[index]
        step = self.sample_rate
        features = np.asarray(self._file()[video][::step], dtype=np.float32)  # (T', D)
        labels = self._labels[video]
        sampled_labels = labels[::step]
        return {
            "features": torch.from_numpy(np.ascontiguousarray(features.T)),  # (T', D) -> (D, T')
            "labels": torch.from_numpy(sampled_labels.astype(np.int64)),
            "boundaries": torch.from_numpy(subsample_boundaries(self._boundaries[video], step)),
            "mask": torch.ones(len(sampled_labels), dtype=torch.bool),
            "video": video,
            "num_frames": len(labels),
        }

    def full_rate_labels(self, video: str) -> np.ndarray:
        """Labels of ``video`` at the full frame rate, int64 (T,)."""
        return self._labels[video]

    def label_counts(self, num_classes: int, *, full_rate: bool = False) -> LabelCounts:
        """Class frequencies and boundary count over all videos at the dataset's sample rate (the frames a model
        trains on), or with ``full_rate`` over the full-rate label arrays (what the published ASRF code counts)."""
        rate = 1 if full_rate else self.sample_rate
        counts = np.zeros(num_classes, dtype=np.int64)
        num_boundaries = 0
        num_frames = 0
        for video in self.videos:
            labels = self._labels[video][::rate]
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise EtesvsError(
                    f"{self.labels_dir / 'labels.h5'}: '{video}' has class ids outside 0..{num_classes - 1}"
                )
            counts += np.bincount(labels, minlength=num_classes)
            num_boundaries += int(subsample_boundaries(self._boundaries[video], rate).sum())
            num_frames += len(labels)
        return LabelCounts(class_counts=counts, num_boundaries=num_boundaries, num_frames=num_frames)

    def close(self) -> None:
        """Close the HDF5 file if this process opened it."""
        if self._handle is not None and self._handle_pid == os.getpid():
            self._handle.close()
        self._handle = None
        self._handle_pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # h5py handles cannot be pickled (spawned workers); each process reopens
        state["_handle_pid"] = None
        return state


def _plain(value: Any) -> Any:
    """HDF5 attribute value as a JSON-friendly Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def collate_features(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pad samples to the longest in the batch.

    Returns:
        ``"features"`` (B, D, T) float32 zero-padded, ``"labels"`` (B, T) int64 padded with -100,
        ``"boundaries"`` (B, T) float32 zero-padded, ``"mask"`` (B, T) bool, ``"video"`` list of B str,
        ``"num_frames"`` (B,) int64 full-rate lengths.
    """
    batch_size = len(samples)
    length = max(sample["labels"].shape[0] for sample in samples)
    dim = samples[0]["features"].shape[0]
    features = torch.zeros(batch_size, dim, length, dtype=torch.float32)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.int64)
    boundaries = torch.zeros(batch_size, length, dtype=torch.float32)
    mask = torch.zeros(batch_size, length, dtype=torch.bool)
    for i, sample in enumerate(samples):
        t = sample["labels"].shape[0]
        features[i, :, :t] = sample["features"]
        labels[i, :t] = sample["labels"]
        boundaries[i, :t] = sample["boundaries"]
        mask[i, :t] = sample["mask"]
    return {
        "features": features,
        "labels": labels,
        "boundaries": boundaries,
        "mask": mask,
        "video": [sample["video"] for sample in samples],
        "num_frames": torch.tensor([sample["num_frames"] for sample in samples], dtype=torch.int64),
    }
