"""Static checks of the operations files (no Ray started): dashboard, Prometheus, Grafana, cluster.yaml, KubeRay.

- every metric the Grafana dashboard queries is exported by the code (serve/metrics.py, or Ray Serve built-ins),
  with the kinds and labels it really has, and every project metric is on the dashboard;
- cluster.yaml, the RayService, the Dockerfile and compose point at files that exist and parse;
- the RayService's serveConfigV2 is exactly deploy/serve_config.gpu.yaml.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from deploy import render_rayservice
from deploy.grafana import build_dashboard
from serve.launch import FAST_INGRESS_ENV
from tests.ops_helpers import (
    DASHBOARD,
    REPO,
    SERVE_TAGS,
    dashboard_exprs,
    exported_series,
    grouping_labels_in,
    metric_names_in,
    project_series,
    ray_serve_builtin_series,
)

SERVE_CPU = REPO / "deploy" / "serve_config.yaml"
SERVE_GPU = REPO / "deploy" / "serve_config.gpu.yaml"
RAYSERVICE = REPO / "deploy" / "kubernetes" / "rayservice.yaml"
GPU_DEPLOYMENTS = ("TextEncoder", "AudioEncoder", "VideoEncoder", "Transcriber")  # each on a fraction of a GPU


def _validate_serve_config(path: Path) -> dict:
    """Parse a Serve config file with Ray's own schema (what `serve deploy` / KubeRay accept)."""
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(data)
    return data


# --- Grafana dashboard vs. exported metrics -------------------------------------------------------------------


def test_dashboard_file_is_generated_output() -> None:
    assert DASHBOARD.read_text() == build_dashboard.render(), "run python deploy/grafana/build_dashboard.py"


def test_every_dashboard_metric_is_exported_by_the_code() -> None:
    used = metric_names_in(dashboard_exprs())
    known = set(project_series()) | ray_serve_builtin_series()
    unknown = sorted(used - known)
    assert not unknown, f"dashboard queries metrics nothing exports: {unknown}"
    # The dashboard must not be only built-ins: it really shows the project's metrics.
    assert used & set(project_series())


def test_every_project_metric_is_on_the_dashboard() -> None:
    from serve.metrics import METRICS

    used = metric_names_in(dashboard_exprs())
    missing = [spec.name for spec in METRICS if not used & exported_series(spec.name, spec.kind)]
    assert not missing, f"metrics without a dashboard panel: {missing}"


def test_dashboard_uses_histograms_and_counters_correctly() -> None:
    """Quantiles come from `_bucket` series grouped by `le`; counters are only used through rate/increase."""
    series = project_series()
    from serve.metrics import SPECS

    for expr in dashboard_exprs():
        for q in re.findall(r"histogram_quantile\(\s*[0-9.]+\s*,(.*)", expr):
            assert "_bucket" in q and "le" in grouping_labels_in(q), expr
        for name in metric_names_in([expr]):
            if name in series and SPECS[series[name]].kind == "counter":
                assert re.search(rf"(rate|increase)\({name}\b", expr), f"counter {name} used without rate: {expr}"


def test_dashboard_groups_only_by_labels_the_metrics_have() -> None:
    from serve.metrics import SPECS

    series = project_series()
    for expr in dashboard_exprs():
        own = [series[n] for n in metric_names_in([expr]) if n in series]
        if not own:
            continue
        allowed = set(SERVE_TAGS) | {"le"}
        for name in own:
            allowed |= set(SPECS[name].tag_keys)
        assert grouping_labels_in(expr) <= allowed, f"{expr} groups by labels {SPECS[own[0]].name} lacks"
        for label in re.findall(r"([a-z_]+)\s*=~?\s*\"", expr):
            assert label in allowed, f"{expr} filters on unknown label {label}"


