"""``open_cluster`` and :class:`Cluster`: the public face of the actor tree.

Example::

    import trio, picopyn_actors as pa

    async def main():
        async with pa.open_cluster("postgresql://admin:pw@127.0.0.1:4327") as cluster:
            assert await cluster.fetchval("SELECT 1") == 1

    trio.run(main)
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from threading import get_ident
from types import TracebackType
from typing import Any

import attrs
import trio
from trio.lowlevel import current_task

from ._bridge import (
    INVALIDATED,
    Backend,
    BackendBroken,
    BackendQueryError,
    Connection,
    open_backend,
)
from ._bucket import Bucket
from ._config import ClusterConfig
from ._dispatcher import Dispatcher, Message
from ._errors import (
    ArgumentError,
    ClusterClosed,
    NoNodesAvailable,
    OutcomeUnknown,
    PicodataError,
)
from ._events import (
    ClusterStatistics,
    EventHub,
    EventStream,
    NodeEvent,
    NodeState,
    NodeStatistics,
    NodeStatus,
)
from ._hedging import Hedger, Hedging
from ._keys import BucketKeys
from ._node import Lease
from ._request import PIN, Request, changes_session, check_query, check_timeout
from ._retry import MAX_INVALIDATIONS
from ._slot import query_error
from ._strategies import Strategy
from ._supervisor import Supervisor
from ._trap import FAST
from ._trap import report as report_trap
from ._util import unwrap_single_error

log = logging.getLogger(__name__)

_DEFAULT_HEDGING = Hedging()


def _check_bucket(bucket: object) -> None:
    if bucket is not None and type(bucket) is not Bucket:
        raise ArgumentError(f"bucket must be a Bucket (see Cluster.bucket()), got {bucket!r}")

# The dispatcher's inbox: node updates and the first idle token of each new
# connection (requests reach the dispatcher by a synchronous call). Bounded;
# node actors wait for room when it is full.
_INBOX_SIZE = 4096


@attrs.define(eq=False)
class Cluster:
    """A Picodata cluster as one self-healing database. Made by :func:`open_cluster`.

    Every query method takes ``timeout`` (seconds, for the whole call; it
    raises :class:`trio.TooSlowError`), ``idempotent`` (``True`` lets a
    request whose node died mid-flight be retried on another node; otherwise
    it fails with :class:`OutcomeUnknown`) and ``bucket`` (a :class:`Bucket`
    from :meth:`bucket`: the request goes to the master that owns it, see
    docs/routing.md), and ``hedging`` (``None``: the cluster's policy;
    ``False``: never; ``True`` or a :class:`Hedging`: an idempotent request
    that has not answered after the hedge delay is sent to a second node too,
    and the first answer wins; see docs/failure-semantics.md).

    Cancellation: a query method that is cancelled before its request reached
    a node leaves nothing behind; one cancelled while the query runs drops
    that connection (Picodata cannot cancel a query) and the node actor opens
    a new one. Either way it raises :class:`trio.Cancelled` as usual.
    """

    config: ClusterConfig
    _backend: Backend
    _dispatcher: Dispatcher
    _supervisor: Supervisor
    _hub: EventHub
    _closing: trio.Event
    _closed: bool = attrs.field(init=False, default=False)
    _token: trio.lowlevel.TrioToken = attrs.field(
        init=False, factory=trio.lowlevel.current_trio_token
    )
    # The thread of the trio run that opened it (the hot path's cheap check).
    _thread: int = attrs.field(init=False, factory=get_ident)
    _keys: BucketKeys = attrs.field(init=False)
    _hedger: Hedger | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._keys = BucketKeys(self, self._supervisor)
        if self.config.hedging is not None:
            self._hedger = self._dispatcher.hedges.hedger(self.config.hedging)

    def __repr__(self) -> str:
        nodes = self._supervisor.actors()
        up = sum(1 for a in nodes if a.state is NodeState.UP)
        state = "closed" if self._closed else "open"
        return f"<Cluster {self.config.dsn} {state} nodes={len(nodes)} up={up}>"

    # -- queries -----------------------------------------------------------------

    async def _call(
        self,
        method: str,
        query: str,
        args: Sequence[Any],
        timeout: float | None,
        idempotent: bool,
        bucket: Bucket | None = None,
        hedging: Hedging | bool | None = None,
    ) -> Any:
        # The checks of the hot path, written out: the calls that say what is
        # wrong run only when something is. The caller's trio run: another
        # thread is another run (or none), and in this thread the run that
        # opened the cluster is the only one while the cluster is open (it
        # lives in that run's nursery); no trio at all fails the checkpoint.
        if get_ident() != self._thread:
            self._check_caller()
        if type(idempotent) is not bool:
            raise ArgumentError(f"idempotent must be True or False, got {idempotent!r}")
        if bucket is not None and type(bucket) is not Bucket:
            _check_bucket(bucket)
        if type(query) is not str or not query.isascii() or "\x00" in query:
            check_query(query)
        try:
            task = current_task()
        except RuntimeError:  # not in a trio task (a guest run's host loop, say)
            self._check_caller()
            raise
        # Never submit work for a caller that is already cancelled: it would
        # start on a connection, and the abort would then cost the connection.
        # (trio's check runs only when its cancel status says so: see _trap.)
        if not FAST or task._cancel_status.effectively_cancelled:
            await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise ClusterClosed("the cluster is closed")
        request = Request(method, query, args, idempotent, bucket=bucket)
        if idempotent:
            if hedging is None:
                request.hedger = self._hedger  # the cluster's policy, if any
            elif hedging is not False:  # (False: never hedged, as a new request is)
                policy = self._hedging_for(hedging)
                request.hedger = None if policy is None else self._dispatcher.hedges.hedger(policy)
        if timeout is None:
            self._dispatcher.submit(request)
            return await request.wait(task)
        with trio.fail_after(check_timeout(timeout)):
            self._dispatcher.submit(request)
            return await request.wait(task)

    def _hedging_for(self, hedging: Hedging | bool | None) -> Hedging | None:
        """The hedging policy of one idempotent call (``hedging=`` or the cluster's)."""
        if hedging is None:
            return self.config.hedging
        if hedging is True:
            return self.config.hedging or _DEFAULT_HEDGING
        if hedging is False:
            return None
        if isinstance(hedging, Hedging):
            return hedging
        raise ArgumentError(f"hedging must be None, True, False or a Hedging, got {hedging!r}")

    def _check_caller(self) -> None:
        """Refuse a call from outside the trio run this cluster lives in."""
        try:
            token = trio.lowlevel.current_trio_token()
            # (A guest run's host loop has the run's token, but no trio task.)
            trio.lowlevel.current_task()
        except RuntimeError:
            raise RuntimeError(
                "picopyn_actors: a Cluster must be used from the trio run that opened it, "
                "not from another thread, asyncio or synchronous code"
            ) from None
        if token is not self._token:
            raise RuntimeError(
                "picopyn_actors: this Cluster was opened in another trio run; use it only "
                "from the trio run that opened it (open a cluster in each trio.run that "
                "needs one)"
            )

    async def fetch(
        self,
        query: str,
        *args: Any,
        timeout: float | None = None,
        idempotent: bool = False,
        bucket: Bucket | None = None,
        hedging: Hedging | bool | None = None,
    ) -> list[Any]:
        """Run ``query`` and return all rows (asyncpg ``Record`` objects).

        Raises:
            QueryError: the server rejected the query (not retried).
            OutcomeUnknown: the node died mid-query and ``idempotent`` is false.
            NoNodesAvailable: no node can take it (each node's last error listed).
            AcquireTimeout: nodes are busy for longer than ``acquire_timeout``.
            ClusterClosed: the cluster closed first.
            trio.TooSlowError: ``timeout`` passed.
        """
        result: list[Any] = await self._call(
            "fetch", query, args, timeout, idempotent, bucket, hedging
        )
        return result

    async def fetchrow(
        self,
        query: str,
        *args: Any,
        timeout: float | None = None,
        idempotent: bool = False,
        bucket: Bucket | None = None,
        hedging: Hedging | bool | None = None,
    ) -> Any:
        """Run ``query`` and return its first row, or ``None``. Errors as :meth:`fetch`."""
        return await self._call("fetchrow", query, args, timeout, idempotent, bucket, hedging)

    async def fetchval(
        self,
        query: str,
        *args: Any,
        timeout: float | None = None,
        idempotent: bool = False,
        bucket: Bucket | None = None,
        hedging: Hedging | bool | None = None,
    ) -> Any:
        """Run ``query`` and return the first column of its first row. Errors as :meth:`fetch`."""
        return await self._call("fetchval", query, args, timeout, idempotent, bucket, hedging)

    async def execute(
        self,
        query: str,
        *args: Any,
        timeout: float | None = None,
        idempotent: bool = False,
        bucket: Bucket | None = None,
        hedging: Hedging | bool | None = None,
    ) -> str:
        """Run a statement; return its status (``"INSERT 0 1"``). Errors as :meth:`fetch`."""
        status: str = await self._call(
            "execute", query, args, timeout, idempotent, bucket, hedging
        )
        return status

    async def executemany(
        self,
        query: str,
        args: Sequence[Sequence[Any]],
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        bucket: Bucket | None = None,
    ) -> None:
        """Run a statement once per argument tuple, on one connection. Errors as :meth:`fetch`."""
        await self._call("executemany", query, (list(args),), timeout, idempotent, bucket)

    @asynccontextmanager
    async def connection(
        self, *, timeout: float | None = None, bucket: Bucket | None = None
    ) -> AsyncIterator[PinnedConnection]:
        """Borrow one connection for several statements in a row (prepared statements).

        ``timeout`` bounds the wait for a connection only. While pinned, the
        connection serves nobody else, and one task at a time may use it.
        It goes back clean: if the body was cancelled mid-query, the
        connection broke, or it may hold session state (a ``SET``, a
        transaction, a temporary table... in any statement of the text: see
        docs/failure-semantics.md), it is closed and its node opens a new one
        in its place.
        """
        self._check_caller()
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise ClusterClosed("the cluster is closed")
        _check_bucket(bucket)
        request = Request(PIN, "", (), False, bucket=bucket)
        with trio.fail_after(math.inf if timeout is None else check_timeout(timeout)):
            self._dispatcher.submit(request)
            lease: Lease = await request.wait()
        pinned = PinnedConnection(lease)
        try:
            yield pinned
        finally:
            lease.give_back(dirty=pinned._dirty())

    # -- buckets ---------------------------------------------------------------------

    async def bucket(self, table: str, *key_values: Any, timeout: float | None = None) -> Bucket:
        """The :class:`Bucket` of a row of the sharded ``table`` with these key values.

        Pass it as ``bucket=`` to a query method (or to :meth:`connection`):
        the request goes to the current master of the replicaset that owns the
        bucket, which saves Picodata a hop. The first call for a table reads
        its distribution and format (``_pico_table``) and its tier's bucket
        count, and waits (within ``connect_timeout``) for the tier's bucket
        map; later calls cost no I/O. A bucket can also be made with no I/O
        at all: ``Bucket(tier, bucket_id(values, types, bucket_count))``.

        Raises:
            ConfigError: an unknown table, a table that is not sharded, the
                wrong number or types of key values (the message names the
                column), or a tier outside this cluster's ``tiers=``.
            NoNodesAvailable, QueryError, trio.TooSlowError: as for
                :meth:`fetch`, while the table is looked up.
        """
        with trio.fail_after(math.inf if timeout is None else check_timeout(timeout)):
            return await self._keys.bucket(table, key_values)

    # -- health --------------------------------------------------------------------

    def nodes(self) -> list[NodeStatus]:
        """A snapshot of every node actor, sorted by name."""
        return [actor.status() for actor in self._supervisor.actors()]

    def statistics(self) -> ClusterStatistics:
        """Counters for the whole client, per node and in total."""
        actors = self._supervisor.all_actors()
        current = [(a.name, a.statistics()) for a in actors]
        per_node = dict(current)
        every: list[NodeStatistics] = [
            *(stats for _, stats in current),
            *self._supervisor.retired_statistics(),
        ]
        return ClusterStatistics(
            nodes=per_node,
            requests_ok=sum(s.requests_ok for s in every),
            requests_failed=sum(s.requests_failed for s in every)
            + self._dispatcher.failed_unrouted,
            requests_retried=sum(s.requests_retried for s in every),
            restarts=sum(s.restarts for s in every),
            discovery_runs=self._supervisor.discovery_runs,
            discovery_failures=self._supervisor.discovery_failures,
            queue_depth=self._dispatcher.queue_depth,
            events_published=self._hub.published,
            statements_invalidated=sum(s.statements_invalidated for s in every),
            views_rejected=self._supervisor.views_rejected,
            requests_routed=self._dispatcher.owners.routed,
            routing_fallbacks=self._dispatcher.owners.fallbacks,
            **self._dispatcher.hedges.statistics(),
            discovery_connects=self._supervisor.discovery_connects,
        )

    @asynccontextmanager
    async def events(self) -> AsyncIterator[EventStream]:
        """Subscribe to node events: an :class:`EventStream` of :class:`NodeEvent`,
        and one :class:`EventsDropped` wherever this subscriber fell more than
        ``events_buffer`` events behind (delivered at its next read, without
        waiting for another event).

        The stream ends when the cluster closes. Publishing never waits for a
        subscriber.
        """
        async with self._hub.subscribe() as receive:
            yield receive

    @property
    def closed(self) -> bool:
        """``True`` once :func:`open_cluster`'s block has exited."""
        return self._closed


class PinnedConnection:
    """One connection lent by :meth:`Cluster.connection`. Not usable after the block.

    Its methods run on this one connection, with no retry on another node: a
    broken connection raises :class:`OutcomeUnknown` (the request was sent) or
    :class:`NoNodesAvailable` (it was not). One task at a time: a second task
    calling while a query runs gets :class:`trio.BusyResourceError`.
    Cancellation: a method cancelled mid-query raises ``Cancelled`` and leaves
    the connection unusable; it is replaced when the block exits.
    """

    def __init__(self, lease: Lease) -> None:
        self._lease = lease
        self._busy = False
        self._broken = False
        self._session_state = False
        # Raised by each 42999: a PreparedStatement of an older one prepares again.
        self._generation = 0

    @property
    def node(self) -> str:
        """The name of the node this connection goes to."""
        return self._lease.node

    def __repr__(self) -> str:
        return f"<PinnedConnection node={self.node}>"

    def _dirty(self) -> bool:
        """The connection must not serve anybody else: replace it."""
        if self._busy or self._broken or self._session_state:
            return True
        conn = self._lease.conn
        return conn.is_closed() or conn.in_transaction()

    async def _run(
        self,
        method: str,
        query: str,
        args: Sequence[Any],
        statement: PreparedStatement | None = None,
    ) -> Any:
        lease = self._lease
        if lease.returned:
            raise ClusterClosed("this pinned connection was given back")
        if self._busy:
            raise trio.BusyResourceError(
                f"another task is using this pinned connection to node {lease.node}; "
                "a pinned connection runs one query at a time"
            )
        if statement is None:
            check_query(query)
            if changes_session(query):
                self._session_state = True
        await trio.lowlevel.checkpoint_if_cancelled()
        self._busy = True
        try:
            return await self._attempts(method, query, args, statement)
        except BaseException as exc:
            if not isinstance(exc, PicodataError):
                self._broken = True  # cancelled mid-query: the connection cannot be trusted
            raise
        finally:
            self._busy = False

    async def _attempts(
        self, method: str, query: str, args: Sequence[Any], statement: PreparedStatement | None
    ) -> Any:
        """Run it; after 42999 (a schema change) prepare again and run again, a few times."""
        lease = self._lease
        conn: Connection = lease.conn
        invalidations = 0
        while True:
            try:
                if statement is not None:
                    if statement._generation != self._generation:
                        statement._handle = await conn.prepare(statement.query)
                        statement._generation = self._generation
                    return await conn.run_prepared(statement._handle, method, args)
                if method == "prepare":
                    return await conn.prepare(query)
                return await conn.run(method, query, args)
            except BackendQueryError as exc:
                if conn.is_closed():
                    self._broken = True
                elif (
                    exc.sqlstate == INVALIDATED
                    and (statement is not None or method == "prepare")
                    and invalidations < MAX_INVALIDATIONS
                ):
                    # Nothing ran. Every statement of this connection is stale:
                    # asyncpg's cache goes now, prepare()'s ones on next use.
                    # (A plain query the connection's run() prepares again itself.)
                    invalidations += 1
                    conn.forget_statements()
                    self._generation += 1
                    continue
                raise query_error(exc, lease.node) from exc.__cause__
            except BackendBroken as exc:
                self._broken = True
                if exc.sent:
                    raise OutcomeUnknown(
                        f"the pinned connection to node {lease.node} broke mid-request "
                        f"({exc.message})",
                        node=lease.node,
                    ) from None
                raise NoNodesAvailable(
                    f"the pinned connection to node {lease.node} is closed ({exc.message})"
                ) from None

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        """As :meth:`Cluster.fetch`, on this connection."""
        rows: list[Any] = await self._run("fetch", query, args)
        return rows

    async def fetchrow(self, query: str, *args: Any) -> Any:
        """As :meth:`Cluster.fetchrow`, on this connection."""
        return await self._run("fetchrow", query, args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        """As :meth:`Cluster.fetchval`, on this connection."""
        return await self._run("fetchval", query, args)

    async def execute(self, query: str, *args: Any) -> str:
        """As :meth:`Cluster.execute`, on this connection."""
        status: str = await self._run("execute", query, args)
        return status

    async def executemany(self, query: str, args: Sequence[Sequence[Any]]) -> None:
        """As :meth:`Cluster.executemany`, on this connection."""
        await self._run("executemany", query, (list(args),))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """``BEGIN`` ... ``COMMIT`` (``ROLLBACK`` if the block raises), for code
        written for PostgreSQL.

        On Picodata this is *not* a transaction: ``BEGIN``, ``COMMIT`` and
        ``ROLLBACK`` succeed and do nothing, so every statement takes effect
        at once and a rollback undoes nothing. For atomicity on one bucket,
        use an anonymous block, ``DO $$ BEGIN ... END $$``. On PostgreSQL it
        is a real transaction. Either way the connection is replaced when
        given back (it ran transaction statements).
        """
        await self.execute("BEGIN")
        try:
            yield
        except BaseException:
            if not self._lease.conn.is_closed():
                with trio.CancelScope(shield=True):
                    await self.execute("ROLLBACK")
            raise
        await self.execute("COMMIT")

    async def prepare(self, query: str) -> PreparedStatement:
        """Prepare a named statement on this connection.

        If a schema change invalidates it (42999), it is prepared again on its
        next use, and the call runs as if nothing happened.
        """
        generation = self._generation
        handle = await self._run("prepare", query, ())
        return PreparedStatement(self, handle, query, generation)


class PreparedStatement:
    """A statement prepared on a :class:`PinnedConnection`; errors and
    cancellation as there."""

    def __init__(self, owner: PinnedConnection, handle: Any, query: str, generation: int) -> None:
        self._owner = owner
        self._handle = handle
        self._generation = generation
        self.query = query

    def __repr__(self) -> str:
        return f"<PreparedStatement {self.query!r}>"

    async def fetch(self, *args: Any) -> list[Any]:
        """Run it and return all rows."""
        rows: list[Any] = await self._owner._run("fetch", self.query, args, self)
        return rows

    async def fetchrow(self, *args: Any) -> Any:
        """Run it and return the first row, or ``None``."""
        return await self._owner._run("fetchrow", self.query, args, self)

    async def fetchval(self, *args: Any) -> Any:
        """Run it and return the first column of the first row."""
        return await self._owner._run("fetchval", self.query, args, self)


def open_cluster(
    dsn: str,
    *,
    connections_per_node: int = 2,
    strategy: Strategy | None = None,
    discovery_interval: float = 2.0,
    health_interval: float = 1.0,
    tiers: Sequence[str] | str | None = None,
    role: str = "any",
    backend: Backend | None = None,
    **options: Any,
) -> AbstractAsyncContextManager[Cluster]:
    """Open a self-healing client for the cluster behind ``dsn``: ``async with open_cluster(...)``.

    ``dsn`` is ``postgresql://user:password@host1:port1,host2:port2/db``: every
    host is a seed for discovery. Other keyword arguments are either options
    of :class:`ClusterConfig` (``probe_timeout``, ``acquire_timeout``,
    ``backoff_max``, ... see docs/tuning.md) or go to ``asyncpg.connect``
    (``ssl=``, ``timeout=`` as the connect timeout, ``server_settings=``,
    ``statement_cache_size=``, ...; any other keyword is refused).

    Entering it starts the supervisor, dispatcher and node actors in a
    nursery of its own, with the bridge to asyncpg that ``bridge=`` names,
    and returns once discovery has run and a node is usable. Each
    ``open_cluster(...)`` object can be entered once.

    Raises:
        ConfigError: bad DSN or option, raised by this call itself, before any I/O;
            an unknown tier is raised on entering.
        NoNodesAvailable: on entering, no node became usable within
            ``connect_timeout``; the message lists each node's (or seed host's)
            last error.

    Cancellation: leaving the block (normally, by an exception or by
    cancellation) stops every actor and closes every connection; requests
    still in flight end with :class:`ClusterClosed`. Cancelling the entry
    itself returns promptly and leaves nothing behind.
    """
    if strategy is not None:
        options["strategy"] = strategy
    config = ClusterConfig.create(
        dsn,
        tiers=tiers,
        role=role,
        connections_per_node=connections_per_node,
        discovery_interval=discovery_interval,
        health_interval=health_interval,
        **options,
    )
    return _Opener(config, backend)


class _Opener:
    """What :func:`open_cluster` returns: enters the cluster's lifetime once."""

    def __init__(self, config: ClusterConfig, backend: Backend | None) -> None:
        self._config = config
        self._backend = backend
        self._entered: AbstractAsyncContextManager[Cluster] | None = None

    def __repr__(self) -> str:
        return f"<open_cluster {self._config.dsn}>"

    async def __aenter__(self) -> Cluster:
        if self._entered is not None:
            raise RuntimeError(
                "this open_cluster(...) was entered already; call open_cluster() again "
                "for another client"
            )
        self._entered = _open(self._config, self._backend)
        return await self._entered.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._entered is not None
        return await self._entered.__aexit__(exc_type, exc, tb)


@asynccontextmanager
async def _open(config: ClusterConfig, backend: Backend | None) -> AsyncIterator[Cluster]:
    with unwrap_single_error():
        if backend is not None:
            async with _run_cluster(config, backend) as cluster:
                yield cluster
            return
        async with (
            open_backend(
                config.dsn,
                config.connect_timeout,
                config.connect_kwargs,
                config.bridge,
                config.startup_options,
            ) as real,
            _run_cluster(config, real) as cluster,
        ):
            yield cluster


@asynccontextmanager
async def _run_cluster(config: ClusterConfig, backend: Backend) -> AsyncIterator[Cluster]:
    report_trap()  # once per process, if trio's trap cannot be used
    hub = EventHub(config.events_buffer)
    closing = trio.Event()
    send, receive = trio.open_memory_channel[Message](_INBOX_SIZE)
    dispatcher = Dispatcher(config, receive)
    supervisor = Supervisor(config, backend, send, hub, closing, dispatcher)
    cluster = Cluster(config, backend, dispatcher, supervisor, hub, closing)
    async with trio.open_nursery() as nursery, _lifetime(cluster, nursery, closing, hub):
        await _start(config, cluster, nursery, dispatcher, supervisor)
        yield cluster


@asynccontextmanager
async def _lifetime(
    cluster: Cluster, nursery: trio.Nursery, closing: trio.Event, hub: EventHub
) -> AsyncIterator[None]:
    try:
        yield
    finally:
        cluster._closed = True
        closing.set()
        hub.close()
        nursery.cancel_scope.cancel()


async def _start(
    config: ClusterConfig,
    cluster: Cluster,
    nursery: trio.Nursery,
    dispatcher: Dispatcher,
    supervisor: Supervisor,
) -> None:
    """Start the dispatcher and the supervisor; wait for a usable node."""
    hub = cluster._hub
    await nursery.start(dispatcher.run)
    async with hub.subscribe() as events:
        with trio.move_on_after(config.connect_timeout):
            await nursery.start(supervisor.run)
            await _wait_until_up(supervisor, events)
            log.info("cluster %s ready: %s", config.dsn, _summary(cluster))
    if not any(a.state is NodeState.UP for a in supervisor.actors()):
        errors = {a.name: a.last_error or a.state.value for a in supervisor.actors()}
        discovery = supervisor.last_discovery_error or (
            "did not finish; seed hosts: " + ", ".join(map(str, config.dsn.hosts))
        )
        raise NoNodesAvailable(
            f"no node of {config.dsn} became usable within connect_timeout="
            f"{config.connect_timeout}s" + ("" if errors else f"; discovery: {discovery}"),
            errors,
        )


async def _wait_until_up(supervisor: Supervisor, events: EventStream) -> None:
    if any(a.state is NodeState.UP for a in supervisor.actors()):
        return
    async for event in events:
        if isinstance(event, NodeEvent) and event.new is NodeState.UP:
            return


def _summary(cluster: Cluster) -> str:
    return ", ".join(f"{n.name}={n.state.value}" for n in cluster.nodes())
