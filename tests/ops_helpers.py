"""Helpers shared by the operations tests: exported metric names, dashboard queries, Prometheus text parsing,
the Serve config on loopback with one request of every kind, and a real Prometheus server and its HTTP API.

Ray exports metrics through its metrics agent (OpenTelemetry -> Prometheus) with these naming rules, checked
against a running instance: every name gets a ``ray_`` prefix; counters end in ``_total`` (added unless the name
already ends so); histograms appear as ``_bucket`` (with ``le``), ``_sum`` and ``_count``; gauges keep the name.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ray
import yaml

from bench.servers import free_port

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "emotion-serve.json"
SERVE_CONFIG = REPO / "deploy" / "serve_config.yaml"
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
FIXTURES = REPO / "tests" / "fixtures"
ENCODERS = {"text": "TextEncoder", "audio": "AudioEncoder", "video": "VideoEncoder"}
TEST_TEXT_TIMEOUT_S = 90
RAY_PREFIX = "ray_"
SERVE_TAGS = frozenset({"deployment", "replica", "application"})


def exported_series(name: str, kind: str) -> set[str]:
    """Sample names Ray's metrics endpoint shows for a metric defined as ``name`` of ``kind``."""
    base = RAY_PREFIX + name
    if kind == "counter":
        return {base if base.endswith("_total") else base + "_total"}
    if kind == "histogram":
        return {base + "_bucket", base + "_sum", base + "_count"}
    return {base}


def project_series() -> dict[str, str]:
    """Every exported sample name of ``serve/metrics.py``'s metrics -> the metric's defined name."""
    from serve.metrics import METRICS

    return {series: spec.name for spec in METRICS for series in exported_series(spec.name, spec.kind)}


def ray_serve_builtin_series() -> set[str]:
    """Sample names Ray Serve's built-in metrics can export, read from the installed Ray Serve source.

    Every ``"serve_..."`` string literal in ``ray/serve`` is taken as a possible metric name (f-string names
    such as ``serve_num_{protocol_name}_requests`` are expanded for http and grpc); any kind's suffixes are
    allowed. This accepts a few non-metric strings, which is harmless for the question "could this be exported".
    """
    root = Path(ray.__file__).parent / "serve"
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for literal in re.findall(r"""["'](serve_[a-z0-9_{}]+)["']""", path.read_text(errors="ignore")):
            if "{" in literal:
                names.update(re.sub(r"\{[a-z_]+\}", proto, literal) for proto in ("http", "grpc"))
            else:
                names.add(literal)
    series: set[str] = set()
    for name in names:
        for kind in ("counter", "histogram", "gauge"):
            series |= exported_series(name, kind)
    return series


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and query variables."""
    doc = json.loads(path.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", []) if t.get("expr")]
    for var in doc.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


_METRIC_RE = re.compile(r"\b(ray_[a-zA-Z0-9_]+)")
_BY_RE = re.compile(r"\bby\s*\(([^)]*)\)")


def metric_names_in(exprs: Iterable[str]) -> set[str]:
    """Metric (sample) names referenced by PromQL expressions."""
    return {m for e in exprs for m in _METRIC_RE.findall(e)}


def grouping_labels_in(expr: str) -> set[str]:
    """Labels named in the ``by (...)`` clauses of one expression."""
    return {label.strip() for group in _BY_RE.findall(expr) for label in group.split(",") if label.strip()}


@dataclass(frozen=True)
class Sample:
    """One line of Prometheus text exposition."""

    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """All samples of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def wait_for(predicate: Callable[[], object], timeout_s: float, interval_s: float = 1.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


# --- The Serve application on loopback, and one request of every kind ------------------------------------------


def loopback_app_config(base: dict[str, Any], http_port: int) -> dict[str, Any]:
    """A Serve config (``deploy/serve_config.yaml``) served by one proxy on 127.0.0.1:``http_port``.

    The 2-core test machine is shared with training jobs: loading a model can take a minute there and starve
    requests for longer than the production 10 s text budget, so the text timeout is raised. The tests are about
    lost requests and metrics, not latency.
    """
    config = copy.deepcopy(base)
    config["proxy_location"] = "HeadOnly"  # the nodes of a local cluster share one machine: one proxy, one port
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": http_port}
    encoders = config["applications"][0].setdefault("args", {}).setdefault("encoders", {})
    encoders["text"] = {**encoders.get("text", {}), "timeout_s": TEST_TEXT_TIMEOUT_S}
    return config


def small_upload_args(max_upload_mb: int = 1) -> dict[str, Any]:
    """``deploy/serve_config.yaml``'s application args with a small upload limit, so 413 is cheap to provoke."""
    args = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]
    return {**args, "limits": {"max_upload_mb": max_upload_mb}}


