"""Self-describing checkpoints: round trip, atomic writes, one-line errors."""

from __future__ import annotations

import pytest
import torch

from etesvs.checkpoints import load_checkpoint, save_checkpoint
from etesvs.errors import EtesvsError
from etesvs.models.mstcn import MultiStageTCN

ARGS = dict(in_channels=3, num_classes=2, num_stages=2, num_layers=2, num_feature_maps=4, dropout=0.5)


def test_checkpoint_round_trip_is_self_describing(tmp_path):
    model = MultiStageTCN(**ARGS)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint(path, model=model, optimizer=optimizer, epoch=3, model_args=ARGS, model_name="mstcn",
                    best={"epoch": 2, "score": 0.5})
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["model_name"] == "mstcn" and state["best"]["score"] == 0.5
    rebuilt = MultiStageTCN(**state["model_args"])
    rebuilt.load_state_dict(state["model"])
    for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a, b)


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(EtesvsError, match="missing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(EtesvsError, match="broken.pt: truncated or not a PyTorch checkpoint$"):
        load_checkpoint(broken)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(EtesvsError, match="foreign.pt: not an etesvs checkpoint"):
        load_checkpoint(foreign)
