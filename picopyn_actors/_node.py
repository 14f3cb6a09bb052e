"""The node actor: one per routable node. It owns the node's connections.

A node actor runs *sessions*. A session opens a probe connection, checks it
with ``SELECT 1`` and opens ``connections_per_node`` query connections, each
wrapped in a :class:`Slot`. An idle slot is a token the dispatcher holds; to
send a request the dispatcher hands it to one of the node's idle slots
(:meth:`Slot.start`, a non-blocking hand-off: the slot's own one-place
mailbox), and the slot reports the outcome back to the node actor, which
answers the caller and returns the token. No task sits between the
dispatcher and the connection: that saves two task switches per request on
the hot path. The probe runs every ``health_interval`` with a
``probe_timeout`` deadline on its own connection, so a hung node is noticed
even when every query connection is busy.

When a session fails (connect refused, probe timed out, a broken connection
that cannot be reopened) the actor goes DOWN, sends queued requests back to
the dispatcher, waits with exponential backoff and jitter, and starts a new
session. A node that goes down more than ``max_restarts`` times within
``restart_window`` seconds is QUARANTINED for ``quarantine_time``.

The pure parts (:func:`backoff_delay`, :class:`RestartTracker`) have their own
unit tests.

Example (inside the library)::

    actor = NodeActor(route_id, info, config, backend, dispatcher_send, hub, closing, dispatcher)
    await nursery.start(actor.run)
    await actor.control.send(Wake())
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import outcome
import trio

from ._bridge import Backend, BackendBroken, BackendQueryError, Connection, submit
from ._config import ClusterConfig
from ._dispatcher import Dispatcher, Idle, Message, RouteRemoved, RouteUpdate
from ._errors import NoNodesAvailable, OutcomeUnknown, QueryError
from ._events import EventHub, NodeEvent, NodeState, NodeStatistics, NodeStatus
from ._request import PIN, Phase, Request
from ._strategies import Candidate
from ._topology import NodeInfo

log = logging.getLogger(__name__)

_EWMA = 0.2
# Query connections of one node opened at the same time (see _open_slot).
_CONNECTS_AT_ONCE = 4
_RANDOM = random.Random()


def backoff_delay(
    failures: int, initial: float, maximum: float, rand: random.Random | None = None
) -> float:
    """Delay before reconnect attempt number ``failures`` (1-based).

    Exponential, capped at ``maximum``, with "equal jitter": a uniform draw in
    the upper half, so that clients do not reconnect in lockstep and the delay
    never collapses to zero.
    """
    base = min(maximum, initial * 2.0 ** min(max(0, failures - 1), 64))
    jitter = (rand or _RANDOM).uniform(0, base / 2)
    return base / 2 + jitter


@attrs.define
class RestartTracker:
    """Restart intensity: at most ``limit`` restarts within ``window`` seconds."""

    limit: int
    window: float
    _times: deque[float] = attrs.field(init=False, factory=deque)

    def record(self, now: float) -> bool:
        """Record a restart at ``now``; ``True`` when the limit is exceeded."""
        self._times.append(now)
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        return len(self._times) > self.limit

    @property
    def count(self) -> int:
        """Restarts in the current window (as of the last :meth:`record`)."""
        return len(self._times)


# -- messages to the node actor ------------------------------------------------


@attrs.frozen
class Wake:
    """The catalog says the node is Online again: cut any backoff short."""


@attrs.frozen
class Stop:
    """Drain and retire: no new requests, in-flight ones finish."""

    reason: str


@attrs.frozen
class UpdateInfo:
    """A fresh catalog row for this node."""

    info: NodeInfo


@attrs.frozen
class _SessionUp:
    generation: int
    latency: float


@attrs.frozen
class _SessionFailed:
    generation: int
    error: str
    auth: bool = False


@attrs.frozen
class _WorkerReady:
    generation: int


@attrs.frozen
class _WorkerBroken:
    generation: int
    error: str


@attrs.frozen
class _Quiet:
    generation: int


Control = Wake | Stop | UpdateInfo
_Report = _SessionUp | _SessionFailed | _WorkerReady | _WorkerBroken | _Quiet


class Slot:
    """One query connection of a node, and its one-place mailbox.

    The dispatcher holds idle slots as tokens and calls :meth:`start`; the
    outcome comes back through the bridge to :meth:`NodeActor._completed`.
    """

    __slots__ = ("_submit", "conn", "generation", "node", "request", "route_id", "started")

    def __init__(self, node: NodeActor, conn: Connection, generation: int) -> None:
        self.node = node
        self.conn = conn
        self.generation = generation
        self.route_id = node.route_id
        self.request: Request | None = None
        self.started = 0.0
        # The bridge's connections start a query without a task (see _bridge.submit).
        self._submit: Any = getattr(conn, "submit", None)

    def __repr__(self) -> str:
        return f"<Slot {self.node.name} gen={self.generation} busy={self.request is not None}>"

    def start(self, request: Request) -> None:
        """Run ``request`` on this slot's connection. Never blocks, never raises."""
        node = self.node
        node._candidate.in_flight += 1
        self.request = request
        request.phase = Phase.SENT
        if request.method == PIN:
            node._lend(self, request)
            return
        conn = self.conn
        request.conn = conn  # a caller that gives up terminates it: see Request._abort
        self.started = node._clock()
        on_done = functools.partial(node._completed, self, request)
        if self._submit is not None:
            self._submit(request.method, request.query, request.args, on_done)
        else:
            submit(conn, request.method, request.query, request.args, on_done, node._spawn)


