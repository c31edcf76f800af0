"""The web page's Live mode in headless Chromium with a fake microphone and webcam, against the real Serve app.

Start streams the fake devices over ``/ws/stream``; the one-minute timeline fills with updates and the current
answer is shown; Stop ends the stream. Reuses the fixtures (the Serve app, the browser, a fresh page that fails on
JavaScript errors) of ``tests/test_web_ui.py`` and its skip when Chromium is not installed. The live panel is saved
to ``reports/ui_live.png``.
"""

from __future__ import annotations

from models.labels import EMOTIONS
from tests.test_web_ui import REPO, SERVE_ARGS, browser, page, pytestmark, serve_url, sync_api  # noqa: F401 - fixtures

LIVE_SCREENSHOT = REPO / "reports" / "ui_live.png"
POINTS = 4  # updates to see on the timeline


def test_live_mode_fills_the_timeline(page: sync_api.Page) -> None:  # noqa: F811 - the imported fixture
    page.get_by_role("button", name="Start live").click()
    stop = page.get_by_role("button", name="Stop live")
    sync_api.expect(stop).to_be_visible()
    assert stop.get_attribute("aria-pressed") == "true"
    page.wait_for_function(
        f"Number(document.getElementById('live-timeline').dataset.points) >= {POINTS}", timeout=90_000
    )

    timeline = page.locator("#live-timeline")
    dots = timeline.locator("circle.point")
    assert dots.count() >= POINTS
    seqs = [int(dots.nth(i).get_attribute("data-seq") or 0) for i in range(dots.count())]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(dots.nth(i).get_attribute("data-emotion") in EMOTIONS for i in range(dots.count()))
    assert timeline.locator("polyline[data-series='fused']").count() == 1
    series = {
        timeline.locator("polyline.series").nth(i).get_attribute("data-series")
        for i in range(timeline.locator("polyline.series").count())
    }
    assert series & {"audio", "video"}, f"no modality line drawn: {series}"

    # The current answer: an emotion, its confidence and the modalities behind it.
    shown = page.locator("#live-emotion").get_attribute("data-emotion")
    assert shown in EMOTIONS and page.locator("#live-emotion").inner_text().strip().lower() == shown
    assert page.locator("#live-confidence").inner_text().endswith("confidence")
    used = {
        page.locator("#live-modalities li").nth(i).get_attribute("data-modality")
        for i in range(page.locator("#live-modalities li").count())
    }
    assert used and used <= {"audio", "video"}
    sync_api.expect(page.locator("#live-status")).to_contain_text("update")
    # The page asks for each window's words: shown under the timeline (the fake microphone beeps: maybe no words).
    page.wait_for_function("['words', 'silence'].includes(document.getElementById('live-transcript').dataset.state)")
    LIVE_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.locator("#live-panel").screenshot(path=str(LIVE_SCREENSHOT))

    stop.click()
    sync_api.expect(page.get_by_role("button", name="Start live")).to_be_visible()
    sync_api.expect(page.locator("#live-status")).to_contain_text("Live stopped")
    count = int(timeline.get_attribute("data-points") or 0)
    page.wait_for_timeout(2500)  # no more updates once stopped
    assert int(timeline.get_attribute("data-points") or 0) == count
