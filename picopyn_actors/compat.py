"""A facade shaped like picopyn's ``Client``, on the self-healing core.

Programs written for picopyn keep working: ``Client(dsn, pool_size=None,
balance_strategy=None, **connect_kwargs)`` with ``connect()``, ``execute``,
``fetch``, ``fetchrow`` and ``close()``, or as ``async with``. Under trio.

Differences from picopyn: ``pool_size`` is the number of connections *per
node* (default 2); ``balance_strategy(candidates)`` receives
:class:`~picopyn_actors.Candidate` nodes instead of connections; errors are
:class:`~picopyn_actors.PicodataError` subclasses instead of ``RuntimeError``.
``connect()`` and ``close()`` must be called from the same trio task (the
client's actors live in a nursery opened by ``connect()``); ``async with``
has no such constraint.

Example::

    client = Client("postgresql://admin:pw@127.0.0.1:4327")
    await client.connect()
    try:
        rows = await client.fetch("SELECT name FROM _pico_instance")
    finally:
        await client.close()
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

from ._cluster import Cluster, open_cluster
from ._config import ClusterConfig
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
            not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1
        ):
            raise ConfigError(f"pool_size must be an integer >= 1, got {pool_size!r}")
        options: dict[str, Any] = dict(connect_kwargs)
        options["connections_per_node"] = pool_size or 2
        if balance_strategy is not None:
            options["strategy"] = balance_strategy
        # Validate now: bad input fails at construction, not at connect().
        ClusterConfig.create(dsn, **options)
        self._dsn = dsn
        self._options = options
        self._stack: AsyncExitStack | None = None
        self._cluster: Cluster | None = None

    def __repr__(self) -> str:
        state = "connected" if self._cluster is not None else "not connected"
        return f"<Client {ClusterConfig.create(self._dsn, **self._options).dsn} {state}>"

    @property
    def cluster(self) -> Cluster:
        """The underlying :class:`Cluster` (after :meth:`connect`)."""
        if self._cluster is None:
            raise ClusterClosed("the client is not connected: call connect() first")
        return self._cluster

    async def connect(self) -> None:
        """Discover the cluster and open connections. Idempotent.

        Raises :class:`NoNodesAvailable` if no node is usable within the
        connect timeout. If cancelled, nothing is left open.
        """
        if self._cluster is not None:
            return
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self._cluster = await stack.enter_async_context(
                open_cluster(self._dsn, **self._options)
            )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def close(self) -> None:
        """Close every connection and stop the actors. Idempotent.

        Requests still running end with :class:`ClusterClosed`. Cancelling
        ``close`` does not stop the shutdown: it runs to the end first.
        """
        stack, self._stack, self._cluster = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
