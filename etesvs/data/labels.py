"""Label conversion: groundTruth text to class-id and boundary arrays, and ActivityNet-style JSON.

The convert_labels stage writes a directory ``data/labels/``:

- ``labels.h5``: one group per video with ``classes`` int64 (T,) and ``boundaries`` uint8 (T,),
  1 where a segment starts (frame 0 included);
- ``info.json``: dataset name, fps, class names by id, background names and ids, the split number,
  the train and test video ids and every video's frame count;
- ``localization_{train,test}.json``: ActivityNet-style annotations, background excluded.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from etesvs.data.layout import DatasetLayout, read_ground_truth, read_mapping, read_split_entries
from etesvs.errors import EtesvsError
from etesvs.io import check_plain_name, claim_output_dir, read_json, read_text

LABEL_FILES = ("labels.h5", "info.json", "localization_train.json", "localization_test.json")


@dataclass(frozen=True)
class LabelInfo:
    """What ``info.json`` of a labels directory says."""

    dataset: str
    fps: float
    classes: tuple[str, ...]
    background: tuple[str, ...]
    background_ids: tuple[int, ...]
    split: int
    train: tuple[str, ...]
    test: tuple[str, ...]
    num_frames: dict[str, int]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def names_to_ids(names: Sequence[str], classes: Sequence[str], *, source: str | Path) -> np.ndarray:
    """Turn class names into an int64 array (T,); an unknown name is an error naming ``source`` and the line."""
    index = {name: i for i, name in enumerate(classes)}
    ids = np.empty(len(names), dtype=np.int64)
    for line, name in enumerate(names):
        try:
            ids[line] = index[name]
        except KeyError:
            raise EtesvsError(f"{source}:{line + 1}: class {name!r} is not in mapping.txt") from None
    return ids


def boundaries_from_ids(ids: np.ndarray) -> np.ndarray:
    """uint8 (T,) array with 1 where a segment starts: frame 0 and every frame whose class changes."""
    ids = np.asarray(ids)
    starts = np.ones(len(ids), dtype=np.uint8)
    if len(ids) > 1:
        starts[1:] = (ids[1:] != ids[:-1]).astype(np.uint8)
    return starts


def segments_from_ids(ids: np.ndarray) -> list[tuple[int, int, int]]:
    """Contiguous runs of ``ids`` as ``(class_id, start_frame, end_frame)``, end exclusive."""
    ids = np.asarray(ids)
    if len(ids) == 0:
        return []
    starts = np.flatnonzero(boundaries_from_ids(ids))
    ends = np.append(starts[1:], len(ids))
    return [(int(ids[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def localization_database(
    labels: dict[str, np.ndarray],
    subsets: dict[str, str],
    *,
    classes: Sequence[str],
    background_ids: Iterable[int],
    fps: float,
) -> dict:
    """ActivityNet-style ``{"database": {video: {"fps", "frames", "subset", "annotations": [...]}}}``.

    Each annotation has ``label``, ``segment`` [start_s, end_s] (end = end_frame / fps, so a segment
    covering frames 0..14 at 15 fps is [0.0, 1.0]), and ``start_frame``/``end_frame`` (end exclusive).
    """
    background = set(background_ids)
    database = {}
    for video, ids in labels.items():
        annotations = [
            {
                "label": classes[label],
                "segment": [round(start / fps, 6), round(end / fps, 6)],
                "start_frame": start,
                "end_frame": end,
            }
            for label, start, end in segments_from_ids(ids)
            if label not in background
        ]
        database[video] = {"fps": fps, "frames": int(len(ids)), "subset": subsets[video], "annotations": annotations}
    return {"database": database}


def _read_splits(layout: DatasetLayout, split: int) -> tuple[list[str], list[str], dict[str, str]]:
    """The train and test videos of split ``split``, and where every video of any split is first named
    (``"<bundle>:<line>"``), so that a missing one is blamed on the bundle (and line) that named it."""
    train_file, test_file = layout.split_file("train", split), layout.split_file("test", split)
    for path in (train_file, test_file):
        if not path.is_file():
            raise EtesvsError(f"{path}: split file not found")
    train_entries, test_entries = read_split_entries(train_file), read_split_entries(test_file)
    train, test = [video for video, _ in train_entries], [video for video, _ in test_entries]
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise EtesvsError(f"{test_file}: videos also in the train split: {', '.join(overlap[:5])}")
    named_in: dict[str, str] = {}
    for bundle, entries in ((train_file, train_entries), (test_file, test_entries)):
        for video, line in entries:
            named_in.setdefault(video, f"{bundle}:{line}")
    for bundle in sorted(glob.glob(str(layout.root / "splits" / "*.bundle"))):
        for video, line in read_split_entries(bundle):
            named_in.setdefault(video, f"{bundle}:{line}")
    return train, test, named_in


def _write_labels(staged: dict[str, Path], labels: dict[str, np.ndarray], info: dict) -> None:
    """labels.h5, info.json and the localization JSON of both subsets into the staged paths of LABEL_FILES."""
    with h5py.File(staged["labels.h5"], "w") as handle:
        for video, ids in labels.items():
            group = handle.create_group(video)
            group.create_dataset("classes", data=ids)
            group.create_dataset("boundaries", data=boundaries_from_ids(ids))
    _dump_json(staged["info.json"], info)
    for subset in ("train", "test"):
        members = info[subset]
        database = localization_database(
            {video: labels[video] for video in members}, {video: subset for video in members},
            classes=info["classes"], background_ids=info["background_ids"], fps=info["fps"],
        )
        _dump_json(staged[f"localization_{subset}.json"], database)


def convert_labels(
    layout: DatasetLayout,
    out_dir: str | Path,
    *,
    dataset: str,
    split: int,
    fps: float,
    background: Sequence[str],
) -> LabelInfo:
    """Convert the groundTruth of every video named by any split into ``out_dir``.

    ``out_dir`` must be new, empty or an earlier output of this function (see
    :func:`etesvs.io.claim_output_dir`); every input is checked before anything is written, and the files are
    replaced together at the end, so an interrupted run leaves the previous output.
    """
    out_dir = Path(out_dir)
    output = claim_output_dir(out_dir, owner="convert_labels", inputs=[layout.root])
    classes = read_mapping(layout.mapping_file)
    for name in background:
        if name not in classes:
            raise EtesvsError(f"{layout.mapping_file}: background class {name!r} is not in the mapping")
    train, test, named_in = _read_splits(layout, split)
    labels: dict[str, np.ndarray] = {}
    for video, source in named_in.items():
        path = layout.ground_truth_file(video)
        if not path.is_file():
            raise EtesvsError(f"{source}: names video '{video}' but {path} does not exist")
        labels[video] = names_to_ids(read_ground_truth(path), classes, source=path)
    info = {
        "dataset": dataset, "fps": fps, "classes": classes, "background": list(background),
        "background_ids": [classes.index(name) for name in background], "split": split, "train": train,
        "test": test, "num_frames": {video: int(len(ids)) for video, ids in labels.items()},
    }  # fmt: skip
    with output.replace(LABEL_FILES) as staged:
        _write_labels(staged, labels, info)
    return load_label_info(out_dir)


def _dump_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def load_label_info(labels_dir: str | Path) -> LabelInfo:
    """Read ``info.json`` of a labels directory; every video id in it must be a plain name."""
    path = Path(labels_dir) / "info.json"
    info = read_json(path)
    for key in ("train", "test", "num_frames"):
        for video in info.get(key, ()):
            check_plain_name(str(video), source=f"{path}: '{key}'")
    return LabelInfo(
        dataset=info["dataset"],
        fps=float(info["fps"]),
        classes=tuple(info["classes"]),
        background=tuple(info["background"]),
        background_ids=tuple(info["background_ids"]),
        split=int(info["split"]),
        train=tuple(info["train"]),
        test=tuple(info["test"]),
        num_frames={k: int(v) for k, v in info["num_frames"].items()},
    )


def _read_array(labels_dir: str | Path, video: str, key: str) -> np.ndarray:
    path = Path(labels_dir) / "labels.h5"
    if not path.is_file():
        raise EtesvsError(f"{path}: file not found")
    with h5py.File(path, "r") as handle:
        if video not in handle:
            raise EtesvsError(f"{path}: no labels for video '{video}'")
        return handle[video][key][()]


def load_labels(labels_dir: str | Path, video: str) -> np.ndarray:
    """Class ids of ``video``: int64 (T,)."""
    return _read_array(labels_dir, video, "classes").astype(np.int64)


def load_boundaries(labels_dir: str | Path, video: str) -> np.ndarray:
    """Segment starts of ``video``: uint8 (T,)."""
    return _read_array(labels_dir, video, "boundaries").astype(np.uint8)


def _activitynet_classes(database: dict, *, annotation_file: Path, text: str, background: str) -> list[str]:
    """``background`` then every label of the annotations, sorted; video names and labels are checked."""
    names: set[str] = set()
    for video, entry in database.items():
        where = f"{annotation_file}:{_json_key_line(text, video)}"
        check_plain_name(video, source=where)
        if not isinstance(entry, dict) or not isinstance(entry.get("annotations", []), list):
            raise EtesvsError(f"{where}: video '{video}' is not an object with a list of 'annotations'")
        for annotation in entry.get("annotations", []):
            label = str(annotation.get("label")) if isinstance(annotation, dict) else None
            if label is None or not label or any(c.isspace() or not c.isprintable() for c in label):
                raise EtesvsError(
                    f"{where}: video '{video}' has label {label!r}; a label is one word (mapping.txt and groundTruth "
                    "files hold one name per line, without spaces)"
                )
            names.add(label)
    return [background] + sorted(names - {background})


def _frame_labels(video: str, entry: dict, *, annotation_file: Path, fps: float, background: str) -> list[str]:
    """One class name per frame of ``video``: ``background`` where no segment is (the later-starting wins)."""
    if "frames" in entry:
        num_frames = int(entry["frames"])
    elif "duration" in entry:
        num_frames = int(round(float(entry["duration"]) * fps))
    else:
        raise EtesvsError(f"{annotation_file}: video '{video}' has neither 'duration' nor 'frames'")
    if num_frames <= 0:
        raise EtesvsError(f"{annotation_file}: video '{video}' has no frames")
    frame_labels = [background] * num_frames
    try:
        ordered = sorted(entry.get("annotations", []), key=lambda a: float(a["segment"][0]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise EtesvsError(f"{annotation_file}: video '{video}' has a segment without a numeric start") from None
    for annotation in ordered:
        try:
            start_s, end_s = (float(x) for x in annotation["segment"])
        except (KeyError, TypeError, ValueError):
            raise EtesvsError(f"{annotation_file}: video '{video}' has a malformed segment {annotation!r}") from None
        if end_s < start_s:
            raise EtesvsError(f"{annotation_file}: video '{video}' has a segment ending before it starts")
        start, end = int(round(start_s * fps)), min(num_frames, int(round(end_s * fps)))
        for frame in range(max(0, start), end):
            frame_labels[frame] = str(annotation["label"])
    return frame_labels


def activitynet_to_ground_truth(
    annotation_file: str | Path,
    out_root: str | Path,
    *,
    fps: float,
    background: str = "background",
    subsets: dict[str, str] | None = None,
) -> list[str]:
    """Convert ActivityNet/THUMOS-style JSON (segments in seconds) into the MS-TCN layout.

    Writes ``groundTruth/<video>.txt`` (unlabelled frames are ``background``; where segments overlap the
    later-starting one wins), ``mapping.txt`` (background first, then labels sorted) and
    ``splits/{train,test}.split1.bundle`` from each video's ``subset`` (``subsets`` maps JSON subset
    names to ``train``/``test``; default: validation and training to train, test to test).
    Each video needs ``duration`` (seconds) or ``frames``.
    """
    annotation_file = Path(annotation_file)
    out_root = Path(out_root)
    output = claim_output_dir(out_root, owner="activitynet_to_ground_truth", inputs=[annotation_file], exclusive=False)
    text = read_text(annotation_file)
    database = read_json(annotation_file)
    if not isinstance(database, dict) or not isinstance(database.get("database"), dict):
        raise EtesvsError(f"{annotation_file}: expected an object with a 'database' object")
    database = database["database"]
    subsets = subsets or {"training": "train", "validation": "train", "train": "train", "test": "test"}
    classes = _activitynet_classes(database, annotation_file=annotation_file, text=text, background=background)
    split_members: dict[str, list[str]] = {"train": [], "test": []}
    ground_truth: dict[str, list[str]] = {}
    for video, entry in database.items():
        subset = subsets.get(str(entry.get("subset", "test")).lower())
        if subset is None:
            raise EtesvsError(f"{annotation_file}: video '{video}' has unknown subset {entry.get('subset')!r}")
        ground_truth[video] = _frame_labels(video, entry, annotation_file=annotation_file, fps=fps,
                                            background=background)
        split_members[subset].append(video)
    files = [f"groundTruth/{video}.txt" for video in ground_truth]
    files += ["mapping.txt"] + [f"splits/{subset}.split1.bundle" for subset in split_members]
    with output.replace(files) as staged:
        for video, frame_labels in ground_truth.items():
            staged[f"groundTruth/{video}.txt"].write_text("\n".join(frame_labels) + "\n", encoding="utf-8")
        staged["mapping.txt"].write_text("".join(f"{i} {name}\n" for i, name in enumerate(classes)), encoding="utf-8")
        for subset, members in split_members.items():
            bundle = "".join(f"{video}.txt\n" for video in members)
            staged[f"splits/{subset}.split1.bundle"].write_text(bundle, encoding="utf-8")
    return list(ground_truth)


def _json_key_line(text: str, key: str) -> int | str:
    """Line of the first occurrence of ``"key":`` in JSON ``text`` (for messages), or '?' if written otherwise."""
    found = re.search(re.escape(json.dumps(key)) + r"\s*:", text)
    if found is None:
        found = re.search(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:", text)
    return text.count("\n", 0, found.start()) + 1 if found else "?"


def activitynet_to_ground_truth_main(argv: list[str] | None = None) -> None:
    """``python -m etesvs.data.labels ANNOTATIONS.json ROOT --fps 30``: THUMOS-style JSON to the MS-TCN layout."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m etesvs.data.labels", description=activitynet_to_ground_truth_main.__doc__)
    parser.add_argument("annotations", type=Path, help="ActivityNet/THUMOS-style JSON with segments in seconds")
    parser.add_argument("root", type=Path, help="dataset root to write groundTruth/, mapping.txt, splits/ into")
    parser.add_argument("--fps", type=float, required=True)
    parser.add_argument("--background", default="background")
    args = parser.parse_args(argv)
    videos = activitynet_to_ground_truth(args.annotations, args.root, fps=args.fps, background=args.background)
    print(f"wrote groundTruth of {len(videos)} videos to {args.root}")




if __name__ == "__main__":
    from etesvs.errors import run_main

    run_main(activitynet_to_ground_truth_main)
