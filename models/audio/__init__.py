"""Audio encoder: 16 kHz mono -> 64-bin log-mel -> CNN -> BiGRU -> max pooling -> 256-d embedding."""

from models.audio.model import AudioModel, AudioModelConfig
from models.audio.preprocessing import AudioFeatureConfig, LogMelExtractor

__all__ = ["AudioFeatureConfig", "AudioModel", "AudioModelConfig", "LogMelExtractor"]
