"""ASRF (Ishikawa et al., WACV 2021): action segmentation with boundary regression and boundary refinement.

A shared dilated TCN feeds two heads: frame-wise class logits and boundary logits. Each head has its own stack of
refinement stages. At inference the class prediction is cleaned up with the detected boundaries: within every
span between two detected boundaries all frames take the majority class of that span, which removes the short
spurious segments (over-segmentation) that frame-wise classifiers produce. Boundary detection and the vote follow
the published code (yiskw713/asrf ``libs/postprocess.py``, ``libs/metric.py``) by default; ``boundary_min_distance``
and ``tie_break`` switch the deviations listed in README.md.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from etesvs.models.tcn import SingleStageTCN


def detect_boundaries(probability: np.ndarray, *, threshold: float, min_distance: int) -> np.ndarray:
    """Frames where a segment is detected to start, by the published ASRF rule plus an optional minimum distance.

    Values below ``threshold`` count as 0; an interior frame t is a boundary if p[t-1] < p[t] > p[t+1] (strict on
    both sides, so a plateau of equal values gives none); the last frame never is. With ``min_distance`` d > 0 a
    peak must also be the maximum within d frames on either side, and of equal peaks closer than d only the first
    is kept (the published code has no such rule: ``min_distance=0``). Frame 0, where a segment always starts, is
    not reported.

    Args:
        probability: (T,) boundary probability.

    Returns:
        (K,) int64 sorted frame indices in [1, T - 1).
    """
    p = np.asarray(probability, dtype=np.float64)
    p = np.where(p < threshold, 0.0, p)
    if len(p) < 3:
        return np.zeros(0, dtype=np.int64)
    peaks = np.flatnonzero((p[:-2] < p[1:-1]) & (p[2:] < p[1:-1])) + 1
    if min_distance <= 0:
        return peaks.astype(np.int64)
    padded = np.pad(p, min_distance, constant_values=-np.inf)
    window_max = np.lib.stride_tricks.sliding_window_view(padded, 2 * min_distance + 1).max(axis=1)  # (T,)
    kept: list[int] = []
    for frame in peaks[p[peaks] >= window_max[peaks]]:
        if not kept or frame - kept[-1] >= min_distance:
            kept.append(int(frame))
    return np.asarray(kept, dtype=np.int64)


TIE_BREAKS = ("logit_sum", "published", "lowest_class")
_TIE_SHARE = 1e-4
"""Share moved to the chosen class of a span whose vote is tied, so that the argmax of the refined probabilities
is that class; small enough to leave the span's scores (the vote fractions) as they are for the metrics."""


def _span_classes(counts: torch.Tensor, logit_sums: torch.Tensor, tie_break: str) -> torch.Tensor:
    """The class of each span: the majority vote, ties broken by ``tie_break``.

    ``"logit_sum"``: the tied class with the largest sum of raw logits over the span (the published rule);
    ``"published"``: the same, but as published the running best starts at 0, so when every tied class has a sum
    <= 0 the span keeps the previous span's class (the first span, where the published code fails or reuses the
    previous video's class, takes the lowest tied class); ``"lowest_class"``: the lowest tied class id. Equal
    sums go to the lowest class id.

    Args:
        counts: (S, C) votes of each span. logit_sums: (S, C).

    Returns:
        (S,) int64.
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
    tied = counts == counts.max(dim=1, keepdim=True).values  # (S, C)
    if tie_break == "lowest_class":
        return tied.to(torch.uint8).argmax(dim=1)  # first maximum: the lowest tied class
    keys = logit_sums.masked_fill(~tied, float("-inf"))
    classes = keys.argmax(dim=1)
    if tie_break == "published":
        fallback = (tied.sum(dim=1) > 1) & (keys.max(dim=1).values <= 0)  # (S,)
        for span in torch.nonzero(fallback).flatten().tolist():
            classes[span] = classes[span - 1] if span > 0 else tied[span].to(torch.uint8).argmax()
    return classes


def refine_with_boundaries(
    probabilities: torch.Tensor, logits: torch.Tensor, boundaries: np.ndarray, *, tie_break: str
) -> torch.Tensor:
    """Majority vote of frame predictions within each span between boundaries (ASRF's refinement).

    Every frame of a span gets the span's vote fractions as its probabilities (the share of the span's frames
    whose argmax is each class), so the argmax of the result is the majority class of the span and each row
    still sums to 1. On a tied vote the class chosen by ``tie_break`` (see :func:`_span_classes`) gets a tiny
    extra share so that it is the argmax.

    Args:
        probabilities: (C, T) per-frame class probabilities.
        logits: (C, T) the raw logits they come from (the published tie-break sums them).
        boundaries: (K,) sorted frame indices in [1, T) where spans start (frame 0 always starts one).

    Returns:
        (C, T) refined probabilities.
    """
    num_classes, length = probabilities.shape
    if length == 0:
        return probabilities
    device, dtype = probabilities.device, probabilities.dtype
    starts = torch.zeros(length, dtype=torch.long, device=device)
    starts[torch.as_tensor(boundaries, dtype=torch.long, device=device)] = 1
    span = torch.cumsum(starts, dim=0)  # (T,) span index of each frame, 0-based
    num_spans = int(span[-1]) + 1
    votes = F.one_hot(probabilities.argmax(dim=0), num_classes).to(dtype)  # (T, C)
    counts = torch.zeros(num_spans, num_classes, dtype=dtype, device=device).index_add_(0, span, votes)  # (S, C)
    logit_sums = torch.zeros(num_spans, num_classes, dtype=torch.float64, device=device)
    logit_sums.index_add_(0, span, logits.transpose(0, 1).double())  # (C, T) -> (T, C) -> (S, C)
    classes = _span_classes(counts, logit_sums, tie_break)
    fractions = counts / counts.sum(dim=1, keepdim=True)
    adjust = (counts == counts.max(dim=1, keepdim=True).values).sum(dim=1) > 1  # (S,) tied spans
    chosen = F.one_hot(classes, num_classes).to(dtype)  # (S, C)
    top = fractions.max(dim=1, keepdim=True).values
    raised = torch.where(chosen > 0, top + _TIE_SHARE, fractions)  # the chosen class above every other
    fractions = torch.where(adjust[:, None], raised / raised.sum(dim=1, keepdim=True), fractions)
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
        tie_break: str,
    ) -> None:
        super().__init__()
        if num_stages_segmentation < 1 or num_stages_boundary < 1:
            raise ValueError("num_stages_segmentation and num_stages_boundary must be >= 1")
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break must be one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
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
        self.tie_break = tie_break

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
        logits = class_logits[-1].float()  # (B, C, T)
        probabilities = F.softmax(logits, dim=1)
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
            refined[item, :, :length] = refine_with_boundaries(
                probabilities[item, :, :length], logits[item, :, :length], peaks, tie_break=self.tie_break)
        return refined
