"""The end-to-end streaming segmentation model (ETESVS): MobileNetV2 + ConvLSTM memory + temporal-convolution head.

A video is seen as a stream of windows of ``T`` frames (after subsampling by the dataset's sample rate). For every
window the model

1. runs the frames through ``torchvision.models.mobilenet_v2(...).features`` (optionally with a TSM-style temporal
   shift between the frames of the window),
2. reduces the 1280-channel feature map with a 1x1 convolution and feeds it, frame by frame, to a ConvLSTM whose
   state is carried from one window to the next of the same video (the memory),
3. pools the reduced features and the memory's hidden state over space and labels every frame with a dilated TCN
   of one or more stages (MS-TCN's refinement: each later stage reads the softmax of the one before), either
   window-local (``head="tcn"``), or with a cache of the previous windows' last frames so that outputs at the
   start of a window see the past: causal (``head="causal_tcn"``) or centred (``head="cached_tcn"``: a frame also
   sees the rest of its window, which the stream has read before it labels the window).

State crosses windows only through the explicit :class:`StreamState` returned by ``forward`` and passed back in;
it is returned detached, so gradients never flow into a previous window (truncated back-propagation through
time), and memory does not grow with the length of the video.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

from etesvs.errors import EtesvsError
from etesvs.io import load_weights_file
from etesvs.models.mstcn import MultiStageTCN

HEADS = ("tcn", "causal_tcn", "cached_tcn")
NORMS = ("batch", "frozen_batch", "group")


class StreamState(NamedTuple):
    """What the model remembers between two windows of the same videos (B rows, one per video).

    Attributes:
        hidden: (B, M, h, w) ConvLSTM hidden state.
        cell: (B, M, h, w) ConvLSTM cell state.
        head_inputs: (B, D, K) inputs of the causal head at the last K frames seen (K = 0 for the window-local head).
        head_mask: (B, K) bool, True where ``head_inputs`` holds a real frame of the current video.
        last_logits: (S, B, C) logits of every head stage at the last frame seen (what the smoothing loss compares
            the next window's first frame with).
        last_mask: (B,) bool, True where ``last_logits`` holds a real frame of the current video.
        shift_carry: (B, D) what the backbone's temporal shifts pass forward in time from the last frame seen (see
            :func:`run_backbone`); D = 0 when nothing is carried (no shift across windows, or no frame seen yet).
            Zeros are the same as nothing: the first frame of a video sees zeros before it.
    """

    hidden: torch.Tensor
    cell: torch.Tensor
    head_inputs: torch.Tensor
    head_mask: torch.Tensor
    last_logits: torch.Tensor
    last_mask: torch.Tensor
    shift_carry: torch.Tensor

    def detach(self) -> "StreamState":
        return StreamState(*(tensor.detach() for tensor in self))

    def reset(self, rows: torch.Tensor) -> "StreamState":
        """Forget everything for the rows where ``rows`` (B,) bool is True (the first window of a new video)."""
        keep = (~rows).to(self.hidden.dtype)
        return StreamState(
            hidden=self.hidden * keep[:, None, None, None],
            cell=self.cell * keep[:, None, None, None],
            head_inputs=self.head_inputs * keep.to(self.head_inputs.dtype)[:, None, None],
            head_mask=self.head_mask & ~rows[:, None],
            last_logits=self.last_logits * keep.to(self.last_logits.dtype)[None, :, None],
            last_mask=self.last_mask & ~rows,
            shift_carry=self.shift_carry * keep.to(self.shift_carry.dtype)[:, None],
        )


def temporal_shift(
    x: torch.Tensor, num_frames: int, divisor: int, *, valid: torch.Tensor | None = None,
    before: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shift 1/divisor of the channels one frame forward in time and 1/divisor one frame backward (TSM).

    Frames outside the clip are zeros, except that ``before`` can give what the clip's first frame receives from the
    frame before it (the last frame of the previous window of the same video).

    Args:
        x: (N * num_frames, C, H, W), the frames of N clips one after the other.
        valid: (N * num_frames,) bool, the real frames (None: all); a padding frame passes zeros to its neighbours.
        before: (N, C/divisor, H, W), channels [0, C/divisor) of the frame before each clip (None: zeros).

    Returns:
        Same shape; channels [0, C/d) of frame t come from frame t - 1, channels [C/d, 2C/d) from frame t + 1.
    """
    total, channels = x.shape[:2]
    clips = x.unflatten(0, (total // num_frames, num_frames))  # (N*T, C, H, W) -> (N, T, C, H, W), any memory format
    fold = channels // divisor
    source = clips[:, :, : 2 * fold]
    if valid is not None:
        source = source * valid.view(*clips.shape[:2], 1, 1, 1).to(source.dtype)
    shifted = torch.empty_like(clips)
    shifted[:, 1:, :fold] = source[:, :-1, :fold]
    shifted[:, :1, :fold] = 0 if before is None else before[:, None].to(shifted.dtype)
    shifted[:, :-1, fold : 2 * fold] = source[:, 1:, fold : 2 * fold]
    shifted[:, -1:, fold : 2 * fold] = 0
    shifted[:, :, 2 * fold :] = clips[:, :, 2 * fold :]
    return shifted.flatten(0, 1)  # (N, T, C, H, W) -> (N*T, C, H, W)


# oneDNN differentiates a 3x3 depthwise convolution very slowly on feature maps of at most 2 x 2 pixels (the last
# stage of a MobileNetV2 fed 48 x 48 frames, as in the demo): 15 ms per call on 256 frames, against under 1 ms for
# 3 x 3 maps, so 17 % of a MobileNetV2 pretraining step. Such maps are computed as below in training on the CPU.
SMALL_MAP_PIXELS = 4


def small_map_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 3x3 depthwise convolution (stride 1, zero padding 1) of a small map, as a product per channel.

    Each output pixel is a weighted sum of the input pixels within one pixel of it, so with P = H * W pixels the
    convolution is a (P, P) matrix per channel, built from the 3x3 kernel. Equal to ``F.conv2d(x, weight, bias,
    padding=1, groups=C)`` up to rounding, and quick to differentiate for small P (P * P products per pixel
    instead of 9).

    Args:
        x: (N, C, H, W), any memory format; weight: (C, 1, 3, 3); bias: (C,) or None.

    Returns:
        (N, C, H, W), channels-last.
    """
    n, c, h, w = x.shape
    pixel = torch.arange(h * w, device=x.device)
    rows = (pixel // w)[None, :] - (pixel // w)[:, None] + 1  # (P out, P in): the tap's row in the kernel
    cols = (pixel % w)[None, :] - (pixel % w)[:, None] + 1
    inside = ((rows >= 0) & (rows <= 2) & (cols >= 0) & (cols <= 2)).to(weight.dtype)
    taps = rows.clamp(0, 2) * 3 + cols.clamp(0, 2)
    matrix = (weight.reshape(c, 9)[:, taps] * inside).permute(1, 2, 0)  # (C, P out, P in) -> (P out, P in, C)
    pixels = x.permute(0, 2, 3, 1).reshape(n, 1, h * w, c)  # (N, C, H, W) -> (N, 1, P in, C)
    out = (pixels * matrix).sum(dim=2)  # (N, P out, C)
    if bias is not None:
        out = out + bias
    return out.view(n, h, w, c).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W), channels-last


class SmallMapDepthwiseConv2d(nn.Conv2d):
    """A 3x3 depthwise ``nn.Conv2d`` (stride 1, padding 1) that in training on the CPU computes maps of at most
    ``SMALL_MAP_PIXELS`` pixels with :func:`small_map_depthwise`; otherwise, and in eval mode (so also for FLOP
    counts and inference), the convolution itself. Same parameters and state dict as the ``nn.Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type == "cpu" and x.shape[-2] * x.shape[-1] <= SMALL_MAP_PIXELS:
            return small_map_depthwise(x, self.weight, self.bias)
        return super().forward(x)


def use_small_map_depthwise(module: nn.Module) -> int:
    """Make every 3x3 depthwise convolution (stride 1, zero padding 1) in ``module`` a
    :class:`SmallMapDepthwiseConv2d`, in place (parameters, state dict and hooks unchanged); returns how many."""
    count = 0
    for conv in module.modules():
        if (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels > 1
                and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
                and conv.dilation == (1, 1) and conv.padding_mode == "zeros"):
            conv.__class__ = SmallMapDepthwiseConv2d
            count += 1
    return count


def run_backbone(
    backbone: nn.Sequential, frames: torch.Tensor, *, num_frames: int, shift_divisor: int, stem_shift: bool,
    valid: torch.Tensor | None = None, previous: torch.Tensor | None = None, last: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MobileNetV2 ``features`` on clips of ``num_frames`` frames, with TSM's residual temporal shift of
    1/``shift_divisor`` of the channels each way (0: no shift), and with ``stem_shift`` a plain shift of the stem's
    output before the first inverted residual block.

    Shapes: (N * T, 3, H, W) -> (N * T, C, H/32, W/32). The frames run channels-last (NHWC, converted here when
    they are not), as the backbones' weights are: oneDNN's and cuDNN's depthwise convolutions are much faster so.

    Args:
        valid: (N * T,) bool, the real frames (None: all); padding frames pass zeros through the shifts.
        previous: (N, D), what every shift passes forward in time from the frame before each clip, as this function
            returned it (``carry``) for the previous window of the same video; None or D = 0: zeros (no such frame).
        last: (N,) long, the frame of each clip whose forward-shifted channels to return as ``carry`` (None: none).

    Returns:
        ``(features, carry)``: carry (N, D) holds, for every shift in order, channels [0, C/shift_divisor) of its
        input at frame ``last`` of each clip, flattened (None when ``last`` is None).
    """
    x = frames.contiguous(memory_format=torch.channels_last)
    if previous is not None and previous.shape[1] == 0:
        previous = None
    carried, offset = [], 0

    def shift(x: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        clips = x.unflatten(0, (x.shape[0] // num_frames, num_frames))  # (N*T, C, H, W) -> (N, T, C, H, W)
        fold = x.shape[1] // shift_divisor
        before = None
        if previous is not None:
            size = fold * x.shape[2] * x.shape[3]
            if offset + size > previous.shape[1]:
                raise ValueError(f"the carried shift state has {previous.shape[1]} values per clip, too few for "
                                 f"frames of {tuple(frames.shape[2:])}")
            before = previous[:, offset : offset + size].view(clips.shape[0], fold, *x.shape[2:])
            offset += size
        if last is not None:
            rows = torch.arange(clips.shape[0], device=x.device)
            carried.append(clips[rows, last, :fold].flatten(1))  # (N, fold, H, W) -> (N, fold*H*W)
        return temporal_shift(x, num_frames, shift_divisor, valid=valid, before=before)

    for index, layer in enumerate(backbone):
        if shift_divisor and stem_shift and index == 1:
            x = layer(shift(x))
        elif shift_divisor and isinstance(layer, InvertedResidual) and layer.use_res_connect:
            # TSM's residual shift: the shortcut keeps the frame's own features, the branch mixes in its neighbours.
            x = x + layer.conv(shift(x))
        else:
            x = layer(x)
    if previous is not None and offset != previous.shape[1]:
        raise ValueError(f"the carried shift state has {previous.shape[1]} values per clip, the shifts take {offset}")
    if last is None:
        return x, None
    carry = torch.cat(carried, dim=1) if carried else x.new_zeros(len(last), 0)
    return x, carry


def last_real_frame(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real frame in a window mask (B, T) whose real frames come first (0 if none)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask).argmax(dim=1)


def _group_norm(channels: int) -> nn.GroupNorm:
    # Channel counts of MobileNetV2 are multiples of 8 at every width; gcd keeps odd widths working too.
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class ConvLSTMCell(nn.Module):
    """A convolutional LSTM cell: the four gates come from one 3x3 convolution of ``[input, hidden]``."""

    def __init__(self, *, input_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.gates = nn.Conv2d(
            input_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2
        )
        with torch.no_grad():  # forget gate starts open, so the memory is kept from the start of training
            self.gates.bias.zero_()
            self.gates.bias[hidden_channels : 2 * hidden_channels].fill_(1.0)

    def forward(
        self, x: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: x (B, I, h, w), hidden and cell (B, M, h, w) -> new hidden and cell (B, M, h, w)."""
        gates = self.gates(torch.cat([x, hidden], dim=1))
        input_gate, forget_gate, output_gate, candidate = gates.chunk(4, dim=1)  # (B, 4M, h, w) -> 4 x (B, M, h, w)
        cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
        hidden = torch.sigmoid(output_gate) * torch.tanh(cell)
        return hidden, cell


class StreamingSegmenter(nn.Module):
    """ETESVS: a per-frame action segmenter that reads a video window by window.

    forward(frames (B, T, 3, H, W) float normalised, mask (B, T) bool, state, reset (B,) bool) ->
    (outputs, new_state) with outputs ``"head_logits"`` (B, C, T), ``"memory_logits"`` (B, C, T) and
    ``"backbone_logits"`` (B, C), the mean over the window's valid frames of a per-frame classifier on the backbone.

    Args:
        num_classes: C.
        width_mult: MobileNetV2 width multiplier (1.0 to load ImageNet weights).
        temporal_shift: insert a temporal shift in the residual branch of MobileNetV2's residual blocks.
        shift_divisor: with ``temporal_shift``, 1/shift_divisor of the channels move one frame forward in time and
            1/shift_divisor one frame backward (TSM: 8).
        shift_across_windows: with ``temporal_shift``, the first frame of a window receives the shifted channels of
            the last frame of the window before (carried in the state, as online TSM does) instead of zeros; the
            last frame of a window still receives zeros from the frame after it.
        stem_shift: with ``temporal_shift``, also shift the stem's output (in place, TSM's plain variant) before the
            first inverted residual block, so frame differences can form at half resolution: at narrow widths the
            residual blocks shift only a channel or two each way.
        memory_channels: M, channels of the reduced feature map and of the ConvLSTM.
        head: ``"tcn"`` (dilated TCN over the window only), ``"causal_tcn"`` (causal, sees previous windows: its
            output equals a causal pass over the whole video) or ``"cached_tcn"`` (centred taps over the previous
            windows' last frames and the current window: a frame sees its past and the rest of its window, and
            zeros after the window's end, as the window-local head does).
        head_stages: stages of the head (1: a single-stage TCN, as the ETESVS authors' head; more: MS-TCN's
            refinement stages, each reading the softmax of the stage before).
        head_layers: dilated layers of each head stage (dilations 1, 2, ..., 2**(head_layers - 1)).
        head_channels: feature maps of the head.
        dropout: dropout of the head's layers.
        norm: ``"batch"`` (MobileNetV2's BatchNorm), ``"frozen_batch"`` (the same layers and state dict, but their
            running statistics stay those of the pretrained weights: the BatchNorm layers are always in eval mode,
            their affine parameters are trained; the usual way to fine-tune on small batches) or ``"group"``
            (GroupNorm: statistics per frame, so a batch
            split across processes gives exactly the single-process result).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        width_mult: float,
        temporal_shift: bool,
        shift_divisor: int,
        shift_across_windows: bool,
        stem_shift: bool,
        memory_channels: int,
        head: str,
        head_stages: int,
        head_layers: int,
        head_channels: int,
        dropout: float,
        norm: str,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        norm_layer = _group_norm if norm == "group" else nn.BatchNorm2d
        self.frozen_norm = norm == "frozen_batch"
        mobilenet = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult, norm_layer=norm_layer)
        # Channels-last (NHWC): oneDNN and cuDNN convolve it faster; on the demo's 2 cores a training epoch takes
        # 9% less (MobileNetV2's depthwise convolutions). State dicts are the same either way.
        self.backbone = mobilenet.features.to(memory_format=torch.channels_last)
        use_small_map_depthwise(self.backbone)
        self.temporal_shift = temporal_shift
        self.shift_divisor = shift_divisor
        self.shift_across_windows = shift_across_windows
        self.stem_shift = stem_shift
        self.causal = head == "causal_tcn"
        self.cached_head = head in ("causal_tcn", "cached_tcn")
        backbone_channels = self.backbone[-1].out_channels
        self.backbone_classifier = nn.Linear(backbone_channels, num_classes)
        self.reduce = nn.Sequential(nn.Conv2d(backbone_channels, memory_channels, kernel_size=1), nn.ReLU(inplace=True))
        self.memory = ConvLSTMCell(input_channels=memory_channels, hidden_channels=memory_channels)
        self.memory_classifier = nn.Linear(memory_channels, num_classes)
        self.head = MultiStageTCN(
            in_channels=2 * memory_channels,
            num_classes=num_classes,
            num_stages=head_stages,
            num_layers=head_layers,
            num_feature_maps=head_channels,
            dropout=dropout,
            causal=self.causal,
        )
        # A cached head needs the frames of its input that the first frame of a window reaches back to: all of the
        # receptive field but the frame itself for a causal head, half of it for a centred one.
        reach = self.head.receptive_field - 1
        self.head_cache_frames = (reach if self.causal else reach // 2) if self.cached_head else 0

    def train(self, mode: bool = True) -> "StreamingSegmenter":
        """Set training mode; with ``norm="frozen_batch"`` the backbone's BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.frozen_norm:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def backbone_features(
        self, frames: torch.Tensor, num_frames: int, *, valid: torch.Tensor | None = None,
        previous: torch.Tensor | None = None, last: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MobileNetV2 features of clips of ``num_frames`` frames, (N * T, 3, H, W) -> (N * T, 1280, H/32, W/32),
        and the shifts' carry (see :func:`run_backbone`; None unless ``last`` is given)."""
        shift = self.shift_divisor if self.temporal_shift else 0
        return run_backbone(self.backbone, frames, num_frames=num_frames, shift_divisor=shift,
                            stem_shift=self.stem_shift, valid=valid, previous=previous, last=last)

    def initial_state(self, batch_size: int, feature_size: tuple[int, int], *, device=None, dtype=None) -> StreamState:
        """The state at the start of a video: all zeros, an empty head cache."""
        channels = self.memory.hidden_channels
        zeros = torch.zeros(batch_size, channels, *feature_size, device=device, dtype=dtype)
        head_inputs = torch.zeros(batch_size, 2 * channels, self.head_cache_frames, device=device, dtype=dtype)
        head_mask = torch.zeros(batch_size, self.head_cache_frames, dtype=torch.bool, device=device)
        stages, classes = len(self.head.stages), self.head.stages[-1].conv_out.out_channels
        last_logits = torch.zeros(stages, batch_size, classes, device=device, dtype=dtype)
        last_mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
        shift_carry = torch.zeros(batch_size, 0, device=device, dtype=dtype)
        return StreamState(zeros, zeros.clone(), head_inputs, head_mask, last_logits, last_mask, shift_carry)

    def _backbone_pass(
        self, frames: torch.Tensor, mask: torch.Tensor, carry: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backbone features (B, T, 1280, h, w) of a window's frames, the window-mean backbone logits (B, C) and the
        shifts' carry (B, D) after the window (D = 0 without shift across windows), given ``carry`` before it (B, D')
        or None (used only with shift across windows)."""
        batch_size, num_frames = frames.shape[:2]
        # Whatever a padding frame holds must not reach the real frames: its input is zeroed, and the temporal
        # shifts pass zeros from it (its features are not zero: BatchNorm's shift and the biases).
        valid = None
        if not bool(mask.all()):
            frames = frames * mask[:, :, None, None, None].to(frames.dtype)
            valid = mask
        # Rows whose video has ended carry no frame: skip their backbone pass. At least one row always runs, so
        # that every parameter takes part in the graph (DistributedDataParallel needs that on every rank).
        rows = mask.any(dim=1).nonzero().squeeze(1)
        if rows.numel() == 0:
            rows = torch.zeros(1, dtype=torch.long, device=frames.device)
        every_row = rows.numel() == batch_size

        def select(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return tensor if tensor is None or every_row else tensor.index_select(0, rows)

        carrying = self.temporal_shift and self.shift_across_windows
        if not carrying:
            carry = None
        last = last_real_frame(mask) if carrying else None  # (B,)
        active_valid = select(valid)
        features, new_carry = self.backbone_features(
            select(frames).flatten(0, 1), num_frames, valid=None if active_valid is None else active_valid.flatten(),
            previous=select(carry), last=select(last),
        )  # (B' * T, 3, H, W) -> (B' * T, C, h, w), carry (B', D)
        features = features.unflatten(0, (len(rows), num_frames))  # (B'*T, ...) -> (B', T, ...)
        if not every_row:
            features = features.new_zeros(batch_size, *features.shape[1:]).index_copy(0, rows, features)
        if new_carry is None:
            new_carry = features.new_zeros(batch_size, 0)
        else:  # rows without a real frame in this window keep what they carried (zeros: nothing)
            seen = mask.any(dim=1)
            kept = features.new_zeros(batch_size, new_carry.shape[1])
            if carry is not None and carry.shape[1] == new_carry.shape[1]:
                kept = carry.to(kept.dtype)
            new_carry = torch.where(seen[:, None], kept.index_copy(0, rows, new_carry.to(kept.dtype)), kept)
        frame_mask = mask.to(features.dtype)
        frame_scores = self.backbone_classifier(features.mean(dim=(3, 4)))  # (B, T, 1280, h, w) -> (B, T, C)
        valid_counts = frame_mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
        return features, (frame_scores * frame_mask[:, :, None]).sum(dim=1) / valid_counts, new_carry

    def _memory_pass(self, reduced: torch.Tensor, mask: torch.Tensor, state: StreamState) -> tuple[torch.Tensor, ...]:
        """Run the ConvLSTM over the window's frames (B, T, M, h, w); padding frames leave the memory as it was.

        Returns the pooled hidden state of every frame (B, T, M) and the final hidden and cell (B, M, h, w).
        """
        hidden, cell = state.hidden.to(reduced.dtype), state.cell.to(reduced.dtype)
        hidden_per_frame = []
        for t in range(reduced.shape[1]):
            new_hidden, new_cell = self.memory(reduced[:, t], hidden, cell)
            keep = mask[:, t, None, None, None]
            hidden = torch.where(keep, new_hidden, hidden)
            cell = torch.where(keep, new_cell, cell)
            hidden_per_frame.append(hidden.mean(dim=(2, 3)))  # (B, M, h, w) -> (B, M)
        return torch.stack(hidden_per_frame, dim=1), hidden, cell  # T x (B, M) -> (B, T, M)

    def _head_pass(self, head_inputs: torch.Tensor, mask: torch.Tensor, state: StreamState) -> tuple[torch.Tensor, ...]:
        """Every head stage's logits (S, B, C, T) of the window's inputs (B, 2M, T), and the head cache to carry on."""
        num_frames = head_inputs.shape[2]
        if not self.cached_head:
            return self.head(head_inputs, mask[:, None, :].to(head_inputs.dtype)), state.head_inputs, state.head_mask
        sequence = torch.cat([state.head_inputs.to(head_inputs.dtype), head_inputs], dim=2)  # (B, 2M, K + T)
        sequence_mask = torch.cat([state.head_mask, mask], dim=1)  # (B, K + T)
        logits = self.head(sequence, sequence_mask[:, None, :].to(sequence.dtype))[..., -num_frames:]  # (S, B, C, T)
        cache = self.head_cache_frames
        return logits, sequence[:, :, sequence.shape[2] - cache :], sequence_mask[:, sequence_mask.shape[1] - cache :]

    @staticmethod
    def _last_frame(logits: torch.Tensor, mask: torch.Tensor, state: StreamState) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage logits (S, B, C) at each row's last real frame so far, and whether there is one (B,)."""
        seen = mask.any(dim=1)  # (B,)
        last = last_real_frame(mask)  # (B,)
        index = last[None, :, None, None].expand(logits.shape[0], -1, logits.shape[2], 1)  # (S, B, C, 1)
        current = logits.gather(3, index).squeeze(3)  # (S, B, C, T) -> (S, B, C)
        kept = torch.where(seen[None, :, None], current, state.last_logits.to(current.dtype))
        return kept, state.last_mask | seen

    def forward(
        self,
        frames: torch.Tensor,
        mask: torch.Tensor,
        state: StreamState | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], StreamState]:
        """Label one window of B videos.

        Args:
            frames: (B, T, 3, H, W) float, normalised; padding frames are ignored.
            mask: (B, T) bool, True on the window's real frames.
            state: the state returned for the previous window of the same videos, or None at their start.
            reset: (B,) bool, True for rows whose video starts with this window (their state is cleared).

        Returns:
            ``{"head_logits": (B, C, T), "memory_logits": (B, C, T), "backbone_logits": (B, C)}`` (zero on padding
            frames and on rows without frames; ``head_logits`` is the last head stage's), ``"stage_logits"``
            (S, B, C, T) of every head stage, ``"previous_logits"`` (S, B, C) and ``"previous_mask"`` (B,) bool:
            the stages' logits at the frame before the window, where the video has one (detached, for the
            smoothing loss across windows); and the new state, detached from the graph.
        """
        batch_size, num_frames = frames.shape[:2]
        mask = mask.to(torch.bool)
        if state is not None:
            state = state.detach()
            if reset is not None:
                state = state.reset(reset.to(device=frames.device, dtype=torch.bool))
        carry = None if state is None else state.shift_carry
        features, backbone_logits, shift_carry = self._backbone_pass(frames, mask, carry)
        reduced = self.reduce(features.flatten(0, 1))  # (B*T, 1280, h, w) -> (B*T, M, h, w)
        reduced = reduced.unflatten(0, (batch_size, num_frames))  # (B*T, M, h, w) -> (B, T, M, h, w)
        if state is None:  # the start of the videos: nothing to reset
            state = self.initial_state(batch_size, tuple(features.shape[3:]), device=frames.device, dtype=reduced.dtype)
        memory_features, hidden, cell = self._memory_pass(reduced, mask, state)
        frame_mask = mask.to(features.dtype)
        memory_logits = self.memory_classifier(memory_features) * frame_mask[:, :, None]  # (B, T, C)
        head_inputs = torch.cat([reduced.mean(dim=(3, 4)), memory_features], dim=2)  # (B, T, 2M)
        head_inputs = head_inputs.transpose(1, 2) * frame_mask[:, None, :]  # (B, T, 2M) -> (B, 2M, T)
        stage_logits, cache_inputs, cache_mask = self._head_pass(head_inputs, mask, state)
        last_logits, last_mask = self._last_frame(stage_logits, mask, state)
        outputs = {
            "head_logits": stage_logits[-1],
            "stage_logits": stage_logits,
            "previous_logits": state.last_logits.to(stage_logits.dtype),
            "previous_mask": state.last_mask,
            "memory_logits": memory_logits.transpose(1, 2),  # (B, T, C) -> (B, C, T)
            "backbone_logits": backbone_logits,
        }
        new_state = StreamState(hidden, cell, cache_inputs, cache_mask, last_logits, last_mask, shift_carry)
        return outputs, new_state.detach()


def _backbone_tensors(state: dict, source: str, model: StreamingSegmenter) -> dict:
    """The MobileNetV2 ``features`` tensors of a state dict, named as ``model.backbone`` names them.

    torchvision's layout (``features.*``) is taken by name. mmcls / mmaction2 MobileNetV2 and TSM checkpoints (the
    ETESVS authors' ImageNet and Kinetics weights, ``backbone.*``) hold the same tensors in the same order, so they
    are taken by order, every shape checked. Other keys (classifier, cls_head) are ignored.
    """
    features = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
    if features:
        return features
    theirs = [(key, value) for key, value in state.items() if key.startswith("backbone.")]
    ours = list(model.backbone.state_dict().items())
    if not theirs:
        raise EtesvsError(f"{source}: neither 'features.*' (torchvision) nor 'backbone.*' (mmcls, mmaction2) keys: "
                          "not a MobileNetV2 state dict")
    if len(theirs) != len(ours):
        raise EtesvsError(f"{source}: {len(theirs)} backbone tensors, the MobileNetV2 backbone has {len(ours)} "
                          "(ImageNet weights need width_mult 1.0 and norm 'batch')")
    for (their_key, value), (our_key, expected) in zip(theirs, ours):
        if tuple(value.shape) != tuple(expected.shape):
            raise EtesvsError(f"{source}: {their_key} has shape {tuple(value.shape)} where the backbone's {our_key} "
                              f"has {tuple(expected.shape)} (ImageNet weights need width_mult 1.0 and norm 'batch')")
    return {our_key: value for (our_key, _), (_, value) in zip(ours, theirs)}


def load_pretrained_backbone(model: StreamingSegmenter, source: str) -> str:
    """Load pretrained weights into ``model.backbone``; returns a description of where they came from.

    ``source`` is ``""`` (keep the random initialisation), ``"torchvision"`` (torchvision's
    ``MobileNet_V2_Weights.IMAGENET1K_V1``, downloaded once into torch's cache) or the path of a MobileNetV2 state
    dict: torchvision's (``features.*``), or an mmcls / mmaction2 MobileNetV2 or TSM checkpoint (``backbone.*``, see
    :func:`_backbone_tensors`), read with :func:`etesvs.io.load_weights_file` (plain weights only). Raises
    :class:`EtesvsError` when the weights can't be had or don't fit.
    """
    if not source:
        return "random initialisation"
    if source == "torchvision":
        weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as error:  # no network, proxy, full disk: all mean "not available here"
            raise EtesvsError(
                f"torchvision MobileNetV2 ImageNet weights could not be downloaded ({type(error).__name__}: {error}); "
                "give the path of a local state dict as the pretrained source, or leave it empty for random init"
            ) from None
        origin = f"torchvision {weights}"
    else:
        state = load_weights_file(Path(source), what="MobileNetV2 weights file")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        origin = str(source)
    if not isinstance(state, dict):
        raise EtesvsError(f"{source}: pretrained weights are not a state dict")
    try:
        model.backbone.load_state_dict(_backbone_tensors(state, source, model), strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[1:2] or [str(error)]
        raise EtesvsError(
            f"{source}: weights do not fit the backbone (ImageNet weights need width_mult 1.0 and norm 'batch'): "
            f"{first[0].strip()}"
        ) from None
    return origin


def prepare_for_inference(model: StreamingSegmenter) -> StreamingSegmenter:
    """Make ``model`` faster for inference, in place, and return it (in eval mode).

    Every BatchNorm that follows a convolution is folded into it (its running statistics become the convolution's
    weights and bias), and the rest of the network runs channels-last too (the backbone always does). The outputs
    equal those of the model in eval mode up to rounding. Not for training: the folded statistics are frozen.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
                    setattr(module, norm_name, nn.Identity())
    model.to(memory_format=torch.channels_last)
    return model


class WindowLogits(nn.Module):
    """The head's logits of one window from scratch, ``(frames, mask) -> (B, C, T)``: what FLOP counters trace."""

    def __init__(self, model: StreamingSegmenter) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.model(frames, mask)
        return outputs["head_logits"]
