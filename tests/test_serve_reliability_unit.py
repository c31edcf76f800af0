"""Failure handling of the ingress without Ray: replica deaths, dead encoders, 413 on a socket, the OpenAPI contract.

Encoders are fake handles (see ``tests/test_serve_api_unit.py``); a "dead replica" is a handle that raises Ray's
``ActorDiedError``, and "no live replica" a handle whose ``live_replicas()`` says 0 (what
:func:`serve.replicas.read_replicas` reads from a real handle's router).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from ray.exceptions import ActorDiedError

from models.labels import MODALITIES
from serve.config import AppConfig
from serve.replicas import EncoderHealth, RouterReader
from serve.service import replica_gone
from tests.test_serve_api_unit import FACE, SPEECH, FakeHandle, Harness, answer, make


class Counted(FakeHandle):
    """A fake handle that reports how many replicas its router could use (``None``: cannot tell)."""

    replicas: int | None = 1

    def options(self, method_name: str = "__call__", **_: Any) -> FakeHandle:
        clone = Counted(self.modality, self.behaviour)
        clone.method, clone.payloads, clone.replicas = method_name, self.payloads, self.replicas
        return clone

    def live_replicas(self) -> int | None:
        return self.replicas


def dies_first(times: int, modality: str) -> Any:
    """Behaviour: the first ``times`` calls fail as if their replica was killed, then the encoder answers."""
    calls = {"n": 0}

    def behaviour(_: Any) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] <= times:
            raise ActorDiedError()
        return answer(modality)

    return behaviour


def test_replica_death_is_retried_on_another_replica() -> None:
    h = make(text=dies_first(1, "text"))
    r = h.request("POST", "/api/predict", json={"text": "hello there"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["contributions"] == {"text": 1.0} and body["dropped"] == {}
    assert h.handles["text"].payloads == ["hello there", "hello there"]  # the same input, sent twice


def test_retries_are_bounded_and_then_unavailable() -> None:
    h = make(text=dies_first(100, "text"))
    r = h.request("POST", "/api/predict", json={"text": "hello"})
    assert r.status_code == 503
    assert r.json() == {
        "detail": "no modality could be used (text: the text encoder has no live replica (ActorDiedError))"
    }
    assert len(h.handles["text"].payloads) == 3  # one call and two retries


def test_other_errors_are_not_retried() -> None:
    def boom(_: Any) -> dict[str, Any]:
        raise RuntimeError("model exploded")

    h = make(text=boom)
    r = h.request("POST", "/api/predict", json={"text": "hello"})
    assert r.status_code == 503 and "text encoder failed: RuntimeError" in r.json()["detail"]
    assert len(h.handles["text"].payloads) == 1


def counted(config: dict[str, Any] | None = None, **behaviours: Any) -> Harness:
    handles = {m: Counted(m, behaviours.get(m)) for m in MODALITIES}
    return Harness(handles, AppConfig.from_args(config))  # type: ignore[arg-type]


def test_encoder_without_live_replica_is_dropped_without_a_call() -> None:
    async def never(_: Any) -> dict[str, Any]:
        await asyncio.sleep(3600)
        return answer("video")

    h = counted(video=never)
    h.handles["video"].replicas = 0
    r = h.request(
        "POST",
        "/predict",
        data={"text": "what a day"},
        files={"audio": ("s.wav", SPEECH, "audio/wav"), "video": ("f.mp4", FACE, "video/mp4")},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["contributions"]) == {"text", "audio"}
    assert body["dropped"] == {"video": "unavailable: the video encoder has no live replica"}
    assert h.handles["video"].payloads == []  # no call was even made, so nothing waited for the 40 s timeout
    assert ("emotion_dropped_modalities_total", {"modality": "video", "reason": "unavailable"}) in h.metrics.counts


def test_single_modality_to_a_dead_encoder_is_a_503_not_a_504() -> None:
    h = counted()
    h.handles["text"].replicas = 0
    r = h.request("POST", "/api/predict", json={"text": "hello"})
    assert r.status_code == 503
    assert r.json() == {"detail": "no modality could be used (text: the text encoder has no live replica)"}


def test_wait_ends_when_the_last_replica_goes() -> None:
    """A call already waiting (queued in the router, or on a replica that hangs) stops once no replica is left."""
    h = counted()
    handle = h.handles["video"]

    async def hang(_: Any) -> dict[str, Any]:
        handle.replicas = 0  # the replica dies while the call waits
        await asyncio.sleep(3600)
        return answer("video")

    handle.behaviour = hang
    h.service.watch_interval_s = 0.01
    body = h.request("POST", "/predict", data={"text": "hi"}, files={"video": ("f.mp4", FACE, "video/mp4")}).json()
    assert set(body["contributions"]) == {"text", "audio"}
    assert body["dropped"] == {"video": "unavailable: the video encoder has no live replica"}  # not "timeout: ..."
    assert len(handle.payloads) == 1


def test_marked_down_encoder_is_skipped_until_a_probe_succeeds() -> None:
    """When replicas cannot be counted, a replica-death failure short-circuits later calls; one probe per
    interval goes through, and its success clears the mark."""
    now = {"t": 100.0}
    h = make(text=dies_first(3, "text"))
    h.service.encoder_health = EncoderHealth(probe_interval_s=1.0, clock=lambda: now["t"])
    calls = h.handles["text"].payloads
    assert h.request("POST", "/api/predict", json={"text": "a"}).status_code == 503
    assert len(calls) == 3 and h.service.encoder_health.is_down("text")
    r = h.request("POST", "/api/predict", json={"text": "b"})
    assert r.status_code == 503 and "no live replica" in r.json()["detail"]
    assert len(calls) == 3  # skipped: no call
    now["t"] += 1.0
    r = h.request("POST", "/api/predict", json={"text": "c"})  # the probe: the encoder is back
    assert r.status_code == 200 and calls[-1] == "c"
    assert not h.service.encoder_health.is_down("text")
    assert h.request("POST", "/api/predict", json={"text": "d"}).status_code == 200 and calls[-1] == "d"


def test_replica_gone_and_router_reads_on_the_2_60_layout() -> None:
    """The branches of the router reads, on stand-ins of the layout (tests/test_serve_replicas.py reads a real
    router)."""
    assert replica_gone(ActorDiedError()) and not replica_gone(RuntimeError("x"))

    class Wrapped(Exception):
        cause = ActorDiedError()

    assert replica_gone(Wrapped())
    reader = RouterReader()
    assert reader.replicas(object()) is None  # not a Serve handle: unknown
    assert reader.replicas(Counted("text")) == 1

    def serve_handle(populated: bool, replicas: list[str]) -> SimpleNamespace:
        """The parts of a Ray Serve 2.60 ``DeploymentHandle`` that :func:`read_replicas` reads."""
        router = SimpleNamespace(
            running_replicas_populated=lambda: populated,
            _request_router=SimpleNamespace(curr_replicas=replicas),
            _running_replicas=None,
        )
        return SimpleNamespace(_router=SimpleNamespace(_asyncio_router=router))

    assert reader.replicas(serve_handle(True, ["r1", "r2"])) == 2
    assert reader.replicas(serve_handle(True, [])) == 0  # every replica it knew has died
    # never sent a replica (this ingress replica started after the encoder's last one died): none to call,
    # not "unknown", or the call would wait in Serve's router for a replacement instead of being dropped
    assert reader.replicas(serve_handle(False, [])) == 0
    assert reader.replicas(SimpleNamespace(_router=None)) is None  # no call made yet: no router to read
    reader.enabled = False  # the start-up check failed: nothing is read any more
    assert reader.replicas(serve_handle(True, ["r1", "r2"])) is None and reader.replicas(Counted("text")) is None


# ---- 413 on a real socket --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uvicorn_url() -> Iterator[str]:
    """The ingress app (fake encoders, 1 MB upload limit) served by uvicorn on 127.0.0.1."""
    h = make({"limits": {"max_upload_mb": 1}})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(h.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def post_without_expect(host: str, path: str, size: int) -> tuple[int, dict[str, Any], str]:
    """POST a ``size``-byte multipart body with ``http.client`` (as ``urllib`` does: all of it, no
    ``Expect: 100-continue``, then read the answer)."""
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    body = head + b"RIFF" + b"\x01" * (size - len(head) - len(tail) - 4) + tail
    conn = http.client.HTTPConnection(host, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response.getheader("connection") or ""
    finally:
        conn.close()


@pytest.mark.parametrize("size", [3 * 1024 * 1024, 1024 * 1024 + 1000])
def test_over_limit_upload_without_expect_reads_a_413(uvicorn_url: str, size: int) -> None:
    status, body, connection = post_without_expect(uvicorn_url, "/predict/audio", size)
    assert status == 413
    assert body == {"detail": "request body is larger than the 1 MB upload limit"}
    assert connection == "close"
    # the server is fine afterwards
    conn = http.client.HTTPConnection(uvicorn_url, timeout=30)
    conn.request(
        "POST", "/api/predict", body=json.dumps({"text": "still here"}), headers={"Content-Type": "application/json"}
    )
    assert conn.getresponse().status == 200
    conn.close()


# ---- the OpenAPI document matches what is answered --------------------------------------------------------------


def test_openapi_documents_the_real_error_shapes(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>emotion</h1>")
    h = make(static_dir=tmp_path)
    spec = h.request("GET", "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path in ("/api/predict", "/predict", "/predict/audio", "/predict/video"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"400", "413", "415", "422", "503", "504"} <= set(responses), path
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ValidationErrorResponse")
    detail = schemas["ValidationErrorResponse"]["properties"]["detail"]["anyOf"]
    assert {"type": "string"} in detail and any(d.get("type") == "array" for d in detail)
    # both 422 shapes really are answered
    assert isinstance(h.request("POST", "/api/predict", json={}).json()["detail"], list)
    assert h.request("POST", "/predict", data={"text": " "}).json()["detail"].startswith("give at least one")
    # required files are non-empty binary; the fused form needs a file or a non-blank text
    audio_body = schemas["Body_predict_audio_predict_audio_post"]
    assert audio_body["required"] == ["file"] and audio_body["properties"]["file"]["minLength"] == 1
    fused = schemas["Body_predict_predict_post"]
    assert {"required": ["audio"]} in fused["anyOf"] and spec["paths"]["/predict"]["post"]["requestBody"]["required"]
    assert schemas["TextRequest"]["properties"]["text"]["pattern"] == r"\S"
    # a wrong method on an API route is a 405 naming the right one, even with the static page mounted at /
    for method, path, allow in (
        ("GET", "/api/predict", "POST"),
        ("PUT", "/predict/audio", "POST"),
        ("DELETE", "/api/health", "GET"),
    ):
        r = h.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path)
        assert r.json() == {"detail": "Method Not Allowed"}
    assert "<h1>emotion</h1>" in h.request("GET", "/").text  # the page itself still answers


def test_ha_config_keeps_two_replicas_of_everything_and_the_same_args() -> None:
    import yaml

    deploy = Path(__file__).resolve().parents[1] / "deploy"
    base = yaml.safe_load((deploy / "serve_config.yaml").read_text())["applications"][0]
    ha = yaml.safe_load((deploy / "serve_config.ha.yaml").read_text())["applications"][0]
    assert ha["args"] == base["args"] and ha["import_path"] == base["import_path"]
    assert ha["runtime_env"] == base["runtime_env"]
    scaling = {d["name"]: d["autoscaling_config"] for d in ha["deployments"]}
    assert set(scaling) == {"TextEncoder", "AudioEncoder", "VideoEncoder", "Transcriber", "FusionIngress"}
    assert all(s["min_replicas"] >= 2 and s["initial_replicas"] >= 2 for s in scaling.values())
    cpus = sum(d["ray_actor_options"]["num_cpus"] * scaling[d["name"]]["min_replicas"] for d in ha["deployments"])
    assert round(cpus, 6) <= 1.5  # fits a 2-core machine with room for the proxy and controller


def test_soak_report_counts_lost_requests_and_gaps() -> None:
    from bench.soak import Record, Run, summarize

    run = Run()
    for record in (
        Record("text", "/api/predict", 0.0, 1.0, 200),
        Record("text", "/api/predict", 1.0, 4.0, 500),
        Record("audio", "/predict/audio", 0.0, 2.0, None, "ConnectError: refused"),
        Record("audio", "/predict/audio", 2.0, 2.5, 200),
        Record("blank", "/api/predict", 4.0, 5.0, 422),
    ):
        run.add(record)
    memory = {"TextEncoder": {"1": 100.0, "2": 90.0}}
    report = summarize(run, 0.0, 6.0, [], memory, {"TextEncoder": {"1": 110.5, "3": 95.0}}, {})
    assert report["requests_sent"] == 5 and report["lost_requests"] == 2
    assert report["answers_by_status"] == {"200": 2, "422": 1, "500": 1, "no_answer": 1}
    assert [lost["kind"] for lost in report["lost"]] == ["text", "audio"]
    assert report["longest_gap_without_answer_s"] == {"/api/predict": 3.0, "/predict/audio": 3.5}
    assert report["replica_memory_mb"]["growth_mb"]["TextEncoder"] == {"1": 10.5}


def test_zero_replicas_after_a_death_this_call_saw_is_answered_at_once() -> None:
    """The call's replica dies and Serve's router drops it, leaving none: that 0 is no passing moment of a
    reconfiguration, so the modality is answered ``unavailable`` without the 0.5 s wait."""
    h = counted()
    text = h.handles["text"]

    def dies(_: Any) -> dict[str, Any]:
        text.replicas = 0  # what Serve's router does with a replica whose call failed this way
        raise ActorDiedError()

    text.behaviour = dies
    start = time.monotonic()
    r = h.request("POST", "/api/predict", json={"text": "hello"})
    assert r.status_code == 503 and "text encoder has no live replica (ActorDiedError)" in r.json()["detail"]
    assert time.monotonic() - start < h.service.unavailable_after_s / 2
    assert text.payloads == ["hello"]  # no retry: no replica left to retry on


def test_replicas_seen_dying_reads_the_routers_own_drops() -> None:
    def serve_handle(replicas: list[str], cached: dict[str, int]) -> SimpleNamespace:
        """The parts of a Ray Serve 2.60 ``DeploymentHandle`` that :func:`read_seen_dying` reads."""
        request_router = SimpleNamespace(
            curr_replicas=replicas, _replica_queue_len_cache=SimpleNamespace(_cache=cached)
        )
        return SimpleNamespace(_router=SimpleNamespace(_asyncio_router=SimpleNamespace(_request_router=request_router)))

    reader = RouterReader()
    # the router dropped both replicas after ActorDiedError and still caches their queue lengths
    assert reader.seen_dying(serve_handle([], {"r1": 0, "r2": 1}))
    # the controller's list emptied it (a hot swap, a scale down): the cache went with it
    assert not reader.seen_dying(serve_handle([], {}))
    assert not reader.seen_dying(serve_handle(["r2"], {"r1": 0, "r2": 1}))  # one left: live
    assert not reader.seen_dying(object()) and not reader.seen_dying(SimpleNamespace(_router=None))
    reader.enabled = False
    assert not reader.seen_dying(serve_handle([], {"r1": 0, "r2": 1}))


class SeenDying(Counted):
    """A handle whose router dropped its last replicas itself, on ``ActorDiedError``."""

    replicas = 0

    def replicas_seen_dying(self) -> bool:
        return True


def test_no_replica_because_the_router_saw_them_die_is_answered_without_the_grace() -> None:
    handles = {m: (SeenDying if m == "video" else Counted)(m, None) for m in MODALITIES}
    h = Harness(handles, AppConfig.from_args(None))  # type: ignore[arg-type]
    h.service.unavailable_after_s = 60.0  # a grace this call must not wait out
    start = time.monotonic()
    r = h.request("POST", "/predict", data={"text": "hi"}, files={"video": ("face.mp4", FACE, "video/mp4")})
    assert time.monotonic() - start < 30
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dropped"]["video"].startswith("unavailable: the video encoder has no live replica"), body
    assert handles["video"].payloads == []  # no call was made
    handles["video"].replicas = 1  # a replacement is live: the next outage is judged afresh
    assert h.request("POST", "/predict/video", files={"file": ("face.mp4", FACE, "video/mp4")}).status_code == 200
    assert "video" not in h.service.replicas.seen_dying


class Reconfiguring(Counted):
    """A handle whose router shows no replica until ``back_at`` (a replica leaving it while it reconfigures)."""

    back_at = 0.0

    def live_replicas(self) -> int | None:
        return 0 if time.monotonic() < self.back_at else 1


def test_a_moment_without_replicas_is_waited_out_not_answered_unavailable() -> None:
    handles = {m: Reconfiguring(m, None) for m in MODALITIES}
    h = Harness(handles, AppConfig.from_args(None))  # type: ignore[arg-type]
    handles["text"].back_at = time.monotonic() + 0.2  # shorter than the service's 0.5 s
    start = time.monotonic()
    r = h.request("POST", "/api/predict", json={"text": "hello"})
    assert r.status_code == 200, r.text
    assert time.monotonic() - start >= 0.2 and handles["text"].payloads == ["hello"]


def test_no_replica_for_longer_is_unavailable_and_then_answered_at_once() -> None:
    h = counted()
    h.handles["text"].replicas = 0
    start = time.monotonic()
    first = h.request("POST", "/api/predict", json={"text": "hello"})
    assert time.monotonic() - start >= h.service.unavailable_after_s  # it waited to be sure
    second = h.request("POST", "/api/predict", json={"text": "hello"})
    for r in (first, second):
        assert r.status_code == 503 and "text encoder has no live replica" in r.json()["detail"]
    assert h.handles["text"].payloads == []  # neither request made a call
    h.handles["text"].replicas = 1
    assert h.request("POST", "/api/predict", json={"text": "hello"}).status_code == 200
    assert "text" not in h.service.replicas.none_live_since  # back: the next outage waits again
