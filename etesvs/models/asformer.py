"""ASFormer (Yi et al., BMVC 2021): a transformer for action segmentation with local windowed attention.

Each block is a dilated-convolution feed-forward followed by attention restricted to a window whose size grows
with the layer (2**i, the same as the dilation), so early layers attend locally and later ones widely. The encoder
classifies frames; each decoder refines the previous stage, attending with queries and keys from its own features
and the previous stage's features and taking values from the previous stage's features.

Masking differs from the published code on purpose. Its sliding-window attention builds the per-query window
mask with ``window_mask[:, :, i:i + bl] = 1`` (a ``:`` where the row index ``i`` belongs), so the mask is all
ones: every query of a block sees the whole block plus both halos instead of its own window, and how far a query
looks ahead then depends on where it sits in its block. Its instance norm also pools statistics over padding frames.
Both make a frame's output depend on padding when videos of different lengths are batched. Here each query t
attends exactly to the valid keys in [t - w//2, t - w//2 + w) (w the window size), and the norm uses valid frames
only, so the outputs on valid frames are the same with or without trailing padding.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def masked_instance_norm(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalise each channel of each sequence to zero mean, unit variance over its valid frames.

    Args:
        x: (B, C, T).
        mask: (B, 1, T) float, 1 on valid frames.

    Returns:
        (B, C, T), zero on padding frames.
    """
    # Sums over long videos overflow float16, so statistics are taken in float32 even under autocast.
    values, mask32 = x.float(), mask.float()
    count = mask32.sum(dim=2, keepdim=True).clamp(min=1.0)  # (B, 1, 1)
    mean = (values * mask32).sum(dim=2, keepdim=True) / count
    centred = (values - mean) * mask32
    variance = centred.pow(2).sum(dim=2, keepdim=True) / count
    return (centred / torch.sqrt(variance + eps)).to(x.dtype)


def window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """Scaled dot-product attention where query t sees the valid keys in [t - window//2, t - window//2 + window).

    Queries are processed in blocks of ``window`` frames; each block reads one strip of keys that covers the
    windows of all its queries, so memory grows as T x window rather than T x T.

    Args:
        query: (B, Cq, T), key: (B, Cq, T), value: (B, Cv, T).
        mask: (B, 1, T) float, 1 on valid frames.
        window: window size w >= 1.

    Returns:
        (B, Cv, T), zero for padding queries.
    """
    batch, query_channels, length = query.shape
    value_channels = value.shape[1]
    half = window // 2
    num_blocks = math.ceil(length / window)
    tail = num_blocks * window - length
    strip = window + 2 * half  # keys read by one block of queries

    def strips(x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (half, tail + half))  # (B, C, T) -> (B, C, half + num_blocks*w + half)
        return padded.unfold(2, strip, window)  # -> (B, C, num_blocks, strip)

    blocks_q = F.pad(query, (0, tail)).reshape(batch, query_channels, num_blocks, window)  # (B, Cq, nb, w)
    blocks_k = strips(key)  # (B, Cq, nb, strip)
    blocks_v = strips(value)  # (B, Cv, nb, strip)
    key_valid = strips(mask) > 0.5  # (B, 1, nb, strip)

    scores = torch.einsum("bcnq,bcnk->bnqk", blocks_q, blocks_k) / math.sqrt(query_channels)  # (B, nb, w, strip)
    # Query i of a block sits at strip position i + half, so its window is strip positions [i, i + w).
    position = torch.arange(strip, device=query.device)
    row = torch.arange(window, device=query.device)[:, None]
    in_window = (position[None, :] >= row) & (position[None, :] < row + window)  # (w, strip)
    allowed = in_window[None, None] & key_valid[:, 0, :, None, :]  # (B, nb, w, strip)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    # A padding query may have no allowed key at all; zeroing after the softmax keeps it finite (it is masked later).
    weights = F.softmax(scores, dim=-1) * allowed.to(scores.dtype)
    out = torch.einsum("bnqk,bcnk->bcnq", weights, blocks_v)  # (B, Cv, nb, w)
    out = out.reshape(batch, value_channels, num_blocks * window)[:, :, :length]  # (B, Cv, nb, w) -> (B, Cv, T)
    return out * mask


