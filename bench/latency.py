"""Single-request latency of a running service, over HTTP: p50/p95 per endpoint -> a JSON report.

Starts nothing: run the service first (``serve run deploy/serve_config.yaml``), then::

    python -m bench.latency --url http://127.0.0.1:8000 --requests 50 --out reports/serve_latency.json

Requests are sent one at a time (no concurrency), after a few warm-up requests, with the test
fixtures as inputs: a short text, 5 s of speech (WAV), a 16-frame face video without audio (the
video encoder alone), plus the same video with its audio track and a fused text+audio+video request
for reference, and the same text with 5 previous turns as ``context`` (``text + 5 turns of context``). The
targets: text <= 20 ms, audio <= 150 ms, video <= 200 ms (p50); audio and video requests ask for no
transcript (``transcribe=off``), and ``audio + transcript`` times the same request with the words.
The report also keeps each encoder's own ``latency_ms`` and the machine's load, since on a shared
machine both matter for reading the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.stats import percentile

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
TARGETS_MS = {"text": 20.0, "audio": 150.0, "video": 200.0}
OFF = {"transcribe": "off"}  # the emotion answer alone; "audio + transcript" times the words too
TEXT = "I can't believe we finally won the match, this is the best day ever!"
CONTEXT = [  # 5 previous turns (about 60 tokens): "text + 5 turns of context" next to "text" alone
    {"speaker": "Sam", "text": "Did you see the final score?"},
    {"speaker": "Alex", "text": "No, I had to leave at half time. We were two goals down."},
    {"speaker": "Sam", "text": "Then you missed the best second half of the season."},
    {"speaker": "Alex", "text": "Wait, what happened?"},
    {"speaker": "Sam", "text": "Three goals in the last twenty minutes. We won 3-2."},
]


def _cases() -> dict[str, Callable[[httpx.Client], httpx.Response]]:
    speech = (FIXTURES / "speech.wav").read_bytes()
    video = (FIXTURES / "face_noaudio.mp4").read_bytes()
    video_av = (FIXTURES / "face.mp4").read_bytes()
    return {
        "text": lambda c: c.post("/api/predict", json={"text": TEXT}),
        "text + 5 turns of context": lambda c: c.post("/api/predict", json={"text": TEXT, "context": CONTEXT}),
        "audio": lambda c: c.post("/predict/audio", data=OFF, files={"file": ("speech.wav", speech, "audio/wav")}),
        "audio + transcript": lambda c: c.post(
            "/predict/audio", data={"transcribe": "return"}, files={"file": ("speech.wav", speech, "audio/wav")}
        ),
        "video": lambda c: c.post("/predict/video", files={"file": ("face_noaudio.mp4", video, "video/mp4")}),
        "video+audio track": lambda c: c.post(
            "/predict/video", data=OFF, files={"file": ("face.mp4", video_av, "video/mp4")}
        ),
        "fused text+audio+video": lambda c: c.post(
            "/predict",
            data={"text": TEXT, **OFF},
            files={"audio": ("speech.wav", speech, "audio/wav"), "video": ("face_noaudio.mp4", video, "video/mp4")},
        ),
    }


ENDPOINTS = {
    "text": "POST /api/predict",
    "text + 5 turns of context": "POST /api/predict",
    "audio": "POST /predict/audio",
    "audio + transcript": "POST /predict/audio",
    "video": "POST /predict/video",
    "video+audio track": "POST /predict/video",
    "fused text+audio+video": "POST /predict",
}


def measure(
    client: httpx.Client, send: Callable[[httpx.Client], httpx.Response], n: int, warmup: int
) -> dict[str, Any]:
    """Send ``warmup`` then ``n`` sequential requests; summarise client and encoder timings."""
    for _ in range(warmup):
        send(client).raise_for_status()
    wall: list[float] = []
    encoder: dict[str, list[float]] = {}
    ingress: list[float] = []
    for _ in range(n):
        start = time.perf_counter()
        response = send(client)
        wall.append((time.perf_counter() - start) * 1000.0)
        response.raise_for_status()
        body = response.json()
        ingress.append(body["latency_ms"])
        for m, result in body["modalities"].items():
            encoder.setdefault(m, []).append(result["latency_ms"])
    return {
        "requests": n,
        "p50_ms": round(percentile(wall, 50), 1),
        "p95_ms": round(percentile(wall, 95), 1),
        "mean_ms": round(statistics.fmean(wall), 1),
        "min_ms": round(min(wall), 1),
        "max_ms": round(max(wall), 1),
        "ingress_p50_ms": round(percentile(ingress, 50), 1),
        "encoder_p50_ms": {m: round(percentile(v, 50), 1) for m, v in encoder.items()},
    }


def run(
    url: str, n: int, warmup: int, client: httpx.Client | None = None, cases: list[str] | None = None
) -> dict[str, Any]:
    """Measure every case (or those named in ``cases``) against the service at ``url`` (or ``client``)."""
    with client or httpx.Client(base_url=url, timeout=60) as http:
        health = http.get("/api/health").json()
        load_before = os.getloadavg()
        results = {}
        for name, send in _cases().items():
            if cases and name not in cases:
                continue
            results[name] = {"endpoint": ENDPOINTS[name], **measure(http, send, n, warmup)}
            if name in TARGETS_MS:
                target = TARGETS_MS[name]
                results[name]["target_p50_ms"] = target
                results[name]["meets_target"] = results[name]["p50_ms"] <= target
            print(
                f"{name:26s} p50 {results[name]['p50_ms']:7.1f} ms  p95 {results[name]['p95_ms']:7.1f} ms"
                + (f"  (target {TARGETS_MS[name]:.0f} ms)" if name in TARGETS_MS else ""),
                flush=True,
            )
        load_after = os.getloadavg()
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "url": url,
        "method": f"{n} sequential single requests per case over HTTP after {warmup} warm-up requests; "
        "client wall time (includes HTTP, proxy, ingress and encoder)",
        "inputs": {
            "text": f"{len(TEXT)} characters",
            "text + 5 turns of context": f"the same text, with {len(CONTEXT)} previous turns as context "
            f"({sum(len(t['text']) for t in CONTEXT)} characters)",
            "audio": "tests/fixtures/speech.wav (5 s, 16 kHz)",
            "video": "tests/fixtures/face_noaudio.mp4 (3 s, 24 frames -> 16 sampled, 192x192)",
            "video+audio track": "tests/fixtures/face.mp4",
            "fused": "text + speech.wav + face_noaudio.mp4",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        },
        "models": {m: s.get("version") for m, s in health.get("models", {}).items()},
        "results": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=50, help="measured requests per case")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "serve_latency.json")
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join(ENDPOINTS)}")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",")] if args.cases else None
    if cases and not set(cases) <= set(ENDPOINTS):
        parser.error(f"unknown case(s): {sorted(set(cases) - set(ENDPOINTS))}")
    report = run(args.url, args.requests, args.warmup, cases=cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
