"""Speech emotion model: log-mel -> 2 conv blocks -> BiGRU -> max over time -> 256-d embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.common import CalibratedHead


@dataclass
class AudioModelConfig:
    """Architecture of :class:`AudioModel`."""

    n_mels: int = 64
    conv_channels: tuple[int, int] = (64, 128)
    frame_dim: int = 256  # conv features per time step are projected to this before the GRU
    gru_hidden: int = 256
    embed_dim: int = 256
    dropout: float = 0.3


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)
    )


class AudioModel(nn.Module):
    """CNN over the log-mel (64 -> 128 channels), a 256-d projection, a BiGRU and max pooling."""

    def __init__(self, config: AudioModelConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2 = config.conv_channels
        self.conv = nn.ModuleList([_conv_block(1, c1), _conv_block(c1, c2)])
        self.project = nn.Sequential(nn.Linear(c2 * (config.n_mels // 4), config.frame_dim), nn.ReLU(inplace=True))
        self.gru = nn.GRU(config.frame_dim, config.gru_hidden, batch_first=True, bidirectional=True)
        self.embed = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(2 * config.gru_hidden, config.embed_dim), nn.GELU()
        )
        self.head = CalibratedHead(config.embed_dim, config.dropout)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` (B, 1, n_mels, T), ``lengths`` (B,) -> ``(embedding [B, 256], logits [B, 7])``."""
        x, steps = features, lengths
        for block in self.conv:
            # Zero the padded tail after each block so a clip gives the same result alone or in a batch.
            x = block(x)
            steps = steps // 2
            x = x * (torch.arange(x.shape[-1], device=x.device) < steps[:, None])[:, None, None, :]
        b, c, m, t = x.shape  # (B, C, M/4, T/4)
        x = self.project(x.permute(0, 3, 1, 2).reshape(b, t, c * m))
        steps = steps.clamp(1, t)
        packed = nn.utils.rnn.pack_padded_sequence(x, steps.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=t)
        valid = torch.arange(t, device=x.device)[None, :] < steps[:, None]
        pooled = out.masked_fill(~valid[..., None], float("-inf")).max(dim=1).values
        embedding = self.embed(pooled)
        return embedding, self.head(embedding)
