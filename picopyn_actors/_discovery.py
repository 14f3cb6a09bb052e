"""Discovery's reads: one node's catalog at a time, each attempt with a deadline.

Discovery reads the catalog on a connection of its own (a :class:`Link`),
kept open between runs (an idle client logs in nowhere), and opens another
only when that one breaks or is too slow. A :class:`CatalogReader` holds that
connection and says where to ask, in order (:meth:`CatalogReader.addresses`):
the node it rides, nodes that are up, other known nodes, then every seed host
of the DSN, so one dead or hung node (the seed included) never stops
discovery. Each attempt at one node has a deadline
(:func:`~._topology.discovery_deadline`); a connection that outlives it is
terminated, and the node is asked last for a while. A new connection is
asked once which instance answers (:func:`~._identity.instance_uuid`), so that
a view can be told apart from the node that gave it.

Whether a view read here is acted on is for :mod:`._trust` to judge; each
warning here and there is rate limited by one shared :class:`WarnOnce`.

Example (inside the library)::

    reader = CatalogReader(config, backend, supervisor, WarnOnce(QUIET_PERIOD))
    for address in reader.addresses([known_addresses]):
        link, view = await reader.read(address, reader.take(address), timeout)
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable
from typing import Protocol

import attrs
import trio

from ._bridge import Backend, BackendBroken, BackendQueryError, Connection
from ._config import ClusterConfig
from ._dsn import Address
from ._identity import instance_uuid
from ._topology import (
    DISCOVERY_QUERY,
    MASTERS_QUERY,
    NodeInfo,
    Role,
    Topology,
    build_topology,
    find_node,
    order_addresses,
)

# The supervisor's logger: these are its reads.
log = logging.getLogger("picopyn_actors._supervisor")

#: A warning about the same thing is logged again only after this many
#: seconds in which it did not happen.
QUIET_PERIOD = 60.0
#: A node that was too slow, or whose catalog was rejected, is asked last for
#: this many discovery intervals, and at least ``_AVOID_MIN`` seconds.
_AVOID_INTERVALS = 10
_AVOID_MIN = 10.0


class DiscoveryFailed(Exception):
    """Every known node and seed host failed; ``errors`` maps address to error."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{a}: {e}" for a, e in errors.items()))


@attrs.define
class WarnOnce:
    """Rate limit for warnings: a key is ready when it was not seen for ``quiet`` seconds.

    Every call counts as seeing the key, so a condition that persists is told
    once, however often it is seen. Keys not seen for ``quiet`` seconds are
    forgotten, so the bookkeeping stays bounded.
    """

    quiet: float
    _seen: dict[Hashable, float] = attrs.field(init=False, factory=dict)

    def __call__(self, key: Hashable, now: float) -> bool:
        """Record ``key`` as seen at ``now``; ``True`` when it should be told."""
        last = self._seen.pop(key, None)
        self._seen[key] = now
        if len(self._seen) > 64:
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.quiet}
        return last is None or now - last >= self.quiet


class Roster(Protocol):
    """What discovery asks of the owner of the node actors (the supervisor)."""

    def running(self) -> dict[str, NodeInfo]:
        """The catalog entry of every node that has a node actor, by name."""
        ...

    def known(self) -> dict[str, NodeInfo]:
        """The last good entry of every node: the last accepted view, then the actors'."""
        ...

    def note(self, name: str, reason: str) -> None:
        """Tell the event stream something about node ``name`` (its state unchanged)."""
        ...


@attrs.define(eq=False)
class Link:
    """A discovery connection, and the uuid its server gave (once per connection)."""

    address: Address
    conn: Connection
    uuid: str | None = None
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        self.conn.terminate()

    @property
    def usable(self) -> bool:
        return not self.closed and not self.conn.is_closed()


