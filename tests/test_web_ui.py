"""The web page at ``/``, driven in headless Chromium (Playwright) against the real Serve application.

Needs Debian's ``chromium`` (``apt-get install -y chromium fonts-noto-color-emoji``); the tests are
skipped with a clear reason when the browser is not there. Playwright's own browser download is not
used (``executable_path`` points at the system Chromium). The screenshot of a fused result is saved
to ``reports/ui.png`` (shown in the README).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ops_helpers import SharedServeApp

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SCREENSHOT = REPO / "reports" / "ui.png"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # A fake microphone and webcam (a beep and a test pattern), granted without a prompt.
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]
RESULT_TIMEOUT_MS = 90_000
SERVE_ARGS: dict = {}  # the CPU defaults; the application is shared with other modules (tests/conftest.py)

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"Chromium not found at {CHROMIUM}: install Debian's browser with `apt-get install -y chromium` "
    "(or set CHROMIUM_PATH) to run the web UI tests",
)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")


@pytest.fixture(scope="module")
def serve_url(serve_apps: SharedServeApp) -> Iterator[str]:
    """The real Serve application (CPU defaults) on a free loopback port, started or reused by ``serve_apps``."""
    url = serve_apps.url(SERVE_ARGS)
    deadline = time.monotonic() + 180
    while True:
        try:
            health = httpx.get(f"{url}/api/health", timeout=10)
            if health.status_code == 200 and health.json().get("status") == "ok":
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the Serve app did not become healthy at {url}")
        time.sleep(1)
    yield url


@contextlib.contextmanager
def chromium_page(base_url: str, width: int = 1280, height: int = 900) -> Iterator[sync_api.Page]:
    """A page of its own headless Chromium on ``base_url``'s home, for apps with fake encoders; any JavaScript
    error on the page fails the test when the block ends."""
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = chromium.new_context(
            viewport={"width": width, "height": height}, base_url=base_url, color_scheme="light"
        )
        pg = context.new_page()
        pg.set_default_timeout(30_000)
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto("/")
        yield pg
        chromium.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    """One headless Chromium for the module."""
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser: sync_api.Browser, serve_url: str) -> Iterator[sync_api.Page]:
    """A fresh page on the app's home, with browser-side errors collected in ``page.js_errors``."""
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, base_url=serve_url, color_scheme="light", device_scale_factor=1
    )
    pg = context.new_page()
    pg.set_default_timeout(RESULT_TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.js_errors = errors  # type: ignore[attr-defined]
    pg.goto("/")
    sync_api.expect(pg.locator("#health")).to_have_attribute("data-state", "ok")
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def analyze(pg: sync_api.Page) -> None:
    """Press the button, check the spinner state, and wait for a result or an error to be rendered."""
    pg.get_by_role("button", name="Analyze emotion").click()
    pg.wait_for_selector("#result:not([hidden]), #error:not([hidden])", timeout=RESULT_TIMEOUT_MS)
    sync_api.expect(pg.locator("#output")).to_have_attribute("aria-busy", "false")


def contributions(pg: sync_api.Page) -> dict[str, float]:
    """The modality contributions as rendered (modality -> percent)."""
    out: dict[str, float] = {}
    for item in pg.locator("#contributions li[data-modality]").all():
        value = item.locator(".contrib-value").inner_text()
        out[str(item.get_attribute("data-modality"))] = float(value.rstrip("%"))
    return out


def test_text_result_matches_the_api(page: sync_api.Page, serve_url: str) -> None:
    sentence = "I can't believe it, we won the championship, this is the best day of my life!"
    page.get_by_label("Text to analyse").fill(sentence)
    analyze(page)

    sync_api.expect(page.locator("#error")).to_be_hidden()
    shown = page.locator("#result-emotion").get_attribute("data-emotion")
    api = httpx.post(f"{serve_url}/predict", data={"text": sentence}, timeout=60).json()
    assert shown == api["emotion"]
    assert page.locator("#result-emotion").inner_text().lower() == api["emotion"]
    shown_confidence = float(page.locator("#result-confidence").inner_text().rstrip("%"))
    assert shown_confidence == pytest.approx(api["confidence"] * 100, abs=0.051)
    assert page.locator("#probabilities li").count() == 7
    top = page.locator("#probabilities li.top")
    assert top.get_attribute("data-emotion") == api["emotion"]
    assert set(contributions(page)) == {"text"}
    assert page.locator("#per-modality tbody tr[data-modality='text']").count() == 1
    assert api["emotion"] in page.locator("#live").inner_text()


def test_audio_and_image_both_contribute(page: sync_api.Page) -> None:
    page.locator("#audio-file").set_input_files(FIXTURES / "speech.wav")
    page.locator("#video-file").set_input_files(FIXTURES / "face.png")
    sync_api.expect(page.locator("#audio-preview audio")).to_be_visible()
    sync_api.expect(page.locator("#video-preview img")).to_be_visible()
    analyze(page)

    sync_api.expect(page.locator("#error")).to_be_hidden()
    shown = contributions(page)
    assert {"audio", "video"} <= set(shown), f"contributions shown: {shown}"
    assert sum(shown.values()) == pytest.approx(100, abs=0.5)
    for modality in ("audio", "video"):
        row = page.locator(f"#per-modality tbody tr[data-modality='{modality}']")
        assert re.search(r"\d ms", row.inner_text()), "per-modality latency is shown"
    sync_api.expect(page.locator("#transcript-text")).to_contain_text("wonderful news")  # what was said

    # Add a sentence and analyse all three together; this fused result is the README's screenshot.
    page.get_by_label("Text to analyse").fill("Thank you so much, this is wonderful news, I am so happy!")
    analyze(page)
    assert {"text", "audio", "video"} <= set(contributions(page))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_corrupt_file_shows_an_error(page: sync_api.Page) -> None:
    page.locator("#video-file").set_input_files(FIXTURES / "corrupt.mp4")
    analyze(page)

    error = page.get_by_role("alert")
    sync_api.expect(error).to_be_visible()
    sync_api.expect(error).to_contain_text("could not be read")
    assert error.get_attribute("data-status") == "400"
    sync_api.expect(page.locator("#result")).to_be_hidden()

    # The page recovers: drop the bad file and a valid request renders a result.
    page.get_by_role("button", name=re.compile("Remove video")).click()
    page.get_by_label("Text to analyse").fill("I am fine, just an ordinary day.")
    analyze(page)
    sync_api.expect(page.locator("#error")).to_be_hidden()
    sync_api.expect(page.locator("#result-emotion")).not_to_be_empty()


def test_too_large_and_unsupported_files_show_clear_errors(page: sync_api.Page) -> None:
    # 415: a plain-text file offered as audio.
    page.locator("#audio-file").set_input_files(
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"just some notes, not a recording\n" * 20}]
    )
    analyze(page)
    error = page.get_by_role("alert")
    sync_api.expect(error).to_contain_text("Unsupported file type")
    assert error.get_attribute("data-status") == "415"
    page.get_by_role("button", name=re.compile("Remove audio")).click()

    # 413: a video over the default 50 MB limit (built inside the page, so nothing big crosses the driver).
    page.evaluate("""() => {
        const bytes = new Uint8Array(51 * 1024 * 1024);
        bytes.set([0, 0, 0, 0x20, 0x66, 0x74, 0x79, 0x70, 0x69, 0x73, 0x6f, 0x6d]);  // an MP4 "ftyp" box
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "huge.mp4", { type: "video/mp4" }));
        const input = document.getElementById("video-file");
        input.files = transfer.files;
        input.dispatchEvent(new Event("change", { bubbles: true }));
    }""")
    analyze(page)
    sync_api.expect(error).to_contain_text("too large")
    assert error.get_attribute("data-status") == "413"


