"""serve/proxy_replay.py: Ray Serve's proxy sends a request again when the replica that had it died."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from serve.proxy_replay import ReplayMiddleware, middlewares, replica_failed


def _start(status: int, content_type: bytes = b"text/plain") -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]}


class FlakyApp:
    """An ASGI app standing in for the proxy: each attempt answers as ``script`` says, recording the body it got."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.bodies: list[bytes] = []

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        step = self.script[min(len(self.bodies), len(self.script)) - 1]
        if step == "raise":
            raise RuntimeError("replica died")
        if step == "nothing":  # the proxy's failure for a dead replica: no response at all
            return
        status, kind = {
            "500": (500, b"text/plain"),
            "503": (503, b"text/plain"),
            "503json": (503, b"application/json"),
            "200": (200, b"application/json"),
        }[step]
        await send(_start(status, kind))
        await send({"type": "http.response.body", "body": json.dumps({"step": step}).encode()})


def run(app: FlakyApp, body: bytes, path: str = "/api/predict", **options: Any) -> list[dict[str, Any]]:
    chunks = [body[:3], body[3:]]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        await asyncio.sleep(3600)  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-length", b"%d" % len(body))],
    }
    middleware = ReplayMiddleware(app, backoff_s=(0.0,), **options)
    asyncio.run(middleware(scope, receive, send))
    return sent


def test_a_request_whose_replica_died_is_sent_again_with_the_same_body() -> None:
    app = FlakyApp(["nothing", "raise", "500", "503", "200"])
    sent = run(app, b'{"text": "hello"}')
    assert app.bodies == [b'{"text": "hello"}'] * 5
    assert sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"step": "200"}
    assert len(sent) == 2  # the failed attempts' answers never reach the client


def test_the_applications_own_answers_pass_through_at_once() -> None:
    for step, status in (("503json", 503), ("200", 200)):
        app = FlakyApp([step])
        sent = run(app, b"{}")
        assert len(app.bodies) == 1 and sent[0]["status"] == status


def test_serves_own_health_answers_are_not_replayed() -> None:
    app = FlakyApp(["503", "200"])
    sent = run(app, b"", path="/-/healthz")
    assert len(app.bodies) == 1 and sent[0]["status"] == 503


def test_attempts_are_bounded() -> None:
    app = FlakyApp(["500"])
    sent = run(app, b"{}", attempts=3)
    assert len(app.bodies) == 3 and sent[0]["status"] == 500  # the last failure is what the client gets
    app = FlakyApp(["raise"])
    with pytest.raises(RuntimeError):
        run(app, b"{}", attempts=2)
    assert len(app.bodies) == 2


def test_a_body_over_the_limit_is_passed_on_whole_and_not_replayed() -> None:
    body = b"x" * 100
    app = FlakyApp(["500", "200"])
    sent = run(app, body, max_body_bytes=10)
    assert app.bodies == [body] and sent[0]["status"] == 500


def test_what_counts_as_a_dead_replica_and_the_proxy_hook() -> None:
    assert replica_failed([]) and replica_failed([_start(500)]) and replica_failed([_start(503)])
    assert not replica_failed([_start(503, b"application/json")]) and not replica_failed([_start(404)])
    assert [m.cls for m in middlewares()] == [ReplayMiddleware]
