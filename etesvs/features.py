"""Per-frame I3D features of every video, written to one HDF5 file.

Two standard ways turn I3D, whose output has one step per 8 frames, into one feature per frame:

``window`` (the MS-TCN recipe)
    For every frame t, a clip of ``window_size`` = 21 frames centred on t (frames past either end of the
    video repeat the first or last frame) goes through I3D; the ``Mixed_5c`` output (3 steps) is averaged
    over time and space. Each feature sees exactly 21 frames around its own frame, and neighbouring frames
    get different features. The cost is a full 21-frame forward pass *per frame*: 9.5 GFLOP per frame at
    128 x 96 (fvcore, one multiply-add counted as one FLOP).

``chunked`` (fully convolutional)
    The video is cut into chunks of ``chunk_size`` = 64 frames; each goes through I3D with ``chunk_context``
    = 16 extra frames on both sides (repeated edge frames at the ends of the video), giving one feature per
    8 frames, which is linearly interpolated to every frame using the true centre of each step (frame
    8j + 5 of the clip, see :data:`etesvs.models.i3d.TEMPORAL_CENTER_OFFSET`); the context is then
    dropped. A step has the full receptive field of ``Mixed_5c`` (99 frames), cut to the context at chunk
    borders (at least 16 + its distance from the border on each side), but the features only change every
    8 frames and in between are blends. The cost per frame is (64 + 2 * 16) / 64 = 1.5 frames of I3D:
    0.64 GFLOP per frame at 128 x 96, 15x less than ``window``.

Measured with ``benchmarks/extract_features.py`` at 128 x 96 on the project machine's 2 shared CPU cores
(best of 2, other jobs running): ``window`` 1.0 frames/s, ``chunked`` 14.8 frames/s, both about 9.5 GFLOP/s,
so the speed ratio (15x) is the FLOP ratio. ``chunked`` is the default (``features.method``); ``window``
remains for reproducing features computed the MS-TCN way.

Output: ``features.h5`` with one dataset per video, (T, 1024) float16/float32, chunked, with attributes
``fps``, ``extractor`` ("i3d-rgb-mixed5c"), ``method``, ``weights_hash`` (SHA-256 of the checkpoint or
``random-init-seed<N>``), ``backbone_pretrained``, ``num_frames``, ``frames_source`` and ``complete``.

Resuming: every rank appends finished videos to its own ``features.h5.partial`` (or
``features.h5.rank<r>of<w>.partial`` under torchrun). A video's data is flushed to disk before its dataset is
marked ``complete``, so an interrupted run never leaves a complete-marked dataset with partial data; a rerun
with the same settings skips the complete videos of the partial file and recomputes the others. When
every rank is done, rank 0 copies the datasets of all partial files into ``features.h5`` (written to a
temporary file and renamed) and removes the partial files. Under torchrun the output directory must be on
a file system all ranks share.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch

from etesvs.data.frames import FrameReader, frames_path
from etesvs.distributed import DistInfo, shard
from etesvs.errors import EtesvsError
from etesvs.io import OutputDir, atomic_path, check_plain_name, claim_output_dir, path_inside, write_json
from etesvs.models.i3d import (
    FEATURE_DIM,
    TEMPORAL_CENTER_OFFSET,
    TEMPORAL_STRIDE,
    InceptionI3d,
    checkpoint_width_mult,
    load_i3d_weights,
)
from etesvs.profiling import count_flops, count_parameters

EXTRACTOR = "i3d-rgb-mixed5c"
METHODS = ("window", "chunked")
DTYPES = ("float16", "float32")
FEATURES_FILE = "features.h5"
INFO_FILE = "info.json"
CHUNK_ROWS = 256
"""Rows (frames) per HDF5 chunk of a feature dataset."""


@dataclass(frozen=True)
class FeatureConfig:
    """How features are computed and stored.

    Args:
        method: "window" or "chunked" (see the module docstring).
        batch_size: clips per forward pass (21-frame windows, or chunks of chunk_size + 2 * chunk_context).
        dtype: "float16" or "float32" in the HDF5 file.
        crop_size: 0 for no crop, else centre-crop a square of this side (after resizing the short side).
        short_side: resize the short side to it (aspect ratio kept) before the optional crop; 0: to ``crop_size``
            when cropping, else keep the frame's size.
        window_size: frames per window (odd) for "window".
        chunk_size: frames per chunk (multiple of 8) for "chunked".
        chunk_context: extra frames on each side of a chunk (multiple of 8) for "chunked".
    """

    method: str
    batch_size: int
    dtype: str
    crop_size: int
    short_side: int
    window_size: int
    chunk_size: int
    chunk_context: int

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EtesvsError(f"features.method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise EtesvsError(f"features.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise EtesvsError(f"features.batch_size: must be at least 1, got {self.batch_size}")
        if self.crop_size < 0:
            raise EtesvsError(f"features.crop_size: must be positive, or 0 for the full frame, got {self.crop_size}")
        if self.short_side < 0:
            raise EtesvsError(f"features.short_side: must be positive, or 0 for no resize, got {self.short_side}")
        if self.crop_size and self.short_side and self.crop_size > self.short_side:
            raise EtesvsError(f"features.crop_size ({self.crop_size}) exceeds features.short_side ({self.short_side})")
        if self.window_size < 1 or self.window_size % 2 == 0:
            raise EtesvsError(f"features.window_size: must be odd, got {self.window_size}")
        for name in ("chunk_size", "chunk_context"):
            value = getattr(self, name)
            if value < 0 or value % TEMPORAL_STRIDE or (name == "chunk_size" and value == 0):
                raise EtesvsError(f"features.{name}: must be a multiple of {TEMPORAL_STRIDE}, got {value}")


@dataclass(frozen=True)
class Backbone:
    """An I3D ready for extraction and what it is: SHA-256 of its weights (or the seed) and pretraining."""

    model: InceptionI3d
    weights_hash: str
    pretrained: bool


def build_backbone(weights: str | os.PathLike | None, *, seed: int) -> Backbone:
    """I3D in eval mode, loaded from ``weights`` (a pytorch-i3d ``rgb_imagenet.pt`` style file).

    Without weights (None or "") the network is randomly initialised from ``seed`` and a warning says
    that the features are those of an untrained network (``backbone_pretrained: false``).
    """
    if weights:
        # Narrow demo networks keep the pytorch-i3d key layout; their width is read back from the file.
        model = InceptionI3d(in_channels=3, num_classes=None, width_mult=checkpoint_width_mult(weights))
        weights_hash = load_i3d_weights(model, weights)
        pretrained = True
    else:
        model = InceptionI3d(in_channels=3, num_classes=None)
        model.reset_parameters(torch.Generator().manual_seed(seed))
        weights_hash = f"random-init-seed{seed}"
        pretrained = False
        warnings.warn(
            "no I3D weights given (features.weights is empty): extracting features of a randomly initialised "
            "I3D (backbone_pretrained: false); give a Kinetics checkpoint such as pytorch-i3d's rgb_imagenet.pt "
            "for meaningful features",
            stacklevel=2,
        )
    return Backbone(model=model.eval(), weights_hash=weights_hash, pretrained=pretrained)


def calibrate_batch_norm(
    backbone: Backbone,
    frames_dir: str | os.PathLike,
    videos: Sequence[str],
    config: FeatureConfig,
    *,
    num_clips: int = 8,
    clip_length: int = 32,
) -> Backbone:
    """Set the BatchNorm statistics of a randomly initialised I3D from real clips (data-dependent init).

    Untrained, every BatchNorm has running mean 0 and variance 1, so activations drift in scale through the
    57 layers and the features end up nearly constant over time (on the demo data their temporal std was a
    tenth of their mean and a fifth of the channels were dead). Averaging the batch statistics of a few clips
    (the first ``clip_length`` frames of the first ``num_clips`` videos in sorted order, the same on every
    rank) normalises each layer without any training. Pretrained weights are never touched. Returns a
    backbone whose ``weights_hash`` says it was calibrated.
    """
    if backbone.pretrained:
        return backbone
    model = backbone.model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration clips
    model.train()
    clips = []
    for video in sorted(videos)[:num_clips]:
        with FrameReader(frames_path(frames_dir, video)) as reader:
            frames = read_clamped(reader, 0, clip_length)  # (T, 3, H, W) uint8, short videos padded
        frames = preprocess(frames, crop_size=config.crop_size or None, short_side=config.short_side or None)
        clips.append(frames.permute(1, 0, 2, 3))  # (T, 3, H, W) -> (3, T, H, W)
    if len(clips) == 1:  # one batch of two, so that even a 1x1x1 map has two values per channel
        clips.append(clips[0].flip(-1))
    with torch.no_grad():
        model(torch.stack(clips))  # (B, 3, T, H, W): one pass sets every layer's statistics
    model.eval()
    return Backbone(model=model, weights_hash=f"{backbone.weights_hash}-bn-calibrated{num_clips}x{clip_length}",
                    pretrained=False)


# --------------------------------------------------------------------------------------------------------------
# Frames to features
# --------------------------------------------------------------------------------------------------------------


def preprocess(frames: torch.Tensor, *, crop_size: int | None, short_side: int | None = None) -> torch.Tensor:
    """uint8 frames (T, 3, H, W) -> float32 (T, 3, H', W') in [-1, 1], as I3D was trained.

    The short side is resized (bilinear, antialiased) to ``short_side``, or to ``crop_size`` when only that is
    given; with ``crop_size`` a centred square is then cut.
    """
    from torchvision.transforms.v2 import functional as TF

    side = short_side if short_side is not None else crop_size
    if side is not None and min(frames.shape[-2:]) != side:
        frames = TF.resize(frames, [side], antialias=True)
    if crop_size is not None:
        frames = TF.center_crop(frames, [crop_size, crop_size])
    return frames.float().mul_(2.0 / 255.0).sub_(1.0)


def read_clamped(reader: FrameReader, start: int, stop: int) -> torch.Tensor:
    """Frames ``start..stop-1`` of a video, indices outside it clamped to the first/last frame.

    Returns uint8 (stop - start, 3, H, W); this is how clips near the ends are padded by replication.
    """
    num_frames = reader.num_frames
    first, last = max(start, 0), min(stop, num_frames)
    frames = reader.read(first, last)  # (last - first, 3, H, W)
    index = torch.arange(start, stop).clamp(0, num_frames - 1) - first
    return frames[index]


def interpolate_to_frames(features: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Linear interpolation of I3D steps to frames.

    ``features`` (B, D, n) are the ``Mixed_5c`` steps of clips whose step j is centred on clip frame
    ``8j + 5``; returns (B, D, count) for clip frames ``first..first+count-1`` (clamped beyond the first and
    last step centre).
    """
    steps = features.shape[-1]
    frame = torch.arange(first, first + count, device=features.device, dtype=torch.float32)
    position = ((frame - TEMPORAL_CENTER_OFFSET) / TEMPORAL_STRIDE).clamp(0, steps - 1)
    lower = position.floor().long()
    upper = (lower + 1).clamp(max=steps - 1)
    weight = (position - lower).to(features.dtype)
    return features[..., lower] * (1 - weight) + features[..., upper] * weight


