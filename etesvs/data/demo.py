"""Procedural demo dataset: kitchen "recipes" rendered as short videos in the MS-TCN layout.

The generator draws a top-down table scene (cup, jar with a screw lid, bottle, cutting board with a vegetable and a
knife, spoon, a hand with its forearm, distractor objects) and animates it through a recipe: an ordered sequence of
actions drawn from a small grammar, separated by background gaps. It is a real test of a temporal model:

- ``take_cup`` and ``put_cup`` are the same motion played forwards and backwards, and so are ``open_jar`` and
  ``close_jar`` (unscrew counter-clockwise and lift vs lower and screw clockwise): the same object, colour and path,
  so a single frame cannot tell them apart; only the direction of motion can. ``pour_water`` and ``shake_bottle``
  move the same bottle (tilt vs fast oscillation).
- the hand also reaches towards objects during background gaps, distractor objects slide now and then, the camera
  shakes and the light drifts, so "something moves" is no cue for "an action happens".
- every subject (table texture and colour, object colours and sizes, layout) is distinct, and the splits leave one
  subject out, as GTEA's do.

Everything is vectorised numpy drawing on coordinate grids (anti-aliased ellipses and rotated rectangles) and the
videos are encoded to H.264 by the ffmpeg binary that ``imageio-ffmpeg`` ships. The output is a deterministic
function of :class:`DemoConfig` (seed included).
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from tqdm import tqdm

from etesvs.errors import EtesvsError
from etesvs.io import claim_output_dir, ffmpeg_file_output

BACKGROUND = "background"
ACTIONS = (
    "take_cup",
    "put_cup",
    "pour_water",
    "stir",
    "open_jar",
    "close_jar",
    "shake_bottle",
    "cut",
)
CLASSES = (BACKGROUND, *ACTIONS)
# Pairs with the same object, colour and path that differ only in the direction of motion.
AMBIGUOUS_PAIRS = (("take_cup", "put_cup"), ("open_jar", "close_jar"))

# Activity grammars: ordered steps, each ``(probability, actions)``; a step's actions occur together or not at all,
# so that the scene state stays consistent (a lid is closed only after it was opened).
RECIPES: dict[str, tuple[tuple[float, tuple[str, ...]], ...]] = {
    "Tea": (
        (1.0, ("take_cup",)),
        (1.0, ("pour_water",)),
        (0.8, ("stir",)),
        (1.0, ("put_cup",)),
    ),
    "Coffee": (
        (1.0, ("take_cup",)),
        (1.0, ("open_jar", "stir", "close_jar")),
        (1.0, ("pour_water",)),
        (0.6, ("stir",)),
        (1.0, ("put_cup",)),
    ),
    "Salad": (
        (1.0, ("cut",)),
        (0.5, ("cut",)),
        (1.0, ("shake_bottle",)),
        (0.6, ("open_jar", "close_jar")),
    ),
    "Soup": (
        (1.0, ("open_jar",)),
        (1.0, ("shake_bottle",)),
        (1.0, ("close_jar",)),
        (1.0, ("stir",)),
        (0.5, ("cut",)),
    ),
}
MAX_ACTIONS_PER_VIDEO = max(sum(len(actions) for _, actions in steps) for steps in RECIPES.values())

# Typical duration in seconds of each action; the actual ones are log-normal around these, then stretched to fit the
# video length.
MEAN_SECONDS = {
    "take_cup": 1.5,
    "put_cup": 1.5,
    "pour_water": 3.0,
    "stir": 2.5,
    "open_jar": 2.0,
    "close_jar": 2.0,
    "shake_bottle": 2.0,
    "cut": 4.0,
}
# The object each action moves; every other object rests during that action.
MOVING_OBJECT = {
    "take_cup": "cup",
    "put_cup": "cup",
    "open_jar": "lid",
    "close_jar": "lid",
    "pour_water": "bottle",
    "shake_bottle": "bottle",
    "stir": "spoon",
    "cut": "knife",
}
MIN_ACTION_FRAMES = 3
# Fraction of an action spent reaching for the object (and, at the end, withdrawing the hand).
REACH = 0.2
JITTER_PIXELS = 3


@dataclass(frozen=True)
class DemoConfig:
    """Size and seed of a generated demo dataset.

    Video lengths are uniform in ``[min_seconds, max_seconds]``; video ``i`` belongs to subject ``i % num_subjects``
    and the split ``K`` (1-based) tests on subject ``K``.
    """

    num_videos: int
    num_subjects: int
    min_seconds: float
    max_seconds: float
    width: int
    height: int
    fps: float
    seed: int

    def __post_init__(self) -> None:
        faults = []
        if self.num_subjects < 2:
            faults.append(f"num_subjects must be at least 2 (got {self.num_subjects})")
        if self.num_videos < self.num_subjects:
            faults.append(f"num_videos ({self.num_videos}) must be at least num_subjects ({self.num_subjects})")
        if self.width < 32 or self.height < 32 or self.width % 2 or self.height % 2:
            faults.append(f"width and height must be even and at least 32 (got {self.width}x{self.height})")
        if not self.fps > 0:
            faults.append(f"fps must be positive (got {self.fps})")
        if not 0 < self.min_seconds <= self.max_seconds:
            faults.append(f"need 0 < min_seconds <= max_seconds (got {self.min_seconds}, {self.max_seconds})")
        elif self.min_frames < self.shortest_allowed_frames:
            faults.append(
                f"videos must have at least {self.shortest_allowed_frames} frames to hold a whole recipe "
                f"(min_seconds * fps = {self.min_seconds} * {self.fps} = {self.min_frames})"
            )
        if faults:
            raise EtesvsError("demo dataset config: " + "; ".join(faults))

    @property
    def min_frames(self) -> int:
        return round(self.min_seconds * self.fps)

    @property
    def max_frames(self) -> int:
        return round(self.max_seconds * self.fps)

    @property
    def shortest_allowed_frames(self) -> int:
        # Every action gets MIN_ACTION_FRAMES and repeated actions need a gap frame between them.
        return MIN_ACTION_FRAMES * MAX_ACTIONS_PER_VIDEO + 2


@dataclass(frozen=True)
class Segment:
    """Frames ``[start, stop)`` of one video carry ``label``."""

    label: str
    start: int
    stop: int


@dataclass(frozen=True)
class DemoVideo:
    """One rendered demo video.

    ``frames``: (T, H, W, 3) uint8 RGB. ``labels``: T class names. ``trajectories``: object name -> (T, 3) float
    array of (x, y, angle) in pixels and radians before camera jitter (objects: cup, lid, bottle, spoon, knife,
    hand).
    """

    name: str
    subject: int
    recipe: str
    segments: tuple[Segment, ...]
    frames: np.ndarray
    trajectories: dict[str, np.ndarray]

    @property
    def labels(self) -> list[str]:
        return [segment.label for segment in self.segments for _ in range(segment.stop - segment.start)]


# ----------------------------------------------------------------------------------------------------------------
# Drawing primitives. The image is float32 (H, W, 3) in [0, 255]; shapes are anti-aliased by a one-pixel ramp of
# coverage at their edge and drawn only inside their bounding box.


def _box(image: np.ndarray, cx: float, cy: float, radius: float):
    height, width = image.shape[:2]
    x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, width)
    y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, height)
    if x0 >= x1 or y0 >= y1:
        return None
    xs = np.arange(x0, x1, dtype=np.float32)[None, :] - cx  # (1, w)
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] - cy  # (h, 1)
    return (slice(y0, y1), slice(x0, x1)), xs, ys


def _blend(image: np.ndarray, region, coverage: np.ndarray, color: np.ndarray) -> None:
    patch = image[region]  # view (h, w, 3)
    patch += coverage[..., None] * (color - patch)


def fill_ellipse(image: np.ndarray, cx: float, cy: float, rx: float, ry: float, angle: float, color) -> None:
    """Draw a filled ellipse with semi-axes ``rx`` (along ``angle``) and ``ry`` onto ``image`` (H, W, 3) in place."""
    rx, ry = max(rx, 0.5), max(ry, 0.5)
    found = _box(image, cx, cy, max(rx, ry))
    if found is None:
        return
    region, xs, ys = found
    cos, sin = math.cos(angle), math.sin(angle)
    u = xs * cos + ys * sin  # (h, w) coordinates in the ellipse's frame
    v = ys * cos - xs * sin
    distance = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    coverage = np.clip((1.0 - distance) * min(rx, ry) + 0.5, 0.0, 1.0)
    _blend(image, region, coverage, np.asarray(color, dtype=np.float32))


def fill_rect(image: np.ndarray, cx: float, cy: float, half_w: float, half_h: float, angle: float, color) -> None:
    """Draw a filled rectangle centred at (cx, cy), rotated clockwise (y points down) by ``angle``, in place."""
    found = _box(image, cx, cy, math.hypot(half_w, half_h))
    if found is None:
        return
    region, xs, ys = found
    cos, sin = math.cos(angle), math.sin(angle)
    u = xs * cos + ys * sin
    v = ys * cos - xs * sin
    inside = np.minimum(half_w - np.abs(u), half_h - np.abs(v))
    coverage = np.clip(inside + 0.5, 0.0, 1.0)
    _blend(image, region, coverage, np.asarray(color, dtype=np.float32))


def fill_bar(image: np.ndarray, x0: float, y0: float, x1: float, y1: float, half_thickness: float, color) -> None:
    """Draw a straight bar from (x0, y0) to (x1, y1) of width ``2 * half_thickness``, in place."""
    length = math.hypot(x1 - x0, y1 - y0)
    angle = math.atan2(y1 - y0, x1 - x0)
    fill_rect(image, (x0 + x1) / 2, (y0 + y1) / 2, length / 2, half_thickness, angle, color)


def _up(angle: float) -> tuple[float, float]:
    """Unit vector of a shape's local "up" (0, -1) after rotating it clockwise by ``angle``."""
    return math.sin(angle), -math.cos(angle)


