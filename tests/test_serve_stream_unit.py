"""``/ws/stream`` without Ray: the sliding window and its bounds, the message protocol and its close codes, and
the endpoint served by uvicorn on loopback (in a thread) with fake encoder handles and the real fusion module.

(Starlette's in-process test client cancels the app as soon as a client leaves, which a stream's own tasks
turn into a spurious error; a real server delivers the disconnect instead.)"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from models.labels import EMOTIONS, MODALITIES
from models.media import decode_audio, decode_frames
from serve.access import AccessControl, ApiKeys
from serve.api import create_app
from serve.config import AppConfig, StreamConfig
from serve.service import FusionService
from serve.stream import (
    AUDIO,
    FRAME,
    IDLE,
    INVALID,
    POLICY,
    TOO_BIG,
    TRY_LATER,
    UNSUPPORTED,
    StreamClosed,
    StreamWindow,
    origin_allowed,
    pcm_to_wav,
)
from tests.test_serve_api_unit import FakeHandle, answer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
KEY = "live-stream-test-key-0123456789"


def jpeg(value: int = 128, side: int = 32) -> bytes:
    image = np.full((side, side, 3), value, dtype=np.uint8)
    cv2.circle(image, (side // 2, side // 2), side // 4, (255 - value,) * 3, -1)
    return cv2.imencode(".jpg", image)[1].tobytes()


def pcm(seconds: float, freq: float = 220.0) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2").tobytes()


def window(**changes: Any) -> StreamWindow:
    return StreamWindow(StreamConfig(**changes), max_text_chars=100)


# ---- the window ------------------------------------------------------------------------------------------


def test_audio_keeps_the_last_window_seconds_and_round_trips_as_wav() -> None:
    w = window(audio_window_s=3.0)
    first, second = pcm(2.0, 220), pcm(2.0, 440)
    w.add_audio(first, now=2.0)
    w.add_audio(second, now=4.0)
    assert w.audio_seconds == pytest.approx(3.0)
    snap = w.snapshot(now=4.0)
    assert snap is not None and set(snap.payloads) == {"audio"}
    samples = decode_audio(snap.payloads["audio"])  # what the audio encoder reads
    expected = np.frombuffer((first + second)[-3 * 16000 * 2 :], dtype="<i2").astype(np.float32) / 32768.0
    np.testing.assert_allclose(samples, expected, atol=1e-6)
    assert (snap.span.start_s, snap.span.end_s, snap.span.audio_s) == (1.0, 4.0, 3.0)
    # Audio that stopped more than a window ago is gone; too little audio is not sent at all.
    assert w.snapshot(now=7.5) is None
    w.add_audio(pcm(0.2), now=8.0)
    assert w.snapshot(now=8.0) is None


def test_frames_keep_the_last_n_as_one_video_payload() -> None:
    w = window(max_frames=8, max_fps=100)
    frames = [jpeg(10 * i) for i in range(12)]
    for i, f in enumerate(frames):
        assert w.add_frame(f, now=i * 0.1)
    snap = w.snapshot(now=1.2)
    assert snap is not None and snap.payloads["video"] == b"".join(frames[-8:])
    assert decode_frames(snap.payloads["video"], 16).shape[0] == 8  # ffmpeg reads the concatenated JPEGs
    assert (snap.span.frames, snap.span.start_s, snap.span.end_s) == (8, 0.4, 1.1)
    assert w.dropped_frames == 0
    # Frames age out of the window.
    assert w.snapshot(now=1.1 + w.config.frame_max_age_s + 0.1) is None


def test_frames_over_the_rate_or_the_byte_budget_are_dropped() -> None:
    w = window(max_fps=10)  # bursts of 2.5 frames
    kept = [w.add_frame(jpeg(i), now=0.0) for i in range(5)]
    assert kept == [True, True, False, False, False]
    assert not w.add_frame(jpeg(5), now=0.04)  # 0.5 + 0.4 tokens: still over 10 fps
    assert w.add_frame(jpeg(6), now=0.1)
    assert [w.add_frame(jpeg(7 + i), now=0.2 + 0.1 * i) for i in range(5)] == [True] * 5  # 10 fps steady passes
    assert w.dropped_frames == 4 and w.frame_count == 8

    budget = 65536
    w = window(max_buffer_bytes=budget, max_fps=1000, max_frames=64)
    big = b"\xff\xd8\xff" + bytes(20_000) + b"\xff\xd9"
    for i in range(10):
        w.add_frame(big, now=i * 0.01)
        assert w.buffered_bytes <= budget
    assert w.frame_count == 3 and w.dropped_frames == 7  # the oldest went first
    w.add_audio(pcm(1.5), now=0.2)  # 48 kB of audio: frames make room
    assert w.buffered_bytes <= budget and w.frame_count == 0
    assert not w.add_frame(big, now=0.3)  # no room next to the audio: dropped, not queued


def test_text_and_clear() -> None:
    w = window()
    w.apply({"type": "websocket.receive", "text": json.dumps({"type": "text", "text": "so happy"})}, now=0.5)
    snap = w.snapshot(now=0.5)
    assert snap is not None and snap.payloads == {"text": "so happy"} and snap.span.text
    version = w.version
    w.apply({"type": "websocket.receive", "text": '{"type": "clear"}'}, now=0.6)
    assert w.version > version and w.snapshot(now=0.6) is None


@pytest.mark.parametrize(
    ("message", "code", "words"),
    [
        ({"bytes": bytes([0x07]) + b"abc"}, UNSUPPORTED, "unknown binary message type 0x07"),
        ({"bytes": b""}, INVALID, "empty"),
        ({"bytes": bytes([AUDIO]) + b"\x01\x02\x03"}, INVALID, "16-bit PCM"),
        ({"bytes": bytes([FRAME]) + b"GIF89a not a jpeg"}, INVALID, "not a JPEG"),
        ({"bytes": bytes([FRAME]) + b"\xff\xd8\xff" + bytes(2_000_000)}, TOO_BIG, "over the"),
        ({"text": "not json"}, INVALID, "JSON objects"),
        ({"text": "[1, 2]"}, INVALID, "JSON objects"),
        ({"text": '{"type": "dance"}'}, UNSUPPORTED, "unknown message type 'dance'"),
        ({"text": json.dumps({"type": "text", "text": "x" * 101})}, TOO_BIG, "longer than 100 characters"),
    ],
)
def test_bad_messages_close_with_a_code_and_a_reason(message: dict[str, Any], code: int, words: str) -> None:
    w = window()
    with pytest.raises(StreamClosed) as caught:
        w.apply({"type": "websocket.receive", **message}, now=0.0)
    assert caught.value.code == code and words in caught.value.reason
    assert len(caught.value.reason.encode()) <= 123


def test_pcm_to_wav_header() -> None:
    data = pcm_to_wav(pcm(0.5))
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()) == (1, 2, 16000, 8000)


def test_origin_check() -> None:
    assert origin_allowed(None, "svc:8000", ())
    assert origin_allowed("http://svc:8000", "svc:8000", ())
    assert not origin_allowed("https://evil.example", "svc:8000", ())
    assert origin_allowed("https://app.example.org", "svc:8000", ("https://app.example.org",))


# ---- the endpoint in-process -----------------------------------------------------------------------------


class Counting:
    """Fake encoder behaviour that records payloads and how many calls overlap."""

    def __init__(self, modality: str, delay_s: float = 0.0) -> None:
        self.modality = modality
        self.delay_s = delay_s
        self.active = self.max_active = 0
        self.payloads: list[Any] = []

    async def __call__(self, payload: Any) -> dict[str, Any]:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.payloads.append(payload)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.active -= 1
        return answer(self.modality, "happy" if self.modality != "video" else "surprise")


class Metrics:
    def __init__(self) -> None:
        self.counts: list[tuple[str, dict[str, str]]] = []
        self.observed: list[tuple[str, float, dict[str, str]]] = []
        self.gauge: list[float] = []

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        self.counts.append((name, tags))

    def observe(self, name: str, value: float, **tags: str) -> None:
        self.observed.append((name, value, tags))

    def set(self, name: str, value: float, **tags: str) -> None:
        self.gauge.append(value)


class Server:
    """The app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: Any) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @contextmanager
    def running(self) -> Iterator[Server]:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        try:
            yield self
        finally:
            self.server.should_exit = True
            self.thread.join(timeout=10)

    def connect(self, path: str = "/ws/stream", **kwargs: Any) -> ClientConnection:
        return connect(f"ws://127.0.0.1:{self.port}{path}", open_timeout=10, **kwargs)


