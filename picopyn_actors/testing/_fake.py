"""A fake Picodata cluster: pure trio, no sockets, no asyncpg.

The one fake backend of the project: the unit tests of the actors run on it in
virtual time, and the benchmarks measure the client's own cost on it.
:class:`FakeCluster` implements the ``Backend`` protocol of
``picopyn_actors._bridge`` and is passed as ``open_cluster(dsn, backend=fake)``.
Every fake node lives at ``Address("10.0.0.N", 4327)`` and can be

* up: connections open and queries are answered after ``service_time``
  (a ``trio.sleep``, so it costs no real time on a mock clock; probes and
  discovery queries take ``probe_time`` instead, 0 by default);
* down: ``connect`` raises ``BackendBroken("connection refused", sent=False)``,
  and every open connection breaks: a query in flight raises
  ``BackendBroken(..., sent=True)``;
* hung: ``connect`` and queries block until the node is resumed (or goes down).

``drop_connections()`` resets every open connection while the node stays up.
``change_schema()`` invalidates the statements of every open connection: its
next query fails with SQLSTATE 42999, as on Picodata after DDL, until the
client calls the connection's ``forget_statements()``. Setting
``node.answers_uuid`` makes the server claim another instance's uuid.

A connection serves the ``Connection`` protocol as the real ones do: ``run``
waits for the answer, and ``submit(method, query, args, on_done)`` starts the
query in a task of the fake's own and calls ``on_done(outcome)`` when it ends.
With ``FakeCluster(instant=True)`` (the benchmarks) ``submit`` answers without
a task, every query at once, delivered in batches on trio's next pass as the
thread runner delivers them. An exception from ``on_done`` is recorded in
``FakeCluster.callback_errors`` (``FakeCluster.open`` fails the test on it).

The catalog that discovery reads is a model the tests change: each node has a
current and a target state, stored as JSON text such as ``'["Online",1]'``,
and may be left out of the catalog altogether.

Queries the fake understands:

* the discovery queries (``DISCOVERY_QUERY``, ``MASTERS_QUERY``,
  ``SELECT pico_instance_uuid()``, ``SELECT instance_uuid()``);
* ``SELECT 1``, the health probe;
* ``whoami``: the node's name (as a one-column row ``{"name": ...}``);
* ``sleep:<seconds>``: waits that long on top of the service time, then
  answers like ``whoami``;
* ``bad sql``: raises ``BackendQueryError("syntax error", "42601")``;
* ``fatal sql``: raises ``BackendQueryError("protocol violation", "08P01")``
  and closes the connection, as PostgreSQL does after a protocol violation;
* ``INSERT ...``: status ``"INSERT 0 1"``.

Each node counts connection attempts (with their times), open connections,
queries by kind and by text, and queries in flight (probes and discovery
queries excluded).
"""

from __future__ import annotations

import enum
import json
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import outcome
import trio

from .._bridge import INVALIDATED, MAX_RERUNS, BackendBroken, BackendQueryError, OnDone
from .._cluster import Cluster, open_cluster
from .._dsn import Address
from .._topology import DISCOVERY_QUERY, MASTERS_QUERY

__all__ = ["FakeCluster", "FakeConnection", "FakeNode", "Status"]

PORT = 4327
USER = "admin"
PASSWORD = "s3cr3t-pw"

PROBE_QUERY = "SELECT 1"
UUID_QUERIES = ("SELECT pico_instance_uuid()", "SELECT instance_uuid()")
DISCOVERY_QUERIES = frozenset({DISCOVERY_QUERY, MASTERS_QUERY, *UUID_QUERIES})


class Status(enum.Enum):
    """The health of a fake node."""

    UP = "up"
    DOWN = "down"
    HUNG = "hung"


def state_text(variant: str, incarnation: int) -> str:
    """A catalog state as Picodata stores it: ``'["Online",1]'``."""
    return json.dumps([variant, incarnation], separators=(",", ":"))


