"""Replay in Ray Serve's Python proxy: a request whose ingress replica died is sent again, not lost.

Ray Serve's proxy answers 500 when the ``FusionIngress`` replica serving a request dies (or 503 while no
replica is reachable). Every endpoint of this service is a stateless prediction, so such a request can be sent
again: :class:`ReplayMiddleware` keeps the request body (up to ``max_body_bytes``), holds the answer until it is
complete, and sends the request again, after a short wait, when the attempt failed that way. Other answers,
including the application's own 503s (JSON), pass through unchanged. A timeline (``POST /predict/timeline``)
passes through untouched: its lines must reach the client as they come, and a replay would start it over.

It runs inside the proxy actor: ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy_replay:middlewares``
(``python -m serve.launch --plain-proxy`` sets it). Behind HAProxy (the default) requests do not pass through
the Python proxy and HAProxy's own replays apply instead (docs/architecture.md, "An ingress death").
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("ray.serve")  # the proxy's log file
MAX_BODY_BYTES = 8 * 1024 * 1024
SERVE_PATHS = ("/-/",)  # Serve's /-/healthz and /-/routes: a load balancer wants their 503 at once
STREAMED_PATHS = ("/predict/timeline",)  # answered line by line as the work goes: never held back, never replayed
ATTEMPTS = 6
BACKOFF_S = (0.05, 0.1, 0.2, 0.4, 0.8)


def replica_failed(messages: list[Message]) -> bool:
    """Whether an attempt's answer is the proxy's, for a replica that died or could not be reached."""
    start = next((m for m in messages if m["type"] == "http.response.start"), None)
    if start is None:
        return True  # no answer at all: the proxy's own 500
    status = start["status"]
    if status == 500:
        return True
    if status == 503:  # Serve's "no replica" 503 is plain text; the application's 503s are JSON
        return not Headers(raw=start.get("headers", [])).get("content-type", "").startswith("application/json")
    return False


class ReplayMiddleware:
    """Send an HTTP request again when the replica that had it died (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int = MAX_BODY_BYTES, attempts: int = ATTEMPTS, backoff_s: Any = BACKOFF_S
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.attempts = attempts
        self.backoff_s = tuple(backoff_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("path", "").startswith(SERVE_PATHS)  # the proxy's own health and routes: answered as is
            or scope.get("path", "").endswith(STREAMED_PATHS)  # a timeline streams its lines as they come
            or self._declared_length(scope) > self.max_body_bytes
        ):
            await self.app(scope, receive, send)
            return
        chunks, complete = await self._read_body(receive)
        if not complete:  # longer than the limit: not kept; passed on as it came
            await self.app(scope, self._replay(chunks, receive), send)
            return
        body = [b"".join(chunks)]
        messages: list[Message] = []
        for attempt in range(self.attempts):
            messages = []
            try:
                await self.app(dict(scope), self._replay(body, receive), self._keep(messages))
            except Exception:  # the proxy's failure for a dead replica; raised if it was the last attempt
                if attempt == self.attempts - 1:
                    raise
            if not replica_failed(messages) or attempt == self.attempts - 1:
                break
            logger.warning(
                "sending %s %s again (attempt %d): its replica failed", scope["method"], scope["path"], attempt + 2
            )
            await asyncio.sleep(self.backoff_s[min(attempt, len(self.backoff_s) - 1)])
        for message in messages:
            await send(message)

    @staticmethod
    def _keep(messages: list[Message]) -> Send:
        async def keep(message: Message) -> None:
            messages.append(message)

        return keep

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        try:
            return int(Headers(scope=scope).get("content-length", 0))
        except ValueError:
            return 0

    async def _read_body(self, receive: Receive) -> tuple[list[bytes], bool]:
        """The body's chunks, and whether that is all of it (``False``: the limit was passed first)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return chunks, False
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if not message.get("more_body", False):
                return chunks, True
            if size > self.max_body_bytes:
                return chunks, False

    @staticmethod
    def _replay(chunks: list[bytes], receive: Receive) -> Receive:
        """A ``receive`` that gives ``chunks`` again (all but the last with ``more_body``), then the client's."""
        queue = list(chunks)

        async def replay() -> Message:
            if queue:
                chunk = queue.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(queue)}
            return await receive()  # the rest of an unkept body, or the client's disconnect when it comes

        return replay


def middlewares() -> list[Middleware]:
    """The proxy middlewares (Ray Serve calls this from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(ReplayMiddleware)]