def health_ok(base_url: str) -> bool:
    """True when ``/api/health`` answers ``status: ok`` (every model loaded)."""
    try:
        return httpx.get(f"{base_url}/api/health", timeout=10).json().get("status") == "ok"
    except (httpx.HTTPError, ValueError):
        return False


def send_all_kinds(base_url: str) -> dict[str, httpx.Response]:
    """One request of each kind (plus a rejected one and one with a dropped modality); returns their answers."""
    speech = (FIXTURES / "speech.wav").read_bytes()
    face = (FIXTURES / "face.mp4").read_bytes()
    silent_face = (FIXTURES / "face_noaudio.mp4").read_bytes()
    with httpx.Client(base_url=base_url, timeout=120) as http:
        answers = {
            "health": http.get("/api/health"),
            "text": http.post("/api/predict", json={"text": "I am so happy to see you again!"}),
            "audio": http.post("/predict/audio", files={"file": ("speech.wav", speech, "audio/wav")}),
            "video": http.post("/predict/video", files={"file": ("face.mp4", face, "video/mp4")}),
            "fused": http.post(
                "/predict",
                data={"text": "This is terrible."},
                files={"audio": ("speech.wav", speech, "audio/wav"), "video": ("face.mp4", face, "video/mp4")},
            ),
            "video_no_audio": http.post(
                "/predict/video", files={"file": ("face_noaudio.mp4", silent_face, "video/mp4")}
            ),
            "empty_text": http.post("/api/predict", json={"text": "   "}),
        }
    return answers


def send_stream(base_url: str, seconds: float = 2.5) -> Any:
    """A short live stream of face.mp4 on ``/ws/stream`` (so the stream metrics move); it must get an update.

    Returns the client's :class:`bench.stream.StreamResult`. The client stays until every update is in (the last
    one comes within an update interval plus its latency), so each encoder call is in an update's ``modalities``.
    """
    import asyncio

    from bench.stream import load_media, stream_media, ws_url

    result = asyncio.run(stream_media(ws_url(base_url), load_media(FIXTURES / "face.mp4"), seconds, tail_s=3.0))
    assert result.updates, (result.close_code, result.close_reason, result.messages)
    return result


# --- Grafana dashboard queries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    """One query of one dashboard panel."""

    panel: str
    ref: str
    expr: str
    instant: bool


def dashboard_queries(path: Path = DASHBOARD) -> list[PanelQuery]:
    """Every panel target of the dashboard, with its panel title and refId."""
    doc = json.loads(path.read_text())
    return [
        PanelQuery(p["title"], t["refId"], t["expr"], bool(t.get("instant")))
        for p in doc["panels"]
        for t in p.get("targets", [])
        if t.get("expr")
    ]


def dashboard_variables(path: Path = DASHBOARD) -> dict[str, dict[str, Any]]:
    """The dashboard's template variables by name."""
    return {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}


def grafana_substitute(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with Grafana's ``$name`` / ``${name}`` replaced (an unknown variable raises ``KeyError``)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)


# --- A real Prometheus server -----------------------------------------------------------------------------------


def prometheus_test_config(sd_file: Path, interval: str) -> dict[str, Any]:
    """``deploy/prometheus/prometheus.yml`` with the test's overrides of intervals and paths only.

    The file-SD job reads ``sd_file`` (this Ray session's own copy of the file the production path links to),
    rule files are resolved against ``deploy/prometheus/``, and jobs with static targets (compose's host
    ``emotion``, which does not resolve here) are left out so every target stays on loopback.
    """
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config.get("rule_files", [])]
    jobs = [job for job in config["scrape_configs"] if "file_sd_configs" in job]
    for job in jobs:
        for sd in job["file_sd_configs"]:
            sd.update(files=[str(sd_file)], refresh_interval=interval)
    config["scrape_configs"] = jobs
    return config


class Prometheus:
    """A Prometheus server on 127.0.0.1 (Debian's ``prometheus`` binary) and the parts of its HTTP API tests use."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (apt-get install -y prometheus)")
        workdir.mkdir(parents=True, exist_ok=True)
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / "prometheus.log"
        self.started = time.time()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, 60, 0.5, f"Prometheus ready (log: {self.log})")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>``'s ``data`` (fails on an API error)."""
        body = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30).json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's series as ``{"metric": {...}, "value": [t, "v"]}`` (a scalar becomes one series)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def stop(self) -> None:
        """Terminate the server (it flushes nothing the tests need)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def finite_values(series: list[dict[str, Any]]) -> list[float]:
    """The finite sample values of an instant query's result (NaN and infinities dropped)."""
    values = [float(s["value"][1]) for s in series]
    return [v for v in values if math.isfinite(v)]


def _ray_session() -> str | None:
    """The name of the Ray session this process is connected to (None when not connected)."""
    if not ray.is_initialized():
        return None
    return ray._private.worker._global_node.session_name


