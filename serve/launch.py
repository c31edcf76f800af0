"""Start the service the fast way: ``serve run`` of a Serve config with Ray Serve's HAProxy ingress.

    python -m serve.launch                               # deploy/serve_config.yaml on http://0.0.0.0:8000
    python -m serve.launch deploy/serve_config.gpu.yaml
    python -m serve.launch --plain-proxy                 # Ray Serve's Python proxy instead (plain `serve run`)

HAProxy and direct ingress are switches of the whole Ray instance, read by the Serve controller when it
starts, so they cannot live in the Serve config file (whose ``runtime_env`` reaches only the replicas):
this launcher puts :data:`FAST_INGRESS_ENV` into the environment of ``serve run``, which starts a local
Ray that every Ray process inherits. On a cluster, set the same variables on every node before
``ray start``.

With HAProxy the C proxy listens on the configured port and forwards each HTTP request to a server inside the
``FusionIngress`` replica (no Python proxy actor and no extra Ray hop per request). Shutdown: Ctrl-C (or
SIGTERM) stops ``serve run``, which shuts Serve down (the HAProxy process with it); the launcher then waits
for its process tree to exit and kills, by process id, anything of it that is still alive after
``--grace`` seconds (HAProxy outliving a killed Ray is the case this covers).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "deploy" / "serve_config.yaml"

# Every Ray Serve environment switch this project sets, listed once: the variable, its value, the constant of the
# installed Ray that reads it (tests/test_serve_replicas.py checks each is still read there, so a rename in a Ray
# upgrade fails CI), and where it goes. Measured in reports/bench.md ("Levers").
SwitchScope = Literal["haproxy", "plain_proxy", "replica"]
RAY_CONSTANTS = "ray.serve._private.constants"


@dataclass(frozen=True)
class RaySwitch:
    """One Ray (Serve) environment variable: ``scope`` ``haproxy`` (:data:`FAST_INGRESS_ENV`), ``plain_proxy``
    (:data:`PLAIN_PROXY_ENV`) or ``replica`` (the ``runtime_env`` of ``deploy/serve_config*.yaml``)."""

    env: str
    value: str
    constant: str  # the name under which `module` reads `env`
    scope: SwitchScope
    module: str = RAY_CONSTANTS


RAY_SWITCHES: tuple[RaySwitch, ...] = (
    # Ray starts its worker processes (every replica, and HAProxy, which a worker starts) at nice 15, below any
    # ordinary process: on a machine shared with other work (a training job, the load generator, another server)
    # the service then gets the CPU only when nothing else wants it. Ray's own job manager starts jobs at 0; so
    # does the shipped launcher, for a service that must answer before batch work (docs/performance.md, "Serve
    # against LitServe on a shared machine"). `--plain-proxy` keeps Ray's default.
    RaySwitch("RAY_worker_niceness", "0", "RAY_WORKER_NICENESS", "haproxy", "ray._private.ray_constants"),
    # HAProxy in front, HTTP straight into the ingress replica (implies direct ingress).
    RaySwitch("RAY_SERVE_ENABLE_HA_PROXY", "1", "RAY_SERVE_ENABLE_HA_PROXY", "haproxy"),
    # Direct ingress keeps a stopping ingress replica open this long so external load balancers can
    # deregister it (default 30 s, which made Ctrl-C of `serve run` take 35+ s). On one node HAProxy is
    # reconfigured by the controller itself within a second.
    RaySwitch(
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
        "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
        "haproxy",
    ),
    # Serve's throughput bundle: gRPC instead of Ray actor calls between deployments, buffered request logs,
    # no replica logs on stderr, the GC frozen after start-up, one event loop per replica.
    RaySwitch("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED", "haproxy"),
    # The controller's loop ran 10 times a second (~2-5 % of a core on this machine, a cost per request at
    # video rates); twice a second still reacts to a dead replica or an autoscaling decision well within 1 s.
    RaySwitch("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5", "CONTROL_LOOP_INTERVAL_S", "haproxy"),
    # A request in flight on an ingress replica that dies gets no answer; HAProxy replays it on another replica
    # (Ray's default retries only a failed connect). Safe here: every endpoint is a stateless prediction.
    RaySwitch(
        "RAY_SERVE_HAPROXY_RETRY_ON",
        "conn-failure empty-response junk-response",
        "RAY_SERVE_HAPROXY_RETRY_ON",
        "haproxy",
    ),
    # Up to three replays. HAProxy balances by least connections, so a dead replica (none open) is picked again
    # until three errors in a row mark it down: the third replay at the latest goes to a live one.
    RaySwitch("RAY_SERVE_HAPROXY_RETRIES", "3", "RAY_SERVE_HAPROXY_RETRIES", "haproxy"),
    # HAProxy can replay only a request it still holds whole: 256 KiB covers the text and JSON requests and
    # a short WAV (Ray's default buffer is 16 KiB). Larger uploads stream through and are not replayed.
    RaySwitch("RAY_SERVE_HAPROXY_TUNE_BUFSIZE", "262144", "RAY_SERVE_HAPROXY_TUNE_BUFSIZE", "haproxy"),
    # With Ray Serve's Python proxy (`--plain-proxy`): the proxy sends a request again when the ingress replica that
    # had it died, instead of answering 500 (serve/proxy_replay.py). No request is lost to one ingress replica's
    # death, which HAProxy cannot promise (docs/architecture.md, "An ingress death"); the proxy costs more CPU.
    RaySwitch(
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH",
        "serve.proxy_replay:middlewares",
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH",
        "plain_proxy",
    ),
    # In the Serve config files' runtime_env (they reach only the replicas): each replica handles requests, runs
    # the application's code and routes handle calls on one asyncio loop instead of three threads.
    RaySwitch(
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "replica"
    ),
    RaySwitch("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "replica"),
)

# The Ray-instance-wide switches of the shipped setup (HAProxy in front).
FAST_INGRESS_ENV: dict[str, str] = {s.env: s.value for s in RAY_SWITCHES if s.scope == "haproxy"}
# With Ray Serve's Python proxy instead (`--plain-proxy`).
PLAIN_PROXY_ENV: dict[str, str] = {s.env: s.value for s in RAY_SWITCHES if s.scope == "plain_proxy"}


def launch_env(plain_proxy: bool = False, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``serve run``: ``base`` (default: this process's) plus :data:`FAST_INGRESS_ENV`, or
    :data:`PLAIN_PROXY_ENV` and the repository on ``PYTHONPATH`` (the proxy imports the replay) for the plain proxy.

    Variables already set in ``base`` win, so any of them can be overridden (e.g. ``RAY_SERVE_ENABLE_HA_PROXY=0``).
    """
    env = dict(os.environ if base is None else base)
    for key, value in (PLAIN_PROXY_ENV if plain_proxy else FAST_INGRESS_ENV).items():
        env.setdefault(key, value)
    if plain_proxy:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _descendants(root: int) -> set[int]:
    """Process ids of ``root``'s descendants (Linux ``/proc``; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    stack = [root]
    while stack:
        for child in parents.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def _start_time(pid: int) -> str | None:
    """Start time of ``pid`` (field 22 of its stat): tells a process from a later one that reused its id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2 :].split()[19]
    except (OSError, IndexError):
        return None


