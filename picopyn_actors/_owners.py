"""The dispatcher's keyed side: which node owns a request's bucket, and the owners' lines.

A keyed request (``bucket=``) must go to the node that owns its bucket: the
current master of the owning replicaset (or, with ``role="replica"``, one of
its replicas). When that node is up but busy, the request waits in the
node's *line* (:attr:`~._routes.Route.line`) rather than in the dispatcher's
queues, so that a freed slot looks at its own line and nothing else: a
busy owner costs its waiters nothing per completion elsewhere. A line goes
back to the queues, in age order, when its node stops being up or the bucket
maps change; the dispatcher then routes each request again, to its owner or,
when the owner cannot take it, to any node of the tier (counted as a
fallback; Picodata forwards it).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import attrs

from ._events import UP
from ._request import QUEUED, Request
from ._topology import Role

if TYPE_CHECKING:
    from ._dispatcher import Dispatcher
    from ._routes import Route

# Read once per request: on Python 3.11 each ``Role.REPLICA`` is a slow
# lookup through the enum class's ``__getattr__`` (see _request.py).
_REPLICA = Role.REPLICA


@attrs.define(eq=False)
class Owners:
    """Keyed routing for one dispatcher, with its counters."""

    dispatcher: Dispatcher
    #: Keyed requests sent to the node that owns their bucket, and the others.
    routed: int = attrs.field(init=False, default=0)
    fallbacks: int = attrs.field(init=False, default=0)

    def owner(self, request: Request) -> Route | None:
        """The route that must take keyed ``request``: its bucket's owner, when it is up.

        The current master of the owning replicaset, or with ``role="replica"``
        a replica of it (the strategy picks one, among those with an idle slot
        if any; if it fails, the request is answered with its error). Not the
        route the request just failed on. ``None``: the request may go to any
        node of the tier.
        """
        bucket = request.bucket
        assert bucket is not None
        dispatcher = self.dispatcher
        routing, table = dispatcher.routing, dispatcher.table
        if dispatcher.config.selector.role is _REPLICA:
            owner = routing.owner(bucket.tier, bucket.bucket_id)
            replicas = [
                r
                for r in table.routes.values()
                if r.candidate.replicaset == owner
                and r.state is UP
                and r.id != request.last_route
            ]
            if not replicas:
                return None
            return dispatcher.choose(request, [r for r in replicas if r.idle] or replicas)
        route = table.named(routing.master_of(bucket.tier, bucket.bucket_id) or "")
        if route is None or route.state is not UP or route.id == request.last_route:
            return None
        return route

    def submit(self, request: Request) -> bool:
        """A new keyed request: to its owner's idle slot, or into its line (``True``);
        ``False`` when its owner cannot take it (the dispatcher routes it then)."""
        route = self.owner(request)
        if route is None:
            return not request.open  # the strategy failed it: answered already
        if route.idle and not route.line:
            self.routed += 1
            self.dispatcher.hand(route, request)
        else:
            dispatcher = self.dispatcher
            request.enqueued_at = now = dispatcher.clock()
            route.wait_in_line(request)
            dispatcher.arm(now)
        return True

    def serve_line(self, route: Route, *, by_age: bool) -> None:
        """``route`` has a free slot: the requests in its line take it (while they
        are older than the head of the dispatcher's queues, ``by_age``)."""
        line = route.line
        dispatcher = self.dispatcher
        while line and route.idle:
            request = line.popleft()
            if request.phase is not QUEUED:
                continue
            head = dispatcher.queue_head()
            if by_age and head is not None and head.enqueued_at < request.enqueued_at:
                line.appendleft(request)  # older, and may take any node: the queues first
                return
            self.routed += 1
            dispatcher.hand(route, request)

    def requeue(self, route: Route) -> None:
        """Send ``route``'s line back to the dispatcher's queues, in age order."""
        if route.line:
            moved, route.line = route.line, deque()
            self.dispatcher.requeue(moved)
