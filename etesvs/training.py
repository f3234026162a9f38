"""One training driver for every model family.

A family builds its model, optimiser and data and hands the driver two functions:

- ``train_one_epoch(epoch) -> {name: float}``: one pass over its training data; returns the mean ``loss`` (and
  its parts), the same on every process;
- ``predict(model, videos) -> {video: (T, C) float32}``: class probabilities of whole videos at the full frame
  rate, called on the main process with the unwrapped model.

The two families are the two-stage temporal models on features (:mod:`etesvs.temporal_training`) and the
streaming model on frames (:mod:`etesvs.streaming_training`). Everything else is done here, the same way for
both: the validation hold-out (part of the TRAINING split; never the test split), seeding per epoch, the resume
rule, the selection score, checkpoints, curves, TensorBoard tags, the test predictions (``probs.h5``) and
``model.json``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import h5py
import numpy as np
import torch
from torch import nn

from etesvs.checkpoints import load_checkpoint, save_checkpoint, unwrap_model
from etesvs.distributed import DistInfo, barrier
from etesvs.errors import EtesvsError
from etesvs.io import OutputDir, atomic_path, check_output_file, claim_output_dir, write_json
from etesvs.metrics.segmentation import segmentation_metrics

VALIDATION_KEYS = ("acc", "edit", "f1_50")
TIMING_KEYS = ("seconds",)
"""History fields that measure time: kept in checkpoints and TensorBoard, never in curves or metrics."""
AMP_MODES = ("auto", "off", "bf16")

TrainOneEpoch = Callable[[int], dict[str, float]]
Predict = Callable[[nn.Module, Sequence[str]], dict[str, np.ndarray]]
Validate = Callable[[nn.Module], dict[str, float]]


# --------------------------------------------------------------------------------------------------------------
# Seeds, precision, hold-out, selection
# --------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); returns a torch Generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def deterministic_algorithms() -> None:
    """Ask torch for deterministic kernels (CPU results then depend only on the seed and the thread count, which
    every stage fixes); ``warn_only``: CUDA kernels without a deterministic twin warn instead of failing."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed torch's global generator for epoch ``epoch`` (dropout masks, random augmentation in the process).

    Each epoch starts from a seed of its own, so an epoch that is run again after an interruption draws the same
    numbers as it did in an uninterrupted run, without saving generator states in checkpoints.
    """
    torch.manual_seed(seed * 1000 + epoch)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` setting: ``auto`` is float16 on CUDA and full precision elsewhere,
    ``bf16`` is bfloat16 on any device, ``off`` is full precision (None)."""
    if amp not in AMP_MODES:
        raise EtesvsError(f"amp: {amp!r} is not one of {', '.join(AMP_MODES)}")
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto" and device.type == "cuda":
        return torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def build_optimizer(parameters: Iterable[torch.nn.Parameter], train: dict[str, Any], *, where: str
                    ) -> torch.optim.Optimizer:
    """The optimiser of a ``train`` section: ``optimizer`` (adam, adamw or sgd, which also needs ``momentum``)
    with ``lr`` and ``weight_decay``."""
    name = train["optimizer"]
    if name not in OPTIMIZERS:
        raise EtesvsError(f"{where}.optimizer: expected {', '.join(OPTIMIZERS)}, got {name!r}")
    options = {"lr": train["lr"], "weight_decay": train["weight_decay"]}
    if name == "sgd":
        if "momentum" not in train:
            raise EtesvsError(f"{where}: optimizer sgd needs momentum")
        options["momentum"] = train["momentum"]
    return OPTIMIZERS[name](parameters, **options)


SCHEDULER_KEYS = {"none": (), "plateau": ("plateau_factor", "plateau_patience"), "multistep": ("milestones", "gamma"),
                  "cosine": ("warmup_epochs", "epochs")}
"""The ``train`` keys each learning-rate schedule reads."""


