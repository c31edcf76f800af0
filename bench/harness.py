"""What ``bench.run`` and ``bench.sweep`` share: their common options, run metadata, and measuring one load cell
against a running server or the in-process ceiling. Both import it; neither imports the other's module for it.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.inputs import REPO_ROOT, MediaInputs
from bench.load import ENDPOINTS, Endpoint, run_load
from bench.machine import GpuMonitor, cpu_delta_by_label, machine_info, process_tree_cpu
from bench.servers import CPU_CONFIG, GPU_CONFIG, INGRESS_MODES, ManagedServer
from bench.stats import LoadResult
from bench.stream import hold_text_stream, ws_url

ALL_TARGETS = ("ceiling", "naive", "litserve", "serve")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str, allowed: tuple[str, ...] | list[str]) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)}")
    return names


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options shared by ``bench.run`` and ``bench.sweep``: what to load, how long, which Serve config."""
    p.add_argument("--quick", action="store_true", help="smoke mode: few requests, short timings, batch sizes 1,8")
    p.add_argument(
        "--targets",
        type=lambda s: _names(s, ALL_TARGETS),
        default=list(ALL_TARGETS),
        help="comma list of ceiling,naive,litserve,serve (default: all; litserve is skipped when not installed)",
    )
    p.add_argument(
        "--endpoints",
        type=lambda s: _names(s, tuple(ENDPOINTS)),
        default=list(ENDPOINTS),
        help=f"comma list of {','.join(ENDPOINTS)} (default: all)",
    )
    p.add_argument("--concurrency", type=_ints, default=None, help="concurrent clients (default 1,8,32)")
    p.add_argument("--requests", type=int, default=None, help="max measured requests per cell (default 2000)")
    p.add_argument("--duration", type=float, default=None, help="max seconds per cell (default 30)")
    p.add_argument("--warmup", type=int, default=None, help="unrecorded requests before each cell (default: clients)")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="ceiling batch sizes (default 1,8,32)")
    p.add_argument("--ceiling-time", type=float, default=None, help="min seconds per ceiling measurement (default 3)")
    p.add_argument(
        "--ceiling-threads",
        type=int,
        default=None,
        help="torch threads for the ceiling (default: torch's default, all cores)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when torch sees a GPU (then the GPU Serve config is used)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="Serve config (default deploy/serve_config.yaml, or serve_config.gpu.yaml on GPU)",
    )
    p.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the Serve run (repeatable), e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0",
    )
    p.add_argument(
        "--no-access-log",
        action="store_true",
        help="run Serve with logging_config.enable_access_log: false (a config change to try)",
    )
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for a server to be up")
    p.add_argument("--request-timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--audio-file", default=None, help="audio payload (default tests/fixtures/speech.wav)")
    p.add_argument("--video-file", default=None, help="video payload (default tests/fixtures/face.mp4)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "reports", help="output folder (default reports/)")
    p.add_argument(
        "--open-access",
        action="store_true",
        help="run Serve without API keys and per-client limits (the GPU config has both; the load generator sends no "
        "key and its clients share one address)",
    )
    p.add_argument(
        "--stream-open",
        action="store_true",
        help="keep one live stream open on /ws/stream during each Serve cell (a text that changes twice a "
        "second): its updates share the ingress's text encoder calls with the HTTP load",
    )
    p.add_argument(
        "--ingress",
        choices=INGRESS_MODES,
        default="haproxy",
        help="haproxy: Serve behind HAProxy, as python -m serve.launch runs it (default); proxy: Serve's Python proxy",
    )


def apply_defaults(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> argparse.Namespace:
    """Fill the size options left unset; ``--quick`` only changes these defaults."""
    quick = args.quick
    defaults = {
        "concurrency": [1, 8, 32],
        "requests": 16 if quick else 2000,
        "duration": 5.0 if quick else 30.0,
        "batch_sizes": [1, 8] if quick else [1, 8, 32],
        "ceiling_time": 0.2 if quick else 3.0,
        **(extra or {}),
    }
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def serve_env(args: argparse.Namespace) -> dict[str, str]:
    """``--serve-env KEY=VALUE`` options as a dict."""
    out = {}
    for item in args.serve_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--serve-env wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out


OPEN_ACCESS: dict[str, Any] = {
    "access": {
        "api_keys": {"required": False},
        "per_client": {"requests_per_minute": None, "max_concurrent_uploads": None},
    }
}


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config overrides asked for on the command line (applied on top of the Serve config)."""
    out: dict[str, Any] = {}
    if args.no_access_log:
        out["app"] = {"logging_config": {"enable_access_log": False}}
    if getattr(args, "open_access", False):
        out["args"] = OPEN_ACCESS
    return out


def device_name(choice: str) -> str:
    """``--device`` as a device type; torch is imported here, late, so the load generator stays free of it."""
    from models.common import resolve_device

    return resolve_device(choice).type


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def log(message: str) -> None:
    """Progress line on stderr (stdout stays for the final table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_cell(
    server: ManagedServer,
    endpoint: Endpoint,
    media: MediaInputs,
    clients: int,
    warmup: int,
    args: argparse.Namespace,
    target: str,
) -> LoadResult:
    """One load cell, with the server's and this client's CPU use and (if any) GPU utilisation.

    CPU is counted over the whole cell, warm-up included, and divided by all requests sent.
    """
    pid = server.proc.pid if server.proc is not None else -1

    async def measured() -> tuple[LoadResult, dict[str, float], float, float]:
        stop = asyncio.Event()
        stream = None
        if getattr(args, "stream_open", False) and target == "serve":
            stream = asyncio.create_task(hold_text_stream(ws_url(server.base_url), stop))
        server0, client0, t0 = process_tree_cpu(pid), time.process_time(), time.perf_counter()
        result = await run_load(
            server.base_url,
            endpoint,
            media,
            clients,
            args.requests,
            args.duration,
            warmup,
            args.request_timeout,
            target,
        )
        server1, client1, t1 = process_tree_cpu(pid), time.process_time(), time.perf_counter()
        if stream is not None:
            stop.set()
            held = await stream
            result.extra["stream"] = {
                "updates": len(held.updates),
                "errors": len(held.errors),
                "seconds": round(held.streamed_s, 1),
                "close_code": held.close_code,
            }
        delta = cpu_delta_by_label(server0, server1) if server0 else {}
        return result, delta, client1 - client0, t1 - t0

    with GpuMonitor() as gpu:
        result, server_cpu, client_cpu, wall = asyncio.run(measured())
    if gpu.summary():
        result.extra["gpu"] = gpu.summary()
    sent = result.ok + result.errors + warmup
    if sent:
        if server_cpu:
            total = sum(server_cpu.values())
            result.extra["server_cpu_ms_per_request"] = round(total * 1000.0 / sent, 2)
            result.extra["server_cpu_cores"] = round(total / wall, 2)
            result.extra["server_cpu_breakdown_ms_per_request"] = {
                k: round(v * 1000.0 / sent, 2)
                for k, v in sorted(server_cpu.items(), key=lambda kv: -kv[1])
                if v * 1000.0 / sent >= 0.05
            }
        result.extra["client_cpu_ms_per_request"] = round(client_cpu * 1000.0 / sent, 2)
        result.extra["client_cpu_cores"] = round(client_cpu / wall, 2)
    return result


def serve_config_path(args: argparse.Namespace, device: str) -> Path:
    """The Serve config to run: ``--config``, else the GPU or CPU one."""
    if args.config is not None:
        return args.config
    return GPU_CONFIG if device.startswith("cuda") else CPU_CONFIG


def measure_ceiling_phase(
    media: MediaInputs, modalities: list[str], args: argparse.Namespace, device: str
) -> dict[str, Any]:
    """The in-process ceiling, with GPU sampling when there is one."""
    import torch

    from bench.ceiling import measure_ceiling

    if args.ceiling_threads:
        torch.set_num_threads(args.ceiling_threads)
    with GpuMonitor() as gpu:
        ceiling = measure_ceiling(
            media, modalities, args.batch_sizes, args.ceiling_time, 3 if not args.quick else 1, device, log=log
        )
    if gpu.summary():
        ceiling["gpu"] = gpu.summary()
    return ceiling


def base_meta(
    args: argparse.Namespace,
    argv: list[str] | None,
    device: str,
    media: MediaInputs,
    config: Path,
    prog: str = "python -m bench.run",
) -> dict[str, Any]:
    """Run metadata shared by the benchmark and the sweep."""
    given = sys.argv[1:] if argv is None else argv
    command = prog + ("" if not given else " " + shlex.join(given))
    return {
        "command": command,
        "started_at": now_iso(),
        "machine": machine_info(),
        "device": device,
        "serve_config": str(config.relative_to(REPO_ROOT)) if config.is_relative_to(REPO_ROOT) else str(config),
        "inputs": media.describe(),
        "settings": {
            "targets": args.targets,
            "endpoints": args.endpoints,
            "concurrency": args.concurrency,
            "max_requests_per_cell": args.requests,
            "max_duration_s_per_cell": args.duration,
            "warmup": args.warmup if args.warmup is not None else "max(2, clients)",
            "ceiling_batch_sizes": args.batch_sizes,
            "ceiling_min_time_s": args.ceiling_time,
            "quick": args.quick,
            "ingress": args.ingress,
            "stream_open": getattr(args, "stream_open", False),
        },
    }


def busy_note(machine: dict[str, Any]) -> str | None:
    """A warning when other work was already loading the machine: then the ratios, not the absolutes, matter."""
    load = (machine.get("loadavg_at_start") or [0.0])[0]
    cores = machine.get("cpu_count") or 1
    if load <= 0.5 * cores:
        return None
    return (
        f"the machine was busy when the run started (1-min load average {load} on {cores} cores): "
        "absolute numbers are not representative and even the ratios are noisy"
    )
