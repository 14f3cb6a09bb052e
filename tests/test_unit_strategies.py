"""Unit tests: balance strategies, backoff, restart intensity, the event hub, requests."""

from __future__ import annotations

import random
from collections import Counter

import outcome
import pytest
import trio
import trio.testing

from picopyn_actors import (
    Address,
    Candidate,
    ClusterClosed,
    EventsDropped,
    Fastest,
    LeastInFlight,
    NodeEvent,
    NodeState,
    Random,
    RoundRobin,
)
from picopyn_actors._backoff import RestartTracker, backoff_delay
from picopyn_actors._events import EventHub
from picopyn_actors._request import Phase, Request
from picopyn_actors._strategies import strategy_name


def candidates(n: int) -> list[Candidate]:
    return [
        Candidate(name=f"i{i}", address=Address(f"10.0.0.{i}", 4327), tier="t", replicaset="r")
        for i in range(1, n + 1)
    ]


# -- strategies -----------------------------------------------------------------------------


def test_round_robin_spreads_evenly() -> None:
    cands = candidates(3)
    rr = RoundRobin()
    picks = Counter(rr(cands).name for _ in range(300))
    assert picks == {"i1": 100, "i2": 100, "i3": 100}


def test_round_robin_takes_turns_and_survives_a_shrinking_list() -> None:
    cands = candidates(4)
    rr = RoundRobin()
    assert [rr(cands).name for _ in range(5)] == ["i1", "i2", "i3", "i4", "i1"]
    # Fewer candidates than the cursor: it wraps instead of failing.
    for _ in range(3):
        rr(cands)
    assert rr(cands[:2]).name in {"i1", "i2"}
    assert rr(cands[:1]).name == "i1"


def test_random_covers_every_candidate_and_is_seedable() -> None:
    cands = candidates(4)
    strategy = Random(seed=7)
    picks = Counter(strategy(cands).name for _ in range(4000))
    assert set(picks) == {"i1", "i2", "i3", "i4"}
    assert all(800 < count < 1200 for count in picks.values()), picks
    again = Random(seed=7)
    replay = Counter(again(cands).name for _ in range(4000))
    assert replay == picks


def test_least_in_flight_picks_the_less_loaded_of_two() -> None:
    a, b = candidates(2)
    a.in_flight, b.in_flight = 5, 1
    strategy = LeastInFlight(seed=3)
    assert all(strategy([a, b]) is b for _ in range(100))
    assert all(strategy([b, a]) is b for _ in range(100))


def test_least_in_flight_avoids_the_most_loaded_and_handles_one() -> None:
    cands = candidates(3)
    for c, load in zip(cands, (10, 0, 0), strict=True):
        c.in_flight = load
    strategy = LeastInFlight(seed=11)
    picks = Counter(strategy(cands).name for _ in range(600))
    # i1 only wins against itself, which sampling without replacement never does.
    assert picks["i1"] == 0
    assert picks["i2"] > 150 and picks["i3"] > 150
    assert strategy(cands[:1]) is cands[0]


def test_fastest_picks_the_lowest_latency() -> None:
    cands = candidates(3)
    for c, latency in zip(cands, (0.03, 0.01, 0.02), strict=True):
        c.latency = latency
    assert Fastest()(cands).name == "i2"


def test_fastest_explores_unmeasured_nodes_first() -> None:
    cands = candidates(3)
    cands[0].latency = 0.001
    cands[2].latency = 0.0005
    assert Fastest()(cands).name == "i2"  # never measured
    cands[1].latency = 0.5
    assert Fastest()(cands).name == "i3"


def test_strategy_names() -> None:
    def pick_first(cands: list[Candidate]) -> Candidate:
        return cands[0]

    assert strategy_name(RoundRobin()) == "RoundRobin()"
    assert strategy_name(LeastInFlight()) == "LeastInFlight()"
    assert strategy_name(Fastest()) == "Fastest()"
    assert strategy_name(Random()) == "Random()"
    assert "pick_first" in strategy_name(pick_first)


# -- backoff_delay ----------------------------------------------------------------------------


class _Extremes(random.Random):
    """uniform() always returns its upper (or lower) bound."""

    def __init__(self, upper: bool) -> None:
        super().__init__(0)
        self.upper = upper

    def uniform(self, a: float, b: float) -> float:
        return b if self.upper else a


def test_backoff_is_exponential_and_capped() -> None:
    top = _Extremes(upper=True)
    bottom = _Extremes(upper=False)
    highs = [backoff_delay(n, 0.1, 2.0, top) for n in range(1, 9)]
    lows = [backoff_delay(n, 0.1, 2.0, bottom) for n in range(1, 9)]
    assert highs == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])
    assert lows == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_backoff_jitter_stays_within_bounds_and_varies() -> None:
    rand = random.Random(1234)
    for failures in range(1, 12):
        base = min(5.0, 0.05 * 2 ** (failures - 1))
        draws = [backoff_delay(failures, 0.05, 5.0, rand) for _ in range(200)]
        assert all(base / 2 <= d <= base for d in draws)
        assert len(set(draws)) > 100  # jittered, not lockstep


