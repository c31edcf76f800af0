"""Knowledge distillation: train a model towards the averaged soft predictions of saved teachers.

The teachers see exactly the augmented batch the student sees ("function matching"), so the
soft targets follow every crop, flip and erasure. Their probabilities at temperature ``T`` are
averaged (an ensemble), and the loss mixes the usual hard-label loss with the KL divergence to
that ensemble, scaled by ``T**2`` so its gradients keep their size across temperatures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint import load_model


class Distiller(nn.Module):
    """Hard-label loss blended with distillation from an ensemble of frozen teachers."""

    def __init__(
        self, teachers: Sequence[nn.Module], hard_loss: nn.Module, weight: float = 0.7, temperature: float = 2.0
    ) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("distillation needs at least one teacher")
        if not 0.0 <= weight <= 1.0 or temperature <= 0:
            raise ValueError(f"need 0 <= weight <= 1 and temperature > 0, got {weight}, {temperature}")
        self.teachers = nn.ModuleList(teachers).eval().requires_grad_(False)
        self.hard_loss = hard_loss
        self.weight = weight
        self.temperature = temperature

    def train(self, mode: bool = True) -> Distiller:
        """Teachers stay in eval mode (running BatchNorm statistics, no dropout)."""
        return self

    @torch.no_grad()
    def soft_targets(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Mean of the teachers' class probabilities at the distillation temperature."""
        probs = [torch.softmax(t(*inputs)[1].float() / self.temperature, dim=-1) for t in self.teachers]
        return torch.stack(probs).mean(0)

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(1 - weight) * hard loss + weight * T^2 * KL(targets || student)``."""
        log_student = F.log_softmax(student_logits.float() / self.temperature, dim=-1)
        soft = F.kl_div(log_student, targets, reduction="batchmean") * self.temperature**2
        return (1.0 - self.weight) * self.hard_loss(student_logits.float(), labels) + self.weight * soft


def load_teachers(
    directories: Sequence[str | Path], device: torch.device, channels_last: bool = False
) -> list[nn.Module]:
    """Saved models (safetensors + JSON) as frozen teachers on ``device``."""
    teachers = []
    for directory in directories:
        model, _ = load_model(directory)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        teachers.append(model.eval().requires_grad_(False))
    return teachers
