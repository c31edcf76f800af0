"""The ingress's FastAPI app in-process, with fake encoder handles (fast; no Ray).

Covers the response contract, how failures and timeouts become ``dropped`` or HTTP errors, the
single-modality rule (the encoder's own answer, contribution 1.0), fusion of two or more, and which
encoders each endpoint calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models.labels import EMOTIONS, MODALITIES
from serve.api import create_app
from serve.config import AppConfig
from serve.errors import encoder_error
from serve.schemas import EncoderAnswer
from serve.service import FusionService, failure_status
from tests.serve_contract import check_contract

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SPEECH = (FIXTURES / "speech.wav").read_bytes()
FACE = (FIXTURES / "face.mp4").read_bytes()


def answer(modality: str, emotion: str = "happy", version: str | None = None, **info: Any) -> dict[str, Any]:
    """What a real encoder returns for a success: an :class:`EncoderAnswer` as plain data."""
    probs = {e: (0.94 if e == emotion else 0.01) for e in EMOTIONS}
    rng = np.random.default_rng(len(modality))
    return EncoderAnswer(
        modality=modality,
        embedding=rng.normal(size=256).tolist(),
        probabilities=probs,
        emotion=emotion,
        confidence=0.94,
        latency_ms=5.0,
        decode_ms=1.0,
        preprocess_ms=0.5,
        model_ms=3.0,
        batch_size=1,
        model_version=version or f"{modality}-test",
        **info,
    ).model_dump(exclude_none=True)


class FakeHandle:
    """Stands in for a ``DeploymentHandle``: ``remote(payload)`` runs ``behaviour(payload)``."""

    def __init__(self, modality: str, behaviour: Callable[[Any], Any] | None = None) -> None:
        self.modality = modality
        self.behaviour = behaviour or (lambda payload: answer(modality))
        self.payloads: list[Any] = []
        self.method = "__call__"

    def options(self, method_name: str = "__call__", **_: Any) -> FakeHandle:
        clone = FakeHandle(self.modality, self.behaviour)
        clone.method, clone.payloads = method_name, self.payloads
        return clone

    def remote(self, *args: Any) -> Any:
        async def go() -> Any:
            if self.method == "info":
                return {"loaded": True, "version": f"{self.modality}-test", "device": "cpu"}
            if self.method == "encode_many":  # the ingress coalesced several requests into one call
                return [await one(payload) for payload in args[0]]
            return await one(args[0])

        async def one(payload: Any) -> Any:
            self.payloads.append(payload)
            result = self.behaviour(payload)
            return await result if asyncio.iscoroutine(result) else result

        return go()


class RecordingMetrics:
    def __init__(self) -> None:
        self.counts: list[tuple[str, dict[str, str]]] = []

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        self.counts.append((name, tags))

    def observe(self, name: str, value: float, **tags: str) -> None:
        pass


class Harness:
    def __init__(self, handles: dict[str, FakeHandle], config: AppConfig, static_dir: Path | None = None) -> None:
        self.handles = handles
        self.metrics = RecordingMetrics()
        self.service = FusionService(handles, config, self.metrics)  # type: ignore[arg-type]
        asyncio.run(self.service.load_fusion())
        self.app = create_app(self.service, config, static_dir=static_dir)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(go())


def make(config: dict[str, Any] | None = None, static_dir: Path | None = None, **behaviours: Any) -> Harness:
    handles = {m: FakeHandle(m, behaviours.get(m)) for m in MODALITIES}
    return Harness(handles, AppConfig.from_args(config), static_dir)


def test_single_modality_is_the_encoders_own_answer() -> None:
    h = make(text=lambda p: answer("text", "sad", truncated=False, characters=len(p)))
    r = h.request("POST", "/api/predict", json={"text": "  so   sad  "})
    assert r.status_code == 200, r.text
    body = r.json()
    check_contract(body)
    assert body["contributions"] == {"text": 1.0}
    assert body["emotion"] == "sad" and body["probabilities"]["sad"] == pytest.approx(0.94)
    assert body["modalities"]["text"]["truncated"] is False and body["modalities"]["text"]["characters"] == 12
    assert body["dropped"] == {} and body["model_version"] == "text-test"
    assert h.handles["text"].payloads == ["  so   sad  "]
    assert ("emotion_predictions_total", {"emotion": "sad", "modality": "fused"}) in h.metrics.counts
    assert ("emotion_requests_total", {"endpoint": "/api/predict", "status": "200"}) in h.metrics.counts


def test_video_goes_to_both_video_and_audio_and_is_fused() -> None:
    h = make()
    r = h.request("POST", "/predict/video", files={"file": ("face.mp4", FACE, "video/mp4")})
    assert r.status_code == 200, r.text
    body = r.json()
    check_contract(body)
    assert set(body["contributions"]) == {"audio", "video"}
    assert h.handles["video"].payloads == [FACE] and h.handles["audio"].payloads == [FACE]
    assert h.handles["text"].payloads == []
    assert body["model_version"].endswith("+" + h.service.fusion.version)  # type: ignore[union-attr]


def test_video_without_audio_track_reports_the_dropped_audio() -> None:
    h = make(audio=lambda p: encoder_error("no_audio_stream", "the file has no audio track", 400))
    body = h.request("POST", "/predict/video", files={"file": ("face.mp4", FACE, "video/mp4")}).json()
    check_contract(body)
    assert body["contributions"] == {"video": 1.0}
    assert body["dropped"] == {"audio": "no_audio_stream: the file has no audio track"}
    assert ("emotion_dropped_modalities_total", {"modality": "audio", "reason": "no_audio_stream"}) in h.metrics.counts


def test_all_three_modalities_fused() -> None:
    h = make()
    r = h.request(
        "POST",
        "/predict",
        data={"text": "what a day"},
        files={"audio": ("speech.wav", SPEECH, "audio/wav"), "video": ("face.mp4", FACE, "video/mp4")},
    )
    body = r.json()
    check_contract(body)
    assert list(body["contributions"]) == ["text", "audio", "video"]
    assert all(w > 0 for w in body["contributions"].values())
    assert h.handles["audio"].payloads == [SPEECH]  # the separate audio file, not the video's track
    assert h.handles["video"].payloads == [FACE]


def test_predict_with_video_only_uses_its_audio_track() -> None:
    h = make()
    body = h.request("POST", "/predict", files={"video": ("face.mp4", FACE, "video/mp4")}).json()
    assert set(body["modalities"]) == {"audio", "video"}
    assert h.handles["audio"].payloads == [FACE]


def test_timeout_drops_the_modality() -> None:
    async def slow(_: Any) -> dict[str, Any]:
        await asyncio.sleep(5)
        return answer("audio")

    h = make({"encoders": {"audio": {"timeout_s": 0.2}}}, audio=slow)
    r = h.request("POST", "/predict", data={"text": "hello"}, files={"audio": ("speech.wav", SPEECH, "audio/wav")})
    body = r.json()
    assert r.status_code == 200
    assert body["contributions"] == {"text": 1.0}
    assert body["dropped"]["audio"].startswith("timeout:")
    r = h.request("POST", "/predict/audio", files={"file": ("speech.wav", SPEECH, "audio/wav")})
    assert r.status_code == 504 and "did not answer" in r.json()["detail"]


def test_crashed_encoder_is_dropped_not_fatal() -> None:
    def boom(_: Any) -> dict[str, Any]:
        raise RuntimeError("replica died")

    h = make(video=boom)
    body = h.request("POST", "/predict", data={"text": "hi"}, files={"video": ("face.mp4", FACE, "video/mp4")}).json()
    assert set(body["modalities"]) == {"text", "audio"}
    assert body["dropped"]["video"].startswith("unavailable:")


def test_handle_refusing_the_call_is_dropped_too() -> None:
    class Refusing(FakeHandle):
        def remote(self, *args: Any) -> Any:
            raise RuntimeError("router shut down")

    h = make()
    h.service.handles["text"] = Refusing("text")
    body = h.request("POST", "/predict", data={"text": "hi"}, files={"audio": ("s.wav", SPEECH, "audio/wav")}).json()
    assert body["contributions"] == {"audio": 1.0} and body["dropped"]["text"].startswith("unavailable:")
    r = h.request("POST", "/api/predict", json={"text": "hi"})
    assert r.status_code == 503 and "text encoder failed" in r.json()["detail"]


def test_all_failed_is_400_with_the_reasons() -> None:
    bad = lambda p: encoder_error("decode_error", "could not decode media: junk", 400)
    h = make(audio=bad, video=bad)
    r = h.request("POST", "/predict/video", files={"file": ("x.mp4", b"\x00\x00\x00\x18ftypjunk" * 10, "video/mp4")})
    assert r.status_code == 400
    assert r.json()["detail"].startswith("no modality could be used (video: could not decode")


def test_failure_status_prefers_client_errors() -> None:
    timeout = {"code": "timeout", "message": "t", "status": 504}
    decode = {"code": "decode_error", "message": "d", "status": 400}
    down = {"code": "unavailable", "message": "u", "status": 503}
    assert failure_status({"video": decode, "audio": timeout}, ("video",)) == 400  # type: ignore[dict-item]
    assert failure_status({"video": timeout, "audio": timeout}, ("video",)) == 504  # type: ignore[dict-item]
    assert failure_status({"text": down}, ("text",)) == 503  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "detail"),
    [
        ("POST", "/api/predict", {"json": {"text": "   "}}, 422, "text is empty"),
        ("POST", "/api/predict", {"json": {"text": ""}}, 422, None),
        ("POST", "/api/predict", {"json": {}}, 422, None),
        ("POST", "/api/predict", {"json": {"text": "a" * 101}}, 422, "longer than 100"),
        ("POST", "/predict", {"data": {"text": "  "}}, 422, "at least one of"),
        (
            "POST",
            "/predict",
            {"data": {"text": ""}, "files": {"video": ("", b"", "application/octet-stream")}},
            422,
            "at least one of",
        ),  # what an HTML form sends with nothing filled in
        ("POST", "/predict/audio", {"data": {"x": "1"}}, 422, None),  # missing file field
        (
            "POST",
            "/predict/audio",
            {"files": {"file": ("a.txt", b"just some words here", "text/plain")}},
            415,
            "text/plain",
        ),
        ("POST", "/predict/video", {"files": {"file": ("a.pdf", b"%PDF-1.4 ...", "application/pdf")}}, 415, "pdf"),
        ("POST", "/predict/audio", {"files": {"file": ("empty.wav", b"", "audio/wav")}}, 400, "empty"),
        ("POST", "/predict/audio", {"files": {"file": ("big.wav", b"\x01" * 3000, "audio/wav")}}, 413, "upload limit"),
    ],
)
def test_bad_requests(method: str, url: str, kwargs: dict[str, Any], status: int, detail: str | None) -> None:
    h = make({"limits": {"max_upload_mb": 2000 / 1024 / 1024, "max_text_chars": 100}})
    r = h.request(method, url, **kwargs)
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    if detail:
        assert detail in str(r.json()["detail"])
    assert all(not handle.payloads for handle in h.handles.values())  # nothing reached an encoder
    assert h.request("POST", "/api/predict", json={"text": "still fine"}).status_code == 200


def test_health_and_static_page(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>emotion</h1>")
    h = make(static_dir=tmp_path)
    health = h.request("GET", "/api/health").json()
    assert health["status"] == "ok"
    assert set(health["models"]) == {"text", "audio", "video", "fusion"}
    assert health["models"]["fusion"]["version"] == h.service.fusion.version  # type: ignore[union-attr]
    assert "<h1>emotion</h1>" in h.request("GET", "/").text
    assert h.request("GET", "/docs").status_code == 200
    spec = h.request("GET", "/openapi.json").json()
    assert {"/api/health", "/api/predict", "/predict", "/predict/audio", "/predict/video"} <= set(spec["paths"])
    for path in ("/api/predict", "/predict", "/predict/audio", "/predict/video"):
        post = spec["paths"][path]["post"]
        assert post["tags"] == ["predict"]
        assert {"200", "400", "413", "415", "422"} <= set(post["responses"]), path
        ok_schema = post["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok_schema["$ref"].endswith("/PredictionResponse"), path
    assert h.request("POST", "/api/predict", json={"text": "hi"}).status_code == 200  # API before the mount


def test_warm_up_asks_every_encoder_and_does_not_wait_for_a_silent_one() -> None:
    h = make({"health_timeout_s": 0.3})
    asked: list[str] = []

    class Counting(FakeHandle):
        def options(self, method_name: str = "__call__", **_: Any) -> FakeHandle:
            asked.append(f"{self.modality}.{method_name}")
            return super().options(method_name)

    class Silent(FakeHandle):  # its call waits in the router: no replica to take it
        def options(self, method_name: str = "__call__", **_: Any) -> FakeHandle:
            asked.append(f"{self.modality}.{method_name}")
            return self

        def remote(self, *args: Any) -> Any:
            return asyncio.sleep(3600)

    h.service.handles.update(text=Counting("text"), audio=Counting("audio"), video=Silent("video"))
    start = time.monotonic()
    health = asyncio.run(h.service.warm_up())
    assert time.monotonic() - start < 2.0  # bounded by health_timeout_s, not by the silent encoder
    assert sorted(asked) == ["audio.info", "text.info", "video.info"]
    assert health.status == "degraded" and health.models is not None
    assert health.models["text"].loaded and not health.models["video"].loaded


def test_health_degraded_when_an_encoder_does_not_answer() -> None:
    h = make()

    class Dead(FakeHandle):
        def options(self, method_name: str = "__call__", **_: Any) -> FakeHandle:
            raise RuntimeError("no replica")

    h.service.handles["video"] = Dead("video")
    health = h.request("GET", "/api/health").json()
    assert health["status"] == "degraded"
    assert health["models"]["video"]["loaded"] is False and "no replica" in health["models"]["video"]["error"]


def test_latency_script_report() -> None:
    from starlette.testclient import TestClient

    from bench.latency import TARGETS_MS, percentile, run

    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 95) == 5.0
    h = make()
    with TestClient(h.app, base_url="http://test") as client:
        report = run("http://test", n=3, warmup=1, client=client)
    results = report["results"]
    assert set(TARGETS_MS) <= set(results) and "fused text+audio+video" in results
    for name, target in TARGETS_MS.items():
        assert results[name]["p50_ms"] <= results[name]["p95_ms"] and results[name]["target_p50_ms"] == target
        assert isinstance(results[name]["meets_target"], bool)
    assert set(results["fused text+audio+video"]["encoder_p50_ms"]) == {"text", "audio", "video"}
    assert report["models"]["fusion"]
