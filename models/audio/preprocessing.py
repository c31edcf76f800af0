"""Audio preprocessing shared by training and serving: waveform -> normalised 64-bin log-mel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchaudio


@dataclass
class AudioFeatureConfig:
    """Log-mel front end. 25 ms windows every 10 ms, as is usual for speech."""

    sample_rate: int = 16000
    n_mels: int = 64
    n_fft: int = 400
    hop_length: int = 160
    max_seconds: float = 8.0
    trim_db: float = 40.0  # frames quieter than (loudest - trim_db) at either end are cut ...
    floor_margin_db: float = 3.0  # ... and frames within this of the noise floor (a noisy line has no silence)
    floor_percentile: float = 10.0  # the noise floor: this percentile of the frame energies
    min_frames: int = 32


class LogMelExtractor:
    """Turns a mono waveform into a ``(n_mels, T)`` log-mel, silence-trimmed and normalised."""

    def __init__(self, config: AudioFeatureConfig | None = None) -> None:
        self.config = config or AudioFeatureConfig()
        c = self.config
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=c.sample_rate, n_fft=c.n_fft, hop_length=c.hop_length, n_mels=c.n_mels
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80.0)

    @property
    def max_frames(self) -> int:
        return int(self.config.max_seconds * self.config.sample_rate / self.config.hop_length)

    @torch.no_grad()
    def __call__(self, wave: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features for one waveform (float samples in [-1, 1] at ``sample_rate``)."""
        x = torch.as_tensor(wave, dtype=torch.float32).flatten()
        mel = self.to_db(self.melspec(x))  # (n_mels, T)
        mel = self._trim_silence(mel)
        if mel.shape[1] > self.max_frames:  # keep the centre of long inputs
            start = (mel.shape[1] - self.max_frames) // 2
            mel = mel[:, start : start + self.max_frames]
        mel = (mel - mel.mean()) / mel.std().clamp_min(1e-3)
        if mel.shape[1] < self.config.min_frames:
            mel = torch.nn.functional.pad(mel, (0, self.config.min_frames - mel.shape[1]))
        return mel.contiguous()

    @torch.no_grad()
    def trim_wave(self, wave: torch.Tensor) -> torch.Tensor:
        """``wave`` cut to the span ``__call__`` keeps (from the first to the last of :meth:`_loud_frames`)."""
        loud = self._loud_frames(self.to_db(self.melspec(wave)))
        if loud.numel() == 0:
            return wave
        hop = self.config.hop_length
        return wave[int(loud[0]) * hop : (int(loud[-1]) + 1) * hop + self.config.n_fft - hop]

    def _loud_frames(self, mel: torch.Tensor) -> torch.Tensor:
        """Indices of the frames louder than both ``loudest - trim_db`` and ``noise floor + floor_margin_db``.

        Clean recordings have near-digital silence, so the first bound decides; with a noise floor (a noisy
        room, a phone line) the second one still finds where the speech starts and ends, so the model sees
        speech and not seconds of noise (training trims its clean clips before it adds noise).
        """
        energy = mel.mean(0)
        floor = torch.quantile(energy, self.config.floor_percentile / 100.0)
        threshold = torch.maximum(energy.max() - self.config.trim_db, floor + self.config.floor_margin_db)
        return torch.nonzero(energy > threshold).flatten()

    def _trim_silence(self, mel: torch.Tensor) -> torch.Tensor:
        loud = self._loud_frames(mel)
        if loud.numel() == 0:
            return mel
        return mel[:, int(loud[0]) : int(loud[-1]) + 1]


def pad_features(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(n_mels, T_i)`` features into ``(B, 1, n_mels, T_max)`` plus lengths ``(B,)``."""
    lengths = torch.tensor([f.shape[1] for f in features], dtype=torch.long)
    batch = torch.zeros(len(features), 1, features[0].shape[0], int(lengths.max()))
    for i, f in enumerate(features):
        batch[i, 0, :, : f.shape[1]] = f
    return batch, lengths