# ----------------------------------------------------------------------------------------------------------------
# Subjects: appearance and layout of one person's kitchen.


@dataclass(frozen=True)
class _Subject:
    index: int
    texture: np.ndarray  # (H + 2 * JITTER_PIXELS, W + 2 * JITTER_PIXELS, 3) float32
    unit: float  # object size unit in pixels
    colors: dict[str, np.ndarray]
    places: dict[str, tuple[float, float]]  # rest positions in pixels
    cup_angle: float


_PALETTE = np.array(
    [
        [200, 40, 40], [40, 90, 200], [230, 200, 40], [40, 160, 70], [150, 60, 170], [240, 130, 30],
        [30, 170, 180], [220, 90, 150], [120, 120, 130], [245, 245, 240], [90, 60, 40], [180, 220, 90],
    ],
    dtype=np.float32,
)  # fmt: skip


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise (height, width) in about [-1, 1]: a random coarse grid, bilinearly upsampled."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
    ys = np.linspace(0, cells, height, dtype=np.float32)
    xs = np.linspace(0, cells, width, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx  # (height, width)
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _table_texture(rng: np.random.Generator, kind: int, height: int, width: int) -> np.ndarray:
    """A table surface (height, width, 3) float32: wood, tiles, speckled stone or striped cloth."""
    base = rng.uniform(70, 200, size=3).astype(np.float32)
    second = np.clip(base + rng.uniform(-60, 60, size=3), 20, 235).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = _smooth_noise(rng, height, width, cells=6)
    if kind == 0:  # wood: wavy horizontal grain
        period = rng.uniform(5, 9)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (ys + 4 * noise) / period)
    elif kind == 1:  # tiles with grout lines
        size = rng.uniform(14, 22)
        grout = (np.mod(xs, size) < 1.5) | (np.mod(ys, size) < 1.5)
        pattern = np.where(grout, 1.0, 0.15 + 0.1 * noise)
    elif kind == 2:  # speckled stone
        pattern = np.clip(0.5 + 0.6 * noise + 0.25 * rng.standard_normal((height, width)), 0, 1)
    else:  # cloth: diagonal stripes
        period = rng.uniform(8, 14)
        pattern = (np.mod(xs + ys, period) < period / 2).astype(np.float32) * 0.8 + 0.1 * (noise + 1)
    pattern = pattern.astype(np.float32)[..., None]  # (height, width, 1)
    return base * (1 - pattern) + second * pattern


