"""What a model costs: its parameters and its FLOPs, each counted one way for every model."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``, trainable or frozen (buffers such as BatchNorm statistics excluded)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(model: nn.Module, inputs: Sequence[torch.Tensor]) -> float | None:
    """FLOPs of one ``model(*inputs)`` in eval mode, as fvcore counts them: one multiply-add is one FLOP.

    fvcore counts convolutions, matrix products, normalisations and pooling, not element-wise activations.
    ``model`` must return tensors (wrap a model whose output holds other objects). Returns None where fvcore
    cannot trace the model: a cost figure is a report, not a reason to fail a run.
    """
    with warnings.catch_warnings():  # fvcore's import and tracing touch deprecated TorchScript APIs
        warnings.simplefilter("ignore")
        try:
            from fvcore.nn import FlopCountAnalysis
        except ImportError:
            return None
        was_training = model.training
        model.eval()
        try:
            analysis = FlopCountAnalysis(model, tuple(inputs))
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            return float(analysis.total())
        except Exception:  # tracing is best effort
            return None
        finally:
            model.train(was_training)
