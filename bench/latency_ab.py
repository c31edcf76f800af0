"""Single-request text latency of two or more versions of the service, side by side, hop by hop.

    python -m bench.latency_ab --ref before=HEAD~1 --ref after=HEAD          # two commits (git archive)
    python -m bench.latency_ab --ref before=HEAD --tree after=.               # a commit against the working tree
    python -m bench.latency_ab --tree a=. --tree b=. --env b:RAY_SERVE_USE_GRPC_BY_DEFAULT=0   # a Ray switch

Each version runs as ``python -m serve.launch`` runs it (``deploy/serve_config.yaml`` of that version, HAProxy,
Serve's throughput mode; a fresh local Ray instance on a free loopback port, :func:`bench.servers.serve_server`),
all of them at once. Then, round by round, one sequential ``POST /api/predict`` goes to each version in turn
(the order alternating), so every version sees the same minutes and the same load: on a shared machine,
back-to-back runs of ``python -m bench.latency`` differ by a millisecond or two from one start to the next, and
this tells differences of a few tenths apart. The answer's own timings split each request into hops: the
client's wall time minus the ingress's ``latency_ms`` (HTTP, HAProxy, the ingress's framework), the ingress's
minus the encoder's (the handle call and back), the encoder's minus its forward (``model_ms``), and the forward.

Several Ray instances on one machine must not share ports: Serve's fallback proxy (HAProxy's backup server) listens
on 8500 in every instance, so one instance's HAProxy could send requests to another's application; each version
gets its own fallback ports and direct-ingress port range here. The answers' ``model_version`` is counted per
version as a check. Results go to ``--out`` (default ``reports/latency_ab.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.inputs import REPO_ROOT
from bench.latency import TEXT
from bench.stats import percentile

HOPS = ("http_ingress_framework", "handle_call", "encoder_outside_forward", "forward")
PORT_BLOCK = 100  # direct-ingress ports per version (HTTP from 32000, gRPC from 42000), above Ray's defaults


@dataclass
class Version:
    """One version of the service under test: a name, its source tree and extra environment for ``serve run``."""

    name: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    ref: str | None = None  # the git ref it was exported from, if any


def isolation_env(index: int, fallback_http: int, fallback_grpc: int) -> dict[str, str]:
    """The ports of the ``index``-th Ray instance: its own fallback proxy ports and direct-ingress port ranges."""
    http, grpc = 32000 + PORT_BLOCK * index, 42000 + PORT_BLOCK * index
    return {
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + PORT_BLOCK - 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + PORT_BLOCK - 1),
    }


def hops(wall_ms: float, answer: Mapping[str, Any]) -> dict[str, float]:
    """One text answer's time split into :data:`HOPS` (ms)."""
    text = answer["modalities"]["text"]
    return {
        "http_ingress_framework": wall_ms - answer["latency_ms"],
        "handle_call": answer["latency_ms"] - text["latency_ms"],
        "encoder_outside_forward": text["latency_ms"] - text["model_ms"],
        "forward": text["model_ms"],
    }


