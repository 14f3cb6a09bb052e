"""Actor tests on the fake backend in virtual time: routing, retries, errors,
cancellation, timeouts, the strategy and closing.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence

import pytest
import trio
import trio.testing
from fakes import (
    FakeCluster,
    Outcomes,
    bound_every_test,
    wait_all_states,
    wait_state,
)

from picopyn_actors import (
    AcquireTimeout,
    Address,
    Candidate,
    ClusterClosed,
    NodeState,
    NoNodesAvailable,
    OutcomeUnknown,
    QueryError,
    StrategyError,
)

UP = NodeState.UP
DOWN = NodeState.DOWN
PicodataErrors = (AcquireTimeout, OutcomeUnknown, NoNodesAvailable, ClusterClosed)


async def test_basic_methods_return_what_the_node_answers(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open() as cluster:
        assert await cluster.fetch("whoami") == [{"name": "i1"}]
        assert await cluster.fetchrow("whoami") == {"name": "i1"}
        assert await cluster.fetchval("whoami") == "i1"
        assert await cluster.execute("INSERT INTO t VALUES ($1)", 1) == "INSERT 0 1"
        assert await cluster.executemany("INSERT INTO t VALUES ($1)", [(1,), (2,)]) is None
        assert "open" in repr(cluster)
        stats = cluster.statistics()
    assert stats.requests_ok == 5
    assert stats.requests_failed == 0
    assert fake["i1"].queries == 5
    assert fake.submitted == 5


async def test_sequential_queries_spread_evenly_over_all_nodes(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open() as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        names = [await cluster.fetchval("whoami", idempotent=True) for _ in range(30)]
        stats = cluster.statistics()
    assert Counter(names) == {"i1": 10, "i2": 10, "i3": 10}
    assert fake.executed("whoami") == {"i1": 10, "i2": 10, "i3": 10}
    assert stats.requests_ok == 30
    assert {name: s.requests_ok for name, s in stats.nodes.items()} == {
        "i1": 10,
        "i2": 10,
        "i3": 10,
    }


async def test_concurrent_queries_use_every_node_and_connection(autojump_clock: object) -> None:
    fake = FakeCluster(3, service_time=0.1)
    out = Outcomes()
    async with fake.open(connections_per_node=2) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with trio.open_nursery() as nursery:
            for k in range(60):
                nursery.start_soon(out.call, k, cluster.fetchval, "whoami")
    out.assert_each_ended_once(60)
    assert out.errors == []
    counts = Counter(out.results)
    assert set(counts) == {"i1", "i2", "i3"}
    assert all(count >= 10 for count in counts.values()), counts
    # 2 connections per node: never more than 2 queries at once on a node.
    assert {n.max_in_flight for n in fake.nodes.values()} == {2}


async def test_node_down_is_routed_around_with_zero_failures(autojump_clock: object) -> None:
    fake = FakeCluster(3, service_time=0.1)
    out = Outcomes()
    async with fake.open(discovery_interval=100.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)

        async def client(k: int) -> None:
            for j in range(20):
                await out.call(k * 20 + j, cluster.fetchval, "whoami", idempotent=True)

        async with trio.open_nursery() as nursery:
            for k in range(10):
                nursery.start_soon(client, k)
            await trio.sleep(0.55)
            fake["i2"].down()
            killed_at = trio.current_time()
        stats = cluster.statistics()
        assert cluster.nodes()[1].state is not UP
    out.assert_each_ended_once(200)
    assert out.errors == []
    assert Counter(out.results)["i2"] > 0  # it served before dying
    assert all(result != "i2" for _k, t, result in out.log if t > killed_at)
    # Some requests were on i2 when it died: they ran again elsewhere.
    assert stats.requests_retried >= 1
    broken_on_i2 = fake["i2"].executed["whoami"] - Counter(out.results)["i2"]
    assert broken_on_i2 >= 1
    assert stats.requests_failed == 0
    assert stats.requests_ok == 200


async def test_outcome_unknown_names_the_node_and_is_not_retried(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    async with fake.open(connections_per_node=1, discovery_interval=100.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        errors: list[OutcomeUnknown] = []

        async def write() -> None:
            try:
                await cluster.fetchval("sleep:10")
            except OutcomeUnknown as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await trio.sleep(1)
            (victim,) = [n for n in fake.nodes.values() if n.in_flight]
            victim.down()
            killed_at = trio.current_time()
        failed_at = trio.current_time()
        stats = cluster.statistics()
    (error,) = errors
    assert error.node == victim.name
    assert victim.name in str(error)
    assert "idempotent=True" in str(error)
    assert failed_at - killed_at < 0.01  # at once, not after the 10 s query
    # Ran once, on the victim only: never retried elsewhere.
    assert sum(fake.executed("sleep:10").values()) == 1
    assert stats.requests_retried == 0
    assert stats.requests_failed == 1


async def test_idempotent_request_on_a_dying_node_is_retried_elsewhere(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    async with fake.open(connections_per_node=1, discovery_interval=100.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        results: list[str] = []

        async def read() -> None:
            results.append(await cluster.fetchval("sleep:10", idempotent=True))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(1)
            (victim,) = [n for n in fake.nodes.values() if n.in_flight]
            victim.down()
        done_at = trio.current_time()
        stats = cluster.statistics()
    (other,) = [name for name in fake.nodes if name != victim.name]
    assert results == [other]
    assert done_at == pytest.approx(1 + 10, abs=0.01)
    assert fake.executed("sleep:10") == {victim.name: 1, other: 1}
    assert stats.requests_retried == 1
    assert stats.requests_ok == 1 and stats.requests_failed == 0


async def test_query_error_carries_sqlstate_and_node_and_is_not_retried(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(3)
    async with fake.open(discovery_interval=1000.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        connects = fake.total_connects()
        opened = {name: n.opened for name, n in fake.nodes.items()}
        nodes_seen = set()
        for _ in range(6):
            with pytest.raises(QueryError) as info:
                await cluster.fetch("bad sql", idempotent=True)
            error = info.value
            assert error.sqlstate == "42601"
            assert error.message == "syntax error"
            assert error.node in fake.nodes
            assert "42601" in str(error) and error.node in str(error)
            nodes_seen.add(error.node)
        # The connections stay in use.
        assert [await cluster.fetchval("whoami") for _ in range(3)] == ["i1", "i2", "i3"]
        stats = cluster.statistics()
        states = {n.name: n.state for n in cluster.nodes()}
    assert nodes_seen == {"i1", "i2", "i3"}
    assert sum(fake.executed("bad sql").values()) == 6  # each ran exactly once
    assert fake.total_connects() == connects
    assert {name: n.opened for name, n in fake.nodes.items()} == opened
    assert stats.requests_retried == 0
    assert stats.requests_failed == 6
    assert sum(s.reconnects for s in stats.nodes.values()) == 0
    assert set(states.values()) == {UP}


async def test_all_nodes_down_fails_fast_then_recovers(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open(backoff_max=2.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        for node in fake.nodes.values():
            node.down()
        await wait_all_states(cluster, fake.nodes, DOWN)
        start = trio.current_time()
        with pytest.raises(NoNodesAvailable) as info:
            await cluster.fetchval("whoami", idempotent=True)
        assert trio.current_time() - start < 0.01
        errors = info.value.node_errors
        assert set(errors) == {"i1", "i2", "i3"}
        for name, node in fake.nodes.items():
            assert str(node.address) in errors[name] or "closed" in errors[name], errors
            assert name in str(info.value)
        for node in fake.nodes.values():
            node.up()
        await wait_all_states(cluster, fake.nodes, UP)
        assert trio.current_time() - start <= 2.0 + 0.01  # backoff_max
        names = [await cluster.fetchval("whoami") for _ in range(3)]
    assert sorted(names) == ["i1", "i2", "i3"]


async def test_acquire_timeout_when_every_connection_is_busy(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    out = Outcomes()
    async with fake.open(connections_per_node=1, acquire_timeout=2.0) as cluster:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(out.call, 0, cluster.fetchval, "sleep:10")
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            with pytest.raises(AcquireTimeout) as info:
                await cluster.fetchval("whoami")
            assert trio.current_time() - start == pytest.approx(2.0)
            assert "acquire_timeout=2.0" in str(info.value)
            assert "i1" in str(info.value)
        stats = cluster.statistics()
    out.assert_each_ended_once(1)
    assert out.results == ["i1"]
    assert fake["i1"].executed["whoami"] == 0  # the timed-out request never ran
    assert stats.requests_failed == 1 and stats.requests_ok == 1
    assert isinstance(info.value, TimeoutError)


async def test_acquire_timeout_is_on_time_behind_a_retried_request(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    async with fake.open(
        connections_per_node=1, acquire_timeout=5.0, discovery_interval=1000.0
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        failed_at: list[float] = []

        async def waiter() -> None:
            with pytest.raises(AcquireTimeout):
                await cluster.fetchval("whoami")
            failed_at.append(trio.current_time())

        async def long(idempotent: bool) -> None:
            with contextlib.suppress(*PicodataErrors):
                await cluster.fetchval("sleep:100", idempotent=idempotent)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long, False)  # i1
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(long, True)  # i2
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(1)
            nursery.start_soon(waiter)  # queued at t=1: must fail at t=6
            await trio.sleep(1)
            fake["i2"].down()  # the idempotent one comes back to the queue at t=2
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    assert failed_at == [pytest.approx(6.0, abs=0.01)]


async def test_strategy_errors_fail_one_request_and_the_cluster_keeps_serving(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    mode = {"now": "ok"}
    ghost = Candidate(name="ghost", address=Address("10.9.9.9", 1), tier="x", replicaset="x")

    def picky_strategy(candidates: Sequence[Candidate]) -> Candidate:
        if mode["now"] == "raise":
            raise RuntimeError("boom")
        if mode["now"] == "stranger":
            return ghost
        return candidates[-1]

    async with fake.open(strategy=picky_strategy) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        assert await cluster.fetchval("whoami") in fake.nodes
        mode["now"] = "raise"
        with pytest.raises(StrategyError) as raised:
            await cluster.fetchval("whoami")
        mode["now"] = "stranger"
        with pytest.raises(StrategyError) as stranger:
            await cluster.fetchval("whoami")
        mode["now"] = "ok"
        assert await cluster.fetchval("whoami") in fake.nodes
        stats = cluster.statistics()
        states = {n.state for n in cluster.nodes()}
    assert "picky_strategy" in str(raised.value) and "boom" in str(raised.value)
    assert "picky_strategy" in str(stranger.value)
    assert "not one of the candidates" in str(stranger.value)
    assert sum(fake.executed("whoami").values()) == 2
    assert stats.requests_failed == 2 and stats.requests_ok == 2
    assert states == {UP}


async def test_a_strategy_of_ones_own_may_change_its_list(autojump_clock: object) -> None:
    # It gets a list of its own: the dispatcher's list of ready nodes (which
    # the suite's fixture checks after each call) stays as the routes say.
    fake = FakeCluster(3)
    given: list[list[Candidate]] = []

    def rude_strategy(candidates: list[Candidate]) -> Candidate:
        given.append(candidates)
        candidates.reverse()
        chosen = candidates[0]
        candidates.clear()
        return chosen

    async with fake.open(strategy=rude_strategy) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(cluster.fetchval, "whoami")
        table = cluster._dispatcher.table
        assert table.consistent() and len(table.ready) == 3
    assert len(given) == 30 and all(c == [] for c in given)
    assert set(fake.executed("whoami")) == set(fake.nodes)


async def test_caller_cancelled_mid_query_leaks_no_connection(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    node = fake["i1"]
    async with fake.open(connections_per_node=1, discovery_interval=1000.0) as cluster:
        await wait_state(cluster, "i1", UP)
        # The probe's, the query connection's, and discovery's (kept open between runs).
        assert node.open_connections == 3
        opened = node.opened
        with trio.move_on_after(1) as scope:
            await cluster.fetchval("sleep:10")
        assert scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        # Picodata cannot cancel a query: the connection was replaced.
        assert node.open_connections == 3
        assert node.opened == opened + 1
        assert node.in_flight == 0
        start = trio.current_time()
        assert await cluster.fetchval("whoami") == "i1"
        assert trio.current_time() - start < 0.01
        await trio.testing.wait_all_tasks_blocked()
        (status,) = cluster.nodes()
        assert status.connections == 1 and status.in_flight == 0 and status.state is UP


async def test_caller_cancelled_while_queued_never_runs(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open(connections_per_node=1, discovery_interval=1000.0) as cluster:
        await wait_state(cluster, "i1", UP)
        opened = fake["i1"].opened
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cluster.fetchval, "sleep:5")
            await trio.testing.wait_all_tasks_blocked()
            with trio.move_on_after(1) as scope:
                await cluster.fetchval("whoami")  # queued behind the long one
            assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(5.0)
        assert await cluster.fetchval("whoami") == "i1"
        assert cluster.statistics().queue_depth == 0
    assert fake["i1"].executed["whoami"] == 1  # only the last one
    assert fake["i1"].opened == opened  # nothing was replaced


async def test_timeout_argument_raises_too_slow_and_replaces_the_connection(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(1)
    async with fake.open(connections_per_node=1, discovery_interval=1000.0) as cluster:
        await wait_state(cluster, "i1", UP)
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await cluster.fetchval("sleep:10", timeout=0.5)
        assert trio.current_time() - start == pytest.approx(0.5)
        assert await cluster.fetchval("whoami", timeout=0.5) == "i1"
        await trio.testing.wait_all_tasks_blocked()
        assert fake["i1"].open_connections == 3  # probe, query connection, discovery


async def test_cancelled_query_does_not_leave_in_flight_behind(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    seen: list[int] = []

    def recording_strategy(candidates: Sequence[Candidate]) -> Candidate:
        seen.append(candidates[0].in_flight)
        return candidates[0]

    async with fake.open(
        connections_per_node=2, strategy=recording_strategy, discovery_interval=1000.0
    ) as cluster:
        await wait_state(cluster, "i1", UP)
        with trio.move_on_after(1):
            await cluster.fetchval("sleep:10")
        await trio.sleep(1)
        await cluster.fetchval("whoami")
        await cluster.fetchval("whoami")
    assert seen == [0, 0, 0]


async def test_closing_with_requests_in_flight_ends_each_exactly_once(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(3)
    fake["i1"].service_time = 0.5
    fake["i2"].service_time = fake["i3"].service_time = 100.0
    out = Outcomes()
    async with trio.open_nursery() as outer:
        async with fake.open(connections_per_node=2) as cluster:
            await wait_all_states(cluster, fake.nodes, UP)
            for k in range(12):
                outer.start_soon(out.call, k, cluster.fetchval, "whoami")
            await trio.sleep(1.2)
            assert fake["i2"].in_flight == fake["i3"].in_flight == 2
        closed_at = trio.current_time()
        assert cluster.closed
    out.assert_each_ended_once(12)
    assert set(out.results) == {"i1"}
    assert len(out.results) == 4  # i1 answered 2 at 0.5 s and 2 at 1.0 s
    assert len(out.errors) == 8
    assert all(isinstance(e, ClusterClosed) for e in out.errors), out.errors
    assert all(t == closed_at for _k, t, r in out.log if isinstance(r, ClusterClosed))
    assert fake.open_connections() == {"i1": 0, "i2": 0, "i3": 0}
    with pytest.raises(ClusterClosed):
        await cluster.fetchval("whoami")
    with pytest.raises(ClusterClosed):
        async with cluster.connection():
            pass  # pragma: no cover
    assert "closed" in repr(cluster)


async def test_body_exception_closes_the_cluster_and_propagates(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    with pytest.raises(KeyError, match="mine"):
        async with fake.open() as cluster:
            await wait_all_states(cluster, fake.nodes, UP)
            raise KeyError("mine")
    assert cluster.closed
    assert fake.open_connections() == {"i1": 0, "i2": 0}


async def test_pinned_connection_runs_on_one_node(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open(connections_per_node=2) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.connection() as conn:
            node = conn.node
            assert node in fake.nodes
            assert [await conn.fetchval("whoami") for _ in range(5)] == [node] * 5
            statement = await conn.prepare("whoami")
            assert await statement.fetchval() == node
            assert await statement.fetchrow() == {"name": node}
            assert await conn.execute("INSERT INTO t VALUES (1)") == "INSERT 0 1"
            with pytest.raises(QueryError) as info:
                await conn.fetch("bad sql")
            assert info.value.node == node
            assert await conn.fetchval("whoami") == node
        with pytest.raises(ClusterClosed):
            await conn.fetchval("whoami")
    assert fake[node].executed["whoami"] == 8


async def test_pinned_connection_goes_back_to_the_pool(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open(connections_per_node=1, acquire_timeout=1.0) as cluster:
        await wait_state(cluster, "i1", UP)
        async with cluster.connection() as conn:
            assert await conn.fetchval("whoami") == "i1"
        assert await cluster.fetchval("whoami") == "i1"


async def test_dirty_pinned_connection_is_replaced(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open(connections_per_node=1, discovery_interval=1000.0) as cluster:
        await wait_state(cluster, "i1", UP)
        opened = fake["i1"].opened
        with trio.move_on_after(1):
            async with cluster.connection() as conn:
                await conn.fetchval("sleep:10")
        # Cancelled mid-query: the connection is dropped and a new one opened.
        assert await cluster.fetchval("whoami") == "i1"
        await trio.testing.wait_all_tasks_blocked()
        assert fake["i1"].opened == opened + 1
        assert fake["i1"].open_connections == 3  # probe, query connection, discovery


async def test_pinned_connection_broken_mid_query_is_outcome_unknown(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    async with fake.open(connections_per_node=1, discovery_interval=1000.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)

        async def kill(name: str) -> None:
            await trio.sleep(0.5)
            fake[name].down()

        async with cluster.connection() as conn, trio.open_nursery() as nursery:
            nursery.start_soon(kill, conn.node)
            with pytest.raises(OutcomeUnknown) as info:
                await conn.fetchval("sleep:10")
        assert info.value.node == conn.node
        assert conn.node in str(info.value)
        await wait_state(cluster, conn.node, DOWN)
        # The other node serves; the dead one's pinned connection was dropped.
        assert await cluster.fetchval("whoami") != conn.node


async def test_pinned_connection_given_back_as_the_probe_fails(autojump_clock: object) -> None:
    # The give-back must land between the probe's failure and the actor hearing of
    # it: sweep a few scheduling steps around that moment, a few times each.
    errors: list[BaseException] = []
    for steps in range(6):
        for _ in range(5):
            fake = FakeCluster(2)
            async with fake.open(
                connections_per_node=1, health_interval=1.0, discovery_interval=1000.0
            ) as cluster:
                await wait_all_states(cluster, fake.nodes, UP)
                probe_at = trio.current_time() + 1.0
                try:
                    async with cluster.connection() as conn:
                        fake[conn.node].down()
                        with pytest.raises(NoNodesAvailable, match="pinned connection"):
                            await conn.fetchval("whoami")
                        await trio.sleep_until(probe_at)
                        for _step in range(steps):
                            await trio.lowlevel.checkpoint()
                except RuntimeError as exc:
                    errors.append(exc)
                await wait_state(cluster, conn.node, DOWN)
                assert await cluster.fetchval("whoami") != conn.node
    assert errors == []


async def test_statistics_count_each_outcome_once(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    async with fake.open(connections_per_node=1, discovery_interval=1000.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        ok = failed = 0
        for query in ("whoami", "bad sql", "whoami", "bad sql", "whoami"):
            try:
                await cluster.fetchval(query)
            except QueryError:
                failed += 1
            else:
                ok += 1
        stats = cluster.statistics()
    assert (ok, failed) == (3, 2)
    assert stats.requests_ok == ok
    assert stats.requests_failed == failed
    assert stats.requests_retried == 0
    assert stats.queue_depth == 0
    assert sum(s.requests_ok for s in stats.nodes.values()) == ok


async def test_idempotent_retries_are_bounded_by_max_attempts(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open(
        connections_per_node=1, max_attempts=2, discovery_interval=1000.0
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        killed: list[str] = []

        async def kill_twice() -> None:
            for _ in range(2):
                await trio.sleep(1)
                (victim,) = [n for n in fake.nodes.values() if n.in_flight]
                killed.append(victim.name)
                victim.down()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_twice)
            with pytest.raises(NoNodesAvailable) as info:
                await cluster.fetchval("sleep:10", idempotent=True)
        stats = cluster.statistics()
    assert trio.current_time() == pytest.approx(2.0, abs=0.01)
    assert "max_attempts=2" in str(info.value)
    assert set(info.value.node_errors) == set(killed)
    (spared,) = set(fake.nodes) - set(killed)
    assert fake[spared].executed["sleep:10"] == 0
    assert stats.requests_retried == 1
    assert stats.requests_failed == 1


async def test_requests_on_silently_reset_connections_are_retried_even_if_not_idempotent(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    async with fake.open(
        connections_per_node=2, health_interval=100.0, discovery_interval=1000.0
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        opened = fake["i2"].opened
        fake["i2"].drop_connections()  # every idle connection of i2 is now dead
        results = [await cluster.execute("INSERT INTO t VALUES (1)") for _ in range(6)]
        await trio.testing.wait_all_tasks_blocked()
        stats = cluster.statistics()
        states = {s.name: s.state for s in cluster.nodes()}
        # Each dead connection that was tried got replaced.
        reopened = fake["i2"].opened - opened
        assert fake["i2"].open_connections == reopened
    # The server never saw them: a retry is safe, whatever idempotent says.
    assert results == ["INSERT 0 1"] * 6
    assert stats.requests_failed == 0
    assert 1 <= stats.requests_retried == reopened <= 2
    assert states == {"i1": UP, "i2": UP}
    assert fake["i2"].executed["INSERT INTO t VALUES (1)"] >= 1


async def test_fastest_prefers_the_faster_node(autojump_clock: object) -> None:
    from picopyn_actors import Fastest

    fake = FakeCluster(2)
    fake["i1"].service_time = 0.05
    fake["i2"].service_time = 0.01
    async with fake.open(strategy=Fastest(), discovery_interval=1000.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        names = Counter([await cluster.fetchval("whoami") for _ in range(50)])
    assert names["i2"] >= 45, names
    assert names["i1"] >= 1  # measured at least once


async def test_pinning_times_out_when_every_connection_is_busy(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open(connections_per_node=1, discovery_interval=1000.0) as cluster:
        await wait_state(cluster, "i1", UP)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cluster.fetchval, "sleep:5")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.TooSlowError):
                async with cluster.connection(timeout=1.0):
                    pytest.fail("pinned")  # pragma: no cover
        # The abandoned pin does not hold the connection: queries flow again.
        assert await cluster.fetchval("whoami") == "i1"
        assert await cluster.fetchval("whoami") == "i1"


# Every test above runs on a mock clock: bound each one in virtual time.
bound_every_test(globals())


async def test_waiting_requests_are_served_first_come_first_served(
    autojump_clock: object,
) -> None:
    # Callers submit in their own task and a finished slot takes the queue's
    # head in the completing task: a request that arrives while others wait
    # must not overtake them, even right when a connection frees up.
    fake = FakeCluster(1)
    out = Outcomes()
    started: list[int] = []

    async def call(key: int) -> None:
        started.append(key)
        await out.call(key, cluster.fetchval, "sleep:1")

    async with fake.open(connections_per_node=1, acquire_timeout=60.0) as cluster:
        async with trio.open_nursery() as nursery:
            for key in range(4):  # 0 runs, 1..3 wait in this order
                nursery.start_soon(call, key)
                await trio.testing.wait_all_tasks_blocked()
            assert cluster.statistics().queue_depth == 3
            await trio.sleep(1.5)  # 0 done, 1 running: a newcomer queues behind 2 and 3
            nursery.start_soon(call, 4)
        stats = cluster.statistics()
    out.assert_each_ended_once(5)
    assert started == [0, 1, 2, 3, 4]
    assert [key for key, _, _ in out.log] == [0, 1, 2, 3, 4]
    assert [round(t) for _, t, _ in out.log] == [1, 2, 3, 4, 5]
    assert stats.queue_depth == 0 and stats.requests_ok == 5
