"""The dispatcher's hedge scheduler: which sent requests get a second attempt, when.

A request with a hedging policy is noted when it is sent: it and its send
time are appended to its policy's line (:class:`~._hedging.Hedger`), and
that is all the request path does for hedging. The scheduler looks at the
lines at most once a millisecond (``HEDGE_TICK``): from a send, while
requests flow, and from the dispatcher's task in a quiet moment (once no
send has looked for ``BACKSTOP``). It takes every request whose hedge delay
has passed off its line (counted for the budget) and hedges it if it has
not answered and its node has stalled (answered nothing for the delay; a
late request on a node that still answers is watched until it does): a
hedge (a second request, whose answer is its own) goes to another node, one
that holds no late request itself (while every other node is as late, the
request is held, and looked at again later).
The policy's state (latencies, budget, counters) is
:class:`~._hedging.Hedger`.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

import attrs

from ._events import NodeState
from ._hedging import Hedger, Hedging
from ._request import Phase, Request

if TYPE_CHECKING:
    from ._dispatcher import Dispatcher
    from ._routes import Route

# Seconds between two looks at the lines, at least.
HEDGE_TICK = 0.001
# While requests flow, their sends look at the lines; the dispatcher's task
# steps in only once no send has looked for this long (so a steady flow
# does not wake it every HEDGE_TICK). A hedge is late by at most this much
# when the flow stops.
BACKSTOP = 0.005

_SENT = Phase.SENT
# Where a late request comes from, in a look: the line (late for the first
# time), the watched (its node answered others), or the held (every node it
# might go to was as late).
_NEW, _WATCHED, _HELD = 0, 1, 2
_CONN = operator.attrgetter("conn")


@attrs.define(eq=False)
class HedgeScheduler:
    """One :class:`Hedger` per policy, and when to look at their lines next."""

    dispatcher: Dispatcher
    _hedgers: dict[Hedging, Hedger] = attrs.field(init=False, factory=dict)
    #: The next look is due at this time or later (sends compare their time
    #: with it: the request path's only hedging work besides the appends);
    #: ``-inf`` while the lines are empty, so that the next send looks (and
    #: makes sure the dispatcher's task wakes for its request).
    next_look: float = attrs.field(init=False, default=-math.inf)
    _looked_by_send: float = attrs.field(init=False, default=-math.inf)
    # The earliest time a watched request's node would have stalled.
    _watch_due: float = attrs.field(init=False, default=math.inf)

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
            "hedges_not_stalled": sum(h.not_stalled for h in hedgers),
            "hedge_delay": min(delays) if delays else None,
        }

    def deadline(self) -> float:
        """When the dispatcher's task must wake for hedges (``inf``: never)."""
        due = self._watch_due
        for hedger in self._hedgers.values():
            if hedger.line_times:
                due = min(due, hedger.line_times[0] + hedger.last_delay)
        if due == math.inf:
            return due
        return max(due, self.next_look, self._looked_by_send + BACKSTOP)

    def sent(self, now: float) -> None:
        """A send at ``now`` found the next look due: look, and give the
        dispatcher's task the deadline it needs for what is left (pushed
        ``BACKSTOP`` past this look: while sends look, it does not wake)."""
        self._looked_by_send = now
        self.look(now)
        self.dispatcher.rearm(self.deadline, now, BACKSTOP)

    def look(self, now: float) -> None:
        """Take the requests whose hedge delay has passed off the lines (they
        are counted for the budget), and send a hedge for each that has not
        answered. A hedge with no idle slot to go to waits at the head of the
        dispatcher's queue.

        With ``only_stalled`` (the default), a late request is hedged only
        once its node has answered nothing, to any request, for the hedge
        delay; until then it is watched (:meth:`_stalled`).

        A hedge goes only to a node that holds no late request itself (late
        as of this look, or due for a hedge): when every other node is as
        late, the slowness is not one node's (the client's own pause, a busy
        machine, a slow cluster), no hedge would answer sooner, and it is
        skipped (counted once) and held: looked at again an eighth of the
        delay later, and hedged once a node it may go to holds no late
        request (a pause of the client passes in a look or two). While
        requests stay held, the wait doubles, up to 8 delays: a cluster slow
        everywhere keeps every node late, and its held requests cost little.
        A held request keeps hedges off its node meanwhile. A request watched
        since an earlier look does not: its node still answers.
        """
        # (hedger, request, where it comes from: _NEW, _WATCHED or _HELD)
        late: list[tuple[Hedger, Request, int]] = []
        waiting = False
        for hedger in self._hedgers.values():
            watched, held = hedger.watched, hedger.held
            if watched:  # late before, their nodes answering then: again
                late.extend((hedger, r, _WATCHED) for r in watched if r.phase is _SENT)
                watched.clear()
            if held and now >= hedger.held_due:  # every other node as late then: again
                late.extend((hedger, r, _HELD) for r in held if r.phase is _SENT)
                held.clear()
            if not hedger.line_times:
                continue
            taken = hedger.take(now)
            waiting = waiting or bool(hedger.line_times)
            # The common case, all answered (an answer clears the request's
            # connection), is checked without a Python loop.
            if taken and any(map(_CONN, taken)):
                late.extend((hedger, r, _NEW) for r in taken if r.phase is _SENT)
        self._watch_due = math.inf
        if late:
            due = [
                (hedger, request, kind)
                for hedger, request, kind in late
                if self._needs_hedge(request)
                and self._stalled(request, hedger, now, kind == _NEW)
            ]
            # No hedge goes where a request is late: a request late as of this
            # look, or one due now (a watched one, late before, does not count:
            # its node answers).
            late_at = {r.last_route for _, r, kind in late if kind == _NEW}
            late_at.update(r.last_route for _, r, _ in due)
            for hedger in self._hedgers.values():
                late_at.update(hedger.held_at if hedger.held else ())  # (those not looked at now)
            if due:
                # Where hedges may go this look (once, not once per request: a
                # slow cluster may hold many).
                free = [
                    r
                    for r in self.dispatcher.table.routes.values()
                    if r.state is NodeState.UP and r.id not in late_at
                ]
                for hedger, request, kind in due:
                    self._hedge(request, hedger, free, now, kind == _HELD)
        for hedger in self._hedgers.values():
            if hedger.held:
                if hedger.held_due <= now:  # looked at now, or held for the first time
                    delay = hedger.last_delay
                    hedger.held_wait = min(max(2 * hedger.held_wait, delay / 8), 8 * delay)
                    hedger.held_due = now + hedger.held_wait
                    hedger.held_at = {r.last_route for r in hedger.held}
                self._watch_due = min(self._watch_due, hedger.held_due)
            else:
                hedger.held_wait = 0.0
        waiting = waiting or self._watch_due < math.inf
        self.next_look = now + HEDGE_TICK if waiting else -math.inf

    def _stalled(self, request: Request, hedger: Hedger, now: float, first: bool) -> bool:
        """Has the node of ``request`` (late) answered nothing for the hedge
        delay? Always ``True`` unless the policy is ``only_stalled``. If the
        node answered since, ``request`` is watched: looked at again by the
        time its node would have stalled (``first``: late for the first time,
        counted in ``not_stalled``)."""
        if not hedger.policy.only_stalled:
            return True
        route_id = request.last_route
        route = None if route_id is None else self.dispatcher.table.routes.get(route_id)
        if route is None:
            return True  # its node left the table
        stalls_at = route.candidate.answered_at + hedger.last_delay
        if stalls_at <= now:
            return True
        if first:
            hedger.not_stalled += 1
        hedger.watched.append(request)
        self._watch_due = min(self._watch_due, stalls_at)
        return False

    def _needs_hedge(self, request: Request) -> bool:
        return (
            request.in_flight == 1
            and not request.hedged
            and request.attempts + request.in_flight < self.dispatcher.config.max_attempts
        )  # else: retried elsewhere, hedged already, or out of attempts

    def _hedge(
        self, request: Request, hedger: Hedger, free: list[Route], now: float, held: bool
    ) -> None:
        """Hedge ``request`` on one of the ``free`` routes (up, holding no late
        request), within the budget; with none it may go to, hold it (counted
        the first time: ``held`` says it was held before)."""
        targets = self._others(request, free)
        if not targets:
            if not held:
                hedger.skipped += 1
            hedger.held.append(request)
            hedger.held_at.add(request.last_route)
            return
        if not hedger.allow(now):
            return
        hedge = Request(request.method, request.query, request.args, True, bucket=request.bucket)
        hedge.parent = request
        hedge.last_route = request.last_route
        request.hedged = True
        request.hedges = [hedge]
        self.dispatcher.send_hedge(hedge, [r for r in targets if r.idle], now)

    def routes(self, request: Request) -> list[Route]:
        """Where a hedge of ``request`` may go now: another node that is up,
        with an idle slot; for a keyed request, another member of the
        bucket's replicaset, or nowhere."""
        routes = self.dispatcher.table.routes.values()
        return self._others(request, [r for r in routes if r.state is NodeState.UP and r.idle])

    def _others(self, request: Request, routes: list[Route]) -> list[Route]:
        """Those of ``routes`` a hedge of ``request`` may go to: not its own
        node's; for a keyed request, those of the bucket's replicaset."""
        own = request.last_route
        others = [r for r in routes if r.id != own]
        bucket = request.bucket
        if bucket is None or not others:
            return others
        owner = self.dispatcher.routing.owner(bucket.tier, bucket.bucket_id)
        return [r for r in others if owner is not None and r.candidate.replicaset == owner]
