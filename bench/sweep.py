"""The batching sweep: restart Serve for each point of an encoder's batching grid and load one endpoint.

    python -m bench.sweep                                   # text: max_batch_size 8,16,32 x wait 0.002,0.01,0.03
    python -m bench.sweep --quick                           # a smoke version
    python -m bench.sweep --sweep-batch-sizes 16,32 --sweep-waits 0,0.005 --sweep-replicas 1,2

Each point is one ``serve run`` (as ``bench.run`` starts it) with the encoder's ``max_batch_size``,
``batch_wait_timeout_s`` (and optionally replicas and torch threads) overridden, loaded at the highest
``--concurrency``; the in-process ceiling is measured first. Writes ``reports/batching_sweep.json`` with every
point and the best one. ``python -m bench.run --sweep-batching ...`` runs this too.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from bench.harness import (
    _floats,
    _ints,
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
from bench.inputs import load_media
from bench.load import ENDPOINTS
from bench.report import ceilings_by_endpoint
from bench.servers import deep_merge, serve_server
from bench.stats import best_ceiling, ratio

PROG = "python -m bench.sweep"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options of ``python -m bench.sweep``: ``bench.run``'s common ones plus the grid."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    sweep = p.add_argument_group("the grid")
    sweep.add_argument("--sweep-endpoint", choices=tuple(ENDPOINTS), default="text")
    sweep.add_argument("--sweep-batch-sizes", type=_ints, default=None, help="max_batch_size values (default 8,16,32)")
    sweep.add_argument(
        "--sweep-waits", type=_floats, default=None, help="batch_wait_timeout_s values (default 0.002,0.01,0.03)"
    )
    sweep.add_argument(
        "--sweep-replicas",
        type=_ints,
        default=None,
        help="replica counts of the swept encoder (default: as in the config)",
    )
    sweep.add_argument(
        "--sweep-threads",
        type=_ints,
        default=None,
        help="torch_threads per replica of the swept encoder (default: as in the config)",
    )
    args = p.parse_args(argv)
    return apply_defaults(
        args,
        {
            "sweep_batch_sizes": [8, 32] if args.quick else [8, 16, 32],
            "sweep_waits": [0.01] if args.quick else [0.002, 0.01, 0.03],  # x 3 batch sizes: 9 Serve restarts
        },
    )


def sweep_points(args: argparse.Namespace, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Grid of encoder settings to try: batch size x wait x (replicas) x (torch threads)."""
    modality = ENDPOINTS[args.sweep_endpoint].modalities[0]
    apps = config.get("applications") or [{}]
    encoder_args = ((apps[0].get("args") or {}).get("encoders") or {}).get(modality) or {}
    base_ongoing = int(encoder_args.get("max_ongoing_requests", 16))
    points = []
    for replicas in args.sweep_replicas or [None]:
        for threads in args.sweep_threads or [None]:
            for bs in args.sweep_batch_sizes:
                for wait in args.sweep_waits:
                    settings: dict[str, Any] = {
                        "max_batch_size": bs,
                        "batch_wait_timeout_s": wait,
                        "max_ongoing_requests": max(base_ongoing, bs),
                    }
                    if threads is not None:
                        settings["torch_threads"] = threads
                    point: dict[str, Any] = {
                        "encoder": modality,
                        **settings,
                        "replicas": replicas,
                        "overrides": {"args": {"encoders": {modality: settings}}},
                    }
                    if replicas is not None:
                        name = f"{modality.capitalize()}Encoder"
                        point["overrides"]["deployments"] = {
                            name: {
                                "autoscaling_config": {
                                    "min_replicas": replicas,
                                    "max_replicas": replicas,
                                    "initial_replicas": replicas,
                                }
                            }
                        }
                    points.append(point)
    return points


def run_sweep(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """Restart Serve for each point of the grid and load one endpoint at the highest concurrency."""
    import yaml

    device = device_name(args.device)
    config_path = serve_config_path(args, device)
    if not config_path.is_file():
        raise SystemExit(f"Serve config {config_path} not found")
    media = load_media(args.audio_file, args.video_file)
    meta = base_meta(args, argv, device, media, config_path, prog=PROG)
    meta["notes"] = [n for n in [busy_note(meta["machine"])] if n]
    meta["serve_env"], meta["serve_overrides"] = serve_env(args), serve_overrides(args)
    endpoint = ENDPOINTS[args.sweep_endpoint]
    clients = max(args.concurrency)
    ceiling = measure_ceiling_phase(media, list(endpoint.modalities), args, device)
    ceiling_rps = ceilings_by_endpoint(ceiling["rows"]).get(endpoint.key)
    base_config = yaml.safe_load(config_path.read_text())
    points = sweep_points(args, base_config)
    log(f"sweep: {len(points)} points on {endpoint.path} at {clients} clients")
    measured = []
    for n, point in enumerate(points):
        tag = f"sweep-{n}"
        overrides = deep_merge(serve_overrides(args), point["overrides"])
        server = serve_server(
            config_path, args.out / "logs", overrides, tag=tag, env=serve_env(args), ingress=args.ingress
        )
        entry = {k: v for k, v in point.items() if k != "overrides"}
        try:
            server.start()
            server.wait_ready(args.ready_timeout)
            warmup = args.warmup if args.warmup is not None else clients
            result = measure_cell(server, endpoint, media, clients, warmup, args, "serve")
            summary = result.summary()
            summary["vs_ceiling"] = ratio(summary["throughput_rps"], ceiling_rps)
            entry.update(summary)
            log(
                f"point {n}: bs={point['max_batch_size']} wait={point['batch_wait_timeout_s']} "
                f"replicas={point['replicas']} -> {summary['throughput_rps']} req/s p99 {summary['p99_ms']} ms"
            )
        except (RuntimeError, TimeoutError, OSError) as exc:
            entry["error"] = str(exc).splitlines()[0]
            log(f"point {n} FAILED: {entry['error']}")
        finally:
            server.stop()
        measured.append(entry)
    ok = [e for e in measured if e.get("throughput_rps")]
    best = max(ok, key=lambda e: e["throughput_rps"]) if ok else None
    meta["finished_at"] = now_iso()
    sweep = {
        "meta": meta,
        "endpoint": endpoint.path,
        "concurrency": clients,
        "ceiling_rps": ceiling_rps,
        "best_ceiling_items_per_s": {m: best_ceiling(ceiling["rows"], m) for m in endpoint.modalities},
        "points": measured,
        "best": best,
        "recommendation": None
        if best is None
        else {
            k: best[k]
            for k in ("max_batch_size", "batch_wait_timeout_s", "max_ongoing_requests", "replicas")
            if k in best
        }
        | ({"torch_threads": best["torch_threads"]} if "torch_threads" in best else {}),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "batching_sweep.json"
    path.write_text(json.dumps(sweep, indent=2) + "\n")
    log(f"wrote {path}")
    for e in measured:
        print(
            f"bs={e.get('max_batch_size'):>3} wait={e.get('batch_wait_timeout_s'):<6} replicas={e.get('replicas')} "
            f"threads={e.get('torch_threads', '-')}: {e.get('throughput_rps', 'failed')} req/s "
            f"p50 {e.get('p50_ms')} p99 {e.get('p99_ms')} ms x ceiling {e.get('vs_ceiling')}"
        )
    return sweep


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.sweep``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    run_sweep(parse_args(argv), argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