def prepare_model(model: InceptionI3d, device: torch.device) -> InceptionI3d:
    """Move ``model`` to ``device`` in eval mode and channels_last_3d memory format (in place; returns it).

    channels_last_3d lets cuDNN use its NDHWC kernels, and oneDNN on the CPU was 1.3-1.5x faster with it
    for the chunked method here (and no slower for the window method).
    """
    return model.to(device=device, memory_format=torch.channels_last_3d).eval()


def _forward(model: InceptionI3d, clips: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) float on the model's device -> (B, 1024, ceil(T/8)) float32; fp16 autocast on CUDA."""
    clips = clips.contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=clips.device.type == "cuda"):
        return model(clips).float()


def window_features(
    model: InceptionI3d, reader: FrameReader, config: FeatureConfig, device: torch.device
) -> Iterator[torch.Tensor]:
    """Per-frame features by the ``window`` method, yielded in batches of (B, 1024) float32 on the CPU."""
    half = config.window_size // 2
    num_frames = reader.num_frames
    for start in range(0, num_frames, config.batch_size):
        stop = min(start + config.batch_size, num_frames)
        span = read_clamped(reader, start - half, stop + half).to(device)  # (B + 2 * half, 3, H, W)
        span = preprocess(span, crop_size=config.crop_size or None, short_side=config.short_side or None)
        # (B + 2h, 3, H, W) -> (B, 3, H, W, window) -> (B, 3, window, H, W)
        clips = span.unfold(0, config.window_size, 1).permute(0, 1, 4, 2, 3)
        yield _forward(model, clips).mean(dim=2).cpu()  # (B, 1024, 3) -> (B, 1024)


