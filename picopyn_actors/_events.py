"""Node states, node events and the health stream.

Every change of a node's client-side state is published as a
:class:`NodeEvent`. Subscribers read them through :meth:`Cluster.events`;
a subscriber that reads too slowly never blocks an actor: its bounded buffer
overflows, and the next thing it reads is an :class:`EventsDropped` marker
saying how many events it missed.

Example::

    async with cluster.events() as events:
        async for event in events:
            if isinstance(event, pa.NodeEvent) and event.new is pa.NodeState.DOWN:
                log.warning("%s is down: %s", event.node, event.reason)
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio


class NodeState(enum.Enum):
    """A node's state as the client sees it (not the catalog's).

    * ``CONNECTING``: opening connections; not routable yet.
    * ``UP``: routable.
    * ``SUSPECT``: a connection broke; new requests wait while it is checked.
    * ``DOWN``: unreachable or hung; reconnecting with backoff.
    * ``QUARANTINED``: went down too often; left alone for ``quarantine_time``.
    * ``DRAINING``: leaving (catalog Offline or Expelled); in-flight work finishes.
    * ``RETIRED``: gone; its actor has stopped.
    """

    CONNECTING = "connecting"
    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"
    QUARANTINED = "quarantined"
    DRAINING = "draining"
    RETIRED = "retired"

    @property
    def routable(self) -> bool:
        """New requests may go to a node in this state."""
        return self is NodeState.UP

    @property
    def hopeful(self) -> bool:
        """The node may take requests soon: waiting for it is worth it."""
        return self in (NodeState.UP, NodeState.SUSPECT, NodeState.CONNECTING)


@attrs.frozen
class NodeEvent:
    """A node changed state.

    Attributes:
        node: the node's name.
        old: the state before.
        new: the state now.
        reason: why, in words (``"probe timed out after 1.0s"``).
        at: ``trio.current_time()`` of the change.
    """

    node: str
    old: NodeState
    new: NodeState
    reason: str
    at: float


@attrs.frozen
class EventsDropped:
    """Overflow marker: this subscriber missed ``count`` events because it read too slowly."""

    count: int
    at: float


Event = NodeEvent | EventsDropped


@attrs.define(eq=False)
class _Subscriber:
    send: trio.MemorySendChannel[Event]
    dropped: int = 0


@attrs.define(eq=False)
class EventHub:
    """Fans events out to subscribers without ever blocking the publisher."""

    buffer: int
    _subscribers: list[_Subscriber] = attrs.field(init=False, factory=list)
    published: int = attrs.field(init=False, default=0)
    _closed: bool = attrs.field(init=False, default=False)

    def publish(self, event: NodeEvent) -> None:
        """Hand ``event`` to every subscriber; a full subscriber counts a drop."""
        self.published += 1
        for sub in self._subscribers:
            try:
                if sub.dropped:
                    sub.send.send_nowait(EventsDropped(sub.dropped, event.at))
                    sub.dropped = 0
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                sub.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[trio.MemoryReceiveChannel[Event]]:
        send, receive = trio.open_memory_channel[Event](self.buffer)
        sub = _Subscriber(send)
        if self._closed:
            send.close()  # the stream has ended: iteration stops at once
        else:
            self._subscribers.append(sub)
        try:
            async with receive:
                yield receive
        finally:
            if sub in self._subscribers:
                self._subscribers.remove(sub)
            send.close()

    def close(self) -> None:
        """End every subscription (now and later): their ``async for`` loops finish."""
        self._closed = True
        for sub in self._subscribers:
            sub.send.close()


@attrs.frozen
class NodeStatus:
    """A snapshot of one node, from :meth:`Cluster.nodes`.

    Attributes:
        name: instance name.
        uuid: instance uuid.
        address: pgproto address, ``host:port``.
        tier: tier name.
        replicaset: replicaset name.
        catalog_state: current state in the catalog, e.g. ``"Online(3)"``.
        state: the client's view, a :class:`NodeState`.
        connections: query connections open now.
        in_flight: requests on the node now.
        latency: latency EWMA in seconds (queries and probes), or ``None``.
        errors: errors seen on this node so far (connection and query).
        last_error: the last connection-level error, or ``None``.
        since: ``trio.current_time()`` of the last state change.
    """

    name: str
    uuid: str
    address: str
    tier: str
    replicaset: str
    catalog_state: str
    state: NodeState
    connections: int
    in_flight: int
    latency: float | None
    errors: int
    last_error: str | None
    since: float


@attrs.frozen
class NodeStatistics:
    """Counters of one node actor, from :meth:`Cluster.statistics`.

    Attributes:
        requests_ok: answered with a result.
        requests_failed: ended with an error on this node (query errors included).
        requests_retried: failed here and were sent to another node.
        restarts: times the node went down after being up.
        reconnects: connections (re)opened after the first ones.
    """

    requests_ok: int = 0
    requests_failed: int = 0
    requests_retried: int = 0
    restarts: int = 0
    reconnects: int = 0


@attrs.frozen
class ClusterStatistics:
    """A snapshot of the whole client, from :meth:`Cluster.statistics`.

    Totals include nodes that were retired since the cluster was opened.

    Attributes:
        nodes: per running node.
        requests_ok: requests answered with a result.
        requests_failed: requests that ended with an exception.
        requests_retried: attempts re-routed to another node.
        restarts: node restarts (down after up), all nodes.
        discovery_runs: discovery runs that succeeded.
        discovery_failures: discovery runs that failed on every host.
        queue_depth: requests waiting in the dispatcher for a free connection.
        events_published: node events published so far.
    """

    nodes: dict[str, NodeStatistics]
    requests_ok: int
    requests_failed: int
    requests_retried: int
    restarts: int
    discovery_runs: int
    discovery_failures: int
    queue_depth: int
    events_published: int
