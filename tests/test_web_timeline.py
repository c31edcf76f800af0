"""The page's timeline card in headless Chromium against the ingress app with fake encoders (no Ray, no model): an
upload draws the timeline segment by segment with a progress bar, then the summary; clicking a segment plays that
span of the recording. Saves ``reports/ui_timeline.png``.

Skipped like ``tests/test_web_ui.py`` when Chromium is not installed; the real encoders behind the same route are
covered in ``tests/test_serve_timeline.py``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.labels import EMOTIONS
from serve.api import STATIC_DIR, create_app
from tests.synth import tone_wav
from tests.test_serve_api_unit import answer
from tests.test_serve_stream_unit import Server
from tests.test_serve_timeline_unit import make
from tests.test_web_ui import chromium_page, pytestmark, sync_api  # noqa: F401 - the skip

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "reports" / "ui_timeline.png"
SEGMENTS = 6  # an 18 s recording in 3 s segments


@pytest.fixture(scope="module")
def app_url() -> Iterator[str]:
    """The app with a fake audio encoder that answers a different emotion per segment, 0.25 s each, one at a time
    (so the page is seen filling in)."""
    calls = {"n": 0}

    async def audio(payload: bytes) -> dict[str, Any]:
        calls["n"] += 1
        await asyncio.sleep(0.25)
        return answer("audio", EMOTIONS[calls["n"] % len(EMOTIONS)])

    h = make({"timeline": {"segments_in_flight": 1}}, audio=audio)
    h.app = create_app(h.service, h.service.config, static_dir=STATIC_DIR)
    with Server(h.app).running() as server:
        yield f"http://127.0.0.1:{server.port}"


@pytest.fixture()
def page(app_url: str) -> Iterator[sync_api.Page]:
    with chromium_page(app_url) as pg:
        yield pg


def test_an_upload_draws_the_timeline_as_it_fills_and_a_click_plays_the_span(
    page: sync_api.Page, tmp_path: Path
) -> None:
    recording = tmp_path / "call.wav"
    recording.write_bytes(tone_wav(3.0 * SEGMENTS))
    page.locator("#timeline-file").set_input_files(recording)
    select = page.locator("#timeline-segment")
    assert select.input_value() == "speech"  # the default follows the pauses; a tone has none, so 3 s here
    select.select_option("3")
    page.get_by_role("button", name="Analyze timeline").click()

    # filling in: some segments drawn, the progress bar part way, no summary yet
    page.wait_for_function("Number(document.getElementById('timeline-track').dataset.segments) >= 2")
    partial = page.evaluate(
        "() => [Number(document.getElementById('timeline-track').dataset.segments),"
        " document.getElementById('timeline-progress').value, document.getElementById('timeline-progress').max,"
        " document.getElementById('timeline-summary').hidden]"
    )
    assert 2 <= partial[0] < SEGMENTS and partial[1] == partial[0] and partial[2] == SEGMENTS and partial[3]

    sync_api.expect(page.locator("#timeline-summary")).to_be_visible()
    segments = page.locator("#timeline-track .tl-seg")
    sync_api.expect(segments).to_have_count(SEGMENTS)
    assert page.evaluate("document.getElementById('timeline-progress').value") == SEGMENTS
    sync_api.expect(page.locator("#timeline-progress-text")).to_contain_text(f"{SEGMENTS} of {SEGMENTS} segments")
    lefts = [float(s.get_attribute("style").split("left:")[1].split("%")[0]) for s in segments.all()]
    assert lefts == sorted(lefts) and lefts[0] == 0.0 and lefts[1] == pytest.approx(100 / SEGMENTS, abs=0.01)
    emotions = {s.get_attribute("data-emotion") for s in segments.all()}
    assert len(emotions) >= 3  # each segment drawn in its own emotion's colour
    sync_api.expect(page.locator("#timeline-shares li")).to_have_count(len(emotions))
    assert page.locator("#timeline-moments li").count() >= 1

    segments.nth(2).click()  # 6-9 s
    media = page.locator("#timeline-media")
    sync_api.expect(media).to_have_attribute("data-span", "6-9")
    page.wait_for_function("document.getElementById('timeline-media').currentTime >= 6")
    assert page.evaluate("document.getElementById('timeline-media').currentTime") < 9.5
    sync_api.expect(segments.nth(2)).to_have_class(re.compile(r"\bplaying\b"))
    page.locator("#timeline-panel").screenshot(path=str(SCREENSHOT))


def test_the_timeline_fits_a_phone_width(app_url: str, tmp_path: Path) -> None:
    recording = tmp_path / "short.wav"
    recording.write_bytes(tone_wav(6.0))
    with chromium_page(app_url, width=375, height=740) as pg:
        pg.locator("#timeline-file").set_input_files(recording)
        pg.get_by_role("button", name="Analyze timeline").click()
        sync_api.expect(pg.locator("#timeline-summary")).to_be_visible()
        width = pg.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"page is {width}px wide at a 375px viewport"
