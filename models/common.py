"""Pieces shared by every emotion model: the classifier head with a calibration temperature."""

from __future__ import annotations

import torch
from torch import nn

from models.labels import NUM_CLASSES


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
