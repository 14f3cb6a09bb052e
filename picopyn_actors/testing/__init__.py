"""A local stand-in for a Picodata cluster, for tests, demos and benchmarks.

:class:`LocalCluster` runs N real PostgreSQL servers that impersonate
Picodata nodes: the same system tables on every server, a per-server
``pico_instance_uuid()``, and a governor that writes state changes to every
live server. In strict mode (the default) a pgproto front before each server
speaks Picodata's dialect: startup options, no cancel, statement invalidation
(42999), stub transactions, statement limits (see :class:`FrontStatistics`
for what it counts). Linux only; needs the PostgreSQL 15 server binaries.

Example::

    from picopyn_actors.testing import LocalCluster

    with LocalCluster(nodes=3) as lc:
        lc.stop("i2")       # target Offline, then current Offline
        lc.start("i2")      # Online again, incarnation raised

The pytest plugin (``picopyn_actors.testing.pytest_plugin``) provides the
``local_cluster``, ``shared_cluster`` and ``make_cluster`` fixtures.

:class:`FakeCluster` is the other stand-in: a fake backend in pure trio, no
sockets, for unit tests of actor logic in virtual time and for measuring the
client's own cost (``open_cluster(fake.dsn(), backend=fake)``).
"""

from ._catalog import NodeHandle as NodeHandle
from ._catalog import StateName as StateName
from ._cluster import CatalogLock as CatalogLock
from ._cluster import LocalCluster as LocalCluster
from ._errors import LocalClusterError as LocalClusterError
from ._errors import UnknownNodeError as UnknownNodeError
from ._fake import FakeCluster as FakeCluster
from ._statistics import FrontStatistics as FrontStatistics

__all__ = [
    "CatalogLock",
    "FakeCluster",
    "FrontStatistics",
    "LocalCluster",
    "LocalClusterError",
    "NodeHandle",
    "StateName",
    "UnknownNodeError",
]
