"""The client on Picodata's dialect, over real sockets: LocalCluster(strict=True),
whose pgproto front speaks it (docs/dialect.md).

Schema changes under load (42999), the statement limit, protocol violations,
stub transactions, and a client that never sends a cancel request.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import trio
from helpers import FAST, blocking

import picopyn_actors as pa
from picopyn_actors.testing import LocalCluster

TABLE = "ddl_under_load"
ONE = f"SELECT id, v FROM {TABLE} WHERE id = $1"
SOME = f"SELECT id FROM {TABLE} WHERE id <= $1"
UPDATE = f"UPDATE {TABLE} SET v = $1 WHERE id = $2"


async def _front_total(lc: LocalCluster, counter: str) -> int:
    def total() -> int:
        return sum(getattr(lc.front_statistics(n.name), counter) for n in lc.nodes)

    return await blocking(total)


@pytest.mark.deadline(90)
async def test_schema_changes_under_load_fail_no_request(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    await blocking(
        lc.execute_everywhere,
        f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v text);"
        f"INSERT INTO {TABLE} SELECT g, 'v' || g FROM generate_series(1, 100) g;"
        f"GRANT ALL ON {TABLE} TO PUBLIC",
    )
    outcomes: Counter[str] = Counter()
    errors: list[BaseException] = []
    done = trio.Event()
    rand = random.Random(5)

    async with pa.open_cluster(lc.dsn, connections_per_node=4, **FAST) as cluster:

        async def call(kind: str, fn: Any, *args: Any, **kwargs: Any) -> None:
            try:
                await fn(*args, **kwargs)
            except Exception as exc:  # counted, and shown if the test fails
                errors.append(exc)
                outcomes[f"{kind} failed"] += 1
            else:
                outcomes[kind] += 1

        async def plain() -> None:
            while not done.is_set():
                key = rand.randrange(1, 101)
                await call(
                    "fetchrow", cluster.fetchrow, f"SELECT id, v FROM {TABLE} WHERE id = $1", key
                )
                await call("fetch", cluster.fetch, f"SELECT id FROM {TABLE} WHERE id <= $1", 5)
                await call(
                    "execute", cluster.execute, f"UPDATE {TABLE} SET v = $1 WHERE id = $2", "w", key
                )

        async def pinned() -> None:
            while not done.is_set():
                async with cluster.connection() as conn:
                    statement = await conn.prepare(f"SELECT v FROM {TABLE} WHERE id = $1")
                    for _ in range(20):
                        await call("prepared", statement.fetchval, rand.randrange(1, 101))

        async def alter() -> None:
            for step in range(50):  # every 200 ms for 10 s, on every node
                await blocking(lc.execute_everywhere, f"ALTER TABLE {TABLE} ADD COLUMN c{step} int")
                await trio.sleep(0.2)
            done.set()

        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(plain)
            for _ in range(4):
                nursery.start_soon(pinned)
            nursery.start_soon(alter)
        stats = cluster.statistics()
    failed = {k: v for k, v in outcomes.items() if k.endswith("failed")}
    assert failed == {}, (failed, errors[:3])
    assert all(outcomes[k] > 50 for k in ("fetchrow", "fetch", "execute", "prepared")), outcomes
    invalidations = await _front_total(lc, "invalidations")
    assert invalidations > 0
    # Every 42999 the servers sent was run again: by a slot (counted in the
    # statistics) or by a pinned connection (which prepares again itself).
    assert 0 < stats.statements_invalidated <= invalidations
    assert stats.requests_failed == 0


async def test_a_full_statement_storage_is_a_clear_error(make_cluster: Any) -> None:
    lc = make_cluster(nodes=1, pg_statement_max=12)
    async with pa.open_cluster(lc.dsn, connections_per_node=1, **FAST) as cluster:
        async with cluster.connection() as conn:
            assert await conn.fetchval("SELECT 1 + 1") == 2
            seen: list[pa.QueryError] = []
            for n in range(20):
                try:
                    await conn.fetchval(f"SELECT {n} + 100")
                except pa.QueryError as exc:
                    seen.append(exc)
            # The connection keeps serving what it had prepared.
            assert await conn.fetchval("SELECT 1 + 1") == 2
        assert [n.state for n in cluster.nodes()] == [pa.NodeState.UP]
    assert seen, "the statement limit was never reached"
    error = seen[0]
    assert error.sqlstate == "XX000" and error.node == "i1"
    assert "Statement storage is full" in str(error)
    assert "statement_cache_size" in str(error) and "pg_statement_max" in str(error)


async def test_a_protocol_violation_leaves_the_node_up(shared_cluster: LocalCluster) -> None:
    lc = shared_cluster
    async with pa.open_cluster(lc.dsn, connections_per_node=1, **FAST) as cluster:
        async with cluster.events() as events:
            with trio.move_on_after(5):
                while sum(n.state is pa.NodeState.UP for n in cluster.nodes()) < 3:
                    await events.receive()
        before = {n.name: n.connections for n in cluster.nodes()}
        malformed = await _front_total(lc, "malformed_messages")
        async with cluster.connection() as conn:
            # Past the client's own check of the query text, as a buggy caller
            # of a lower layer could: the front answers 08P01, the session stays.
            with pytest.raises(pa._bridge.BackendQueryError) as info:
                await conn._lease.conn.run("fetchval", "SELECT 'a\x00b'", ())
            assert info.value.sqlstate == "08P01"
            assert await conn.fetchval("SELECT 7") == 7
        await trio.testing.wait_all_tasks_blocked()
        assert await _front_total(lc, "malformed_messages") == malformed + 1
        assert all(n.state is pa.NodeState.UP for n in cluster.nodes())
        assert {n.name: n.connections for n in cluster.nodes()} == before
        assert cluster.statistics().requests_failed == 0


async def test_transactions_are_stubs_as_on_picodata(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    await blocking(
        lc.execute_everywhere,
        "CREATE TABLE tx_stub (id int PRIMARY KEY); GRANT ALL ON tx_stub TO PUBLIC",
    )
    async with pa.open_cluster(lc.dsn_for("i1"), tiers=None, **FAST) as cluster:
        async with cluster.connection() as conn:
            node = conn.node
            with pytest.raises(RuntimeError, match="undo"):
                async with conn.transaction():
                    await conn.execute("INSERT INTO tx_stub VALUES (1)")
                    raise RuntimeError("undo, if there were a transaction")
            # Nothing errored, and nothing was undone: there is no transaction.
            assert await conn.fetchval("SELECT count(*) FROM tx_stub") == 1
        assert node


@pytest.mark.parametrize("bridge", ["embedded", "thread", "trio-asyncio"])
async def test_the_client_never_sends_a_cancel_request(
    local_cluster: LocalCluster, bridge: str
) -> None:
    lc = local_cluster
    async with pa.open_cluster(lc.dsn, bridge=bridge, **FAST) as cluster:
        with pytest.raises(trio.TooSlowError):
            await cluster.fetchval("SELECT pg_sleep(2)", timeout=0.2)
        with trio.move_on_after(0.2):
            async with cluster.connection() as conn:
                await conn.fetchval("SELECT pg_sleep(2)")
        await blocking(lc.pause, "i2")  # probes time out
        async with cluster.events() as events:
            with trio.move_on_after(5):
                while not any(
                    n.name == "i2" and n.state is pa.NodeState.DOWN for n in cluster.nodes()
                ):
                    await events.receive()
        await blocking(lc.resume, "i2")
        assert await cluster.fetchval("SELECT 1", idempotent=True) == 1
    assert await _front_total(lc, "cancel_requests_ignored") == 0
