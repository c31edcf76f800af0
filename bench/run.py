"""One command for the whole benchmark: ceiling, naive baseline, LitServe and Serve graph, side by side, in one run.

    python -m bench.run                      # full run, writes reports/bench.{json,md,png}
    python -m bench.run --quick              # a small smoke version (few requests, short timings)
    python -m bench.run --endpoints text --concurrency 1,32 --requests 400
    python -m bench.sweep                    # text batching sweep through Serve -> reports/batching_sweep.json
                                             # (python -m bench.run --sweep-batching ... runs the same)

Order of a run: the in-process ceiling (``bench.ceiling``), then the naive server
(``bench.naive_server``), then LitServe with batching (``bench.litserve_server``, one server per endpoint, with the
settings its sweep chose, ``python -m bench.litserve_sweep``; skipped with a note when litserve is not installed),
then the Serve
application (``serve run`` of the Serve config on a free
loopback port, behind HAProxy as ``python -m serve.launch`` runs it; ``--ingress proxy`` for Serve's Python
proxy). Each server runs alone, so they never compete with each other for the CPU. ``reports/bench.md`` also
quotes the per-hop profile of a text request that ``python -m bench.profile`` wrote (``reports/profile_text.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import (
    add_common_args,
    apply_defaults,
    base_meta,
    busy_note,
    device_name,
    log,
    measure_ceiling_phase,
    measure_cell,
    now_iso,
    serve_config_path,
    serve_env,
    serve_overrides,
)
from bench.inputs import REPO_ROOT, MediaInputs, load_media
from bench.load import ENDPOINTS
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
from bench.servers import (
    LITSERVE_SKIPPED,
    ManagedServer,
    litserve_available,
    litserve_server,
    naive_server,
    serve_server,
)
from bench.stats import LoadResult


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
                f"{target:<8} {ENDPOINTS[key].path:<15} c={clients:<3} {s['throughput_rps']:8.2f} req/s  "
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
    endpoints: list[str] | None = None,
    name: str | None = None,
) -> list[LoadResult]:
    """Start one server, load it on ``endpoints`` (default all of the run's), stop it; failures become notes
    instead of aborting the run. ``name`` (default ``target``) keys the server in the report's ``servers``."""
    server = make()
    name = name or target
    log(f"starting {name}: {shlex.join(server.cmd)} (log {server.log_path})")
    try:
        server.start()
        try:
            server.wait_ready(args.ready_timeout)
        except RuntimeError as exc:  # it exited while starting (a Ray node start timing out on a busy machine)
            server.stop()
            notes.append(f"{name} exited while starting and was started again: {str(exc).splitlines()[0]}")
            log(f"{name} exited while starting; starting it again")
            server = make()
            server.start()
            server.wait_ready(args.ready_timeout)
        log(f"{name} ready in {server.startup_s} s at {server.base_url}")
        servers[name] = {
            "startup_s": server.startup_s,
            "cmd": shlex.join(server.cmd),
            "log": str(server.log_path),
            "config": server.config,
        }
        return load_cells(server, target, media, endpoints or args.endpoints, args.concurrency, args)
    except (RuntimeError, TimeoutError, OSError) as exc:
        notes.append(f"{name} failed: {str(exc).splitlines()[0]} (see {server.log_path})")
        log(f"{name} FAILED: {exc}")
        return []
    finally:
        server.stop()


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
        if "litserve" in args.targets:
            if litserve_available():
                # One LitServer per endpoint: its workers poll their queues even when idle (spinning at
                # batch_timeout 0), so a server holding all four endpoints would spend CPU on the idle ones.
                for key in args.endpoints:
                    results += run_server_phase(
                        lambda key=key: litserve_server(log_dir, device, {"endpoints": [key]}, tag=f"litserve-{key}"),
                        "litserve",
                        media,
                        args,
                        notes,
                        servers,
                        endpoints=[key],
                        name=f"litserve-{key}",
                    )
            else:
                notes.append(LITSERVE_SKIPPED)
                log(LITSERVE_SKIPPED)
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
            "litserve_sweep": load_litserve_sweep(),
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
    """The hand-kept record of the levers tried for throughput (``reports/levers.json``), quoted in bench.md; None
    without it."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def load_litserve_sweep(path: Path = REPO_ROOT / "reports" / "litserve_sweep.json") -> dict[str, Any] | None:
    """The LitServe settings sweep (``python -m bench.litserve_sweep``), quoted in bench.md; None without it."""
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
    report["litserve_sweep"] = load_litserve_sweep()
    source.write_text(json.dumps(report, indent=2) + "\n")
    paths = {"md": args.out / f"{args.stem}.md", "png": args.out / f"{args.stem}.png"}
    paths["md"].write_text(render_markdown(report))
    plot(report, paths["png"])
    log(f"rewrote {paths['md']} and {paths['png']} from {source}")
    return paths


if __name__ == "__main__":
    raise SystemExit(main())
