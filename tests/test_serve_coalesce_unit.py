"""The ingress coalesces concurrent calls to one encoder (serve.coalesce.CallCoalescer); fake handles, no Ray."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from ray.exceptions import ActorDiedError

from serve import service as service_module
from serve.api import create_app
from serve.coalesce import CallCoalescer
from serve.config import AppConfig
from serve.schemas import PredictionResponse
from serve.service import FusionService
from serve.stream import StreamSession
from tests.test_serve_api_unit import FakeHandle, RecordingMetrics, answer


class Recording(FakeHandle):
    """A fake handle that records each call (method, payload) and answers after ``delay_s``."""

    def __init__(self, modality: str, delay_s: float = 0.02, fail_lists: int = 0) -> None:
        super().__init__(modality)
        self.calls: list[tuple[str, Any]] = []
        self.delay_s = delay_s
        self.fail_lists = fail_lists

    def options(self, method_name: str = "__call__", **_: Any) -> FakeHandle:
        clone = Recording(self.modality, self.delay_s, self.fail_lists)
        clone.method, clone.calls, clone.payloads = method_name, self.calls, self.payloads
        clone.shared = self  # type: ignore[attr-defined]
        return clone

    def remote(self, *args: Any) -> Any:
        if self.method == "info":
            return super().remote(*args)

        async def go() -> Any:
            self.calls.append((self.method, args[0]))
            await asyncio.sleep(self.delay_s)
            if self.method == "encode_many":
                owner = getattr(self, "shared", self)
                if owner.fail_lists:
                    owner.fail_lists -= 1
                    raise ActorDiedError()
                return [answer(self.modality) for _ in args[0]]
            return answer(self.modality)

        return go()


def _service(handle: Recording, **text: Any) -> FusionService:
    config = AppConfig.from_args({"encoders": {"text": {"max_batch_size": 4, "max_ongoing_requests": 8, **text}}})
    return FusionService({"text": handle, "audio": FakeHandle("audio"), "video": FakeHandle("video")}, config)


def _predict_all(service: FusionService, n: int) -> list[PredictionResponse]:
    async def go() -> list[PredictionResponse]:
        return list(await asyncio.gather(*(service.predict({"text": f"t{i}"}) for i in range(n))))

    return asyncio.run(go())


def test_concurrent_requests_leave_together_in_list_calls() -> None:
    handle = Recording("text")
    answers = _predict_all(_service(handle, calls_per_replica=1), 7)
    assert len(answers) == 7 and all(a.emotion == "happy" for a in answers)
    # one slot: the first request leaves alone, the six that waited leave as lists of at most max_batch_size (4)
    assert handle.calls[0] == ("__call__", "t0")
    lists = [payload for method, payload in handle.calls[1:]]
    assert [method for method, _ in handle.calls[1:]] == ["encode_many", "encode_many"]
    assert lists == [["t1", "t2", "t3", "t4"], ["t5", "t6"]]


def test_coalescing_off_sends_one_call_per_request() -> None:
    handle = Recording("text")
    _predict_all(_service(handle, calls_per_replica=0), 5)
    assert [method for method, _ in handle.calls] == ["__call__"] * 5


def test_a_failed_list_call_is_retried_request_by_request() -> None:
    handle = Recording("text", fail_lists=1)
    answers = _predict_all(_service(handle, calls_per_replica=1), 4)
    assert len(answers) == 4 and all(a.dropped == {} for a in answers)
    assert handle.calls[1][0] == "encode_many"  # this one died; its three requests were sent again
    resent = [p for _, p in handle.calls[2:]]
    flat = [x for p in resent for x in (p if isinstance(p, list) else [p])]
    assert sorted(flat) == ["t1", "t2", "t3"]


class _Socket:
    """A live stream's client, in process: it changes the stream's text every 20 ms until :meth:`leave`."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._left = asyncio.Event()
        self._n = 0

    async def receive(self) -> dict[str, Any]:
        try:
            await asyncio.wait_for(self._left.wait(), 0.02)
        except TimeoutError:
            self._n += 1
            return {"type": "websocket.receive", "text": json.dumps({"type": "text", "text": f"live {self._n}"})}
        return {"type": "websocket.disconnect"}

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    def leave(self) -> None:
        self._left.set()


