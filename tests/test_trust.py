"""Trust no single node's word: one node's catalog bent at a time, under load.

Each case runs 20 tasks of idempotent reads against a 3-node stand-in, bends
one server's catalog (through LocalCluster's supported per-node edits), keeps
reading for a few discovery runs, and expects:

- 0 failed idempotent reads while a healthy node exists;
- no healthy node drained or retired;
- one WARNING from discovery about it, not a flood;
- the right reason in the events (and in the log).

Nothing here relies on what only PostgreSQL does: no SET through the client,
no cancel; the lock case counts the client's own connections.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import attrs
import pytest
import trio
from helpers import FAST, blocking, uuid_names, wait_for
from load import Tally, run_load

import picopyn_actors as pa
from picopyn_actors._bridge import Backend, Connection, open_backend
from picopyn_actors._dsn import Address
from picopyn_actors.testing import LocalCluster

UUID = "SELECT pico_instance_uuid()"
SUPERVISOR = "picopyn_actors._supervisor"
#: How long each case keeps reading after the bend: about ten discovery runs.
OBSERVE = 3.0

pytestmark = pytest.mark.deadline(90)


class CountingBackend:
    """The real backend, counting connection attempts per address (logins)."""

    def __init__(self, real: Backend) -> None:
        self.real = real
        self.connects: Counter[Address] = Counter()

    async def connect(self, address: Address) -> Connection:
        self.connects[address] += 1
        return await self.real.connect(address)


@attrs.define
class Seen:
    """What one case saw."""

    reads: Tally
    events: list[pa.NodeEvent]
    warnings: list[str]
    views_rejected: int | None
    connects: Counter[Address]
    nodes: list[pa.NodeStatus]

    def left(self, names: set[str]) -> list[pa.NodeEvent]:
        """Events that took one of ``names`` out of service."""
        leaving = (pa.NodeState.DRAINING, pa.NodeState.RETIRED)
        return [e for e in self.events if e.node in names and e.new in leaving]

    def notes(self, name: str) -> list[str]:
        """Reasons of the notes (events with the state unchanged) about node ``name``."""
        return [e.reason for e in self.events if e.node == name and e.old is e.new]

    def summary(self, case: str) -> str:
        return (
            f"case={case} reads_ok={sum(self.reads.ok.values())} "
            f"reads_failed={sum(self.reads.failed.values())} {dict(self.reads.failed)} "
            f"left={[(e.node, e.new.value, e.reason) for e in self.left({'i1', 'i2', 'i3'})]} "
            f"warnings={len(self.warnings)} views_rejected={self.views_rejected} {self.warnings}"
        )


def address_of(lc: LocalCluster, name: str) -> Address:
    node = lc.node(name)
    return Address(node.host, node.port)


def dsn_of(lc: LocalCluster, *names: str) -> str:
    """A DSN whose seed hosts are ``names``, in that order."""
    seeds = ",".join(str(address_of(lc, n)) for n in names)
    return lc.dsn_for(names[0]).replace(str(address_of(lc, names[0])), seeds)


async def under_load(
    lc: LocalCluster,
    caplog: pytest.LogCaptureFixture,
    bend: Callable[[pa.Cluster, CountingBackend], Awaitable[None]],
    *,
    seeds: tuple[str, ...] = ("i1",),
    observe: float = OBSERVE,
    from_start: bool = False,
    up: int | None = None,
) -> Seen:
    """Open a client, read under load, ``bend`` the cluster, read on; report what happened.

    Warnings are those logged after the load started, or since the client
    opened with ``from_start``.
    """
    caplog.set_level(logging.INFO, logger="picopyn_actors")
    names = uuid_names(lc)
    reads = Tally()
    stop = trio.Event()
    dsn = dsn_of(lc, *seeds)
    config = pa.ClusterConfig.create(dsn, **FAST)
    async with open_backend(config.dsn, config.connect_timeout, {}) as real:
        backend = CountingBackend(real)
        async with (
            pa.open_cluster(dsn, backend=backend, **FAST) as cluster,
            cluster.events() as events,
            cluster.events() as history,
        ):
            want = len(lc.nodes) if up is None else up
            await wait_for(
                events, lambda: sum(n.state is pa.NodeState.UP for n in cluster.nodes()) >= want
            )

            async def read(_: int) -> Any:
                return await cluster.fetchval(UUID, idempotent=True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_load(reads, read, tasks=20, stop=stop, names=names))
                await trio.sleep(0.5)
                if not from_start:
                    caplog.clear()
                await bend(cluster, backend)
                await trio.sleep(observe)
                stop.set()
            received: list[pa.NodeEvent] = []
            while True:
                try:
                    event = history.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if isinstance(event, pa.NodeEvent):
                    received.append(event)
            nodes = cluster.nodes()
            rejected = getattr(cluster._supervisor, "views_rejected", None)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == SUPERVISOR and r.levelno >= logging.WARNING
    ]
    return Seen(reads, received, warnings, rejected, backend.connects, nodes)


def all_up(cluster: pa.Cluster, count: int) -> bool:
    nodes = cluster.nodes()
    return len(nodes) == count and all(n.state is pa.NodeState.UP for n in nodes)


def check(seen: Seen, case: str, healthy: set[str]) -> None:
    """The expectations every case shares."""
    print(seen.summary(case))  # for the before/after table in the notes
    assert seen.reads.failed == Counter(), seen.reads.errors[:3]
    assert seen.reads.ended == seen.reads.sent
    assert seen.left(healthy) == []
    up = {n.name for n in seen.nodes if n.state is pa.NodeState.UP}
    assert healthy <= up, seen.nodes
    addresses = [n.address for n in seen.nodes if n.state is not pa.NodeState.RETIRED]
    assert len(addresses) == len(set(addresses)), "one server served twice"


def one_warning(seen: Seen, *words: str) -> str:
    """The one discovery WARNING of the case; it holds every word of ``words``."""
    assert len(seen.warnings) == 1, seen.warnings
    (warning,) = seen.warnings
    for word in words:
        assert word in warning, warning
    return warning


async def edit(lc: LocalCluster, name: str, sql: str) -> None:
    """Bend node ``name``'s catalog for good: hold it, then run ``sql`` there."""
    await blocking(lc.hold_catalog, name)
    await blocking(lc.execute_on, name, sql)


