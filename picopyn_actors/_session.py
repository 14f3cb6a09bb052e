"""A node actor's session: its probe connection, its connection slots, its generation.

A :class:`Session` is one attempt of a node actor to serve its node. It opens
a probe connection, checks that the server is the node the catalog names
(``pico_instance_uuid()``; this also serves as the first probe), opens
``connections_per_node`` query connections (at most ``CONNECTS_AT_ONCE`` at a
time), each wrapped in a :class:`~._slot.Slot` handed to the dispatcher, and
probes the node every ``health_interval`` on its own connection, so that a
hung node is noticed even when every query connection is busy; each probe
asks the uuid again, so a server that stops being the node is noticed too.

A session never changes the node's state itself. It records *facts* (a
connection is ready, one broke, the node failed) and wakes its node actor,
which decides. When the actor ends a session (:meth:`Session.end`), every
slot is withdrawn from the dispatcher at once and every connection dropped:
a stale slot is never handed out, and the late callbacks of a dead session
change nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import outcome
import trio

from ._bridge import BackendBroken, BackendQueryError, Connection
from ._identity import instance_uuid
from ._request import PIN, Request
from ._slot import Lease, Slot, reroute_or_fail
from ._util import split_clock

if TYPE_CHECKING:
    from ._node import NodeActor

log = logging.getLogger("picopyn_actors._node")
# Query connections of one node opened at the same time: logins are paced, for
# the server's sake and so that the event loop never runs one unbounded burst
# of connect callbacks.
CONNECTS_AT_ONCE = 4


@attrs.define(eq=False)
class Session:
    """One session of a node actor; see the module docstring."""

    node: NodeActor
    generation: int
    clock: Callable[[], float]
    # The clock split for the hot path (see split_clock): perf() + offset.
    perf: Callable[[], float] = attrs.field(init=False)
    offset: float = attrs.field(init=False)
    alive: bool = attrs.field(init=False, default=True)
    # Facts for the node actor, which reads them when woken.
    ready: int = attrs.field(init=False, default=0)
    broken: str | None = attrs.field(init=False, default=None)
    repaired: bool = attrs.field(init=False, default=False)
    failure: BackendBroken | None = attrs.field(init=False, default=None)
    slots: set[Slot] = attrs.field(init=False, factory=set)
    _scope: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)
    _probe: Connection | None = attrs.field(init=False, default=None)
    _repairs: trio.MemorySendChannel[bool] | None = attrs.field(init=False, default=None)
    # The server answers an instance uuid: every probe checks it again.
    _checkable: bool = attrs.field(init=False, default=True)

    def __attrs_post_init__(self) -> None:
        self.perf, self.offset = split_clock(self.clock)

    # -- the session task --------------------------------------------------------

    async def run(self) -> None:
        """Connect, check, open the slots and probe until the node fails or the session ends."""
        node = self.node
        with self._scope:
            try:
                self._probe = await self.connect()
                # The identity check is also the first probe (one query, not two).
                await self._check_identity(self._probe)
            except BackendBroken as exc:
                self._drop_probe()
                self.fail(exc)
                return
            count = node.config.connections_per_node
            self._repairs, repairs = trio.open_memory_channel[bool](count)
            for _ in range(count):
                self._repairs.send_nowait(False)
            try:
                async with trio.open_nursery() as openers:
                    for index in range(min(count, CONNECTS_AT_ONCE)):
                        name = f"node {node.name} opener {index}"
                        openers.start_soon(self._open_slots, repairs.clone(), name=name)
                    error = await self._watch()
                    openers.cancel_scope.cancel()
            finally:
                self._repairs = None
                self._drop_probe()
            self.fail(error)

    def _drop_probe(self) -> None:
        if self._probe is not None:
            self._probe.terminate()
            self._probe = None

    async def _check_identity(self, probe: Connection) -> None:
        """The server must be the node the catalog names: compare its uuid.

        Timed like a probe, and counted as one. A server with neither uuid
        function cannot be checked: it gets a plain probe instead.
        """
        node = self.node
        timeout = node.config.probe_timeout
        start = self.clock()
        try:
            with trio.fail_after(timeout):
                uuid = await instance_uuid(probe, node.backend)
        except trio.TooSlowError:
            raise BackendBroken(
                f"probe timed out after {timeout}s (node hung?)", sent=False, timed_out=True
            ) from None
        if uuid is None:
            log.debug("node %s: the server has no instance uuid function; not checked", node.name)
            self._checkable = False
            node.observe_latency(await self.probe(probe))
            return
        node.observe_latency(self.clock() - start)
        if uuid != node.info.uuid:
            raise BackendBroken(
                f"identity mismatch: the server at {node.info.address} answers uuid {uuid}, "
                f"but the catalog row of {node.info.name} says uuid {node.info.uuid} (is the "
                "address in the catalog wrong, or another server on it?)",
                sent=False,
                identity=True,
            )

    async def _watch(self) -> BackendBroken:
        """Probe every ``health_interval``; return the error once the node has failed.

        Each probe asks the server's uuid again (when it has one), so that a
        server that is no longer the node, with connections open, is noticed
        within one interval."""
        node = self.node
        while True:
            await trio.sleep(node.config.health_interval)
            assert self._probe is not None
            try:
                if self._checkable:
                    await self._check_identity(self._probe)
                else:
                    node.observe_latency(await self.probe(self._probe))
                continue
            except BackendBroken as exc:
                if exc.timed_out or exc.identity:
                    return exc
            # The probe's own connection broke (a reset, say): it is the node
            # that is judged, so try a fresh one once.
            self._drop_probe()
            try:
                self._probe = await self.connect()
                node.observe_latency(await self.probe(self._probe))
            except BackendBroken as exc:
                return exc

    async def _open_slots(self, repairs: trio.MemoryReceiveChannel[bool]) -> None:
        """Open a connection for each token in ``repairs`` (``True``: a replacement)."""
        node = self.node
        async with repairs:
            async for replacing in repairs:
                try:
                    conn = await self.connect()
                except BackendBroken as exc:
                    self.fail(exc)
                    return
                if not self.alive or not node.serving:  # ended, or the node is leaving
                    conn.terminate()
                    return
                slot = Slot(self, conn)
                self.slots.add(slot)
                self.ready += 1
                node.connections += 1
                if replacing:
                    node.counters.reconnects += 1
                    self.repaired = True
                node.wake()
                node.router.opened(slot, self.slots)

    async def connect(self) -> Connection:
        """Open one connection to the node, within ``connect_timeout``."""
        node = self.node
        timeout = node.config.connect_timeout
        try:
            with trio.fail_after(timeout):
                return await node.backend.connect(node.info.address)
        except trio.TooSlowError:
            raise BackendBroken(
                f"connect timed out after {timeout}s", sent=False, timed_out=True
            ) from None

    async def probe(self, conn: Connection) -> float:
        """Run the health probe within ``probe_timeout``; return its latency."""
        timeout = self.node.config.probe_timeout
        start = self.clock()
        try:
            with trio.fail_after(timeout):
                await conn.probe()
        except trio.TooSlowError:
            raise BackendBroken(
                f"probe timed out after {timeout}s (node hung?)", sent=False, timed_out=True
            ) from None
        except BackendQueryError as exc:
            raise BackendBroken(f"probe failed: {exc.message}", sent=False) from None
        return self.clock() - start

    # -- facts for the node actor -------------------------------------------------

    def fail(self, error: BackendBroken) -> None:
        """The node failed (not just one connection): the actor ends this session.

        Its idle slots are withdrawn at once, and a slot that finishes from now
        on is not given back (see :meth:`give_back`): between the failure and
        the actor's turn, no request goes to this session.
        """
        if self.alive and self.failure is None:
            self.failure = error
            node = self.node
            node.router.withdraw(node.route_id)
            node.wake()

    def replace(self, slot: Slot) -> None:
        """Drop a slot's connection and open another one in its place."""
        slot.conn.terminate()
        if slot in self.slots:
            self.slots.discard(slot)
            self.node.connections -= 1
            repairs = self._repairs
            if repairs is not None and self.node.serving and self.failure is None:
                repairs.send_nowait(True)  # cannot overflow: one token per missing slot

    # -- ending ---------------------------------------------------------------------

    def end(self, reason: str) -> None:
        """Stop the session now: withdraw its slots, drop every connection, and give
        back or fail every request it still held. Idempotent."""
        if not self.alive:
            return
        self.alive = False
        self._scope.cancel()
        node = self.node
        node.router.withdraw(node.route_id)
        slots, self.slots = self.slots, set()
        held = []
        for slot in slots:
            request = slot.request
            if request is not None:
                held.append(request)
                slot.request = None
                (request.parent or request).in_flight -= 1
        node.candidate.in_flight = 0
        node.connections = 0
        # Act: connections first, then the requests (a retry may start at once).
        for slot in slots:
            slot.conn.terminate()
        for request in held:
            if request.method != PIN:
                reroute_or_fail(node, request, reason, sent=True)

    # -- requests -------------------------------------------------------------------

    def note_broken(self, error: str) -> None:
        """A query connection broke (the node may be fine): tell the actor."""
        node = self.node
        node.counters.connection_errors += 1
        node.last_error = error
        if self.alive:
            self.broken = error
            node.wake()

    def give_back(self, slot: Slot) -> None:
        """A slot finished its request: back to the dispatcher, unless the node is
        leaving or the session failed."""
        if self.node.serving and self.failure is None:
            self.node.router.release(slot)
        else:  # draining: nothing new goes to this node
            self.replace(slot)

    # -- pinned connections -----------------------------------------------------------

    def lend(self, slot: Slot, request: Request) -> None:
        """Hand the slot's connection to a ``cluster.connection()`` caller."""
        lease = Lease(slot.conn, self.node.name, functools.partial(self._returned, slot))
        if not request.finish(outcome.Value(lease)):
            self._returned(slot, dirty=False)

    def _returned(self, slot: Slot, dirty: bool) -> None:
        """A lent connection came back."""
        if slot not in self.slots or slot.request is None:
            return  # the session ended while it was lent: it was dropped then
        slot.request = None
        self.node.candidate.in_flight -= 1
        if dirty or slot.conn.is_closed():
            self.replace(slot)
        else:
            self.give_back(slot)
        if not self.node.serving and self.node.candidate.in_flight == 0:
            self.node.wake()
