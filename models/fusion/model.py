"""Fusion model: evidence-aware multi-head attention over modality tokens, read out as a weighted product of experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.labels import MODALITIES, NUM_CLASSES

PROB_FLOOR = 1e-6  # encoder probabilities are clamped here before the log (answers are rounded to 6 decimals)


@dataclass
class FusionModelConfig:
    """Architecture of :class:`FusionModel`."""

    embed_dim: int = 256
    num_heads: int = 4
    token_dim: int = 128
    dropout: float = 0.1
    embedding_dropout: float = 0.5  # training: share of tokens built without their embedding (evidence only)
    correction: bool = False  # add a learned correction head to the weighted product (overfits small pools)
    class_mixing: bool = False  # a learned C x C map per modality on its log-probabilities (its confusions)
    agreement_bonus: float = (
        1.0  # with 3+ modalities, added to the class each encoder answers: two that agree outvote a third
    )
    modalities: tuple[str, ...] = MODALITIES


def evidence_features(log_probs: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` log-probabilities -> ``(..., C + 2)``: themselves, the top probability and the entropy."""
    probs = log_probs.exp()
    entropy = -(probs * log_probs).sum(-1, keepdim=True)
    return torch.cat([log_probs, probs.max(-1, keepdim=True).values, entropy], dim=-1)


