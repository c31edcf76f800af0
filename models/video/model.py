"""Facial emotion model: per-frame CNN -> BiGRU over frames -> attention pooling -> 256-d embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.common import CalibratedHead, masked_softmax


@dataclass
class VideoModelConfig:
    """Architecture of :class:`VideoModel`."""

    face_size: int = 48
    channels: tuple[int, int, int] = (32, 64, 128)
    frame_dim: int = 256
    gru_hidden: int = 128
    embed_dim: int = 256
    dropout: float = 0.4
    mirror_average: bool = False  # at inference, average each frame's features with its mirror image's


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class VideoModel(nn.Module):
    """3 conv blocks per face frame, a BiGRU across frames and attention pooling over time."""

    def __init__(self, config: VideoModelConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        side = config.face_size // 8
        self.frame_cnn = nn.Sequential(
            _conv_block(1, c1),
            _conv_block(c1, c2),
            _conv_block(c2, c3),
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(c3 * side * side, config.frame_dim),
            nn.ReLU(inplace=True),
        )
        self.gru = nn.GRU(config.frame_dim, config.gru_hidden, batch_first=True, bidirectional=True)
        self.attention = nn.Linear(2 * config.gru_hidden, 1)
        self.embed = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(2 * config.gru_hidden, config.embed_dim), nn.GELU()
        )
        self.head = CalibratedHead(config.embed_dim, config.dropout)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames`` (B, T, 1, S, S), ``mask`` (B, T) bool -> ``(embedding [B, 256], logits [B, 7])``."""
        b, t = frames.shape[:2]
        flat = frames.reshape(b * t, *frames.shape[2:])
        feats = self.frame_cnn(flat)
        if self.config.mirror_average and not self.training:  # faces are left-right symmetric: a free 2-view ensemble
            feats = 0.5 * (feats + self.frame_cnn(flat.flip(-1)))
        feats = feats.reshape(b, t, -1)
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(feats, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=t)
        weights = masked_softmax(self.attention(out).squeeze(-1), mask)
        pooled = torch.einsum("bt,btd->bd", weights, out)
        embedding = self.embed(pooled)
        return embedding, self.head(embedding)