class AttentionBlock(nn.Module):
    """Dilated-conv feed-forward, masked instance norm, windowed (self- or cross-) attention, 1x1 conv, residual.

    forward(x (B, F, T), mask (B, 1, T), context (B, F, T) or None) -> (B, F, T). Without ``context`` this is
    self-attention; with it, queries and keys come from [norm(feed-forward(x)), context] and values from context.
    """

    def __init__(
        self,
        *,
        dilation: int,
        channels: int,
        cross: bool = False,
        alpha: float = 1.0,
        dropout: float,
        reduction: int = 2,
    ) -> None:
        super().__init__()
        self.dilation = dilation
        self.cross = cross
        self.alpha = alpha
        self.feed_forward = nn.Conv1d(channels, channels, kernel_size=3, padding=dilation, dilation=dilation)
        query_in = 2 * channels if cross else channels
        reduced = max(channels // reduction, 1)
        self.query = nn.Conv1d(query_in, reduced, kernel_size=1)
        self.key = nn.Conv1d(query_in, reduced, kernel_size=1)
        self.value = nn.Conv1d(channels, reduced, kernel_size=1)
        self.attention_out = nn.Conv1d(reduced, channels, kernel_size=1)
        self.conv_1x1 = nn.Conv1d(channels, channels, kernel_size=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, F, T) -> (B, F, T), padding frames zero; ``x`` and ``context`` must be zero on padding."""
        hidden = F.relu(self.feed_forward(x))
        normed = masked_instance_norm(hidden, mask)
        if self.cross:
            if context is None:
                raise ValueError("a cross-attention block needs the previous stage's features as context")
            query_source = torch.cat([normed, context], dim=1)  # (B, 2F, T)
            value_source = context
        else:
            query_source = value_source = normed
        attended = window_attention(
            self.query(query_source), self.key(query_source), self.value(value_source), mask, self.dilation
        )
        attended = self.attention_out(F.relu(attended)) * mask
        out = self.dropout(self.conv_1x1(self.alpha * attended + hidden))
        return (x + out) * mask


class _Stage(nn.Module):
    """Input projection, ``num_layers`` attention blocks with windows 1, 2, ..., 2**(num_layers-1), classifier."""

    def __init__(
        self, *, in_channels: int, num_classes: int, num_layers: int, num_feature_maps: int, cross: bool,
        alpha: float, dropout: float,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv1d(in_channels, num_feature_maps, kernel_size=1)
        self.blocks = nn.ModuleList(
            AttentionBlock(dilation=2**i, channels=num_feature_maps, cross=cross, alpha=alpha, dropout=dropout)
            for i in range(num_layers)
        )
        self.conv_out = nn.Conv1d(num_feature_maps, num_classes, kernel_size=1)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in_channels, T) -> (logits (B, num_classes, T), features (B, num_feature_maps, T))."""
        features = self.conv_in(x) * mask
        for block in self.blocks:
            features = block(features, mask, context)
        return self.conv_out(features) * mask, features


class ASFormer(nn.Module):
    """ASFormer encoder + ``num_decoders`` decoders.

    forward(x (B, in_channels, T), mask (B, 1, T)) -> logits (1 + num_decoders, B, num_classes, T), zero on padding.
    Decoder d weights its attention by exp(-3 d) as in the paper, so later decoders lean on their convolutions.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_layers: int,
        num_feature_maps: int,
        num_decoders: int,
        dropout: float,
        channel_dropout: float,
    ) -> None:
        super().__init__()
        self.channel_dropout = nn.Dropout1d(channel_dropout)
        sizes = dict(num_classes=num_classes, num_layers=num_layers, num_feature_maps=num_feature_maps,
                     dropout=dropout)
        self.encoder = _Stage(in_channels=in_channels, cross=False, alpha=1.0, **sizes)
        self.decoders = nn.ModuleList(
            _Stage(in_channels=num_classes, cross=True, alpha=math.exp(-3.0 * d), **sizes)
            for d in range(num_decoders)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, T), (B, 1, T) -> (1 + num_decoders, B, num_classes, T) logits."""
        mask = mask.to(x.dtype)
        logits, features = self.encoder(self.channel_dropout(x), mask)
        outputs = [logits]
        for decoder in self.decoders:
            logits, features = decoder(F.softmax(logits, dim=1) * mask, mask, features)
            outputs.append(logits)
        return torch.stack(outputs, dim=0)  # S x (B, C, T) -> (S, B, C, T)

    def probabilities(self, output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final per-frame class probabilities (B, num_classes, T) from the output of forward()."""
        return F.softmax(output[-1].float(), dim=1) * mask.to(torch.float32)