def chunked_features(
    model: InceptionI3d, reader: FrameReader, config: FeatureConfig, device: torch.device
) -> Iterator[torch.Tensor]:
    """Per-frame features by the ``chunked`` method, yielded in blocks of (frames, 1024) float32 on the CPU."""
    size, context = config.chunk_size, config.chunk_context
    num_frames = reader.num_frames
    starts = list(range(0, num_frames, size))
    for batch_begin in range(0, len(starts), config.batch_size):
        batch = starts[batch_begin : batch_begin + config.batch_size]
        clips = torch.stack([read_clamped(reader, s - context, s + size + context) for s in batch])
        clips = clips.to(device)  # (B, L + 2C, 3, H, W) uint8
        batch_size, length = clips.shape[:2]
        # (B * (L + 2C), 3, H', W')
        clips = preprocess(clips.flatten(0, 1), crop_size=config.crop_size or None,
                           short_side=config.short_side or None)  # fmt: skip
        clips = clips.unflatten(0, (batch_size, length)).permute(0, 2, 1, 3, 4)  # (B, 3, L + 2C, H', W')
        steps = _forward(model, clips)  # (B, 1024, (L + 2C) / 8)
        frames = interpolate_to_frames(steps, context, size)  # (B, 1024, L)
        frames = frames.permute(0, 2, 1).flatten(0, 1).cpu()  # (B, 1024, L) -> (B * L, 1024)
        yield frames[: min(num_frames - batch[0], len(frames))]


