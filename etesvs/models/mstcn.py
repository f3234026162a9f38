"""MS-TCN (Farha and Gall, CVPR 2019): a prediction stage followed by refinement stages over class probabilities."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from etesvs.models.tcn import SingleStageTCN


class MultiStageTCN(nn.Module):
    """Stacked single-stage TCNs; stage ``s > 1`` refines the softmax of stage ``s - 1``.

    forward(x (B, in_channels, T), mask (B, 1, T)) -> logits (num_stages, B, num_classes, T), zero on padding.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_stages: int,
        num_layers: int,
        num_feature_maps: int,
        dropout: float,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        stage_args = dict(num_classes=num_classes, num_layers=num_layers, num_feature_maps=num_feature_maps,
                          dropout=dropout, causal=causal)
        self.stages = nn.ModuleList(
            [SingleStageTCN(in_channels=in_channels, **stage_args)]
            + [SingleStageTCN(in_channels=num_classes, **stage_args) for _ in range(num_stages - 1)]
        )

    @property
    def receptive_field(self) -> int:
        """Number of input frames that one output of the last stage can see (causal: past frames and itself)."""
        return 1 + sum(stage.stack.receptive_field - 1 for stage in self.stages)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, T), (B, 1, T) -> (num_stages, B, num_classes, T) logits."""
        mask = mask.to(x.dtype)
        logits = self.stages[0](x, mask)
        outputs = [logits]
        for stage in self.stages[1:]:
            logits = stage(F.softmax(logits, dim=1) * mask, mask)
            outputs.append(logits)
        return torch.stack(outputs, dim=0)  # S x (B, C, T) -> (S, B, C, T)

    def probabilities(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final per-frame class probabilities (B, num_classes, T) from the output of forward()."""
        return F.softmax(output[-1].float(), dim=1) * mask.to(torch.float32)
