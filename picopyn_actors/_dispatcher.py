"""The dispatcher: the routing table, the wait queue and the strategy.

The data plane is synchronous. A request reaches the dispatcher by
:meth:`Dispatcher.submit`, made in the caller's task (or, for a retry, by the
node that lost it). When nobody is waiting and a node has an idle connection
slot, the strategy picks a node and the request is handed to one of its slots
right there (``_slot.Slot.start``, a hand-off that cannot block);
otherwise it waits in a FIFO queue, first come first served; a keyed request
whose owner is up but busy waits in that owner's line instead
(:class:`~._routes.Route`), and the owner's next free slot serves the older of
its line's head and the queue's. A slot comes to
the dispatcher one way only, by :meth:`Dispatcher.release`: a new connection
and one that finished its request alike; it takes the head of the queue if
there is one. A node whose session ends takes its slots back at once with
:meth:`Dispatcher.withdraw`, so a stale slot is never handed out. Every one
of these calls runs to completion without a checkpoint, in trio's single
thread, so the table needs no lock, and the hot path costs no task switch.

The control plane is a bounded inbox that the dispatcher's own task serves:

* :class:`RouteUpdate`: a node actor's state changed (each carries a
  sequence number; an older one than the route has seen is ignored);
* :class:`RouteRemoved`: a node actor stopped.

Node actors wait for room when it is full, so no update is dropped. The
task also fails waiting requests with :class:`~._errors.AcquireTimeout` once
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
from collections.abc import Callable, Collection
from typing import Protocol

import attrs
import trio

from ._config import ClusterConfig
from ._errors import AcquireTimeout, NoNodesAvailable, StrategyError
from ._events import UP, NodeState
from ._hedges import HedgeScheduler
from ._owners import Owners
from ._request import ABANDONED, DONE, QUEUED, Request
from ._routes import Route, RouteTable
from ._routing import Routing
from ._strategies import BUILT_IN, Candidate, Strategy, strategy_name, takes_bucket

log = logging.getLogger(__name__)


class SlotLike(Protocol):
    """What the dispatcher needs of a node's connection slot (see ``_slot.Slot``)."""

    route_id: int
    candidate: Candidate
    request: Request | None  # the request it runs, if any
    started: float  # when its request was sent (trio's clock)

    def start(self, request: Request) -> None:
        """Take ``request``; never blocks."""


@attrs.frozen
class RouteUpdate:
    """A node actor's state changed (``seq`` grows with each update of one route)."""

    route_id: int
    seq: int
    state: NodeState
    candidate: Candidate
    last_error: str | None = None


@attrs.frozen
class RouteRemoved:
    """A node actor stopped."""

    route_id: int


@attrs.frozen
class RoutingUpdate:
    """Fresh bucket routing data, from the supervisor."""

    routing: Routing


Message = RouteUpdate | RouteRemoved | RoutingUpdate

