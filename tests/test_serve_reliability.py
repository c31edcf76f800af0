"""Live reliability checks (issue 22), each on a real Ray Serve application on 127.0.0.1.

* ``schemathesis run --checks all`` against the live service (one replica of each deployment) finds nothing;
* an over-limit upload sent the way ``urllib`` sends it (no ``Expect: 100-continue``) reads a 413 and its detail;
The kills under load are in ``test_serve_reliability_ha.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.soak import DEPLOYMENTS, replica_pids
from tests.ops_helpers import REPO, SharedServeApp, health_ok, small_upload_args, wait_for

UPLOAD_LIMIT_MB = 1
SERVE_ARGS = small_upload_args(UPLOAD_LIMIT_MB)  # the application of test_serve_api.py, shared (tests/conftest.py)
SCHEMATHESIS_CONFIG = REPO / "tests" / "schemathesis.toml"


# ---- one replica each: schemathesis and the 413 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_url(serve_apps: SharedServeApp) -> Iterator[str]:
    if any(replica_pids(d) for d in DEPLOYMENTS):
        pytest.skip("another Serve application is running on this machine")
    base_url = serve_apps.url(SERVE_ARGS)
    wait_for(lambda: health_ok(base_url), 600, 2, "/api/health ok")
    yield base_url


def test_upload_over_limit_without_expect_reads_413(single_url: str) -> None:
    """urllib/http.client send the whole body, then read: they must read the 413, not a reset."""
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\nRIFF"
    ).encode()
    body = head + b"\x01" * (3 * UPLOAD_LIMIT_MB * 1024 * 1024) + f"\r\n--{boundary}--\r\n".encode()
    host = single_url.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=120)
    try:
        conn.request(
            "POST", "/predict/video", body=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
    finally:
        conn.close()
    assert status == 413
    assert answer == {"detail": f"request body is larger than the {UPLOAD_LIMIT_MB} MB upload limit"}
    # and the service still answers
    assert httpx.post(f"{single_url}/api/predict", json={"text": "still here"}, timeout=120).status_code == 200


def test_schemathesis_finds_nothing(single_url: str, tmp_path: Path) -> None:
    """Every check of schemathesis (OpenAPI-driven fuzzing) against the live service, bounded examples."""
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(exe) if exe.exists() else "schemathesis",
        "--config-file",
        str(SCHEMATHESIS_CONFIG),
        "run",
        f"{single_url}/openapi.json",
        "--checks",
        "all",
        "--seed",
        "22",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    result = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"},
    )
    out = result.stdout + result.stderr
    print(out[-1500:])
    assert result.returncode == 0, out[-6000:]
    assert "No issues found" in out or " passed" in out, out[-3000:]
    assert "Operations:" in out and "6 selected / 6 total" in out, out[-3000:]
