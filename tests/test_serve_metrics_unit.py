"""serve.metrics.Metrics keeps gauges alive: Ray drops a gauge value that is not recorded again."""

from __future__ import annotations

import time
from typing import Any

from serve.metrics import Metrics


class FakeGauge:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str]]] = []

    def set(self, value: float, tags: dict[str, Any]) -> None:
        self.calls.append((value, tags))


def test_a_gauge_set_once_is_recorded_again_until_it_changes() -> None:
    metrics = Metrics(refresh_s=0.05)
    gauge = FakeGauge()
    metrics._objects["emotion_ray_internals_ok"] = gauge
    metrics.set("emotion_ray_internals_ok", 1)
    time.sleep(0.4)
    assert len(gauge.calls) >= 3, gauge.calls  # the set itself, then the refresher's
    assert {value for value, _ in gauge.calls} == {1.0}
    metrics.set("emotion_ray_internals_ok", 0)
    time.sleep(0.2)
    assert gauge.calls[-1] == (0.0, {})
    assert metrics.held_gauges() == {("emotion_ray_internals_ok", ()): 0.0}


def test_refresh_keeps_each_tag_set_apart() -> None:
    metrics = Metrics(refresh_s=0)  # no thread: refresh by hand
    gauge = FakeGauge()
    metrics._objects["emotion_stream_open"] = gauge
    metrics.set("emotion_stream_open", 2, replica="a")
    metrics.set("emotion_stream_open", 5, replica="b")
    gauge.calls.clear()
    metrics.refresh()
    assert sorted(gauge.calls, key=lambda c: c[0]) == [(2.0, {"replica": "a"}), (5.0, {"replica": "b"})]
    assert metrics._refresher is None
