"""Settings for the whole test suite.

- The stand-in cluster fixtures come from ``picopyn_actors.testing.pytest_plugin``
  (a pytest11 entry point once the package is installed; registered here
  otherwise).
- Every trio test runs under a ``trio.fail_after`` deadline, so a hang fails
  with a traceback instead of stalling the suite. Change it per test with
  ``@pytest.mark.deadline(seconds)``. Tests on a mock clock are left alone:
  their virtual time is not wall time.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

DEFAULT_DEADLINE = 60.0
_MOCK_CLOCKS = {"mock_clock", "autojump_clock"}


def _plugin_autoloaded() -> bool:
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(
        ep.name == "picopyn_actors" for ep in importlib.metadata.entry_points(group="pytest11")
    )


if not _plugin_autoloaded():
    pytest_plugins = ["picopyn_actors.testing.pytest_plugin"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"deadline(seconds): fail a trio test after this long (default {DEFAULT_DEADLINE})",
    )


def _with_deadline(
    fn: Callable[..., Awaitable[Any]], seconds: float
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        with trio.fail_after(seconds):
            return await fn(*args, **kwargs)

    return wrapper


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(item.obj):
            continue
        if _MOCK_CLOCKS & set(item.fixturenames):
            continue
        marker = item.get_closest_marker("deadline")
        seconds = float(marker.args[0]) if marker else DEFAULT_DEADLINE
        item.obj = _with_deadline(item.obj, seconds)


# The dispatcher keeps its table's list of ready routes up to date as slots are
# taken and freed, states change and routes go (it does not build it per
# request). Every test checks that list against the routes after each call that
# changes them; a mismatch is recorded (the call may run in a callback that
# logs errors) and fails the test at its end.
_KEEPS_THE_TABLE = ("submit", "release", "opened", "withdraw", "hand", "_handle", "_dispatch")


@pytest.fixture(autouse=True)
def _ready_routes_stay_consistent(monkeypatch: pytest.MonkeyPatch) -> Any:
    from picopyn_actors._dispatcher import Dispatcher

    mismatches: list[str] = []

    def checked(name: str) -> Callable[..., Any]:
        method = getattr(Dispatcher, name)

        @functools.wraps(method)
        def wrapper(self: Dispatcher, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            finally:
                if not self.table.consistent() and len(mismatches) < 5:
                    mismatches.append(f"after Dispatcher.{name}: ready={self.table.ready!r}")

        return wrapper

    for name in _KEEPS_THE_TABLE:
        monkeypatch.setattr(Dispatcher, name, checked(name))
    yield
    assert not mismatches, mismatches
