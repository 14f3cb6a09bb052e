"""Shared helpers for the integration tests (real stand-in cluster, real clock)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

import picopyn_actors as pa
from picopyn_actors.testing import LocalCluster

# Short intervals: the tests heal in well under a second per step. The bridge
# under test can be chosen with PICOPYN_TEST_BRIDGE (default: the library's).
FAST: dict[str, Any] = {
    "discovery_interval": 0.3,
    "health_interval": 0.2,
    "probe_timeout": 0.5,
    "connect_timeout": 3.0,
    "backoff_initial": 0.05,
    "backoff_max": 0.3,
}
if os.environ.get("PICOPYN_TEST_BRIDGE"):
    FAST["bridge"] = os.environ["PICOPYN_TEST_BRIDGE"]


def open_sockets() -> int:
    """Sockets this process has open now."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def uuid_names(lc: LocalCluster) -> dict[str, str]:
    """uuid -> node name."""
    return {n.uuid: n.name for n in lc.nodes}


async def spread(
    cluster: pa.Cluster, lc: LocalCluster, count: int, concurrency: int = 10
) -> Counter[str]:
    """Run ``count`` idempotent ``SELECT pico_instance_uuid()``; count answers per node name."""
    names = uuid_names(lc)
    seen: Counter[str] = Counter()
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            uuid = await cluster.fetchval("SELECT pico_instance_uuid()", idempotent=True)
            seen[names.get(uuid, uuid)] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return seen


async def all_connections_open(cluster: pa.Cluster) -> None:
    """Return once every node has all its query connections open.

    A node is UP with its first connection; the others open after it. This
    pins as many connections as the nodes have in all, at once (each pin
    holds one of its own), and gives them back once every pin holds one.
    """
    total = cluster.config.connections_per_node * len(cluster.nodes())
    held = 0
    every_one_held, give_back = trio.Event(), trio.Event()

    async def pin() -> None:
        nonlocal held
        async with cluster.connection(timeout=10):
            held += 1
            if held == total:
                every_one_held.set()
            await give_back.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(total):
            nursery.start_soon(pin)
        await every_one_held.wait()
        give_back.set()
    assert sum(n.connections for n in cluster.nodes()) == total


def state_of(cluster: pa.Cluster, name: str) -> pa.NodeState | None:
    """The client state of node ``name`` (the newest actor), or ``None``."""
    states = [n.state for n in cluster.nodes() if n.name == name]
    return states[-1] if states else None


async def wait_for(events: trio.MemoryReceiveChannel[Any], check: Callable[[], bool]) -> None:
    """Wait, driven by node events (no polling), until ``check()`` holds."""
    while not check():
        await events.receive()


async def blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking LocalCluster call in a thread."""
    return await trio.to_thread.run_sync(fn, *args)
