"""Benchmark of stage extract_frames against bare ffmpeg decoding and scaling, side by side in one run.

Prints the stage's frames/s and its ratio to ffmpeg decoding and scaling the same videos to the same size
into /dev/null (`-f null`), with the same number of parallel workers. Target: ratio >= 0.8.

    python benchmarks/extract_frames.py [--videos DIR] [--fps 15] [--short-side 96] [--workers 2] [--repeats 2]

Without --videos it measures the real videos in ../shared/data/videos (H.264 up to 640x480, the
realistic case: decoding dominates) and the demo dataset's videos (128x96 sources, where the JPEG encoding
of the container costs as much as decoding), whichever are present; else twelve generated test videos.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from etesvs.data.frames import ExtractConfig, FrameReader, decode_command, extract_frames, ffmpeg_exe, frames_path
from etesvs.io import ffmpeg_file_output, read_yaml
from etesvs.data.layout import VIDEO_EXTENSIONS


def bare_ffmpeg(video: Path, config: ExtractConfig) -> None:
    """Decode and scale with the same input and filter graph as the stage, discarding the frames."""
    command = decode_command(video, config)
    output = command.index("-f")  # the stage's output options (MJPEG to a pipe) give way to a null sink
    subprocess.run([*command[:output], "-f", "null", "-"], check=True)


def make_test_videos(directory: Path, count: int = 12, seconds: int = 20) -> list[Path]:
    videos = []
    for index in range(count):
        path = directory / f"test{index:02d}.mp4"
        subprocess.run(
            [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
             f"testsrc2=size=128x96:rate=15:duration={seconds}", "-c:v", "libx264", "-pix_fmt", "yuv420p",
             "-f", "mp4", ffmpeg_file_output(path)],
            check=True,
        )
        videos.append(path)
    return videos


def measure(name: str, videos: list[Path], config: ExtractConfig, workers: int, repeats: int, tmp: Path) -> None:
    """Time the stage and bare ffmpeg on the same videos, alternating, and print the best of each."""
    from etesvs.data.frames import decode_video_to_jpeg

    counts = {v: len(decode_video_to_jpeg(v, config)) for v in videos}  # warm-up, and the label counts
    total = sum(counts.values())
    stage_times, bare_times = [], []
    for repeat in range(repeats):
        out = tmp / f"{name}{repeat}"
        start = time.perf_counter()
        extract_frames([(f"v{i}", v, counts[v]) for i, v in enumerate(videos)], out, config, workers=workers, progress=False)
        stage_times.append(time.perf_counter() - start)
        assert FrameReader(frames_path(out, "v0")).num_frames == counts[videos[0]]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda v: bare_ffmpeg(v, config), videos))
        bare_times.append(time.perf_counter() - start)
    stage, bare = min(stage_times), min(bare_times)
    print(f"{name}: {len(videos)} videos, {total} frames at {config.fps:g} fps, short side {config.short_side}, {workers} workers")
    print(f"  extract_frames (decode + scale + JPEG + HDF5): {total / stage:8.1f} frames/s  ({stage:.2f} s)")
    print(f"  bare ffmpeg (decode + scale -> /dev/null):     {total / bare:8.1f} frames/s  ({bare:.2f} s)")
    print(f"  ratio: {bare / stage:.2f} (target >= 0.8)")


def list_videos(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=Path, default=None, help="a directory of videos (default: see above)")
    parser.add_argument("--fps", type=float, default=15)
    parser.add_argument("--short-side", type=int, default=96)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml",
                        help="JPEG quality and tolerance of the stage")
    args = parser.parse_args()
    frames = read_yaml(args.params)["frames"]
    config = ExtractConfig(fps=args.fps, short_side=args.short_side, jpeg_quality=frames["jpeg_quality"],
                           tolerance=frames["tolerance"])
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {}
        if args.videos:
            sources[str(args.videos)] = list_videos(args.videos)
        else:
            sources["real videos (../shared/data/videos)"] = list_videos(root.parent / "shared" / "data" / "videos")
            sources["demo dataset (data/raw/demo/Videos)"] = list_videos(root / "data" / "raw" / "demo" / "Videos")
            if not any(sources.values()):
                sources["generated testsrc2 128x96"] = make_test_videos(tmp)
        for index, (name, videos) in enumerate(sources.items()):
            if videos:
                measure(name, videos, config, args.workers, args.repeats, tmp / f"s{index}")


if __name__ == "__main__":
    main()
