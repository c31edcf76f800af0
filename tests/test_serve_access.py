"""Access control on the live service: the real Serve application with API keys and per-key limits on.

One module-scoped application (``build_app`` reading its keys from a file, as the RayService reads its mounted
Secret, with a small per-key rate limit) on 127.0.0.1 and a free port, and a few seconds of traffic:

1. every prediction endpoint answers 401 without a key and with a wrong one, 200 with a right one;
2. ``/api/health`` without a key reveals no model or version;
3. a burst over one key's limit gets 429 with ``Retry-After`` while another key keeps getting 200;
4. the page in headless Chromium asks for the key, then analyses text (skipped like ``tests/test_web_ui.py``
   when Chromium or Playwright is missing);
5. last, no key appears in any log Ray wrote during the session.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from tests.ops_helpers import REPO, SharedServeApp, wait_for

FIXTURES = REPO / "tests" / "fixtures"
SPEECH = (FIXTURES / "speech.wav").read_bytes()
STILL = (FIXTURES / "face.png").read_bytes()
KEYS = {name: secrets.token_urlsafe(24) for name in ("alice", "bob", "carol", "dave")}
PER_KEY = {"requests_per_minute": 30, "burst": 5, "max_concurrent_uploads": 2}
# Each prediction endpoint with a body that needs no fusion (one modality, or a still image whose audio is dropped).
PREDICTIONS: dict[str, dict[str, Any]] = {
    "/api/predict": {"json": {"text": "I can't believe we finally won the match!"}},
    "/predict": {"data": {"text": "This is wonderful news."}},
    "/predict/audio": {"files": {"file": ("speech.wav", SPEECH, "audio/wav")}},
    "/predict/video": {"files": {"file": ("face.png", STILL, "image/png")}},
}


@dataclass(frozen=True)
class Live:
    """The running application: its address and the folder of this Ray session's logs."""

    base_url: str
    logs_dir: Path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def live(serve_apps: SharedServeApp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The application with keys required (read from a file) and per-key limits, on loopback (on the local Ray of
    ``serve_apps``, which the other live modules' applications replace afterwards: tests/conftest.py)."""
    keys_file = tmp_path_factory.mktemp("secret") / "api-keys"
    keys_file.write_text("# one key per line, as in the Kubernetes Secret\n" + "\n".join(KEYS.values()) + "\n")
    args = {"access": {"api_keys": {"required": True, "env": None, "file": str(keys_file)}, "per_client": PER_KEY}}
    base_url = serve_apps.url(args)
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())

    def healthy() -> bool:
        try:
            r = httpx.get(f"{base_url}/api/health", headers=bearer(KEYS["alice"]), timeout=10)
            return r.json().get("status") == "ok"
        except (httpx.HTTPError, ValueError):
            return False

    wait_for(healthy, 180, 1, "/api/health ok")
    yield Live(base_url, logs_dir)


@pytest.mark.parametrize("path", list(PREDICTIONS))
def test_every_prediction_endpoint_needs_a_valid_key(live: Live, path: str) -> None:
    with httpx.Client(base_url=live.base_url, timeout=120) as http:
        missing = http.post(path, **PREDICTIONS[path])
        wrong = http.post(path, headers={"X-API-Key": secrets.token_urlsafe(24)}, **PREDICTIONS[path])
        right_header = (
            bearer(KEYS["alice"]) if path in ("/api/predict", "/predict/audio") else {"X-API-Key": KEYS["alice"]}
        )
        right = http.post(path, headers=right_header, **PREDICTIONS[path])
    assert missing.status_code == 401 and "API key is required" in missing.json()["detail"]
    assert wrong.status_code == 401 and wrong.json()["detail"] == "the API key is not valid"
    assert right.status_code == 200, right.text
    assert right.json()["modalities"]


def test_health_without_a_key_reveals_no_model_versions(live: Live) -> None:
    keyed = httpx.get(f"{live.base_url}/api/health", headers=bearer(KEYS["alice"]), timeout=30).json()
    versions = [m["version"] for m in keyed["models"].values()]
    assert all(versions) and keyed["api_key_required"] is True
    anonymous = httpx.get(f"{live.base_url}/api/health", timeout=30)
    assert anonymous.status_code == 200
    assert anonymous.json() == {"status": "ok", "api_key_required": True, "models": None, "ray_internals": None}
    assert not [v for v in versions if v in anonymous.text]
    assert httpx.get(f"{live.base_url}/docs", timeout=30).status_code == 200  # the docs and the page stay open
    assert httpx.get(f"{live.base_url}/", timeout=30).status_code == 200


def test_a_burst_over_one_keys_limit_gets_429_while_another_key_is_served(live: Live) -> None:
    async def burst() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=120) as http:

            def post(key: str, i: int) -> Any:
                return http.post("/api/predict", headers=bearer(key), json={"text": f"Again and again, {i} times."})

            answers = await asyncio.gather(
                *(post(KEYS["bob"], i) for i in range(10)), *(post(KEYS["carol"], i) for i in range(2))
            )
            return list(answers[:10]), list(answers[10:])

    bob, carol = asyncio.run(burst())
    statuses = Counter(r.status_code for r in bob)
    assert set(statuses) == {200, 429} and statuses[200] >= PER_KEY["burst"] and statuses[429] >= 3, statuses
    for r in bob:
        if r.status_code == 429:
            assert 1 <= int(r.headers["retry-after"]) <= 2  # one token comes back every 2 s at 30 per minute
            assert "too many requests" in r.json()["detail"]
    assert [r.status_code for r in carol] == [200, 200]


