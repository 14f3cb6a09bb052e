"""Node actor behaviour on the fake backend, in virtual time: calm logs and events,
reconnect attempts in the status, the identity check, 42999 and checked transitions."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing
from fakes import FakeCluster, bound_every_test, drain_events, state_of, wait_all_states, wait_state

from picopyn_actors import NodeEvent, NodeState, QueryError
from picopyn_actors._bridge import BackendBroken

UP = NodeState.UP
DOWN = NodeState.DOWN


async def test_an_outage_logs_one_warning_and_no_event_per_attempt(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(2)
    node = fake["i2"]
    caplog.set_level(logging.DEBUG, logger="picopyn_actors")
    async with fake.open(
        backoff_initial=0.05, backoff_max=0.3, discovery_interval=1000.0
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.events() as events:
            caplog.clear()
            node.down()
            await wait_state(cluster, "i2", DOWN)
            await trio.sleep(4.0)
            status = next(n for n in cluster.nodes() if n.name == "i2")
            assert status.state is DOWN
            assert status.attempts >= 10
            assert status.next_attempt is not None and status.next_attempt > trio.current_time()
            node.up()
            await wait_state(cluster, "i2", UP)
            received = [e for e in drain_events(events) if isinstance(e, NodeEvent)]
        back = next(n for n in cluster.nodes() if n.name == "i2")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert "up -> down" in loud[0].getMessage()
    attempts = [r for r in caplog.records if "attempt" in (m := r.getMessage()) and "failed" in m]
    assert len(attempts) >= 10 and all(r.levelno == logging.DEBUG for r in attempts)
    (back_record,) = [r for r in caplog.records if "down -> up" in r.getMessage()]
    assert back_record.levelno == logging.INFO
    assert "back after 4." in back_record.getMessage() and "attempts" in back_record.getMessage()
    # Two events for the whole outage: down, then up. No down/connecting flapping.
    assert [(e.old, e.new) for e in received if e.node == "i2"] == [(UP, DOWN), (DOWN, UP)]
    assert back.attempts == 0 and back.next_attempt is None


async def test_a_long_outage_reminds_every_few_minutes(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(2)
    caplog.set_level(logging.INFO, logger="picopyn_actors")
    async with fake.open(backoff_max=1.0, discovery_interval=1000.0, deadline=1000.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        caplog.clear()
        fake["i2"].down()
        await trio.sleep(700)
        assert state_of(cluster, "i2") is DOWN
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 3, loud  # the outage, and a reminder at 5 and at 10 minutes
    assert "still down after 30" in loud[1] and "still down after 60" in loud[2]


async def test_a_server_with_a_stranger_identity_is_never_served(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeCluster(3)
    fake["i2"].answers_uuid = "99999999-0000-4000-8000-000000000000"
    caplog.set_level(logging.WARNING, logger="picopyn_actors")
    async with fake.open(discovery_interval=1000.0) as cluster:
        await wait_state(cluster, "i2", DOWN)
        status = next(n for n in cluster.nodes() if n.name == "i2")
        seen = {await cluster.fetchval("whoami", idempotent=True) for _ in range(30)}
        await trio.sleep(10)
    assert seen == {"i1", "i3"}
    assert fake["i2"].queries == 0
    assert status.last_error is not None and "identity mismatch" in status.last_error
    assert "99999999" in status.last_error
    loud = [r.getMessage() for r in caplog.records if "i2" in r.getMessage()]
    assert len(loud) == 1 and "identity mismatch" in loud[0]


async def test_a_server_that_changes_identity_while_connected_stops_being_served(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe asks the uuid again every health_interval: open connections to a
    server that is no longer the node stop serving within one interval."""
    fake = FakeCluster(3)
    caplog.set_level(logging.WARNING, logger="picopyn_actors")
    async with fake.open(discovery_interval=1000.0, health_interval=0.5) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake["i2"].answers_uuid = "99999999-0000-4000-8000-000000000000"
        changed = trio.current_time()
        await wait_state(cluster, "i2", DOWN)
        took = trio.current_time() - changed
        served = fake["i2"].queries
        seen = {await cluster.fetchval("whoami", idempotent=True) for _ in range(30)}
        status = next(n for n in cluster.nodes() if n.name == "i2")
    assert took <= 0.5 + 1e-6
    assert seen == {"i1", "i3"} and fake["i2"].queries == served
    assert status.last_error is not None and "identity mismatch" in status.last_error
    loud = [r.getMessage() for r in caplog.records if "i2" in r.getMessage()]
    assert len(loud) == 1 and "identity mismatch" in loud[0]


