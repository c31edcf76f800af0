"""Operations tests on a live local Ray cluster (two nodes, CPU only) running the real Serve application.

One cluster (``tests.ops_helpers.SharedOpsCluster``, on 127.0.0.1: the one ``test_ops_prometheus.py`` has used
before, when it ran) serves three tests, in this order:

1. ``test_metrics_exported``: requests on every endpoint, then Ray's metrics endpoints (one per node, found like
   Prometheus' service discovery finds them) show every metric of ``serve/metrics.py`` with its labels and
   non-zero counts, plus the Ray Serve built-ins the Grafana dashboard queries.
2. ``test_hot_reload_without_failures``: requests keep flowing while a new ``user_config`` (new text weights) is
   applied with the same call ``serve deploy`` makes; no request fails, replicas are not restarted, and the
   answers switch to the new model version.
3. ``test_text_encoder_scales_out_and_back``: a test-only autoscaling config on ``TextEncoder`` (short delays);
   bounded text load scales it from 1 to more replicas on the two-node cluster and back to 1, while the audio
   and video encoders keep their single replica.

The application is deployed from ``deploy/serve_config.yaml`` the way ``serve run deploy/serve_config.yaml``
does it (Serve's controller builds it from the config), with only test overrides: loopback HTTP on a free port,
proxy on the head node only, and the fast autoscaling config for ``TextEncoder`` (deployed by this module, over
the cluster's config as shipped). Ray reports metrics every 2 s here (production: 10 s).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray
import yaml
from ray.serve.exceptions import DeploymentUnavailableError

from tests.ops_helpers import (
    ENCODERS,
    REPO,
    SERVE_CONFIG,
    Sample,
    SharedOpsCluster,
    dashboard_exprs,
    exported_series,
    health_ok,
    loopback_app_config,
    metric_names_in,
    parse_prometheus,
    send_all_kinds,
    send_stream,
    wait_for,
)

# Test-only autoscaling for TextEncoder: react within seconds instead of Serve's production delays.
FAST_AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 3,
    "target_ongoing_requests": 1,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 3.0,
}
# Ray Serve built-ins on the dashboard that only appear after an exception inside a replica.
EVENT_ONLY_BUILTINS = {"ray_serve_deployment_error_counter_total"}
METRICS_TIMEOUT_S = 75  # Ray's metrics agent exports with a delay of several seconds


@dataclass
class Service:
    """The running application and how to reach it."""

    base_url: str
    app_name: str
    config: dict[str, Any]
    client: Any  # ray.serve._private.client.ServeControllerClient
    metrics_urls: list[str] = field(default_factory=list)

    def deploy(self, config: dict[str, Any]) -> None:
        """Apply a Serve config, as `serve deploy` / `serve run config.yaml` / KubeRay do."""
        from ray.serve.schema import ServeDeploySchema

        self.client.deploy_apps(ServeDeploySchema.model_validate(config))
        self.config = config

    def replica_states(self) -> dict[str, dict[str, int]]:
        """Replica count by state (RUNNING, STARTING, UPDATING, STOPPING...) per deployment."""
        from ray import serve

        app = serve.status().applications[self.app_name]
        return {name: {str(k): v for k, v in d.replica_states.items() if v} for name, d in app.deployments.items()}

    def replicas(self) -> dict[str, int]:
        """RUNNING replicas per deployment of the application."""
        return {name: states.get("RUNNING", 0) for name, states in self.replica_states().items()}

    def replica_actors(self, deployment: str) -> set[str]:
        """Names of the live replica actors of one deployment (they change only if replicas restart)."""
        names = ray.util.list_named_actors(all_namespaces=True)
        return {a["name"] for a in names if f"#{deployment}#" in a["name"] and a["name"].startswith("SERVE_REPLICA")}

    def scrape(self) -> list[Sample]:
        """All samples of every node's metrics endpoint."""
        samples: list[Sample] = []
        for url in self.metrics_urls:
            samples += parse_prometheus(httpx.get(url, timeout=10).text)
        return samples