def video_features(
    model: InceptionI3d,
    reader: FrameReader,
    config: FeatureConfig,
    device: torch.device,
    *,
    on_frames=None,
) -> np.ndarray:
    """Features of every frame of one video: float32 (T, 1024).

    ``on_frames(n)`` is called after each batch with the number of frames done (for progress bars).
    """
    blocks = window_features if config.method == "window" else chunked_features
    parts = []
    with torch.inference_mode():
        for block in blocks(model, reader, config, device):
            parts.append(block.numpy())
            if on_frames is not None:
                on_frames(len(block))
    features = np.concatenate(parts) if parts else np.zeros((0, model.feature_dim), np.float32)
    if features.shape != (reader.num_frames, model.feature_dim):  # a bug, not a user error
        raise RuntimeError(f"{reader.path}: features {features.shape} for {reader.num_frames} frames")
    return features


def clip_flops(model: InceptionI3d, shape: Sequence[int]) -> float | None:
    """FLOPs (:func:`etesvs.profiling.count_flops`) of one forward pass on a clip of ``shape`` (B, 3, T, H, W)."""
    parameter = next(model.parameters())
    return count_flops(model, (torch.zeros(tuple(shape), device=parameter.device),))


def flops_per_frame(model: InceptionI3d, config: FeatureConfig, *, height: int, width: int) -> float | None:
    """I3D FLOPs spent per output frame by ``config.method`` on frames of ``height`` x ``width``."""
    side = config.short_side or config.crop_size
    if side:  # the short side resized to ``side``, as torchvision's resize rounds the long one
        height, width = (side, int(side * width / height)) if height <= width else (int(side * height / width), side)
    if config.crop_size:
        height = width = config.crop_size
    if config.method == "window":
        return clip_flops(model, (1, 3, config.window_size, height, width))
    length = config.chunk_size + 2 * config.chunk_context
    flops = clip_flops(model, (1, 3, length, height, width))
    return flops / config.chunk_size if flops is not None else None


# --------------------------------------------------------------------------------------------------------------
# HDF5 store
# --------------------------------------------------------------------------------------------------------------


