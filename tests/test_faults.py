"""The fault matrix: real PostgreSQL servers killed, hung and restarted under load.

Every request is counted: it ends exactly once, with a result or a documented
exception, and none outlives its deadline.
"""

from __future__ import annotations

import _asyncio
import asyncio
import logging
import uuid as uuidlib
from collections import Counter
from typing import Any

import asyncpg
import pytest
import trio
from helpers import FAST, blocking, open_sockets, spread, state_of, uuid_names, wait_for
from load import Tally, run_load

import picopyn_actors as pa
from picopyn_actors._bridge import AsyncpgBackend, Connection, open_backend
from picopyn_actors._dsn import Address
from picopyn_actors.testing import LocalCluster

UUID = "SELECT pico_instance_uuid()"


async def _all_up(cluster: pa.Cluster, events: Any) -> None:
    await wait_for(events, lambda: all(n.state is pa.NodeState.UP for n in cluster.nodes()))


async def test_crash_under_load(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    names = uuid_names(lc)
    reads, writes = Tally(), Tally()
    stop = trio.Event()
    async with pa.open_cluster(lc.dsn, **FAST) as cluster, cluster.events() as events:
        await _all_up(cluster, events)

        async def read(_: int) -> Any:
            return await cluster.fetchval(UUID, idempotent=True)

        async def write(_: int) -> Any:
            # Not idempotent, and on the wire for a while: the kill catches some in flight.
            row = await cluster.fetchrow(f"{UUID} AS u, pg_sleep(0.02)")
            return row["u"]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_load(reads, read, tasks=20, stop=stop, names=names))
            nursery.start_soon(lambda: run_load(writes, write, tasks=10, stop=stop, names=names))
            await trio.sleep(0.5)
            await blocking(lc.kill, "i2")
            await wait_for(
                events,
                lambda: state_of(cluster, "i2") not in (pa.NodeState.UP, pa.NodeState.SUSPECT),
            )
            seen_at_down = cluster.statistics().nodes["i2"]
            await trio.sleep(1.0)
            seen_later = cluster.statistics().nodes["i2"]
            stop.set()
    assert reads.failed == Counter(), reads.errors[:3]
    assert set(writes.failed) <= {"OutcomeUnknown"}, writes.errors[:3]
    assert all(isinstance(e, pa.OutcomeUnknown) and e.node == "i2" for e in writes.errors)
    assert reads.ended == reads.sent and writes.ended == writes.sent
    # Nothing was sent to i2 once it was seen down.
    assert seen_later.requests_ok == seen_at_down.requests_ok
    assert seen_later.requests_failed == seen_at_down.requests_failed
    assert reads.ok["i1"] and reads.ok["i3"]


