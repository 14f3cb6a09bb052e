"""The supervisor actor: periodic discovery, and the node actors' lifecycle.

Every ``discovery_interval`` it reads the catalog from any live node, falling
back through every node it knows and then every seed host of the DSN, so one
dead node (the seed included) never stops discovery. It diffs the result
against the running node actors (:func:`~._topology.diff`, a pure function)
and starts, drains, retires and wakes node actors accordingly. A node actor
that crashes is logged and started again by the next discovery.

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

from ._bridge import Backend, BackendBroken, BackendQueryError, Connection
from ._config import ClusterConfig
from ._dispatcher import Dispatcher, Message
from ._dsn import Address
from ._errors import NoNodesAvailable
from ._events import EventHub, NodeState, NodeStatistics
from ._identity import instance_uuid
from ._node import NodeActor, Stop, UpdateInfo, Wake, backoff_delay
from ._topology import (
    DISCOVERY_QUERY,
    MASTERS_QUERY,
    NodeInfo,
    Role,
    Topology,
    build_topology,
    check_tiers,
    diff,
)

log = logging.getLogger(__name__)



class DiscoveryFailed(Exception):
    """Every known node and seed host failed; ``errors`` maps address to error."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{a}: {e}" for a, e in errors.items()))


@attrs.define(eq=False)
class Supervisor:
    """Discovery and node actor lifecycle; see the module docstring."""

    config: ClusterConfig
    backend: Backend
    dispatcher: trio.MemorySendChannel[Message]
    hub: EventHub
    closing: trio.Event
    router: Dispatcher

    discovery_runs: int = attrs.field(init=False, default=0)
    discovery_failures: int = attrs.field(init=False, default=0)
    topology: Topology | None = attrs.field(init=False, default=None)
    last_discovery_error: str | None = attrs.field(init=False, default=None)
    _actors: dict[str, NodeActor] = attrs.field(init=False, factory=dict)
    _leaving: set[NodeActor] = attrs.field(init=False, factory=set)
    _retired_stats: list[NodeStatistics] = attrs.field(init=False, factory=list)
    _ids: itertools.count[int] = attrs.field(init=False, factory=lambda: itertools.count(1))
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)

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
        """Counters of node actors that have stopped."""
        return list(self._retired_stats)

    # -- the actor -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the first discovery, report started, then rediscover periodically.

        Raises :class:`NoNodesAvailable` (before ``started``) when the first
        discovery fails on every seed host within ``connect_timeout``, and
        :class:`ConfigError` when a requested tier does not exist.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                topology = await self.discover()
            except DiscoveryFailed as exc:
                raise NoNodesAvailable(
                    f"discovery failed on every seed host of {self.config.dsn}; check the "
                    "DSN, the password and that the nodes are reachable",
                    exc.errors,
                ) from None
            check_tiers(self.config.selector, topology)
            await self.apply(topology)
            task_status.started()
            interval = self.config.discovery_interval
            deadline = trio.current_time() + interval
            failures = 0
            while True:
                await trio.sleep_until(deadline)
                # Reschedule first, so that a slow or failing run never loses the beat.
                deadline = max(deadline + interval, trio.current_time())
                try:
                    topology = await self.discover()
                except DiscoveryFailed as exc:
                    # Every node refused: back off like the node actors do,
                    # so that a dead cluster is not hammered.
                    failures += 1
                    pause = backoff_delay(
                        failures, interval, max(interval, self.config.backoff_max)
                    )
                    deadline = trio.current_time() + pause
                    log.warning(
                        "discovery failed on every known node (next try in %.2fs): %s", pause, exc
                    )
                    continue
                failures = 0
                await self.apply(topology)

    def _addresses(self) -> list[Address]:
        """Where to ask, in order: nodes that are up, other known nodes, seeds."""
        seen: set[Address] = set()
        ordered: list[Address] = []

        def add(addresses: Iterable[Address]) -> None:
            for address in addresses:
                if address not in seen:
                    seen.add(address)
                    ordered.append(address)

        actors = self.actors()
        add(a.info.address for a in actors if a.state.routable)
        add(a.info.address for a in actors)
        if self.topology is not None:
            add(n.address for n in self.topology.nodes.values())
        add(self.config.dsn.hosts)
        return ordered

    async def discover(self) -> Topology:
        """One discovery run, trying every known address in turn.

        The run as a whole gets ``connect_timeout``, shared among the
        addresses, so that a hung first seed cannot use up the time of the
        others.
        """
        errors: dict[str, str] = {}
        addresses = self._addresses()
        up = {a.info.address for a in self._actors.values() if a.state.routable}
        timeout = self.config.connect_timeout
        share = max(timeout / len(addresses), min(1.0, timeout))
        for address in addresses:
            try:
                # A node that is up gets the whole time (a slow catalog read is
                # not a dead node); others share it, so that a hung seed cannot
                # use up the time of the rest.
                topology = await self._discover_from(address, timeout if address in up else share)
            except BackendBroken as exc:
                errors[str(address)] = exc.message
                continue
            except BackendQueryError as exc:
                errors[str(address)] = f"discovery query failed: {exc.message}"
                continue
            self.discovery_runs += 1
            self.topology = topology
            self.last_discovery_error = None
            return topology
        self.discovery_failures += 1
        self.last_discovery_error = "; ".join(f"{a}: {e}" for a, e in errors.items())
        raise DiscoveryFailed(errors)

    async def _discover_from(self, address: Address, timeout: float) -> Topology:
        conn: Connection | None = None
        try:
            with trio.fail_after(timeout):
                conn = await self.backend.connect(address)
                source = await self._self_name(conn)
                rows = await conn.run("fetch", DISCOVERY_QUERY, ())
                masters: dict[str, str | None] = {}
                if self.config.selector.role is not Role.ANY:
                    masters = {
                        str(r["name"]): r["current_master_name"]
                        for r in await conn.run("fetch", MASTERS_QUERY, ())
                    }
        except trio.TooSlowError:
            raise BackendBroken(f"discovery timed out after {timeout}s", sent=False) from None
        finally:
            if conn is not None:
                conn.terminate()
        topology = build_topology(rows, masters, source=source or str(address))
        log.debug("discovery from %s: %d nodes", address, len(topology.nodes))
        return topology

    async def _self_name(self, conn: Connection) -> str | None:
        """Which instance answered (see :func:`~._identity.instance_uuid`)."""
        return await instance_uuid(conn, self.backend)

    async def apply(self, topology: Topology) -> None:
        """Start, stop and wake node actors to match ``topology``."""
        running = {name: actor.info for name, actor in self._actors.items()}
        plan = diff(running, topology, self.config.selector)
        for info in plan.update:
            await self._actors[info.name].control.send(UpdateInfo(info))
        for name in plan.wake:
            await self._actors[name].control.send(Wake())
        for name in plan.drain:
            info = topology.nodes[name]
            await self._stop(name, f"catalog: current {info.current}, target {info.target}")
        for name in plan.retire:
            info_or_none = topology.nodes.get(name)
            reason = "expelled" if info_or_none is not None else "no longer in the catalog"
            await self._stop(name, reason)
        for info in plan.start:
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
            self._retired_stats.append(actor.statistics())
