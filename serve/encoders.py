"""Encoder deployments: ``TextEncoder``, ``AudioEncoder``, ``VideoEncoder``.

Each replica receives the raw payload (a string, or the uploaded bytes), runs the pipeline's
``prepare`` (ffmpeg decode + preprocessing) in a thread pool off the event loop, then joins a
``@serve.batch`` queue whose batched ``encode`` forward runs on a single model thread. It answers an
:class:`~serve.schemas.EncoderAnswer` as a plain dict (embedding, its own calibrated probabilities,
timings, what it noticed about the input) or, for bad input, a structured
error dict (see :mod:`serve.errors`): nothing is raised across Ray for input problems.

Weights and batching come through ``user_config``; ``reconfigure`` loads a new pipeline completely
and then swaps one reference, and every request keeps the pipeline it started with, so a hot swap
never fails an in-flight request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MethodType
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from models.inference import AudioPipeline, EmptyTextError, EncoderResult, Prepared, TextPipeline, VideoPipeline
from models.labels import EMOTIONS
from models.media import MediaError
from serve.config import EncoderConfig, EncoderUserConfig, LimitsConfig
from serve.errors import encoder_error, error_from_exception
from serve.metrics import Metrics
from serve.schemas import DIGITS, EncoderAnswer

logger = logging.getLogger("ray.serve")

Pipeline = TextPipeline | AudioPipeline | VideoPipeline


class EncoderSettings(BaseModel):
    """Constructor arguments of an encoder (changing them restarts replicas; weights are not here)."""

    model_config = ConfigDict(extra="forbid")

    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)


@dataclass
class _Job:
    """One prepared input and the pipeline that prepared it (which must also encode it)."""

    pipeline: Pipeline
    prepared: Prepared


@dataclass
class _Encoded:
    result: EncoderResult
    model_ms: float
    batch_size: int


def _round(value: float) -> float:
    return round(float(value), 2)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (the result crosses Ray and becomes JSON)."""
    return value.item() if hasattr(value, "item") else value


def _type_names(kind: type | tuple[type, ...]) -> str:
    """``str`` or ``str or dict``: the payload types an encoder takes, for its error message."""
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def _batch_method() -> Callable[..., Any]:
    """A fresh ``@serve.batch`` function, hence its own queue; sizes are set in ``reconfigure``."""

    async def encode_batch(self: _Encoder, jobs: list[_Job]) -> list[_Encoded]:
        return await self._forward(jobs)

    defaults = EncoderUserConfig()  # replaced by the deployment's own settings in ``reconfigure``
    return serve.batch(max_batch_size=defaults.max_batch_size, batch_wait_timeout_s=defaults.batch_wait_timeout_s)(
        encode_batch
    )


