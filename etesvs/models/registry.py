"""Models and their losses by name: where the names in conf/ and dvc.yaml become objects, and only here."""

from __future__ import annotations

from torch import nn

from etesvs.errors import EtesvsError
from etesvs.losses import ASRFLoss, SegmentationLoss
from etesvs.models.asformer import ASFormer
from etesvs.models.asrf import ActionSegmentRefinementFramework
from etesvs.models.frame_classifier import FrameClassifier
from etesvs.models.mstcn import MultiStageTCN

TEMPORAL_MODELS: dict[str, type[nn.Module]] = {
    "mstcn": MultiStageTCN,
    "asrf": ActionSegmentRefinementFramework,
    "asformer": ASFormer,
    "frame_classifier": FrameClassifier,
}
"""The two-stage models: forward(features (B, D, T), mask (B, 1, T)) and probabilities(output, mask)."""

TEMPORAL_LOSSES: dict[str, type[nn.Module]] = {
    "mstcn": SegmentationLoss,
    "asrf": ASRFLoss,
    "asformer": SegmentationLoss,
    "frame_classifier": SegmentationLoss,
}
"""Each model's loss, built with ``from_label_counts(counts, full_rate_counts, **params[model]["loss"])``."""


def temporal_model(name: str) -> tuple[type[nn.Module], type[nn.Module]]:
    """The (model class, loss class) of a two-stage model name, or a one-line error listing the names."""
    if name not in TEMPORAL_MODELS:
        raise EtesvsError(f"unknown model '{name}' (choose from {', '.join(TEMPORAL_MODELS)})")
    return TEMPORAL_MODELS[name], TEMPORAL_LOSSES[name]
