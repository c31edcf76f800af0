"""Access control of the prediction endpoints: API keys, per-client request rate, concurrent uploads and timelines.

:class:`AccessMiddleware` decides before FastAPI reads the request body, so a caller without a valid key, or
over its limits, is answered (401, or 429 with ``Retry-After``) without the ingress reading its upload.
Keys come from an environment variable and/or a file (:class:`ApiKeys`). Only their SHA-256 digests are
kept, compared with :func:`hmac.compare_digest`; logs and metrics name a key by :func:`key_id` only.
Limits live in the memory of each ingress replica: with N replicas a client gets up to N times the rate.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.config import AccessConfig, ApiKeysConfig
from serve.metrics import Metrics

logger = logging.getLogger("ray.serve")

MIN_KEY_CHARS = 16  # shorter keys are refused: a guessable key is no key
KEY_FILE_RECHECK_S = 10.0  # how often the key file's modification time is looked at
MAX_TRACKED_CLIENTS = 10_000  # rate-limit state kept before idle clients are forgotten
ANONYMOUS = "anonymous"  # the metric label of clients when keys are off (addresses never become labels)
ACCESS_METRIC = "emotion_access_decisions_total"

# FastAPI's own header parsing; also what /docs shows under "Authorize".
BEARER = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="`X-API-Key: <key>`")


def route_path(scope: Scope) -> str:
    """The request path relative to the application's route prefix (Serve's ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_id(digest: bytes) -> str:
    """A key's public name: 8 hex digits of its SHA-256 (``key-1a2b3c4d``), for metrics and logs."""
    return "key-" + digest.hex()[:8]


def parse_keys(text: str, source: str) -> tuple[bytes, ...]:
    """Digests of the keys in ``text`` (comma/whitespace separated; lines starting with ``#`` are comments)."""
    keys = [k for line in text.splitlines() if not line.lstrip().startswith("#") for k in re.split(r"[\s,]+", line)]
    keys = [k for k in keys if k]
    if any(len(k) < MIN_KEY_CHARS for k in keys):  # the message must never hold the key itself
        raise ValueError(f"an API key in {source} is shorter than {MIN_KEY_CHARS} characters")
    return tuple(dict.fromkeys(_digest(k) for k in keys))


