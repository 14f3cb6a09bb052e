"""Bucket routing for the supervisor: the tiers that want it, the last good data, and who waits.

A tier's bucket map is read only once something asks for it
(:meth:`RoutingRefresh.want`, from ``Cluster.bucket()`` for that tier). From
then on it is re-read after every discovery run that does not fail, on the
discovery connection, and each new :class:`~._routing.Routing` snapshot goes to
the dispatcher as a :class:`~._dispatcher.RoutingUpdate`. A tier whose
``_pico_bucket`` fails keeps its last good map, and that is told once.

A tier that asks for the first time does not wait for the next discovery run:
the supervisor naps between runs in :meth:`RoutingRefresh.nap_until`, which a
new wish wakes, so that its first map is read at once.

Example (inside the library)::

    refresh = RoutingRefresh(config, reader, updates, warn_once)
    ready = refresh.want("default")    # set once a first answer is in
    await refresh.nap_until(deadline)  # reads it meanwhile
"""

from __future__ import annotations

import logging

import attrs
import trio

from ._bridge import BackendBroken, BackendQueryError
from ._config import ClusterConfig
from ._discovery import CatalogReader, WarnOnce
from ._dispatcher import Message, RoutingUpdate
from ._routing import REPLICASETS_QUERY, TIERS_QUERY, Routing, buckets_query
from ._topology import discovery_deadline

# The supervisor's logger: this is part of its work.
log = logging.getLogger("picopyn_actors._supervisor")


@attrs.define(eq=False)
class RoutingRefresh:
    """Reads and hands out bucket routing data; see the module docstring.

    Attributes:
        routing: the last good routing data of every tier that wants it.
    """

    config: ClusterConfig
    reader: CatalogReader
    updates: trio.MemorySendChannel[Message]  # to the dispatcher's inbox
    warn_once: WarnOnce
    routing: Routing = attrs.field(init=False, factory=Routing)
    _routed: dict[str, trio.Event] = attrs.field(init=False, factory=dict)
    _nap: trio.CancelScope | None = attrs.field(init=False, default=None)
    _wished: bool = attrs.field(init=False, default=False)

    def want(self, tier: str) -> trio.Event:
        """Keep ``tier``'s bucket map from now on; the event is set once a first
        answer (or failure) for it is in. Wakes the nap if it has none yet."""
        event = self._routed.get(tier)
        if event is None:
            self._routed[tier] = event = trio.Event()
            self._wished = True
            if self._nap is not None:
                self._nap.cancel()
        return event

    async def nap_until(self, deadline: float) -> None:
        """Return at ``deadline``; meanwhile read the first map of every tier
        that asks for one (a wish wakes the nap: the routing data comes first)."""
        while True:
            self._wished = False
            await self.refresh()  # for a tier that wants it and has none yet
            if self._wished:
                continue  # another tier asked meanwhile
            with trio.CancelScope(deadline=deadline) as self._nap:
                await trio.sleep_forever()
            self._nap = None
            if trio.current_time() >= deadline:
                return

    async def refresh(self, *, every: bool = False) -> None:
        """Read the routing data of the tiers that want it (``every``: all of them,
        else only those with none yet) on the discovery connection, and hand a
        new snapshot to the dispatcher. A tier whose ``_pico_bucket`` fails keeps
        its last good map."""
        tiers = sorted(t for t, e in self._routed.items() if every or not e.is_set())
        link = self.reader.link
        if not tiers or link is None or not link.usable:
            return
        timeout = discovery_deadline(self.config.connect_timeout, self.config.discovery_interval)
        answers: dict[str, object] = {}
        try:
            with trio.fail_after(timeout):
                replicasets = await link.conn.run("fetch", REPLICASETS_QUERY, ())
                tier_rows = await link.conn.run("fetch", TIERS_QUERY, ())
                for tier in tiers:
                    try:
                        answers[tier] = await link.conn.run("fetchval", buckets_query(tier), ())
                    except BackendQueryError as exc:
                        answers[tier] = exc
        except (BackendBroken, BackendQueryError, trio.TooSlowError) as exc:
            self.reader.abandon(link)  # the next discovery run opens another one
            log.debug("routing data not read from %s: %r", link.address, exc)
            return
        self.routing, problems = self.routing.refreshed(replicasets, tier_rows, answers)
        for tier, problem in problems.items():
            if self.warn_once(("routing", tier), trio.current_time()):
                log.warning(
                    "bucket map of tier %s not refreshed (the last good one is kept): %s",
                    tier,
                    problem,
                )
        await self.updates.send(RoutingUpdate(self.routing))
        for tier in tiers:
            self._routed[tier].set()
