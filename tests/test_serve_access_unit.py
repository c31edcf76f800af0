"""Access control in-process (fake encoder handles, no Ray): API keys, per-client limits, CORS, and key secrecy.

The app is the real one (:func:`serve.api.create_app`) around fake encoders; limits run on a fake clock so the
rate tests need no sleeping. No fusion weights are loaded: every request here uses one modality.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from models.labels import MODALITIES
from serve.access import KEY_FILE_RECHECK_S, AccessControl, ApiKeys, key_id
from serve.api import create_app
from serve.config import AccessConfig, ApiKeysConfig, AppConfig
from serve.service import FusionService
from tests.test_serve_api_unit import SPEECH, FakeHandle, RecordingMetrics, answer

ALICE = "alice-key-3f9c2b7e41d0a8"
BOB = "bob-key-77e1c04a9b2f5d3"
KEYS_ON = {"api_keys": {"required": True}}
STILL = (Path(__file__).resolve().parent / "fixtures" / "face.png").read_bytes()
# Each prediction endpoint with a valid one-modality body.
ENDPOINTS: dict[str, dict[str, Any]] = {
    "/api/predict": {"json": {"text": "what a lovely day"}},
    "/predict": {"data": {"text": "what a lovely day"}},
    "/predict/audio": {"files": {"file": ("speech.wav", SPEECH, "audio/wav")}},
    "/predict/video": {"files": {"file": ("face.png", STILL, "image/png")}},
}


class Clock:
    """A hand-driven ``time.monotonic``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """The ingress app with fake encoders, its recorded metrics and a fake clock."""

    def __init__(
        self,
        access: dict[str, Any] | None = None,
        environ: dict[str, str] | None = None,
        behaviours: dict[str, Callable[[Any], Any]] | None = None,
    ) -> None:
        self.config = AppConfig.from_args({"access": access or {}})
        self.clock = Clock()
        self.metrics = RecordingMetrics()
        behaviours = behaviours or {}
        # The video encoder answers "no audio track" for the audio encoder's half of a still image.
        self.handles = {m: FakeHandle(m, behaviours.get(m)) for m in MODALITIES}
        self.service = FusionService(self.handles, self.config, self.metrics)  # type: ignore[arg-type]
        keys = None
        if self.config.access.api_keys.required:
            keys = ApiKeys(
                self.config.access.api_keys, environ=environ or {"EMOTION_API_KEYS": f"{ALICE},{BOB}"}, clock=self.clock
            )
        self.access = AccessControl(self.config.access, self.metrics, keys=keys, clock=self.clock)
        self.app = create_app(self.service, self.config, static_dir=None, access=self.access)

    def client(self, address: str = "10.0.0.1") -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=(address, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://test")

    def request(self, method: str, url: str, address: str = "10.0.0.1", **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            async with self.client(address) as http:
                return await http.request(method, url, **kwargs)

        return asyncio.run(go())

    def encoder_calls(self) -> int:
        return sum(len(h.payloads) for h in self.handles.values())

    def access_counts(self) -> list[dict[str, str]]:
        return [tags for name, tags in self.metrics.counts if name == "emotion_access_decisions_total"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def label_of(key: str) -> str:
    """The metric label a key is counted under."""
    return key_id(hashlib.sha256(key.encode()).digest())


# ---- keys off (the default) ---------------------------------------------------------------------------------------


def test_keys_are_off_by_default_and_health_shows_the_models() -> None:
    h = Harness()
    assert h.request("POST", "/api/predict", json={"text": "hello there"}).status_code == 200
    health = h.request("GET", "/api/health").json()
    assert health["api_key_required"] is False and set(health["models"]) == {"text", "audio", "video", "fusion"}
    spec = h.request("GET", "/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})
    assert h.access_counts() == [{"decision": "allowed", "client": "anonymous"}]


# ---- keys on ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_every_prediction_endpoint_needs_a_valid_key(path: str) -> None:
    h = Harness(
        KEYS_ON,
        behaviours={
            "audio": lambda p: (
                answer("audio")
                if p == SPEECH
                else {"error": {"code": "no_audio_stream", "message": "no audio", "status": 400}}
            )
        },
    )
    for headers, why in (
        ({}, "an API key is required"),
        ({"X-API-Key": "not-the-key-0000000000"}, "not valid"),
        (bearer("wrong-but-long-enough-key"), "not valid"),
        ({"Authorization": f"Basic {ALICE}"}, "an API key is required"),
    ):
        r = h.request("POST", path, headers=headers, **ENDPOINTS[path])
        assert r.status_code == 401, (headers, r.text)
        assert why in r.json()["detail"] and r.headers["www-authenticate"].startswith("Bearer")
    assert h.encoder_calls() == 0
    assert h.request("POST", path, headers=bearer(ALICE), **ENDPOINTS[path]).status_code == 200
    assert h.request("POST", path, headers={"X-API-Key": BOB}, **ENDPOINTS[path]).status_code == 200
    assert h.request("POST", path, headers={"authorization": f"bearer {ALICE}"}, **ENDPOINTS[path]).status_code == 200


def test_a_request_without_a_key_is_refused_before_its_upload_is_read() -> None:
    h = Harness({**KEYS_ON})
    sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for chunk in (b"--b\r\n", b"\x01" * 65536, b"--b--\r\n"):
            sent.append(len(chunk))
            yield chunk

    r = h.request("POST", "/predict/audio", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 401 and sent == []
    # An over-limit declared length is a 401 too: nobody learns anything before showing a key.
    r = h.request("POST", "/predict/audio", content=b"x" * 10, headers={"content-length": str(10**10)})
    assert r.status_code == 401


def test_health_without_a_key_is_liveness_only() -> None:
    h = Harness(KEYS_ON)
    anonymous = h.request("GET", "/api/health")
    assert anonymous.status_code == 200
    assert anonymous.json() == {"status": "ok", "api_key_required": True, "models": None, "ray_internals": None}
    assert "-test" not in anonymous.text  # the fake encoders' versions are "<modality>-test"
    wrong = h.request("GET", "/api/health", headers=bearer("not-a-valid-key-at-all"))
    assert wrong.json()["models"] is None
    keyed = h.request("GET", "/api/health", headers={"X-API-Key": ALICE}).json()
    assert keyed["api_key_required"] is True and keyed["models"]["text"]["version"] == "text-test"
    assert h.encoder_calls() == 0  # health asks the encoders' info only, and only with a key


def test_openapi_documents_both_key_headers_and_the_new_errors() -> None:
    spec = Harness(KEYS_ON).request("GET", "/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    for path in ENDPOINTS:
        post = spec["paths"][path]["post"]
        assert {"401", "429"} <= set(post["responses"]) and len(post["security"]) == 2, path


# ---- per-client limits --------------------------------------------------------------------------------------------


def test_rate_limit_is_per_key_with_retry_after() -> None:
    h = Harness({**KEYS_ON, "per_client": {"requests_per_minute": 60, "burst": 3}})
    text = {"json": {"text": "again"}}
    assert [h.request("POST", "/api/predict", headers=bearer(ALICE), **text).status_code for _ in range(3)] == [200] * 3
    limited = h.request("POST", "/api/predict", headers=bearer(ALICE), **text)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert "too many requests" in limited.json()["detail"]
    assert h.request("POST", "/api/predict", headers=bearer(BOB), **text).status_code == 200  # another key is served
    assert (
        h.request(
            "POST",
            "/predict/audio",
            headers=bearer(ALICE),  # media endpoints share the budget
            **ENDPOINTS["/predict/audio"],
        ).status_code
        == 429
    )
    h.clock.now += 1.0  # one token back at 1 per second
    assert h.request("POST", "/api/predict", headers=bearer(ALICE), **text).status_code == 200
    assert h.request("POST", "/api/predict", headers=bearer(ALICE), **text).status_code == 429
    assert {"decision": "rate_limited", "client": label_of(ALICE)} in h.access_counts()
    assert h.request("GET", "/api/health", headers=bearer(ALICE)).status_code == 200  # health is not rate-limited


def test_rate_limit_is_per_address_when_keys_are_off() -> None:
    h = Harness({"per_client": {"requests_per_minute": 6, "burst": 1}})
    assert h.request("POST", "/api/predict", address="10.0.0.1", json={"text": "one"}).status_code == 200
    second = h.request("POST", "/api/predict", address="10.0.0.1", json={"text": "two"})
    assert second.status_code == 429 and second.headers["retry-after"] == "10"
    assert h.request("POST", "/api/predict", address="10.0.0.2", json={"text": "three"}).status_code == 200
    assert {tags["client"] for tags in h.access_counts()} == {"anonymous"}  # addresses never become labels


def test_concurrent_uploads_are_capped_per_client() -> None:
    release = asyncio.Event()

    async def slow_audio(_: Any) -> dict[str, Any]:
        await release.wait()
        return answer("audio")

    h = Harness({**KEYS_ON, "per_client": {"max_concurrent_uploads": 1}}, behaviours={"audio": slow_audio})
    upload = ENDPOINTS["/predict/audio"]

    async def scenario() -> dict[str, Any]:
        async with h.client() as http:
            first = asyncio.create_task(http.post("/predict/audio", headers=bearer(ALICE), **upload))
            while not h.handles["audio"].payloads:  # the first upload is inside the encoder
                await asyncio.sleep(0.01)
            second = await http.post("/predict/audio", headers=bearer(ALICE), **upload)
            text = await http.post("/api/predict", headers=bearer(ALICE), json={"text": "not an upload"})
            other = asyncio.create_task(http.post("/predict/audio", headers=bearer(BOB), **upload))
            while len(h.handles["audio"].payloads) < 2:  # Bob's upload got its own slot
                await asyncio.sleep(0.01)
            release.set()
            done = await first, await other
            after = await http.post("/predict/audio", headers=bearer(ALICE), **upload)  # the slot was released
            return {"second": second, "text": text, "done": done, "after": after}

    r = asyncio.run(scenario())
    assert r["second"].status_code == 429 and r["second"].headers["retry-after"] == "1"
    assert "uploads in progress" in r["second"].json()["detail"]
    assert r["text"].status_code == 200
    assert [x.status_code for x in r["done"]] == [200, 200] and r["after"].status_code == 200
    assert h.access.uploads is not None and h.access.uploads.in_flight == {}


# ---- CORS -----------------------------------------------------------------------------------------------------------


def test_cors_allows_only_the_listed_origins() -> None:
    allowed, other = "https://app.example.org", "https://evil.example.com"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    h = Harness({**KEYS_ON, "cors_origins": [allowed]})
    ok = h.request("OPTIONS", "/api/predict", headers={"Origin": allowed, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == allowed
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    refused = h.request("OPTIONS", "/api/predict", headers={"Origin": other, **preflight})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    # The allowed page can read a 401 (and a 429's Retry-After); another origin's page gets no CORS headers.
    r = h.request("POST", "/api/predict", headers={"Origin": allowed}, json={"text": "hi"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == allowed
    assert "retry-after" in r.headers["access-control-expose-headers"].lower()
    r = h.request("POST", "/api/predict", headers={"Origin": other, **bearer(ALICE)}, json={"text": "hi"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # Default: no allow-list, same origin only.
    r = Harness().request("POST", "/api/predict", headers={"Origin": allowed}, json={"text": "hi"})
    assert "access-control-allow-origin" not in r.headers


# ---- keys: sources, rotation, failure modes, secrecy --------------------------------------------------------------


def test_keys_come_from_the_environment_and_a_file_that_is_reread(tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"# rotated 2026-01\n{ALICE}\n\n")
    clock = Clock()
    keys = ApiKeys(
        ApiKeysConfig(required=True, file=str(keys_file)), environ={"EMOTION_API_KEYS": f" {BOB} ,"}, clock=clock
    )
    assert keys.match(ALICE) and keys.match(BOB) and keys.match("# rotated 2026-01") is None
    assert keys.match(ALICE[:-1]) is None and keys.match(ALICE + "x") is None

    new = "carol-key-5d1e8f20a4c6b9"
    keys_file.write_text(f"{new}\n")
    assert keys.match(ALICE)  # not looked at again before KEY_FILE_RECHECK_S
    clock.now += KEY_FILE_RECHECK_S
    assert keys.match(new) and keys.match(ALICE) is None and keys.match(BOB)  # the environment's key stays

    keys_file.write_text("short\n")  # a bad file keeps the keys in force
    clock.now += KEY_FILE_RECHECK_S
    assert keys.match(new) and keys.match("short") is None


def test_required_keys_that_are_missing_or_weak_stop_the_ingress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMOTION_API_KEYS", raising=False)
    config = AccessConfig.model_validate({"api_keys": {"required": True, "file": str(tmp_path / "absent")}})
    with pytest.raises(ValueError, match="none were found in .EMOTION_API_KEYS and .*absent"):
        AccessControl(config, RecordingMetrics())  # type: ignore[arg-type]
    monkeypatch.setenv("EMOTION_API_KEYS", "tooshort")
    with pytest.raises(ValueError, match="shorter than 16") as err:
        AccessControl(AccessConfig.model_validate(KEYS_ON), RecordingMetrics())  # type: ignore[arg-type]
    assert "tooshort" not in str(err.value)
    monkeypatch.setenv("EMOTION_API_KEYS", ALICE)  # the default path: create_app reads the environment
    service = FusionService({}, AppConfig.from_args({"access": KEYS_ON}), RecordingMetrics())  # type: ignore[arg-type]
    assert any(r.path == "/api/predict" for r in create_app(service, service.config, static_dir=None).routes)


@pytest.mark.parametrize(
    "access",
    [
        {"api_keys": {"key": ALICE}},  # there is no place for a key in the config
        {"api_keys": {"env": "alice-key-3f9c2b7e41d0a8"}},  # a key pasted where a variable name goes
        {"cors_origins": ["https://app.example.org/page"]},
        {"cors_origins": ["app.example.org"]},
        {"per_client": {"requests_per_minute": 0}},
        {"per_client": {"max_concurrent_uploads": 0}},
        {"rate_limit": {}},
    ],
)
def test_bad_access_config_is_rejected(access: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AppConfig.from_args({"access": access})


def test_keys_never_appear_in_logs_metrics_or_answers() -> None:
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage() + str(record.exc_info or ""))  # type: ignore
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        h = Harness({**KEYS_ON, "per_client": {"requests_per_minute": 60, "burst": 1}})
        answers = [
            h.request("POST", "/api/predict", headers=headers, json={"text": "hello"})
            for headers in (bearer(ALICE), bearer(ALICE), {"X-API-Key": BOB}, bearer(ALICE[::-1]))
        ]
        answers.append(h.request("GET", "/api/health", headers=bearer(BOB)))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [r.status_code for r in answers] == [200, 429, 200, 401, 200]
    assert any("API keys required: 2 keys" in r for r in records)  # the log does name the keys, by id
    texts = records + [r.text + str(dict(r.headers)) for r in answers] + [str(tags) for _, tags in h.metrics.counts]
    for secret in (ALICE, BOB, ALICE[::-1]):
        assert not [t for t in texts if secret in t], secret
    labels = {tags["client"] for tags in h.access_counts()}
    assert labels == {"anonymous", label_of(ALICE), label_of(BOB)}
