"""Bucket-aware routing on the stand-in: 2 replicasets of 2 nodes each (4 nodes,
replication_factor=2); keyed requests go to the master that owns the bucket."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import trio
from helpers import FAST, blocking, uuid_names

import picopyn_actors as pa
from picopyn_actors.testing import LocalCluster

TABLE = "kv"
WHOAMI = "SELECT pico_instance_uuid()"


@pytest.fixture
def sharded(make_cluster: Any) -> LocalCluster:
    lc: LocalCluster = make_cluster(nodes=4, replication_factor=2)
    lc.create_sharded_table(TABLE, {"k": "string", "n": "integer", "v": "string"}, key=["k", "n"])
    return lc


def masters(lc: LocalCluster) -> dict[str, str]:
    """replicaset name -> its master's name, as the stand-in's governor has them."""
    return {r: lc._model.masters(r)[0] for r in lc._model.replicaset_names()}


def owner_master(lc: LocalCluster, bucket: pa.Bucket) -> str:
    return masters(lc)[lc.bucket_replicaset(bucket.bucket_id)]


def random_keys(count: int, seed: int = 1) -> list[tuple[str, int]]:
    rand = random.Random(seed)
    return [(f"key-{rand.randrange(10**9)}", rand.randrange(-(2**40), 2**40)) for _ in range(count)]


async def test_every_keyed_request_goes_to_the_owning_master(sharded: LocalCluster) -> None:
    lc = sharded
    names = uuid_names(lc)
    async with pa.open_cluster(lc.dsn, **FAST) as cluster:
        keys = random_keys(1000)
        buckets = [await cluster.bucket(TABLE, k, n) for k, n in keys]
        answered = [names[await cluster.fetchval(WHOAMI, bucket=b)] for b in buckets]
        stats = cluster.statistics()
    wrong = [
        (b, a, owner_master(lc, b))
        for b, a in zip(buckets, answered, strict=True)
        if a != owner_master(lc, b)
    ]
    assert wrong == []
    assert set(answered) == set(masters(lc).values())  # both masters served
    assert stats.requests_routed == 1000 and stats.routing_fallbacks == 0
    # The bucket is Picodata's: the same as pure bucket_id() with the table's types.
    k, n = keys[0]
    assert buckets[0] == pa.Bucket("default", pa.bucket_id([k, n], ["string", "integer"], 3000))


async def test_bad_input_is_refused_at_bucket(sharded: LocalCluster) -> None:
    lc = sharded
    await blocking(
        lc.execute_everywhere,
        "CREATE TABLE plain (id int PRIMARY KEY); GRANT ALL ON plain TO PUBLIC",
    )
    async with pa.open_cluster(lc.dsn, **FAST) as cluster:
        with pytest.raises(pa.ConfigError, match="unknown table 'nope'"):
            await cluster.bucket("nope", 1)
        with pytest.raises(pa.ConfigError, match=r"2 column\(s\).*got 1 value"):
            await cluster.bucket(TABLE, "only-one")
        with pytest.raises(pa.ConfigError, match="column 'n'"):
            await cluster.bucket(TABLE, "k", "not an int")
        with pytest.raises(TypeError, match="bucket must be a Bucket"):
            await cluster.fetchval(WHOAMI, bucket=42)  # type: ignore[arg-type]
    async with pa.open_cluster(lc.dsn, tiers=["default"], **FAST) as cluster:
        assert (await cluster.bucket(TABLE, "k", 1)).tier == "default"


async def test_master_switch_and_rebalance_under_keyed_load(sharded: LocalCluster) -> None:
    lc = sharded
    names = uuid_names(lc)
    errors: list[BaseException] = []
    served: Counter[tuple[str, str]] = Counter()  # (phase, right or wrong)
    phase = "before"
    stop = trio.Event()
    async with pa.open_cluster(lc.dsn, **FAST) as cluster:
        keys = random_keys(200, seed=7)
        buckets = [await cluster.bucket(TABLE, k, n) for k, n in keys]

        async def reader(index: int) -> None:
            rand = random.Random(index)
            while not stop.is_set():
                bucket = rand.choice(buckets)
                try:
                    who = names[await cluster.fetchval(WHOAMI, bucket=bucket, idempotent=True)]
                except Exception as exc:
                    errors.append(exc)
                    continue
                served[phase, "right" if who == owner_master(lc, bucket) else "wrong"] += 1

        async with trio.open_nursery() as nursery:
            for index in range(10):
                nursery.start_soon(reader, index)
            await trio.sleep(1.0)
            phase = "settling"  # from the first change until one discovery run later
            replicaset = "r1"
            old_master = masters(lc)[replicaset]
            _, members = lc._model.replicaset_of(replicaset)
            (new_master,) = [m for m in members if m != old_master]
            await blocking(lc.set_master, replicaset, new_master)
            await blocking(lc.move_buckets, 1, 1500, "r2")
            await trio.sleep(FAST["discovery_interval"] * 2 + 0.5)  # within one discovery run
            phase = "after"
            await trio.sleep(1.5)
            stop.set()
        stats = cluster.statistics()
    assert errors == [], errors[:3]
    assert served["before", "wrong"] == 0 and served["before", "right"] > 100
    assert served["after", "wrong"] == 0 and served["after", "right"] > 100
    assert stats.requests_failed == 0


async def test_keyed_requests_fall_back_when_the_owner_is_down(sharded: LocalCluster) -> None:
    lc = sharded
    async with pa.open_cluster(lc.dsn, **FAST) as cluster, cluster.events() as events:
        keys = random_keys(300, seed=3)
        buckets = [await cluster.bucket(TABLE, k, n) for k, n in keys]
        victim = owner_master(lc, buckets[0])
        await blocking(lc.kill, victim)
        while pa.NodeState.UP in {n.state for n in cluster.nodes() if n.name == victim}:
            await events.receive()
        owned = [b for b in buckets if owner_master(lc, b) == victim]
        answers = [await cluster.fetchval(WHOAMI, bucket=b, idempotent=True) for b in owned]
        stats = cluster.statistics()
    assert owned and all(answers)
    assert stats.routing_fallbacks >= len(owned)
    assert stats.requests_failed == 0


async def test_a_custom_strategy_sees_the_bucket(sharded: LocalCluster) -> None:
    lc = sharded
    seen: list[pa.Bucket | None] = []

    def first(candidates: list[pa.Candidate], bucket: pa.Bucket | None = None) -> pa.Candidate:
        seen.append(bucket)
        return candidates[0]

    async with pa.open_cluster(lc.dsn, strategy=first, role="replica", **FAST) as cluster:
        bucket = await cluster.bucket(TABLE, "a", 1)
        await cluster.fetchval(WHOAMI, bucket=bucket)
        await cluster.fetchval("SELECT 1")
    assert bucket in seen and None in seen
