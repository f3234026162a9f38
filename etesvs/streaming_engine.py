"""Training and inference loops of the streaming model (ETESVS).

Training walks through groups of videos window by window (see :mod:`etesvs.data.windows`): the memory is carried
from each window to the next of the same video, detached in between (truncated back-propagation through time),
and reset at each new video. Every window is back-propagated at once, so memory stays bounded by one window, and
the gradients of all windows of a group add up to one optimiser step per group of videos.

Under ``torchrun`` each process takes its share of every group; the loss of a row is weighted by
``world_size / (videos in the group x frames of its video)``, so that DistributedDataParallel's gradient average
equals the gradient of one process holding the whole group. Gradients are only all-reduced after the last window
of a group (``no_sync`` before). With ``norm="group"`` the result matches one process up to floating-point
rounding; with BatchNorm each process normalises with the statistics of its own videos' frames (SyncBatchNorm is
used on CUDA), so results match only approximately on the CPU.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from etesvs.data import windows as windows_module
from etesvs.data.labels import load_label_info, load_labels
from etesvs.data.windows import IMAGENET_MEAN, IMAGENET_STD, LockstepWindowSampler, VideoWindows
from etesvs.engine import DistInfo, load_checkpoint, save_checkpoint, seed_everything, unwrap_model
from etesvs.errors import EtesvsError
from etesvs.io import atomic_path, write_json
from etesvs.metrics.segmentation import segmentation_metrics
from etesvs.models import streaming as streaming_module
from etesvs.models import tcn as tcn_module
from etesvs.models.streaming import (
    StreamingSegmenter,
    count_parameters,
    flops_per_frame,
    load_pretrained_backbone,
    streaming_loss,
)

MODEL_NAME = "etesvs"
CURVE_FIELDS = (
    "epoch", "loss", "head", "memory", "backbone", "smoothing", "grad_norm",
    "val_acc", "val_edit", "val_f1_50", "train_frames_per_second", "seconds",
)  # fmt: skip


@dataclass(frozen=True)
class StreamingConfig:
    """How to train (the model's own arguments are a separate ``model_args`` dict, stored in checkpoints).

    ``window`` is in frames at the full frame rate; the network sees ``window / sample_rate`` frames per window.
    ``val_fraction`` of the training videos (at least one when > 0) are held out to choose the best epoch; with 0
    the last epoch is kept. ``update_every`` > 0 steps the optimiser every that many steps (windows) instead of once
    per group of videos, and ``interleave`` groups are in flight at once (see
    :func:`etesvs.data.windows.lockstep_schedule`): both give more, and less correlated, updates per epoch, which
    training from scratch on small data needs. ``amp`` is ``auto`` (float16 with a gradient scaler on CUDA, off on
    the CPU), ``off`` or
    ``bf16`` (bfloat16 autocast on any device).
    """

    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_videos: int = 4
    window: int = 32
    sample_rate: int = 1
    image_size: int = 96
    num_workers: int = 2
    val_fraction: float = 0.15
    smoothing_weight: float = 0.15
    augment: bool = True
    flip: bool = False
    pretrained: str = ""
    amp: str = "auto"
    update_every: int = 0
    interleave: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        faults = []
        if self.epochs < 1:
            faults.append(f"epochs must be >= 1 (got {self.epochs})")
        if not self.lr > 0:
            faults.append(f"lr must be > 0 (got {self.lr})")
        if self.batch_videos < 1:
            faults.append(f"batch_videos must be >= 1 (got {self.batch_videos})")
        if self.sample_rate < 1 or self.window < 1 or self.window % self.sample_rate:
            faults.append(f"window ({self.window}) must be a positive multiple of sample_rate ({self.sample_rate})")
        if self.image_size < 32:
            faults.append(f"image_size must be >= 32 (got {self.image_size})")
        if not 0 <= self.val_fraction < 1:
            faults.append(f"val_fraction must be in [0, 1) (got {self.val_fraction})")
        if self.update_every < 0:
            faults.append(f"update_every must be >= 0 (got {self.update_every})")
        if self.interleave < 1:
            faults.append(f"interleave must be >= 1 (got {self.interleave})")
        if self.amp not in ("auto", "off", "bf16"):
            faults.append(f"amp must be auto, off or bf16 (got {self.amp!r})")
        if faults:
            raise EtesvsError("streaming training parameters: " + "; ".join(faults))


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def split_validation(videos: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``fraction`` of ``videos`` (at least one when fraction > 0 and there are two or more) for validation.

    Returns (training videos, validation videos), both in their original order.
    """
    videos = list(videos)
    if fraction <= 0 or len(videos) < 2:
        return videos, []
    count = min(len(videos) - 1, max(1, round(fraction * len(videos))))
    generator = torch.Generator().manual_seed(seed)
    held_out = set(torch.randperm(len(videos), generator=generator)[:count].tolist())
    train = [video for i, video in enumerate(videos) if i not in held_out]
    val = [video for i, video in enumerate(videos) if i in held_out]
    return train, val


def make_loader(
    dataset: VideoWindows, sampler: LockstepWindowSampler, *, num_workers: int, seed: int, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over the sampler's steps; decoding and augmentation run in ``num_workers`` worker processes."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=generator,
    )


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting on ``device`` (None: full precision)."""
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto" and device.type == "cuda":
        return torch.float16
    return None


def row_weights(batch: dict[str, torch.Tensor], world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weights of the frame losses and of the window loss (see :func:`streaming_loss`), zero on padding.

    Multiplied by ``world_size`` because DistributedDataParallel averages the processes' gradients.
    """
    real = (batch["video_index"] >= 0).to(torch.float32)
    group = batch["group_videos"].to(torch.float32)
    frame_weights = real * world_size / (group * batch["video_frames"].to(torch.float32))
    window_weights = real * world_size / (group * batch["video_windows"].to(torch.float32))
    return frame_weights, window_weights


# --------------------------------------------------------------------------------------------------------------
# Training and inference
# --------------------------------------------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None = None,
    world_size: int = 1,
    smoothing_weight: float = 0.15,
) -> dict[str, float]:
    """One pass over the loader's steps: backward per window, an optimiser step where the sampler says so.

    The memory state of each group in flight (``"slot"``) is kept from step to step and dropped after the
    group's last step; gradients accumulate until a step flagged ``"update"`` (by default the last of each group).

    Returns the mean over groups of the loss and its parts (each group's loss is the mean over its videos of their
    per-frame mean loss), the mean gradient norm, the number of frames fed and the seconds taken. Under
    DistributedDataParallel the numbers cover all processes.
    """
    model.train()
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    totals = {"loss": 0.0, "head": 0.0, "memory": 0.0, "backbone": 0.0, "smoothing": 0.0}
    grad_norm_sum = 0.0
    groups = 0
    updates = 0
    frames_fed = 0
    states: dict[int, Any] = {}
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for batch in loader:
        frames = batch["frames"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        reset = batch["reset"].to(device, non_blocking=True)
        frame_weights, window_weights = (w.to(device) for w in row_weights(batch, world_size))
        group_end = bool(batch["group_end"][0])
        update = bool(batch["update"][0])
        slot = int(batch["slot"][0])
        sync = contextlib.nullcontext() if (update or not distributed) else model.no_sync()
        with sync:
            with _autocast(device, amp_dtype):
                outputs, states[slot] = model(frames, mask, states.get(slot), reset)
            losses = streaming_loss(
                outputs,
                labels,
                mask,
                frame_weights=frame_weights,
                window_weights=window_weights,
                smoothing_weight=smoothing_weight,
            )
            scaler.scale(losses["loss"]).backward()
        for key in totals:
            totals[key] += float(losses[key].detach())
        frames_fed += int(mask.sum())
        if update:
            scaler.unscale_(optimizer)
            grad_norm_sum += float(torch.nn.utils.clip_grad_norm_(parameters, max_norm=float("inf")))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
        if group_end:
            groups += 1
            del states[slot]
    seconds = time.perf_counter() - start
    numbers = torch.tensor([*totals.values(), float(frames_fed)], dtype=torch.float64)
    if distributed:
        torch.distributed.all_reduce(numbers)
        numbers[: len(totals)] /= world_size  # each process's loss was scaled by world_size
    result = {key: float(value) / max(groups, 1) for key, value in zip(totals, numbers[: len(totals)])}
    result["grad_norm"] = grad_norm_sum / max(updates, 1)
    result["frames"] = float(numbers[-1])
    result["seconds"] = seconds
    return result


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    dataset: VideoWindows,
    *,
    batch_videos: int,
    device: torch.device,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, np.ndarray]:
    """Class probabilities of every video of ``dataset``, streamed window by window as in online use.

    Returns:
        video id -> (T, C) float32 softmax of the head at the full frame rate (every network output is repeated
        over the ``sample_rate`` frames it stands for).
    """
    model = unwrap_model(model)
    model.eval()
    sampler = LockstepWindowSampler(dataset.lengths, batch_videos=batch_videos, window=dataset.window)
    loader = make_loader(dataset, sampler, num_workers=num_workers, seed=0)
    parts: dict[int, list[np.ndarray]] = {}
    results: dict[str, np.ndarray] = {}
    state = None
    for batch in loader:
        frames = batch["frames"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            outputs, state = model(frames, mask, state, batch["reset"].to(device))
        probabilities = F.softmax(outputs["head_logits"].float(), dim=1).cpu()  # (B, C, T)
        for row, video in enumerate(batch["video_index"].tolist()):
            if video < 0:
                continue
            count = int(batch["valid_frames"][row])
            sampled = torch.arange(count) // dataset.sample_rate  # full-rate frame -> fed frame of the window
            parts.setdefault(video, []).append(probabilities[row][:, sampled].T.numpy())  # (C, n) -> (n, C)
        if bool(batch["group_end"][0]):
            state = None
            for video, chunks in parts.items():
                results[dataset.videos[video]] = np.concatenate(chunks).astype(np.float32)
            parts.clear()
    return results


def segmentation_scores(
    probabilities: dict[str, np.ndarray], labels: dict[str, np.ndarray], background_ids: Sequence[int]
) -> dict[str, float]:
    """Accuracy, Edit and F1@50 (percent) of the argmax of ``probabilities`` against ``labels``."""
    videos = sorted(probabilities)
    scores = segmentation_metrics(
        [probabilities[video].argmax(axis=1) for video in videos],
        [labels[video] for video in videos],
        background_ids=background_ids,
        overlaps=(0.5,),
    )
    return {"acc": scores.accuracy, "edit": scores.edit, "f1_50": scores.f1[0.5]}


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


def write_probabilities(path: str | Path, probabilities: dict[str, np.ndarray], *, classes: Sequence[str]) -> None:
    """``probs.h5``: one float32 (T, C) dataset per video, written atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["model"] = MODEL_NAME
            handle.attrs["classes"] = json.dumps(list(classes))
            for video, values in probabilities.items():
                handle.create_dataset(video, data=values.astype(np.float32))


def write_curves(path: str | Path, history: Sequence[dict[str, Any]]) -> None:
    """Training curves as CSV (one row per epoch) for DVC plots, written atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CURVE_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({key: _csv_value(row.get(key)) for key in CURVE_FIELDS})


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return round(value, 6) if isinstance(value, float) else value


def code_fingerprint(config: StreamingConfig, model_args: dict[str, Any], videos: dict[str, list[str]]) -> str:
    """Hash of everything a checkpoint's training depends on: settings, videos and the source of the modules.

    A ``last.pt`` is resumed only when its fingerprint matches, so a changed parameter or a changed model file
    starts training afresh instead of continuing a different run.
    """
    settings = dataclasses.asdict(config)
    settings.pop("num_workers")  # does not change the result
    digest = hashlib.sha256(json.dumps([settings, model_args, videos], sort_keys=True).encode())
    for module in (streaming_module, tcn_module, windows_module, inspect.getmodule(code_fingerprint)):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# The whole training run
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputPaths:
    """Where a training run writes: checkpoints, curves, TensorBoard logs, test predictions and a summary."""

    checkpoint_dir: Path
    curves: Path
    tensorboard_dir: Path
    predictions_dir: Path
    summary: Path


def train_streaming(
    config: StreamingConfig,
    model_args: dict[str, Any],
    *,
    frames_dir: str | Path,
    labels_dir: str | Path,
    outputs: OutputPaths,
    dist: DistInfo,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train on the training split (minus a validation hold-out), keep the best epoch, predict the test split.

    The best epoch has the highest mean of accuracy, Edit and F1@50 on the held-out training videos (never the test
    split); without a hold-out it is the last epoch.

    Resumes from ``checkpoint_dir/last.pt`` when it belongs to the same run (see :func:`code_fingerprint`). Rank 0
    validates, writes checkpoints, curves, TensorBoard logs, ``probs.h5`` and ``model.json``; returns the summary.
    """
    info = load_label_info(labels_dir)
    if not info.train:
        raise EtesvsError(f"{Path(labels_dir) / 'info.json'}: no training videos")
    model_args = {**model_args, "num_classes": info.num_classes}
    train_videos, val_videos = split_validation(info.train, config.val_fraction, config.seed)
    fingerprint = code_fingerprint(config, model_args, {"train": train_videos, "val": val_videos})
    device = dist.device
    amp_dtype = resolve_amp(config.amp, device)

    generator = seed_everything(config.seed)
    model = StreamingSegmenter(**model_args)
    pretrained_source = load_pretrained_backbone(model, config.pretrained)
    model.to(device)
    if dist.is_distributed:
        if device.type == "cuda" and model_args.get("norm", "batch") == "batch":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    train_set = VideoWindows(
        frames_dir, labels_dir, train_videos, window=config.window, sample_rate=config.sample_rate,
        image_size=config.image_size, train=True, augment=config.augment, flip=config.flip, seed=config.seed,
    )  # fmt: skip
    sampler = LockstepWindowSampler(
        train_set.lengths, batch_videos=config.batch_videos, window=config.window, shuffle=True,
        seed=config.seed, rank=dist.rank, world_size=dist.world_size, interleave=config.interleave,
        update_every=config.update_every,
    )  # fmt: skip
    loader = make_loader(
        train_set, sampler, num_workers=config.num_workers, seed=int(torch.randint(2**31, (1,), generator=generator)),
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    val_set = (
        VideoWindows(frames_dir, labels_dir, val_videos, window=config.window, sample_rate=config.sample_rate,
                     image_size=config.image_size)
        if val_videos else None
    )  # fmt: skip
    val_labels = {video: load_labels(labels_dir, video) for video in val_videos}

    metadata = {
        "classes": list(info.classes),
        "background_ids": list(info.background_ids),
        "fps": info.fps,
        "window": config.window,
        "sample_rate": config.sample_rate,
        "image_size": config.image_size,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "backbone_pretrained": bool(config.pretrained),
        "pretrained_source": pretrained_source,
        "config": dataclasses.asdict(config),
        "fingerprint": fingerprint,
        "train_videos": train_videos,
        "val_videos": val_videos,
    }
    last_path = outputs.checkpoint_dir / "last.pt"
    best_path = outputs.checkpoint_dir / "best.pt"
    history: list[dict[str, Any]] = []
    best = {"epoch": 0, "score": -math.inf}
    start_epoch = 1
    if last_path.is_file():
        checkpoint = load_checkpoint(last_path)
        if checkpoint.get("fingerprint") == fingerprint and best_path.is_file():
            unwrap_model(model).load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint.get("scaler"):
                scaler.load_state_dict(checkpoint["scaler"])
            history = list(checkpoint.get("history", []))
            best = dict(checkpoint.get("best", best))
            start_epoch = int(checkpoint["epoch"]) + 1
            if dist.is_main:
                log(f"train_streaming: resuming from {last_path} after epoch {start_epoch - 1}")
        elif dist.is_main:
            log(f"train_streaming: {last_path} belongs to other settings or code; training from scratch")

    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(outputs.tensorboard_dir), purge_step=start_epoch)
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            sampler.set_epoch(epoch)
            torch.manual_seed(config.seed * 1000 + epoch)  # dropout: the same masks when an epoch is resumed
            train = train_one_epoch(
                model, loader, optimizer, device=device, scaler=scaler, amp_dtype=amp_dtype,
                world_size=dist.world_size, smoothing_weight=config.smoothing_weight,
            )  # fmt: skip
            row: dict[str, Any] = {
                "epoch": epoch,
                **{key: train[key] for key in ("loss", "head", "memory", "backbone", "smoothing", "grad_norm")},
                "train_frames_per_second": train["frames"] / max(train["seconds"], 1e-9),
                "seconds": train["seconds"],
                "val_acc": None, "val_edit": None, "val_f1_50": None,
            }  # fmt: skip
            if dist.is_main:
                if val_set is not None:
                    probabilities = predict_probabilities(
                        model, val_set, batch_videos=config.batch_videos, device=device, amp_dtype=amp_dtype
                    )
                    scores = segmentation_scores(probabilities, val_labels, info.background_ids)
                    row.update(val_acc=scores["acc"], val_edit=scores["edit"], val_f1_50=scores["f1_50"])
                    # A few held-out videos make every single score noisy; their mean is a steadier guide.
                    score = (scores["acc"] + scores["edit"] + scores["f1_50"]) / 3.0
                else:
                    score = float(epoch)  # no hold-out: the last epoch is the best
                history.append(row)
                improved = score > best["score"]
                if improved:
                    best = {"epoch": epoch, "score": score}
                    save_checkpoint(best_path, model=model, optimizer=None, epoch=epoch, model_args=model_args,
                                    **metadata, history=history, best=best)  # fmt: skip
                save_checkpoint(
                    last_path, model=model, optimizer=optimizer, epoch=epoch, model_args=model_args, **metadata,
                    scaler=scaler.state_dict(), history=history, best=best,
                )  # fmt: skip
                write_curves(outputs.curves, history)
                for key, value in row.items():
                    if key != "epoch" and value is not None:
                        tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                        writer.add_scalar(tag, value, epoch)
                writer.flush()
                val_text = (
                    f" val acc {row['val_acc']:.1f} edit {row['val_edit']:.1f} F1@50 {row['val_f1_50']:.1f}"
                    if row["val_acc"] is not None else ""
                )  # fmt: skip
                log(
                    f"epoch {epoch}/{config.epochs}: loss {row['loss']:.4f}{val_text} "
                    f"({row['seconds']:.0f} s, {row['train_frames_per_second']:.0f} frames/s){' *' if improved else ''}"
                )
            if dist.is_distributed:
                torch.distributed.barrier()
    finally:
        if writer is not None:
            writer.close()

    summary: dict[str, Any] = {}
    if dist.is_main:
        if not history:  # resumed a finished run: keep its curves
            history = list(load_checkpoint(last_path).get("history", []))
        write_curves(outputs.curves, history)
        best_checkpoint = load_checkpoint(best_path)
        final = StreamingSegmenter(**best_checkpoint["model_args"])
        final.load_state_dict(best_checkpoint["model"])
        final.to(device)
        test_set = VideoWindows(frames_dir, labels_dir, info.test, window=config.window,
                                sample_rate=config.sample_rate, image_size=config.image_size)  # fmt: skip
        probabilities = predict_probabilities(
            final, test_set, batch_videos=config.batch_videos, device=device, amp_dtype=amp_dtype,
            num_workers=config.num_workers,
        )  # fmt: skip
        write_probabilities(outputs.predictions_dir / "probs.h5", probabilities, classes=info.classes)
        flops = flops_per_frame(
            final.cpu(), frames_per_window=config.window // config.sample_rate, image_size=config.image_size,
            window=config.window,
        )  # fmt: skip
        best_row = next((row for row in history if row["epoch"] == best_checkpoint["epoch"]), {})
        summary = {
            "best_epoch": int(best_checkpoint["epoch"]),
            "epochs": config.epochs,
            "val_acc": best_row.get("val_acc"),
            "val_edit": best_row.get("val_edit"),
            "val_f1_50": best_row.get("val_f1_50"),
            "train_seconds": round(sum(row["seconds"] for row in history), 3),
            "train_frames_per_second": best_row.get("train_frames_per_second"),
        }
        write_json(
            outputs.predictions_dir / "model.json",
            {
                "model": MODEL_NAME,
                "params": count_parameters(final),
                "flops_per_frame": flops,
                "backbone_pretrained": bool(config.pretrained),
                "pretrained_source": pretrained_source,
                "window": config.window,
                "sample_rate": config.sample_rate,
                "image_size": config.image_size,
                "fps": info.fps,
                "model_args": best_checkpoint["model_args"],
                "training": dataclasses.asdict(config),
                "best_epoch": summary["best_epoch"],
                "validation_videos": val_videos,
            },
        )
        write_json(outputs.summary, summary)
    if dist.is_distributed:
        torch.distributed.barrier()
    return summary
