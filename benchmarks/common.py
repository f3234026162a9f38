"""Helpers shared by the benchmark scripts (imported as ``common``: the scripts run as ``python benchmarks/x.py``)."""

from __future__ import annotations

import inspect

from etesvs.models.streaming import StreamingSegmenter

STREAMING_MODEL_KEYS = ("width_mult", "temporal_shift", "memory_channels", "head", "head_layers", "head_channels", "norm")


def streaming_model_args(section: dict, *, num_classes: int) -> dict:
    """Constructor kwargs of :class:`StreamingSegmenter` from the ``streaming`` section of params.yaml;
    missing keys take the constructor's defaults."""
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(StreamingSegmenter.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    args = {"num_classes": num_classes}
    for key in STREAMING_MODEL_KEYS:
        args[key] = type(defaults[key])(section.get(key, defaults[key]))
    return args