class SharedServeApp:
    """The real application on a local Ray, kept running for the next test module that asks for the same args.

    Starting Ray and the application (every model loading on two shared cores) takes half a minute or more, so
    modules that test the same application share one (``tests/conftest.py`` runs them back to back and shuts it
    down before any other module). :meth:`url` answers the running application when ``args`` are the same and its
    Ray is still the one started here; for other args it replaces the application (every replica starts afresh)
    on the same Ray and Serve proxy. The application is named :attr:`NAME`, never ``emotion`` and unique to this
    process: a module that looks for another application's replica processes on the machine does not find these,
    nor these another test run's.
    """

    NAME = f"emotion-test-{os.getpid()}"  # another test run's replicas on this machine are not these

    def __init__(self) -> None:
        self._session: str | None = None
        self._key: str | None = None
        self._base_url = ""

    def url(self, args: dict[str, Any]) -> str:
        """The base URL of the application built from ``args`` (deployed here unless it is already running).

        ``serve.run`` returns once every replica has started; the models may still be warming up.
        """
        from ray import serve

        from serve.app import build_app

        key = json.dumps(args, sort_keys=True)
        if self._session is not None and self._session == _ray_session():
            if key == self._key:
                return self._base_url
            self._key = None
            serve.delete(self.NAME)  # returns once the application is gone; its replica actors must be too
            wait_for(lambda: not self._replica_actors(), 60, 0.2, "the replaced application's replicas to stop")
        else:
            self.close()
            if ray.is_initialized():  # another module's Ray instance
                stop_serve_and_ray()
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                logging_level="WARNING",
                runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
            )
            self._session = _ray_session()
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            self._base_url = f"http://127.0.0.1:{port}"
        serve.run(build_app(args), name=self.NAME, route_prefix="/")
        self._key = key
        return self._base_url

    def _replica_actors(self) -> list[str]:
        """Live replica actors of :attr:`NAME` in this process's Ray (another Ray's, on this machine, do not count)."""
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        return [n for n in names if n.startswith("SERVE_REPLICA") and f"{self.NAME}#" in n]

    def close(self) -> None:
        """Stop the application and its Ray (nothing to do when none runs; left alone if another Ray session has
        replaced it, which that session's owner stops)."""
        session, self._session, self._key = self._session, None, None
        if session is not None and session == _ray_session():
            stop_serve_and_ray()


def _forget_serve() -> None:
    from ray import serve

    with contextlib.suppress(Exception):  # Ray already gone: nothing of Serve's is left to stop
        serve.shutdown()


def stop_serve_and_ray() -> None:
    """Stop Serve, then Ray. ``ray.shutdown()`` alone takes the replicas with it but leaves this process's Serve
    client pointing at the dead controller: the next session's first handle then waits for it forever."""
    _forget_serve()
    ray.shutdown()


# --- The two-node cluster of the operations tests ------------------------------------------------------------


@dataclass(frozen=True)
class OpsCluster:
    """The running two-node cluster and its application, as :class:`SharedOpsCluster` started them."""

    base_url: str
    app_name: str
    config: dict[str, Any]  # the Serve config deployed at start: deploy/serve_config.yaml on loopback
    client: Any  # ray.serve._private.client.ServeControllerClient
    sd_file: Path  # the Prometheus service-discovery file this Ray session writes
    head_target: str  # host:port of the head node's metrics exporter
    metrics_urls: list[str]  # every node's metrics endpoint


