"""Supervised pretraining of the demo's backbones on the procedural corpus, and export in the real formats.

The demo stands in for the real protocol (a Kinetics-pretrained I3D, frozen, and an ImageNet-pretrained MobileNetV2,
fine-tuned) with weights it makes itself from :mod:`etesvs.data.pretrain_corpus`:

- :class:`I3DPretrainer` wraps an :class:`InceptionI3d` (any ``width_mult``) fed whole clips; its weights are saved
  with the pytorch-i3d key layout of ``rgb_imagenet.pt`` (:func:`export_i3d_weights`), which
  :func:`etesvs.models.i3d.load_i3d_weights` loads;
- :class:`MobileNetPretrainer` wraps torchvision's MobileNetV2, optionally with TSM's temporal shift inside a clip;
  its weights are saved as a torchvision MobileNetV2 state dict (``features.*`` with BatchNorm running statistics,
  ``classifier.1.*``; :func:`export_mobilenet_weights`), which
  :func:`etesvs.models.streaming.load_pretrained_backbone` loads.

What the networks learn (:func:`pretraining_loss`). Measured on the demo (features of the demo's training subjects,
linear probe on its held-out subject), the information that transfers across subjects is *where* things move: the
demo's layout is fixed, its looks change. A hand-made 6 x 8 grid of frame-difference energy reaches a 65 % frame
accuracy in that probe, random I3D features 13 %. So both backbones are trained, from their spatially averaged
features (exactly what the later stages use), to predict the corpus's ground-truth motion maps (binary
cross-entropy per 8 x 8 cell, per I3D time step or per MobileNetV2 frame); the network must encode where motion is
in its channels, and random appearance per clip forces it to ignore looks. The 16 motion classes are learnt by a
linear classifier on detached features, whose held-out accuracy measures how much of the motion *type* the
features carry; trained jointly with the backbone, the class loss kept the motion maps from being learnt within the
demo's budget of a few hundred steps (held-out motion error 0.115 instead of 0.048 at 600 steps).

Training (:func:`pretrain_backbone`) runs on the project's one training driver (:func:`etesvs.training.fit`:
checkpoints, resume, curves, TensorBoard): the corpus is held in memory as uint8, every batch is augmented by
label-preserving transformations (random temporal crop, time reversal and mirrors with the corpus's label maps,
targets transformed alike), AdamW with a one-cycle schedule that is a pure function of the step (so a resumed run
takes the same steps), and after every epoch the BatchNorm statistics are recomputed under the current weights
(:func:`recalibrate_batch_norm`) before the held-out corpus clips are scored: the exported network is the one
measured. Epoch ``e`` draws its batches from a generator seeded with ``(seed, e)``.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from etesvs.data import pretrain_corpus
from etesvs.data.pretrain_corpus import Corpus, read_corpus
from etesvs.data.windows import IMAGENET_MEAN, IMAGENET_STD
from etesvs.distributed import DistInfo
from etesvs.errors import EtesvsError
from etesvs.io import atomic_path, check_output_file
from etesvs.models.i3d import InceptionI3d, file_sha256
from etesvs.models.streaming import run_backbone, use_small_map_depthwise
from etesvs.checkpoints import load_checkpoint, unwrap_model
from etesvs.training import RunPaths, autocast, file_identity, fit, resolve_amp, resume_settings, run_fingerprint

BACKBONES = ("i3d", "mobilenet_v2")


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def i3d_input(clips: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """uint8 clips (B, T, H, W, 3) -> float (B, 3, T, height, width) in [-1, 1], channels-last, as I3D is fed.

    Resized (bilinear, antialiased) when the corpus size differs, as :func:`etesvs.features.preprocess` resizes.
    """
    x = clips.permute(0, 1, 4, 2, 3).float()  # (B, T, H, W, 3) -> (B, T, 3, H, W)
    if x.shape[-2:] != (height, width):
        batch, length = x.shape[:2]
        x = F.interpolate(x.flatten(0, 1), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        x = x.unflatten(0, (batch, length))
    x = x.mul_(2.0 / 255.0).sub_(1.0)
    x = x.permute(0, 2, 1, 3, 4)  # (B, T, 3, H, W) -> (B, 3, T, H, W)
    return x.contiguous(memory_format=torch.channels_last_3d)


def mobilenet_input(clips: torch.Tensor, *, image_size: int) -> torch.Tensor:
    """uint8 clips (B, T, H, W, 3) -> float (B, T, 3, S, S), the whole frame squeezed to S x S, ImageNet-normalised.

    The streaming model sees its frames the same way (:func:`etesvs.data.windows.resize_frames`).
    """
    x = clips.permute(0, 1, 4, 2, 3).float().div_(255.0)  # (B, T, H, W, 3) -> (B, T, 3, H, W)
    if x.shape[-2:] != (image_size, image_size):
        batch, length = x.shape[:2]
        x = F.interpolate(x.flatten(0, 1), size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)  # fmt: skip
        x = x.unflatten(0, (batch, length))
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def augment_clips(
    clips: torch.Tensor,
    labels: torch.Tensor,
    motion: torch.Tensor,
    *,
    num_frames: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random label-preserving transformations of a batch.

    Each clip gets a random temporal crop of ``num_frames`` frames and, each with probability 1/2, time reversal and
    horizontal and vertical mirroring; labels follow the corpus's maps (``carry_left`` reversed or mirrored left to
    right is ``carry_right``, and so on) and the motion maps are cropped, reversed and mirrored with the frames.

    Args:
        clips: (B, T, H, W, 3) uint8, T >= num_frames.
        labels: (B,) int64 clip classes.
        motion: (B, T, h, w) float per-frame motion maps.

    Returns:
        clips (B, num_frames, H, W, 3) uint8, labels (B,) and motion (B, num_frames, h, w).
    """
    batch, length = clips.shape[:2]
    starts = torch.randint(0, length - num_frames + 1, (batch,), generator=generator)
    rows = torch.arange(batch)[:, None]
    index = starts[:, None] + torch.arange(num_frames)[None, :]  # (B, num_frames)
    clips, motion, labels = clips[rows, index], motion[rows, index], labels.clone()
    transformations = (
        (1, pretrain_corpus.TIME_REVERSED),
        (3, pretrain_corpus.HORIZONTAL_MIRROR),
        (2, pretrain_corpus.VERTICAL_MIRROR),
    )
    for dim, mapping in transformations:  # dims 1, 2, 3 are time, height, width in clips and motion maps alike
        chosen = torch.rand(batch, generator=generator) < 0.5
        if chosen.any():
            clips[chosen] = clips[chosen].flip(dim)
            motion[chosen] = motion[chosen].flip(dim)
            labels[chosen] = torch.from_numpy(pretrain_corpus.label_map(mapping))[labels[chosen]]
    return clips, labels, motion


