"""Soak run: mixed load on every endpoint (bad inputs mixed in) while one replica of each deployment is killed.

    python -m bench.soak                       # 10 min on deploy/serve_config.ha.yaml, writes reports/soak.json
    python -m bench.soak --duration 120 --clients 4 --config deploy/serve_config.yaml

It starts ``serve run`` of the config on a free loopback port (a fresh local Ray, as ``bench.run`` does; behind Ray
Serve's Python proxy with its replay, as ``python -m serve.launch --plain-proxy`` runs it, or ``--ingress
haproxy``), waits until every model is loaded, then runs ``--clients`` closed-loop clients for ``--duration``
seconds. Each request
is drawn from :data:`MIX` (text, audio, video, fused, health, and bad inputs: blank text, a missing field, a
corrupt video, a text file as audio, an over-limit upload, a wrong method). Along the way one replica process of
each deployment is killed with SIGKILL, evenly spaced (``--no-kills`` to skip). The upload limit is set to 1 MB
for the run so an over-limit body is cheap to send (the only change to the config's ``args``).

``reports/soak.json`` holds: requests sent, answers by status (per kind too), lost requests (no HTTP answer, or a
5xx: neither served nor refused for its input), the longest gap without any answer per endpoint, every kill
(time, pid, how long until the deployment had its replicas again) and each replica process's resident memory at
the start and the end (the killed ones are replaced, so the sets differ; ``growth_mb`` compares the replicas
alive at both).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.inputs import REPO_ROOT
from bench.servers import INGRESS_MODES, serve_server

HA_CONFIG = REPO_ROOT / "deploy" / "serve_config.ha.yaml"
DEPLOYMENTS = ("TextEncoder", "AudioEncoder", "VideoEncoder", "FusionIngress")
FIXTURES = REPO_ROOT / "tests" / "fixtures"
UPLOAD_LIMIT_MB = 1


# ---- replica processes --------------------------------------------------------------------------------------


def replica_pids(deployment: str, app: str = "emotion") -> list[int]:
    """PIDs of the live replica processes of ``deployment`` (Ray names them ``ray::ServeReplica:<app>:<name>``)."""
    marker = f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().split(") ", 1)[1][:1]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return sorted(pids)


def ray_serve_log_dir() -> Path:
    """Ray Serve's log folder of the newest local Ray session (where ``serve run`` writes replica logs)."""
    try:
        from ray._common.utils import get_default_ray_temp_dir

        root = Path(get_default_ray_temp_dir())
    except ImportError:  # Ray moved it: its default
        root = Path("/tmp/ray")
    return root / "session_latest" / "logs" / "serve"


