"""Actor tests on the fake backend in virtual time: node health, backoff, probes,
quarantine, wake-ups and the event stream.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import Counter

import pytest
import trio
import trio.testing
from fakes import (
    FakeCluster,
    Outcomes,
    bound_every_test,
    drain_events,
    state_of,
    wait_all_states,
    wait_state,
)

from picopyn_actors import EventsDropped, NodeEvent, NodeState, OutcomeUnknown

UP = NodeState.UP
DOWN = NodeState.DOWN
QUARANTINED = NodeState.QUARANTINED
EPS = 1e-6


async def test_backoff_between_reconnect_attempts_grows_and_is_capped(
    autojump_clock: object,
) -> None:
    initial, maximum = 0.5, 4.0
    fake = FakeCluster(2)
    node = fake["i2"]
    async with fake.open(
        backoff_initial=initial,
        backoff_max=maximum,
        health_interval=1.0,
        discovery_interval=1000.0,
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        before = node.connects
        node.down()
        down_at = await wait_state(cluster, "i2", DOWN)
        await trio.sleep(60)
        # Reconnect attempts after the node was found down (a probe may try a
        # fresh connection at the moment it finds out: that is not a backoff).
        attempts = [t for t in node.connect_times[before:] if t > down_at]
        stats = cluster.statistics().nodes["i2"]
    # The first retry comes after backoff_delay(1) in [initial/2, initial].
    assert initial / 2 - EPS <= attempts[0] - down_at <= initial + EPS
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    for k, gap in enumerate(gaps, start=1):
        base = min(maximum, initial * 2**k)  # attempt k failed: delay number k + 1
        assert base / 2 - EPS <= gap <= base + EPS, (k, gap, gaps)
    # Growing while under the cap (each lower bound is the previous upper bound) ...
    uncapped = [g for k, g in enumerate(gaps, start=1) if initial * 2**k <= maximum / 2]
    assert uncapped == sorted(uncapped) and len(uncapped) >= 2
    # ... then capped: over 60 s at most 60 / (maximum / 2) + the uncapped ones.
    assert max(gaps) <= maximum + EPS
    assert len(attempts) <= 60 / (maximum / 2) + len(uncapped) + 2
    assert len(attempts) >= 60 / maximum
    assert stats.restarts == 1


async def test_node_reconnects_after_it_returns(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    node = fake["i2"]
    async with fake.open(
        backoff_initial=0.2, backoff_max=3.0, discovery_interval=1000.0
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        node.down()
        await wait_state(cluster, "i2", DOWN)
        await trio.sleep(30)
        assert state_of(cluster, "i2") is DOWN
        assert node.open_connections == 0
        node.up()
        returned_at = trio.current_time()
        up_at = await wait_state(cluster, "i2", UP)
        assert up_at - returned_at <= 3.0 + EPS  # within one capped backoff
        names = Counter([await cluster.fetchval("whoami") for _ in range(10)])
        (status,) = [s for s in cluster.nodes() if s.name == "i2"]
        stats = cluster.statistics().nodes["i2"]
    assert names == {"i1": 5, "i2": 5}
    assert status.connections == 2
    assert status.errors >= 2
    assert "refused" in (status.last_error or "")
    assert stats.restarts == 1


async def test_hung_node_is_detected_by_the_probe_and_requests_rerouted(
    autojump_clock: object,
) -> None:
    health, probe_timeout = 1.0, 0.5
    fake = FakeCluster(3)
    out = Outcomes()
    async with fake.open(
        health_interval=health, probe_timeout=probe_timeout, discovery_interval=1000.0
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        await trio.sleep(0.3)  # an arbitrary phase against the probe's beat
        fake["i2"].hang()
        hung_at = trio.current_time()
        async with cluster.events() as events, trio.open_nursery() as nursery:
            # Three writes one after the other: round robin sends one to each node.
            for k in range(12, 15):
                nursery.start_soon(out.call, k, cluster.execute, "INSERT INTO t VALUES (1)")
                await trio.testing.wait_all_tasks_blocked()
            # i2 has one free connection left: one of these reads hangs there.
            for k in range(12):
                read = functools.partial(cluster.fetchval, idempotent=True)
                nursery.start_soon(out.call, k, read, "whoami")
            down_at = await wait_state(cluster, "i2", DOWN)
            received = drain_events(events)
        stats = cluster.statistics()
    assert down_at - hung_at <= health + probe_timeout + EPS
    (down_event,) = [
        e for e in received if isinstance(e, NodeEvent) and e.node == "i2" and e.new is DOWN
    ]
    assert "probe timed out" in down_event.reason
    out.assert_each_ended_once(15)
    reads = [r for k, _t, r in sorted(out.log, key=lambda x: x[0]) if k < 12]
    writes = [r for k, _t, r in sorted(out.log, key=lambda x: x[0]) if k >= 12]
    # The read that hung on i2 was re-routed as soon as i2 was found hung.
    assert fake["i2"].executed["whoami"] == 1
    assert all(r in {"i1", "i3"} for r in reads), reads
    assert all(t <= down_at + EPS for _k, t, _r in out.log)
    assert stats.requests_retried == 1
    # The write that hung on i2 may have run: its outcome is unknown.
    unknown = [w for w in writes if isinstance(w, OutcomeUnknown)]
    assert len(unknown) == fake["i2"].executed["INSERT INTO t VALUES (1)"] == 1
    assert unknown[0].node == "i2"
    assert writes.count("INSERT 0 1") == 2


async def test_slow_probe_marks_a_node_down(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    async with fake.open(probe_timeout=0.5, discovery_interval=1000.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake["i2"].probe_time = 2.0  # alive, but far too slow
        await wait_state(cluster, "i2", DOWN)
        (status,) = [s for s in cluster.nodes() if s.name == "i2"]
        assert "probe timed out after 0.5s" in (status.last_error or "")
        names = {await cluster.fetchval("whoami") for _ in range(4)}
        assert names == {"i1"}
        fake["i2"].probe_time = 0.0
        await wait_state(cluster, "i2", UP)
        names = {await cluster.fetchval("whoami") for _ in range(4)}
        assert names == {"i1", "i2"}


async def test_restart_intensity_quarantines_a_flapping_node(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    node = fake["i2"]
    async with fake.open(
        max_restarts=2,
        restart_window=100.0,
        quarantine_time=30.0,
        backoff_initial=0.1,
        backoff_max=0.2,
        health_interval=0.5,
        discovery_interval=1000.0,
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.events() as events:
            for _cycle in range(2):
                node.down()
                await wait_state(cluster, "i2", DOWN)
                node.up()
                await wait_state(cluster, "i2", UP)
            node.down()
            quarantined_at = await wait_state(cluster, "i2", QUARANTINED, DOWN)
            assert state_of(cluster, "i2") is QUARANTINED
            node.up()  # back at once, but it is left alone for quarantine_time
            connects = node.connects
            assert {await cluster.fetchval("whoami") for _ in range(4)} == {"i1"}
            await trio.sleep(29)
            assert node.connects == connects
            assert state_of(cluster, "i2") is QUARANTINED
            up_at = await wait_state(cluster, "i2", UP)
            received = [e for e in drain_events(events) if isinstance(e, NodeEvent)]
        stats = cluster.statistics().nodes["i2"]
    assert up_at == pytest.approx(quarantined_at + 30.0, abs=0.01)
    (event,) = [e for e in received if e.node == "i2" and e.new is QUARANTINED]
    assert event.at == quarantined_at
    assert "3 restarts within 100.0s" in event.reason
    assert "max_restarts=2" in event.reason
    assert "next try in 30.0s" in event.reason
    assert stats.restarts == 3
    # The attempt after the quarantine is not a state of its own.
    after = [e.new for e in received if e.node == "i2" and e.at > quarantined_at]
    assert after == [UP]


async def test_wake_cuts_a_long_backoff_short(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    node = fake["i2"]
    async with fake.open(
        backoff_initial=20.0, backoff_max=40.0, discovery_interval=1.0
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        node.down()
        down_at = await wait_state(cluster, "i2", DOWN)
        node.up()  # the server is back, but the catalog has not said so yet
        connects = node.connects
        await trio.sleep(5)
        assert state_of(cluster, "i2") is DOWN  # first backoff is at least 10 s
        assert node.connects == connects
        node.restart_in_catalog()  # Online(2): the node restarted
        bumped_at = trio.current_time()
        up_at = await wait_state(cluster, "i2", UP)
        (status,) = [s for s in cluster.nodes() if s.name == "i2"]
    assert up_at - bumped_at <= 1.0 + EPS  # the next discovery woke it
    assert up_at - down_at < 10.0
    assert status.catalog_state == "Online(2)"


async def test_no_wake_without_a_new_incarnation(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    node = fake["i2"]
    async with fake.open(
        backoff_initial=20.0, backoff_max=40.0, discovery_interval=1.0
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        node.down()
        down_at = await wait_state(cluster, "i2", DOWN)
        node.up()
        up_at = await wait_state(cluster, "i2", UP)
    assert 10.0 - EPS <= up_at - down_at <= 20.0 + EPS  # the full first backoff


async def test_slow_events_subscriber_gets_a_drop_marker_and_never_blocks(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    node = fake["i2"]
    async with fake.open(
        events_buffer=3,
        backoff_initial=0.1,
        backoff_max=0.2,
        max_restarts=100,
        discovery_interval=1000.0,
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.events() as slow:
            published = cluster.statistics().events_published
            for _cycle in range(3):
                node.down()
                await wait_state(cluster, "i2", DOWN)
                node.up()
                await wait_state(cluster, "i2", UP)
            missed = cluster.statistics().events_published - published
            assert missed > 3
            # The three kept events, then at once the marker for the rest:
            # no new event is needed to learn of the gap.
            *kept, marker = drain_events(slow)
            assert len(kept) == 3
            assert all(isinstance(e, NodeEvent) and e.node == "i2" for e in kept)
            assert isinstance(marker, EventsDropped)
            assert marker.count == missed - 3
            # The cluster kept serving while nobody read.
            assert await cluster.fetchval("whoami") in {"i1", "i2"}
            node.down()
            await wait_state(cluster, "i2", DOWN)
            rest = drain_events(slow)
        assert rest and isinstance(rest[0], NodeEvent) and rest[0].node == "i2"


async def test_events_channel_ends_when_the_cluster_closes(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    seen: list[object] = []
    finished = trio.Event()

    async def reader(cluster: object, task_status: trio.TaskStatus[None]) -> None:
        async with cluster.events() as events:  # type: ignore[attr-defined]
            task_status.started()
            async for event in events:
                seen.append(event)
        finished.set()

    async with trio.open_nursery() as outer:
        async with fake.open(discovery_interval=1000.0) as cluster:
            await wait_state(cluster, "i1", UP)
            await outer.start(reader, cluster)
            fake["i1"].down()
            await wait_state(cluster, "i1", DOWN)
            await trio.testing.wait_all_tasks_blocked()
            assert not finished.is_set()
        await finished.wait()
    assert any(isinstance(e, NodeEvent) and e.new is DOWN for e in seen)


async def test_node_status_snapshot(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    fake["i2"].failure_domain = {"zone": "b"}
    async with fake.open(discovery_interval=1000.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        statuses = cluster.nodes()
    assert [s.name for s in statuses] == ["i1", "i2"]
    first = statuses[0]
    assert first.uuid == fake["i1"].uuid
    assert first.address == "10.0.0.1:4327"
    assert first.tier == "default" and first.replicaset == "r1"
    assert first.catalog_state == "Online(1)"
    assert first.state is UP and first.connections == 2 and first.in_flight == 0
    assert first.errors == 0 and first.last_error is None
    assert first.latency is not None



async def test_node_down_for_a_long_time_keeps_its_actor(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    # Over a thousand failed sessions in a row: the backoff exponent must not overflow.
    caplog.set_level(logging.ERROR, logger="picopyn_actors")
    fake = FakeCluster(2)
    async with fake.open(
        backoff_initial=0.001,
        backoff_max=0.001,
        discovery_interval=1000.0,
        events_buffer=100_000,
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.events() as events:
            fake["i2"].down()
            with trio.fail_after(10):  # virtual seconds
                await fake["i2"].wait_connects(fake["i2"].connects + 1100)
            received = [e for e in drain_events(events) if isinstance(e, NodeEvent)]
        fake["i2"].up()
        await wait_state(cluster, "i2", UP)
    assert not [e for e in received if e.new is NodeState.RETIRED]


async def test_connection_reset_on_a_healthy_node_is_not_a_restart(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    async with fake.open(health_interval=1.0, discovery_interval=1000.0) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.events() as events:
            fake["i2"].drop_connections()  # the node itself stays up
            await trio.sleep(3)  # a few probes
            received = [e for e in drain_events(events) if isinstance(e, NodeEvent)]
        stats = cluster.statistics().nodes["i2"]
    assert [e for e in received if e.new is DOWN] == []
    assert stats.restarts == 0


async def test_slow_flapping_within_the_limit_is_not_quarantined(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    node = fake["i2"]
    async with fake.open(
        max_restarts=2,
        restart_window=10.0,
        backoff_initial=0.1,
        backoff_max=0.2,
        health_interval=0.5,
        discovery_interval=1000.0,
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with cluster.events() as events:
            for _cycle in range(5):
                node.down()
                await wait_state(cluster, "i2", DOWN, QUARANTINED)
                node.up()
                await wait_state(cluster, "i2", UP)
                await trio.sleep(6)  # at most 2 restarts in any 10 s window
            received = [e for e in drain_events(events) if isinstance(e, NodeEvent)]
        stats = cluster.statistics().nodes["i2"]
    assert not [e for e in received if e.new is QUARANTINED]
    assert stats.restarts == 5


async def test_hung_node_comes_back_when_it_resumes(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    async with fake.open(
        probe_timeout=0.5, connect_timeout=2.0, backoff_max=1.0, discovery_interval=1000.0
    ) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake["i2"].hang()
        await wait_state(cluster, "i2", DOWN)
        await trio.sleep(10)
        assert state_of(cluster, "i2") is not UP
        # Each reconnect hung until connect_timeout, then gave up.
        assert fake["i2"].open_connections <= 1
        fake["i2"].resume()
        resumed_at = trio.current_time()
        up_at = await wait_state(cluster, "i2", UP)
        names = {await cluster.fetchval("whoami") for _ in range(4)}
    assert up_at - resumed_at <= 2.0 + 1.0 + EPS  # a pending connect, then a backoff
    assert names == {"i1", "i2"}


# Every test above runs on a mock clock: bound each one in virtual time.
bound_every_test(globals())