@attrs.define(eq=False)
class CatalogReader:
    """Reads one node's catalog at a time; keeps the long-lived link; see the module docstring.

    Attributes:
        connects: connections it opened (or tried to).
        link: the long-lived discovery connection, if one is open.
    """

    config: ClusterConfig
    backend: Backend
    roster: Roster
    warn_once: WarnOnce
    connects: int = attrs.field(init=False, default=0)
    link: Link | None = attrs.field(init=False, default=None)
    _opened: list[Link] = attrs.field(init=False, factory=list)
    _avoid: dict[Address, float] = attrs.field(init=False, factory=dict)

    @property
    def address(self) -> Address | None:
        """Where the long-lived discovery connection goes now, if it is open."""
        return self.link.address if self.link is not None else None

    # -- where to ask ------------------------------------------------------------------

    def addresses(self, known: Iterable[Iterable[Address]]) -> list[Address]:
        """Where to ask, in order: the open discovery connection, the groups of
        ``known`` (nodes that are up, other known nodes, ...), the seeds; nodes
        that were slow or wrong lately last."""
        now = trio.current_time()
        self._avoid = {a: until for a, until in self._avoid.items() if until > now}
        groups: list[Iterable[Address]] = [
            [self.link.address] if self.link is not None else [],
            *known,
            self.config.dsn.hosts,
        ]
        return order_addresses(groups, self._avoid)

    def avoided(self, address: Address) -> bool:
        """Whether ``address`` was slow or wrong lately (as of the run's start)."""
        return address in self._avoid

    def avoid(self, address: Address) -> float:
        """Ask ``address`` last for a while; returns for how many seconds."""
        pause = max(_AVOID_MIN, _AVOID_INTERVALS * self.config.discovery_interval)
        self._avoid[address] = trio.current_time() + pause
        return pause

    # -- the long-lived link -----------------------------------------------------------

    def take(self, address: Address) -> Link | None:
        """The long-lived link, if it goes to ``address`` and is still open."""
        link = self.link
        if link is None or link.address != address:
            return None
        if not link.usable:
            self.drop()
            return None
        return link

    def keep(self, link: Link) -> None:
        """Make ``link`` the long-lived discovery connection (unless it was closed)."""
        if self.link is not link:
            self.drop()
            if link.usable:
                self.link = link

    def drop(self) -> None:
        """Terminate the long-lived discovery connection, if any."""
        if self.link is not None:
            self.link.close()
            self.link = None

    def close_unkept(self) -> None:
        """Terminate every link opened since the last call, but the one kept."""
        opened, self._opened = self._opened, []
        for link in opened:
            if link is not self.link:
                link.close()

    def abandon(self, link: Link | None, conn: Connection | None = None) -> None:
        """Terminate a discovery connection that failed or ran out of time."""
        if link is not None:
            link.close()
            if self.link is link:
                self.link = None
        elif conn is not None:
            conn.terminate()

    # -- one read ----------------------------------------------------------------------

    async def read(
        self, address: Address, link: Link | None, timeout: float
    ) -> tuple[Link, Topology]:
        """Read the catalog at ``address``, on ``link`` or on a new connection.

        On any failure the connection is terminated (a query cut off by the
        deadline must not keep a session waiting on the server).

        Raises:
            BackendBroken: cannot connect, the connection broke, or no answer
                within ``timeout`` (``timed_out``).
            BackendQueryError: the server rejected the discovery query.
        """
        conn = link.conn if link is not None else None
        try:
            with trio.fail_after(timeout):
                if link is None:
                    self.connects += 1
                    conn = await self.backend.connect(address)
                    link = Link(address, conn)
                    self._opened.append(link)
                    link.uuid = await self._ask_uuid(conn)
                assert conn is not None
                rows = await conn.run("fetch", DISCOVERY_QUERY, ())
                masters: dict[str, str | None] = {}
                if self.config.selector.role is not Role.ANY:
                    masters = {
                        str(r["name"]): r["current_master_name"]
                        for r in await conn.run("fetch", MASTERS_QUERY, ())
                    }
        except trio.TooSlowError:
            self.abandon(link, conn)
            raise BackendBroken(
                f"discovery got no answer within {timeout:.2f}s", sent=False, timed_out=True
            ) from None
        except BaseException:
            self.abandon(link, conn)
            raise
        view = build_topology(rows, masters, source=str(address), source_uuid=link.uuid)
        name = self.name_of(view, address)
        if name is not None:
            view = attrs.evolve(view, source=f"{name} ({address})")
        log.debug("discovery from %s: %d nodes", view.source, len(view.nodes))
        return link, view

    async def _ask_uuid(self, conn: Connection) -> str | None:
        """Which instance answers (see :func:`~._identity.instance_uuid`)."""
        return await instance_uuid(conn, self.backend)

    def name_of(self, view: Topology, address: Address) -> str | None:
        """The node that answered ``view``: by the uuid it gave, else by its address."""
        uuid = view.source_uuid
        if uuid is not None:
            name = view.named(uuid)
            if name is not None:
                return name
            node = find_node(uuid, self.roster.known().values())
            if node is not None:
                return node.name
        for name, info in self.roster.running().items():
            if info.address == address:
                return name
        return None

    def attempt_failed(
        self, address: Address, exc: BackendBroken | BackendQueryError, timeout: float
    ) -> str:
        """Log a failed read at ``address``; ask it last if it was too slow.

        Returns the error as the run's report gives it.
        """
        if isinstance(exc, BackendQueryError):
            log.debug("discovery at %s: query failed: %s", address, exc.message)
            return f"discovery query failed: {exc.message}"
        if exc.timed_out:
            pause = self.avoid(address)
            if self.warn_once(("slow", address), trio.current_time()):
                what = (
                    f"within {timeout:.2f}s; its connection was terminated, and it is "
                    f"asked last for the next {pause:.0f}s"
                )
                log.warning("discovery: no answer from %s %s", address, what)
                for name, info in self.roster.running().items():
                    if info.address == address:
                        self.roster.note(name, f"no answer to discovery {what}")
        else:
            log.debug("discovery at %s failed: %s", address, exc.message)
        return exc.message