# ---------------------------------------------------------------- views that are not sane


async def test_empty_catalog_on_the_seed(local_cluster: LocalCluster, caplog: Any) -> None:
    lc = local_cluster

    async def bend(cluster: pa.Cluster, backend: CountingBackend) -> None:
        await edit(lc, "i1", "DELETE FROM public._pico_instance")

    seen = await under_load(lc, caplog, bend)
    check(seen, "empty catalog on the seed", {"i1", "i2", "i3"})
    one_warning(seen, "i1", "lists no node")
    assert seen.views_rejected == 1
    assert any("lists no node" in r for r in seen.notes("i1"))


async def test_empty_catalog_on_another_node_then_the_seed_dies(
    local_cluster: LocalCluster, caplog: Any
) -> None:
    lc = local_cluster

    async def bend(cluster: pa.Cluster, backend: CountingBackend) -> None:
        await edit(lc, "i1", "DELETE FROM public._pico_instance")
        await trio.sleep(1.0)
        # The seed dies: discovery must fall back, and meets i1's empty catalog.
        await blocking(lc.kill, "i2")

    seen = await under_load(lc, caplog, bend, seeds=("i2",))
    check(seen, "empty catalog on another node, then the seed dies", {"i1", "i3"})
    one_warning(seen, "i1", "lists no node")
    assert seen.views_rejected == 1
    assert seen.left({"i2"}) == []  # down, not retired: the catalog still says Online


@pytest.mark.parametrize(
    ("stale", "judge"),
    [
        # i1 leads raft in the stand-in: its word about itself does not count, i2 is asked.
        ("i1", "i2 (127.0.0.1:{i2}) disagrees; keeping the last good view"),
        # i2 names i1 (by raft id: its copy lacks i1's row) and the leader's catalog wins.
        ("i2", "the raft leader i1 disagrees; following the leader's catalog"),
    ],
)
async def test_stale_catalog_listing_only_itself(
    local_cluster: LocalCluster, caplog: Any, stale: str, judge: str
) -> None:
    lc = local_cluster

    async def bend(cluster: pa.Cluster, backend: CountingBackend) -> None:
        await edit(lc, stale, f"DELETE FROM public._pico_instance WHERE name <> '{stale}'")

    # Discovery rides the first seed: the stale node.
    seen = await under_load(lc, caplog, bend, seeds=(stale,))
    check(seen, f"stale catalog (only its own row) on {stale}", {"i1", "i2", "i3"})
    others = ", ".join(n for n in ("i1", "i2", "i3") if n != stale)
    judge = judge.format(i2=lc.node("i2").port)
    one_warning(seen, stale, f"would stop {others} (2 of 3 serving nodes, a majority)", judge)
    assert seen.views_rejected == 1
    assert any(judge in r for r in seen.notes(stale))


# ---------------------------------------------------------------- rows that cannot be used