def central_crop(clips: torch.Tensor, motion: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The central ``num_frames`` frames of clips (N, T, ...) and of their motion maps (N, T, h, w)."""
    start = (clips.shape[1] - num_frames) // 2
    return clips[:, start : start + num_frames], motion[:, start : start + num_frames]


# ----------------------------------------------------------------------------------------------------------------
# Models


class I3DPretrainer(nn.Module):
    """:class:`InceptionI3d` with a motion-map head and a motion-class probe on its spatially averaged features.

    Args:
        num_classes: C, motion classes of the corpus (the ``logits`` layer of the I3D, as in ``rgb_imagenet.pt``).
        motion_cells: M = h * w cells of a motion map.
        width_mult: channel multiplier of the I3D.
        dropout: dropout on the features before both heads.

    ``forward`` takes clips (B, 3, T, H, W) in [-1, 1] and returns ``{"clip": (B, C), "motion": (B, M, T / 8)}``
    logits; the classifier sees detached features. ``i3d`` is a plain InceptionI3d, so its ``state_dict()`` has the
    pytorch-i3d key layout.
    """

    def __init__(self, *, num_classes: int, motion_cells: int, width_mult: float, dropout: float) -> None:
        super().__init__()
        self.i3d = InceptionI3d(in_channels=3, num_classes=num_classes, width_mult=width_mult)
        self.dropout = nn.Dropout(dropout)
        self.motion_head = nn.Conv3d(self.i3d.feature_dim, motion_cells, kernel_size=1)

    def forward(self, clips: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.dropout(self.i3d.feature_map(clips).mean(dim=(3, 4), keepdim=True))  # (B, D, T', 1, 1)
        return {
            "clip": self.i3d.logits(features.detach()).mean(dim=(2, 3, 4)),  # (B, C, T', 1, 1) -> (B, C)
            "motion": self.motion_head(features).flatten(2),  # (B, M, T', 1, 1) -> (B, M, T')
        }


class MobileNetPretrainer(nn.Module):
    """torchvision's MobileNetV2 (optionally with TSM's temporal shift) with per-frame motion-map and class heads.

    Args:
        num_classes: C, motion classes of the corpus (MobileNetV2's ``classifier``; clip logits are the mean of the
            frames' logits, as TSN and TSM train on Kinetics).
        motion_cells: M = h * w cells of a motion map.
        width_mult: MobileNetV2 width multiplier.
        shift_divisor: TSM's residual shift of 1/shift_divisor of the channels each way between the frames of a
            clip (as in the streaming model); 0: no shift.
        stem_shift: also shift the stem's output (see :class:`etesvs.models.streaming.StreamingSegmenter`).
        dropout: dropout before the classifier.

    ``forward`` takes (B, T, 3, S, S) normalised frames and returns ``{"clip": (B, C), "motion": (B, M, T)}``
    logits; the classifier sees detached features. ``mobilenet`` is a plain torchvision MobileNetV2.
    """

    def __init__(
        self, *, num_classes: int, motion_cells: int, width_mult: float, shift_divisor: int, stem_shift: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.mobilenet = torchvision.models.mobilenet_v2(
            weights=None, width_mult=width_mult, num_classes=num_classes, dropout=dropout
        )
        self.shift_divisor = shift_divisor
        self.stem_shift = stem_shift
        self.motion_head = nn.Linear(self.mobilenet.last_channel, motion_cells)
        # Channels-last, as run_backbone runs the frames (mobilenet_input's already are: clips are stored HWC).
        self.mobilenet.features.to(memory_format=torch.channels_last)
        use_small_map_depthwise(self.mobilenet.features)

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, length = frames.shape[:2]
        # (B, T, 3, S, S) -> (B*T, 3, S, S) -> (B*T, C', h, w)
        x, _ = run_backbone(self.mobilenet.features, frames.flatten(0, 1), num_frames=length,
                            shift_divisor=self.shift_divisor, stem_shift=self.stem_shift)  # fmt: skip
        x = x.mean(dim=(2, 3))  # (B*T, C', h, w) -> (B*T, C')
        logits = self.mobilenet.classifier(x.detach()).view(batch, length, -1)  # (B*T, C) -> (B, T, C)
        motion = self.motion_head(x).view(batch, length, -1).transpose(1, 2)  # (B*T, M) -> (B, M, T)
        return {"clip": logits.mean(dim=1), "motion": motion}


# ----------------------------------------------------------------------------------------------------------------
# Training


def motion_targets(motion: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-frame motion maps (B, T, h, w) averaged over ``steps`` equal spans of frames -> (B, h * w, steps)."""
    batch, length = motion.shape[:2]
    spans = motion.flatten(2).view(batch, steps, length // steps, -1)  # (B, T, h*w) -> (B, steps, T/steps, h*w)
    return spans.mean(dim=2).transpose(1, 2)  # (B, steps, h*w) -> (B, h*w, steps)


def pretraining_loss(
    outputs: dict[str, torch.Tensor], labels: torch.Tensor, motion: torch.Tensor, *, motion_weight: float
) -> dict[str, torch.Tensor]:
    """``motion_weight`` x binary cross-entropy of the motion maps (cell coverage as a soft target) plus the
    cross-entropy of the motion class (whose classifier sees detached features, so it trains only itself).

    Args:
        outputs: ``"clip"`` (B, C) and ``"motion"`` (B, h * w, T') logits; each of the T' outputs stands for
            T / T' consecutive frames.
        labels: (B,) clip classes; motion: (B, T, h, w) per-frame maps.

    Returns:
        ``"loss"`` (to back-propagate), ``"motion"`` and ``"clip"`` (detached parts).
    """
    target = motion_targets(motion, outputs["motion"].shape[2])
    motion_loss = F.binary_cross_entropy_with_logits(outputs["motion"], target)
    clip_loss = F.cross_entropy(outputs["clip"], labels)
    return {"loss": motion_weight * motion_loss + clip_loss, "motion": motion_loss.detach(), "clip": clip_loss.detach()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    clips: torch.Tensor,
    labels: torch.Tensor,
    motion: torch.Tensor,
    *,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    num_frames: int,
    batch_size: int,
) -> dict[str, float]:
    """Held-out scores: motion-class accuracy (percent) and the motion maps' mean absolute error (in coverage).

    Args:
        clips: (N, T, H, W, 3) uint8, cut to their central ``num_frames`` frames; labels: (N,); motion: (N, T, h, w).
    """
    model.eval()
    clips, motion = central_crop(clips, motion, num_frames)
    correct, error = 0, 0.0
    for first in range(0, len(clips), batch_size):
        outputs = model(to_input(clips[first : first + batch_size]))
        correct += int((outputs["clip"].argmax(dim=1) == labels[first : first + batch_size]).sum())
        target = motion_targets(motion[first : first + batch_size], outputs["motion"].shape[2])
        error += float((torch.sigmoid(outputs["motion"]) - target).abs().mean(dim=(1, 2)).sum())
    count = max(len(clips), 1)
    return {"acc": 100.0 * correct / count, "motion_error": error / count}


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module,
    clips: torch.Tensor,
    *,
    to_input: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
) -> None:
    """Set every BatchNorm's running statistics to their average over ``clips`` (N, T, H, W, 3) uint8.

    During training the running statistics trail weights that change quickly (pytorch-i3d's BatchNorm momentum is
    0.01), so the exported network would normalise with the statistics of older weights ("precise BN").
    """
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    for first in range(0, len(clips), batch_size):
        model(to_input(clips[first : first + batch_size]))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)


