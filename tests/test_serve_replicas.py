"""Ray Serve's private router state, read as serve/replicas.py reads it, on a real local Ray (no stand-ins).

A small application on a local Ray (node IP 127.0.0.1, no HTTP proxy): ``Target``, a deployment whose replicas
answer their process id, and ``Watcher``, which holds a handle to it, as ``FusionIngress`` holds the encoders',
with the runtime environment of ``deploy/serve_config.yaml`` (the router on the replica's own event loop). The
count :class:`serve.replicas.RouterReader` reads from that handle must match what Serve's controller reports after
a scale-up, a scale-down and a replica kill, and the start-up check must pass on it. A Ray upgrade that moves the
private names fails here, not in production.

Also here: every Ray Serve environment switch this project sets (``serve/launch.py:RAY_SWITCHES``) is still read by
the installed Ray, under the constant named next to it.
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.launch import FAST_INGRESS_ENV, PLAIN_PROXY_ENV, RAY_SWITCHES
from serve.replicas import RouterReader
from tests.ops_helpers import stop_serve_and_ray

REPO = Path(__file__).resolve().parents[1]
APP = "replicas"
START_S = 2.0  # a Target replica takes this long to start: a killed one stays missing long enough to be seen
TIMEOUT_S = 120  # the 2-core test machine is shared with training jobs


def shipped_replica_env() -> dict[str, str]:
    """The replicas' environment variables of the shipped CPU config."""
    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    return {k: str(v) for k, v in config["applications"][0]["runtime_env"]["env_vars"].items()}


ACTOR_OPTIONS: dict[str, Any] = {"num_cpus": 0, "runtime_env": {"env_vars": shipped_replica_env()}}


@serve.deployment(ray_actor_options=ACTOR_OPTIONS, max_ongoing_requests=4)
class Target:
    """Answers its replica's process id."""

    def __init__(self) -> None:
        time.sleep(START_S)

    async def __call__(self, _: Any = None) -> int:
        return os.getpid()


@serve.deployment(ray_actor_options=ACTOR_OPTIONS)
class Watcher:
    """Holds a handle to ``Target`` and reads its router as the ingress does."""

    def __init__(self, target: DeploymentHandle) -> None:
        self.target = target
        self.reader = RouterReader()

    async def pids(self, calls: int) -> list[int]:
        """Process ids of the replicas that answered ``calls`` concurrent calls."""
        import asyncio

        return list(await asyncio.gather(*(self.target.remote() for _ in range(calls))))

    def read(self) -> dict[str, Any]:
        return {"replicas": self.reader.replicas(self.target), "seen_dying": self.reader.seen_dying(self.target)}

    async def check(self) -> dict[str, Any]:
        """The start-up check, after a call through the handle (as the ingress's warm-up makes)."""
        await self.target.remote()
        report = self.reader.check({"target": self.target}, answered=["target"])
        return {"report": report.model_dump(), "enabled": self.reader.enabled}


def wait_until(predicate: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def running(deployment: str = "Target") -> int:
    """Replicas Serve's controller reports running (public API)."""
    status = serve.status().applications.get(APP)
    if status is None or deployment not in status.deployments:
        return -1
    states = status.deployments[deployment].replica_states
    return int(states.get("RUNNING", 0)) if set(states) <= {"RUNNING"} else -1  # -1 while any replica is in flux


@pytest.fixture(scope="module")
def watcher() -> Iterator[DeploymentHandle]:
    if ray.is_initialized():
        stop_serve_and_ray()
    ray.init(
        address="local",
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        logging_level="WARNING",
    )
    try:
        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
        yield deploy(1)
    finally:
        stop_serve_and_ray()


def deploy(replicas: int) -> DeploymentHandle:
    """(Re)deploy with ``replicas`` Target replicas; the Watcher replica and its handle stay."""
    return serve.run(Watcher.bind(Target.options(num_replicas=replicas).bind()), name=APP, route_prefix=None)


def reads(watcher: DeploymentHandle) -> dict[str, Any]:
    return watcher.read.remote().result(timeout_s=30)


def settle(watcher: DeploymentHandle, replicas: int) -> None:
    """Until the controller runs ``replicas`` Target replicas and the handle's router counts the same."""
    wait_until(lambda: running() == replicas, f"the controller to run {replicas} replicas")
    watcher.pids.remote(1).result(timeout_s=60)  # a handle's router exists from its first call on
    wait_until(lambda: reads(watcher)["replicas"] == replicas, f"the router to count {replicas} ({reads(watcher)})")
    pids = set(watcher.pids.remote(24).result(timeout_s=60))
    assert len(pids) == replicas, pids  # the calls really spread over that many replicas
    assert reads(watcher) == {"replicas": replicas, "seen_dying": False}


def test_the_start_up_check_passes_on_a_real_handle(watcher: DeploymentHandle) -> None:
    settle(watcher, 1)
    result = watcher.check.remote().result(timeout_s=60)
    assert result == {"report": {"ok": True, "detail": None}, "enabled": True}


def test_router_counts_follow_scale_up_scale_down_and_a_kill(watcher: DeploymentHandle) -> None:
    settle(watcher, 1)
    deploy(3)
    settle(watcher, 3)
    deploy(2)
    settle(watcher, 2)
    # A replica killed outright: the router drops it (the controller's next list, or a failed call), then counts
    # the replacement once Serve has started it.
    victim = watcher.pids.remote(1).result(timeout_s=30)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: reads(watcher)["replicas"] == 1, "the router to drop the killed replica", timeout_s=30)
    settle(watcher, 2)
    assert victim not in set(watcher.pids.remote(24).result(timeout_s=60))


# ---- the environment switches ------------------------------------------------------------------------------------


def test_every_ray_switch_is_still_read_by_the_installed_ray() -> None:
    """A rename in a Ray upgrade fails here: each variable must still be read, under the constant listed."""
    for switch in RAY_SWITCHES:
        module = importlib.import_module(switch.module)
        assert hasattr(module, switch.constant), f"{switch.module} has no {switch.constant} ({switch.env})"
        assert f'"{switch.env}"' in inspect.getsource(module), f"{switch.module} no longer reads {switch.env}"


def test_the_switch_list_is_the_only_list() -> None:
    """The launcher's environments and the Serve config files' replica variables all come from RAY_SWITCHES."""
    listed = {s.env: s for s in RAY_SWITCHES}
    assert len(listed) == len(RAY_SWITCHES) == 11
    assert FAST_INGRESS_ENV == {s.env: s.value for s in RAY_SWITCHES if s.scope == "haproxy"}
    assert PLAIN_PROXY_ENV == {s.env: s.value for s in RAY_SWITCHES if s.scope == "plain_proxy"}
    assert FAST_INGRESS_ENV["RAY_worker_niceness"] == "0"  # replicas at nice 0, not Ray's 15
    replica = {s.env: s.value for s in RAY_SWITCHES if s.scope == "replica"}
    for name in ("serve_config.yaml", "serve_config.ha.yaml"):
        config = yaml.safe_load((REPO / "deploy" / name).read_text())
        env = config["applications"][0]["runtime_env"]["env_vars"]
        assert {k: v for k, v in env.items() if k.startswith("RAY_SERVE_")} == replica, name