@attrs.define(eq=False)
class Dispatcher:
    """Routes requests to node actors. See the module docstring."""

    config: ClusterConfig
    inbox: trio.MemoryReceiveChannel[Message]
    table: RouteTable = attrs.field(init=False, factory=RouteTable)
    routing: Routing = attrs.field(init=False, factory=Routing)
    hedges: HedgeScheduler = attrs.field(init=False)
    owners: Owners = attrs.field(init=False)
    _strategy: Strategy = attrs.field(init=False)
    _takes_bucket: bool = attrs.field(init=False)  # the strategy is called with bucket=
    # The strategy is one of ours, which only read their list: they are given
    # the table's own list of ready candidates, any other strategy a copy.
    _reads_only: bool = attrs.field(init=False)
    _pending: deque[Request] = attrs.field(init=False, factory=deque)
    # Requests coming back for another try go first, in a queue of their own,
    # so that both queues stay ordered by enqueue time for acquire_timeout.
    _retries: deque[Request] = attrs.field(init=False, factory=deque)
    failed_unrouted: int = attrs.field(init=False, default=0)
    _closed: bool = attrs.field(init=False, default=False)
    # The run task's wait, while it waits: submit() moves its deadline.
    _wait: trio.CancelScope | None = attrs.field(init=False, default=None)
    # trio's clock, read directly (made in trio: the dispatcher lives in a run).
    clock: Callable[[], float] = attrs.field(
        init=False, factory=lambda: trio.lowlevel.current_clock().current_time
    )

    def __attrs_post_init__(self) -> None:
        self._strategy = self.config.strategy
        self._takes_bucket = takes_bucket(self._strategy)
        self._reads_only = type(self._strategy) in BUILT_IN
        self.hedges = HedgeScheduler(self)
        self.owners = Owners(self)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a free connection (in the queues and the owners' lines)."""
        return len(self._pending) + len(self._retries) + self.table.lined()

    # -- the synchronous side: callers and node actors ---------------------------

    def submit(self, request: Request) -> None:
        """Start ``request`` on an idle slot now, or queue it. Never blocks.

        A request coming back for a retry (``last_route`` set) queues ahead of
        new ones. If the request cannot be served at all (the dispatcher is
        closed, no node is hopeful, the strategy failed) it is answered at once.
        """
        if request.phase is ABANDONED:
            return
        if self._closed:
            request.close()
            return
        if request.bucket is not None and self.owners.submit(request):
            return  # to its owner, now or in its line
        retries, pending = self._retries, self._pending
        if not (retries or pending):
            available = self.table.ready
            if available:
                if request.bucket is not None:
                    self._start(request, available)
                    return
                route = self.choose(request, available)  # _start's, for the hot path
                if route is not None:
                    self.hand(route, request)
                return
        request.enqueued_at = now = self.clock()
        (retries if request.last_route is not None else pending).append(request)
        if len(retries) + len(pending) > 1:
            # Others wait already: the run task has a deadline (the oldest
            # one's), and some node is hopeful, or they would have failed
            # when the last one stopped being so.
            return
        self.arm(now)
        if not self.table.hopeful():
            self._fail_if_hopeless()

    def arm(self, now: float) -> None:
        """A request waits from ``now``: if the run task waits with no deadline, give
        it this one (when it passes, the task looks at the oldest waiters again)."""
        wait = self._wait
        if wait is not None and wait.deadline == math.inf:
            wait.deadline = now + self.config.acquire_timeout

    def opened(self, slot: SlotLike, slots: Collection[SlotLike]) -> None:
        """A new slot of a session whose slots are ``slots`` (the set the
        session keeps, so that the route sees it grow and shrink): free."""
        self.release(slot)
        route = self.table.routes.get(slot.route_id)
        if route is not None:
            route.slots = slots

    def release(self, slot: SlotLike) -> None:
        """Take a slot that is free (new, or done with its request); it serves the queue first."""
        route = self.table.routes.get(slot.route_id)
        if route is None:
            # The node's first RouteUpdate is still in the inbox: the route
            # exists from now on, not routable until that update says UP.
            route = self.table.add(slot.route_id, slot.candidate)
        idle = route.idle
        idle.append(slot)
        route.candidate.free = len(idle)
        if not route.listed and route.state is UP:
            self.table.enlist(route)  # its first idle slot
        if route.line:
            self.owners.serve_line(route, by_age=True)
        if self._pending or self._retries:
            self._dispatch()
            if route.line:  # what still waits in the queues cannot take this node
                self.owners.serve_line(route, by_age=False)

    def withdraw(self, route_id: int) -> None:
        """A node's session ended: forget its idle slots now."""
        route = self.table.routes.get(route_id)
        if route is not None:
            route.idle.clear()
            route.candidate.free = 0
            self.table.relist(route)

    # -- the actor: control messages and timeouts --------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the inbox until cancelled; then fail what waits with ClusterClosed."""
        task_status.started()
        receive_nowait = self.inbox.receive_nowait
        handle = self._handle
        try:
            while True:
                with trio.CancelScope(deadline=self._next_deadline()) as self._wait:
                    handle(await self.inbox.receive())
                    while True:
                        try:
                            message = receive_nowait()
                        except trio.WouldBlock:
                            break
                        handle(message)
                self._wait = None
                if self.hedges.deadline() <= self.clock():
                    self.hedges.look(self.clock())
                if self._pending or self._retries:
                    self._dispatch()
                self._expire(self.clock())
        finally:
            self._wait = None
            self._close()

    def _next_deadline(self, hedges: float | None = None) -> float:
        """The run task's next deadline: the oldest waiter's ``acquire_timeout``,
        or the hedges' (``hedges``, if the caller has it already)."""
        heads = [q[0].enqueued_at for q in (self._pending, self._retries, *self.table.lines()) if q]
        deadline = min(heads) + self.config.acquire_timeout if heads else math.inf
        return min(deadline, self.hedges.deadline() if hedges is None else hedges)

    def rearm(
        self, hedges: Callable[[], float], now: float, backstop: float, slack: float
    ) -> None:
        """A send looked at the hedges at ``now`` (at most once every
        ``slack`` seconds); ``hedges()`` is their next deadline, never
        earlier than ``now + backstop`` while any is to come. Give the
        dispatcher's task, if it waits, the deadline it needs when it would
        wake too late for the hedges, or needlessly within ``slack``, before
        the next send looks (moving a trio deadline costs over 10 µs in a
        busy run, so a deadline far enough ahead stays; one at most
        ``backstop`` ahead is in time, and is kept without asking
        ``hedges()``). While sends look, the task's backstop keeps moving
        ahead of them and never fires."""
        wait = self._wait
        if wait is not None:
            current = wait.deadline
            if now + slack < current <= now + backstop:
                return
            due = hedges()
            if current > due or current - now <= slack:
                deadline = self._next_deadline(due)
                if deadline != current:
                    wait.deadline = deadline

    def send_hedge(self, hedge: Request, routes: list[Route], now: float) -> None:
        """Start ``hedge`` on one of ``routes`` now, or let it wait first in line."""
        if routes and not self._retries:
            route = self.choose(hedge, routes)
            if route is not None:
                self.hand(route, hedge)
        else:
            hedge.enqueued_at = now
            self._retries.append(hedge)

    def _close(self) -> None:
        self._closed = True
        for queue in (self._retries, self._pending, *self.table.lines()):
            while queue:
                queue.popleft().close()
        self.inbox.close()

    def _handle(self, message: Message) -> None:
        if type(message) is RouteUpdate:
            route = self.table.routes.get(message.route_id)
            self.table.update(message)
            if route is not None and route.state is not UP:
                self.owners.requeue(route)  # it may be leaving the table: its line goes first
            self._fail_if_hopeless()
        elif type(message) is RoutingUpdate:
            self.routing = message.routing
            for route in self.table.routes.values():
                self.owners.requeue(route)  # owners may have changed: each finds its own again
        elif type(message) is RouteRemoved:
            route = self.table.routes.get(message.route_id)
            if route is not None:
                self.owners.requeue(route)
                self.table.remove(route, route.last_error or route.state.value)
                self._fail_if_hopeless()

    def requeue(self, moved: deque[Request]) -> None:
        """Requests back from an owner's line, in age order, to the queues (the
        run task dispatches them again: to their owner, or to the tier)."""
        key = _enqueued_at
        if again := [r for r in moved if r.last_route is not None]:
            self._retries = deque(sorted([*self._retries, *again], key=key))
        if fresh := [r for r in moved if r.last_route is None]:
            self._pending = deque(sorted([*self._pending, *fresh], key=key))

    def queue_head(self) -> Request | None:
        """The request that has waited longest in the queues (not the lines)."""
        queue = self._retries or self._pending
        return queue[0] if queue else None

    # -- routing ---------------------------------------------------------------

    def _start(self, request: Request, available: list[Route]) -> None:
        """Hand ``request`` to an idle slot of the route it must go to, or the strategy picks."""
        if request.bucket is None:
            route = self.choose(request, available)
        else:
            route = self.owners.owner(request)
            if not request.open:
                return  # the strategy failed it, choosing among the owner's replicas
            if route is not None:
                self.owners.routed += 1
            else:
                # The owner cannot take it (down, draining, unknown yet): any node
                # of the tier will, and Picodata forwards it. Counted.
                self.owners.fallbacks += 1
                tier = request.bucket.tier
                route = self.choose(
                    request, [r for r in available if r.candidate.tier == tier] or available
                )
        if route is not None:
            self.hand(route, request)

    def hand(self, route: Route, request: Request) -> None:
        idle = route.idle
        slot = idle.pop()
        free = route.candidate.free = len(idle)
        if not free and route.listed:
            self.table.unlist(route)  # its last idle slot
        slot.start(request)
        hedger = request.hedger  # (a hedge has none: it is never hedged again)
        if hedger is not None:
            # Counted for the budget, and a look if one is due.
            hedger.fresh += 1
            started = slot.started
            if started >= self.hedges.next_look:
                self.hedges.sent(started)

    def _dispatch(self) -> None:
        """Serve waiting requests, oldest first, while slots are idle. A keyed
        request whose owner is up but busy moves to its owner's line."""
        for queue in (self._retries, self._pending):
            if not queue:
                continue
            waiting: list[Request] = []
            while queue:
                # The table keeps it up to date as requests take slots.
                available = self.table.ready
                if not available:
                    break
                request = queue.popleft()
                if request.phase is not QUEUED:
                    continue
                parent = request.parent
                if parent is not None:  # a hedge: never where its request runs
                    if not parent.open:
                        request.phase = DONE  # answered meanwhile: not needed
                        continue
                    others = self.hedges.routes(parent)
                    if not others:
                        waiting.append(request)
                        continue
                    route = self.choose(request, others)
                    if route is not None:
                        self.hand(route, request)
                    continue
                if request.bucket is not None:
                    owner = self.owners.owner(request)
                    if owner is not None and not owner.idle:
                        owner.wait_in_line(request)
                        continue
                self._start(request, available)
            if waiting:
                queue.extendleft(reversed(waiting))

    def choose(self, request: Request, available: list[Route]) -> Route | None:
        """The route the strategy picks for ``request``, or ``None`` (it failed the
        request: the strategy raised or picked a stranger)."""
        if len(available) > 1 and request.last_route is not None:
            others = [r for r in available if r.id != request.last_route]
            available = others or available
        strategy = self._strategy
        if available is self.table.ready:  # the hot path: a list kept, not built
            candidates = self.table.ready_candidates
        else:
            candidates = [r.candidate for r in available]
        # A strategy of the user's gets a copy, which it may change.
        given = candidates if self._reads_only else candidates.copy()
        try:
            if self._takes_bucket:
                chosen = strategy(given, bucket=request.bucket)  # type: ignore[call-arg]
            else:
                chosen = strategy(given)
        except Exception as exc:
            self._unrouted(request, f"raised {exc!r}")
            return None
        # Found by identity (a Candidate compares by identity): the route at
        # the chosen candidate's place, or none for one it was not given.
        try:
            return available[candidates.index(chosen)]
        except ValueError:
            self._unrouted(
                request, f"returned {chosen!r}, which is not one of the candidates it was given"
            )
            return None

    def _unrouted(self, request: Request, what: str) -> None:
        """Fail ``request`` with the :class:`StrategyError` of a strategy that ``what``."""
        request.fail(StrategyError(f"balance strategy {strategy_name(self._strategy)} {what}"))
        self.failed_unrouted += 1

    def _expire(self, now: float) -> None:
        limit = self.config.acquire_timeout
        for queue in (self._retries, self._pending, *self.table.lines()):
            while queue and queue[0].enqueued_at + limit <= now:
                request = queue.popleft()
                if request.fail(
                    AcquireTimeout(
                        f"no free connection within acquire_timeout={limit}s "
                        f"({self.table.describe()}); raise connections_per_node or "
                        "acquire_timeout"
                    )
                ):
                    self.failed_unrouted += 1

    def _fail_if_hopeless(self) -> None:
        if not (self._pending or self._retries) or self.table.hopeful():
            return
        why, errors = self.table.hopeless_reason(), self.table.errors()
        for queue in (self._retries, self._pending):
            while queue:
                request = queue.popleft()
                if request.fail(NoNodesAvailable(why, errors)):
                    self.failed_unrouted += 1

    def node_errors(self) -> dict[str, str]:
        """Each node's last error (or state), for messages; nodes that went included."""
        return self.table.errors()


def _enqueued_at(request: Request) -> float:
    return request.enqueued_at