def one_cycle_lr(step: int, total_steps: int, *, max_lr: float, warmup_fraction: float) -> float:
    """Learning rate of step ``step`` (0-based) of ``total_steps``: linear warm-up from ``max_lr`` / 25 over the first
    ``warmup_fraction`` of the steps, then cosine decay to ``max_lr`` / 1e4 (the shape of torch's OneCycleLR, as a pure
    function of the step so that a resumed run takes exactly the steps of an uninterrupted one)."""
    start, end = max_lr / 25.0, max_lr / 1e4
    warmup = max(int(round(warmup_fraction * total_steps)), 1)
    if step < warmup:
        return start + (max_lr - start) * step / warmup
    progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    return end + (max_lr - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _epoch_function(model: nn.Module, optimizer: torch.optim.Optimizer, data: dict[str, torch.Tensor], *,
                    to_input: Callable[[torch.Tensor], torch.Tensor], train: dict[str, Any], seed: int,
                    device: torch.device, amp_dtype: torch.dtype | None,
                    scaler: torch.amp.GradScaler) -> Callable[[int], dict[str, float]]:
    """``train_one_epoch(epoch)`` for :func:`etesvs.training.fit`: every training clip once, in batches."""
    train_index = torch.nonzero(~data["holdout"]).squeeze(1)
    batch_size = train["batch_size"]
    steps_per_epoch = max(len(train_index) // batch_size, 1)
    total_steps = steps_per_epoch * train["epochs"]

    def one_epoch(epoch: int) -> dict[str, float]:
        model.train()
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        totals = {"loss": 0.0, "motion_loss": 0.0, "class_loss": 0.0}
        bar = tqdm(range(steps_per_epoch), desc="  batches", leave=False, dynamic_ncols=True)
        for step in bar:
            lr = one_cycle_lr((epoch - 1) * steps_per_epoch + step, total_steps, max_lr=train["lr"],
                              warmup_fraction=train["warmup_fraction"])  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[step * batch_size : (step + 1) * batch_size]
            clips, labels, motion = augment_clips(data["clips"][index], data["labels"][index], data["motion"][index],
                                                  num_frames=train["num_frames"], generator=generator)  # fmt: skip
            with autocast(device, amp_dtype):
                outputs = model(to_input(clips).to(device))
            losses = pretraining_loss({key: value.float() for key, value in outputs.items()}, labels.to(device),
                                      motion.to(device), motion_weight=train["motion_weight"])  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            for key, part in (("loss", "loss"), ("motion_loss", "motion"), ("class_loss", "clip")):
                totals[key] += float(losses[part].detach())
            bar.set_postfix(loss=f"{float(losses['loss'].detach()):.3f}")
        return {key: value / steps_per_epoch for key, value in totals.items()}

    return one_epoch


def _validation_function(data: dict[str, torch.Tensor], *, to_input: Callable[[torch.Tensor], torch.Tensor],
                         train: dict[str, Any], seed: int, device: torch.device) -> Callable[[nn.Module], dict]:
    """``validate(model)`` for :func:`etesvs.training.fit`: precise BatchNorm statistics from a fixed sample of
    training clips, then the held-out clips' scores (``acc``: motion-class accuracy, ``motion_error``)."""
    num_frames, batch_size = train["num_frames"], train["batch_size"]
    train_index = torch.nonzero(~data["holdout"]).squeeze(1)
    chosen = train_index[torch.randperm(len(train_index), generator=torch.Generator().manual_seed(seed))]
    calibration = central_crop(data["clips"][chosen[: train["calibration_clips"]]],
                               data["motion"][chosen[: train["calibration_clips"]]], num_frames)[0]  # fmt: skip
    holdout = data["holdout"]  # the held-out clips and targets, gathered once rather than every epoch
    clips = data["clips"][holdout]
    labels, motion = data["labels"][holdout].to(device), data["motion"][holdout].to(device)

    def to_device(clips: torch.Tensor) -> torch.Tensor:
        return to_input(clips).to(device)

    def validate(model: nn.Module) -> dict[str, float]:
        if len(calibration):
            recalibrate_batch_norm(model, calibration, to_input=to_device, batch_size=batch_size)
        return evaluate(model, clips, labels, motion, to_input=to_device, num_frames=num_frames, batch_size=batch_size)

    return validate


def lowest_motion_error(scores: dict[str, float]) -> float:
    """Selection score of a pretraining epoch: the held-out motion maps' error, lower is better."""
    return -scores["motion_error"]


def check_settings(train: dict[str, Any], corpus: Corpus, *, where: str, corpus_path: Path) -> None:
    """Refuse, in one line naming the setting, a pretraining section that cannot run on ``corpus``."""
    length = corpus.clips.shape[1]
    if not 1 <= train["num_frames"] <= length:
        raise EtesvsError(f"{where}.num_frames: {train['num_frames']} frames, but {corpus_path} has clips of {length}")
    for key in ("epochs", "batch_size", "validate_every"):
        if train[key] < 1:
            raise EtesvsError(f"{where}.{key}: must be at least 1, got {train[key]}")
    if not 0 <= train["warmup_fraction"] < 1:
        raise EtesvsError(f"{where}.warmup_fraction: must be in [0, 1), got {train['warmup_fraction']}")
    if int((~corpus.holdout).sum()) < train["batch_size"]:
        raise EtesvsError(f"{corpus_path}: fewer training clips than {where}.batch_size ({train['batch_size']})")


# ----------------------------------------------------------------------------------------------------------------
# Export


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save plain CPU tensors (contiguous, whatever memory format training used) atomically, byte for byte the
    same for the same tensors (the archive is written in memory first: torch names its inner folder after the file,
    and the file is first written under a temporary name), so the weights' hash in the metrics changes only when the
    weights do."""
    buffer = io.BytesIO()
    torch.save({key: value.detach().cpu().clone(memory_format=torch.contiguous_format) for key, value in state.items()},
               buffer)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(buffer.getvalue())


def export_i3d_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Save the I3D's state dict with the pytorch-i3d key layout of ``rgb_imagenet.pt`` (plain tensors, atomically).

    Keys: ``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.running_mean``, ..., ``Mixed_5c.b3b.bn.*`` and
    ``logits.conv3d.{weight,bias}`` (the corpus's motion classes); the motion-map head is not part of it.
    """
    save_state_dict(unwrap_model(model).i3d.state_dict(), path)


def export_mobilenet_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a torchvision MobileNetV2 state dict (``features.*`` with BatchNorm statistics, ``classifier.1.*``)."""
    save_state_dict(unwrap_model(model).mobilenet.state_dict(), path)


def build_pretrainer(
    backbone: str, *, num_classes: int, motion_cells: int, model_args: dict[str, Any]
) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], Callable[[nn.Module, str | os.PathLike], None]]:
    """The pretraining model of ``backbone`` (``"i3d"`` or ``"mobilenet_v2"``), its input function and exporter.

    ``model_args`` is the backbone's ``model`` section: ``width_mult``, ``dropout`` and, for I3D, ``height`` and
    ``width`` of its input; for MobileNetV2, ``image_size`` and ``shift_divisor`` (0: no temporal shift).
    """
    args = dict(model_args)
    if backbone == "i3d":
        height, width = args.pop("height"), args.pop("width")
        model = I3DPretrainer(num_classes=num_classes, motion_cells=motion_cells, **args)
        model = model.to(memory_format=torch.channels_last_3d)
        return model, lambda clips: i3d_input(clips, height=height, width=width), export_i3d_weights
    if backbone == "mobilenet_v2":
        size = args.pop("image_size")
        model = MobileNetPretrainer(num_classes=num_classes, motion_cells=motion_cells, **args)
        return model, lambda clips: mobilenet_input(clips, image_size=size), export_mobilenet_weights
    raise EtesvsError(f"pretrain: unknown backbone {backbone!r} (choose from {', '.join(BACKBONES)})")


def corpus_summary(corpus: Corpus) -> dict[str, int]:
    """Sizes of a corpus for reports: clips, training and held-out clips, classes, frames per clip."""
    return {
        "corpus_clips": int(len(corpus.labels)),
        "corpus_train_clips": int((~corpus.holdout).sum()),
        "corpus_holdout_clips": int(corpus.holdout.sum()),
        "corpus_classes": len(corpus.classes),
        "corpus_clip_frames": int(corpus.clips.shape[1]),
    }


# ----------------------------------------------------------------------------------------------------------------
# The stage


def pretrain_backbone(
    backbone: str,
    section: dict[str, Any],
    *,
    seed: int,
    corpus_path: str | os.PathLike,
    weights_path: str | os.PathLike,
    paths: RunPaths,
    dist: DistInfo,
) -> dict[str, Any]:
    """Pretrain ``backbone`` on the corpus with :func:`etesvs.training.fit`, export the weights of the best epoch
    (lowest held-out motion error) to ``weights_path`` in the real format.

    Returns ``{"metrics": held-out scores (DVC metrics), "weights": what the weights are (file, SHA-256, origin,
    epochs, corpus sizes)}``.

    ``section`` is ``pretrain.<backbone>`` of params.yaml: ``model`` (see :func:`build_pretrainer`) and ``train``
    (``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``warmup_fraction``, ``motion_weight``, ``num_frames``,
    ``calibration_clips``, ``validate_every``, ``amp``, ``num_threads``). Runs in one process, on the GPU when there
    is one.
    """
    where = f"params.yaml: pretrain.{backbone}.train"
    corpus_path, weights_path = Path(corpus_path), Path(weights_path)
    train = section["train"]
    if train["num_threads"] > 0:
        torch.set_num_threads(train["num_threads"])
    check_output_file(weights_path, inputs=[corpus_path], suffixes=(".pt", ".pth"))
    corpus = read_corpus(corpus_path)
    check_settings(train, corpus, where=where, corpus_path=corpus_path)
    torch.manual_seed(seed)  # initialisation
    motion_cells = corpus.motion.shape[2] * corpus.motion.shape[3]
    model, to_input, export = build_pretrainer(backbone, num_classes=len(corpus.classes), motion_cells=motion_cells,
                                               model_args=section["model"])  # fmt: skip
    device = dist.device
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"], weight_decay=train["weight_decay"])
    amp_dtype = resolve_amp(train["amp"], device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    data = {"clips": torch.from_numpy(corpus.clips), "labels": torch.from_numpy(corpus.labels),
            "motion": torch.from_numpy(corpus.motion), "holdout": torch.from_numpy(corpus.holdout)}
    one_epoch = _epoch_function(model, optimizer, data, to_input=to_input, train=train, seed=seed, device=device,
                                amp_dtype=amp_dtype, scaler=scaler)  # fmt: skip
    validate = _validation_function(data, to_input=to_input, train=train, seed=seed, device=device)
    settings = resume_settings(train)
    fingerprint = run_fingerprint({"backbone": backbone, "model": section["model"], "train": settings, "seed": seed,
                                   "corpus": file_identity([corpus_path])})  # fmt: skip
    name = f"pretrain_{backbone}"
    result = fit(name=name, model=model, optimizer=optimizer, train_one_epoch=one_epoch, validate=validate,
                 epochs=train["epochs"], seed=seed, paths=paths, fingerprint=fingerprint,
                 model_args={"backbone": backbone, **section["model"]}, metadata={"classes": list(corpus.classes)},
                 dist=dist, scaler=scaler, select=lowest_motion_error, inputs=[corpus_path],
                 validate_every=train["validate_every"])  # fmt: skip
    best = load_checkpoint(paths.checkpoints / "best.pt", map_location=device)
    unwrap_model(model).load_state_dict(best["model"])
    export(model, weights_path)
    row = next(row for row in result.history if row["epoch"] == best["epoch"])
    return _outcome(backbone, row, train=train, corpus=corpus, corpus_path=corpus_path, weights_path=weights_path)


def _outcome(backbone: str, row: dict[str, Any], *, train: dict[str, Any], corpus: Corpus, corpus_path: Path,
             weights_path: Path) -> dict[str, Any]:
    """What :func:`pretrain_backbone` returns, from the selected epoch's row of the history."""
    return {
        # held-out corpus clips: motion-class accuracy of the probe (%), mean error of the motion maps
        "metrics": {"corpus_acc": round(row["val_acc"], 2), "motion_err": round(row["val_motion_error"], 4)},
        "weights": {
            "backbone": backbone,
            "file": weights_path.as_posix(),
            "sha256": file_sha256(weights_path),
            "origin": f"supervised pretraining on the procedural corpus {corpus_path.as_posix()} (etesvs.pretrain)",
            "best_epoch": int(row["epoch"]),
            "epochs": train["epochs"],
            "train_loss": row["train_loss"],
            **corpus_summary(corpus),
        },
    }
