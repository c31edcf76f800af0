"""A real multi-node Ray cluster on 127.0.0.1 running ``deploy/serve_config.ha.yaml`` spread over its workers.

:class:`LoopbackCluster` starts a head node and worker nodes with ``ray.cluster_utils.Cluster`` (each node its own
raylet and processes, all on loopback) and deploys the HA config as ``serve deploy`` does (Serve's controller builds
the application from the config), overridden by :func:`spread_config`:

* the head has no CPU (``num_cpus: 0``, as KubeRay advises for a head): it runs the controller and the only HTTP
  proxy (``proxy_location: HeadOnly``, one port per host), never a replica;
* every deployment gets ``max_replicas_per_node: 1``: its two replicas sit on two worker nodes, so losing one node
  leaves one of each, and a third replica (autoscaling) needs a third node.

HTTP enters on the head through Ray Serve's Python proxy with the replay of ``serve/proxy_replay.py``, as
``python -m serve.launch --plain-proxy`` runs it. :meth:`LoopbackCluster.kill_worker` SIGKILLs a worker's raylet and
every process under it; :meth:`LoopbackCluster.leftovers` lists the Ray processes this cluster started that are
still alive (nothing after :meth:`LoopbackCluster.close`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import ray
import yaml

from bench.inputs import REPO_ROOT
from bench.servers import free_port
from serve.launch import PLAIN_PROXY_ENV

HA_CONFIG = REPO_ROOT / "deploy" / "serve_config.ha.yaml"
WORKER_CPUS = 2
TEXT_TIMEOUT_S = 90  # a model loading on the shared 2-core machine can starve text longer than the 10 s budget
UPLOAD_LIMIT_MB = 1  # bench.soak's over-limit upload stays cheap
APP_NAME = f"emotion-faults-{os.getpid()}"  # another run's replicas on this machine (bench.soak's) are not these
SERVING = frozenset({"HEALTHY", "UPSCALING", "DOWNSCALING"})  # deployment states that serve all their replicas
RAY_PROCESS_NAMES = ("raylet", "gcs_server", "ray::", "default_worker.py", "dashboard", "log_monitor", "runtime_env")


# ---- processes ---------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str] | None:
    """``(parent pid, start time)`` of ``pid`` (``None``: gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else (int(fields[1]), fields[19])


def process_tree(root: int) -> dict[int, str]:
    """``root`` and its live descendants: pid -> start time (a later process reusing a pid has another)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        info = _stat(int(entry.name))
        if info is not None:
            children.setdefault(info[0], []).append(int(entry.name))
            starts[int(entry.name)] = info[1]
    tree, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in starts and pid not in tree:
            tree[pid] = starts[pid]
            stack += children.get(pid, [])
    return tree


def alive(processes: dict[int, str]) -> dict[int, str]:
    """The processes of ``processes`` (pid -> start time) that still run."""
    return {pid: start for pid, start in processes.items() if (_stat(pid) or (0, None))[1] == start}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# ---- the Serve config ----------------------------------------------------------------------------------------


def spread_config(http_port: int, base: Path = HA_CONFIG, ingress_target: int | None = 4) -> dict[str, Any]:
    """``base`` on 127.0.0.1:``http_port`` behind one proxy on the head, each deployment at most once per node,
    named :data:`APP_NAME`.

    ``ingress_target`` (``target_ongoing_requests`` of ``FusionIngress``; the HA file says 16) lets a few more
    clients than the scenarios' usual load make Serve's autoscaling want a third ingress replica.
    """
    config = yaml.safe_load(base.read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    app = config["applications"][0]
    app["name"] = APP_NAME
    args = app.setdefault("args", {})
    args.setdefault("limits", {})["max_upload_mb"] = UPLOAD_LIMIT_MB
    encoders = args.setdefault("encoders", {})
    encoders["text"] = {**encoders.get("text", {}), "timeout_s": TEXT_TIMEOUT_S}
    for deployment in app["deployments"]:
        deployment["max_replicas_per_node"] = 1
        if ingress_target is not None and deployment["name"] == "FusionIngress":
            deployment["autoscaling_config"]["target_ongoing_requests"] = ingress_target
    return config


def changed_version(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with other ``args`` (one more timeline per ingress): a new code version, every replica replaced."""
    changed = copy.deepcopy(config)
    timeline = changed["applications"][0]["args"].setdefault("timeline", {})
    timeline["max_active"] = int(timeline.get("max_active", 4)) + 1
    return changed


# ---- the cluster ---------------------------------------------------------------------------------------------


class LoopbackCluster:
    """Head (no CPU: controller and proxy) and ``workers`` worker nodes on 127.0.0.1, this process the driver."""

    def __init__(self, workers: int = 2, system_config: dict[str, Any] | None = None) -> None:
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster

        if ray.is_initialized():
            raise RuntimeError("this process is already connected to a Ray instance")
        self._saved_env = dict(os.environ)
        self._saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
        # Every Ray address on 127.0.0.1, not the machine's address.
        ray_constants.ENABLE_RAY_CLUSTER = False
        os.environ.update(
            {
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                "HF_HUB_OFFLINE": "1",
                # Raylets pass their environment to workers: the repo importable everywhere (serve.app:build_app,
                # the proxy's serve.proxy_replay), and the proxy's replay switched on.
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
                **PLAIN_PROXY_ENV,
            }
        )
        self.started: dict[int, str] = {}  # every Ray process seen under this process: pid -> start time
        self.workers: list[Any] = []
        self.config: dict[str, Any] | None = None
        self.client: Any = None
        try:
            self.cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 0,
                    "node_ip_address": "127.0.0.1",
                    "include_dashboard": False,
                    "dashboard_port": free_port(),  # another Ray on this machine may hold the default 8265
                    "metrics_export_port": free_port(),  # given: the raylet does not wait for its agent to pick one
                    "_system_config": system_config or {},
                },
            )
            for _ in range(workers):
                self.add_worker()
            ray.init(address=self.cluster.address, logging_level="WARNING")
            self.session = ray._private.worker._global_node.session_name
            self.note_processes()
        except BaseException:
            self.close()
            raise

    # -- nodes --

    def add_worker(self, wait: bool = True) -> Any:
        """Start one more worker node (its own raylet); returns it."""
        node = self.cluster.add_node(
            num_cpus=WORKER_CPUS, node_ip_address="127.0.0.1", metrics_export_port=free_port(), wait=wait
        )
        self.workers.append(node)
        self.note_processes()
        return node

    def node_processes(self, node: Any) -> dict[int, str]:
        """Every live process of ``node``: its raylet with all its children (workers, agents) and its other
        processes (log monitor)."""
        tree: dict[int, str] = {}
        for infos in node.all_processes.values():
            for info in infos:
                tree.update(process_tree(info.process.pid))
        return tree

    def kill_worker(self, node: Any) -> list[int]:
        """SIGKILL every process of worker ``node`` at once, as a lost machine or OOM-killed pod; the pids."""
        victims = self.node_processes(node)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for infos in node.all_processes.values():
            for info in infos:
                with contextlib.suppress(Exception):
                    info.process.wait(10)  # reap the raylet and log monitor (children of this process)
        self.cluster.worker_nodes.discard(node)
        self.workers.remove(node)
        return sorted(victims)

    def note_processes(self) -> None:
        """Remember every process now under this one (Ray's and the replicas), for :meth:`leftovers`."""
        me = os.getpid()
        self.started.update({pid: s for pid, s in process_tree(me).items() if pid != me})
        for node in [self.cluster.head_node, *self.workers]:
            if node is not None:
                self.started.update(self.node_processes(node))

    def leftovers(self) -> dict[int, str]:
        """Ray processes of this cluster still alive: those noted, and any raylet or GCS of its session."""
        left = {pid: cmdline(pid) for pid in alive(self.started)}
        session = getattr(self, "session", None)
        if session:
            for entry in Path("/proc").glob("[0-9]*"):
                line = cmdline(int(entry.name))
                if session in line and any(name in line for name in ("raylet", "gcs_server")):
                    left[int(entry.name)] = line
        return {pid: line for pid, line in left.items() if any(name in line for name in RAY_PROCESS_NAMES)}

    # -- Serve --

    def deploy(self, config: dict[str, Any]) -> None:
        """Apply ``config`` as ``serve deploy`` does (a running application is updated to it)."""
        from ray.serve._private import api as serve_api
        from ray.serve.schema import ServeDeploySchema

        if self.client is None:
            self.client = serve_api.serve_start(http_options=config["http_options"], proxy_location="HeadOnly")
        self.client.deploy_apps(ServeDeploySchema.model_validate(config))
        self.config = config

    @property
    def base_url(self) -> str:
        assert self.config is not None
        return f"http://127.0.0.1:{self.config['http_options']['port']}"

    @property
    def serve_log_dir(self) -> Path:
        """Ray Serve's log folder of this cluster's session (the replica logs of every node: one machine)."""
        return Path(self.cluster.head_node.get_logs_dir_path()) / "serve"

    @property
    def app_name(self) -> str:
        assert self.config is not None
        return self.config["applications"][0]["name"]

    def _live_actors(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Live actors whose name starts with ``prefix``, by actor id, from Ray's actor table."""
        from ray._private import state

        return {
            actor_id: actor
            for actor_id, actor in state.actors().items()
            if actor.get("Name", "").startswith(prefix) and actor.get("State") == "ALIVE"
        }

    def replica_ids(self) -> set[str]:
        """Actor ids of the application's live replicas."""
        return set(self._live_actors(f"SERVE_REPLICA::{self.app_name}#"))

    def replicas(self) -> dict[str, Counter[str]]:
        """``{deployment: {node id: live replica actors}}`` of the application (replica actors are named
        ``SERVE_REPLICA::<app>#<deployment>#<id>``)."""
        placed: dict[str, Counter[str]] = {}
        for actor in self._live_actors(f"SERVE_REPLICA::{self.app_name}#").values():
            deployment = actor["Name"].split("#")[1]
            placed.setdefault(deployment, Counter())[actor["Address"]["NodeID"]] += 1
        return placed

    def running(self) -> dict[str, int] | None:
        """RUNNING replicas per deployment when the application is RUNNING and no deployment is updating or
        unhealthy, else ``None`` (also when the controller does not answer). A deployment that wants more replicas
        than the nodes hold (one per node) stays UPSCALING, with all it has running."""
        from ray import serve
        from ray.serve.exceptions import RayServeException

        try:
            app = serve.status().applications.get(self.app_name)
        except (ray.exceptions.RayError, RayServeException, TimeoutError):  # the controller is down or restarting
            return None
        if app is None or app.status != "RUNNING":
            return None
        if any(d.status not in SERVING for d in app.deployments.values()):
            return None
        return {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}

    def wait_running(self, timeout_s: float = 900, replicas: int = 2) -> dict[str, int]:
        """Until every deployment runs ``replicas`` or more, and ``/api/health`` says ok."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            counts = self.running()
            if counts and min(counts.values()) >= replicas and health_ok(self.base_url):
                return counts
            time.sleep(2)
        raise TimeoutError(f"the application did not run {replicas} replicas of each in {timeout_s:.0f} s")

    def controller_pid(self) -> int | None:
        """Process id of the live ``ServeController`` (``None`` while there is none)."""
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME

        actors = list(self._live_actors(SERVE_CONTROLLER_NAME).values())
        return actors[0]["Pid"] if actors else None

    def kill_controller(self) -> int | None:
        """Kill the ``ServeController`` actor (Serve's detached actor restarts it); its pid before."""
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        pid = self.controller_pid()
        ray.kill(ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE), no_restart=False)
        return pid

    # -- teardown --

    def close(self, wait_s: float = 30) -> dict[int, str]:
        """Stop Serve, Ray and every node; the Ray processes still alive ``wait_s`` later (none, normally)."""
        from ray._private import ray_constants

        with contextlib.suppress(Exception):
            self.note_processes()
        if ray.is_initialized():
            from ray import serve

            with contextlib.suppress(Exception):  # a short grace: replicas stranded by a lost node never stop
                if self.client is not None:
                    self.client.shutdown(timeout_s=5)
                serve.shutdown()  # forgets the client (the next Ray's first handle would wait for this controller)
            ray.shutdown()
        if getattr(self, "cluster", None) is not None:
            self.cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = self._saved_cluster_flag
        os.environ.clear()
        os.environ.update(self._saved_env)
        deadline = time.monotonic() + wait_s
        left = self.leftovers()
        while left and time.monotonic() < deadline:
            time.sleep(1)
            left = self.leftovers()
        return left


def health_ok(base_url: str) -> bool:
    """True when ``/api/health`` answers ``status: ok`` (every model loaded)."""
    try:
        return httpx.get(f"{base_url}/api/health", timeout=10).json().get("status") == "ok"
    except (httpx.HTTPError, ValueError):
        return False