def store_header(backbone: Backbone, config: FeatureConfig) -> dict:
    """File attributes that must match for finished videos of an earlier run to be reused."""
    return {
        "extractor": EXTRACTOR,
        "weights_hash": backbone.weights_hash,
        "backbone_pretrained": backbone.pretrained,
        "method": config.method,
        "dtype": config.dtype,
        "crop_size": config.crop_size,
        "short_side": config.short_side,
        "window_size": config.window_size,
        "chunk_size": config.chunk_size,
        "chunk_context": config.chunk_context,
    }


def frames_fingerprint(path: Path, reader: FrameReader) -> str:
    """A cheap identity of a frame container: byte size, frame count and frame size."""
    return f"{path.stat().st_size}:{reader.num_frames}:{reader.height}x{reader.width}"


def partial_path(out_dir: Path, rank: int, world_size: int) -> Path:
    """The partial file a rank writes: ``features.h5.partial`` or ``features.h5.rank<r>of<w>.partial``."""
    if world_size == 1:
        return out_dir / f"{FEATURES_FILE}.partial"
    return out_dir / f"{FEATURES_FILE}.rank{rank}of{world_size}.partial"


def _header_matches(handle: h5py.File, header: dict) -> bool:
    for key, value in header.items():
        if key not in handle.attrs:
            return False
        stored = handle.attrs[key]
        stored = stored.item() if hasattr(stored, "item") else stored
        if stored != value:
            return False
    return True


def open_partial(path: Path, header: dict) -> h5py.File:
    """Open (or create) a partial file for appending; a file with other settings or unreadable is restarted."""
    if path.exists():
        try:
            handle = h5py.File(path, "a")
        except OSError as error:
            if "lock" in str(error).lower():
                raise EtesvsError(f"{path}: in use by another extract_features run") from None
            print(f"warning: {path}: unreadable partial file from an interrupted run ({error}); starting it over",
                  file=sys.stderr)
            path.unlink()
        else:
            if _header_matches(handle, header):
                return handle
            handle.close()
            print(f"warning: {path}: partial file made with other settings; starting it over", file=sys.stderr)
            path.unlink()
    handle = h5py.File(path, "w")
    handle.attrs.update(header)
    handle.flush()
    return handle


def is_complete(
    handle: h5py.File, video: str, *, num_frames: int, fingerprint: str, dtype: str, feature_dim: int = FEATURE_DIM
) -> bool:
    """True when ``handle`` holds a finished dataset for ``video`` made from the same frames."""
    try:
        if video not in handle or not isinstance(handle[video], h5py.Dataset):
            return False
        dataset = handle[video]
        return bool(
            dataset.attrs.get("complete", False)
            and dataset.shape == (num_frames, feature_dim)
            and dataset.dtype == np.dtype(dtype)
            and dataset.attrs.get("frames_source", "") == fingerprint
        )
    except (OSError, KeyError, RuntimeError):  # damaged by a crash: compute it again
        return False


def write_video(handle: h5py.File, video: str, features: np.ndarray, attrs: dict, *, dtype: str) -> None:
    """Write one video's (T, D) features, flush, and only then mark the dataset complete (and flush again)."""
    if video in handle:
        del handle[video]
    rows = max(1, min(len(features), CHUNK_ROWS))
    dataset = handle.create_dataset(video, data=features.astype(dtype), chunks=(rows, features.shape[1]))
    dataset.attrs.update(attrs)
    handle.flush()
    dataset.attrs["complete"] = True
    handle.flush()


def merge_partials(owners: dict[str, Path], out_file: Path, header: dict) -> None:
    """Copy each video's complete dataset from its partial file ``owners[video]`` into ``out_file``, atomically.

    Videos are written in the order of ``owners``. A missing or unfinished dataset is an error.
    """
    handles = {path: h5py.File(path, "r") for path in dict.fromkeys(owners.values()) if path.exists()}
    try:
        with atomic_path(out_file) as tmp:
            with h5py.File(tmp, "w") as out:
                out.attrs.update(header)
                for video, path in owners.items():
                    source = handles.get(path)
                    if source is None or video not in source or not source[video].attrs.get("complete", False):
                        raise EtesvsError(f"{path}: no finished features for video '{video}'")
                    source.copy(source[video], out, name=video)
    finally:
        for handle in handles.values():
            handle.close()


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankStats:
    """What one rank did: videos computed and reused, frames computed, seconds spent computing."""

    computed: int
    reused: int
    frames: int
    seconds: float


