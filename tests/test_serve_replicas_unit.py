"""The start-up self-check of Ray Serve's router reads (serve/replicas.py) and its fall-back, with fake handles.

The reads themselves against a real Ray Serve router are in ``tests/test_serve_replicas.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from models.labels import MODALITIES
from serve.config import AppConfig
from serve.replicas import OK_GAUGE, RouterReader
from tests.test_serve_api_unit import FakeHandle, Harness, RecordingMetrics
from tests.test_serve_reliability_unit import Counted

LOUD = "RAY SERVE INTERNALS CHANGED"


class Gauges(RecordingMetrics):
    """Records counters (as the harness's double does) and gauge values."""

    def __init__(self) -> None:
        super().__init__()
        self.gauges: list[tuple[str, float]] = []

    def set(self, name: str, value: float, **tags: str) -> None:
        self.gauges.append((name, value))


def harness(handles: dict[str, Any], config: dict[str, Any] | None = None) -> tuple[Harness, Gauges]:
    h = Harness(handles, AppConfig.from_args(config))  # type: ignore[arg-type]
    metrics = Gauges()
    h.service.metrics = metrics
    h.service.router.metrics = metrics
    return h, metrics


@pytest.fixture(autouse=True)
def _serve_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Ray's ``ray.serve`` logger does not propagate to the root logger, where caplog listens."""
    logger = logging.getLogger("ray.serve")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def loud_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and LOUD in r.getMessage()]


def test_readable_router_state_passes_the_check_and_health_says_so(caplog: pytest.LogCaptureFixture) -> None:
    h, metrics = harness({m: Counted(m) for m in MODALITIES})
    assert h.request("GET", "/api/health").json()["ray_internals"] is None  # not checked yet
    health = asyncio.run(h.service.warm_up())
    assert health.ray_internals is not None and health.ray_internals.ok and health.ray_internals.detail is None
    assert metrics.gauges == [(OK_GAUGE, 1.0)]
    assert h.request("GET", "/api/health").json()["ray_internals"] == {"ok": True, "detail": None}
    assert not loud_lines(caplog)
    assert h.service.router.enabled and h.service.router.replicas(h.handles["text"]) == 1


def test_unreadable_router_state_is_loud_and_falls_back_to_retries_and_timeouts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Handles without Serve 2.60's router (what a Ray upgrade that moved it looks like): one error line, the
    gauge at 0, the health field, and no reads any more."""
    h, metrics = harness({m: FakeHandle(m) for m in MODALITIES})
    health = asyncio.run(h.service.warm_up())
    assert health.status == "ok"  # every model answers: the service works, without the fast path
    assert health.ray_internals is not None and not health.ray_internals.ok
    assert "text: AttributeError" in (health.ray_internals.detail or "")
    assert metrics.gauges == [(OK_GAUGE, 0.0)]
    assert len(loud_lines(caplog)) == 1
    body = h.request("GET", "/api/health").json()
    assert body["ray_internals"]["ok"] is False and "_router" in body["ray_internals"]["detail"]
    assert h.request("POST", "/api/predict", json={"text": "still answered"}).status_code == 200


def test_a_count_of_zero_right_after_an_answer_fails_the_check_and_the_fast_path_goes() -> None:
    """Reads that work but say nothing true (0 replicas for an encoder that just answered): the check fails,
    and a 0 no longer drops a modality at once: the call is made, and its answer used."""
    handles = {m: Counted(m) for m in MODALITIES}
    handles["text"].replicas = 0
    h, metrics = harness(handles)
    health = asyncio.run(h.service.warm_up())
    assert health.ray_internals is not None and not health.ray_internals.ok
    assert health.ray_internals.detail == "text: counts 0 replicas right after its encoder answered"
    assert metrics.gauges == [(OK_GAUGE, 0.0)]
    r = h.request("POST", "/api/predict", json={"text": "hello"})
    assert r.status_code == 200, r.text  # with the reads on, this 0 would have answered 503 "no live replica"
    assert handles["text"].payloads == ["hello"]


class Late(Counted):
    """Does not answer ``info`` at warm-up (its model is still loading); answers predictions later."""

    def options(self, method_name: str = "__call__", **_: Any) -> FakeHandle:
        clone = Late(self.modality, self.behaviour)
        clone.method, clone.payloads, clone.replicas = method_name, self.payloads, self.replicas
        return clone

    def remote(self, *args: Any) -> Any:
        if self.method == "info":
            return asyncio.sleep(3600)
        return super().remote(*args)


def test_an_encoder_silent_at_warm_up_is_confirmed_by_its_first_answer() -> None:
    handles = {m: (Late if m == "text" else Counted)(m) for m in MODALITIES}
    h, metrics = harness(handles, {"health_timeout_s": 0.2})
    health = asyncio.run(h.service.warm_up())
    assert health.ray_internals is not None and health.ray_internals.ok
    assert h.service.router.unconfirmed == {"text"}
    assert h.request("POST", "/api/predict", json={"text": "hello"}).status_code == 200
    assert h.service.router.unconfirmed == set() and h.service.router.enabled
    assert metrics.gauges == [(OK_GAUGE, 1.0)]


def test_a_zero_count_read_right_after_a_first_answer_turns_the_reads_off(caplog: pytest.LogCaptureFixture) -> None:
    handle = Late("text")
    metrics = Gauges()
    reader = RouterReader(metrics)
    reader.check({"text": handle}, answered=[])
    assert reader.enabled and reader.unconfirmed == {"text"}
    handle.replicas = 0  # the router says 0 although a call through it was just answered
    reader.confirm("text", handle)
    assert not reader.enabled and reader.unconfirmed == set()
    assert metrics.gauges == [(OK_GAUGE, 1.0), (OK_GAUGE, 0.0)]
    assert len(loud_lines(caplog)) == 1
    report = reader.report()
    assert report is not None and not report.ok
    assert report.detail == "text: counts 0 replicas right after its encoder answered"
    reader.confirm("text", handle)  # once only: no second line
    assert len(loud_lines(caplog)) == 1
