"""Temporal models: shapes, masking, causality, gradients, and the pieces with exact answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from etesvs.models.asformer import ASFormer, AttentionBlock, masked_instance_norm, window_attention
from etesvs.models.asrf import ActionSegmentRefinementFramework, detect_boundaries, refine_with_boundaries
from etesvs.models.frame_classifier import FrameClassifier
from etesvs.models.mstcn import MultiStageTCN
from etesvs.models.tcn import DilatedResidualLayer, DilatedStack, SingleStageTCN
from tests.conftest import default_config

IN_CHANNELS, NUM_CLASSES = 6, 5

MODEL_CASES = [
    pytest.param(MultiStageTCN, dict(num_stages=1, num_layers=3, num_feature_maps=8), 1, id="mstcn-1stage"),
    pytest.param(MultiStageTCN, dict(num_stages=3, num_layers=4, num_feature_maps=8), 3, id="mstcn-3stages"),
    pytest.param(MultiStageTCN, dict(num_stages=2, num_layers=3, num_feature_maps=8, causal=True), 2,
                 id="mstcn-causal"),
    pytest.param(ASFormer, dict(num_layers=4, num_feature_maps=8, num_decoders=0), 1, id="asformer-encoder"),
    pytest.param(ASFormer, dict(num_layers=5, num_feature_maps=8, num_decoders=2), 3, id="asformer-2dec"),
    pytest.param(ActionSegmentRefinementFramework,
                 dict(num_layers=3, num_feature_maps=8, num_stages_segmentation=2, num_stages_boundary=1), 2,
                 id="asrf-2-1"),
    pytest.param(ActionSegmentRefinementFramework,
                 dict(num_layers=4, num_feature_maps=8, num_stages_segmentation=3, num_stages_boundary=3), 3,
                 id="asrf-3-3"),
    pytest.param(FrameClassifier, dict(num_feature_maps=8), None, id="frame-classifier"),
]


SECTIONS = {MultiStageTCN: "mstcn", ASFormer: "asformer", ActionSegmentRefinementFramework: "asrf",
            FrameClassifier: "frame_classifier"}


def _build(cls, kwargs) -> nn.Module:
    """``cls`` with conf/'s arguments changed by ``kwargs``."""
    torch.manual_seed(0)
    return cls(in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, **{**default_config()[SECTIONS[cls]]["model"], **kwargs})


def _class_logits(output) -> torch.Tensor:
    """Class logits of any model's output as (S, B, C, T)."""
    logits = output[0] if isinstance(output, tuple) else output
    return logits if logits.dim() == 4 else logits.unsqueeze(0)


def _all_outputs(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, tuple) else [output]


@pytest.mark.parametrize("cls, kwargs, num_stages", MODEL_CASES)
def test_output_shapes_and_probabilities(cls, kwargs, num_stages):
    model = _build(cls, kwargs).eval()
    x, mask = torch.randn(2, IN_CHANNELS, 37), torch.ones(2, 1, 37)
    mask[1, :, 30:] = 0
    output = model(x, mask)
    logits = _class_logits(output)
    expected_stages = num_stages or 1
    assert logits.shape == (expected_stages, 2, NUM_CLASSES, 37)
    if cls is ActionSegmentRefinementFramework:
        assert output[1].shape == (kwargs["num_stages_boundary"], 2, 1, 37)
    probabilities = model.probabilities(output, mask)
    assert probabilities.shape == (2, NUM_CLASSES, 37)
    sums = probabilities.sum(dim=1)
    torch.testing.assert_close(sums[0], torch.ones(37))
    torch.testing.assert_close(sums[1, :30], torch.ones(30))
    assert torch.all(sums[1, 30:] == 0)


