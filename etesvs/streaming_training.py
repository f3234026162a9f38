"""The streaming family: the end-to-end model (ETESVS) trained window by window on frames.

Training walks through groups of videos window by window (see :mod:`etesvs.data.windows`): the memory is carried
from each window to the next of the same video, detached in between (truncated back-propagation through time),
and reset at each new video. Every window is back-propagated at once, so memory stays bounded by one window.

Under ``torchrun`` each process takes its share of every group; the loss of a row is weighted by
``world_size / (videos in the group x frames of its video)``, so that DistributedDataParallel's gradient average
equals the gradient of one process holding the whole group. Gradients are only all-reduced on update steps
(``no_sync`` before). With ``norm="group"`` the result matches one process up to floating-point rounding; with
BatchNorm each process normalises with the statistics of its own videos' frames (SyncBatchNorm on CUDA).

Plugs its :func:`train_one_epoch` and :func:`predict` into the driver of :mod:`etesvs.training`;
:func:`train_streaming` is what stage ``train_streaming`` calls.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from etesvs.checkpoints import unwrap_model
from etesvs.data.frames import frames_path
from etesvs.data.labels import load_label_info, load_labels
from etesvs.data.windows import IMAGENET_MEAN, IMAGENET_STD, LockstepWindowSampler, VideoWindows
from etesvs.distributed import DistInfo, all_reduce_sum
from etesvs.errors import EtesvsError
from etesvs.losses import streaming_loss
from etesvs.models.streaming import StreamingSegmenter, WindowLogits, load_pretrained_backbone
from etesvs.params import call_with, check_section
from etesvs.profiling import count_flops, count_parameters
from etesvs.training import (
    segmentation_validation,
    resume_settings,
    RunPaths,
    autocast,
    build_optimizer,
    build_scheduler,
    file_identity,
    fit,
    hold_out,
    predict_test,
    resolve_amp,
    run_fingerprint,
    seed_everything,
)

MODEL_NAME = "etesvs"


def check_settings(train: dict[str, Any], data: dict[str, Any], *, window: int, sample_rate: int) -> None:
    """One line naming every training setting that cannot work."""
    faults = []
    if train["epochs"] < 1:
        faults.append(f"train.epochs must be >= 1 (got {train['epochs']})")
    if not train["lr"] > 0:
        faults.append(f"train.lr must be > 0 (got {train['lr']})")
    if train["batch_videos"] < 1 or train["interleave"] < 1 or train["update_every"] < 0:
        faults.append("train.batch_videos and train.interleave must be >= 1, train.update_every >= 0")
    if sample_rate < 1 or window < 1 or window % sample_rate:
        faults.append(f"window ({window}) must be a positive multiple of data.sample_rate ({sample_rate})")
    if data["image_size"] < 32:
        faults.append(f"data.image_size must be >= 32 (got {data['image_size']})")
    if faults:
        raise EtesvsError("params.yaml: streaming: " + "; ".join(faults))


def make_loader(
    dataset: VideoWindows, sampler: LockstepWindowSampler, *, num_workers: int, seed: int, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over the sampler's steps; decoding and augmentation run in ``num_workers`` worker processes."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def row_weights(batch: dict[str, torch.Tensor], world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row weights of the frame losses and of the window loss (see :func:`streaming_loss`), zero on padding.

    Multiplied by ``world_size`` because DistributedDataParallel averages the processes' gradients.
    """
    real = (batch["video_index"] >= 0).to(torch.float32)
    group = batch["group_videos"].to(torch.float32)
    frame_weights = real * world_size / (group * batch["video_frames"].to(torch.float32))
    window_weights = real * world_size / (group * batch["video_windows"].to(torch.float32))
    return frame_weights, window_weights


