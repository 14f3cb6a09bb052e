"""Hedged idempotent reads on the fake backend, in virtual time, and the pure policy."""

from __future__ import annotations

import functools
import math

import pytest
import trio
import trio.testing
from fakes import FakeCluster, bound_every_test, wait_all_states, wait_state

import picopyn_actors as pa
from picopyn_actors._hedging import Hedger

UP = pa.NodeState.UP


# -- the policy ---------------------------------------------------------------------------


def test_the_adaptive_delay_follows_the_latency_distribution() -> None:
    hedger = Hedger(pa.Hedging(percentile=0.9, floor=0.001, window=10.0))
    assert hedger.delay(0.0) == float("inf")  # not enough latencies yet: no hedging
    for i in range(1, 101):
        hedger.record(i / 1000, now=0.0)  # 1 .. 100 ms
    assert 0.09 <= hedger.delay(0.0) <= 0.095
    # The window slides: newer, faster latencies take over.
    for _ in range(500):
        hedger.record(0.004, now=11.0)
    assert 0.004 <= hedger.delay(11.0) <= 0.0043
    assert hedger.current_delay == hedger.delay(11.0)


def test_the_delay_has_a_floor_and_may_be_fixed() -> None:
    hedger = Hedger(pa.Hedging(floor=0.005))
    for _ in range(100):
        hedger.record(0.0001, now=0.0)
    assert hedger.delay(0.0) == 0.005
    assert Hedger(pa.Hedging(delay=0.02)).delay(0.0) == 0.02


def test_the_budget_holds_over_the_window() -> None:
    hedger = Hedger(pa.Hedging(budget=0.1, window=10.0))
    hedger.count(100, 0.0)
    allowed = sum(hedger.allow(0.0) for _ in range(50))
    assert allowed == 10 and hedger.refused == 40 and hedger.sent == 10
    # A new window: the old requests and hedges no longer count.
    hedger.count(20, 20.0)
    assert sum(hedger.allow(20.0) for _ in range(5)) == 2
    # A quiet client may hedge once per window all the same.
    quiet = Hedger(pa.Hedging(budget=0.1))
    quiet.count(1, 0.0)
    assert [quiet.allow(0.0), quiet.allow(0.0)] == [True, False]


def _answers(hedger: Hedger, latencies: list[float], now: float) -> None:
    """Answers that were not late, as a slot reports them: each counts down
    to the next sample, and the one that runs it out is recorded."""
    for latency in latencies:
        hedger.countdown -= 1
        if hedger.countdown <= 0:
            hedger.answered(latency, now, -math.inf, False)


def test_one_answer_in_four_is_sampled_and_a_late_one_left_unhedged_is_counted() -> None:
    hedger = Hedger(pa.Hedging(percentile=0.9, floor=0.001, min_samples=5))
    assert hedger.delay(0.0) == math.inf  # no latencies yet: nothing is hedged
    # One in five is slow; one answer in four is sampled, slow ones alike.
    _answers(hedger, [0.5 if i % 5 == 0 else 0.002 for i in range(400)], now=1.0)
    assert sum(s.samples for s in hedger._slices) == 100
    assert 0.5 <= hedger.delay(1.0) <= 0.5 * 1.05  # (buckets are 5% wide)
    # An answer after 1 s (sent at 1.0, late from about 1.5), unhedged, its
    # node having answered others since it was late: counted. Not if the node
    # was silent since, nor if it was hedged.
    hedger.answered(1.0, 2.0, 1.9, False)
    hedger.answered(1.0, 2.0, 1.4, False)
    hedger.answered(1.0, 2.0, 1.9, True)
    assert hedger.not_stalled == 1


def test_at_high_rates_fewer_latencies_are_sampled_and_each_stands_for_more() -> None:
    hedger = Hedger(pa.Hedging(percentile=0.85, floor=0.0005, min_samples=5))
    for _ in range(100):  # a quiet slice: one in four, 400 requests
        hedger.record(0.001, now=0.0)
    hedger.count(100_000, 0.5)  # ... then busy
    # The next slice samples one answer in 390 (about 256 a slice at that
    # rate), from the fourth on (the count the quiet slice left).
    _answers(hedger, [0.5 if i % 7 < 2 else 0.001 for i in range(39_000)], now=1.1)
    current = hedger._slices[-1]
    assert current.every == 390 and current.samples == 100
    # Weighted by what they stand for, 28% of the requests are slow: the p85
    # is slow. (Counted one each, the quiet slice's samples would bring the
    # slow ones down to 14%, and the p85 to 1 ms.) The delay is recomputed
    # once a slice: next at 2.1.
    assert 0.5 <= hedger.delay(2.2) <= 0.5 * 1.05