@contextmanager
def serving(
    stream: dict[str, Any] | None = None, delay_s: float = 0.0, keys: bool = False
) -> Iterator[tuple[Server, dict[str, Counting], Metrics]]:
    config = AppConfig.model_validate({"stream": {"update_interval_s": 0.1, "max_fps": 100, **(stream or {})}})
    behaviours = {m: Counting(m, delay_s) for m in MODALITIES}
    handles = {m: FakeHandle(m, b) for m, b in behaviours.items()}
    metrics = Metrics()
    service = FusionService(handles, config, metrics)  # type: ignore[arg-type]
    asyncio.run(service.load_fusion())
    control = None
    if keys:
        config = config.model_copy(
            update={
                "access": config.access.model_copy(
                    update={"api_keys": config.access.api_keys.model_copy(update={"required": True})}
                )
            }
        )
        control = AccessControl(
            config.access,
            metrics,  # type: ignore[arg-type]
            keys=ApiKeys(config.access.api_keys, environ={"EMOTION_API_KEYS": KEY}),
        )
    app = create_app(service, config, static_dir=None, access=control)
    with Server(app).running() as server:
        yield server, behaviours, metrics


def receive(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=20))


def next_update(ws: ClientConnection) -> dict[str, Any]:
    while True:
        message = receive(ws)
        if message["type"] in ("update", "error"):
            return message


