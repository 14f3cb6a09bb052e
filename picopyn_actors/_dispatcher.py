"""The dispatcher: the routing table, the wait queue and the strategy.

Requests reach the dispatcher by a synchronous call, :meth:`Dispatcher.submit`,
made in the caller's task (or, for a retry, in the node actor that lost it).
When nobody is waiting and a node has an idle connection slot, the strategy
picks a node and the request is handed to one of its slots right there
(``_node.Slot.start``, a hand-off that cannot block); otherwise it waits in a
FIFO queue, first come first served. A slot that finishes comes back the same
way, by :meth:`Dispatcher.release` from its node actor, and takes the head of
the queue if there is one. Every one of these calls runs to completion without
a checkpoint, in trio's single thread, so the routing table needs no lock;
and the hot path costs no task switch between the caller and the connection.

The dispatcher's own task serves a bounded inbox of control messages:

* :class:`Idle`: a new connection slot of a node is ready (a "token");
* :class:`RouteUpdate`: a node actor's state changed (it carries the node's
  :class:`~._strategies.Candidate` when the node first appears);
* :class:`RouteRemoved`: a node actor stopped.

It also fails waiting requests with :class:`~._errors.AcquireTimeout` once
they have waited ``acquire_timeout``, and fails them all with
:class:`~._errors.NoNodesAvailable` when no node can take them any more.

Example (inside the library)::

    send, receive = trio.open_memory_channel(1024)
    dispatcher = Dispatcher(config, receive)
    await nursery.start(dispatcher.run)
    dispatcher.submit(request)
    result = await request.wait()
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from ._config import ClusterConfig
from ._errors import AcquireTimeout, NoNodesAvailable, StrategyError
from ._events import NodeState
from ._request import Phase, Request
from ._strategies import Candidate, strategy_name

log = logging.getLogger(__name__)


class SlotLike(Protocol):
    """What the dispatcher needs of a node's connection slot (see ``_node.Slot``)."""

    route_id: int
    generation: int

    def start(self, request: Request) -> None:
        """Take ``request``; never blocks."""


@attrs.frozen
class Idle:
    """``slot`` is free: the dispatcher may hand it one request."""

    slot: SlotLike


@attrs.frozen
class RouteUpdate:
    """A node actor's state changed."""

    route_id: int
    state: NodeState
    generation: int
    last_error: str | None = None
    candidate: Candidate | None = None


@attrs.frozen
class RouteRemoved:
    """A node actor stopped."""

    route_id: int


Message = Idle | RouteUpdate | RouteRemoved


@attrs.define(eq=False)
class _Route:
    id: int
    candidate: Candidate
    state: NodeState = NodeState.CONNECTING
    generation: int = -1
    idle: list[SlotLike] = attrs.field(factory=list)
    last_error: str | None = None