def _extract_shard(
    videos: Sequence[str],
    *,
    frames_dir: Path,
    num_frames: dict[str, int] | None,
    partial: Path,
    backbone: Backbone,
    config: FeatureConfig,
    device: torch.device,
    progress: bool,
    description: str,
) -> RankStats:
    """Compute the features of ``videos`` (this rank's share) into ``partial``, skipping finished ones."""
    from tqdm import tqdm

    header = store_header(backbone, config)
    prepare_model(backbone.model, device)
    computed = reused = frames = 0
    seconds = 0.0
    handle = open_partial(partial, header)
    try:
        todo = []
        for video in videos:
            with FrameReader(frames_path(frames_dir, video)) as reader:
                if num_frames is not None and reader.num_frames != num_frames[video]:
                    raise EtesvsError(
                        f"{reader.path}: {reader.num_frames} frames but the labels have {num_frames[video]}"
                    )
                fingerprint = frames_fingerprint(reader.path, reader)
                count = reader.num_frames
                if is_complete(handle, video, num_frames=count, fingerprint=fingerprint, dtype=config.dtype,
                               feature_dim=backbone.model.feature_dim):  # fmt: skip
                    reused += 1
                else:
                    todo.append((video, fingerprint, count))
        total = sum(count for _, _, count in todo)
        with tqdm(total=total, desc=description, unit="frame", disable=not progress, dynamic_ncols=True) as bar:
            for video, fingerprint, count in todo:
                with FrameReader(frames_path(frames_dir, video)) as reader:
                    began = time.perf_counter()
                    features = video_features(backbone.model, reader, config, device, on_frames=bar.update)
                    seconds += time.perf_counter() - began
                    attrs = {
                        "fps": reader.fps,
                        "extractor": EXTRACTOR,
                        "method": config.method,
                        "weights_hash": backbone.weights_hash,
                        "backbone_pretrained": backbone.pretrained,
                        "num_frames": count,
                        "frames_source": fingerprint,
                    }
                write_video(handle, video, features, attrs, dtype=config.dtype)
                computed += 1
                frames += count
    finally:
        handle.close()
    return RankStats(computed=computed, reused=reused, frames=frames, seconds=seconds)


def extract_features(
    videos: Sequence[str],
    *,
    frames_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    backbone: Backbone,
    config: FeatureConfig,
    dist: DistInfo,
    device: torch.device,
    num_frames: dict[str, int] | None = None,
    progress: bool = True,
    inputs: Sequence[str | os.PathLike] = (),
) -> tuple[list[RankStats], OutputDir] | None:
    """Write ``<out_dir>/features.h5`` with the per-frame features of ``videos``; resumable.

    Rank 0 claims ``out_dir`` (see :func:`etesvs.io.claim_output_dir`; ``inputs`` are further directories the
    run reads) and records every rank's partial file in its marker before any is written. Every rank computes
    ``videos[rank::world_size]`` into its own partial file; after a barrier rank 0 merges all partial files into
    ``features.h5``. ``num_frames`` (from the labels), when given, must match each frame container. Returns
    every rank's :class:`RankStats` and the claimed directory on rank 0 (which removes the partial files when it
    is done with the directory, see :meth:`OutputDir.retain`), None elsewhere.
    """
    frames_dir, out_dir = Path(frames_dir), Path(out_dir)
    videos = list(dict.fromkeys(videos))
    output = None
    if dist.is_main:
        output = claim_output_dir(out_dir, owner="extract_features", inputs=[frames_dir, *inputs],
                                  adopt=_is_feature_file)
        output.expect([partial_path(out_dir, rank, dist.world_size).name for rank in range(dist.world_size)]
                      + [FEATURES_FILE, INFO_FILE])
    barrier_group = None
    if dist.is_distributed:
        # A dedicated Gloo group with a long timeout: ranks with long videos may finish hours after the others.
        barrier_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=7))
        torch.distributed.barrier(group=barrier_group)  # the directory is claimed before any rank writes
    stats = _extract_shard(
        shard(videos, dist.rank, dist.world_size),
        frames_dir=frames_dir,
        num_frames=num_frames,
        partial=partial_path(out_dir, dist.rank, dist.world_size),
        backbone=backbone,
        config=config,
        device=device,
        progress=progress and dist.is_main,
        description=f"rank {dist.rank}/{dist.world_size}" if dist.is_distributed else "extract_features",
    )
    all_stats = [stats]
    if dist.is_distributed:
        gathered: list | None = [None] * dist.world_size if dist.is_main else None
        torch.distributed.gather_object(asdict(stats), gathered, dst=0, group=barrier_group)
        if not dist.is_main:
            return None
        all_stats = [RankStats(**item) for item in gathered]
    # The rank that computed a video in this run owns it (an older partial may hold a stale copy).
    owners = {
        video: partial_path(out_dir, index % dist.world_size, dist.world_size) for index, video in enumerate(videos)
    }
    merge_partials(owners, output.file(FEATURES_FILE), store_header(backbone, config))
    return all_stats, output


