"""I3D: Inception-v1 inflated to 3D (Carreira & Zisserman, 2017), the RGB stream as trained on Kinetics.

The module produces the 1024-channel ``Mixed_5c`` features used by MS-TCN, ASRF and ASFormer. Its
parameter names follow the widely shared pytorch-i3d checkpoints (``rgb_imagenet.pt``):
``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.running_mean``, ``Mixed_3b.b0.conv3d.weight``,
``Mixed_3b.b1a...``, ``Mixed_3b.b1b...``, ``b2a``, ``b2b``, ``b3b`` and ``logits.conv3d.{weight,bias}``, so such a
file loads with :func:`load_i3d_weights` (the classifier keys are dropped when ``num_classes`` is None).

Padding is TensorFlow's "SAME": the output of a layer with stride ``s`` has ``ceil(n / s)`` positions and any
input size works. Stride-1 layers have odd kernels, so their padding is symmetric and is given to the
convolution itself; only the strided layers pad by hand, as their padding depends on the input size.

Sizes: time shrinks by 8 (``Conv3d_1a`` and the pools ``4a`` and ``5a`` have temporal stride 2), space by 32.
The receptive field of one ``Mixed_5c`` position is 99 frames and 379 x 379 pixels (nominal, before padding).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from etesvs.errors import EtesvsError
from etesvs.io import load_weights_file

FEATURE_DIM = 1024
"""Channels of ``Mixed_5c`` at full width: the length of one I3D RGB feature vector (``feature_dim`` otherwise)."""

TEMPORAL_STRIDE = 8
"""Input frames per ``Mixed_5c`` time step."""

TEMPORAL_CENTER_OFFSET = 5
"""``Mixed_5c`` step j of a clip whose length is a multiple of 8 is centred on frame ``8 * j + 5``.