class ApiKeys:
    """The accepted keys, as digests: from an environment variable (read once) and a file (re-read on change)."""

    def __init__(
        self,
        config: ApiKeysConfig,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        environ = os.environ if environ is None else environ
        self._env_digests = parse_keys(environ.get(config.env, ""), f"${config.env}") if config.env else ()
        self._file = Path(config.file).expanduser() if config.file else None
        self._file_stamp = self._stamp()
        self._file_digests: tuple[bytes, ...] = ()
        if self._file is not None and self._file_stamp is not None:
            self._file_digests = parse_keys(self._file.read_text(), str(self._file))
        elif self._file is not None:
            logger.warning(
                "API key file %s does not exist; it is looked for again every %g s", self._file, KEY_FILE_RECHECK_S
            )
        self._clock = clock
        self._checked_at = clock()
        self.sources = " and ".join(s for s in (f"${config.env}" if config.env else "", str(self._file or "")) if s)

    @property
    def digests(self) -> tuple[bytes, ...]:
        return self._env_digests + self._file_digests

    def ids(self) -> list[str]:
        """The :func:`key_id` of every key."""
        return [key_id(d) for d in self.digests]

    def match(self, presented: str) -> bytes | None:
        """The digest of ``presented`` if it is a key, else None (every key is compared, in constant time)."""
        self._maybe_reload()
        digest = _digest(presented)
        found = False
        for known in self.digests:
            found |= hmac.compare_digest(known, digest)
        return digest if found else None

    def _stamp(self) -> tuple[int, int, int] | None:
        """What tells a changed key file (modification time, size, inode); None when there is no file."""
        if self._file is None:
            return None
        try:
            st = self._file.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _maybe_reload(self) -> None:
        """Re-read the key file when it changed (a rotated Kubernetes Secret); a bad file keeps the old keys."""
        now = self._clock()
        if self._file is None or now - self._checked_at < KEY_FILE_RECHECK_S:
            return
        self._checked_at = now
        stamp = self._stamp()
        if stamp == self._file_stamp:
            return
        try:
            digests = parse_keys(self._file.read_text(), str(self._file)) if stamp else ()
        except (OSError, ValueError) as exc:
            logger.warning("API key file %s not reloaded: %s", self._file, exc)
            return
        self._file_digests, self._file_stamp = digests, stamp
        logger.info(
            "API key file %s reloaded: %d keys (%s)", self._file, len(digests), ", ".join(key_id(d) for d in digests)
        )


class RateLimiter:
    """Token buckets per client: ``burst`` requests at once, refilled at ``per_minute / 60`` per second."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, time of last update)

    def take(self, client: str) -> float:
        """Spend one token of ``client``: 0.0 if it had one, else the seconds until it will have one."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_TRACKED_CLIENTS:
                self._forget_idle(now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        """Drop clients whose bucket has refilled (they start full again anyway)."""
        full = [c for c, (tokens, last) in self._buckets.items() if tokens + (now - last) * self.rate >= self.burst]
        for client in full:
            del self._buckets[client]


@dataclass
class UploadSlots:
    """Media requests in flight per client, capped at ``limit``."""

    limit: int
    in_flight: dict[str, int] = field(default_factory=dict)

    def acquire(self, client: str) -> bool:
        count = self.in_flight.get(client, 0)
        if count >= self.limit:
            return False
        self.in_flight[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self.in_flight.get(client, 0) - 1
        if count > 0:
            self.in_flight[client] = count
        else:
            self.in_flight.pop(client, None)


@dataclass(frozen=True)
class Client:
    """Who is calling: ``bucket`` keys the limits, ``label`` is the metric label (never a key or an address)."""

    bucket: str
    label: str


@dataclass(frozen=True)
class Rejection:
    """A refused request: HTTP status, a ``detail`` safe to show, headers, and the metric's decision."""

    status: int
    detail: str
    decision: str
    headers: dict[str, str] = field(default_factory=dict)
    label: str = ANONYMOUS  # the client's metric label when it is known (a 429)

    def response(self) -> JSONResponse:
        return JSONResponse({"detail": self.detail}, status_code=self.status, headers=self.headers)


class AccessControl:
    """The access policy of one ingress replica: who the caller is, and whether it may go ahead now."""

    def __init__(
        self,
        config: AccessConfig,
        metrics: Metrics,
        keys: ApiKeys | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = config.per_client
        self.metrics = metrics
        self.keys: ApiKeys | None = None
        if config.api_keys.required:
            self.keys = keys if keys is not None else ApiKeys(config.api_keys, clock=clock)
            if not self.keys.digests:  # fail closed, and loudly: the replica does not start
                raise ValueError(
                    f"API keys are required but none were found in {self.keys.sources or 'no source'}"
                    " (set access.api_keys.env / access.api_keys.file)"
                )
            logger.info("API keys required: %d keys (%s)", len(self.keys.digests), ", ".join(self.keys.ids()))
        per_minute = self.limits.requests_per_minute
        self.rate = RateLimiter(per_minute, self.limits.burst, clock) if per_minute else None
        uploads = self.limits.max_concurrent_uploads
        self.uploads = UploadSlots(uploads) if uploads else None
        timelines = self.limits.max_concurrent_timelines
        self.timelines = UploadSlots(timelines) if timelines else None

    @property
    def keys_required(self) -> bool:
        return self.keys is not None

    async def identify(self, conn: HTTPConnection) -> Client | Rejection:
        """The calling client, or a 401 when keys are required and no valid key was sent."""
        if self.keys is None:
            address = conn.client.host if conn.client else "unknown"
            return Client(bucket=f"address:{address}", label=ANONYMOUS)
        credentials = await BEARER(conn)
        presented = credentials.credentials if credentials else await API_KEY_HEADER(conn)
        if not presented:
            return Rejection(
                401,
                "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                "unauthorized",
                {"WWW-Authenticate": "Bearer"},
            )
        digest = self.keys.match(presented)
        if digest is None:
            return Rejection(
                401, "the API key is not valid", "unauthorized", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        name = key_id(digest)
        return Client(bucket=name, label=name)

    async def admit(self, conn: HTTPConnection, upload: bool, timeline: bool = False) -> Client | Rejection:
        """Identify the caller and apply its limits; an admitted upload or timeline holds a slot until
        :meth:`release`."""
        who = await self.identify(conn)
        if isinstance(who, Client):
            who = self._limit(who, upload)
        slots = self.timelines
        if isinstance(who, Client) and timeline and slots is not None and not slots.acquire(who.bucket):
            if upload:
                self.release(who)
            who = Rejection(
                429,
                f"too many timelines in progress from this client (at most {slots.limit} at once); "
                "retry when one has finished",
                "too_many_timelines",
                {"Retry-After": "5"},
                who.label,
            )
        decision = who.decision if isinstance(who, Rejection) else "allowed"
        self.metrics.inc(ACCESS_METRIC, decision=decision, client=who.label)
        return who

    def release(self, client: Client, upload: bool = True, timeline: bool = False) -> None:
        """End an admitted upload (and/or timeline)."""
        if upload and self.uploads is not None:
            self.uploads.release(client.bucket)
        if timeline and self.timelines is not None:
            self.timelines.release(client.bucket)

    def _limit(self, client: Client, upload: bool) -> Client | Rejection:
        if self.rate is not None:
            wait = self.rate.take(client.bucket)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                return Rejection(
                    429,
                    f"too many requests from this client (at most "
                    f"{self.limits.requests_per_minute:g} per minute, bursts of {self.limits.burst}); "
                    f"retry in {retry} s",
                    "rate_limited",
                    {"Retry-After": str(retry)},
                    client.label,
                )
        if upload and self.uploads is not None and not self.uploads.acquire(client.bucket):
            return Rejection(
                429,
                f"too many uploads in progress from this client (at most {self.uploads.limit} at "
                "once); retry when one has finished",
                "too_many_uploads",
                {"Retry-After": "1"},
                client.label,
            )
        return client


class AccessMiddleware:
    """Apply :class:`AccessControl` to ``paths`` before the body is read; ``upload_paths`` count as uploads."""

    def __init__(
        self,
        app: ASGIApp,
        access: AccessControl,
        paths: Collection[str],
        upload_paths: Collection[str] = (),
        timeline_paths: Collection[str] = (),
    ) -> None:
        self.app = app
        self.access = access
        self.paths = frozenset(paths)
        self.upload_paths = frozenset(upload_paths)
        self.timeline_paths = frozenset(timeline_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        if path not in self.paths:
            await self.app(scope, receive, send)
            return
        upload, timeline = path in self.upload_paths, path in self.timeline_paths
        who = await self.access.admit(HTTPConnection(scope), upload, timeline)
        if isinstance(who, Rejection):
            await who.response()(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)  # a streamed answer holds its slot until its last line
        finally:
            if upload or timeline:
                self.access.release(who, upload, timeline)
