"""The actor core against a real 3-node stand-in cluster (PostgreSQL servers)."""

from __future__ import annotations

import inspect
import uuid as uuidlib

import pytest
import trio
from helpers import FAST, all_connections_open, blocking, spread, state_of, uuid_names, wait_for

import picopyn_actors as pa
from picopyn_actors.testing import LocalCluster

PUBLIC_API = {
    "AcquireTimeout",
    "Address",
    "Bucket",
    "Candidate",
    "Client",
    "Cluster",
    "ClusterClosed",
    "ClusterConfig",
    "ClusterStatistics",
    "ConfigError",
    "EventStream",
    "EventsDropped",
    "Fastest",
    "Hedging",
    "LeastInFlight",
    "NoNodesAvailable",
    "NodeEvent",
    "NodeState",
    "NodeStatistics",
    "NodeStatus",
    "OutcomeUnknown",
    "PicodataError",
    "PinnedConnection",
    "PreparedStatement",
    "QueryError",
    "Random",
    "RoundRobin",
    "ShardingKey",
    "Strategy",
    "StrategyError",
    "bucket_id",
    "open_cluster",
    "sharding_key",
}


def test_public_api_is_pinned() -> None:
    assert set(pa.__all__) == PUBLIC_API
    for name in set(pa.__all__) - {"Strategy"}:  # a type alias has no docstring of its own
        assert getattr(pa, name).__doc__, f"{name} has no docstring"
    params = inspect.signature(pa.open_cluster).parameters
    for option in (
        "connections_per_node",
        "strategy",
        "discovery_interval",
        "health_interval",
        "tiers",
        "role",
    ):
        assert option in params
    for method in ("fetch", "fetchrow", "fetchval", "execute", "executemany"):
        assert {"timeout", "idempotent"} <= set(
            inspect.signature(getattr(pa.Cluster, method)).parameters
        )
    errors = (
        pa.ConfigError,
        pa.NoNodesAvailable,
        pa.AcquireTimeout,
        pa.QueryError,
        pa.OutcomeUnknown,
        pa.ClusterClosed,
        pa.StrategyError,
    )
    assert all(issubclass(e, pa.PicodataError) for e in errors)


@pytest.mark.parametrize(
    "strategy",
    [pa.RoundRobin(), pa.Random(seed=1), pa.LeastInFlight(seed=1), pa.Fastest()],
    ids=repr,
)
async def test_each_strategy_spreads_over_all_nodes(
    shared_cluster: LocalCluster, strategy: pa.Candidate
) -> None:
    async with pa.open_cluster(shared_cluster.dsn, strategy=strategy, **FAST) as cluster:
        async with cluster.events() as events:
            await wait_for(events, lambda: all(n.state is pa.NodeState.UP for n in cluster.nodes()))
        # Up with one connection, a node opens the others after: spread over all of them.
        await all_connections_open(cluster)
        seen = await spread(cluster, shared_cluster, 600, concurrency=12)
    assert set(seen) == {n.name for n in shared_cluster.nodes}, seen
    assert sum(seen.values()) == 600
    if isinstance(strategy, pa.Fastest):
        return  # latency-driven: every node is used, not evenly
    assert min(seen.values()) >= 600 / 3 * 0.5, seen


async def test_query_methods_and_pinned_connection(shared_cluster: LocalCluster) -> None:
    table = f"t_{uuidlib.uuid4().hex[:8]}"
    await blocking(
        shared_cluster.execute_everywhere, f"CREATE TABLE {table} (id int PRIMARY KEY, a text)"
    )
    async with pa.open_cluster(shared_cluster.dsn, connections_per_node=1, **FAST) as cluster:
        async with cluster.connection() as conn:
            assert conn.node in {n.name for n in shared_cluster.nodes}
            assert (
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "one") == "INSERT 0 1"
            )
            await conn.executemany(
                f"INSERT INTO {table} VALUES ($1, $2)", [(2, "two"), (3, "three")]
            )
            stmt = await conn.prepare(f"SELECT a FROM {table} WHERE id = $1")
            assert await stmt.fetchval(2) == "two"
            assert (await stmt.fetchrow(3))["a"] == "three"
            assert [r["a"] for r in await conn.fetch(f"SELECT a FROM {table} ORDER BY id")] == [
                "one",
                "two",
                "three",
            ]
        assert await cluster.fetchval("SELECT $1::int + 1", 41) == 42
        row = await cluster.fetchrow("SELECT 1 AS x, 'a' AS y", idempotent=True)
        assert (row["x"], row["y"]) == (1, "a")
        rows = await cluster.fetch("SELECT generate_series(1, 3) AS n", timeout=5.0)
        assert [r["n"] for r in rows] == [1, 2, 3]
        # JSON columns arrive as text, as on Picodata.
        state = await cluster.fetchval("SELECT current_state FROM _pico_instance LIMIT 1")
        assert isinstance(state, str) and "Online" in state