def test_backoff_zero_or_negative_failures_use_the_initial_delay() -> None:
    top = _Extremes(upper=True)
    assert backoff_delay(0, 0.3, 10.0, top) == pytest.approx(0.3)
    assert backoff_delay(-5, 0.3, 10.0, top) == pytest.approx(0.3)
    assert 0.15 <= backoff_delay(1, 0.3, 10.0) <= 0.3


def test_backoff_huge_failure_counts_do_not_overflow() -> None:
    assert backoff_delay(10_000, 0.05, 1.0, _Extremes(upper=True)) == pytest.approx(1.0)


# -- RestartTracker -------------------------------------------------------------------------


def test_restart_tracker_limit() -> None:
    tracker = RestartTracker(limit=2, window=10.0)
    assert not tracker.record(0.0)
    assert not tracker.record(1.0)
    assert tracker.record(2.0)
    assert tracker.count == 3


def test_restart_tracker_sliding_window() -> None:
    tracker = RestartTracker(limit=2, window=10.0)
    assert not tracker.record(0.0)
    assert not tracker.record(5.0)
    # 0.0 is exactly one window old at 10.0: it has left the window.
    assert not tracker.record(10.0)
    assert tracker.count == 2
    assert tracker.record(14.0)  # 5, 10, 14
    assert tracker.count == 3
    # Long quiet period: everything slides out.
    assert not tracker.record(100.0)
    assert tracker.count == 1


# -- EventHub -------------------------------------------------------------------------------


def _event(i: int) -> NodeEvent:
    return NodeEvent(f"i{i}", NodeState.CONNECTING, NodeState.UP, "test", float(i))


async def test_event_hub_fans_out_and_marks_drops() -> None:
    hub = EventHub(buffer=2)
    async with hub.subscribe() as slow, hub.subscribe() as fast:
        seen_fast = []
        for i in range(5):
            hub.publish(_event(i))  # never blocks
            seen_fast.append(fast.receive_nowait())
        assert [e.node for e in seen_fast] == ["i0", "i1", "i2", "i3", "i4"]
        assert hub.published == 5
        # The slow one kept the first two, and missed three: it is told so at
        # once, right after the events it had, without waiting for a new one.
        assert slow.receive_nowait() == _event(0)
        assert slow.receive_nowait() == _event(1)
        assert slow.receive_nowait() == EventsDropped(3, 4.0)
        with pytest.raises(trio.WouldBlock):
            slow.receive_nowait()
        hub.publish(_event(5))
        assert slow.receive_nowait() == _event(5)
        assert fast.receive_nowait() == _event(5)
    # Unsubscribed: publishing still works.
    hub.publish(_event(6))
    assert hub.published == 7


async def test_a_subscriber_that_fell_behind_is_told_at_its_next_read() -> None:
    hub = EventHub(buffer=1)
    async with hub.subscribe() as events:
        for i in range(4):
            hub.publish(_event(i))
        # No event is published after the overflow: the marker still comes.
        assert await events.receive() == _event(0)
        assert await events.receive() == EventsDropped(3, 3.0)
        # A reader waiting for the next event wakes for it.
        async with trio.open_nursery() as nursery:
            got: list[object] = []

            async def read() -> None:
                got.append(await events.receive())

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            hub.publish(_event(9))
        assert got == [_event(9)]


async def test_event_stream_receive_is_cancellable() -> None:
    hub = EventHub(buffer=4)
    async with hub.subscribe() as events:
        with trio.move_on_after(0.01) as scope:
            await events.receive()
        assert scope.cancelled_caught
        hub.publish(_event(1))
        assert events.receive_nowait() == _event(1)
    with pytest.raises(trio.ClosedResourceError):
        events.receive_nowait()


async def test_event_hub_close_ends_subscriptions() -> None:
    hub = EventHub(buffer=4)
    async with hub.subscribe() as events:
        hub.publish(_event(1))
        hub.close()
        received = [event async for event in events]
    assert received == [_event(1)]


# -- Request ------------------------------------------------------------------------------


async def test_request_finishes_exactly_once() -> None:
    request = Request("fetchval", "q", (), False, 0.0)
    assert request.open
    assert request.finish(outcome.Value(1))
    assert not request.finish(outcome.Value(2))
    assert not request.fail(RuntimeError("late"))
    request.close()
    assert request.phase is Phase.DONE
    assert await request.wait() == 1


async def test_request_wakes_its_parked_caller() -> None:
    request = Request("fetchval", "q", (), False, 0.0)
    got = []

    async def caller() -> None:
        try:
            got.append(await request.wait())
        except ClusterClosed as exc:
            got.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        request.close()
        request.finish(outcome.Value("too late"))
    assert len(got) == 1 and isinstance(got[0], ClusterClosed)


async def test_cancelled_request_is_abandoned_and_drops_its_connection(
    autojump_clock: object,
) -> None:
    class Conn:
        terminated = 0

        def terminate(self) -> None:
            self.terminated += 1

    request = Request("fetchval", "q", (), False, 0.0)
    conn = Conn()
    request.conn = conn  # the connection running it: Picodata cannot cancel a query
    with trio.move_on_after(1) as caller_scope:
        await request.wait()
    assert caller_scope.cancelled_caught
    assert request.phase is Phase.ABANDONED
    assert conn.terminated == 1
    assert not request.finish(outcome.Value(1))