def _app_config(base: dict[str, Any], http_port: int, text_user_config: dict[str, Any] | None = None) -> dict:
    """``deploy/serve_config.yaml`` with the test overrides (see the module docstring)."""
    config = loopback_app_config(base, http_port)
    app = config["applications"][0]
    deployments = app.setdefault("deployments", [])
    text = next((d for d in deployments if d["name"] == ENCODERS["text"]), None)
    if text is None:
        text = {"name": ENCODERS["text"]}
        deployments.append(text)
    text.pop("num_replicas", None)
    text["autoscaling_config"] = {**text.get("autoscaling_config", {}), **FAST_AUTOSCALING}
    if text_user_config is not None:
        text["user_config"] = text_user_config
    return config


@pytest.fixture(scope="module")
def service(ops_cluster: SharedOpsCluster) -> Iterator[Service]:
    """The application on the shared two-node cluster, with this module's autoscaling config for TextEncoder."""
    from ray import serve

    ops = ops_cluster.get(__name__)
    config = _app_config(yaml.safe_load(SERVE_CONFIG.read_text()), int(ops.base_url.rsplit(":", 1)[1]))
    svc = Service(ops.base_url, ops.app_name, config, ops.client, list(ops.metrics_urls))
    assert len(svc.metrics_urls) == 2
    svc.deploy(config)
    wait_for(
        lambda: (
            serve.status().applications.get(svc.app_name) is not None
            and serve.status().applications[svc.app_name].status == "RUNNING"
        ),
        300,
        2,
        "application RUNNING",
    )
    wait_for(lambda: health_ok(svc.base_url), 60, 1, "/api/health ok")
    yield svc


def _total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_exported(service: Service) -> None:
    from models.labels import EMOTIONS
    from serve.metrics import METRICS

    answers = send_all_kinds(service.base_url)
    send_stream(service.base_url)  # the live-stream metrics
    for kind in ("health", "text", "audio", "video", "fused", "video_no_audio"):
        assert answers[kind].status_code == 200, (kind, answers[kind].text)
    assert answers["empty_text"].status_code == 422
    assert set(answers["fused"].json()["contributions"]) == {"text", "audio", "video"}
    dropped = answers["video_no_audio"].json()["dropped"]
    assert "audio" in dropped, dropped

    app = service.app_name
    expected: list[tuple[str, dict[str, str]]] = []
    for modality, deployment in ENCODERS.items():
        for name in (
            "emotion_encoder_decode_ms",
            "emotion_encoder_model_ms",
            "emotion_encoder_latency_ms",
            "emotion_encoder_batch_size",
        ):
            expected.append((f"ray_{name}_count", {"modality": modality, "deployment": deployment, "application": app}))
    for endpoint in ("/api/predict", "/predict", "/predict/audio", "/predict/video", "/api/health"):
        expected.append(
            ("ray_emotion_requests_total", {"endpoint": endpoint, "status": "200", "deployment": "FusionIngress"})
        )
        expected.append(("ray_emotion_request_latency_ms_count", {"endpoint": endpoint}))
    expected.append(("ray_emotion_requests_total", {"endpoint": "/api/predict", "status": "422"}))
    for modality in ("text", "audio", "video", "fused"):
        expected.append(("ray_emotion_predictions_total", {"modality": modality, "deployment": "FusionIngress"}))
    expected.append(("ray_emotion_dropped_modalities_total", {"modality": "audio"}))
    for modality in ("audio", "video", "fused"):
        expected.append(
            ("ray_emotion_stream_update_latency_ms_count", {"modality": modality, "deployment": "FusionIngress"})
        )
    for name in ("ray_emotion_transcribe_latency_ms_count", "ray_emotion_transcribe_rtf_count"):
        expected.append((name, {"deployment": "Transcriber", "application": app}))  # audio answers carry words
    expected.append(("ray_emotion_stream_updates_total", {"outcome": "update"}))
    expected.append(("ray_emotion_stream_closes_total", {"reason": "client"}))
    # Every Ray Serve built-in the dashboard queries (steady-state ones) must be exported too.
    builtins = {n for n in metric_names_in(dashboard_exprs()) if n.startswith("ray_serve_")} - EVENT_ONLY_BUILTINS
    expected += [(name, {}) for name in sorted(builtins)]

    def missing() -> list[tuple[str, dict[str, str]]]:
        samples = service.scrape()
        return [
            (n, labels)
            for n, labels in expected
            if not (_total(samples, n, **labels) > 0 or (n in builtins and any(s.name == n for s in samples)))
        ]

    try:
        wait_for(lambda: not missing(), METRICS_TIMEOUT_S, 3, "metrics")
    except AssertionError:
        pytest.fail(f"not exported (or zero): {missing()}")

    samples = service.scrape()
    # Every documented metric is there with exactly its documented labels (+ Serve's and Ray's own).
    ray_labels = {
        "Component",
        "NodeAddress",
        "SessionName",
        "Version",
        "WorkerId",
        "JobId",
        "le",
        "otel_scope_name",
        "otel_scope_schema_url",
        "otel_scope_version",
    }
    for spec in METRICS:
        series = [s for s in samples if s.name in exported_series(spec.name, spec.kind)]
        assert series, spec.name
        for s in series:
            own = set(s.labels) - ray_labels - {"deployment", "replica", "application"}
            assert own == set(spec.tag_keys), (spec.name, s.labels)
            assert s.labels["application"] == app
    emotions = {s.labels["emotion"] for s in samples if s.name == "ray_emotion_predictions_total"}
    assert emotions <= set(EMOTIONS)
    reason = answers["video_no_audio"].json()["dropped"]["audio"]
    reasons = {s.labels["reason"] for s in samples if s.name == "ray_emotion_dropped_modalities_total"}
    assert reasons and all(r for r in reasons)
    assert any(r in json.dumps(reason) for r in reasons), (reasons, reason)


