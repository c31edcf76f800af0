"""``/ws/stream`` against the real Serve application on loopback (Ray, the three encoder deployments, fusion).

1. ``tests/fixtures/face.mp4`` (its JPEG frames and its 16 kHz audio, looped) is streamed in real time and the
   client receives at least one update per second, each with 7 probabilities summing to 1 and contributions
   summing to 1, audio and video both used;
2. a stream that sends a garbage frame is closed with code 1007 and a reason, and one that sends an unknown message
   type with 1003, while a parallel good stream keeps receiving updates, before and after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from bench.stream import FRAME, StreamMedia, StreamResult, load_media, stream_media, ws_url
from models.labels import EMOTIONS
from tests.ops_helpers import SharedServeApp

STREAM_S = 6.0  # seconds of media sent per stream (the 3 s clip, twice)
INTERVAL_S = 1.0  # the default update interval
SERVE_ARGS: dict = {}  # the defaults; the application is shared with other modules (tests/conftest.py)


@pytest.fixture(scope="module")
def base_url(serve_apps: SharedServeApp) -> Iterator[str]:
    url = serve_apps.url(SERVE_ARGS)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=10).json().get("status") == "ok":
                break
        except (httpx.HTTPError, ValueError):
            pass
        assert time.monotonic() < deadline, "the Serve app did not become healthy"
        time.sleep(1)
    # One short stream first: the first calls of each encoder replica are slower (lazy initialisation).
    asyncio.run(stream_media(ws_url(url), load_media(), 2.0))
    yield url


@pytest.fixture(scope="module")
def media() -> StreamMedia:
    return load_media()


def check_update(update: dict) -> None:
    probs = update["probabilities"]
    assert set(probs) == set(EMOTIONS) and len(probs) == 7
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)
    assert update["emotion"] == max(probs, key=probs.get)
    assert update["confidence"] == pytest.approx(probs[update["emotion"]], abs=1e-6)
    contributions = update["contributions"]
    assert contributions and set(contributions) <= {"audio", "video"}
    assert sum(contributions.values()) == pytest.approx(1.0, abs=1e-4)
    assert set(update["modalities"]) == set(contributions)
    window = update["window"]
    assert 0.0 <= window["start_s"] <= window["end_s"]
    assert window["audio_s"] <= 3.0 and window["frames"] <= 8 and not window["text"]


def test_face_video_streamed_in_real_time_gets_an_update_every_second(base_url: str, media: StreamMedia) -> None:
    result = asyncio.run(stream_media(ws_url(base_url), media, STREAM_S, tail_s=INTERVAL_S))
    assert result.messages[0][1]["type"] == "ready"
    assert result.errors == []
    updates = result.updates
    # Connected for STREAM_S + one interval: at least one update per second of it.
    assert len(updates) >= STREAM_S, [(round(t, 2), m.get("seq")) for t, m in result.messages]
    for update in updates:
        check_update(update)
    assert [u["seq"] for u in updates] == sorted({u["seq"] for u in updates})
    # The window slides: later updates cover later spans, and the full window (3 s, 8 frames) is reached.
    ends = [u["window"]["end_s"] for u in updates]
    assert ends == sorted(ends) and ends[-1] >= STREAM_S - 1.0
    assert any(u["window"]["audio_s"] >= 2.9 and u["window"]["frames"] == 8 for u in updates)
    assert any(set(u["contributions"]) == {"audio", "video"} for u in updates), "audio and video both used"


def test_garbage_frames_are_closed_while_a_parallel_stream_keeps_updating(base_url: str, media: StreamMedia) -> None:
    url = ws_url(base_url)

    async def together() -> tuple[StreamResult, StreamResult, StreamResult]:
        good = stream_media(url, media, STREAM_S, tail_s=INTERVAL_S)
        bad_jpeg = stream_media(url, media, STREAM_S, garbage_at_s=2.0, garbage=FRAME + b"\x00garbage" * 100)
        bad_type = stream_media(url, media, STREAM_S, garbage_at_s=2.5, garbage=b"\x09" + bytes(64))
        return await asyncio.gather(good, bad_jpeg, bad_type)

    good, bad_jpeg, bad_type = asyncio.run(together())
    assert bad_jpeg.close_code == 1007 and "not a JPEG" in (bad_jpeg.close_reason or ""), bad_jpeg
    assert bad_type.close_code == 1003 and "unknown binary message type 0x09" in (bad_type.close_reason or "")
    assert good.close_code == 1000 and good.errors == []
    assert len(good.updates) >= STREAM_S
    for update in good.updates:
        check_update(update)
    closed_at = max(bad_jpeg.closed_at or 0.0, bad_type.closed_at or 0.0)
    assert closed_at > 0
    assert sum(t > closed_at for t in good.update_times()) >= 2, "the good stream kept receiving updates"
