"""Losses: exact values on hand-computed cases, masking, and which way gradients flow."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from etesvs.losses import (
    ASRFLoss,
    SegmentationLoss,
    boundary_loss,
    boundary_pos_weight_from_counts,
    class_weights_from_counts,
    gaussian_similarity,
    masked_cross_entropy,
    smoothing_loss,
)


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


def test_similarity_weighted_smoothing():
    logits = _two_frames([math.log(3.0), 0.0])
    plain = smoothing_loss(logits, torch.ones(1, 2, dtype=torch.bool))
    weighted = smoothing_loss(logits, torch.ones(1, 2, dtype=torch.bool), similarity=torch.tensor([[0.25]]))
    assert weighted.item() == pytest.approx(0.25 * plain.item(), rel=1e-6)


def test_gaussian_similarity_values():
    features = torch.zeros(1, 4, 3)
    features[0, :, 2] = 2.0  # frames 1 -> 2 differ by 2 in each of 4 dims: mean squared difference 4
    similarity = gaussian_similarity(features, sigma=1.0)
    torch.testing.assert_close(similarity, torch.tensor([[1.0, math.exp(-2.0)]]))


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


def test_class_weights_and_pos_weight_from_counts():
    np.testing.assert_allclose(class_weights_from_counts([2, 6, 0]), [8 / 6, 8 / 18, 0.0], rtol=1e-6)
    assert boundary_pos_weight_from_counts(10, 100) == pytest.approx(9.0)
    assert boundary_pos_weight_from_counts(0, 100) == 1.0


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


def test_asrf_loss_components():
    batch = _batch()
    class_logits, boundary_logits = torch.randn(2, 1, 3, 8), torch.randn(2, 1, 1, 8)
    weights = [1.0, 0.5, 2.0]
    loss_fn = ASRFLoss(class_weights=weights, boundary_pos_weight=2.0, smoothing_weight=0.15, boundary_weight=0.1,
                       similarity_sigma=1.0)
    got = loss_fn((class_logits, boundary_logits), batch)
    similarity = gaussian_similarity(batch["features"], 1.0)
    mask = batch["mask"]
    classification = sum(masked_cross_entropy(s, batch["labels"], mask, torch.tensor(weights)) for s in class_logits)
    smoothing = sum(smoothing_loss(s, mask, similarity=similarity) for s in class_logits)
    boundary = sum(boundary_loss(b, batch["boundaries"], mask, 2.0) for b in boundary_logits)
    torch.testing.assert_close(got["loss"], classification + 0.15 * smoothing + 0.1 * boundary)
    torch.testing.assert_close(got["boundary"], boundary)


def test_losses_ignore_padding_frames():
    batch = _batch()
    stages = torch.randn(2, 1, 3, 8)
    padded = {k: torch.cat([v, v[..., :5]], dim=-1) for k, v in batch.items()}
    padded["mask"][:, 8:] = False
    padded_stages = torch.cat([stages, 30 * torch.randn(2, 1, 3, 5)], dim=-1)
    loss_fn = SegmentationLoss(smoothing_weight=0.15)
    torch.testing.assert_close(loss_fn(padded_stages, padded)["loss"], loss_fn(stages, batch)["loss"])