def initialized_replicas(deployment: str, app: str = "emotion", log_dir: Path | None = None) -> set[str]:
    """IDs of the ``deployment`` replicas that finished starting (their Serve log in ``log_dir`` says so; by
    default :func:`ray_serve_log_dir`, the newest local Ray session's, which another Ray started later replaces).

    A replica's process (:func:`replica_pids`) appears well before that: on a busy machine its imports and
    model loading take seconds to tens of seconds more, and Serve routes to it only once it is initialized.
    """
    done = set()
    for path in (log_dir or ray_serve_log_dir()).glob(f"replica_{app}_{deployment}_*.log"):
        try:
            with path.open("rb") as fh:
                head = fh.read(1 << 16)  # the line comes among the first of the file
        except OSError:
            continue
        if b"Finished initializing replica" in head:
            done.add(path.stem.rsplit("_", 1)[1])
    return done


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MB (``None`` if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def replica_memory() -> dict[str, dict[str, float | None]]:
    """``{deployment: {pid: RSS MB}}`` for every live replica."""
    return {d: {str(pid): rss_mb(pid) for pid in replica_pids(d)} for d in DEPLOYMENTS}


def kill_one(deployment: str, rng: random.Random, app: str = "emotion") -> int | None:
    """SIGKILL one replica process of ``deployment`` (of application ``app``); returns its pid (``None``: none
    found)."""
    pids = replica_pids(deployment, app)
    if not pids:
        return None
    pid = rng.choice(pids)
    os.kill(pid, signal.SIGKILL)
    return pid


# ---- the request mix ---------------------------------------------------------------------------------------


def _multipart(field_name: str, name: str, data: bytes, content_type: str) -> dict[str, Any]:
    return {"files": {field_name: (name, data, content_type)}}


def build_mix() -> list[tuple[str, str, str, dict[str, Any], float]]:
    """``(kind, method, path, httpx kwargs, weight)`` of every request kind sent."""
    speech = (FIXTURES / "speech.wav").read_bytes()
    face = (FIXTURES / "face.mp4").read_bytes()
    corrupt = (FIXTURES / "corrupt.mp4").read_bytes()
    big = b"RIFF" + b"\x01" * (UPLOAD_LIMIT_MB * 1024 * 1024 + 1000)
    return [
        ("text", "POST", "/api/predict", {"json": {"text": "I am so happy to see you again!"}}, 30),
        ("audio", "POST", "/predict/audio", _multipart("file", "speech.wav", speech, "audio/wav"), 12),
        ("video", "POST", "/predict/video", _multipart("file", "face.mp4", face, "video/mp4"), 6),
        (
            "fused",
            "POST",
            "/predict",
            {
                "data": {"text": "This is terrible."},
                "files": {"audio": ("speech.wav", speech, "audio/wav"), "video": ("face.mp4", face, "video/mp4")},
            },
            6,
        ),
        ("health", "GET", "/api/health", {}, 5),
        ("blank_text", "POST", "/api/predict", {"json": {"text": "   "}}, 5),
        ("missing_field", "POST", "/api/predict", {"json": {"txt": "hi"}}, 3),
        ("corrupt_video", "POST", "/predict/video", _multipart("file", "corrupt.mp4", corrupt, "video/mp4"), 3),
        (
            "text_as_audio",
            "POST",
            "/predict/audio",
            _multipart("file", "notes.txt", b"hello, not audio", "text/plain"),
            3,
        ),
        ("too_large", "POST", "/predict/audio", _multipart("file", "big.wav", big, "audio/wav"), 1),
        ("wrong_method", "GET", "/api/predict", {}, 2),
    ]


@dataclass
class Record:
    kind: str
    path: str
    start: float
    end: float
    status: int | None
    error: str | None = None


@dataclass
class Run:
    records: list[Record] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)


def client_loop(base_url: str, mix: list[Any], stop_at: float, run: Run, seed: int, timeout_s: float) -> None:
    rng = random.Random(seed)
    weights = [m[4] for m in mix]
    with httpx.Client(base_url=base_url, timeout=timeout_s) as http:
        while time.monotonic() < stop_at:
            kind, method, path, kwargs, _ = rng.choices(mix, weights)[0]
            start = time.monotonic()
            try:
                response = http.request(method, path, **kwargs)
                run.add(Record(kind, path, start, time.monotonic(), response.status_code))
            except httpx.HTTPError as exc:
                run.add(Record(kind, path, start, time.monotonic(), None, f"{type(exc).__name__}: {exc}"[:200]))


def longest_gaps(records: list[Record], t0: float, t1: float) -> dict[str, float]:
    """Per endpoint: the longest time (s) in [t0, t1] without any answer completing."""
    ends: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.status is not None:
            ends[r.path].append(r.end)
    gaps = {}
    for path in {r.path for r in records}:
        times = [t0, *sorted(ends.get(path, [])), t1]
        gaps[path] = round(max(b - a for a, b in itertools.pairwise(times)), 2)
    return gaps


def summarize(
    run: Run,
    t0: float,
    t1: float,
    kills: list[dict[str, Any]],
    memory_start: dict[str, Any],
    memory_end: dict[str, Any],
    settings: dict[str, Any],
) -> dict[str, Any]:
    records = run.records
    by_status = Counter(str(r.status) if r.status is not None else "no_answer" for r in records)
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        by_kind[r.kind][str(r.status) if r.status is not None else "no_answer"] += 1
    lost = [r for r in records if r.status is None or r.status >= 500]
    growth = {}
    for d in DEPLOYMENTS:
        both = set(memory_start.get(d, {})) & set(memory_end.get(d, {}))
        growth[d] = {pid: round((memory_end[d][pid] or 0) - (memory_start[d][pid] or 0), 1) for pid in sorted(both)}
    return {
        "settings": settings,
        "duration_s": round(t1 - t0, 1),
        "requests_sent": len(records),
        "answers_by_status": dict(sorted(by_status.items())),
        "answers_by_kind": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
        "lost_requests": len(lost),
        "lost": [
            {"kind": r.kind, "at_s": round(r.start - t0, 2), "status": r.status, "error": r.error} for r in lost[:50]
        ],
        "longest_gap_without_answer_s": longest_gaps(records, t0, t1),
        "kills": kills,
        "replica_memory_mb": {"start": memory_start, "end": memory_end, "growth_mb": growth},
    }