class _Encoder:
    """Shared logic of the three encoder deployments."""

    modality: ClassVar[str]
    payload_type: ClassVar[type | tuple[type, ...]]
    prepare_inline: ClassVar[bool] = False  # True where prepare is trivial (no decode): skip the thread hop

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        cfg = EncoderSettings.model_validate(settings or {})
        self.encoder_config = cfg.encoder
        self.limits = cfg.limits
        threads = cfg.encoder.torch_threads
        torch.set_num_threads(threads)
        self._prepare_pool = ThreadPoolExecutor(
            cfg.encoder.prepare_threads,
            thread_name_prefix=f"{self.modality}-prep",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        self._model_pool = ThreadPoolExecutor(
            1, thread_name_prefix=f"{self.modality}-model", initializer=torch.set_num_threads, initargs=(threads,)
        )
        self._user_config = EncoderUserConfig(
            max_batch_size=cfg.encoder.max_batch_size, batch_wait_timeout_s=cfg.encoder.batch_wait_timeout_s
        )
        self._pipeline: Pipeline | None = None
        self._pipeline_key: tuple[Any, ...] | None = None
        self._load_lock: asyncio.Lock | None = None
        self.metrics = Metrics()
        # One batch queue per encoder instance (a replica holds one), bound like a method.
        self.encode_batch = MethodType(_batch_method(), self)

    # ---- loading and hot swap -------------------------------------------------------------------

    def _build(self, cfg: EncoderUserConfig) -> Pipeline:
        """Load a complete pipeline for ``cfg`` (runs in a thread)."""
        raise NotImplementedError

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply batching settings and, when weights/backbone/revision changed, hot-swap the pipeline."""
        defaults = {
            "max_batch_size": self.encoder_config.max_batch_size,
            "batch_wait_timeout_s": self.encoder_config.batch_wait_timeout_s,
        }
        cfg = EncoderUserConfig.model_validate({**defaults, **(user_config or {})})
        if cfg.max_batch_size > self.encoder_config.max_ongoing_requests:
            logger.warning(
                "%s: max_batch_size %d > max_ongoing_requests %d; batches will not fill",
                self.modality,
                cfg.max_batch_size,
                self.encoder_config.max_ongoing_requests,
            )
        await self._load(cfg)
        self.encode_batch.set_max_batch_size(cfg.max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._user_config = cfg

    async def _load(self, cfg: EncoderUserConfig) -> None:
        key = (cfg.weights_dir, cfg.backbone, cfg.revision)
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if self._pipeline is not None and key == self._pipeline_key:
                return
            start = time.perf_counter()
            pipeline = await asyncio.to_thread(self._build, cfg)  # fully loaded before it is visible
            self._pipeline, self._pipeline_key = pipeline, key  # the swap: one reference assignment
            logger.info("%s encoder loaded %s in %.1f s", self.modality, pipeline.version, time.perf_counter() - start)

    async def _current(self) -> Pipeline:
        """The pipeline to use for a new request (loads the defaults if ``reconfigure`` never ran)."""
        pipeline = self._pipeline
        if pipeline is None:
            await self._load(self._user_config)
            pipeline = self._pipeline
        assert pipeline is not None
        return pipeline

    # ---- request path ---------------------------------------------------------------------------

    async def __call__(self, payload: Any) -> dict[str, Any]:
        """Encode one payload; returns the result dict or ``{"error": {...}}``."""
        start = time.perf_counter()
        if not isinstance(payload, self.payload_type):
            return encoder_error(
                "bad_payload",
                f"{self.modality} expects {_type_names(self.payload_type)}, got {type(payload).__name__}",
                422,
            )
        try:
            pipeline = await self._current()
            if self.prepare_inline:
                prepared = pipeline.prepare(payload)
            else:
                loop = asyncio.get_running_loop()
                prepared = await loop.run_in_executor(self._prepare_pool, pipeline.prepare, payload)
        except (MediaError, EmptyTextError) as exc:
            return error_from_exception(exc)
        except Exception as exc:  # a replica answers, it does not crash
            logger.exception("%s prepare failed", self.modality)
            return error_from_exception(exc)
        try:
            encoded: _Encoded = await self.encode_batch(_Job(pipeline, prepared))
        except Exception as exc:
            logger.exception("%s encode failed", self.modality)
            return error_from_exception(exc)
        return self._answer(pipeline, prepared, encoded, start)

    async def encode_many(self, payloads: list[Any]) -> list[dict[str, Any]]:
        """Encode the payloads of several requests that the ingress sent in one call (see ``serve.service``).

        Every item goes through :meth:`__call__` at once, so all of them join the ``@serve.batch`` queue together
        (with items of other calls) and share forwards; one Ray round trip and one dispatch serve them all.
        The answers (or error dicts) come back in the order of ``payloads``.
        """
        if not isinstance(payloads, list):
            return [encoder_error("bad_payload", f"encode_many expects a list, got {type(payloads).__name__}", 422)]
        return list(await asyncio.gather(*(self(payload) for payload in payloads)))

    def _answer(self, pipeline: Pipeline, prepared: Prepared, encoded: _Encoded, start: float) -> dict[str, Any]:
        """The :class:`EncoderAnswer`, as the plain dict that crosses Ray."""
        res = encoded.result
        info = {k: _plain(v) for k, v in res.info.items()}
        decode_ms = float(info.pop("decode_ms", prepared.prepare_ms))
        preprocess_ms = max(prepared.prepare_ms - decode_ms, 0.0)
        latency_ms = (time.perf_counter() - start) * 1000.0
        m = self.modality
        self.metrics.observe("emotion_encoder_decode_ms", decode_ms, modality=m)
        self.metrics.observe("emotion_encoder_model_ms", encoded.model_ms, modality=m)
        self.metrics.observe("emotion_encoder_latency_ms", latency_ms, modality=m)
        return EncoderAnswer(
            modality=m,
            embedding=res.embedding.astype(float).tolist(),
            probabilities={e: round(float(p), DIGITS) for e, p in zip(EMOTIONS, res.probabilities, strict=True)},
            emotion=res.emotion,
            confidence=round(res.confidence, DIGITS),
            latency_ms=_round(latency_ms),
            decode_ms=_round(decode_ms),
            preprocess_ms=_round(preprocess_ms),
            model_ms=_round(encoded.model_ms),
            batch_size=encoded.batch_size,
            model_version=pipeline.version,
            **info,
        ).model_dump(exclude_none=True)

    async def _forward(self, jobs: list[_Job]) -> list[_Encoded]:
        """The body of ``encode_batch``: one forward per pipeline in the batch, on the model thread."""
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._model_pool, self._forward_sync, jobs)
        self.metrics.observe("emotion_encoder_batch_size", len(jobs), modality=self.modality)
        return out

    @staticmethod
    def _forward_sync(jobs: list[_Job]) -> list[_Encoded]:
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):  # more than one group only while a hot swap is under way
            groups.setdefault(id(job.pipeline), []).append(i)
        out: list[_Encoded | None] = [None] * len(jobs)
        for idxs in groups.values():
            pipeline = jobs[idxs[0]].pipeline
            start = time.perf_counter()
            results = pipeline.encode([jobs[i].prepared for i in idxs])
            model_ms = (time.perf_counter() - start) * 1000.0
            for i, res in zip(idxs, results, strict=True):
                out[i] = _Encoded(res, model_ms, len(idxs))
        return [o for o in out if o is not None]

    # ---- introspection --------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve's replica health check: it fails while no model is loaded, so Serve replaces the replica."""
        if self._pipeline is None:
            raise RuntimeError(f"the {self.modality} model is not loaded")

    async def info(self) -> dict[str, Any]:
        """What this replica serves (used by ``/api/health``)."""
        pipeline = self._pipeline
        cfg = self._user_config
        return {
            "modality": self.modality,
            "loaded": pipeline is not None,
            "version": pipeline.version if pipeline else None,
            "weights_dir": cfg.weights_dir,
            "backbone": cfg.backbone,
            "device": str(pipeline.device) if pipeline else None,
            "precision": pipeline.precision if pipeline else None,
            "max_batch_size": cfg.max_batch_size,
            "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
        }


@serve.deployment(name="TextEncoder")
class TextEncoder(_Encoder):
    """MiniLM text encoder; ``prepare`` validates, ``encode`` tokenises and runs the batch."""

    modality = "text"
    payload_type = (str, dict)  # the text, or {"text": ..., "context": [{"speaker": ..., "text": ...}, ...]}
    prepare_inline = True  # whitespace normalisation only; tokenisation is batched in encode

    def _build(self, cfg: EncoderUserConfig) -> TextPipeline:
        return TextPipeline(
            cfg.weights_dir,
            backbone=cfg.backbone,
            device=self.encoder_config.device,
            precision=self.encoder_config.precision,
        )


@serve.deployment(name="AudioEncoder")
class AudioEncoder(_Encoder):
    """Speech encoder: ffmpeg decode of any audio (or a video's audio track), log-mel, CNN-BiGRU."""

    modality = "audio"
    payload_type = bytes

    def _build(self, cfg: EncoderUserConfig) -> AudioPipeline:
        return AudioPipeline(
            cfg.weights_dir,
            device=self.encoder_config.device,
            limits=self.limits.decode_limits(),
            precision=self.encoder_config.precision,
        )


@serve.deployment(name="VideoEncoder")
class VideoEncoder(_Encoder):
    """Face encoder: ffmpeg decode of sampled frames, Haar face crops, per-frame CNN + temporal GRU."""

    modality = "video"
    payload_type = bytes

    def _build(self, cfg: EncoderUserConfig) -> VideoPipeline:
        return VideoPipeline(
            cfg.weights_dir,
            device=self.encoder_config.device,
            num_frames=self.limits.num_frames,
            limits=self.limits.decode_limits(),
            precision=self.encoder_config.precision,
        )


ENCODERS: dict[str, Any] = {"text": TextEncoder, "audio": AudioEncoder, "video": VideoEncoder}