def _window_step(model: nn.Module, batch: dict[str, torch.Tensor], state: Any, *, device: torch.device,
                 amp_dtype: torch.dtype | None, world_size: int, loss: Mapping[str, Any]) -> tuple[dict, Any]:
    """Forward one step of windows and compute its loss (``loss``: the ``streaming.loss`` section, the settings of
    :func:`etesvs.losses.streaming_loss`, checked by :func:`train_streaming`); returns the loss parts and the new
    state."""
    frames = batch["frames"].to(device, non_blocking=True)
    mask = batch["mask"].to(device, non_blocking=True)
    frame_weights, window_weights = (w.to(device) for w in row_weights(batch, world_size))
    with autocast(device, amp_dtype):
        outputs, state = model(frames, mask, state, batch["reset"].to(device, non_blocking=True))
    losses = streaming_loss(outputs, batch["labels"].to(device, non_blocking=True), mask,
                            frame_weights=frame_weights, window_weights=window_weights, **loss)
    return losses, state


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
    world_size: int,
    loss: Mapping[str, Any],
    progress: bool = False,
) -> dict[str, float]:
    """One pass over the loader's steps: backward per window, an optimiser step where the sampler says so.

    The memory state of each group in flight (``"slot"``) is kept from step to step and dropped after the group's
    last step; gradients accumulate until a step flagged ``"update"``. Returns the mean over groups of the loss and
    its parts (each group's loss is the mean over its videos of their per-frame mean loss) and the mean gradient
    norm, over all processes.
    """
    model.train()
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    totals = dict.fromkeys(("loss", "head", "memory", "backbone", "smoothing"), 0.0)
    grad_norm_sum, groups, updates = 0.0, 0, 0
    states: dict[int, Any] = {}
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc="  windows", leave=False, disable=not progress, dynamic_ncols=True)
    for batch in bar:
        update, slot = bool(batch["update"][0]), int(batch["slot"][0])
        with contextlib.nullcontext() if (update or not distributed) else model.no_sync():
            losses, states[slot] = _window_step(model, batch, states.get(slot), device=device, amp_dtype=amp_dtype,
                                                world_size=world_size, loss=loss)
            scaler.scale(losses["loss"]).backward()
        for key in totals:
            totals[key] += float(losses[key].detach())
        if update:
            scaler.unscale_(optimizer)
            grad_norm_sum += float(torch.nn.utils.clip_grad_norm_(parameters, max_norm=float("inf")))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
        if bool(batch["group_end"][0]):
            groups += 1
            del states[slot]
        bar.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}")
    numbers = all_reduce_sum(torch.tensor(list(totals.values()), dtype=torch.float64)) / world_size
    result = {key: float(value) / max(groups, 1) for key, value in zip(totals, numbers)}
    result["grad_norm"] = grad_norm_sum / max(updates, 1)
    return result