def _new_text_weights(tmp_path: Path) -> tuple[str, str]:
    """A copy of the text weights under a new version string (what a retrained model would look like)."""
    target = tmp_path / "text-v2"
    shutil.copytree(REPO / "models" / "weights" / "text", target)
    cfg_path = target / "config.json"
    cfg = json.loads(cfg_path.read_text())
    version = f"{cfg['metadata'].get('version', 'text')}-hotswap"
    cfg["metadata"]["version"] = version
    cfg_path.write_text(json.dumps(cfg, indent=2))
    expert = target / "context" / "config.json"  # the context expert's version follows the text model's (api.md)
    if expert.is_file():
        version += "+" + json.loads(expert.read_text())["metadata"]["version"]
    return str(target), version


async def _load(
    base_url: str,
    stop: asyncio.Event,
    concurrency: int,
    results: list[tuple[int, str, float]],
    text: str = "I did not expect that at all!",
) -> None:
    """``concurrency`` clients posting text until ``stop``; records (status, text model version, send time)."""

    async def client(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = await http.post("/api/predict", json={"text": text})
                version = r.json()["modalities"]["text"]["model_version"] if r.status_code == 200 else r.text[:200]
                results.append((r.status_code, version, sent))
            except httpx.HTTPError as exc:
                results.append((-1, repr(exc), sent))

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))


