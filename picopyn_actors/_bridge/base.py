"""What the actors need of the asyncpg side: two protocols and two errors.

Everything the actors do with a server connection goes through the small
:class:`Connection` protocol, and opening one through :class:`Backend`, so
that the runner under them can change, and the fake backend of
``picopyn_actors.testing`` can stand in for them, without touching the actors.

Errors reach the actors classified, once:

* :class:`BackendQueryError`: the server (or the client, before sending)
  rejected the query; the connection stays usable unless it says it is closed.
* :class:`BackendBroken`: the connection is gone. ``sent`` tells whether the
  request may have reached the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import outcome

from .._dsn import Address

#: Called once, in trio, with the outcome of a request started by ``submit``.
OnDone = Callable[[outcome.Outcome[Any]], None]


class BackendQueryError(Exception):
    """The query was rejected; the connection is fine (check ``is_closed()``)."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class BackendBroken(Exception):
    """The connection is unusable. ``sent``: the request may have reached the server;
    ``auth``: the server refused the credentials; ``timed_out``: no answer in time;
    ``identity``: the server is not the node the catalog names."""

    def __init__(
        self,
        message: str,
        *,
        sent: bool,
        auth: bool = False,
        timed_out: bool = False,
        identity: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sent = sent
        self.auth = auth
        self.timed_out = timed_out
        self.identity = identity


class Connection(Protocol):
    """One server connection, as the actors see it."""

    def submit(self, method: str, query: str, args: Sequence[Any], on_done: OnDone) -> None:
        """Start ``asyncpg.Connection.<method>(query, *args)``; never blocks, never raises.

        ``on_done(outcome)`` runs in trio when it ends, exactly once, with the
        result or a :class:`BackendQueryError` / :class:`BackendBroken`. It may
        run before ``submit`` returns (a connection already closed, say).
        The per-request hot path: no trio task waits for it.
        """

    async def run(self, method: str, query: str, args: Sequence[Any]) -> Any:
        """Run ``asyncpg.Connection.<method>(query, *args)`` and wait for it."""

    async def probe(self) -> None:
        """Run the health probe, ``SELECT 1``."""

    def terminate(self) -> None:
        """Drop the connection at once, without a goodbye."""

    async def close(self) -> None:
        """Close politely; falls back to :meth:`terminate` on error."""

    def is_closed(self) -> bool:
        """``True`` once the connection cannot be used any more."""

    def in_transaction(self) -> bool:
        """``True`` while a transaction block is open on the server."""

    def forget_statements(self) -> None:
        """Drop every cached prepared statement (the server invalidated them)."""

    async def prepare(self, query: str) -> Any:
        """Prepare a named statement; returns an opaque handle for :meth:`run_prepared`."""

    async def run_prepared(self, handle: Any, method: str, args: Sequence[Any]) -> Any:
        """Run ``<method>(*args)`` on a prepared statement."""


class Backend(Protocol):
    """Opens connections to nodes."""

    async def connect(self, address: Address) -> Connection:
        """Open one connection; raise :class:`BackendBroken` on failure."""


class Runner(Protocol):
    """How one runner runs asyncio work for trio (``embedded``, ``thread``, ``trio-asyncio``)."""

    kind: str

    async def await_coro(
        self, factory: Callable[[], Any], on_cancel: Callable[[], object] | None = None
    ) -> Any:
        """Run ``factory()`` on the asyncio side; wait for it in trio.

        Cancellation calls ``on_cancel()`` on the asyncio side when given (a
        query passes its connection's ``terminate``: cancelling the asyncio
        task would make asyncpg send a cancel request, which Picodata cannot
        serve), else cancels the asyncio task; either way it waits, a bounded
        time, for the task to end, then raises ``Cancelled``.
        """

    def start_coro(self, factory: Callable[[], Any], on_done: OnDone) -> None:
        """Run ``factory()`` on the asyncio side; ``on_done(outcome)`` runs in trio after."""

    def run_soon(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` on the asyncio side, without waiting."""
