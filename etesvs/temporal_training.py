"""The two-stage family: temporal models (MS-TCN, ASRF, ASFormer, the per-frame classifier) on per-frame features.

Plugs its :func:`train_one_epoch` and :func:`predict` into the driver of :mod:`etesvs.training`;
:func:`train_temporal` is what stage ``train_temporal@<model>`` calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from etesvs.checkpoints import unwrap_model
from etesvs.data.feature_sequences import FeatureDataset, collate_features
from etesvs.data.labels import load_label_info, load_labels
from etesvs.distributed import DistInfo, all_reduce_sum
from etesvs.errors import EtesvsError
from etesvs.io import read_json
from etesvs.models.registry import temporal_model
from etesvs.params import call_with
from etesvs.profiling import count_flops, count_parameters
from etesvs.training import (
    segmentation_validation,
    resume_settings,
    RunPaths,
    autocast,
    file_identity,
    fit,
    hold_out,
    predict_test,
    build_optimizer,
    build_scheduler,
    resolve_amp,
    run_fingerprint,
    seed_everything,
)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
    progress: bool = False,
) -> dict[str, float]:
    """One pass over ``loader`` (collated feature batches, see :func:`collate_features`), one optimiser step per
    batch. Returns the mean over videos of the loss and its parts, over all processes."""
    model.train()
    parts: dict[str, float] = {}
    videos = 0
    bar = tqdm(loader, desc="  batches", leave=False, disable=not progress, dynamic_ncols=True)
    for batch in bar:
        batch = _to_device(batch, device)
        mask = batch["mask"][:, None, :].float()  # (B, T) -> (B, 1, T)
        with autocast(device, amp_dtype):
            output = model(batch["features"], mask)
        losses = loss_fn(output, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.step(optimizer)
        scaler.update()
        count = len(batch["video"])
        for key, value in losses.items():
            parts[key] = parts.get(key, 0.0) + float(value.detach()) * count
        videos += count
        bar.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}")
    totals = all_reduce_sum(torch.tensor([*parts.values(), float(videos)], dtype=torch.float64, device=device))
    return {key: float(value) / max(float(totals[-1]), 1.0) for key, value in zip(parts, totals[:-1])}


def upsample(probabilities: torch.Tensor, sample_rate: int, num_frames: int) -> torch.Tensor:
    """Back to the full frame rate: repeat each of the T' predictions ``sample_rate`` times, keep ``num_frames``.

    Args:
        probabilities: (C, T') with T' = ceil(num_frames / sample_rate).

    Returns:
        (C, num_frames).
    """
    return probabilities.repeat_interleave(sample_rate, dim=1)[:, :num_frames]


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    device: torch.device,
    sample_rate: int,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, np.ndarray]:
    """Per-frame class probabilities of every video of ``loader`` at the full frame rate.

    Returns:
        ``{video: (T, C) float32}`` with T the video's full-rate frame count; rows sum to 1.
    """
    model.eval()
    results: dict[str, np.ndarray] = {}
    for batch in loader:
        batch = _to_device(batch, device)
        mask = batch["mask"][:, None, :].float()  # (B, T') -> (B, 1, T')
        with autocast(device, amp_dtype):
            output = model(batch["features"], mask)
        probabilities = unwrap_model(model).probabilities(output, mask)  # (B, C, T')
        lengths = batch["mask"].sum(dim=1).tolist()
        for item, video in enumerate(batch["video"]):
            valid = probabilities[item, :, : lengths[item]]
            full = upsample(valid, sample_rate, int(batch["num_frames"][item]))  # (C, T)
            results[video] = full.transpose(0, 1).float().cpu().numpy()  # (C, T) -> (T, C)
    return results


def _describe(model: nn.Module, *, features_dir: Path, in_channels: int, sample_rate: int, lengths: Sequence[int],
              extra: dict[str, Any]) -> dict[str, Any]:
    """Size and cost of a two-stage model: the temporal model plus its feature extractor, per frame.

    The temporal model's FLOPs are counted on a sequence of the median test length and spread over the
    ``sample_rate`` frames each step stands for; the extractor's come from ``features_dir/info.json``.
    """
    length = max(int(np.median(lengths)) // sample_rate, 1) if lengths else 256
    parameter = next(model.parameters())
    inputs = (torch.zeros(1, in_channels, length, device=parameter.device),
              torch.ones(1, 1, length, device=parameter.device))
    step_flops = count_flops(model, inputs)
    temporal_flops = step_flops / length / sample_rate if step_flops is not None else None
    info_file = features_dir / "info.json"
    extractor = read_json(info_file) if info_file.is_file() else {}
    temporal_params = count_parameters(model)
    extractor_flops = extractor.get("flops_per_frame")
    return {
        "params": temporal_params + int(extractor.get("params") or 0),
        "flops_per_frame": (temporal_flops or 0.0) + float(extractor_flops or 0.0),
        "temporal_params": temporal_params,
        "temporal_flops_per_frame": temporal_flops,
        "extractor_params": extractor.get("params"),
        "extractor_flops_per_frame": extractor_flops,
        "backbone_pretrained": extractor.get("backbone_pretrained"),
        "feature_extractor": extractor.get("extractor"),
        "weights_origin": extractor.get("weights", extractor.get("weights_hash")),
        "weights_hash": extractor.get("weights_hash"),
        **extra,
    }


def _build(name: str, section: dict[str, Any], *, train_set: FeatureDataset, num_classes: int, dist: DistInfo):
    """The model (wrapped for DDP under torchrun), its constructor arguments, its loss, optimiser and schedule."""
    model_class, loss_class = temporal_model(name)
    fixed = {"in_channels": train_set.feature_dim, "num_classes": num_classes}
    model = call_with(model_class, section["model"], where=f"params.yaml: {name}.model", **fixed).to(dist.device)
    loss_fn = call_with(loss_class.from_label_counts, section["loss"], where=f"params.yaml: {name}.loss",
                        counts=train_set.label_counts(num_classes),
                        full_rate_counts=train_set.label_counts(num_classes, full_rate=True)).to(dist.device)
    if dist.is_distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    train = section["train"]
    optimizer = build_optimizer(model.parameters(), train, where=f"params.yaml: {name}.train")
    scheduler = build_scheduler(optimizer, train, where=f"params.yaml: {name}.train")
    return model, {**fixed, **section["model"]}, loss_fn, optimizer, scheduler


def _family_functions(*, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, train_set: FeatureDataset,
                      train: dict[str, Any], seed: int, generator: torch.Generator, dist: DistInfo):
    """This family's ``train_one_epoch(epoch)`` and ``predict(model, videos)`` for the driver."""
    loader_args = dict(batch_size=train["batch_size"], collate_fn=collate_features, num_workers=train["num_workers"])
    sampler = (DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, seed=seed)
               if dist.is_distributed else None)
    loader = DataLoader(train_set, sampler=sampler, shuffle=sampler is None, generator=generator, **loader_args)

    def one_epoch(epoch: int) -> dict[str, float]:
        if sampler is not None:
            sampler.set_epoch(epoch)
        generator.manual_seed(seed * 1000 + epoch)  # the same batches when an epoch is run again after a resume
        return train_one_epoch(model, loader, loss_fn, optimizer, device=dist.device, scaler=scaler,
                               amp_dtype=amp_dtype, progress=dist.is_main)

    def predict_videos(network: nn.Module, videos: Sequence[str]) -> dict[str, np.ndarray]:
        dataset = FeatureDataset(train_set.features_path, train_set.labels_dir, videos,
                                 sample_rate=train_set.sample_rate)
        return predict(network, DataLoader(dataset, **loader_args), device=dist.device,
                       sample_rate=train_set.sample_rate, amp_dtype=amp_dtype)

    return one_epoch, predict_videos


