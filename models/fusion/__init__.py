"""Attention fusion over whichever modality embeddings are present."""

from models.fusion.model import FusionModel, FusionModelConfig

__all__ = ["FusionModel", "FusionModelConfig"]
