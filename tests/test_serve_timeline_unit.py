"""``POST /predict/timeline`` in-process with fake encoders (no Ray, no model): the NDJSON stream, its segments in
order and covering the file, the summary, the bounds (too long, hop, per client, per replica), a dead encoder
dropped from the segments it affects only, and a client that goes away cancelling the remaining segments.

Media are short synthetic files (10-20 s) made with the bundled ffmpeg; the real encoders behind the same route
are covered by ``tests/test_serve_api.py``.
"""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import json
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from ray.exceptions import ActorDiedError

from models.inference import FusionPipeline
from models.labels import MODALITIES
from models.media import decode_audio
from models.recording import Span, plan_spans, split_jpegs
from serve.api import create_app
from serve.config import AppConfig
from serve.schemas import TimelineSegment
from serve.service import FusionService
from serve.timeline import TimelineBusy, TimelineRunner, summarize
from tests.synth import pattern_mp4, tone_wav
from tests.test_serve_api_unit import FakeHandle, Harness, RecordingMetrics, answer
from tests.test_serve_stream_unit import Server

URL = "/predict/timeline"
SPEECH = (Path(__file__).resolve().parent / "fixtures" / "speech.wav").read_bytes()


@functools.cache
def _fusion() -> FusionPipeline:
    return FusionPipeline()  # loaded once for the module: seconds each on a busy CPU


def make(config: dict[str, Any] | None = None, **behaviours: Any) -> Harness:
    """The ingress app around fake encoders (``behaviours``: modality -> payload -> answer), sharing one fusion."""
    h = Harness.__new__(Harness)
    h.handles = {m: FakeHandle(m, behaviours.get(m)) for m in MODALITIES}
    h.metrics = RecordingMetrics()
    cfg = AppConfig.from_args(config)
    h.service = FusionService(h.handles, cfg, h.metrics)  # type: ignore[arg-type]
    h.service.fusion = _fusion()
    h.app = create_app(h.service, cfg, static_dir=None)
    return h


@pytest.fixture(scope="module")
def tone_10s() -> bytes:
    return tone_wav(10.0)


