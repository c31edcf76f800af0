"""``FusionIngress``: the HTTP entry point. Holds the encoders' handles and the small fusion module only.

The FastAPI app is built per replica by ``__serve_build_asgi_app__`` (``@serve.ingress()`` late binding):
routes need this replica's service and limits, and the static page must be mounted after the API
routes, which a class-level ``@serve.ingress(app)`` would re-append behind a ``/`` mount.
"""

from __future__ import annotations

from typing import Any

import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.api import create_app
from serve.config import AppConfig
from serve.service import FusionService


@serve.deployment(name="FusionIngress")
@serve.ingress()
class FusionIngress:
    """Fans requests out to ``TextEncoder``/``AudioEncoder``/``VideoEncoder`` (and the ``Transcriber``) and fuses
    their embeddings."""

    def __init__(
        self,
        text: DeploymentHandle,
        audio: DeploymentHandle,
        video: DeploymentHandle,
        config: dict[str, Any] | None = None,
        transcriber: DeploymentHandle | None = None,
    ) -> None:
        self.config = AppConfig.from_args(config)
        torch.set_num_threads(self.config.ingress_torch_threads)
        self.service = FusionService(
            {"text": text, "audio": audio, "video": video}, self.config, transcriber=transcriber
        )

    async def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Load or hot-swap the fusion weights (``{"fusion_weights": dir, "revision": ...}``)."""
        await self.service.load_fusion(user_config)

    async def check_health(self) -> None:
        """Serve's replica health check: the fusion module must be loaded."""
        if self.service.fusion is None:
            await self.service.load_fusion()

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this while the replica starts, before it routes any request to it."""
        if self.service.fusion is None:
            await self.service.load_fusion()
        await self.service.warm_up()
        return create_app(self.service, self.config)
