"""The MS-TCN dataset layout shared by GTEA, 50Salads, Breakfast and the demo dataset.

::

    <root>/Videos/<video>.<ext>          (nested for Breakfast: P03/cam01/P03_cereals.avi)
    <root>/groundTruth/<video>.txt       one class name per frame
    <root>/splits/{train,test}.split<K>.bundle   one "<video>.txt" (or "<video>") per line
    <root>/mapping.txt                   "<id> <name>" per line
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from etesvs.errors import EtesvsError
from etesvs.io import check_plain_name, path_inside, read_text_lines

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass(frozen=True)
class VideoPathRule:
    """Map a split's video id to a relative path without extension, by a regular expression.

    The pattern must match the whole id. Example (Breakfast): ``pattern=r"(P\\d+)_(stereo)01_(.+)"``,
    ``replacement=r"\\1/\\2/\\3_ch0"`` maps ``P03_stereo01_P03_cereals`` to ``P03/stereo/P03_cereals_ch0``.
    """

    pattern: str
    replacement: str


@dataclass(frozen=True)
class DatasetLayout:
    """Paths of one dataset in the MS-TCN layout."""

    root: Path
    videos_dirname: str = "Videos"
    video_path_rules: tuple[VideoPathRule, ...] = ()

    @property
    def videos_dir(self) -> Path:
        return self.root / self.videos_dirname

    @property
    def ground_truth_dir(self) -> Path:
        return self.root / "groundTruth"

    @property
    def mapping_file(self) -> Path:
        return self.root / "mapping.txt"

    def split_file(self, subset: str, split: int) -> Path:
        return self.root / "splits" / f"{subset}.split{split}.bundle"

    def ground_truth_file(self, video: str) -> Path:
        """``groundTruth/<video>.txt``; ``video`` must be a plain name (see :func:`etesvs.io.check_plain_name`)."""
        check_plain_name(video, source=self.ground_truth_dir)
        return self.ground_truth_dir / f"{video}.txt"

    def video_stem(self, video: str) -> str:
        """The video's path relative to ``videos_dir``, without extension, after the first matching rule.

        ``video`` must be a plain name; a rule may nest it (Breakfast's ``P03/cam01/P03_cereals``), but the result
        must stay inside ``videos_dir``.
        """
        check_plain_name(video, source=self.videos_dir)
        stem = video
        for rule in self.video_path_rules:
            match = re.fullmatch(rule.pattern, video)
            if match:
                stem = match.expand(rule.replacement)
                break
        path_inside(self.videos_dir, stem, source=f"video path rule for '{video}'")
        return stem

    def video_file(self, video: str) -> Path:
        """Find the video file of ``video``; a missing file is a one-line error naming what was tried."""
        stem = path_inside(self.videos_dir, self.video_stem(video))
        for extension in VIDEO_EXTENSIONS:
            for candidate in (stem.with_name(stem.name + extension), stem.with_name(stem.name + extension.upper())):
                if candidate.is_file():
                    return candidate
        raise EtesvsError(f"{stem}.*: video of '{video}' not found (tried {', '.join(VIDEO_EXTENSIONS)})")


def parse_video_path_rules(text: str) -> tuple[VideoPathRule, ...]:
    """Parse ``"PATTERN -> REPLACEMENT; PATTERN -> REPLACEMENT"`` (the ``dataset.video_path_rules`` param)."""
    rules = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        if "->" not in part:
            raise EtesvsError(f"video path rule {part!r}: expected 'PATTERN -> REPLACEMENT'")
        pattern, replacement = (x.strip() for x in part.split("->", 1))
        try:
            re.compile(pattern)
        except re.error as error:
            raise EtesvsError(f"video path rule {part!r}: bad regular expression ({error})") from None
        rules.append(VideoPathRule(pattern, replacement))
    return tuple(rules)


def _read_lines(path: Path) -> list[str]:
    # A byte-order mark and CRLF line ends, as Windows editors write them, are accepted.
    return read_text_lines(path)


def read_mapping(path: str | Path) -> list[str]:
    """Read ``mapping.txt`` ("<id> <name>" per line) into class names ordered by id (ids 0..C-1)."""
    path = Path(path)
    entries: dict[int, str] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].lstrip("-").isdigit():
            raise EtesvsError(f"{path}:{number}: expected '<id> <name>', got {line.strip()!r}")
        index, name = int(parts[0]), parts[1]
        if index in entries:
            raise EtesvsError(f"{path}:{number}: id {index} appears twice")
        if name in entries.values():
            raise EtesvsError(f"{path}:{number}: class name {name!r} appears twice")
        entries[index] = name
    if not entries:
        raise EtesvsError(f"{path}: empty mapping")
    if sorted(entries) != list(range(len(entries))):
        raise EtesvsError(f"{path}: ids must be 0..{len(entries) - 1} without gaps, got {sorted(entries)}")
    return [entries[index] for index in range(len(entries))]


def read_split_entries(path: str | Path) -> list[tuple[str, int]]:
    """Read a split bundle into ``(video id, line number)`` pairs (a trailing ``.txt`` is removed).

    Every id must be a plain name (no path separator, no ``..``, not absolute): a line such as
    ``../features/features.txt`` is refused with an error naming the file and line.
    """
    entries = []
    for number, line in enumerate(_read_lines(Path(path)), start=1):
        name = line.strip()
        if name:
            check_plain_name(name, source=f"{path}:{number}")
            entries.append((name[: -len(".txt")] if name.endswith(".txt") else name, number))
    if not entries:
        raise EtesvsError(f"{path}: empty split")
    for name, number in entries:
        check_plain_name(name, source=f"{path}:{number}")  # "..txt" is a plain name, ".." is not
    return entries


def read_split(path: str | Path) -> list[str]:
    """Read a split bundle into video ids (a trailing ``.txt`` as in the MS-TCN bundles is removed)."""
    return [name for name, _ in read_split_entries(path)]


def read_ground_truth(path: str | Path) -> list[str]:
    """Read a groundTruth file: one class name per frame."""
    labels = [line.strip() for line in _read_lines(Path(path))]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise EtesvsError(f"{path}: empty label file")
    for number, label in enumerate(labels, start=1):
        if not label:
            raise EtesvsError(f"{path}:{number}: empty label line")
    return labels


def check_dataset(layout: DatasetLayout, *, name: str, split: int) -> dict[str, int]:
    """Check that ``layout.root`` holds a dataset in the MS-TCN layout before any stage touches its outputs.

    A missing root, ``Videos/``, ``groundTruth/``, ``mapping.txt`` or split bundle is one line naming the expected
    layout and where the README explains it. Returns what was found: counts of videos, label files and classes.
    """
    root = layout.root
    expected = f"{root}/{{Videos,groundTruth,splits,mapping.txt}}"
    help_text = f"put {name} there in the MS-TCN layout {expected} (README: Real datasets)"
    if not root.is_dir():
        raise EtesvsError(f"{root}: dataset '{name}' not found; {help_text}")
    missing = [str(path.relative_to(root)) for path in (layout.videos_dir, layout.ground_truth_dir) if not path.is_dir()]
    missing += [str(path.relative_to(root)) for path in (layout.mapping_file, layout.split_file("train", split),
                                                          layout.split_file("test", split)) if not path.is_file()]
    if missing:
        raise EtesvsError(f"{root}: dataset '{name}' lacks {', '.join(missing)}; {help_text}")
    return {
        "videos": sum(1 for path in layout.videos_dir.rglob("*") if path.suffix.lower() in VIDEO_EXTENSIONS),
        "label_files": sum(1 for _ in layout.ground_truth_dir.glob("*.txt")),
        "classes": len(read_mapping(layout.mapping_file)),
    }
