"""Actor tests on the fake backend in virtual time: opening, discovery and the
catalog (drain, expel, join, seed failures, tiers and roles), and trusting no
single node's word (bent catalogs, confirmation, the discovery connection and
its deadline, bounded bookkeeping).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import trio
import trio.testing
from fakes import (
    PASSWORD,
    FakeCluster,
    FakeNode,
    Outcomes,
    bound_every_test,
    drain_events,
    state_of,
    state_text,
    wait_all_states,
    wait_gone,
    wait_state,
)

from picopyn_actors import (
    Address,
    ConfigError,
    NodeEvent,
    NodeState,
    NoNodesAvailable,
    open_cluster,
)
from picopyn_actors._bridge import BackendQueryError
from picopyn_actors._discovery import _AVOID_MIN, QUIET_PERIOD, WarnOnce
from picopyn_actors._topology import DISCOVERY_QUERY, LEADER_QUERIES

UP = NodeState.UP
DOWN = NodeState.DOWN
EPS = 1e-6


# -- opening ------------------------------------------------------------------------------


async def test_open_returns_once_a_node_is_up(autojump_clock: object) -> None:
    fake = FakeCluster(3, connect_time=0.2)
    async with fake.open() as cluster:
        opened_at = trio.current_time()
        assert any(s.state is UP for s in cluster.nodes())
        assert cluster.statistics().discovery_runs == 1
    # Discovery connect, then the probe connect, then a query connection's connect.
    assert opened_at == pytest.approx(0.6)


async def test_open_fails_with_no_nodes_available_when_every_seed_is_down(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    for node in fake.nodes.values():
        node.down()
    with trio.fail_after(60):
        start = trio.current_time()
        with pytest.raises(NoNodesAvailable) as info:
            async with open_cluster(fake.dsn("i1", "i2"), backend=fake):
                pytest.fail("opened")  # pragma: no cover
    assert trio.current_time() - start < 0.01  # refused at once: no waiting
    error = info.value
    assert set(error.node_errors) == {"10.0.0.1:4327", "10.0.0.2:4327"}
    assert all("refused" in e for e in error.node_errors.values())
    assert "discovery failed on every seed host" in str(error)
    assert PASSWORD not in str(error)


async def test_open_fails_with_no_nodes_available_when_no_node_comes_up(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(0)
    fake.add_node(tier="router")  # i1: answers discovery, but is not selected
    fake.add_node(tier="storage").down()  # i2
    fake.add_node(tier="storage").down()  # i3
    with trio.fail_after(60):
        start = trio.current_time()
        with pytest.raises(NoNodesAvailable) as info:
            async with open_cluster(
                fake.dsn(), backend=fake, tiers=["storage"], connect_timeout=3.0
            ):
                pytest.fail("opened")  # pragma: no cover
    assert trio.current_time() - start == pytest.approx(3.0)
    error = info.value
    assert set(error.node_errors) == {"i2", "i3"}
    assert all("refused" in e for e in error.node_errors.values())
    assert "connect_timeout=3.0" in str(error)
    assert fake["i1"].queries == 0
    assert fake.open_connections() == {"i1": 0, "i2": 0, "i3": 0}


async def test_unknown_tier_is_a_config_error(autojump_clock: object) -> None:
    fake = FakeCluster(0)
    fake.add_node(tier="router")
    fake.add_node(tier="storage")
    with trio.fail_after(60), pytest.raises(ConfigError) as info:
        async with open_cluster(fake.dsn(), backend=fake, tiers=["storage", "nope"]):
            pytest.fail("opened")  # pragma: no cover
    assert "nope" in str(info.value)
    assert "router, storage" in str(info.value)
    assert fake.open_connections() == {"i1": 0, "i2": 0}


async def test_discovery_falls_back_from_a_dead_seed_to_the_next(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    fake["i1"].down()
    async with fake.open("i1", "i2") as cluster:
        await wait_all_states(cluster, ["i2", "i3"], UP)
        assert state_of(cluster, "i1") in {DOWN, NodeState.CONNECTING}
        names = {await cluster.fetchval("whoami") for _ in range(6)}
    assert names == {"i2", "i3"}
    assert fake["i2"].discovery_queries >= 1


async def test_open_survives_a_hung_first_seed(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    fake["i1"].hang()
    async with fake.open("i1", "i2", connect_timeout=2.0) as cluster:
        assert state_of(cluster, "i2") is UP


async def test_open_with_a_hung_seed_names_it_in_the_error(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    fake["i1"].hang()
    with trio.fail_after(60), pytest.raises(NoNodesAvailable) as info:
        async with open_cluster(fake.dsn(), backend=fake, connect_timeout=2.0):
            pytest.fail("opened")  # pragma: no cover
    assert trio.current_time() == pytest.approx(2.0)
    assert "connect_timeout=2.0" in str(info.value)


async def test_open_with_a_hung_seed_error_names_the_seed(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    fake["i1"].hang()
    with trio.fail_after(60), pytest.raises(NoNodesAvailable) as info:
        async with open_cluster(fake.dsn(), backend=fake, connect_timeout=2.0):
            pytest.fail("opened")  # pragma: no cover
    assert "10.0.0.1:4327" in str(info.value).split("became usable")[1]


@pytest.mark.parametrize("encoding", ["list", "dict"])
async def test_discovery_reads_both_state_encodings(autojump_clock: object, encoding: str) -> None:
    fake = FakeCluster(2, state_encoding=encoding)
    async with fake.open() as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        assert [s.catalog_state for s in cluster.nodes()] == ["Online(1)", "Online(1)"]


async def test_discovery_falls_back_to_instance_uuid(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    fake.has_pico_instance_uuid = False

    def calls(query: str) -> int:
        return sum(n.discovery_executed[query] for n in fake.nodes.values())

    # No probe in the window: each probe asks the uuid again (its own test).
    async with fake.open(discovery_interval=1.0, health_interval=1000.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake.add_node()
        await wait_state(cluster, "i3", UP)
        # The discovery connection breaks: the next one is asked instance_uuid() first.
        fake["i1"].drop_connections()
        await trio.sleep(2.5)
        stats = cluster.statistics()
        connects = cluster._supervisor.discovery_connects
    assert stats.discovery_runs >= 4
    assert stats.discovery_failures == 0
    assert connects == 2
    # pico_instance_uuid() failed once; then instance_uuid() is asked first:
    # once per discovery connection (not once per run), and by each node
    # session's identity check.
    assert calls("SELECT pico_instance_uuid()") == 1
    assert calls("SELECT instance_uuid()") == connects + len(fake.nodes)


# -- the catalog changes ------------------------------------------------------------------


async def test_target_offline_drains_without_failing_in_flight_requests(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(3)
    fake["i2"].service_time = 3.0
    out = Outcomes()
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.events() as events:
            async with trio.open_nursery() as nursery:
                for k in range(6):  # not idempotent: nothing may be cut off
                    nursery.start_soon(out.call, k, cluster.execute, "INSERT INTO t VALUES (1)")
                await trio.testing.wait_all_tasks_blocked()
                assert fake["i2"].in_flight == 2
                await trio.sleep(0.5)
                fake["i2"].set_state(target="Offline")
                draining_at = await wait_state(cluster, "i2", NodeState.DRAINING)
                assert draining_at <= 1.0 + EPS  # the next discovery
                assert fake["i2"].in_flight == 2  # still running
                names = Counter([await cluster.fetchval("whoami") for _ in range(6)])
            await wait_gone(cluster, "i2")
            gone_at = trio.current_time()
            received = [e for e in drain_events(events) if isinstance(e, NodeEvent)]
        stats = cluster.statistics()
    out.assert_each_ended_once(6)
    assert out.errors == []
    assert out.results == ["INSERT 0 1"] * 6
    assert fake["i2"].executed["INSERT INTO t VALUES (1)"] == 2  # finished on i2
    assert names == {"i1": 3, "i3": 3}
    assert gone_at == pytest.approx(3.0, abs=0.01)
    assert fake["i2"].open_connections == 0
    drain = [e for e in received if e.node == "i2" and e.new is NodeState.DRAINING]
    assert "Offline" in drain[0].reason
    assert [e.new for e in received if e.node == "i2"][-1] is NodeState.RETIRED
    assert stats.requests_ok == 12 and stats.requests_failed == 0
    assert stats.requests_retried == 0


async def test_drain_timeout_bounds_a_slow_drain(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    async with fake.open(discovery_interval=1.0, drain_timeout=2.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        results: list[object] = []

        async def read() -> None:
            results.append(await cluster.fetchval("sleep:100", idempotent=True))

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            fake["i2"].set_state(target="Offline")
            draining_at = await wait_state(cluster, "i2", NodeState.DRAINING)
            await wait_gone(cluster, "i2")
            assert trio.current_time() == pytest.approx(draining_at + 2.0)
    # The read cut off on i2 ran again on i1.
    assert results == ["i1", "i1"]


async def test_expelled_node_is_retired_and_its_connections_closed(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.events() as events:
            fake["i3"].set_state("Expelled", "Expelled")
            await wait_gone(cluster, "i3")
            received = [e for e in drain_events(events) if isinstance(e, NodeEvent)]
        names = Counter([await cluster.fetchval("whoami") for _ in range(6)])
        retired_stats = cluster.statistics()
    assert fake["i3"].open_connections == 0
    assert names == {"i1": 3, "i2": 3}
    assert "expelled" in received[0].reason and received[0].node == "i3"
    assert [e.new for e in received if e.node == "i3"][-1] is NodeState.RETIRED
    assert "i3" not in retired_stats.nodes


async def test_statistics_never_go_backwards_while_a_node_retires(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        for _ in range(10):
            await cluster.fetchval("whoami")
        assert cluster.statistics().requests_ok == 10
        seen: list[int] = []
        async with cluster.events() as events:
            fake["i2"].set_state(target="Offline")
            async for event in events:
                seen.append(cluster.statistics().requests_ok)
                if isinstance(event, NodeEvent) and event.new is NodeState.RETIRED:
                    break
        await wait_gone(cluster, "i2")
        seen.append(cluster.statistics().requests_ok)
    assert seen == [10] * len(seen)


async def test_node_that_left_the_catalog_is_retired(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake["i2"].in_catalog = False
        await wait_gone(cluster, "i2")
        names = {await cluster.fetchval("whoami") for _ in range(6)}
    assert names == {"i1", "i3"}
    assert fake["i2"].open_connections == 0


async def test_node_added_to_the_catalog_gets_traffic_after_discovery(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    async with fake.open(discovery_interval=2.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        await trio.sleep(0.5)
        added_at = trio.current_time()
        fake.add_node()
        up_at = await wait_state(cluster, "i3", UP)
        names = Counter([await cluster.fetchval("whoami") for _ in range(30)])
    assert up_at - added_at <= 2.0 + EPS
    assert names == {"i1": 10, "i2": 10, "i3": 10}


async def test_node_back_online_after_offline_gets_a_new_actor(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake["i2"].set_state("Offline", "Offline")
        fake["i2"].down()
        await wait_gone(cluster, "i2")
        fake["i2"].up()
        fake["i2"].set_state("Online", "Online", incarnation=2)
        await wait_state(cluster, "i2", UP)
        names = {await cluster.fetchval("whoami") for _ in range(4)}
    assert names == {"i1", "i2"}


async def test_seed_node_dying_does_not_stop_discovery(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open("i1", discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake["i1"].down()
        await wait_state(cluster, "i1", DOWN)
        runs = cluster.statistics().discovery_runs
        fake.add_node()  # i4
        await wait_state(cluster, "i4", UP)
        names = {await cluster.fetchval("whoami") for _ in range(6)}
        stats = cluster.statistics()
    assert names == {"i2", "i3", "i4"}
    assert stats.discovery_runs > runs
    assert stats.discovery_failures == 0
    assert fake["i2"].discovery_queries + fake["i3"].discovery_queries >= 1


async def test_discovery_failing_everywhere_backs_off_and_resumes(
    autojump_clock: object,
) -> None:
    interval, backoff_max = 1.0, 8.0
    fake = FakeCluster(2)
    async with fake.open(discovery_interval=interval, backoff_max=backoff_max) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        for node in fake.nodes.values():
            node.down()
        await trio.sleep(20)
        failures = cluster.statistics().discovery_failures
        # Not every second (about 20), but backing off up to backoff_max (at least 3).
        assert 3 <= failures <= 8, failures
        for node in fake.nodes.values():
            node.up()
        fake.add_node()
        back_at = trio.current_time()
        up_at = await wait_state(cluster, "i3", UP)
        assert up_at - back_at <= backoff_max + EPS
        assert cluster.statistics().discovery_failures == failures
        # Healthy again: back to the normal beat.
        runs = cluster.statistics().discovery_runs
        await trio.sleep(5 * interval + EPS)
        assert cluster.statistics().discovery_runs - runs == 5


async def test_node_with_a_new_address_is_replaced(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake.move("i2", 9)
        await trio.sleep(1.5)
        await wait_state(cluster, "i2", UP)
        (status,) = [s for s in cluster.nodes() if s.name == "i2"]
        names = {await cluster.fetchval("whoami") for _ in range(4)}
    assert status.address == "10.0.0.9:4327"
    assert fake["i2"].address == Address("10.0.0.9", 4327)
    assert names == {"i1", "i2"}


@pytest.mark.parametrize(
    ("role", "expected"), [("leader", {"i1", "i3"}), ("replica", {"i2", "i4"})]
)
async def test_role_selects_masters_or_replicas(
    autojump_clock: object, role: str, expected: set[str]
) -> None:
    fake = FakeCluster(0)
    fake.add_node(replicaset="r1", master=True)  # i1
    fake.add_node(replicaset="r1", master=False)  # i2
    fake.add_node(replicaset="r2", master=True)  # i3
    fake.add_node(replicaset="r2", master=False)  # i4
    async with fake.open(role=role) as cluster:
        await wait_all_states(cluster, expected, UP)
        assert {s.name for s in cluster.nodes()} == expected
        names = {await cluster.fetchval("whoami") for _ in range(8)}
        # A switchover in r1: the old master leaves the selection.
        fake.masters["r1"] = "i2"
        await trio.sleep(1.5)
        after = {s.name for s in cluster.nodes() if s.state is UP}
    assert names == expected
    flipped = {"leader": {"i2", "i3"}, "replica": {"i1", "i4"}}[role]
    assert after == flipped


async def test_tiers_select_nodes(autojump_clock: object) -> None:
    fake = FakeCluster(0)
    fake.add_node(tier="router")
    fake.add_node(tier="storage")
    fake.add_node(tier="storage")
    async with fake.open(tiers="storage") as cluster:
        await wait_all_states(cluster, ["i2", "i3"], UP)
        names = {await cluster.fetchval("whoami") for _ in range(6)}
        assert {s.name for s in cluster.nodes()} == {"i2", "i3"}
    assert names == {"i2", "i3"}
    assert fake["i1"].queries == 0


async def test_node_with_a_new_uuid_is_replaced(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.events() as events:
            fake["i2"].uuid = "00000000-0000-4000-8000-0000000000ff"  # a new server
            await trio.sleep(1.5)
            await wait_state(cluster, "i2", UP)
            received = [e for e in drain_events(events) if isinstance(e, NodeEvent)]
        (status,) = [s for s in cluster.nodes() if s.name == "i2"]
    assert status.uuid == fake["i2"].uuid
    states = [e.new for e in received if e.node == "i2"]
    assert NodeState.RETIRED in states
    assert states[-1] is UP


async def test_cancelled_while_opening_leaks_nothing(autojump_clock: object) -> None:
    fake = FakeCluster(3, connect_time=1.0)
    with trio.move_on_after(1.5) as scope:
        async with open_cluster(fake.dsn(), backend=fake):
            pytest.fail("opened")  # pragma: no cover
    assert scope.cancelled_caught
    await trio.testing.wait_all_tasks_blocked()
    assert fake.open_connections() == {"i1": 0, "i2": 0, "i3": 0}


async def test_events_subscription_after_close_ends_at_once(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open() as cluster:
        pass
    ended = False
    with trio.move_on_after(10):
        async with cluster.events() as events:
            async for _event in events:
                pass  # pragma: no cover
            ended = True
    assert ended


async def test_slow_but_healthy_catalog_is_still_discovered(autojump_clock: object) -> None:
    fake = FakeCluster(6)
    for node in fake.nodes.values():
        node.probe_time = 0.6  # uuid + catalog queries: 1.2 s; probes stay well in time
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake.add_node().probe_time = 0.6
        with trio.move_on_after(30):
            await wait_state(cluster, "i7", UP)
        stats = cluster.statistics()
        new_state = state_of(cluster, "i7")
    assert stats.discovery_failures == 0
    assert new_state is UP


# -- trusting the catalog ----------------------------------------------------------------------

SUPERVISOR = "picopyn_actors._supervisor"


def bend(
    node: FakeNode,
    *,
    rows: Callable[[], list[dict[str, Any]]] | None = None,
    leader: Callable[[], str | None] | None = None,
    refuse: str | None = None,
) -> None:
    """Give one fake node a catalog of its own: ``rows`` for the discovery query,
    ``leader`` for ``pico_raft_leader_uuid()``, or ``refuse`` the discovery query."""
    real = node.answer

    def shaped(method: str, result: list[dict[str, Any]]) -> Any:
        if method == "fetch":
            return result
        return next(iter(result[0].values())) if result else None

    def answer(method: str, query: str, args: Sequence[Any]) -> Any:
        if query == DISCOVERY_QUERY:
            if refuse is not None:
                raise BackendQueryError(refuse, "XX000")
            if rows is not None:
                return shaped(method, rows())
        if query == LEADER_QUERIES[0] and leader is not None:
            return shaped(method, [{"uuid": leader()}])
        return real(method, query, args)

    node.answer = answer  # type: ignore[method-assign]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == SUPERVISOR and r.levelno >= logging.WARNING
    ]


def notes(received: list[Any], name: str) -> list[str]:
    """Reasons of the events about ``name`` whose state did not change."""
    return [
        e.reason
        for e in received
        if isinstance(e, NodeEvent) and e.node == name and e.old is e.new
    ]


async def test_empty_catalog_on_the_discovery_node_is_rejected_once(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        supervisor = cluster._supervisor
        assert supervisor.discovery_address == fake["i1"].address
        caplog.clear()
        async with cluster.events() as events:
            bend(fake["i1"], rows=list)
            await trio.sleep(30)
            received = drain_events(events)
        states = {s.name: s.state for s in cluster.nodes()}
        rejected = supervisor.views_rejected
        moved_to = supervisor.discovery_address
        runs = cluster.statistics().discovery_runs
    assert states == {"i1": UP, "i2": UP, "i3": UP}
    assert rejected == 1  # once: discovery rides another node from then on
    assert moved_to == fake["i2"].address
    assert runs >= 30
    (warning,) = warnings(caplog)
    assert "i1 (10.0.0.1:4327): its catalog is rejected: it lists no node while 3 serve" in warning
    assert "keeping the last good view" in warning
    assert [e for e in received if isinstance(e, NodeEvent) and e.old is not e.new] == []
    assert len(notes(received, "i1")) == 1 and "lists no node" in notes(received, "i1")[0]


async def test_stale_catalog_is_checked_against_the_raft_leader(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        caplog.clear()
        # i1 lags: it lists only itself, and says i3 leads.
        bend(fake["i1"], rows=lambda: [fake["i1"].catalog_row()], leader=lambda: fake["i3"].uuid)
        await trio.sleep(5)
        supervisor = cluster._supervisor
        states = {s.name: s.state for s in cluster.nodes()}
        rides = supervisor.discovery_address
        rejected = supervisor.views_rejected
    assert states == {"i1": UP, "i2": UP, "i3": UP}
    assert rides == fake["i3"].address  # the leader's catalog is the freshest
    assert rejected == 1
    (warning,) = warnings(caplog)
    assert "i1 (10.0.0.1:4327): its catalog would stop i2, i3 (2 of 3 serving nodes" in warning
    assert "the raft leader i3 disagrees; following the leader's catalog" in warning


async def test_stale_catalog_without_a_leader_is_checked_against_another_node(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        caplog.clear()
        # i1 lists only itself and names itself the leader: its own word is not enough.
        bend(fake["i1"], rows=lambda: [fake["i1"].catalog_row()], leader=lambda: fake["i1"].uuid)
        await trio.sleep(5)
        supervisor = cluster._supervisor
        states = {s.name: s.state for s in cluster.nodes()}
        rides = supervisor.discovery_address
    assert states == {"i1": UP, "i2": UP, "i3": UP}
    assert rides == fake["i2"].address
    assert supervisor.views_rejected == 1
    (warning,) = warnings(caplog)
    assert "would stop i2, i3" in warning and "i2 (10.0.0.2:4327) disagrees" in warning


async def test_a_stop_confirmed_by_the_leader_is_carried_out(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(3)
    for node in fake.nodes.values():
        bend(node, leader=lambda: fake["i2"].uuid)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        caplog.set_level(logging.INFO, logger=SUPERVISOR)
        caplog.clear()
        async with cluster.events() as events:
            fake["i3"].set_state("Expelled", "Expelled")
            await wait_gone(cluster, "i3")
            received = [e for e in drain_events(events) if isinstance(e, NodeEvent)]
        rides = cluster._supervisor.discovery_address
        rejected = cluster._supervisor.views_rejected
    assert warnings(caplog) == []
    assert rejected == 0
    assert rides == fake["i2"].address  # confirmed by the leader, which it now rides
    assert any("the raft leader i2 confirms" in r.getMessage() for r in caplog.records)
    # Nothing ran on i3: it retires at once, without draining.
    assert [(e.new, e.reason.split(" (")[0]) for e in received if e.node == "i3"] == [
        (NodeState.RETIRED, "expelled"),
    ]


async def test_a_stop_nobody_can_confirm_waits_until_the_node_stops_serving(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(2)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        caplog.clear()
        # i1 says i2 left; i2 itself cannot be asked (its catalog query fails).
        bend(fake["i1"], rows=lambda: [fake["i1"].catalog_row()])
        bend(fake["i2"], refuse="catalog unavailable")
        await trio.sleep(5)
        assert state_of(cluster, "i2") is UP
        rejected = cluster._supervisor.views_rejected
        (warning,) = warnings(caplog)
        # Once i2 really stops serving, one node's word is enough to retire it.
        fake["i2"].down()
        await wait_gone(cluster, "i2")
    assert rejected >= 4  # counted on every run...
    assert "no other node could confirm it" in warning  # ... told once


async def test_an_expel_seen_by_one_node_first_still_retires_the_node(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    # As LocalCluster.set_state does: each node's catalog changes on its own,
    # and i1 (the raft leader, which discovery rides) sees i3's target
    # Expelled first. i3 disagrees, so i1 is asked last for a while; once
    # every catalog agrees, i3 must still retire, within that while or so.
    fake = FakeCluster(3)
    lagging = {"i2", "i3"}  # nodes whose catalog still shows i3 Online

    def catalog_of(name: str) -> Callable[[], list[dict[str, Any]]]:
        def rows() -> list[dict[str, Any]]:
            out = fake.catalog_rows()
            if name in lagging:
                online = state_text("Online", fake["i3"].incarnation)
                out = [
                    {**r, "current_state": online, "target_state": online}
                    if r["name"] == "i3"
                    else r
                    for r in out
                ]
            return out

        return rows

    for node in fake.nodes.values():
        bend(node, rows=catalog_of(node.name), leader=lambda: fake["i1"].uuid)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        supervisor = cluster._supervisor
        fake["i2"].set_state("Offline", "Offline")
        await wait_gone(cluster, "i2")
        assert supervisor.discovery_address == fake["i1"].address
        caplog.clear()
        # Phase one, on i1 only: i3's target state is Expelled.
        fake["i3"].set_state(target="Expelled")
        await trio.sleep(1.5)
        assert supervisor.discovery_address == fake["i3"].address  # i3 disagreed
        assert any("i3 (10.0.0.3:4327) disagrees" in w for w in warnings(caplog))
        # The other catalogs catch up, then the current state follows.
        lagging.clear()
        start = trio.current_time()
        await trio.sleep(0.5)
        fake["i3"].set_state(current="Expelled")
        with trio.move_on_after(60):
            await wait_gone(cluster, "i3")
        took = trio.current_time() - start
        states = {s.name: s.state for s in cluster.nodes()}
    assert states == {"i1": UP}, (took, warnings(caplog))
    assert took <= _AVOID_MIN + 2.0


async def test_a_row_that_cannot_be_decoded_keeps_the_last_good_entry(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        caplog.clear()
        def rows() -> list[dict[str, Any]]:
            bad = fake.catalog_rows()
            bad[1]["current_state"] = '["Online"]'  # i2: a state that cannot be decoded
            bad[2]["address"] = None  # i3: no pgproto row
            return bad

        async with cluster.events() as events:
            for node in fake.nodes.values():  # in every node's catalog
                bend(node, rows=rows)
            await trio.sleep(10)
            received = drain_events(events)
        states = {s.name: s.state for s in cluster.nodes()}
        rejected = cluster._supervisor.views_rejected
    assert states == {"i1": UP, "i2": UP, "i3": UP}
    assert rejected == 0
    told = warnings(caplog)
    assert len(told) == 2, told
    assert any("node i2: catalog row unreadable: not an instance state" in w for w in told)
    assert any("node i3: no pgproto address in the catalog" in w for w in told)
    assert all("keeping its last good entry" in w for w in told)
    assert len(notes(received, "i2")) == 1 and len(notes(received, "i3")) == 1


async def test_two_nodes_on_one_address_are_never_served_twice(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        caplog.clear()
        clone = fake["i3"].catalog_row() | {"name": "i9", "uuid": "uuid-i9", "raft_id": 9}
        moved = fake["i2"].catalog_row() | {"address": str(fake["i3"].address)}
        bend(
            fake["i1"],
            rows=lambda: [fake["i1"].catalog_row(), moved, fake["i3"].catalog_row(), clone],
        )
        await trio.sleep(5)
        statuses = {s.name: s.address for s in cluster.nodes()}
        states = {s.name: s.state for s in cluster.nodes()}
    assert statuses == {n: str(fake[n].address) for n in ("i1", "i2", "i3")}
    assert set(states.values()) == {UP}
    told = warnings(caplog)
    assert len(told) == 2, told
    assert any("node i2: the catalog gives it 10.0.0.3:4327, the address of i3" in w for w in told)
    assert any("node i9: the catalog gives it 10.0.0.3:4327, the address of i3" in w for w in told)


async def test_honest_reasons_for_an_address_or_uuid_change(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.events() as events:
            fake.move("i2", 9)
            fake["i3"].uuid = "00000000-0000-4000-8000-0000000000ff"
            await trio.sleep(3)
            received = [e for e in drain_events(events) if isinstance(e, NodeEvent)]
    retired = {e.node: e.reason for e in received if e.new is NodeState.RETIRED}
    assert retired["i2"] == "address changed from 10.0.0.2:4327 to 10.0.0.9:4327"
    assert retired["i3"] == (
        "uuid changed from 00000000-0000-4000-8000-000000000003 to "
        "00000000-0000-4000-8000-0000000000ff"
    )
    assert not any("expelled" in e.reason for e in received)


async def test_an_idle_cluster_makes_no_discovery_logins(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=0.5) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        before = fake.total_connects()
        runs = cluster.statistics().discovery_runs
        await trio.sleep(30)
        after = fake.total_connects()
        runs = cluster.statistics().discovery_runs - runs
        connects = cluster._supervisor.discovery_connects
    assert runs >= 59
    assert after == before
    assert connects == 1  # the first discovery's connection, kept ever since


async def test_discovery_survives_the_death_of_the_node_it_rides(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake["i1"].down()
        fake.add_node()
        await wait_state(cluster, "i4", UP)
        supervisor = cluster._supervisor
        rides = supervisor.discovery_address
        await trio.sleep(10)
        connects = supervisor.discovery_connects
    assert rides == fake["i2"].address
    assert connects == 3  # the first, one refused by the dead node, one elsewhere; then none
    assert cluster.statistics().discovery_failures == 0


async def test_a_hung_discovery_node_is_abandoned_at_the_deadline(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1.0, connect_timeout=5.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        caplog.clear()
        fake["i1"].hang()
        hung_at = trio.current_time()
        fake.add_node()
        seen_at = await wait_state(cluster, "i4", UP)
        supervisor = cluster._supervisor
        rides = supervisor.discovery_address
        await trio.sleep(20)
        fake["i1"].resume()
        await trio.sleep(20)
        still = supervisor.discovery_address
    # The next run gives up on i1 after the deadline (1 s), not connect_timeout (5 s).
    assert seen_at - hung_at <= 2.0 + EPS
    assert rides == still == fake["i2"].address  # and never goes back to it meanwhile
    told = [w for w in warnings(caplog) if "10.0.0.1" in w]
    assert len(told) == 1 and "no answer from 10.0.0.1:4327 within 1.00s" in told[0]


async def test_retired_statistics_stay_bounded_and_keep_every_count(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(1)
    async with fake.open(discovery_interval=1.0) as cluster:
        await wait_state(cluster, "i1", UP)
        for _ in range(20):
            node = fake.add_node()
            await wait_state(cluster, node.name, UP)
            while fake.executed("whoami")[node.name] == 0:
                await cluster.fetchval("whoami")
            node.set_state("Expelled", "Expelled")
            await wait_gone(cluster, node.name)
        stats = cluster.statistics()
        retired = cluster._supervisor.retired_statistics()
    answered = fake.executed("whoami")
    assert len(retired) == 1
    assert stats.requests_ok == sum(answered.values())
    assert retired[0].requests_ok == sum(q for n, q in answered.items() if n != "i1") >= 20


def test_warn_once_tells_again_only_after_a_quiet_period() -> None:
    warn = WarnOnce(QUIET_PERIOD)
    told = [t for t in range(0, 300) if warn("key", float(t))]
    assert told == [0]  # seen every second: told once
    assert warn("key", 300 + QUIET_PERIOD)  # quiet for a whole period: told again
    assert warn("other", 0.0)
    for k in range(200):
        warn(k, 1000.0 + k)
    assert len(warn._seen) <= 64 + 1 + int(QUIET_PERIOD)


# Every test above runs on a mock clock: bound each one in virtual time.
bound_every_test(globals())
