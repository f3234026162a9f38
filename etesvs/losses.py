"""Every loss of the project.

Pure functions on tensors (cross-entropy, smoothing, boundary BCE), two modules that combine them for the output of
a temporal model, and the streaming model's per-window loss. A loss module is called as ``loss_fn(output, batch)``
with the model's forward() output and a collated batch (see :mod:`etesvs.data.feature_sequences`), and returns a
dict of scalar tensors whose ``"loss"`` entry is the one to back-propagate. Both modules are built from the
training split's label statistics with ``from_label_counts(counts, full_rate_counts, **params)`` (ASRF weights its
classes and boundaries by them). By default each loss computes what its published code computes (MS-TCN and
ASFormer: :class:`SegmentationLoss`; ASRF: :class:`ASRFLoss`), except where that code has a bug; README.md,
"Deviations from the published code", lists every difference and the option that switches it.

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


def gaussian_similarity(features: torch.Tensor, *, sigma: float, distance: str) -> torch.Tensor:
    """Similarity of neighbouring frames, ``exp(-d / (2 sigma^2))``, for ASRF's GS-TMSE.

    ``distance`` is ``"norm"``, d = ||x_t - x_{t-1}||_2 (the published ASRF code: the plain, unsquared L2 norm over
    the feature channels), or ``"mean_squared"``, d = mean over channels of (x_t - x_{t-1})^2 (one ``sigma`` then
    suits features of any width). It is computed from the inputs, so it carries no gradient.

    Args:
        features: (B, D, T).

    Returns:
        (B, T - 1): similarity of frames t - 1 and t, in (0, 1].
    """
    difference = features[:, :, 1:].float() - features[:, :, :-1].float()  # (B, D, T-1)
    if distance == "norm":
        d = difference.norm(dim=1)  # (B, D, T-1) -> (B, T-1)
    elif distance == "mean_squared":
        d = difference.pow(2).mean(dim=1)  # (B, D, T-1) -> (B, T-1)
    else:
        raise ValueError(f"similarity_distance must be norm or mean_squared, got {distance!r}")
    return torch.exp(-d / (2.0 * sigma**2))


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


def smoothing_loss(logits: torch.Tensor, mask: torch.Tensor, *, clamp: float = SMOOTHING_CLAMP) -> torch.Tensor:
    """Mean of :func:`smoothing_terms` over pairs of frames that are both valid (MS-TCN's and ASFormer's T-MSE).

    At batch size 1 (the published recipes) this is their ``mean(clamp(...) * mask)`` over C x (T - 1).

    Args:
        logits: (B, C, T).
        mask: (B, T) bool.
    """
    pair_mask = (mask[:, 1:] & mask[:, :-1]).float()  # (B, T-1)
    num_pairs = pair_mask.sum()
    if float(num_pairs) == 0.0:
        return logits.sum() * 0.0
    return (smoothing_terms(logits, clamp=clamp) * pair_mask).sum() / num_pairs


def gaussian_similarity_tmse(
    logits: torch.Tensor,
    similarity: torch.Tensor,
    lengths: Sequence[int],
    *,
    softmax_over: str,
    detach_previous: bool,
    clamp: float = SMOOTHING_CLAMP,
) -> torch.Tensor:
    """ASRF's GS-TMSE: per video, the mean over C x (L - 1) of ``s_t * min((log p_t - log p_{t-1})^2, clamp)``,
    then the mean over videos (L = the video's valid length; videos shorter than 2 frames add 0).

    ``softmax_over="classes"`` normalises the log-probabilities over classes. ``"time"`` reproduces the published
    code, which applies ``log_softmax(dim=1)`` to a per-video (C, L) slice, i.e. over time, and normalises the
    slices [1, L) and [0, L - 1) separately. ``detach_previous`` stops the gradient through frame t - 1 (MS-TCN
    does; the published ASRF code does not).

    Args:
        logits: (B, C, T).
        similarity: (B, T - 1) from :func:`gaussian_similarity`.
        lengths: B valid lengths (valid frames are a prefix of each row).
    """
    if softmax_over not in ("classes", "time"):
        raise ValueError(f"smoothing_softmax_over must be classes or time, got {softmax_over!r}")
    dim = 0 if softmax_over == "classes" else 1
    total = logits.sum() * 0.0
    for item, length in enumerate(lengths):
        length = int(length)
        if length < 2:
            continue
        video = logits[item, :, :length].float()  # (C, L)
        current = F.log_softmax(video[:, 1:], dim=dim)  # (C, L-1)
        previous = F.log_softmax(video[:, :-1], dim=dim)
        if detach_previous:
            previous = previous.detach()
        squared = (current - previous).pow(2).clamp(max=clamp)  # (C, L-1)
        total = total + (squared * similarity[item, : length - 1].float()).mean()
    return total / max(len(lengths), 1)


def boundary_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Binary cross-entropy of boundary logits, positives weighted by ``pos_weight``: the mean over each video's
    valid frames, then the mean over videos (as the published ASRF code reduces it).

    Args:
        logits: (B, 1, T).
        targets: (B, T) float, 1 where a segment starts.
        mask: (B, T) bool.
    """
    weight = torch.tensor(pos_weight, dtype=torch.float32, device=logits.device)
    per_frame = F.binary_cross_entropy_with_logits(
        logits[:, 0].float(), targets.float(), pos_weight=weight, reduction="none"
    )  # (B, T)
    valid = mask.float()
    per_video = (per_frame * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)  # (B,)
    return per_video.mean()


CLASS_WEIGHTINGS = ("median_frequency", "inverse_frequency", "none")


def class_weights_from_counts(counts: Sequence[int] | np.ndarray, method: str) -> np.ndarray | None:
    """Class weights of the cross-entropy from frame counts (C,); float32 (C,), or None for ``"none"``.

    ``"median_frequency"`` (ASRF, after Eigen and Fergus): ``median(f) / f_c`` with f_c = n_c / N and the median
    taken as ``torch.median`` does (the lower of the two middle values for an even C), over every class as
    published; ``"inverse_frequency"``: ``N / (C n_c)``. A class with no frames gets 0 (the published code divides
    by zero; the class is never a target, so the loss is the same).
    """
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"class_weighting must be one of {', '.join(CLASS_WEIGHTINGS)}, got {method!r}")
    if method == "none":
        return None
    counts = np.asarray(counts, dtype=np.float64)
    frequency = counts / max(counts.sum(), 1.0)
    present = counts > 0
    weights = np.zeros_like(frequency)
    if method == "median_frequency":
        median = np.sort(frequency)[(len(frequency) - 1) // 2]
        if median == 0.0:  # more than half of the classes absent: every weight would be 0
            median = np.sort(frequency[present])[(int(present.sum()) - 1) // 2]
        weights[present] = median / frequency[present]
    else:
        weights[present] = 1.0 / (len(counts) * frequency[present])
    return weights.astype(np.float32)


def boundary_pos_weight_from_counts(num_boundaries: int, num_frames: int, method: str) -> float:
    """``pos_weight`` of the boundary BCE: ``"inverse_ratio"`` N / n_pos (ASRF, the reciprocal of the positive
    ratio) or ``"negative_ratio"`` (N - n_pos) / n_pos; 1 if there is no positive frame."""
    if method not in ("inverse_ratio", "negative_ratio"):
        raise ValueError(f"boundary_pos_weighting must be inverse_ratio or negative_ratio, got {method!r}")
    if num_boundaries <= 0:
        return 1.0
    negatives_or_all = num_frames if method == "inverse_ratio" else num_frames - num_boundaries
    return float(negatives_or_all) / float(num_boundaries)


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
    def from_label_counts(cls, counts: "LabelCounts", full_rate_counts: "LabelCounts", **kwargs: float
                          ) -> "SegmentationLoss":
        """The loss for a training split: unweighted classes, whatever the split's statistics."""
        return cls(**kwargs)


class ASRFLoss(nn.Module):
    """ASRF loss: L = R_s(CE_w + smoothing_weight x GS-TMSE) + boundary_weight x R_s'(BCE_pos_weight), where R is
    the mean over the stages of a branch (``stage_reduction="mean"``, as published) or their sum (``"sum"``).

    Call with ``output`` = (class logits (S, B, C, T), boundary logits (S', B, 1, T)) and a batch with
    ``"labels"``, ``"boundaries"``, ``"mask"`` (B, T) and ``"features"`` (B, D, T). The GS-TMSE options are those
    of :func:`gaussian_similarity` and :func:`gaussian_similarity_tmse`.
    """

    def __init__(
        self,
        *,
        class_weights: Sequence[float] | None,
        boundary_pos_weight: float,
        smoothing_weight: float,
        boundary_weight: float,
        similarity_sigma: float,
        similarity_distance: str,
        smoothing_softmax_over: str,
        smoothing_detach_previous: bool,
        stage_reduction: str,
        clamp: float = SMOOTHING_CLAMP,
    ) -> None:
        super().__init__()
        if stage_reduction not in ("mean", "sum"):
            raise ValueError(f"stage_reduction must be mean or sum, got {stage_reduction!r}")
        weights = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.boundary_pos_weight = boundary_pos_weight
        self.smoothing_weight = smoothing_weight
        self.boundary_weight = boundary_weight
        self.similarity = dict(sigma=similarity_sigma, distance=similarity_distance)
        self.smoothing = dict(softmax_over=smoothing_softmax_over, detach_previous=smoothing_detach_previous,
                              clamp=clamp)
        self.stage_reduction = stage_reduction

    def _reduce(self, per_stage: list[torch.Tensor]) -> torch.Tensor:
        total = torch.stack(per_stage).sum()
        return total / len(per_stage) if self.stage_reduction == "mean" else total

    def forward(self, output: tuple[torch.Tensor, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
        class_logits, boundary_logits = output
        labels, mask = batch["labels"], batch["mask"]
        lengths = mask.sum(dim=1).tolist()
        similarity = gaussian_similarity(batch["features"], **self.similarity)  # (B, T-1)
        classification = self._reduce(
            [masked_cross_entropy(logits, labels, mask, self.class_weights) for logits in class_logits])
        smoothing = self._reduce(
            [gaussian_similarity_tmse(logits, similarity, lengths, **self.smoothing) for logits in class_logits])
        boundary = self._reduce(
            [boundary_loss(logits, batch["boundaries"], mask, self.boundary_pos_weight) for logits in boundary_logits])
        loss = classification + self.smoothing_weight * smoothing + self.boundary_weight * boundary
        return {
            "loss": loss,
            "classification": classification.detach(),
            "smoothing": smoothing.detach(),
            "boundary": boundary.detach(),
        }

    @classmethod
    def from_label_counts(
        cls, counts: "LabelCounts", full_rate_counts: "LabelCounts", *, class_weighting: str,
        boundary_pos_weighting: str, statistics_rate: str, **kwargs: float
    ) -> "ASRFLoss":
        """The loss for a training split: class weights (:func:`class_weights_from_counts`) and the boundary
        ``pos_weight`` (:func:`boundary_pos_weight_from_counts`) from the frames it trains on
        (``statistics_rate="sampled"``, ``counts``) or from the full-rate label arrays as the published code
        counts them (``"full"``, ``full_rate_counts``; the two differ when the dataset's sample rate is > 1)."""
        if statistics_rate not in ("sampled", "full"):
            raise ValueError(f"statistics_rate must be sampled or full, got {statistics_rate!r}")
        stats = counts if statistics_rate == "sampled" else full_rate_counts
        weights = class_weights_from_counts(stats.class_counts, class_weighting)
        return cls(
            class_weights=weights.tolist() if weights is not None else None,
            boundary_pos_weight=boundary_pos_weight_from_counts(stats.num_boundaries, stats.num_frames,
                                                                boundary_pos_weighting),
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
    smooth_across_windows: bool,
    clamp: float = SMOOTHING_CLAMP,
) -> dict[str, torch.Tensor]:
    """The streaming model's loss of one window, as a weighted sum over the rows (videos) of the batch.

    Per row: for every head stage (as MS-TCN, summed over stages), cross-entropy plus ``smoothing_weight`` x the
    truncated MSE of neighbouring log-probabilities (:func:`smoothing_terms`), with ``smooth_across_windows``
    including the pair made of the frame before the window and the window's first frame (the ETESVS authors'
    loss: pairs inside the window only); plus cross-entropy of the memory branch; summed over the
    window's frames and multiplied by ``frame_weights``; plus the soft-label cross-entropy between the backbone's
    window-mean logits and the label distribution of the window's valid frames, multiplied by ``window_weights``.
    With ``frame_weights = 1 / (B x frames of the video)`` and ``window_weights = 1 / (B x windows of the video)``
    the sum over all windows is the mean over videos of each video's mean loss, whatever the split of the videos
    over windows, batches or processes.

    Args:
        outputs: the model's outputs for the window: ``stage_logits`` (S, B, C, T), ``previous_logits`` (S, B, C)
            and ``previous_mask`` (B,) bool (the frame before the window), ``memory_logits`` (B, C, T),
            ``backbone_logits`` (B, C).
        labels: (B, T) int64 class ids (anything on padding frames).
        mask: (B, T) bool, True on valid frames.
        frame_weights: (B,) float.
        window_weights: (B,) float.

    Returns:
        ``"loss"`` (scalar to back-propagate) and its detached parts ``"head"``, ``"smoothing"``, ``"memory"``,
        ``"backbone"`` (each already weighted by the row weights, before ``smoothing_weight``).
    """
    stage_logits = outputs["stage_logits"].float()
    targets = labels.masked_fill(~mask, IGNORE_INDEX)
    valid = mask.float()
    frame_weights, window_weights = frame_weights.float(), window_weights.float()

    def frame_cross_entropy(logits: torch.Tensor) -> torch.Tensor:
        per_frame = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")  # (B, T)
        return (per_frame.sum(dim=1) * frame_weights).sum()

    head = sum(frame_cross_entropy(logits) for logits in stage_logits)
    memory = frame_cross_entropy(outputs["memory_logits"])
    # Pairs of neighbouring frames, the first made of the frame before the window (if any) and the window's first.
    previous_valid = outputs["previous_mask"].float() * float(smooth_across_windows)  # (B,)
    with_previous = torch.cat([previous_valid[:, None], valid], dim=1)  # (B, 1 + T)
    pair_mask = with_previous[:, 1:] * with_previous[:, :-1]  # (B, T)
    previous = outputs["previous_logits"].float()[..., None]  # (S, B, C) -> (S, B, C, 1)
    smoothing = sum(
        ((smoothing_terms(torch.cat([before, logits], dim=2), clamp=clamp) * pair_mask).sum(dim=1)
         * frame_weights).sum()
        for before, logits in zip(previous, stage_logits)
    )

    backbone = (window_soft_cross_entropy(outputs["backbone_logits"], labels, mask) * window_weights).sum()

    loss = head + smoothing_weight * smoothing + memory + backbone
    return {
        "loss": loss,
        "head": head.detach(),
        "smoothing": smoothing.detach(),
        "memory": memory.detach(),
        "backbone": backbone.detach(),
    }