class FusionModel(nn.Module):
    """Fuses any non-empty subset of modalities from their embeddings and calibrated log-probabilities.

    Each present modality is a token built from its 256-d embedding and its encoder's evidence (log-probs,
    top probability, entropy). A learned query attends over the present tokens (multi-head, absent ones
    masked). The head-averaged attention weight ``a_m`` of each of the ``n`` present modalities sets how
    much its log-probabilities count: ``w_m = n * a_m * s_m`` with a learned per-modality scale ``s_m``, and

        logits = sum_m (w_m * (I + D_m) log p_m + lambda * onehot(argmax p_m)) + b

    (plus ``correction(attended tokens)`` with ``config.correction``). With equal attention, ``s = 1``, ``b = 0``
    and no agreement bonus ``lambda`` this is the product of the encoders' probabilities, so the fusion starts
    from the product of experts and learns how far to trust each encoder given its evidence. The fixed bonus
    gives each encoder's own answer one vote when three or more are present: a single very confident encoder
    can no longer overrule two that agree unless their agreement is weak. With ``config.class_mixing`` each
    modality also has a class-mixing matrix ``D_m`` (zero at the start, ``D_m = 0`` off): evidence for one
    class can count towards another the encoder is known to confuse it with (audio's "happy" often means
    "fear"), and how much a modality is trusted can differ by class.
    During training a share of the tokens is built from the evidence alone (``embedding_dropout``), so the
    weighting cannot rest on recognising individual training items. The contribution of a modality is the
    share of the fused class scores' spread that its term (``w_m * (I + D_m) log p_m`` and its vote) carries (its
    standard deviation over the 7 classes, normalised over the modalities present): a confident, trusted
    encoder moves the answer and gets a large share; an unsure or distrusted one gets a small share.
    Probabilities are calibrated by a temperature per subset of modalities (``temperature``, indexed by
    the presence bitmask). A subset marked in ``plain_product`` (same index) is answered with the plain product
    of the encoders' probabilities instead: training sets it where cross-validation finds the learned weighting
    no better than the product on that subset.
    """

    def __init__(self, config: FusionModelConfig) -> None:
        super().__init__()
        self.config = config
        n, d, h = len(config.modalities), config.embed_dim, config.token_dim
        self.embed_proj = nn.ModuleList([nn.Sequential(nn.LayerNorm(d), nn.Linear(d, h)) for _ in range(n)])
        self.evidence_proj = nn.ModuleList([nn.Linear(NUM_CLASSES + 2, h) for _ in range(n)])
        self.modality_embedding = nn.Parameter(torch.randn(n, h) * 0.02)
        self.query = nn.Parameter(
            torch.zeros(1, 1, h)
        )  # a zero query attends uniformly: training starts at the product
        self.attention = nn.MultiheadAttention(h, config.num_heads, dropout=config.dropout, batch_first=True)
        self.log_scale = nn.Parameter(torch.zeros(n))
        self.class_bias = nn.Parameter(torch.zeros(NUM_CLASSES))
        self.class_mixing = nn.Parameter(torch.zeros(n, NUM_CLASSES, NUM_CLASSES)) if config.class_mixing else None
        self.correction = (
            nn.Sequential(nn.LayerNorm(h), nn.Dropout(config.dropout), nn.Linear(h, NUM_CLASSES))
            if config.correction
            else None
        )
        self.register_buffer("temperature", torch.ones(2**n))
        self.register_buffer("plain_product", torch.zeros(2**n, dtype=torch.bool))

    def forward(
        self, embeddings: torch.Tensor, log_probs: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``embeddings`` (B, M, D), ``log_probs`` (B, M, C), ``present`` (B, M) bool, in ``config.modalities`` order.

        Returns ``(logits [B, C], contributions [B, M])``. Every row needs one modality present.
        """
        if not bool(present.any(dim=1).all()):
            raise ValueError("every sample needs at least one modality")
        log_probs = log_probs.clamp_min(torch.log(torch.tensor(PROB_FLOOR))).masked_fill(~present[..., None], 0.0)
        evidence = evidence_features(log_probs)
        from_embedding = torch.stack([proj(embeddings[:, i]) for i, proj in enumerate(self.embed_proj)], dim=1)
        if self.training and self.config.embedding_dropout > 0:  # keep the weighting from leaning on memorised items
            keep = torch.rand(from_embedding.shape[:2], device=from_embedding.device) >= self.config.embedding_dropout
            from_embedding = from_embedding * keep[..., None]
        from_evidence = torch.stack([proj(evidence[:, i]) for i, proj in enumerate(self.evidence_proj)], dim=1)
        tokens = from_embedding + from_evidence + self.modality_embedding  # (B, M, h)
        b = present.shape[0]
        attended, weights = self.attention(
            self.query.expand(b, -1, -1),
            tokens,
            tokens,
            key_padding_mask=~present,
            need_weights=True,
            average_attn_weights=True,
        )  # attended (B, 1, h), weights (B, 1, M)
        count = present.sum(1, keepdim=True).to(log_probs.dtype)
        weight = count * weights[:, 0] * present * self.log_scale.exp()  # (B, M)
        votes = nn.functional.one_hot(log_probs.argmax(-1), NUM_CLASSES).to(log_probs.dtype) * present[..., None]
        votes = votes * (count >= 3)[..., None]  # a vote only settles a dispute where a majority can form
        evidence_for = log_probs
        if self.class_mixing is not None:  # (I + D_m) log p_m; absent rows are zero and stay zero
            evidence_for = log_probs + torch.einsum("bmc,mdc->bmd", log_probs, self.class_mixing)
        terms = weight[..., None] * evidence_for + self.config.agreement_bonus * votes  # (B, M, C)
        logits = terms.sum(1) + self.class_bias
        if self.correction is not None:
            logits = logits + self.correction(attended[:, 0])
        plain = self.plain_product[self.subset_index(present)]  # (B,) rows answered with the plain product
        if bool(plain.any()):
            terms = torch.where(plain[:, None, None], log_probs, terms)
            logits = torch.where(plain[:, None], log_probs.sum(1), logits)
        spread = terms.std(-1) * present
        contributions = spread / spread.sum(1, keepdim=True).clamp_min(1e-8)
        return logits, contributions

    def subset_index(self, present: torch.Tensor) -> torch.Tensor:
        """Presence bitmask ``(B, M)`` -> index into ``temperature`` (bit ``i`` = modality ``i`` present)."""
        bits = 2 ** torch.arange(present.shape[1], device=present.device)
        return (present.long() * bits).sum(1)

    def probabilities(self, logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities: ``logits`` divided by the temperature of the subset present."""
        temperature = self.temperature[self.subset_index(present)].clamp_min(1e-3)
        return torch.softmax(logits / temperature[:, None], dim=-1)
