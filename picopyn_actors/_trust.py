"""The judgement of a view: act on it, confirm it first, or keep the last good one.

No single node's word is taken on trust (the pure decisions are in
:mod:`._topology`):

* a view is accepted only when it is sane (:func:`~._topology.check_view`);
* a row that cannot be used, or two nodes on one address, never take a node
  out of service (:func:`~._topology.guard`);
* a plan that would drain or retire nodes serving now is first confirmed
  (:func:`~._topology.confirmation`) by the raft leader's catalog, when the
  answering node names another node as leader and it answers, or else by a
  second node whose view stops the same nodes. Otherwise the last good view
  is kept, and the node that disagreed is named in one WARNING.

Each warning is logged once, and again only after
:data:`~._discovery.QUIET_PERIOD` without it (:class:`~._discovery.WarnOnce`);
a warning about a node that has an actor also goes to the event stream as a
:class:`~._events.NodeEvent` whose ``old`` and ``new`` states are the same (a
note: nothing changed on the client). A node whose view was rejected (not
sane, or contradicted by another node) is asked last for a while, and is not
asked to confirm; a view that merely found no one to confirm it is not held
against its node, or the nodes could take turns being asked last until none
is left to confirm anything.

Example (inside the library)::

    judge = Judge(config.selector, reader, supervisor, warn_once)
    view = await judge.judge(link, view, serving, timeout)   # None: keep the last good one
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import attrs
import trio

from ._bridge import BackendBroken, BackendQueryError
from ._discovery import CatalogReader, Link, Roster, WarnOnce
from ._dsn import Address
from ._topology import (
    LEADER_QUERIES,
    Confirmation,
    NodeInfo,
    Note,
    Selector,
    Topology,
    agrees,
    check_view,
    confirmation,
    diff,
    find_node,
    guard,
    order_addresses,
)

# The supervisor's logger: these are its decisions.
log = logging.getLogger("picopyn_actors._supervisor")

#: Nodes asked for a second opinion in one run, at most.
_SECOND_OPINIONS = 3


@attrs.define(eq=False)
class Judge:
    """Decides whether a view is acted on; see the module docstring.

    Attributes:
        views_rejected: views not acted on: not sane, or stopping serving
            nodes without confirmation, or contradicted by the raft leader.
    """

    selector: Selector
    reader: CatalogReader
    roster: Roster
    warn_once: WarnOnce
    views_rejected: int = attrs.field(init=False, default=0)

    async def judge(
        self, link: Link, view: Topology, serving: frozenset[str], timeout: float
    ) -> Topology | None:
        """Accept ``view``, confirm it first, or keep the last good view (``None``).

        ``view`` is sane and was read on ``link``; ``serving`` names the nodes
        that serve now. The view returned (guarded) is the one to act on. The
        link to ride from now on (``link``, the leader's, or that of a node
        that disagreed) is kept here as the long-lived discovery connection.
        """
        running, known = self.roster.running(), self.roster.known()
        guarded, notes = guard(view, known, running)
        plan = diff(running, guarded, self.selector)
        needed = confirmation(plan, serving)
        if needed is None:
            return self._accept(link, guarded, notes)
        leader = await self._leader_of(link, view, timeout)
        if (
            leader is not None
            and leader.address != link.address
            and leader.uuid != link.uuid
            and not self.reader.avoided(leader.address)
        ):
            answer = await self._second_view(leader.address, serving, timeout)
            if answer is not None:
                leader_link, leader_view = answer
                leader_guarded, leader_notes = guard(leader_view, known, running)
                if not agrees(needed, diff(running, leader_guarded, self.selector)):
                    self._disagreed(
                        view,
                        link,
                        needed,
                        f"the raft leader {leader.name}",
                        "following the leader's catalog",
                    )
                else:
                    log.info(
                        "discovery: the raft leader %s confirms the catalog of %s: stopping %s",
                        leader.name,
                        view.source,
                        needed,
                    )
                # The leader has the freshest catalog: ride it from now on.
                return self._accept(leader_link, leader_guarded, leader_notes)
        return await self._second_opinion(link, view, guarded, notes, needed, serving, timeout)

    def rejected(
        self,
        view: Topology,
        address: Address,
        why: str,
        action: str = "keeping the last good view",
        *,
        avoid: bool = True,
    ) -> None:
        """A view not acted on: count it, ask its node last (with ``avoid``), tell once."""
        self.views_rejected += 1
        if avoid:
            self.reader.avoid(address)
        name = self.reader.name_of(view, address)
        if self.warn_once(("rejected", name or address), trio.current_time()):
            log.warning("discovery: %s: %s; %s", view.source, why, action)
            if name is not None:
                self.roster.note(name, f"{why}; {action}")

    # -- asking others -----------------------------------------------------------------

    async def _second_opinion(
        self,
        link: Link,
        view: Topology,
        guarded: Topology,
        notes: tuple[Note, ...],
        needed: Confirmation,
        serving: frozenset[str],
        timeout: float,
    ) -> Topology | None:
        """Ask other nodes (those staying first) whether they stop the same nodes."""
        running, known = self.roster.running(), self.roster.known()
        staying = [
            info.address
            for name, info in sorted(running.items())
            if name in serving and name not in needed.stops
        ]
        stopping = [running[name].address for name in sorted(needed.stops)]
        others = [n.address for n in guarded.nodes.values() if n.routable]
        # A node that was slow or wrong lately is not asked for an opinion.
        ordered = order_addresses([staying, stopping, others], ())
        candidates = [a for a in ordered if a != link.address and not self.reader.avoided(a)]
        for address in candidates[:_SECOND_OPINIONS]:
            answer = await self._second_view(address, serving, timeout)
            if answer is None:
                continue
            other_link, other_view = answer
            other_guarded, _ = guard(other_view, known, running)
            if agrees(needed, diff(running, other_guarded, self.selector)):
                log.info(
                    "discovery: %s confirms the catalog of %s: stopping %s",
                    other_view.source,
                    view.source,
                    needed,
                )
                return self._accept(link, guarded, notes)
            # They disagree: act on neither; ride the node that disagreed, so
            # that the next run reads a catalog that may be sane.
            self._disagreed(view, link, needed, other_view.source)
            self.reader.abandon(link)
            self.reader.keep(other_link)
            return None
        self._disagreed(view, link, needed, None)
        self.reader.keep(link)
        return None

    async def _second_view(
        self, address: Address, serving: frozenset[str], timeout: float
    ) -> tuple[Link, Topology] | None:
        """A sane view read on a new connection to ``address``, or ``None``."""
        try:
            link, view = await self.reader.read(address, None, timeout)
        except (BackendBroken, BackendQueryError) as exc:
            self.reader.attempt_failed(address, exc, timeout)
            return None
        problem = check_view(view, serving)
        if problem is not None:
            log.debug("discovery: second view from %s is not sane: %s", view.source, problem)
            link.close()
            return None
        return link, view

    async def _leader_of(self, link: Link, view: Topology, timeout: float) -> NodeInfo | None:
        """The raft leader as the node behind ``link`` knows it, if it can say."""
        with trio.move_on_after(timeout) as scope:
            for query in LEADER_QUERIES:
                try:
                    value = await link.conn.run("fetchval", query, ())
                except BackendQueryError:
                    continue
                except BackendBroken:
                    return None
                if value is None:
                    continue
                key: str | int = str(value) if query == LEADER_QUERIES[0] else int(value)
                return find_node(key, view.nodes.values(), self.roster.known().values())
        if scope.cancelled_caught:
            self.reader.abandon(link)  # a query may still run on it
        return None

    # -- verdicts ----------------------------------------------------------------------

    def _accept(self, link: Link, view: Topology, notes: Iterable[Note]) -> Topology:
        """Ride ``link`` and tell the notes of ``view`` once; ``view`` is the verdict."""
        self.reader.keep(link)
        now = trio.current_time()
        for note in notes:
            if self.warn_once((note.kind, note.node or note.message), now):
                log.warning("discovery: %s", note.message)
                for name in (note.node, *note.others):
                    if name is not None:
                        self.roster.note(name, note.message)
        # A node that is leaving is a poor source: read another from the next run on.
        name = view.named(link.uuid) if link.uuid is not None else None
        me = view.nodes.get(name) if name is not None else None
        if name is not None and (me is None or not me.routable):
            self.reader.drop()
        return view

    def _disagreed(
        self,
        view: Topology,
        link: Link,
        needed: Confirmation,
        other: str | None,
        action: str = "keeping the last good view",
    ) -> None:
        if other is None:
            why = f"its catalog would stop {needed}, and no other node could confirm it"
        else:
            why = f"its catalog would stop {needed}, and {other} disagrees"
        # Nobody contradicted it: asking its node last would only take away the
        # one confirmer the next node to read might have.
        self.rejected(view, link.address, why, action, avoid=other is not None)