@pytest.mark.parametrize(
    "bad",
    [{"budget": 0}, {"budget": 1.5}, {"percentile": 1}, {"delay": -1}, {"floor": 0},
     {"window": float("inf")}, {"min_samples": 0}, {"only_stalled": 1}],
)  # fmt: skip
def test_a_bad_policy_is_refused_at_construction(bad: dict[str, float]) -> None:
    with pytest.raises(pa.ConfigError, match=next(iter(bad))):
        pa.Hedging(**bad)
    with pytest.raises(pa.ConfigError, match="hedging"):
        pa.open_cluster("postgresql://u@h", hedging="yes")


# -- on the fake backend ---------------------------------------------------------------------

FIXED = pa.Hedging(delay=0.05, budget=0.5)


async def test_a_slow_node_is_hedged_and_the_hedge_wins(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open(hedging=FIXED) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        for _ in range(20):  # a history, for the budget
            await cluster.fetchval("whoami", idempotent=True)
        fake["i2"].service_time = 1.0  # a sluggish node
        start = trio.current_time()
        answers = [await cluster.fetchval("whoami", idempotent=True) for _ in range(6)]
        took = trio.current_time() - start
        await trio.sleep(2)  # the losers finish
        stats = cluster.statistics()
    assert "i2" not in answers  # every request that went to i2 was won by its hedge
    assert took < 6 * 0.05 + 0.5
    assert stats.hedges_sent == stats.hedges_won >= 1
    assert stats.requests_failed == 0
    # The losers were not cancelled: i2's connections finished their queries and serve on.
    assert sum(s.reconnects for s in stats.nodes.values()) == 0


async def test_a_node_is_hedged_around_after_its_session_restarts(autojump_clock: object) -> None:
    """The scheduler finds a stalled node's late requests on the slots of its
    current session: after a restart, the new ones."""
    fake = FakeCluster(3)
    async with fake.open(hedging=FIXED, backoff_max=0.1) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake["i2"].down()
        await wait_state(cluster, "i2", pa.NodeState.DOWN)
        fake["i2"].up()
        await wait_state(cluster, "i2", UP)
        for _ in range(20):
            await cluster.fetchval("whoami", idempotent=True)
        fake["i2"].service_time = 1.0
        answers = [await cluster.fetchval("whoami", idempotent=True) for _ in range(6)]
        stats = cluster.statistics()
    assert "i2" not in answers and stats.hedges_won >= 1
    assert stats.nodes["i2"].restarts >= 1


async def test_a_request_that_is_not_idempotent_is_never_hedged(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    fake["i1"].service_time = 1.0
    async with fake.open(hedging=FIXED) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        for _ in range(4):
            await cluster.fetchval("whoami")
        async with cluster.connection() as conn:
            await conn.fetchval("whoami")
        assert await cluster.fetchval("whoami", idempotent=True, hedging=False)
        stats = cluster.statistics()
    assert stats.hedges_sent == 0


async def test_cancelling_mid_hedge_leaves_nothing_behind(autojump_clock: object) -> None:
    fake = FakeCluster(2, service_time=1.0)
    async with fake.open(hedging=FIXED, connections_per_node=1) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        with trio.move_on_after(0.2):  # after the hedge went out, before either answers
            await cluster.fetchval("whoami", idempotent=True)
        await trio.sleep(2)
        await trio.testing.wait_all_tasks_blocked()
        stats = cluster.statistics()
        # Both attempts' connections were dropped (Picodata cannot cancel) and replaced.
        assert stats.hedges_sent == 1
        assert sum(s.reconnects for s in stats.nodes.values()) == 2
        assert all(n.in_flight == 0 for n in cluster.nodes())
        assert await cluster.fetchval("whoami", idempotent=True) in {"i1", "i2"}


async def _read_load(cluster: pa.Cluster, *, tasks: int, each: int) -> None:
    """``tasks`` tasks of ``each`` idempotent reads, side by side."""

    async def read() -> None:
        for _ in range(each):
            await cluster.fetchval("whoami", idempotent=True)

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(read)


async def test_the_budget_holds_when_one_node_is_slow(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    policy = pa.Hedging(delay=0.05, budget=0.1)
    async with fake.open(hedging=policy, connections_per_node=8) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake["i2"].service_time = 1.0  # a third of the requests would want a hedge
        await _read_load(cluster, tasks=12, each=10)
        stats = cluster.statistics()
    assert 0 < stats.hedges_sent <= 0.1 * 120 + 1
    assert stats.hedges_refused > 0
    assert stats.requests_failed == 0


async def test_no_hedge_when_every_node_is_as_late(autojump_clock: object) -> None:
    """Every node slow alike (or the client itself paused): a hedge would not
    answer sooner, so none is sent; the skips are counted."""
    fake = FakeCluster(3, service_time=0.2)
    policy = pa.Hedging(delay=0.05, budget=0.5)
    async with fake.open(hedging=policy, connections_per_node=8) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        await _read_load(cluster, tasks=12, each=10)
        stats = cluster.statistics()
    assert stats.hedges_sent == 0 and stats.hedges_refused == 0
    assert stats.hedges_skipped > 0
    assert stats.requests_failed == 0


async def _steady_load(cluster: pa.Cluster, tasks: int, until: trio.Event) -> list[float]:
    """``tasks`` tasks of idempotent reads until ``until``; their latencies."""
    latencies: list[float] = []

    async def read() -> None:
        while not until.is_set():
            start = trio.current_time()
            await cluster.fetchval("whoami", idempotent=True)
            latencies.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(read)
    return latencies


@pytest.mark.parametrize("only_stalled", [True, False])
async def test_a_slow_request_on_a_node_that_answers_is_hedged_only_if_asked(
    autojump_clock: object, only_stalled: bool
) -> None:
    """A request slow by itself (a big result) while its node answers others:
    a second node would be no faster, so by default it is not hedged."""
    fake = FakeCluster(3, service_time=0.01)
    policy = pa.Hedging(delay=0.05, budget=0.5, only_stalled=only_stalled)
    async with fake.open(hedging=policy, connections_per_node=4) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_steady_load, cluster, 6, done)
            await trio.sleep(0.1)
            await cluster.fetchval("sleep:0.5", idempotent=True)
            done.set()
        stats = cluster.statistics()
    hedged_nodes = [n for n in fake.nodes if fake[n].executed["sleep:0.5"]]
    if only_stalled:
        assert stats.hedges_sent == 0 and stats.hedges_not_stalled == 1
        assert len(hedged_nodes) == 1
    else:
        assert stats.hedges_sent == 1 and stats.hedges_not_stalled == 0
        assert len(hedged_nodes) == 2
    assert stats.requests_failed == 0


async def test_a_late_request_is_hedged_once_its_node_stalls(autojump_clock: object) -> None:
    """A slow request is left alone while its node answers others, and
    hedged once that node has answered nothing for the delay; requests sent
    to the stalled node are hedged after the delay, as ever."""
    fake = FakeCluster(3, service_time=0.01)
    policy = pa.Hedging(delay=0.05, budget=0.5)
    async with fake.open(hedging=policy, connections_per_node=4) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        done = trio.Event()
        latencies: list[float] = []

        async def load() -> None:
            latencies.extend(await _steady_load(cluster, 6, done))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            nursery.start_soon(functools.partial(cluster.fetchval, "sleep:1", idempotent=True))
            await trio.sleep(0.2)  # four delays: late, but its node answers others
            (slow,) = [n for n in fake.nodes if fake[n].executed["sleep:1"]]
            before = cluster.statistics()
            fake[slow].hang()  # (shorter than probe_timeout: it stays up)
            await trio.sleep(0.2)
            hedged = [n for n in fake.nodes if fake[n].executed["sleep:1"]]
            fake[slow].resume()
            done.set()
        stats = cluster.statistics()
    assert before.hedges_sent == 0  # late, but its node answered others
    assert len(hedged) == 2  # hedged once its node stalled
    assert stats.hedges_won >= 3  # and the reads the stalled node held
    # No read waited out the stall: at most its service time, the delay after
    # the node's last answer, a look (1 ms) and the hedge's own service time.
    assert max(latencies) < 0.01 + 0.05 + 0.002 + 0.01 + 0.01
    assert stats.requests_failed == 0


async def test_a_request_held_while_every_node_was_late_is_hedged_once_one_is_not(
    autojump_clock: object,
) -> None:
    """Every node late at once (here: slow alike for a moment, as when the
    client itself pauses): the late requests are held, not dropped. Once the
    other nodes have answered, the one still running on the slow node is
    hedged instead of waiting out its node."""
    fake = FakeCluster(3, service_time=0.2)
    policy = pa.Hedging(delay=0.05, budget=0.5)
    async with fake.open(hedging=policy, connections_per_node=2) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        fake["i2"].service_time = 1.0  # slower still: the others answer at 0.2 s
        answers: list[tuple[str, float]] = []

        async def read() -> None:
            start = trio.current_time()
            node = await cluster.fetchval("whoami", idempotent=True)
            answers.append((node, trio.current_time() - start))

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # one on each node (RoundRobin, all idle)
                nursery.start_soon(read)
        await trio.sleep(1)  # the loser finishes
        stats = cluster.statistics()
    # At 0.05 s every node held a late request: none could be hedged, all held.
    assert stats.hedges_skipped == 3
    # At 0.2 s i1 and i3 had answered: i2's request was hedged to one of them
    # (at the next look of the held: its wait doubles from an eighth of the
    # delay, so at most twice the 0.15 s it had been held), and the hedge
    # answered first.
    assert stats.hedges_sent == stats.hedges_won == 1
    assert "i2" not in [node for node, _ in answers]
    assert max(took for _, took in answers) < 0.05 + 2 * 0.15 + 0.002 + 0.2
    assert stats.requests_failed == 0


async def test_requests_held_in_a_cluster_slow_everywhere_are_looked_at_less_and_less(
    autojump_clock: object,
) -> None:
    """Every node hangs: the late requests stay held, never hedged, and the
    scheduler looks at them ever less often (up to 8 delays apart), not at
    every look."""
    fake = FakeCluster(3)
    policy = pa.Hedging(delay=0.01, budget=0.5)
    async with fake.open(hedging=policy, connections_per_node=2) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        for node in fake.nodes:
            fake[node].service_time = 10.0
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(functools.partial(cluster.fetchval, "whoami", idempotent=True))
            await trio.sleep(2)
            (hedger,) = cluster._dispatcher.hedges._hedgers.values()
            held, wait, due = len(hedger.held), hedger.held_wait, hedger.held_due
            now = trio.current_time()
            nursery.cancel_scope.cancel()
        stats = cluster.statistics()
    assert stats.hedges_sent == 0 and stats.hedges_skipped == 6
    assert held == 6
    assert wait == 8 * 0.01 and now < due <= now + wait


async def test_a_hedge_counts_as_an_attempt(autojump_clock: object) -> None:
    fake = FakeCluster(3, service_time=1.0)
    async with fake.open(hedging=FIXED, max_attempts=2, connections_per_node=1) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        outcome: list[BaseException] = []

        async def read() -> None:
            try:
                await cluster.fetchval("whoami", idempotent=True)
            except pa.PicodataError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(0.1)  # the first attempt and its hedge both run now
            running = [n for n in fake.nodes if fake[n].executed["whoami"]]
            assert len(running) == 2
            for name in running:  # both break: that is max_attempts=2 attempts
                fake[name].down()
        stats = cluster.statistics()
    (third,) = set(fake.nodes) - set(running)
    assert stats.hedges_sent == 1
    assert [type(e) for e in outcome] == [pa.NoNodesAvailable]
    assert fake[third].executed["whoami"] == 0  # never a third attempt


async def test_an_attempt_that_breaks_waits_for_its_hedge(autojump_clock: object) -> None:
    fake = FakeCluster(3, service_time=1.0)
    async with fake.open(hedging=FIXED, connections_per_node=1) as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        async with trio.open_nursery() as nursery:
            answer: list[str] = []

            async def read() -> None:
                answer.append(await cluster.fetchval("whoami", idempotent=True))

            nursery.start_soon(read)
            await trio.sleep(0.1)
            first, hedged = sorted(n for n in fake.nodes if fake[n].executed["whoami"])
            fake[first].down()  # the hedge still runs: no retry elsewhere
        stats = cluster.statistics()
    assert answer == [hedged]
    assert stats.requests_retried == 0 and stats.hedges_won == 1
    assert sum(fake[n].executed["whoami"] for n in fake.nodes) == 2


bound_every_test(globals())
