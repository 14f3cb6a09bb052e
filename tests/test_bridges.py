"""Every bridge serves the same API and heals the same way (real servers)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import outcome
import pytest
import trio
import trio_asyncio
from helpers import FAST, blocking, spread, state_of, wait_for

import picopyn_actors as pa
from picopyn_actors._bridge import AsyncpgBackend, Connection, driver, open_backend
from picopyn_actors._dsn import Address, parse_dsn
from picopyn_actors.testing import LocalCluster

BRIDGES = ["embedded", "thread", "trio-asyncio"]


@pytest.mark.parametrize("bridge", BRIDGES)
async def test_bridge_serves_and_heals(local_cluster: LocalCluster, bridge: str) -> None:
    lc = local_cluster
    options = {**FAST, "bridge": bridge}
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    async with pa.open_cluster(lc.dsn, **options) as cluster, cluster.events() as events:
        await wait_for(events, lambda: all(n.state is pa.NodeState.UP for n in cluster.nodes()))
        assert await cluster.fetchval("SELECT $1::int * 2", 21) == 42
        assert (await cluster.fetchrow("SELECT 'x' AS s"))["s"] == "x"
        assert len(await cluster.fetch("SELECT generate_series(1, 5)")) == 5
        assert await cluster.execute("SELECT 1") == "SELECT 1"
        with pytest.raises(pa.QueryError) as info:
            await cluster.fetch("SELEC 1")
        assert info.value.sqlstate == "42601"
        async with cluster.connection() as conn:
            stmt = await conn.prepare("SELECT $1::text || '!'")
            assert await stmt.fetchval("hi") == "hi!"

        # A caller cancelled mid-query costs one connection, nothing else.
        with trio.move_on_after(0.2):
            await cluster.fetchval("SELECT pg_sleep(3)")
        assert await cluster.fetchval("SELECT 5") == 5

        await blocking(lc.kill, "i3")
        seen = await spread(cluster, lc, 200)
        assert sum(seen.values()) == 200
        await wait_for(events, lambda: state_of(cluster, "i3") is not pa.NodeState.UP)
        await blocking(lc.start, "i3")
        await wait_for(events, lambda: state_of(cluster, "i3") is pa.NodeState.UP)
        assert (await spread(cluster, lc, 300))["i3"] > 0
    assert trio.lowlevel.current_statistics().tasks_living == tasks_before


@pytest.mark.parametrize(
    ("bridge", "kind"),
    [("auto", "embedded"), ("thread", "thread"), ("trio-asyncio", "trio-asyncio")],
)
async def test_bridge_choice_without_a_trio_asyncio_loop(
    shared_cluster: LocalCluster, bridge: str, kind: str
) -> None:
    async with pa.open_cluster(shared_cluster.dsn, **{**FAST, "bridge": bridge}) as c:
        assert isinstance(c._backend, AsyncpgBackend)
        assert c._backend.kind == kind
        assert await c.fetchval("SELECT 1") == 1


async def test_the_trio_asyncio_bridge_shares_the_running_loop(
    shared_cluster: LocalCluster,
) -> None:
    options = {**FAST, "bridge": "trio-asyncio"}
    async with (
        trio_asyncio.open_loop() as loop,
        pa.open_cluster(shared_cluster.dsn, **options) as cluster,
    ):
        assert isinstance(cluster._backend, AsyncpgBackend)
        assert cluster._backend.kind == "trio-asyncio"
        assert cluster._backend._runner.loop is loop  # type: ignore[attr-defined]
        assert await cluster.fetchval("SELECT 1") == 1


async def _running_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("bridge", ["auto", "embedded"])
async def test_the_embedded_runner_beside_a_running_trio_asyncio_loop(
    shared_cluster: LocalCluster, caplog: pytest.LogCaptureFixture, bridge: str
) -> None:
    """``auto`` takes the embedded runner even when the service runs trio-asyncio:
    the service's asyncio code keeps its loop and keeps running, nothing is
    left behind, and both shut down cleanly."""
    caplog.set_level(logging.WARNING)
    fds_before = _open_fds()
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    async with trio_asyncio.open_loop() as loop:
        ticks: list[asyncio.AbstractEventLoop] = []

        async def ticker() -> None:  # the service's own asyncio code, all along
            while True:
                ticks.append(asyncio.get_running_loop())
                await asyncio.sleep(0.001)

        ticking = loop.create_task(ticker())
        own = await trio_asyncio.aio_as_trio(asyncpg.connect)(shared_cluster.dsn_for("i1"))
        async with pa.open_cluster(shared_cluster.dsn, **{**FAST, "bridge": bridge}) as cluster:
            assert isinstance(cluster._backend, AsyncpgBackend)
            assert cluster._backend.kind == "embedded"
            seen_before = len(ticks)

            async def ours() -> None:
                for i in range(200):
                    assert await cluster.fetchval("SELECT $1::int", i) == i
                    # asyncio code called from trio still runs on the service's loop
                    assert await trio_asyncio.aio_as_trio(_running_loop)() is loop
                    assert trio_asyncio.current_loop.get() is loop

            async def theirs() -> None:
                fetchval = trio_asyncio.aio_as_trio(own.fetchval)
                for i in range(200):
                    assert await fetchval("SELECT $1::int", i) == i

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ours)
                nursery.start_soon(theirs)
            assert len(ticks) > seen_before  # it kept running meanwhile
        # The service's loop and connection outlive the cluster.
        assert await trio_asyncio.aio_as_trio(own.fetchval)("SELECT 7") == 7
        await trio_asyncio.aio_as_trio(own.close)()
        assert all(seen is loop for seen in ticks)
        ticking.cancel()
    assert trio.lowlevel.current_statistics().tasks_living == tasks_before
    assert _open_fds() == fds_before
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- the embedded runner's fast query path (asyncpg's protocol called directly) --------


@asynccontextmanager
async def _raw_connection(lc: LocalCluster) -> AsyncIterator[Connection]:
    """One embedded-runner connection to i1's server itself (bare PostgreSQL)."""
    dsn = parse_dsn(lc.dsn)
    async with open_backend(dsn, 5.0, {}, "embedded") as backend:
        assert backend.kind == "embedded"
        conn = await backend.connect(Address("127.0.0.1", lc.server_port("i1")))
        try:
            yield conn
        finally:
            conn.terminate()