async def test_row_that_cannot_be_decoded(local_cluster: LocalCluster, caplog: Any) -> None:
    lc = local_cluster

    async def bend(cluster: pa.Cluster, backend: CountingBackend) -> None:
        sql = "UPDATE public._pico_instance SET current_state = '[\"Online\"]' WHERE name = 'i2'"
        await edit(lc, "i1", sql)

    seen = await under_load(lc, caplog, bend)
    check(seen, "a row that cannot be decoded", {"i1", "i2", "i3"})
    one_warning(seen, "node i2", "catalog row unreadable", "keeping its last good entry")
    assert any("catalog row unreadable" in r for r in seen.notes("i2"))


async def test_missing_pgproto_row(local_cluster: LocalCluster, caplog: Any) -> None:
    lc = local_cluster
    raft_id = lc.node("i2").raft_id

    async def bend(cluster: pa.Cluster, backend: CountingBackend) -> None:
        sql = (
            f"DELETE FROM public._pico_peer_address WHERE raft_id = {raft_id} "
            "AND connection_type = 'pgproto'"
        )
        await edit(lc, "i1", sql)

    seen = await under_load(lc, caplog, bend)
    check(seen, "a missing pgproto row", {"i1", "i2", "i3"})
    one_warning(seen, "node i2", "no pgproto address", "keeping its last good entry")
    assert any("no pgproto address" in r for r in seen.notes("i2"))


# ---------------------------------------------------------------- addresses and identities


async def test_address_pointing_at_another_nodes_server(
    local_cluster: LocalCluster, caplog: Any
) -> None:
    lc = local_cluster
    raft_id, other = lc.node("i2").raft_id, address_of(lc, "i3")

    async def bend(cluster: pa.Cluster, backend: CountingBackend) -> None:
        sql = (
            f"UPDATE public._pico_peer_address SET address = '{other}' "
            f"WHERE raft_id = {raft_id} AND connection_type = 'pgproto'"
        )
        await edit(lc, "i1", sql)

    seen = await under_load(lc, caplog, bend)
    check(seen, "an address pointing at another node's server", {"i1", "i2", "i3"})
    one_warning(seen, "node i2", f"{other}, the address of i3", "last good address")
    statuses = {n.name: n.address for n in seen.nodes}
    assert statuses["i2"] == str(address_of(lc, "i2"))
    assert any("the address of i3" in r for r in seen.notes("i2"))
    assert any("the address of i3" in r for r in seen.notes("i3"))


async def test_two_rows_with_one_address(local_cluster: LocalCluster, caplog: Any) -> None:
    lc = local_cluster
    other = address_of(lc, "i3")
    rs_uuid = {r["name"]: r["uuid"] for r in lc.catalog_rows()["_pico_replicaset"]}["r1"]
    stranger = str(uuidlib.uuid4())

    async def bend(cluster: pa.Cluster, backend: CountingBackend) -> None:
        sql = (
            "INSERT INTO public._pico_instance (name, uuid, raft_id, replicaset_name, "
            "replicaset_uuid, current_state, target_state, failure_domain, tier, "
            "picodata_version, sync_incarnation) VALUES ('i9', "
            f"'{stranger}', 99, 'r1', '{rs_uuid}', '[\"Online\",1]', '[\"Online\",1]', "
            "'{}', 'default', '25.5.3', 0);\n"
            f"INSERT INTO public._pico_peer_address VALUES (99, '{other}', 'pgproto');"
        )
        await edit(lc, "i1", sql)

    seen = await under_load(lc, caplog, bend)
    check(seen, "two rows with one address", {"i1", "i2", "i3"})
    one_warning(seen, "node i9", f"{other}, the address of i3", "not serving it")
    assert "i9" not in {n.name for n in seen.nodes}
    assert any("node i9" in r for r in seen.notes("i3"))


async def test_server_answering_with_a_stranger_uuid(
    local_cluster: LocalCluster, caplog: Any
) -> None:
    lc = local_cluster
    await blocking(lc.set_identity, "i2", str(uuidlib.uuid4()))

    async def bend(cluster: pa.Cluster, backend: CountingBackend) -> None:
        pass  # the stranger answered the first discovery already

    # The first discovery asks i2 (the first seed): count warnings from the start.
    # The node actor of i2 checks the server's identity too: i2 is never served.
    seen = await under_load(lc, caplog, bend, seeds=("i2", "i1"), from_start=True, up=2)
    check(seen, "a server answering with a stranger uuid", {"i1", "i3"})
    assert "i2" not in seen.reads.ok
    one_warning(seen, str(address_of(lc, "i2")), "does not list the node that answered")
    assert seen.views_rejected == 1