@attrs.define(eq=False)
class Dispatcher:
    """Routes requests to node actors. See the module docstring."""

    config: ClusterConfig
    inbox: trio.MemoryReceiveChannel[Message]
    _routes: dict[int, _Route] = attrs.field(init=False, factory=dict)
    _by_candidate: dict[int, _Route] = attrs.field(init=False, factory=dict)
    _pending: deque[Request] = attrs.field(init=False, factory=deque)
    # Requests coming back for another try go first, in a queue of their own,
    # so that both queues stay ordered by enqueue time for acquire_timeout.
    _retries: deque[Request] = attrs.field(init=False, factory=deque)
    failed_unrouted: int = attrs.field(init=False, default=0)
    _closed: bool = attrs.field(init=False, default=False)
    # The run task's wait, while it waits: submit() moves its deadline.
    _timer: trio.CancelScope | None = attrs.field(init=False, default=None)
    # trio's clock, read directly (made in trio: the dispatcher lives in a run).
    _clock: Callable[[], float] = attrs.field(
        init=False, factory=lambda: trio.lowlevel.current_clock().current_time
    )

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a free connection."""
        return len(self._pending) + len(self._retries)

    # -- the synchronous side: callers and node actors ---------------------------

    def submit(self, request: Request) -> None:
        """Start ``request`` on an idle slot now, or queue it. Never blocks.

        A request coming back for a retry (``last_route`` set) queues ahead of
        new ones. If the request cannot be served at all (the dispatcher is
        closed, no node is hopeful, the strategy failed) it is answered at once.
        """
        if request.phase is Phase.ABANDONED:
            return
        if self._closed:
            request.close()
            return
        retries, pending = self._retries, self._pending
        if not (retries or pending):
            available = self._available()
            if available:
                self._start(request, available)
                return
        request.enqueued_at = now = self._clock()
        (retries if request.last_route is not None else pending).append(request)
        if len(retries) + len(pending) > 1:
            # Others wait already: the run task has a deadline (the oldest
            # one's), and some node is hopeful, or they would have failed
            # when the last one stopped being so.
            return
        timer = self._timer
        if timer is not None and timer.deadline == math.inf:
            # The run task waits with no deadline: give it this one. When it
            # passes, the run task looks at the queue's head again.
            timer.deadline = now + self.config.acquire_timeout
        if not any(r.state.hopeful for r in self._routes.values()):
            self._fail_if_hopeless()

    def release(self, slot: SlotLike) -> bool:
        """Take back a slot that finished its request; it serves the queue first.

        ``False``: the slot belongs to a route state this dispatcher has not
        seen yet; send it as an :class:`Idle` message, behind the updates.
        """
        route = self._routes.get(slot.route_id)
        if route is None or route.generation != slot.generation:
            # Unknown or stale: dropped here as Idle would be, unless it is newer.
            return route is None or slot.generation < route.generation
        route.idle.append(slot)
        route.candidate.free = len(route.idle)
        if self._pending or self._retries:
            self._dispatch()
        return True

    # -- the actor: control messages and timeouts --------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the inbox until cancelled; then fail what waits with ClusterClosed."""
        task_status.started()
        receive_nowait = self.inbox.receive_nowait
        handle = self._handle
        try:
            while True:
                with trio.CancelScope(deadline=self._next_deadline()) as self._timer:
                    handle(await self.inbox.receive())
                    while True:
                        try:
                            message = receive_nowait()
                        except trio.WouldBlock:
                            break
                        handle(message)
                self._timer = None
                if self._pending or self._retries:
                    self._dispatch()
                    self._expire(self._clock())
        finally:
            self._timer = None
            self._close()

    def _next_deadline(self) -> float:
        heads = [q[0].enqueued_at for q in (self._pending, self._retries) if q]
        return min(heads) + self.config.acquire_timeout if heads else math.inf

    def _close(self) -> None:
        self._closed = True
        for queue in (self._retries, self._pending):
            while queue:
                queue.popleft().close()
        self.inbox.close()

    def _handle(self, message: Message) -> None:
        if type(message) is Idle:
            slot = message.slot
            route = self._routes.get(slot.route_id)
            if route is not None and route.generation == slot.generation:
                route.idle.append(slot)
                route.candidate.free = len(route.idle)
        elif type(message) is RouteUpdate:
            self._update(message)
        elif type(message) is RouteRemoved:
            route = self._routes.pop(message.route_id, None)
            if route is not None:
                self._by_candidate.pop(id(route.candidate), None)
                self._fail_if_hopeless()

    def _update(self, message: RouteUpdate) -> None:
        route = self._routes.get(message.route_id)
        if route is None:
            if message.candidate is None:
                return
            route = _Route(message.route_id, message.candidate)
            self._routes[route.id] = route
            self._by_candidate[id(route.candidate)] = route
        if message.generation != route.generation:
            route.idle.clear()
            route.candidate.free = 0
            route.generation = message.generation
        route.state = message.state
        if message.last_error is not None:
            route.last_error = message.last_error
        if message.state is NodeState.DRAINING:
            # No new work; what runs there finishes.
            self._routes.pop(route.id, None)
            self._by_candidate.pop(id(route.candidate), None)
        self._fail_if_hopeless()

    # -- routing ---------------------------------------------------------------

    def _available(self) -> list[_Route]:
        """The routes that can take a request now: UP, with an idle slot."""
        return [r for r in self._routes.values() if r.idle and r.state is NodeState.UP]

    def _start(self, request: Request, available: list[_Route]) -> None:
        """Hand ``request`` to an idle slot of the route the strategy picks."""
        route = self._choose(request, available)
        if route is not None:
            slot = route.idle.pop()
            route.candidate.free = len(route.idle)
            slot.start(request)

    def _dispatch(self) -> None:
        pending, retries = self._pending, self._retries
        while pending or retries:
            available = self._available()
            if not available:
                return
            request = (retries or pending).popleft()
            if request.phase is Phase.QUEUED:
                self._start(request, available)

    def _choose(self, request: Request, available: list[_Route]) -> _Route | None:
        strategy = self.config.strategy
        if len(available) > 1 and request.last_route is not None:
            others = [r for r in available if r.id != request.last_route]
            available = others or available
        candidates = [r.candidate for r in available]
        try:
            chosen = strategy(candidates)
        except Exception as exc:
            request.fail(
                StrategyError(f"balance strategy {strategy_name(strategy)} raised {exc!r}")
            )
            self.failed_unrouted += 1
            return None
        route = self._by_candidate.get(id(chosen))
        if route is None or route not in available:
            request.fail(
                StrategyError(
                    f"balance strategy {strategy_name(strategy)} returned {chosen!r}, "
                    "which is not one of the candidates it was given"
                )
            )
            self.failed_unrouted += 1
            return None
        return route

    def _expire(self, now: float) -> None:
        limit = self.config.acquire_timeout
        for queue in (self._retries, self._pending):
            while queue and queue[0].enqueued_at + limit <= now:
                request = queue.popleft()
                if request.fail(
                    AcquireTimeout(
                        f"no free connection within acquire_timeout={limit}s "
                        f"({self._describe()}); raise connections_per_node or acquire_timeout"
                    )
                ):
                    self.failed_unrouted += 1

    def _fail_if_hopeless(self) -> None:
        if not (self._pending or self._retries) or any(
            r.state.hopeful for r in self._routes.values()
        ):
            return
        errors = self.node_errors()
        for queue in (self._retries, self._pending):
            while queue:
                request = queue.popleft()
                if request.fail(
                    NoNodesAvailable(
                        "no node of the cluster is available" if errors else "no node is known yet",
                        errors,
                    )
                ):
                    self.failed_unrouted += 1

    def node_errors(self) -> dict[str, str]:
        """Each node's last error (or state), for messages."""
        return {r.candidate.name: r.last_error or r.state.value for r in self._routes.values()}

    def _describe(self) -> str:
        return (
            ", ".join(
                f"{r.candidate.name} {r.state.value} in-flight {r.candidate.in_flight}"
                for r in self._routes.values()
            )
            or "no nodes"
        )

    def has_routable(self) -> bool:
        """Some node is up."""
        return any(r.state is NodeState.UP for r in self._routes.values())

    @property
    def closed(self) -> bool:
        """The dispatcher has stopped."""
        return self._closed