def _make_subject(config: DemoConfig, index: int) -> _Subject:
    # A subject depends only on (seed, index), not on how many videos are generated.
    rng = np.random.default_rng([config.seed, 1, index])
    width, height = config.width, config.height
    texture = _table_texture(rng, index % 4, height + 2 * JITTER_PIXELS, width + 2 * JITTER_PIXELS)
    order = rng.permutation(len(_PALETTE))
    colors = {
        name: np.clip(_PALETTE[order[i]] + rng.uniform(-20, 20, size=3), 0, 255).astype(np.float32)
        for i, name in enumerate(("cup", "jar", "lid", "bottle", "vegetable", "spoon"))
    }
    colors["board"] = np.array(rng.uniform([110, 70, 30], [200, 140, 80]), dtype=np.float32)
    colors["knife"] = np.full(3, rng.uniform(170, 215), dtype=np.float32)
    colors["handle"] = np.array(rng.uniform([20, 20, 20], [90, 60, 50]), dtype=np.float32)
    colors["skin"] = np.array(rng.uniform([150, 95, 70], [240, 190, 160]), dtype=np.float32)
    colors["sleeve"] = _PALETTE[order[6]].copy()
    colors["water"] = np.array([90, 160, 235], dtype=np.float32)

    def place(x: float, y: float) -> tuple[float, float]:
        return (x + rng.uniform(-0.03, 0.03)) * width, (y + rng.uniform(-0.03, 0.03)) * height

    places = {
        "work": place(0.52, 0.5),
        "cup": place(0.84, 0.55),
        "jar": place(0.2, 0.3),
        "lid": place(0.09, 0.57),
        "bottle": place(0.7, 0.26),
        "board": place(0.3, 0.8),
        "spoon": place(0.62, 0.9),
        "hand": place(0.93, 0.98),
    }
    return _Subject(
        index=index,
        texture=texture,
        unit=0.1 * min(width, height * 4 / 3) * rng.uniform(0.85, 1.15),
        colors=colors,
        places=places,
        cup_angle=rng.uniform(-0.6, 0.6),
    )


# ----------------------------------------------------------------------------------------------------------------
# Planning: recipe -> segments.


def _allocate(total: int, weights: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    """Integers >= ``minimum`` summing to ``total``, the surplus shared in proportion to ``weights``."""
    surplus = total - int(minimum.sum())
    share = weights / weights.sum() * surplus
    counts = np.floor(share).astype(int)
    remainder = surplus - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:remainder]] += 1
    return minimum + counts


def _plan_segments(rng: np.random.Generator, recipe: str, num_frames: int) -> tuple[Segment, ...]:
    """Draw the recipe's actions and their durations, with background gaps, over ``num_frames`` frames."""
    actions = [action for probability, group in RECIPES[recipe] if rng.random() < probability for action in group]
    # Segments alternate gap, action, gap, ..., action, gap. Gaps may vanish, except between repeated actions.
    labels, weights, minimum = [], [], []
    for i, action in enumerate([*actions, None]):
        gap_seconds = rng.exponential(1.0) if (i in (0, len(actions)) or rng.random() < 0.6) else 0.0
        labels.append(BACKGROUND)
        weights.append(gap_seconds)
        minimum.append(1 if 0 < i < len(actions) and actions[i - 1] == action else 0)
        if action is not None:
            labels.append(action)
            weights.append(MEAN_SECONDS[action] * rng.lognormal(0.0, 0.7))
            minimum.append(MIN_ACTION_FRAMES)
    counts = _allocate(num_frames, np.asarray(weights), np.asarray(minimum))
    segments, start = [], 0
    for label, count in zip(labels, counts):
        if count > 0:
            segments.append(Segment(label, start, start + int(count)))
            start += int(count)
    return tuple(segments)


# ----------------------------------------------------------------------------------------------------------------
# Motion: segments -> per-frame poses of every object.


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _lerp(a, b, t: np.ndarray) -> np.ndarray:
    """Interpolate points a, b (2,) at t (n,) -> (n, 2)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a + (b - a) * t[:, None]


def _manipulation(phase: np.ndarray) -> np.ndarray:
    """Progress of the object's motion (n,) in [0, 1]: still while the hand reaches and withdraws."""
    return np.clip((phase - REACH) / (1 - 2 * REACH), 0.0, 1.0)


