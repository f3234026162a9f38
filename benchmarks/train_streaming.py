"""Benchmark: frames/s of the streaming model's data loader beside its training frames/s.

The loader must feed frames faster than the model consumes them (target ratio >= 2), or training waits on
decoding. Uses the demo dataset's frame containers when the pipeline has made them (data/frames, data/labels),
otherwise a small generated dataset, and the streaming parameters of params.yaml.

    python benchmarks/train_streaming.py [--frames DIR --labels DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from etesvs.data.windows import LockstepWindowSampler, VideoWindows
from etesvs.io import read_yaml
from etesvs.losses import streaming_loss
from etesvs.models.streaming import StreamingSegmenter
from etesvs.streaming_training import make_loader, row_weights

ROOT = Path(__file__).resolve().parents[1]


def make_tiny_dataset(root: Path, *, videos: int = 6, frames: int = 160, fps: float = 15.0) -> tuple[Path, Path]:
    """Random-noise frame containers and labels (128x96, 9 classes) in ``root``; returns (frames_dir, labels_dir)."""
    import h5py

    from etesvs.data.frames import write_frame_container
    from etesvs.io import write_json

    rng = np.random.default_rng(0)
    frames_dir, labels_dir = root / "frames", root / "labels"
    frames_dir.mkdir(parents=True)
    labels_dir.mkdir(parents=True)
    names = [f"video{i}" for i in range(videos)]
    with h5py.File(labels_dir / "labels.h5", "w") as handle:
        for name in names:
            labels = np.repeat(rng.integers(0, 9, size=frames // 20), 20).astype(np.int64)
            group = handle.create_group(name)
            group.create_dataset("classes", data=labels)
            group.create_dataset("boundaries", data=np.ones(len(labels), dtype=np.uint8))
            images = rng.integers(0, 256, size=(frames, 96, 128, 3), dtype=np.uint8)
            write_frame_container(frames_dir / f"{name}.h5", images, fps)
    write_json(
        labels_dir / "info.json",
        {"dataset": "bench", "fps": fps, "classes": [f"c{i}" for i in range(9)], "background": ["c0"],
         "background_ids": [0], "split": 1, "train": names, "test": [], "num_frames": {n: frames for n in names}},
    )  # fmt: skip
    return frames_dir, labels_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=Path, default=ROOT / "data" / "frames")
    parser.add_argument("--labels", type=Path, default=ROOT / "data" / "labels")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--steps", type=int, default=12, help="training steps (windows) to time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    args = parser.parse_args()
    params = read_yaml(args.params)
    streaming, window, sample_rate = params["streaming"], params["window"], params["streaming"]["data"]["sample_rate"]
    image_size = streaming["data"]["image_size"]
    batch_videos, num_workers = streaming["train"]["batch_videos"], streaming["train"]["num_workers"]
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        frames_dir, labels_dir = args.frames, args.labels
        if not (labels_dir / "info.json").is_file():
            print(f"{labels_dir} not found: using a generated dataset")
            frames_dir, labels_dir = make_tiny_dataset(Path(tmp))
        from etesvs.data.labels import load_label_info

        info = load_label_info(labels_dir)
        videos = list(info.train)
        dataset = VideoWindows(frames_dir, labels_dir, videos, window=window, sample_rate=sample_rate,
                               image_size=image_size, train=True, augment=streaming["data"]["augment"])
        sampler = LockstepWindowSampler(dataset.lengths, batch_videos=batch_videos, window=window, shuffle=True)

        # The loader alone, with its workers, as in training.
        loader = make_loader(dataset, sampler, num_workers=num_workers, seed=0)
        iterator = iter(loader)
        next(iterator)  # worker start-up is not throughput
        loaded = 0
        start = time.perf_counter()
        for _, batch in zip(range(args.steps * 2), iterator):
            loaded += int(batch["mask"].sum())
        loader_fps = loaded / (time.perf_counter() - start)
        del iterator, loader

        # The model alone, on batches already in memory, as train_one_epoch runs it.
        in_process = make_loader(dataset, sampler, num_workers=0, seed=0)
        batches = [batch for _, batch in zip(range(args.steps + 1), in_process)]
        model = StreamingSegmenter(num_classes=info.num_classes, **streaming["model"])
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=streaming["train"]["lr"])
        state = None
        trained = 0
        for index, batch in enumerate(batches):
            if index == 1:  # the first step warms up the allocator
                start = time.perf_counter()
            frame_weights, window_weights = row_weights(batch, 1)
            outputs, state = model(batch["frames"], batch["mask"], state, batch["reset"])
            losses = streaming_loss(outputs, batch["labels"], batch["mask"], frame_weights=frame_weights,
                                    window_weights=window_weights, **streaming["loss"])
            losses["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index >= 1:
                trained += int(batch["mask"].sum())
            if bool(batch["group_end"][0]):  # the next step starts other videos
                state = None
        model_fps = trained / (time.perf_counter() - start)
        dataset.close()

    print(f"streaming training at {image_size}x{image_size}, window {window}, sample rate {sample_rate}, "
          f"{batch_videos} videos per step, {num_workers} loader workers, {args.threads} torch threads")  # fmt: skip
    print(f"  loader:   {loader_fps:8.1f} frames/s")
    print(f"  training: {model_fps:8.1f} frames/s")
    ratio = loader_fps / model_fps
    print(f"  ratio:    {ratio:8.2f} (target >= 2: {'met' if ratio >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