def _is_feature_file(path: Path) -> bool:
    """A file that extract_features writes (for output directories made before ownership markers)."""
    return path.name in (FEATURES_FILE, INFO_FILE) or (path.name.startswith(FEATURES_FILE)
                                                       and path.name.endswith(".partial"))


def extract_dataset_features(
    section: dict,
    *,
    seed: int,
    frames_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dist: DistInfo,
) -> tuple[dict, dict] | None:
    """Features of every train and test video of a labels directory into ``out_dir/features.h5`` and its
    ``info.json`` (see :func:`feature_info`); what stage extract_features runs.

    ``section`` is the ``features`` section of params.yaml: ``weights`` (a pytorch-i3d checkpoint, or "" for a
    randomly initialised, BatchNorm-calibrated I3D drawn from ``seed``) and the :class:`FeatureConfig` fields.
    Returns ``(info, speed)`` on the main process and None on the others.
    """
    from etesvs.data.labels import load_label_info
    from etesvs.params import call_with

    section = dict(section)
    weights = section.pop("weights")
    config = call_with(FeatureConfig, section, where="params.yaml: features")
    info = load_label_info(labels_dir)
    videos = list(dict.fromkeys(info.train + info.test))
    if not videos:
        raise EtesvsError(f"{Path(labels_dir) / 'info.json'}: no train or test videos")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone = build_backbone(weights or None, seed=seed)
    backbone = calibrate_batch_norm(backbone, frames_dir, info.train, config)
    if dist.is_main:
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
    done = extract_features(videos, frames_dir=frames_dir, out_dir=out_dir, backbone=backbone, config=config,
                            dist=dist, device=dist.device, num_frames=info.num_frames, inputs=[labels_dir])
    if done is None:  # not the main process
        return None
    stats, output = done
    with FrameReader(frames_path(frames_dir, videos[0])) as reader:
        flops = flops_per_frame(backbone.model, config, height=reader.height, width=reader.width)
    summary = feature_info(backbone, config=config, flops=flops, videos=len(videos))
    summary["weights"] = str(weights) if weights else "random initialisation"
    write_json(output.file(INFO_FILE), summary)
    output.retain([FEATURES_FILE, INFO_FILE])  # the partial files of this and of earlier runs
    return summary, run_speed(stats)


def feature_info(backbone: Backbone, *, config: FeatureConfig, flops: float | None, videos: int) -> dict:
    """``info.json`` beside ``features.h5``: what the features are and what they cost per frame.

    Only facts that stay the same whenever the features do (no timings, no counts of resumed work), so that
    the file, and everything DVC computes from it, changes only when the features change.
    """
    return {
        "extractor": EXTRACTOR,
        "method": config.method,
        "feature_dim": backbone.model.feature_dim,
        "dtype": config.dtype,
        "backbone_pretrained": backbone.pretrained,
        "weights_hash": backbone.weights_hash,
        "params": count_parameters(backbone.model),
        "flops_per_frame": flops,
        "videos": videos,
    }


def run_speed(stats: Sequence[RankStats]) -> dict:
    """How a run went: videos computed and reused, frames per second of the slowest rank (a timing)."""
    frames = sum(s.frames for s in stats)
    wall = max((s.seconds for s in stats), default=0.0)
    return {
        "videos_computed": sum(s.computed for s in stats),
        "videos_reused": sum(s.reused for s in stats),
        "ranks": len(stats),
        "frames_per_second": frames / wall if frames and wall > 0 else None,
    }

