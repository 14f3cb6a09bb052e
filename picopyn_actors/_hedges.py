"""The dispatcher's hedge scheduler: which sent requests get a second attempt, when.

The request path does little for hedging: a send counts its request for the
budget (``Hedger.fresh``), and an answer counts down to the next latency
sample and stamps its node (``Candidate.answered_at``); no request is kept
anywhere for hedging. The scheduler looks at most once a millisecond
(``HEDGE_TICK``): from a send, while requests flow, and from the
dispatcher's task in a quiet moment (once no send has looked for
``BACKSTOP``). While the nodes keep answering, a look is one comparison per
node. A node with requests in flight that has answered nothing for the hedge
delay has *stalled*: its connection slots are looked at, and each request
there sent at least the delay ago and not answered is hedged: a hedge (a
second request, whose answer is its own) goes to another node, one that
holds no late request itself (while every other node is as late, the
request is held, and looked at again later). A late request on a node that
still answers others is slow by itself, and is left alone (a policy with
``only_stalled=False`` looks at every busy node's slots, and hedges it too).
The policy's state (latencies, budget, counters) is
:class:`~._hedging.Hedger`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs

from ._events import UP
from ._hedging import Hedger, Hedging
from ._request import SENT, Request

if TYPE_CHECKING:
    from ._dispatcher import Dispatcher
    from ._routes import Route

# Seconds between two looks at the nodes, at least.
HEDGE_TICK = 0.001
# While requests flow, their sends look; the dispatcher's task steps in only
# once no send has looked for this long (so a steady flow does not wake it
# every HEDGE_TICK). A hedge is late by at most this much when the flow stops.
BACKSTOP = 0.005

# Where a late request comes from, in a look: a stalled node's slots (late
# for the first time), or the held (every node it might go to was as late).
_NEW, _HELD = 0, 1


@attrs.define(eq=False)
class HedgeScheduler:
    """One :class:`Hedger` per policy, and when to look next."""

    dispatcher: Dispatcher
    _hedgers: dict[Hedging, Hedger] = attrs.field(init=False, factory=dict)
    #: The next look is due at this time or later (sends compare their time
    #: with it: the request path's only hedging work besides a count);
    #: ``-inf`` when no look is due before a new request could be late
    #: (nothing in flight, or only requests decided already), so that the
    #: next send looks (and makes sure the dispatcher's task wakes for it).
    next_look: float = attrs.field(init=False, default=-math.inf)
    _looked_by_send: float = attrs.field(init=False, default=-math.inf)
    # As of the last look: the earliest time a busy node could stall, a
    # request on a stalled one be late, or held requests be due (inf: none).
    _due: float = attrs.field(init=False, default=math.inf)

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
        due = self._due
        if due == math.inf:
            return due
        return max(due, self.next_look, self._looked_by_send + BACKSTOP)

    def sent(self, now: float) -> None:
        """A send at ``now`` found the next look due: look, and give the
        dispatcher's task the deadline it needs for what is left (pushed
        ``BACKSTOP`` past this look: while sends look, it does not wake)."""
        self._looked_by_send = now
        self.look(now)
        self.dispatcher.rearm(self.deadline, now, BACKSTOP, HEDGE_TICK)

    def look(self, now: float) -> None:
        """Count the requests sent since the last look for the budget, find
        the late requests on the nodes that stalled, and send a hedge for
        each. A hedge with no idle slot to go to waits at the head of the
        dispatcher's queue.

        With ``only_stalled`` (the default), a late request is hedged only
        once its node has answered nothing, to any request, for the hedge
        delay; until then it is not looked at (its node answers: it is slow
        by itself). Each attempt of a request is decided once (hedged,
        refused by the budget, or held).

        A hedge goes only to a node that holds no late request itself (late
        as of this look, or held): when every other node is as late, the
        slowness is not one node's (the client's own pause, a busy machine,
        a slow cluster), no hedge would answer sooner, and it is skipped
        (counted once) and held: looked at again an eighth of the delay
        later, and hedged once a node it may go to holds no late request (a
        pause of the client passes in a look or two). While requests stay
        held, the wait doubles, up to 8 delays: a cluster slow everywhere
        keeps every node late, and its held requests cost little. A held
        request keeps hedges off its node meanwhile.
        """
        hedgers = self._hedgers.values()
        least = math.inf  # the least delay known
        every = False  # a policy hedges late requests on nodes that answer, too
        for hedger in hedgers:
            if hedger.fresh:
                hedger.count(hedger.fresh, now)
                hedger.fresh = 0
            delay = hedger.delay(now)
            if delay < least:
                least = delay
            if not hedger.policy.only_stalled:
                every = True
        due = math.inf
        # (hedger, request, where it comes from: _NEW or _HELD)
        late: list[tuple[Hedger, Request, int]] = []
        for route in self.dispatcher.table.routes.values():
            candidate = route.candidate
            if candidate.in_flight:
                stalls = candidate.answered_at + least
                if stalls <= now or (every and least < math.inf):
                    due = min(due, self._scan(route, now, late))
                elif stalls < due:
                    due = stalls
        for hedger in hedgers:
            held = hedger.held
            if held and now >= hedger.held_due:  # every other node as late then: again
                late.extend((hedger, r, _HELD) for r in held if r.phase is SENT)
                held.clear()
        if late:
            self._decide(late, now)
        for hedger in hedgers:
            if hedger.held:
                if hedger.held_due <= now:  # looked at now, or held for the first time
                    delay = hedger.last_delay
                    hedger.held_wait = min(max(2 * hedger.held_wait, delay / 8), 8 * delay)
                    hedger.held_due = now + hedger.held_wait
                    hedger.held_at = {r.last_route for r in hedger.held}
                due = min(due, hedger.held_due)
            else:
                hedger.held_wait = 0.0
        self._due = due
        # A request sent from now on is late no sooner than ``now + least``:
        # while the next look is due by then, sends may wait for it;
        # otherwise (nothing in flight, or only requests decided already)
        # the next send looks, so that its request has a deadline.
        self.next_look = now + HEDGE_TICK if due <= now + least else -math.inf

    def _scan(self, route: Route, now: float, late: list[tuple[Hedger, Request, int]]) -> float:
        """Add the late requests on the slots of ``route`` (a node that
        stalled, or any busy one for a policy that is not ``only_stalled``)
        to ``late``; return when the next one there will be late."""
        due = math.inf
        answered = route.candidate.answered_at
        for slot in route.slots:
            request = slot.request
            if request is None:
                continue
            hedger = request.hedger
            started = slot.started
            if hedger is None or request.phase is not SENT or request.looked == started:
                continue  # a hedge, or pinned; answered (a hedge won); decided already
            delay = hedger.last_delay
            late_at = started + delay
            if hedger.policy.only_stalled and answered + delay > late_at:
                late_at = answered + delay
            if late_at > now:
                if late_at < due:
                    due = late_at
                continue
            request.looked = started  # decided now, whatever the decision
            late.append((hedger, request, _NEW))
        return due

    def _decide(self, late: list[tuple[Hedger, Request, int]], now: float) -> None:
        """Hedge, refuse or hold each of the ``late`` requests."""
        due = [
            (hedger, request, kind)
            for hedger, request, kind in late
            if self._needs_hedge(request) and (kind == _NEW or self._stalled(request, hedger, now))
        ]
        # No hedge goes where a request is late: one found late now, or a held
        # one still due (or not looked at now).
        late_at = {r.last_route for _, r, kind in late if kind == _NEW}
        late_at.update(r.last_route for _, r, _ in due)
        for hedger in self._hedgers.values():
            late_at.update(hedger.held_at if hedger.held else ())
        if due:
            # Where hedges may go this look (once, not once per request: a
            # slow cluster may hold many).
            free = [
                r
                for r in self.dispatcher.table.routes.values()
                if r.state is UP and r.id not in late_at
            ]
            for hedger, request, kind in due:
                self._hedge(request, hedger, free, now, kind == _HELD)

    def _stalled(self, request: Request, hedger: Hedger, now: float) -> bool:
        """Has the node of ``request`` (held) still answered nothing for the
        hedge delay? Always ``True`` unless the policy is ``only_stalled``.
        If it answered since, ``request`` is left to be found again, should
        its node stall once more."""
        if not hedger.policy.only_stalled:
            return True
        route_id = request.last_route
        route = None if route_id is None else self.dispatcher.table.routes.get(route_id)
        if route is None:
            return True  # its node left the table
        if route.candidate.answered_at + hedger.last_delay <= now:
            return True
        request.looked = -1.0
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
        if request.hedged:
            return  # (found twice in one look: held before, and late on a new attempt)
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
        return self._others(request, [r for r in routes if r.state is UP and r.idle])

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
