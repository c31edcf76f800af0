"""Pieces shared by every emotion model: the classifier head with a calibration temperature,
masked softmax, and the inference precision (float32, or bfloat16 autocast where the hardware has it)."""

from __future__ import annotations

import argparse
import contextlib
from functools import lru_cache
from typing import Literal

import torch
from torch import nn

from models.labels import NUM_CLASSES

Precision = Literal["auto", "float32", "bfloat16"]


@lru_cache(maxsize=4)
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` runs bfloat16 matmuls/convolutions natively (AVX512-BF16/AMX CPUs, recent GPUs)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda[:N]`` or ``auto`` (cuda when torch sees a GPU, else cpu) as a device.

    Asking for CUDA where there is none raises a ValueError that says so, instead of failing
    later inside the first forward.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available on this machine (use cpu or auto)")
    return torch.device(name)


def device_option(name: str) -> torch.device:
    """An argparse ``type`` for ``--device``: :func:`resolve_device`, a missing GPU reported as a usage error."""
    try:
        return resolve_device(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """``auto`` -> ``bfloat16`` where native, else ``float32``."""
    if precision == "auto":
        return "bfloat16" if native_bf16(device.type) else "float32"
    return precision


def inference_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for a forward when ``precision`` is ``bfloat16`` (weights stay float32)."""
    if precision != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


_AUTOCAST_BF16_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def cast_for_autocast(model: nn.Module, precision: str) -> nn.Module:
    """Store the weights that bfloat16 autocast would cast (linear and conv layers) in bfloat16 once.

    Autocast otherwise re-casts them on every forward (about 1 ms per MiniLM call on a CPU). The
    outputs are bit-identical to autocast over float32 weights; the model must then always run
    under :func:`inference_autocast`, as the pipelines do. Other layers (norms, GRUs, embeddings)
    keep float32. A no-op unless ``precision`` is ``bfloat16``.
    """
    if precision == "bfloat16":
        for module in model.modules():
            if isinstance(module, _AUTOCAST_BF16_LAYERS):
                module.to(torch.bfloat16)
    return model


def prepare_for_inference(model: nn.Module, precision: str) -> nn.Module:
    """Lay out a model for fast inference: :func:`cast_for_autocast`, then channels-last conv weights.

    oneDNN runs convolutions, batch norm and max pooling in channels-last (NHWC) without the
    reorders it needs for NCHW, most of all in bfloat16 (docs/architecture.md, "Precision").
    Results match the plain layout to float rounding. Models without 4-d weights (text) are unchanged.
    """
    cast_for_autocast(model, precision)
    return model.to(memory_format=torch.channels_last)


def forward_in_precision(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], precision: str, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """``model(*inputs)`` on ``device`` under :func:`inference_autocast`; the outputs come back in float32."""
    with inference_autocast(precision, device):
        outputs = model(*(x.to(device) for x in inputs))
    return tuple(o.float() for o in outputs)


class CalibratedHead(nn.Module):
    """Dropout + linear classifier whose probabilities are divided by a fitted temperature.

    The temperature is a buffer (saved with the weights) set by temperature scaling on the
    validation split after training (:func:`training.calibration.fit_temperature`).
    """

    def __init__(self, in_dim: int, dropout: float, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_dim, num_classes)
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities for ``logits``."""
        return torch.softmax(logits / self.temperature.clamp_min(1e-3), dim=-1)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` that gives zero weight where ``mask`` is False."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask
