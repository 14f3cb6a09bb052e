"""pytest fixtures that run a stand-in Picodata cluster (see :class:`LocalCluster`).

Registered as a ``pytest11`` entry point, so installing picopyn_actors makes
the fixtures available:

- ``local_cluster``: a fresh 3-node strict cluster for one test; break it at will.
- ``shared_cluster``: one 3-node strict cluster for the whole session, for
  read-only tests. Do not kill, stop, pause or change its nodes.

Strict clusters put a pgproto front before each server, so clients meet
Picodata's dialect (startup options, 42999, no cancel, stub transactions);
``make_cluster(strict=False)`` is bare PostgreSQL.
- ``make_cluster``: a factory, ``make_cluster(nodes=4, replication_factor=2)``,
  for tests that need other settings; every cluster it made is closed after
  the test.

Example::

    async def test_sees_three_nodes(local_cluster):
        ...

Fixtures are synchronous: they start servers before the test's event loop
runs. From trio code, call the cluster's methods through
``trio.to_thread.run_sync`` (they block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ._cluster import LocalCluster

__all__ = ["local_cluster", "make_cluster", "shared_cluster"]

MakeCluster = Callable[..., LocalCluster]


@pytest.fixture
def local_cluster() -> Iterator[LocalCluster]:
    """A fresh 3-node strict cluster, closed after the test."""
    with LocalCluster(nodes=3, strict=True) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[LocalCluster]:
    """One 3-node strict cluster for the session. Read-only: never break its nodes."""
    with LocalCluster(nodes=3, strict=True) as cluster:
        yield cluster


@pytest.fixture
def make_cluster() -> Iterator[MakeCluster]:
    """A factory of started clusters (``LocalCluster`` arguments), all closed after the test."""
    made: list[LocalCluster] = []

    def make(**kwargs: Any) -> LocalCluster:
        cluster = LocalCluster(**kwargs)
        made.append(cluster)
        return cluster.start_cluster()

    try:
        yield make
    finally:
        for cluster in reversed(made):
            cluster.close()
