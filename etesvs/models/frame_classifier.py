"""Per-frame classifier without temporal context: the floor that the temporal models must beat."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FrameClassifier(nn.Module):
    """A two-layer MLP applied to every frame independently (1x1 convolutions over time).

    forward(x (B, in_channels, T), mask (B, 1, T)) -> logits (B, num_classes, T), zero on padding.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_feature_maps: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.hidden = nn.Conv1d(in_channels, num_feature_maps, kernel_size=1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv1d(num_feature_maps, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, T), (B, 1, T) -> (B, num_classes, T) logits."""
        hidden = self.dropout(F.relu(self.hidden(x)))
        return self.classifier(hidden) * mask.to(x.dtype)

    def probabilities(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-frame class probabilities (B, num_classes, T) from the output of forward()."""
        return F.softmax(output.float(), dim=1) * mask.to(torch.float32)
