"""Videos as streams of windows, for the end-to-end streaming model.

Every video is cut into consecutive windows of ``window`` frames (the last one shorter); the network sees every
``sample_rate``-th frame of a window, ``T = window / sample_rate`` frames. Training walks through a group of B
videos in lockstep: step ``s`` of the group holds the ``s``-th window of each of its videos, so that the memory
of each row carries on from that video's previous window. Videos that have run out of windows are padded with
empty, fully masked windows until the longest video of the group ends. Several groups can be in flight at once,
their steps interleaved (see :func:`lockstep_schedule`).

- :func:`lockstep_schedule` / :class:`LockstepWindowSampler` decide which window of which video goes into which
  row of which step (a batch sampler for ``DataLoader(batch_sampler=...)``, sharding groups across processes);
- :class:`VideoWindows` decodes a window's frames from the frame containers, augments and normalises them.

A sample (one row of a step) is a dict:

- ``"frames"``: (T, 3, S, S) float32, normalised with the ImageNet mean and std, zero on padding frames
- ``"labels"``: (T,) int64 class id of each fed frame, -100 on padding frames
- ``"mask"``: (T,) bool, True on the window's real frames
- ``"reset"``: () bool, True on the first window of a video (and on padding rows): the memory starts afresh
- ``"video_index"``: () int64 index into ``dataset.videos``, -1 on padding rows
- ``"window_index"``: () int64 window number within the video
- ``"start"``: () int64 first frame of the window, at the full frame rate
- ``"valid_frames"``: () int64 frames of the window at the full frame rate that belong to the video
- ``"video_frames"``: () int64 frames of the whole video at the model's rate, ceil(N / sample_rate)
- ``"video_windows"``: () int64 windows of the whole video
- ``"group_videos"``: () int64 videos in the whole step across all processes (normaliser of the loss)
- ``"group_end"``: () bool, True on the last step of a group (its memory is dropped after it)
- ``"slot"``: () int64, which of the interleaved groups in flight the step belongs to
- ``"update"``: () bool, True on steps after which the optimiser steps

The default collate function stacks samples into a batch with a leading B dimension.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from etesvs.data.frames import FrameReader, frames_path
from etesvs.data.labels import load_labels
from etesvs.errors import EtesvsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = -100
PADDING = -1


class WindowRef(NamedTuple):
    """Which window one row of a step holds: ``video`` is an index into the dataset's videos or -1 (padding).

    ``slot`` tells which of the groups in flight the step belongs to (the engine keeps one memory state per slot),
    ``group_end`` marks the group's last step and ``update`` a step after which the optimiser steps.
    """

    video: int
    window: int
    epoch: int
    group_videos: int
    group_end: bool
    slot: int = 0
    update: bool = False


def num_windows(num_frames: int, window: int) -> int:
    """Windows of ``window`` frames that cover ``num_frames`` frames (the last one may be shorter)."""
    return max(1, math.ceil(num_frames / window))


def lockstep_schedule(
    lengths: Sequence[int],
    *,
    batch_videos: int,
    window: int,
    epoch: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    interleave: int = 1,
    update_every: int = 0,
) -> list[list[WindowRef]]:
    """The steps of one epoch: each step is the list of rows (windows) this process runs together.

    Videos are ordered (shuffled with a generator seeded by ``seed`` and ``epoch`` when ``shuffle``), cut into
    groups of ``batch_videos`` and every group is walked window by window until its longest video ends. With
    ``interleave`` = N > 1, N groups are in flight at once and their steps alternate (window s of group 1, window
    s of group 2, ..., window s + 1 of group 1, ...): each group still sees its videos in order with its own memory,
    but consecutive optimiser steps see different videos, which training from scratch needs (a run of updates on
    the same few videos drags the model towards their current classes).

    The optimiser steps (``update``) after every ``update_every`` steps, or, with 0, after the last step of each
    group; always after the last step of the epoch. Process ``rank`` of ``world_size`` takes the videos
    ``rank::world_size`` of each group, and every process runs the same steps with the same flags (a process
    without a video in a group runs one padding row), as DistributedDataParallel needs.
    """
    if batch_videos < 1 or interleave < 1 or update_every < 0:
        raise ValueError(
            f"bad schedule: batch_videos {batch_videos}, interleave {interleave}, update_every {update_every}"
        )
    order = list(range(len(lengths)))
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(lengths), generator=generator).tolist()
    groups = [order[first : first + batch_videos] for first in range(0, len(order), batch_videos)]
    steps: list[list[WindowRef]] = []
    for block in range(0, len(groups), interleave):
        in_flight = groups[block : block + interleave]
        group_steps = [max(num_windows(lengths[video], window) for video in group) for group in in_flight]
        for step in range(max(group_steps)):
            for slot, (group, count) in enumerate(zip(in_flight, group_steps)):
                if step >= count:
                    continue
                end = step == count - 1
                rows = [
                    WindowRef(video if step < num_windows(lengths[video], window) else PADDING, step, epoch,
                              len(group), end, slot)  # fmt: skip
                    for video in group[rank::world_size]
                ]
                steps.append(rows or [WindowRef(PADDING, step, epoch, len(group), end, slot)])
    for index, rows in enumerate(steps):
        last = index == len(steps) - 1
        if update_every > 0:
            update = last or (index + 1) % update_every == 0
        else:
            update = last or rows[0].group_end
        steps[index] = [ref._replace(update=update) for ref in rows]
    return steps


class LockstepWindowSampler(Sampler[list[WindowRef]]):
    """Batch sampler yielding the steps of :func:`lockstep_schedule`; call :meth:`set_epoch` before each epoch.

    ``schedule`` holds the keyword arguments of :func:`lockstep_schedule` other than ``epoch``.
    """

    def __init__(self, lengths: Sequence[int], **schedule: Any) -> None:
        self.lengths = list(lengths)
        self.schedule = schedule
        self.epoch = 0
        lockstep_schedule(self.lengths[:0], **schedule)  # bad arguments fail here, not in a DataLoader worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _steps(self) -> list[list[WindowRef]]:
        return lockstep_schedule(self.lengths, epoch=self.epoch, **self.schedule)

    def __iter__(self) -> Iterator[list[WindowRef]]:
        return iter(self._steps())

    def __len__(self) -> int:
        return len(self._steps())


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 normalised with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    return (frames.to(torch.float32) / 255.0 - mean) / std


def _augment(frames: torch.Tensor, rng: np.random.Generator, *, image_size: int, flip: bool,
             colors: bool) -> torch.Tensor:
    """Random resized crop, optional horizontal flip and colour jitter, the same for all frames (T, 3, H, W) uint8;
    with ``colors`` also a random hue shift and order of the RGB channels (scenes whose palettes differ)."""
    from torchvision.transforms.v2 import functional as TF

    height, width = frames.shape[-2:]
    area = height * width * rng.uniform(0.6, 1.0)
    aspect = (width / height) * math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_height = min(height, max(1, round(math.sqrt(area / aspect))))
    crop_width = min(width, max(1, round(math.sqrt(area * aspect))))
    top = int(rng.integers(0, height - crop_height + 1))
    left = int(rng.integers(0, width - crop_width + 1))
    frames = TF.resized_crop(frames, top, left, crop_height, crop_width, [image_size, image_size], antialias=True)
    if flip and rng.random() < 0.5:
        frames = TF.horizontal_flip(frames)
    frames = TF.adjust_brightness(frames, rng.uniform(0.8, 1.2))
    frames = TF.adjust_contrast(frames, rng.uniform(0.8, 1.2))
    frames = TF.adjust_saturation(frames, rng.uniform(0.8, 1.2))
    if colors:
        frames = TF.adjust_hue(frames, rng.uniform(-0.5, 0.5))
        frames = frames[:, rng.permutation(3)]
    return frames


def resize_frames(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """The whole frame squeezed to the square network input: uint8 (T, 3, H, W) -> (T, 3, S, S)."""
    from torchvision.transforms.v2 import functional as TF

    if frames.shape[-2:] == (image_size, image_size):
        return frames
    return TF.resize(frames, [image_size, image_size], antialias=True)


class VideoWindows(Dataset):
    """Windows of the frame containers of ``videos``; indexed by :class:`WindowRef` (see the module docstring).

    Args:
        frames_dir: directory of ``<video>.h5`` frame containers (stage extract_frames).
        labels_dir: labels directory (stage convert_labels).
        videos: video ids.
        window: frames per window at the full frame rate (a multiple of ``sample_rate``).
        sample_rate: the network sees every ``sample_rate``-th frame.
        image_size: side S of the square network input.
        train: training windows (augmented when ``augment``); otherwise the whole frame is resized.
        augment: random resized crop and colour jitter (and flips when ``flip``) in training (``train``). They
            help a model generalise to new scenes but slow down learning from scratch a lot on small data.
        flip: also flip horizontally half of the windows in training (not for data where left and right, or the
            direction of a rotation, tell classes apart).
        colors: with ``augment``, also a random hue and order of the colour channels per window (for data where
            colours differ between scenes but do not tell classes apart, as the demo's subjects).
        seed: augmentation parameters are drawn from a generator seeded by (seed, epoch, video, window), so they do
            not depend on the number of workers or processes.
    """

    def __init__(
        self,
        frames_dir: str | os.PathLike,
        labels_dir: str | os.PathLike,
        videos: Sequence[str],
        *,
        window: int,
        sample_rate: int,
        image_size: int,
        train: bool = False,
        augment: bool = False,
        flip: bool = False,
        colors: bool = False,
        seed: int = 0,
    ) -> None:
        if sample_rate < 1 or window < 1 or window % sample_rate:
            raise ValueError(f"window ({window}) must be a positive multiple of sample_rate ({sample_rate})")
        self.frames_dir = Path(frames_dir)
        self.labels_dir = Path(labels_dir)
        self.videos = list(videos)
        self.window = window
        self.sample_rate = sample_rate
        self.frames_per_window = window // sample_rate
        self.image_size = image_size
        self.train = train
        self.augment = augment
        self.flip = flip
        self.colors = colors
        self.seed = seed
        self.labels = {video: load_labels(labels_dir, video) for video in self.videos}
        self.readers = {video: FrameReader(frames_path(self.frames_dir, video)) for video in self.videos}
        for video in self.videos:
            reader = self.readers[video]
            if reader.num_frames != len(self.labels[video]):
                raise EtesvsError(
                    f"{reader.path}: {reader.num_frames} frames but {len(self.labels[video])} labels in "
                    f"{Path(labels_dir) / 'labels.h5'} (rerun extract_frames)"
                )
            reader.close()  # reopened lazily by the process that reads (a DataLoader worker)

    @property
    def lengths(self) -> list[int]:
        """Frames of each video at the full frame rate."""
        return [len(self.labels[video]) for video in self.videos]

    def __len__(self) -> int:
        return len(self.videos)

    def _padding(self, ref: WindowRef) -> dict[str, torch.Tensor]:
        size = self.frames_per_window
        return {
            "frames": torch.zeros(size, 3, self.image_size, self.image_size),
            "labels": torch.full((size,), IGNORE_INDEX, dtype=torch.int64),
            "mask": torch.zeros(size, dtype=torch.bool),
            "reset": torch.tensor(True),
            "video_index": torch.tensor(PADDING),
            "window_index": torch.tensor(ref.window),
            "start": torch.tensor(0),
            "valid_frames": torch.tensor(0),
            "video_frames": torch.tensor(1),
            "video_windows": torch.tensor(1),
            "group_videos": torch.tensor(ref.group_videos),
            "group_end": torch.tensor(ref.group_end),
            "slot": torch.tensor(ref.slot),
            "update": torch.tensor(ref.update),
        }

    def __getitem__(self, ref: WindowRef) -> dict[str, torch.Tensor]:
        if ref.video == PADDING:
            return self._padding(ref)
        from torchvision.io import ImageReadMode, decode_jpeg

        video = self.videos[ref.video]
        labels = self.labels[video]
        num_frames = len(labels)
        start = ref.window * self.window
        stop = min(start + self.window, num_frames)
        if start >= stop:
            raise IndexError(f"video '{video}' has no window {ref.window}")
        reader = self.readers[video]
        encoded = reader.read_jpeg(start, stop)[:: self.sample_rate]
        try:
            frames = torch.stack(decode_jpeg(encoded, mode=ImageReadMode.RGB))  # (n, 3, H, W) uint8
        except RuntimeError as error:
            raise EtesvsError(f"{reader.path}: cannot decode frames {start}..{stop - 1} ({error})") from None
        if self.train and self.augment:
            rng = np.random.default_rng([self.seed, ref.epoch, ref.video, ref.window])
            frames = _augment(frames, rng, image_size=self.image_size, flip=self.flip, colors=self.colors)
        else:
            frames = resize_frames(frames, self.image_size)
        count = frames.shape[0]
        size = self.frames_per_window
        padded = torch.zeros(size, 3, self.image_size, self.image_size)
        padded[:count] = normalize_frames(frames)
        window_labels = torch.full((size,), IGNORE_INDEX, dtype=torch.int64)
        window_labels[:count] = torch.from_numpy(labels[start:stop:self.sample_rate])
        mask = torch.zeros(size, dtype=torch.bool)
        mask[:count] = True
        return {
            "frames": padded,
            "labels": window_labels,
            "mask": mask,
            "reset": torch.tensor(ref.window == 0),
            "video_index": torch.tensor(ref.video),
            "window_index": torch.tensor(ref.window),
            "start": torch.tensor(start),
            "valid_frames": torch.tensor(stop - start),
            "video_frames": torch.tensor(math.ceil(num_frames / self.sample_rate)),
            "video_windows": torch.tensor(num_windows(num_frames, self.window)),
            "group_videos": torch.tensor(ref.group_videos),
            "group_end": torch.tensor(ref.group_end),
            "slot": torch.tensor(ref.slot),
            "update": torch.tensor(ref.update),
        }

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
