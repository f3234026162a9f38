"""Process-group helpers: sharding and the single-process set-up."""

from __future__ import annotations

import pytest
import torch

from etesvs.distributed import all_reduce_sum, setup_distributed, shard
from etesvs.errors import EtesvsError


def test_shard_and_single_process_setup(monkeypatch):
    assert shard(list("abcde"), 0, 2) == ["a", "c", "e"]
    assert shard(list("abcde"), 1, 2) == ["b", "d"]
    assert shard(list("abc"), 0, 1) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        shard([1], 2, 2)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = setup_distributed()
    assert (info.rank, info.world_size, info.is_distributed, info.is_main) == (0, 1, False, True)
    torch.testing.assert_close(all_reduce_sum(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(EtesvsError, match="WORLD_SIZE"):
        setup_distributed()