class SharedOpsCluster:
    """A local two-node Ray cluster running ``deploy/serve_config.yaml``, shared by the operations modules.

    Both nodes are on 127.0.0.1 (2 CPUs each, each exporting its metrics), the head runs the dashboard (which writes
    the Prometheus service-discovery file) and Ray reports metrics every :attr:`METRICS_INTERVAL_S` (production:
    10 s). The application is deployed from the config file as ``serve deploy`` does it (Serve's controller builds
    it), overridden only by :func:`loopback_app_config`. ``test_ops_prometheus.py`` and ``test_ops_serve.py`` share
    it (tests/conftest.py) instead of starting a cluster and loading every model twice.

    :meth:`get` answers the running cluster, or starts one; with ``fresh``, a cluster another module has used
    (sent requests to, redeployed) is replaced by a new one.
    """

    METRICS_INTERVAL_S = 2

    def __init__(self) -> None:
        self._ops: OpsCluster | None = None
        self._stack: contextlib.ExitStack | None = None
        self._session: str | None = None
        self._users: set[str] = set()

    def get(self, user: str, fresh: bool = False) -> OpsCluster:
        """The cluster for module ``user`` (its ``__name__``)."""
        if self._ops is not None and self._session == _ray_session() and not (fresh and self._users - {user}):
            self._users.add(user)
            return self._ops
        self.close()
        with contextlib.ExitStack() as stack:
            self._ops = self._start(stack)
            self._stack, self._session, self._users = stack.pop_all(), _ray_session(), {user}
        return self._ops

    def close(self) -> None:
        """Stop Ray and both nodes (Serve's replicas with them) and restore the environment (nothing to do when none
        runs)."""
        stack, self._stack, self._ops, self._session, self._users = self._stack, None, None, None, set()
        if stack is not None:
            stack.close()

    def _start(self, stack: contextlib.ExitStack) -> OpsCluster:
        import pytest
        from ray import serve
        from ray._private import ray_constants
        from ray.cluster_utils import Cluster
        from ray.serve._private import api as serve_api
        from ray.serve.schema import ServeDeploySchema

        if ray.is_initialized():  # another module's Ray instance: this needs its own cluster
            stop_serve_and_ray()
        env = pytest.MonkeyPatch()
        stack.callback(env.undo)
        # Every Ray address on 127.0.0.1 (Ray would otherwise advertise the machine's address), as on a laptop.
        env.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env.setenv("DASHBOARD_METRIC_PORT", str(free_port()))  # the dashboard's own metrics, a target too
        # Raylets pass their environment to workers: the repo becomes importable (serve.app:build_app) everywhere.
        env.setenv("PYTHONPATH", str(REPO), prepend=os.pathsep)
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": free_port(),
                "metrics_export_port": free_port(),
                "_system_config": {"metrics_report_interval_ms": self.METRICS_INTERVAL_S * 1000},
            },
        )
        stack.callback(cluster.shutdown)
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", metrics_export_port=free_port())
        ray.init(address=cluster.address, logging_level="WARNING")
        stack.callback(ray.shutdown)
        stack.callback(_forget_serve)  # runs first (the stack unwinds backwards)
        alive = [n for n in ray.nodes() if n["Alive"]]
        (head,) = [n for n in alive if n["MetricsExportPort"] == cluster.head_node.metrics_export_port]
        config = loopback_app_config(yaml.safe_load(SERVE_CONFIG.read_text()), free_port())
        app_name = config["applications"][0]["name"]
        client = serve_api.serve_start(http_options=config["http_options"], proxy_location="HeadOnly")
        client.deploy_apps(ServeDeploySchema.model_validate(config))
        base_url = f"http://127.0.0.1:{config['http_options']['port']}"
        wait_for(
            lambda: getattr(serve.status().applications.get(app_name), "status", None) == "RUNNING",
            300,
            2,
            "application RUNNING",
        )
        wait_for(lambda: health_ok(base_url), 60, 1, "/api/health ok")
        node = ray._private.worker._global_node
        return OpsCluster(
            base_url=base_url,
            app_name=app_name,
            config=config,
            client=client,
            sd_file=Path(node.get_session_dir_path()) / ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE,
            head_target=f"{head['NodeManagerAddress']}:{head['MetricsExportPort']}",
            metrics_urls=[f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in alive],
        )


# --- The three-node cluster of the fault tests ---------------------------------------------------------------


class SharedHACluster:
    """``bench.cluster.LoopbackCluster`` (a head with the controller and the Python proxy with its replay, two
    workers, all on 127.0.0.1) running ``deploy/serve_config.ha.yaml`` spread over the workers
    (:func:`bench.cluster.spread_config`), shared by ``test_serve_reliability_ha.py`` and ``test_ops_faults.py``
    instead of each loading ten replicas' models: tests/conftest.py runs the reliability module first, as the fault
    module's last test takes a worker node for good (its ``GROUP_ORDER``).

    :meth:`close` stops it and fails when any Ray process of it is still alive.
    """

    def __init__(self) -> None:
        self._cluster: Any = None
        self._session: str | None = None

    def get(self) -> Any:
        """The running cluster with every deployment at two replicas and ``/api/health`` ok, or a new one."""
        from bench.cluster import LoopbackCluster, spread_config

        if self._cluster is not None and self._session == _ray_session():
            return self._cluster
        self.close()
        if ray.is_initialized():  # another module's Ray: this needs a cluster of its own
            stop_serve_and_ray()
        cluster = LoopbackCluster(workers=2)
        try:
            cluster.deploy(spread_config(free_port()))
            cluster.wait_running(900)
        except BaseException:
            cluster.close()
            raise
        self._cluster, self._session = cluster, _ray_session()
        return cluster

    def close(self) -> None:
        """Stop the cluster (nothing to do when none runs); fails when it leaves a Ray process behind."""
        cluster, self._cluster, self._session = self._cluster, None, None
        if cluster is not None:
            left = cluster.close()
            assert left == {}, f"Ray processes left behind: {left}"
