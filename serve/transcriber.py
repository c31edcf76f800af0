"""The ``Transcriber`` deployment: Whisper-base on faster-whisper (:mod:`models.transcribe`), its own replicas.

The ingress sends it the same raw audio bytes it sends the ``AudioEncoder`` (a video's bytes for its audio track),
at the same time. A replica decodes them in a thread pool (:func:`models.media.decode_audio`, the speech encoder's
decode and limits), transcribes on its own ``workers`` threads and answers a
:class:`~serve.schemas.TranscriptAnswer` as a plain dict, or for bad input the structured error dict of
:mod:`serve.errors`; nothing is raised across Ray. A call the ingress gave up on is cancelled here too: one
still waiting for a worker never runs.

The model is loaded by ``reconfigure`` (Serve calls it with the ``user_config`` before the replica takes traffic,
and again when ``models.revision`` changes: a reload, swapped in with one reference assignment) and warmed with a
second of silence, so the first request does not pay CTranslate2's first-call costs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from models.audio.whisper import SAMPLE_RATE
from models.media import MediaError, decode_audio
from models.transcribe import Transcriber as TranscriberPipeline
from serve.config import LimitsConfig, TranscriberConfig
from serve.errors import encoder_error, error_from_exception
from serve.metrics import Metrics
from serve.schemas import TranscriptAnswer

logger = logging.getLogger("ray.serve")


class TranscriberDeploymentSettings(BaseModel):
    """Constructor arguments of the ``Transcriber`` (changing them restarts its replicas)."""

    model_config = ConfigDict(extra="forbid")

    transcriber: TranscriberConfig = Field(default_factory=TranscriberConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


@serve.deployment(name="Transcriber")
class Transcriber:
    """Speech to text for the ingress: raw audio (or video) bytes in, the transcript (or an error dict) out."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        cfg = TranscriberDeploymentSettings.model_validate(settings or {})
        self.config = cfg.transcriber
        self.limits = cfg.limits.decode_limits()
        self._prepare_pool = ThreadPoolExecutor(cfg.transcriber.prepare_threads, thread_name_prefix="transcribe-prep")
        self._model_pool = ThreadPoolExecutor(cfg.transcriber.workers, thread_name_prefix="transcribe-model")
        self.metrics = Metrics()
        self._pipeline: TranscriberPipeline | None = None
        self._revision: str | None = None
        self._load_lock = asyncio.Lock()

    def _build(self) -> TranscriberPipeline:
        """Load the model and run it once (in a thread)."""
        pipeline = TranscriberPipeline(self.config.settings())
        pipeline.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32))
        return pipeline

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Load the model, or reload it when ``revision`` changed (``{"revision": ...}``)."""
        revision = (user_config or {}).get("revision")
        async with self._load_lock:
            if self._pipeline is not None and revision == self._revision:
                return
            start = time.perf_counter()
            pipeline = await asyncio.to_thread(self._build)
            self._pipeline, self._revision = pipeline, revision
            logger.info(
                "transcriber loaded %s on %s in %.1f s", pipeline.version, pipeline.device, time.perf_counter() - start
            )

    async def _current(self) -> TranscriberPipeline:
        """The model for a new request (loaded here if ``reconfigure`` never ran)."""
        if self._pipeline is None:
            await self.reconfigure(None)
        assert self._pipeline is not None
        return self._pipeline

    async def __call__(self, payload: Any) -> dict[str, Any]:
        """Transcribe one upload; returns the :class:`TranscriptAnswer` dict or ``{"error": {...}}``."""
        start = time.perf_counter()
        if not isinstance(payload, bytes):
            return encoder_error("bad_payload", f"the transcriber expects bytes, got {type(payload).__name__}", 422)
        loop = asyncio.get_running_loop()
        pipeline = await self._current()
        try:
            wave = await loop.run_in_executor(self._prepare_pool, decode_audio, payload, SAMPLE_RATE, self.limits)
        except MediaError as exc:
            return error_from_exception(exc)
        except Exception as exc:  # a replica answers, it does not crash
            logger.exception("transcriber decode failed")
            return error_from_exception(exc)
        try:
            result = await loop.run_in_executor(self._model_pool, pipeline.transcribe, wave)
        except Exception as exc:
            logger.exception("transcription failed")
            return error_from_exception(exc)
        latency_ms = _ms_since(start)
        self.metrics.observe("emotion_transcribe_latency_ms", latency_ms)
        self.metrics.observe("emotion_transcribe_rtf", result.real_time_factor)
        return TranscriptAnswer(
            text=result.text,
            language=result.language,
            language_probability=result.language_probability,
            segments=[{"start": s.start, "end": s.end, "text": s.text} for s in result.segments],
            duration_s=result.duration_s,
            latency_ms=round(latency_ms, 2),
            model_ms=round(result.model_ms, 2),
            real_time_factor=round(result.real_time_factor, 4),
            model_version=pipeline.version,
        ).model_dump()

    async def check_health(self) -> None:
        """Serve's replica health check: it fails while no model is loaded, so Serve replaces the replica."""
        if self._pipeline is None:
            raise RuntimeError("the transcriber model is not loaded")

    async def info(self) -> dict[str, Any]:
        """What this replica serves (used by ``/api/health``)."""
        pipeline = self._pipeline
        return {
            "loaded": pipeline is not None,
            "version": pipeline.version if pipeline else None,
            "device": pipeline.device if pipeline else None,
            "compute_type": pipeline.compute_type if pipeline else None,
        }