def summarize(walls: Sequence[Sequence[float]], splits: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """p50/p95/mean of the wall times (one list per round), each round's p50 and the hops' medians."""
    flat = [w for round_walls in walls for w in round_walls]
    return {
        "requests": len(flat),
        "p50_ms": round(percentile(flat, 50), 2),
        "p95_ms": round(percentile(flat, 95), 2),
        "mean_ms": round(statistics.fmean(flat), 2),
        "round_p50_ms": [round(percentile(r, 50), 2) for r in walls],
        "hops_p50_ms": {h: round(percentile([s[h] for s in splits], 50), 2) for h in HOPS},
    }


def rounds_ahead(summary: Mapping[str, Mapping[str, Any]], name: str, reference: str) -> int:
    """In how many rounds ``name``'s p50 was below ``reference``'s."""
    return sum(a < b for a, b in zip(summary[name]["round_p50_ms"], summary[reference]["round_p50_ms"], strict=True))


def export_ref(ref: str, into: Path) -> Path:
    """The files of git ``ref`` of this repository, unpacked under ``into`` (``git archive``)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=REPO_ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def parse_versions(refs: Sequence[str], trees: Sequence[str], envs: Sequence[str], workdir: Path) -> list[Version]:
    """``--ref NAME=REF`` / ``--tree NAME=PATH`` / ``--env NAME:KEY=VALUE`` as :class:`Version` s, in the order given
    (refs first)."""
    versions: list[Version] = []
    for spec in refs:
        name, _, ref = spec.partition("=")
        commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO_ROOT, check=True, capture_output=True)
        versions.append(Version(name, export_ref(ref, workdir / name), ref=f"{ref} ({commit.stdout.decode().strip()})"))
    for spec in trees:
        name, _, path = spec.partition("=")
        versions.append(Version(name, Path(path).resolve()))
    names = [v.name for v in versions]
    if len(versions) < 2 or len(set(names)) != len(names) or not all(names):
        raise SystemExit(f"give two or more versions with distinct names (got {names})")
    by_name = {v.name: v for v in versions}
    for spec in envs:
        name, _, assignment = spec.partition(":")
        key, _, value = assignment.partition("=")
        if name not in by_name or not key:
            raise SystemExit(f"--env {spec!r}: expected NAME:KEY=VALUE with NAME one of {names}")
        by_name[name].env[key] = value
    return versions


def measure(
    clients: Mapping[str, httpx.Client], rounds: int, per_round: int
) -> dict[str, tuple[list[list[float]], list[dict[str, float]], dict[str, int]]]:
    """``rounds`` x ``per_round`` sequential requests to every version in turn: wall times by round, hops, and the
    answers counted by ``model_version`` (failed requests, e.g. a 504 on an overloaded machine, as ``failed``)."""
    names = list(clients)
    out: dict[str, tuple[list[list[float]], list[dict[str, float]], dict[str, int]]] = {n: ([], [], {}) for n in names}
    for r in range(rounds):
        for walls, _, _ in out.values():
            walls.append([])
        for i in range(per_round):
            for name in names if i % 2 == 0 else names[::-1]:
                walls, splits, seen = out[name]
                start = time.perf_counter()
                try:
                    response = clients[name].post("/api/predict", json={"text": TEXT})
                    response.raise_for_status()
                except httpx.HTTPError as exc:
                    print(f"{name}: {exc!r}", flush=True)
                    seen["failed"] = seen.get("failed", 0) + 1
                    continue
                wall = (time.perf_counter() - start) * 1000.0
                answer = response.json()
                walls[-1].append(wall)
                splits.append(hops(wall, answer))
                seen[answer["model_version"]] = seen.get(answer["model_version"], 0) + 1
        print(
            f"round {r}: load {os.getloadavg()[0]:.1f}  "
            + "  ".join(f"{n} p50 {percentile(out[n][0][-1], 50):.1f} ms" for n in names),
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency_ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ref", action="append", default=[], metavar="NAME=GITREF", help="a commit of this repo")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH", help="a checkout of the service")
    parser.add_argument("--env", action="append", default=[], metavar="NAME:KEY=VALUE", help="for that version only")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=50, help="requests per version per round")
    parser.add_argument("--warmup", type=int, default=100, help="requests per version before measuring")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds to wait once every version is up")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "latency_ab.json")
    args = parser.parse_args(argv)

    from bench.servers import free_port, serve_server

    workdir = Path(tempfile.mkdtemp(prefix="latency-ab-"))
    servers: dict[str, Any] = {}
    try:
        versions = parse_versions(args.ref, args.tree, args.env, workdir)
        for index, v in enumerate(versions):
            env = isolation_env(index, free_port(), free_port()) | v.env
            config = v.root / "deploy" / "serve_config.yaml"
            servers[v.name] = serve_server(config, workdir / "logs", tag=f"ab-{v.name}", env=env, root=v.root)
            servers[v.name].start()
        for name, server in servers.items():
            server.wait_ready(args.startup_timeout)
            print(f"{name} ready in {server.startup_s} s ({server.base_url})", flush=True)
        time.sleep(args.settle)
        clients = {n: httpx.Client(base_url=s.base_url, timeout=60, trust_env=False) for n, s in servers.items()}
        for client in clients.values():
            for _ in range(args.warmup):
                client.post("/api/predict", json={"text": TEXT}).raise_for_status()
        load_before = os.getloadavg()
        raw = measure(clients, args.rounds, args.requests)
        load_after = os.getloadavg()
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {n: {**summarize(walls, splits), "model_versions": seen} for n, (walls, splits, seen) in raw.items()}
    first = versions[0].name
    for v in versions[1:]:
        summary[v.name][f"rounds_ahead_of_{first}"] = rounds_ahead(summary, v.name, first)
    report = {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "method": f"{len(versions)} services at once, {args.rounds} rounds of {args.requests} sequential text "
        f"requests to each in turn after {args.warmup} warm-up requests each; hops from the answers' timings",
        "versions": {v.name: {"ref": v.ref, "tree": None if v.ref else str(v.root), "env": v.env} for v in versions},
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        },
        "results": summary,
    }
    for name, s in summary.items():
        print(f"{name:12s} p50 {s['p50_ms']:6.2f} ms  hops {s['hops_p50_ms']}  rounds {s['round_p50_ms']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
