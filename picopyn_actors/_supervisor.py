"""The supervisor actor: periodic discovery, and the node actors' lifecycle.

Every ``discovery_interval`` it runs discovery: it reads the catalog one node
at a time (:class:`~._discovery.CatalogReader`: the long-lived discovery
connection, the order of addresses, a deadline on each attempt), until one
gives a sane view.

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

A warning about a node that has an actor also goes to the event stream as a
:class:`NodeEvent` whose ``old`` and ``new`` states are the same (a note:
nothing changed on the client). ``views_rejected`` counts the views not acted
on, ``discovery_connects`` the connections discovery opened.

It then diffs the accepted view against the running node actors
(:func:`~._topology.diff`), and starts (at most one per address), drains,
retires and wakes node actors accordingly. A node actor that crashes is
logged and started again by the next discovery. Between runs it keeps the
bucket maps that ``Cluster.bucket()`` asked for, read on the discovery
connection.

Each warning is logged once, and again only after :data:`QUIET_PERIOD` without
it (one :class:`WarnOnce` for all of the supervisor's parts).

Example (inside the library)::

    supervisor = Supervisor(config, backend, dispatcher_send, hub, closing, dispatcher)
    await nursery.start(supervisor.run)   # returns after the first discovery
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable

import attrs
import trio

from ._bridge import Backend, BackendBroken, BackendQueryError
from ._config import ClusterConfig
from ._discovery import QUIET_PERIOD, CatalogReader, DiscoveryFailed, Link, WarnOnce
from ._dispatcher import Dispatcher, Message, RoutingUpdate
from ._dsn import Address
from ._errors import NoNodesAvailable
from ._events import EventHub, NodeEvent, NodeState, NodeStatistics
from ._node import NodeActor, Stop, UpdateInfo, Wake, backoff_delay
from ._routing import REPLICASETS_QUERY, TIERS_QUERY, Routing, buckets_query
from ._topology import (
    LEADER_QUERIES,
    Confirmation,
    NodeInfo,
    Note,
    Topology,
    agrees,
    check_tiers,
    check_view,
    confirmation,
    diff,
    discovery_deadline,
    find_node,
    guard,
    order_addresses,
)

log = logging.getLogger(__name__)

#: Nodes asked for a second opinion in one run, at most.
_SECOND_OPINIONS = 3
#: Client states in which a node serves requests (or is about to again).
_SERVING = frozenset({NodeState.UP, NodeState.SUSPECT})


def _fold(total: NodeStatistics, more: NodeStatistics) -> NodeStatistics:
    """Field by field sum of two counter snapshots."""
    names = [f.name for f in attrs.fields(NodeStatistics)]
    return NodeStatistics(**{n: getattr(total, n) + getattr(more, n) for n in names})


@attrs.define(eq=False)
class Supervisor:
    """Discovery and node actor lifecycle; see the module docstring.

    Counters (read them any time):

    Attributes:
        discovery_runs: discovery runs whose view was accepted.
        discovery_failures: runs in which no node gave a usable view.
        views_rejected: views not acted on: not sane, or stopping serving
            nodes without confirmation, or contradicted by the raft leader.
        discovery_connects: connections discovery opened (or tried to).
    """

    config: ClusterConfig
    backend: Backend
    dispatcher: trio.MemorySendChannel[Message]
    hub: EventHub
    closing: trio.Event
    router: Dispatcher

    discovery_runs: int = attrs.field(init=False, default=0)
    discovery_failures: int = attrs.field(init=False, default=0)
    views_rejected: int = attrs.field(init=False, default=0)
    topology: Topology | None = attrs.field(init=False, default=None)
    last_discovery_error: str | None = attrs.field(init=False, default=None)
    _actors: dict[str, NodeActor] = attrs.field(init=False, factory=dict)
    _leaving: set[NodeActor] = attrs.field(init=False, factory=set)
    _retired_total: NodeStatistics = attrs.field(init=False, factory=NodeStatistics)
    _ids: itertools.count[int] = attrs.field(init=False, factory=lambda: itertools.count(1))
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _warn_once: WarnOnce = attrs.field(init=False, factory=lambda: WarnOnce(QUIET_PERIOD))
    # Discovery's reads (set up in __attrs_post_init__).
    _reader: CatalogReader = attrs.field(init=False)
    # Bucket routing: the tiers that want it, the last good data, and who waits.
    routing: Routing = attrs.field(init=False, factory=Routing)
    _routed: dict[str, trio.Event] = attrs.field(init=False, factory=dict)
    _nap: trio.CancelScope | None = attrs.field(init=False, default=None)
    _wished: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self._reader = CatalogReader(self.config, self.backend, self, self._warn_once)

    # -- snapshots -----------------------------------------------------------------

    def actors(self) -> list[NodeActor]:
        """Running node actors, leaving ones included (retired ones not), by name."""
        actors = [*self._actors.values(), *self._leaving]
        return sorted(
            (a for a in actors if a.state is not NodeState.RETIRED),
            key=lambda a: (a.name, a.route_id),
        )

    def all_actors(self) -> list[NodeActor]:
        """Every node actor not yet wound down, retired ones included (for counters)."""
        return [*self._actors.values(), *self._leaving]

    def retired_statistics(self) -> list[NodeStatistics]:
        """Counters of every node actor that has stopped, folded into one total.

        A list (of one), so that callers can sum it with the live actors'
        counters; its size never grows with churn.
        """
        return [self._retired_total]

    @property
    def discovery_connects(self) -> int:
        """Connections discovery opened (or tried to)."""
        return self._reader.connects

    @property
    def discovery_address(self) -> Address | None:
        """Where the long-lived discovery connection goes now, if it is open."""
        return self._reader.address

    # -- the actor -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the first discovery, report started, then rediscover periodically.

        Raises :class:`NoNodesAvailable` (before ``started``) when the first
        discovery fails on every seed host within ``connect_timeout``, and
        :class:`ConfigError` when a requested tier does not exist. On the way
        out (cancellation included) the discovery connection is terminated.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._serve(task_status)
                finally:
                    # At once, not after the node actors wound down: the bridge
                    # closes the socket on its next turn, which must still come.
                    self._reader.drop()
        finally:
            self._reader.drop()

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            topology = await self.discover()
        except DiscoveryFailed as exc:
            raise NoNodesAvailable(
                f"discovery failed on every seed host of {self.config.dsn}; check the "
                "DSN, the password and that the nodes are reachable",
                exc.errors,
            ) from None
        if topology is not None:
            check_tiers(self.config.selector, topology)
            await self.apply(topology)
        task_status.started()
        interval = self.config.discovery_interval
        deadline = trio.current_time() + interval
        failures = 0
        while True:
            self._wished = False
            await self._refresh_routing()  # for a tier that wants it and has none yet
            if self._wished:
                continue  # another tier asked meanwhile
            with trio.CancelScope(deadline=deadline) as self._nap:
                await trio.sleep_forever()
            self._nap = None
            if trio.current_time() < deadline:
                continue  # woken early by want_routing(): the routing data comes first
            # Reschedule first, so that a slow or failing run never loses the beat.
            deadline = max(deadline + interval, trio.current_time())
            try:
                topology = await self.discover()
            except DiscoveryFailed as exc:
                # Every node refused: back off like the node actors do,
                # so that a dead cluster is not hammered.
                failures += 1
                pause = backoff_delay(failures, interval, max(interval, self.config.backoff_max))
                deadline = trio.current_time() + pause
                log.warning(
                    "discovery failed on every known node (next try in %.2fs): %s", pause, exc
                )
                continue
            failures = 0
            if topology is not None:
                await self.apply(topology)
            await self._refresh_routing(every=True)

    # -- bucket routing ----------------------------------------------------------------

    def want_routing(self, tier: str) -> trio.Event:
        """Keep ``tier``'s bucket map from now on; the event is set once a first
        answer (or failure) for it is in. Wakes the actor if it has none yet."""
        event = self._routed.get(tier)
        if event is None:
            self._routed[tier] = event = trio.Event()
            self._wished = True
            if self._nap is not None:
                self._nap.cancel()
        return event

    async def _refresh_routing(self, *, every: bool = False) -> None:
        """Read the routing data of the tiers that want it (``every``: all of them,
        else only those with none yet) on the discovery connection, and hand a
        new snapshot to the dispatcher. A tier whose ``_pico_bucket`` fails keeps
        its last good map."""
        tiers = sorted(t for t, e in self._routed.items() if every or not e.is_set())
        link = self._reader.link
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
            self._reader.abandon(link)  # the next discovery run opens another one
            log.debug("routing data not read from %s: %r", link.address, exc)
            return
        self.routing, problems = self.routing.refreshed(replicasets, tier_rows, answers)
        for tier, problem in problems.items():
            if self._warn_once(("routing", tier), trio.current_time()):
                log.warning(
                    "bucket map of tier %s not refreshed (the last good one is kept): %s",
                    tier,
                    problem,
                )
        await self.dispatcher.send(RoutingUpdate(self.routing))
        for tier in tiers:
            self._routed[tier].set()

    # -- one discovery run -------------------------------------------------------------

    async def discover(self) -> Topology | None:
        """One discovery run: the view to act on, or ``None`` to keep the last good one.

        Every address is tried in turn (see :meth:`CatalogReader.addresses`)
        until one gives a sane view, which is then judged (:meth:`_judge`).
        The first run shares ``connect_timeout`` among the seed hosts; later
        runs give each attempt the discovery deadline. Links opened here and
        not kept are terminated, whatever happens.

        Raises:
            DiscoveryFailed: no address gave a sane view.
        """
        errors: dict[str, str] = {}
        reader = self._reader
        actors = sorted(self._actors.values(), key=lambda a: a.name)
        addresses = reader.addresses(
            [
                [a.info.address for a in actors if a.state.routable],
                [a.info.address for a in actors],
                [n.address for n in self.topology.nodes.values()] if self.topology else [],
            ]
        )
        serving = frozenset(n for n, a in self._actors.items() if a.state in _SERVING)
        if self.topology is None:
            timeout = self.config.connect_timeout
            each = max(timeout / len(addresses), min(1.0, timeout))
        else:
            each = discovery_deadline(self.config.connect_timeout, self.config.discovery_interval)
        try:
            for address in addresses:
                try:
                    link, view = await reader.read(address, reader.take(address), each)
                except (BackendBroken, BackendQueryError) as exc:
                    errors[str(address)] = reader.attempt_failed(address, exc, each)
                    continue
                problem = check_view(view, serving)
                if problem is not None:
                    reader.abandon(link)
                    self._rejected(view, link.address, f"its catalog is rejected: {problem}")
                    errors[str(address)] = f"catalog rejected: {problem}"
                    continue
                accepted = await self._judge(link, view, serving, each)
                if accepted is not None:
                    self.topology = accepted
                    self.discovery_runs += 1
                    self.last_discovery_error = None
                return accepted
        finally:
            reader.close_unkept()
        self.discovery_failures += 1
        self.last_discovery_error = "; ".join(f"{a}: {e}" for a, e in errors.items())
        raise DiscoveryFailed(errors)

    # -- trusting a view -------------------------------------------------------------

    async def _judge(
        self, link: Link, view: Topology, serving: frozenset[str], timeout: float
    ) -> Topology | None:
        """Accept ``view``, confirm it first, or keep the last good view (``None``).

        ``view`` is sane and was read on ``link``; ``serving`` names the nodes
        that serve now. The view returned (guarded) is the one to act on. The
        link to ride from now on (``link``, the leader's, or that of a node
        that disagreed) is kept here as the long-lived discovery connection.
        """
        running, known = self.running(), self.known()
        guarded, notes = guard(view, known, running)
        plan = diff(running, guarded, self.config.selector)
        needed = confirmation(plan, serving)
        if needed is None:
            return self._accept(link, guarded, notes)
        leader = await self._leader_of(link, view, timeout)
        if (
            leader is not None
            and leader.address != link.address
            and leader.uuid != link.uuid
            and not self._reader.avoided(leader.address)
        ):
            answer = await self._second_view(leader.address, serving, timeout)
            if answer is not None:
                leader_link, leader_view = answer
                leader_guarded, leader_notes = guard(leader_view, known, running)
                if not agrees(needed, diff(running, leader_guarded, self.config.selector)):
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

    def _rejected(
        self, view: Topology, address: Address, why: str, action: str = "keeping the last good view"
    ) -> None:
        """A view not acted on: count it, ask its node last, tell once."""
        self.views_rejected += 1
        self._reader.avoid(address)
        name = self._reader.name_of(view, address)
        if self._warn_once(("rejected", name or address), trio.current_time()):
            log.warning("discovery: %s: %s; %s", view.source, why, action)
            if name is not None:
                self.note(name, f"{why}; {action}")

    # -- trusting a view: asking others -----------------------------------------------

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
        running, known = self.running(), self.known()
        staying = [
            info.address
            for name, info in sorted(running.items())
            if name in serving and name not in needed.stops
        ]
        stopping = [running[name].address for name in sorted(needed.stops)]
        others = [n.address for n in guarded.nodes.values() if n.routable]
        # A node that was slow or wrong lately is not asked for an opinion.
        ordered = order_addresses([staying, stopping, others], ())
        candidates = [a for a in ordered if a != link.address and not self._reader.avoided(a)]
        for address in candidates[:_SECOND_OPINIONS]:
            answer = await self._second_view(address, serving, timeout)
            if answer is None:
                continue
            other_link, other_view = answer
            other_guarded, _ = guard(other_view, known, running)
            if agrees(needed, diff(running, other_guarded, self.config.selector)):
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
            self._reader.abandon(link)
            self._reader.keep(other_link)
            return None
        self._disagreed(view, link, needed, None)
        self._reader.keep(link)
        return None

    async def _second_view(
        self, address: Address, serving: frozenset[str], timeout: float
    ) -> tuple[Link, Topology] | None:
        """A sane view read on a new connection to ``address``, or ``None``."""
        try:
            link, view = await self._reader.read(address, None, timeout)
        except (BackendBroken, BackendQueryError) as exc:
            self._reader.attempt_failed(address, exc, timeout)
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
                return find_node(key, view.nodes.values(), self.known().values())
        if scope.cancelled_caught:
            self._reader.abandon(link)  # a query may still run on it
        return None

    # -- trusting a view: verdicts -----------------------------------------------------

    def _accept(self, link: Link, view: Topology, notes: Iterable[Note]) -> Topology:
        """Ride ``link`` and tell the notes of ``view`` once; ``view`` is the verdict."""
        self._reader.keep(link)
        now = trio.current_time()
        for note in notes:
            if self._warn_once((note.kind, note.node or note.message), now):
                log.warning("discovery: %s", note.message)
                for name in (note.node, *note.others):
                    if name is not None:
                        self.note(name, note.message)
        # A node that is leaving is a poor source: read another from the next run on.
        name = view.named(link.uuid) if link.uuid is not None else None
        me = view.nodes.get(name) if name is not None else None
        if name is not None and (me is None or not me.routable):
            self._reader.drop()
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
        self._rejected(view, link.address, why, action)

    # -- what discovery asks (the Roster of ._discovery) ---------------------------------

    def running(self) -> dict[str, NodeInfo]:
        """The catalog entry of every node that has a node actor, by name."""
        return {name: actor.info for name, actor in self._actors.items()}

    def known(self) -> dict[str, NodeInfo]:
        """The last good entry of every node: the last accepted view, then the actors'."""
        known = dict(self.topology.nodes) if self.topology is not None else {}
        known.update(self.running())
        return known

    def note(self, name: str, reason: str) -> None:
        """Publish a note about node ``name``: an event with its state unchanged."""
        actor = self._actors.get(name)
        if actor is not None:
            state = actor.state
            self.hub.publish(NodeEvent(name, state, state, reason, trio.current_time()))

    # -- acting on a view --------------------------------------------------------------

    async def apply(self, topology: Topology) -> None:
        """Start, stop and wake node actors to match ``topology``.

        Each stopped node gets the plan's reason; a node whose address is
        served already (by another node actor) is not started.
        """
        plan = diff(self.running(), topology, self.config.selector)
        for info in plan.update:
            await self._actors[info.name].control.send(UpdateInfo(info))
        for name in plan.wake:
            await self._actors[name].control.send(Wake())
        for name in (*plan.drain, *plan.retire):
            await self._stop(name, plan.reasons.get(name, "catalog"))
        serving_at = {actor.info.address: name for name, actor in self._actors.items()}
        for info in plan.start:
            holder = serving_at.get(info.address)
            if holder is not None:
                if self._warn_once(("duplicate-address", info.name), trio.current_time()):
                    log.warning(
                        "discovery: node %s not started: its address %s is served as node %s",
                        info.name,
                        info.address,
                        holder,
                    )
                continue
            serving_at[info.address] = info.name
            await self._start(info)

    async def _stop(self, name: str, reason: str) -> None:
        actor = self._actors.pop(name, None)
        if actor is None:
            return
        self._leaving.add(actor)
        log.info("node %s: leaving (%s)", name, reason)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await actor.control.send(Stop(reason))

    async def _start(self, info: NodeInfo) -> None:
        assert self._nursery is not None
        actor = NodeActor(
            next(self._ids),
            info,
            self.config,
            self.backend,
            self.dispatcher,
            self.hub,
            self.closing,
            self.router,
        )
        self._actors[info.name] = actor
        log.info("node %s: joining at %s (%s)", info.name, info.address, info.current)
        await self._nursery.start(self._supervise, actor, name=f"node {info.name}")

    async def _supervise(
        self, actor: NodeActor, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await actor.run(task_status=task_status)
        except Exception:
            log.exception("node %s: actor crashed; the next discovery starts it again", actor.name)
        finally:
            if self._actors.get(actor.name) is actor:
                del self._actors[actor.name]
            self._leaving.discard(actor)
            self._retired_total = _fold(self._retired_total, actor.statistics())
