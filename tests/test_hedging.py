"""Hedged reads on the stand-in: a sluggish node (paused 80 ms in every 200 ms)
must not own the tail. Correctness only here; the latency figures are the
benchmark's (bench/run.py, the sluggish workload)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import trio
from helpers import FAST, uuid_names

import picopyn_actors as pa
from picopyn_actors.testing import LocalCluster

WHOAMI = "SELECT pico_instance_uuid()"


def _duty_cycle(lc: LocalCluster, name: str, stop: threading.Event) -> None:
    """Pause ``name`` for 80 ms in every 200 ms until ``stop`` is set (in a thread)."""
    while not stop.is_set():
        lc.pause(name)
        time.sleep(0.08)  # the fault's own rhythm, not a wait for an event
        lc.resume(name)
        time.sleep(0.12)


@pytest.mark.deadline(60)
async def test_a_sluggish_node_is_hedged_around(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    names = uuid_names(lc)
    policy = pa.Hedging(budget=0.2)
    answered: Counter[str] = Counter()
    failed: list[BaseException] = []
    async with pa.open_cluster(lc.dsn, hedging=policy, connections_per_node=4, **FAST) as cluster:
        async with cluster.events() as events:
            while sum(n.state is pa.NodeState.UP for n in cluster.nodes()) < 3:
                await events.receive()
        stop = trio.Event()

        async def reader() -> None:
            while not stop.is_set():
                try:
                    uuid = await cluster.fetchval(WHOAMI, idempotent=True)
                except pa.PicodataError as exc:
                    failed.append(exc)
                else:
                    answered[names[uuid]] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(reader)
            await trio.sleep(1.0)  # latencies for the adaptive delay
            halt = threading.Event()
            nursery.start_soon(trio.to_thread.run_sync, _duty_cycle, lc, "i2", halt)
            await trio.sleep(4.0)
            halt.set()
            stop.set()
        await trio.sleep(0.5)
        stats = cluster.statistics()
    assert failed == [], failed[:3]
    assert stats.hedges_sent > 0 and stats.hedges_won > 0
    requests = stats.requests_ok + stats.requests_failed - stats.hedges_sent
    assert stats.hedges_sent <= policy.budget * requests + 2  # one per window besides
    assert stats.hedge_delay is not None and stats.hedge_delay >= policy.floor
    # The losers were not dropped: the sluggish node kept its connections.
    assert stats.nodes["i2"].reconnects == 0
    assert answered["i1"] and answered["i3"]
