"""Live emotion over a WebSocket (``/ws/stream``): a sliding window per connection, predicted about once a second.

Each connection keeps the last ``stream.audio_window_s`` seconds (3 s) of 16 kHz mono audio, the last
``stream.max_frames`` JPEG frames (8, none older than ``stream.frame_max_age_s``) and an optional text. Every
``stream.update_interval_s`` (1 s), if something new arrived, the window goes through the same
:class:`serve.service.FusionService` as ``POST /predict`` (the same encoder handles, batching, timeouts, metrics,
fusion): the audio as a 16-bit WAV, the frames as one concatenated-JPEG payload (ffmpeg reads it as a
video of those frames), the text as is. An update still running when the next tick comes skips that tick: a slow
encoder lowers the update rate, it never builds a queue.

Protocol (version 1)
--------------------
Client to server:

* binary ``0x01`` + PCM: audio, signed 16-bit little-endian, mono, 16 kHz, any whole number of samples;
* binary ``0x02`` + JPEG: one video frame, a complete JPEG file (``FF D8 FF`` ... ``FF D9``);
* text ``{"type": "text", "text": "...", "context": [...]}``: the text used from now on (``""`` clears it), and
  optionally the previous turns of its conversation, oldest first, each a string or ``{"speaker": ..., "text": ...}``
  (as ``POST /api/predict``'s ``context``; a text message without one clears it);
* text ``{"type": "clear"}``: empty the window (audio, frames and text);
* text ``{"type": "transcribe", "mode": "off" | "return" | "fuse"}``: from the next update on, ``return`` adds the
  window's ``transcript`` (its audio's words) to each update, ``fuse`` also fuses them as the text modality when no
  text was set; ``off`` (a new stream's mode) stops it.

Server to client, JSON text messages:

* ``{"type": "ready", "protocol": 1, "sample_rate": 16000, "update_interval_s": ..., ...}`` once accepted;
* ``{"type": "update", "seq", "window", "update_ms", "dropped_frames", ...}`` plus every field of a
  ``POST /predict`` answer (``emotion``, ``confidence``, ``probabilities``, ``contributions``, ``modalities``,
  ``dropped``, ``model_version``, ``latency_ms``, and ``transcript`` when asked for). ``window`` is the span
  predicted, in seconds since the stream opened on the server's clock (arrival times): ``start_s``, ``end_s``,
  ``audio_s``, ``frames``, ``text``. ``update_ms`` is the time from the window snapshot to the update (with a
  transcript, the update waits for it: the update rate then follows the transcriber's speed);
* ``{"type": "error", "seq", "window", "status", "detail", ...}`` when no modality of a window could be used
  (the HTTP status ``POST /predict`` would answer); the stream goes on.

Close codes (the reason says what happened): 1003 unknown message type, 1007 malformed message (not PCM16,
not a JPEG, not JSON), 1008 API key missing or invalid, origin not allowed, or a client that does not read its
updates, 1009 message over ``stream.max_message_bytes``, text over ``limits.max_text_chars`` or context over
``limits.max_context_turns`` / ``max_context_chars``, 1011 internal
error, 1013 too many streams on this replica or rate limited (retry later), 4408 nothing received for
``stream.idle_timeout_s``.

Bounds: at most ``stream.max_connections`` streams per ingress replica; at most ``stream.max_buffer_bytes``
buffered per stream (the oldest frames go first); frames over ``stream.max_fps`` (on average; bursts of
``max(2, max_fps / 4)`` frames pass) are dropped (counted in ``dropped_frames``). Each stream is its own pair of
tasks: a bad frame closes that stream only.

When API keys are required (``access.api_keys``), send the key as ``Authorization: Bearer <key>``,
``X-API-Key: <key>``, or, from a browser (which cannot set WebSocket headers), the query parameter
``?api_key=<key>``. A stream counts as one request for the per-client rate limit. A browser ``Origin`` must be the
page's own or one of ``access.cors_origins``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import wave
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket

from serve.access import AccessControl, Rejection
from serve.config import (
    MAX_CONTEXT_CHARS,
    MAX_CONTEXT_TURNS,
    TRANSCRIBE_MODES,
    AppConfig,
    StreamConfig,
    TranscribeMode,
)
from serve.schemas import CONTEXT_ADAPTER, context_payload, context_problem
from serve.service import FusionService, PredictionFailed

logger = logging.getLogger("ray.serve")

PROTOCOL_VERSION = 1
SAMPLE_RATE = 16_000
AUDIO, FRAME = 0x01, 0x02
JPEG_SOI, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
API_KEY_PARAM = "api_key"

# Close codes (RFC 6455 section 7.4.1, and 4408 in the private range for an idle stream).
UNSUPPORTED, INVALID, POLICY, TOO_BIG, INTERNAL, TRY_LATER, IDLE = 1003, 1007, 1008, 1009, 1011, 1013, 4408


class StreamClosed(Exception):
    """Close the stream with ``code`` and ``reason``; ``label`` is the closes metric's reason."""

    def __init__(self, code: int, reason: str, label: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.label = label


class _ClientGone(Exception):
    """The client disconnected (or its connection broke) while we sent to it."""


@dataclass(frozen=True)
class WindowSpan:
    """What one update predicted: seconds since the stream opened, on the server's clock."""

    start_s: float
    end_s: float
    audio_s: float
    frames: int
    text: bool


@dataclass(frozen=True)
class Snapshot:
    """Encoder payloads of the window at one instant (copies: the window may change meanwhile)."""

    payloads: dict[str, Any]  # bytes for audio and video; text: a string, or {"text", "context"}
    span: WindowSpan
    transcribe: TranscribeMode = "off"


def pcm_to_wav(pcm: bytes, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Mono 16-bit PCM as a WAV file (the audio encoder reads it without starting ffmpeg)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
    return out.getvalue()


class StreamWindow:
    """The sliding window of one stream: bounded by seconds of audio, frame count and age, and bytes."""

    def __init__(
        self,
        config: StreamConfig,
        max_text_chars: int,
        max_context_turns: int = MAX_CONTEXT_TURNS,
        max_context_chars: int = MAX_CONTEXT_CHARS,
    ) -> None:
        self.config = config
        self.max_text_chars = max_text_chars
        self.max_context_turns = max_context_turns
        self.max_context_chars = max_context_chars
        self.max_audio_bytes = int(config.audio_window_s * SAMPLE_RATE) * 2
        self._audio = bytearray()
        self._audio_end: float | None = None
        self._frames: deque[tuple[float, bytes]] = deque()
        # Frame rate: a token bucket at max_fps with room for a short burst (arrival jitter bunches frames).
        self.frame_burst = max(2.0, config.max_fps / 4)
        self._frame_tokens = self.frame_burst
        self._tokens_at: float | None = None
        self.text = ""
        self.context: list[dict[str, str | None]] = []  # the text's previous turns (encoder payload form)
        self.transcribe: TranscribeMode = "off"  # what the client asked for the audio's words
        self.version = 0  # bumped by every change; an update runs only when it moved
        self.dropped_frames = 0

    @property
    def buffered_bytes(self) -> int:
        return len(self._audio) + sum(len(f) for _, f in self._frames) + len(self.text.encode())

    @property
    def frame_count(self) -> int:
        return len(self._frames)

    @property
    def audio_seconds(self) -> float:
        return len(self._audio) / 2 / SAMPLE_RATE

    def add_audio(self, pcm: bytes, now: float) -> None:
        """Append PCM16 samples that arrived at ``now``; keep the last ``audio_window_s``."""
        self._audio += pcm
        if len(self._audio) > self.max_audio_bytes:
            del self._audio[: len(self._audio) - self.max_audio_bytes]
        self._audio_end = now
        self.version += 1
        self._fit_budget()

    def add_frame(self, jpeg: bytes, now: float) -> bool:
        """Keep a frame that arrived at ``now``; False (and counted) when dropped for rate or room."""
        if self._tokens_at is not None:
            self._frame_tokens = min(
                self.frame_burst, self._frame_tokens + (now - self._tokens_at) * self.config.max_fps
            )
        self._tokens_at = now
        if self._frame_tokens < 1.0:
            self.dropped_frames += 1
            return False
        if len(jpeg) + len(self._audio) + len(self.text.encode()) > self.config.max_buffer_bytes:
            self.dropped_frames += 1
            return False
        self._frames.append((now, jpeg))
        self._frame_tokens -= 1.0
        while len(self._frames) > self.config.max_frames:
            self._frames.popleft()
        self.version += 1
        self._fit_budget()
        return True

    def set_text(self, text: str, context: list[dict[str, str | None]] | None = None) -> None:
        self.text = text
        self.context = context or []
        self.version += 1

    def clear(self) -> None:
        self._audio.clear()
        self._audio_end = None
        self._frames.clear()
        self.text = ""
        self.context = []
        self.version += 1

    def _fit_budget(self) -> None:
        """Drop the oldest frames while the window holds more than ``max_buffer_bytes``."""
        while self._frames and self.buffered_bytes > self.config.max_buffer_bytes:
            self._frames.popleft()
            self.dropped_frames += 1

    def _expire(self, now: float) -> None:
        """Forget what is older than the window: frames past their age, audio that stopped long ago."""
        oldest = now - self.config.frame_max_age_s
        while self._frames and self._frames[0][0] < oldest:
            self._frames.popleft()
        if self._audio_end is not None and self._audio_end < now - self.config.audio_window_s:
            self._audio.clear()
            self._audio_end = None

    def snapshot(self, now: float) -> Snapshot | None:
        """The encoder payloads of the window at ``now``; None when nothing is usable yet."""
        self._expire(now)
        payloads: dict[str, Any] = {}
        starts: list[float] = []
        ends: list[float] = []
        audio_s = self.audio_seconds
        if self._audio_end is not None and audio_s >= self.config.min_audio_s:
            payloads["audio"] = pcm_to_wav(bytes(self._audio))
            starts.append(self._audio_end - audio_s)
            ends.append(self._audio_end)
        if self._frames:
            payloads["video"] = b"".join(f for _, f in self._frames)
            starts.append(self._frames[0][0])
            ends.append(self._frames[-1][0])
        if self.text.strip():
            payloads["text"] = {"text": self.text, "context": list(self.context)} if self.context else self.text
        if not payloads:
            return None
        start = min(starts) if starts else now
        end = max(ends) if ends else now
        span = WindowSpan(
            start_s=round(max(start, 0.0), 3),
            end_s=round(end, 3),
            audio_s=round(audio_s if "audio" in payloads else 0.0, 3),
            frames=len(self._frames),
            text="text" in payloads,
        )
        return Snapshot(payloads, span, self.transcribe)

    # ---- the protocol: one client message into the window ----------------------------------------------

    def apply(self, message: Mapping[str, Any], now: float) -> None:
        """Apply one ASGI ``websocket.receive`` message, or raise :class:`StreamClosed` for a bad one."""
        data, text = message.get("bytes"), message.get("text")
        if data is not None:
            self._apply_binary(data, now)
        elif text is not None:
            self._apply_text(text)
        else:
            raise StreamClosed(INVALID, "empty message", "bad_frame")

    def _apply_binary(self, data: bytes, now: float) -> None:
        limit = self.config.max_message_bytes
        if len(data) > limit:
            raise StreamClosed(TOO_BIG, f"message of {len(data)} bytes is over the {limit}-byte limit", "too_big")
        if not data:
            raise StreamClosed(INVALID, "empty binary message", "bad_frame")
        kind, body = data[0], data[1:]
        if kind == AUDIO:
            if len(body) % 2:
                raise StreamClosed(INVALID, "audio must be 16-bit PCM: an even number of bytes", "bad_frame")
            if body:
                self.add_audio(body, now)
        elif kind == FRAME:
            if not (body.startswith(JPEG_SOI) and body.rstrip(b"\x00").endswith(JPEG_EOI)):
                raise StreamClosed(
                    INVALID, "frame is not a JPEG image (no FFD8FF start or FFD9 end marker)", "bad_frame"
                )
            self.add_frame(body, now)
        else:
            raise StreamClosed(
                UNSUPPORTED,
                f"unknown binary message type 0x{kind:02x} (0x01 audio PCM16, 0x02 JPEG frame)",
                "unsupported",
            )

    def _context(self, value: Any) -> list[dict[str, str | None]]:
        """A text message's ``context``: 1009 over the limits, 1007 when it is not a list of turns."""
        if value is None:
            return []
        if isinstance(value, list):  # the limits first: an over-long list is too big, not malformed
            texts = [t if isinstance(t, str) else t.get("text") if isinstance(t, dict) else None for t in value]
            problem = context_problem(
                [t for t in texts if isinstance(t, str)], self.max_context_turns, self.max_context_chars
            )
            if len(value) > self.max_context_turns or problem:
                detail = problem or f"context has {len(value)} turns; at most {self.max_context_turns} are allowed"
                raise StreamClosed(TOO_BIG, detail, "too_big")
        try:
            return context_payload(CONTEXT_ADAPTER.validate_python(value))
        except ValidationError:
            raise StreamClosed(
                INVALID, '\'context\' must be a list of turns, each a string or {"speaker", "text"}', "bad_frame"
            ) from None

    def _apply_text(self, text: str) -> None:
        if len(text) > self.config.max_message_bytes:
            raise StreamClosed(TOO_BIG, f"message over the {self.config.max_message_bytes}-byte limit", "too_big")
        try:
            body = json.loads(text)
        except ValueError:
            raise StreamClosed(INVALID, "text messages must be JSON objects", "bad_frame") from None
        if not isinstance(body, dict):
            raise StreamClosed(INVALID, "text messages must be JSON objects", "bad_frame")
        kind = body.get("type")
        if kind == "text":
            value = body.get("text", "")
            if not isinstance(value, str):
                raise StreamClosed(INVALID, "'text' must be a string", "bad_frame")
            if len(value) > self.max_text_chars:
                raise StreamClosed(TOO_BIG, f"text is longer than {self.max_text_chars} characters", "too_big")
            self.set_text(value, self._context(body.get("context")))
        elif kind == "clear":
            self.clear()
        elif kind == "transcribe":
            mode = body.get("mode")
            if mode not in TRANSCRIBE_MODES:
                raise StreamClosed(INVALID, f"'mode' must be one of {', '.join(TRANSCRIBE_MODES)}", "bad_frame")
            self.transcribe = mode
        else:
            raise StreamClosed(
                UNSUPPORTED,
                f"unknown message type {str(kind)[:40]!r} (expected 'text', 'clear' or 'transcribe')",
                "unsupported",
            )


# ---- one connection --------------------------------------------------------------------------------------


class StreamSession:
    """One accepted stream: a receive loop filling the window and an update loop predicting it."""

    def __init__(
        self,
        websocket: WebSocket,
        service: FusionService,
        config: AppConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ws = websocket
        self.service = service
        self.config = config.stream
        limits = config.limits
        self.window = StreamWindow(
            config.stream, limits.max_text_chars, limits.max_context_turns, limits.max_context_chars
        )
        self._clock = clock
        self._t0 = clock()
        self.seq = 0
        self._predicted_version = 0

    def now(self) -> float:
        return self._clock() - self._t0

    async def run(self) -> StreamClosed | None:
        """Serve the stream until it ends; the close to send, or None when the client went away."""
        await self._send(self._ready())
        receiver = asyncio.create_task(self._receive())
        updater = asyncio.create_task(self._updates())
        done, pending = await asyncio.wait({receiver, updater}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        errors = [t.exception() for t in done if t.exception() is not None]
        closing = [e for e in errors if isinstance(e, StreamClosed)]
        if closing:
            return closing[0]
        unexpected = [e for e in errors if not isinstance(e, _ClientGone)]
        if not unexpected:
            return None  # the client closed, or its connection broke
        logger.error("live stream failed: %r", unexpected[0], exc_info=unexpected[0])
        return StreamClosed(INTERNAL, "internal error", "internal")

    def _ready(self) -> dict[str, Any]:
        c = self.config
        return {
            "type": "ready",
            "protocol": PROTOCOL_VERSION,
            "sample_rate": SAMPLE_RATE,
            "update_interval_s": c.update_interval_s,
            "audio_window_s": c.audio_window_s,
            "max_frames": c.max_frames,
            "max_fps": c.max_fps,
            "max_message_bytes": c.max_message_bytes,
            "idle_timeout_s": c.idle_timeout_s,
            "transcribe_modes": list(TRANSCRIBE_MODES),
        }

    async def _receive(self) -> None:
        """Read client messages into the window; returns when the client disconnects."""
        idle = self.config.idle_timeout_s
        while True:
            try:
                async with asyncio.timeout(idle):
                    message = await self.ws.receive()
            except TimeoutError:
                raise StreamClosed(IDLE, f"nothing received for {idle:g} s", "idle") from None
            if message["type"] == "websocket.disconnect":
                return
            self.window.apply(message, self.now())

    async def _updates(self) -> None:
        """Every interval, predict the window if it changed; ticks missed while an update ran are skipped."""
        loop = asyncio.get_running_loop()
        interval = self.config.update_interval_s
        next_tick = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            next_tick += interval
            if next_tick < loop.time():  # the last update overran: no catching up, the next tick is a full one
                next_tick = loop.time() + interval
            if self.window.version == self._predicted_version:
                continue
            version = self.window.version
            snapshot = self.window.snapshot(self.now())
            if snapshot is None:
                continue
            self._predicted_version = version
            await self._send(await self.predict(snapshot))

    async def predict(self, snapshot: Snapshot) -> dict[str, Any]:
        """The update message for one window (a prediction, or an error saying why there is none)."""
        start = time.perf_counter()
        timings: dict[str, float] = {}  # modality -> ms from the update's start to its encoder's answer
        self.seq += 1
        body: dict[str, Any]
        try:
            response = await self.service.predict(
                snapshot.payloads,
                primary=tuple(snapshot.payloads),
                on_answer=timings.__setitem__,
                transcribe=snapshot.transcribe,
            )
            body = {"type": "update", **response.model_dump(mode="json", exclude_none=True)}
        except PredictionFailed as exc:
            body = {"type": "error", "status": exc.status, "detail": exc.detail}
        except Exception as exc:  # one bad update must not end the stream
            logger.exception("live stream update failed")
            body = {"type": "error", "status": 500, "detail": f"internal error: {type(exc).__name__}"}
        update_ms = (time.perf_counter() - start) * 1000.0
        metrics = self.service.metrics
        for modality, ms in timings.items():
            metrics.observe("emotion_stream_update_latency_ms", ms, modality=modality)
        metrics.observe("emotion_stream_update_latency_ms", update_ms, modality="fused")
        metrics.inc("emotion_stream_updates_total", outcome=body["type"])
        body.update(
            seq=self.seq,
            window=asdict(snapshot.span),
            update_ms=round(update_ms, 2),
            dropped_frames=self.window.dropped_frames,
        )
        return body

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            async with asyncio.timeout(self.config.send_timeout_s):
                await self.ws.send_text(json.dumps(message))
        except TimeoutError:
            raise StreamClosed(
                POLICY, f"updates not read for {self.config.send_timeout_s:g} s", "slow_client"
            ) from None
        except Exception as exc:  # the connection is gone (disconnect, broken pipe)
            raise _ClientGone() from exc


# ---- the endpoint ----------------------------------------------------------------------------------------


def _with_query_key(conn: WebSocket) -> HTTPConnection:
    """The connection as :class:`AccessControl` reads it: a ``?api_key=`` becomes an ``X-API-Key`` header."""
    key = conn.query_params.get(API_KEY_PARAM)
    headers = list(conn.scope.get("headers", []))
    has_header = any(k in (b"authorization", b"x-api-key") for k, _ in headers)
    if not key or has_header:
        return HTTPConnection(conn.scope)
    return HTTPConnection({**conn.scope, "headers": [*headers, (b"x-api-key", key.encode())]})


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """A browser's ``Origin`` may open a stream when it is the page's own host or in the CORS allow-list."""
    if not origin:
        return True  # not a browser
    if "*" in allowed or origin in allowed:
        return True
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


class StreamManager:
    """``/ws/stream`` on one ingress replica: admission (key, rate, origin, connection cap) and bookkeeping."""

    def __init__(self, service: FusionService, config: AppConfig, access: AccessControl) -> None:
        self.service = service
        self.config = config
        self.access = access
        self.open = 0
        self._set_open()

    def _set_open(self) -> None:
        gauge = getattr(self.service.metrics, "set", None)  # test doubles may record counters only
        if gauge is not None:
            gauge("emotion_stream_open", self.open)

    def _close_metric(self, label: str) -> None:
        self.service.metrics.inc("emotion_stream_closes_total", reason=label)

    async def _admit(self, ws: WebSocket) -> StreamClosed | None:
        if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), self.config.access.cors_origins):
            return StreamClosed(POLICY, f"origin {ws.headers.get('origin', '')[:60]} is not allowed", "origin")
        who = await self.access.admit(_with_query_key(ws), upload=False)
        if isinstance(who, Rejection):
            if who.status == 401:
                missing = "required" in who.detail
                reason = (
                    (
                        f"an API key is required: ?{API_KEY_PARAM}=<key>, 'Authorization: Bearer <key>' or "
                        "'X-API-Key: <key>'"
                    )
                    if missing
                    else who.detail
                )
                return StreamClosed(POLICY, reason, "unauthorized")
            return StreamClosed(TRY_LATER, _short(who.detail), "rate_limited")
        if self.open >= self.config.stream.max_connections:
            return StreamClosed(
                TRY_LATER,
                f"too many live streams on this replica (at most {self.config.stream.max_connections}); retry later",
                "busy",
            )
        return None

    async def handle(self, ws: WebSocket) -> None:
        """Accept, admit, run the stream, close with a code and a reason."""
        await ws.accept()
        refused = await self._admit(ws)
        if refused is not None:
            await self._close(ws, refused)
            return
        self.open += 1  # no await since the cap check: the count cannot overshoot
        self._set_open()
        try:
            closing = await StreamSession(ws, self.service, self.config).run()
        except _ClientGone:
            closing = None
        finally:
            self.open -= 1
            self._set_open()
        if closing is None:
            self._close_metric("client")
            return
        await self._close(ws, closing)

    async def _close(self, ws: WebSocket, closing: StreamClosed) -> None:
        self._close_metric(closing.label)
        try:
            await ws.close(code=closing.code, reason=_short(closing.reason))
        except Exception:  # already gone
            logger.debug("close of a live stream failed", exc_info=True)


def _short(reason: str, limit: int = 123) -> str:
    """A close reason fits in 123 bytes of UTF-8 (RFC 6455)."""
    data = reason.encode()
    return reason if len(data) <= limit else data[: limit - 3].decode("utf-8", "ignore") + "..."
