"""The ingress's work, free of HTTP: fan a request out to the encoders, gather, fuse, explain.

Each modality is one call on its encoder's ``DeploymentHandle`` with its own timeout; all calls run
concurrently (``asyncio.gather``). A modality that errors or times out is dropped and reported; the
request fails only when none succeeded. With one modality the answer is that encoder's own calibrated
prediction (contribution 1.0); with two or more the attention fusion module combines the embeddings.

Replica failures (inference is idempotent, so a call may be repeated):

* a call that fails because its replica died or became unreachable (:data:`REPLICA_GONE`) is sent again,
  up to :attr:`FusionService.retries` times within the modality's timeout; Serve's router has dropped the
  dead replica by then, so the retry goes to another one;
* an encoder with no live replica is answered ``unavailable`` at once instead of after its timeout: before a
  call and while waiting for it, the ingress reads how many replicas its handle can route to
  (:func:`live_replicas`); where that cannot be read, a replica-death error marks the encoder down for
  ``probe_interval_s`` (:class:`EncoderHealth`), during which calls are refused except one probe per interval.

Calls are coalesced under load (:class:`CallCoalescer`): per encoder, at most ``calls_per_replica`` handle calls
per live replica are in flight; requests that arrive meanwhile wait in the ingress and leave together as one
``encode_many`` call carrying a list. One Ray round trip, one serialisation and one replica dispatch then serve
a whole batch, and the encoder's ``@serve.batch`` gets its items at once. A request that finds a free slot
leaves at once as a plain call, so a lone request waits for nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import ValidationError
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from models.inference import FusionPipeline
from models.labels import EMOTIONS, MODALITIES
from serve.config import AppConfig, IngressUserConfig
from serve.errors import EncoderError, encoder_error, is_client_error
from serve.metrics import Metrics
from serve.schemas import DIGITS, EncoderAnswer, HealthResponse, ModelStatus, PredictionResponse

logger = logging.getLogger("ray.serve")


class Handle(Protocol):
    """The part of ``DeploymentHandle`` used here (tests pass fakes)."""

    def remote(self, *args: Any, **kwargs: Any) -> Any: ...

    def options(self, **kwargs: Any) -> Handle: ...


class PredictionFailed(Exception):
    """No modality could be used; carries the HTTP status and a readable detail."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


async def _resolve(response: Any) -> Any:
    return await response


# Errors that mean "the replica is gone or unreachable", not "the input was bad": worth another replica.
REPLICA_GONE: tuple[type[BaseException], ...] = (
    ActorDiedError,
    ActorUnavailableError,
    RayActorError,
    ReplicaUnavailableError,
    DeploymentUnavailableError,
)
RETRIES = 2  # extra attempts of an encoder call whose replica died
PROBE_INTERVAL_S = 1.0  # how long a dead encoder is skipped when its replicas cannot be counted
WATCH_INTERVAL_S = 0.2  # how often a waiting call checks that its encoder still has a live replica
# How long an encoder must show no live replica before its modality is answered `unavailable`: the count can read
# zero for a moment while Serve updates its replica list (seen during a hot weight swap), which is not an outage.
UNAVAILABLE_AFTER_S = 0.5
ReplicaState = Literal["live", "none", "none_yet", "unknown"]


def replica_gone(exc: BaseException) -> bool:
    """True when ``exc`` (or the error it wraps) says the replica died or cannot be reached."""
    return isinstance(exc, REPLICA_GONE) or isinstance(getattr(exc, "cause", None), REPLICA_GONE)


def live_replicas(handle: Any) -> int | None:
    """How many replicas ``handle``'s router can send to now; ``None`` when unknown.

    Reads Ray Serve 2.60's router state (``DeploymentHandle._router._asyncio_router``; a dead replica leaves
    that set as soon as a call to it fails, and every replica the controller reports is in it). A router that
    has never been sent a non-empty replica list counts 0: its long poll answers within milliseconds of its
    first call, so past the caller's grace (``unavailable_after_s``) that means the deployment has had no
    running replica since (a router is made at a handle's first call: an ingress replica whose first call
    to an encoder comes after all its replicas died, such as the replacement of a killed ingress).
    Private API, so anything unexpected gives ``None`` and the caller falls back to :class:`EncoderHealth`.
    Fake handles in tests may define ``live_replicas()``.
    """
    own = getattr(type(handle), "live_replicas", None)
    if callable(own):
        return own(handle)
    try:
        router = handle._router._asyncio_router
        if not router.running_replicas_populated():
            return 0
        request_router = router._request_router
        if request_router is not None:
            return len(request_router.curr_replicas)
        return len(router._running_replicas)
    except Exception:  # noqa: BLE001 - not a Serve handle, or Serve's internals changed
        return None


