"""Framework-free inference pipelines: raw payload -> prepared tensor -> batched encoder forward.

Each pipeline splits its work in two so that a server can place them well:
``prepare`` (decode + preprocessing, CPU-bound, one item, run off the event loop) and
``encode`` (one batched model forward). The same preprocessing code is used by training.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.audio.preprocessing import AudioFeatureConfig, LogMelExtractor, pad_features
from models.audio.whisper import WhisperFrontEnd
from models.audio.whisper_model import WhisperAudioModel
from models.checkpoint import DEFAULT_WEIGHTS_DIR, load_model
from models.common import Precision, forward_in_precision, prepare_for_inference, resolve_device, resolve_precision
from models.fusion.model import PROB_FLOOR
from models.labels import EMOTIONS, NUM_CLASSES
from models.media import DEFAULT_LIMITS, DecodeLimits, decode_audio, decode_frames
from models.text.model import CONTEXT_EXPERT, with_context
from models.text.preprocessing import TextPreprocessor, Turn
from models.video.preprocessing import FaceConfig, FaceCropper, faces_to_tensor, pad_clips


class EmptyTextError(ValueError):
    """The text is empty or only whitespace."""


def _turn(turn: str | Mapping[str, Any] | Turn) -> Turn:
    """One previous turn from a string, a ``{"speaker", "text"}`` mapping or a :class:`Turn`."""
    if isinstance(turn, Turn):
        return turn
    if isinstance(turn, Mapping):
        speaker = turn.get("speaker")
        return Turn(" ".join(str(turn.get("text", "")).split()), str(speaker) if speaker else None)
    return Turn(" ".join(str(turn).split()))


@dataclass
class Prepared:
    """One decoded and preprocessed input, ready for a batched forward."""

    data: Any
    info: dict[str, Any] = field(default_factory=dict)
    prepare_ms: float = 0.0


@dataclass
class EncoderResult:
    """What an encoder gives for one input: its 256-d embedding and its own calibrated prediction."""

    embedding: np.ndarray
    probabilities: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def emotion(self) -> str:
        return EMOTIONS[int(np.argmax(self.probabilities))]

    @property
    def confidence(self) -> float:
        return float(np.max(self.probabilities))


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class _Pipeline:
    """Common parts: load weights, run a batched forward without autograd.

    ``device`` is ``cpu``, ``cuda[:N]`` or ``auto`` (see :func:`models.common.resolve_device`).
    """

    modality: str

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
        device: str = "cpu",
        precision: Precision = "auto",
    ) -> None:
        self.weights_dir = Path(weights_dir) if weights_dir else DEFAULT_WEIGHTS_DIR / self.modality
        self.model, self.checkpoint = load_model(self.weights_dir, overrides)
        self.device = resolve_device(device)
        self.model.to(self.device)
        if precision == "auto" and self.device.type == "cpu" and getattr(self.model, "float32_on_cpu", False):
            precision = "float32"
        self.precision = resolve_precision(precision, self.device)
        prepare_for_inference(self.model, self.precision)
        self.version = str(self.checkpoint.get("metadata", {}).get("version", "unversioned"))

    def _forward(self, *inputs: torch.Tensor) -> Any:
        """The model's forward on ``self.device`` in this pipeline's precision; float32 outputs."""
        return forward_in_precision(self.model, inputs, self.precision, self.device)

    def _results(self, embedding: torch.Tensor, logits: torch.Tensor, items: list[Prepared]) -> list[EncoderResult]:
        probs = self.model.head.probabilities(logits).float().cpu().numpy()
        emb = embedding.float().cpu().numpy()
        return [EncoderResult(emb[i], probs[i], dict(item.info)) for i, item in enumerate(items)]


class TextPipeline(_Pipeline):
    """Text: tokenise in ``encode`` (cheap, batched); ``prepare`` validates.

    A weights folder with a :data:`~models.text.model.CONTEXT_EXPERT` sub-folder holds a second model, trained
    to read the previous turns of a conversation with the utterance. A text sent with context is answered by
    both (:func:`~models.text.model.with_context`); a text without context by the utterance model alone, as
    if the expert were absent. The embedding is always the utterance model's, the one the fusion learned on.
    """

    modality = "text"

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        backbone: str | None = None,
        device: str = "cpu",
        precision: Precision = "auto",
    ) -> None:
        overrides = {"backbone": backbone} if backbone else None
        super().__init__(weights_dir, overrides, device, precision)
        cfg = self.model.config
        self.preprocessor = TextPreprocessor(cfg.backbone, cfg.max_length)
        self.context_expert: torch.nn.Module | None = None
        expert_dir = self.weights_dir / CONTEXT_EXPERT
        if expert_dir.is_dir():
            self.context_expert, expert = load_model(expert_dir, overrides)
            self.context_expert.to(self.device)
            prepare_for_inference(self.context_expert, self.precision)
            self.context_preprocessor = TextPreprocessor(
                self.context_expert.config.backbone, self.context_expert.config.max_length
            )
            self.version += "+" + str(expert.get("metadata", {}).get("version", "unversioned"))

    @property
    def reads_context(self) -> bool:
        """Whether previous turns are read: by a context expert, or by a model trained to read them itself."""
        return self.context_expert is not None or bool(getattr(self.model.config, "context", False))

    def prepare(self, payload: str | Mapping[str, Any]) -> Prepared:
        """Check the text and normalise its whitespace.

        ``payload`` is the text, or ``{"text": ..., "context": [turn, ...]}`` with the previous turns of the
        conversation, oldest first, each a string or ``{"speaker": ..., "text": ...}``.
        """
        text, turns = payload, []
        if isinstance(payload, Mapping):
            text, turns = payload.get("text", ""), payload.get("context") or []
        cleaned = " ".join(str(text).split())
        if not cleaned:
            raise EmptyTextError("text is empty")
        context = tuple(t for t in (_turn(turn) for turn in turns) if t.text)
        return Prepared((cleaned, context), {"characters": len(cleaned)})

    @torch.inference_mode()
    def encode(self, items: list[Prepared]) -> list[EncoderResult]:
        """Batched forward over prepared texts (each with its context, when the model reads context).

        A text sent with context says how many turns were read (``context_turns``) and how many of the oldest
        were left out to fit the model window (``context_cut``; all of them for a model without context).
        """
        texts = [it.data[0] if isinstance(it.data, tuple) else it.data for it in items]
        contexts = [it.data[1] if isinstance(it.data, tuple) else () for it in items]
        reads_itself = self.context_expert is None and self.reads_context
        tok = self.preprocessor(texts, contexts if reads_itself else None)
        embedding, logits = self._forward(tok.input_ids, tok.attention_mask)
        probs = self.model.head.probabilities(logits).float()
        used = list(tok.context_turns) if reads_itself else [0] * len(items)
        with_turns = [i for i, c in enumerate(contexts) if c]
        if self.context_expert is not None and with_turns:
            ctx = self.context_preprocessor([texts[i] for i in with_turns], [contexts[i] for i in with_turns])
            inputs = (ctx.input_ids, ctx.attention_mask)
            _, expert_logits = forward_in_precision(self.context_expert, inputs, self.precision, self.device)
            expert_probs = self.context_expert.head.probabilities(expert_logits).float()
            probs[with_turns] = with_context(probs[with_turns], expert_probs)
            for j, i in enumerate(with_turns):
                used[i] = ctx.context_turns[j]
        emb, probs_np = embedding.float().cpu().numpy(), probs.cpu().numpy()
        results = [EncoderResult(emb[i], probs_np[i], dict(item.info)) for i, item in enumerate(items)]
        for i, (res, truncated) in enumerate(zip(results, tok.truncated, strict=True)):
            res.info["truncated"] = truncated
            if contexts[i]:
                res.info["context_turns"] = used[i]
                res.info["context_cut"] = len(contexts[i]) - used[i]
        return results


class AudioPipeline(_Pipeline):
    """Speech: ffmpeg decode to 16 kHz mono, silence trim, log-mel; one batched forward.

    The front end follows the checkpoint: Whisper's 80-bin log-mel (up to 30 s) for the Whisper-base model,
    the 64-bin normalised log-mel (the centre 8 s) for the CNN + BiGRU model.
    """

    modality = "audio"

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        device: str = "cpu",
        limits: DecodeLimits = DEFAULT_LIMITS,
        precision: Precision = "auto",
    ) -> None:
        super().__init__(weights_dir, None, device, precision)
        features = self.checkpoint.get("metadata", {}).get("features", {})
        self.extractor = LogMelExtractor(AudioFeatureConfig(**features))
        self.whisper = WhisperFrontEnd() if isinstance(self.model, WhisperAudioModel) else None
        self.limits = limits

    def prepare(self, data: bytes) -> Prepared:
        """Decode audio bytes (or a video's audio track) and compute the model's log-mel."""
        start = time.perf_counter()
        wave = decode_audio(data, self.extractor.config.sample_rate, self.limits)
        decode_ms = _ms_since(start)
        if self.whisper is not None:
            features = self.whisper(wave)
        else:
            features = self.extractor(wave)
        info = {"duration_s": round(len(wave) / self.extractor.config.sample_rate, 3), "decode_ms": round(decode_ms, 2)}
        return Prepared(features, info, _ms_since(start))

    @torch.inference_mode()
    def encode(self, items: list[Prepared]) -> list[EncoderResult]:
        """One forward over the batch; clips are padded to the longest and masked."""
        batch, lengths = pad_features([it.data for it in items])
        if self.whisper is not None:
            batch = batch[:, 0]  # (B, 80, T): Whisper's stem is a 1-d convolution over mel bins as channels
        embedding, logits = self._forward(batch, lengths)
        return self._results(embedding, logits, items)


class VideoPipeline(_Pipeline):
    """Faces: ffmpeg decode of up to N uniformly sampled frames, eye-levelled face crops; batched forward."""

    modality = "video"

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        device: str = "cpu",
        num_frames: int = 16,
        limits: DecodeLimits = DEFAULT_LIMITS,
        precision: Precision = "auto",
    ) -> None:
        super().__init__(weights_dir, None, device, precision)
        self.cropper = FaceCropper(FaceConfig(face_size=self.model.config.face_size))
        self.num_frames = num_frames
        self.limits = limits

    def prepare(self, data: bytes) -> Prepared:
        """Decode a video or still image to face crops."""
        start = time.perf_counter()
        frames = decode_frames(data, self.num_frames, self.limits)
        decode_ms = _ms_since(start)
        tensor, info = self.faces(frames)
        info["decode_ms"] = round(decode_ms, 2)
        return Prepared(tensor, info, _ms_since(start))

    def faces(self, frames: np.ndarray) -> tuple[torch.Tensor, dict[str, Any]]:
        """Decoded ``(T, H, W)`` frames -> the model's face input and what the answer says about the faces."""
        crops = self.cropper.crop(frames)
        info: dict[str, Any] = {"frames": len(frames), "face_detected": crops.face_detected}
        if crops.score is not None:
            info["face_score"] = round(crops.score, 3)
            info["face_detector"] = crops.detector
        return faces_to_tensor(crops.faces), info

    @torch.inference_mode()
    def encode(self, items: list[Prepared]) -> list[EncoderResult]:
        batch, mask = pad_clips([it.data for it in items])
        embedding, logits = self._forward(batch, mask)
        return self._results(embedding, logits, items)


@dataclass
class FusionResult:
    """Fused prediction over the modalities that were present."""

    probabilities: np.ndarray
    contributions: dict[str, float]

    @property
    def emotion(self) -> str:
        return EMOTIONS[int(np.argmax(self.probabilities))]


class FusionPipeline(_Pipeline):
    """Attention fusion of whichever modality embeddings are available."""

    modality = "fusion"

    def __init__(self, weights_dir: str | Path | None = None, device: str = "cpu") -> None:
        super().__init__(weights_dir, None, device, precision="float32")  # a few small matmuls
        self.modalities: tuple[str, ...] = tuple(self.model.config.modalities)
        self.warm_up()

    def warm_up(self) -> None:
        """Fuse a neutral input once per modality subset, so the first real request does not pay one-time costs.

        The first attention call with a padding mask (any request missing a modality) makes torch import
        sympy: over a second on an idle CPU, several on a busy one, and the server calls :meth:`fuse` on its
        event loop.
        """
        uniform = np.full(NUM_CLASSES, 1.0 / NUM_CLASSES, dtype=np.float32)
        zeros = np.zeros(self.model.config.embed_dim, dtype=np.float32)
        for mask in range(1, 2 ** len(self.modalities)):
            subset = [m for i, m in enumerate(self.modalities) if mask >> i & 1]
            self.fuse(dict.fromkeys(subset, zeros), dict.fromkeys(subset, uniform))

    @torch.inference_mode()
    def fuse(self, embeddings: dict[str, np.ndarray], probabilities: dict[str, np.ndarray]) -> FusionResult:
        """Fuse ``{modality: 256-d embedding}`` and ``{modality: calibrated 7-class probabilities}``.

        Both dicts name the same non-empty subset of text/audio/video.
        """
        unknown = set(embeddings) - set(self.modalities)
        if not embeddings or unknown or set(probabilities) != set(embeddings):
            raise ValueError(
                f"need a non-empty subset of {list(self.modalities)} with embeddings and probabilities, "
                f"got {sorted(embeddings)} and {sorted(probabilities)}"
            )
        m, dim = len(self.modalities), self.model.config.embed_dim
        stacked, log_probs = torch.zeros(1, m, dim), torch.zeros(1, m, NUM_CLASSES)
        present = torch.zeros(1, m, dtype=torch.bool)
        for i, name in enumerate(self.modalities):
            if name in embeddings:
                stacked[0, i] = torch.as_tensor(np.asarray(embeddings[name], dtype=np.float32))
                probs = torch.as_tensor(np.asarray(probabilities[name], dtype=np.float32))
                log_probs[0, i] = probs.clamp_min(PROB_FLOOR).log()
                present[0, i] = True
        present = present.to(self.device)
        logits, contributions = self.model(stacked.to(self.device), log_probs.to(self.device), present)
        probs = self.model.probabilities(logits, present)[0].float().cpu().numpy()
        contrib = contributions[0].float().cpu().numpy()
        return FusionResult(probs, {m: float(contrib[i]) for i, m in enumerate(self.modalities) if m in embeddings})


def combine(results: Mapping[str, EncoderResult], fusion: FusionPipeline | None) -> FusionResult:
    """The answer for the encoders' ``results``: one modality answers with its encoder's own calibrated prediction
    (as the service does, so ``fusion`` may be ``None`` there), several are fused by ``fusion``."""
    if len(results) == 1:
        ((name, only),) = results.items()
        return FusionResult(only.probabilities, {name: 1.0})
    if fusion is None:
        raise ValueError(f"fusing {sorted(results)} needs the fusion model")
    return fusion.fuse(
        {name: r.embedding for name, r in results.items()},
        {name: r.probabilities for name, r in results.items()},
    )