async def test_hung_node_under_load(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    names = uuid_names(lc)
    reads = Tally()
    stop = trio.Event()
    async with pa.open_cluster(lc.dsn, **FAST) as cluster, cluster.events() as events:
        await _all_up(cluster, events)

        async def read(_: int) -> Any:
            return await cluster.fetchval(UUID, idempotent=True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_load(reads, read, tasks=20, stop=stop, names=names))
            await trio.sleep(0.5)
            await blocking(lc.pause, "i3")
            await wait_for(events, lambda: state_of(cluster, "i3") is pa.NodeState.DOWN)
            ok_when_down = reads.ok["i3"]
            await trio.sleep(1.0)
            assert reads.ok["i3"] == ok_when_down
            await blocking(lc.resume, "i3")
            await wait_for(events, lambda: state_of(cluster, "i3") is pa.NodeState.UP)
            await trio.sleep(1.0)
            stop.set()
    assert reads.failed == Counter(), reads.errors[:3]
    assert reads.ok["i3"] > ok_when_down  # back in rotation after resume
    # No read waited out the hang: probe_timeout plus a health interval, with margin.
    assert reads.max_latency < 3.0


async def test_everything_down_fails_fast_then_heals(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    attempts: Counter[Address] = Counter()

    class Counting:
        def __init__(self, real: AsyncpgBackend) -> None:
            self.real = real

        async def connect(self, address: Address) -> Connection:
            attempts[address] += 1
            return await self.real.connect(address)

    options = {**FAST, "backoff_max": 1.0}
    config = pa.ClusterConfig.create(lc.dsn, **options)
    async with open_backend(config.dsn, 3.0, {}) as real:
        backend = Counting(real)
        async with (
            pa.open_cluster(lc.dsn, backend=backend, **options) as cluster,
            cluster.events() as events,
        ):
            await _all_up(cluster, events)
            for node in lc.nodes:
                await blocking(lc.kill, node.name)
            await wait_for(
                events,
                lambda: all(n.state is not pa.NodeState.UP for n in cluster.nodes()),
            )
            await wait_for(
                events,
                lambda: not any(n.state.hopeful for n in cluster.nodes()),
            )
            attempts.clear()
            for _ in range(20):
                start = trio.current_time()
                with pytest.raises(pa.NoNodesAvailable) as info:
                    await cluster.fetchval("SELECT 1", idempotent=True)
                assert trio.current_time() - start < 0.5
            assert {"i1", "i2", "i3"} <= set(info.value.node_errors)
            await trio.sleep(3.0)
            # Backoff, not a storm: with backoff_max=1.0 the node actor and
            # discovery each try a node at most about twice a second (a retry
            # loop without backoff makes hundreds of attempts here).
            assert max(attempts.values()) <= 16, attempts
            for node in lc.nodes:
                await blocking(lc.start, node.name)
            await _all_up(cluster, events)
            assert await cluster.fetchval("SELECT 1") == 1
            assert cluster.statistics().discovery_runs > 0


async def test_flapping_node_is_quarantined_then_readmitted(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    options = {**FAST, "max_restarts": 2, "restart_window": 60.0, "quarantine_time": 1.5}
    async with (
        pa.open_cluster(lc.dsn, **options) as cluster,
        cluster.events() as events,
        cluster.events() as history,
    ):
        await _all_up(cluster, events)
        for _ in range(3):
            await blocking(lc.kill, "i2")
            await wait_for(events, lambda: state_of(cluster, "i2") is not pa.NodeState.UP)
            await blocking(lc.start, "i2")
            await wait_for(events, lambda: state_of(cluster, "i2") is not pa.NodeState.DOWN)
        quarantined_at = None
        while quarantined_at is None:
            event = history.receive_nowait()
            if isinstance(event, pa.NodeEvent) and event.new is pa.NodeState.QUARANTINED:
                assert event.node == "i2" and "restarts" in event.reason
                quarantined_at = event.at
        # Readmitted once the quarantine is over and the node stays up.
        await wait_for(events, lambda: state_of(cluster, "i2") is pa.NodeState.UP)
        assert trio.current_time() - quarantined_at >= 1.5
        seen = await spread(cluster, lc, 300)
        assert seen["i2"] > 0


async def test_cancelled_callers_leak_nothing(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    sockets_before = open_sockets()
    async with pa.open_cluster(lc.dsn, connections_per_node=2, **FAST) as cluster:
        async with cluster.events() as events:
            await _all_up(cluster, events)
        connections = 3 * 2  # connections_per_node on every node
        async with trio.open_nursery() as nursery:
            for _ in range(12):

                async def cancelled() -> None:
                    with trio.move_on_after(0.1):
                        await cluster.fetchval("SELECT pg_sleep(5)")

                nursery.start_soon(cancelled)
        # The connections that were cancelled mid-query are replaced, not leaked.
        async with cluster.events() as events:
            await _all_up(cluster, events)
        for _ in range(30):
            assert await cluster.fetchval("SELECT 1") == 1
        stats = cluster.statistics()
        assert sum(s.reconnects for s in stats.nodes.values()) >= 6
        assert sum(n.connections for n in cluster.nodes()) == connections

    assert trio.lowlevel.current_statistics().tasks_living == tasks_before
    assert open_sockets() == sockets_before


async def test_leaving_with_requests_in_flight(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    sockets_before = open_sockets()
    outcomes: Counter[str] = Counter()

    async def inflight(cluster: pa.Cluster) -> None:
        try:
            await cluster.fetchval("SELECT 1 FROM pg_sleep(0.5)")
            outcomes["ok"] += 1
        except pa.ClusterClosed:
            outcomes["ClusterClosed"] += 1

    async with trio.open_nursery() as callers:
        async with pa.open_cluster(lc.dsn, **FAST) as cluster:
            for _ in range(10):  # more than the connections: some wait in the queue
                callers.start_soon(inflight, cluster)
            await trio.testing.wait_all_tasks_blocked(0.05)
        closed_at = trio.current_time()
    assert trio.current_time() - closed_at < 1.0
    assert sum(outcomes.values()) == 10 and set(outcomes) <= {"ok", "ClusterClosed"}
    assert outcomes["ClusterClosed"] > 0
    with pytest.raises(pa.ClusterClosed):
        await cluster.fetchval("SELECT 1")
    assert trio.lowlevel.current_statistics().tasks_living == tasks_before
    assert open_sockets() == sockets_before
    # No asyncio loop is left marked as running in this thread.
    assert _asyncio._get_running_loop() is None


async def test_bad_input_gets_clear_errors(shared_cluster: LocalCluster) -> None:
    lc = shared_cluster
    with pytest.raises(pa.ConfigError, match="postgresql://"):
        async with pa.open_cluster("http://nowhere"):
            pass
    for bad in (
        {"discovery_interval": -1},
        {"health_interval": 0},
        {"connections_per_node": 0},
        {"probe_timeout": float("nan")},
        {"role": "boss"},
        {"tiers": []},
    ):
        with pytest.raises(pa.ConfigError):
            async with pa.open_cluster(lc.dsn, **bad):
                pass
    with pytest.raises(pa.ConfigError, match="unknown tier"):
        async with pa.open_cluster(lc.dsn, tiers=["nope"], **FAST):
            pass
    # A closed port: fails within the connect timeout, naming the host.
    start = trio.current_time()
    with pytest.raises(pa.NoNodesAvailable, match=r"127\.0\.0\.1:1"):
        async with pa.open_cluster("postgresql://admin:pw@127.0.0.1:1", connect_timeout=1.0):
            pass
    assert trio.current_time() - start < 5

    calls = 0

    def broken(candidates: list[pa.Candidate]) -> pa.Candidate:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise RuntimeError("boom")
        return pa.Candidate(name="x", address=Address("h", 1), tier="t", replicaset="r")

    async with pa.open_cluster(lc.dsn, strategy=broken, **FAST) as cluster:
        with pytest.raises(pa.StrategyError, match=r"broken.*boom"):
            await cluster.fetchval("SELECT 1")
        with pytest.raises(pa.StrategyError, match="not one of the candidates"):
            await cluster.fetchval("SELECT 1")
    async with pa.open_cluster(lc.dsn, **FAST) as cluster:
        with pytest.raises(pa.QueryError) as info:
            await cluster.execute("INSERT INTO no_such_table VALUES (1)")
        assert info.value.sqlstate == "42P01"
        assert await cluster.fetchval("SELECT 3") == 3


def _count_keys(dsns: list[str], table: str) -> Counter[int]:
    async def main() -> Counter[int]:
        keys: Counter[int] = Counter()
        for dsn in dsns:
            conn = await asyncpg.connect(dsn)
            try:
                for row in await conn.fetch(f"SELECT k FROM {table}"):
                    keys[row["k"]] += 1
            finally:
                await conn.close()
        return keys

    loop = asyncio.SelectorEventLoop()  # a plain loop, whatever policy is installed
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def test_writes_are_never_duplicated(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    table = f"w_{uuidlib.uuid4().hex[:8]}"
    await blocking(lc.execute_everywhere, f"CREATE TABLE {table} (k int PRIMARY KEY)")
    acknowledged: set[int] = set()
    unknown: set[int] = set()
    failed: Counter[str] = Counter()
    stop = trio.Event()
    tally = Tally()
    async with pa.open_cluster(lc.dsn, **FAST) as cluster, cluster.events() as events:
        await _all_up(cluster, events)

        async def write(key: int) -> Any:
            try:
                status = await cluster.execute(f"INSERT INTO {table} VALUES ($1)", key)
            except pa.OutcomeUnknown:
                unknown.add(key)
                raise
            except pa.PicodataError as exc:
                failed[type(exc).__name__] += 1
                raise
            acknowledged.add(key)
            return status

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_load(tally, write, tasks=16, stop=stop))
            for victim in ("i2", "i3", "i2"):
                await trio.sleep(0.4)
                await blocking(lc.kill, victim)
                await wait_for(events, lambda v=victim: state_of(cluster, v) is not pa.NodeState.UP)
                await trio.sleep(0.3)
                await blocking(lc.start, victim)
                await wait_for(events, lambda v=victim: state_of(cluster, v) is pa.NodeState.UP)
            await trio.sleep(0.4)
            stop.set()
    assert tally.ended == tally.sent
    assert set(tally.failed) <= {"OutcomeUnknown"}, tally.errors[:3]
    keys = await trio.to_thread.run_sync(_count_keys, [lc.dsn_for(n.name) for n in lc.nodes], table)
    assert max(keys.values()) == 1, "a key was written twice"
    missing = acknowledged - set(keys)
    assert not missing, f"acknowledged writes lost: {sorted(missing)[:10]}"
    assert set(keys) <= acknowledged | unknown
    assert len(acknowledged) > 100


async def test_a_four_second_outage_logs_calmly(local_cluster: LocalCluster, caplog: Any) -> None:
    """One WARNING when the node goes down, none per reconnect attempt, INFO when back."""
    lc = local_cluster
    caplog.set_level(logging.DEBUG, logger="picopyn_actors")
    async with pa.open_cluster(lc.dsn, **FAST) as cluster, cluster.events() as events:
        await _all_up(cluster, events)
        caplog.clear()
        await blocking(lc.kill, "i2")
        await trio.sleep(4.0)
        assert state_of(cluster, "i2") is pa.NodeState.DOWN
        attempts = next(n.attempts for n in cluster.nodes() if n.name == "i2")
        await blocking(lc.start, "i2")
        await wait_for(events, lambda: state_of(cluster, "i2") is pa.NodeState.UP)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) <= 3, [r.getMessage() for r in loud]
    assert attempts >= 3  # it kept trying, at DEBUG
    back = [r.getMessage() for r in caplog.records if "down -> up" in r.getMessage()]
    assert back and "back after" in back[0]
