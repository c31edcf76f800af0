"""Transcripts through the real Serve application on a local Ray instance (127.0.0.1), over HTTP.

The speech fixture says "I'm so happy to meet you. This is wonderful news. Thank you all so much."; the assertions
use the words Whisper-base gets right on it every time. The last test kills the ``Transcriber`` replica and checks
that the emotion answer still arrives, without the transcript and saying why, and that the transcript comes back
with Serve's replacement replica.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.soak import replica_pids
from tests.ops_helpers import SharedServeApp, health_ok, wait_for
from tests.serve_contract import check_contract

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SPEECH = (FIXTURES / "speech.wav").read_bytes()
FACE = (FIXTURES / "face.mp4").read_bytes()
APP = SharedServeApp.NAME
SERVE_ARGS: dict[str, Any] = {}  # the defaults; the application is shared with other modules (tests/conftest.py)
EXPECTED_WORDS = {"happy", "meet", "wonderful", "news", "thank"}


@pytest.fixture(scope="module")
def http(serve_apps: SharedServeApp) -> Iterator[httpx.Client]:
    base_url = serve_apps.url(SERVE_ARGS)
    with httpx.Client(base_url=base_url, timeout=120) as client:
        wait_for(lambda: health_ok(base_url), 600, 2, "/api/health ok")
        yield client


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def speech(http: httpx.Client, **data: str) -> dict[str, Any]:
    r = http.post("/predict/audio", files={"file": ("speech.wav", SPEECH, "audio/wav")}, data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    check_contract(body)
    return body


def test_health_names_the_transcriber(http: httpx.Client) -> None:
    models = http.get("/api/health").json()["models"]
    assert models["transcriber"]["loaded"] and models["transcriber"]["version"].startswith("whisper-base-")
    assert models["transcriber"]["device"] == "cpu"


def test_speech_answer_carries_its_english_transcript(http: httpx.Client) -> None:
    body = speech(http)
    transcript = body["transcript"]
    assert transcript["language"] == "en" and EXPECTED_WORDS <= words(transcript["text"]), transcript
    assert transcript["segments"] and transcript["segments"][0]["start"] >= 0
    assert transcript["duration_s"] == pytest.approx(5.0, abs=0.01) and transcript["fused"] is False
    assert transcript["latency_ms"] > 0 and transcript["real_time_factor"] > 0
    assert set(body["modalities"]) == {"audio"} and body["contributions"] == {"audio": 1.0}


def test_transcribe_off_returns_no_transcript(http: httpx.Client) -> None:
    body = speech(http, transcribe="off")
    assert "transcript" not in body and body["dropped"] == {}
    r = http.post("/predict/audio?transcribe=off", files={"file": ("speech.wav", SPEECH, "audio/wav")})
    assert r.status_code == 200 and "transcript" not in r.json()


def test_fuse_puts_the_words_in_as_text(http: httpx.Client) -> None:
    body = speech(http, transcribe="fuse")
    assert set(body["contributions"]) == {"text", "audio"} and body["contributions"]["text"] > 0
    text = body["modalities"]["text"]
    assert text["source"] == "transcript" and text["characters"] == len(" ".join(body["transcript"]["text"].split()))
    assert body["transcript"]["fused"] is True and "fusion-" in body["model_version"]


def test_video_answer_transcribes_its_audio_track(http: httpx.Client) -> None:
    r = http.post("/predict/video", files={"file": ("face.mp4", FACE, "video/mp4")})
    assert r.status_code == 200, r.text
    body = r.json()
    check_contract(body)
    assert {"happy", "wonderful", "news"} <= words(body["transcript"]["text"])
    assert set(body["modalities"]) == {"audio", "video"}


def test_a_killed_transcriber_drops_the_transcript_not_the_emotion(http: httpx.Client) -> None:
    pids = replica_pids("Transcriber", app=APP)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    start = time.monotonic()
    body = speech(http, transcribe="fuse")
    took = time.monotonic() - start
    assert "transcript" not in body and body["dropped"]["transcript"].startswith("unavailable:"), body["dropped"]
    assert set(body["modalities"]) == {"audio"} and body["emotion"] == body["modalities"]["audio"]["emotion"]
    assert took < 15, f"the answer waited {took:.1f} s for a dead transcriber"
    # Serve replaces the replica; transcripts come back with it.
    wait_for(lambda: "transcript" in speech(http), 300, 3, "a transcript from the replacement replica")