def replicas_seen_dying(handle: Any) -> bool:
    """True when ``handle``'s router has no replica left because it saw them die itself.

    Serve 2.60's router drops a replica on its own when a call or a queue-length probe to it fails with
    ``ActorDiedError``, and keeps that replica's cached queue length; a replica list from the controller (a scale
    down, a hot weight swap) replaces the cache too. So no replica and a non-empty cache means deaths, which no
    grace period will undo. Private API: anything unexpected gives ``False`` (the grace applies). Fake handles in
    tests may define ``replicas_seen_dying()``.
    """
    own = getattr(type(handle), "replicas_seen_dying", None)
    if callable(own):
        return bool(own(handle))
    try:
        request_router = handle._router._asyncio_router._request_router
        return not request_router.curr_replicas and bool(request_router._replica_queue_len_cache._cache)
    except Exception:  # noqa: BLE001 - not a Serve handle, no router yet, or Serve's internals changed
        return False


class CallCoalescer:
    """Coalesces concurrent calls to one encoder into fewer handle calls (see the module docstring).

    :meth:`submit` returns an awaitable of the encoder's answer for one payload (a task or a future, both
    cancellable). The failure of a list call (its replica died, say) is raised to every request in it, each of
    which then retries on its own.
    """

    def __init__(self, handle: Handle, calls_per_replica: int, max_items: int, max_calls_per_replica: int = 0) -> None:
        self.handle = handle
        self.calls_per_replica = max(calls_per_replica, 1)
        self.max_items = max(max_items, 1)
        # Beyond calls_per_replica, a call leaves only with a full list (a backlog of a whole batch), up to this
        # many per replica: the replica's ongoing calls then exceed calls_per_replica, which is what its
        # autoscaling target (set at calls_per_replica) sees as load to scale on.
        self.max_calls_per_replica = max(max_calls_per_replica, self.calls_per_replica)
        self._many: Handle | None = None
        self._queue: list[tuple[Any, asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[Any]] = set()  # list calls under way (a reference keeps them alive)

    def _limit(self) -> int:
        return self.calls_per_replica * max(live_replicas(self.handle) or 1, 1)

    def _may_send(self) -> bool:
        """A call may leave now: a slot is free, or a full list waits and the overflow cap allows one more."""
        if not self._queue:
            return False
        replicas = max(live_replicas(self.handle) or 1, 1)
        if self._in_flight < self.calls_per_replica * replicas:
            return True
        return len(self._queue) >= self.max_items and self._in_flight < self.max_calls_per_replica * replicas

    def submit(self, payload: Any) -> Any:
        if not self._queue and self._in_flight < self._limit():
            response = self.handle.remote(payload)  # may raise (e.g. the router is gone): nothing counted yet
            self._in_flight += 1
            return asyncio.ensure_future(self._single(response))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((payload, future))
        if len(self._queue) >= self.max_items:
            self._pump()
        return future

    async def _single(self, response: Any) -> Any:
        try:
            return await response
        finally:
            self._release()

    def _release(self) -> None:
        self._in_flight -= 1
        self._pump()

    def _pump(self) -> None:
        while self._may_send():
            batch = [(p, f) for p, f in self._queue[: self.max_items] if not f.done()]  # done: timed out waiting
            del self._queue[: self.max_items]
            if not batch:
                continue
            self._in_flight += 1
            task = asyncio.ensure_future(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:
                answers = [await self.handle.remote(batch[0][0])]
            else:
                if self._many is None:
                    self._many = self.handle.options(method_name="encode_many")
                answers = await self._many.remote([p for p, _ in batch])
                if not isinstance(answers, list) or len(answers) != len(batch):
                    raise RuntimeError(f"encode_many answered {type(answers).__name__} for {len(batch)} items")
        except asyncio.CancelledError:
            for _, f in batch:
                f.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - passed on to every request of the call
            for _, f in batch:
                if not f.done():
                    f.set_exception(exc)
        else:
            for (_, f), answer in zip(batch, answers, strict=True):
                if not f.done():
                    f.set_result(answer)
        finally:
            self._release()


class EncoderUnavailable(Exception):
    """The encoder has no live replica (raised while waiting for a call)."""


class EncoderHealth:
    """Per-encoder short circuit, for when live replicas cannot be counted.

    ``mark_down`` after a call failed for a dead replica; while down, :meth:`allow` refuses calls except one
    probe per ``probe_interval_s``; the first success clears it.
    """

    def __init__(self, probe_interval_s: float = PROBE_INTERVAL_S, clock: Any = time.monotonic) -> None:
        self.probe_interval_s = probe_interval_s
        self.clock = clock
        self._down: dict[str, float] = {}  # modality -> when its last probe (or the failure) happened

    def is_down(self, modality: str) -> bool:
        return modality in self._down

    def mark_down(self, modality: str) -> None:
        self._down[modality] = self.clock()

    def mark_up(self, modality: str) -> None:
        self._down.pop(modality, None)

    def allow(self, modality: str) -> bool:
        """True if a call may go out now (the encoder is up, or this call is the interval's probe)."""
        since = self._down.get(modality)
        if since is None:
            return True
        now = self.clock()
        if now - since >= self.probe_interval_s:
            self._down[modality] = now
            return True
        return False


def failure_status(failed: Mapping[str, EncoderError], primary: tuple[str, ...]) -> int:
    """HTTP status when every modality failed: the input's fault (4xx) wins over server trouble."""
    ordered = [failed[m] for m in primary if m in failed] + [e for m, e in failed.items() if m not in primary]
    for err in ordered:
        if is_client_error(err):
            return err["status"]
    if all(err["code"] == "timeout" for err in ordered):
        return 504
    return 503


class FusionService:
    """Fan-out, fusion and bookkeeping for one ingress replica."""

    def __init__(
        self,
        handles: Mapping[str, Handle],
        config: AppConfig,
        metrics: Metrics | None = None,
        retries: int = RETRIES,
        health: EncoderHealth | None = None,
        watch_interval_s: float = WATCH_INTERVAL_S,
        unavailable_after_s: float = UNAVAILABLE_AFTER_S,
    ) -> None:
        self.handles = dict(handles)
        self.config = config
        self.metrics = metrics or Metrics()
        self.retries = retries
        self.encoder_health = health or EncoderHealth()
        self.watch_interval_s = watch_interval_s
        self.unavailable_after_s = unavailable_after_s
        self._none_live_since: dict[str, float] = {}  # modality -> when its replica count was first seen at 0
        self._seen_dying: set[str] = set()  # modalities whose 0 replicas are deaths the router saw (no grace)
        self.fusion: FusionPipeline | None = None
        self._fusion_key: tuple[Any, ...] | None = None
        self._coalescers: dict[str, CallCoalescer] = {}

    async def load_fusion(self, user_config: dict[str, Any] | None = None) -> None:
        """Load (or hot-swap) the fusion module: built fully, then one reference assignment."""
        cfg = IngressUserConfig.model_validate(
            {"fusion_weights": self.config.models.fusion_weights, **(user_config or {})}
        )
        key = (cfg.fusion_weights, cfg.revision)
        if self.fusion is not None and key == self._fusion_key:
            return
        fusion = await asyncio.to_thread(FusionPipeline, cfg.fusion_weights)
        self.fusion, self._fusion_key = fusion, key

    # ---- prediction -----------------------------------------------------------------------------

    async def predict(
        self,
        payloads: Mapping[str, str | bytes],
        primary: tuple[str, ...] | None = None,
        prefailed: Mapping[str, EncoderError] | None = None,
    ) -> PredictionResponse:
        """Run ``{modality: payload}`` through the encoders and combine what succeeded.

        ``primary`` names the modalities the client asked for (a video's audio track is secondary);
        ``prefailed`` are modalities already known to be unusable (e.g. an empty upload).
        """
        start = time.perf_counter()
        primary = primary or tuple(payloads)
        names = [m for m in MODALITIES if m in payloads]
        answers = await asyncio.gather(*(self._call(m, payloads[m]) for m in names))
        ok: dict[str, EncoderAnswer] = {}
        failed: dict[str, EncoderError] = dict(prefailed or {})
        for m, answer in zip(names, answers, strict=True):
            if isinstance(answer, EncoderAnswer):
                ok[m] = answer
            else:
                failed[m] = answer["error"]
        for m, err in failed.items():
            self.metrics.inc("emotion_dropped_modalities_total", modality=m, reason=err["code"])
        if not ok:
            order = [m for m in primary if m in failed] + [m for m in failed if m not in primary]
            reasons = "; ".join(f"{m}: {failed[m]['message']}" for m in order)
            raise PredictionFailed(failure_status(failed, primary), f"no modality could be used ({reasons})")
        response = self._combine(ok, failed, start)
        for m, r in ok.items():
            self.metrics.inc("emotion_predictions_total", emotion=r.emotion, modality=m)
        self.metrics.inc("emotion_predictions_total", emotion=response.emotion, modality="fused")
        return response

    async def _call(self, modality: str, payload: str | bytes) -> EncoderAnswer | dict[str, Any]:
        """One encoder call with its timeout, retried on another replica if its replica dies; never raises.

        Returns the validated :class:`EncoderAnswer`, or an ``{"error": ...}`` dict.
        """
        timeout = self.config.encoders[modality].timeout_s
        deadline = time.monotonic() + timeout
        handle = self.handles[modality]
        gone: BaseException | None = None
        for attempt in range(1 + self.retries):
            if not await self._may_call(modality, handle, after_death=gone is not None):
                return self._unavailable(modality, gone)
            if attempt:
                logger.warning("%s encoder: replica gone (%r), retry %d on another replica", modality, gone, attempt)
            response = None
            try:
                response = self._send(modality, handle, payload)
                answer = await self._wait(modality, handle, response, deadline - time.monotonic())
            except TimeoutError:
                _cancel(response)
                return encoder_error("timeout", f"the {modality} encoder did not answer within {timeout:g} s", 504)
            except EncoderUnavailable:
                _cancel(response)
                return self._unavailable(modality, gone)
            except Exception as exc:  # replica died, back-pressure, ...
                if replica_gone(exc) and time.monotonic() < deadline:
                    gone = exc
                    continue
                logger.warning("%s encoder call failed: %r", modality, exc, exc_info=True)
                if replica_gone(exc):
                    self.encoder_health.mark_down(modality)
                return encoder_error("unavailable", f"the {modality} encoder failed: {type(exc).__name__}", 503)
            self.encoder_health.mark_up(modality)
            if isinstance(answer, dict) and "error" in answer:
                return answer
            try:
                return EncoderAnswer.model_validate(answer)
            except ValidationError:
                logger.warning("%s encoder gave an unexpected answer", modality, exc_info=True)
                return encoder_error("internal", f"the {modality} encoder gave an unexpected answer", 500)
        self.encoder_health.mark_down(modality)
        return self._unavailable(modality, gone)

    def _send(self, modality: str, handle: Handle, payload: str | bytes) -> Any:
        """Start one encoder call: through the modality's :class:`CallCoalescer`, or plainly when it is off."""
        enc = self.config.encoders[modality]
        if not enc.calls_per_replica:
            return handle.remote(payload)
        coalescer = self._coalescers.get(modality)
        if coalescer is None or coalescer.handle is not handle:
            coalescer = self._coalescers[modality] = CallCoalescer(
                handle, enc.calls_per_replica, enc.max_batch_size, enc.max_ongoing_requests
            )
        return coalescer.submit(payload)

    def _replicas(self, modality: str, handle: Handle) -> ReplicaState:
        """The encoder's replicas: ``live``; ``none`` (no live replica for ``unavailable_after_s``, or none because
        they died: :func:`replicas_seen_dying`); ``none_yet`` (a count of 0 younger than that); ``unknown`` (the
        handle cannot count them)."""
        count = live_replicas(handle)
        if count is None:
            return "unknown"
        if count > 0:
            self._none_live_since.pop(modality, None)
            self._seen_dying.discard(modality)
            return "live"
        since = self._none_live_since.setdefault(modality, time.monotonic())
        if modality in self._seen_dying or replicas_seen_dying(handle):
            self._seen_dying.add(modality)  # until a replica is back (the controller's next list clears the sign)
            return "none"
        return "none" if time.monotonic() - since >= self.unavailable_after_s else "none_yet"

    @property
    def _zero_poll_s(self) -> float:
        """How often a replica count of 0 is read again while its grace (``unavailable_after_s``) runs."""
        return min(self.watch_interval_s, self.unavailable_after_s) / 4

    async def _may_call(self, modality: str, handle: Handle, after_death: bool = False) -> bool:
        """False when the encoder is known to have no live replica (counted for ``unavailable_after_s``, or
        marked down and not probing). A count of 0 younger than that is waited out, a little at a time, unless
        it follows a replica death this call saw (``after_death``): the router dropped that replica, the 0 is
        real."""
        while (state := self._replicas(modality, handle)) == "none_yet":
            if after_death:
                return False
            await asyncio.sleep(self._zero_poll_s)
        if state == "unknown":
            return self.encoder_health.allow(modality)
        return state == "live"

    async def _wait(self, modality: str, handle: Handle, response: Any, budget: float) -> Any:
        """Await ``response`` for at most ``budget`` s; :class:`EncoderUnavailable` once no replica is live."""
        if budget <= 0:
            raise TimeoutError
        task = asyncio.ensure_future(_resolve(response))
        deadline = time.monotonic() + budget
        interval = self.watch_interval_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                done, _ = await asyncio.wait({task}, timeout=min(interval, remaining))
                if done:
                    return task.result()
                state = self._replicas(modality, handle)
                if state == "none":
                    raise EncoderUnavailable(modality)
                # a count of 0 is watched closely, so the modality is dropped as soon as its grace has passed
                interval = self._zero_poll_s if state == "none_yet" else self.watch_interval_s
        finally:
            if not task.done():
                task.cancel()

    def _unavailable(self, modality: str, cause: BaseException | None) -> dict[str, Any]:
        why = f" ({type(cause).__name__})" if cause is not None else ""
        return encoder_error("unavailable", f"the {modality} encoder has no live replica{why}", 503)

    def _combine(
        self, ok: dict[str, EncoderAnswer], failed: Mapping[str, EncoderError], start: float
    ) -> PredictionResponse:
        versions = [r.model_version for r in ok.values()]
        if len(ok) == 1:  # one modality: its encoder's own calibrated answer, as is
            ((m, only),) = ok.items()
            emotion, confidence = only.emotion, only.confidence
            probabilities = {e: only.probabilities[e] for e in EMOTIONS}
            contributions = {m: 1.0}
        else:
            fusion = self.fusion
            if fusion is None:
                raise RuntimeError("fusion module not loaded")
            fused = fusion.fuse(
                {m: np.asarray(r.embedding, dtype=np.float32) for m, r in ok.items()},
                {m: np.array([r.probabilities[e] for e in EMOTIONS], dtype=np.float32) for m, r in ok.items()},
            )
            probs = fused.probabilities.astype(np.float64)
            probs = probs / probs.sum()
            best = int(np.argmax(probs))
            emotion, confidence = EMOTIONS[best], round(float(probs[best]), DIGITS)
            probabilities = {e: round(float(p), DIGITS) for e, p in zip(EMOTIONS, probs, strict=True)}
            total = sum(fused.contributions.values()) or 1.0
            contributions = {m: round(fused.contributions[m] / total, DIGITS) for m in ok}
            versions.append(fusion.version)
        return PredictionResponse(
            emotion=emotion,
            confidence=confidence,
            probabilities=probabilities,
            contributions=contributions,
            modalities={m: r.public() for m, r in ok.items()},
            dropped={m: f"{e['code']}: {e['message']}" for m, e in failed.items()},
            model_version="+".join(versions),
            latency_ms=round((time.perf_counter() - start) * 1000.0, 2),
        )

    # ---- health ---------------------------------------------------------------------------------

    async def health(self) -> HealthResponse:
        """Ask every encoder what it serves (bounded wait); the fusion module is local."""
        timeout = self.config.health_timeout_s

        async def ask(m: str) -> ModelStatus:
            try:
                info = await asyncio.wait_for(_resolve(self.handles[m].options(method_name="info").remote()), timeout)
                return ModelStatus(
                    loaded=bool(info.get("loaded")), version=info.get("version"), device=info.get("device")
                )
            except Exception as exc:  # noqa: BLE001 - health reports failures, it does not raise
                return ModelStatus(loaded=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")

        statuses = await asyncio.gather(*(ask(m) for m in MODALITIES))
        models = dict(zip(MODALITIES, statuses, strict=True))
        fusion = self.fusion
        models["fusion"] = ModelStatus(
            loaded=fusion is not None,
            version=fusion.version if fusion else None,
            device=str(fusion.device) if fusion else None,
        )
        status = "ok" if all(s.loaded for s in models.values()) else "degraded"
        return HealthResponse(status=status, models=models)

    async def warm_up(self) -> HealthResponse:
        """Ask every encoder once before this replica takes traffic (bounded like :meth:`health`).

        A handle opens its route to a deployment at its first call: it subscribes to the replica list and
        asks each replica its queue length. Without this a new ingress replica (a replacement, a scale-up)
        pays for that on its first requests, seconds on a busy machine; with it they find the routes open.
        An encoder that does not answer in time is logged, not waited for: the replica starts anyway.
        """
        health = await self.health()
        missing = {m: s.error for m, s in (health.models or {}).items() if not s.loaded}
        if missing:
            logger.warning("ingress started without an answer from: %s", missing)
        return health


def _cancel(response: Any) -> None:
    cancel = getattr(response, "cancel", None)
    if cancel is not None:
        cancel()
