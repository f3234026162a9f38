"""Losses: exact values on hand-computed cases, masking, and which way gradients flow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from etesvs.data.feature_sequences import LabelCounts
from etesvs.losses import (
    ASRFLoss,
    SegmentationLoss,
    boundary_loss,
    boundary_pos_weight_from_counts,
    class_weights_from_counts,
    gaussian_similarity,
    gaussian_similarity_tmse,
    masked_cross_entropy,
    smoothing_loss,
)
from tests.conftest import default_config


def _two_frames(second_frame_logits: list[float]) -> torch.Tensor:
    return torch.tensor([[[0.0, second_frame_logits[0]], [0.0, second_frame_logits[1]]]])  # (1, C=2, T=2)


def test_smoothing_loss_hand_computed():
    # Frame 0: p = (1/2, 1/2); frame 1: p = (3/4, 1/4).
    logits = _two_frames([math.log(3.0), 0.0])
    expected = (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2
    got = smoothing_loss(logits, torch.ones(1, 2, dtype=torch.bool))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_smoothing_loss_is_truncated_at_tau_squared():
    # Frame 1: log p = (~0, ~-100): the second squared difference (~9862) is clamped at 16.
    logits = _two_frames([100.0, 0.0])
    expected = (math.log(0.5) ** 2 + 16.0) / 2
    got = smoothing_loss(logits, torch.ones(1, 2, dtype=torch.bool), clamp=16.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_smoothing_loss_zero_for_constant_predictions_and_ignores_padding():
    logits = torch.randn(2, 4, 1).repeat(1, 1, 10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    assert smoothing_loss(logits, mask).item() == pytest.approx(0.0, abs=1e-7)
    noisy = logits.clone()
    noisy[:, :, 7:] = 50 * torch.randn(2, 4, 3)
    mask[:, 7:] = False
    assert smoothing_loss(noisy, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_smoothing_gradient_reaches_only_the_later_frame():
    logits = _two_frames([1.0, -1.0]).requires_grad_(True)
    smoothing_loss(logits, torch.ones(1, 2, dtype=torch.bool)).backward()
    assert torch.all(logits.grad[..., 0] == 0)
    assert torch.any(logits.grad[..., 1] != 0)


def test_masked_cross_entropy_matches_unpadded_and_weights():
    torch.manual_seed(0)
    logits, labels = torch.randn(1, 3, 6), torch.tensor([[0, 1, 2, 2, 1, 0]])
    mask = torch.tensor([[True, True, True, True, False, False]])
    got = masked_cross_entropy(logits, labels, mask)
    torch.testing.assert_close(got, F.cross_entropy(logits[..., :4], labels[:, :4]))
    weights = torch.tensor([1.0, 2.0, 3.0])
    nll = -F.log_softmax(logits, dim=1)[0, labels[0], torch.arange(6)][:4]
    w = weights[labels[0, :4]]
    torch.testing.assert_close(masked_cross_entropy(logits, labels, mask, weights), (w * nll).sum() / w.sum())


def test_boundary_loss_with_pos_weight():
    logits = torch.tensor([[[2.0, -1.0, 0.5, 9.0]]])
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    sigmoid = torch.sigmoid(logits[0, 0, :3])
    expected = -(3.0 * torch.log(sigmoid[0]) + torch.log(1 - sigmoid[1]) + 3.0 * torch.log(sigmoid[2])) / 3
    torch.testing.assert_close(boundary_loss(logits, targets, mask, pos_weight=3.0), expected)


def _batch(length=8, num_classes=3, dim=4):
    torch.manual_seed(1)
    labels = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]])
    return {
        "labels": labels,
        "mask": torch.ones(1, length, dtype=torch.bool),
        "boundaries": torch.tensor([[1.0, 0, 1, 0, 0, 1, 0, 0]]),
        "features": torch.randn(1, dim, length),
    }


def test_segmentation_loss_sums_stages():
    batch = _batch()
    stages = torch.randn(3, 1, 3, 8)
    loss = SegmentationLoss(smoothing_weight=0.15)(stages, batch)
    expected = sum(
        masked_cross_entropy(s, batch["labels"], batch["mask"]) + 0.15 * smoothing_loss(s, batch["mask"])
        for s in stages
    )
    torch.testing.assert_close(loss["loss"], expected)
    single = SegmentationLoss(smoothing_weight=0.0)(stages[0], batch)
    torch.testing.assert_close(single["loss"], masked_cross_entropy(stages[0], batch["labels"], batch["mask"]))


def test_losses_ignore_padding_frames():
    batch = _batch()
    stages = torch.randn(2, 1, 3, 8)
    padded = {k: torch.cat([v, v[..., :5]], dim=-1) for k, v in batch.items()}
    padded["mask"][:, 8:] = False
    padded_stages = torch.cat([stages, 30 * torch.randn(2, 1, 3, 5)], dim=-1)
    loss_fn = SegmentationLoss(smoothing_weight=0.15)
    torch.testing.assert_close(loss_fn(padded_stages, padded)["loss"], loss_fn(stages, batch)["loss"])


# --- The 2-class, 5-frame case: every loss term by hand -------------------------------------------------------------
# Class logits (0, log r_t) with r = (1, 3, 3, 1, 1), so p_t = (1/2, 1/2) where r = 1 and (1/4, 3/4) where r = 3.
# Labels (0, 1, 1, 0, 0): segments start at frames 0, 1 and 3. Features (D = 2) step by (3, 4) (norm 5) between
# frames 0 and 1 and by (0, 2) (norm 2) between frames 2 and 3, and do not move otherwise.
LN2, LN3, LN32 = math.log(2.0), math.log(3.0), math.log(1.5)
LABELS = [0, 1, 1, 0, 0]
BOUNDARIES = [1.0, 1.0, 0.0, 1.0, 0.0]
# Log-probabilities over classes change by (-ln 2, ln 3/2) from frame 0 to 1 and by (ln 2, -ln 3/2) from 2 to 3.
SQUARED_STEP = LN2**2 + LN32**2  # sum over the 2 classes of one changing pair's squared difference
CE_UNWEIGHTED = (3 * LN2 + 2 * math.log(4 / 3)) / 5  # -log p of the true class: ln 2 (x3), ln 4/3 (x2)
CE_MEDIAN_WEIGHTED = math.log(8 / 3) / 2  # class weights (2/3, 1): (2/3 * 3 ln 2 + 2 ln 4/3) / (2/3 * 3 + 2)
GS_TMSE_NORM = (math.exp(-2.5) + math.exp(-1.0)) * SQUARED_STEP / 8  # s = exp(-5/2), exp(-2/2); mean of C x 4 terms
BCE_ZERO_LOGITS_INVERSE_RATIO = 7 * LN2 / 5  # pos_weight 5/3: (3 x 5/3 ln 2 + 2 ln 2) / 5


def _five_frames() -> tuple[torch.Tensor, dict]:
    logits = torch.zeros(1, 2, 5)
    logits[0, 1] = torch.tensor([0.0, LN3, LN3, 0.0, 0.0])
    features = torch.tensor([[[0.0, 3.0, 3.0, 3.0, 3.0], [0.0, 4.0, 4.0, 6.0, 6.0]]])  # (1, D=2, T=5)
    batch = {"labels": torch.tensor([LABELS]), "boundaries": torch.tensor([BOUNDARIES]),
             "mask": torch.ones(1, 5, dtype=torch.bool), "features": features}
    return logits, batch


FIVE_FRAME_COUNTS = LabelCounts(class_counts=np.array([3, 2]), num_boundaries=3, num_frames=5)
# The same video at twice the frame rate, as the published ASRF code counts 50Salads (boundaries stay 3).
FIVE_FRAME_FULL_RATE = LabelCounts(class_counts=np.array([6, 4]), num_boundaries=3, num_frames=10)


def test_mstcn_asformer_loss_two_classes_five_frames():
    logits, batch = _five_frames()
    loss = SegmentationLoss(smoothing_weight=0.15)(torch.stack([logits, logits]), batch)
    # Per stage: mean CE over frames + 0.15 x mean over C x (T - 1) of the squared steps; summed over 2 stages.
    expected = 2 * (CE_UNWEIGHTED + 0.15 * 2 * SQUARED_STEP / 8)
    assert loss["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_class_weighted_cross_entropy_two_classes_five_frames():
    logits, batch = _five_frames()
    weights = class_weights_from_counts(FIVE_FRAME_COUNTS.class_counts, "median_frequency")
    np.testing.assert_allclose(weights, [2 / 3, 1.0], rtol=1e-6)
    got = masked_cross_entropy(logits, batch["labels"], batch["mask"], torch.as_tensor(weights))
    assert got.item() == pytest.approx(CE_MEDIAN_WEIGHTED, rel=1e-6)


def test_gaussian_similarity_norm_and_mean_squared():
    _, batch = _five_frames()
    norm = gaussian_similarity(batch["features"], sigma=1.0, distance="norm")
    torch.testing.assert_close(norm, torch.tensor([[math.exp(-2.5), 1.0, math.exp(-1.0), 1.0]]))
    mean_squared = gaussian_similarity(batch["features"], sigma=1.0, distance="mean_squared")
    torch.testing.assert_close(mean_squared, torch.tensor([[math.exp(-6.25), 1.0, math.exp(-1.0), 1.0]]))
    wide = gaussian_similarity(batch["features"], sigma=2.0, distance="norm")  # 2 sigma^2 = 8
    torch.testing.assert_close(wide, torch.tensor([[math.exp(-5 / 8), 1.0, math.exp(-2 / 8), 1.0]]))


def test_gs_tmse_two_classes_five_frames():
    logits, batch = _five_frames()
    similarity = gaussian_similarity(batch["features"], sigma=1.0, distance="norm")
    over_classes = gaussian_similarity_tmse(logits, similarity, [5], softmax_over="classes", detach_previous=False)
    assert over_classes.item() == pytest.approx(GS_TMSE_NORM, rel=1e-6)
    # The published bug: log-softmax over time. Class 0 is constant (0 change); class 1's slices [1, 5) and
    # [0, 4) are (ln3, ln3, 0, 0) and (0, ln3, ln3, 0), both normalised by ln 8: they differ by (ln3, 0, -ln3, 0).
    over_time = gaussian_similarity_tmse(logits, similarity, [5], softmax_over="time", detach_previous=False)
    assert over_time.item() == pytest.approx((math.exp(-2.5) + math.exp(-1.0)) * LN3**2 / 8, rel=1e-6)


def test_gs_tmse_is_truncated_and_detaches_only_when_asked():
    logits, batch = _five_frames()
    logits[0, 1, 1:3] = 100.0  # frame 1 jumps to log p = (-100, 0): the class-0 step (~99.3^2) is clamped at 16
    similarity = torch.ones(1, 4)
    got = gaussian_similarity_tmse(logits, similarity, [5], softmax_over="classes", detach_previous=False)
    step = (16.0 + LN2**2) / 8  # one jump up (frame 0 -> 1), one down (2 -> 3)
    assert got.item() == pytest.approx(2 * step, rel=1e-5)
    for detach, frame0_moves in ((False, True), (True, False)):
        leaf = logits.clone().requires_grad_(True)
        gaussian_similarity_tmse(leaf, torch.tensor([[0.5, 1.0, 1.0, 1.0]]), [5], softmax_over="classes",
                                 detach_previous=detach).backward()
        assert bool(leaf.grad[..., 0].abs().sum() > 0) == frame0_moves  # frame 0 is only ever the previous frame


def test_gs_tmse_averages_videos_not_frames():
    logits, batch = _five_frames()
    similarity = gaussian_similarity(batch["features"], sigma=1.0, distance="norm")
    both = gaussian_similarity_tmse(torch.cat([logits, logits]), torch.cat([similarity, similarity]), [5, 3],
                                    softmax_over="classes", detach_previous=False)
    short = math.exp(-2.5) * SQUARED_STEP / 4  # frames 0-2: pairs (0, 1) and (1, 2), 2 classes each
    assert both.item() == pytest.approx((GS_TMSE_NORM + short) / 2, rel=1e-6)


def test_boundary_bce_two_classes_five_frames():
    _, batch = _five_frames()
    pos_weight = boundary_pos_weight_from_counts(3, 5, "inverse_ratio")
    assert pos_weight == pytest.approx(5 / 3)
    assert boundary_pos_weight_from_counts(3, 5, "negative_ratio") == pytest.approx(2 / 3)
    assert boundary_pos_weight_from_counts(0, 5, "inverse_ratio") == 1.0
    zeros = torch.zeros(2, 1, 5)
    got = boundary_loss(zeros[:1], batch["boundaries"], batch["mask"], pos_weight)
    assert got.item() == pytest.approx(BCE_ZERO_LOGITS_INVERSE_RATIO, rel=1e-6)
    # Two videos, the second 3 frames long: the mean of each video's mean, as published.
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    both = boundary_loss(zeros, batch["boundaries"].repeat(2, 1), mask, pos_weight)
    second = (2 * pos_weight * LN2 + LN2) / 3
    assert both.item() == pytest.approx((BCE_ZERO_LOGITS_INVERSE_RATIO + second) / 2, rel=1e-6)


def test_class_weights_from_counts():
    # Median frequency: torch.median's lower middle value for an even number of classes, as published.
    np.testing.assert_allclose(class_weights_from_counts([1, 2, 3, 6], "median_frequency"), [2, 1, 2 / 3, 1 / 3],
                               rtol=1e-6)
    np.testing.assert_allclose(class_weights_from_counts([0, 2, 6], "median_frequency"), [0, 1, 1 / 3], rtol=1e-6)
    # More than half of the classes absent: the median of the present classes (the published one would be 0).
    np.testing.assert_allclose(class_weights_from_counts([0, 0, 4], "median_frequency"), [0, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(class_weights_from_counts([2, 6, 0], "inverse_frequency"), [8 / 6, 8 / 18, 0.0],
                               rtol=1e-6)
    assert class_weights_from_counts([2, 6], "none") is None
    with pytest.raises(ValueError, match="class_weighting"):
        class_weights_from_counts([2, 6], "median")


def _asrf_loss(**changes) -> ASRFLoss:
    params = {**default_config()["asrf"]["loss"], **changes}
    return ASRFLoss.from_label_counts(FIVE_FRAME_COUNTS, FIVE_FRAME_FULL_RATE, **params)


def test_asrf_defaults_compute_the_published_loss_two_classes_five_frames():
    """Two segmentation stages (the case's logits, then all zeros) and two boundary stages (all zeros)."""
    logits, batch = _five_frames()
    output = (torch.stack([logits, torch.zeros_like(logits)]), torch.zeros(2, 1, 1, 5))
    got = _asrf_loss()(output, batch)
    # Published: mean over stages of (CE_w + 1.0 x GS-TMSE) + 0.1 x mean over stages of BCE(pos_weight N / n_pos).
    classification = (CE_MEDIAN_WEIGHTED + LN2) / 2  # the zero stage costs ln 2 per frame, whatever the weights
    smoothing = GS_TMSE_NORM / 2  # the zero stage never changes
    expected = classification + 1.0 * smoothing + 0.1 * BCE_ZERO_LOGITS_INVERSE_RATIO
    assert got["classification"].item() == pytest.approx(classification, rel=1e-6)
    assert got["smoothing"].item() == pytest.approx(smoothing, rel=1e-6)
    assert got["boundary"].item() == pytest.approx(BCE_ZERO_LOGITS_INVERSE_RATIO, rel=1e-6)
    assert got["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_asrf_loss_options():
    logits, batch = _five_frames()
    output = (torch.stack([logits, torch.zeros_like(logits)]), torch.zeros(2, 1, 1, 5))
    summed = _asrf_loss(stage_reduction="sum")(output, batch)
    assert summed["classification"].item() == pytest.approx(CE_MEDIAN_WEIGHTED + LN2, rel=1e-6)
    assert summed["boundary"].item() == pytest.approx(2 * BCE_ZERO_LOGITS_INVERSE_RATIO, rel=1e-6)
    assert _asrf_loss(boundary_pos_weighting="negative_ratio").boundary_pos_weight == pytest.approx(2 / 3)
    # Counted at the full rate (published) the boundaries are half as frequent: pos_weight 10 / 3, not 5 / 3.
    assert _asrf_loss(statistics_rate="full").boundary_pos_weight == pytest.approx(10 / 3)
    assert _asrf_loss(statistics_rate="sampled").boundary_pos_weight == pytest.approx(5 / 3)
    unweighted = _asrf_loss(class_weighting="none")(output, batch)
    assert unweighted["classification"].item() == pytest.approx((CE_UNWEIGHTED + LN2) / 2, rel=1e-6)
    squared = _asrf_loss(similarity_distance="mean_squared")(output, batch)
    expected = (math.exp(-6.25) + math.exp(-1.0)) * SQUARED_STEP / 8 / 2
    assert squared["smoothing"].item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="stage_reduction"):
        _asrf_loss(stage_reduction="max")