@pytest.mark.parametrize("idempotent", [False, True])
async def test_42999_forgets_the_statements_and_runs_again(
    autojump_clock: object, idempotent: bool
) -> None:
    fake = FakeCluster(1)
    async with fake.open(connections_per_node=2) as cluster:
        await trio.testing.wait_all_tasks_blocked()
        fake["i1"].change_schema()
        answers: list[str] = []

        async def ask() -> None:
            answers.append(await cluster.fetchval("whoami", idempotent=idempotent))

        async with trio.open_nursery() as nursery:  # two at once: one on each connection
            nursery.start_soon(ask)
            nursery.start_soon(ask)
        answers.append(await cluster.fetchval("whoami", idempotent=idempotent))
        stats = cluster.statistics()
    assert answers == ["i1"] * 3
    assert stats.nodes["i1"].statements_invalidated == 2  # once per query connection
    assert stats.statements_invalidated == 2
    assert stats.requests_failed == 0 and stats.requests_retried == 0
    assert sum(c.forgotten for c in fake["i1"].all_connections) == 2


async def test_a_schema_storm_does_not_loop_a_request_forever(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open(connections_per_node=1) as cluster:
        await trio.testing.wait_all_tasks_blocked()
        (conn,) = fake["i1"].all_connections[-1:]
        original = conn.forget_statements

        def stay_stale() -> None:
            original()
            conn.stale = True  # the schema changes again at once

        conn.forget_statements = stay_stale  # type: ignore[method-assign]
        conn.stale = True
        with pytest.raises(QueryError) as info:
            await cluster.fetchval("whoami")
        assert info.value.sqlstate == "42999"
        assert "schema kept changing" in str(info.value)


async def test_an_illegal_transition_is_refused(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open() as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        (actor,) = cluster._supervisor.actors()
        with pytest.raises(AssertionError, match="up -> connecting is not allowed"):
            actor._set(NodeState.CONNECTING, "test")
        assert actor.state is UP



def test_the_package_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("picopyn_actors").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


bound_every_test(globals())


async def test_a_failed_session_hands_out_no_slot_before_its_actor_runs(
    autojump_clock: object,
) -> None:
    """Between a session's failure and its node actor's turn, no request goes to the
    node: its idle slots are withdrawn at once, and a slot that finishes is not given
    back (it is replaced when the actor ends the session)."""
    fake = FakeCluster(2)
    async with fake.open(discovery_interval=1000.0, connections_per_node=2) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        actor = next(a for a in cluster._supervisor.actors() if a.name == "i2")
        session = actor._session
        assert session is not None
        route = cluster._dispatcher.table.routes[actor.route_id]
        assert len(route.idle) == 2
        served = fake["i2"].queries
        # No checkpoint from here to the requests: the node actor cannot run.
        session.fail(BackendBroken("the node failed (test)", sent=False))
        assert route.idle == [] and route.candidate.free == 0
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(cluster.fetchval, "SELECT 1")
        assert fake["i2"].queries == served
        await wait_state(cluster, "i2", DOWN)


async def test_a_catalog_change_reaches_the_strategys_candidate(autojump_clock: object) -> None:
    """A node's new failure domain (and tier, replicaset) in the catalog reaches
    the candidate a strategy reads, without restarting the node."""
    fake = FakeCluster(2)
    seen: list[dict[str, str]] = []

    def strategy(candidates: Any) -> Any:
        seen.extend(dict(c.failure_domain) for c in candidates if c.name == "i2")
        return candidates[0]

    async with fake.open(discovery_interval=1.0, strategy=strategy) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        connects = fake["i2"].connects
        fake["i2"].failure_domain = {"zone": "b"}
        runs = cluster.statistics().discovery_runs
        await trio.sleep(2.5)  # virtual time: two discovery runs or more
        assert cluster.statistics().discovery_runs >= runs + 2
        seen.clear()
        for _ in range(4):
            await cluster.fetchval("whoami")
        assert fake["i2"].connects == connects  # the same session
    assert seen and all(domain == {"zone": "b"} for domain in seen)


async def test_an_already_cancelled_caller_sends_nothing(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open(discovery_interval=1000.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        with trio.CancelScope() as scope:
            scope.cancel()
            await cluster.fetchval("whoami")
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            async with cluster.connection() as conn:
                await conn.fetchval("whoami")  # pragma: no cover
        assert fake["i1"].queries == 0
        assert await cluster.fetchval("whoami") == "i1"


async def test_trios_clock_is_split_for_the_hot_path_and_a_mock_clock_is_not() -> None:
    import time

    from picopyn_actors._util import split_clock

    clock = trio.lowlevel.current_clock().current_time
    perf, offset = split_clock(clock)
    assert perf is time.perf_counter
    before = clock()
    split = perf() + offset
    assert before <= split <= clock()
    mock = trio.testing.MockClock()
    assert split_clock(mock.current_time) == (mock.current_time, 0.0)
