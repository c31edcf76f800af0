"""Transcripts in the ingress, in-process with fake handles (no Ray, no model): the ``transcribe`` option of the
media routes, the fan-out, ``fuse``, a failing or slow transcriber, health, and the live stream's protocol message.

The real transcriber (Whisper-base on faster-whisper) is exercised by ``test_models_transcribe.py`` and, behind
Ray Serve, by ``test_serve_transcribe.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.labels import MODALITIES
from serve.api import create_app
from serve.config import AppConfig
from serve.errors import encoder_error
from serve.service import FusionService
from serve.stream import AUDIO, INVALID, StreamClosed, StreamWindow
from tests.serve_contract import check_contract
from tests.test_serve_api_unit import FakeHandle, RecordingMetrics, answer
from tests.test_serve_stream_unit import Server, next_update, pcm, receive

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SPEECH = (FIXTURES / "speech.wav").read_bytes()
WORDS = "I'm so happy to meet you. This is wonderful news."


def heard(text: str = WORDS, **changes: Any) -> dict[str, Any]:
    """What a real ``Transcriber`` replica answers."""
    return {
        "text": text,
        "language": "en",
        "language_probability": 0.95,
        "segments": [{"start": 0.0, "end": 4.56, "text": text}] if text else [],
        "duration_s": 5.0,
        "latency_ms": 900.0,
        "model_ms": 880.0,
        "real_time_factor": 0.176,
        "model_version": "whisper-base-test-int8",
        **changes,
    }


class Harness:
    """The ingress app around fake encoders and a fake transcriber."""

    def __init__(self, config: dict[str, Any] | None = None, transcriber: Any = None, **behaviours: Any) -> None:
        self.handles = {m: FakeHandle(m, behaviours.get(m)) for m in MODALITIES}
        self.transcriber = FakeHandle("transcriber", transcriber or (lambda payload: heard()))
        self.metrics = RecordingMetrics()
        self.config = AppConfig.from_args(config)
        self.service = FusionService(
            self.handles,  # type: ignore[arg-type]
            self.config,
            self.metrics,  # type: ignore[arg-type]
            transcriber=self.transcriber,  # type: ignore[arg-type]
        )
        asyncio.run(self.service.load_fusion())
        self.app = create_app(self.service, self.config, static_dir=None)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.post(url, **kwargs)

        return asyncio.run(go())


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    check_contract(body)
    return body


def audio_upload() -> dict[str, Any]:
    return {"file": ("speech.wav", SPEECH, "audio/wav")}


def test_audio_answer_carries_the_transcript_by_default_without_fusing_it() -> None:
    h = Harness()
    body = ok(h.post("/predict/audio", files=audio_upload()))
    assert body["transcript"]["text"] == WORDS and body["transcript"]["language"] == "en"
    assert body["transcript"]["segments"] == [{"start": 0.0, "end": 4.56, "text": WORDS}]
    assert body["transcript"]["fused"] is False
    assert set(body["modalities"]) == {"audio"} and body["contributions"] == {"audio": 1.0}
    assert h.transcriber.payloads == [SPEECH]  # the same bytes as the audio encoder
    assert h.handles["audio"].payloads == [SPEECH] and h.handles["text"].payloads == []


@pytest.mark.parametrize("where", ["form", "query"])
def test_transcribe_off_returns_no_transcript_and_calls_no_transcriber(where: str) -> None:
    h = Harness()
    if where == "form":
        r = h.post("/predict/audio", files=audio_upload(), data={"transcribe": "off"})
    else:
        r = h.post("/predict/audio?transcribe=off", files=audio_upload())
    body = ok(r)
    assert "transcript" not in body and "transcript" not in body["dropped"]
    assert h.transcriber.payloads == []


def test_the_form_field_wins_over_the_query_and_a_bad_mode_is_422() -> None:
    h = Harness()
    assert "transcript" in ok(
        h.post("/predict/audio?transcribe=off", files=audio_upload(), data={"transcribe": "return"})
    )
    r = h.post("/predict/audio", files=audio_upload(), data={"transcribe": "loud"})
    assert r.status_code == 422 and "transcribe" in r.text
    assert h.post("/predict/audio?transcribe=loud", files=audio_upload()).status_code == 422


def test_deployment_default_mode_applies() -> None:
    h = Harness({"transcriber": {"default_mode": "off"}})
    assert "transcript" not in ok(h.post("/predict/audio", files=audio_upload()))
    assert "transcript" in ok(h.post("/predict/audio?transcribe=return", files=audio_upload()))


def test_fuse_sends_the_words_to_the_text_encoder_and_marks_them() -> None:
    h = Harness(text=lambda p: answer("text", "happy", characters=len(p)))
    body = ok(h.post("/predict/audio", files=audio_upload(), data={"transcribe": "fuse"}))
    assert h.handles["text"].payloads == [WORDS]
    assert set(body["modalities"]) == set(body["contributions"]) == {"text", "audio"}
    assert body["modalities"]["text"]["source"] == "transcript"
    assert "source" not in body["modalities"]["audio"]
    assert body["transcript"]["fused"] is True
    assert body["model_version"].startswith("text-test+audio-test+")  # text and audio fused


def test_fuse_keeps_the_requests_own_text() -> None:
    h = Harness()
    body = ok(
        h.post("/predict", files={"audio": ("s.wav", SPEECH, "audio/wav")}, data={"text": "hi", "transcribe": "fuse"})
    )
    assert h.handles["text"].payloads == ["hi"]
    assert "source" not in body["modalities"]["text"] and body["transcript"]["fused"] is False


def test_fuse_with_no_words_fuses_nothing() -> None:
    h = Harness(transcriber=lambda payload: heard(""))
    body = ok(h.post("/predict/audio?transcribe=fuse", files=audio_upload()))
    assert set(body["modalities"]) == {"audio"} and body["transcript"]["text"] == ""
    assert h.handles["text"].payloads == []


def test_video_transcribes_its_audio_track() -> None:
    h = Harness()
    face = (FIXTURES / "face.mp4").read_bytes()
    body = ok(h.post("/predict/video", files={"file": ("face.mp4", face, "video/mp4")}))
    assert h.transcriber.payloads == [face] and body["transcript"]["text"] == WORDS
    body = ok(h.post("/predict", files={"video": ("face.mp4", face, "video/mp4")}, data={"transcribe": "fuse"}))
    assert set(body["contributions"]) == {"text", "audio", "video"}
    assert body["modalities"]["text"]["source"] == "transcript"


def test_no_audio_track_is_said_once_under_audio() -> None:
    no_track = encoder_error("no_audio_stream", "the file has no audio track", 400)
    h = Harness(audio=lambda p: no_track, transcriber=lambda p: no_track)
    body = ok(h.post("/predict/video", files={"file": ("face.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "image/png")}))
    assert body["dropped"] == {"audio": "no_audio_stream: the file has no audio track"}
    assert "transcript" not in body


def test_a_service_without_a_transcriber_answers_without_transcripts() -> None:
    service = FusionService({m: FakeHandle(m) for m in MODALITIES}, AppConfig(), RecordingMetrics())  # type: ignore[arg-type]
    asyncio.run(service.load_fusion())
    response = asyncio.run(service.predict({"audio": SPEECH}, transcribe="fuse"))
    assert response.transcript is None and response.dropped == {} and set(response.modalities) == {"audio"}


def test_text_only_requests_never_call_the_transcriber() -> None:
    h = Harness()
    assert "transcript" not in ok(h.post("/predict", data={"text": "so happy", "transcribe": "fuse"}))
    assert "transcript" not in ok(h.post("/api/predict", json={"text": "so happy"}))
    assert h.transcriber.payloads == []


def test_the_transcript_runs_alongside_the_encoders_not_after_them() -> None:
    async def slow_audio(payload: bytes) -> dict[str, Any]:
        await asyncio.sleep(0.4)
        return answer("audio")

    async def slow_words(payload: bytes) -> dict[str, Any]:
        await asyncio.sleep(0.4)
        return heard()

    h = Harness(audio=slow_audio, transcriber=slow_words)
    start = time.monotonic()
    body = ok(h.post("/predict/audio", files=audio_upload()))
    assert "transcript" in body and time.monotonic() - start < 0.75  # 0.4 + 0.4 if it were sequential


@pytest.mark.parametrize(
    ("behaviour", "code"),
    [
        (lambda payload: (_ for _ in ()).throw(RuntimeError("replica crashed")), "unavailable"),
        (lambda payload: encoder_error("internal", "RuntimeError: CUDA out of memory", 500), "internal"),
        (lambda payload: {"text": 3}, "internal"),
    ],
    ids=["raises", "error-answer", "malformed"],
)
def test_a_failing_transcriber_drops_the_transcript_never_the_emotion(behaviour: Any, code: str) -> None:
    h = Harness(transcriber=behaviour)
    body = ok(h.post("/predict/audio?transcribe=fuse", files=audio_upload()))
    assert "transcript" not in body and body["dropped"]["transcript"].startswith(f"{code}:")
    assert set(body["modalities"]) == {"audio"} and body["contributions"] == {"audio": 1.0}
    assert ("emotion_dropped_modalities_total", {"modality": "transcript", "reason": code}) in h.metrics.counts


def test_a_slow_transcriber_is_dropped_after_its_timeout() -> None:
    async def stuck(payload: bytes) -> dict[str, Any]:
        await asyncio.sleep(30)
        return heard()

    h = Harness({"transcriber": {"timeout_s": 0.3}}, transcriber=stuck)
    start = time.monotonic()
    body = ok(h.post("/predict/audio", files=audio_upload()))
    assert time.monotonic() - start < 3.0
    assert body["dropped"] == {"transcript": "timeout: no transcript within 0.3 s"}
    assert body["emotion"] and body["modalities"]["audio"]


def test_bad_audio_is_the_same_400_as_without_transcripts() -> None:
    bad = encoder_error("decode_error", "could not decode media: Invalid data", 400)
    with_words = Harness(audio=lambda p: bad, transcriber=lambda p: bad)
    without = Harness({"transcriber": {"default_mode": "off"}}, audio=lambda p: bad)
    a = with_words.post("/predict/audio", files=audio_upload())
    b = without.post("/predict/audio", files=audio_upload())
    assert a.status_code == b.status_code == 400 and a.json() == b.json()


def test_health_lists_the_transcriber() -> None:
    h = Harness()

    async def go() -> Any:
        return await h.service.health()

    health = asyncio.run(go())
    assert health.status == "ok" and health.models is not None
    assert health.models["transcriber"].loaded and health.models["transcriber"].version == "transcriber-test"


# ---- the live stream -------------------------------------------------------------------------------------


def test_stream_transcribe_message_sets_the_mode_and_a_bad_one_closes() -> None:
    w = StreamWindow(AppConfig().stream, max_text_chars=100)
    w.add_audio(pcm(1.0), now=1.0)
    assert w.snapshot(now=1.0).transcribe == "off"  # type: ignore[union-attr]
    w.apply({"type": "websocket.receive", "text": json.dumps({"type": "transcribe", "mode": "fuse"})}, now=1.0)
    assert w.snapshot(now=1.0).transcribe == "fuse"  # type: ignore[union-attr]
    with pytest.raises(StreamClosed) as closed:
        w.apply({"type": "websocket.receive", "text": json.dumps({"type": "transcribe", "mode": "all"})}, now=1.0)
    assert closed.value.code == INVALID and "off, return, fuse" in closed.value.reason


def test_stream_updates_carry_the_windows_transcript_when_asked() -> None:
    h = Harness({"stream": {"update_interval_s": 0.1}})
    with Server(h.app).running() as server, server.connect() as ws:
        ready = receive(ws)
        assert ready["transcribe_modes"] == ["off", "return", "fuse"]
        ws.send(bytes([AUDIO]) + pcm(1.0))
        first = next_update(ws)
        assert first["type"] == "update" and "transcript" not in first  # not asked for yet
        ws.send(json.dumps({"type": "transcribe", "mode": "return"}))
        ws.send(bytes([AUDIO]) + pcm(0.5))
        update = next_update(ws)
        while "transcript" not in update:
            update = next_update(ws)
    assert update["transcript"]["text"] == WORDS and set(update["modalities"]) == {"audio"}
    assert h.transcriber.payloads[-1][:4] == b"RIFF"  # the window's audio, as the audio encoder gets it
