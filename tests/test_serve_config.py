"""The configuration schema, the Serve config files and the application builder (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from models.labels import MODALITIES
from serve.config import AppConfig, EncoderConfig, EncoderUserConfig
from serve.metrics import METRIC_NAMES, METRICS, PREFIX

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"cpu": REPO / "deploy" / "serve_config.yaml", "gpu": REPO / "deploy" / "serve_config.gpu.yaml"}
DEPLOYMENTS = {"TextEncoder", "AudioEncoder", "VideoEncoder", "Transcriber", "FusionIngress"}
ENCODERS = ("TextEncoder", "AudioEncoder", "VideoEncoder", "Transcriber")  # each scales on its own, on GPU a share


def test_defaults() -> None:
    cfg = AppConfig.from_args(None)
    assert cfg.limits.max_upload_mb == 50
    assert cfg.limits.max_upload_bytes == 50 * 1024 * 1024
    assert cfg.limits.num_frames == 16
    assert cfg.limits.decode_limits().timeout_s == cfg.limits.decode_timeout_s
    for m in MODALITIES:
        enc = cfg.encoders[m]
        assert enc.max_batch_size <= enc.max_ongoing_requests
        assert enc.timeout_s > 0
    assert cfg.models.weights("fusion") is None
    assert cfg.transcriber.default_mode == "return" and cfg.transcriber.timeout_s > 0
    assert cfg.transcriber.settings().compute_type == "auto"  # int8 on CPU, float16 on a GPU


def test_transcriber_keys_are_validated() -> None:
    cfg = AppConfig.from_args({"transcriber": {"default_mode": "fuse", "workers": 2, "language": "de"}})
    assert cfg.transcriber.default_mode == "fuse" and cfg.transcriber.settings().workers == 2
    assert cfg.transcriber.settings().language == "de"
    for bad in ({"default_mode": "always"}, {"compute_type": "int4"}, {"beam_size": 0}, {"timeout": 3}):
        with pytest.raises(ValidationError):
            AppConfig.from_args({"transcriber": bad})


def test_args_are_validated() -> None:
    cfg = AppConfig.from_args(
        {
            "limits": {"max_upload_mb": 1},
            "encoders": {"audio": {"max_batch_size": 2}},
            "models": {"text_backbone": "/some/minilm"},
        }
    )
    assert cfg.limits.max_upload_bytes == 1024 * 1024
    assert cfg.encoders.audio.max_batch_size == 2
    assert cfg.encoders.text.max_batch_size == 16  # untouched defaults stay
    with pytest.raises(ValidationError):
        AppConfig.from_args({"limits": {"max_upload_mbb": 1}})  # typo: unknown key
    with pytest.raises(ValidationError):
        AppConfig.from_args({"limits": {"max_upload_mb": 0}})
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        EncoderConfig(max_batch_size=32, max_ongoing_requests=8)


def test_user_configs_carry_weights_and_batching() -> None:
    cfg = AppConfig.from_args({"models": {"text_weights": "/w/text", "text_backbone": "/b", "revision": "r2"}})
    text = cfg.encoder_user_config("text")
    assert text == {
        "weights_dir": "/w/text",
        "backbone": "/b",
        "revision": "r2",
        "max_batch_size": cfg.encoders.text.max_batch_size,
        "batch_wait_timeout_s": cfg.encoders.text.batch_wait_timeout_s,
    }
    assert cfg.encoder_user_config("audio")["backbone"] is None  # the backbone override is text-only
    EncoderUserConfig.model_validate(text)  # what reconfigure accepts
    assert cfg.ingress_user_config() == {"fusion_weights": None, "revision": "r2"}
    assert cfg.transcriber_user_config() == {"revision": "r2"}  # a new revision reloads the transcriber in place


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_serve_config_files(kind: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(CONFIGS[kind].read_text())
    ServeDeploySchema.model_validate(doc)
    (app,) = doc["applications"]
    assert app["import_path"] == "serve.app:build_app"
    AppConfig.from_args(app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == DEPLOYMENTS
    for name in ENCODERS:
        d = deployments[name]
        assert "autoscaling_config" in d and d["autoscaling_config"]["min_replicas"] >= 1
        gpus = d["ray_actor_options"]["num_gpus"]
        assert gpus == 0 if kind == "cpu" else 0.25 <= gpus <= 0.5
    if kind == "cpu":  # fits a 2-core machine at minimum replicas
        total = sum(d["ray_actor_options"]["num_cpus"] for d in deployments.values())
        assert total <= 2


def test_build_app_binds_the_graph() -> None:
    from ray.serve._private.build_app import build_app as build_graph

    from serve.app import build_app

    built = build_graph(build_app({"encoders": {"video": {"max_batch_size": 4}}}), name="emotion")
    by_name = {d.name: d for d in built.deployments}
    assert set(by_name) == DEPLOYMENTS
    assert built.ingress_deployment_name == "FusionIngress"
    video = by_name["VideoEncoder"]
    assert video._deployment_config.user_config["max_batch_size"] == 4
    assert video._deployment_config.autoscaling_config is not None
    assert video.ray_actor_options["num_gpus"] == 0
    transcriber = by_name["Transcriber"]
    assert transcriber._deployment_config.autoscaling_config is not None
    assert transcriber._deployment_config.max_ongoing_requests == AppConfig().transcriber.max_ongoing_requests
    assert transcriber.init_args[0]["transcriber"]["default_mode"] == "return"


def test_metric_list() -> None:
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES)) == 16
    assert all(n.startswith(PREFIX) for n in METRIC_NAMES)
    kinds = {m.name: m.kind for m in METRICS}
    assert kinds["emotion_requests_total"] == "counter"
    assert kinds["emotion_ray_internals_ok"] == "gauge"
    assert kinds["emotion_encoder_latency_ms"] == "histogram"
    assert kinds["emotion_transcribe_latency_ms"] == kinds["emotion_transcribe_rtf"] == "histogram"
    assert all(m.boundaries for m in METRICS if m.kind == "histogram")


def test_model_paths_only_reach_user_config() -> None:
    """Model paths must never be constructor args (a change there restarts replicas); they are user_config.

    (A Serve config file's ``args`` are part of the application's code version, so hot updates there go
    through a deployment's ``user_config``; this checks the builder's side of that contract.)
    """
    from ray.serve._private.build_app import build_app as build_graph

    from serve.app import build_app

    def deployments(args: dict) -> dict:
        return {d.name: d for d in build_graph(build_app(args), name="emotion").deployments}

    before = deployments({})
    after = deployments({"models": {"text_weights": "/new/text", "fusion_weights": "/new/fusion", "revision": "2"}})
    for name, old in before.items():
        new = after[name]
        assert new.init_args[-1] == old.init_args[-1], name  # the settings/config argument is unchanged
        assert new._deployment_config.user_config != old._deployment_config.user_config, name
    assert after["TextEncoder"]._deployment_config.user_config["weights_dir"] == "/new/text"
    assert after["FusionIngress"]._deployment_config.user_config["fusion_weights"] == "/new/fusion"
