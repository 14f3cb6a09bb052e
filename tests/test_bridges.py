"""Every bridge serves the same API and heals the same way (real servers)."""

from __future__ import annotations

import pytest
import trio
import trio_asyncio
from helpers import FAST, blocking, spread, state_of, wait_for

import picopyn_actors as pa
from picopyn_actors._bridge import AsyncpgBackend
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


async def test_auto_shares_a_running_trio_asyncio_loop(shared_cluster: LocalCluster) -> None:
    options = {**FAST, "bridge": "auto"}
    async with (
        trio_asyncio.open_loop() as loop,
        pa.open_cluster(shared_cluster.dsn, **options) as cluster,
    ):
        assert isinstance(cluster._backend, AsyncpgBackend)
        assert cluster._backend.kind == "trio-asyncio"
        assert cluster._backend._runner.loop is loop  # type: ignore[attr-defined]
        assert await cluster.fetchval("SELECT 1") == 1