def train_temporal(
    name: str,
    params: dict[str, Any],
    *,
    features_file: str | Path,
    labels_dir: str | Path,
    paths: RunPaths,
    dist: DistInfo,
) -> dict[str, Any]:
    """Train model ``name`` on the features of the training split, keep the best epoch, predict the test split.

    ``params`` holds ``seed``, ``dataset.sample_rate`` and the model's section: ``model`` (constructor keyword
    arguments), ``loss`` (loss keyword arguments) and ``train`` (epochs, lr, weight_decay, scheduler and its
    plateau_factor/plateau_patience, batch_size, val_fraction, num_workers, num_threads, amp). Returns
    ``model.json``'s content on the main process.
    """
    features_file, labels_dir = Path(features_file), Path(labels_dir)
    section, seed, sample_rate = params[name], params["seed"], params["dataset"]["sample_rate"]
    train = section["train"]
    if train["num_threads"] > 0:
        torch.set_num_threads(train["num_threads"])
    info = load_label_info(labels_dir)
    train_videos, val_videos = hold_out(info.train, train["val_fraction"], seed)
    if not train_videos:
        raise EtesvsError(f"{labels_dir / 'info.json'}: the train split is empty")
    generator = seed_everything(seed)
    train_set = FeatureDataset(features_file, labels_dir, train_videos, sample_rate=sample_rate)
    model, model_args, loss_fn, optimizer, scheduler = _build(name, section, train_set=train_set,
                                                              num_classes=info.num_classes, dist=dist)
    amp_dtype = resolve_amp(train["amp"], dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype == torch.float16)
    one_epoch, predict_videos = _family_functions(
        model=model, loss_fn=loss_fn, optimizer=optimizer, scaler=scaler, amp_dtype=amp_dtype, train_set=train_set,
        train=train, seed=seed, generator=generator, dist=dist)
    config = {"model": name, "model_args": model_args, "loss": section["loss"], "seed": seed,
              "train": resume_settings(train),
              "sample_rate": sample_rate, "videos": [train_videos, val_videos], "world_size": dist.world_size,
              "inputs": file_identity([features_file, labels_dir / "labels.h5"])}
    validate = segmentation_validation(
        predict_videos, {video: load_labels(labels_dir, video) for video in val_videos}, info.background_ids)
    result = fit(
        name=name, model=model, optimizer=optimizer, scheduler=scheduler, train_one_epoch=one_epoch,
        validate=validate, epochs=train["epochs"], seed=seed, paths=paths,
        fingerprint=run_fingerprint(config), model_args=model_args, dist=dist, scaler=scaler,
        inputs=[features_file, labels_dir],
        metadata={"model_name": name, "classes": list(info.classes), "background_ids": list(info.background_ids),
                  "sample_rate": sample_rate, "fps": info.fps},
    )
    if not dist.is_main:
        return {}
    extra = {"sample_rate": sample_rate, "epochs": train["epochs"], "val_videos": val_videos, "training": train}
    return predict_test(
        name=name, model=model, predict=predict_videos, test_videos=info.test, classes=info.classes, paths=paths,
        result=result, device=dist.device,
        describe=lambda network: _describe(network, features_dir=features_file.parent,
                                           in_channels=train_set.feature_dim, sample_rate=sample_rate,
                                           lengths=[info.num_frames[video] for video in info.test], extra=extra),
    )
