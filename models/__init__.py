"""Plain-PyTorch models for multimodal emotion recognition (no Ray in here)."""

from models.labels import EMOTIONS, NUM_CLASSES

__all__ = ["EMOTIONS", "NUM_CLASSES"]