def _hand_weight(phase: np.ndarray) -> np.ndarray:
    """How far the hand is from its resting place towards the grip point (n,): 0 at both ends, 1 in between."""
    return _smoothstep(np.minimum(phase, 1 - phase) / REACH)


class _Timeline:
    """Per-frame poses (x, y, angle) of the moving objects, filled segment by segment."""

    OBJECTS = ("cup", "lid", "bottle", "spoon", "knife", "hand")

    def __init__(self, subject: _Subject, num_frames: int, fps: float, rng: np.random.Generator):
        self.subject = subject
        self.fps = fps
        self.rng = rng
        self.unit = subject.unit
        self.poses = {name: np.zeros((num_frames, 3)) for name in self.OBJECTS}
        self.grip = np.zeros((num_frames, 2))  # where the hand is drawn to
        self.reach = np.zeros(num_frames)  # 0 = hand at rest, 1 = hand at the grip point
        self.moving: list[str | None] = [None] * num_frames  # the object an action moves at each frame
        self.segment_of_frame = np.zeros(num_frames, dtype=int)
        self.segments_done = 0
        self.cup_placed = False  # cup on the work spot (after take_cup)
        self.lid_off = False
        places, unit = subject.places, subject.unit
        self.board = places["board"]
        self.vegetable = (self.board[0] - 0.3 * unit, self.board[1])
        self.knife_rest = (self.board[0] + 1.9 * unit, self.board[1] + 0.2 * unit)
        self.lid_on = (places["jar"][0], places["jar"][1])

    def cup_position(self) -> tuple[float, float]:
        return self.subject.places["work" if self.cup_placed else "cup"]

    def lid_position(self) -> tuple[float, float]:
        return self.subject.places["lid"] if self.lid_off else self.lid_on

    def rest(self, frames: slice) -> None:
        """Every object at its current resting pose."""
        places = self.subject.places
        self.poses["cup"][frames] = (*self.cup_position(), self.subject.cup_angle)
        self.poses["lid"][frames] = (*self.lid_position(), 0.0)
        self.poses["bottle"][frames] = (*places["bottle"], 0.0)
        self.poses["spoon"][frames] = (*places["spoon"], -0.3)
        self.poses["knife"][frames] = (*self.knife_rest, 0.15)
        self.grip[frames] = places["hand"]
        self.reach[frames] = 0.0

    def segment(self, segment: Segment) -> None:
        frames = slice(segment.start, segment.stop)
        count = segment.stop - segment.start
        self.rest(frames)
        self.segment_of_frame[frames] = self.segments_done
        self.segments_done += 1
        phase = (np.arange(count) + 0.5) / count  # (n,) in (0, 1), symmetric under phase -> 1 - phase
        seconds = np.arange(count) / self.fps
        if segment.label == BACKGROUND:
            self._idle(frames, phase, count)
            return
        self.reach[frames] = _hand_weight(phase)
        self.moving[frames] = [MOVING_OBJECT[segment.label]] * count
        self.MOTIONS[segment.label](self, frames, phase, seconds)

    def _idle(self, frames: slice, phase: np.ndarray, count: int) -> None:
        """Background: sometimes the hand reaches towards a random spot and comes back without doing anything."""
        if count >= self.fps and self.rng.random() < 0.5:
            height, width = (size - 2 * JITTER_PIXELS for size in self.subject.texture.shape[:2])
            target = (self.rng.uniform(0.2, 0.9) * width, self.rng.uniform(0.2, 0.9) * height)
            self.grip[frames] = target
            self.reach[frames] = self.rng.uniform(0.4, 1.0) * np.sin(np.pi * phase) ** 2

    # Each action moves its object over the manipulation phase; the reversed actions are exact time reversals.

    def _take_cup(self, frames: slice, phase: np.ndarray, seconds: np.ndarray) -> None:
        progress = _smoothstep(_manipulation(phase))
        path = _lerp(self.subject.places["cup"], self.subject.places["work"], progress)
        path[:, 1] -= 0.8 * self.unit * np.sin(np.pi * progress)  # carried in an arc
        angle = self.subject.cup_angle + 0.7 * progress
        self.poses["cup"][frames] = np.column_stack([path, angle])
        self.grip[frames] = path + 1.1 * self.unit * np.column_stack([np.cos(angle), np.sin(angle)])
        self.cup_placed = True

    def _put_cup(self, frames: slice, phase: np.ndarray, seconds: np.ndarray) -> None:
        self._take_cup(frames, 1 - phase, seconds)
        self.cup_placed = False

    def _open_jar(self, frames: slice, phase: np.ndarray, seconds: np.ndarray) -> None:
        progress = _manipulation(phase)
        unscrew = _smoothstep(progress / 0.5)  # first half: turn counter-clockwise, lifting a little
        carry = _smoothstep((progress - 0.5) / 0.5)  # second half: carry the lid to its resting place
        lifted = (self.lid_on[0], self.lid_on[1] - 0.4 * self.unit)
        path = _lerp(self.lid_on, lifted, unscrew) + (_lerp(lifted, self.subject.places["lid"], carry) - lifted)
        angle = -1.5 * np.pi * unscrew
        self.poses["lid"][frames] = np.column_stack([path, angle])
        self.grip[frames] = path + (0.3 * self.unit, 0.3 * self.unit)
        self.lid_off = True

    def _close_jar(self, frames: slice, phase: np.ndarray, seconds: np.ndarray) -> None:
        self._open_jar(frames, 1 - phase, seconds)
        self.lid_off = False

    def _move_out_and_back(self, phase: np.ndarray, start, target, ramp: float):
        """Path (n, 2) from ``start`` to ``target`` and back, with the inner progress (n,) in [0, 1]."""
        progress = _manipulation(phase)
        out = _smoothstep(progress / ramp) - _smoothstep((progress - (1 - ramp)) / ramp)
        inner = np.clip((progress - ramp) / (1 - 2 * ramp), 0.0, 1.0)
        return _lerp(start, target, out), inner

    def _pour_water(self, frames: slice, phase: np.ndarray, seconds: np.ndarray) -> None:
        cup_x, cup_y = self.cup_position()
        target = (cup_x + 1.5 * self.unit, cup_y - 1.3 * self.unit)
        path, inner = self._move_out_and_back(phase, self.subject.places["bottle"], target, 0.3)
        tilt = -1.95 * np.minimum(1.0, 1.6 * np.sin(np.pi * inner))  # tilt left towards the cup, hold, return
        self.poses["bottle"][frames] = np.column_stack([path, tilt])
        self.grip[frames] = path + (0.5 * self.unit, 0.4 * self.unit)

    def _shake_bottle(self, frames: slice, phase: np.ndarray, seconds: np.ndarray) -> None:
        target = (self.board[0] + 0.6 * self.unit, self.board[1] - 1.6 * self.unit)
        path, inner = self._move_out_and_back(phase, self.subject.places["bottle"], target, 0.25)
        envelope = np.sin(np.pi * inner)
        wave = np.sin(2 * np.pi * 3.0 * seconds)  # 3 shakes per second
        path[:, 0] += 0.45 * self.unit * envelope * wave
        angle = -0.5 * envelope + 0.3 * envelope * wave
        self.poses["bottle"][frames] = np.column_stack([path, angle])
        self.grip[frames] = path + (0.5 * self.unit, 0.4 * self.unit)

    def _stir(self, frames: slice, phase: np.ndarray, seconds: np.ndarray) -> None:
        cup = self.cup_position()
        path, inner = self._move_out_and_back(phase, self.subject.places["spoon"], cup, 0.2)
        radius = 0.35 * self.unit * np.sin(np.pi * inner)
        turn = 2 * np.pi * 1.2 * seconds  # 1.2 turns per second
        path += radius[:, None] * np.column_stack([np.cos(turn), np.sin(turn)])
        angle = -0.3 + 0.3 * np.sin(turn) * (inner > 0)
        self.poses["spoon"][frames] = np.column_stack([path, angle])
        self.grip[frames] = path + 1.3 * self.unit * np.column_stack([np.cos(angle), np.sin(angle)])

    def _cut(self, frames: slice, phase: np.ndarray, seconds: np.ndarray) -> None:
        start = (self.vegetable[0] - 0.6 * self.unit, self.vegetable[1] - 0.3 * self.unit)
        path, inner = self._move_out_and_back(phase, self.knife_rest, start, 0.2)
        path[:, 0] += 1.2 * self.unit * inner  # work across the vegetable
        chop = np.abs(np.sin(np.pi * 2.5 * seconds)) * np.sin(np.pi * inner)  # 2.5 chops per second
        path[:, 1] -= 0.5 * self.unit * chop
        self.poses["knife"][frames] = np.column_stack([path, np.full(len(path), 0.15)])
        self.grip[frames] = path + (1.0 * self.unit, 0.1 * self.unit)

    MOTIONS: ClassVar[dict[str, Callable[..., None]]] = {
        "take_cup": _take_cup,
        "put_cup": _put_cup,
        "open_jar": _open_jar,
        "close_jar": _close_jar,
        "pour_water": _pour_water,
        "shake_bottle": _shake_bottle,
        "stir": _stir,
        "cut": _cut,
    }

    def finish(self) -> None:
        """Hand pose: between its (wandering) resting place and the grip point."""
        count = len(self.reach)
        rest = np.asarray(self.subject.places["hand"]) + 0.5 * self.unit * np.column_stack(
            [_random_walk(self.rng, count, self.fps), _random_walk(self.rng, count, self.fps)]
        )
        position = rest + (self.grip - rest) * self.reach[:, None]
        self.poses["hand"][:] = np.column_stack([position, np.zeros(count)])


