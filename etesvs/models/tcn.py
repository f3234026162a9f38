"""Temporal-convolution blocks shared by MS-TCN, ASRF and the streaming head.

Every block works on channel-first sequences ``(B, C, T)`` and takes a float mask ``(B, 1, T)`` that is 1 on
valid frames and 0 on padding. The blocks keep padding positions at exactly zero, so that a padded frame looks
like the zero padding of the convolution itself: valid outputs do not depend on how much padding follows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DilatedResidualLayer(nn.Module):
    """Dilated 3-tap convolution, ReLU, 1x1 convolution, dropout and a residual connection.

    With ``causal=True`` the 3 taps cover frames ``t - 2d, t - d, t`` (padding on the left only), so the output at
    frame ``t`` never depends on later frames; otherwise the taps are ``t - d, t, t + d``.
    """

    def __init__(self, *, dilation: int, channels: int, dropout: float, causal: bool = False) -> None:
        super().__init__()
        if dilation < 1:
            raise ValueError(f"dilation must be >= 1, got {dilation}")
        self.dilation = dilation
        self.causal = causal
        # Causal layers pad by hand in forward(); centred ones let the convolution pad both sides.
        self.conv_dilated = nn.Conv1d(
            channels, channels, kernel_size=3, dilation=dilation, padding=0 if causal else dilation
        )
        self.conv_1x1 = nn.Conv1d(channels, channels, kernel_size=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Map ``x`` (B, C, T) to (B, C, T); ``mask`` (B, 1, T) zeroes padding frames of the result.

        ``x`` is expected to be zero on padding frames already (every block here keeps it so).
        """
        if self.causal:
            x_in = F.pad(x, (2 * self.dilation, 0))  # (B, C, T) -> (B, C, 2d + T)
        else:
            x_in = x
        out = F.relu(self.conv_dilated(x_in))
        out = self.dropout(self.conv_1x1(out))
        return (x + out) * mask


class DilatedStack(nn.Module):
    """``num_layers`` dilated residual layers with dilations 1, 2, 4, ..., 2**(num_layers - 1)."""

    def __init__(self, *, channels: int, num_layers: int, dropout: float, causal: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DilatedResidualLayer(dilation=2**i, channels=channels, dropout=dropout, causal=causal)
            for i in range(num_layers)
        )

    @property
    def receptive_field(self) -> int:
        """Number of input frames that one output frame can see (for causal stacks: past frames and itself)."""
        return 1 + sum(2 * layer.dilation for layer in self.layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, T), padding frames zero."""
        for layer in self.layers:
            x = layer(x, mask)
        return x


class SingleStageTCN(nn.Module):
    """One MS-TCN stage: 1x1 input projection, a dilated residual stack and a 1x1 classifier.

    forward(x (B, in_channels, T), mask (B, 1, T) float) -> logits (B, num_classes, T), zero on padding frames.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_layers: int,
        num_feature_maps: int,
        dropout: float,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv1d(in_channels, num_feature_maps, kernel_size=1)
        self.stack = DilatedStack(channels=num_feature_maps, num_layers=num_layers, dropout=dropout, causal=causal)
        self.conv_out = nn.Conv1d(num_feature_maps, num_classes, kernel_size=1)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Hidden features before the classifier: (B, in_channels, T) -> (B, num_feature_maps, T)."""
        mask = mask.to(x.dtype)
        # Zero padding frames right after the projection: its bias would otherwise leak into valid frames.
        hidden = self.conv_in(x) * mask
        return self.stack(hidden, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, T), (B, 1, T) -> logits (B, num_classes, T)."""
        mask = mask.to(x.dtype)
        return self.conv_out(self.encode(x, mask)) * mask
