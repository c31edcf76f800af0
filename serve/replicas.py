"""The encoders' replicas as this ingress replica sees them: the one place in ``serve/`` that reads Ray Serve's
private state, checked when the ingress starts.

Ray Serve has no public way to ask a ``DeploymentHandle`` how many replicas it can send a call to. Two features
need that number: the dead-encoder fast path (a modality with no live replica is answered ``unavailable`` at
once instead of after its timeout) and the call coalescer's limit (calls in flight per live replica). So
:func:`read_replicas` and :func:`read_seen_dying` read Ray Serve 2.60's router, through these private names:

``handle._router``
    the handle's ``Router`` (``ray/serve/handle.py``), made at the handle's first call or ``options()``;
``._asyncio_router``
    its ``AsyncioRouter`` (``ray/serve/_private/router.py``): ``running_replicas_populated()`` is False until
    the controller has sent a non-empty replica list; ``_running_replicas`` holds that list until
    ``_request_router`` exists;
``._request_router.curr_replicas``
    the ``RequestRouter``'s replicas (``ray/serve/_private/request_router/request_router.py``): a replica leaves
    it when the controller's list drops it, or at once when a call or queue-length probe to it fails with
    ``ActorDiedError``;
``._request_router._replica_queue_len_cache._cache``
    the queue lengths it cached (``ray/serve/_private/request_router/common.py``): a drop on ``ActorDiedError``
    keeps the replica's entry, a list from the controller removes it.

:class:`RouterReader` gives the service these reads and their start-up check: :meth:`RouterReader.check` (run
by :meth:`serve.service.FusionService.warm_up` once the encoders answered) reads every handle strictly, and
:meth:`RouterReader.confirm` reads an encoder's handle again right after its first answer if the warm-up had
none. A handle must have the layout above, and one whose encoder just answered must count at least one replica.
Where that does not hold (a Ray upgrade moved something), the reader logs one error, sets the gauge
``emotion_ray_internals_ok`` to 0, reports it in ``/api/health`` (``ray_internals``) and stops reading: counts
are then unknown (``None``), and the ingress falls back to what Ray's public API gives, retries on replica-death
errors and timeouts (plus :class:`EncoderHealth`'s short circuit after such an error).

:class:`ReplicaWatch` turns the counts into a per-modality state (live, none, none yet, unknown) with the grace
a zero count gets.

Test doubles of handles may define ``live_replicas()`` and ``replicas_seen_dying()``; they are used instead of
the router reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any, Literal

from serve.schemas import RayInternals

logger = logging.getLogger("ray.serve")

OK_GAUGE = "emotion_ray_internals_ok"
PROBE_INTERVAL_S = 1.0  # how long a dead encoder is skipped when its replicas cannot be counted
# How long an encoder must show no live replica before its modality is answered `unavailable`: the count can read
# zero for a moment while Serve updates its replica list (seen during a hot weight swap), which is not an outage.
UNAVAILABLE_AFTER_S = 0.5
ReplicaState = Literal["live", "none", "none_yet", "unknown"]


# ---- the private reads ----------------------------------------------------------------------------------------


def read_replicas(handle: Any) -> int:
    """How many replicas ``handle``'s router can send to now; raises when the router is not Serve 2.60's.

    A router that has never been sent a non-empty replica list counts 0: its long poll answers within
    milliseconds of its first call, so past a short grace that means the deployment has had no running replica
    since (an ingress replica whose first call to an encoder comes after all its replicas died, such as the
    replacement of a killed ingress, would otherwise wait in Serve's router for a replacement).
    """
    own = getattr(type(handle), "live_replicas", None)
    if callable(own):
        count = own(handle)
        if count is not None and not isinstance(count, int):
            raise TypeError(f"live_replicas() gave {type(count).__name__}")
        if count is None:
            raise LookupError("live_replicas() cannot tell")
        return count
    router = handle._router._asyncio_router
    populated = router.running_replicas_populated()
    if not isinstance(populated, bool):
        raise TypeError(f"running_replicas_populated() gave {type(populated).__name__}")
    if not populated:
        return 0
    request_router = router._request_router
    replicas = request_router.curr_replicas if request_router is not None else router._running_replicas
    if not isinstance(replicas, Sized):
        raise TypeError(f"the router's replicas are a {type(replicas).__name__}")
    return len(replicas)


def read_seen_dying(handle: Any) -> bool:
    """True when ``handle``'s router has no replica left because it saw them die itself (no replica, and the
    queue lengths of dropped replicas still cached); raises when the router is not Serve 2.60's."""
    own = getattr(type(handle), "replicas_seen_dying", None)
    if callable(own):
        return bool(own(handle))
    if callable(getattr(type(handle), "live_replicas", None)):
        return False  # a test double that counts replicas but shows no deaths
    request_router = handle._router._asyncio_router._request_router
    if request_router is None:
        return False  # no replica list has reached it yet: nothing seen dying
    cache = request_router._replica_queue_len_cache._cache
    if not isinstance(cache, Mapping):
        raise TypeError(f"the queue length cache is a {type(cache).__name__}")
    return not request_router.curr_replicas and bool(cache)


