"""I3D: shapes, "SAME" padding, receptive field, random init and the pytorch-i3d checkpoint key layout."""

from __future__ import annotations

import math
import re

import pytest
import torch

from etesvs.errors import EtesvsError
from etesvs.models.i3d import (
    FEATURE_DIM,
    TEMPORAL_CENTER_OFFSET,
    InceptionI3d,
    file_sha256,
    load_i3d_weights,
    same_padding,
    temporal_output_length,
)
from etesvs.profiling import count_parameters


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0, num_classes: int | None = None) -> InceptionI3d:
    model = InceptionI3d(in_channels=3, num_classes=num_classes)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        ((8, 32, 32), (7, 7, 7), (2, 2, 2), (2, 3, 2, 3, 2, 3)),  # even sizes: 5 in total, extra one at the back
        ((9, 33, 1), (7, 7, 7), (2, 2, 2), (3, 3, 3, 3, 3, 3)),  # odd sizes: 6 in total
        ((4, 16, 15), (1, 3, 3), (1, 2, 2), (1, 1, 0, 1, 0, 0)),
        ((6, 6, 6), (2, 2, 2), (2, 2, 2), (0, 0, 0, 0, 0, 0)),
    ],
)
def test_same_padding_matches_tensorflow(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize("frames, height, width", [(8, 32, 32), (21, 32, 32), (9, 1, 1), (16, 33, 47)])
def test_features_have_1024_channels_and_one_step_per_8_frames(frames, height, width):
    model = _model()
    with torch.inference_mode():
        features = model(torch.rand(2, 3, frames, height, width) * 2 - 1)
        feature_map = model.feature_map(torch.rand(1, 3, frames, height, width))
    assert features.shape == (2, FEATURE_DIM, math.ceil(frames / 8)) == (2, 1024, temporal_output_length(frames))
    assert feature_map.shape == (1, 1024, math.ceil(frames / 8), math.ceil(height / 32), math.ceil(width / 32))
    assert torch.isfinite(features).all()


def test_receptive_field_is_99_frames_centred_on_8j_plus_5():
    model = _model()
    clip = torch.randn(1, 3, 128, 4, 4, requires_grad=True)
    step = 8
    model(clip)[0, :, step].sum().backward()
    seen = (clip.grad.abs().sum(dim=(0, 1, 3, 4)) > 0).nonzero().flatten()
    first, last = int(seen.min()), int(seen.max())
    assert last - first + 1 == 99
    assert (first + last) / 2 == 8 * step + TEMPORAL_CENTER_OFFSET


def test_random_init_depends_only_on_the_seed():
    torch.manual_seed(123)  # the global RNG must not matter
    a = _model(seed=7).state_dict()
    torch.manual_seed(456)
    b = _model(seed=7).state_dict()
    c = _model(seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["Mixed_4c.b1b.conv3d.weight"], c["Mixed_4c.b1b.conv3d.weight"])


def test_classifier_scores_clips():
    model = _model(num_classes=5)
    with torch.inference_mode():
        assert model.classify(torch.rand(2, 3, 16, 32, 32)).shape == (2, 5)
    with pytest.raises(RuntimeError):
        _model().classify(torch.rand(1, 3, 8, 32, 32))


# Written by hand from the pytorch-i3d rgb_imagenet.pt checkpoint, not generated from the module.
EXPECTED_KEYS = {
    "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
    "Conv3d_1a_7x7.bn.weight": (64,),
    "Conv3d_1a_7x7.bn.bias": (64,),
    "Conv3d_1a_7x7.bn.running_mean": (64,),
    "Conv3d_1a_7x7.bn.running_var": (64,),
    "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
    "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
    "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
    "Mixed_3b.b1a.conv3d.weight": (96, 192, 1, 1, 1),
    "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
    "Mixed_3b.b1b.bn.running_var": (128,),
    "Mixed_3b.b2a.conv3d.weight": (16, 192, 1, 1, 1),
    "Mixed_3b.b2b.conv3d.weight": (32, 16, 3, 3, 3),
    "Mixed_3b.b3b.conv3d.weight": (32, 192, 1, 1, 1),
    "Mixed_4f.b3b.bn.running_mean": (128,),
    "Mixed_5c.b0.conv3d.weight": (384, 832, 1, 1, 1),
    "Mixed_5c.b2b.conv3d.weight": (128, 48, 3, 3, 3),
    "logits.conv3d.weight": (400, 1024, 1, 1, 1),
    "logits.conv3d.bias": (400,),
}
KEY_PATTERN = re.compile(
    r"(Conv3d_(1a_7x7|2b_1x1|2c_3x3)|Mixed_(3[bc]|4[bcdef]|5[bc])\.(b0|b1a|b1b|b2a|b2b|b3b))"
    r"\.(conv3d\.weight|bn\.(weight|bias|running_mean|running_var|num_batches_tracked))"
    r"|logits\.conv3d\.(weight|bias)"
)


@pytest.fixture(scope="module")
def pytorch_i3d_state() -> dict[str, torch.Tensor]:
    """A checkpoint as pytorch-i3d saved it: with the Kinetics classifier, without num_batches_tracked."""
    state = _model(seed=3, num_classes=400).state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["Mixed_4d.b2a.bn.running_mean"].uniform_(-1, 1)
    return state


@pytest.fixture(scope="module")
def pytorch_i3d_file(tmp_path_factory, pytorch_i3d_state):
    path = tmp_path_factory.mktemp("weights") / "rgb_imagenet.pt"
    torch.save(pytorch_i3d_state, path)
    return path


def test_state_dict_has_the_pytorch_i3d_key_layout():
    state = _model(num_classes=400).state_dict()
    for key, shape in EXPECTED_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert all(KEY_PATTERN.fullmatch(key) for key in state), [k for k in state if not KEY_PATTERN.fullmatch(k)]
    assert sum(key.endswith("conv3d.weight") for key in state) == 3 + 9 * 6 + 1
    assert count_parameters(_model()) == 12_287_264  # the 12.3 M of Inception-v1 I3D without its classifier


def test_pytorch_i3d_checkpoint_loads_strictly_into_the_feature_extractor(pytorch_i3d_state, pytorch_i3d_file):
    model = _model(seed=99)
    assert load_i3d_weights(model, pytorch_i3d_file) == file_sha256(pytorch_i3d_file)
    loaded = model.state_dict()
    for key, value in pytorch_i3d_state.items():
        if not key.startswith("logits."):
            assert torch.equal(loaded[key], value), key
    assert not any(key.startswith("logits.") for key in loaded)
    with_classifier = _model(seed=99, num_classes=400)  # the classifier is kept when the model has one
    load_i3d_weights(with_classifier, pytorch_i3d_file)
    assert torch.equal(with_classifier.logits.conv3d.bias, pytorch_i3d_state["logits.conv3d.bias"])


def test_dataparallel_prefix_and_wrapped_state_dicts_load(tmp_path, pytorch_i3d_state):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in pytorch_i3d_state.items()}}, path)
    load_i3d_weights(_model(), path)


@pytest.mark.parametrize("fault", ["missing", "renamed", "shape", "garbage", "absent"])
def test_bad_weight_files_are_one_line_errors_naming_the_file(tmp_path, fault, pytorch_i3d_state):
    path = tmp_path / "weights.pt"
    state = dict(pytorch_i3d_state)
    if fault == "missing":
        del state["Mixed_4b.b1b.conv3d.weight"]
    elif fault == "renamed":
        state["Mixed_3b.branch0.weight"] = state.pop("Mixed_3b.b0.conv3d.weight")
    elif fault == "shape":
        state["Conv3d_1a_7x7.conv3d.weight"] = torch.zeros(64, 2, 7, 7, 7)  # a flow checkpoint
    if fault == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif fault != "absent":
        torch.save(state, path)
    with pytest.raises(EtesvsError) as error:
        load_i3d_weights(_model(), path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    if fault in ("missing", "renamed"):
        assert "Mixed_4b.b1b.conv3d.weight" in message or "Mixed_3b" in message
