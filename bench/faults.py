"""Faults of a cluster under load: a worker node lost, the Serve controller killed, a rolling update, a node joining.

    python -m bench.faults                      # all four scenarios; writes reports/faults.json and the table
    python -m bench.faults --scenarios controller_loss worker_node_loss --clients 4

It starts :class:`bench.cluster.LoopbackCluster` (a head and two worker nodes on 127.0.0.1, each its own raylet),
deploys ``deploy/serve_config.ha.yaml`` spread over the workers (:func:`bench.cluster.spread_config`) and runs each
scenario under the mixed load of ``bench.soak`` (text, audio, video, fused, health and bad inputs), in this order:

1. ``controller_loss``: the ``ServeController`` actor is killed; Ray restarts it.
2. ``rolling_update``: ``serve deploy`` of a changed version (other ``args``): every replica is replaced.
3. ``worker_node_loss``: a worker node is SIGKILLed (its raylet and every process under it), and a replacement
   worker joins at once (as KubeRay recreates a pod or the autoscaler adds a node).
4. ``node_joins``: with more clients, Serve's autoscaling wants a third ``FusionIngress`` replica, which fits no
   node (one per node); a worker node joins and the replica starts there.

Per scenario the report has the requests, the answers by status, the lost requests (no HTTP answer, or a 5xx), the
longest time without any answer (and per endpoint), and the seconds from the fault until full capacity is back
(every deployment healthy with its replicas again, on two nodes or more; for ``node_joins`` the third ingress
replica running on the new node). It also lists the Ray processes left after the cluster stopped (none expected).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.cluster import LoopbackCluster, changed_version, spread_config
from bench.inputs import REPO_ROOT
from bench.servers import free_port
from bench.soak import Record, Run, build_mix, longest_gaps

SCENARIOS = ("controller_loss", "rolling_update", "worker_node_loss", "node_joins")
DOCS = REPO_ROOT / "docs" / "operations.md"
TABLE_START, TABLE_END = "<!-- faults:table -->", "<!-- /faults:table -->"
LOST_STATUS = 500  # this or above, or no answer: lost
PROBE = "probe_text"  # the kind of the text-only client's requests


@dataclass
class Load:
    """Closed-loop clients sending :func:`bench.soak.build_mix` until :meth:`stop`, and (``probe``) one more
    client sending only text, the lightest prediction: with every mixed client inside a slow request (a
    transcription takes seconds on a loaded machine), its answers still show whether the service answers at all."""

    base_url: str
    clients: int
    seed: int = 0
    timeout_s: float = 120.0
    probe: bool = True

    def __post_init__(self) -> None:
        self.run = Run()
        self._stop = threading.Event()
        mix = build_mix()
        text = [(PROBE, *m[1:]) for m in mix if m[0] == "text"]
        mixes = [mix] * self.clients + ([text] if self.probe else [])
        self._threads = [threading.Thread(target=self._client, args=(i, m), daemon=True) for i, m in enumerate(mixes)]
        self.t0 = time.monotonic()
        for thread in self._threads:
            thread.start()

    def _client(self, i: int, mix: list[Any]) -> None:
        rng = random.Random(self.seed * 1000 + i)
        weights = [m[4] for m in mix]
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as http:
            while not self._stop.is_set():
                kind, method, path, kwargs, _ = rng.choices(mix, weights)[0]
                start = time.monotonic()
                try:
                    status: int | None = http.request(method, path, **kwargs).status_code
                    error = None
                except httpx.HTTPError as exc:
                    status, error = None, f"{type(exc).__name__}: {exc}"[:200]
                self.run.add(Record(kind, path, start, time.monotonic(), status, error))

    def stop(self) -> float:
        """Stop sending and wait for the answers under way; the time sending stopped (the gaps end there: the
        wait for the last slow answers is no gap of the service)."""
        stopped_at = time.monotonic()
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 30)
        return stopped_at


def gap_span(records: list[Record], t0: float, t1: float) -> tuple[float, float]:
    """Start and end of the longest time in [t0, t1] without any answer completing, whatever the endpoint."""
    ends = sorted(r.end for r in records if r.status is not None and t0 <= r.end <= t1)
    return max(itertools.pairwise([t0, *ends, t1]), key=lambda span: span[1] - span[0])


def longest_gap(records: list[Record], t0: float, t1: float) -> float:
    """The longest time (s) in [t0, t1] without any answer completing, whatever the endpoint."""
    start, end = gap_span(records, t0, t1)
    return round(end - start, 2)


def summarize(load: Load, t1: float, fault_at: float, back_at: float | None) -> dict[str, Any]:
    """The scenario's figures (times in seconds from the start of its load; ``t1``: when sending stopped)."""
    records = load.run.records
    lost = [r for r in records if r.status is None or r.status >= LOST_STATUS]
    return {
        "clients": load.clients,
        "probe": load.probe,
        "duration_s": round(t1 - load.t0, 1),
        "fault_at_s": round(fault_at - load.t0, 1),
        "requests": len(records),
        "mixed_requests": sum(r.kind != PROBE for r in records),
        "requests_by_kind": dict(sorted(Counter(r.kind for r in records).items())),
        "answers_by_status": dict(sorted(Counter(str(r.status) for r in records).items())),
        "lost": len(lost),
        "lost_requests": [
            {"kind": r.kind, "at_s": round(r.start - load.t0, 2), "status": r.status, "error": r.error}
            for r in lost[:20]
        ],
        "longest_gap_s": longest_gap(records, load.t0, t1),
        # where it was (from the start of the load), and the longest before the fault: the load's own gaps
        "longest_gap_from_s": round(gap_span(records, load.t0, t1)[0] - load.t0, 1),
        "longest_gap_before_fault_s": longest_gap(records, load.t0, fault_at),
        "longest_gap_by_endpoint_s": longest_gaps(records, load.t0, t1),
        "capacity_back_s": None if back_at is None else round(back_at - fault_at, 1),
    }