def lines_of(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def check_covering(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """start, the segments in order, contiguous from 0 to the duration, then summary; returns the segments."""
    start, *segments, summary = lines
    assert start["type"] == "start" and summary["type"] == "summary"
    assert [s["type"] for s in segments] == ["segment"] * start["segments"]
    assert [s["index"] for s in segments] == list(range(len(segments)))
    assert segments[0]["start_s"] == 0.0 and segments[-1]["end_s"] == pytest.approx(start["duration_s"])
    for before, after in itertools.pairwise(segments):
        assert after["start_s"] == pytest.approx(before["end_s"])  # no gap, no overlap at the default hop
    assert all(s["end_s"] > s["start_s"] for s in segments)
    assert summary["segments"] == len(segments)
    return segments


def test_plan_spans_cover_the_recording_without_slivers() -> None:
    assert plan_spans(10.0, 3.0, 3.0) == [Span(0, 0.0, 3.0), Span(1, 3.0, 6.0), Span(2, 6.0, 9.0), Span(3, 9.0, 10.0)]
    assert plan_spans(9.5, 3.0, 3.0)[-1] == Span(2, 6.0, 9.5)  # a 0.5 s tail joins the segment before
    overlapped = plan_spans(10.0, 3.0, 1.5)
    assert [s.start_s for s in overlapped] == [0.0, 1.5, 3.0, 4.5, 6.0, 7.5] and overlapped[-1].end_s == 10.0
    with pytest.raises(ValueError):
        plan_spans(10.0, 3.0, 4.0)


def test_audio_timeline_streams_each_segment_in_order_then_a_summary(tone_10s: bytes) -> None:
    h = make()
    data = {"segmentation": "fixed"}  # the default is speech; this one cuts by the deployment's segment_s
    lines = lines_of(h.request("POST", URL, files={"audio": ("call.wav", tone_10s, "audio/wav")}, data=data))
    start, summary = lines[0], lines[-1]
    assert start == {
        "type": "start",
        "duration_s": 10.0,
        "segmentation": "fixed",
        "segment_s": 3.0,
        "hop_s": 3.0,
        "segments": 4,
        "modalities": ["audio"],
        "transcribe": "off",
    }
    segments = check_covering(lines)
    for seg in segments:
        assert seg["emotion"] == "happy" and seg["contributions"] == {"audio": 1.0} and seg["dropped"] == {}
        assert set(seg["probabilities"]) == set(answer("audio")["probabilities"])
    sent = h.handles["audio"].payloads
    assert len(sent) == 4 and all(p[:4] == b"RIFF" for p in sent)  # each segment's span as a WAV
    assert [len(p) - 44 for p in sent] == [96000, 96000, 96000, 32000]  # 3 s, 3 s, 3 s, 1 s of 16-bit 16 kHz
    assert summary["answered"] == 4 and summary["failed"] == 0 and summary["dominant"] == "happy"
    assert summary["shares"]["happy"] == 1.0 and summary["seconds"]["happy"] == pytest.approx(10.0)
    assert [m["index"] for m in summary["strongest"]] == [0, 1, 2, 3]


def test_video_timeline_sends_frames_and_track_and_the_text_once() -> None:
    h = make()
    video = pattern_mp4(7.0)
    files = {"video": ("talk.mp4", video, "video/mp4")}
    lines = lines_of(h.request("POST", URL, files=files, data={"text": "We need to talk.", "segment_s": "3.5"}))
    assert lines[0]["modalities"] == ["text", "audio", "video"] and lines[0]["segments"] == 2
    segments = check_covering(lines)
    for seg in segments:
        assert set(seg["contributions"]) == {"text", "audio", "video"}
    assert h.handles["text"].payloads == ["We need to talk."]  # encoded once for every segment
    frames = [split_jpegs(p) for p in h.handles["video"].payloads]
    assert [len(f) for f in frames] == [18, 17]  # 5 fps over 3.5 s spans: frames at t in [start, end)
    assert all(p[:4] == b"RIFF" for p in h.handles["audio"].payloads)


def test_text_with_its_context_is_encoded_once_for_every_segment(tone_10s: bytes) -> None:
    h = make()
    turns = ["Are you coming?", {"speaker": "Ann", "text": "No."}]
    data = {"text": "Then we need to talk.", "context": json.dumps(turns)}
    lines = lines_of(h.request("POST", URL, files={"audio": ("a.wav", tone_10s, "audio/wav")}, data=data))
    assert lines[0]["modalities"] == ["text", "audio"]
    assert all(set(s["contributions"]) == {"text", "audio"} for s in lines[1:-1])
    (sent,) = h.handles["text"].payloads  # once, with its context
    assert sent["text"] == "Then we need to talk." and len(sent["context"]) == 2
    bad = h.request("POST", URL, files={"audio": ("a.wav", tone_10s, "audio/wav")}, data={**data, "context": "{"})
    assert bad.status_code == 422


def test_overlapping_hop_counts_each_second_once(tone_10s: bytes) -> None:
    h = make()
    lines = lines_of(h.request("POST", URL, files={"audio": ("a.wav", tone_10s, "audio/wav")}, data={"hop_s": "1.5"}))
    segments = lines[1:-1]
    assert [s["start_s"] for s in segments] == [0.0, 1.5, 3.0, 4.5, 6.0, 7.5] and lines[0]["hop_s"] == 1.5
    assert lines[-1]["seconds"]["happy"] == pytest.approx(10.0)


def test_speech_segmentation_cuts_in_the_pauses() -> None:
    """Three utterances with 2 s of silence between them: three segments, each cut in a pause, still covering."""
    speech = decode_audio(SPEECH)  # 5 s, speech to 4.74 s
    gap = np.zeros(2 * 16000, dtype=np.float32)
    recording = wav_of(np.concatenate([speech, gap, speech, gap, speech]))
    h = make()
    data = {"segmentation": "speech"}
    lines = lines_of(h.request("POST", URL, files={"audio": ("talk.wav", recording, "audio/wav")}, data=data))
    assert lines[0]["segmentation"] == "speech" and lines[0]["segments"] == 3 and "hop_s" not in lines[0]
    segments = check_covering(lines)
    assert [s["index"] for s in segments] == [0, 1, 2]
    assert 5.0 < segments[0]["end_s"] < 7.0 and 12.0 < segments[1]["end_s"] < 14.0  # in the silences
    heard = [decode_audio(p).size / 16000 for p in h.handles["audio"].payloads]
    assert len(heard) == 3
    assert all(seconds > 4.5 for seconds in heard)  # each hears its whole utterance ...
    middle = segments[1]["end_s"] - segments[1]["start_s"]  # ~7 s: 1 s of pause, the utterance, 1 s of pause
    assert heard[1] <= middle - 1.4  # ... widened by speech_pad_s (0.25 s) each side, not the pauses' far ends


def wav_of(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes((samples * 32767).astype("<i2").tobytes())
    return out.getvalue()


def test_summary_shares_and_strongest_moments() -> None:
    def seg(i: int, emotion: str | None, confidence: float) -> TimelineSegment:
        return TimelineSegment(
            index=i, start_s=3.0 * i, end_s=3.0 * i + 3.0, emotion=emotion, confidence=confidence, latency_ms=1.0
        )

    segments = [seg(0, "neutral", 0.99), seg(1, "angry", 0.6), seg(2, "angry", 0.8), seg(3, None, 0.0)]
    summary = summarize(segments, 12.0, moments=5, latency_ms=5.0)
    assert summary.shares["angry"] == pytest.approx(2 / 3, abs=1e-4) and summary.dominant == "angry"
    assert summary.answered == 3 and summary.failed == 1
    assert [m.index for m in summary.strongest] == [2, 1]  # neutral is not a moment while others exist


@pytest.mark.parametrize(
    ("config", "files", "data", "status", "detail"),
    [
        ({"limits": {"max_timeline_seconds": 8}}, "tone", {}, 422, "a timeline takes at most 8 s"),
        ({"limits": {"max_timeline_seconds": 8}}, "fragmented", {}, 422, "a timeline takes at most 8 s"),
        ({}, "tone", {"segment_s": "2", "hop_s": "3"}, 422, "hop_s (3) must not exceed segment_s (2)"),
        ({}, "tone", {"segment_s": "0.2"}, 422, None),
        ({}, None, {"text": "hello"}, 422, "give file 'audio' or file 'video'"),
        ({}, "empty", {}, 400, "empty"),
        ({}, "pdf", {}, 415, "unsupported content type"),
        ({}, "noise", {}, 400, "could not decode media"),
        ({"limits": {"max_timeline_upload_mb": 0.1}}, "tone", {}, 413, "upload limit"),
    ],
)
def test_bad_timelines_are_refused_with_a_detail(
    tone_10s: bytes, config: dict[str, Any], files: str | None, data: dict[str, str], status: int, detail: str | None
) -> None:
    uploads = {
        "tone": {"audio": ("a.wav", tone_10s, "audio/wav")},
        "fragmented": {"video": ("v.mp4", pattern_mp4(10.0), "video/mp4")},  # no duration in its header
        "empty": {"audio": ("a.wav", b"", "audio/wav")},
        "pdf": {"audio": ("a.pdf", b"%PDF-1.4 not audio", "application/pdf")},
        "noise": {"audio": ("a.bin", bytes(range(256)) * 40, "application/octet-stream")},
    }
    h = make(config)
    r = h.request("POST", URL, files=uploads.get(files or "", {}), data=data)
    assert r.status_code == status, r.text
    if detail is not None:
        assert detail in str(r.json()["detail"])
    assert not h.handles["audio"].payloads  # nothing reached an encoder


def test_a_dead_encoder_drops_its_modality_from_the_affected_segments_only() -> None:
    """Video dies while segment 2 is being answered: segments 0-1 keep it, later ones say why it is missing."""
    seen = {"audio": 0}
    dead = threading.Event()

    def audio(payload: bytes) -> dict[str, Any]:
        seen["audio"] += 1
        if seen["audio"] == 3:
            dead.set()
        return answer("audio")

    def video(payload: bytes) -> dict[str, Any]:
        if dead.is_set():
            raise ActorDiedError()
        return answer("video")

    h = make({"timeline": {"segments_in_flight": 1}}, audio=audio, video=video)
    lines = lines_of(h.request("POST", URL, files={"video": ("v.mp4", pattern_mp4(12.0), "video/mp4")}))
    segments = check_covering(lines)
    assert [set(s["contributions"]) for s in segments[:2]] == [{"audio", "video"}] * 2
    for seg in segments[2:]:
        assert seg["contributions"] == {"audio": 1.0} and seg["dropped"]["video"].startswith("unavailable")
    assert lines[-1]["answered"] == len(segments)


def test_per_client_and_per_replica_limits(tone_10s: bytes) -> None:
    """While a timeline runs, the same client's next one is 429 (limit 1 per client) and another client's is 503
    (limit 1 per replica); once it ends, the client may start another."""
    release = asyncio.Event()

    async def slow(payload: bytes) -> dict[str, Any]:
        await release.wait()
        return answer("audio")

    timeline = {"max_active": 1, "segmentation": "fixed"}  # 4 segments of 3 s
    h = make({"access": {"per_client": {"max_concurrent_timelines": 1}}, "timeline": timeline}, audio=slow)
    files = {"audio": ("a.wav", tone_10s, "audio/wav")}

    async def go() -> list[httpx.Response]:
        one = httpx.ASGITransport(app=h.app, client=("10.0.0.1", 1000))
        two = httpx.ASGITransport(app=h.app, client=("10.0.0.2", 1000))
        async with (
            httpx.AsyncClient(transport=one, base_url="http://test", timeout=30) as client,
            httpx.AsyncClient(transport=two, base_url="http://test", timeout=30) as other,
        ):
            first = asyncio.ensure_future(client.post(URL, files=files))
            while not h.handles["audio"].payloads:
                await asyncio.sleep(0.01)
            answers = [await client.post(URL, files=files), await other.post(URL, files=files)]
            release.set()
            answers = [await first, *answers]
            return [*answers, await client.post(URL, files=files)]

    first, same_client, other_client, later = asyncio.run(go())
    assert first.status_code == 200 and lines_of(first)[-1]["answered"] == 4
    assert same_client.status_code == 429 and "timelines in progress" in same_client.json()["detail"]
    assert same_client.headers["Retry-After"]
    assert other_client.status_code == 503 and other_client.headers["Retry-After"]
    assert later.status_code == 200


def test_a_timeline_slot_is_ended_once() -> None:
    runner = TimelineRunner(make().service, AppConfig.from_args({"timeline": {"max_active": 1}}))
    end = runner.reserve()
    with pytest.raises(TimelineBusy):
        runner.reserve()
    end()
    end()  # ending twice counts once
    runner.reserve()
    assert runner.active == 1


@pytest.fixture()
def slow_server() -> Iterator[tuple[str, dict[str, list[float]]]]:
    """The app on a real loopback socket, with encoders that take 0.3 s and record calls and cancellations."""
    events: dict[str, list[float]] = {"started": [], "finished": [], "cancelled": []}

    async def slow(modality: str) -> dict[str, Any]:
        events["started"].append(time.monotonic())
        try:
            await asyncio.sleep(0.3)
        except asyncio.CancelledError:
            events["cancelled"].append(time.monotonic())
            raise
        events["finished"].append(time.monotonic())
        return answer(modality)

    h = make({"timeline": {"segments_in_flight": 2}}, audio=lambda p: slow("audio"))
    with Server(h.app).running() as server:
        yield f"http://127.0.0.1:{server.port}", events


def test_a_client_that_goes_away_cancels_the_remaining_segments(
    slow_server: tuple[str, dict[str, list[float]]],
) -> None:
    base_url, events = slow_server
    audio = tone_wav(20.0)  # 20 segments of 1 s; 2 at a time, 0.3 s each: ~3 s if the client stayed
    with (
        httpx.Client(base_url=base_url, timeout=30) as client,
        client.stream("POST", URL, files={"audio": ("a.wav", audio, "audio/wav")}, data={"segment_s": "1"}) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        assert json.loads(next(lines))["segments"] == 20
        assert json.loads(next(lines))["index"] == 0
    gone = time.monotonic()  # the connection is closed here
    time.sleep(1.2)
    started_after = [t for t in events["started"] if t > gone + 0.1]
    assert not started_after, "segments were still sent to the encoder after the client went away"
    assert len(events["started"]) < 8  # of 20
    assert events["cancelled"], "the calls under way were not cancelled"
    assert not [t for t in events["finished"] if t > gone + 0.1]


def test_openapi_documents_the_stream_and_json_errors() -> None:
    spec = make().app.openapi()
    operation = spec["paths"][URL]["post"]
    assert set(operation["responses"]["200"]["content"]) == {"application/x-ndjson"}
    for status in ("400", "413", "422", "429", "503"):
        assert set(operation["responses"][status]["content"]) == {"application/json"}, status
    lines = operation["responses"]["200"]["content"]["application/x-ndjson"]["schema"]["oneOf"]
    assert {line["$ref"].rsplit("/", 1)[-1] for line in lines} <= set(spec["components"]["schemas"])
    body = spec["components"]["schemas"]["Body_predict_timeline_predict_timeline_post"]
    assert body["anyOf"] == [{"required": ["audio"]}, {"required": ["video"]}]
    assert all("anyOf" not in prop for prop in body["properties"].values())  # one type each, never null
    assert body["properties"]["segmentation"]["enum"] == ["fixed", "speech"]
