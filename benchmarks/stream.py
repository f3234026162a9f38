"""Benchmark: online inference speed and memory of the streaming model on the CPU.

Streams generated videos (ffmpeg's testsrc at the demo resolution and frame rate) through ``etesvs.stream`` and
prints the frames/s as a multiple of real time (target >= 4 for 15 fps video on 2 cores) and the peak memory for a
1-minute and a 10-minute video, which must be about the same. Uses ``models/etesvs/best.pt`` when the pipeline
has trained it, otherwise a randomly initialised model with the streaming parameters of params.yaml (the speed
does not depend on the weights).

    python benchmarks/stream.py [--checkpoint FILE] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from etesvs.checkpoints import save_checkpoint
from etesvs.data.frames import ffmpeg_exe
from etesvs.data.windows import IMAGENET_MEAN, IMAGENET_STD
from etesvs.io import ffmpeg_file_output, load_weights_file, read_yaml
from etesvs.models.streaming import StreamingSegmenter

ROOT = Path(__file__).resolve().parents[1]

RUN_ONE = """
import io, json, resource, sys, time, tracemalloc
import torch
torch.set_num_threads(int(sys.argv[3]))
from etesvs.stream import load_stream_model, run_stream
model = load_stream_model(sys.argv[1])
tracemalloc.start()
start = time.perf_counter()
summary = run_stream(model, sys.argv[2], stdout=io.StringIO())
seconds = time.perf_counter() - start
print(json.dumps({"frames": summary["frames"], "seconds": seconds, "python_peak": tracemalloc.get_traced_memory()[1],
                  "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def random_checkpoint(path: Path, params: dict) -> Path:
    """A checkpoint of a randomly initialised model with the streaming parameters of ``params``."""
    streaming, dataset = params["streaming"], params["dataset"]
    model_args = {"num_classes": 9, **streaming["model"]}
    save_checkpoint(
        path, model=StreamingSegmenter(**model_args), optimizer=None, epoch=0, model_args=model_args,
        classes=[f"class{i}" for i in range(9)], background_ids=[0], fps=float(dataset["fps"]),
        window=params["window"], sample_rate=dataset["sample_rate"], image_size=streaming["data"]["image_size"],
        normalization={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "data" / "models" / "etesvs" / "best.pt")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--fps", type=float, default=15.0)
    args = parser.parse_args()
    params = read_yaml(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if not checkpoint.is_file():
            print(f"{checkpoint} not found: timing a randomly initialised model with params.yaml's settings")
            checkpoint = random_checkpoint(Path(tmp) / "random.pt", params)
        results = {}
        for minutes in (1, 10):
            video = Path(tmp) / f"testsrc_{minutes}min.mp4"
            subprocess.run(
                [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                 f"testsrc=size={args.width}x{args.height}:rate={args.fps:g}:duration={60 * minutes}",
                 "-pix_fmt", "yuv420p", "-c:v", "libx264", "-preset", "ultrafast", "-f", "mp4",
                 ffmpeg_file_output(video)],
                check=True,
            )  # fmt: skip
            run = subprocess.run(
                [sys.executable, "-c", RUN_ONE, str(checkpoint), str(video), str(args.threads)],
                capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            )  # fmt: skip
            if run.returncode != 0:
                sys.exit(f"streaming failed: {run.stderr.strip()[-2000:]}")
            results[minutes] = json.loads(run.stdout.splitlines()[-1])
        described = load_weights_file(checkpoint, what="checkpoint")
    size = described["image_size"]
    print(f"online inference on the CPU ({args.threads} threads), {args.width}x{args.height} video at "
          f"{args.fps:g} fps, network input {size}x{size}, window {described['window']}")  # fmt: skip
    for minutes, result in results.items():
        fps = result["frames"] / result["seconds"]
        print(f"  {minutes:2d}-minute video: {result['frames']:6d} frames in {result['seconds']:6.1f} s = "
              f"{fps:6.1f} frames/s = {fps / args.fps:5.1f} x real time; "
              f"peak RSS {result['max_rss_kib'] / 1024:6.1f} MiB, "
              f"peak Python allocations {result['python_peak'] / 1024:6.1f} KiB")  # fmt: skip
    speed = results[10]["frames"] / results[10]["seconds"] / args.fps
    growth = (results[10]["max_rss_kib"] - results[1]["max_rss_kib"]) / 1024
    print(f"  real-time factor {speed:.1f} (target >= 4: {'met' if speed >= 4 else 'NOT met'}); "
          f"peak memory 10 min vs 1 min: {growth:+.1f} MiB")


if __name__ == "__main__":
    main()
