"""Cancellation from outside never hangs, with every bridge (issue: cancellation-safe).

The sweep cancels ``open_cluster`` after 0, 1, 2 ... 50 ms, on a healthy
cluster and with one node paused (it accepts TCP and never answers), in a
child process per bridge: a hang there is a failed test, not a stalled suite.
A cancelled open reports the cancellation, not what the cancellation broke.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from helpers import FAST

import picopyn_actors as pa
from picopyn_actors._bridge import BackendBroken
from picopyn_actors._dsn import Address
from picopyn_actors.testing import FakeCluster, LocalCluster
from picopyn_actors.testing._fake import FakeConnection

SWEEP = Path(__file__).with_name("cancel_sweep.py")
MAX_MS = 50
# A cancelled open must return promptly: the cancel point plus this much.
# Generous, because the machine is shared; a hang takes forever, not seconds.
SLACK = 2.5


@pytest.fixture(scope="module")
def cluster_for_sweeps() -> Iterator[LocalCluster]:
    """One cluster for this module; a test that pauses a node resumes it."""
    with LocalCluster(nodes=3) as lc:
        yield lc


@pytest.fixture
def paused_i2(cluster_for_sweeps: LocalCluster) -> Iterator[LocalCluster]:
    cluster_for_sweeps.pause("i2")
    try:
        yield cluster_for_sweeps
    finally:
        cluster_for_sweeps.resume("i2")


def _sweep(dsn: str, bridge: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(SWEEP), dsn, bridge, str(MAX_MS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


BRIDGES = ["embedded", "thread", "trio-asyncio"]


# auto+trio-asyncio: the default bridge inside a running trio-asyncio loop.
@pytest.mark.parametrize("bridge", [*BRIDGES, "auto+trio-asyncio"])
@pytest.mark.parametrize("paused", [False, True], ids=["healthy", "paused-node"])
def test_cancel_sweep_never_hangs(
    cluster_for_sweeps: LocalCluster, request: pytest.FixtureRequest, bridge: str, paused: bool
) -> None:
    lc = request.getfixturevalue("paused_i2") if paused else cluster_for_sweeps
    result = _sweep(lc.dsn, bridge)
    took = result["took"]
    assert isinstance(took, list) and len(took) == MAX_MS + 1
    slow = {ms: round(t, 3) for ms, t in enumerate(took) if t > ms / 1000 + SLACK}
    assert not slow, f"cancelled opens that took too long (ms: seconds): {slow}"
    assert result["sockets_left"] == 0
    assert result["threads_left"] == []


@pytest.mark.parametrize("bridge", BRIDGES)
async def test_cancel_mid_query_on_a_pinned_connection(
    cluster_for_sweeps: LocalCluster, bridge: str
) -> None:
    with trio.move_on_after(10) as outer:
        with trio.move_on_after(0.3) as inner:
            async with (
                pa.open_cluster(cluster_for_sweeps.dsn, bridge=bridge, **FAST) as cluster,
                cluster.connection() as conn,
            ):
                await conn.fetchval("SELECT pg_sleep(3)")
    assert inner.cancelled_caught
    assert not outer.cancelled_caught


@pytest.mark.parametrize("bridge", BRIDGES)
async def test_shutdown_by_timeout_with_a_paused_node(paused_i2: LocalCluster, bridge: str) -> None:
    with trio.move_on_after(10) as outer:
        with trio.move_on_after(1.5) as inner:
            async with pa.open_cluster(paused_i2.dsn, bridge=bridge, **FAST) as cluster:
                while True:
                    await cluster.fetchval("SELECT 1", idempotent=True)
    assert inner.cancelled_caught
    assert not outer.cancelled_caught


class _CancelledWhileConnecting(FakeCluster):
    """Every connect cancels ``scope`` and then fails at once, with no checkpoint
    between: what the thread bridge does when the asyncio thread closes a
    connection while trio is cancelling the caller."""

    scope: trio.CancelScope | None = None

    async def connect(self, address: Address) -> FakeConnection:
        assert self.scope is not None
        self.scope.cancel()
        raise BackendBroken("connection is closed", sent=False)


async def test_a_cancelled_open_reports_the_cancel_not_the_failures_it_caused() -> None:
    fake = _CancelledWhileConnecting(3)
    with trio.CancelScope() as scope:
        fake.scope = scope
        async with pa.open_cluster(fake.dsn(), backend=fake, **FAST):
            pytest.fail("opened a cluster that cannot connect")
    assert scope.cancelled_caught
