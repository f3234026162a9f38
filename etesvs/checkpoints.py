"""Self-describing checkpoints: ``{"model", "optimizer", "epoch", "model_args", ...}`` written atomically and read
with ``torch.load(..., weights_only=True)``, so a model can be rebuilt from the file alone and a file from
elsewhere can hold no code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from etesvs.errors import EtesvsError
from etesvs.io import atomic_path, load_weights_file


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
    """Write ``{"model", "optimizer", "epoch", "model_args", **extra}`` atomically (temporary file, then rename).

    ``model_args`` and ``extra`` must be plain Python values (numbers, strings, lists, dicts) or tensors, so that
    :func:`load_checkpoint` can read them with ``weights_only=True``.
    """
    path = Path(path)
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
    """Read a checkpoint written by :func:`save_checkpoint` (:func:`etesvs.io.load_weights_file`: plain weights only)."""
    path = Path(path)
    state = load_weights_file(path, what="checkpoint", map_location=map_location)
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise EtesvsError(f"{path}: not an etesvs checkpoint (missing 'model' or 'epoch')")
    return state
