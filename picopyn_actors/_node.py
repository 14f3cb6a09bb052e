"""The node actor: one per routable node. It owns the node's state and its sessions.

The actor runs one :class:`~._session.Session` at a time. A session connects,
checks the server's identity, opens the query connections and probes the node;
it reports *facts* (a connection is ready, one broke, the node failed) and
wakes the actor, which alone decides the node's state: every change is checked
against :data:`~._events.TRANSITIONS`, logged, published as a
:class:`~._events.NodeEvent` and sent to the dispatcher as a
:class:`~._dispatcher.RouteUpdate`.

The actor's task waits for a control message from the supervisor
(:class:`Stop`, :class:`UpdateInfo`, :class:`Wake`, over a bounded channel:
the supervisor waits for room), for its next deadline (a reconnect attempt, or
the end of a drain), or for a wake-up from its session. A wake-up is a flag
and a cancelled wait, not a message, so it can neither block nor overflow.

When a session fails the node goes DOWN and reconnects with backoff
(:class:`~._backoff.Recovery`); reconnect attempts are not state changes: the
node stays DOWN, and :class:`~._events.NodeStatus` counts them. A node that
goes down more than ``max_restarts`` times within ``restart_window`` is
QUARANTINED for ``quarantine_time``.

Logs stay calm during an outage: one WARNING when a node goes down, DEBUG for
each failed attempt, a reminder WARNING every few minutes while it stays
down, and INFO when it is back, with the downtime and the attempts.

Example (inside the library)::

    actor = NodeActor(route_id, info, config, backend, updates, hub, closing, dispatcher)
    await nursery.start(actor.run)
    await actor.control.send(Wake())
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable

import attrs
import trio

from ._backoff import Recovery, backoff_delay
from ._bridge import Backend, BackendBroken
from ._config import ClusterConfig
from ._dispatcher import Dispatcher, Message, RouteRemoved, RouteUpdate
from ._events import EventHub, NodeEvent, NodeState, NodeStatistics, NodeStatus
from ._session import Session
from ._slot import Lease
from ._strategies import LATENCY_EWMA, Candidate
from ._topology import NodeInfo

__all__ = ["Lease", "NodeActor", "Stop", "UpdateInfo", "Wake", "backoff_delay"]

log = logging.getLogger(__name__)

# While a node stays down, a WARNING again at most this often (seconds).
REMIND_EVERY = 300.0
_LOUD = frozenset({NodeState.DOWN, NodeState.QUARANTINED})


# -- control messages from the supervisor ------------------------------------------


@attrs.frozen
class Wake:
    """The catalog says the node restarted: cut any backoff short."""


@attrs.frozen
class Stop:
    """Drain and retire: no new requests, in-flight ones finish."""

    reason: str


@attrs.frozen
class UpdateInfo:
    """A fresh catalog row for this node."""

    info: NodeInfo


Control = Wake | Stop | UpdateInfo


@attrs.define
class Outage:
    """How long a node has been down, and when it was last warned about (for calm logs)."""

    began: float | None = None
    warned: float = 0.0
    attempts: int = 0  # reconnect attempts made since it went down

    def start(self, now: float) -> None:
        """The node went down (or was quarantined) at ``now``, or an attempt failed."""
        if self.began is None:
            self.began = self.warned = now
            self.attempts = 0
        else:
            self.attempts += 1

    def remind(self, now: float) -> float | None:
        """Seconds down so far when another WARNING is due at ``now``, else ``None``."""
        if self.began is None or now - self.warned < REMIND_EVERY:
            return None
        self.warned = now
        return now - self.began

    def end(self, now: float) -> float | None:
        """The node is back: how long it was down (``None``: it was not)."""
        began, self.began = self.began, None
        return None if began is None else now - began


@attrs.define
class NodeCounters:
    """A node actor's counters (see :class:`~._events.NodeStatistics`)."""

    ok: int = 0
    failed: int = 0
    retried: int = 0
    restarts: int = 0
    reconnects: int = 0
    query_errors: int = 0
    connection_errors: int = 0
    invalidated: int = 0

    def snapshot(self) -> NodeStatistics:
        """The public, frozen view of these counters."""
        return NodeStatistics(
            requests_ok=self.ok,
            requests_failed=self.failed,
            requests_retried=self.retried,
            restarts=self.restarts,
            reconnects=self.reconnects,
            statements_invalidated=self.invalidated,
        )


