"""Every loss of the project.

Pure functions on tensors (cross-entropy, smoothing, boundary BCE), two modules that combine them for the output of
a temporal model, and the streaming model's per-window loss. A loss module is called as ``loss_fn(output, batch)``
with the model's forward() output and a collated batch (see :mod:`etesvs.data.feature_sequences`), and returns a
dict of scalar tensors whose ``"loss"`` entry is the one to back-propagate. Both modules are built from the
training split's label statistics with ``from_label_counts`` (ASRF weights its classes and boundaries by them).

Masks here are boolean ``(B, T)`` arrays, True on valid frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from etesvs.data.feature_sequences import LabelCounts

IGNORE_INDEX = -100
SMOOTHING_CLAMP = 16.0
"""Truncation of the smoothing loss: tau = 4 squared, as in MS-TCN."""


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over valid frames (weighted mean when ``class_weights`` is given).

    Args:
        logits: (B, C, T).
        labels: (B, T) int64 class ids.
        mask: (B, T) bool, True on valid frames.
        class_weights: (C,) float or None.
    """
    targets = labels.masked_fill(~mask, IGNORE_INDEX)
    if not bool(mask.any()):
        return logits.sum() * 0.0
    weight = class_weights.to(logits.device, torch.float32) if class_weights is not None else None
    return F.cross_entropy(logits.float(), targets, weight=weight, ignore_index=IGNORE_INDEX)


