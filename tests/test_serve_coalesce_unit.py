"""The ingress coalesces concurrent calls to one encoder (serve.service.CallCoalescer); fake handles, no Ray."""

from __future__ import annotations

import asyncio
from typing import Any

from ray.exceptions import ActorDiedError

from serve.config import AppConfig
from serve.schemas import PredictionResponse
from serve.service import FusionService
from tests.test_serve_api_unit import FakeHandle, answer


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