# --------------------------------------------------------------------------------------------------------------
# Importing the MS-TCN release features
# --------------------------------------------------------------------------------------------------------------


def read_release_array(path: Path, *, feature_dim: int) -> np.ndarray:
    """One MS-TCN release feature file ``(D, T)`` as a float (T, D) array; errors name the file."""
    if not path.is_file():
        raise EtesvsError(f"{path}: feature file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise EtesvsError(f"{path}: not a readable .npy array ({' '.join(str(error).split())})") from None
    if array.ndim != 2 or array.shape[0] != feature_dim:
        hint = " (transposed?)" if array.ndim == 2 and array.shape[1] == feature_dim else ""
        raise EtesvsError(f"{path}: expected an array of shape ({feature_dim}, T), got {tuple(array.shape)}{hint}")
    if not np.issubdtype(array.dtype, np.floating):
        raise EtesvsError(f"{path}: expected floating-point features, got {array.dtype}")
    return np.ascontiguousarray(array.T)  # (D, T) -> (T, D)


def fit_length(features: np.ndarray, expected: int, *, max_mismatch: int, path: Path) -> np.ndarray:
    """Cut or repeat the last feature so that (T, D) ``features`` have ``expected`` frames, if T differs by at
    most ``max_mismatch``; a larger difference is an error naming the file."""
    difference = len(features) - expected
    if abs(difference) > max_mismatch:
        raise EtesvsError(f"{path}: {len(features)} frames but the labels have {expected} "
                          f"(difference {difference:+d}, allowed {max_mismatch})")
    if difference > 0:
        return features[:expected]
    if difference < 0:
        return np.concatenate([features, np.repeat(features[-1:], -difference, axis=0)])
    return features


def import_npy_features(
    npy_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    *,
    videos: Sequence[str] | None = None,
    num_frames: dict[str, int] | None = None,
    fps: float,
    feature_dim: int = 2048,
    dtype: str = "float32",
    max_length_mismatch: int = 0,
) -> list[str]:
    """Copy ``<npy_dir>/<video>.npy`` arrays (D, T) into ``out_file`` as (T, D) datasets, atomically.

    ``videos`` defaults to every ``.npy`` file in ``npy_dir``. With ``num_frames`` (from the labels) each
    array's T must match; a difference of at most ``max_length_mismatch`` frames is fixed by cutting or
    repeating the last feature (the MS-TCN release differs from its labels by a frame for a few videos).
    Returns warnings, one per fixed video. Errors name the file.
    """
    npy_dir, out_file = Path(npy_dir), Path(out_file)
    if dtype not in DTYPES:
        raise EtesvsError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if not npy_dir.is_dir():
        raise EtesvsError(f"{npy_dir}: feature directory not found")
    if videos is None:
        videos = sorted(path.stem for path in npy_dir.glob("*.npy"))
        if not videos:
            raise EtesvsError(f"{npy_dir}: no .npy feature files")
    notes: list[str] = []
    attrs = {"fps": float(fps), "extractor": "i3d-rgb+flow-mstcn-release", "method": "imported",
             "weights_hash": "unknown-mstcn-release", "backbone_pretrained": True}
    with atomic_path(out_file) as tmp:
        with h5py.File(tmp, "w") as out:
            out.attrs.update({**attrs, "dtype": dtype})
            for video in videos:
                path = path_inside(npy_dir, f"{check_plain_name(video, source=npy_dir)}.npy")
                features = read_release_array(path, feature_dim=feature_dim)
                if num_frames is not None:
                    fitted = fit_length(features, num_frames[video], max_mismatch=max_length_mismatch, path=path)
                    if len(fitted) != len(features):
                        notes.append(f"{path.name}: {len(features) - len(fitted):+d} frames against the labels, fixed")
                    features = fitted
                if not np.isfinite(features).all():
                    raise EtesvsError(f"{path}: features contain NaN or infinite values")
                write_video(out, video, features,
                            {**attrs, "num_frames": len(features), "frames_source": str(path.name)}, dtype=dtype)
    return notes