def under_load(
    cluster: LoopbackCluster,
    fault: Callable[[], dict[str, Any]],
    ready: Callable[[], bool],
    clients: int,
    before_s: float,
    after_s: float,
    max_s: float,
    until_ready: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Load for ``before_s``, then ``fault()``; the load goes on ``after_s`` more, and (``until_ready``) until
    ``ready()`` or ``max_s`` after the fault. Capacity is timed from the fault to the first ``ready()``."""
    load = Load(cluster.base_url, clients, seed)
    time.sleep(before_s)
    fault_at = time.monotonic()
    details = fault()
    back_at: float | None = None
    while True:
        now = time.monotonic()
        if back_at is None and ready():
            back_at = time.monotonic()
        if now - fault_at >= after_s and (back_at is not None or not until_ready or now - fault_at >= max_s):
            break
        time.sleep(0.5)
    t1 = load.stop()
    return {**summarize(load, t1, fault_at, back_at), **details}


# ---- readiness -------------------------------------------------------------------------------------------------


def full_capacity(cluster: LoopbackCluster, replicas: int = 2, lost: frozenset[str] = frozenset()) -> bool:
    """Every deployment serving (:meth:`LoopbackCluster.running`) with ``replicas`` running, each on two nodes or
    more, none counted on the nodes of ``lost`` (Ray calls a killed node's actors alive until its health checks
    have failed for some seconds)."""
    counts = cluster.running()
    if not counts or min(counts.values()) < replicas:
        return False
    placed = cluster.replicas()
    for name in counts:
        nodes = {node: n for node, n in placed.get(name, {}).items() if node not in lost}
        if len(nodes) < 2 or sum(nodes.values()) < replicas:
            return False
    return True


# ---- the scenarios -----------------------------------------------------------------------------------------------


def controller_loss(cluster: LoopbackCluster, clients: int, before_s: float, after_s: float) -> dict[str, Any]:
    """Kill the ``ServeController`` under load; back when a new controller answers with the application whole."""
    old: dict[str, Any] = {}

    def fault() -> dict[str, Any]:
        old["pid"] = cluster.kill_controller()
        return {"controller_pid_before": old["pid"]}

    def ready() -> bool:
        pid = cluster.controller_pid()
        return pid is not None and pid != old.get("pid") and full_capacity(cluster)

    result = under_load(cluster, fault, ready, clients, before_s, after_s, max_s=300)
    result["controller_pid_after"] = cluster.controller_pid()
    return result


def rolling_update(cluster: LoopbackCluster, clients: int, before_s: float, after_s: float) -> dict[str, Any]:
    """``serve deploy`` of other ``args`` under load; back when every replica is a new one and all are running."""
    before: set[str] = set()
    assert cluster.config is not None
    new_config = changed_version(cluster.config)

    def fault() -> dict[str, Any]:
        before.update(cluster.replica_ids())
        cluster.deploy(new_config)
        return {"replicas_before": len(before)}

    def ready() -> bool:
        return full_capacity(cluster) and not (cluster.replica_ids() & before)

    return under_load(cluster, fault, ready, clients, before_s, after_s, max_s=900)


def worker_node_loss(
    cluster: LoopbackCluster, clients: int, before_s: float, after_s: float, replace: bool = True
) -> dict[str, Any]:
    """SIGKILL the worker node holding the most replicas under load; with ``replace``, a new worker joins at once.
    Back when every deployment runs two replicas on two nodes again."""

    lost: set[str] = set()

    def fault() -> dict[str, Any]:
        placed = cluster.replicas()
        node = max(cluster.workers, key=lambda n: sum(c.get(n.node_id, 0) for c in placed.values()))
        on_node = {d: c.get(node.node_id, 0) for d, c in placed.items()}
        lost.add(node.node_id)
        victims = cluster.kill_worker(node)
        if replace:
            cluster.add_worker(wait=False)
        cluster.note_processes()
        return {"killed_node_processes": len(victims), "replicas_on_killed_node": on_node, "replaced": replace}

    def ready() -> bool:
        return full_capacity(cluster, lost=frozenset(lost))

    return under_load(cluster, fault, ready, clients, before_s, after_s, max_s=600, until_ready=replace)


def node_joins(cluster: LoopbackCluster, clients: int, before_s: float, after_s: float) -> dict[str, Any]:
    """More clients than two ingress replicas are sized for; a worker node joins; back when a third ingress
    replica runs on the new node."""
    joined: dict[str, str] = {}

    def fault() -> dict[str, Any]:
        joined["node"] = cluster.add_worker().node_id
        cluster.note_processes()
        return {"node_id": joined["node"]}

    def ready() -> bool:
        counts = cluster.running() or {}
        return counts.get("FusionIngress", 0) >= 3 and cluster.replicas()["FusionIngress"].get(joined["node"], 0) > 0

    result = under_load(cluster, fault, ready, clients, before_s, after_s, max_s=600)
    placed = cluster.replicas()
    result["replicas_on_new_node"] = {d: c.get(joined["node"], 0) for d, c in placed.items() if c.get(joined["node"])}
    return result


# ---- the report ------------------------------------------------------------------------------------------------


def markdown_table(report: dict[str, Any]) -> str:
    """The docs table: one row per scenario."""
    columns = [
        "scenario",
        "clients",
        "requests (mixed)",
        "lost",
        "longest gap without an answer",
        "the same before the fault",
        "full capacity back after",
    ]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, s in report["scenarios"].items():
        cells = [
            f"`{name}`",
            f"{s['clients']} + text probe" if s.get("probe") else str(s["clients"]),
            f"{s['requests']} ({s['mixed_requests']})",
            str(s["lost"]),
            f"{s['longest_gap_s']:.1f} s",
            f"{s['longest_gap_before_fault_s']:.1f} s",
            "-" if s["capacity_back_s"] is None else f"{s['capacity_back_s']:.0f} s",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def update_docs(report: dict[str, Any], path: Path = DOCS) -> bool:
    """Replace the table between the faults markers of ``path``; False if the markers are missing."""
    text = path.read_text()
    pattern = re.compile(re.escape(TABLE_START) + r".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(text):
        return False
    table = markdown_table(report)
    path.write_text(pattern.sub(lambda _: f"{TABLE_START}\n{table}\n{TABLE_END}", text, count=1))
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--clients", type=int, default=4, help="clients of every scenario but node_joins")
    parser.add_argument("--join-clients", type=int, default=12, help="clients of node_joins")
    parser.add_argument("--before", type=float, default=10.0, help="seconds of load before each fault")
    parser.add_argument("--after", type=float, default=20.0, help="seconds of load at least after each fault")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "reports" / "faults.json")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/operations.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    cluster = LoopbackCluster(workers=2)
    scenarios: dict[str, Any] = {}
    try:
        cluster.deploy(spread_config(free_port()))
        cluster.wait_running()
        placement = {d: sorted(c.values()) for d, c in cluster.replicas().items()}
        for name in [s for s in SCENARIOS if s in args.scenarios]:
            clients = args.join_clients if name == "node_joins" else args.clients
            before = args.before * 2 if name == "node_joins" else args.before  # time for autoscaling to decide
            print(f"{name}: {clients} clients", flush=True)
            scenarios[name] = globals()[name](cluster, clients, before, args.after)
            print(json.dumps({k: scenarios[name][k] for k in ("requests", "lost", "longest_gap_s", "capacity_back_s")}))
            if name != SCENARIOS[-1] and not full_capacity(cluster):
                cluster.wait_running()
    finally:
        leftovers = cluster.close()
    report = {
        "settings": {
            "config": "deploy/serve_config.ha.yaml (bench.cluster.spread_config)",
            "nodes": "head (0 CPU: controller, proxy with replay) + 2 workers (2 CPU each) on 127.0.0.1",
            "clients": args.clients,
            "join_clients": args.join_clients,
            "before_s": args.before,
            "after_s": args.after,
            "command": "python -m bench.faults " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "replicas_per_node_at_start": placement,
        "scenarios": scenarios,
        "ray_processes_left": {str(pid): line for pid, line in leftovers.items()},
        "wall_s": round(time.monotonic() - started, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_docs and not update_docs(report):
        print(f"no {TABLE_START} markers in {DOCS}", file=sys.stderr)
    print(markdown_table(report))


if __name__ == "__main__":
    main()
