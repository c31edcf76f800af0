"""The web page's transcripts, in headless Chromium against the ingress app with fake encoders and transcriber (no
Ray, no model): the upload view shows what was said (and sends the page's `transcribe` choice), and Live asks the
stream for each window's words and shows them under the timeline.

Skipped like ``tests/test_web_ui.py`` when Chromium is not installed; the real models behind the same page are
covered there and in ``tests/test_serve_transcribe.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serve.api import STATIC_DIR, create_app
from tests.test_serve_stream_unit import Server
from tests.test_serve_transcribe_unit import WORDS, Harness, heard
from tests.test_web_ui import chromium_page, pytestmark, sync_api  # noqa: F401 - the skip

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def app() -> Iterator[tuple[str, Harness]]:
    sent: list[Any] = []

    def transcriber(payload: bytes) -> dict[str, Any]:
        sent.append(payload)
        return heard()

    h = Harness({"stream": {"update_interval_s": 0.3}}, transcriber=transcriber)
    h.app = create_app(h.service, h.config, static_dir=STATIC_DIR)
    with Server(h.app).running() as server:
        yield f"http://127.0.0.1:{server.port}", h


@pytest.fixture()
def page(app: tuple[str, Harness]) -> Iterator[sync_api.Page]:
    with chromium_page(app[0]) as pg:
        yield pg


def test_upload_view_shows_the_transcript_and_sends_the_choice(page: sync_api.Page, app: tuple[str, Harness]) -> None:
    page.locator("#audio-file").set_input_files(FIXTURES / "speech.wav")
    page.get_by_label("Words spoken in the audio or video").select_option("fuse")
    page.get_by_role("button", name="Analyze emotion").click()
    sync_api.expect(page.locator("#transcript-block")).to_be_visible()
    sync_api.expect(page.locator("#transcript-text")).to_have_text(WORDS)
    sync_api.expect(page.locator("#transcript-meta")).to_contain_text("used as the text")
    sync_api.expect(page.locator("#per-modality tbody tr[data-modality='text']")).to_contain_text("from the transcript")
    assert app[1].handles["text"].payloads[-1] == WORDS  # the page sent transcribe=fuse: the words went to text

    page.get_by_label("Words spoken in the audio or video").select_option("off")
    page.get_by_role("button", name="Analyze emotion").click()
    sync_api.expect(page.locator("#transcript-block")).to_be_hidden()
    sync_api.expect(page.locator("#per-modality tbody tr[data-modality='text']")).to_have_count(0)


def test_live_shows_each_windows_words_under_the_timeline(page: sync_api.Page, app: tuple[str, Harness]) -> None:
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda f: frames.append(f) if isinstance(f, str) else None))
    page.get_by_role("button", name="Start live").click()
    page.wait_for_function("document.getElementById('live-transcript').dataset.state === 'words'", timeout=30_000)
    sync_api.expect(page.locator("#live-transcript")).to_have_text(WORDS)
    assert {"type": "transcribe", "mode": "return"} in [json.loads(f) for f in frames if f.startswith("{")]
    page.get_by_role("button", name="Stop live").click()
