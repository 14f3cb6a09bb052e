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
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio


class NodeState(enum.Enum):
    """A node's state as the client sees it (not the catalog's).

    * ``CONNECTING``: opening its first connections; not routable yet.
    * ``UP``: routable.
    * ``SUSPECT``: a connection broke; new requests wait while it is reopened.
    * ``DOWN``: unreachable or hung; reconnecting with backoff. Reconnect
      attempts are not states: :class:`NodeStatus` counts them.
    * ``QUARANTINED``: went down too often; left alone for ``quarantine_time``.
    * ``DRAINING``: leaving (catalog Offline or Expelled) while requests run on
      it; they finish, nothing new is sent.
    * ``RETIRED``: gone; its actor has stopped.

    The allowed changes are :data:`TRANSITIONS`; any other is a bug.
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
        return self is UP

    @property
    def hopeful(self) -> bool:
        """The node may take requests soon: waiting for it is worth it."""
        return self in _HOPEFUL

    def can_become(self, new: NodeState) -> bool:
        """``self -> new`` is in :data:`TRANSITIONS`."""
        return new in TRANSITIONS[self]


# Members as module names, for the request path: on Python 3.11 an enum class
# has a __getattr__ (removed in 3.12), which makes each ``NodeState.X`` a slow
# attribute lookup (some 800 instructions); a module name is one load.
UP = NodeState.UP
_HOPEFUL = (NodeState.UP, NodeState.SUSPECT, NodeState.CONNECTING)  # (a tuple: no hashing)


_S = NodeState
#: Every state change a node actor may make (docs/concepts.md draws this table).
TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    _S.CONNECTING: frozenset({_S.UP, _S.DOWN, _S.RETIRED}),
    _S.UP: frozenset({_S.SUSPECT, _S.DOWN, _S.QUARANTINED, _S.DRAINING, _S.RETIRED}),
    _S.SUSPECT: frozenset({_S.UP, _S.DOWN, _S.QUARANTINED, _S.DRAINING, _S.RETIRED}),
    _S.DOWN: frozenset({_S.UP, _S.RETIRED}),
    _S.QUARANTINED: frozenset({_S.UP, _S.DOWN, _S.RETIRED}),
    _S.DRAINING: frozenset({_S.RETIRED}),
    _S.RETIRED: frozenset(),
}
del _S


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
    """Overflow marker: this subscriber missed ``count`` events because it read too slowly.

    It stands where the missed events would have been: after the events the
    subscriber had not read yet, before any event published after them.

    Attributes:
        count: how many events were missed.
        at: ``trio.current_time()`` of the last missed event.
    """

    count: int
    at: float


Event = NodeEvent | EventsDropped


class EventStream(trio.abc.ReceiveChannel[Event]):
    """One subscriber's events, from :meth:`Cluster.events`.

    A bounded buffer that never blocks the publisher: when it is full, new
    events are counted instead of kept, and the subscriber's next read after
    the events it already has returns one :class:`EventsDropped` for all of
    them, at once, without waiting for another event.

    Use it like a trio receive channel: ``async for event in stream``,
    ``await stream.receive()`` (it raises ``trio.EndOfChannel`` after the
    cluster closed and every event was read) or ``stream.receive_nowait()``.
    """

    def __init__(self, buffer: int) -> None:
        self._buffer = buffer
        self._queue: deque[NodeEvent] = deque()
        self._dropped = 0
        self._dropped_at = 0.0
        self._waiting = trio.lowlevel.ParkingLot()
        self._ended = False  # no more events will come
        self._closed = False  # the subscriber closed it

    def _put(self, event: NodeEvent) -> None:
        if self._ended:
            return
        if self._dropped or len(self._queue) >= self._buffer:
            self._dropped += 1
            self._dropped_at = event.at
        else:
            self._queue.append(event)
        self._waiting.unpark_all()

    def _end(self) -> None:
        self._ended = True
        self._waiting.unpark_all()

    def receive_nowait(self) -> Event:
        """The next event, or raise ``trio.WouldBlock`` (``trio.EndOfChannel`` at the end)."""
        if self._closed:
            raise trio.ClosedResourceError("this event stream was closed")
        if self._queue:
            return self._queue.popleft()
        if self._dropped:
            marker = EventsDropped(self._dropped, self._dropped_at)
            self._dropped = 0
            return marker
        if self._ended:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> Event:
        """Wait for the next event. Cancellation leaves the stream as it was."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                event = self.receive_nowait()
            except trio.WouldBlock:
                await self._waiting.park()
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return event

    async def aclose(self) -> None:
        self._closed = True
        self._waiting.unpark_all()
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class EventHub:
    """Fans events out to subscribers without ever blocking the publisher."""

    buffer: int
    _subscribers: list[EventStream] = attrs.field(init=False, factory=list)
    published: int = attrs.field(init=False, default=0)
    _closed: bool = attrs.field(init=False, default=False)

    def publish(self, event: NodeEvent) -> None:
        """Hand ``event`` to every subscriber; a full subscriber counts a drop."""
        self.published += 1
        for stream in self._subscribers:
            stream._put(event)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[EventStream]:
        """A new subscriber's stream, for the duration of the block."""
        stream = EventStream(self.buffer)
        if self._closed:
            stream._end()  # the stream has ended: iteration stops at once
        else:
            self._subscribers.append(stream)
        try:
            yield stream
        finally:
            if stream in self._subscribers:
                self._subscribers.remove(stream)
            stream._end()
            stream._closed = True

    def close(self) -> None:
        """End every subscription (now and later): their ``async for`` loops finish."""
        self._closed = True
        for stream in self._subscribers:
            stream._end()


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
        attempts: failed reconnect attempts in a row (0 while it is up).
        next_attempt: ``trio.current_time()`` of the next reconnect attempt,
            or ``None`` when none is planned.
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
    attempts: int = 0
    next_attempt: float | None = None