@attrs.define(eq=False)
class NodeActor:
    """Owns one node's state and sessions; see the module docstring."""

    route_id: int
    info: NodeInfo
    config: ClusterConfig
    backend: Backend
    updates: trio.MemorySendChannel[Message]  # to the dispatcher's inbox
    hub: EventHub
    closing: trio.Event
    router: Dispatcher  # the dispatcher itself, for the synchronous data plane
    rand: random.Random = attrs.field(factory=random.Random)

    state: NodeState = attrs.field(init=False, default=NodeState.CONNECTING)
    since: float = attrs.field(init=False, factory=trio.current_time)
    last_error: str | None = attrs.field(init=False, default=None)
    connections: int = attrs.field(init=False, default=0)
    counters: NodeCounters = attrs.field(init=False, factory=NodeCounters)
    candidate: Candidate = attrs.field(init=False)
    #: The node may take new work: it is not leaving (not DRAINING or RETIRED).
    serving: bool = attrs.field(init=False, default=True)

    control: trio.MemorySendChannel[Control] = attrs.field(init=False)
    _inbox: trio.MemoryReceiveChannel[Control] = attrs.field(init=False)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _session: Session | None = attrs.field(init=False, default=None)
    _generation: int = attrs.field(init=False, default=0)
    _recovery: Recovery = attrs.field(init=False)
    _deadline: float = attrs.field(init=False, default=float("inf"))
    _wait: trio.CancelScope | None = attrs.field(init=False, default=None)
    _woken: bool = attrs.field(init=False, default=False)
    _seq: int = attrs.field(init=False, default=0)
    _outage: Outage = attrs.field(init=False, factory=Outage)
    # trio's clock, read directly: the hot path times every request.
    _clock: Callable[[], float] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.control, self._inbox = trio.open_memory_channel(16)
        self._recovery = Recovery.from_config(self.config, self.rand)
        self._clock = trio.lowlevel.current_clock().current_time
        info = self.info
        self.candidate = Candidate(info.name, info.address, info.tier, info.replicaset)
        self._update_info(info)

    @property
    def name(self) -> str:
        """The node's instance name."""
        return self.info.name

    @property
    def in_flight(self) -> int:
        """Requests on this node now (kept on the candidate ``LeastInFlight`` sees)."""
        return self.candidate.in_flight


    def __repr__(self) -> str:
        return (
            f"<NodeActor {self.name} {self.info.address} {self.state.value} "
            f"connections={self.connections} in_flight={self.in_flight}>"
        )

    # -- snapshots -------------------------------------------------------------

    def status(self) -> NodeStatus:
        """A frozen snapshot for :meth:`Cluster.nodes`."""
        info = self.info
        down = self.state in _LOUD
        return NodeStatus(
            name=info.name,
            uuid=info.uuid,
            address=str(info.address),
            tier=info.tier,
            replicaset=info.replicaset,
            catalog_state=str(info.current),
            state=self.state,
            connections=self.connections,
            in_flight=self.in_flight,
            latency=self.candidate.latency,  # the EWMA, kept once
            errors=self.counters.query_errors + self.counters.connection_errors,
            last_error=self.last_error,
            since=self.since,
            attempts=self._recovery.attempts if down else 0,
            next_attempt=self._deadline if down else None,
        )

    def statistics(self) -> NodeStatistics:
        """Counters for :meth:`Cluster.statistics`."""
        return self.counters.snapshot()

    # -- what sessions call -------------------------------------------------------

    def wake(self) -> None:
        """A session has news for the actor (never blocks, never raises)."""
        self._woken = True
        if self._wait is not None:
            self._wait.cancel()

    def observe_latency(self, seconds: float) -> None:
        """Fold one latency sample into the EWMA on the node's candidate (strategies read it)."""
        candidate = self.candidate
        old = candidate.latency
        candidate.latency = seconds if old is None else old + LATENCY_EWMA * (seconds - old)

    # -- the actor loop ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until retired or cancelled.

        On cancellation every request it holds ends: with :class:`ClusterClosed`
        when the cluster is closing, else it goes back to the dispatcher.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._announce()
                self._start_session("starting")
                task_status.started()
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            self._end_session("the node actor stopped")
            if self.state is not NodeState.RETIRED:
                self._set(NodeState.RETIRED, "stopped")
            with trio.CancelScope(shield=True), contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError
            ):
                await self.updates.send(RouteRemoved(self.route_id))

    async def _serve(self) -> None:
        while self.state is not NodeState.RETIRED:
            message: Control | None = None
            with trio.CancelScope(deadline=self._deadline) as self._wait:
                if not self._woken:
                    message = await self._inbox.receive()
            self._wait = None
            if message is not None:
                await self._on_control(message)
            self._woken = False
            await self._on_news()

    async def _on_control(self, message: Control) -> None:
        if isinstance(message, UpdateInfo):
            self._update_info(message.info)
        elif isinstance(message, Wake):
            if self.state is NodeState.DOWN:
                log.info("node %s: the catalog says it restarted; reconnecting now", self.name)
                self._recovery.wake()
                self._deadline = self._clock()
        elif isinstance(message, Stop):
            await self._drain(message.reason)

    def _update_info(self, info: NodeInfo) -> None:
        self.info = info
        candidate = self.candidate
        candidate.tier = info.tier
        candidate.replicaset = info.replicaset
        candidate.failure_domain = dict(info.failure_domain)

    async def _on_news(self) -> None:
        """Read the session's facts and the clock; change state accordingly."""
        session = self._session
        if session is not None and session.alive:
            if session.failure is not None:
                await self._failed(session.failure)
            else:
                if session.broken is not None:
                    error, session.broken = session.broken, None
                    session.repaired = False
                    if self.state is NodeState.UP:
                        await self._change(NodeState.SUSPECT, f"a connection broke: {error}")
                if session.ready and self.state in (
                    NodeState.CONNECTING,
                    NodeState.DOWN,
                    NodeState.QUARANTINED,
                ):
                    await self._up()
                elif session.repaired and self.state is NodeState.SUSPECT:
                    await self._change(NodeState.UP, "reconnected")
        if self.state is NodeState.DRAINING and self.in_flight == 0:
            await self._retire("drained")
        elif self._clock() >= self._deadline:
            await self._on_deadline()

    async def _on_deadline(self) -> None:
        self._deadline = float("inf")
        if self.state in _LOUD:
            self._start_session(f"attempt {self._recovery.attempts + 1}")
        elif self.state is NodeState.DRAINING:
            await self._retire(f"drain_timeout ({self.config.drain_timeout}s) passed")

    # -- state changes -------------------------------------------------------------

    def _set(self, new: NodeState, reason: str, level: int | None = None) -> None:
        """Change state, checked against the table; log it and publish the event."""
        old = self.state
        if not old.can_become(new):
            raise AssertionError(f"node {self.name}: {old.value} -> {new.value} is not allowed")
        self.state = new
        self.serving = new not in (NodeState.DRAINING, NodeState.RETIRED)
        self.since = now = self._clock()
        if level is None:
            level = logging.WARNING if new in _LOUD else logging.INFO
        log.log(
            level, "node %s (%s): %s -> %s: %s", self.name, self.info.address, old.value,
            new.value, reason,
        )
        self.hub.publish(NodeEvent(self.name, old, new, reason, now))

    async def _change(self, new: NodeState, reason: str, level: int | None = None) -> None:
        self._set(new, reason, level)
        await self._announce()

    async def _announce(self) -> None:
        """Tell the dispatcher the node's state (it keeps only the newest, by ``seq``)."""
        self._seq += 1
        await self.updates.send(
            RouteUpdate(self.route_id, self._seq, self.state, self.candidate, self.last_error)
        )

    async def _up(self) -> None:
        self._recovery.connected()
        attempts = self._outage.attempts + 1  # the failed ones, and this one
        downtime = self._outage.end(self._clock())
        if downtime is None:
            await self._change(NodeState.UP, "connected")
        else:
            tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
            await self._change(NodeState.UP, f"back after {downtime:.1f}s ({tries})")

    async def _failed(self, error: BackendBroken) -> None:
        self.last_error = error.message
        self.counters.connection_errors += 1
        self._end_session(error.message)
        if self.state is NodeState.DRAINING:
            await self._retire(f"down while draining: {error.message}")
            return
        now = self._clock()
        verdict = self._recovery.failed(now, auth=error.auth or error.identity)
        if verdict.restart:
            self.counters.restarts += 1
        self._deadline = verdict.retry_at
        was_down = self.state in _LOUD
        self._outage.start(now)
        if verdict.quarantined:
            config = self.config
            await self._change(
                NodeState.QUARANTINED,
                f"{self._recovery.restarts_in_window} restarts within "
                f"{config.restart_window}s (max_restarts={config.max_restarts}); next try in "
                f"{config.quarantine_time}s; last error: {error.message}",
            )
        elif not was_down:
            await self._change(
                NodeState.DOWN, f"{error.message}; retrying in {verdict.delay:.2f}s"
            )
        elif (down_for := self._outage.remind(now)) is not None:
            log.warning(
                "node %s (%s): still %s after %.0fs and %d attempts: %s",
                self.name, self.info.address, self.state.value, down_for, verdict.attempt,
                error.message,
            )
        else:
            log.debug(
                "node %s: attempt %d failed (%s); next in %.2fs",
                self.name, verdict.attempt, error.message, verdict.delay,
            )

    async def _drain(self, reason: str) -> None:
        if not self.serving:
            return
        if self.state in (NodeState.UP, NodeState.SUSPECT) and self.in_flight > 0:
            self.router.withdraw(self.route_id)
            await self._change(NodeState.DRAINING, reason)
            self._deadline = self._clock() + self.config.drain_timeout
            return
        await self._retire(reason)

    async def _retire(self, reason: str) -> None:
        self._end_session(reason)
        await self._change(NodeState.RETIRED, reason)

    # -- sessions ------------------------------------------------------------------

    def _start_session(self, why: str) -> None:
        assert self._nursery is not None
        self._end_session(why)
        self._generation += 1
        self._session = session = Session(self, self._generation, self._clock)
        self._nursery.start_soon(session.run, name=f"node {self.name} session")
        log.debug("node %s: session %d (%s)", self.name, self._generation, why)

    def _end_session(self, reason: str) -> None:
        """End the current session: its requests are re-routed or fail; its slots go."""
        session, self._session = self._session, None
        if session is not None:
            session.end(self.last_error or reason)
