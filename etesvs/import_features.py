"""Import the MS-TCN release features (``features/<video>.npy``, shape (2048, T)) into one HDF5 file.

    python -m etesvs.import_features --npy-dir data/raw/gtea/features --out data/features/features.h5 \\
        --labels data/labels

Each array is transposed to (T, D) and stored as a dataset named after the video, as extract_features does, and
``info.json`` beside it says where the features came from. With ``--labels`` every train and test video must have
a file whose T matches the labels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from etesvs.data.labels import load_label_info
from etesvs.errors import EtesvsError, run_main
from etesvs.features import DTYPES, import_npy_features
from etesvs.io import check_output_file, write_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--npy-dir", type=Path, required=True, help="directory of <video>.npy arrays (D, T)")
    parser.add_argument("--out", type=Path, required=True, help="HDF5 file to write (e.g. data/features/features.h5)")
    parser.add_argument("--labels", type=Path, default=None, help="labels directory: videos, frame counts and fps")
    parser.add_argument("--fps", type=float, default=None, help="frame rate of the features (default: the labels')")
    parser.add_argument("--feature-dim", type=int, default=2048, help="D, the first axis of every array")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--max-length-mismatch", type=int, default=0,
                        help="frames by which an array may differ from its labels (fixed by cutting or repeating)")
    args = parser.parse_args(argv)
    videos = num_frames = None
    fps = args.fps
    if args.labels is not None:
        info = load_label_info(args.labels)
        videos, num_frames = list(dict.fromkeys(info.train + info.test)), info.num_frames
        fps = info.fps if fps is None else fps
    if fps is None:
        raise EtesvsError("--fps is required without --labels (the frame rate of the features)")
    check_output_file(args.out, inputs=[args.npy_dir, *([args.labels] if args.labels else [])], suffixes=(".h5",))
    check_output_file(args.out.parent / "info.json", inputs=[args.npy_dir], suffixes=(".json",))
    notes = import_npy_features(args.npy_dir, args.out, videos=videos, num_frames=num_frames, fps=fps,
                                feature_dim=args.feature_dim, dtype=args.dtype,
                                max_length_mismatch=args.max_length_mismatch)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    count = len(videos) if videos is not None else len(list(args.npy_dir.glob("*.npy")))
    write_json(args.out.parent / "info.json", {
        "extractor": "i3d-rgb+flow-mstcn-release", "method": "imported", "feature_dim": args.feature_dim,
        "dtype": args.dtype, "backbone_pretrained": True, "weights_hash": "unknown-mstcn-release",
        "params": None, "flops_per_frame": None, "videos": count, "source": str(args.npy_dir),
    })
    print(f"import_features: {count} videos from {args.npy_dir} -> {args.out}")


if __name__ == "__main__":
    run_main(main)