def _random_walk(rng: np.random.Generator, count: int, frames_per_knot: float) -> np.ndarray:
    """Smooth random signal (count,) in [-1, 1]: random values every ``frames_per_knot`` frames, interpolated."""
    knots = int(count / frames_per_knot) + 2
    values = rng.uniform(-1, 1, size=knots)
    return np.interp(np.arange(count) / frames_per_knot, np.arange(knots), values)


# ----------------------------------------------------------------------------------------------------------------
# Rendering.


@dataclass(frozen=True)
class _Distractor:
    kind: int  # 0 ellipse, 1 rectangle
    color: np.ndarray
    size: tuple[float, float]
    angle: float
    path: np.ndarray  # (T, 2)


def _distractors(rng: np.random.Generator, subject: _Subject, config: DemoConfig, count: int) -> list[_Distractor]:
    """Objects that belong to no action; now and then, at random times, one slides away or wobbles."""
    result = []
    for _ in range(int(rng.integers(1, 4))):
        # Half of them copy the colour of a real object, so colour alone does not identify it.
        if rng.random() < 0.5:
            color = subject.colors[str(rng.choice(["cup", "jar", "bottle", "vegetable"]))].copy()
        else:
            color = _PALETTE[rng.integers(len(_PALETTE))].copy()
        position = np.array([rng.uniform(0.05, 0.95) * config.width, rng.uniform(0.05, 0.95) * config.height])
        path = np.tile(position, (count, 1))
        for _ in range(int(rng.poisson(count / config.fps / 15))):  # about once in 15 seconds
            start = int(rng.integers(count))
            length = int(rng.uniform(0.5, 1.5) * config.fps) + 1
            step = rng.normal(0, 1.0, size=2) * subject.unit
            progress = (np.arange(count - start) + 1) / length
            if rng.random() < 0.5:  # slides to a new place
                ramp = _smoothstep(progress)
            else:  # wobbles out and back
                ramp = np.sin(np.pi * np.clip(progress, 0.0, 1.0))
            path[start:] += step * ramp[:, None]
        result.append(
            _Distractor(
                kind=int(rng.integers(2)),
                color=color,
                size=(rng.uniform(0.3, 0.8) * subject.unit, rng.uniform(0.3, 0.8) * subject.unit),
                angle=rng.uniform(0, np.pi),
                path=path,
            )
        )
    return result


