"""Call coalescing: concurrent calls to one encoder leave the ingress as fewer handle calls.

Per encoder, at most ``calls_per_replica`` handle calls per live replica are in flight; requests that arrive
meanwhile wait in the ingress and leave together as one ``encode_many`` call carrying a list. One Ray round
trip, one serialisation and one replica dispatch then serve a whole batch, and the encoder's ``@serve.batch``
gets its items at once. A request that finds a free slot leaves at once as a plain call, so a lone request
waits for nothing.

A request that is cancelled (its timeout, or its client went away) cancels its handle call, and so the work on the
encoder replica; a list call is cancelled once all of its requests are.

A :class:`CallCoalescer` belongs to one handle: :class:`serve.service.FusionService` makes one per encoder when
it is built, and every caller (HTTP routes and live streams alike) goes through it, so its in-flight count is
the whole ingress replica's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol


class Handle(Protocol):
    """The part of ``DeploymentHandle`` used here (tests pass fakes)."""

    def remote(self, *args: Any, **kwargs: Any) -> Any: ...

    def options(self, **kwargs: Any) -> Handle: ...


def _unknown() -> int | None:
    return None


class CallCoalescer:
    """Coalesces concurrent calls to one encoder into fewer handle calls (see the module docstring).

    :meth:`submit` returns an awaitable of the encoder's answer for one payload (a task or a future, both
    cancellable). The failure of a list call (its replica died, say) is raised to every request in it, each of
    which then retries on its own. ``replicas`` says how many replicas the handle can route to now (``None``:
    unknown, counted as one).
    """

    def __init__(
        self,
        handle: Handle,
        calls_per_replica: int,
        max_items: int,
        max_calls_per_replica: int = 0,
        replicas: Callable[[], int | None] = _unknown,
    ) -> None:
        self.handle = handle
        self.calls_per_replica = max(calls_per_replica, 1)
        self.max_items = max(max_items, 1)
        # Beyond calls_per_replica, a call leaves only with a full list (a backlog of a whole batch), up to this
        # many per replica: the replica's ongoing calls then exceed calls_per_replica, which is what its
        # autoscaling target (set at calls_per_replica) sees as load to scale on.
        self.max_calls_per_replica = max(max_calls_per_replica, self.calls_per_replica)
        self._replicas = replicas
        self._many: Handle | None = None
        self._queue: list[tuple[Any, asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[Any]] = set()  # list calls under way (a reference keeps them alive)

    @property
    def in_flight(self) -> int:
        """Handle calls of this coalescer not answered yet."""
        return self._in_flight

    def _replica_count(self) -> int:
        return max(self._replicas() or 1, 1)

    def _may_send(self) -> bool:
        """A call may leave now: a slot is free, or a full list waits and the overflow cap allows one more."""
        if not self._queue:
            return False
        replicas = self._replica_count()
        if self._in_flight < self.calls_per_replica * replicas:
            return True
        return len(self._queue) >= self.max_items and self._in_flight < self.max_calls_per_replica * replicas

    def submit(self, payload: Any) -> Any:
        if not self._queue and self._in_flight < self.calls_per_replica * self._replica_count():
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
        except asyncio.CancelledError:
            _cancel_remote(response)  # awaiting a DeploymentResponse is not the request: cancel that too
            raise
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
            for _, f in batch:
                f.add_done_callback(lambda _, task=task, batch=batch: _abandon_if_unwanted(task, batch))

    async def _send(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        response = None
        try:
            if len(batch) == 1:
                response = self.handle.remote(batch[0][0])
                answers = [await response]
            else:
                if self._many is None:
                    self._many = self.handle.options(method_name="encode_many")
                response = self._many.remote([p for p, _ in batch])
                answers = await response
                if not isinstance(answers, list) or len(answers) != len(batch):
                    raise RuntimeError(f"encode_many answered {type(answers).__name__} for {len(batch)} items")
        except asyncio.CancelledError:
            _cancel_remote(response)
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


def _abandon_if_unwanted(task: asyncio.Task[Any], batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
    """Cancel a list call once every request in it was cancelled (a timeline whose client went away)."""
    if not task.done() and all(f.cancelled() for _, f in batch):
        task.cancel()


def _cancel_remote(response: Any) -> None:
    """Cancel the encoder's work for ``response`` (a ``DeploymentResponse``; fakes may have no ``cancel``)."""
    cancel = getattr(response, "cancel", None)
    if callable(cancel):
        cancel()