def build_scheduler(optimizer: torch.optim.Optimizer, train: dict[str, Any], *, where: str) -> Any:
    """The learning-rate schedule of a ``train`` section, stepped once per epoch by :func:`fit`.

    ``scheduler: none`` keeps the rate constant (MS-TCN, ASRF); ``plateau`` multiplies it by ``plateau_factor`` once
    the training loss has not improved for more than ``plateau_patience`` epochs (ASFormer's
    ReduceLROnPlateau(mode="min", factor=0.5, patience=3) on the training loss); ``multistep`` multiplies it by
    ``gamma`` at each epoch of ``milestones`` (the ETESVS authors' MultiStepLR); ``cosine`` warms up linearly over
    ``warmup_epochs`` then decays along a cosine (:func:`cosine_factor`), for every parameter group alike.
    """
    name = train["scheduler"]
    if name not in SCHEDULER_KEYS:
        raise EtesvsError(f"{where}.scheduler: expected {', '.join(SCHEDULER_KEYS)}, got {name!r}")
    missing = [key for key in SCHEDULER_KEYS[name] if key not in train]
    if missing:
        raise EtesvsError(f"{where}: scheduler {name} needs {' and '.join(missing)}")
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=train["plateau_factor"], patience=train["plateau_patience"])
    if name == "cosine":
        warmup, epochs = train["warmup_epochs"], train["epochs"]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: cosine_factor(done + 1, warmup, epochs))
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(train["milestones"]),
                                                    gamma=train["gamma"])
    return None