_DRAW_ORDER = ("lid", "cup", "spoon", "knife", "bottle")


def _draw_fixtures(image: np.ndarray, subject: _Subject, offset: float) -> None:
    """Draw what never moves (board, vegetable, jar) onto ``image`` in place, shifted by ``offset`` pixels."""
    unit, colors, places = subject.unit, subject.colors, subject.places
    board_x, board_y = places["board"][0] + offset, places["board"][1] + offset
    fill_rect(image, board_x, board_y, 2.4 * unit, 1.3 * unit, 0.0, colors["board"])
    fill_ellipse(image, board_x - 0.3 * unit, board_y, 0.9 * unit, 0.55 * unit, 0.2, colors["vegetable"])
    jar_x, jar_y = places["jar"][0] + offset, places["jar"][1] + offset
    fill_ellipse(image, jar_x, jar_y, 1.15 * unit, 1.15 * unit, 0.0, colors["jar"])
    fill_ellipse(image, jar_x, jar_y, 0.8 * unit, 0.8 * unit, 0.0, colors["jar"] * 0.55)


def _draw_object(image: np.ndarray, subject: _Subject, name: str, x: float, y: float, angle: float) -> None:
    """Draw one movable object at (x, y) rotated by ``angle`` onto ``image`` (H, W, 3) in place."""
    unit, colors = subject.unit, subject.colors
    cos, sin = math.cos(angle), math.sin(angle)
    if name == "lid":
        fill_ellipse(image, x, y, 0.95 * unit, 0.95 * unit, 0.0, colors["lid"])
        up_x, up_y = _up(angle)  # a notch on the lid makes its rotation visible
        fill_bar(image, x, y, x + 0.85 * unit * up_x, y + 0.85 * unit * up_y, 0.18 * unit, colors["lid"] * 0.45)
    elif name == "cup":
        fill_bar(image, x, y, x + 1.3 * unit * cos, y + 1.3 * unit * sin, 0.2 * unit, colors["cup"])
        fill_ellipse(image, x, y, 0.9 * unit, 0.9 * unit, 0.0, colors["cup"])
        fill_ellipse(image, x, y, 0.65 * unit, 0.65 * unit, 0.0, colors["cup"] * 0.5)
    elif name == "spoon":
        fill_bar(image, x, y, x + 1.6 * unit * cos, y + 1.6 * unit * sin, 0.12 * unit, colors["spoon"])
        fill_ellipse(image, x, y, 0.35 * unit, 0.25 * unit, angle, colors["spoon"])
    elif name == "knife":
        fill_rect(image, x, y, 0.9 * unit, 0.2 * unit, angle, colors["knife"])
        fill_rect(image, x + 1.3 * unit * cos, y + 1.3 * unit * sin, 0.45 * unit, 0.17 * unit, angle, colors["handle"])
    elif name == "bottle":
        fill_rect(image, x, y, 0.45 * unit, 1.05 * unit, angle, colors["bottle"])
        up_x, up_y = _up(angle)
        fill_rect(
            image,
            x + 1.35 * unit * up_x,
            y + 1.35 * unit * up_y,
            0.2 * unit,
            0.35 * unit,
            angle,
            colors["bottle"] * 0.7,
        )
        if angle < -1.3:  # tilted far enough to pour
            mouth_x, mouth_y = x + 1.7 * unit * up_x, y + 1.7 * unit * up_y
            fill_bar(image, mouth_x, mouth_y, mouth_x - 0.2 * unit, mouth_y + 1.3 * unit, 0.12 * unit, colors["water"])
    elif name == "hand":
        # The forearm comes in from the bottom right corner.
        shoulder_x, shoulder_y = image.shape[1] * 1.05, image.shape[0] * 1.35
        fill_bar(image, shoulder_x, shoulder_y, x, y, 0.45 * unit, colors["sleeve"])
        fill_ellipse(image, x, y, 0.6 * unit, 0.45 * unit, math.atan2(y - shoulder_y, x - shoulder_x), colors["skin"])
    else:
        raise ValueError(f"unknown object {name!r}")