Not 8j + 3.5 because the strided layers pad asymmetrically ("SAME" puts the odd padding at the back):
``Conv3d_1a`` (k7 s2) centres output i on input 2i + 1, ``MaxPool3d_4a`` (k3 s2) on 2i + 1 and
``MaxPool3d_5a`` (k2 s2) on 2i + 0.5; composed, 2 * (2 * (2j + 0.5) + 1) + 1 = 8j + 5.
"""


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"expected 3 values (time, height, width), got {value}")
    return value  # type: ignore[return-value]


def same_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """TF "SAME" padding for a (T, H, W) input as an ``F.pad`` tuple (W_front, W_back, H_..., T_...).

    The total padding along a dimension makes the output ``ceil(n / s)`` long; an odd total puts the extra
    element at the back, as TensorFlow does.
    """
    pads: list[int] = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride)):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class Unit3D(nn.Module):
    """Conv3d, then BatchNorm3d (eps 1e-3 as in the TF original) and ReLU, with "SAME" padding.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: (kT, kH, kW) or one int.
        stride: (sT, sH, sW) or one int.
        use_batch_norm: add ``bn`` (the classifier layer has none).
        use_bias: bias in the convolution (only without batch norm).
        activation: apply ReLU.

    Shapes: (B, C_in, T, H, W) -> (B, C_out, ceil(T/sT), ceil(H/sH), ceil(W/sW)).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 1,
        stride: int | Sequence[int] = 1,
        use_batch_norm: bool = True,
        use_bias: bool = False,
        activation: bool = True,
    ):
        super().__init__()
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        self.strided = any(s > 1 for s in self.stride)
        if not self.strided and any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"stride-1 layers need odd kernels for symmetric SAME padding, got {self.kernel_size}")
        static_padding = (0, 0, 0) if self.strided else tuple((k - 1) // 2 for k in self.kernel_size)
        self.conv3d = nn.Conv3d(
            in_channels, out_channels, self.kernel_size, stride=self.stride, padding=static_padding, bias=use_bias
        )
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if use_batch_norm else None
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strided:
            x = F.pad(x, same_padding(x.shape[-3:], self.kernel_size, self.stride))
        x = self.conv3d(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    """3-D max pooling with "SAME" padding: (B, C, T, H, W) -> (B, C, ceil(T/sT), ceil(H/sH), ceil(W/sW)).

    Padding is with zeros, which equals TensorFlow's (padding ignored by the max) because every pool in I3D
    follows a ReLU, so its input is never negative.
    """

    def __init__(self, *, kernel_size: int | Sequence[int], stride: int | Sequence[int]):
        super().__init__()
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, same_padding(x.shape[-3:], self.kernel_size, self.stride))
        return F.max_pool3d(x, self.kernel_size, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated on channels.

    ``b0``: 1x1x1; ``b1a`` 1x1x1 then ``b1b`` 3x3x3; ``b2a`` 1x1x1 then ``b2b`` 3x3x3; a 3x3x3 max pool then
    ``b3b`` 1x1x1. ``out_channels`` lists (b0, b1a, b1b, b2a, b2b, b3b) as in the original code.

    Shapes: (B, in_channels, T, H, W) -> (B, b0 + b1b + b2b + b3b, T, H, W).
    """

    def __init__(self, *, in_channels: int, out_channels: Sequence[int]):
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3b = out_channels
        self.b0 = Unit3D(in_channels=in_channels, out_channels=c0, kernel_size=1)
        self.b1a = Unit3D(in_channels=in_channels, out_channels=c1a, kernel_size=1)
        self.b1b = Unit3D(in_channels=c1a, out_channels=c1b, kernel_size=3)
        self.b2a = Unit3D(in_channels=in_channels, out_channels=c2a, kernel_size=1)
        self.b2b = Unit3D(in_channels=c2a, out_channels=c2b, kernel_size=3)
        # Stride 1, so the SAME padding is symmetric; -inf padding (MaxPool3d's) equals zero padding here.
        self.b3a = nn.MaxPool3d(kernel_size=3, stride=1, padding=1)
        self.b3b = Unit3D(in_channels=in_channels, out_channels=c3b, kernel_size=1)
        self.out_channels = c0 + c1b + c2b + c3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, in_channels, (b0, b1a, b1b, b2a, b2b, b3b)) of the inception modules, in order.
_INCEPTION_SPECS = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


def scaled_channels(channels: int, width_mult: float) -> int:
    """A channel count of the full-width network scaled by ``width_mult`` (at least 4)."""
    return max(4, int(round(channels * width_mult)))


class InceptionI3d(nn.Module):
    """Inception-v1 I3D up to ``Mixed_5c``, with an optional Kinetics-style classifier.

    Args:
        in_channels: 3 for RGB (2 for optical flow).
        num_classes: classes of the ``logits`` layer (400 for Kinetics), or None for a feature extractor
            without it.
        width_mult: every channel count of every layer scaled by this factor (1.0: the published network).
            Parameter names stay those of pytorch-i3d, only shapes change, so a narrow network's weights are
            saved and loaded like ``rgb_imagenet.pt`` (:func:`checkpoint_width_mult` reads the factor back).

    ``forward`` takes clips scaled to [-1, 1], (B, in_channels, T, H, W), and returns spatially averaged
    ``Mixed_5c`` features (B, feature_dim, ceil(T/8)), ``feature_dim`` = 1024 at full width.
    """

    def __init__(self, *, in_channels: int = 3, num_classes: int | None = None, width_mult: float = 1.0):
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width_mult = width_mult

        def scaled(channels: int) -> int:
            return scaled_channels(channels, width_mult)

        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        layers["Conv3d_1a_7x7"] = Unit3D(in_channels=in_channels, out_channels=scaled(64), kernel_size=7, stride=2)
        layers["MaxPool3d_2a_3x3"] = MaxPool3dSame(kernel_size=(1, 3, 3), stride=(1, 2, 2))
        layers["Conv3d_2b_1x1"] = Unit3D(in_channels=scaled(64), out_channels=scaled(64), kernel_size=1)
        layers["Conv3d_2c_3x3"] = Unit3D(in_channels=scaled(64), out_channels=scaled(192), kernel_size=3)
        layers["MaxPool3d_3a_3x3"] = MaxPool3dSame(kernel_size=(1, 3, 3), stride=(1, 2, 2))
        channels = scaled(192)
        for name in _INCEPTION_SPECS:
            if name == "Mixed_4b":
                layers["MaxPool3d_4a_3x3"] = MaxPool3dSame(kernel_size=3, stride=2)
            elif name == "Mixed_5b":
                layers["MaxPool3d_5a_2x2"] = MaxPool3dSame(kernel_size=2, stride=2)
            module = InceptionModule(
                in_channels=channels, out_channels=[scaled(c) for c in _INCEPTION_SPECS[name][1]]
            )
            layers[name] = module
            channels = module.out_channels
        self.feature_dim = channels
        self.endpoints = list(layers)
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.logits = (
            Unit3D(
                in_channels=self.feature_dim,
                out_channels=num_classes,
                kernel_size=1,
                use_batch_norm=False,
                use_bias=True,
                activation=False,
            )
            if num_classes is not None
            else None
        )

    def reset_parameters(self, generator: torch.Generator) -> None:
        """Random initialisation drawn from ``generator`` only (independent of the global RNG state).

        Convolutions get He-normal weights (fan-in, ReLU gain) and zero biases; batch norms are the identity
        (weight 1, bias 0, running mean 0, running variance 1).
        """
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv3d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=generator)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.BatchNorm3d):
                    module.reset_parameters()

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """``Mixed_5c`` activations: (B, C_in, T, H, W) -> (B, feature_dim, ceil(T/8), ceil(H/32), ceil(W/32))."""
        for name in self.endpoints:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spatially averaged ``Mixed_5c`` features: (B, C_in, T, H, W) -> (B, feature_dim, ceil(T/8))."""
        return self.feature_map(x).mean(dim=(3, 4))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Clip-level class scores (B, C_in, T, H, W) -> (B, num_classes), averaged over time."""
        if self.logits is None:
            raise RuntimeError("this I3D was built without a classifier (num_classes=None)")
        features = self.feature_map(x).mean(dim=(3, 4), keepdim=True)  # (B, feature_dim, T', 1, 1)
        return self.logits(features).mean(dim=(2, 3, 4))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unwrap_state_dict(state: object) -> object:
    """The tensor mapping inside common checkpoint wrappers ({"state_dict": ...}, {"model": ...})."""
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], dict):
                return state[key]
    return state


def checkpoint_width_mult(path: str | os.PathLike) -> float:
    """The ``width_mult`` of the I3D whose weights are in ``path``: channels of ``Conv3d_1a_7x7`` / 64.

    1.0 for the published checkpoints (pytorch-i3d ``rgb_imagenet.pt``). Raises :class:`EtesvsError` naming the
    file when it cannot be read or has no ``Conv3d_1a_7x7.conv3d.weight``.
    """
    path = Path(path)
    state = _unwrap_state_dict(load_weights_file(path, what="I3D weights file"))
    key = "Conv3d_1a_7x7.conv3d.weight"
    weight = state.get(key, state.get(f"module.{key}")) if isinstance(state, dict) else None
    if not isinstance(weight, torch.Tensor):
        raise EtesvsError(f"{path}: not an I3D state dict (no {key})")
    return weight.shape[0] / 64


def load_i3d_weights(model: InceptionI3d, path: str | os.PathLike) -> str:
    """Load a pytorch-i3d style checkpoint into ``model`` strictly; returns the file's SHA-256.

    The file is read with :func:`etesvs.io.load_weights_file` (plain weights only, never code). A ``module.`` prefix
    (DataParallel) is stripped, ``logits.*`` keys are dropped when the model has no classifier, and batch-norm
    ``num_batches_tracked`` counters missing from old checkpoints are filled in. Anything else that does not
    match is an :class:`EtesvsError` naming the file.
    """
    path = Path(path)
    state = load_weights_file(path, what="I3D weights file")
    state = _unwrap_state_dict(state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EtesvsError(f"{path}: not an I3D state dict (expected a mapping of parameter names to tensors)")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if model.logits is None:
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    expected = model.state_dict()
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise EtesvsError(f"{path}: not an I3D RGB state dict: {'; '.join(parts)}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise EtesvsError(
                f"{path}: parameter {key} has shape {tuple(state[key].shape)}, I3D expects {tuple(value.shape)}"
            )
    model.load_state_dict(state, strict=True)
    return file_sha256(path)


def temporal_output_length(num_frames: int) -> int:
    """Length of the ``Mixed_5c`` time axis for a clip of ``num_frames``: ceil three times by 2."""
    length = num_frames
    for _ in range(3):
        length = math.ceil(length / 2)
    return length