@attrs.frozen
class NodeStatistics:
    """Counters of one node actor, from :meth:`Cluster.statistics`.

    Attributes:
        requests_ok: answered with a result.
        requests_failed: ended with an error on this node (query errors included).
        requests_retried: failed here and were sent to another node.
        restarts: times the node went down after being up.
        reconnects: connections (re)opened after the first ones.
        statements_invalidated: requests the node rejected with 42999 (a schema
            change invalidated their prepared statement) and that were
            prepared and run again.
    """

    requests_ok: int = 0
    requests_failed: int = 0
    requests_retried: int = 0
    restarts: int = 0
    reconnects: int = 0
    statements_invalidated: int = 0


@attrs.frozen
class ClusterStatistics:
    """A snapshot of the whole client, from :meth:`Cluster.statistics`.

    Totals include nodes that were retired since the cluster was opened.

    Attributes:
        nodes: per running node.
        requests_ok: requests answered with a result.
        requests_failed: requests that ended with an exception.
        requests_retried: attempts re-routed to another node.
        statements_invalidated: requests prepared and run again after 42999.
        views_rejected: catalog views discovery did not act on (not sane, or
            they would stop serving nodes and no second source agreed).
        discovery_connects: connections discovery opened (it keeps one).
        requests_routed: keyed requests (``bucket=``) sent to the node that
            owns their bucket.
        routing_fallbacks: keyed requests sent elsewhere in the bucket's tier,
            because the owner could not take them (down, draining, unknown
            yet); Picodata forwards them.
        hedges_sent: hedged requests: second attempts sent because the first
            had not answered after the hedge delay.
        hedges_won: hedges that answered first.
        hedges_refused: hedges the budget refused.
        hedges_skipped: late requests not hedged when due, because every node
            they could go to had a late request of its own (the whole client
            or cluster was slow, not one node); each is held and hedged later
            if a node it may go to is no longer late.
        hedges_not_stalled: late requests that answered without a hedge,
            because their node kept answering others while they were late
            (``only_stalled``; counted when they answer). One whose node
            stalls first is hedged instead.
        hedge_delay: the hedge delay in force, in seconds (``None``: no hedging,
            or not enough latencies measured yet).
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
    statements_invalidated: int = 0
    views_rejected: int = 0
    discovery_connects: int = 0
    requests_routed: int = 0
    routing_fallbacks: int = 0
    hedges_sent: int = 0
    hedges_won: int = 0
    hedges_refused: int = 0
    hedges_skipped: int = 0
    hedges_not_stalled: int = 0
    hedge_delay: float | None = None
