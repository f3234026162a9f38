"""Procedural pretraining corpus: the demo's stand-in for Kinetics and ImageNet.

Real users freeze a Kinetics-pretrained I3D and fine-tune an ImageNet-pretrained MobileNetV2. The demo makes its
own pretrained weights from this corpus: many short clips, each with its own random appearance, labelled by the
motion they show. The motion classes cover and exceed the demo's actions (carrying in four directions, rotating
either way, grasping and releasing, pouring, shaking, stirring, chopping, reaching, wiping, objects sliding by
themselves, idling), and several come in time-reversed pairs (``carry_left``/``carry_right``,
``rotate_cw``/``rotate_ccw``, ``grasp``/``release``), so a network has to see the direction of motion, as the
demo's take/put and open/close need. Every frame also has a ground-truth motion map: the share of each 8 x 8 pixel
cell covered by something that moved since the previous frame (hand and forearm included; camera shake, lighting
and noise excluded), a dense target that teaches a network where things move (see :mod:`etesvs.pretrain`).

Every clip draws its own scene (background pattern and colours, object shapes, sizes, colours and places, the hand's
colours, thickness and side of entry, lighting, camera shake, sensor noise), so that only motion, not looks, tells
classes apart. The scene is never one of the demo's subjects (see :func:`is_demo_like_color`): no object, hand or
sleeve colour lies within :data:`DEMO_COLOR_MARGIN` of the demo palette or inside the demo's skin-colour box, no
background uses one of the demo's four table patterns, and objects are placed at random instead of the demo's
fixed layout.

Clip ``i`` of a corpus is a deterministic function of ``(seed, i)`` and its size; its label is ``i % C`` (balanced
classes), and the clips whose index is in the last ``holdout_fraction`` of the corpus are held out for measuring
accuracy. :func:`write_corpus` stores the corpus as one HDF5 file::

    clips    (N, T, H, W, 3) uint8 RGB, one HDF5 chunk per clip
    labels   (N,) int64 class ids
    motion   (N, T, H / 8, W / 8) float16 motion maps
    holdout  (N,) bool, True for held-out clips
    attrs    classes (JSON list), seed, fps, num_frames, height, width, generator

Drawing reuses the anti-aliased primitives of :mod:`etesvs.data.demo`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from etesvs.data import demo
from etesvs.data.demo import _smooth_noise, fill_bar, fill_ellipse, fill_rect
from etesvs.errors import EtesvsError
from etesvs.io import atomic_path

CLASSES = (
    "idle",
    "reach",
    "carry_left",
    "carry_right",
    "carry_up",
    "carry_down",
    "rotate_cw",
    "rotate_ccw",
    "grasp",
    "release",
    "pour",
    "shake",
    "stir",
    "chop",
    "slide",
    "wipe",
)
# Label maps of the three label-preserving transformations of a clip (classes not listed map to themselves). They
# let a trainer reverse or mirror clips as augmentation, and document which classes only the direction tells apart.
TIME_REVERSED = {"carry_left": "carry_right", "carry_up": "carry_down", "rotate_cw": "rotate_ccw", "grasp": "release"}
HORIZONTAL_MIRROR = {"carry_left": "carry_right", "rotate_cw": "rotate_ccw"}
VERTICAL_MIRROR = {"carry_up": "carry_down", "rotate_cw": "rotate_ccw"}

GENERATOR = "etesvs.data.pretrain_corpus/1"
DEMO_COLOR_MARGIN = 48.0
"""Smallest RGB distance of any corpus object, hand or sleeve colour from every colour of the demo palette."""
# The demo's skin colours are drawn from this box (etesvs/data/demo.py, _make_subject); the corpus avoids it.
DEMO_SKIN_BOX = (np.array([150.0, 95.0, 70.0]), np.array([240.0, 190.0, 160.0]))
BACKGROUNDS = ("blobs", "checker", "grating", "dots", "gradient")
"""Background patterns of the corpus; none is one of the demo's tables (wood grain, tiles, stone, cloth)."""
SHAPES = ("disc", "ring", "lidded", "handled", "bottle", "stick", "blade", "box")


def label_map(mapping: dict[str, str]) -> np.ndarray:
    """A label-preserving transformation as an index array (C,): new id of each class id (both ways of each pair)."""
    both = {**mapping, **{b: a for a, b in mapping.items()}}
    return np.array([CLASSES.index(both.get(name, name)) for name in CLASSES], dtype=np.int64)


def clip_label(index: int) -> int:
    """Class id of clip ``index``: classes take turns, so every class has the same number of clips (+-1)."""
    return index % len(CLASSES)


def holdout_mask(num_clips: int, holdout_fraction: float) -> np.ndarray:
    """(N,) bool, True for the held-out clips: the last ``round(fraction * N)`` (at least one class cycle)."""
    count = int(round(holdout_fraction * num_clips))
    if holdout_fraction > 0:
        count = min(num_clips - 1, max(count, len(CLASSES)))
    mask = np.zeros(num_clips, dtype=bool)
    mask[num_clips - count :] = True
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Appearance


