"""Fusion model: multi-head attention from a learned query over the present modality embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.common import CalibratedHead
from models.labels import MODALITIES


@dataclass
class FusionModelConfig:
    """Architecture of :class:`FusionModel`."""

    embed_dim: int = 256
    num_heads: int = 4
    hidden_dim: int = 256
    dropout: float = 0.2
    modalities: tuple[str, ...] = MODALITIES


class FusionModel(nn.Module):
    """Fuses any non-empty subset of modality embeddings.

    Each embedding is normalised, projected and tagged with a learned modality vector. A learned
    query attends over the present modalities (missing ones are masked out); a learned per-modality
    bias on the attention logits acts as the modality weight. The head-averaged attention weights
    are returned as each modality's contribution and sum to 1 over the modalities present.
    """

    def __init__(self, config: FusionModelConfig) -> None:
        super().__init__()
        self.config = config
        n, d = len(config.modalities), config.embed_dim
        self.input_norm = nn.ModuleList([nn.LayerNorm(d) for _ in range(n)])
        self.project = nn.ModuleList([nn.Linear(d, d) for _ in range(n)])
        self.modality_embedding = nn.Parameter(torch.randn(n, d) * 0.02)
        self.modality_bias = nn.Parameter(torch.zeros(n))
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.attention = nn.MultiheadAttention(d, config.num_heads, dropout=config.dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, config.hidden_dim), nn.GELU())
        self.head = CalibratedHead(config.hidden_dim, config.dropout)

    def forward(self, embeddings: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``embeddings`` (B, M, D) in ``config.modalities`` order, ``present`` (B, M) bool.

        Returns ``(logits [B, 7], contributions [B, M])``. Every row needs one modality present.
        """
        if not bool(present.any(dim=1).all()):
            raise ValueError("every sample needs at least one modality")
        tokens = torch.stack(
            [proj(norm(embeddings[:, i])) for i, (norm, proj) in enumerate(zip(self.input_norm, self.project, strict=True))],
            dim=1,
        ) + self.modality_embedding
        b, m = present.shape
        bias = self.modality_bias.expand(b, m).masked_fill(~present, float("-inf"))
        attn_mask = bias[:, None, None, :].expand(b, self.config.num_heads, 1, m).reshape(b * self.config.num_heads, 1, m)
        fused, weights = self.attention(
            self.query.expand(b, -1, -1), tokens, tokens, attn_mask=attn_mask, need_weights=True, average_attn_weights=True
        )
        contributions = weights.squeeze(1) * present
        contributions = contributions / contributions.sum(1, keepdim=True).clamp_min(1e-8)
        return self.head(self.mlp(fused.squeeze(1))), contributions