def _render(config: DemoConfig, subject: _Subject, timeline: _Timeline, rng: np.random.Generator) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 with camera jitter, lighting drift and sensor noise.

    Objects that rest during a stretch of frames are drawn once into a cached layer (bigger than the frame by the
    jitter margin), so each frame only draws the moving object and the hand on a slice of that layer.
    """
    count = len(timeline.reach)
    width, height = config.width, config.height
    margin = JITTER_PIXELS
    distractors = _distractors(rng, subject, config, count)
    # Camera: a slow wander plus a few short bursts of shake.
    jitter = 1.2 * np.column_stack([_random_walk(rng, count, config.fps), _random_walk(rng, count, config.fps)])
    for _ in range(int(rng.poisson(count / config.fps / 10))):
        start = int(rng.integers(count))
        stop = min(count, start + int(0.6 * config.fps) + 1)
        jitter[start:stop] += rng.normal(0, 1.5, size=(stop - start, 2))
    shifts = np.clip(np.round(jitter), -margin, margin).astype(int)
    # Light: global gain and colour drifting over seconds, and a directional gradient that turns slowly.
    gain = 1.0 + 0.15 * _random_walk(rng, count, 4 * config.fps)
    tint = 1.0 + 0.05 * np.column_stack([_random_walk(rng, count, 3 * config.fps) for _ in range(3)])
    light_angle = rng.uniform(0, 2 * np.pi) + 1.5 * _random_walk(rng, count, 5 * config.fps)
    columns = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]  # (1, W)
    rows = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]  # (H, 1)
    # Sensor noise: random crops of one noise field twice the frame size (drawing fresh noise per frame is slow).
    noise = rng.standard_normal((2 * height, 2 * width, 3), dtype=np.float32) * rng.uniform(2.0, 5.0)
    noise_offsets = np.column_stack([rng.integers(height, size=count), rng.integers(width, size=count)])

    fixtures = subject.texture.copy()
    _draw_fixtures(fixtures, subject, margin)
    layer, layer_key = fixtures, None
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for t in range(count):
        moving = timeline.moving[t]
        spots = np.array([distractor.path[t] for distractor in distractors]).round(2)
        key = (timeline.segment_of_frame[t], spots.tobytes())
        if key != layer_key:
            layer, layer_key = fixtures.copy(), key
            for distractor, (x, y) in zip(distractors, spots):
                draw = fill_ellipse if distractor.kind == 0 else fill_rect
                draw(layer, x + margin, y + margin, *distractor.size, distractor.angle, distractor.color)
            for name in _DRAW_ORDER:
                if name != moving:
                    x, y, angle = timeline.poses[name][t]
                    _draw_object(layer, subject, name, x + margin, y + margin, angle)
        dx, dy = shifts[t]
        image = layer[margin - dy : margin - dy + height, margin - dx : margin - dx + width].copy()  # (H, W, 3)
        for name in (moving, "hand") if moving else ("hand",):
            x, y, angle = timeline.poses[name][t]
            _draw_object(image, subject, name, x + dx, y + dy, angle)
        gradient = (gain[t] * 0.25 * math.cos(light_angle[t])) * columns + (  # (H, W)
            gain[t] * (1.0 + 0.25 * math.sin(light_angle[t]) * rows)
        )
        image *= gradient[..., None] * tint[t].astype(np.float32)
        noise_y, noise_x = noise_offsets[t]
        image += noise[noise_y : noise_y + height, noise_x : noise_x + width]
        np.clip(image, 0, 255, out=image)
        frames[t] = image
    return frames


def video_names(config: DemoConfig) -> list[tuple[str, int, str]]:
    """(name, subject index, recipe) of every video, in generation order.

    Subjects take turns (video ``i`` belongs to subject ``i % num_subjects``) and each subject cycles through the
    recipes, so every subject performs every recipe once it has enough videos.
    """
    recipes = list(RECIPES)
    digits = len(str(config.num_videos))
    result = []
    for index in range(config.num_videos):
        subject = index % config.num_subjects
        recipe = recipes[(index // config.num_subjects) % len(recipes)]
        result.append((f"S{subject + 1}_{recipe}_{index + 1:0{digits}d}", subject, recipe))
    return result


@dataclass(frozen=True)
class DemoPlan:
    """What happens in one video: its name, subject (0-based), recipe and labelled segments covering every frame."""

    name: str
    subject: int
    recipe: str
    segments: tuple[Segment, ...]

    @property
    def num_frames(self) -> int:
        return self.segments[-1].stop


def plan_demo_video(config: DemoConfig, index: int) -> DemoPlan:
    """Draw the length, actions and segment durations of video ``index`` (0-based), without rendering it."""
    name, subject, recipe = video_names(config)[index]
    rng = np.random.default_rng([config.seed, 2, index])
    num_frames = int(rng.integers(config.min_frames, config.max_frames + 1))
    return DemoPlan(name=name, subject=subject, recipe=recipe, segments=_plan_segments(rng, recipe, num_frames))


def render_demo_video(config: DemoConfig, index: int, *, subject: _Subject | None = None) -> DemoVideo:
    """Plan and render video ``index`` (0-based) of the dataset described by ``config``."""
    plan = plan_demo_video(config, index)
    if subject is None:
        subject = _make_subject(config, plan.subject)
    timeline = _Timeline(subject, plan.num_frames, config.fps, np.random.default_rng([config.seed, 3, index]))
    for segment in plan.segments:
        timeline.segment(segment)
    timeline.finish()
    frames = _render(config, subject, timeline, np.random.default_rng([config.seed, 4, index]))
    return DemoVideo(
        name=plan.name,
        subject=plan.subject,
        recipe=plan.recipe,
        segments=plan.segments,
        frames=frames,
        trajectories=timeline.poses,
    )


# ----------------------------------------------------------------------------------------------------------------
# Output.


def encode_mp4(frames: np.ndarray, path: Path, fps: float) -> None:
    """Encode frames (T, H, W, 3) uint8 RGB to an H.264 yuv420p MP4 at ``path`` with the bundled ffmpeg binary."""
    import imageio_ffmpeg

    count, height, width, _ = frames.shape
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{fps:g}", "-i", "pipe:0",
        "-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p", "-threads", "1",
        # Identical bytes on every run, so DVC sees no change when nothing changed.
        "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact",
        # Exactly this file, whatever its name (the temporary name ends in .tmp, hence -f).
        "-f", "mp4", ffmpeg_file_output(path),
    ]  # fmt: skip
    result = subprocess.run(command, input=np.ascontiguousarray(frames).tobytes(), capture_output=True, check=False)
    if result.returncode != 0:
        message = " ".join(result.stderr.decode(errors="replace").split()[-30:])
        raise EtesvsError(f"{path}: ffmpeg failed to encode {count} frames: {message}")


def _readme(config: DemoConfig, num_frames: dict[str, int]) -> str:
    return f"""ETESVS demo dataset (procedurally generated by etesvs/data/demo.py; regenerate rather than edit)