# ---- the reader and its start-up check ------------------------------------------------------------------------


@dataclass
class RouterReader:
    """The router reads for the service, switched off when the start-up check finds they do not hold.

    ``metrics`` (a :class:`serve.metrics.Metrics`, or a test double) gets the gauge :data:`OK_GAUGE`.
    """

    metrics: Any = None
    enabled: bool = True
    checked: bool = False  # the start-up check ran
    problem: str | None = None  # why the reads were switched off
    unconfirmed: set[str] = field(default_factory=set)  # handles checked before their encoder ever answered

    def replicas(self, handle: Any) -> int | None:
        """Replicas ``handle`` can route to now; ``None`` when unknown (reads off, or nothing to read yet)."""
        if not self.enabled:
            return None
        try:
            return read_replicas(handle)
        except Exception:  # noqa: BLE001 - no router yet (no call made), or not a Serve handle
            return None

    def seen_dying(self, handle: Any) -> bool:
        """Whether ``handle``'s router saw its last replicas die (``False`` when the reads are off)."""
        if not self.enabled:
            return False
        try:
            return read_seen_dying(handle)
        except Exception:  # noqa: BLE001 - no router yet, or not a Serve handle
            return False

    def check(self, handles: Mapping[str, Any], answered: Collection[str]) -> RayInternals:
        """Read every handle strictly: the start-up self-check. ``answered``: the encoders that just answered
        a call through their handle (each must count at least one replica); the others are confirmed after
        their first answer (:meth:`confirm`)."""
        problems: dict[str, str] = {}
        counts: dict[str, int] = {}
        for name, handle in handles.items():
            try:
                counts[name] = read_replicas(handle)
                read_seen_dying(handle)
            except Exception as exc:  # noqa: BLE001 - exactly what the check is for
                problems[name] = f"{type(exc).__name__}: {exc}"
                continue
            if name in answered and counts[name] < 1:
                problems[name] = "counts 0 replicas right after its encoder answered"
        self.checked = True
        self.unconfirmed = {n for n in handles if n not in answered and n not in problems}
        if problems:
            self._fail("; ".join(f"{n}: {p}" for n, p in problems.items()))
        else:
            self._set_gauge(1)
            logger.info("Ray Serve router state readable: replicas %s", counts)
        return self.report()

    def confirm(self, name: str, handle: Any) -> None:
        """Called right after ``name``'s encoder answered a call: the check for a handle the warm-up could not
        confirm (its encoder did not answer then)."""
        if name not in self.unconfirmed or not self.enabled:
            return
        self.unconfirmed.discard(name)
        try:
            count = read_replicas(handle)
        except Exception as exc:  # noqa: BLE001 - exactly what the check is for
            self._fail(f"{name}: {type(exc).__name__}: {exc}")
            return
        if count < 1:
            self._fail(f"{name}: counts 0 replicas right after its encoder answered")

    def report(self) -> RayInternals | None:
        """The check's outcome for ``/api/health``; ``None`` before it ran."""
        if not self.checked:
            return None
        return RayInternals(ok=self.enabled, detail=self.problem)

    def _fail(self, problem: str) -> None:
        self.enabled = False
        self.problem = problem
        self._set_gauge(0)
        logger.error(
            "RAY SERVE INTERNALS CHANGED: this ingress cannot read the encoders' replica counts from Serve's router "
            "(%s). Falling back to retries and timeouts only: a dead encoder's modality is dropped after its "
            "timeout, not at once, and coalescing assumes one replica per encoder. serve/replicas.py needs updating "
            "for this Ray version.",
            problem,
        )

    def _set_gauge(self, value: float) -> None:
        gauge = getattr(self.metrics, "set", None)  # test doubles may record counters only
        if gauge is not None:
            gauge(OK_GAUGE, value)


# ---- per-modality state ---------------------------------------------------------------------------------------


class ReplicaWatch:
    """Per modality: live replicas, none (for ``unavailable_after_s``, or none because the router saw them die),
    none yet (a zero younger than that), or unknown (the count cannot be read)."""

    def __init__(self, reader: RouterReader, unavailable_after_s: float = UNAVAILABLE_AFTER_S) -> None:
        self.reader = reader
        self.unavailable_after_s = unavailable_after_s
        self.none_live_since: dict[str, float] = {}  # modality -> when its replica count was first seen at 0
        self.seen_dying: set[str] = set()  # modalities whose 0 replicas are deaths the router saw (no grace)

    def state(self, modality: str, handle: Any) -> ReplicaState:
        """The modality's state now (see the class docstring)."""
        count = self.reader.replicas(handle)
        if count is None:
            return "unknown"
        if count > 0:
            self.none_live_since.pop(modality, None)
            self.seen_dying.discard(modality)
            return "live"
        since = self.none_live_since.setdefault(modality, time.monotonic())
        if modality in self.seen_dying or self.reader.seen_dying(handle):
            self.seen_dying.add(modality)  # until a replica is back (the controller's next list clears the sign)
            return "none"
        return "none" if time.monotonic() - since >= self.unavailable_after_s else "none_yet"


class EncoderHealth:
    """Per-encoder short circuit, for when live replicas cannot be counted (public behaviour only).

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
