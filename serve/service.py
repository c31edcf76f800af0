"""The ingress's work, free of HTTP: fan a request out to the encoders, gather, fuse, explain.

Each modality is one call on its encoder's ``DeploymentHandle`` with its own timeout; all calls run
concurrently (``asyncio.gather``). A modality that errors or times out is dropped and reported; the
request fails only when none succeeded. With one modality the answer is that encoder's own calibrated
prediction (contribution 1.0); with two or more the attention fusion module combines the embeddings.

Replica failures (inference is idempotent, so a call may be repeated):

* a call that fails because its replica died or became unreachable (:data:`REPLICA_GONE`) is sent again,
  up to :attr:`FusionService.retries` times within the modality's timeout; Serve's router has dropped the
  dead replica by then, so the retry goes to another one;
* an encoder with no live replica is answered ``unavailable`` at once instead of after its timeout: before a
  call and while waiting for it, the ingress asks :class:`serve.replicas.ReplicaWatch` how many replicas its
  handle can route to; where that cannot be read, a replica-death error marks the encoder down for
  ``probe_interval_s`` (:class:`serve.replicas.EncoderHealth`), during which calls are refused except one probe
  per interval.

Calls go through one :class:`serve.coalesce.CallCoalescer` per encoder, made with the service: under load,
concurrent requests leave together as one list call. HTTP routes and live streams share the service and so its
coalescers.

Transcripts (``transcribe`` ``return`` or ``fuse``): the audio payload also goes to the ``Transcriber``, in the same
fan-out as the encoders, with its own timeout (``transcriber.timeout_s``) and the same replica-death handling. A
transcript that fails or times out is listed in ``dropped`` as ``transcript`` (not when the audio itself was
unusable: ``dropped["audio"]`` says why); it never fails the answer. With ``fuse`` and no text in the request, the
transcript's words go to the ``TextEncoder`` as soon as they arrive and are fused as the text modality
(``modalities.text.source`` is ``transcript``). A service made without a transcriber answers without transcripts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from models.inference import FusionPipeline
from models.labels import EMOTIONS, MODALITIES
from serve.coalesce import CallCoalescer, Handle
from serve.config import AppConfig, IngressUserConfig, TranscribeMode
from serve.errors import EncoderError, encoder_error, is_client_error
from serve.metrics import Metrics
from serve.replicas import UNAVAILABLE_AFTER_S, EncoderHealth, ReplicaState, ReplicaWatch, RouterReader
from serve.schemas import (
    DIGITS,
    EncoderAnswer,
    HealthResponse,
    ModelStatus,
    PredictionResponse,
    Transcript,
    TranscriptAnswer,
)

logger = logging.getLogger("ray.serve")


class PredictionFailed(Exception):
    """No modality could be used; carries the HTTP status and a readable detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def _resolve(response: Any) -> Any:
    return await response


# Errors that mean "the replica is gone or unreachable", not "the input was bad": worth another replica.
REPLICA_GONE: tuple[type[BaseException], ...] = (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    ReplicaUnavailableError,
    DeploymentUnavailableError,
)
RETRIES = 2  # extra attempts of an encoder call whose replica died
TRANSCRIPT = "transcript"  # the transcriber's key in dropped, health and the replica bookkeeping
WATCH_INTERVAL_S = 0.2  # how often a waiting call checks that its encoder still has a live replica


def replica_gone(exc: BaseException) -> bool:
    """True when ``exc`` (or the error it wraps) says the replica died or cannot be reached."""
    return isinstance(exc, REPLICA_GONE) or isinstance(getattr(exc, "cause", None), REPLICA_GONE)


class EncoderUnavailable(Exception):
    """The encoder has no live replica (raised while waiting for a call)."""


def failure_status(failed: Mapping[str, EncoderError], primary: tuple[str, ...]) -> int:
    """HTTP status when every modality failed: the input's fault (4xx) wins over server trouble."""
    ordered = [failed[m] for m in primary if m in failed] + [e for m, e in failed.items() if m not in primary]
    for err in ordered:
        if is_client_error(err):
            return err["status"]
    if all(err["code"] == "timeout" for err in ordered):
        return 504
    return 503


AnswerTimer = Callable[[str, float], None]  # (modality, ms since the prediction started), per encoder call