Top-down videos of a table on which a hand performs kitchen "recipes" ({", ".join(RECIPES)}), each an ordered
sequence of actions with background gaps, distractor objects, camera shake, lighting drift and sensor noise.
Classes: {", ".join(CLASSES)}.
take_cup/put_cup and open_jar/close_jar are the same motion forwards and backwards, so single frames cannot tell
them apart; a model needs temporal context.

Layout (MS-TCN): Videos/<video>.mp4 (H.264), groundTruth/<video>.txt (one class per frame), mapping.txt,
splits/{{train,test}}.split<K>.bundle. Video names are S<subject>_<recipe>_<index>; split K tests on subject K
(leave one subject out) and trains on the others.

Size: {len(num_frames)} videos, {sum(num_frames.values())} frames, {config.width}x{config.height} pixels, {config.fps:g} fps.
Subjects: {config.num_subjects}. Seed: {config.seed}. Full configuration: demo.json.
"""


def demo_files(config: DemoConfig) -> list[str]:
    """Every file of the demo dataset, relative to its root."""
    names = [name for name, _, _ in video_names(config)]
    files = [f"Videos/{name}.mp4" for name in names] + [f"groundTruth/{name}.txt" for name in names]
    splits = range(1, config.num_subjects + 1)
    files += [f"splits/{subset}.split{split}.bundle" for split in splits for subset in ("test", "train")]
    return files + ["mapping.txt", "demo.json", "README.txt"]


def generate_demo_dataset(out_dir: Path, config: DemoConfig, *, progress: bool = True) -> list[str]:
    """Generate the demo dataset into ``out_dir`` and return its video ids.

    ``out_dir`` must be new, empty or a demo dataset generated before (see :func:`etesvs.io.claim_output_dir`);
    a directory holding anything else, such as a real dataset, is refused. Every file is written beside its final
    name and all are renamed at the end, so an interrupted run leaves the previous dataset as it was. One video is
    encoded (by ffmpeg, in a thread) while the next one is rendered.
    """
    out_dir = Path(out_dir)
    output = claim_output_dir(out_dir, owner="make_demo_data")
    subjects = [_make_subject(config, index) for index in range(config.num_subjects)]
    names = video_names(config)
    num_frames: dict[str, int] = {}
    with output.replace(demo_files(config)) as tmp, ThreadPoolExecutor(max_workers=1) as encoder:
        pending = None
        for index in tqdm(range(config.num_videos), desc="demo videos", unit="video", disable=not progress):
            video = render_demo_video(config, index, subject=subjects[names[index][1]])
            if pending is not None:
                pending.result()  # at most one video waits for the encoder; its errors surface here
            pending = encoder.submit(encode_mp4, video.frames, tmp[f"Videos/{video.name}.mp4"], config.fps)
            tmp[f"groundTruth/{video.name}.txt"].write_text("\n".join(video.labels) + "\n")
            num_frames[video.name] = len(video.frames)
        if pending is not None:
            pending.result()
        tmp["mapping.txt"].write_text("".join(f"{i} {name}\n" for i, name in enumerate(CLASSES)))
        for split in range(1, config.num_subjects + 1):
            test = [name for name, subject, _ in names if subject == split - 1]
            train = [name for name, subject, _ in names if subject != split - 1]
            tmp[f"splits/test.split{split}.bundle"].write_text("".join(f"{name}.txt\n" for name in test))
            tmp[f"splits/train.split{split}.bundle"].write_text("".join(f"{name}.txt\n" for name in train))
        description = {
            "config": dataclasses.asdict(config),
            "classes": list(CLASSES),
            "ambiguous_pairs": [list(pair) for pair in AMBIGUOUS_PAIRS],
            "recipes": {
                name: [[probability, list(group)] for probability, group in steps] for name, steps in RECIPES.items()
            },
            "videos": {
                name: {"subject": subject + 1, "recipe": recipe, "num_frames": num_frames[name]}
                for name, subject, recipe in names
            },
        }
        tmp["demo.json"].write_text(json.dumps(description, indent=2) + "\n")
        tmp["README.txt"].write_text(_readme(config, num_frames))
    return [name for name, _, _ in names]
