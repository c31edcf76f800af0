"""``POST /predict/timeline``: a long recording cut into segments, each predicted like ``POST /predict``.

The ingress decodes the upload once (:func:`models.recording.decode_recording`, in a thread: one ffmpeg process
for the audio, one for the frames) and cuts it into :class:`models.recording.Span` segments: ``segment_s`` every
``hop_s`` (``fixed``), or one per stretch of speech, cut halfway through the pauses (``speech``). Each segment goes
through the replica's :class:`serve.service.FusionService`, the same as ``POST /predict``: its audio as a WAV, its
frames as concatenated JPEGs, the request's text (encoded once) as a known answer. Up to
``timeline.segments_in_flight`` segments are under way at once; their encoder calls go through the service's
call coalescers, which spread them over the encoder replicas and send the backlog as batches. A dead encoder drops
its modality from the segments it affects, as it does for any request.

The answer is NDJSON (:class:`TimelineRunner.lines`): a ``start`` line, one ``segment`` line per segment in the
order of the recording (each as soon as it and those before it are answered), then a ``summary`` line. When the
client goes away the stream is cancelled: segments not started are never sent, and those under way are
cancelled, down to their encoder calls (:mod:`serve.coalesce`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from models.labels import EMOTIONS, MODALITIES
from models.recording import Recording, RecordingLimits, Span, decode_recording, plan_spans, speech_spans
from serve.config import AppConfig, Segmentation, TranscribeMode
from serve.errors import EncoderError, error_from_exception
from serve.schemas import (
    EncoderAnswer,
    TimelineError,
    TimelineMoment,
    TimelineSegment,
    TimelineStart,
    TimelineSummary,
)
from serve.service import FusionService, PredictionFailed

logger = logging.getLogger("ray.serve")

NDJSON = "application/x-ndjson"
Line = TimelineStart | TimelineSegment | TimelineSummary


@dataclass(frozen=True)
class Plan:
    """How a recording is cut: its segments, and the segment length and hop they were cut with."""

    spans: list[Span]
    segmentation: Segmentation
    segment_s: float
    hop_s: float | None


class TimelineBusy(Exception):
    """This ingress replica runs ``timeline.max_active`` timelines already."""


class NDJSONResponse(StreamingResponse):
    """A streamed NDJSON answer that calls ``on_close`` once it ends, however it ends (sent, cancelled, failed)."""

    media_type = NDJSON

    def __init__(self, lines: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(lines, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def encode_line(line: Line) -> bytes:
    """One NDJSON line."""
    return json.dumps(line.model_dump(mode="json", exclude_none=True), separators=(",", ":")).encode() + b"\n"


def summarize(segments: list[TimelineSegment], duration_s: float, moments: int, latency_ms: float) -> TimelineSummary:
    """Each emotion's share of the answered time and the strongest moments.

    Where segments overlap (``hop_s < segment_s``) each second belongs to the segment that starts last before
    it, so every second is counted once.
    """
    seconds = dict.fromkeys(EMOTIONS, 0.0)
    ordered = sorted(segments, key=lambda s: s.index)
    for seg, after in zip(ordered, [*ordered[1:], None], strict=True):
        own_end = seg.end_s if after is None else min(seg.end_s, after.start_s)
        if seg.emotion is not None:
            seconds[seg.emotion] += max(own_end - seg.start_s, 0.0)
    answered_s = sum(seconds.values())
    shares = {e: round(s / answered_s, 4) if answered_s else 0.0 for e, s in seconds.items()}
    answered = [s for s in ordered if s.emotion is not None and s.confidence is not None]
    strong = [s for s in answered if s.emotion != "neutral"] or answered
    strong.sort(key=lambda s: -(s.confidence or 0.0))
    return TimelineSummary(
        duration_s=duration_s,
        segments=len(ordered),
        answered=len(answered),
        failed=len(ordered) - len(answered),
        dominant=max(seconds, key=lambda e: seconds[e]) if answered_s else None,
        shares=shares,
        seconds={e: round(s, 3) for e, s in seconds.items()},
        strongest=[
            TimelineMoment(
                index=s.index, start_s=s.start_s, end_s=s.end_s, emotion=s.emotion, confidence=s.confidence or 0.0
            )
            for s in strong[:moments]
        ],
        latency_ms=round(latency_ms, 1),
    )


class TimelineRunner:
    """The timelines of one ingress replica: decode, segment fan-out, summary; at most ``max_active`` at once."""

    def __init__(self, service: FusionService, config: AppConfig) -> None:
        self.service = service
        self.config = config
        self.active = 0

    def reserve(self) -> Callable[[], None]:
        """Count one more timeline (or raise :class:`TimelineBusy`); the returned function ends it, once."""
        if self.active >= self.config.timeline.max_active:
            raise TimelineBusy(f"{self.active} timelines are in progress on this replica")
        self.active += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1

        return release

    def limits(self) -> RecordingLimits:
        """The decode bounds of a timeline."""
        cfg = self.config
        return RecordingLimits(
            max_seconds=cfg.limits.max_timeline_seconds,
            timeout_s=cfg.timeline.decode_timeout_s,
            fps=cfg.timeline.fps,
            min_seconds=min(cfg.timeline.min_segment_s, 0.5),
        )

    async def decode(self, data: bytes, video: bool, audio_data: bytes | None = None) -> Recording:
        """Decode the upload in a thread (``models.media.MediaError`` subclasses for bad or too long input)."""
        return await asyncio.to_thread(decode_recording, data, video, self.limits(), audio_data)

    async def plan(
        self,
        recording: Recording,
        segment_s: float | None = None,
        hop_s: float | None = None,
        segmentation: Segmentation | None = None,
    ) -> Plan:
        """The segments of ``recording`` (the request's choices, else the configured ones); speech segmentation
        runs its voice-activity detector in a thread, and needs audio (else the cut is fixed)."""
        cfg = self.config.timeline
        how = segmentation or ("fixed" if segment_s or hop_s else cfg.segmentation)
        if how == "speech" and recording.pcm is not None:
            spans = await asyncio.to_thread(
                speech_spans,
                recording.pcm,
                recording.duration_s,
                cfg.speech_max_s,
                cfg.min_segment_s,
                speech_pad_s=cfg.speech_pad_s,
            )
            return Plan(spans, "speech", cfg.speech_max_s, None)
        segment = segment_s or cfg.segment_s
        hop = min(hop_s or (cfg.hop_s if segment_s is None and cfg.hop_s is not None else segment), segment)
        return Plan(plan_spans(recording.duration_s, segment, hop, cfg.min_segment_s), "fixed", segment, hop)

    async def lines(
        self,
        recording: Recording,
        plan: Plan,
        text: str | dict[str, Any] | None = None,
        transcribe: TranscribeMode = "off",
    ) -> AsyncIterator[Line]:
        """The timeline's lines: ``start``, each segment in order, ``summary``. Closing it cancels what is under way.

        ``text`` is the text encoder's payload (a string, or ``{"text", "context"}``), encoded once for every segment.
        """
        spans = plan.spans
        sent = [m for m in MODALITIES if (m == "text" and text) or (m == "audio" and recording.pcm is not None)]
        sent += ["video"] if recording.video else []
        yield TimelineStart(
            duration_s=recording.duration_s,
            segmentation=plan.segmentation,
            segment_s=plan.segment_s,
            hop_s=plan.hop_s,
            segments=len(spans),
            modalities=sent,
            transcribe=transcribe,
        )
        start = time.perf_counter()
        known: dict[str, EncoderAnswer] = {}
        prefailed: dict[str, EncoderError] = {}
        if recording.audio_error is not None:
            prefailed["audio"] = error_from_exception(recording.audio_error)["error"]
        if text:
            answer = await self.service.encode("text", text)
            if isinstance(answer, EncoderAnswer):
                known["text"] = answer
            else:
                prefailed["text"] = answer
        primary = tuple(m for m in MODALITIES if m in sent and not (m == "audio" and recording.video))
        window = self.config.timeline.segments_in_flight
        tasks: dict[int, asyncio.Task[TimelineSegment]] = {}
        done: list[TimelineSegment] = []
        following = 0
        try:
            for span in spans:
                while not self._room(tasks, span.index, window):
                    await asyncio.wait(self._running(tasks), return_when=asyncio.FIRST_COMPLETED)
                tasks[span.index] = asyncio.ensure_future(
                    self._segment(recording, span, known, prefailed, primary, transcribe)
                )
                while following in tasks and tasks[following].done():
                    done.append(tasks.pop(following).result())
                    following += 1
                    yield done[-1]
            while following < len(spans):
                segment = await tasks[following]
                del tasks[following]
                following += 1
                done.append(segment)
                yield segment
        finally:
            for task in tasks.values():  # the client went away (or the stream failed): stop every segment
                task.cancel()
        latency_ms = (time.perf_counter() - start) * 1000.0
        yield summarize(done, recording.duration_s, self.config.timeline.moments, latency_ms)

    @staticmethod
    def _running(tasks: Mapping[int, asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
        return {t for t in tasks.values() if not t.done()}

    def _room(self, tasks: Mapping[int, asyncio.Task[Any]], index: int, window: int) -> bool:
        """A segment may start: fewer than ``window`` are under way (answered ones waiting for an earlier one
        to be sent do not count, up to ``4 * window`` held)."""
        return len(self._running(tasks)) < window and len(tasks) < 4 * window

    async def _segment(
        self,
        recording: Recording,
        span: Span,
        known: Mapping[str, EncoderAnswer],
        prefailed: Mapping[str, EncoderError],
        primary: tuple[str, ...],
        transcribe: TranscribeMode,
    ) -> TimelineSegment:
        """One segment through :meth:`FusionService.predict`; an unusable segment answers its ``error``."""
        start = time.perf_counter()
        payloads: dict[str, str | bytes] = {}
        failed = dict(prefailed)
        wav = recording.audio_wav(span)
        if wav is not None:
            payloads["audio"] = wav
        elif recording.pcm is not None:
            failed["audio"] = EncoderError(code="no_audio", message="the recording has no audio here", status=400)
        if recording.video:
            frames = recording.frames_jpeg(span)
            if frames is not None:
                payloads["video"] = frames
            else:
                failed["video"] = EncoderError(code="no_frames", message="the video has no frame here", status=400)
        base = {"index": span.index, "start_s": span.start_s, "end_s": span.end_s}
        try:
            if not payloads and not known:
                reasons = "; ".join(f"{m}: {e['message']}" for m, e in failed.items())
                raise PredictionFailed(400, f"no modality could be used ({reasons or 'nothing in this span'})")
            answer = await self.service.predict(
                payloads, primary=primary, prefailed=failed, transcribe=transcribe, known=known
            )
        except PredictionFailed as exc:
            error = TimelineError(status=exc.status, detail=exc.detail)
        except Exception as exc:  # one segment's bug must not end the whole timeline
            logger.exception("timeline segment %d failed", span.index)
            error = TimelineError(status=500, detail=f"internal error: {type(exc).__name__}")
        else:
            return TimelineSegment(
                **base,
                emotion=answer.emotion,
                confidence=answer.confidence,
                probabilities=answer.probabilities,
                contributions=answer.contributions,
                dropped=answer.dropped,
                transcript=answer.transcript,
                latency_ms=_ms(start),
            )
        return TimelineSegment(
            **base,
            dropped={m: f"{e['code']}: {e['message']}" for m, e in failed.items()},
            latency_ms=_ms(start),
            error=error,
        )


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)
