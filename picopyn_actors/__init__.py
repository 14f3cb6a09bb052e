"""picopyn_actors: a self-healing trio client for Picodata clusters.

A supervisor actor rediscovers the cluster periodically, node actors own each
node's connections and probe its health, and a dispatcher actor balances
requests over the healthy nodes. Everything lives in the caller's nursery::

    import trio
    import picopyn_actors as pa

    async def main():
        async with pa.open_cluster("postgresql://admin:pw@127.0.0.1:4327") as cluster:
            one = await cluster.fetchval("SELECT 1", idempotent=True)
            states = {node.name: node.state.value for node in cluster.nodes()}

    trio.run(main)
"""

import logging as _logging

from ._bucket import Bucket as Bucket
from ._bucket import ShardingKey as ShardingKey
from ._bucket import bucket_id as bucket_id
from ._bucket import sharding_key as sharding_key
from ._cluster import Cluster as Cluster
from ._cluster import PinnedConnection as PinnedConnection
from ._cluster import PreparedStatement as PreparedStatement
from ._cluster import open_cluster as open_cluster
from ._config import ClusterConfig as ClusterConfig
from ._dsn import Address as Address
from ._errors import AcquireTimeout as AcquireTimeout
from ._errors import ClusterClosed as ClusterClosed
from ._errors import ConfigError as ConfigError
from ._errors import NoNodesAvailable as NoNodesAvailable
from ._errors import OutcomeUnknown as OutcomeUnknown
from ._errors import PicodataError as PicodataError
from ._errors import QueryError as QueryError
from ._errors import StrategyError as StrategyError
from ._events import ClusterStatistics as ClusterStatistics
from ._events import EventsDropped as EventsDropped
from ._events import EventStream as EventStream
from ._events import NodeEvent as NodeEvent
from ._events import NodeState as NodeState
from ._events import NodeStatistics as NodeStatistics
from ._events import NodeStatus as NodeStatus
from ._hedging import Hedging as Hedging
from ._strategies import Candidate as Candidate
from ._strategies import Fastest as Fastest
from ._strategies import LeastInFlight as LeastInFlight
from ._strategies import Random as Random
from ._strategies import RoundRobin as RoundRobin
from ._strategies import Strategy as Strategy
from ._version import __version__ as __version__
from .compat import Client as Client

# A library installs no handler of its own: silent unless the program configures logging.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "AcquireTimeout",
    "Address",
    "Bucket",
    "Candidate",
    "Client",
    "Cluster",
    "ClusterClosed",
    "ClusterConfig",
    "ClusterStatistics",
    "ConfigError",
    "EventStream",
    "EventsDropped",
    "Fastest",
    "Hedging",
    "LeastInFlight",
    "NoNodesAvailable",
    "NodeEvent",
    "NodeState",
    "NodeStatistics",
    "NodeStatus",
    "OutcomeUnknown",
    "PicodataError",
    "PinnedConnection",
    "PreparedStatement",
    "QueryError",
    "Random",
    "RoundRobin",
    "ShardingKey",
    "Strategy",
    "StrategyError",
    "bucket_id",
    "open_cluster",
    "sharding_key",
]
