"""Integration: the real Serve application on a local Ray instance, every endpoint called over HTTP.

One application (``build_app`` with ``deploy/serve_config.yaml``'s args and a 1 MB upload limit so 413 is cheap to
provoke; shared with ``test_serve_reliability.py``, see ``tests/conftest.py``) on 127.0.0.1 and a free port.
Bodies are checked, not only status codes. Emotions are never asserted for the synthetic inputs: the weights change
as training lands.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.labels import EMOTIONS
from tests.ops_helpers import SharedServeApp, small_upload_args
from tests.serve_contract import check_contract

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
SPEECH = (FIXTURES / "speech.wav").read_bytes()
FACE = (FIXTURES / "face.mp4").read_bytes()
FACE_SILENT = (FIXTURES / "face_noaudio.mp4").read_bytes()
STILL = (FIXTURES / "face.png").read_bytes()
CORRUPT = (FIXTURES / "corrupt.mp4").read_bytes()
UPLOAD_LIMIT_MB = 1
SERVE_ARGS: dict[str, Any] = small_upload_args(UPLOAD_LIMIT_MB)


@pytest.fixture(scope="module")
def http(serve_apps: SharedServeApp) -> Iterator[httpx.Client]:
    """An HTTP client for the running application (started or reused by ``serve_apps``)."""
    with httpx.Client(base_url=serve_apps.url(SERVE_ARGS), timeout=120) as client:
        yield client


def predict_file(http: httpx.Client, url: str, name: str, data: bytes, content_type: str) -> httpx.Response:
    return http.post(url, files={"file": (name, data, content_type)})


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body = response.json()
    check_contract(body)
    return body


def test_health(http: httpx.Client) -> None:
    body = http.get("/api/health").json()
    assert body["status"] == "ok"
    assert set(body["models"]) == {"text", "audio", "video", "fusion", "transcriber"}
    for status in body["models"].values():
        assert status["loaded"] is True and status["version"] and status["device"] == "cpu"
    # the ingress's start-up check found Ray Serve's router state readable on its real handles
    assert body["ray_internals"] == {"ok": True, "detail": None}


def test_text(http: httpx.Client) -> None:
    body = ok(http.post("/api/predict", json={"text": "I can't believe we finally won the match!"}))
    assert body["contributions"] == {"text": 1.0} and body["dropped"] == {}
    text = body["modalities"]["text"]
    assert text["truncated"] is False and text["characters"] == 41
    assert body["model_version"] == text["model_version"]


def test_long_text_is_truncated_and_says_so(http: httpx.Client) -> None:
    body = ok(http.post("/api/predict", json={"text": "this goes on and on and on " * 80}))
    assert body["modalities"]["text"]["truncated"] is True


def test_audio(http: httpx.Client) -> None:
    body = ok(predict_file(http, "/predict/audio", "speech.wav", SPEECH, "audio/wav"))
    assert body["contributions"] == {"audio": 1.0}
    audio = body["modalities"]["audio"]
    assert audio["duration_s"] == pytest.approx(5.0, abs=0.05)
    assert audio["decode_ms"] > 0 and audio["model_ms"] > 0 and audio["latency_ms"] >= audio["model_ms"]


def test_video_with_audio_track_uses_both(http: httpx.Client) -> None:
    body = ok(predict_file(http, "/predict/video", "face.mp4", FACE, "video/mp4"))
    assert set(body["modalities"]) == {"video", "audio"} and body["dropped"] == {}
    assert all(w > 0 for w in body["contributions"].values())
    video = body["modalities"]["video"]
    assert video["frames"] == 16 and isinstance(video["face_detected"], bool)
    assert "fusion" in body["model_version"]


def test_video_without_audio_drops_audio(http: httpx.Client) -> None:
    body = ok(predict_file(http, "/predict/video", "face_noaudio.mp4", FACE_SILENT, "video/mp4"))
    assert body["contributions"] == {"video": 1.0}
    assert body["dropped"] == {"audio": "no_audio_stream: the file has no audio track"}


def test_still_image_is_a_one_frame_video(http: httpx.Client) -> None:
    body = ok(predict_file(http, "/predict/video", "face.png", STILL, "image/png"))
    assert body["modalities"]["video"]["frames"] == 1
    assert set(body["dropped"]) == {"audio"}


def test_fused_text_audio_video(http: httpx.Client) -> None:
    body = ok(
        http.post(
            "/predict",
            data={"text": "That was the best news I heard all year."},
            files={
                "audio": ("speech.wav", SPEECH, "audio/wav"),
                "video": ("face_noaudio.mp4", FACE_SILENT, "video/mp4"),
            },
        )
    )
    assert list(body["contributions"]) == ["text", "audio", "video"]
    assert all(0 < w < 1 for w in body["contributions"].values())
    assert body["dropped"] == {}
    assert body["modalities"]["audio"]["duration_s"] == pytest.approx(5.0, abs=0.05)  # the separate audio file
    assert body["emotion"] in EMOTIONS


def test_predict_with_video_only(http: httpx.Client) -> None:
    body = ok(http.post("/predict", files={"video": ("face.mp4", FACE, "video/mp4")}))
    assert set(body["contributions"]) == {"video", "audio"}  # the video's own audio track


BAD_INPUTS = [
    ("empty text", "post", "/api/predict", {"json": {"text": " \n "}}, 422, "text is empty"),
    ("missing field", "post", "/api/predict", {"json": {"txt": "hi"}}, 422, "text"),
    ("no modality", "post", "/predict", {"data": {"text": ""}}, 422, "at least one of"),
    ("missing file", "post", "/predict/video", {"data": {"text": "hi"}}, 422, "file"),
    (
        "corrupt video",
        "post",
        "/predict/video",
        {"files": {"file": ("corrupt.mp4", CORRUPT, "video/mp4")}},
        400,
        "could not decode",
    ),
    ("empty file", "post", "/predict/audio", {"files": {"file": ("empty.wav", b"", "audio/wav")}}, 400, "empty"),
    (
        "audio without a track",
        "post",
        "/predict/audio",
        {"files": {"file": ("face.png", STILL, "video/mp4")}},
        400,
        "no audio track",
    ),
    (
        "text file",
        "post",
        "/predict/audio",
        {"files": {"file": ("notes.txt", b"hello there, not audio", "text/plain")}},
        415,
        "text/plain",
    ),
    (
        "pdf",
        "post",
        "/predict/video",
        {"files": {"file": ("cv.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "application/pdf")}},
        415,
        "application/pdf",
    ),
    (
        "too large",
        "post",
        "/predict/audio",
        {"files": {"file": ("big.wav", b"RIFF" + b"\x01" * (UPLOAD_LIMIT_MB * 1024 * 1024 + 10), "audio/wav")}},
        413,
        "upload limit",
    ),
]


@pytest.mark.parametrize(
    ("what", "method", "url", "kwargs", "status", "detail"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input(
    http: httpx.Client, what: str, method: str, url: str, kwargs: dict[str, Any], status: int, detail: str
) -> None:
    response = getattr(http, method)(url, **kwargs)
    assert response.status_code == status, response.text
    assert detail in str(response.json()["detail"])


def test_streamed_upload_over_limit_is_cut_off(http: httpx.Client) -> None:
    """No Content-Length (chunked): the limit is enforced while the body streams in."""
    boundary = "limitboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\nRIFF"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(UPLOAD_LIMIT_MB * 16 + 8):  # 64 KiB chunks, past the limit
            yield b"\x01" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        response = http.post(
            "/predict/audio", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
    except httpx.TransportError:  # the server may close before the client finished sending
        pytest.skip("connection closed before the 413 could be read")
    assert response.status_code == 413 and "upload limit" in response.json()["detail"]


def test_service_still_healthy_after_bad_inputs(http: httpx.Client) -> None:
    for _, method, url, kwargs, _, _ in BAD_INPUTS:
        getattr(http, method)(url, **kwargs)
    ok(http.post("/api/predict", json={"text": "Still here and working."}))
    ok(predict_file(http, "/predict/video", "face.mp4", FACE, "video/mp4"))
    assert http.get("/api/health").json()["status"] == "ok"


def test_docs_and_web_page(http: httpx.Client) -> None:
    assert http.get("/docs").status_code == 200
    spec = http.get("/openapi.json").json()
    assert {"/api/health", "/api/predict", "/predict", "/predict/audio", "/predict/video"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"contributions", "modalities", "dropped", "model_version"} <= set(
        schemas["PredictionResponse"]["properties"]
    )
    if (REPO / "serve" / "static" / "index.html").is_file():
        page = http.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()


def test_timeline_of_a_video_through_the_real_encoders(http: httpx.Client, tmp_path: Path) -> None:
    """``POST /predict/timeline``: a 9 s video (the face fixture, looped) is streamed back as NDJSON, one line per 3 s
    segment in order and covering the file, each fusing that span's frames and audio, then the summary; without
    ``segment_s`` it is cut by speech, still covering the file."""
    from bench.timeline import looped_video

    video = looped_video(9.0, tmp_path / "face9.mp4").read_bytes()
    files = {"video": ("face9.mp4", video, "video/mp4")}
    with http.stream("POST", "/predict/timeline", files=files, data={"segment_s": "3"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
    start, segments, summary = lines[0], lines[1:-1], lines[-1]
    assert start["type"] == "start" and start["modalities"] == ["audio", "video"] and start["segments"] == 3
    assert start["segmentation"] == "fixed"
    assert [(s["index"], s["start_s"]) for s in segments] == [(0, 0.0), (1, 3.0), (2, 6.0)]
    assert segments[-1]["end_s"] == start["duration_s"] == pytest.approx(9.0, abs=0.1)
    for seg in segments:
        assert seg["emotion"] in EMOTIONS and set(seg["contributions"]) == {"audio", "video"}, seg
        assert sum(seg["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    assert summary["type"] == "summary" and summary["answered"] == 3 and summary["failed"] == 0
    assert sum(summary["shares"].values()) == pytest.approx(1.0, abs=1e-3)

    r = http.post("/predict/timeline", files=files)  # by default, one segment per stretch of speech
    lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    start, segments = lines[0], lines[1:-1]
    assert r.status_code == 200 and start["segmentation"] == "speech" and len(segments) == start["segments"] >= 1
    assert segments[0]["start_s"] == 0.0 and segments[-1]["end_s"] == start["duration_s"]
    assert all(set(seg["contributions"]) == {"audio", "video"} for seg in segments), segments