def test_hot_reload_without_failures(service: Service, tmp_path: Path) -> None:
    from ray import serve

    from serve.config import AppConfig

    weights_dir, new_version = _new_text_weights(tmp_path)
    app_cfg = service.config["applications"][0]
    user_config = {**AppConfig.from_args(app_cfg.get("args")).encoder_user_config("text"), "weights_dir": weights_dir}
    new_config = _app_config(service.config, int(service.base_url.rsplit(":", 1)[1]), user_config)
    before = service.replica_actors(ENCODERS["text"])
    handle = serve.get_deployment_handle(ENCODERS["text"], service.app_name)
    assert handle.info.remote().result()["weights_dir"] != weights_dir

    swapped_at: list[float] = []

    async def scenario() -> list[tuple[int, str, float]]:
        results: list[tuple[int, str, float]] = []
        stop = asyncio.Event()
        load = asyncio.create_task(_load(service.base_url, stop, 4, results))
        await asyncio.sleep(2)
        await asyncio.to_thread(service.deploy, new_config)  # the hot update, under load

        def swapped() -> bool:
            # Every replica, not a sample of routed calls: under this load autoscaling may have added one.
            try:
                infos = handle.broadcast("info").results(timeout_s=30)
            except DeploymentUnavailableError:  # this test's own handle between two replica lists: ask again
                return False
            return bool(infos) and all(i["weights_dir"] == weights_dir for i in infos)

        await asyncio.to_thread(wait_for, swapped, 150, 0.5, "new text weights loaded")
        swapped_at.append(time.monotonic())
        await asyncio.sleep(3)  # keep sending after the swap
        stop.set()
        await load
        return results

    results = asyncio.run(scenario())
    statuses = Counter(status for status, _, _ in results)
    failed = [r for r in results if r[0] != 200]
    assert set(statuses) == {200}, f"requests failed during the hot update: {statuses} {failed[:5]}"
    first = min(results, key=lambda r: r[2])
    assert first[1] != new_version, first
    # Requests sent once every replica had reconfigured (1 s margin) all meet the new weights; completion
    # order is not send order under concurrency, so the check is on send time.
    after = Counter(v for _, v, sent in results if sent > swapped_at[0] + 1.0)
    assert after and set(after) == {new_version}, after
    assert len(results) >= 10
    # Same replica actors: the weights were swapped in place by reconfigure, not by restarting replicas.
    assert before <= service.replica_actors(ENCODERS["text"])


def _alive(states: dict[str, int]) -> int:
    """Replicas that exist or are being started (not stopping)."""
    return sum(n for state, n in states.items() if state != "STOPPING")


def test_text_encoder_scales_out_and_back(service: Service) -> None:
    text, others = ENCODERS["text"], ("AudioEncoder", "VideoEncoder")
    wait_for(lambda: service.replica_states()[text] == {"RUNNING": 1}, 90, 1, "TextEncoder at 1 replica")
    start = service.replica_states()
    assert all(start[name] == {"RUNNING": 1} for name in others), start
    history: list[dict[str, dict[str, int]]] = []

    async def scenario() -> tuple[int, int]:
        results: list[tuple[int, str, float]] = []
        stop = asyncio.Event()
        load = asyncio.create_task(_load(service.base_url, stop, 8, results))
        decided = running = 1
        deadline = time.monotonic() + 180
        try:
            # Bounded load: stop as soon as a second replica RUNs (a new replica may need a minute to load
            # its model on this shared machine).
            while time.monotonic() < deadline and running < 2:
                states = await asyncio.to_thread(service.replica_states)
                history.append(states)
                decided = max(decided, _alive(states[text]))
                running = max(running, states[text].get("RUNNING", 0))
                await asyncio.sleep(1)
        finally:
            stop.set()
            await load
        assert all(status == 200 for status, _, _ in results), Counter(s for s, _, _ in results)
        return decided, running

    decided, running = asyncio.run(scenario())
    assert decided >= 2 and running >= 2, f"TextEncoder did not scale out: {history[-3:]}"

    def back_to_one() -> bool:
        states = service.replica_states()
        history.append(states)
        return states[text] == {"RUNNING": 1}

    wait_for(back_to_one, 90, 1, "TextEncoder back to 1 replica")
    changed = [h for h in history if any(h[name] != {"RUNNING": 1} for name in others)]
    assert not changed, f"other encoders changed: {changed[:3]}"
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
