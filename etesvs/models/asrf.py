"""ASRF (Ishikawa et al., WACV 2021): action segmentation with boundary regression and boundary refinement.

A shared dilated TCN feeds two heads: frame-wise class logits and boundary logits. Each head has its own stack of
refinement stages. At inference the class prediction is cleaned up with the detected boundaries: within every
span between two detected boundaries all frames take the majority class of that span, which removes the short
spurious segments (over-segmentation) that frame-wise classifiers produce.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from etesvs.models.tcn import SingleStageTCN


def detect_boundaries(probability: np.ndarray, *, threshold: float, min_distance: int) -> np.ndarray:
    """Frames where a segment is detected to start: local maxima of the boundary probability.

    A frame is a boundary if its probability is >= ``threshold`` and is the maximum within ``min_distance``
    frames on either side; of equal maxima closer than ``min_distance`` only the first is kept. Frame 0 (where
    a segment always starts) is not reported.

    Args:
        probability: (T,) boundary probability.

    Returns:
        (K,) int64 sorted frame indices in [1, T).
    """
    probability = np.asarray(probability, dtype=np.float64)
    length = len(probability)
    if length < 2:
        return np.zeros(0, dtype=np.int64)
    radius = max(int(min_distance), 1)
    padded = np.pad(probability, radius, constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1)  # (T, 2r+1)
    is_peak = (probability >= windows.max(axis=1)) & (probability >= threshold)
    is_peak[0] = False
    kept: list[int] = []
    for frame in np.flatnonzero(is_peak):
        if not kept or frame - kept[-1] >= radius:
            kept.append(int(frame))
    return np.asarray(kept, dtype=np.int64)


def refine_with_boundaries(probabilities: torch.Tensor, boundaries: np.ndarray) -> torch.Tensor:
    """Majority vote of frame predictions within each span between boundaries.

    Every frame of a span gets the span's vote fractions as its probabilities (the share of the span's frames
    whose argmax is each class), so the argmax of the result is the majority class of the span (lowest class id
    on ties) and each row still sums to 1.

    Args:
        probabilities: (C, T) per-frame class probabilities.
        boundaries: (K,) sorted frame indices in [1, T) where spans start (frame 0 always starts one).

    Returns:
        (C, T) refined probabilities.
    """
    num_classes, length = probabilities.shape
    if length == 0:
        return probabilities
    starts = torch.zeros(length, dtype=torch.long, device=probabilities.device)
    starts[torch.as_tensor(boundaries, dtype=torch.long, device=probabilities.device)] = 1
    span = torch.cumsum(starts, dim=0)  # (T,) span index of each frame, 0-based
    num_spans = int(span[-1]) + 1
    votes = F.one_hot(probabilities.argmax(dim=0), num_classes).to(probabilities.dtype)  # (T, C)
    counts = torch.zeros(num_spans, num_classes, dtype=probabilities.dtype, device=probabilities.device)
    counts.index_add_(0, span, votes)  # (num_spans, C)
    fractions = counts / counts.sum(dim=1, keepdim=True)
    return fractions[span].transpose(0, 1)  # (T, C) -> (C, T)


class ActionSegmentRefinementFramework(nn.Module):
    """ASRF on per-frame features.

    forward(x (B, in_channels, T), mask (B, 1, T)) -> (class logits (num_stages_segmentation, B, num_classes, T),
    boundary logits (num_stages_boundary, B, 1, T)), both zero on padding frames. The first entry of each comes
    from the shared TCN, the others from refinement stages.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_layers: int,
        num_feature_maps: int,
        num_stages_segmentation: int,
        num_stages_boundary: int,
        dropout: float,
        boundary_threshold: float,
        boundary_min_distance: int,
    ) -> None:
        super().__init__()
        if num_stages_segmentation < 1 or num_stages_boundary < 1:
            raise ValueError("num_stages_segmentation and num_stages_boundary must be >= 1")
        stage_args = dict(num_layers=num_layers, num_feature_maps=num_feature_maps, dropout=dropout)
        # The shared TCN's own classifier is the first class head; the boundary head reads the same features.
        self.shared = SingleStageTCN(in_channels=in_channels, num_classes=num_classes, **stage_args)
        self.boundary_head = nn.Conv1d(num_feature_maps, 1, kernel_size=1)
        self.segmentation_stages = nn.ModuleList(
            SingleStageTCN(in_channels=num_classes, num_classes=num_classes, **stage_args)
            for _ in range(num_stages_segmentation - 1)
        )
        self.boundary_stages = nn.ModuleList(
            SingleStageTCN(in_channels=1, num_classes=1, **stage_args) for _ in range(num_stages_boundary - 1)
        )
        self.boundary_threshold = boundary_threshold
        self.boundary_min_distance = boundary_min_distance

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, in_channels, T), (B, 1, T) -> ((S, B, C, T), (S', B, 1, T)) logits."""
        mask = mask.to(x.dtype)
        hidden = self.shared.encode(x, mask)
        class_logits = self.shared.conv_out(hidden) * mask
        boundary_logits = self.boundary_head(hidden) * mask
        class_outputs, boundary_outputs = [class_logits], [boundary_logits]
        for stage in self.segmentation_stages:
            class_logits = stage(F.softmax(class_logits, dim=1) * mask, mask)
            class_outputs.append(class_logits)
        for stage in self.boundary_stages:
            boundary_logits = stage(torch.sigmoid(boundary_logits) * mask, mask)
            boundary_outputs.append(boundary_logits)
        return torch.stack(class_outputs), torch.stack(boundary_outputs)  # S x (B, C, T) -> (S, B, C, T)

    def probabilities(self, output: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Boundary-refined per-frame class probabilities (B, num_classes, T), zero on padding frames."""
        class_logits, boundary_logits = output
        probabilities = F.softmax(class_logits[-1].float(), dim=1)  # (B, C, T)
        boundary_probability = torch.sigmoid(boundary_logits[-1, :, 0].float())  # (B, 1, T) -> (B, T)
        valid = mask.reshape(mask.shape[0], -1).bool()  # (B, 1, T) or (B, T) -> (B, T)
        refined = torch.zeros_like(probabilities)
        for item in range(probabilities.shape[0]):
            length = int(valid[item].sum())
            peaks = detect_boundaries(
                boundary_probability[item, :length].detach().cpu().numpy(),
                threshold=self.boundary_threshold,
                min_distance=self.boundary_min_distance,
            )
            refined[item, :, :length] = refine_with_boundaries(probabilities[item, :, :length], peaks)
        return refined