def cosine_factor(epoch: int, warmup_epochs: int, epochs: int) -> float:
    """Learning-rate factor of epoch ``epoch`` (1-based): a linear warm-up over ``warmup_epochs``, then a cosine decay
    from 1 towards 0 at the end of the last epoch, taken at the middle of each epoch."""
    if epoch <= warmup_epochs:
        return epoch / (warmup_epochs + 1)
    progress = (epoch - warmup_epochs - 0.5) / max(epochs - warmup_epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def hold_out(videos: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split of the training videos into (train, validation), both in their original order.

    Validation gets ``round(fraction * n)`` videos, at least one when ``fraction`` > 0 and there are two or more.
    """
    if not 0.0 <= fraction < 1.0:
        raise EtesvsError(f"val_fraction must be in [0, 1), got {fraction}")
    videos = list(videos)
    if fraction == 0.0 or len(videos) < 2:
        return videos, []
    count = min(len(videos) - 1, max(1, round(fraction * len(videos))))
    held_out = set(torch.randperm(len(videos), generator=torch.Generator().manual_seed(seed))[:count].tolist())
    return ([video for i, video in enumerate(videos) if i not in held_out],
            [video for i, video in enumerate(videos) if i in held_out])


def validation_scores(
    probabilities: dict[str, np.ndarray], labels: dict[str, np.ndarray], background_ids: Sequence[int]
) -> dict[str, float]:
    """Frame accuracy, Edit and F1@50 (percent) of the argmax of ``probabilities`` (T, C) against ``labels`` (T,)."""
    videos = sorted(probabilities)
    scores = segmentation_metrics(
        [probabilities[video].argmax(axis=1) for video in videos],
        [labels[video] for video in videos],
        background_ids=background_ids,
        overlaps=(0.5,),
    )
    return {"acc": scores.accuracy, "edit": scores.edit, "f1_50": scores.f1[0.5]}


def segmentation_validation(predict: Predict, val_labels: dict[str, np.ndarray], background_ids: Sequence[int]
                            ) -> Validate | None:
    """The validation of a segmentation model: :func:`validation_scores` of ``predict`` on the held-out videos
    ``val_labels`` (their ids and frame labels); None without held-out videos."""
    if not val_labels:
        return None
    return lambda model: validation_scores(predict(model, sorted(val_labels)), val_labels, background_ids)


def selection_score(scores: dict[str, float]) -> float:
    """The score that picks the best epoch: the mean of validation accuracy, Edit and F1@50.

    A few held-out videos make each single score noisy; their mean is a steadier guide, and it rewards both
    frame-wise correctness and clean segments.
    """
    return sum(scores[key] for key in VALIDATION_KEYS) / len(VALIDATION_KEYS)


# --------------------------------------------------------------------------------------------------------------
# Identity of a run (the resume rule)
# --------------------------------------------------------------------------------------------------------------


def file_identity(paths: Iterable[str | os.PathLike]) -> list[list[Any]]:
    """``[name, size, mtime_ns]`` of each file: a cheap identity of the inputs of a run."""
    identity = []
    for path in paths:
        stat = Path(path).stat()
        identity.append([str(path), stat.st_size, stat.st_mtime_ns])
    return identity


def resume_settings(train: dict[str, Any]) -> dict[str, Any]:
    """The part of a ``train`` section that identifies a run (for :func:`run_fingerprint`): all of it but the data
    loader's worker count (the batches are the same for any number) and, when its ``scheduler`` is one of
    :data:`SCHEDULER_KEYS` that does not read it, ``epochs``: a run asked for more epochs then resumes where a
    shorter one ended and equals a run trained that long from the start (every epoch is seeded on its own). A cosine
    schedule, or any other that reads ``epochs`` (the pretraining's one-cycle), makes a run with other epochs start
    afresh; and :func:`fit` never resumes a run that has trained more epochs than asked."""
    schedule = SCHEDULER_KEYS.get(train.get("scheduler"), ("epochs",))  # unknown: assume it reads them
    omit = {"num_workers"} | ({"epochs"} if "epochs" not in schedule else set())
    return {key: value for key, value in train.items() if key not in omit}


def run_fingerprint(config: dict[str, Any]) -> str:
    """Hash of ``config`` and of the source of every ``etesvs`` module loaded in this process.

    A ``last.pt`` is resumed only when its fingerprint equals the current one, so changed settings, inputs or code
    start training afresh instead of continuing another run.
    """
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(sys.modules):
        if name == "etesvs" or name.startswith("etesvs."):
            source = getattr(sys.modules[name], "__file__", None)
            if source and source.endswith(".py"):
                digest.update(name.encode())
                digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    """Where a training run writes.

    Attributes:
        checkpoints: directory of ``last.pt`` (every epoch) and ``best.pt`` (the selected epoch).
        predictions: directory of ``probs.h5`` (test videos) and ``model.json``.
        curves: CSV of the per-epoch curves (DVC plots).
        tensorboard: TensorBoard log directory.
    """

    checkpoints: Path
    predictions: Path
    curves: Path
    tensorboard: Path


def write_curves(path: str | os.PathLike, history: Sequence[dict[str, Any]]) -> None:
    """One row per epoch, every field but timings (so that the file is the same whenever the numbers are)."""
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns and key not in TIMING_KEYS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({key: (f"{row[key]:.6g}" if isinstance(row.get(key), float) else row.get(key, ""))
                         for key in columns})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")


def write_probabilities(
    path: str | os.PathLike, probabilities: dict[str, np.ndarray], *, classes: Sequence[str], model: str
) -> None:
    """``probs.h5``: one float32 (T, C) dataset per video, written atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["model"] = model
            handle.attrs["classes"] = json.dumps(list(classes))
            for video in sorted(probabilities):
                handle.create_dataset(video, data=probabilities[video].astype(np.float32), compression="gzip")


def _log_tensorboard(writer: Any, row: dict[str, Any]) -> None:
    """Tags shared by every model: ``train/<name>``, ``val/<name>``, ``time/<name>``."""
    for key, value in row.items():
        if key == "epoch" or value is None:
            continue
        split, _, name = key.partition("_")
        tag = f"{split}/{name}" if split in ("train", "val") else f"time/{key}"
        writer.add_scalar(tag, value, int(row["epoch"]))
    writer.flush()


def _epoch_line(name: str, row: dict[str, Any], epochs: int, improved: bool) -> str:
    scores = [f"{key[4:]} {value:.1f}" if abs(value) >= 1 else f"{key[4:]} {value:.4f}"
              for key, value in row.items() if key.startswith("val_")]
    val = f", val {' '.join(scores)}" if scores else ""
    return (f"{name} epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}{val} "
            f"({row['seconds']:.0f} s){' *' if improved else ''}")


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    """What a run leaves behind, on the main process (other processes get an empty history)."""

    history: list[dict[str, Any]]
    best_epoch: int
    resumed_from: int
    seconds: float


def _resume(last_path: Path, best_path: Path, fingerprint: str, *, model: nn.Module, optimizer: Any,
            scheduler: Any, scaler: Any, device: torch.device, epochs: int) -> dict[str, Any] | None:
    """The state of ``last.pt`` loaded into the objects, or None when it is absent or belongs to another run (another
    fingerprint, or more epochs than the ``epochs`` of this one)."""
    if not last_path.is_file():
        return None
    state = load_checkpoint(last_path, map_location=device)
    if state.get("fingerprint") != fingerprint or not best_path.is_file() or int(state["epoch"]) > epochs:
        return None
    unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for obj, key in ((scheduler, "scheduler"), (scaler, "scaler")):
        if obj is not None and state.get(key):
            obj.load_state_dict(state[key])
    return state


@dataclass
class _Run:
    """What :func:`fit` carries from epoch to epoch."""

    history: list[dict[str, Any]]
    best: dict[str, Any]
    start_epoch: int


def _owner(name: str) -> str:
    return f"training of {name}"


def claim_run_outputs(name: str, paths: RunPaths, *, inputs: Sequence[str | os.PathLike] = ()) -> OutputDir:
    """Claim the checkpoint directory (see :func:`etesvs.io.claim_output_dir`) and check the curves file, before
    anything is written; ``inputs`` are what the run reads. Returns the checkpoint directory."""
    def is_checkpoint(path: Path) -> bool:  # for directories written before ownership markers
        return path.name in ("last.pt", "best.pt")

    checkpoints = claim_output_dir(paths.checkpoints, owner=_owner(name), inputs=inputs, adopt=is_checkpoint)
    checkpoints.expect(["last.pt", "best.pt"])
    check_output_file(paths.curves, inputs=inputs, suffixes=(".csv",))
    return checkpoints


def _tensorboard(name: str, paths: RunPaths, start_epoch: int) -> Any:
    """A TensorBoard writer in its own directory (claimed like the others; its event files are recorded)."""
    from torch.utils.tensorboard import SummaryWriter

    def is_event_file(path: Path) -> bool:
        return path.name.startswith("events.out.tfevents.")

    directory = claim_output_dir(paths.tensorboard, owner=_owner(name), adopt=is_event_file)
    before = set(os.listdir(paths.tensorboard)) if paths.tensorboard.is_dir() else set()
    writer = SummaryWriter(log_dir=str(paths.tensorboard), purge_step=start_epoch)
    directory.record(sorted(set(os.listdir(paths.tensorboard)) - before))  # the event file it has just opened
    return writer


def _start(name: str, paths: RunPaths, fingerprint: str, *, model: nn.Module, optimizer: Any, scheduler: Any,
           scaler: Any, dist: DistInfo, log: Callable[[str], None], epochs: int) -> _Run:
    """A fresh run, or the state of ``last.pt`` when it belongs to this run (see :func:`_resume`) and has not trained
    more than ``epochs`` epochs."""
    last_path, best_path = paths.checkpoints / "last.pt", paths.checkpoints / "best.pt"
    state = _resume(last_path, best_path, fingerprint, model=model, optimizer=optimizer, scheduler=scheduler,
                    scaler=scaler, device=dist.device, epochs=epochs)
    if state is not None:
        if dist.is_main:
            log(f"{name}: resuming from {last_path} after epoch {state['epoch']}")
        return _Run(history=list(state["history"]), best=dict(state["best"]), start_epoch=int(state["epoch"]) + 1)
    if last_path.is_file() and dist.is_main:
        log(f"{name}: {last_path} belongs to other settings, inputs or code, or has more epochs; training from scratch")
    return _Run(history=[], best={"epoch": 0, "score": -math.inf}, start_epoch=1)


def _end_epoch(run: _Run, row: dict[str, Any], *, model: nn.Module, optimizer: Any, validate: Validate | None,
               select: Callable[[dict[str, float]], float], paths: RunPaths, checkpoint: dict[str, Any],
               validating: bool = True) -> bool:
    """On the main process: validate (when ``validating``), append ``row`` to the history, write the checkpoints
    and the curves.

    Returns whether the epoch is the best so far (by ``select`` of the validation scores; without validation the
    latest epoch is the best; an epoch left unvalidated is never the best).
    """
    if validate is None:
        score = float(row["epoch"])
    elif validating:
        scores = validate(unwrap_model(model))
        row.update({f"val_{key}": value for key, value in scores.items()})
        score = select(scores)
    else:
        score = -math.inf
    run.history.append(row)
    improved = score > run.best["score"]
    if improved:
        run.best = {"epoch": row["epoch"], "score": score}
    extra = dict(checkpoint, history=run.history, best=run.best)
    if improved:
        save_checkpoint(paths.checkpoints / "best.pt", model=model, optimizer=None, epoch=row["epoch"], **extra)
    save_checkpoint(paths.checkpoints / "last.pt", model=model, optimizer=optimizer, epoch=row["epoch"], **extra)
    write_curves(paths.curves, run.history)
    return improved


def _step_scheduler(scheduler: Any, train_loss: float) -> None:
    """One step per epoch; ReduceLROnPlateau watches the training loss (as ASFormer's recipe does)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(train_loss)
    elif scheduler is not None:
        scheduler.step()


def fit(
    *,
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_one_epoch: TrainOneEpoch,
    validate: Validate | None,
    epochs: int,
    seed: int,
    paths: RunPaths,
    fingerprint: str,
    model_args: dict[str, Any],
    metadata: dict[str, Any],
    dist: DistInfo,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    select: Callable[[dict[str, float]], float] = selection_score,
    inputs: Sequence[str | os.PathLike] = (),
    log: Callable[[str], None] = print,
    validate_every: int = 1,
) -> RunResult:
    """Train for ``epochs`` epochs in all, resuming from ``last.pt`` when it belongs to this run.

    After every epoch the main process validates (``validate(model)``: named scores, for segmentation models
    :func:`segmentation_validation`), writes ``last.pt`` and, when ``select`` of the scores improves, ``best.pt``
    (without validation the last epoch is the best), and updates the curves and TensorBoard. With
    ``validate_every`` N > 1 only every N-th epoch and the last are validated and can be the best (each epoch is
    seeded on its own, so the training does not depend on N). Checkpoints hold ``model_args`` and
    ``metadata`` (what a checkpoint needs to be used on its own: classes, frame rate, ...). ``scheduler`` steps
    once per epoch (ReduceLROnPlateau on the training loss). The output directories are claimed first (see
    :func:`claim_run_outputs`; ``inputs`` are what the run reads, never to be written over).
    """
    if dist.is_main:
        claim_run_outputs(name, paths, inputs=inputs)
    deterministic_algorithms()
    run = _start(name, paths, fingerprint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                 dist=dist, log=log, epochs=epochs)
    writer = _tensorboard(name, paths, run.start_epoch) if dist.is_main else None
    try:
        for epoch in range(run.start_epoch, epochs + 1):
            seed_epoch(seed, epoch)
            began = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch}
            row.update({f"train_{key}": float(value) for key, value in train_one_epoch(epoch).items()})
            row["seconds"] = time.perf_counter() - began
            _step_scheduler(scheduler, row["train_loss"])
            if dist.is_main:
                checkpoint = dict(model_args=model_args, fingerprint=fingerprint, **metadata,
                                  scheduler=scheduler.state_dict() if scheduler is not None else None,
                                  scaler=scaler.state_dict() if scaler is not None else None)
                improved = _end_epoch(run, row, model=model, optimizer=optimizer, validate=validate, select=select,
                                      paths=paths, checkpoint=checkpoint,
                                      validating=epoch % validate_every == 0 or epoch == epochs)
                _log_tensorboard(writer, row)
                log(_epoch_line(name, row, epochs, improved))
            barrier()
    finally:
        if writer is not None:
            writer.close()
    if dist.is_main and run.history:  # also when a finished run was resumed and DVC removed the curves
        write_curves(paths.curves, run.history)
    return RunResult(history=run.history, best_epoch=int(run.best["epoch"]), resumed_from=run.start_epoch - 1,
                     seconds=sum(row.get("seconds", 0.0) for row in run.history))


def predict_test(
    *,
    name: str,
    model: nn.Module,
    predict: Predict,
    test_videos: Sequence[str],
    classes: Sequence[str],
    paths: RunPaths,
    result: RunResult,
    describe: Callable[[nn.Module], dict[str, Any]],
    device: torch.device,
) -> dict[str, Any]:
    """Load ``best.pt`` into ``model``, write the test videos' ``probs.h5`` and ``model.json``; returns the latter.

    ``model.json`` holds the model's name, ``describe(model)`` (parameters, FLOPs per frame, what the backbone
    was initialised from, the settings of the run), the selected epoch and its validation scores.
    """
    predictions = claim_output_dir(paths.predictions, owner=_owner(name))
    best = load_checkpoint(paths.checkpoints / "best.pt", map_location=device)
    network = unwrap_model(model)
    network.load_state_dict(best["model"])
    network.eval()
    probabilities = predict(network, list(test_videos))
    best_row = next((row for row in result.history if row["epoch"] == best["epoch"]), {})
    summary = {
        "model": name,
        **describe(network),
        "best_epoch": int(best["epoch"]),
        **{f"val_{key}": best_row.get(f"val_{key}") for key in VALIDATION_KEYS},
        "model_args": best["model_args"],
    }
    with predictions.replace(["probs.h5", "model.json"]) as staged:
        write_probabilities(staged["probs.h5"], probabilities, classes=classes, model=name)
        write_json(staged["model.json"], summary)
    return summary