class FakeNode:
    """One fake Picodata instance: its health, its catalog row and its counters."""

    def __init__(
        self,
        cluster: FakeCluster,
        name: str,
        index: int,
        *,
        tier: str,
        replicaset: str,
        service_time: float,
        failure_domain: dict[str, str] | None,
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.raft_id = index
        self.address = Address(f"10.0.0.{index}", PORT)
        self.uuid = f"00000000-0000-4000-8000-{index:012d}"
        self.answers_uuid: str | None = None  # set: the server claims another identity
        self.tier = tier
        self.replicaset = replicaset
        self.failure_domain = dict(failure_domain or {})
        self.service_time = service_time
        self.probe_time = 0.0
        # Catalog model.
        self.current = state_text("Online", 1)
        self.target = state_text("Online", 1)
        self.in_catalog = True
        # Health.
        self.status = Status.UP
        self._resumed = trio.Event()
        self._resumed.set()
        self._ops: set[trio.CancelScope] = set()
        # Counters.
        self.connects = 0
        self.connect_times: list[float] = []
        self._connect_waiters: list[tuple[int, trio.Event]] = []
        self.connections: set[FakeConnection] = set()
        self.all_connections: list[FakeConnection] = []  # every one ever opened, in order
        self.opened = 0
        self.queries = 0  # queries other than probes and discovery
        self.probes = 0
        self.discovery_queries = 0
        self.discovery_executed: Counter[str] = Counter()
        self.executed: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    def __repr__(self) -> str:
        return (
            f"<FakeNode {self.name} {self.address} {self.status.value} "
            f"open={self.open_connections} queries={self.queries}>"
        )

    # -- health ---------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Connections open to this node right now."""
        return len(self.connections)

    def down(self) -> None:
        """Refuse new connections and break every open one (queries in flight fail)."""
        self.status = Status.DOWN
        for conn in list(self.connections):
            conn._break()
        for scope in list(self._ops):
            scope.cancel()
        self._resumed.set()

    def up(self) -> None:
        """Accept connections again (a restarted server: old connections stay broken)."""
        self.status = Status.UP
        self._resumed.set()

    def drop_connections(self) -> None:
        """Reset every open connection, but keep accepting new ones (a network blip)."""
        for conn in list(self.connections):
            conn._break()

    def change_schema(self) -> None:
        """A schema change: every open connection's statements are invalidated, so its
        next query fails with 42999 until it forgets its statements."""
        for conn in self.connections:
            conn.stale = True

    def hang(self) -> None:
        """Keep sockets open but answer nothing: connects and queries block."""
        if self.status is not Status.HUNG:
            self.status = Status.HUNG
            self._resumed = trio.Event()

    def resume(self) -> None:
        """End a hang: blocked connects and queries go on."""
        if self.status is Status.HUNG:
            self.status = Status.UP
            self._resumed.set()

    # -- catalog ----------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        """The incarnation of the current state."""
        return int(json.loads(self.current)[1])

    def set_state(
        self, current: str | None = None, target: str | None = None, incarnation: int | None = None
    ) -> None:
        """Change the catalog row, e.g. ``set_state(target="Offline")``."""
        inc = self.incarnation if incarnation is None else incarnation
        if current is not None:
            self.current = state_text(current, inc)
        elif incarnation is not None:
            self.current = state_text(json.loads(self.current)[0], inc)
        if target is not None:
            self.target = state_text(target, inc)
        elif incarnation is not None:
            self.target = state_text(json.loads(self.target)[0], inc)

    def restart_in_catalog(self) -> None:
        """The node restarted: Online with a higher incarnation."""
        self.set_state("Online", "Online", self.incarnation + 1)

    def catalog_row(self, encoding: str = "list") -> dict[str, Any]:
        """The node's row of ``DISCOVERY_QUERY``."""
        current, target = self.current, self.target
        if encoding == "dict":
            current = json.dumps(dict([json.loads(current)]))
            target = json.dumps(dict([json.loads(target)]))
        return {
            "name": self.name,
            "uuid": self.uuid,
            "raft_id": self.raft_id,
            "tier": self.tier,
            "replicaset_name": self.replicaset,
            "current_state": current,
            "target_state": target,
            "failure_domain": json.dumps(self.failure_domain),
            "address": str(self.address),
        }

    # -- serving --------------------------------------------------------------

    async def _wait(self, delay: float, conn: FakeConnection | None) -> bool:
        """Wait out a hang and ``delay``; ``False`` if the node went down meanwhile."""
        with trio.CancelScope() as scope:
            self._ops.add(scope)
            if conn is not None:
                conn._scope = scope
            try:
                while self.status is Status.HUNG:
                    await self._resumed.wait()
                if self.status is Status.DOWN:
                    return False
                if delay > 0:
                    await trio.sleep(delay)
                else:
                    await trio.lowlevel.checkpoint()
            finally:
                self._ops.discard(scope)
                if conn is not None:
                    conn._scope = None
        return not scope.cancelled_caught and self.status is not Status.DOWN

    def _refused(self) -> BackendBroken:
        return BackendBroken(f"connection refused ({self.address})", sent=False)

    async def wait_connects(self, count: int) -> None:
        """Wait until this node has seen ``count`` connection attempts in all."""
        if self.connects < count:
            event = trio.Event()
            self._connect_waiters.append((count, event))
            await event.wait()

    async def connect(self) -> FakeConnection:
        self.connects += 1
        self.connect_times.append(trio.current_time())
        for count, event in self._connect_waiters:
            if self.connects >= count:
                event.set()
        if self.status is Status.DOWN:
            await trio.lowlevel.checkpoint()
            raise self._refused()
        if not await self._wait(self.cluster.connect_time, None):
            raise self._refused()
        conn = FakeConnection(self)
        self.connections.add(conn)
        self.all_connections.append(conn)
        self.opened += 1
        return conn

    def answer(self, method: str, query: str, args: Sequence[Any]) -> Any:
        """The result of ``<method>(query, *args)`` on this node."""
        q = query.strip()
        status = "SELECT 1"
        if q == DISCOVERY_QUERY:
            rows = self.cluster.catalog_rows()
            status = f"SELECT {len(rows)}"
        elif q == MASTERS_QUERY:
            rows = self.cluster.masters_rows()
            status = f"SELECT {len(rows)}"
        elif q == UUID_QUERIES[0]:
            if not self.cluster.has_pico_instance_uuid:
                raise BackendQueryError(
                    "function pico_instance_uuid() does not exist", "42883"
                )
            rows = [{"uuid": self.answers_uuid or self.uuid}]
        elif q == UUID_QUERIES[1]:
            rows = [{"uuid": self.answers_uuid or self.uuid}]
        elif q == PROBE_QUERY:
            rows = [{"?column?": 1}]
        elif q == "whoami" or q.startswith("sleep:"):
            rows = [{"name": self.name}]
        elif q == "bad sql":
            raise BackendQueryError("syntax error", "42601")
        elif q.upper().startswith("INSERT"):
            rows = []
            status = "INSERT 0 1"
        else:
            raise BackendQueryError(f"the fake does not understand {q!r}", "42601")
        if method == "fetch":
            return rows
        if method == "fetchrow":
            return rows[0] if rows else None
        if method == "fetchval":
            return next(iter(rows[0].values())) if rows else None
        if method == "execute":
            return status
        if method == "executemany":
            return None
        raise BackendQueryError(f"unknown method {method!r}", None)


class FakeStatement:
    """A statement prepared on a :class:`FakeConnection`."""

    def __init__(self, conn: FakeConnection, query: str) -> None:
        self.conn = conn
        self.query = query


class FakeConnection:
    """One connection to a :class:`FakeNode` (the ``Connection`` protocol)."""

    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self._closed = False
        self._broken = False
        self._scope: trio.CancelScope | None = None
        self.forgotten = 0  # forget_statements() calls
        self.stale = False  # statements invalidated by change_schema()

    def __repr__(self) -> str:
        return f"<FakeConnection {self.node.name} closed={self._closed}>"

    def _break(self) -> None:
        self._broken = True
        self._close()

    def _close(self) -> None:
        self._closed = True
        self.node.connections.discard(self)
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, method: str, query: str, args: Sequence[Any]) -> Any:
        """As the bridge's: after 42999 the statements are dropped and it runs again."""
        for _ in range(MAX_RERUNS):
            try:
                return await self._query(method, query, args)
            except BackendQueryError as exc:
                if exc.sqlstate != INVALIDATED or self._closed:
                    raise
            self.forget_statements()
        return await self._query(method, query, args)

    async def _query(self, method: str, query: str, args: Sequence[Any]) -> Any:
        """One query, as the server answers it."""
        node = self.node
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise BackendBroken("connection is closed", sent=False)
        q = query.strip()
        user = False
        if q == PROBE_QUERY:
            node.probes += 1
            delay = node.probe_time
        elif q in DISCOVERY_QUERIES:
            node.discovery_queries += 1
            node.discovery_executed[q] += 1
            delay = node.probe_time
        else:
            user = True
            node.queries += 1
            node.executed[q] += 1
            delay = node.service_time
            if q.startswith("sleep:"):
                delay += float(q.partition(":")[2])
            node.in_flight += 1
            node.max_in_flight = max(node.max_in_flight, node.in_flight)
        try:
            ok = await node._wait(delay, self)
        finally:
            if user:
                node.in_flight -= 1
        if not ok or self._closed:
            self._break()
            raise BackendBroken("connection reset by peer", sent=True)
        if q == "fatal sql":
            self._close()
            raise BackendQueryError("protocol violation", "08P01")
        if user and self.stale:
            raise BackendQueryError(
                "prepared statement __fake__ has been invalidated", "42999"
            )
        return node.answer(method, q, args)

    def submit(self, method: str, query: str, args: Sequence[Any], on_done: OnDone) -> None:
        cluster = self.node.cluster
        cluster.submitted += 1
        if cluster.instant:
            cluster._complete(on_done, self._instant(method, query))
            return
        trio.lowlevel.spawn_system_task(
            self._run_and_call_back, method, query, args, on_done, name="fake query"
        )

    def _instant(self, method: str, query: str) -> outcome.Outcome[Any]:
        if self._closed:
            return outcome.Error(BackendBroken("connection is closed", sent=False))
        try:
            return outcome.Value(self.node.answer(method, query.strip(), ()))
        except BackendQueryError as exc:
            return outcome.Error(exc)

    async def _run_and_call_back(
        self, method: str, query: str, args: Sequence[Any], on_done: OnDone
    ) -> None:
        result: outcome.Outcome[Any]
        try:
            result = outcome.Value(await self._query(method, query, args))
        except (BackendBroken, BackendQueryError) as exc:
            result = outcome.Error(exc)
        try:
            on_done(result)
        except Exception as exc:  # a bridge logs and carries on: record it instead
            self.node.cluster.callback_errors.append(exc)

    def forget_statements(self) -> None:
        self.forgotten += 1
        self.stale = False

    async def probe(self) -> None:
        await self.run("fetchval", PROBE_QUERY, ())

    def terminate(self) -> None:
        self._close()

    async def close(self) -> None:
        self._close()
        await trio.lowlevel.checkpoint()

    def is_closed(self) -> bool:
        return self._closed

    def in_transaction(self) -> bool:
        return False

    async def prepare(self, query: str) -> FakeStatement:
        if self._closed:
            await trio.lowlevel.checkpoint()
            raise BackendBroken("connection is closed", sent=False)
        if not await self.node._wait(0, self):
            self._break()
            raise BackendBroken("connection reset by peer", sent=True)
        return FakeStatement(self, query)

    async def run_prepared(self, handle: FakeStatement, method: str, args: Sequence[Any]) -> Any:
        return await self.run(method, handle.query, args)


