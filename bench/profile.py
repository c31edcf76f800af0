"""Where a text request's milliseconds go on the live Serve graph: a profiler on every hop, under load.

    python -m bench.profile --label after                       # the shipped setup (HAProxy, coalescing)
    python -m bench.profile --label before --ingress proxy \\
        --override '{"args": {"encoders": {"text": {"calls_per_replica": 0}}}}'

It starts ``serve run`` of the config (as ``bench.run`` does, loopback only), then:

1. **CPU under load**: ``--clients`` closed-loop clients on ``/api/predict`` for ``--duration`` s while
   ``py-spy record`` samples the proxy (when Serve's Python proxy runs), the ingress and the text encoder
   replicas. Each process's CPU per request (from ``/proc``) is split by what its Python stacks were doing
   (HTTP server, ASGI app and middleware, pydantic, metrics, Serve's router and replica wrapper, ``@serve.batch``,
   the forward, ...); CPU the Python stacks do not account for is Ray's core worker threads (C++: gRPC,
   task submission and receipt, object transfer).
2. **Latency of one request**: ``--single`` sequential requests; the medians of the client's wall time, of the
   ingress's own time (``latency_ms`` of the answer), of the encoder's time (``modalities.text.latency_ms``)
   and of its forward (``model_ms``) split the wall time into hops.

Results go to ``--out`` (default ``reports/profile_text.json``), one entry per ``--label`` (replaced when run
again); ``bench.run`` quotes that file in ``reports/bench.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from bench.inputs import REPO_ROOT, load_media
from bench.load import ENDPOINTS, run_load
from bench.machine import cpu_delta_by_label, process_tree_cpu
from bench.servers import CPU_CONFIG, INGRESS_MODES, serve_server

NATIVE = "Ray core worker threads (C++: gRPC, task receipt, object transfer)"
# (category, markers): the first category whose marker occurs in a stack (leaf first) takes the sample.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "forward (tokenise + model)",
        ("torch/", "transformers/", "tokenizers", "models/inference.py", "models/text.py", "_forward_sync"),
    ),
    ("metrics (ours and Ray's)", ("serve/metrics.py", "ray/util/metrics", "metrics_utils", "request_ingress_metrics")),
    ("pydantic (validation, answer and response models)", ("pydantic", "serve/schemas.py")),
    ("logging (access log)", ("logging/__init__.py", "logging_utils")),
    ("serialisation (pickle)", ("pickle", "serialization.py", "cloudpickle")),
    ("@serve.batch queue", ("serve/batching.py",)),
    ("handle call (Serve router)", ("serve/handle.py", "_private/router.py", "request_router", "replica_result")),
    ("Serve proxy", ("_private/proxy.py", "proxy_request_response", "proxy_router", "proxy_response")),
    ("HTTP server (uvicorn)", ("uvicorn/", "h11", "httptools")),
    (
        "ingress app code (service.py, api.py)",
        ("serve/service.py", "serve/api.py", "serve/access.py", "serve/uploads.py"),
    ),
    ("encoder replica code (encoders.py)", ("serve/encoders.py",)),
    ("ASGI app and middleware (FastAPI, Starlette)", ("starlette/", "fastapi/")),
    (
        "Serve replica wrapper (request receipt, context)",
        ("_private/replica.py", "replica_response_generator", "direct_ingress", "_private/utils.py"),
    ),
    ("Ray core worker (Python side)", ("ray/_raylet", "_private/worker.py", "ray/actor.py", "_private/async_compat")),
    ("event loop (asyncio)", ("asyncio/",)),
)


THREAD_POOL = "thread-pool hand-off (decode/model threads waking, queues)"


def classify(stack: str) -> str:
    """The category of one collapsed stack (frames root;...;leaf)."""
    frames = [f for f in stack.split(";") if f.strip()][::-1]  # leaf first: the innermost known layer decides
    for frame in frames:
        for name, markers in CATEGORIES:
            if any(m in frame for m in markers):
                return name
    if not frames or all("threading.py" in f for f in frames):
        return NATIVE  # a thread with no Python frame of its own: Ray's C++ threads (gRPC, core worker)
    if any("concurrent/futures" in f for f in frames):
        return THREAD_POOL
    return "other Python"


def parse_collapsed(text: str) -> Counter[str]:
    """``py-spy record --format raw`` output -> samples per category."""
    out: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out[classify(stack)] += int(count)
    return out


def split_cpu(cpu_ms: float, samples: Counter[str], rate: int, seconds: float, requests: int) -> dict[str, float]:
    """Spread a process's CPU per request over the categories of its Python samples.

    Python time counted by py-spy (samples / rate, at most the process's CPU) is split in proportion to the
    samples; the rest of the CPU is :data:`NATIVE`.
    """
    total = sum(samples.values())
    python_ms = min(total / rate * 1000.0 / max(requests, 1), cpu_ms) if total else 0.0
    out = {k: python_ms * v / total for k, v in samples.most_common()} if total else {}
    if cpu_ms - python_ms > 0.005:
        out[NATIVE] = out.get(NATIVE, 0.0) + cpu_ms - python_ms
    return {k: round(v, 2) for k, v in out.items()}


class Sampler:
    """``py-spy record`` on one pid for ``seconds``, in the background."""

    def __init__(self, pid: int, seconds: float, rate: int, workdir: str) -> None:
        self.pid = pid
        self.path = Path(workdir) / f"{pid}.txt"
        exe = shutil.which("py-spy")
        if exe is None:
            raise SystemExit("py-spy not found: pip install py-spy")
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(int(seconds), 1)),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                str(self.path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self) -> Counter[str]:
        _, err = self.proc.communicate(timeout=120)
        if not self.path.exists():
            print(f"py-spy on {self.pid} wrote nothing: {err.strip()[-300:]}")
            return Counter()
        return parse_collapsed(self.path.read_text())


def _roles(server: Any) -> dict[str, list[int]]:
    return {
        "proxy": server.pids("ray::ProxyActor"),
        "ingress": server.pids("FusionIngress"),
        "text encoder": server.pids("TextEncoder"),
    }


def measure_load(server: Any, clients: int, duration: float, rate: int, raw_dir: Path | None = None) -> dict[str, Any]:
    """CPU per request by process and by category while ``clients`` load the text endpoint."""
    media = load_media(None, None)
    endpoint = ENDPOINTS["text"]
    pid = server.proc.pid
    asyncio.run(run_load(server.base_url, endpoint, media, clients, 10**6, 5.0, clients, 60.0, "serve"))  # warm
    roles = _roles(server)
    holder: dict[str, Any] = {}

    def load() -> None:
        holder["result"] = asyncio.run(
            run_load(server.base_url, endpoint, media, clients, 10**6, duration, 0, 60.0, "serve")
        )

    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        workdir = str(raw_dir) if raw_dir is not None else tmp
        Path(workdir).mkdir(parents=True, exist_ok=True)
        cpu0 = process_tree_cpu(pid)
        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(1.0)
        sample_s = max(duration - 3.0, 2.0)
        samplers = {role: [Sampler(p, sample_s, rate, workdir) for p in pids] for role, pids in roles.items()}
        t0 = time.perf_counter()
        c0 = process_tree_cpu(pid)
        for group in samplers.values():
            for s in group:
                s.proc.wait(timeout=sample_s + 60)
        c1 = process_tree_cpu(pid)
        window = time.perf_counter() - t0
        thread.join()
        cpu1 = process_tree_cpu(pid)
        result = holder["result"]
        samples = {role: sum((s.result() for s in group), Counter()) for role, group in samplers.items()}
    summary = result.summary()
    rps = summary["throughput_rps"]
    in_window = max(rps * window, 1.0)  # requests served while py-spy sampled
    delta = cpu_delta_by_label(c0, c1)
    by_process = {
        k: round(v * 1000.0 / in_window, 2)
        for k, v in sorted(delta.items(), key=lambda kv: -kv[1])
        if v * 1000.0 / in_window >= 0.05
    }
    breakdown: dict[str, dict[str, float]] = {}
    for role, group in samplers.items():
        if not group:
            continue
        labels = {label for p, (label, _) in c1.items() if p in {s.pid for s in group}}
        cpu_ms = sum(by_process.get(label, 0.0) for label in labels)
        breakdown[role] = {
            "cpu_ms_per_request": round(cpu_ms, 2),
            "split": split_cpu(cpu_ms, samples[role], rate, window, int(in_window)),
        }
    whole = cpu_delta_by_label(cpu0, cpu1)
    sent = result.ok + result.errors
    return {
        "clients": clients,
        "throughput_rps": rps,
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "errors": result.errors,
        "mean_batch_size": summary.get("mean_batch_size"),
        "sampling_window_s": round(window, 1),
        "py_spy_rate_hz": rate,
        "cpu_ms_per_request_by_process": by_process,
        "server_cpu_ms_per_request": round(sum(whole.values()) * 1000.0 / max(sent, 1), 2),
        "by_hop": breakdown,
    }


def measure_single(base_url: str, n: int) -> dict[str, Any]:
    """Medians over ``n`` sequential text requests: client wall time and the service's own timings."""
    from bench.latency import TEXT

    wall, ingress, encoder, model = [], [], [], []
    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
        for i in range(n + 20):
            t0 = time.perf_counter()
            r = client.post("/api/predict", json={"text": TEXT})
            dt = (time.perf_counter() - t0) * 1000.0
            r.raise_for_status()
            if i < 20:
                continue
            body = r.json()
            wall.append(dt)
            ingress.append(body["latency_ms"])
            encoder.append(body["modalities"]["text"]["latency_ms"])
            model.append(body["modalities"]["text"]["model_ms"])
    med = {
        k: statistics.median(v)
        for k, v in (("wall", wall), ("ingress", ingress), ("encoder", encoder), ("model", model))
    }
    return {
        "requests": n,
        "p50_wall_ms": round(med["wall"], 2),
        "hops_ms (medians)": {
            "HTTP, proxy and ingress framework (wall - ingress)": round(med["wall"] - med["ingress"], 2),
            "handle call to the encoder and back (ingress - encoder)": round(med["ingress"] - med["encoder"], 2),
            "encoder replica, outside the forward (encoder - forward)": round(med["encoder"] - med["model"], 2),
            "forward (tokenise + model)": round(med["model"], 2),
        },
    }


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(
        prog="python -m bench.profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--label", required=True, help="name of this entry in the output (e.g. before, after)")
    p.add_argument("--config", type=Path, default=CPU_CONFIG)
    p.add_argument("--ingress", choices=INGRESS_MODES, default="haproxy")
    p.add_argument("--override", default="{}", help="JSON config overrides, as bench.servers.serve_config_for_bench")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--rate", type=int, default=97, help="py-spy samples per second")
    p.add_argument("--single", type=int, default=200, help="sequential requests for the latency split (0: skip)")
    p.add_argument("--note", default="", help="what this entry is (shown in the report)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "profile_text.json")
    args = p.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.serve_env)
    overrides = json.loads(args.override)
    server = serve_server(
        args.config,
        REPO_ROOT / "reports" / "logs",
        overrides,
        tag=f"profile-{args.label}",
        env=env,
        ingress=args.ingress,
    )
    entry: dict[str, Any] = {
        "label": args.label,
        "note": args.note,
        "config": str(args.config),
        "ingress": args.ingress,
        "overrides": overrides,
        "serve_env": env,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        server.start()
        server.wait_ready(600)
        if args.single:
            entry["single_request"] = measure_single(server.base_url, args.single)
            print(json.dumps(entry["single_request"], indent=2))
        raw_dir = REPO_ROOT / "reports" / "logs" / f"profile-{args.label}"  # py-spy's stacks, per pid
        entry["under_load"] = measure_load(server, args.clients, args.duration, args.rate, raw_dir)
        print(json.dumps(entry["under_load"], indent=2))
    finally:
        server.stop()
        if server.leftovers_killed:
            entry["leftover_processes_killed"] = len(server.leftovers_killed)
    data = json.loads(args.out.read_text()) if args.out.exists() else {"entries": []}
    data["entries"] = [e for e in data["entries"] if e.get("label") != args.label] + [entry]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
