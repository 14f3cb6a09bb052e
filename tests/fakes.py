"""Helpers for the unit tests on the fake backend (``picopyn_actors.testing.FakeCluster``).

The fake itself lives in the package, shared with the benchmarks; this module
re-exports it and adds the waiting and counting helpers the tests use.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
import trio.testing

from picopyn_actors import NodeEvent, NodeState
from picopyn_actors.testing._fake import (
    DISCOVERY_QUERIES,
    PASSWORD,
    PORT,
    PROBE_QUERY,
    USER,
    UUID_QUERIES,
    FakeCluster,
    FakeConnection,
    FakeNode,
    Status,
    state_text,
)

__all__ = [
    "DISCOVERY_QUERIES",
    "PASSWORD",
    "PORT",
    "PROBE_QUERY",
    "USER",
    "UUID_QUERIES",
    "FakeCluster",
    "FakeConnection",
    "FakeNode",
    "Outcomes",
    "Status",
    "bound_every_test",
    "drain_events",
    "state_of",
    "state_text",
    "virtual_deadline",
    "wait_all_states",
    "wait_gone",
    "wait_state",
]


# -- waiting helpers ------------------------------------------------------------------


def state_of(cluster: Any, name: str) -> NodeState | None:
    """The client-side state of node ``name``, or ``None`` when it has no actor."""
    for status in cluster.nodes():
        if status.name == name:
            return status.state  # type: ignore[no-any-return]
    return None


async def wait_state(cluster: Any, name: str, *states: NodeState) -> float:
    """Wait until node ``name`` is in one of ``states``; return the time it got there.

    Waits on the event stream (no polling). If it is already there, returns the
    current time. After an ``EventsDropped`` marker it looks at the node itself.
    """
    async with cluster.events() as events:
        if state_of(cluster, name) in states:
            return trio.current_time()
        async for event in events:
            if isinstance(event, NodeEvent):
                if event.node == name and event.new in states:
                    return event.at
            elif state_of(cluster, name) in states:
                return trio.current_time()
    raise AssertionError(f"the cluster closed before {name} reached {states}")


async def wait_all_states(cluster: Any, names: Iterable[str], *states: NodeState) -> None:
    """Wait until every node of ``names`` is in one of ``states`` at the same time."""
    wanted = set(names)
    async with cluster.events() as events:
        if all(state_of(cluster, n) in states for n in wanted):
            return
        async for _event in events:
            if all(state_of(cluster, n) in states for n in wanted):
                return
    raise AssertionError(f"the cluster closed before {wanted} reached {states}")


async def wait_gone(cluster: Any, name: str) -> None:
    """Wait until node ``name`` has retired and its actor has stopped."""
    async with cluster.events() as events:
        await trio.testing.wait_all_tasks_blocked()
        if state_of(cluster, name) is None:
            return
        async for _event in events:
            # Let the actor finish stopping after its RETIRED event.
            await trio.testing.wait_all_tasks_blocked()
            if state_of(cluster, name) is None:
                return
    raise AssertionError(f"the cluster closed before {name} left")


def drain_events(events: Any) -> list[Any]:
    """Everything already waiting in an ``events()`` channel."""
    received = []
    while True:
        try:
            received.append(events.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return received


class Outcomes:
    """Collects how each request ended: exactly one entry per request."""

    def __init__(self) -> None:
        self.results: list[Any] = []
        self.errors: list[BaseException] = []
        self.ended: Counter[int] = Counter()
        self.log: list[tuple[int, float, Any]] = []  # (key, end time, result or error)

    @property
    def total(self) -> int:
        return len(self.results) + len(self.errors)

    async def call(self, key: int, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Run ``await fn(*args, **kwargs)`` and record its end under ``key``."""
        try:
            result = await fn(*args, **kwargs)
        except Exception as exc:
            self.errors.append(exc)
            self.log.append((key, trio.current_time(), exc))
        else:
            self.results.append(result)
            self.log.append((key, trio.current_time(), result))
        self.ended[key] += 1

    def assert_each_ended_once(self, n: int) -> None:
        assert self.total == n, (self.total, n)
        assert sorted(self.ended) == list(range(n))
        assert set(self.ended.values()) == {1}


# -- a virtual-time deadline for every test ----------------------------------------------------

VIRTUAL_DEADLINE = 3600.0


def virtual_deadline(
    fn: Callable[..., Awaitable[Any]], seconds: float = VIRTUAL_DEADLINE
) -> Callable[..., Awaitable[Any]]:
    """Run the test under ``trio.fail_after(seconds)``.

    On a mock clock with autojump this costs no real time, and a request that
    never ends fails the test instead of hanging the suite.
    """

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        with trio.fail_after(seconds):
            return await fn(*args, **kwargs)

    return wrapper


def bound_every_test(namespace: dict[str, Any], seconds: float = VIRTUAL_DEADLINE) -> None:
    """Wrap every ``async def test_*`` of a module with :func:`virtual_deadline`."""
    for name, obj in list(namespace.items()):
        if name.startswith("test_") and inspect.iscoroutinefunction(obj):
            namespace[name] = virtual_deadline(obj, seconds)
