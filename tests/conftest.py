"""One real Serve application shared by the test modules that ask for the same one.

A module that serves the real application on a local Ray asks the session fixture ``serve_apps``
(:class:`tests.ops_helpers.SharedServeApp`) for it with its module-level ``SERVE_ARGS``, instead of starting its own:
Ray's start and every model loading take half a minute or more on the 2-core CI machine, once per application
instead of once per module. For that:

* collection puts the modules that use ``serve_apps`` next to each other, where the first of them was, grouped by
  ``SERVE_ARGS`` (each module stays whole and keeps its own test order; other modules keep their places);
* the application is shut down, with its Ray, right after the last test that uses it, so every other module
  runs as before: with no Ray of this process running (several start their own) and no replica processes left.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.ops_helpers import SharedServeApp

_APPS: SharedServeApp | None = None  # created by the first module that asks (tests.ops_helpers imports Ray)


@pytest.fixture(scope="session")
def serve_apps() -> Iterator[SharedServeApp]:
    """The shared application; ``serve_apps.url(SERVE_ARGS)`` starts it or reuses the running one."""
    global _APPS
    from tests.ops_helpers import SharedServeApp

    if _APPS is None:
        _APPS = SharedServeApp()
    yield _APPS
    _APPS.close()


def _uses_shared_app(item: pytest.Item) -> bool:
    return "serve_apps" in getattr(item, "fixturenames", ())


def _app_key(module: ModuleType) -> str:
    return json.dumps(getattr(module, "SERVE_ARGS", module.__name__), sort_keys=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    modules: dict[ModuleType | None, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(getattr(item, "module", None), []).append(item)
    sharing = [m for m, its in modules.items() if m is not None and any(_uses_shared_app(i) for i in its)]
    if len(sharing) < 2:
        return
    keys = [_app_key(m) for m in sharing]
    first = {key: keys.index(key) for key in keys}
    grouped = [m for _, _, m in sorted((first[k], i, m) for i, (k, m) in enumerate(zip(keys, sharing, strict=True)))]
    ordered: list[pytest.Item] = []
    for module, module_items in modules.items():
        if module not in sharing:
            ordered += module_items
        elif module is sharing[0]:
            ordered += [i for m in grouped for i in modules[m]]
    items[:] = ordered


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the module fixtures of ``item`` are finalised: no shared application beyond its last user."""
    if _APPS is not None and (nextitem is None or not _uses_shared_app(nextitem)):
        _APPS.close()