def test_keyboard_phone_width_and_empty_input(browser: sync_api.Browser, serve_url: str) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 740}, base_url=serve_url, has_touch=True)
    pg = context.new_page()
    pg.set_default_timeout(RESULT_TIMEOUT_MS)
    try:
        pg.goto("/")
        # Keyboard only: Tab past the skip link into the text box.
        pg.keyboard.press("Tab")
        pg.keyboard.press("Tab")
        assert pg.evaluate("document.activeElement.id") == "text-input"
        # Nothing given yet: Ctrl+Enter gives a clear message and keeps the focus in the text box.
        pg.keyboard.press("Control+Enter")
        sync_api.expect(pg.get_by_role("alert")).to_contain_text("Nothing to analyse")
        assert pg.evaluate("document.activeElement.id") == "text-input"
        # Type and submit with Ctrl+Enter.
        pg.keyboard.type("I am really scared of what might happen tomorrow.")
        pg.keyboard.press("Control+Enter")
        pg.wait_for_selector("#result:not([hidden])", timeout=RESULT_TIMEOUT_MS)
        sync_api.expect(pg.locator("#error")).to_be_hidden()

        # Readable at phone width: nothing wider than the viewport.
        width = pg.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"page is {width}px wide at a 375px viewport"
    finally:
        context.close()


def test_microphone_and_webcam_capture(page: sync_api.Page) -> None:
    """Chromium's fake devices: record a short microphone clip and take a webcam snapshot, then analyse."""
    page.get_by_role("button", name="Record microphone").click()
    stop = page.get_by_role("button", name="Stop recording")
    sync_api.expect(stop).to_be_visible()
    page.wait_for_timeout(1500)
    stop.click()
    sync_api.expect(page.locator("#audio-preview audio")).to_be_attached()

    page.get_by_role("button", name="Use webcam").click()
    page.wait_for_function("document.getElementById('camera-view').videoWidth > 0")
    page.get_by_role("button", name="Take snapshot").click()
    sync_api.expect(page.locator("#video-preview img")).to_be_visible()
    analyze(page)

    sync_api.expect(page.locator("#error")).to_be_hidden()
    # The recording must be decoded server-side; the test-pattern "face" may be used or reported as dropped.
    used = set(contributions(page))
    dropped = {str(li.get_attribute("data-modality")) for li in page.locator("#dropped li").all()}
    assert "audio" in used | dropped and "video" in used | dropped
    assert used, "at least one captured modality is used"
