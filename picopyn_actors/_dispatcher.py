"""The dispatcher actor: the routing table, the wait queue and the strategy.

Messages arrive on one bounded inbox:

* :class:`~._request.Request`: a new request, or one coming back for a retry;
* :class:`Idle`: a connection slot of a node is free (a "token"): the
  dispatcher may hand it one request;
* :class:`RouteUpdate`: a node actor's state changed (it carries the node's
  :class:`~._strategies.Candidate` when the node first appears);
* :class:`RouteRemoved`: a node actor stopped.

The dispatcher never blocks on anything but its inbox. A request goes to a
node only through one of the node's idle slots, a hand-off that cannot block
(``_node.Slot.start``); waiting requests queue here, first come first
served, until a slot is free or ``acquire_timeout`` passes.

Example (inside the library)::

    send, receive = trio.open_memory_channel(1024)
    dispatcher = Dispatcher(config, receive)
    await nursery.start(dispatcher.run)
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Protocol

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


Message = Request | Idle | RouteUpdate | RouteRemoved


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

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a free connection."""
        return len(self._pending) + len(self._retries)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the inbox until cancelled; then fail what waits with ClusterClosed."""
        task_status.started()
        receive_nowait = self.inbox.receive_nowait
        handle = self._handle
        try:
            pending, retries = self._pending, self._retries
            while True:
                if pending or retries:
                    with trio.move_on_at(self._next_deadline()):
                        handle(await self.inbox.receive())
                else:
                    handle(await self.inbox.receive())
                while True:
                    try:
                        message = receive_nowait()
                    except trio.WouldBlock:
                        break
                    handle(message)
                if pending or retries:
                    self._dispatch()
                    if pending or retries:
                        self._expire(trio.current_time())
        finally:
            self._close()

    def _next_deadline(self) -> float:
        heads = [q[0].enqueued_at for q in (self._pending, self._retries) if q]
        return min(heads) + self.config.acquire_timeout

    def _close(self) -> None:
        self._closed = True
        for queue in (self._retries, self._pending):
            while queue:
                queue.popleft().close()
        while True:
            try:
                message = self.inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if isinstance(message, Request):
                message.close()
        self.inbox.close()

    # -- message handling ---------------------------------------------------

    def _handle(self, message: Message) -> None:
        if type(message) is Idle:
            slot = message.slot
            route = self._routes.get(slot.route_id)
            if route is not None and route.generation == slot.generation:
                route.idle.append(slot)
                route.candidate.free = len(route.idle)
        elif type(message) is Request:
            self._submit(message)
        elif type(message) is RouteUpdate:
            self._update(message)
        elif type(message) is RouteRemoved:
            route = self._routes.pop(message.route_id, None)
            if route is not None:
                self._by_candidate.pop(id(route.candidate), None)
                self._fail_if_hopeless()

    def _submit(self, request: Request) -> None:
        if request.phase is Phase.ABANDONED:
            return
        if request.last_route is not None:
            self._retries.append(request)
        else:
            self._pending.append(request)
        if not any(r.state.hopeful for r in self._routes.values()):
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

    def _dispatch(self) -> None:
        pending, retries = self._pending, self._retries
        strategy = self.config.strategy
        while pending or retries:
            available = [r for r in self._routes.values() if r.idle and r.state is NodeState.UP]
            if not available:
                return
            request = (retries or pending).popleft()
            if request.phase is not Phase.QUEUED:
                continue
            route = self._choose(strategy, request, available)
            if route is None:
                continue
            slot = route.idle.pop()
            route.candidate.free = len(route.idle)
            slot.start(request)

    def _choose(self, strategy: Any, request: Request, available: list[_Route]) -> _Route | None:
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
