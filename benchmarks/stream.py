"""Benchmark: online inference speed of the streaming model beside its bare backbone, and its memory.

Streams a generated 640 x 480 video (ffmpeg's testsrc2 at the dataset's frame rate) through ``etesvs.stream`` with a
randomly initialised model of an experiment's configuration (the speed does not depend on the weights), and in
the same run times the bare backbone (MobileNetV2 ``features``, batches of one window's fed frames, BatchNorm
folded, channels-last, inference mode) on the same number of sampled frames. Prints both as multiples of real time and
their ratio; the last line is JSON with ``x_realtime`` and ``ratio_to_backbone``. Targets for ``etesvs_gtea`` on
2 cores: ``ratio_to_backbone`` >= 0.8 and ``x_realtime`` >= 8. With ``--memory`` it also streams a video ten times
longer and compares the peak memory (it must not grow with the video).

    python benchmarks/stream.py [--experiment etesvs_gtea] [--seconds 60] [--threads 2] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from etesvs.checkpoints import save_checkpoint
from etesvs.data.frames import ffmpeg_exe
from etesvs.data.windows import IMAGENET_MEAN, IMAGENET_STD
from etesvs.io import ffmpeg_file_output, read_yaml
from etesvs.models.streaming import StreamingSegmenter, prepare_for_inference
from etesvs.params import compose
from etesvs.stream import default_threads

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 11
RUN_ONE = """
import io, json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[3]))
from etesvs.stream import load_stream_model, run_stream
model = load_stream_model(sys.argv[1])
run_stream(model, sys.argv[4], stdout=io.StringIO())  # warm-up: kernels are built on the first windows
start = time.perf_counter()
summary = run_stream(model, sys.argv[2], stdout=io.StringIO())
seconds = time.perf_counter() - start
print(json.dumps({"frames": summary["frames"], "seconds": seconds,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def load_params(experiment: str | None, directory: Path) -> dict:
    """params.yaml of ``experiment`` (composed from conf/), or the repository's params.yaml."""
    if not experiment:
        return read_yaml(ROOT / "params.yaml")
    compose([f"experiment={experiment}"], out=directory / "params.yaml", root=ROOT)
    return read_yaml(directory / "params.yaml")


def random_checkpoint(path: Path, params: dict) -> Path:
    """A self-describing checkpoint of a randomly initialised model of ``params``' streaming configuration."""
    model_args = {"num_classes": NUM_CLASSES, **params["streaming"]["model"]}
    save_checkpoint(
        path, model=StreamingSegmenter(**model_args), optimizer=None, epoch=0, model_args=model_args,
        classes=[f"class{i}" for i in range(NUM_CLASSES)], background_ids=[0], fps=float(params["dataset"]["fps"]),
        window=params["window"], sample_rate=params["streaming"]["data"]["sample_rate"],
        image_size=params["streaming"]["data"]["image_size"],
        normalization={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    )
    return path


def make_video(path: Path, *, seconds: float, fps: float) -> Path:
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
         f"testsrc2=size=640x480:rate={fps:g}:duration={seconds:g}", "-pix_fmt", "yuv420p", "-c:v", "libx264",
         "-preset", "ultrafast", "-f", "mp4", ffmpeg_file_output(path)],
        check=True,
    )  # fmt: skip
    return path


def stream_once(checkpoint: Path, video: Path, threads: int, *, warm_up: Path) -> dict:
    """``etesvs.stream`` on ``video`` in a fresh process, after streaming ``warm_up`` once: frames, seconds (steady
    state) and its peak resident memory."""
    run = subprocess.run([sys.executable, "-c", RUN_ONE, str(checkpoint), str(video), str(threads), str(warm_up)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if run.returncode != 0:
        sys.exit(f"streaming failed: {run.stderr.strip()[-2000:]}")
    return json.loads(run.stdout.splitlines()[-1])


@torch.inference_mode()
def backbone_seconds(params: dict, *, sampled_frames: int, threads: int) -> float:
    """Seconds the bare backbone takes for ``sampled_frames`` frames, in batches of one window's fed frames."""
    torch.set_num_threads(threads)
    model = prepare_for_inference(StreamingSegmenter(num_classes=NUM_CLASSES, **params["streaming"]["model"]))
    backbone = model.backbone  # BatchNorm folded, channels-last: the backbone at its fastest
    batch = params["window"] // params["streaming"]["data"]["sample_rate"]
    size = params["streaming"]["data"]["image_size"]
    frames = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    backbone(frames)  # warm-up
    start = time.perf_counter()
    for _ in range(max(1, round(sampled_frames / batch))):
        backbone(frames)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="etesvs_gtea", help="conf/experiment/NAME.yaml ('' for params.yaml)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the test video")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="torch threads of both (default as etesvs.stream: all cores but one, for ffmpeg)")
    parser.add_argument("--memory", action="store_true", help="also stream a 10x longer video and compare memory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = load_params(args.experiment, tmp)
        fps, sample_rate = float(params["dataset"]["fps"]), params["streaming"]["data"]["sample_rate"]
        checkpoint = random_checkpoint(tmp / "random.pt", params)
        warm_up = make_video(tmp / "warm_up.mp4", seconds=2 * params["window"] / fps, fps=fps)
        streamed = stream_once(checkpoint, make_video(tmp / "video.mp4", seconds=args.seconds, fps=fps), args.threads,
                               warm_up=warm_up)
        bare = backbone_seconds(params, sampled_frames=streamed["frames"] // sample_rate, threads=args.threads)
        long_run = None
        if args.memory:
            long_run = stream_once(checkpoint, make_video(tmp / "long.mp4", seconds=10 * args.seconds, fps=fps),
                                   args.threads, warm_up=warm_up)
    x_realtime = streamed["frames"] / streamed["seconds"] / fps
    x_backbone = streamed["frames"] / bare / fps
    size = params["streaming"]["data"]["image_size"]
    print(f"{args.experiment or 'params.yaml'}: 640x480 video at {fps:g} fps, network input {size}x{size}, window "
          f"{params['window']} frames at sample rate {sample_rate}, {args.threads} threads")
    print(f"  stream:   {x_realtime:6.2f}x real time ({streamed['frames']} frames in {streamed['seconds']:.1f} s, "
          f"peak {streamed['max_rss_mib']:.0f} MiB)")
    print(f"  backbone: {x_backbone:6.2f}x real time on the same {streamed['frames'] // sample_rate} sampled frames")
    result = {"experiment": args.experiment, "x_realtime": round(x_realtime, 3),
              "ratio_to_backbone": round(x_realtime / x_backbone, 3), "backbone_x_realtime": round(x_backbone, 3),
              "peak_mib": round(streamed["max_rss_mib"])}
    if long_run is not None:
        print(f"  memory:   peak {streamed['max_rss_mib']:.0f} MiB for {args.seconds:g} s, "
              f"{long_run['max_rss_mib']:.0f} MiB for {10 * args.seconds:g} s")
        result["peak_mib_10x"] = round(long_run["max_rss_mib"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