async def test_node_whose_server_answers_a_stranger_uuid_is_not_routable(
    local_cluster: LocalCluster,
) -> None:
    lc = local_cluster
    await blocking(lc.set_identity, "i2", str(uuidlib.uuid4()))
    async with pa.open_cluster(lc.dsn, **FAST) as cluster, cluster.events() as events:
        await wait_for(events, lambda: {n.name for n in cluster.nodes()} == {"i1", "i2", "i3"})
        with trio.move_on_after(3.0):
            await wait_for(events, lambda: all_up(cluster, 3))
        (i2,) = [n for n in cluster.nodes() if n.name == "i2"]
    assert i2.state is not pa.NodeState.UP
    assert i2.last_error is not None and "uuid" in i2.last_error


# ---------------------------------------------------------------- a catalog that hangs


async def _waiting_on_lock(dsn: str) -> int:
    """Sessions of the login role waiting on a lock, seen from a fresh connection."""

    def count() -> int:
        import asyncio

        async def main() -> int:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                value: int = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND usename = current_user AND pid <> pg_backend_pid()"
                )
                return value
            finally:
                await conn.close()

        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            return runner.run(main())

    return await trio.to_thread.run_sync(count)


async def test_lock_on_pico_instance_of_one_node(local_cluster: LocalCluster, caplog: Any) -> None:
    lc = local_cluster
    locked = address_of(lc, "i1")
    figures: dict[str, Any] = {}

    async def bend(cluster: pa.Cluster, backend: CountingBackend) -> None:
        lock = await blocking(lc.lock_catalog, "i1")
        try:
            before = backend.connects[locked]
            # A catalog change while i1's catalog is locked: a node joins.
            node = await blocking(lc.add_node)
            async with cluster.events() as events:
                await wait_for(
                    events,
                    lambda: any(
                        n.name == node.name and n.state is pa.NodeState.UP for n in cluster.nodes()
                    ),
                )
            figures["held_when_seen"] = lock.held
            figures["connects_while_locked"] = backend.connects[locked] - before
            figures["waiting"] = await _waiting_on_lock(lc.dsn_for("i1"))
            figures["discovery_at"] = getattr(cluster._supervisor, "discovery_address", None)
        finally:
            await blocking(lock.release)

    seen = await under_load(lc, caplog, bend, observe=1.0)
    print("lock figures:", figures)
    check(seen, "a lock on _pico_instance of one node", {"i1", "i2", "i3"})
    one_warning(seen, f"no answer from {locked}")
    assert figures["held_when_seen"]  # the joining node was found behind the lock
    assert figures["connects_while_locked"] == 0  # the locked node was not asked again
    assert figures["waiting"] <= 1  # at most the one connection cut off at the deadline
    assert figures["discovery_at"] != locked
    assert any("no answer to discovery" in r for r in seen.notes("i1"))


# ---------------------------------------------------------------- logins (issue 10, item 5)


async def test_an_idle_cluster_makes_no_logins(shared_cluster: LocalCluster) -> None:
    lc = shared_cluster
    config = pa.ClusterConfig.create(lc.dsn, **FAST)
    async with open_backend(config.dsn, config.connect_timeout, {}) as real:
        backend = CountingBackend(real)
        async with (
            pa.open_cluster(lc.dsn, backend=backend, **FAST) as cluster,
            cluster.events() as events,
        ):
            await wait_for(events, lambda: all_up(cluster, 3))
            before = sum(backend.connects.values())
            runs = cluster.statistics().discovery_runs
            await trio.sleep(5.0)  # about 16 discovery runs
            logins = sum(backend.connects.values()) - before
            runs = cluster.statistics().discovery_runs - runs
    print(f"idle: {logins} logins in 5 s, {runs} discovery runs")
    assert runs >= 2
    assert logins == 0


async def test_discovery_leaves_a_hung_node_and_goes_on(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    config = pa.ClusterConfig.create(lc.dsn, **FAST)
    async with open_backend(config.dsn, config.connect_timeout, {}) as real:
        backend = CountingBackend(real)
        async with (
            pa.open_cluster(lc.dsn, backend=backend, **FAST) as cluster,
            cluster.events() as events,
        ):
            await wait_for(events, lambda: all_up(cluster, 3))
            supervisor = cluster._supervisor
            assert supervisor.discovery_address == address_of(lc, "i1")
            await blocking(lc.pause, "i1")
            try:
                node = await blocking(lc.add_node)
                await wait_for(
                    events,
                    lambda: any(
                        n.name == node.name and n.state is pa.NodeState.UP for n in cluster.nodes()
                    ),
                )
                rides = supervisor.discovery_address
            finally:
                await blocking(lc.resume, "i1")
    assert rides not in (None, address_of(lc, "i1"))