@pytest.mark.parametrize("cls, kwargs, num_stages", MODEL_CASES)
def test_padding_does_not_change_valid_outputs(cls, kwargs, num_stages):
    model = _build(cls, kwargs).eval()
    length, padding = 29, 19
    x = torch.randn(1, IN_CHANNELS, length)
    alone = model(x, torch.ones(1, 1, length))
    # Garbage (not zeros) in the padding makes a leak visible.
    padded_x = torch.cat([x, 5 * torch.randn(1, IN_CHANNELS, padding)], dim=2)
    padded_mask = torch.cat([torch.ones(1, 1, length), torch.zeros(1, 1, padding)], dim=2)
    padded = model(padded_x, padded_mask)
    for a, b in zip(_all_outputs(alone), _all_outputs(padded)):
        torch.testing.assert_close(b[..., :length], a, atol=1e-5, rtol=1e-5)
        assert torch.all(b[..., length:] == 0)
    torch.testing.assert_close(model.probabilities(padded, padded_mask)[..., :length],
                               model.probabilities(alone, torch.ones(1, 1, length)), atol=1e-5, rtol=1e-5)


def test_padding_invariance_in_a_mixed_batch():
    """Two videos of different lengths in one batch give the same outputs as each video alone (ASFormer)."""
    model = _build(ASFormer, dict(num_layers=5, num_feature_maps=8, num_decoders=2)).eval()
    short, long = torch.randn(1, IN_CHANNELS, 13), torch.randn(1, IN_CHANNELS, 40)
    batch = torch.zeros(2, IN_CHANNELS, 40)
    batch[0, :, :13], batch[1] = short[0], long[0]
    mask = torch.ones(2, 1, 40)
    mask[0, :, 13:] = 0
    together = model(batch, mask)
    torch.testing.assert_close(together[:, 0:1, :, :13], model(short, torch.ones(1, 1, 13)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:, 1:2], model(long, torch.ones(1, 1, 40)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls, kwargs, num_stages", MODEL_CASES)
def test_gradients_reach_every_parameter(cls, kwargs, num_stages):
    model = _build(cls, kwargs).train()
    x, mask = torch.randn(2, IN_CHANNELS, 33), torch.ones(2, 1, 33)
    output = model(x, mask)
    loss = sum(out.pow(2).mean() for out in _all_outputs(output)) + _class_logits(output)[-1].mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("dilation", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_dilated_residual_layer_receptive_field(dilation, causal):
    torch.manual_seed(0)
    layer = DilatedResidualLayer(dilation=dilation, channels=32, dropout=0.0, causal=causal).eval()
    x, mask = torch.randn(1, 32, 20), torch.ones(1, 1, 20)
    out = layer(x, mask)
    assert out.shape == x.shape
    changed = x.clone()
    changed[:, :, 10] += 1.0
    differs = (layer(changed, mask) - out).abs().sum(dim=1)[0] > 0
    expected_frames = [10, 10 + dilation, 10 + 2 * dilation] if causal else [10 - dilation, 10, 10 + dilation]
    assert sorted(np.flatnonzero(differs.numpy()).tolist()) == expected_frames


@pytest.mark.parametrize("model_cls, kwargs", [
    (SingleStageTCN, dict(num_layers=4, num_feature_maps=8, dropout=0.5, causal=True)),
    (MultiStageTCN, dict(num_stages=3, num_layers=4, num_feature_maps=8, dropout=0.5, causal=True)),
])
def test_causal_models_do_not_look_at_future_frames(model_cls, kwargs):
    torch.manual_seed(0)
    model = model_cls(in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, **kwargs).eval()
    x, mask = torch.randn(1, IN_CHANNELS, 50), torch.ones(1, 1, 50)
    out = model(x, mask)
    future = x.clone()
    future[:, :, 30:] = torch.randn(1, IN_CHANNELS, 20)
    changed = model(future, mask)
    torch.testing.assert_close(changed[..., :30], out[..., :30])
    assert not torch.allclose(changed[..., 30:], out[..., 30:])


def test_non_causal_stage_sees_the_future():
    torch.manual_seed(0)
    model = SingleStageTCN(in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, num_layers=3, num_feature_maps=8,
                           dropout=0.5).eval()
    x, mask = torch.randn(1, IN_CHANNELS, 30), torch.ones(1, 1, 30)
    future = x.clone()
    future[:, :, 20] += 3.0
    assert not torch.allclose(model(future, mask)[..., 19], model(x, mask)[..., 19])


def test_dilated_stack_receptive_field():
    assert DilatedStack(channels=4, num_layers=3, dropout=0.5).receptive_field == 1 + 2 * (1 + 2 + 4)


def _naive_window_attention(query, key, value, mask, window):
    """Reference: full T x T attention restricted to [t - w//2, t - w//2 + w) and valid keys."""
    length = query.shape[2]
    t = torch.arange(length)
    start = t - window // 2
    allowed = (t[None, :] >= start[:, None]) & (t[None, :] < start[:, None] + window)  # (T, T)
    allowed = allowed[None] & (mask[:, 0, None, :] > 0)  # (B, T, T)
    scores = torch.einsum("bct,bcs->bts", query, key) / query.shape[1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1))
    return torch.einsum("bts,bcs->bct", weights, value) * mask


@pytest.mark.parametrize("window", [1, 2, 3, 4, 8, 64])
@pytest.mark.parametrize("length", [1, 7, 16])
def test_window_attention_matches_reference(window, length):
    torch.manual_seed(window * 100 + length)
    query, key, value = torch.randn(2, 4, length), torch.randn(2, 4, length), torch.randn(2, 3, length)
    mask = torch.ones(2, 1, length)
    mask[1, :, (length + 1) // 2:] = 0
    got = window_attention(query, key, value, mask, window, rule="exact")
    torch.testing.assert_close(got, _naive_window_attention(query, key, value, mask, window))


def test_window_of_one_returns_the_values():
    value, mask = torch.randn(1, 3, 9), torch.ones(1, 1, 9)
    for rule in ("exact", "published"):
        got = window_attention(torch.randn(1, 2, 9), torch.randn(1, 2, 9), value, mask, 1, rule=rule)
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-5)


def test_masked_instance_norm_matches_instance_norm_on_valid_frames():
    x = torch.randn(1, 4, 12)
    mask = torch.ones(1, 1, 12)
    expected = nn.InstanceNorm1d(4)(x)
    padded = torch.cat([x, torch.randn(1, 4, 5)], dim=2)
    padded_mask = torch.cat([mask, torch.zeros(1, 1, 5)], dim=2)
    got = masked_instance_norm(padded, padded_mask)
    torch.testing.assert_close(got[..., :12], expected, atol=1e-5, rtol=1e-5)
    assert torch.all(got[..., 12:] == 0)


def test_window_attention_published_mask_by_hand():
    """T = 4, window 2: blocks {0, 1} and {2, 3}, each reading the keys of frames [b - 1, b + 3) (one halo each side).

    With zero queries every score is 0, so the weights are set by the mask alone. Exact: frame t averages the
    values of frames {t - 1, t}. Published: every query of a block sees strip positions 0..2 (frames -1..1 for the
    first block, 1..3 for the second); keys outside get weight 1e-6 inside the softmax and 0 after it.
    """
    values = torch.tensor([[[10.0, 20.0, 30.0, 40.0]]])
    zeros, mask = torch.zeros(1, 1, 4), torch.ones(1, 1, 4)
    exact = window_attention(zeros, zeros, values, mask, 2, rule="exact")
    torch.testing.assert_close(exact, torch.tensor([[[10.0, 15.0, 25.0, 35.0]]]))
    published = window_attention(zeros, zeros, values, mask, 2, rule="published")
    allowed = 1.0 + 1e-6  # exp(0 + log(1 + 1e-6)); a masked key: exp(log(1e-6)) = 1e-6
    first = (10.0 + 20.0) * allowed / (2 * allowed + 2e-6)  # masked: the left halo and frame 2
    second = (20.0 + 30.0 + 40.0) * allowed / (3 * allowed + 1e-6)  # masked: the right halo
    torch.testing.assert_close(published, torch.tensor([[[first, first, second, second]]]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("query_key, wide_inputs", [("own", 0), ("concat", 2)])
def test_asformer_decoder_query_key_inputs(query_key, wide_inputs):
    """Published: a decoder's queries and keys read its own features only (no weight of twice the width)."""
    model = _build(ASFormer, dict(num_layers=3, num_feature_maps=8, num_decoders=2, decoder_query_key=query_key))
    wide = [name for name, p in model.named_parameters() if p.dim() == 3 and p.shape[1] == 16]
    assert len(wide) == wide_inputs * 3 * 2  # query and key of every block of both decoders
    assert all(".query." in name or ".key." in name for name in wide)


def test_asformer_decoder_block_reads_values_from_the_previous_stage():
    """One decoder block by hand: Q, K = proj(norm(relu(conv(x)))), V = proj(previous stage's features)."""
    torch.manual_seed(0)
    block = AttentionBlock(dilation=2, channels=4, cross=True, alpha=0.5, dropout=0.0, query_key="own",
                           attention_mask="exact").eval()
    x, context, mask = torch.randn(1, 4, 7), torch.randn(1, 4, 7), torch.ones(1, 1, 7)
    hidden = torch.relu(block.feed_forward(x))
    normed = nn.functional.instance_norm(hidden)
    attended = _naive_window_attention(block.query(normed), block.key(normed), block.value(context), mask, 2)
    expected = x + block.conv_1x1(0.5 * block.attention_out(torch.relu(attended)) + hidden)
    torch.testing.assert_close(block(x, mask, context), expected, rtol=1e-5, atol=1e-5)


# Boundary probabilities with a tie, a plateau, a peak below the threshold and a peak on the last frame.
BOUNDARY_CASE = np.array([0.9, 0.2, 0.7, 0.3, 0.6, 0.6, 0.1, 0.55, 0.2, 0.45, 0.3, 0.8])


def test_detect_boundaries_published_rule():
    # Below 0.5 counts as 0; 2 and 7 are strict maxima; the plateau 4-5 is not; 9 (0.45) is below the threshold;
    # the last frame (0.8) never is; frame 0 always starts a segment and is not reported.
    assert detect_boundaries(BOUNDARY_CASE, threshold=0.5, min_distance=0).tolist() == [2, 7]
    assert detect_boundaries(BOUNDARY_CASE, threshold=0.4, min_distance=0).tolist() == [2, 7, 9]
    assert detect_boundaries(np.array([0.0, 0.5, 0.0]), threshold=0.5, min_distance=0).tolist() == [1]  # >= th
    assert detect_boundaries(np.array([0.0, 0.9]), threshold=0.5, min_distance=0).tolist() == []


def test_detect_boundaries_minimum_distance_option():
    probability = np.array([0.0, 0.8, 0.0, 0.6, 0.0, 0.0, 0.0, 0.0, 0.7, 0.0])
    assert detect_boundaries(probability, threshold=0.5, min_distance=0).tolist() == [1, 3, 8]
    assert detect_boundaries(probability, threshold=0.5, min_distance=3).tolist() == [1, 8]  # 3 is below 1's 0.8
    equal = np.array([0.0, 0.9, 0.0, 0.9, 0.0])
    assert detect_boundaries(equal, threshold=0.5, min_distance=2).tolist() == [1, 3]
    assert detect_boundaries(equal, threshold=0.5, min_distance=3).tolist() == [1]  # the first of equal peaks


# Three spans [0, 4), [4, 8), [8, 10). Span 0: votes 0, 1, 0, 1 with logit sums 2 (class 0) and 6 (class 1).
# Span 1: votes 2, 0, 2, 0 with logit sums -10 (class 0) and -7.5 (class 2), both <= 0. Span 2: class 2, no tie.
TIE_LOGITS = torch.tensor([
    [1, 0, -5], [0, 3, -5], [1, 0, -5], [0, 3, -5],
    [-4, -9, -1], [-1, -9, -1.5], [-4, -9, -1], [-1, -9, -4],
    [0, 0, 1], [0, 0, 1],
]).T  # (T, C) -> (C, T)


@pytest.mark.parametrize("tie_break, expected", [
    ("logit_sum", [1] * 4 + [2] * 4 + [2] * 2),      # the larger logit sum, negative or not
    ("published", [1] * 4 + [1] * 4 + [2] * 2),      # sums <= 0: the previous span's class, even if not tied
    ("lowest_class", [0] * 4 + [0] * 4 + [2] * 2),
])
def test_refinement_tie_breaks(tie_break, expected):
    probabilities = torch.softmax(TIE_LOGITS, dim=0)
    refined = refine_with_boundaries(probabilities, TIE_LOGITS, np.array([4, 8]), tie_break=tie_break)
    assert refined.argmax(dim=0).tolist() == expected
    torch.testing.assert_close(refined.sum(dim=0), torch.ones(10))
    torch.testing.assert_close(refined[:, 0], torch.tensor([0.5, 0.5, 0.0]), atol=1e-4, rtol=0)  # the vote shares
    torch.testing.assert_close(refined[:, 9], torch.tensor([0.0, 0.0, 1.0]))  # untied spans are left exact


def test_published_tie_break_on_the_first_span_takes_the_lowest_tied_class():
    logits = torch.tensor([[-1.0, -3.0], [-1.2, -1.0]])  # (C=2, T=2): votes 0, 1; sums -4 and -2.2
    probabilities = torch.softmax(logits, dim=0)
    published = refine_with_boundaries(probabilities, logits, np.zeros(0, dtype=np.int64), tie_break="published")
    assert published.argmax(dim=0).tolist() == [0, 0]
    by_sum = refine_with_boundaries(probabilities, logits, np.zeros(0, dtype=np.int64), tie_break="logit_sum")
    assert by_sum.argmax(dim=0).tolist() == [1, 1]


def test_refine_with_boundaries_takes_the_majority_of_each_span():
    predicted = torch.tensor([0, 0, 1, 0, 2, 2, 1, 2, 2])
    logits = nn.functional.one_hot(predicted, 3).T.float() * 3  # (C, T), argmax = predicted
    refined = refine_with_boundaries(torch.softmax(logits, dim=0), logits, np.array([4]), tie_break="logit_sum")
    assert refined.argmax(dim=0).tolist() == [0, 0, 0, 0, 2, 2, 2, 2, 2]
    torch.testing.assert_close(refined[:, 0], torch.tensor([0.75, 0.25, 0.0]))
    torch.testing.assert_close(refined[:, 5], torch.tensor([0.0, 0.2, 0.8]))
    torch.testing.assert_close(refined.sum(dim=0), torch.ones(9))


def test_asrf_probabilities_use_the_boundary_head():
    model = _build(ActionSegmentRefinementFramework,
                   dict(num_layers=2, num_feature_maps=4, num_stages_segmentation=1, num_stages_boundary=1))
    labels = torch.tensor([0, 0, 1, 0, 2, 2, 1, 2, 2])
    class_logits = (nn.functional.one_hot(labels, NUM_CLASSES).T.float() * 5)[None, None]  # (1, 1, C, T)
    boundary_logits = torch.full((1, 1, 1, 9), -5.0)
    boundary_logits[..., 4] = 5.0
    boundary_logits[..., 8] = 5.0  # a peak on the last frame is never a boundary
    probabilities = model.probabilities((class_logits, boundary_logits), torch.ones(1, 1, 9))
    assert probabilities.argmax(dim=1)[0].tolist() == [0, 0, 0, 0, 2, 2, 2, 2, 2]


def test_model_options_are_checked():
    with pytest.raises(ValueError, match="tie_break"):
        _build(ActionSegmentRefinementFramework, dict(tie_break="random"))
    with pytest.raises(ValueError, match="decoder_query_key"):
        _build(ASFormer, dict(num_layers=2, num_feature_maps=8, decoder_query_key="both"))
    with pytest.raises(ValueError, match="attention_mask"):
        _build(ASFormer, dict(num_layers=2, num_feature_maps=8, attention_mask="soft"))(
            torch.randn(1, IN_CHANNELS, 5), torch.ones(1, 1, 5))
