"""The supervisor actor: periodic discovery, and the node actors' lifecycle.

Every ``discovery_interval`` it runs discovery: it reads the catalog one node
at a time (:class:`~._discovery.CatalogReader`: the long-lived discovery
connection, the order of addresses, a deadline on each attempt), until one
gives a sane view, and judges that view (:class:`~._trust.Judge`: no single
node's word is taken on trust; a view that would stop serving nodes is
confirmed first, or the last good view is kept). ``views_rejected`` counts
the views not acted on, ``discovery_connects`` the connections discovery
opened.

It then diffs the accepted view against the running node actors
(:func:`~._topology.diff`), and starts (at most one per address), drains,
retires and wakes node actors accordingly. A node actor that crashes is
logged and started again by the next discovery. Between runs it keeps the
bucket maps that ``Cluster.bucket()`` asked for
(:class:`~._routing_refresh.RoutingRefresh`).

Each warning is logged once, and again only after :data:`QUIET_PERIOD` without
it (one :class:`WarnOnce` for all of the supervisor's parts).

Example (inside the library)::

    supervisor = Supervisor(config, backend, updates, hub, closing, dispatcher)
    await nursery.start(supervisor.run)   # returns after the first discovery
"""

from __future__ import annotations

import contextlib
import itertools
import logging

import attrs
import trio

from ._bridge import Backend, BackendBroken, BackendQueryError
from ._config import ClusterConfig
from ._discovery import QUIET_PERIOD, CatalogReader, DiscoveryFailed, WarnOnce
from ._dispatcher import Dispatcher, Message
from ._dsn import Address
from ._errors import NoNodesAvailable
from ._events import EventHub, NodeEvent, NodeState, NodeStatistics
from ._node import NodeActor, Stop, UpdateInfo, Wake, backoff_delay
from ._routing import Routing
from ._routing_refresh import RoutingRefresh
from ._topology import NodeInfo, Topology, check_tiers, check_view, diff, discovery_deadline
from ._trust import Judge

log = logging.getLogger(__name__)

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
    updates: trio.MemorySendChannel[Message]  # to the dispatcher's inbox
    hub: EventHub
    closing: trio.Event
    router: Dispatcher

    discovery_runs: int = attrs.field(init=False, default=0)
    discovery_failures: int = attrs.field(init=False, default=0)
    topology: Topology | None = attrs.field(init=False, default=None)
    last_discovery_error: str | None = attrs.field(init=False, default=None)
    _actors: dict[str, NodeActor] = attrs.field(init=False, factory=dict)
    _leaving: set[NodeActor] = attrs.field(init=False, factory=set)
    _retired_total: NodeStatistics = attrs.field(init=False, factory=NodeStatistics)
    _ids: itertools.count[int] = attrs.field(init=False, factory=lambda: itertools.count(1))
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _warn_once: WarnOnce = attrs.field(init=False, factory=lambda: WarnOnce(QUIET_PERIOD))
    # The parts (set up in __attrs_post_init__): reads, judgement, bucket routing.
    _reader: CatalogReader = attrs.field(init=False)
    _judge: Judge = attrs.field(init=False)
    _routing: RoutingRefresh = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._reader = CatalogReader(self.config, self.backend, self, self._warn_once)
        self._judge = Judge(self.config.selector, self._reader, self, self._warn_once)
        self._routing = RoutingRefresh(self.config, self._reader, self.updates, self._warn_once)

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
    def views_rejected(self) -> int:
        """Views not acted on (see the class docstring)."""
        return self._judge.views_rejected

    @property
    def discovery_connects(self) -> int:
        """Connections discovery opened (or tried to)."""
        return self._reader.connects

    @property
    def discovery_address(self) -> Address | None:
        """Where the long-lived discovery connection goes now, if it is open."""
        return self._reader.address

    @property
    def routing(self) -> Routing:
        """The last good bucket routing data of every tier that wants it."""
        return self._routing.routing

    def want_routing(self, tier: str) -> trio.Event:
        """Keep ``tier``'s bucket map from now on; the event is set once a first
        answer (or failure) for it is in. Wakes the actor if it has none yet."""
        return self._routing.want(tier)

    # -- the actor -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the first discovery, report started, then rediscover periodically.

        Raises :class:`NoNodesAvailable` (before ``started``) when the first
        discovery fails on every seed host within ``connect_timeout`` (but
        ``Cancelled`` when it was cancelled meanwhile), and
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
            # Failures that a cancellation from outside caused (the thread
            # bridge closes a connection in its own thread, and the read that
            # finds it closed has no checkpoint to raise the cancel at) are
            # not the caller's news: the cancel is.
            await trio.lowlevel.checkpoint_if_cancelled()
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
            # Woken early by want_routing(): the routing data comes first.
            await self._routing.nap_until(deadline)
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
            await self._routing.refresh(every=True)

    # -- one discovery run -------------------------------------------------------------

    async def discover(self) -> Topology | None:
        """One discovery run: the view to act on, or ``None`` to keep the last good one.

        Every address is tried in turn (see :meth:`CatalogReader.addresses`)
        until one gives a sane view, which is then judged (:meth:`Judge.judge`).
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
                    self._judge.rejected(view, link.address, f"its catalog is rejected: {problem}")
                    errors[str(address)] = f"catalog rejected: {problem}"
                    continue
                accepted = await self._judge.judge(link, view, serving, each)
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
            self.updates,
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
