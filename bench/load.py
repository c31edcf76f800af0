"""Closed-loop HTTP load: N concurrent asyncio clients (aiohttp) against one endpoint, loopback only.

Each client sends its next request as soon as its previous one is answered. A cell stops after
``max_requests`` requests or ``max_duration_s`` seconds, whichever comes first; ``warmup``
requests before it are not recorded.

The load generator shares the machine's cores with the server it measures, so it is kept cheap: each
distinct request body is encoded once (by httpx, whose request building the tests check), and aiohttp sends
it. On the 2-core machine of ``reports/bench.md`` aiohttp spends about 0.1 ms of CPU per request where an
``httpx.AsyncClient`` spent 1.4-2 ms, CPU the server under test would otherwise lose to its client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx

from bench.inputs import TEXTS, MediaInputs
from bench.stats import LoadResult
from models.labels import MODALITIES

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Endpoint:
    """One REST endpoint of the service and the modalities one of its requests needs."""

    key: str
    path: str
    modalities: tuple[str, ...]
    description: str


# The video fixture has an audio track; the service (and the naive server) run the audio encoder on it too.
ENDPOINTS: dict[str, Endpoint] = {
    "text": Endpoint("text", "/api/predict", ("text",), 'JSON {"text"}'),
    "audio": Endpoint("audio", "/predict/audio", ("audio",), "5 s speech WAV"),
    "video": Endpoint("video", "/predict/video", ("video", "audio"), "16-frame face MP4 with audio track"),
    "fused": Endpoint("fused", "/predict", MODALITIES, "text + WAV + MP4 in one multipart"),
}


def request_factory(endpoint: Endpoint, media: MediaInputs) -> Callable[[int], dict[str, Any]]:
    """A function ``i -> keyword arguments of httpx.AsyncClient.post`` for the ``i``-th request.

    Media requests ask for no transcript (``transcribe=off``): the benchmark measures the emotion path, which the
    naive server also has; transcript latency has its own command (``python -m bench.transcribe``).
    """
    audio = ("file", (PurePath(media.audio_name).name, media.audio, "audio/wav"))
    video = ("file", (PurePath(media.video_name).name, media.video, "video/mp4"))
    off = {"transcribe": "off"}
    if endpoint.key == "text":
        return lambda i: {"json": {"text": TEXTS[i % len(TEXTS)]}}
    if endpoint.key == "audio":
        return lambda i: {"files": [audio], "data": off}
    if endpoint.key == "video":
        return lambda i: {"files": [video], "data": off}
    if endpoint.key == "fused":
        return lambda i: {
            "data": {"text": TEXTS[i % len(TEXTS)], **off},
            "files": [("audio", audio[1]), ("video", video[1])],
        }
    raise KeyError(endpoint.key)


def encode_request(kwargs: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The body and content type that ``httpx`` would send for these ``post`` keyword arguments."""
    request = httpx.Request("POST", "http://127.0.0.1/", **kwargs)
    return request.read(), {"Content-Type": request.headers["content-type"]}


def inspect_answer(response: httpx.Response | bytes, endpoint: Endpoint) -> tuple[list[str], dict[str, int]]:
    """What a 200 answer says about the work done: modalities it lacks, and each encoder's batch size.

    Answers lacking a modality the request carried (dropped on timeout or error) are still counted as
    successes, but reported, so that a server cannot look fast by skipping work. ``batch_size`` is the
    size of the ``@serve.batch`` forward that served the request, when the answer says so.
    """
    try:
        body = response if isinstance(response, bytes) else response.content
        used = json.loads(body).get("modalities") or {}
    except (ValueError, AttributeError):
        return ["unparseable"], {}
    missing = [m for m in endpoint.modalities if m not in used]
    batches = {m: int(v["batch_size"]) for m, v in used.items() if isinstance(v, dict) and v.get("batch_size")}
    return missing, batches


def missing_modalities(response: httpx.Response | bytes, endpoint: Endpoint) -> list[str]:
    """Modalities the endpoint should have used but a 200 answer lacks (see :func:`inspect_answer`)."""
    return inspect_answer(response, endpoint)[0]


def check_loopback(base_url: str) -> None:
    """Refuse to send load anywhere but this machine."""
    host = urlsplit(base_url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"load is only sent to loopback, not to {host!r}")


async def run_load(
    base_url: str,
    endpoint: Endpoint,
    media: MediaInputs,
    concurrency: int,
    max_requests: int,
    max_duration_s: float,
    warmup: int = 0,
    timeout_s: float = 120.0,
    target: str = "",
) -> LoadResult:
    """Drive ``endpoint`` with ``concurrency`` closed-loop clients and return what was measured."""
    check_loopback(base_url)
    make = request_factory(endpoint, media)
    distinct = len(TEXTS) if endpoint.key in ("text", "fused") else 1
    bodies = [encode_request(make(i)) for i in range(distinct)]
    url = base_url.rstrip("/") + endpoint.path
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    error_samples: list[str] = []
    degraded: Counter[str] = Counter()
    batch_sizes: dict[str, list[int]] = {}
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as client:

        async def one(i: int, record: bool) -> float:
            nonlocal errors
            data, headers = bodies[i % distinct]
            t0 = time.perf_counter()
            try:
                async with client.post(url, data=data, headers=headers) as response:
                    body = await response.read()
                code = response.status
                status = str(code)
                failed = code != 200
                detail = body[:200].decode(errors="replace") if failed else ""
                missing, batch = ([], {}) if failed else inspect_answer(body, endpoint)
            except (TimeoutError, aiohttp.ClientError) as exc:
                status, failed, detail, missing, batch = type(exc).__name__, True, str(exc)[:200], [], {}
            end = time.perf_counter()
            if record:
                statuses[status] += 1
                if missing:
                    degraded[",".join(missing)] += 1
                for m, size in batch.items():
                    batch_sizes.setdefault(m, []).append(size)
                if failed:
                    errors += 1
                    if len(error_samples) < 5:
                        error_samples.append(f"{status}: {detail}")
                else:
                    latencies.append((end - t0) * 1000.0)
            return end

        async def clients(total: int, deadline: float | None, record: bool) -> tuple[float, float]:
            issued = 0
            last_end = time.perf_counter()

            async def worker() -> None:
                nonlocal issued, last_end
                while issued < total and (deadline is None or time.perf_counter() < deadline):
                    i = issued
                    issued += 1
                    last_end = max(last_end, await one(i, record))

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(min(concurrency, max(total, 1)))))
            return start, last_end

        if warmup > 0:
            await clients(warmup, None, record=False)
        start = time.perf_counter()
        start, end = await clients(max_requests, start + max_duration_s, record=True)
    return LoadResult(
        target=target,
        endpoint=endpoint.key,
        concurrency=concurrency,
        latencies_ms=latencies,
        errors=errors,
        elapsed_s=max(end - start, 1e-9),
        status_counts=dict(statuses),
        error_samples=error_samples,
        extra={
            "path": endpoint.path,
            "max_requests": max_requests,
            "max_duration_s": max_duration_s,
            "answers_missing_modalities": dict(degraded),
            "mean_batch_size": {m: round(sum(v) / len(v), 2) for m, v in batch_sizes.items()},
        },
    )
