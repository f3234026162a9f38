"""The procedural pretraining corpus: deterministic, balanced, motion maps that follow motion, never a demo look."""

import numpy as np
import pytest

from etesvs.data import demo
from etesvs.data import pretrain_corpus as pc
from etesvs.errors import EtesvsError

SIZE = dict(num_frames=8, height=32, width=48, fps=15.0)


def test_render_is_deterministic_and_seed_dependent():
    first = pc.render_clip(seed=3, index=5, **SIZE)
    again = pc.render_clip(seed=3, index=5, **SIZE)
    other = pc.render_clip(seed=4, index=5, **SIZE)
    assert first.frames.shape == (8, 32, 48, 3) and first.frames.dtype == np.uint8
    assert first.motion.shape == (8, 4, 6)
    np.testing.assert_array_equal(first.frames, again.frames)
    np.testing.assert_array_equal(first.motion, again.motion)
    assert not np.array_equal(first.frames, other.frames)


def test_labels_are_balanced_and_holdout_is_the_tail():
    labels = [pc.clip_label(i) for i in range(10 * len(pc.CLASSES))]
    assert np.bincount(labels).tolist() == [10] * len(pc.CLASSES)
    mask = pc.holdout_mask(100, 0.1)
    assert mask.sum() == 16 and mask[-16:].all() and not mask[:-16].any()  # at least one cycle of classes


@pytest.mark.parametrize("mapping", [pc.TIME_REVERSED, pc.HORIZONTAL_MIRROR, pc.VERTICAL_MIRROR])
def test_label_maps_are_involutions(mapping):
    index = pc.label_map(mapping)
    np.testing.assert_array_equal(index[index], np.arange(len(pc.CLASSES)))
    assert index[pc.CLASSES.index("idle")] == pc.CLASSES.index("idle")


def test_motion_maps_follow_what_moves():
    idle = pc.render_clip(seed=0, index=pc.CLASSES.index("slide"), **SIZE)  # something slides, the hand rests
    carry = pc.render_clip(seed=0, index=pc.CLASSES.index("carry_left"), **SIZE)
    assert 0.0 <= carry.motion.min() and carry.motion.max() <= 1.0
    assert carry.motion.sum() > 0 and idle.motion.sum() > 0
    # frames change where the map says something moves, much more than elsewhere
    change = np.abs(np.diff(carry.frames.astype(np.float32), axis=0)).mean(axis=-1)  # (T-1, H, W)
    cells = change.reshape(7, 4, 8, 6, 8).mean(axis=(2, 4))  # (T-1, 4, 6)
    moving = carry.motion[1:] > 0.3
    assert cells[moving].mean() > 3 * cells[carry.motion[1:] == 0].mean()


def test_appearance_never_reproduces_a_demo_subject():
    for index in range(64):
        clip = pc.render_clip(seed=1, index=index, **SIZE)
        for color in clip.colors:
            assert not pc.is_demo_like_color(color), (index, color)
    palette_color = demo._PALETTE[0] + 10
    assert pc.is_demo_like_color(palette_color)
    assert pc.is_demo_like_color(np.array([200.0, 150.0, 100.0]))  # a demo skin colour
    assert not set(pc.BACKGROUNDS) & {"wood", "tiles", "stone", "cloth"}


def test_write_and_read_corpus(tmp_path):
    path = tmp_path / "corpus.h5"
    summary = pc.write_corpus(path, num_clips=40, holdout_fraction=0.2, seed=2, workers=1, progress=False, **SIZE)
    corpus = pc.read_corpus(path)
    assert summary["clips"] == 40 and summary["holdout_clips"] == 16
    assert corpus.clips.shape == (40, 8, 32, 48, 3) and corpus.motion.shape == (40, 8, 4, 6)
    assert corpus.classes == pc.CLASSES and corpus.labels.tolist() == [pc.clip_label(i) for i in range(40)]
    np.testing.assert_array_equal(corpus.clips[7], pc.render_clip(seed=2, index=7, **SIZE).frames)
    # the same file with two worker processes
    other = tmp_path / "corpus2.h5"
    pc.write_corpus(other, num_clips=40, holdout_fraction=0.2, seed=2, workers=2, progress=False, **SIZE)
    np.testing.assert_array_equal(pc.read_corpus(other).clips, corpus.clips)


def test_bad_sizes_and_files_are_named(tmp_path):
    with pytest.raises(EtesvsError, match="at least 32 clips"):
        pc.write_corpus(tmp_path / "c.h5", num_clips=10, holdout_fraction=0.1, seed=0, workers=1, **SIZE)
    (tmp_path / "bad.h5").write_text("not hdf5")
    with pytest.raises(EtesvsError, match="bad.h5"):
        pc.read_corpus(tmp_path / "bad.h5")
