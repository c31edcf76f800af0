"""Live reliability checks in ``deploy/serve_config.ha.yaml`` (two replicas of everything), issue 22.

* under load, one ``TextEncoder`` and one ``FusionIngress`` replica process are SIGKILLed: every request must
  get a 2xx or 4xx, none a 5xx or a connection error;
* with no live ``VideoEncoder`` replica, fused requests answer within 2 s with video in ``dropped``
  (``unavailable``), and the replicas come back on their own.

Slow (minutes: ten replicas load their models on two cores). The application runs on the three-node loopback
cluster of ``bench.cluster`` that ``test_ops_faults.py`` uses next (``ha_cluster``, tests/conftest.py): a head with
the controller and Ray Serve's Python proxy with its replay (``serve/proxy_replay.py``, as ``python -m serve.launch
--plain-proxy deploy/serve_config.ha.yaml`` runs it) and two workers holding one replica of each deployment. Its
application name is this run's own, so replica processes are found and killed by pid, as an operator would, and
no other application's on the machine are. A module of its own, so that the one-replica application of
``test_serve_reliability.py`` is gone before this one starts.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from bench import soak
from bench.cluster import LoopbackCluster
from bench.soak import DEPLOYMENTS
from tests.ops_helpers import FIXTURES, SharedHACluster, health_ok, wait_for

SPEECH = (FIXTURES / "speech.wav").read_bytes()
FACE = (FIXTURES / "face.mp4").read_bytes()


# ---- two replicas each: kills under load ---------------------------------------------------------------------


_CLUSTER: list[LoopbackCluster] = []  # the cluster of the ``ha`` fixture, for the helpers below


@pytest.fixture(scope="module")
def ha(ha_cluster: SharedHACluster) -> LoopbackCluster:
    """The HA application (text timeout 90 s: a model loading on the 2 shared cores can starve text longer than
    the shipped 10 s) behind the Python proxy with its replay: HAProxy cannot replay a reset connection."""
    cluster = ha_cluster.get()
    _CLUSTER[:] = [cluster]
    wait_for(lambda: all(len(replica_pids(d)) >= 2 for d in DEPLOYMENTS), 600, 2, "2 replicas of each")
    return cluster


def replica_pids(deployment: str) -> list[int]:
    """The live replica processes of ``deployment`` in the cluster's application."""
    return soak.replica_pids(deployment, _CLUSTER[0].app_name)


def initialized_replicas(deployment: str) -> set[str]:
    """The ``deployment`` replicas of the cluster's application that finished starting (read in its own logs)."""
    return soak.initialized_replicas(deployment, _CLUSTER[0].app_name, _CLUSTER[0].serve_log_dir)


def kill_one(deployment: str, rng: random.Random) -> int | None:
    return soak.kill_one(deployment, rng, _CLUSTER[0].app_name)


def load(base_url: str, stop: threading.Event, results: list[tuple[str, int | None, str]], kind: str) -> None:
    with httpx.Client(base_url=base_url, timeout=120) as http:
        while not stop.is_set():
            try:
                if kind == "text":
                    r = http.post("/api/predict", json={"text": "I am so happy to see you again!"})
                else:
                    r = http.post("/predict/audio", files={"file": ("speech.wav", SPEECH, "audio/wav")})
                results.append((kind, r.status_code, r.text[:200] if r.status_code >= 500 else ""))
            except httpx.HTTPError as exc:
                results.append((kind, None, f"{type(exc).__name__}: {exc}"))


def wait_back(deployment: str, killed: int, started_before: set[str], n: int = 2, timeout_s: float = 600) -> None:
    """Until the killed replica's replacement has *started* (not only its process): the next test measures
    latency, and a replacement still importing torch takes the CPU from the replicas that answer."""
    wait_for(
        lambda: (
            killed not in replica_pids(deployment)
            and len(replica_pids(deployment)) >= n
            and bool(initialized_replicas(deployment) - started_before)
        ),
        timeout_s,
        2,
        f"{deployment} back to {n} replicas, the replacement started",
    )