async def _submitted(conn: Connection, method: str, query: str, *args: Any) -> Any:
    done: list[outcome.Outcome[Any]] = []
    finished = trio.Event()

    def on_done(result: outcome.Outcome[Any]) -> None:
        done.append(result)
        finished.set()

    conn.submit(method, query, args, on_done)
    with trio.fail_after(5):
        await finished.wait()
    assert len(done) == 1
    return done[0].unwrap()


@pytest.fixture
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The methods that took the fast path, in order."""
    taken: list[str] = []
    real = driver.fast_call

    def spy(conn: Any, method: str, query: str, args: Any) -> Any:
        call = real(conn, method, query, args)
        if call is not None:
            taken.append(method)
        return call

    monkeypatch.setattr(driver, "fast_call", spy)
    return taken


CASES: list[tuple[str, str, tuple[Any, ...]]] = [
    ("fetch", "SELECT generate_series(1, $1::int) AS n", (3,)),
    ("fetch", "SELECT 1 AS n WHERE $1::bool", (False,)),
    ("fetchrow", "SELECT $1::text AS s, 2 AS n", ("x",)),
    ("fetchrow", "SELECT 1 WHERE $1::bool", (False,)),
    ("fetchval", "SELECT $1::int * 2", (21,)),
    ("fetchval", "SELECT 1 WHERE $1::bool", (False,)),
    ("execute", "SELECT $1::int", (7,)),
    ("execute", "SELECT 1", ()),
]


@pytest.mark.parametrize(("method", "query", "args"), CASES)
async def test_the_fast_path_answers_as_asyncpg_does(
    shared_cluster: LocalCluster,
    fast_calls: list[str],
    method: str,
    query: str,
    args: tuple[Any, ...],
) -> None:
    async with _raw_connection(shared_cluster) as conn:
        public = await conn.run(method, query, args)  # asyncpg's own method; caches it
        first = await _submitted(conn, method, query, *args)
        second = await _submitted(conn, method, query, *args)
    assert first == second == public
    assert fast_calls == [method, method]


async def test_an_uncached_statement_takes_asyncpgs_path_and_is_cached(
    shared_cluster: LocalCluster, fast_calls: list[str]
) -> None:
    async with _raw_connection(shared_cluster) as conn:
        assert await _submitted(conn, "fetchval", "SELECT $1::int + 1", 1) == 2
        assert fast_calls == []
        assert await _submitted(conn, "fetchval", "SELECT $1::int + 1", 2) == 3
        assert fast_calls == ["fetchval"]
        conn.forget_statements()
        assert await _submitted(conn, "fetchval", "SELECT $1::int + 1", 3) == 4
        assert fast_calls == ["fetchval"]


async def test_a_closed_cached_statement_takes_asyncpgs_path_and_is_prepared_again(
    shared_cluster: LocalCluster, fast_calls: list[str]
) -> None:
    # The fast path reads asyncpg's statement cache itself; a statement closed
    # since it was cached (asyncpg closes one on a type cache error) is left
    # to the public method, whose own lookup drops it and prepares again.
    query = "SELECT $1::int + 10"
    async with _raw_connection(shared_cluster) as conn:
        assert await _submitted(conn, "fetchval", query, 1) == 11
        cached = conn._conn._stmt_cache._entries  # type: ignore[attr-defined]
        assert len(cached) == 1
        for entry in cached.values():
            entry._statement.mark_closed()
        assert await _submitted(conn, "fetchval", query, 2) == 12
        assert fast_calls == []
        assert await _submitted(conn, "fetchval", query, 3) == 13
        assert fast_calls == ["fetchval"]


async def test_the_fast_path_recovers_from_a_changed_result_type_as_asyncpg_does(
    shared_cluster: LocalCluster, fast_calls: list[str]
) -> None:
    query = "SELECT * FROM fast_t WHERE $1::bool"
    async with _raw_connection(shared_cluster) as conn:
        await conn.run("execute", "CREATE TEMP TABLE fast_t (a int)", ())
        await conn.run("execute", "INSERT INTO fast_t VALUES (1)", ())
        assert [tuple(r) for r in await _submitted(conn, "fetch", query, True)] == [(1,)]
        await conn.run("execute", "ALTER TABLE fast_t ADD COLUMN b text DEFAULT 'b'", ())
        # The cached plan's result type changed: asyncpg re-prepares and runs again.
        assert [tuple(r) for r in await _submitted(conn, "fetch", query, True)] == [(1, "b")]
        assert [tuple(r) for r in await _submitted(conn, "fetch", query, True)] == [(1, "b")]
    assert fast_calls == ["fetch", "fetch"]
