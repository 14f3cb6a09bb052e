"""Bucket routing without a server: the pure routing data, and the dispatcher's
choices on the fake backend in virtual time."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from fakes import FakeCluster, bound_every_test, wait_all_states, wait_state

import picopyn_actors as pa
from picopyn_actors._routing import BucketMap, Routing, buckets_query, parse_buckets

UUIDS = {"u1": "r1", "u2": "r2"}
RANGES = [
    {"bucket_id_start": 1, "bucket_id_end": 10, "current_replicaset_uuid": "u1"},
    {"bucket_id_start": 11, "bucket_id_end": 20, "current_replicaset_uuid": "u2"},
]
REPLICASETS = [
    {"name": "r1", "uuid": "u1", "current_master_name": "i1"},
    {"name": "r2", "uuid": "u2", "current_master_name": "i2"},
]
TIERS = [{"name": "default", "bucket_count": 20}]


def test_a_bucket_map_finds_the_owner_of_every_bucket() -> None:
    bucket_map = parse_buckets("default", 20, json.dumps(list(reversed(RANGES))), UUIDS)
    assert [bucket_map.owner(b) for b in (1, 10, 11, 20)] == ["r1", "r1", "r2", "r2"]
    assert bucket_map.owner(0) is None and bucket_map.owner(21) is None


@pytest.mark.parametrize(
    "raw",
    [
        "{}",
        json.dumps([{"bucket_id_start": 1}]),
        json.dumps([{**RANGES[0], "current_replicaset_uuid": "zz"}]),
    ],
)
def test_an_unreadable_bucket_answer_is_an_error(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_buckets("default", 20, raw, UUIDS)


def test_a_failed_refresh_keeps_the_last_good_map() -> None:
    first, problems = Routing().refreshed(REPLICASETS, TIERS, {"default": json.dumps(RANGES)})
    assert problems == {}
    assert first.master_of("default", 15) == "i2"
    moved = [{**RANGES[1], "current_replicaset_uuid": "u1"}, RANGES[0]]
    switched = [REPLICASETS[0], {**REPLICASETS[1], "current_master_name": "i4"}]
    second, problems = first.refreshed(
        switched, TIERS, {"default": RuntimeError("rebalance in progress")}
    )
    assert problems == {"default": "rebalance in progress"}
    assert second.owner("default", 15) == "r2"  # the last good map
    assert second.master_of("default", 15) == "i4"  # the new master is known at once
    third, _ = second.refreshed(switched, TIERS, {"default": json.dumps(moved)})
    assert third.master_of("default", 15) == "i1"


def test_the_tier_is_quoted_in_the_bucket_query() -> None:
    assert buckets_query("a'b") == "SELECT _pico_bucket('a''b')"


def _route_buckets(cluster: pa.Cluster) -> None:
    """Buckets 1..10 in r1 (master i1), 11..20 in r2 (master i2)."""
    bucket_map = BucketMap("default", 20, (1, 11), (10, 20), ("r1", "r2"))
    cluster._dispatcher.routing = Routing(
        {"default": bucket_map}, {"r1": "i1", "r2": "i2"}, {"default": 20}
    )


async def test_a_keyed_request_goes_to_its_owner(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open() as cluster:
        await wait_all_states(cluster, fake.nodes, pa.NodeState.UP)
        _route_buckets(cluster)
        low = [await cluster.fetchval("whoami", bucket=pa.Bucket("default", 3)) for _ in range(6)]
        high = [await cluster.fetchval("whoami", bucket=pa.Bucket("default", 17)) for _ in range(6)]
        stats = cluster.statistics()
    assert low == ["i1"] * 6 and high == ["i2"] * 6
    assert stats.requests_routed == 12 and stats.routing_fallbacks == 0


async def test_a_busy_owner_is_waited_for_not_bypassed(autojump_clock: object) -> None:
    fake = FakeCluster(3, service_time=1.0)
    async with fake.open(connections_per_node=1) as cluster:
        await wait_all_states(cluster, fake.nodes, pa.NodeState.UP)
        _route_buckets(cluster)
        answers: list[str] = []

        async def ask() -> None:
            answers.append(await cluster.fetchval("whoami", bucket=pa.Bucket("default", 3)))

        async with trio.open_nursery() as nursery:
            for _ in range(3):  # one connection on i1: they take turns there
                nursery.start_soon(ask)
        stats = cluster.statistics()
    assert answers == ["i1"] * 3
    assert stats.routing_fallbacks == 0


async def test_a_down_owner_falls_back_to_the_tier_and_is_counted(autojump_clock: object) -> None:
    fake = FakeCluster(3)
    async with fake.open() as cluster:
        await wait_all_states(cluster, fake.nodes, pa.NodeState.UP)
        _route_buckets(cluster)
        fake["i1"].down()
        await wait_state(cluster, "i1", pa.NodeState.DOWN)
        answers = {
            await cluster.fetchval("whoami", bucket=pa.Bucket("default", 3)) for _ in range(6)
        }
        stats = cluster.statistics()
    assert answers <= {"i2", "i3"}
    assert stats.routing_fallbacks == 6 and stats.requests_failed == 0


async def test_a_keyed_request_before_the_map_goes_anywhere_in_the_tier(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(2)
    async with fake.open() as cluster:
        await wait_all_states(cluster, fake.nodes, pa.NodeState.UP)
        assert await cluster.fetchval("whoami", bucket=pa.Bucket("default", 3)) in {"i1", "i2"}
        assert cluster.statistics().routing_fallbacks == 1


async def test_keyed_requests_wait_in_their_owners_line_beside_unkeyed_ones(
    autojump_clock: object,
) -> None:
    """Many keyed requests for one busy owner, and unkeyed ones beside them: the
    keyed ones are each answered by the owner, the unkeyed ones are not held up
    behind them (they take the other nodes), and the line counts in queue_depth."""
    fake = FakeCluster(3, service_time=0.1)
    async with fake.open(connections_per_node=2, acquire_timeout=60.0) as cluster:
        await wait_all_states(cluster, fake.nodes, pa.NodeState.UP)
        _route_buckets(cluster)
        keyed: list[str] = []
        plain: list[tuple[str, float]] = []
        depth: list[int] = []
        start = trio.current_time()

        async def ask_keyed() -> None:
            keyed.append(await cluster.fetchval("whoami", bucket=pa.Bucket("default", 3)))

        async def ask_plain() -> None:
            answer = await cluster.fetchval("whoami")
            plain.append((answer, trio.current_time() - start))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(ask_keyed)
            await trio.testing.wait_all_tasks_blocked()
            depth.append(cluster.statistics().queue_depth)
            for _ in range(4):
                nursery.start_soon(ask_plain)
        stats = cluster.statistics()
    assert keyed == ["i1"] * 20
    assert depth == [18]  # two run on i1, the others wait in its line
    assert {answer for answer, _ in plain} <= {"i2", "i3"}
    # At once, not after i1 next frees a slot (0.1 s), nor after the 20 keyed ones.
    assert max(took for _, took in plain) < 0.15
    assert stats.requests_routed == 20 and stats.routing_fallbacks == 0
    assert stats.queue_depth == 0


async def test_a_keyed_request_in_a_line_times_out_like_any_other(autojump_clock: object) -> None:
    fake = FakeCluster(2, service_time=10.0)
    async with fake.open(connections_per_node=1, acquire_timeout=1.0) as cluster:
        await wait_all_states(cluster, fake.nodes, pa.NodeState.UP)
        _route_buckets(cluster)
        errors: list[BaseException] = []

        async def ask() -> None:
            try:
                await cluster.fetchval("whoami", bucket=pa.Bucket("default", 3))
            except pa.AcquireTimeout as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(ask)
            await trio.sleep(1.5)
            assert len(errors) == 2  # the two in i1's line, after acquire_timeout
            assert cluster.statistics().queue_depth == 0
            nursery.cancel_scope.cancel()


async def test_an_owner_going_down_sends_its_line_to_the_tier(autojump_clock: object) -> None:
    fake = FakeCluster(3, service_time=1.0)
    async with fake.open(connections_per_node=1, acquire_timeout=60.0) as cluster:
        await wait_all_states(cluster, fake.nodes, pa.NodeState.UP)
        _route_buckets(cluster)
        answers: list[str] = []

        async def ask() -> None:
            answers.append(
                await cluster.fetchval("whoami", bucket=pa.Bucket("default", 3), idempotent=True)
            )

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            assert cluster.statistics().queue_depth == 4
            fake["i1"].down()
        stats = cluster.statistics()
    assert len(answers) == 5 and set(answers) <= {"i2", "i3"}
    assert stats.routing_fallbacks == 5 and stats.requests_failed == 0


bound_every_test(globals())
