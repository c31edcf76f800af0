"""Live applications shared by the test modules that ask for the same one.

Ray's start and every model loading take half a minute or more on the 2-core CI machine, so modules that test the
same live application share it instead of each starting its own:

* ``serve_apps`` (:class:`tests.ops_helpers.SharedServeApp`): the application on a local Ray, built from the
  module-level ``SERVE_ARGS`` of the module that asks (``serve_apps.url(SERVE_ARGS)``); a module with other args
  has it replaced (every replica afresh) on the same Ray;
* ``ops_cluster`` (:class:`tests.ops_helpers.SharedOpsCluster`): the two-node cluster of the operations tests,
  running ``deploy/serve_config.yaml``;
* ``ha_cluster`` (:class:`tests.ops_helpers.SharedHACluster`): the three-node cluster of ``bench.cluster`` running
  ``deploy/serve_config.ha.yaml`` with two replicas of everything, for the tests that kill replicas and nodes;
  closing it fails when a Ray process of it is left.

For that, collection puts the modules that use one of them next to each other, where the first of them was (a
module's ``GROUP_ORDER``, 0 unless set, first: a module that leaves the application crippled sets a higher one;
then those of ``serve_apps`` grouped by ``SERVE_ARGS``; each module stays whole and keeps its own test order; other
modules keep their places), and each is shut down, with its Ray, right after the last test that uses it. Every
other module runs as before: with no Ray of this process running (several start their own) and no replica left.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

# the session fixtures below, each a live application shared by modules
SHARED = ("serve_apps", "ops_cluster", "ha_cluster")
_RUNNING: dict[str, Any] = {}  # fixture name -> its object, created by the first module that asks


def _shared(name: str) -> Any:
    if name not in _RUNNING:
        from tests.ops_helpers import SharedHACluster, SharedOpsCluster, SharedServeApp  # imports Ray: on demand

        shared = {"serve_apps": SharedServeApp, "ops_cluster": SharedOpsCluster, "ha_cluster": SharedHACluster}
        _RUNNING[name] = shared[name]()
    return _RUNNING[name]


@pytest.fixture(scope="session")
def serve_apps() -> Iterator[Any]:
    """The shared application; ``serve_apps.url(SERVE_ARGS)`` starts it or reuses the running one."""
    apps = _shared("serve_apps")
    yield apps
    apps.close()


@pytest.fixture(scope="session")
def ops_cluster() -> Iterator[Any]:
    """The shared two-node cluster; ``ops_cluster.get(__name__)`` starts it or reuses the running one."""
    cluster = _shared("ops_cluster")
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def ha_cluster() -> Iterator[Any]:
    """The shared three-node HA cluster; ``ha_cluster.get()`` starts it or reuses the running one."""
    cluster = _shared("ha_cluster")
    yield cluster
    cluster.close()


def _uses(item: pytest.Item) -> str | None:
    """The shared fixture ``item`` uses, if any."""
    names = getattr(item, "fixturenames", ())
    return next((name for name in SHARED if name in names), None)


def _args_key(module: ModuleType) -> str:
    return json.dumps(getattr(module, "SERVE_ARGS", module.__name__), sort_keys=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    modules: dict[ModuleType | None, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(getattr(item, "module", None), []).append(item)
    uses = {m: None if m is None else next(filter(None, map(_uses, its)), None) for m, its in modules.items()}
    groups: dict[str, list[ModuleType]] = {}
    for module, name in uses.items():
        if name is not None:
            groups.setdefault(name, []).append(module)
    for members in groups.values():  # GROUP_ORDER, then same args together in order of their first module, then
        keys = [_args_key(m) for m in members]  # collection order
        rank = {
            m: (getattr(m, "GROUP_ORDER", 0), keys.index(k), i)
            for i, (m, k) in enumerate(zip(members, keys, strict=True))
        }
        members.sort(key=rank.__getitem__)
    ordered: list[pytest.Item] = []
    placed: set[str] = set()
    for module, module_items in modules.items():
        name = uses[module]
        if name is None:
            ordered += module_items
        elif name not in placed:  # the whole group where its first module was
            placed.add(name)
            ordered += [item for member in groups[name] for item in modules[member]]
    items[:] = ordered


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the module fixtures of ``item`` are finalised: no shared application beyond its last user (a failed
    close, such as Ray processes left behind, is an error of ``item``'s teardown)."""
    with contextlib.ExitStack() as closing:  # each one closed, even after another one's close failed
        for name, shared in _RUNNING.items():
            if nextitem is None or _uses(nextitem) != name:
                closing.callback(shared.close)