async def test_query_error_is_not_retried_and_keeps_the_connection(
    shared_cluster: LocalCluster,
) -> None:
    async with pa.open_cluster(shared_cluster.dsn, **FAST) as cluster:
        before = cluster.statistics()
        with pytest.raises(pa.QueryError) as info:
            await cluster.fetch("SELEC 1", idempotent=True)
        assert info.value.sqlstate == "42601"
        assert info.value.node in {n.name for n in shared_cluster.nodes}
        with pytest.raises(pa.QueryError) as info:
            await cluster.fetchval("SELECT $1::int", 1, 2)  # wrong argument count
        assert info.value.sqlstate is None
        with pytest.raises(pa.QueryError):
            await cluster.fetchval("SELECT $1::int", "not a number")  # wrong type
        assert await cluster.fetchval("SELECT 1") == 1
        after = cluster.statistics()
        assert after.requests_retried == before.requests_retried
        assert sum(s.reconnects for s in after.nodes.values()) == 0
        assert after.requests_failed - before.requests_failed == 3


async def test_strict_mode_features_fail_as_on_picodata(shared_cluster: LocalCluster) -> None:
    async with pa.open_cluster(shared_cluster.dsn, **FAST) as cluster:
        with pytest.raises(pa.QueryError):
            await cluster.fetchval("SELECT pg_advisory_unlock_all()")
        assert await cluster.fetchval("SELECT 2") == 2


async def test_killed_node_is_routed_around_and_returns_after_start(
    local_cluster: LocalCluster,
) -> None:
    lc = local_cluster
    async with pa.open_cluster(lc.dsn, **FAST) as cluster, cluster.events() as events:
        await wait_for(events, lambda: all(n.state is pa.NodeState.UP for n in cluster.nodes()))
        await blocking(lc.kill, "i2")
        seen = await spread(cluster, lc, 300)  # idempotent reads: zero failures
        assert sum(seen.values()) == 300
        await wait_for(events, lambda: state_of(cluster, "i2") is not pa.NodeState.UP)
        seen = await spread(cluster, lc, 150)
        assert "i2" not in seen, seen
        assert cluster.statistics().requests_failed == 0

        await blocking(lc.start, "i2")
        await wait_for(events, lambda: state_of(cluster, "i2") is pa.NodeState.UP)
        seen = await spread(cluster, lc, 300)
        assert seen["i2"] >= 50, seen
        assert cluster.statistics().restarts >= 1