def is_demo_like_color(color: np.ndarray) -> bool:
    """True when an RGB colour (3,) could be a demo object's or hand's: near the demo palette or a demo skin."""
    color = np.asarray(color, dtype=np.float32)
    near_palette = np.linalg.norm(demo._PALETTE - color, axis=1).min() < DEMO_COLOR_MARGIN
    low, high = DEMO_SKIN_BOX
    return bool(near_palette or np.all((color >= low) & (color <= high)))


def _color(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour (3,) float32 that is not demo-like (rejection sampling)."""
    while True:
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        if not is_demo_like_color(color):
            return color


def _background(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """A background (height, width, 3) float32 of pattern ``kind`` (see :data:`BACKGROUNDS`) in random colours."""
    first = rng.uniform(20, 235, size=3).astype(np.float32)
    second = np.clip(first + rng.uniform(-90, 90, size=3), 0, 255).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    u = xs * math.cos(angle) + ys * math.sin(angle)  # (H, W) coordinate across the pattern
    v = ys * math.cos(angle) - xs * math.sin(angle)
    if kind == "blobs":
        pattern = (_smooth_noise(rng, height, width, cells=int(rng.integers(2, 7))) > rng.uniform(-0.3, 0.3)) * 1.0
        pattern = 0.7 * pattern + 0.3 * (_smooth_noise(rng, height, width, cells=8) + 1) / 2
    elif kind == "checker":
        size = rng.uniform(0.12, 0.35) * height
        pattern = (np.floor(u / size) + np.floor(v / size)) % 2
    elif kind == "grating":
        period = rng.uniform(0.08, 0.4) * height
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + 3 * _smooth_noise(rng, height, width, cells=3))
    elif kind == "dots":
        spacing = rng.uniform(0.15, 0.3) * height
        radius = rng.uniform(0.15, 0.35) * spacing
        pattern = (np.hypot(np.mod(u, spacing) - spacing / 2, np.mod(v, spacing) - spacing / 2) < radius) * 1.0
    elif kind == "gradient":
        pattern = np.clip(0.5 + (u - u.mean()) / (u.max() - u.min() + 1e-6), 0, 1)
        pattern = pattern + 0.15 * _smooth_noise(rng, height, width, cells=5)
    else:
        raise ValueError(f"unknown background {kind!r}")
    pattern = np.clip(pattern, 0, 1).astype(np.float32)[..., None]  # (H, W, 1)
    return first * (1 - pattern) + second * pattern


@dataclass
class _Thing:
    """A drawable object: its shape, size (half extents in pixels) and colours; poses live outside."""

    shape: str
    size: float
    aspect: float
    color: np.ndarray
    accent: np.ndarray

    def radius(self) -> float:
        return self.size * max(self.aspect, 1.0) * (1.6 if self.shape in ("handled", "stick", "blade") else 1.0)


def _thing(rng: np.random.Generator, unit: float, shape: str | None = None) -> _Thing:
    shape = shape or str(rng.choice(SHAPES))
    color = _color(rng)
    accent = np.clip(color * rng.uniform(0.35, 0.7) if rng.random() < 0.6 else _color(rng), 0, 255)
    return _Thing(shape=shape, size=unit * rng.uniform(0.7, 1.3), aspect=rng.uniform(0.6, 1.6), color=color,
                  accent=accent.astype(np.float32))  # fmt: skip


def _draw_thing(image: np.ndarray, thing: _Thing, x: float, y: float, angle: float) -> None:
    """Draw ``thing`` at (x, y) rotated by ``angle`` onto ``image`` (H, W, 3) float32 in place.

    Every shape has an asymmetric mark (notch, handle, neck, stripe) so that its rotation is visible.
    """
    size, aspect, color, accent = thing.size, thing.aspect, thing.color, thing.accent
    cos, sin = math.cos(angle), math.sin(angle)
    if thing.shape == "disc":
        fill_ellipse(image, x, y, size * aspect, size, angle, color)
        fill_bar(image, x, y, x + 0.8 * size * cos, y + 0.8 * size * sin, 0.18 * size, accent)
    elif thing.shape == "ring":
        fill_ellipse(image, x, y, size, size, 0.0, color)
        fill_ellipse(image, x, y, 0.6 * size, 0.6 * size, 0.0, accent)
        fill_ellipse(image, x + 0.8 * size * cos, y + 0.8 * size * sin, 0.2 * size, 0.2 * size, 0.0, accent)
    elif thing.shape == "lidded":
        fill_rect(image, x, y, size * aspect, size, angle, color)
        fill_ellipse(image, x, y, 0.6 * size, 0.6 * size, angle, accent)
        fill_bar(image, x, y, x + 0.9 * size * cos, y + 0.9 * size * sin, 0.15 * size, accent)
    elif thing.shape == "handled":
        fill_bar(image, x, y, x + 1.5 * size * cos, y + 1.5 * size * sin, 0.22 * size, accent)
        fill_ellipse(image, x, y, size, size * aspect, angle, color)
    elif thing.shape == "bottle":
        up_x, up_y = math.sin(angle), -math.cos(angle)
        fill_rect(image, x, y, 0.45 * size * aspect, size, angle, color)
        fill_rect(image, x + 1.3 * size * up_x, y + 1.3 * size * up_y, 0.2 * size, 0.35 * size, angle, accent)
    elif thing.shape == "stick":
        fill_bar(image, x, y, x + 1.6 * size * cos, y + 1.6 * size * sin, 0.13 * size, color)
        fill_ellipse(image, x, y, 0.4 * size, 0.28 * size, angle, accent)
    elif thing.shape == "blade":
        fill_rect(image, x, y, 0.9 * size, 0.2 * size * aspect, angle, color)
        fill_rect(image, x + 1.3 * size * cos, y + 1.3 * size * sin, 0.45 * size, 0.18 * size, angle, accent)
    elif thing.shape == "box":
        fill_rect(image, x, y, size * aspect, size, angle, color)
        fill_rect(image, x + 0.5 * size * aspect * cos, y + 0.5 * size * aspect * sin, 0.25 * size * aspect,
                  0.9 * size, angle, accent)  # fmt: skip
    else:
        raise ValueError(f"unknown shape {thing.shape!r}")


# ----------------------------------------------------------------------------------------------------------------
# Motion


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _walk(rng: np.random.Generator, count: int, frames_per_knot: float) -> np.ndarray:
    """Smooth random signal (count,) in [-1, 1]."""
    knots = int(count / frames_per_knot) + 2
    return np.interp(np.arange(count) / frames_per_knot, np.arange(knots), rng.uniform(-1, 1, size=knots))


@dataclass
class _Scene:
    """Everything one clip draws, with per-frame poses: ``poses[i]`` (T, 3) (x, y, angle) of ``things[i]``."""

    background: np.ndarray  # (H + 2m, W + 2m, 3) float32
    things: list[_Thing]
    poses: list[np.ndarray]
    hand: np.ndarray  # (T, 2) palm position
    shoulder: np.ndarray  # (2,) where the forearm enters
    skin: np.ndarray
    sleeve: np.ndarray
    arm_width: float
    stream: np.ndarray  # (T,) bool: a pour stream is drawn from thing 0's mouth
    stream_color: np.ndarray


MARGIN = 3  # camera shake, pixels
MIN_DISTRACTORS, MAX_DISTRACTORS = 1, 4  # objects that take no part in the motion
MOTION_CELL = 8  # pixels per side of a cell of the motion maps
# Targets that a class needs (one pours from a bottle, stirs with a stick, chops with a blade); others draw any shape.
_TARGET_SHAPES = {"pour": "bottle", "stir": "stick", "chop": "blade"}
_CARRY_DIRECTIONS = {"carry_left": np.pi, "carry_right": 0.0, "carry_up": -np.pi / 2, "carry_down": np.pi / 2}


def _spot(rng: np.random.Generator, width: int, height: int, margin: float) -> np.ndarray:
    """A random place (2,) (x, y) at least ``margin`` pixels inside the frame."""
    return np.array([rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)])


@dataclass
class _Action:
    """The state of one clip that the motion classes (see :data:`_MOTIONS`) read and change.

    ``things[0]`` is the target and ``poses[i]`` (T, 3) (x, y, angle) the poses of ``things[i]``; the hand goes from its
    rest place to ``grip`` as ``touching`` goes from 0 to 1.
    """

    rng: np.random.Generator
    width: int
    height: int
    unit: float  # typical object size, pixels
    seconds: np.ndarray  # (T,) time of each frame
    active: np.ndarray  # (T,) manipulation progress 0..1, linear
    progress: np.ndarray  # (T,) manipulation progress 0..1, eased
    touching: np.ndarray  # (T,) 0 = hand at rest, 1 = hand on the grip point
    start: np.ndarray  # (2,) the target's place in frame 0
    angle0: float  # the target's angle in frame 0
    things: list[_Thing]
    poses: list[np.ndarray]
    grip: np.ndarray  # (T, 2) where the hand goes
    stream: np.ndarray  # (T,) bool: a pour stream is drawn from the target's mouth
    hand_free: bool = False  # the hand is not involved (idle, slide)

    @property
    def count(self) -> int:
        return len(self.seconds)

    @property
    def target(self) -> _Thing:
        return self.things[0]

    def spot(self, margin: float) -> np.ndarray:
        return _spot(self.rng, self.width, self.height, margin)

    def add(self, thing: _Thing, place: np.ndarray, angle: float) -> None:
        """Add ``thing`` resting at ``place`` (2,) with ``angle`` for the whole clip."""
        self.things.append(thing)
        self.poses.append(np.tile([*place, angle], (self.count, 1)))


def _timing(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Reach in, manipulate, withdraw: manipulation progress (T,) 0..1 and the hand's approach (T,) 0..1.

    Clips sometimes start or end in the middle of a motion (no reach-in or no withdrawal).
    """
    reach_in = int(rng.integers(0, max(1, count // 4) + 1))
    withdraw = int(rng.integers(0, max(1, count // 4) + 1))
    active = np.zeros(count)
    span = max(count - reach_in - withdraw, 2)
    active[reach_in : reach_in + span] = np.linspace(0, 1, span)
    active[reach_in + span :] = 1.0
    ramp = np.ones(count)
    if reach_in:
        ramp[:reach_in] = _smoothstep((np.arange(reach_in) + 1) / (reach_in + 1))
    if withdraw:
        ramp[count - withdraw :] = _smoothstep(1 - (np.arange(withdraw) + 1) / (withdraw + 1))
    return active, ramp


def _stage(
    rng: np.random.Generator, label: str, count: int, height: int, width: int, fps: float, unit: float
) -> _Action:
    """Draw the target of class ``label`` and its place, time the clip; the target rests until a motion moves it."""
    target = _thing(rng, unit, _TARGET_SHAPES.get(label))
    if target.shape in ("stick", "blade") and label not in ("stir", "chop"):
        target = _thing(rng, unit, str(rng.choice(["disc", "ring", "lidded", "handled", "bottle", "box"])))
    pose = np.zeros((count, 3))  # (T, 3) x, y, angle
    start = _spot(rng, width, height, 1.2 * unit)
    angle0 = rng.uniform(-np.pi, np.pi)
    pose[:] = (*start, angle0)
    active, ramp = _timing(rng, count)
    return _Action(
        rng=rng, width=width, height=height, unit=unit, seconds=np.arange(count) / fps, active=active,
        progress=_smoothstep(active), touching=ramp, start=start, angle0=angle0, things=[target], poses=[pose],
        grip=pose[:, :2].copy(), stream=np.zeros(count, dtype=bool),
    )  # fmt: skip


def _carry(a: _Action, label: str) -> None:
    """carry_*: move the target roughly that way; grasp: reach it, then take it away; release: grasp reversed."""
    rng = a.rng
    if label.startswith("carry"):
        direction = _CARRY_DIRECTIONS[label]
        direction += rng.uniform(-0.45, 0.45)
    else:
        direction = rng.uniform(-np.pi, np.pi)
    distance = rng.uniform(0.3, 0.6) * min(a.width, a.height * 1.33)
    step = distance * np.array([math.cos(direction), math.sin(direction)])
    start = np.clip(a.spot(a.unit) - step / 2, a.unit, (a.width - a.unit, a.height - a.unit))
    arc = rng.uniform(-0.25, 0.25) * distance * np.array([-step[1], step[0]]) / distance
    progress = a.progress
    if label in ("grasp", "release"):
        # grasp: reach, then carry the object away (out of the frame, possibly); release is its time reversal.
        local = np.zeros(a.count)
        cut = int(rng.integers(a.count // 3, a.count // 2 + 1))
        local[cut:] = np.linspace(0, 1, a.count - cut)
        progress = _smoothstep(local)
        a.touching = np.ones(a.count)
        a.touching[:cut] = _smoothstep((np.arange(cut) + 1) / cut)
    path = start + step * progress[:, None] + arc * np.sin(np.pi * progress)[:, None]  # (T, 2)
    angle = a.angle0 + rng.uniform(-0.8, 0.8) * progress
    a.poses[0][:] = np.column_stack([path, angle])
    a.grip = path
    if label == "release":
        a.poses[0], a.touching = a.poses[0][::-1].copy(), a.touching[::-1].copy()
        a.grip = a.poses[0][:, :2]


def _rotate(a: _Action, label: str) -> None:
    """rotate_cw / rotate_ccw: turn the target in place (shifting it a little), the hand holding its rim."""
    rng = a.rng
    turn = rng.uniform(1.0, 2.5) * np.pi * (1 if label == "rotate_cw" else -1)
    lift = rng.normal(0, 0.3, size=2) * a.unit
    angle = a.angle0 + turn * a.progress
    a.poses[0][:] = np.column_stack([a.start + lift * a.progress[:, None], angle])
    offset = rng.uniform(-np.pi, np.pi)
    rim = np.column_stack([np.cos(angle + offset), np.sin(angle + offset)])  # (T, 2)
    a.grip = a.poses[0][:, :2] + 0.7 * a.target.size * rim


def _pour(a: _Action, label: str) -> None:
    """pour: lift the bottle above a receiver, tilt it (a stream runs while it is tilted far), bring it back."""
    rng = a.rng
    receiver = _thing(rng, a.unit, str(rng.choice(["disc", "ring", "handled", "box"])))
    place = a.spot(1.5 * a.unit)
    a.add(receiver, place, rng.uniform(-np.pi, np.pi))
    sign = rng.choice([-1.0, 1.0])
    above = place + np.array([-sign * 1.6 * a.unit, -1.3 * a.unit])
    out = _smoothstep(a.active / 0.3) - _smoothstep((a.active - 0.7) / 0.3)
    inner = np.clip((a.active - 0.3) / 0.4, 0, 1)
    path = a.start + (above - a.start) * out[:, None]  # (T, 2)
    tilt = sign * rng.uniform(1.4, 2.1) * np.minimum(1.0, 1.6 * np.sin(np.pi * inner))
    a.poses[0][:] = np.column_stack([path, tilt])
    a.grip = path
    a.stream = np.abs(tilt) > 1.3


def _shake(a: _Action, label: str) -> None:
    """shake: take the target to another place and shake it there along a random axis."""
    rng = a.rng
    out = _smoothstep(a.active / 0.25)
    target_place = a.spot(2 * a.unit)
    path = a.start + (target_place - a.start) * out[:, None]  # (T, 2)
    axis = rng.uniform(-np.pi, np.pi)
    frequency = rng.uniform(2.0, 4.0)
    wave = np.sin(2 * np.pi * frequency * a.seconds + rng.uniform(0, 2 * np.pi)) * (a.active > 0) * (a.active < 1)
    amplitude = rng.uniform(0.35, 0.7) * a.unit
    path = path + amplitude * wave[:, None] * np.array([math.cos(axis), math.sin(axis)])
    a.poses[0][:] = np.column_stack([path, a.angle0 + 0.3 * wave])
    a.grip = path


def _stir(a: _Action, label: str) -> None:
    """stir: circle the stick inside a bowl while the manipulation lasts; the hand holds the stick's far end."""
    rng = a.rng
    bowl = _thing(rng, a.unit * 1.3, str(rng.choice(["disc", "ring"])))
    center = a.spot(1.8 * a.unit)
    a.add(bowl, center, 0.0)
    radius = rng.uniform(0.25, 0.5) * bowl.size
    turn = rng.choice([-1.0, 1.0]) * 2 * np.pi * rng.uniform(0.8, 1.6) * a.seconds + rng.uniform(0, 2 * np.pi)
    busy = np.sin(np.pi * np.clip(a.active, 0, 1)) > 0.05
    path = np.where(busy[:, None], center + radius * np.column_stack([np.cos(turn), np.sin(turn)]), a.start)
    angle = a.angle0 + 0.3 * np.sin(turn)
    a.poses[0][:] = np.column_stack([path, angle])
    a.grip = path + 1.4 * a.target.size * np.column_stack([np.cos(angle), np.sin(angle)])


def _chop(a: _Action, label: str) -> None:
    """chop: move the blade along a piece of food, chopping across it; the hand holds the handle."""
    rng, unit = a.rng, a.unit
    food = _thing(rng, unit * 1.2, str(rng.choice(["disc", "box", "lidded"])))
    center = a.spot(1.8 * unit)
    a.add(food, center, rng.uniform(-np.pi, np.pi))
    axis = rng.uniform(-np.pi, np.pi)
    along = np.array([math.cos(axis), math.sin(axis)])
    across = np.array([-along[1], along[0]])
    frequency = rng.uniform(1.5, 3.0)
    busy = (a.active > 0) & (a.active < 1)
    chop = np.abs(np.sin(np.pi * frequency * a.seconds)) * busy
    path = center - 0.6 * unit * along + 1.2 * unit * along * a.active[:, None] - 0.5 * unit * chop[:, None] * across
    angle = np.full(a.count, axis + rng.uniform(-0.3, 0.3))
    a.poses[0][:] = np.column_stack([path, angle])
    a.grip = path + 1.3 * a.target.size * np.column_stack([np.cos(angle), np.sin(angle)])


def _reach(a: _Action, label: str) -> None:
    """reach: the hand goes to (near) the target and back without moving it."""
    a.touching = np.sin(np.pi * (np.arange(a.count) + 0.5) / a.count) ** 2 * a.rng.uniform(0.8, 1.0)
    a.grip = a.poses[0][:, :2] + a.rng.normal(0, 0.3, size=2) * a.unit


def _wipe(a: _Action, label: str) -> None:
    """wipe: the hand sweeps to and fro over a place of the table; no object moves."""
    rng = a.rng
    center = a.spot(1.5 * a.unit)
    axis = rng.uniform(-np.pi, np.pi)
    wave = np.sin(2 * np.pi * rng.uniform(1.0, 2.0) * a.seconds)
    a.grip = center + rng.uniform(0.8, 1.6) * a.unit * wave[:, None] * np.array([math.cos(axis), math.sin(axis)])
    a.touching = np.maximum(a.touching, 0.0)


def _slide(a: _Action, label: str) -> None:
    """slide: the target slides (and turns a little) by itself; the hand takes no part."""
    rng = a.rng
    step = rng.normal(0, 1, size=2)
    step = step / (np.linalg.norm(step) + 1e-6) * rng.uniform(0.25, 0.5) * min(a.width, a.height * 1.33)
    start = np.clip(a.spot(a.unit) - step / 2, a.unit, (a.width - a.unit, a.height - a.unit))
    a.poses[0][:] = np.column_stack([start + step * a.progress[:, None], a.angle0 + rng.uniform(-1, 1) * a.progress])
    a.hand_free = True


def _idle(a: _Action, label: str) -> None:
    """idle: nothing moves and the hand takes no part."""
    a.hand_free = True


# The animation of each class; it gets the class name too, since classes that differ only in direction share one.
_MOTIONS: dict[str, Callable[[_Action, str], None]] = {
    "idle": _idle,
    "reach": _reach,
    **dict.fromkeys(("carry_left", "carry_right", "carry_up", "carry_down", "grasp", "release"), _carry),
    **dict.fromkeys(("rotate_cw", "rotate_ccw"), _rotate),
    "pour": _pour,
    "shake": _shake,
    "stir": _stir,
    "chop": _chop,
    "slide": _slide,
    "wipe": _wipe,
}


def _add_distractors(a: _Action) -> None:
    """Objects that take no part: 1 to 4, some in the target's colour, at random places, resting."""
    rng = a.rng
    for _ in range(int(rng.integers(MIN_DISTRACTORS, MAX_DISTRACTORS + 1))):
        other = _thing(rng, a.unit)
        if rng.random() < 0.3:
            other.color = a.target.color.copy()
        a.add(other, a.spot(a.unit), rng.uniform(-np.pi, np.pi))


def _plan(rng: np.random.Generator, label: str, num_frames: int, height: int, width: int, fps: float) -> _Scene:
    """Draw a scene for class ``label`` and animate it over ``num_frames`` frames."""
    if label not in _MOTIONS:
        raise ValueError(f"unknown class {label!r}")
    count = num_frames
    unit = rng.uniform(0.07, 0.15) * min(height, width * 0.75) * 1.33
    background = _background(rng, str(rng.choice(BACKGROUNDS)), height + 2 * MARGIN, width + 2 * MARGIN)
    # The hand enters from a random point of the border (its forearm starts beyond the frame).
    side = rng.uniform(0, 2 * np.pi)
    shoulder = np.array([width / 2 + 0.8 * width * math.cos(side), height / 2 + 0.8 * height * math.sin(side)])
    rest = np.array([width / 2 + 0.45 * width * math.cos(side), height / 2 + 0.45 * height * math.sin(side)])
    rest = rest + rng.normal(0, 0.05, size=2) * (width, height)
    wander = 0.4 * unit * np.column_stack([_walk(rng, count, fps), _walk(rng, count, fps)])  # (T, 2)
    action = _stage(rng, label, count, height, width, fps, unit)
    _MOTIONS[label](action, label)
    _add_distractors(action)
    if action.hand_free:
        action.touching = np.zeros(count)
        if rng.random() < 0.5:  # a hand that comes in a little and goes back is no action either
            action.touching = rng.uniform(0.1, 0.35) * np.sin(np.pi * (np.arange(count) + 0.5) / count) ** 2
        action.grip = np.tile(action.spot(unit), (count, 1))
    hand = rest + wander + (action.grip - rest - wander) * action.touching[:, None]  # (T, 2)
    return _Scene(
        background=background, things=action.things, poses=action.poses, hand=hand, shoulder=shoulder,
        skin=_color(rng), sleeve=_color(rng), arm_width=unit * rng.uniform(0.35, 0.55), stream=action.stream,
        stream_color=_color(rng),
    )  # fmt: skip


def _moved(poses: np.ndarray, threshold: float) -> np.ndarray:
    """(T,) bool: the pose (T, k) changed by more than ``threshold`` since the previous frame (frame 0: the next)."""
    step = np.abs(np.diff(poses, axis=0)).max(axis=1)  # (T - 1,)
    return np.concatenate([step[:1], step]) > threshold


@dataclass
class _Camera:
    """What the camera adds to a clip: ``shake`` (T, 2) int pixel offsets, ``gain`` (T,) exposure, ``tint`` (3,)
    colour balance, ``light`` (H, W) a lighting gradient, ``noise`` (2H, 2W, 3) sensor noise (each frame crops it)."""

    shake: np.ndarray
    gain: np.ndarray
    tint: np.ndarray
    light: np.ndarray
    noise: np.ndarray


def _camera(rng: np.random.Generator, count: int, height: int, width: int, fps: float) -> _Camera:
    """Draw the camera shake, lighting drift and sensor noise of a clip of ``count`` frames."""
    shake = np.clip(np.round(rng.uniform(0, 2) * np.column_stack([_walk(rng, count, fps), _walk(rng, count, fps)])),
                    -MARGIN, MARGIN).astype(int)  # fmt: skip
    gain = rng.uniform(0.75, 1.2) * (1 + rng.uniform(0, 0.15) * _walk(rng, count, 2 * fps))
    tint = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    light_angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0, 0.5)
    columns = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]  # (1, W)
    rows = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]  # (H, 1)
    light = 1 + strength * (math.cos(light_angle) * columns + math.sin(light_angle) * rows)  # (H, W)
    noise_level = rng.uniform(1.0, 6.0)
    noise = rng.standard_normal((2 * height, 2 * width, 3), dtype=np.float32) * noise_level
    return _Camera(shake=shake, gain=gain, tint=tint, light=light, noise=noise)


def _draw_things(
    image: np.ndarray, things: list[_Thing], poses: list[np.ndarray], which: list[int], t: int, dx: int, dy: int
) -> None:
    """Draw ``things[i]`` for ``i`` in ``which`` in their poses of frame ``t``, shifted by (dx, dy), onto ``image``."""
    for i in which:
        x, y, angle = poses[i][t]
        _draw_thing(image, things[i], x + dx, y + dy, angle)


def _draw_stream(image: np.ndarray, scene: _Scene, t: int, dx: int, dy: int) -> None:
    """Draw the stream that falls from the mouth of thing 0 (a bottle) in frame ``t``, shifted by (dx, dy)."""
    x, y, angle = scene.poses[0][t]
    thing = scene.things[0]
    mouth_x, mouth_y = x + 1.6 * thing.size * math.sin(angle), y - 1.6 * thing.size * math.cos(angle)
    fill_bar(image, mouth_x + dx, mouth_y + dy, mouth_x + dx, mouth_y + dy + 1.3 * thing.size,
             0.12 * thing.size + 0.5, scene.stream_color)  # fmt: skip


def _draw_arm(
    image: np.ndarray, scene: _Scene, t: int, dx: int, dy: int, sleeve: np.ndarray, skin: np.ndarray
) -> None:
    """Draw the forearm (in ``sleeve``) and hand (in ``skin``) of frame ``t``, shifted by (dx, dy), onto ``image``."""
    hand_x, hand_y = scene.hand[t] + (dx, dy)
    fill_bar(image, scene.shoulder[0] + dx, scene.shoulder[1] + dy, hand_x, hand_y, scene.arm_width, sleeve)
    heading = math.atan2(hand_y - scene.shoulder[1], hand_x - scene.shoulder[0])
    fill_ellipse(image, hand_x, hand_y, 1.3 * scene.arm_width, scene.arm_width, heading, skin)


def _cell_means(plane: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Mean of ``plane`` (H, W) over each :data:`MOTION_CELL` square cell: (rows, columns) (partial cells dropped)."""
    cells = plane[: rows * MOTION_CELL, : columns * MOTION_CELL]
    return cells.reshape(rows, MOTION_CELL, columns, MOTION_CELL).mean(axis=(1, 3))


def _render(
    scene: _Scene, rng: np.random.Generator, height: int, width: int, fps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) uint8 of ``scene`` with camera shake, lighting drift and sensor noise, and its motion maps.

    The motion map of frame t is the fraction of each :data:`MOTION_CELL` x :data:`MOTION_CELL` cell covered by the
    things (the hand and its forearm included) that moved since the previous frame: (T, H / cell, W / cell) float32.
    Camera shake, lighting and noise are no motion.
    """
    count = len(scene.hand)
    white = np.ones(3, dtype=np.float32)
    silhouettes = [dataclasses.replace(thing, color=white, accent=white) for thing in scene.things]
    moved = [_moved(pose, 0.05) for pose in scene.poses]
    hand_moved = _moved(scene.hand, 0.3)
    motion = np.zeros((count, height // MOTION_CELL, width // MOTION_CELL), dtype=np.float32)
    camera = _camera(rng, count, height, width, fps)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    moving = [i for i, pose in enumerate(scene.poses) if np.ptp(pose, axis=0).max() > 1e-6]
    # Things that never move are drawn once, onto the (margin-padded) background.
    layer = scene.background.copy()
    still = [i for i in range(len(scene.things)) if i not in moving]
    _draw_things(layer, scene.things, scene.poses, still, 0, MARGIN, MARGIN)
    for t in range(count):
        dx, dy = camera.shake[t]
        image = layer[MARGIN - dy : MARGIN - dy + height, MARGIN - dx : MARGIN - dx + width].copy()  # (H, W, 3)
        _draw_things(image, scene.things, scene.poses, moving, t, dx, dy)
        if scene.stream[t]:
            _draw_stream(image, scene, t, dx, dy)
        _draw_arm(image, scene, t, dx, dy, scene.sleeve, scene.skin)
        image *= (camera.gain[t] * camera.light)[..., None] * camera.tint
        y0, x0 = rng.integers(height), rng.integers(width)
        image += camera.noise[y0 : y0 + height, x0 : x0 + width]
        np.clip(image, 0, 255, out=image)
        frames[t] = image
        mask = np.zeros((height, width, 3), dtype=np.float32)
        _draw_things(mask, silhouettes, scene.poses, [i for i in moving if moved[i][t]], t, dx, dy)
        if hand_moved[t]:
            _draw_arm(mask, scene, t, dx, dy, white, white)
        motion[t] = _cell_means(mask[..., 0], motion.shape[1], motion.shape[2])
    return frames, motion


@dataclass(frozen=True)
class Clip:
    """One rendered clip: ``frames`` (T, H, W, 3) uint8 RGB, class id ``label``, ``motion`` (T, H / 8, W / 8) float32
    the share of each 8 x 8 cell covered by something that moves (see :func:`_render`), and every object, hand and
    sleeve colour ``colors`` (K, 3) float32 (for checking them against the demo's)."""

    frames: np.ndarray
    label: int
    motion: np.ndarray
    colors: np.ndarray


def render_clip(*, seed: int, index: int, num_frames: int, height: int, width: int, fps: float) -> Clip:
    """Clip ``index`` of the corpus with ``seed``, class :func:`clip_label` (``index``)."""
    rng = np.random.default_rng([seed, 7, index])
    label = clip_label(index)
    scene = _plan(rng, CLASSES[label], num_frames, height, width, fps)
    colors = np.stack([thing.color for thing in scene.things] + [scene.skin, scene.sleeve]).astype(np.float32)
    frames, motion = _render(scene, rng, height, width, fps)
    return Clip(frames=frames, label=label, motion=motion, colors=colors)


# ----------------------------------------------------------------------------------------------------------------
# The corpus file


def _render_range(args: tuple[int, int, int, int, int, int, float]) -> tuple[np.ndarray, np.ndarray]:
    seed, first, stop, num_frames, height, width, fps = args
    clips = [render_clip(seed=seed, index=i, num_frames=num_frames, height=height, width=width, fps=fps)
             for i in range(first, stop)]  # fmt: skip
    return np.stack([clip.frames for clip in clips]), np.stack([clip.motion for clip in clips])


def _check_corpus_size(num_clips: int, num_frames: int, height: int, width: int, holdout_fraction: float) -> None:
    """Raise :class:`EtesvsError` for a corpus too small to train on or to hold clips out of."""
    if num_clips < 2 * len(CLASSES):
        raise EtesvsError(f"pretraining corpus: need at least {2 * len(CLASSES)} clips (got {num_clips})")
    if num_frames < 4 or height < 16 or width < 16:
        raise EtesvsError(f"pretraining corpus: clips of {num_frames} frames of {width}x{height} are too small")
    if not 0 < holdout_fraction < 1:
        raise EtesvsError(f"pretraining corpus: holdout_fraction must be in (0, 1) (got {holdout_fraction})")


def _corpus_summary(
    labels: np.ndarray, holdout: np.ndarray, num_frames: int, height: int, width: int, seed: int
) -> dict:
    """The summary :func:`write_corpus` returns: clip counts (all, train, held out, smallest class) and sizes."""
    counts = np.bincount(labels, minlength=len(CLASSES))
    return {
        "clips": len(labels),
        "train_clips": int((~holdout).sum()),
        "holdout_clips": int(holdout.sum()),
        "classes": len(CLASSES),
        "clips_per_class_min": int(counts.min()),
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "seed": seed,
    }


def write_corpus(
    path: str | os.PathLike,
    *,
    num_clips: int,
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    seed: int,
    holdout_fraction: float,
    workers: int,
    progress: bool = True,
) -> dict:
    """Render ``num_clips`` clips into the HDF5 file ``path`` (written atomically); returns a summary dict.

    ``workers`` processes render blocks of clips; the file is the same for any number of workers.
    """
    from tqdm import tqdm

    _check_corpus_size(num_clips, num_frames, height, width, holdout_fraction)
    labels = np.array([clip_label(i) for i in range(num_clips)], dtype=np.int64)
    holdout = holdout_mask(num_clips, holdout_fraction)
    block = 64
    jobs = [(seed, first, min(first + block, num_clips), num_frames, height, width, fps)
            for first in range(0, num_clips, block)]  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        clips = handle.create_dataset(
            "clips", shape=(num_clips, num_frames, height, width, 3), dtype=np.uint8,
            chunks=(1, num_frames, height, width, 3),
        )  # fmt: skip
        handle.create_dataset("labels", data=labels)
        handle.create_dataset("holdout", data=holdout)
        motion = handle.create_dataset(
            "motion", shape=(num_clips, num_frames, height // MOTION_CELL, width // MOTION_CELL), dtype=np.float16
        )
        handle.attrs.update({
            "classes": json.dumps(list(CLASSES)), "seed": seed, "fps": fps, "num_frames": num_frames,
            "height": height, "width": width, "generator": GENERATOR,
        })  # fmt: skip
        with tqdm(total=num_clips, desc="pretrain corpus", unit="clip", disable=not progress) as bar:
            if workers > 1:
                with ProcessPoolExecutor(max_workers=workers) as pool:
                    for job, (rendered, moving) in zip(jobs, pool.map(_render_range, jobs)):
                        clips[job[1] : job[2]], motion[job[1] : job[2]] = rendered, moving
                        bar.update(len(rendered))
            else:
                for job in jobs:
                    rendered, moving = _render_range(job)
                    clips[job[1] : job[2]], motion[job[1] : job[2]] = rendered, moving
                    bar.update(len(rendered))
    return _corpus_summary(labels, holdout, num_frames, height, width, seed)


@dataclass(frozen=True)
class Corpus:
    """A corpus in memory: ``clips`` (N, T, H, W, 3) uint8, ``labels`` (N,) int64, ``motion`` (N, T, H / 8, W / 8)
    float32 motion maps, ``holdout`` (N,) bool."""

    clips: np.ndarray
    labels: np.ndarray
    motion: np.ndarray
    holdout: np.ndarray
    classes: tuple[str, ...]
    fps: float


def read_corpus(path: str | os.PathLike) -> Corpus:
    """Read a corpus written by :func:`write_corpus` into memory; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise EtesvsError(f"{path}: pretraining corpus not found")
    try:
        with h5py.File(path, "r") as handle:
            return Corpus(
                clips=handle["clips"][...],
                labels=handle["labels"][...].astype(np.int64),
                motion=handle["motion"][...].astype(np.float32),
                holdout=handle["holdout"][...].astype(bool),
                classes=tuple(json.loads(handle.attrs["classes"])),
                fps=float(handle.attrs["fps"]),
            )
    except (OSError, KeyError) as error:
        raise EtesvsError(f"{path}: not a pretraining corpus ({error})") from None