def _name(pid: int) -> str:
    """The first words of a process's command line (for messages)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:60].strip()
    except OSError:
        return "?"


def kill_leftovers(seen: dict[int, str | None]) -> list[int]:
    """SIGKILL each process of ``seen`` (pid -> start time) that is still the same process; the pids killed."""
    killed = []
    for pid, started in seen.items():
        if started is not None and _start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so ``serve run`` shuts down on it even when this
    process was started with SIGINT ignored (a shell's background job), which a child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve.launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", nargs="?", type=Path, default=DEFAULT_CONFIG, help="Serve config file")
    parser.add_argument(
        "--plain-proxy",
        action="store_true",
        help="Ray Serve's Python proxy instead of HAProxy: slower, but it replays requests a dying ingress had",
    )
    parser.add_argument("--grace", type=float, default=60.0, help="seconds to wait for a clean shutdown")
    parser.add_argument(
        "--print-env", action="store_true", help="print the variables it would set, as shell assignments, and exit"
    )
    args, extra = parser.parse_known_args(argv)
    if args.print_env:
        for key, value in (PLAIN_PROXY_ENV if args.plain_proxy else FAST_INGRESS_ENV).items():
            print(f"{key}={shlex.quote(value)}")  # POSIX shell assignments: `set -a; eval "$(...)"; set +a`
        return 0
    serve_exe = shutil.which("serve") or str(Path(sys.executable).with_name("serve"))
    cmd = [serve_exe, "run", str(args.config), *extra]
    seen: dict[int, str | None] = {}
    stopping = False
    proc: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _: object) -> None:
        nonlocal stopping
        stopping = True
        if proc is not None:
            try:
                os.kill(proc.pid, signal.SIGINT)  # serve run shuts Serve down on SIGINT
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=launch_env(args.plain_proxy),
        start_new_session=True,
        preexec_fn=default_sigint,  # noqa: PLW1509 - no threads here yet
    )
    names: dict[int, str] = {}
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            if pid not in seen:
                seen[pid] = _start_time(pid)
                names[pid] = _name(pid)
        time.sleep(0.5 if not stopping else 0.2)
        if stopping and args.grace >= 0:
            try:
                proc.wait(timeout=args.grace)
            except subprocess.TimeoutExpired:
                print(f"serve run did not stop within {args.grace:g} s; killing it", file=sys.stderr)
                proc.kill()
            break
    proc.wait()
    time.sleep(1.0)  # let Ray's own shutdown finish what it can
    killed = kill_leftovers(seen)
    if killed:
        print(
            f"killed {len(killed)} process(es) left behind: "
            + ", ".join(f"{pid} ({names.get(pid, '?')})" for pid in killed),
            file=sys.stderr,
        )
    return proc.returncode or 0


if __name__ == "__main__":
    raise SystemExit(main())