@torch.inference_mode()
def predict(
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
        with autocast(device, amp_dtype):
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


def flops_per_frame(model: StreamingSegmenter, *, window: int, sample_rate: int, image_size: int) -> float | None:
    """FLOPs of backbone + memory + head on one window (``window / sample_rate`` fed frames), per video frame."""
    parameter = next(model.parameters())
    frames = torch.zeros(1, window // sample_rate, 3, image_size, image_size, device=parameter.device)
    mask = torch.ones(1, window // sample_rate, dtype=torch.bool, device=parameter.device)
    total = count_flops(WindowLogits(model), (frames, mask))
    return total / window if total is not None else None


def _build_model(section: dict[str, Any], num_classes: int, dist: DistInfo) -> tuple[nn.Module, dict, str]:
    """The model (wrapped for DDP under torchrun), its constructor arguments and its backbone's origin."""
    model_args = {"num_classes": num_classes, **section["model"]}
    model = call_with(StreamingSegmenter, section["model"], where="params.yaml: streaming.model",
                      num_classes=num_classes)
    origin = load_pretrained_backbone(model, section["pretrained"])
    model.to(dist.device)
    if dist.is_distributed:
        if dist.device.type == "cuda" and section["model"]["norm"] == "batch":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return model, model_args, origin


def _parameter_groups(model: nn.Module, backbone_lr: float) -> list[dict[str, Any]]:
    """The backbone's parameters at their own learning rate (a pretrained backbone is fine-tuned more gently than
    the randomly initialised memory and head), the others at the optimiser's."""
    backbone = list(unwrap_model(model).backbone.parameters())
    ids = {id(parameter) for parameter in backbone}
    return [{"params": backbone, "lr": backbone_lr}, {"params": [p for p in model.parameters() if id(p) not in ids]}]


def _family_functions(*, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      amp_dtype: torch.dtype | None, train_set: VideoWindows, section: dict[str, Any], seed: int,
                      generator: torch.Generator, dist: DistInfo):
    """This family's ``train_one_epoch(epoch)`` and ``predict(model, videos)`` for the driver."""
    train = section["train"]
    sampler = LockstepWindowSampler(
        train_set.lengths, batch_videos=train["batch_videos"], window=train_set.window, shuffle=True, seed=seed,
        rank=dist.rank, world_size=dist.world_size, interleave=train["interleave"], update_every=train["update_every"])
    loader = make_loader(train_set, sampler, num_workers=train["num_workers"],
                         seed=int(torch.randint(2**31, (1,), generator=generator)), pin_memory=dist.device.type == "cuda")

    def one_epoch(epoch: int) -> dict[str, float]:
        sampler.set_epoch(epoch)
        return train_one_epoch(model, loader, optimizer, device=dist.device, scaler=scaler, amp_dtype=amp_dtype,
                               world_size=dist.world_size, loss=section["loss"],
                               progress=dist.is_main)

    def predict_videos(network: nn.Module, videos: Sequence[str]) -> dict[str, np.ndarray]:
        dataset = VideoWindows(train_set.frames_dir, train_set.labels_dir, videos, window=train_set.window,
                               sample_rate=train_set.sample_rate, image_size=train_set.image_size)
        return predict(network, dataset, batch_videos=train["batch_videos"], device=dist.device,
                       num_workers=train["num_workers"], amp_dtype=amp_dtype)

    return one_epoch, predict_videos


def train_streaming(
    params: dict[str, Any],
    *,
    frames_dir: str | Path,
    labels_dir: str | Path,
    paths: RunPaths,
    dist: DistInfo,
) -> dict[str, Any]:
    """Train on the training split (minus a validation hold-out), keep the best epoch, predict the test split.

    ``params`` holds ``seed``, ``window`` (frames per window at the full frame rate) and the
    ``streaming`` section: ``pretrained`` (backbone weights), ``model``, ``loss``, ``data`` and ``train``.
    Returns ``model.json``'s content on the main process.
    """
    frames_dir, labels_dir = Path(frames_dir), Path(labels_dir)
    section, seed, window = params["streaming"], params["seed"], params["window"]
    train, data, sample_rate = section["train"], section["data"], section["data"]["sample_rate"]
    check_settings(train, data, window=window, sample_rate=sample_rate)
    check_section(streaming_loss, section["loss"], where="params.yaml: streaming.loss",
                  fixed=("outputs", "labels", "mask", "frame_weights", "window_weights"))
    if train["num_threads"] > 0:
        torch.set_num_threads(train["num_threads"])
    info = load_label_info(labels_dir)
    if not info.train:
        raise EtesvsError(f"{labels_dir / 'info.json'}: no training videos")
    train_videos, val_videos = hold_out(info.train, train["val_fraction"], seed)
    generator = seed_everything(seed)
    model, model_args, origin = _build_model(section, info.num_classes, dist)
    optimizer = build_optimizer(_parameter_groups(model, train["backbone_lr_scale"] * train["lr"]), train,
                                where="params.yaml: streaming.train")  # fmt: skip
    scheduler = build_scheduler(optimizer, train, where="params.yaml: streaming.train")
    amp_dtype = resolve_amp(train["amp"], dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype == torch.float16)
    windows = dict(window=window, sample_rate=sample_rate, image_size=data["image_size"])
    train_set = VideoWindows(frames_dir, labels_dir, train_videos, train=True, augment=data["augment"],
                             flip=data["flip"], colors=data["colors"], seed=seed, **windows)
    one_epoch, predict_videos = _family_functions(model=model, optimizer=optimizer, scaler=scaler,
                                                  amp_dtype=amp_dtype, train_set=train_set, section=section,
                                                  seed=seed, generator=generator, dist=dist)
    settings = {**section, "train": resume_settings(train)}
    inputs = file_identity([labels_dir / "labels.h5", *(frames_path(frames_dir, v) for v in info.train)])
    if section["pretrained"] and Path(section["pretrained"]).is_file():  # new weights at the same path: a new run
        inputs += file_identity([section["pretrained"]])
    config = {"settings": settings, "seed": seed, "window": window, "sample_rate": sample_rate, "inputs": inputs,
              "videos": [train_videos, val_videos], "world_size": dist.world_size}
    metadata = {"model_name": MODEL_NAME, "classes": list(info.classes), "background_ids": list(info.background_ids),
                "fps": info.fps, "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "backbone_pretrained": bool(section["pretrained"]), "pretrained_source": origin, **windows}
    validate = segmentation_validation(
        predict_videos, {video: load_labels(labels_dir, video) for video in val_videos}, info.background_ids)
    result = fit(
        name=MODEL_NAME, model=model, optimizer=optimizer, train_one_epoch=one_epoch, validate=validate,
        epochs=train["epochs"], seed=seed, paths=paths,
        fingerprint=run_fingerprint(config), model_args=model_args, metadata=metadata, dist=dist, scaler=scaler,
        scheduler=scheduler, inputs=[frames_dir, labels_dir],
    )
    if not dist.is_main:
        return {}
    extra = {"backbone_pretrained": bool(section["pretrained"]), "weights_origin": origin, **windows, "fps": info.fps,
             "epochs": train["epochs"], "val_videos": val_videos, "training": train}
    return predict_test(name=MODEL_NAME, model=model, predict=predict_videos, test_videos=info.test,
                        classes=info.classes, paths=paths, result=result, device=dist.device,
                        describe=lambda network: {"params": count_parameters(network),
                                                  "flops_per_frame": flops_per_frame(network, **windows), **extra})
