"""Peer: picopyn_actors on trio (the working tree, from PYTHONPATH).

``open_cluster(dsn, connections_per_node=connections / nodes, strategy=...)``
with the strategy named in the config and any extra ``options`` given to
``open_cluster``. Reads are sent with ``idempotent=True``.

With ``"in_trio_asyncio": true`` the whole client runs inside a running
``trio_asyncio.open_loop()``, as in a service that already uses trio-asyncio
(the bridge is the default one unless ``options`` names another).

With ``"fake": N`` in the config it runs on the package's fake backend
(``picopyn_actors.testing.FakeCluster(N, instant=True)``, the one the unit
tests use) instead of the stand-in cluster: that measures the client's own
cost per request, without any I/O.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from _harness import (
    Call,
    Timeline,
    config,
    emit,
    read_command,
    run_throughput,
    run_timeline,
    serve,
)

import picopyn_actors as pa

STRATEGIES: dict[str, Callable[[], Any]] = {
    "RoundRobin": pa.RoundRobin,
    "Random": pa.Random,
    "LeastInFlight": pa.LeastInFlight,
    "Fastest": pa.Fastest,
}


async def run_tasks(fns: list[Callable[[], Awaitable[None]]]) -> None:
    async with trio.open_nursery() as nursery:
        for fn in fns:
            nursery.start_soon(fn)


async def move_on_after(seconds: float, fn: Callable[[], Awaitable[None]]) -> None:
    with trio.move_on_after(seconds):
        await fn()


async def read() -> dict[str, Any] | None:
    return await trio.to_thread.run_sync(read_command)


async def amain(cfg: dict[str, Any]) -> None:
    if cfg.get("in_trio_asyncio"):
        import trio_asyncio

        async with trio_asyncio.open_loop():
            await run_peer(cfg)
    else:
        await run_peer(cfg)


async def run_peer(cfg: dict[str, Any]) -> None:
    options: dict[str, Any] = dict(cfg.get("options") or {})
    strategy = STRATEGIES[cfg.get("strategy", "RoundRobin")]()
    fake = cfg.get("fake")
    if fake:
        from picopyn_actors.testing import FakeCluster

        backend = FakeCluster(int(fake), instant=True)
        dsn = backend.dsn()
        options["backend"] = backend
        per_node = int(cfg.get("connections_per_node", 3))
    else:
        dsn = cfg["dsn"]
        per_node = max(1, cfg["connections"] // len(cfg["nodes"]))
        # The bench's servers are bare PostgreSQL, which refuses Picodata's options.
        options.setdefault("dialect", "postgresql")
    async with pa.open_cluster(
        dsn, connections_per_node=per_node, strategy=strategy, **options
    ) as cluster:
        # open_cluster returns once one node is up: wait for all of them.
        want = int(fake) if fake else len(cfg["nodes"])
        async with cluster.events() as events:
            with trio.move_on_after(10):
                while sum(n.state is pa.NodeState.UP for n in cluster.nodes()) < want:
                    await events.receive()
        # The bridge asked for, and the one it resolved to (informational).
        backend = cluster._backend
        resolved = getattr(backend, "kind", type(backend).__name__)
        bridge = f"{getattr(cluster.config, 'bridge', '?')}: {resolved}"
        emit(
            {
                "event": "ready",
                "version": pa.__version__,
                "nodes": len(cluster.nodes()),
                "bridge": "fake" if fake else bridge,
            }
        )

        methods = {"fetchrow": cluster.fetchrow, "fetch": cluster.fetch}

        async def call(method: str, query: str, args: tuple[Any, ...]) -> Any:
            return await methods[method](query, *args, idempotent=True)

        def make_call(i: int) -> Call:
            return call

        async def throughput(cmd: dict[str, Any]) -> dict[str, Any]:
            return await run_throughput(cmd, make_call, trio.sleep, run_tasks)

        async def side(tl: Timeline) -> None:
            """Record node state changes and the retry counter, relative to t0."""
            events: list[list[Any]] = []
            retried: list[list[float]] = []
            tl.extra.update(events=events, retried=retried)
            async with cluster.events() as stream, trio.open_nursery() as nursery:

                async def sample() -> None:
                    last = -1
                    while not tl.stopping:
                        value = cluster.statistics().requests_retried
                        if value != last:
                            retried.append([time.monotonic() - tl.t0, value])
                            last = value
                        await trio.sleep(tl.width / 2)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(sample)
                async for event in stream:
                    if isinstance(event, pa.NodeEvent):
                        events.append(
                            [
                                time.monotonic() - tl.t0,
                                event.node,
                                event.old.value,
                                event.new.value,
                                event.reason,
                            ]
                        )

        async def timeline(cmd: dict[str, Any]) -> dict[str, Any]:
            return await run_timeline(cmd, make_call, trio.sleep, run_tasks, move_on_after, side)

        await serve({"throughput": throughput, "timeline": timeline}, read)


if __name__ == "__main__":
    trio.run(amain, config())
