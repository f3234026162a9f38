"""The streaming model (ETESVS): model, loss, window sampling, training loop, stage and 2-process equivalence."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from etesvs.data.frames import write_frame_container
from etesvs.data.windows import PADDING, LockstepWindowSampler, VideoWindows, lockstep_schedule
from etesvs.io import write_json
from etesvs.losses import streaming_loss
from etesvs.models.streaming import (HEADS, SmallMapDepthwiseConv2d, StreamingSegmenter, load_pretrained_backbone,
                                     small_map_depthwise, temporal_shift)
from etesvs.streaming_training import predict
from etesvs.errors import EtesvsError

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = {"width_mult": 0.35, "temporal_shift": False, "shift_divisor": 8, "shift_across_windows": False,
        "stem_shift": False, "memory_channels": 8,
        "head": "causal_tcn", "head_stages": 1, "head_layers": 3, "head_channels": 8, "norm": "batch"}


def tiny_model(**overrides) -> StreamingSegmenter:
    torch.manual_seed(0)
    return StreamingSegmenter(num_classes=4, **{**TINY, "dropout": 0.0, **overrides})


def make_dataset(
    root: Path, lengths: dict[str, int], *, size=(32, 40), train=None, test=None, classes=4
) -> tuple[Path, Path]:
    """Frame containers and a labels directory of videos whose colour follows the class (learnable, tiny)."""
    rng = np.random.default_rng(0)
    frames_dir, labels_dir = root / "frames", root / "labels"
    frames_dir.mkdir(parents=True)
    labels_dir.mkdir(parents=True)
    palette = rng.integers(0, 256, size=(classes, 3))
    with h5py.File(labels_dir / "labels.h5", "w") as handle:
        for video, length in lengths.items():
            labels = np.repeat(rng.integers(0, classes, size=length // 6 + 1), 6)[:length].astype(np.int64)
            group = handle.create_group(video)
            group.create_dataset("classes", data=labels)
            group.create_dataset("boundaries", data=np.r_[1, labels[1:] != labels[:-1]].astype(np.uint8))
            images = np.broadcast_to(palette[labels][:, None, None, :], (length, *size, 3))
            noise = rng.integers(-20, 20, size=images.shape)
            write_frame_container(frames_dir / f"{video}.h5", np.clip(images + noise, 0, 255).astype(np.uint8), 15.0)
    videos = list(lengths)
    write_json(
        labels_dir / "info.json",
        {"dataset": "tiny", "fps": 15.0, "classes": [f"class{i}" for i in range(classes)], "background": ["class0"],
         "background_ids": [0], "split": 1, "train": train or videos[:-1], "test": test or videos[-1:],
         "num_frames": lengths},
    )  # fmt: skip
    return frames_dir, labels_dir


# ----------------------------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_shapes_masking_and_gradients(head, shift, norm):
    model = tiny_model(head=head, temporal_shift=shift, norm=norm)
    frames = torch.randn(3, 5, 3, 32, 32)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2] = False  # a video that has ended
    outputs, state = model(frames, mask)
    assert outputs["head_logits"].shape == (3, 4, 5)
    assert outputs["memory_logits"].shape == (3, 4, 5)
    assert outputs["backbone_logits"].shape == (3, 4)
    assert state.hidden.shape == (3, 8, 1, 1) and not state.hidden.requires_grad
    assert state.head_inputs.shape[2] == {"causal_tcn": 2 * (1 + 2 + 4), "cached_tcn": 1 + 2 + 4, "tcn": 0}[head]
    # Padding frames and ended rows give exactly zero.
    assert torch.all(outputs["head_logits"][1, :, 3:] == 0) and torch.all(outputs["head_logits"][2] == 0)
    assert torch.all(outputs["backbone_logits"][2] == 0)
    labels = torch.randint(0, 4, (3, 5))
    loss = streaming_loss(outputs, labels, mask, frame_weights=torch.full((3,), 0.2), window_weights=torch.ones(3),
                          smoothing_weight=0.15, smooth_across_windows=True)
    loss["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.backbone[0][0].weight.grad.abs().sum() > 0
    assert model.memory.gates.weight.grad.abs().sum() > 0


def test_backbone_trains_channels_last_with_a_plain_state_dict():
    # Channels-last is what makes oneDNN's depthwise convolutions fast; the state dict stays loadable either way.
    model = tiny_model(temporal_shift=True, stem_shift=True)
    convolutions = [m.weight for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(weight.is_contiguous(memory_format=torch.channels_last) for weight in convolutions)
    features, _ = model.backbone_features(torch.randn(2 * 4, 3, 32, 32), num_frames=4)  # NCHW frames in
    assert features.is_contiguous(memory_format=torch.channels_last)
    plain = tiny_model(temporal_shift=True, stem_shift=True)
    plain.backbone.to(memory_format=torch.contiguous_format)
    plain.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))


def test_padding_content_does_not_matter():
    model = tiny_model(temporal_shift=True).eval()
    frames = torch.randn(2, 6, 3, 32, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    garbage = frames.clone()
    garbage[0, 4:] = torch.randn(2, 3, 32, 32) * 100
    with torch.no_grad():
        first, _ = model(frames, mask)
        second, _ = model(garbage, mask)
    for key in first:
        torch.testing.assert_close(first[key], second[key])


def randomise_batch_norm(model: StreamingSegmenter) -> StreamingSegmenter:
    """Running statistics and affine parameters as trained ones look: a zero frame no longer gives zero features."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.bias.normal_(0.0, 0.5, generator=generator)
    return model


