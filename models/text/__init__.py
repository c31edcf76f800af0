"""Text encoder: pretrained transformer backbone + mean pooling + 256-d dense embedding."""

from models.text.model import TextModel, TextModelConfig
from models.text.preprocessing import TextPreprocessor, resolve_backbone

__all__ = ["TextModel", "TextModelConfig", "TextPreprocessor", "resolve_backbone"]
