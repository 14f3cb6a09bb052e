"""A facade shaped like picopyn's ``Client``, on the self-healing core.

Programs written for picopyn keep working: ``Client(dsn, pool_size=None,
balance_strategy=None, **connect_kwargs)`` with ``connect()``, ``execute``,
``fetch``, ``fetchrow`` and ``close()``, or as ``async with``. Under trio.

Differences from picopyn: ``pool_size`` is the number of connections *per
node* (default 2); ``balance_strategy(candidates)`` receives
:class:`~picopyn_actors.Candidate` nodes instead of connections; errors are
:class:`~picopyn_actors.PicodataError` subclasses instead of ``RuntimeError``.
The client's actors live in a trio system task that :meth:`Client.connect`
starts, so ``connect()`` and ``close()`` may be called from any task of the
trio run; if the run ends first, the client closes with it.

Example::

    client = Client("postgresql://admin:pw@127.0.0.1:4327")
    await client.connect()
    try:
        rows = await client.fetch("SELECT name FROM _pico_instance")
    finally:
        await client.close()
"""

from __future__ import annotations

import contextvars
from types import TracebackType
from typing import Any

import trio

from ._cluster import Cluster, open_cluster
from ._config import MAX_CONNECTIONS_PER_NODE, ClusterConfig
from ._errors import ClusterClosed, ConfigError
from ._strategies import Strategy


class Client:
    """picopyn's ``Client``, self-healing. See the module docstring."""

    def __init__(
        self,
        dsn: str,
        pool_size: int | None = None,
        balance_strategy: Strategy | None = None,
        **connect_kwargs: Any,
    ) -> None:
        if pool_size is not None and (
            not isinstance(pool_size, int)
            or isinstance(pool_size, bool)
            or not 1 <= pool_size <= MAX_CONNECTIONS_PER_NODE
        ):
            raise ConfigError(
                f"pool_size must be an integer from 1 to {MAX_CONNECTIONS_PER_NODE}, "
                f"got {pool_size!r}"
            )
        options: dict[str, Any] = dict(connect_kwargs)
        options["connections_per_node"] = pool_size or 2
        if balance_strategy is not None:
            options["strategy"] = balance_strategy
        backend = options.pop("backend", None)  # a stand-in backend, for tests
        # Validate now: bad input fails at construction, not at connect().
        self._config = ClusterConfig.create(dsn, **options)
        if backend is not None:
            options["backend"] = backend
        self._dsn = dsn
        self._options = options
        self._cluster: Cluster | None = None
        self._lock: trio.Lock | None = None
        self._stop: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None
        self._depth = 0

    def __repr__(self) -> str:
        state = "connected" if self._cluster is not None else "not connected"
        return f"<Client {self._config.dsn} {state}>"

    @property
    def cluster(self) -> Cluster:
        """The underlying :class:`Cluster` (after :meth:`connect`)."""
        if self._cluster is None:
            raise ClusterClosed("the client is not connected: call connect() first")
        return self._cluster

    async def connect(self) -> None:
        """Discover the cluster and open connections. Idempotent.

        Safe to call from any task; a second call while the first one runs
        waits for it. Raises :class:`NoNodesAvailable` if no node is usable
        within the connect timeout. If cancelled, nothing is left open.
        """
        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            if self._cluster is not None:
                return
            ready = trio.Event()
            stopped = trio.Event()
            scope = trio.CancelScope()
            failure: list[BaseException] = []
            # A system task: the cluster outlives the task that called
            # connect(), which may be a short-lived child of some nursery.
            # It sees the caller's context (a running trio-asyncio loop, say).
            trio.lowlevel.spawn_system_task(
                self._own,
                scope,
                ready,
                stopped,
                failure,
                name=f"picopyn_actors Client {self._config.dsn}",
                context=contextvars.copy_context(),
            )
            try:
                await ready.wait()
            except BaseException:
                scope.cancel()
                with trio.CancelScope(shield=True):
                    await stopped.wait()
                raise
            if failure:
                raise failure[0]
            self._stop, self._stopped = scope, stopped

    async def _own(
        self,
        scope: trio.CancelScope,
        ready: trio.Event,
        stopped: trio.Event,
        failure: list[BaseException],
    ) -> None:
        try:
            with scope:
                async with open_cluster(self._dsn, **self._options) as cluster:
                    self._cluster = cluster
                    ready.set()
                    await trio.sleep_forever()
        except Exception as exc:  # reported to connect(); a system task must not raise
            if not ready.is_set():
                failure.append(exc)
        finally:
            self._cluster = None
            ready.set()
            stopped.set()

    async def close(self) -> None:
        """Close every connection and stop the actors. Idempotent.

        Requests still running end with :class:`ClusterClosed`. Cancelling
        ``close`` does not stop the shutdown: it runs to the end first.
        """
        scope, stopped = self._stop, self._stopped
        self._stop = self._stopped = None
        if scope is None or stopped is None:
            return
        scope.cancel()
        with trio.CancelScope(shield=True):
            await stopped.wait()

    async def __aenter__(self) -> Client:
        await self.connect()
        self._depth += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close at the exit of the outermost ``async with`` (nested ones share it)."""
        self._depth -= 1
        if self._depth <= 0:
            self._depth = 0
            await self.close()

    async def execute(self, query: str, *args: Any) -> str:
        """Run a statement; return its status string. As :meth:`Cluster.execute`,
        cancellation included."""
        return await self.cluster.execute(query, *args)

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        """Run a query; return all rows. As :meth:`Cluster.fetch`, cancellation included."""
        return await self.cluster.fetch(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        """Run a query; return the first row or ``None``. As :meth:`Cluster.fetchrow`,
        cancellation included."""
        return await self.cluster.fetchrow(query, *args)