def test_the_page_asks_for_the_key_then_analyses_text(live: Live) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    from tests.test_web_ui import CHROMIUM, CHROMIUM_ARGS, RESULT_TIMEOUT_MS, analyze

    if not os.path.exists(CHROMIUM):
        pytest.skip(
            f"Chromium not found at {CHROMIUM}: install Debian's browser with `apt-get install -y chromium` "
            "(or set CHROMIUM_PATH) to run the web UI tests"
        )
    expect = sync_api.expect
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=live.base_url)
        page = context.new_page()
        page.set_default_timeout(RESULT_TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto("/")
            expect(page.locator("#health")).to_have_attribute("data-state", "locked")
            key_box = page.get_by_label("API key", exact=True)
            expect(key_box).to_be_visible()

            page.get_by_label("Text to analyse").fill("I am so glad you came, this made my whole week!")
            analyze(page)  # without a key: the 401 is explained
            assert page.get_by_role("alert").get_attribute("data-status") == "401"
            expect(page.get_by_role("alert")).to_contain_text("API key")

            key_box.fill(secrets.token_urlsafe(24))
            page.get_by_role("button", name="Use key").click()
            expect(page.locator("#key-status")).to_contain_text("not accepted")

            key_box.fill(KEYS["dave"])
            page.get_by_role("button", name="Use key").click()
            expect(page.locator("#health")).to_have_attribute("data-state", "ok")
            expect(page.locator("#key-form")).to_be_hidden()
            assert page.evaluate("sessionStorage.getItem('emotion-api-key')") == KEYS["dave"]
            assert page.evaluate("localStorage.length") == 0

            analyze(page)
            expect(page.locator("#error")).to_be_hidden()
            expect(page.locator("#result-emotion")).not_to_be_empty()

            other_tab = context.new_page()  # sessionStorage is per tab: a new tab asks again
            other_tab.goto("/")
            expect(other_tab.get_by_label("API key", exact=True)).to_be_visible()
        finally:
            context.close()
            browser.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_no_key_in_any_log_of_the_session(live: Live) -> None:
    """Run last: every file Ray wrote in this session (replica, proxy, controller and worker logs)."""
    files = [p for p in live.logs_dir.rglob("*") if p.is_file()]
    ingress_logs = [p for p in files if "FusionIngress" in p.name]
    assert ingress_logs, f"no FusionIngress log under {live.logs_dir}"
    assert any(b" 401 " in p.read_bytes() for p in ingress_logs), "the refused requests were logged (access log)"
    leaks = [(name, str(p)) for p in files for name, key in KEYS.items() if key.encode() in p.read_bytes()]
    assert not leaks, leaks
