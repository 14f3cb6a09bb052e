"""The node actor: one per routable node. It owns the node's connections.

A node actor runs *sessions*. A session opens a probe connection, checks it
with ``SELECT 1`` and starts ``connections_per_node`` workers, each owning one
query connection and pulling requests from the node's bounded channel. The
probe runs every ``health_interval`` with a ``probe_timeout`` deadline on its
own connection, so a hung node is noticed even when every worker is busy.

When a session fails (connect refused, probe timed out, a broken connection
that cannot be reopened) the actor goes DOWN, sends queued requests back to
the dispatcher, waits with exponential backoff and jitter, and starts a new
session. A node that goes down more than ``max_restarts`` times within
``restart_window`` seconds is QUARANTINED for ``quarantine_time``.

The pure parts (:func:`backoff_delay`, :class:`RestartTracker`) have their own
unit tests.

Example (inside the library)::

    actor = NodeActor(route_id, info, config, backend, dispatcher_send, hub, closing)
    await nursery.start(actor.run)
    await actor.control.send(Wake())
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections import deque

import attrs
import outcome
import trio

from ._bridge import Backend, BackendBroken, BackendQueryError, Connection
from ._config import ClusterConfig
from ._dispatcher import Idle, Message, RouteRemoved, RouteUpdate
from ._errors import NoNodesAvailable, OutcomeUnknown, QueryError
from ._events import EventHub, NodeEvent, NodeState, NodeStatistics, NodeStatus
from ._request import Phase, Request
from ._strategies import Candidate
from ._topology import NodeInfo

log = logging.getLogger(__name__)

_EWMA = 0.2
_RANDOM = random.Random()


def backoff_delay(
    failures: int, initial: float, maximum: float, rand: random.Random | None = None
) -> float:
    """Delay before reconnect attempt number ``failures`` (1-based).

    Exponential, capped at ``maximum``, with "equal jitter": a uniform draw in
    the upper half, so that clients do not reconnect in lockstep and the delay
    never collapses to zero.
    """
    base = min(maximum, initial * 2.0 ** max(0, failures - 1))
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
class _WorkerExited:
    generation: int


Control = Wake | Stop | UpdateInfo
_Report = _SessionUp | _SessionFailed | _WorkerReady | _WorkerBroken | _WorkerExited


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
    rand: random.Random = attrs.field(factory=random.Random)

    state: NodeState = attrs.field(init=False, default=NodeState.CONNECTING)
    since: float = attrs.field(init=False, factory=trio.current_time)
    last_error: str | None = attrs.field(init=False, default=None)
    latency: float | None = attrs.field(init=False, default=None)
    connections: int = attrs.field(init=False, default=0)
    in_flight: int = attrs.field(init=False, default=0)
    errors: int = attrs.field(init=False, default=0)
    ok: int = attrs.field(init=False, default=0)
    failed: int = attrs.field(init=False, default=0)
    retried: int = attrs.field(init=False, default=0)
    restarts: int = attrs.field(init=False, default=0)
    reconnects: int = attrs.field(init=False, default=0)

    control: trio.MemorySendChannel[Control | _Report] = attrs.field(init=False)
    _inbox: trio.MemoryReceiveChannel[Control | _Report] = attrs.field(init=False)
    _requests_send: trio.MemorySendChannel[Request] = attrs.field(init=False)
    _requests: trio.MemoryReceiveChannel[Request] = attrs.field(init=False)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _session: trio.CancelScope | None = attrs.field(init=False, default=None)
    _generation: int = attrs.field(init=False, default=0)
    _workers: int = attrs.field(init=False, default=0)
    _failures: int = attrs.field(init=False, default=0)
    _was_up: bool = attrs.field(init=False, default=False)
    _timer: float = attrs.field(init=False, default=float("inf"))
    _tracker: RestartTracker = attrs.field(init=False)
    _candidate: Candidate = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        n = self.config.connections_per_node
        # Reports: a few per worker per session, plus control messages.
        self.control, self._inbox = trio.open_memory_channel(8 * n + 32)
        self._requests_send, self._requests = trio.open_memory_channel(n)
        self._tracker = RestartTracker(self.config.max_restarts, self.config.restart_window)
        info = self.info
        self._candidate = Candidate(
            name=info.name,
            address=info.address,
            tier=info.tier,
            replicaset=info.replicaset,
            failure_domain=dict(info.failure_domain),
        )

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
                        self.route_id,
                        self.state,
                        self._generation,
                        channel=self._requests_send,
                        candidate=self._candidate,
                    )
                )
                task_status.started()
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            self._flush_requests()
            self._requests.close()
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
            isinstance(message, _WorkerExited)
            and self.state is NodeState.DRAINING
            and self._workers == 0
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
        self._flush_requests()
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
        up = self.state in (NodeState.UP, NodeState.SUSPECT) and self._workers > 0
        await self._set_state(NodeState.DRAINING, reason)
        if not up:
            await self._retire(reason)
            return
        self._timer = trio.current_time() + self.config.drain_timeout

    async def _retire(self, reason: str) -> None:
        self._end_session()
        self._flush_requests()
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
        if self._session is not None:
            self._session.cancel()
            self._session = None
            self._generation += 1  # reports of the old session are ignored from now on

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
            raise BackendBroken(f"connect timed out after {timeout}s", sent=False) from None

    async def _probe(self, conn: Connection) -> float:
        timeout = self.config.probe_timeout
        start = trio.current_time()
        try:
            with trio.fail_after(timeout):
                await conn.probe()
        except trio.TooSlowError:
            raise BackendBroken(
                f"probe timed out after {timeout}s (node hung?)", sent=False
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
                async with trio.open_nursery() as workers:
                    for index in range(self.config.connections_per_node):
                        workers.start_soon(
                            self._worker, generation, name=f"node {self.name} worker {index}"
                        )
                    interval = self.config.health_interval
                    while True:
                        await trio.sleep(interval)
                        try:
                            self._observe_latency(await self._probe(probe))
                        except BackendBroken as exc:
                            self._report(_SessionFailed(generation, exc.message))
                            workers.cancel_scope.cancel()
                            return
            finally:
                if probe is not None:
                    probe.terminate()

    def _observe_latency(self, seconds: float) -> None:
        old = self.latency
        self.latency = seconds if old is None else old + _EWMA * (seconds - old)
        self._candidate.latency = self.latency

    # -- workers -------------------------------------------------------------------

    async def _worker(self, generation: int) -> None:
        self._workers += 1
        conn: Connection | None = None
        try:
            try:
                conn = await self._connect()
            except BackendBroken as exc:
                self._report(_SessionFailed(generation, exc.message, exc.auth))
                return
            self.connections += 1
            self._report(_WorkerReady(generation))
            idle = Idle(self.route_id, generation, False)
            await self.dispatcher.send(idle)
            while True:
                try:
                    request = await self._requests.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return  # drained
                if request.phase is not Phase.ASSIGNED:
                    await self.dispatcher.send(idle)
                    continue
                if request.method == "pin":
                    keep = await self._lend(conn, request)
                else:
                    keep = await self._execute(conn, request, generation)
                if not keep:
                    conn.terminate()
                    self.connections -= 1
                    conn = None
                    try:
                        conn = await self._connect()
                    except BackendBroken as exc:
                        self._report(_SessionFailed(generation, exc.message, exc.auth))
                        return
                    self.connections += 1
                    self.reconnects += 1
                    self._report(_WorkerReady(generation))
                    await self.dispatcher.send(idle)
        finally:
            self._workers -= 1
            if conn is not None:
                self.connections -= 1
                conn.terminate()
            self._report(_WorkerExited(generation))

    async def _execute(self, conn: Connection, request: Request, generation: int) -> bool:
        """Run one request. Returns ``False`` when the connection must be replaced."""
        request.phase = Phase.SENT
        request.conn = conn  # a caller that gives up terminates it: see Request._abort
        self.in_flight += 1
        start = trio.current_time()
        try:
            result = await conn.run(request.method, request.query, request.args)
        except BackendQueryError as exc:
            self.failed += 1
            self.errors += 1
            error = QueryError(exc.message, sqlstate=exc.sqlstate, node=self.name)
            error.__cause__ = exc.__cause__
            request.fail(error)
            await self._idle(generation, 0.0)
            return request.phase is not Phase.ABANDONED
        except BackendBroken as exc:
            if request.phase is Phase.ABANDONED:
                log.debug("node %s: caller gave up mid-query; replacing the connection", self.name)
                return False
            self._report(_WorkerBroken(generation, exc.message))
            self._lost(request, exc.message, sent=exc.sent)
            return False
        except trio.Cancelled:
            # The session ended (node down, drain deadline) or the cluster is closing.
            self._lost(request, f"node {self.name} went down", sent=True)
            raise
        finally:
            self.in_flight -= 1
            request.conn = None
        if request.phase is Phase.ABANDONED:
            # The caller gave up while the answer was on its way: Picodata
            # cannot cancel, so its connection was terminated; open a new one.
            return False
        latency = trio.current_time() - start
        self.ok += 1
        request.finish(outcome.Value(result))
        old = self.latency
        self.latency = latency if old is None else old + _EWMA * (latency - old)
        await self._idle(generation, latency)
        return True

    async def _idle(self, generation: int, latency: float) -> None:
        """Give the dispatcher a token for this worker, without a checkpoint when possible."""
        message = Idle(self.route_id, generation, True, latency)
        try:
            self.dispatcher.send_nowait(message)
        except trio.WouldBlock:
            await self.dispatcher.send(message)

    async def _lend(self, conn: Connection, request: Request) -> bool:
        """Hand ``conn`` to a ``cluster.connection()`` caller until it gives it back."""
        lease = Lease(conn, self.name)
        request.phase = Phase.SENT
        self.in_flight += 1
        try:
            if not request.finish(outcome.Value(lease)):
                return True
            await lease.returned.wait()
            return not lease.dirty and not conn.is_closed()
        except trio.Cancelled:
            lease.dirty = True
            conn.terminate()
            raise
        finally:
            self.in_flight -= 1

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
        request.enqueued_at = trio.current_time()
        try:
            self.dispatcher.send_nowait(request)
        except trio.WouldBlock:
            request.fail(
                NoNodesAvailable(f"could not re-route after {error}: dispatcher is overloaded")
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            request.close()

    def _flush_requests(self) -> None:
        """Send requests queued for this node back to the dispatcher."""
        while True:
            try:
                request = self._requests.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if request.open:
                self._lost(request, self.last_error or f"node {self.name} left", sent=False)


@attrs.define(eq=False)
class Lease:
    """A connection lent to one caller by ``cluster.connection()``."""

    conn: Connection
    node: str
    returned: trio.Event = attrs.field(factory=trio.Event)
    dirty: bool = False

    def give_back(self, *, dirty: bool = False) -> None:
        """Return the connection to its worker (``dirty``: it must be replaced)."""
        self.dirty = self.dirty or dirty
        self.returned.set()
