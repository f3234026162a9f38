"""ASFormer (Yi et al., BMVC 2021): a transformer for action segmentation with local windowed attention.

Each block is a dilated-convolution feed-forward followed by attention restricted to a window whose size grows
with the layer (2**i, the same as the dilation), so early layers attend locally and later ones widely. The encoder
classifies frames; each decoder refines the previous stage. As in the published code (ChinaYi/ASFormer
``model.py``), a decoder block takes its queries and keys from its own normalised features and its values from the
previous stage's features (``decoder_query_key="own"``; ``"concat"`` reads queries and keys from [own features,
previous stage's features], this project's earlier variant).

Masking differs from the published code on purpose (``attention_mask="exact"``). Its sliding-window attention
builds the per-query window mask with ``window_mask[:, :, i:i + bl] = 1`` (a ``:`` where the row index ``i``
belongs), so every query of a block sees the whole strip of 2 bl keys around its block except the last one instead
of its own window, and how far a query looks ahead depends on where it sits in its block; and it masks softly,
adding log(mask + 1e-6) before the softmax and multiplying by the mask after it, so masked keys still take a
little of the softmax's mass. ``attention_mask="published"`` reproduces both. Its instance norm also pools
statistics over padding frames (it only runs at batch size 1, where there is none). Here each query t attends
exactly to the valid keys in [t - w//2, t - w//2 + w) (w the window size), and the norm uses valid frames only, so
the outputs on valid frames are the same with or without trailing padding.
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


ATTENTION_MASKS = ("exact", "published")
_PUBLISHED_MASK_FLOOR = 1e-6
"""The published code adds log(mask + 1e-6) to the attention scores: a masked key keeps a weight of about 1e-6."""


def _window_mask(window: int, strip: int, rule: str, device: torch.device) -> torch.Tensor:
    """(window, strip) bool: the strip positions each query of a block may attend to.

    Query i of a block sits at strip position i + window//2, so its exact window is strip positions [i, i + w);
    the published mask gives every query positions [0, 2 w - 1) (the union of all the rows' windows).
    """
    if rule not in ATTENTION_MASKS:
        raise ValueError(f"attention_mask must be exact or published, got {rule!r}")
    position = torch.arange(strip, device=device)[None, :]
    row = torch.arange(window, device=device)[:, None]
    if rule == "published":
        return (position < 2 * window - 1).expand(window, strip)
    return (position >= row) & (position < row + window)


def window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    window: int,
    *,
    rule: str,
) -> torch.Tensor:
    """Scaled dot-product attention where query t sees the valid keys in [t - window//2, t - window//2 + window).

    Queries are processed in blocks of ``window`` frames; each block reads one strip of keys that covers the
    windows of all its queries, so memory grows as T x window rather than T x T. ``rule="published"`` is the
    published code's attention instead: every query of a block sees strip positions [0, 2 w - 1) (its window
    mask bug), and disallowed keys are masked softly (log(allowed + 1e-6) added before the softmax, weights
    multiplied by ``allowed`` after it, without renormalising).

    Args:
        query: (B, Cq, T), key: (B, Cq, T), value: (B, Cv, T).
        mask: (B, 1, T) float, 1 on valid frames.
        window: window size w >= 1.
        rule: ``"exact"`` or ``"published"``.

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
    in_window = _window_mask(window, strip, rule, query.device)  # (w, strip)
    allowed = in_window[None, None] & key_valid[:, 0, :, None, :]  # (B, nb, w, strip)
    if rule == "published":
        scores = scores + torch.log(allowed.to(scores.dtype) + _PUBLISHED_MASK_FLOOR)
    else:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    # A padding query may have no allowed key at all; zeroing after the softmax keeps it finite (it is masked later).
    weights = F.softmax(scores, dim=-1) * allowed.to(scores.dtype)
    out = torch.einsum("bnqk,bcnk->bcnq", weights, blocks_v)  # (B, Cv, nb, w)
    out = out.reshape(batch, value_channels, num_blocks * window)[:, :, :length]  # (B, Cv, nb, w) -> (B, Cv, T)
    return out * mask


class AttentionBlock(nn.Module):
    """Dilated-conv feed-forward, masked instance norm, windowed (self- or cross-) attention, 1x1 conv, residual.

    forward(x (B, F, T), mask (B, 1, T), context (B, F, T) or None) -> (B, F, T). Without ``cross`` this is
    self-attention on norm(feed-forward(x)); with it, values come from ``context`` (the previous stage's features)
    and queries and keys from norm(feed-forward(x)) (``query_key="own"``, as published) or from
    [norm(feed-forward(x)), context] (``"concat"``).
    """

    def __init__(
        self,
        *,
        dilation: int,
        channels: int,
        cross: bool = False,
        alpha: float = 1.0,
        dropout: float,
        query_key: str,
        attention_mask: str,
        reduction: int = 2,
    ) -> None:
        super().__init__()
        if query_key not in ("own", "concat"):
            raise ValueError(f"decoder_query_key must be own or concat, got {query_key!r}")
        self.dilation = dilation
        self.cross = cross
        self.concat = cross and query_key == "concat"
        self.alpha = alpha
        self.attention_mask = attention_mask
        self.feed_forward = nn.Conv1d(channels, channels, kernel_size=3, padding=dilation, dilation=dilation)
        query_in = 2 * channels if self.concat else channels
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
        query_source = value_source = normed
        if self.cross:
            if context is None:
                raise ValueError("a cross-attention block needs the previous stage's features as context")
            value_source = context
            if self.concat:
                query_source = torch.cat([normed, context], dim=1)  # (B, 2F, T)
        attended = window_attention(self.query(query_source), self.key(query_source), self.value(value_source),
                                    mask, self.dilation, rule=self.attention_mask)
        attended = self.attention_out(F.relu(attended)) * mask
        out = self.dropout(self.conv_1x1(self.alpha * attended + hidden))
        return (x + out) * mask


class _Stage(nn.Module):
    """Input projection, ``num_layers`` attention blocks with windows 1, 2, ..., 2**(num_layers-1), classifier."""

    def __init__(
        self, *, in_channels: int, num_classes: int, num_layers: int, num_feature_maps: int, cross: bool,
        alpha: float, dropout: float, query_key: str, attention_mask: str,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv1d(in_channels, num_feature_maps, kernel_size=1)
        self.blocks = nn.ModuleList(
            AttentionBlock(dilation=2**i, channels=num_feature_maps, cross=cross, alpha=alpha, dropout=dropout,
                           query_key=query_key, attention_mask=attention_mask)
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
    ``decoder_query_key`` and ``attention_mask``: see the module docstring.
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
        decoder_query_key: str,
        attention_mask: str,
    ) -> None:
        super().__init__()
        self.channel_dropout = nn.Dropout1d(channel_dropout)
        sizes = dict(num_classes=num_classes, num_layers=num_layers, num_feature_maps=num_feature_maps,
                     dropout=dropout, query_key=decoder_query_key, attention_mask=attention_mask)
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
