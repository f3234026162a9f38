"""Process groups: one process, or several under ``torchrun`` (NCCL on GPUs, Gloo on CPUs).

Every entry point calls :func:`setup_distributed` once; without torchrun's environment it is a single process
and every helper here is a no-op, so the same code runs both ways.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

from etesvs.errors import EtesvsError

T_item = TypeVar("T_item")


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
    except ValueError:
        raise EtesvsError(f"environment variable {name}={value!r} is not an integer") from None


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables (or with WORLD_SIZE=1) nothing is initialised and a single-process DistInfo is
    returned. The device is CUDA (the local rank's GPU) when available, else the CPU.
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


def is_initialized() -> bool:
    """True inside a multi-process run."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all processes in place (no-op in a single process); returns it."""
    if is_initialized():
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
    return values


def shard(items: Sequence[T_item], rank: int, world_size: int) -> list[T_item]:
    """The items of this rank: every ``world_size``-th item starting at ``rank`` (all items when world_size is 1)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world of size {world_size}")
    return list(items[rank::world_size])