@attrs.define(eq=False)
class NodeActor:
    """Owns one node's connections; see the module docstring."""

    route_id: int
    info: NodeInfo
    config: ClusterConfig
    backend: Backend
    dispatcher: trio.MemorySendChannel[Message]
    hub: EventHub
    closing: trio.Event
    router: Dispatcher
    rand: random.Random = attrs.field(factory=random.Random)

    state: NodeState = attrs.field(init=False, default=NodeState.CONNECTING)
    since: float = attrs.field(init=False, factory=trio.current_time)
    last_error: str | None = attrs.field(init=False, default=None)
    latency: float | None = attrs.field(init=False, default=None)
    connections: int = attrs.field(init=False, default=0)
    errors: int = attrs.field(init=False, default=0)
    ok: int = attrs.field(init=False, default=0)
    failed: int = attrs.field(init=False, default=0)
    retried: int = attrs.field(init=False, default=0)
    restarts: int = attrs.field(init=False, default=0)
    reconnects: int = attrs.field(init=False, default=0)

    control: trio.MemorySendChannel[Control | _Report] = attrs.field(init=False)
    _inbox: trio.MemoryReceiveChannel[Control | _Report] = attrs.field(init=False)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _session: trio.CancelScope | None = attrs.field(init=False, default=None)
    _session_nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _slots: set[Slot] = attrs.field(init=False, factory=set)
    _generation: int = attrs.field(init=False, default=0)
    _failures: int = attrs.field(init=False, default=0)
    _was_up: bool = attrs.field(init=False, default=False)
    _timer: float = attrs.field(init=False, default=float("inf"))
    _tracker: RestartTracker = attrs.field(init=False)
    _connecting: trio.CapacityLimiter = attrs.field(
        init=False, factory=lambda: trio.CapacityLimiter(_CONNECTS_AT_ONCE)
    )
    _candidate: Candidate = attrs.field(init=False)
    # trio's clock, read directly: the hot path times every request.
    _clock: Callable[[], float] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        n = self.config.connections_per_node
        # Reports: a few per worker per session, plus control messages.
        self.control, self._inbox = trio.open_memory_channel(8 * n + 32)
        self._tracker = RestartTracker(self.config.max_restarts, self.config.restart_window)
        self._clock = trio.lowlevel.current_clock().current_time
        info = self.info
        self._candidate = Candidate(
            name=info.name,
            address=info.address,
            tier=info.tier,
            replicaset=info.replicaset,
            failure_domain=dict(info.failure_domain),
        )

    @property
    def in_flight(self) -> int:
        """Requests on this node now (kept on the candidate ``LeastInFlight`` sees)."""
        return self._candidate.in_flight

    @property
    def name(self) -> str:
        """The node's instance name."""
        return self.info.name

    def __repr__(self) -> str:
        return (
            f"<NodeActor {self.name} {self.info.address} {self.state.value} "
            f"connections={self.connections} in_flight={self.in_flight}>"
        )

    # -- snapshots -------------------------------------------------------------

    def status(self) -> NodeStatus:
        """A frozen snapshot for :meth:`Cluster.nodes`."""
        info = self.info
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
            latency=self.latency,
            errors=self.errors,
            last_error=self.last_error,
            since=self.since,
        )

    def statistics(self) -> NodeStatistics:
        """Counters for :meth:`Cluster.statistics`."""
        return NodeStatistics(
            requests_ok=self.ok,
            requests_failed=self.failed,
            requests_retried=self.retried,
            restarts=self.restarts,
            reconnects=self.reconnects,
        )

    # -- the actor loop ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until retired or cancelled.

        On cancellation every request it holds ends: with :class:`ClusterClosed`
        when the cluster is closing, else it goes back to the dispatcher.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._start_session("starting")  # runs once we yield
                await self.dispatcher.send(
                    RouteUpdate(
                        self.route_id, self.state, self._generation, candidate=self._candidate
                    )
                )
                task_status.started()
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            self._end_session()
            if self.state is not NodeState.RETIRED:
                self._set_state_nowait(NodeState.RETIRED, "stopped")
            with contextlib.suppress(
                trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
            ):
                self.dispatcher.send_nowait(RouteRemoved(self.route_id))

    async def _serve(self) -> None:
        while self.state is not NodeState.RETIRED:
            with trio.move_on_at(self._timer):
                message = await self._inbox.receive()
                await self._on_message(message)
                continue
            await self._on_timer()

    async def _on_message(self, message: Control | _Report) -> None:
        if isinstance(message, UpdateInfo):
            self.info = message.info
            return
        if isinstance(message, Wake):
            if self.state is NodeState.DOWN:
                log.info("node %s: catalog says Online again, reconnecting now", self.name)
                self._failures = 0
                self._timer = trio.current_time()
            return
        if isinstance(message, Stop):
            await self._drain(message.reason)
            return
        if message.generation != self._generation:
            return  # a report from an earlier session
        if isinstance(message, _WorkerReady):
            self._failures = 0
            if self.state in (NodeState.CONNECTING, NodeState.SUSPECT):
                self._was_up = True
                await self._set_state(NodeState.UP, "connected")
        elif isinstance(message, _SessionUp):
            self._observe_latency(message.latency)
        elif isinstance(message, _WorkerBroken):
            self.errors += 1
            self.last_error = message.error
            if self.state is NodeState.UP:
                await self._set_state(NodeState.SUSPECT, f"connection broke: {message.error}")
        elif isinstance(message, _SessionFailed):
            self.errors += 1
            await self._down(message.error, auth=message.auth)
        elif (
            isinstance(message, _Quiet) and self.state is NodeState.DRAINING and self.in_flight == 0
        ):
            await self._retire("drained")

    async def _on_timer(self) -> None:
        self._timer = float("inf")
        if self.state in (NodeState.DOWN, NodeState.QUARANTINED):
            self._start_session("retrying")
            await self._set_state(NodeState.CONNECTING, "reconnecting")
        elif self.state is NodeState.DRAINING:
            await self._retire(f"drain_timeout ({self.config.drain_timeout}s) passed")

    # -- state changes -------------------------------------------------------------

    def _set_state_nowait(self, new: NodeState, reason: str) -> bool:
        old = self.state
        if old is new:
            return False
        self.state = new
        self.since = now = trio.current_time()
        level = logging.WARNING if new in (NodeState.DOWN, NodeState.QUARANTINED) else logging.INFO
        log.log(
            level,
            "node %s (%s): %s -> %s: %s",
            self.name,
            self.info.address,
            old.value,
            new.value,
            reason,
        )
        self.hub.publish(NodeEvent(self.name, old, new, reason, now))
        return True

    async def _set_state(self, new: NodeState, reason: str) -> None:
        if self._set_state_nowait(new, reason):
            await self.dispatcher.send(
                RouteUpdate(self.route_id, new, self._generation, last_error=self.last_error)
            )

    async def _down(self, error: str, *, auth: bool = False) -> None:
        self.last_error = error
        self._end_session()
        if self.state is NodeState.DRAINING:
            await self._retire(f"down while draining: {error}")
            return
        now = trio.current_time()
        self._failures += 1
        if self._was_up:
            self._was_up = False
            self.restarts += 1
            if self._tracker.record(now):
                self._timer = now + self.config.quarantine_time
                await self._set_state(
                    NodeState.QUARANTINED,
                    f"{self._tracker.count} restarts within {self.config.restart_window}s "
                    f"(max_restarts={self.config.max_restarts}); next try in "
                    f"{self.config.quarantine_time}s; last error: {error}",
                )
                return
        if auth:
            delay = self.config.backoff_max
        else:
            delay = backoff_delay(
                self._failures, self.config.backoff_initial, self.config.backoff_max, self.rand
            )
        self._timer = now + delay
        await self._set_state(NodeState.DOWN, f"{error}; retrying in {delay:.2f}s")

    async def _drain(self, reason: str) -> None:
        if self.state in (NodeState.DRAINING, NodeState.RETIRED):
            return
        busy = self.state in (NodeState.UP, NodeState.SUSPECT) and self.in_flight > 0
        await self._set_state(NodeState.DRAINING, reason)
        if not busy:
            await self._retire(reason)
            return
        self._timer = trio.current_time() + self.config.drain_timeout

    async def _retire(self, reason: str) -> None:
        self._end_session()
        await self._set_state(NodeState.RETIRED, reason)

    # -- sessions ------------------------------------------------------------------

    def _start_session(self, why: str) -> None:
        assert self._nursery is not None
        self._end_session()
        self._generation += 1
        self._session = scope = trio.CancelScope()
        self._nursery.start_soon(
            self._run_session, self._generation, scope, name=f"node {self.name} session"
        )
        log.debug("node %s: session %d (%s)", self.name, self._generation, why)

    def _end_session(self) -> None:
        """Stop the session: every in-flight request is lost here, every connection dropped."""
        if self._session is not None:
            self._session.cancel()
            self._session = None
            self._session_nursery = None
            self._generation += 1  # reports of the old session are ignored from now on
        slots, self._slots = self._slots, set()
        for slot in slots:
            request, slot.request = slot.request, None
            slot.conn.terminate()
            if request is not None:
                self._lost(request, self.last_error or f"node {self.name} went down", sent=True)
        self._candidate.in_flight = 0
        self.connections = 0

    def _report(self, message: _Report) -> None:
        try:
            self.control.send_nowait(message)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("node %s: report dropped: %r", self.name, message)

    async def _connect(self) -> Connection:
        timeout = self.config.connect_timeout
        try:
            with trio.fail_after(timeout):
                return await self.backend.connect(self.info.address)
        except trio.TooSlowError:
            raise BackendBroken(
                f"connect timed out after {timeout}s", sent=False, timed_out=True
            ) from None

    async def _probe(self, conn: Connection) -> float:
        timeout = self.config.probe_timeout
        start = trio.current_time()
        try:
            with trio.fail_after(timeout):
                await conn.probe()
        except trio.TooSlowError:
            raise BackendBroken(
                f"probe timed out after {timeout}s (node hung?)", sent=False, timed_out=True
            ) from None
        except BackendQueryError as exc:
            raise BackendBroken(f"probe failed: {exc.message}", sent=False) from None
        return trio.current_time() - start

    async def _run_session(self, generation: int, scope: trio.CancelScope) -> None:
        probe: Connection | None = None
        with scope:
            try:
                try:
                    probe = await self._connect()
                    latency = await self._probe(probe)
                except BackendBroken as exc:
                    self._report(_SessionFailed(generation, exc.message, exc.auth))
                    return
                self._report(_SessionUp(generation, latency))
                async with self._workers(generation) as workers:
                    for index in range(self.config.connections_per_node):
                        workers.start_soon(
                            self._open_slot, generation, name=f"node {self.name} connection {index}"
                        )
                    interval = self.config.health_interval
                    while True:
                        await trio.sleep(interval)
                        try:
                            self._observe_latency(await self._probe(probe))
                            continue
                        except BackendBroken as exc:
                            error = exc
                        if not error.timed_out:
                            # The probe's own connection broke (a reset, say): it
                            # is the node that is judged, so try a fresh one once.
                            probe.terminate()
                            try:
                                probe = await self._connect()
                                self._observe_latency(await self._probe(probe))
                                continue
                            except BackendBroken as again:
                                error = again
                        self._report(_SessionFailed(generation, error.message))
                        self._session_nursery = None  # closing: nothing new may start in it
                        workers.cancel_scope.cancel()
                        return
            finally:
                if probe is not None:
                    probe.terminate()

    @contextlib.asynccontextmanager
    async def _workers(self, generation: int) -> AsyncIterator[trio.Nursery]:
        """The session's nursery, known as ``_session_nursery`` only while it is open."""
        try:
            async with trio.open_nursery() as workers:
                if generation == self._generation:
                    self._session_nursery = workers
                yield workers
        finally:
            if generation == self._generation:
                self._session_nursery = None

    def _observe_latency(self, seconds: float) -> None:
        old = self.latency
        self.latency = seconds if old is None else old + _EWMA * (seconds - old)
        self._candidate.latency = self.latency

    # -- query connections -----------------------------------------------------------

    async def _open_slot(self, generation: int, replacing: bool = False) -> None:
        """Open one query connection and hand its slot to the dispatcher.

        At most ``_CONNECTS_AT_ONCE`` connections of a node are being opened
        at a time: logins are paced, for the server's sake and so that the
        event loop never runs one unbounded burst of connect callbacks.
        """
        try:
            async with self._connecting:
                conn = await self._connect()
        except BackendBroken as exc:
            self._report(_SessionFailed(generation, exc.message, exc.auth))
            return
        if generation != self._generation:
            conn.terminate()
            return
        slot = Slot(self, conn, generation)
        self._slots.add(slot)
        self.connections += 1
        if replacing:
            self.reconnects += 1
        self._report(_WorkerReady(generation))
        await self.dispatcher.send(Idle(slot))

    def _spawn(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` in the current session (for backends without ``submit``)."""
        nursery = self._session_nursery or self._nursery
        assert nursery is not None
        nursery.start_soon(fn, *args)

    def _give_back(self, slot: Slot) -> None:
        """Return an idle slot to the dispatcher (a token)."""
        if not self.router.release(slot):
            self._post_idle(slot)

    def _post_idle(self, slot: Slot) -> None:
        """Send ``slot`` as an :class:`Idle` message, behind the updates already sent."""
        message = Idle(slot)
        try:
            self.dispatcher.send_nowait(message)
        except trio.WouldBlock:
            self._spawn(self.dispatcher.send, message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _replace(self, slot: Slot) -> None:
        """Drop a slot's connection and open another one in its place."""
        slot.conn.terminate()
        if slot in self._slots:
            self._slots.discard(slot)
            self.connections -= 1
            nursery = self._session_nursery
            if nursery is not None and self.state is not NodeState.DRAINING:
                # The session may have just ended (its nursery closes before
                # its task runs again): then there is nothing to replace.
                with contextlib.suppress(RuntimeError):
                    nursery.start_soon(self._open_slot, slot.generation, True)

    def _completed(self, slot: Slot, request: Request, result: outcome.Outcome[Any]) -> None:
        """A request on ``slot`` ended: answer its caller, then reuse or replace the slot.

        Runs in trio, called by the bridge; it must not raise.
        """
        if slot.request is not request:
            return  # the session ended meanwhile, and dealt with the request then
        slot.request = None
        request.conn = None
        self._candidate.in_flight -= 1
        abandoned = request.phase is Phase.ABANDONED
        try:
            if type(result) is outcome.Value:
                if abandoned:
                    # The caller gave up while the answer was on its way: Picodata
                    # cannot cancel, so its connection was terminated.
                    self._replace(slot)
                    return
                latency = self._clock() - slot.started
                self.ok += 1
                request.finish(result)
                self._observe_latency(latency)
                if not self.router.release(slot):
                    self._post_idle(slot)
                return
            assert isinstance(result, outcome.Error)
            exc = result.error
            if isinstance(exc, BackendQueryError):
                self.failed += 1
                self.errors += 1
                error = QueryError(exc.message, sqlstate=exc.sqlstate, node=self.name)
                error.__cause__ = exc.__cause__
                request.fail(error)
                # What the caller sent can end the session (PostgreSQL closes
                # it after a protocol violation): that is no fault of the node.
                if abandoned or slot.conn.is_closed():
                    self._replace(slot)
                else:
                    self._give_back(slot)
            elif isinstance(exc, BackendBroken):
                if abandoned:
                    log.debug("node %s: caller gave up mid-query; new connection", self.name)
                else:
                    self._report(_WorkerBroken(slot.generation, exc.message))
                    self._lost(request, exc.message, sent=exc.sent)
                self._replace(slot)
            else:  # pragma: no cover - the bridge classifies every error
                log.error("node %s: unexpected error from the bridge: %r", self.name, exc)
                request.fail(exc)
                self._replace(slot)
        finally:
            if self.state is NodeState.DRAINING and self.in_flight == 0:
                self._report(_Quiet(self._generation))

    def _lend(self, slot: Slot, request: Request) -> None:
        """Hand the slot's connection to a ``cluster.connection()`` caller."""
        lease = Lease(slot.conn, self.name, functools.partial(self._returned, slot))
        if not request.finish(outcome.Value(lease)):
            self._returned(slot, dirty=False)

    def _returned(self, slot: Slot, dirty: bool) -> None:
        """A lent connection came back."""
        if slot not in self._slots or slot.request is None:
            return  # the session ended while it was lent: it was dropped then
        slot.request = None
        self._candidate.in_flight -= 1
        if dirty or slot.conn.is_closed():
            self._replace(slot)
        else:
            self._give_back(slot)
        if self.state is NodeState.DRAINING and self.in_flight == 0:
            self._report(_Quiet(self._generation))

    def _lost(self, request: Request, error: str, *, sent: bool) -> None:
        """A request could not complete here: retry it elsewhere or fail it."""
        if not request.open:
            return
        request.errors.append(f"{self.name}: {error}")
        if self.closing.is_set():
            request.close()
            return
        if sent and not request.idempotent:
            self.failed += 1
            request.fail(
                OutcomeUnknown(
                    f"the connection to node {self.name} ({self.info.address}) broke after "
                    f"the request was sent ({error}); it may or may not have been executed. "
                    "Pass idempotent=True to let such requests be retried on another node",
                    node=self.name,
                )
            )
            return
        if sent:
            request.attempts += 1
        if request.attempts >= self.config.max_attempts:
            self.failed += 1
            request.fail(
                NoNodesAvailable(
                    f"request failed on {request.attempts} node(s) "
                    f"(max_attempts={self.config.max_attempts})",
                    dict(e.split(": ", 1) for e in request.errors if ": " in e),
                )
            )
            return
        self.retried += 1
        request.phase = Phase.QUEUED
        request.last_route = self.route_id
        self.router.submit(request)


@attrs.define(eq=False)
class Lease:
    """A connection lent to one caller by ``cluster.connection()``."""

    conn: Connection
    node: str
    _on_return: Any
    returned: bool = False

    def give_back(self, *, dirty: bool = False) -> None:
        """Return the connection to its node (``dirty``: it must be replaced). Idempotent."""
        if not self.returned:
            self.returned = True
            self._on_return(dirty=dirty)