@pytest.mark.parametrize("across", [False, True])
@pytest.mark.parametrize("head", ["tcn", "causal_tcn"])
def test_a_short_last_window_labels_as_the_padded_window(head, across):
    # The stream does not pad a video's last window: its real frames must get the padded window's outputs and state,
    # also when BatchNorm gives a padding frame non-zero features (the shifts must pass zeros from it).
    model = randomise_batch_norm(
        tiny_model(temporal_shift=True, stem_shift=True, shift_across_windows=across, head=head)
    ).eval()
    frames = torch.randn(1, 6, 3, 32, 32)
    first = torch.randn(1, 6, 3, 32, 32)
    padded_mask = torch.ones(1, 6, dtype=torch.bool)
    padded_mask[0, 4:] = False
    with torch.no_grad():
        _, state = model(first, torch.ones(1, 6, dtype=torch.bool))
        padded, padded_state = model(frames, padded_mask, state)
        short, short_state = model(frames[:, :4], padded_mask[:, :4], state)
    torch.testing.assert_close(short["head_logits"], padded["head_logits"][:, :, :4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(short["memory_logits"], padded["memory_logits"][:, :, :4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(short["backbone_logits"], padded["backbone_logits"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(short_state.hidden, padded_state.hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(short_state.shift_carry, padded_state.shift_carry, atol=1e-5, rtol=1e-4)
    assert short_state.shift_carry.shape[1] > 0 if across else short_state.shift_carry.shape[1] == 0


def test_shift_across_windows_streams_the_backbone_exactly():
    # Carrying the forward shift, a window's first frame gets the features it would get inside one long clip; only
    # the last frame of a window differs (it receives zeros from the frame after it, which is not seen yet).
    model = randomise_batch_norm(tiny_model(temporal_shift=True, stem_shift=True, shift_across_windows=True)).eval()
    frames = torch.randn(1, 8, 3, 32, 32)
    mask = torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad():
        whole, _ = model.backbone_features(frames.flatten(0, 1), 8)
        first, _, carry = model._backbone_pass(frames[:, :4], mask[:, :4], None)
        second, _, _ = model._backbone_pass(frames[:, 4:], mask[:, 4:], carry)
        alone, _, _ = model._backbone_pass(frames[:, 4:], mask[:, 4:], None)
    whole = whole.unflatten(0, (1, 8))
    # Frames far from the window's end match the long clip: the first window's first and the second window's first.
    for streamed, index in ((first[:, 0], 0), (second[:, 0], 4)):
        torch.testing.assert_close(streamed, whole[:, index], atol=1e-6, rtol=1e-5)
    assert (alone[:, 0] - whole[:, 4]).abs().max() > 1e-4  # without the carry, the first frame differs
    assert (first[:, 3] - whole[:, 3]).abs().max() > 1e-4  # the last frame cannot see the next window
    # The same through the whole model, with reset: a new video starts from zeros whatever was carried.
    with torch.no_grad():
        _, state = model(frames[:, :4], mask[:, :4])
        assert state.shift_carry.abs().sum() > 0
        reset, _ = model(frames[:, 4:], mask[:, 4:], state, reset=torch.tensor([True]))
        fresh, _ = model(frames[:, 4:], mask[:, 4:])
    torch.testing.assert_close(reset["head_logits"], fresh["head_logits"])


def test_shift_across_windows_is_off_without_the_option():
    model = randomise_batch_norm(tiny_model(temporal_shift=True, stem_shift=True)).eval()
    frames = torch.randn(1, 8, 3, 32, 32)
    mask = torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad():
        _, state = model(frames[:, :4], mask[:, :4])
        carried, _ = model(frames[:, 4:], mask[:, 4:], state)
        fresh_state = model.initial_state(1, tuple(state.hidden.shape[2:]))
        fresh_state = fresh_state._replace(hidden=state.hidden, cell=state.cell, head_inputs=state.head_inputs,
                                           head_mask=state.head_mask, last_logits=state.last_logits,
                                           last_mask=state.last_mask)  # fmt: skip
        same, _ = model(frames[:, 4:], mask[:, 4:], fresh_state)
    assert state.shift_carry.shape == (1, 0)
    torch.testing.assert_close(carried["head_logits"], same["head_logits"])


def test_a_carried_shift_state_of_the_wrong_size_is_refused():
    model = tiny_model(temporal_shift=True, shift_across_windows=True).eval()
    mask = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        _, state = model(torch.randn(1, 4, 3, 32, 32), mask)
        with pytest.raises(ValueError, match="carried shift state"):
            model(torch.randn(1, 4, 3, 64, 64), mask, state)


def test_temporal_shift_moves_channels_between_neighbours():
    x = torch.arange(2 * 3 * 16, dtype=torch.float32).view(2 * 3, 16, 1, 1)  # 2 clips of 3 frames, 16 channels
    shifted = temporal_shift(x, 3, 8).view(2, 3, 16)
    clips = x.view(2, 3, 16)
    assert torch.equal(shifted[:, 1:, :2], clips[:, :-1, :2]) and torch.all(shifted[:, 0, :2] == 0)
    assert torch.equal(shifted[:, :-1, 2:4], clips[:, 1:, 2:4]) and torch.all(shifted[:, -1, 2:4] == 0)
    assert torch.equal(shifted[:, :, 4:], clips[:, :, 4:])


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (2, 3), (3, 3)])
def test_small_map_depthwise_is_the_convolution_and_its_gradients(size):
    torch.manual_seed(0)
    x = torch.randn(3, 5, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(5, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    reference = torch.nn.functional.conv2d(x, weight, bias, padding=1, groups=5)
    out = small_map_depthwise(x, weight, bias)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    upstream = torch.randn_like(reference)
    for mine, theirs in zip(torch.autograd.grad(out, (x, weight, bias), upstream),
                            torch.autograd.grad(reference, (x, weight, bias), upstream)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


def test_backbone_small_maps_train_by_product_and_evaluate_by_convolution():
    model = tiny_model(temporal_shift=True, stem_shift=True)
    depthwise = [m for m in model.backbone.modules() if isinstance(m, SmallMapDepthwiseConv2d)]
    strided = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.stride == (2, 2)]
    assert len(depthwise) == 13 and len(strided) == 4 and not any(isinstance(m, SmallMapDepthwiseConv2d) for m in strided)
    plain = tiny_model(temporal_shift=True, stem_shift=True)
    for module in plain.backbone.modules():
        if isinstance(module, SmallMapDepthwiseConv2d):
            module.__class__ = torch.nn.Conv2d
    assert list(plain.state_dict()) == list(model.state_dict())
    frames = torch.randn(2 * 4, 3, 48, 48)  # the last stage's maps are 2 x 2
    for train in (False, True):  # eval first: a training pass moves BatchNorm's running statistics
        model.train(train), plain.train(train)
        ours, _ = model.backbone_features(frames, num_frames=4)
        theirs, _ = plain.backbone_features(frames, num_frames=4)
        if train:  # the product: equal up to rounding
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        else:  # the convolution itself
            assert torch.equal(ours, theirs)


def stream_two_windows(model: StreamingSegmenter, frames: torch.Tensor) -> tuple[dict, dict, dict, object]:
    """One pass over a clip of 8 frames, and the same clip streamed as two windows of 4: (whole, first, second, the
    state after the first window)."""
    mask = torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad():
        whole, _ = model(frames, mask)
        first, state = model(frames[:, :4], mask[:, :4])
        second, _ = model(frames[:, 4:], mask[:, 4:], state)
    return whole, first, second, state


@pytest.mark.parametrize("stages", [1, 2])
def test_causal_model_streams_exactly_and_never_peeks_ahead(stages):
    model = tiny_model(head="causal_tcn", head_stages=stages, norm="group").eval()
    assert model.head_cache_frames == stages * 14  # dilations 1, 2, 4: each stage sees 14 earlier frames
    frames = torch.randn(1, 8, 3, 32, 32)
    mask = torch.ones(1, 8, dtype=torch.bool)
    whole, first, second, _ = stream_two_windows(model, frames)
    with torch.no_grad():
        assert whole["stage_logits"].shape == (stages, 1, 4, 8)
        torch.testing.assert_close(whole["head_logits"], whole["stage_logits"][-1])
        for key in ("head_logits", "stage_logits"):
            streamed = torch.cat([first[key], second[key]], dim=-1)
            torch.testing.assert_close(streamed, whole[key], atol=1e-5, rtol=1e-4)
        # The second window knows the stages' logits at the first window's last frame; the first knows none.
        assert not first["previous_mask"].any() and second["previous_mask"].all()
        torch.testing.assert_close(second["previous_logits"], whole["stage_logits"][..., 3], atol=1e-5, rtol=1e-4)
        changed = frames.clone()
        changed[:, 5:] = torch.randn(1, 3, 3, 32, 32)
        future, _ = model(changed, mask)
    torch.testing.assert_close(future["head_logits"][:, :, :5], whole["head_logits"][:, :, :5])
    assert not torch.allclose(future["head_logits"][:, :, 5:], whole["head_logits"][:, :, 5:])


@pytest.mark.parametrize("stages", [1, 2])
def test_cached_head_sees_the_past_and_the_rest_of_its_window(stages):
    # The centred head with a cache: a window's frames see the previous windows (as a pass over the video so far
    # does) and the later frames of their own window, but nothing after the window's end.
    model = tiny_model(head="cached_tcn", head_stages=stages, norm="group").eval()
    assert model.head_cache_frames == stages * 7  # dilations 1, 2, 4: each stage reaches 7 frames each way
    frames = torch.randn(1, 8, 3, 32, 32)
    whole, first, second, state = stream_two_windows(model, frames)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        alone, _ = model(frames[:, 4:], mask)
        changed = frames[:, 4:].clone()
        changed[:, 3] = torch.randn(3, 32, 32)  # the window's last frame
        later, _ = model(changed, mask, state)
    for key in ("head_logits", "stage_logits"):  # the video so far, seen whole, labels its last window the same
        torch.testing.assert_close(second[key], whole[key][..., 4:], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(second["head_logits"], alone["head_logits"], atol=1e-4)  # the past counts
    assert not torch.allclose(first["head_logits"][..., 3], whole["head_logits"][..., 3], atol=1e-4)  # no peeking
    assert not torch.allclose(later["head_logits"][..., 0], second["head_logits"][..., 0], atol=1e-4)  # lookahead


@pytest.mark.parametrize("head", HEADS)
def test_state_is_carried_and_reset_per_row(head):
    model = tiny_model(head=head).eval()
    first = torch.randn(2, 4, 3, 32, 32)
    second = torch.randn(2, 4, 3, 32, 32)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        _, state = model(first, mask)
        carried, _ = model(second, mask, state, reset=torch.tensor([True, False]))
        fresh, _ = model(second, mask)
    torch.testing.assert_close(carried["head_logits"][0], fresh["head_logits"][0])
    assert not torch.allclose(carried["head_logits"][1], fresh["head_logits"][1])
    torch.testing.assert_close(carried["memory_logits"][0], fresh["memory_logits"][0])
    assert carried["previous_mask"].tolist() == [False, True]
    assert torch.all(carried["previous_logits"][:, 0] == 0) and carried["previous_logits"][:, 1].abs().sum() > 0


def test_last_logits_come_from_each_rows_last_real_frame():
    model = tiny_model(head="tcn", head_stages=2).eval()
    frames = torch.randn(3, 4, 3, 32, 32)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    with torch.no_grad():
        first, state = model(frames, mask)
        second, _ = model(frames, torch.ones(3, 4, dtype=torch.bool), state)
    assert second["previous_mask"].tolist() == [True, True, False]
    torch.testing.assert_close(second["previous_logits"][:, 0], first["stage_logits"][:, 0, :, 3])
    torch.testing.assert_close(second["previous_logits"][:, 1], first["stage_logits"][:, 1, :, 1])


def test_no_gradient_reaches_the_previous_window():
    model = tiny_model()
    first = torch.randn(1, 4, 3, 32, 32, requires_grad=True)
    second = torch.randn(1, 4, 3, 32, 32, requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, state = model(first, mask)
    outputs, _ = model(second, mask, state)
    outputs["head_logits"].sum().backward()
    assert first.grad is None
    assert second.grad is not None and second.grad.abs().sum() > 0


def test_loss_ignores_padding_and_weights_rows():
    torch.manual_seed(0)
    head = torch.randn(2, 3, 5)
    outputs = {
        "head_logits": head, "stage_logits": head[None], "previous_logits": torch.randn(1, 2, 3),
        "previous_mask": torch.tensor([False, False]), "memory_logits": torch.randn(2, 3, 5),
        "backbone_logits": torch.randn(2, 3),
    }
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    labels = torch.tensor([[0, 0, 1, 1, 2], [2, 2, 2, 0, 1]])
    other = labels.clone()
    other[1, 3:] = 2  # different labels on padding frames
    weights = {"frame_weights": torch.tensor([1.0, 0.5]), "window_weights": torch.tensor([1.0, 0.5]),
               "smoothing_weight": 0.15, "smooth_across_windows": True}
    first = streaming_loss(outputs, labels, mask, **weights)
    second = streaming_loss(outputs, other, mask, **weights)
    assert float(first["loss"]) == pytest.approx(float(second["loss"]))
    # Backbone target of row 1 is one-hot on class 2 (its three valid frames): plain cross-entropy, halved.
    row0 = -(torch.tensor([0.4, 0.4, 0.2]) * outputs["backbone_logits"][0].log_softmax(0)).sum()
    row1 = -outputs["backbone_logits"][1].log_softmax(0)[2]
    assert float(first["backbone"]) == pytest.approx(float(row0 + 0.5 * row1), rel=1e-5)
    # Dropping a row's weight to zero removes it.
    only_first = streaming_loss(outputs, labels, mask, frame_weights=torch.tensor([1.0, 0.0]),
                                window_weights=torch.tensor([1.0, 0.0]), smoothing_weight=0.15,
                                smooth_across_windows=True)  # fmt: skip
    assert float(only_first["head"]) == pytest.approx(
        float(torch.nn.functional.cross_entropy(outputs["head_logits"][:1], labels[:1], reduction="sum")), rel=1e-5
    )


def test_smoothing_pairs_cross_windows_as_in_one_sequence():
    """Two windows give every stage the smoothing loss of the whole sequence: the pair made of the first window's
    last frame and the second window's first frame counts too."""
    torch.manual_seed(0)
    stages = torch.randn(2, 1, 3, 8)  # 2 stages, 1 video of 8 frames, 3 classes
    labels = torch.randint(0, 3, (1, 8))
    weights = {"frame_weights": torch.tensor([1.0]), "window_weights": torch.tensor([0.0]), "smoothing_weight": 1.0}

    def window(start, stop, previous, across=True):
        outputs = {"head_logits": stages[-1, :, :, start:stop], "stage_logits": stages[..., start:stop],
                   "previous_logits": stages[..., max(start - 1, 0)], "previous_mask": torch.tensor([previous]),
                   "memory_logits": torch.zeros(1, 3, stop - start), "backbone_logits": torch.zeros(1, 3)}
        return streaming_loss(outputs, labels[:, start:stop], torch.ones(1, stop - start, dtype=torch.bool),
                              smooth_across_windows=across, **weights)

    whole, first, second = window(0, 8, False), window(0, 5, False), window(5, 8, True)
    assert float(first["smoothing"] + second["smoothing"]) == pytest.approx(float(whole["smoothing"]), rel=1e-5)
    assert float(first["head"] + second["head"]) == pytest.approx(float(whole["head"]), rel=1e-5)
    unpaired = window(5, 8, False)
    assert float(unpaired["smoothing"]) < float(second["smoothing"])
    # The authors' loss (smooth_across_windows false) ignores the frame before the window.
    assert float(window(5, 8, True, across=False)["smoothing"]) == pytest.approx(float(unpaired["smoothing"]))
    expected = sum(float(torch.nn.functional.cross_entropy(stage, labels, reduction="sum")) for stage in stages)
    assert float(whole["head"]) == pytest.approx(expected, rel=1e-5)


def test_pretrained_weights_from_a_file(tmp_path):
    import torchvision

    source = torchvision.models.mobilenet_v2(weights=None, width_mult=0.35)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(source.state_dict(), path)
    model = tiny_model()
    assert load_pretrained_backbone(model, str(path)) == str(path)
    torch.testing.assert_close(model.backbone[0][0].weight, source.features[0][0].weight)
    assert load_pretrained_backbone(model, "") == "random initialisation"
    with pytest.raises(EtesvsError, match="do not fit"):
        load_pretrained_backbone(tiny_model(width_mult=0.5), str(path))
    with pytest.raises(EtesvsError, match="not found"):
        load_pretrained_backbone(model, str(tmp_path / "missing.pth"))


def test_mmaction_tsm_checkpoints_load_by_order_and_shape(tmp_path):
    """The ETESVS authors' weights (mmcls / mmaction2 layout: backbone.conv1.conv.weight, backbone.layer1.0...)."""
    import torchvision

    source = torchvision.models.mobilenet_v2(weights=None, width_mult=0.35)
    tensors = list(source.features.state_dict().items())
    # Names in the mmcls style; what matters is that the tensors come in the same order as torchvision's.
    state = {f"backbone.block{i // 6}.part{i % 6}.{key.rsplit('.', 1)[1]}": value
             for i, (key, value) in enumerate(tensors)}
    state["cls_head.fc_cls.weight"] = torch.zeros(400, 1280)
    path = tmp_path / "tsm_mobilenetv2_kinetics400.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 100}}, path)
    model = tiny_model()
    assert load_pretrained_backbone(model, str(path)) == str(path)
    for (key, expected), got in zip(tensors, model.backbone.state_dict().values()):
        torch.testing.assert_close(got, expected, msg=key)
    with pytest.raises(EtesvsError, match="has shape .* where the backbone's .* has"):
        load_pretrained_backbone(tiny_model(width_mult=0.5), str(path))
    torch.save({"conv.weight": torch.zeros(2)}, path)
    with pytest.raises(EtesvsError, match="neither 'features.[*]' .* nor 'backbone.[*]'"):
        load_pretrained_backbone(model, str(path))


# ----------------------------------------------------------------------------------------------------------------
# Windows


def test_lockstep_schedule_covers_every_window_once_and_shards_evenly():
    lengths = [70, 20, 33, 5, 64]
    single = lockstep_schedule(lengths, batch_videos=2, window=16, shuffle=True, seed=3, epoch=1)
    seen = [(ref.video, ref.window) for step in single for ref in step if ref.video != PADDING]
    expected = [(v, w) for v, n in enumerate(lengths) for w in range(-(-n // 16))]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    for step in single:  # each video's windows come in order, one step after the other
        assert all(ref.group_end == step[0].group_end for ref in step)
    ranks = [lockstep_schedule(lengths, batch_videos=2, window=16, shuffle=True, seed=3, epoch=1, rank=r, world_size=2)
             for r in range(2)]  # fmt: skip
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, rank0, rank1 in zip(single, *ranks):
        real = [ref for ref in rank0 + rank1 if ref.video != PADDING]
        assert sorted(real) == sorted(ref for ref in step if ref.video != PADDING)
        assert {ref.video for ref in rank0} & {ref.video for ref in rank1} <= {PADDING}
    # A different epoch shuffles differently; the same epoch gives the same order.
    again = lockstep_schedule(lengths, batch_videos=2, window=16, shuffle=True, seed=3, epoch=1)
    assert again == single


def test_interleaved_groups_alternate_with_their_own_slots_and_update_flags():
    lengths = [40, 40, 20, 40]  # 3, 3, 2 and 3 windows of 16 frames
    steps = lockstep_schedule(lengths, batch_videos=1, window=16, interleave=2)
    assert [(rows[0].video, rows[0].window, rows[0].slot) for rows in steps] == [
        (0, 0, 0), (1, 0, 1), (0, 1, 0), (1, 1, 1), (0, 2, 0), (1, 2, 1),
        (2, 0, 0), (3, 0, 1), (2, 1, 0), (3, 1, 1), (3, 2, 1),
    ]  # fmt: skip
    assert [rows[0].group_end for rows in steps] == [False] * 4 + [True, True] + [False] * 2 + [True, False, True]
    assert [rows[0].update for rows in steps] == [rows[0].group_end for rows in steps]  # once per group by default
    every_two = lockstep_schedule(lengths, batch_videos=1, window=16, interleave=2, update_every=2)
    assert [i for i, rows in enumerate(every_two) if rows[0].update] == [1, 3, 5, 7, 9, 10]  # and the last step


def test_video_windows_samples(tmp_path):
    frames_dir, labels_dir = make_dataset(tmp_path, {"a": 21, "b": 9})
    dataset = VideoWindows(frames_dir, labels_dir, ["a", "b"], window=8, sample_rate=2, image_size=32, train=True,
                           augment=True)
    sampler = LockstepWindowSampler(dataset.lengths, batch_videos=2, window=8)
    steps = list(sampler)
    assert len(steps) == 3
    sample = dataset[steps[2][0]]  # last window of "a": frames 16..20, fed 16, 18, 20
    assert sample["frames"].shape == (4, 3, 32, 32) and sample["frames"].dtype == torch.float32
    assert sample["mask"].tolist() == [True, True, True, False]
    labels = dataset.labels["a"]
    assert sample["labels"][:3].tolist() == labels[16:21:2].tolist() and sample["labels"][3] == -100
    assert int(sample["valid_frames"]) == 5 and int(sample["video_frames"]) == 11 and not sample["reset"]
    assert torch.all(sample["frames"][3] == 0)
    padding = dataset[steps[2][1]]  # "b" has ended
    assert int(padding["video_index"]) == PADDING and not padding["mask"].any() and padding["reset"]
    assert bool(dataset[steps[0][0]]["reset"]) and bool(padding["group_end"])
    # Augmentation depends on (seed, epoch, video, window) only.
    torch.testing.assert_close(dataset[steps[1][0]]["frames"], dataset[steps[1][0]]["frames"])
    batch = torch.utils.data.default_collate([dataset[ref] for ref in steps[0]])
    assert batch["frames"].shape == (2, 4, 3, 32, 32) and batch["mask"].shape == (2, 4)


def test_predictions_are_full_rate_distributions(tmp_path):
    frames_dir, labels_dir = make_dataset(tmp_path, {"a": 21, "b": 9, "c": 14})
    dataset = VideoWindows(frames_dir, labels_dir, ["a", "b", "c"], window=8, sample_rate=2, image_size=32)
    probabilities = predict(tiny_model(), dataset, batch_videos=2, device=torch.device("cpu"))
    assert {video: p.shape for video, p in probabilities.items()} == {"a": (21, 4), "b": (9, 4), "c": (14, 4)}
    for values in probabilities.values():
        np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-5)
        pairs = len(values) // 2  # frames 2k and 2k + 1 share the network's output for frame 2k
        np.testing.assert_array_equal(values[0 : 2 * pairs : 2], values[1 : 2 * pairs : 2])


# ----------------------------------------------------------------------------------------------------------------
# The stage, in one process and under torchrun


def stage_workdir(root: Path, default_params: dict, **train) -> Path:
    """A working directory as DVC runs the stage in (dvc.yaml, params.yaml) with a tiny, fast configuration."""
    section = copy.deepcopy(default_params["streaming"])
    section["model"].update(memory_channels=8, head_layers=3, head_channels=8, dropout=0.0, norm="group")
    section["pretrained"] = ""  # random initialisation (the pipeline test loads the demo's pretrained weights)
    section["data"].update(image_size=32)
    section["train"].update(epochs=2, lr=0.01, batch_videos=2, num_workers=0, val_fraction=0.3, num_threads=0)
    section["train"].update(train)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    section["data"]["sample_rate"] = 1
    params = {"cpu_kernels": default_params["cpu_kernels"], "seed": 0, "window": 8, "streaming": section}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def stage_command(frames_dir: Path, labels_dir: Path) -> list[str]:
    return ["--frames", str(frames_dir), "--labels", str(labels_dir), "--checkpoints", "models",
            "--predictions", "predictions", "--curves", "train/curves.csv", "--tensorboard", "tensorboard"]


def _environment() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "DVC_STAGE"}, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_stage_end_to_end_and_resume(tmp_path, default_params):
    frames_dir, labels_dir = make_dataset(tmp_path, {"a": 30, "b": 20, "c": 25, "d": 17, "e": 22})
    workdir = stage_workdir(tmp_path / "run", default_params)
    command = [PYTHON, str(ROOT / "stages" / "train_streaming.py"), *stage_command(frames_dir, labels_dir)]
    first = subprocess.run(command, capture_output=True, text=True, env=_environment(), cwd=workdir, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "etesvs epoch 2/2: loss" in first.stdout and first.stdout.rstrip().splitlines()[-1].startswith(
        "train_streaming: ")
    with h5py.File(workdir / "predictions" / "probs.h5") as handle:
        assert sorted(handle) == ["e"]
        values = handle["e"][()]
    assert values.shape == (22, 4) and values.dtype == np.float32
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-5)
    model_json = json.loads((workdir / "predictions" / "model.json").read_text())
    assert model_json["model"] == "etesvs" and model_json["backbone_pretrained"] is False
    assert model_json["flops_per_frame"] > 0 and model_json["params"] > 0
    assert (model_json["window"], model_json["sample_rate"]) == (8, 1)
    assert set(model_json["val_videos"]) <= {"a", "b", "c", "d"}  # never the test video
    curves = (workdir / "train" / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("epoch,train_loss,train_head,") and len(curves) == 3
    assert any((workdir / "tensorboard").iterdir())
    checkpoint = torch.load(workdir / "models" / "best.pt", weights_only=True)
    assert checkpoint["classes"] == ["class0", "class1", "class2", "class3"] and checkpoint["fps"] == 15.0
    # A rerun with the same settings resumes after the last finished epoch instead of training again.
    second = subprocess.run(command, capture_output=True, text=True, env=_environment(), cwd=workdir, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "epoch 1/2" not in second.stdout
    assert (workdir / "train" / "curves.csv").read_text().splitlines() == curves
    # A bad setting stops with one line naming it.
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params.update(window=7)
    params["streaming"]["data"]["sample_rate"] = 2
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    bad = subprocess.run(command, capture_output=True, text=True, env=_environment(), cwd=workdir, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: params.yaml: streaming:")
    assert "window (7)" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, default_params):
    """2 processes with one video each of every pair = 1 process with both (GroupNorm, no dropout)."""
    frames_dir, labels_dir = make_dataset(tmp_path, {"a": 20, "b": 13, "c": 16}, train=["a", "b"], test=["c"])
    stage = str(ROOT / "stages" / "train_streaming.py")
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    runs = {"one": [PYTHON, stage], "two": [torchrun, "--standalone", "--nproc_per_node", "2", stage]}
    for name, launcher in runs.items():
        # One optimiser step per group of videos, so that both runs take exactly the same single step.
        workdir = stage_workdir(tmp_path / name, default_params, epochs=1, val_fraction=0.0, update_every=0,
                                interleave=1)
        result = subprocess.run([*launcher, *stage_command(frames_dir, labels_dir)], capture_output=True,
                                text=True, env=_environment(), cwd=workdir, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "models" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "models" / "last.pt", weights_only=True)
    for key in ("loss", "head", "memory", "backbone", "grad_norm"):
        assert two["history"][0][f"train_{key}"] == pytest.approx(one["history"][0][f"train_{key}"], rel=1e-5), key
    # Adam's first moment after one step is 0.1 x the gradient: the gradients of both runs agree.
    first_moments = [(one["optimizer"]["state"][i]["exp_avg"], two["optimizer"]["state"][i]["exp_avg"])
                     for i in one["optimizer"]["state"]]  # fmt: skip
    assert len(first_moments) == len(list(tiny_model(norm="group").parameters()))
    # Both runs sum the same gradients in another order: measured differences up to 3e-6 on moments up to 0.3
    # (with plain convolutions and with the small-map depthwise path alike); a wrong gradient is off by far more.
    for a, b in first_moments:
        torch.testing.assert_close(a, b, atol=5e-6, rtol=1e-4)
    assert max(float(a.abs().max()) for a, _ in first_moments) > 1e-3  # the gradients are not all zero
    # The weights agree too, except where Adam's first step divides a gradient of the order of its epsilon by
    # itself (lr x g / (|g| + eps)): there rounding decides, so allow a few such elements.
    mismatched = total = 0
    for name, a in one["model"].items():
        if a.is_floating_point():
            mismatched += int(((a - two["model"][name]).abs() > 1e-5).sum())
            total += a.numel()
    assert mismatched <= 1e-3 * total, f"{mismatched} of {total} weights differ"


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("shift", [False, True])
def test_prepared_for_inference_gives_the_same_outputs(norm, shift):
    from etesvs.models.streaming import prepare_for_inference

    model = tiny_model(norm=norm, temporal_shift=shift).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so that folding them is tested
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    frames, mask = torch.randn(2, 5, 3, 32, 32), torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    with torch.inference_mode():
        expected, _ = model(frames, mask)
        prepared = prepare_for_inference(copy.deepcopy(model))
        got, _ = prepared(frames, mask)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    convolutions = [m.weight for m in prepared.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4)