async def test_paused_node_is_detected_by_the_probe(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    async with pa.open_cluster(lc.dsn, **FAST) as cluster, cluster.events() as events:
        await wait_for(events, lambda: all(n.state is pa.NodeState.UP for n in cluster.nodes()))
        await blocking(lc.pause, "i3")
        start = trio.current_time()
        seen = await spread(cluster, lc, 200)
        assert sum(seen.values()) == 200
        await wait_for(events, lambda: state_of(cluster, "i3") is pa.NodeState.DOWN)
        assert trio.current_time() - start < 5
        status = next(n for n in cluster.nodes() if n.name == "i3")
        assert status.last_error is not None and "timed out" in status.last_error
        await blocking(lc.resume, "i3")
        await wait_for(events, lambda: state_of(cluster, "i3") is pa.NodeState.UP)
        seen = await spread(cluster, lc, 300)
        assert seen["i3"] >= 50, seen


async def test_added_node_gets_traffic(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    async with pa.open_cluster(lc.dsn, **FAST) as cluster, cluster.events() as events:
        new = await blocking(lc.add_node)
        await wait_for(events, lambda: state_of(cluster, new.name) is pa.NodeState.UP)
        seen = await spread(cluster, lc, 400)
        assert seen[new.name] >= 40, seen


async def test_offline_drains_and_expelled_retires(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    async with pa.open_cluster(lc.dsn, **FAST) as cluster, cluster.events() as events:
        await wait_for(events, lambda: all(n.state is pa.NodeState.UP for n in cluster.nodes()))
        # A slow request on every node while i2 is drained: none of them fails.
        results: list[int] = []

        async def slow() -> None:
            results.append(await cluster.fetchval("SELECT 7 FROM pg_sleep(1.0)"))

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(slow)
            await trio.testing.wait_all_tasks_blocked(0.05)
            await blocking(lc.set_state, "i2", "Offline")
        assert results == [7] * 6
        await wait_for(events, lambda: state_of(cluster, "i2") is None)
        seen = await spread(cluster, lc, 200)
        assert "i2" not in seen

        await blocking(lc.set_state, "i3", "Expelled")
        await wait_for(events, lambda: state_of(cluster, "i3") is None)
        seen = await spread(cluster, lc, 100)
        assert set(seen) == {"i1"}

        # Offline -> Online again: the node comes back.
        await blocking(lc.set_state, "i2", "Online")
        await wait_for(events, lambda: state_of(cluster, "i2") is pa.NodeState.UP)
        seen = await spread(cluster, lc, 200)
        assert seen["i2"] > 0


async def test_seed_death_does_not_stop_discovery(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    seed_only = lc.dsn_for("i1")
    async with pa.open_cluster(seed_only, **FAST) as cluster, cluster.events() as events:
        await wait_for(events, lambda: all(n.state is pa.NodeState.UP for n in cluster.nodes()))
        assert len(cluster.nodes()) == 3
        await blocking(lc.kill, "i1")
        await wait_for(events, lambda: state_of(cluster, "i1") is not pa.NodeState.UP)
        new = await blocking(lc.add_node)
        await wait_for(events, lambda: state_of(cluster, new.name) is pa.NodeState.UP)
        seen = await spread(cluster, lc, 300)
        assert seen[new.name] > 0 and "i1" not in seen
        assert cluster.statistics().discovery_failures == 0


async def test_client_works_like_the_seed(shared_cluster: LocalCluster) -> None:
    picked: list[int] = []

    def first(candidates: list[pa.Candidate]) -> pa.Candidate:
        picked.append(len(candidates))
        return candidates[0]

    client = pa.Client(shared_cluster.dsn, pool_size=1, balance_strategy=first)
    await client.connect()
    try:
        assert (await client.fetchrow("SELECT 1 AS one"))["one"] == 1
        assert [r["n"] for r in await client.fetch("SELECT generate_series(1, 2) AS n")] == [1, 2]
        assert await client.execute("SELECT 1") == "SELECT 1"
        assert picked
    finally:
        await client.close()
    async with pa.Client(shared_cluster.dsn) as client2:
        names = uuid_names(shared_cluster)
        assert names[await client2.cluster.fetchval("SELECT pico_instance_uuid()")]


def test_client_rejects_bad_input_at_construction() -> None:
    with pytest.raises(pa.ConfigError):
        pa.Client("mysql://x@h")
    with pytest.raises(pa.ConfigError):
        pa.Client("postgresql://admin:pw@h:1", pool_size=0)
    with pytest.raises(pa.ConfigError):
        pa.Client("postgresql://admin:pw@h:1", balance_strategy=42)  # type: ignore[arg-type]


async def test_wrong_password_is_a_clear_error(shared_cluster: LocalCluster) -> None:
    bad = shared_cluster.dsn.replace(shared_cluster.password, "wrong-password")
    with pytest.raises(pa.NoNodesAvailable) as info:
        async with pa.open_cluster(bad, connect_timeout=2.0):
            pass
    message = str(info.value)
    assert "authentication failed" in message or "password" in message
    assert "wrong-password" not in message