def soak(
    base_url: str,
    duration_s: float,
    clients: int,
    kill: bool,
    seed: int = 0,
    timeout_s: float = 120.0,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Drive the service at ``base_url`` (already up) and return the report."""
    rng = random.Random(seed)
    mix = build_mix()
    run = Run()
    memory_start = replica_memory()
    replicas_at_start = {d: len(v) for d, v in memory_start.items()}
    t0 = time.monotonic()
    stop_at = t0 + duration_s
    threads = [
        threading.Thread(target=client_loop, args=(base_url, mix, stop_at, run, seed + i, timeout_s), daemon=True)
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    kills: list[dict[str, Any]] = []

    def watch_recovery() -> None:
        """Note how long each killed deployment took to have its replicas again."""
        for k in kills:
            if k["back_after_s"] is None:
                pids = replica_pids(k["deployment"])
                if k["pid"] not in pids and len(pids) >= (k["replicas_before"] or 1):
                    k["back_after_s"] = round(time.monotonic() - t0 - k["at_s"], 1)

    if kill:
        order = list(DEPLOYMENTS)
        for i, deployment in enumerate(order):
            at = t0 + duration_s * (i + 1) / (len(order) + 1)
            while time.monotonic() < at:
                watch_recovery()
                time.sleep(1.0)
            pid = kill_one(deployment, rng)
            kills.append(
                {
                    "deployment": deployment,
                    "pid": pid,
                    "at_s": round(time.monotonic() - t0, 1),
                    "replicas_before": replicas_at_start.get(deployment),
                    "back_after_s": None,
                }
            )
        while time.monotonic() < stop_at and any(k["back_after_s"] is None for k in kills):
            watch_recovery()
            time.sleep(1.0)
    for t in threads:
        t.join()
    t1 = time.monotonic()
    return summarize(
        run,
        t0,
        t1,
        kills,
        memory_start,
        replica_memory(),
        {**(settings or {}), "duration_s": duration_s, "clients": clients, "kills": kill},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=HA_CONFIG)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--no-kills", action="store_true")
    parser.add_argument(
        "--ingress",
        choices=INGRESS_MODES,
        default="proxy",
        help="proxy (default): Ray Serve's Python proxy, which replays requests a dying ingress replica had "
        "(python -m serve.launch --plain-proxy); haproxy: the fast default of python -m serve.launch",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "soak.json")
    parser.add_argument("--log-dir", type=Path, default=REPO_ROOT / "logs")
    args = parser.parse_args(argv)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    overrides = {"args": {"limits": {"max_upload_mb": UPLOAD_LIMIT_MB}}}
    with serve_server(args.config, args.log_dir, overrides=overrides, tag="soak", ingress=args.ingress) as server:
        server.wait_ready(900)
        wait_replicas = time.monotonic() + 300
        while time.monotonic() < wait_replicas and any(not replica_pids(d) for d in DEPLOYMENTS):
            time.sleep(2)
        report = soak(
            server.base_url,
            args.duration,
            args.clients,
            not args.no_kills,
            settings={
                "config": str(args.config.relative_to(REPO_ROOT)) if args.config.is_absolute() else str(args.config),
                "upload_limit_mb": UPLOAD_LIMIT_MB,
                "ingress": args.ingress,
                "command": "python -m bench.soak " + " ".join(sys.argv[1:] if argv is None else argv),
            },
        )
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: report[k]
                for k in ("requests_sent", "answers_by_status", "lost_requests", "longest_gap_without_answer_s")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
