"""Application builder: ``serve run serve.app:build_app`` or ``serve run deploy/serve_config.yaml``.

``build_app(args)`` validates ``args`` as :class:`serve.config.AppConfig` and binds the graph::

    FusionIngress(TextEncoder, AudioEncoder, VideoEncoder, transcriber=Transcriber)

Deployment options below are the CPU defaults (they fit a 2-core machine); a Serve config file's
``deployments:`` list overrides them per deployment (e.g. ``num_gpus`` in ``deploy/serve_config.gpu.yaml``).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve.config import AppConfig
from serve.encoders import ENCODERS
from serve.ingress import FusionIngress
from serve.transcriber import Transcriber


def _autoscaling(max_replicas: int, target: float) -> dict[str, Any]:
    return {
        "min_replicas": 1,
        "initial_replicas": 1,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target,
        "upscale_delay_s": 5,
        "downscale_delay_s": 30,
    }


# Per-deployment Ray Serve options (resources, autoscaling). Batching and limits are in AppConfig.
ENCODER_OPTIONS: dict[str, dict[str, Any]] = {
    "text": {"ray_actor_options": {"num_cpus": 0.4, "num_gpus": 0}, "autoscaling_config": _autoscaling(2, 8)},
    "audio": {"ray_actor_options": {"num_cpus": 0.4, "num_gpus": 0}, "autoscaling_config": _autoscaling(2, 4)},
    "video": {"ray_actor_options": {"num_cpus": 0.4, "num_gpus": 0}, "autoscaling_config": _autoscaling(2, 4)},
}
TRANSCRIBER_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.4, "num_gpus": 0},
    "autoscaling_config": _autoscaling(2, 2),
}
INGRESS_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.2, "num_gpus": 0},
    "autoscaling_config": _autoscaling(2, 16),
    "max_ongoing_requests": 64,
}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Bind the encoders, the transcriber and the fusion ingress for ``args`` (an :class:`AppConfig` as a dict)."""
    config = AppConfig.from_args(args)
    encoders = {}
    for modality, deployment in ENCODERS.items():
        enc = config.encoders[modality]
        settings = {"encoder": enc.model_dump(), "limits": config.limits.model_dump()}
        encoders[modality] = deployment.options(
            **ENCODER_OPTIONS[modality],
            max_ongoing_requests=enc.max_ongoing_requests,
            user_config=config.encoder_user_config(modality),
        ).bind(settings)
    transcriber = Transcriber.options(
        **TRANSCRIBER_OPTIONS,
        max_ongoing_requests=config.transcriber.max_ongoing_requests,
        user_config=config.transcriber_user_config(),
    ).bind({"transcriber": config.transcriber.model_dump(), "limits": config.limits.model_dump()})
    ingress = FusionIngress.options(**INGRESS_OPTIONS, user_config=config.ingress_user_config())
    # Model paths reach the replicas only through user_config, so changing them is a reconfigure, not a restart.
    return ingress.bind(
        encoders["text"],
        encoders["audio"],
        encoders["video"],
        config.model_dump(exclude={"models"}),
        transcriber=transcriber,
    )


# The default application as an object, for tools that need one rather than a builder:
# `serve build serve.app:app` (writes a Serve config file) and `serve run serve.app:app`.
app: Application = build_app()