class FusionService:
    """Fan-out, fusion and bookkeeping for one ingress replica.

    Built once per replica with its encoders' handles: each handle gets its :class:`CallCoalescer` here, and every
    caller (the HTTP routes, each live stream) shares them.
    """

    def __init__(
        self,
        handles: Mapping[str, Handle],
        config: AppConfig,
        metrics: Metrics | None = None,
        retries: int = RETRIES,
        health: EncoderHealth | None = None,
        watch_interval_s: float = WATCH_INTERVAL_S,
        unavailable_after_s: float = UNAVAILABLE_AFTER_S,
        transcriber: Handle | None = None,
    ) -> None:
        self.handles = dict(handles)
        self.transcriber = transcriber
        self.config = config
        self.metrics = metrics or Metrics()
        self.retries = retries
        self.encoder_health = health or EncoderHealth()
        self.watch_interval_s = watch_interval_s
        self.router = RouterReader(self.metrics)
        self.replicas = ReplicaWatch(self.router, unavailable_after_s)
        self.fusion: FusionPipeline | None = None
        self._fusion_key: tuple[Any, ...] | None = None
        self._coalescers: dict[str, CallCoalescer] = {}
        for modality, handle in self.handles.items():
            self._coalescer(modality, handle)

    @property
    def unavailable_after_s(self) -> float:
        """How long an encoder must show no live replica before its modality is answered ``unavailable``."""
        return self.replicas.unavailable_after_s

    @unavailable_after_s.setter
    def unavailable_after_s(self, value: float) -> None:
        self.replicas.unavailable_after_s = value

    async def load_fusion(self, user_config: dict[str, Any] | None = None) -> None:
        """Load (or hot-swap) the fusion module: built fully, then one reference assignment."""
        cfg = IngressUserConfig.model_validate(
            {"fusion_weights": self.config.models.fusion_weights, **(user_config or {})}
        )
        key = (cfg.fusion_weights, cfg.revision)
        if self.fusion is not None and key == self._fusion_key:
            return
        fusion = await asyncio.to_thread(FusionPipeline, cfg.fusion_weights)
        self.fusion, self._fusion_key = fusion, key

    # ---- prediction -----------------------------------------------------------------------------

    async def predict(
        self,
        payloads: Mapping[str, str | bytes],
        primary: tuple[str, ...] | None = None,
        prefailed: Mapping[str, EncoderError] | None = None,
        on_answer: AnswerTimer | None = None,
        transcribe: TranscribeMode = "off",
        known: Mapping[str, EncoderAnswer] | None = None,
    ) -> PredictionResponse:
        """Run ``{modality: payload}`` through the encoders and combine what succeeded.

        ``primary`` names the modalities the client asked for (a video's audio track is secondary);
        ``prefailed`` are modalities already known to be unusable (e.g. an empty upload); ``known`` are answers
        already in hand (a timeline's text, encoded once for all its segments), combined as if just answered;
        ``on_answer(modality, ms)`` is called when each encoder call ends (answered, failed or timed out; after a
        retry, again), with the milliseconds since this prediction started. ``transcribe`` (``off``, ``return``,
        ``fuse``) says what to do with the words of the audio payload (see the module docstring).
        """
        start = time.perf_counter()
        known = known or {}
        primary = primary or (*payloads, *known)
        audio = payloads.get("audio")
        words = None  # the transcript, on its way
        if transcribe != "off" and isinstance(audio, bytes) and self.transcriber is not None:
            words = asyncio.ensure_future(self._transcribe(self.transcriber, audio, start, on_answer))
        fuse_words = words is not None and transcribe == "fuse" and "text" not in payloads and "text" not in known
        names = [m for m in MODALITIES if m in payloads or (m == "text" and fuse_words)]
        calls = [
            self._call(m, payloads[m], start, on_answer)
            if m in payloads
            else self._call_on_words(words, start, on_answer)
            for m in names
        ]
        try:
            answers = await asyncio.gather(*calls)
        except BaseException:
            _cancel(words)
            raise
        ok: dict[str, EncoderAnswer] = dict(known)
        failed: dict[str, EncoderError] = dict(prefailed or {})
        for m, answer in zip(names, answers, strict=True):
            if isinstance(answer, EncoderAnswer):
                ok[m] = answer
            elif answer is not None:  # None: no words to fuse as text
                failed[m] = answer["error"]
        if not ok:
            _cancel(words)
        transcript: Transcript | None = None
        if words is not None and ok:
            heard = await words
            if isinstance(heard, TranscriptAnswer):
                fused = fuse_words and "text" in ok
                transcript = Transcript.model_validate({**heard.model_dump(), "fused": fused})
            elif not (is_client_error(heard) and "audio" in failed):  # else dropped["audio"] says why already
                failed[TRANSCRIPT] = heard
        for m, err in failed.items():
            self.metrics.inc("emotion_dropped_modalities_total", modality=m, reason=err["code"])
        if not ok:
            order = [m for m in primary if m in failed] + [m for m in failed if m not in primary]
            reasons = "; ".join(f"{m}: {failed[m]['message']}" for m in order)
            raise PredictionFailed(failure_status(failed, primary), f"no modality could be used ({reasons})")
        response = self._combine(ok, failed, start)
        if transcript is not None:
            modalities = dict(response.modalities)
            if transcript.fused:
                modalities["text"] = modalities["text"].model_copy(update={"source": "transcript"})
            response = response.model_copy(update={"transcript": transcript, "modalities": modalities})
        for m, r in ok.items():
            self.metrics.inc("emotion_predictions_total", emotion=r.emotion, modality=m)
        self.metrics.inc("emotion_predictions_total", emotion=response.emotion, modality="fused")
        return response

    async def encode(self, modality: str, payload: str | bytes | dict[str, Any]) -> EncoderAnswer | EncoderError:
        """One encoder's answer for ``payload`` (the calls, retries and timeout of :meth:`predict`); never raises."""
        answer = await self._call(modality, payload, time.perf_counter())  # type: ignore[arg-type]
        return answer if isinstance(answer, EncoderAnswer) else answer["error"]

    async def _call(
        self, modality: str, payload: str | bytes, start: float, on_answer: AnswerTimer | None = None
    ) -> EncoderAnswer | dict[str, Any]:
        """One encoder call with its timeout, retried on another replica if its replica dies; never raises.

        Returns the validated :class:`EncoderAnswer`, or an ``{"error": ...}`` dict.
        """
        timeout = self.config.encoders[modality].timeout_s
        deadline = time.monotonic() + timeout
        handle = self.handles[modality]
        gone: BaseException | None = None
        for attempt in range(1 + self.retries):
            if not await self._may_call(modality, handle, after_death=gone is not None):
                return self._unavailable(modality, gone)
            if attempt:
                logger.warning("%s encoder: replica gone (%r), retry %d on another replica", modality, gone, attempt)
            response = None
            try:
                response = self._send(modality, handle, payload)
                answer = await self._wait(modality, handle, response, deadline - time.monotonic())
                self.router.confirm(modality, handle)
            except TimeoutError:
                _cancel(response)
                return encoder_error("timeout", f"the {modality} encoder did not answer within {timeout:g} s", 504)
            except EncoderUnavailable:
                _cancel(response)
                return self._unavailable(modality, gone)
            except Exception as exc:  # replica died, back-pressure, ...
                if replica_gone(exc) and time.monotonic() < deadline:
                    gone = exc
                    continue
                logger.warning("%s encoder call failed: %r", modality, exc, exc_info=True)
                if replica_gone(exc):
                    self.encoder_health.mark_down(modality)
                return encoder_error("unavailable", f"the {modality} encoder failed: {type(exc).__name__}", 503)
            finally:
                if response is not None and on_answer is not None:
                    on_answer(modality, (time.perf_counter() - start) * 1000.0)
            self.encoder_health.mark_up(modality)
            if isinstance(answer, dict) and "error" in answer:
                return answer
            try:
                return EncoderAnswer.model_validate(answer)
            except ValidationError:
                logger.warning("%s encoder gave an unexpected answer", modality, exc_info=True)
                return encoder_error("internal", f"the {modality} encoder gave an unexpected answer", 500)
        self.encoder_health.mark_down(modality)
        return self._unavailable(modality, gone)

    async def _call_on_words(
        self, words: asyncio.Future[TranscriptAnswer | EncoderError], start: float, on_answer: AnswerTimer | None
    ) -> EncoderAnswer | dict[str, Any] | None:
        """The ``TextEncoder``'s answer for the transcript's words once they arrive; None when there are none."""
        heard = await asyncio.shield(words)  # the transcript outlives this call: the answer returns it
        if not isinstance(heard, TranscriptAnswer) or not heard.text.strip():
            return None
        return await self._call("text", heard.text, start, on_answer)

    async def _transcribe(
        self, handle: Handle, payload: bytes, start: float, on_answer: AnswerTimer | None = None
    ) -> TranscriptAnswer | EncoderError:
        """One ``Transcriber`` call with its timeout, retried on another replica if its replica dies; never raises.

        Returns the validated :class:`TranscriptAnswer`, or the :class:`EncoderError` to list in ``dropped``.
        """
        timeout = self.config.transcriber.timeout_s
        deadline = time.monotonic() + timeout
        gone: BaseException | None = None
        for _ in range(1 + self.retries):
            if not await self._may_call(TRANSCRIPT, handle, after_death=gone is not None):
                return self._unavailable(TRANSCRIPT, gone)["error"]
            response = None
            try:
                response = handle.remote(payload)
                answer = await self._wait(TRANSCRIPT, handle, response, deadline - time.monotonic())
            except TimeoutError:
                _cancel(response)
                return EncoderError(code="timeout", message=f"no transcript within {timeout:g} s", status=504)
            except EncoderUnavailable:
                _cancel(response)
                return self._unavailable(TRANSCRIPT, gone)["error"]
            except Exception as exc:  # replica died, back-pressure, ...
                if replica_gone(exc) and time.monotonic() < deadline:
                    gone = exc
                    continue
                logger.warning("transcriber call failed: %r", exc, exc_info=True)
                if replica_gone(exc):
                    self.encoder_health.mark_down(TRANSCRIPT)
                return EncoderError(
                    code="unavailable", message=f"the transcriber failed: {type(exc).__name__}", status=503
                )
            finally:
                if response is not None and on_answer is not None:
                    on_answer(TRANSCRIPT, (time.perf_counter() - start) * 1000.0)
            self.encoder_health.mark_up(TRANSCRIPT)
            if isinstance(answer, dict) and "error" in answer:
                return answer["error"]
            try:
                return TranscriptAnswer.model_validate(answer)
            except ValidationError:
                logger.warning("the transcriber gave an unexpected answer", exc_info=True)
                return EncoderError(code="internal", message="the transcriber gave an unexpected answer", status=500)
        self.encoder_health.mark_down(TRANSCRIPT)
        return self._unavailable(TRANSCRIPT, gone)["error"]

    def _coalescer(self, modality: str, handle: Handle) -> CallCoalescer | None:
        """``handle``'s :class:`CallCoalescer` (``None`` when coalescing is off for the modality). Made with the
        service; made again only when the service's own handle for the modality was replaced (tests do)."""
        enc = self.config.encoders[modality]
        if not enc.calls_per_replica:
            return None
        coalescer = self._coalescers.get(modality)
        if coalescer is None or coalescer.handle is not handle:
            coalescer = self._coalescers[modality] = CallCoalescer(
                handle,
                enc.calls_per_replica,
                enc.max_batch_size,
                enc.max_ongoing_requests,
                replicas=lambda: self.router.replicas(handle),
            )
        return coalescer

    def _send(self, modality: str, handle: Handle, payload: str | bytes) -> Any:
        """Start one encoder call: through the modality's :class:`CallCoalescer`, or plainly when it is off."""
        coalescer = self._coalescer(modality, handle)
        return handle.remote(payload) if coalescer is None else coalescer.submit(payload)

    def _replicas(self, modality: str, handle: Handle) -> ReplicaState:
        """The encoder's replicas (:meth:`serve.replicas.ReplicaWatch.state`)."""
        return self.replicas.state(modality, handle)

    @property
    def _zero_poll_s(self) -> float:
        """How often a replica count of 0 is read again while its grace (``unavailable_after_s``) runs."""
        return min(self.watch_interval_s, self.unavailable_after_s) / 4

    async def _may_call(self, modality: str, handle: Handle, after_death: bool = False) -> bool:
        """False when the encoder is known to have no live replica (counted for ``unavailable_after_s``, or
        marked down and not probing). A count of 0 younger than that is waited out, a little at a time, unless
        it follows a replica death this call saw (``after_death``): the router dropped that replica, the 0 is
        real."""
        while (state := self._replicas(modality, handle)) == "none_yet":
            if after_death:
                return False
            await asyncio.sleep(self._zero_poll_s)
        if state == "unknown":
            return self.encoder_health.allow(modality)
        return state == "live"

    async def _wait(self, modality: str, handle: Handle, response: Any, budget: float) -> Any:
        """Await ``response`` for at most ``budget`` s; :class:`EncoderUnavailable` once no replica is live."""
        if budget <= 0:
            raise TimeoutError
        task = asyncio.ensure_future(_resolve(response))
        deadline = time.monotonic() + budget
        interval = self.watch_interval_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                done, _ = await asyncio.wait({task}, timeout=min(interval, remaining))
                if done:
                    return task.result()
                state = self._replicas(modality, handle)
                if state == "none":
                    raise EncoderUnavailable(modality)
                # a count of 0 is watched closely, so the modality is dropped as soon as its grace has passed
                interval = self._zero_poll_s if state == "none_yet" else self.watch_interval_s
        finally:
            if not task.done():
                task.cancel()

    def _unavailable(self, modality: str, cause: BaseException | None) -> dict[str, Any]:
        why = f" ({type(cause).__name__})" if cause is not None else ""
        who = "the transcriber" if modality == TRANSCRIPT else f"the {modality} encoder"
        return encoder_error("unavailable", f"{who} has no live replica{why}", 503)

    def _combine(
        self, ok: dict[str, EncoderAnswer], failed: Mapping[str, EncoderError], start: float
    ) -> PredictionResponse:
        versions = [r.model_version for r in ok.values()]
        if len(ok) == 1:  # one modality: its encoder's own calibrated answer, as is
            ((m, only),) = ok.items()
            emotion, confidence = only.emotion, only.confidence
            probabilities = {e: only.probabilities[e] for e in EMOTIONS}
            contributions = {m: 1.0}
        else:
            fusion = self.fusion
            if fusion is None:
                raise RuntimeError("fusion module not loaded")
            fused = fusion.fuse(
                {m: np.asarray(r.embedding, dtype=np.float32) for m, r in ok.items()},
                {m: np.array([r.probabilities[e] for e in EMOTIONS], dtype=np.float32) for m, r in ok.items()},
            )
            probs = fused.probabilities.astype(np.float64)
            probs = probs / probs.sum()
            best = int(np.argmax(probs))
            emotion, confidence = EMOTIONS[best], round(float(probs[best]), DIGITS)
            probabilities = {e: round(float(p), DIGITS) for e, p in zip(EMOTIONS, probs, strict=True)}
            total = sum(fused.contributions.values()) or 1.0
            contributions = {m: round(fused.contributions[m] / total, DIGITS) for m in ok}
            versions.append(fusion.version)
        return PredictionResponse(
            emotion=emotion,
            confidence=confidence,
            probabilities=probabilities,
            contributions=contributions,
            modalities={m: r.public() for m, r in ok.items()},
            dropped={m: f"{e['code']}: {e['message']}" for m, e in failed.items()},
            model_version="+".join(versions),
            latency_ms=round((time.perf_counter() - start) * 1000.0, 2),
        )

    # ---- health ---------------------------------------------------------------------------------

    async def health(self) -> HealthResponse:
        """Ask every encoder what it serves (bounded wait); the fusion module is local."""
        timeout = self.config.health_timeout_s

        async def ask(m: str) -> ModelStatus:
            handle = self.transcriber if m == "transcriber" else self.handles[m]
            try:
                info = await asyncio.wait_for(_resolve(handle.options(method_name="info").remote()), timeout)
                return ModelStatus(
                    loaded=bool(info.get("loaded")), version=info.get("version"), device=info.get("device")
                )
            except Exception as exc:  # noqa: BLE001 - health reports failures, it does not raise
                return ModelStatus(loaded=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")

        asked = [*MODALITIES, *(["transcriber"] if self.transcriber is not None else [])]
        statuses = await asyncio.gather(*(ask(m) for m in asked))
        models = dict(zip(asked, statuses, strict=True))
        fusion = self.fusion
        models["fusion"] = ModelStatus(
            loaded=fusion is not None,
            version=fusion.version if fusion else None,
            device=str(fusion.device) if fusion else None,
        )
        status = "ok" if all(s.loaded for s in models.values()) else "degraded"
        return HealthResponse(status=status, models=models, ray_internals=self.router.report())

    async def warm_up(self) -> HealthResponse:
        """Ask every encoder once before this replica takes traffic (bounded like :meth:`health`).

        A handle opens its route to a deployment at its first call: it subscribes to the replica list and
        asks each replica its queue length. Without this a new ingress replica (a replacement, a scale-up)
        pays for that on its first requests, seconds on a busy machine; with it they find the routes open.
        An encoder that does not answer in time is logged, not waited for: the replica starts anyway.

        Then the start-up self-check of the router reads (:meth:`serve.replicas.RouterReader.check`): the
        handles have just been used, so each has a router to read.
        """
        health = await self.health()
        models = health.models or {}
        missing = {m: s.error for m, s in models.items() if not s.loaded}
        if missing:
            logger.warning("ingress started without an answer from: %s", missing)
        answered = [m for m in self.handles if m in models and models[m].loaded]
        internals = self.router.check(self.handles, answered)
        return health.model_copy(update={"ray_internals": internals})


def _cancel(response: Any) -> None:
    cancel = getattr(response, "cancel", None)
    if cancel is not None:
        cancel()
