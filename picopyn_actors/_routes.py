"""The dispatcher's routing table: one :class:`Route` per node actor.

A route holds what the dispatcher knows of a node: its latest state (from
:class:`~._dispatcher.RouteUpdate` messages, the newest by sequence number),
its idle connection slots, its strategy :class:`~._strategies.Candidate`,
and its *line*: the keyed requests that wait for this node because it owns
their bucket and is busy. Each line is ordered by enqueue time, like the
dispatcher's own queues, so a freed slot looks at one line, not at every
waiting request. The table also remembers the nodes whose routes went, for the message of a
:class:`~._errors.NoNodesAvailable`. Only the dispatcher uses it.

The table keeps the routes that can take a request now (UP, with an idle
slot) in a list of their own, :attr:`RouteTable.ready`, beside their
candidates, in the order the routes were added: a request reads them, it
does not build them. The dispatcher tells the table when a route's idle
slots run out or come back (:meth:`RouteTable.unlist`,
:meth:`RouteTable.enlist`, :meth:`RouteTable.relist`); the table sees the
state changes and removals itself.
"""

from __future__ import annotations

import bisect
import operator
from collections import deque
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

import attrs

from ._events import UP, NodeState
from ._strategies import Candidate

if TYPE_CHECKING:
    from ._dispatcher import RouteUpdate, SlotLike
    from ._request import Request

# Nodes remembered after their route went, for NoNodesAvailable's message.
_REMEMBERED = 64


@attrs.define(eq=False)
class Route:
    """One node, as the dispatcher sees it."""

    id: int
    candidate: Candidate
    state: NodeState = NodeState.CONNECTING
    seq: int = 0
    idle: list[SlotLike] = attrs.field(factory=list)
    # Every slot of the node's current session, busy or idle (the hedge
    # scheduler finds a stalled node's late requests on them).
    slots: Collection[SlotLike] = ()
    last_error: str | None = None
    # Keyed requests waiting for this node's next free slot, oldest first.
    line: deque[Request] = attrs.field(factory=deque)
    # Its place among the routes (the order they were added), and whether it
    # is in the table's ready list.
    order: int = 0
    listed: bool = False

    def wait_in_line(self, request: Request) -> None:
        """Queue ``request`` (its ``enqueued_at`` set) in its place by age."""
        line = self.line
        if not line or line[-1].enqueued_at <= request.enqueued_at:
            line.append(request)
            return
        for index, other in enumerate(line):  # rare: one that waited elsewhere first
            if other.enqueued_at > request.enqueued_at:
                line.insert(index, request)
                return


@attrs.define(eq=False)
class RouteTable:
    """Every route, by id and by node name; and the nodes that went."""

    routes: dict[int, Route] = attrs.field(factory=dict)
    _by_name: dict[str, Route] = attrs.field(factory=dict)
    # Routes that went, newest last: their last state or error, by node name.
    gone: dict[str, str] = attrs.field(factory=dict)
    # The routes that can take a request now (UP, with an idle slot), in
    # their order, and their candidates at the same places.
    ready: list[Route] = attrs.field(factory=list)
    ready_candidates: list[Candidate] = attrs.field(factory=list)
    _added: int = 0

    def add(self, route_id: int, candidate: Candidate) -> Route:
        self._added += 1
        route = Route(route_id, candidate, order=self._added)
        self.routes[route_id] = route
        self._by_name[candidate.name] = route
        return route

    def relist(self, route: Route) -> None:
        """Put ``route`` in :attr:`ready` or take it out, as its state, its idle
        slots and its place in the table say now."""
        listed = bool(route.idle) and route.state is UP and self.routes.get(route.id) is route
        if listed is route.listed:
            return
        if listed:
            self.enlist(route)
        else:
            self.unlist(route)

    def enlist(self, route: Route) -> None:
        """Put ``route`` (in the table, UP, not listed) in :attr:`ready`, in its
        place: it has an idle slot again."""
        route.listed = True
        ready = self.ready
        at = bisect.bisect(ready, route.order, key=_order)
        ready.insert(at, route)
        self.ready_candidates.insert(at, route.candidate)

    def unlist(self, route: Route) -> None:
        """Take ``route`` (listed) out of :attr:`ready`: its last idle slot was taken."""
        route.listed = False
        at = self.ready.index(route)
        del self.ready[at]
        del self.ready_candidates[at]

    def consistent(self) -> bool:
        """:attr:`ready` is what the routes say (for tests: it is kept, not built)."""
        expected = [r for r in self.routes.values() if r.idle and r.state is UP]
        expected.sort(key=_order)
        return (
            self.ready == expected
            and self.ready_candidates == [r.candidate for r in expected]
            and all(r.listed is (r in expected) for r in self.routes.values())
        )

    def remove(self, route: Route, why: str) -> None:
        """Forget ``route`` (remembering ``why`` for messages)."""
        self.routes.pop(route.id, None)
        if route.listed:
            self.unlist(route)
        if self._by_name.get(route.candidate.name) is route:
            del self._by_name[route.candidate.name]
        gone = self.gone
        gone.pop(route.candidate.name, None)
        gone[route.candidate.name] = why
        while len(gone) > _REMEMBERED:
            del gone[next(iter(gone))]

    def update(self, message: RouteUpdate) -> None:
        """Apply a node's state, unless a newer one was applied already."""
        route = self.routes.get(message.route_id)
        if route is None:
            route = self.add(message.route_id, message.candidate)
        if message.seq <= route.seq:
            return  # an older update overtaken by a newer one
        route.seq = message.seq
        route.state = message.state
        self.relist(route)
        if message.last_error is not None:
            route.last_error = message.last_error
        if message.state is NodeState.DRAINING:
            # No new work; what runs there finishes.
            self.remove(route, f"draining ({route.last_error or 'leaving'})")

    def named(self, name: str) -> Route | None:
        return self._by_name.get(name)

    def lines(self) -> Iterator[deque[Request]]:
        """The routes' lines that hold requests."""
        return (r.line for r in self.routes.values() if r.line)

    def lined(self) -> int:
        """Requests waiting in the routes' lines."""
        return sum(len(line) for line in self.lines())

    def hopeful(self) -> bool:
        """Some node may take requests soon: waiting for it is worth it."""
        return any(r.state.hopeful for r in self.routes.values())

    def errors(self) -> dict[str, str]:
        """Each node's last error (or state), for messages; nodes that went included."""
        errors = {name: f"gone: {why}" for name, why in self.gone.items()}
        errors.update(
            {r.candidate.name: r.last_error or r.state.value for r in self.routes.values()}
        )
        return errors

    def hopeless_reason(self) -> str:
        """Why no node can take a request, in words."""
        if self.routes:
            return "no node of the cluster is available"
        if self.gone:
            return "no node is routable now: every node the client had is gone or leaving"
        return "no node is known yet"

    def describe(self) -> str:
        """Each node's state and load, for messages."""
        return (
            ", ".join(
                f"{r.candidate.name} {r.state.value} in-flight {r.candidate.in_flight}"
                for r in self.routes.values()
            )
            or "no nodes"
        )


_order = operator.attrgetter("order")