def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; its close code and reason."""
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=20)
    assert closed.value.rcvd is not None, "closed without a close frame from the server"
    return closed.value.rcvd.code, closed.value.rcvd.reason


def wait_for(check: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_stream_updates_have_the_predict_fields_and_the_window() -> None:
    with serving(stream={"max_fps": 1e6}) as (server, behaviours, metrics):  # frames sent back to back are kept
        with server.connect() as ws:
            ready = receive(ws)
            assert ready["type"] == "ready" and ready["sample_rate"] == 16000 and ready["update_interval_s"] == 0.1
            ws.send(bytes([AUDIO]) + pcm(1.0))
            for i in range(3):
                ws.send(bytes([FRAME]) + jpeg(40 * i))
            ws.send(json.dumps({"type": "text", "text": "what a lovely day"}))
            update = next_update(ws)
            while set(update.get("contributions", {})) != {"text", "audio", "video"}:
                update = next_update(ws)  # a tick may have caught only part of what was sent
        wait_for(lambda: ("emotion_stream_closes_total", {"reason": "client"}) in metrics.counts)
    assert update["type"] == "update" and update["seq"] >= 1
    assert set(update["probabilities"]) == set(EMOTIONS)
    assert sum(update["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert sum(update["contributions"].values()) == pytest.approx(1.0, abs=1e-4)
    assert update["emotion"] == max(update["probabilities"], key=update["probabilities"].get)
    assert set(update["modalities"]) == {"text", "audio", "video"} and update["dropped"] == {}
    assert update["window"]["audio_s"] == 1.0 and update["window"]["frames"] == 3 and update["window"]["text"]
    assert update["window"]["start_s"] <= update["window"]["end_s"]
    assert update["update_ms"] >= 0 and update["dropped_frames"] == 0
    # The encoders got what the HTTP endpoints would send: a WAV, one concatenated-JPEG video, the text.
    assert behaviours["audio"].payloads[-1][:4] == b"RIFF"
    assert decode_frames(behaviours["video"].payloads[-1], 16).shape[0] == 3
    assert behaviours["text"].payloads[-1] == "what a lovely day"
    latency = {tags["modality"] for name, _, tags in metrics.observed if name == "emotion_stream_update_latency_ms"}
    assert latency == {"text", "audio", "video", "fused"}
    assert ("emotion_stream_updates_total", {"outcome": "update"}) in metrics.counts
    assert metrics.gauge[0] == 0 and 1 in metrics.gauge and metrics.gauge[-1] == 0


def test_a_slow_encoder_skips_ticks_instead_of_queueing() -> None:
    with serving(stream={"max_fps": 1e6}, delay_s=0.35) as (server, behaviours, _), server.connect() as ws:
        receive(ws)
        seqs = []
        for i in range(4):
            ws.send(bytes([FRAME]) + jpeg(50 * i))  # the window changes while every update runs
            seqs.append(next_update(ws)["seq"])
            ws.send(bytes([FRAME]) + jpeg(50 * i + 25))
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    assert behaviours["video"].max_active == 1  # never more than one update of a stream in flight


def test_bad_frame_closes_that_stream_only() -> None:
    with serving() as (server, _, metrics), server.connect() as good, server.connect() as bad:
        receive(good)
        receive(bad)
        bad.send(bytes([FRAME]) + b"this is not a jpeg at all")
        code, reason = closed_with(bad)
        good.send(bytes([AUDIO]) + pcm(0.8))
        update = next_update(good)
    assert code == INVALID and "not a JPEG" in reason
    assert update["type"] == "update" and set(update["contributions"]) == {"audio"}
    assert ("emotion_stream_closes_total", {"reason": "bad_frame"}) in metrics.counts


def test_connection_cap_and_idle_timeout() -> None:
    with serving(stream={"max_connections": 1, "idle_timeout_s": 1.0}) as (server, _, _):
        with server.connect() as first:
            receive(first)
            with server.connect() as second:
                code, reason = closed_with(second)
            assert code == TRY_LATER and "at most 1" in reason
            code, reason = closed_with(first)  # nothing sent: the idle timeout closes it
            assert code == IDLE and "nothing received" in reason
        with server.connect() as again:  # the slot is free again
            assert receive(again)["type"] == "ready"


def test_api_key_is_required_when_configured() -> None:
    with serving(keys=True) as (server, _, _):
        with server.connect() as ws:
            code, reason = closed_with(ws)
        assert code == POLICY and "api_key" in reason
        with server.connect("/ws/stream?api_key=wrong-key-but-long-enough") as ws:
            code, reason = closed_with(ws)
        assert code == POLICY and "not valid" in reason
        with server.connect(f"/ws/stream?api_key={KEY}") as ws:
            assert receive(ws)["type"] == "ready"
        with server.connect(additional_headers={"X-API-Key": KEY}) as ws:
            assert receive(ws)["type"] == "ready"


def test_foreign_origin_is_refused() -> None:
    with serving() as (server, _, _), server.connect(origin="https://evil.example") as ws:  # type: ignore[arg-type]
        code, reason = closed_with(ws)
    assert code == POLICY and "not allowed" in reason
