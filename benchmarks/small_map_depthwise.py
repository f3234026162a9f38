"""Benchmark: training steps of the demo's two MobileNetV2 networks with and without the small-map depthwise path.

oneDNN differentiates 3x3 depthwise convolutions slowly on 2 x 2 feature maps (the last stage of a MobileNetV2
fed 48 x 48 frames). :class:`etesvs.models.streaming.SmallMapDepthwiseConv2d` computes such maps as a product per
channel in training. This script times, side by side and alternating, full training steps (forward, backward,
AdamW) of the MobileNetV2 pretrainer and of the streaming model with the settings of params.yaml, once with the
path and once with plain convolutions, on random inputs of the demo's shapes, and prints each step time and the
ratio (target: the path is faster, ratio > 1).

    python benchmarks/small_map_depthwise.py [--steps N] [--rounds R]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from etesvs.io import read_yaml
from etesvs.models.streaming import SmallMapDepthwiseConv2d, StreamingSegmenter
from etesvs.numerics import use_cpu_kernels
from etesvs.params import call_with
from etesvs.pretrain import build_pretrainer, pretraining_loss

ROOT = Path(__file__).resolve().parents[1]


def small_map_convolutions(model: nn.Module) -> list[nn.Module]:
    """The model's small-map depthwise convolutions (switched to plain ones by setting their class)."""
    return [module for module in model.modules() if isinstance(module, SmallMapDepthwiseConv2d)]


def set_path(modules: list[nn.Module], on: bool) -> None:
    for module in modules:
        module.__class__ = SmallMapDepthwiseConv2d if on else nn.Conv2d


def pretrainer_step(params: dict) -> tuple[nn.Module, callable]:
    section = params["pretrain"]["mobilenet_v2"]
    train = section["train"]
    model, to_input, _ = build_pretrainer("mobilenet_v2", num_classes=16, motion_cells=48, model_args=section["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"])
    corpus = params["pretrain_data"]
    clips = torch.randint(0, 256, (train["batch_size"], train["num_frames"], corpus["height"], corpus["width"], 3),
                          dtype=torch.uint8)  # fmt: skip
    motion = torch.rand(train["batch_size"], train["num_frames"], corpus["height"] // 8, corpus["width"] // 8)
    labels = torch.randint(0, 16, (train["batch_size"],))

    def step() -> None:
        losses = pretraining_loss(model(to_input(clips)), labels, motion, motion_weight=1.0)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()

    return model, step


def streaming_step(params: dict) -> tuple[nn.Module, callable]:
    section = params["streaming"]
    model = call_with(StreamingSegmenter, section["model"], where="params.yaml: streaming.model", num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=section["train"]["lr"])
    frames_per_window = params["window"] // section["data"]["sample_rate"]
    size = section["data"]["image_size"]
    frames = torch.randn(section["train"]["batch_videos"], frames_per_window, 3, size, size)
    mask = torch.ones(frames.shape[:2], dtype=torch.bool)
    labels = torch.randint(0, 10, frames.shape[:2])

    def step() -> None:
        outputs, _ = model(frames, mask)
        loss = sum(nn.functional.cross_entropy(outputs[key], labels) for key in ("head_logits", "memory_logits"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps per timing")
    parser.add_argument("--rounds", type=int, default=4, help="alternating timings of each variant")
    args = parser.parse_args()
    params = read_yaml(ROOT / "params.yaml")
    print(f"cpu kernels: {use_cpu_kernels(params['cpu_kernels'])}")
    torch.set_num_threads(params["streaming"]["train"]["num_threads"])
    torch.manual_seed(0)
    for name, build in (("MobileNetV2 pretraining", pretrainer_step), ("ETESVS training", streaming_step)):
        model, step = build(params)
        model.train()
        modules = small_map_convolutions(model)
        times = {True: [], False: []}
        for on in (True, False):  # warm-up
            set_path(modules, on)
            step()
        for _ in range(args.rounds):
            for on in (True, False):
                set_path(modules, on)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[on].append((time.perf_counter() - start) / args.steps)
        fast, plain = min(times[True]), min(times[False])
        print(f"{name}: {len(modules)} depthwise convolutions; step {1e3 * fast:.0f} ms with the small-map path, "
              f"{1e3 * plain:.0f} ms without; ratio {plain / fast:.2f}")


if __name__ == "__main__":
    main()
