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