def test_dashboard_shows_the_required_views() -> None:
    doc = json.loads(DASHBOARD.read_text())
    titles = " | ".join(p["title"].lower() for p in doc["panels"])
    for needed in (
        "latency per modality",
        "throughput",
        "error rate",
        "replicas per deployment",
        "batch size",
        "emotion mix",
        "deployment processing latency",
        "http requests",
    ):
        assert needed in titles, needed
    exprs = " ".join(dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, modality) (rate(ray_emotion_encoder_latency_ms_bucket" in exprs
    assert "ray_serve_deployment_processing_latency_ms_bucket" in exprs
    assert "ray_serve_num_http_requests_total" in exprs


def test_readme_documents_every_metric_as_exported() -> None:
    """The README's ops section has a row per metric: exported name, type and exactly its labels."""
    from serve.metrics import METRICS

    readme = (REPO / "README.md").read_text()
    section = readme.split("<!-- section:ops -->")[1].split("<!-- /section:ops -->")[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(ray_emotion_[a-z_]+)` \|.*$", section, re.MULTILINE)}
    for spec in METRICS:
        name = "ray_" + spec.name
        assert name in rows, f"README lacks {name}"
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        assert cells[1].startswith(spec.kind), (name, cells[1])
        assert set(re.findall(r"`([a-z_]+)`", cells[2])) == set(spec.tag_keys), (name, cells[2])
    assert set(rows) == {"ray_" + spec.name for spec in METRICS}


# --- Prometheus / Grafana provisioning / compose / Dockerfile ------------------------------------------------


def test_prometheus_scrapes_ray_service_discovery() -> None:
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    files = [f for sd in jobs["ray"]["file_sd_configs"] for f in sd["files"]]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    # Ray writes the file under this name (ray._private.ray_constants), and compose's service exports on 8080.
    from ray._private import ray_constants

    assert Path(files[0]).name == ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
    assert any(t.endswith(":8080") for c in jobs["emotion-compose"]["static_configs"] for t in c["targets"])


def test_grafana_provisioning_and_compose_agree() -> None:
    datasource = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["type"] == "prometheus"
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/emotion.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"emotion", "prometheus", "grafana"} <= set(services)
    mounts = {}
    for service in services.values():
        for volume in service.get("volumes", []):
            host, container = volume.split(":")[:2]
            assert (REPO / host).exists(), f"compose mounts missing {host}"
            mounts[container] = host
    assert Path(mounts[dash_dir]).resolve() == (REPO / "deploy/grafana/dashboards").resolve()
    assert mounts["/etc/prometheus/prometheus.yml"].endswith("deploy/prometheus/prometheus.yml")
    assert services["grafana"]["environment"]["PROMETHEUS_URL"].startswith("http://prometheus:")


def test_dockerfile_matches_requirements_and_config() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert "pip install" in text and "-r requirements.txt" in text
    assert "serve run deploy/serve_config.yaml" in text
    assert "--metrics-export-port=8080" in text
    assert "PYTHONPATH=/app" in text  # Serve replicas import serve.app from the copied repository
    _validate_serve_config(SERVE_CPU)


# --- cluster.yaml ------------------------------------------------------------------------------------------------


def test_cluster_yaml_is_a_valid_ray_cluster_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    gpu_types = [name for name, t in types.items() if name != raw["head_node_type"]]
    assert gpu_types, "no worker node type"
    gpu = types[gpu_types[0]]
    assert 0 <= gpu["min_workers"] < gpu["max_workers"]
    assert "g" in gpu["node_config"]["InstanceType"][:2], "worker type should be a GPU instance"
    assert "InstanceType" in head["node_config"]
    # The Ray in the image is the Ray the code is tested with.
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")


def test_cluster_yaml_points_at_files_that_exist_and_parse() -> None:
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    mounts = raw["file_mounts"]
    assert any((REPO / src).resolve() == REPO for src in mounts.values()), "the repository is not synced"
    remote_repo = next(dst for dst, src in mounts.items() if (REPO / src).resolve() == REPO)

    def repo_files(commands: list[str], suffix: str) -> list[Path]:
        found = []
        for command in commands:
            for token in shlex.split(command.replace(";", " ; ")):
                token = token.replace("$HOME", "~")
                if token.endswith(suffix):
                    rel = token.removeprefix(remote_repo).lstrip("/") if token.startswith(remote_repo) else token
                    found.append(REPO / rel)
        return found

    requirements = repo_files(raw["setup_commands"], ".txt")
    assert requirements and all(p.exists() for p in requirements)
    configs = repo_files(raw["head_start_ray_commands"], ".yaml")
    configs = [c for c in configs if "serve_config" in c.name]
    assert configs == [SERVE_GPU]
    assert any("serve deploy deploy/serve_config.gpu.yaml" in c for c in raw["head_start_ray_commands"])
    _validate_serve_config(SERVE_GPU)


# --- KubeRay RayService ------------------------------------------------------------------------------------------


def test_rayservice_is_rendered_from_the_gpu_serve_config() -> None:
    assert RAYSERVICE.read_text() == render_rayservice.render(), "run python deploy/render_rayservice.py"
    assert render_rayservice.serve_config_of(RAYSERVICE.read_text()) == _validate_serve_config(SERVE_GPU)


def test_every_ray_process_gets_the_launchers_switches() -> None:
    """HAProxy, throughput mode and replay on ingress death are Ray-wide: each cluster recipe must set them all."""
    cluster = yaml.safe_load(RAYSERVICE.read_text())["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container["env"]}
            assert {k: env.get(k) for k in FAST_INGRESS_ENV} == FAST_INGRESS_ENV, container["name"]
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        command = next(c for c in raw[key] if "ray start" in c)
        assert 0 <= command.find("serve.launch --print-env") < command.index("ray start"), key
    # what --print-env prints, a POSIX shell reads back as the same values
    shell = f'set -a; eval "$({shlex.quote(sys.executable)} -m serve.launch --print-env)"; set +a; env'
    out = subprocess.run(["bash", "-c", shell], cwd=REPO, capture_output=True, text=True, check=True).stdout
    exported = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert {k: exported.get(k) for k in FAST_INGRESS_ENV} == FAST_INGRESS_ENV


def test_rayservice_has_a_gpu_worker_group() -> None:
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    groups = cluster["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in groups
        if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups
    group = gpu_groups[0]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["maxReplicas"] > 1


def test_gpu_serve_config_uses_fractional_gpus() -> None:
    """Each encoder and the transcriber in the GPU config ask for a fraction of a GPU (so the worker group above can
    host them)."""
    config = _validate_serve_config(SERVE_GPU)
    gpus = {
        d["name"]: d.get("ray_actor_options", {}).get("num_gpus", 0)
        for app in config["applications"]
        for d in app.get("deployments", [])
    }
    for name in GPU_DEPLOYMENTS:
        assert 0 < gpus.get(name, 0) <= 1, f"{name}: num_gpus {gpus.get(name)}"


def test_hot_update_goes_through_deployment_user_config_not_args() -> None:
    """What the README's hot-update how-to relies on, in Ray Serve's own terms.

    Serve restarts every replica when an application's code version changes, and that version hashes the
    import path, runtime env and ``args``; a deployment's ``user_config`` is not in it (a change there is a
    ``reconfigure`` of the live replicas, exercised under load by test_ops_serve.py).
    """
    import copy

    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeApplicationSchema

    app = _validate_serve_config(SERVE_GPU)["applications"][0]

    def version(config: dict) -> str:
        return get_app_code_version(ServeApplicationSchema.model_validate(config))

    new_weights = copy.deepcopy(app)
    text = next(d for d in new_weights["deployments"] if d["name"] == "TextEncoder")
    text["user_config"] = {"weights_dir": "/models/text-v2", "revision": "2"}
    assert version(new_weights) == version(app)

    new_args = copy.deepcopy(app)
    new_args["args"]["models"]["revision"] = "2"
    assert version(new_args) != version(app)


def _encoder_resources() -> tuple[float, float]:
    """CPUs and GPUs that one replica of each encoder and of the transcriber asks for in the GPU config."""
    config = _validate_serve_config(SERVE_GPU)
    opts = [
        d.get("ray_actor_options", {})
        for app in config["applications"]
        for d in app.get("deployments", [])
        if d["name"] in GPU_DEPLOYMENTS
    ]
    assert len(opts) == len(GPU_DEPLOYMENTS)
    return sum(o.get("num_cpus", 1) for o in opts), sum(o.get("num_gpus", 0) for o in opts)


def test_one_gpu_worker_hosts_one_replica_of_each_encoder() -> None:
    """The GPU worker of cluster.yaml and of the RayService can hold Text+Audio+Video+Transcriber replicas together."""
    cpus, gpus = _encoder_resources()
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    worker = next(t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"])
    assert cpus <= worker["resources"]["CPU"] and gpus <= worker["resources"]["GPU"], (cpus, gpus)

    manifest = yaml.safe_load(RAYSERVICE.read_text())
    group = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    ray_cpus = float(group["rayStartParams"].get("num-cpus", limits["cpu"]))
    assert ray_cpus <= float(limits["cpu"])
    assert cpus <= ray_cpus and gpus <= float(limits["nvidia.com/gpu"]), (cpus, gpus, limits)


@pytest.mark.parametrize("script", [render_rayservice, build_dashboard])
def test_generators_check_mode_passes(script) -> None:
    assert script.main(["--check"]) == 0


# --- API keys ------------------------------------------------------------------------------------------------------


def test_api_keys_are_required_on_clusters_and_mounted_never_committed() -> None:
    """The GPU config (cluster launcher, RayService) requires keys from a file that both deployments mount, from
    outside the repository; the local CPU config leaves the service open."""
    from serve.config import AppConfig

    def access(path: Path):
        return AppConfig.from_args(_validate_serve_config(path)["applications"][0]["args"]).access

    assert not access(SERVE_CPU).api_keys.required
    keys = access(SERVE_GPU).api_keys
    assert keys.required and keys.file
    key_dir = str(Path(keys.file).parent)

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    source = raw["file_mounts"][key_dir]
    assert source.startswith("~/")  # a folder of the operator's machine, not of the repository

    manifest = yaml.safe_load(RAYSERVICE.read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == key_dir]
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] and not secret.get("optional", False) and mount["readOnly"] is True
