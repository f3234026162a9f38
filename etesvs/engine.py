"""Training and inference loops, checkpoints, seeding and distributed set-up.

The generic helpers at the top (checkpoints, seeds, DDP) are shared with the streaming model's engine.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from etesvs.errors import EtesvsError
from etesvs.io import atomic_path
from etesvs.losses import ASRFLoss, SegmentationLoss
from etesvs.metrics.segmentation import f1_counts, f1_from_counts
from etesvs.models.asformer import ASFormer
from etesvs.models.asrf import ActionSegmentRefinementFramework
from etesvs.models.frame_classifier import FrameClassifier
from etesvs.models.mstcn import MultiStageTCN

T_item = TypeVar("T_item")


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (or ``model`` itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    model_args: dict[str, Any],
    **extra: Any,
) -> None:
    """Write a self-describing checkpoint atomically (temporary file in the same directory, then rename).

    The file holds ``{"model": state_dict, "optimizer": state_dict | None, "epoch": int, "model_args": dict,
    **extra}``. ``model_args`` and ``extra`` must be plain Python values (numbers, strings, lists, dicts) or
    tensors, so that :func:`load_checkpoint` can read them with ``weights_only=True``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "model_args": dict(model_args),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``torch.load(..., weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise EtesvsError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise EtesvsError(f"{path}: cannot read checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise EtesvsError(f"{path}: not an etesvs checkpoint (missing 'model' or 'epoch')")
    return state


# --------------------------------------------------------------------------------------------------------------
# Seeds and distributed set-up
# --------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); returns a torch Generator seeded with ``seed`` for DataLoaders."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool

    @property
    def is_main(self) -> bool:
        """True on the process that writes outputs (rank 0)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as error:
        raise EtesvsError(f"environment variable {name}={value!r} is not an integer") from error


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables (or with WORLD_SIZE=1) nothing is initialised and a single-process DistInfo is
    returned. The backend is NCCL when CUDA is available, Gloo otherwise.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    is_distributed = world_size > 1
    if is_distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                    is_distributed=is_distributed)


def cleanup_distributed() -> None:
    """Destroy the process group if :func:`setup_distributed` created one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard(items: Sequence[T_item], rank: int, world_size: int) -> list[T_item]:
    """The items of this rank: every ``world_size``-th item starting at ``rank`` (all items when world_size is 1)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world of size {world_size}")
    return list(items[rank::world_size])


# --------------------------------------------------------------------------------------------------------------
# Models and losses by name (strings become objects here, and only here)
# --------------------------------------------------------------------------------------------------------------

MODELS: dict[str, type[nn.Module]] = {
    "mstcn": MultiStageTCN,
    "asrf": ActionSegmentRefinementFramework,
    "asformer": ASFormer,
    "frame_classifier": FrameClassifier,
}


def build_model(name: str, model_args: dict[str, Any]) -> nn.Module:
    """Instantiate ``MODELS[name](**model_args)``; every model has forward(x, mask) and probabilities(output, mask)."""
    if name not in MODELS:
        raise EtesvsError(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
    return MODELS[name](**model_args)


def build_loss(
    name: str,
    *,
    smoothing_weight: float = 0.15,
    class_weights: Sequence[float] | None = None,
    boundary_pos_weight: float = 1.0,
    boundary_weight: float = 0.1,
    similarity_sigma: float = 1.0,
) -> nn.Module:
    """The training loss of model ``name``, called as ``loss_fn(output, batch) -> {"loss": ..., ...}``.

    MS-TCN and ASFormer: cross-entropy + ``smoothing_weight`` x T-MSE per stage. ASRF: class-weighted
    cross-entropy + GS-TMSE + ``boundary_weight`` x boundary BCE (``class_weights`` and ``boundary_pos_weight``
    come from the training split). The frame classifier, the no-context floor, gets plain cross-entropy.
    """
    if name not in MODELS:
        raise EtesvsError(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
    if name == "asrf":
        return ASRFLoss(
            class_weights=class_weights,
            boundary_pos_weight=boundary_pos_weight,
            smoothing_weight=smoothing_weight,
            boundary_weight=boundary_weight,
            similarity_sigma=similarity_sigma,
        )
    if name == "frame_classifier":
        return SegmentationLoss(smoothing_weight=0.0)
    return SegmentationLoss(smoothing_weight=smoothing_weight)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in unwrap_model(model).parameters() if p.requires_grad)


def flops_per_frame(model: nn.Module, *, in_channels: int, length: int = 256) -> float:
    """FLOPs per input frame of forward() (fvcore, one multiply-add = 1 FLOP) on zeros of shape (1, D, length)."""
    with warnings.catch_warnings():  # fvcore's import trips torch.jit deprecation warnings
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis  # slow import, only needed here

    model = unwrap_model(model)
    parameter = next(model.parameters())
    x = torch.zeros(1, in_channels, length, dtype=parameter.dtype, device=parameter.device)
    mask = torch.ones(1, 1, length, dtype=parameter.dtype, device=parameter.device)
    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, (x, mask))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            total = float(analysis.total())
    finally:
        model.train(was_training)
    return total / length


# --------------------------------------------------------------------------------------------------------------
# Training and inference loops
# --------------------------------------------------------------------------------------------------------------


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(device: torch.device):
    """Mixed precision on CUDA, a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


class _MetricAccumulator:
    """Sums of loss, correct frames and F1@50 counts over batches (and over ranks in DDP)."""

    def __init__(self, background_ids: Sequence[int]) -> None:
        self.background_ids = tuple(background_ids)
        self.loss_sum = 0.0
        self.num_sequences = 0
        self.correct = 0
        self.num_frames = 0
        self.f1_counts = np.zeros(3, dtype=np.int64)

    def update(self, loss: float, probabilities: torch.Tensor, batch: dict[str, Any]) -> None:
        predictions = probabilities.argmax(dim=1).cpu().numpy()  # (B, C, T) -> (B, T)
        labels = batch["labels"].cpu().numpy()
        lengths = batch["mask"].sum(dim=1).cpu().numpy()
        self.loss_sum += loss * len(lengths)
        self.num_sequences += len(lengths)
        for prediction, truth, length in zip(predictions, labels, lengths):
            prediction, truth = prediction[:length], truth[:length]
            self.correct += int(np.count_nonzero(prediction == truth))
            self.num_frames += int(length)
            self.f1_counts += f1_counts(prediction, truth, (0.5,), self.background_ids)[0]

    def result(self, device: torch.device) -> dict[str, float]:
        totals = torch.tensor(
            [self.loss_sum, self.num_sequences, self.correct, self.num_frames, *self.f1_counts.tolist()],
            dtype=torch.float64,
            device=device,
        )
        loss_sum, num_sequences, correct, num_frames, *counts = _all_reduce_sum(totals).tolist()
        return {
            "loss": loss_sum / max(num_sequences, 1.0),
            "acc": 100.0 * correct / max(num_frames, 1.0),
            "f1_50": float(f1_from_counts(np.asarray(counts))),
        }


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    background_ids: Sequence[int] = (),
) -> dict[str, float]:
    """One pass over ``loader`` (collated feature batches). Returns mean ``loss``, frame ``acc`` and ``f1_50``
    (percent, at the model's frame rate, from the training-mode predictions)."""
    model.train()
    metrics = _MetricAccumulator(background_ids)
    for batch in loader:
        batch = _to_device(batch, device)
        mask = batch["mask"][:, None, :].float()  # (B, T) -> (B, 1, T)
        with _autocast(device):
            output = model(batch["features"], mask)
        losses = loss_fn(output, batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            losses["loss"].backward()
            optimizer.step()
        with torch.no_grad():
            probabilities = unwrap_model(model).probabilities(output, mask)
        metrics.update(float(losses["loss"].detach()), probabilities, batch)
    return metrics.result(device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    loss_fn: nn.Module,
    *,
    device: torch.device,
    background_ids: Sequence[int] = (),
) -> dict[str, float]:
    """Mean ``loss``, frame ``acc`` and ``f1_50`` (percent, at the model's frame rate) in eval mode."""
    model.eval()
    metrics = _MetricAccumulator(background_ids)
    for batch in loader:
        batch = _to_device(batch, device)
        mask = batch["mask"][:, None, :].float()  # (B, T) -> (B, 1, T)
        with _autocast(device):
            output = model(batch["features"], mask)
        losses = loss_fn(output, batch)
        probabilities = unwrap_model(model).probabilities(output, mask)
        metrics.update(float(losses["loss"]), probabilities, batch)
    return metrics.result(device)


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
        with _autocast(device):
            output = model(batch["features"], mask)
        probabilities = unwrap_model(model).probabilities(output, mask)  # (B, C, T')
        lengths = batch["mask"].sum(dim=1).tolist()
        for item, video in enumerate(batch["video"]):
            valid = probabilities[item, :, : lengths[item]]
            full = upsample(valid, sample_rate, int(batch["num_frames"][item]))  # (C, T)
            results[video] = full.transpose(0, 1).float().cpu().numpy()  # (C, T) -> (T, C)
    return results


# --------------------------------------------------------------------------------------------------------------
# The epoch loop with checkpoint selection and resume
# --------------------------------------------------------------------------------------------------------------


def selection_score(metrics: dict[str, float]) -> float:
    """Score used to pick the best checkpoint: mean of frame accuracy and F1@50 (both percent)."""
    return 0.5 * (metrics["acc"] + metrics["f1_50"])


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` leaves behind: per-epoch metric rows and the selected epoch."""

    history: list[dict[str, float]]
    best_epoch: int
    best_score: float
    resumed_from: int


def _plain_config(config: dict[str, Any]) -> dict[str, Any]:
    # Same value whether freshly built or read back from a checkpoint (tuples -> lists, numpy -> Python).
    def plain(value: Any) -> Any:
        return value.tolist() if hasattr(value, "tolist") else str(value)

    return json.loads(json.dumps(config, default=plain))


def fit(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    train_loader: Iterable[dict[str, Any]],
    val_loader: Iterable[dict[str, Any]] | None,
    epochs: int,
    checkpoint_dir: str | os.PathLike,
    model_name: str,
    model_args: dict[str, Any],
    config: dict[str, Any],
    device: torch.device,
    background_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    is_main: bool = True,
    on_epoch_end: Callable[[list[dict[str, float]]], None] | None = None,
) -> FitResult:
    """Train for ``epochs`` epochs in total, resuming from ``checkpoint_dir/last.pt`` when it matches.

    Every epoch writes ``last.pt`` (model, optimizer, epoch, history, RNG states) and, when the validation
    :func:`selection_score` improves, ``best.pt`` (on the main process only). A ``last.pt`` is resumed only if
    its ``model_name`` and ``config`` (model arguments, training numbers, data) equal the current ones;
    otherwise training starts afresh. Without ``val_loader`` the last epoch is the best one.

    ``on_epoch_end(history)`` is called on the main process after each epoch with all rows so far (resumed
    ones included); a row holds ``epoch`` and ``train_``/``val_`` ``loss``, ``acc``, ``f1_50``.
    ``generator`` is the training DataLoader's shuffling generator: its state is checkpointed so that an
    interrupted and resumed run sees the same batches as an uninterrupted one.
    """
    checkpoint_dir = Path(checkpoint_dir)
    last_path, best_path = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    config = _plain_config({"model_args": model_args, **config})
    history: list[dict[str, float]] = []
    best_score, best_epoch, start_epoch = -math.inf, 0, 0
    if last_path.is_file():
        state = load_checkpoint(last_path, map_location=device)
        if state.get("model_name") == model_name and state.get("config") == config:
            unwrap_model(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_epoch = int(state["epoch"])
            history = list(state.get("history", []))
            best_score, best_epoch = float(state.get("best_score", -math.inf)), int(state.get("best_epoch", 0))
            rng = state.get("rng") or {}
            if "torch" in rng:
                torch.set_rng_state(rng["torch"])
            if generator is not None and "loader" in rng:
                generator.set_state(rng["loader"])
            if is_main:
                print(f"resuming {model_name} from {last_path} at epoch {start_epoch}", file=sys.stderr)
        elif is_main:
            print(f"{last_path}: checkpoint of a different configuration, training from scratch", file=sys.stderr)
    progress = tqdm(range(start_epoch, epochs), desc=f"train {model_name}", disable=not is_main,
                    initial=start_epoch, total=epochs, dynamic_ncols=True)
    for epoch in progress:
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(model, train_loader, loss_fn, optimizer, device=device, scaler=scaler,
                                        background_ids=background_ids)
        row: dict[str, float] = {"epoch": epoch + 1}
        row.update({f"train_{key}": value for key, value in train_metrics.items()})
        if val_loader is not None:
            val_metrics = evaluate(model, val_loader, loss_fn, device=device, background_ids=background_ids)
            row.update({f"val_{key}": value for key, value in val_metrics.items()})
            score = selection_score(val_metrics)
        else:
            score = float(epoch)  # no validation data: the latest epoch wins
        history.append(row)
        improved = score > best_score
        if improved:
            best_score, best_epoch = score, epoch + 1
        if is_main:
            extra = dict(model_name=model_name, config=config, history=history, best_score=best_score,
                         best_epoch=best_epoch, scaler=scaler.state_dict() if scaler is not None else None,
                         rng={"torch": torch.get_rng_state(),
                              **({"loader": generator.get_state()} if generator is not None else {})})
            if improved:
                save_checkpoint(best_path, model=model, optimizer=optimizer, epoch=epoch + 1,
                                model_args=model_args, **extra)
            save_checkpoint(last_path, model=model, optimizer=optimizer, epoch=epoch + 1, model_args=model_args,
                            **extra)
            if on_epoch_end is not None:
                on_epoch_end(history)
        progress.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row.get('val_acc', float('nan')):.1f}")
    return FitResult(history=history, best_epoch=best_epoch, best_score=best_score, resumed_from=start_epoch)
