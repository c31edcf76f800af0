"""One command for the whole benchmark: ceiling, naive baseline and Serve graph, side by side, in one run.

    python -m bench.run                      # full run, writes reports/bench.{json,md,png}
    python -m bench.run --quick              # a small smoke version (few requests, short timings)
    python -m bench.run --endpoints text --concurrency 1,32 --requests 400
    python -m bench.sweep                    # text batching sweep through Serve -> reports/batching_sweep.json
                                             # (python -m bench.run --sweep-batching ... runs the same)

Order of a run: the in-process ceiling (``bench.ceiling``), then the naive server
(``bench.naive_server``), then the Serve application (``serve run`` of the Serve config on a free
loopback port, behind HAProxy as ``python -m serve.launch`` runs it; ``--ingress proxy`` for Serve's Python
proxy). Each server runs alone, so they never compete with each other for the CPU. ``reports/bench.md`` also
quotes the per-hop profile of a text request that ``python -m bench.profile`` wrote (``reports/profile_text.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.inputs import REPO_ROOT, MediaInputs, load_media
from bench.load import ENDPOINTS, Endpoint, run_load
from bench.machine import GpuMonitor, cpu_delta_by_label, machine_info, process_tree_cpu
from bench.report import (
    build_rows,
    ceilings_by_endpoint,
    evaluate_targets,
    plot,
    readme_block,
    render_markdown,
    results_table,
    update_readme,
    write_reports,
)
from bench.servers import CPU_CONFIG, GPU_CONFIG, INGRESS_MODES, ManagedServer, naive_server, serve_server
from bench.stats import LoadResult

ALL_TARGETS = ("ceiling", "naive", "serve")


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
        help="comma list of ceiling,naive,serve (default: all)",
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``python -m bench.run``."""
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(p)
    p.add_argument("--update-readme", action="store_true", help="quote the new table in README.md's bench section")
    p.add_argument("--stem", default="bench", help="report file names: <out>/<stem>.{json,md,png} (default bench)")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rewrite <out>/<stem>.md and .png from <out>/<stem>.json, with the current profile "
        "(python -m bench.profile) and levers record",
    )
    p.add_argument(
        "--sweep-batching",
        action="store_true",
        help="run the batching sweep instead (same as python -m bench.sweep, whose options then apply)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="profile entries to quote in bench.md (default reports/profile_text.json when it exists; "
        "written by python -m bench.profile)",
    )
    return apply_defaults(p.parse_args(argv))


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


def load_cells(
    server: ManagedServer,
    target: str,
    media: MediaInputs,
    endpoints: list[str],
    concurrency: list[int],
    args: argparse.Namespace,
) -> list[LoadResult]:
    """Every (endpoint, concurrency) cell against one running server."""
    out = []
    for key in endpoints:
        for clients in concurrency:
            warmup = args.warmup if args.warmup is not None else max(2, clients)
            load_before = os.getloadavg()[0]
            result = measure_cell(server, ENDPOINTS[key], media, clients, warmup, args, target)
            result.extra["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            s = result.summary()
            log(
                f"{target:<5} {ENDPOINTS[key].path:<15} c={clients:<3} {s['throughput_rps']:8.2f} req/s  "
                f"p50 {s['p50_ms']} p95 {s['p95_ms']} p99 {s['p99_ms']} ms  ok {s['requests_ok']} err {s['errors']}  "
                f"server CPU {s.get('server_cpu_ms_per_request')} ms/req"
            )
            out.append(result)
    return out


def run_server_phase(
    make: Callable[[], ManagedServer],
    target: str,
    media: MediaInputs,
    args: argparse.Namespace,
    notes: list[str],
    servers: dict[str, Any],
) -> list[LoadResult]:
    """Start one server, load it, stop it; failures become notes instead of aborting the run."""
    server = make()
    log(f"starting {target}: {shlex.join(server.cmd)} (log {server.log_path})")
    try:
        server.start()
        server.wait_ready(args.ready_timeout)
        log(f"{target} ready in {server.startup_s} s at {server.base_url}")
        servers[target] = {
            "startup_s": server.startup_s,
            "cmd": shlex.join(server.cmd),
            "log": str(server.log_path),
            "config": server.config,
        }
        return load_cells(server, target, media, args.endpoints, args.concurrency, args)
    except (RuntimeError, TimeoutError, OSError) as exc:
        notes.append(f"{target} failed: {str(exc).splitlines()[0]} (see {server.log_path})")
        log(f"{target} FAILED: {exc}")
        return []
    finally:
        server.stop()


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


def run_benchmark(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """The full side-by-side run; writes the reports and returns the report dict."""
    device = device_name(args.device)
    config = serve_config_path(args, device)
    media = load_media(args.audio_file, args.video_file)
    meta = base_meta(args, argv, device, media, config)
    notes: list[str] = []
    meta["notes"] = notes
    busy = busy_note(meta["machine"])
    if busy:
        notes.append(busy)
        log(busy)
    log_dir = args.out / "logs"
    servers: dict[str, Any] = {}
    results: list[LoadResult] = []
    ceiling: dict[str, Any] = {"rows": []}
    needed = sorted({m for k in args.endpoints for m in ENDPOINTS[k].modalities}, key=["text", "audio", "video"].index)
    try:
        if "ceiling" in args.targets:
            ceiling = measure_ceiling_phase(media, needed, args, device)
        if "naive" in args.targets:
            results += run_server_phase(lambda: naive_server(log_dir, device), "naive", media, args, notes, servers)
        if "serve" in args.targets:
            if config.is_file():
                env, overrides = serve_env(args), serve_overrides(args)
                if env or overrides:
                    notes.append(f"Serve ran with extra environment {env} and config overrides {overrides}")
                results += run_server_phase(
                    lambda: serve_server(config, log_dir, overrides, env=env, ingress=args.ingress),
                    "serve",
                    media,
                    args,
                    notes,
                    servers,
                )
            else:
                notes.append(f"Serve config {config} not found: the Serve graph was not measured")
    finally:
        ceil_ep = ceilings_by_endpoint(ceiling.get("rows", []))
        rows = build_rows(results, ceil_ep)
        meta["finished_at"] = now_iso()
        meta["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        meta["servers"] = servers
        report = {
            "meta": meta,
            "ceiling": ceiling,
            "ceiling_by_endpoint": ceil_ep,
            "results": rows,
            "targets": evaluate_targets(rows),
            "profile": load_profile(args.profile),
            "levers": load_levers(),
        }
        paths = write_reports(report, args.out, results, stem=args.stem)
        log("wrote " + ", ".join(str(p) for p in paths.values()))
        if args.update_readme:
            ok = update_readme(REPO_ROOT / "README.md", readme_block(report))
            log("README table updated" if ok else "README has no bench table markers; not updated")
    print(results_table(rows))
    print(json.dumps(report["targets"], indent=2))
    return report


def load_profile(path: Path | None) -> list[dict[str, Any]]:
    """Entries of ``bench.profile``'s JSON (``reports/profile_text.json`` by default), or none."""
    path = path if path is not None else REPO_ROOT / "reports" / "profile_text.json"
    try:
        return list(json.loads(path.read_text()).get("entries", []))
    except (OSError, ValueError, AttributeError):
        return []


def load_levers(path: Path = REPO_ROOT / "reports" / "levers.json") -> dict[str, Any] | None:
    """The record of levers tried for issue 23 (``reports/levers.json``), quoted in bench.md; None without it."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.run`` (``--sweep-batching`` hands over to ``python -m bench.sweep``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    given = sys.argv[1:] if argv is None else list(argv)
    if "--sweep-batching" in given:
        from bench.sweep import main as sweep_main

        return sweep_main([a for a in given if a != "--sweep-batching"])
    args = parse_args(given)
    if args.render_only:
        render_only(args)
        return 0
    run_benchmark(args, given)
    return 0


def render_only(args: argparse.Namespace) -> dict[str, Path]:
    """Rewrite the markdown and plot of an earlier run from its JSON (whose profile and levers are refreshed)."""
    source = args.out / f"{args.stem}.json"
    report = json.loads(source.read_text())
    report["profile"] = load_profile(args.profile)
    report["levers"] = load_levers()
    source.write_text(json.dumps(report, indent=2) + "\n")
    paths = {"md": args.out / f"{args.stem}.md", "png": args.out / f"{args.stem}.png"}
    paths["md"].write_text(render_markdown(report))
    plot(report, paths["png"])
    log(f"rewrote {paths['md']} and {paths['png']} from {source}")
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
