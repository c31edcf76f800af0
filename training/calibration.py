"""Post-hoc fits on held-out logits: temperature scaling (Guo et al., 2017) and per-class decision offsets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """Temperature minimising the NLL of ``softmax(logits / T)`` on ``labels``."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.05, max_iter=steps)
    loss_fn = torch.nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def fit_class_bias(
    logits: torch.Tensor,
    score: Callable[[np.ndarray], float],
    grid: tuple[float, ...] = tuple(np.round(np.arange(-1.5, 1.51, 0.1), 2)),
    rounds: int = 3,
) -> torch.Tensor:
    """Per-class logit offsets that maximise ``score(argmax(logits + bias))``, by coordinate ascent.

    A decision rule for metrics the loss does not optimise (macro-F1 rewards the rare classes that a
    cross-entropy-trained argmax under-predicts). ``score`` takes the predicted labels; fit it on
    held-out logits only. The offsets change no ranking within a class, only where the argmax falls.
    """
    bias = torch.zeros(logits.shape[1])
    best = score(logits.argmax(1).numpy())
    for _ in range(rounds):
        improved = False
        for c in range(logits.shape[1]):
            for value in grid:
                trial = bias.clone()
                trial[c] = float(value)
                s = score((logits + trial).argmax(1).numpy())
                if s > best + 1e-6:
                    best, bias, improved = s, trial, True
        if not improved:
            break
    return bias
