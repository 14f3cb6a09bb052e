"""The dispatcher's hedge scheduler: which sent requests get a second attempt, when.

A request with a hedging policy is *armed* when it is sent: if it has not
answered after the policy's delay, a hedge (a second request, whose answer is
its own) goes to another node. Due hedges fire while requests flow, as new
ones are sent, and from the dispatcher's task in a quiet moment (once no send
has fired any for ``BACKSTOP``); at most once a millisecond either way,
because a wake-up per request would cost more than hedging saves. The
policy's state (latencies, budget, counters) is :class:`~._hedging.Hedger`.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs

from ._events import NodeState
from ._hedging import Hedger, Hedging
from ._request import Phase, Request

if TYPE_CHECKING:
    from ._dispatcher import Dispatcher
    from ._routes import Route

# Seconds between two firings of due hedges, at least.
HEDGE_TICK = 0.001
# While requests flow, their sends fire the due hedges; the dispatcher's task
# steps in only once no send has fired any for this long (so a steady flow
# does not wake it every HEDGE_TICK). A hedge is late by at most this much
# when the flow stops.
BACKSTOP = 0.005


@attrs.define(eq=False)
class HedgeScheduler:
    """Armed requests by deadline, and one :class:`Hedger` per policy."""

    dispatcher: Dispatcher
    _hedgers: dict[Hedging, Hedger] = attrs.field(init=False, factory=dict)
    _due: deque[tuple[float, Request]] = attrs.field(init=False, factory=deque)
    _next: float = attrs.field(init=False, default=-math.inf)
    _fired_by_send: float = attrs.field(init=False, default=-math.inf)

    def hedger(self, policy: Hedging) -> Hedger:
        """The hedging state of ``policy`` (one per policy, shared by its requests)."""
        hedger = self._hedgers.get(policy)
        if hedger is None:
            self._hedgers[policy] = hedger = Hedger(policy)
        return hedger

    def statistics(self) -> dict[str, Any]:
        """The hedging counters, summed over the policies, for ``ClusterStatistics``."""
        hedgers = list(self._hedgers.values())
        delays = [h.current_delay for h in hedgers if h.current_delay is not None]
        return {
            "hedges_sent": sum(h.sent for h in hedgers),
            "hedges_won": sum(h.won for h in hedgers),
            "hedges_refused": sum(h.refused for h in hedgers),
            "hedges_skipped": sum(h.skipped for h in hedgers),
            "hedge_delay": min(delays) if delays else None,
        }

    def deadline(self) -> float:
        """When the dispatcher's task must wake for hedges (``inf``: never)."""
        if not self._due:
            return math.inf
        return max(self._due[0][0], self._next, self._fired_by_send + BACKSTOP)

    def arm(self, request: Request, now: float) -> None:
        """``request`` was sent at ``now``: hedge it if it has not answered after
        the delay. Hedges that are due fire here, while requests flow."""
        hedger = request.hedger
        assert hedger is not None
        delay = hedger.admit(now)
        due = self._due
        if delay != math.inf:
            due.append((now + delay, request))
            if len(due) == 1:
                self.dispatcher.wake_by(self.deadline())
        if now >= self._next and due and due[0][0] <= now:
            self._fired_by_send = now
            self.fire(now)

    def fire(self, now: float) -> None:
        """Send the hedges that are due (in the order they were armed). A hedge
        with no idle slot to go to waits at the head of the queue.

        A hedge goes only to a node that holds no late request itself: when
        every other node is as late, the slowness is not one node's (the
        client's own pause, a busy machine, a slow cluster), no hedge would
        answer sooner, and it is skipped (counted).
        """
        due = self._due
        dispatcher = self.dispatcher
        max_attempts = dispatcher.config.max_attempts
        late = self._late_routes(now)
        while due and due[0][0] <= now:
            _, request = due.popleft()
            hedger = request.hedger
            if (
                hedger is None
                or request.phase is not Phase.SENT
                or request.in_flight != 1
                or request.hedged
                or request.attempts + request.in_flight >= max_attempts
            ):
                continue  # answered, failed, retried elsewhere, or out of attempts
            if not any(r.id not in late for r in self.routes(request, idle=False)):
                hedger.skipped += 1
                continue
            if not hedger.allow(now):
                continue
            hedge = Request(
                request.method, request.query, request.args, True, bucket=request.bucket
            )
            hedge.parent = request
            hedge.last_route = request.last_route
            request.hedged = True
            request.hedges = [hedge]
            routes = [r for r in self.routes(request) if r.id not in late]
            dispatcher.send_hedge(hedge, routes, now)
        self._next = now + HEDGE_TICK

    def _late_routes(self, now: float) -> set[int | None]:
        """The routes running a request whose hedge delay has passed."""
        late: set[int | None] = set()
        for when, request in self._due:
            if when > now:
                break
            if request.phase is Phase.SENT:
                late.add(request.last_route)
        return late

    def routes(self, request: Request, *, idle: bool = True) -> list[Route]:
        """Where a hedge of ``request`` may go: another node that is up (with an
        idle slot, if ``idle``); for a keyed request, another member of the
        bucket's replicaset, or nowhere."""
        dispatcher = self.dispatcher
        routes = [
            r
            for r in dispatcher.table.routes.values()
            if r.id != request.last_route and r.state is NodeState.UP and (r.idle or not idle)
        ]
        bucket = request.bucket
        if bucket is None:
            return routes
        owner = dispatcher.routing.owner(bucket.tier, bucket.bucket_id)
        return [r for r in routes if owner is not None and r.candidate.replicaset == owner]