def gaussian_similarity(features: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Similarity of neighbouring frames, ``exp(-d / (2 sigma^2))``, d = mean squared feature difference.

    The squared distance is averaged over feature dimensions (not summed) so that one ``sigma`` suits features
    of any width.

    Args:
        features: (B, D, T).

    Returns:
        (B, T - 1): similarity of frames t and t + 1, in (0, 1].
    """
    features = features.float()
    distance = (features[:, :, 1:] - features[:, :, :-1]).pow(2).mean(dim=1)  # (B, D, T-1) -> (B, T-1)
    return torch.exp(-distance / (2.0 * sigma**2))


def smoothing_terms(logits: torch.Tensor, *, clamp: float) -> torch.Tensor:
    """MS-TCN's truncated MSE of each pair of neighbouring frames, averaged over classes.

    Each term is ``min((log p_t - log p_{t-1})^2, clamp)`` with the previous frame detached, so that the loss pulls
    frame t towards t - 1 only; ``clamp=16`` is tau = 4 squared. Padding is not masked here: callers weight the
    pairs (see :func:`smoothing_loss` and :func:`streaming_loss`).

    Args:
        logits: (B, C, T).

    Returns:
        (B, T - 1) float32.
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    squared = (log_probs[:, :, 1:] - log_probs.detach()[:, :, :-1]).pow(2).clamp(max=clamp)  # (B, C, T-1)
    return squared.mean(dim=1)  # (B, C, T-1) -> (B, T-1)


def smoothing_loss(
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    clamp: float = SMOOTHING_CLAMP,
    similarity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of :func:`smoothing_terms` over pairs of frames that are both valid (MS-TCN's T-MSE; ASRF's GS-TMSE).

    ``similarity`` (B, T - 1) weights each pair (GS-TMSE: similar input frames are smoothed more).

    Args:
        logits: (B, C, T).
        mask: (B, T) bool.
        similarity: (B, T - 1) or None.
    """
    pair_mask = (mask[:, 1:] & mask[:, :-1]).float()  # (B, T-1)
    num_pairs = pair_mask.sum()
    if float(num_pairs) == 0.0:
        return logits.sum() * 0.0
    weights = pair_mask if similarity is None else pair_mask * similarity.float()
    return (smoothing_terms(logits, clamp=clamp) * weights).sum() / num_pairs


def boundary_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    pos_weight: float = 1.0,
) -> torch.Tensor:
    """Binary cross-entropy of boundary logits over valid frames, positives weighted by ``pos_weight``.

    Args:
        logits: (B, 1, T).
        targets: (B, T) float, 1 where a segment starts.
        mask: (B, T) bool.
    """
    if not bool(mask.any()):
        return logits.sum() * 0.0
    weight = torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
    return F.binary_cross_entropy_with_logits(
        logits[:, 0].float()[mask], targets.float()[mask], pos_weight=weight
    )


def class_weights_from_counts(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Inverse-frequency class weights ``N / (C * n_c)`` (0 for classes that never occur), float32 (C,)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    weights = np.zeros_like(counts)
    present = counts > 0
    weights[present] = total / (len(counts) * counts[present])
    return weights.astype(np.float32)


def boundary_pos_weight_from_counts(num_boundaries: int, num_frames: int) -> float:
    """Ratio of non-boundary to boundary frames (the usual pos_weight of a rare positive class); 1 if undefined."""
    if num_boundaries <= 0 or num_frames <= num_boundaries:
        return 1.0
    return float(num_frames - num_boundaries) / float(num_boundaries)


def _as_stages(output: torch.Tensor) -> torch.Tensor:
    return output if output.dim() == 4 else output.unsqueeze(0)  # (B, C, T) -> (1, B, C, T)


class SegmentationLoss(nn.Module):
    """Cross-entropy plus ``smoothing_weight`` x T-MSE, summed over stages (MS-TCN, ASFormer, frame classifier).

    Call with ``output`` (S, B, C, T) or (B, C, T) logits and a batch with ``"labels"`` (B, T) and ``"mask"`` (B, T).
    """

    def __init__(
        self,
        *,
        smoothing_weight: float,
        clamp: float = SMOOTHING_CLAMP,
        class_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.smoothing_weight = smoothing_weight
        self.clamp = clamp
        weights = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, output: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        labels, mask = batch["labels"], batch["mask"]
        classification = output.new_zeros((), dtype=torch.float32)
        smoothing = output.new_zeros((), dtype=torch.float32)
        for logits in _as_stages(output):
            classification = classification + masked_cross_entropy(logits, labels, mask, self.class_weights)
            if self.smoothing_weight:
                smoothing = smoothing + smoothing_loss(logits, mask, clamp=self.clamp)
        loss = classification + self.smoothing_weight * smoothing
        return {"loss": loss, "classification": classification.detach(), "smoothing": smoothing.detach()}

    @classmethod
    def from_label_counts(cls, counts: "LabelCounts", **kwargs: float) -> "SegmentationLoss":
        """The loss for a training split: unweighted classes, whatever the split's statistics."""
        return cls(**kwargs)


class ASRFLoss(nn.Module):
    """ASRF loss: class-weighted cross-entropy + GS-TMSE for every segmentation stage, boundary BCE for every
    boundary stage.

    Call with ``output`` = (class logits (S, B, C, T), boundary logits (S', B, 1, T)) and a batch with
    ``"labels"``, ``"boundaries"``, ``"mask"`` (B, T) and ``"features"`` (B, D, T).
    """

    def __init__(
        self,
        *,
        class_weights: Sequence[float] | None,
        boundary_pos_weight: float,
        smoothing_weight: float,
        boundary_weight: float,
        similarity_sigma: float,
        clamp: float = SMOOTHING_CLAMP,
    ) -> None:
        super().__init__()
        weights = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.boundary_pos_weight = boundary_pos_weight
        self.smoothing_weight = smoothing_weight
        self.boundary_weight = boundary_weight
        self.similarity_sigma = similarity_sigma
        self.clamp = clamp

    def forward(self, output: tuple[torch.Tensor, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        class_logits, boundary_logits = output
        labels, mask = batch["labels"], batch["mask"]
        similarity = gaussian_similarity(batch["features"], self.similarity_sigma)
        classification = class_logits.new_zeros((), dtype=torch.float32)
        smoothing = class_logits.new_zeros((), dtype=torch.float32)
        for logits in class_logits:
            classification = classification + masked_cross_entropy(logits, labels, mask, self.class_weights)
            smoothing = smoothing + smoothing_loss(logits, mask, clamp=self.clamp, similarity=similarity)
        boundary = class_logits.new_zeros((), dtype=torch.float32)
        for logits in boundary_logits:
            boundary = boundary + boundary_loss(logits, batch["boundaries"], mask, self.boundary_pos_weight)
        loss = classification + self.smoothing_weight * smoothing + self.boundary_weight * boundary
        return {
            "loss": loss,
            "classification": classification.detach(),
            "smoothing": smoothing.detach(),
            "boundary": boundary.detach(),
        }

    @classmethod
    def from_label_counts(cls, counts: "LabelCounts", **kwargs: float) -> "ASRFLoss":
        """The loss for a training split: inverse-frequency class weights and the boundary ``pos_weight`` of its
        frames (see :func:`class_weights_from_counts`, :func:`boundary_pos_weight_from_counts`)."""
        return cls(
            class_weights=class_weights_from_counts(counts.class_counts).tolist(),
            boundary_pos_weight=boundary_pos_weight_from_counts(counts.num_boundaries, counts.num_frames),
            **kwargs,
        )


def window_soft_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of window-level logits (B, C) against the share of each class among the window's valid frames
    (labels (B, T), mask (B, T) bool); (B,), zero for rows without a valid frame."""
    num_classes = logits.shape[1]
    valid = mask.float()
    one_hot = F.one_hot(labels.clamp(min=0), num_classes).float() * valid[:, :, None]  # (B, T, C)
    counts = valid.sum(dim=1)  # (B,)
    distribution = one_hot.sum(dim=1) / counts.clamp(min=1.0)[:, None]  # (B, T, C) -> (B, C)
    return -(distribution * F.log_softmax(logits.float(), dim=1)).sum(dim=1) * (counts > 0).float()


def streaming_loss(
    outputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    frame_weights: torch.Tensor,
    window_weights: torch.Tensor,
    smoothing_weight: float,
    clamp: float = SMOOTHING_CLAMP,
) -> dict[str, torch.Tensor]:
    """The streaming model's loss of one window, as a weighted sum over the rows (videos) of the batch.

    Per row: cross-entropy of the head plus ``smoothing_weight`` x the truncated MSE of neighbouring
    log-probabilities (:func:`smoothing_terms`) plus cross-entropy of the memory branch, summed over the window's
    frames and multiplied by ``frame_weights``; plus the soft-label cross-entropy between the backbone's window-mean
    logits and the label distribution of the window's valid frames, multiplied by ``window_weights``. With
    ``frame_weights = 1 / (B x frames of the video)`` and ``window_weights = 1 / (B x windows of the video)`` the
    sum over all windows is the mean over videos of each video's mean loss, whatever the split of the videos over
    windows, batches or processes.

    Args:
        outputs: the model's outputs for the window (``head_logits`` and ``memory_logits`` (B, C, T),
            ``backbone_logits`` (B, C)).
        labels: (B, T) int64 class ids (anything on padding frames).
        mask: (B, T) bool, True on valid frames.
        frame_weights: (B,) float.
        window_weights: (B,) float.

    Returns:
        ``"loss"`` (scalar to back-propagate) and its detached parts ``"head"``, ``"smoothing"``, ``"memory"``,
        ``"backbone"`` (each already weighted by the row weights, before ``smoothing_weight``).
    """
    head_logits = outputs["head_logits"].float()
    targets = labels.masked_fill(~mask, IGNORE_INDEX)
    valid = mask.float()
    frame_weights, window_weights = frame_weights.float(), window_weights.float()

    def frame_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
        per_frame = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")  # (B, T)
        return (per_frame.sum(dim=1) * frame_weights).sum()

    head = frame_cross_entropy(head_logits)
    memory = frame_cross_entropy(outputs["memory_logits"])
    pair_mask = valid[:, 1:] * valid[:, :-1]  # (B, T-1)
    smoothing = ((smoothing_terms(head_logits, clamp=clamp) * pair_mask).sum(dim=1) * frame_weights).sum()

    backbone = (window_soft_cross_entropy(outputs["backbone_logits"], labels, mask) * window_weights).sum()

    loss = head + smoothing_weight * smoothing + memory + backbone
    return {
        "loss": loss,
        "head": head.detach(),
        "smoothing": smoothing.detach(),
        "memory": memory.detach(),
        "backbone": backbone.detach(),
    }
