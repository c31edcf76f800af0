"""Text emotion model: transformer backbone -> mean pooling -> 256-d embedding -> classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.common import CalibratedHead
from models.text.preprocessing import DEFAULT_BACKBONE, resolve_backbone


@dataclass
class TextModelConfig:
    """Architecture of :class:`TextModel`."""

    backbone: str = DEFAULT_BACKBONE
    max_length: int = 128
    embed_dim: int = 256
    dropout: float = 0.1
    # How many of the backbone's top transformer layers were fine-tuned. Only those layers (and
    # the head) are stored in the checkpoint; the rest comes unchanged from the backbone itself.
    trainable_layers: int = 6
    # Trained to read the previous turns of a conversation as a second tokenizer segment
    # (models.text.preprocessing.TextPreprocessor); a model without it is sent the utterance alone.
    context: bool = False


CONTEXT_EXPERT = "context"  # sub-folder of a text weights folder: the expert that reads the previous turns


def with_context(probs: torch.Tensor, context_probs: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    """A text read with its conversation: the normalised weighted geometric mean (a product of two experts) of the
    utterance model's calibrated probabilities and those of the context expert, which read the previous turns and
    the utterance together, the expert weighing ``weight`` (served: 0.5, chosen by ``training.context_weight``).
    Both ``[B, 7]``; returns ``[B, 7]``."""
    log = (1 - weight) * probs.clamp_min(1e-8).log() + weight * context_probs.clamp_min(1e-8).log()
    return torch.softmax(log, dim=-1)


class TextModel(nn.Module):
    """``AutoModel`` backbone, attention-masked mean pooling, dense 256-d embedding, head."""

    def __init__(self, config: TextModelConfig) -> None:
        super().__init__()
        from transformers import AutoModel

        self.config = config
        self.backbone = AutoModel.from_pretrained(resolve_backbone(config.backbone))
        hidden = self.backbone.config.hidden_size
        self.embed = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(hidden, config.embed_dim), nn.GELU())
        self.head = CalibratedHead(config.embed_dim, config.dropout)

    def trainable_parameter_names(self) -> list[str]:
        """Names of the parameters that training updates (and the checkpoint stores)."""
        layers = self.backbone_layers()
        first = max(0, len(layers) - self.config.trainable_layers)
        prefixes = [f"backbone.encoder.layer.{i}." for i in range(first, len(layers))]
        names = []
        for name, _ in self.named_parameters():
            if not name.startswith("backbone.") or any(name.startswith(p) for p in prefixes):
                names.append(name)
        return names

    def backbone_layers(self) -> nn.ModuleList:
        """The backbone's stack of transformer layers (BERT-style ``encoder.layer``)."""
        encoder = getattr(self.backbone, "encoder", None)
        layers = getattr(encoder, "layer", None)
        if layers is None:
            raise ValueError("backbone has no encoder.layer stack; set trainable_layers=0")
        return layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(embedding [B, 256], logits [B, 7])``."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        embedding = self.embed(pooled)
        return embedding, self.head(embedding)
