"""Peer: picopyn_actors on trio (the working tree, from PYTHONPATH).

``open_cluster(dsn, connections_per_node=connections / nodes, strategy=...)``
with the strategy named in the config and any extra ``options`` given to
``open_cluster``. Reads are sent with ``idempotent=True``.

With ``"hedging": {...}`` the cluster gets ``hedging=pa.Hedging(**that)``
(``{}``: the default adaptive policy). With ``"keyed": TABLE`` every request
passes ``bucket=`` the bucket of a key of the sharded ``TABLE``: the
request's own first argument (the row's id of the ``row`` query), or a
random id in 1..1000 for a query without arguments. The peer computes the
buckets of ids 1..1000 once, with ``cluster.bucket(TABLE, id)``, before it
says it is ready, and reports the CPU one such call costs (``bucket_us``).
Every throughput answer carries the client's hedging and routing counters
(``counters``, from ``cluster.statistics()``). The ``paired`` command (see
``_harness``) alternates hedging on (the cluster's policy) and off
(``hedging=False`` per call) in one process: hedging's own cost, measured
side by side; with ``"control": true`` both modes are hedging off (an A/A
run, the method's own spread).

With ``"in_trio_asyncio": true`` the whole client runs inside a running
``trio_asyncio.open_loop()``, as in a service that already uses trio-asyncio
(the bridge is the default one unless ``options`` names another).

With ``"fake": N`` in the config it runs on the package's fake backend
(``picopyn_actors.testing.FakeCluster(N, instant=True)``, the one the unit
tests use) instead of the stand-in cluster: that measures the client's own
cost per request, without any I/O.
"""

from __future__ import annotations

import random
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
    run_paired,
    run_throughput,
    run_timeline,
    serve,
)

import picopyn_actors as pa

#: Keyed requests use the ids 1..KEYS (the rows of the bench's table).
KEYS = 1000

#: ``ClusterStatistics`` fields every throughput answer carries (see ``counters``).
COUNTERS = (
    "requests_ok",
    "requests_failed",
    "requests_retried",
    "requests_routed",
    "routing_fallbacks",
    "hedges_sent",
    "hedges_won",
    "hedges_refused",
    "hedges_skipped",
    "hedges_not_stalled",
    "hedge_delay",
)

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
    if cfg.get("hedging") is not None:
        options["hedging"] = pa.Hedging(**cfg["hedging"])
    async with pa.open_cluster(
        dsn, connections_per_node=per_node, strategy=strategy, **options
    ) as cluster:
        # open_cluster returns once one node is up: wait for all of them.
        want = int(fake) if fake else len(cfg["nodes"])
        async with cluster.events() as events:
            with trio.move_on_after(10):
                while sum(n.state is pa.NodeState.UP for n in cluster.nodes()) < want:
                    await events.receive()
        table = cfg.get("keyed")
        buckets: dict[int, pa.Bucket] = {}
        bucket_us = None
        if table:
            ids = range(1, KEYS + 1)
            for key in ids:  # the first call reads the table's key and the bucket map
                buckets[key] = await cluster.bucket(table, key)
            start = time.process_time()
            for key in ids:
                await cluster.bucket(table, key)
            bucket_us = (time.process_time() - start) * 1e6 / KEYS
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
                "hedging": repr(options.get("hedging")),
                **({"keyed": table, "bucket_us": round(bucket_us, 2)} if table else {}),
            }
        )

        methods = {"fetchrow": cluster.fetchrow, "fetch": cluster.fetch}

        async def call(method: str, query: str, args: tuple[Any, ...]) -> Any:
            return await methods[method](query, *args, idempotent=True)

        def make_call(i: int) -> Call:
            if not table:
                return call
            rnd = random.Random(1000 + i)

            async def keyed(method: str, query: str, args: tuple[Any, ...]) -> Any:
                key = args[0] if args else rnd.randint(1, KEYS)
                return await methods[method](query, *args, bucket=buckets[key], idempotent=True)

            return keyed

        def counters() -> dict[str, Any]:
            stats = cluster.statistics()
            return {name: getattr(stats, name) for name in COUNTERS}

        async def throughput(cmd: dict[str, Any]) -> dict[str, Any]:
            return await run_throughput(cmd, make_call, trio.sleep, run_tasks, counters=counters)

        async def paired(cmd: dict[str, Any]) -> dict[str, Any]:
            # A: the cluster's hedging policy (hedging=None); B: hedging=False.
            # With "control": both modes hedging=False (an A/A run: the method's
            # own spread).
            on: bool | None = False if cmd.get("control") else None

            def make_paired_call(i: int, mode: Callable[[], bool]) -> Call:
                async def call(method: str, query: str, args: tuple[Any, ...]) -> Any:
                    hedging = on if mode() else False
                    return await methods[method](query, *args, idempotent=True, hedging=hedging)

                return call

            return await run_paired(cmd, make_paired_call, trio.sleep, run_tasks, counters=counters)

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

        await serve({"throughput": throughput, "timeline": timeline, "paired": paired}, read)


if __name__ == "__main__":
    trio.run(amain, config())