class FakeCluster:
    """A fake Picodata cluster, used as the ``backend`` of ``open_cluster``.

    ``FakeCluster(3)`` has nodes ``i1`` .. ``i3`` at ``10.0.0.1`` .. ``10.0.0.3``,
    tier ``default``, one replicaset per node. ``instant=True`` answers every
    query submitted at once, without a task (see the module docstring).
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        service_time: float = 0.0,
        connect_time: float = 0.0,
        state_encoding: str = "list",
        instant: bool = False,
    ) -> None:
        self.nodes: dict[str, FakeNode] = {}
        self.instant = instant
        self._done: deque[tuple[OnDone, outcome.Outcome[Any]]] = deque()
        self._delivering = False
        self.callback_errors: list[BaseException] = []
        self.submitted = 0  # queries started by submit()
        self.connect_time = connect_time
        self.service_time = service_time
        self.state_encoding = state_encoding
        self.has_pico_instance_uuid = True
        self.masters: dict[str, str | None] = {}
        self.unknown_connects = 0
        for _ in range(nodes):
            self.add_node()

    def __getitem__(self, name: str) -> FakeNode:
        return self.nodes[name]

    def __repr__(self) -> str:
        return f"<FakeCluster {list(self.nodes.values())}>"

    def add_node(
        self,
        name: str | None = None,
        *,
        tier: str = "default",
        replicaset: str | None = None,
        service_time: float | None = None,
        failure_domain: dict[str, str] | None = None,
        master: bool | None = None,
    ) -> FakeNode:
        """Add a node (Online(1) in the catalog); its index is the next free one."""
        index = len(self.nodes) + 1
        name = name or f"i{index}"
        replicaset = replicaset or f"r{index}"
        node = FakeNode(
            self,
            name,
            index,
            tier=tier,
            replicaset=replicaset,
            service_time=self.service_time if service_time is None else service_time,
            failure_domain=failure_domain,
        )
        self.nodes[name] = node
        if master or (master is None and replicaset not in self.masters):
            self.masters[replicaset] = name
        return node

    def move(self, name: str, index: int) -> None:
        """Give node ``name`` a new address ``10.0.0.<index>`` (same uuid)."""
        node = self.nodes[name]
        node.down()
        node.address = Address(f"10.0.0.{index}", PORT)
        node.up()

    def by_address(self, address: Address) -> FakeNode | None:
        for node in self.nodes.values():
            if node.address == address:
                return node
        return None

    def dsn(self, *names: str, password: str = PASSWORD) -> str:
        """A DSN whose seed hosts are the given nodes (default: the first one)."""
        chosen = names or (next(iter(self.nodes)),)
        hosts = ",".join(str(self.nodes[n].address) for n in chosen)
        return f"postgresql://{USER}:{password}@{hosts}/db"

    # -- the Backend protocol -----------------------------------------------------

    def _complete(self, on_done: OnDone, result: outcome.Outcome[Any]) -> None:
        """Queue an instant answer; the batch is delivered on trio's next pass."""
        self._done.append((on_done, result))
        if not self._delivering:
            self._delivering = True
            trio.lowlevel.current_trio_token().run_sync_soon(self._deliver)

    def _deliver(self) -> None:
        self._delivering = False
        done = self._done
        while done:
            on_done, result = done.popleft()
            try:
                on_done(result)
            except Exception as exc:  # a bridge logs and carries on: record it instead
                self.callback_errors.append(exc)

    async def connect(self, address: Address) -> FakeConnection:
        node = self.by_address(address)
        if node is None:
            self.unknown_connects += 1
            await trio.lowlevel.checkpoint()
            raise BackendBroken(f"connection refused ({address}): no such host", sent=False)
        return await node.connect()

    # -- the catalog ----------------------------------------------------------------

    def catalog_rows(self) -> list[dict[str, Any]]:
        return [
            n.catalog_row(self.state_encoding) for n in self.nodes.values() if n.in_catalog
        ]

    def masters_rows(self) -> list[dict[str, Any]]:
        names = sorted({n.replicaset for n in self.nodes.values() if n.in_catalog})
        return [{"name": r, "current_master_name": self.masters.get(r)} for r in names]

    # -- counters -------------------------------------------------------------------

    def queries(self) -> dict[str, int]:
        """Queries (not probes, not discovery) per node name."""
        return {name: node.queries for name, node in self.nodes.items()}

    def executed(self, query: str) -> dict[str, int]:
        """How many times each node ran ``query``."""
        return {name: node.executed[query] for name, node in self.nodes.items()}

    def total_connects(self) -> int:
        return sum(n.connects for n in self.nodes.values()) + self.unknown_connects

    def open_connections(self) -> dict[str, int]:
        return {name: node.open_connections for name, node in self.nodes.items()}

    # -- opening a client ------------------------------------------------------------

    @asynccontextmanager
    async def open(
        self, *seeds: str, deadline: float = 600.0, password: str = PASSWORD, **options: Any
    ) -> AsyncIterator[Cluster]:
        """``open_cluster`` on this fake, under a virtual-time ``fail_after``.

        On the way out it checks that no completion callback raised.

        Defaults suited to unit tests: ``connections_per_node=2``,
        ``discovery_interval=1.0``, ``health_interval=1.0``.
        """
        options.setdefault("connections_per_node", 2)
        options.setdefault("discovery_interval", 1.0)
        options.setdefault("health_interval", 1.0)
        with trio.fail_after(deadline):
            async with open_cluster(
                self.dsn(*seeds, password=password), backend=self, **options
            ) as cluster:
                yield cluster
        assert self.callback_errors == [], self.callback_errors