class Concurrent(Recording):
    """A :class:`Recording` handle that also notes the most calls it had in flight at once."""

    def __init__(self, modality: str, delay_s: float = 0.02, in_flight: dict[str, int] | None = None) -> None:
        super().__init__(modality, delay_s)
        self.in_flight = in_flight if in_flight is not None else {"now": 0, "max": 0}

    def options(self, method_name: str = "__call__", **_: Any) -> FakeHandle:
        clone = Concurrent(self.modality, self.delay_s, self.in_flight)
        clone.method, clone.calls, clone.payloads = method_name, self.calls, self.payloads
        return clone

    def remote(self, *args: Any) -> Any:
        call = super().remote(*args)

        async def go() -> Any:
            self.in_flight["now"] += 1
            self.in_flight["max"] = max(self.in_flight["max"], self.in_flight["now"])
            try:
                return await call
            finally:
                self.in_flight["now"] -= 1

        return go()


class Observed(RecordingMetrics):
    def __init__(self) -> None:
        super().__init__()
        self.observed: list[tuple[str, dict[str, str]]] = []

    def observe(self, name: str, value: float, **tags: str) -> None:
        self.observed.append((name, tags))


def test_a_live_stream_shares_the_http_paths_coalescer(monkeypatch: pytest.MonkeyPatch) -> None:
    """An open stream's updates go through the same coalescer as HTTP requests: none is made after warm-up, and
    HTTP requests still leave in lists while the stream updates (its calls count in the same in-flight total)."""
    made: list[Any] = []

    class Counted(CallCoalescer):
        def __init__(self, handle: Any, *args: Any, **kwargs: Any) -> None:
            made.append(handle)
            super().__init__(handle, *args, **kwargs)

    monkeypatch.setattr(service_module, "CallCoalescer", Counted)
    handle = Concurrent("text", delay_s=0.1)
    config = AppConfig.from_args(
        {
            "encoders": {"text": {"max_batch_size": 8, "max_ongoing_requests": 8, "calls_per_replica": 1}},
            "stream": {"update_interval_s": 0.1},
        }
    )
    metrics = Observed()
    service = FusionService(
        {"text": handle, "audio": FakeHandle("audio"), "video": FakeHandle("video")},
        config,
        metrics,  # type: ignore[arg-type]
    )
    asyncio.run(service.warm_up())
    made_before = len(made)
    coalescer = service._coalescers["text"]
    app = create_app(service, config)
    statuses: list[int] = []

    async def go() -> None:
        socket = _Socket()
        stream = asyncio.create_task(StreamSession(socket, service, config).run())  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for round_ in range(8):  # 8 bursts of 16 concurrent HTTP requests while the stream updates
                answers = await asyncio.gather(
                    *(client.post("/api/predict", json={"text": f"http {round_}-{i}"}) for i in range(16))
                )
                statuses.extend(a.status_code for a in answers)
        socket.leave()
        assert await stream is None  # the client left; the stream ended cleanly
        updates = [m for m in socket.sent if m["type"] == "update"]
        assert len(updates) >= 3, socket.sent  # the stream really was updating during the HTTP load
        assert all(u["modalities"]["text"]["emotion"] for u in updates)

    asyncio.run(go())
    assert statuses == [200] * 128
    assert made_before == 3 and len(made) == made_before, "a coalescer was made after warm-up"
    # One coalescer, one in-flight count: beyond the one plain slot, only full lists leave (up to the cap of 8).
    assert handle.in_flight["max"] <= 8, handle.in_flight
    assert service._coalescers["text"] is coalescer and coalescer.handle is handle and coalescer.in_flight == 0
    lists = [p for method, p in handle.calls if method == "encode_many"]
    http_in_lists = [x for p in lists for x in p if x.startswith("http")]
    http_alone = [p for method, p in handle.calls if method == "__call__" and p.startswith("http")]
    assert len(http_in_lists) + len(http_alone) == 128
    assert sum(len(p) for p in lists) / len(lists) >= 6, lists  # HTTP batches still form
    assert len(http_alone) <= 8 + 2, http_alone  # about one lone call per burst: the rest left in lists
    # the stream's per-modality timings still reach its metric
    observed = {tags.get("modality") for name, tags in metrics.observed if name == "emotion_stream_update_latency_ms"}
    assert {"text", "fused"} <= observed