def kill_under_load(base_url: str, deployment: str) -> tuple[int, list[tuple[str, int | None, str]]]:
    """Six clients (4 text, 2 audio) for 25 s; one ``deployment`` replica SIGKILLed after 10 s."""
    results: list[tuple[str, int | None, str]] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=load, args=(base_url, stop, results, kind), daemon=True)
        for kind in ("text", "text", "text", "text", "audio", "audio")
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(10)
        pid = kill_one(deployment, random.Random(1))
        time.sleep(15)
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    assert pid is not None
    statuses = Counter(s for _, s, _ in results)
    assert len(results) > 50 and statuses[200] > 0, statuses
    return pid, results


def test_killing_a_text_encoder_replica_loses_nothing(ha: LoopbackCluster) -> None:
    started = initialized_replicas("TextEncoder")
    assert len(started) >= 2, started  # the replica logs are where initialized_replicas looks
    pid, results = kill_under_load(ha.base_url, "TextEncoder")
    bad = [r for r in results if r[1] is None or r[1] >= 500]
    assert bad == [], f"{len(bad)} of {len(results)} lost: {Counter(s for _, s, _ in results)}; first: {bad[:5]}"
    assert {s for _, s, _ in results} == {200}
    wait_back("TextEncoder", pid, started)


def test_killing_an_ingress_replica_loses_nothing(ha: LoopbackCluster) -> None:
    started = initialized_replicas("FusionIngress")
    pid, results = kill_under_load(ha.base_url, "FusionIngress")
    wait_back("FusionIngress", pid, started)
    bad = [r for r in results if r[1] is None or r[1] >= 500]
    assert bad == [], f"{len(bad)} of {len(results)} lost: {Counter(s for _, s, _ in results)}; first: {bad[:5]}"


def test_encoder_without_live_replica_is_dropped_within_2s(ha: LoopbackCluster) -> None:
    pids = replica_pids("VideoEncoder")
    assert len(pids) >= 2
    for pid in pids:  # no live video replica left
        os.kill(pid, signal.SIGKILL)
    answers = []  # (seconds, body, whether a replacement replica process existed when it was answered)
    with httpx.Client(base_url=ha.base_url, timeout=120) as http:
        for _ in range(5):
            start = time.monotonic()
            r = http.post(
                "/predict",
                data={"text": "What a lovely surprise!", "transcribe": "off"},  # timed: the encoders' drop only
                files={"audio": ("speech.wav", SPEECH, "audio/wav"), "video": ("face.mp4", FACE, "video/mp4")},
            )
            elapsed = round(time.monotonic() - start, 2)
            assert r.status_code == 200, r.text
            replaced = any(p not in pids for p in replica_pids("VideoEncoder"))
            answers.append((elapsed, r.json(), replaced))
        # per answer: seconds at the client, ms in the ingress, modalities used, why video was dropped, replaced
        summary = [
            (s, b["latency_ms"], sorted(b["contributions"]), b["dropped"].get("video", "")[:80], replaced)
            for s, b, replaced in answers
        ]
        assert max(s for s, _, _ in answers) < 2.0, summary
        # Serve starts replacements on its own (their processes appear some seconds after the kill, and load the
        # model for some more); an answer given while none had even started had no live video replica
        before = [b for _, b, replaced in answers if not replaced]
        assert len(before) >= 3, summary
        for body in before:
            assert set(body["contributions"]) == {"text", "audio"}, summary
            assert body["dropped"]["video"].startswith("unavailable: the video encoder"), summary
        single = http.post(
            "/predict/video",
            files={"file": ("face_noaudio.mp4", (FIXTURES / "face_noaudio.mp4").read_bytes(), "video/mp4")},
        )
        # video dead and the file has no audio track: nothing usable; the client's fault (400) wins over 503
        assert single.status_code == 400, single.text
        assert "video: the video encoder has no live replica" in single.json()["detail"]
    # Serve replaces the killed replicas on its own; then video is used again
    wait_for(
        lambda: len([p for p in replica_pids("VideoEncoder") if p not in pids]) >= 2,
        600,
        2,
        "VideoEncoder replicas replaced",
    )
    wait_for(lambda: health_ok(ha.base_url), 300, 2, "/api/health ok")
    body = wait_for(lambda: _video_used(ha.base_url), 120, 2, "video used again")
    assert body["dropped"] == {}


def _video_used(base_url: str) -> dict[str, Any] | None:
    r = httpx.post(f"{base_url}/predict/video", files={"file": ("face.mp4", FACE, "video/mp4")}, timeout=120)
    body = r.json() if r.status_code == 200 else {}
    return body if "video" in body.get("contributions", {}) else None
