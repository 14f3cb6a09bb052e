"""An asyncpg connection as the actors see it (the ``Connection`` protocol).

:class:`BridgedConnection` works with any runner; :class:`EmbeddedConnection`
starts each query straight on the embedded loop, without an asyncio Task (and,
on a cached statement, without asyncpg's Python layers: see :mod:`.driver`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from .base import BackendBroken, BackendQueryError, OnDone, Runner
from .errors import INVALIDATED, MAX_RERUNS, classified

if TYPE_CHECKING:
    from .embedded import EmbeddedLoop

#: The health probe: Picodata takes neither comments nor several statements.
PROBE_QUERY = "SELECT 1"


class BridgedConnection:
    """An asyncpg connection, reached from trio through a runner."""

    __slots__ = ("_conn", "_runner")

    def __init__(self, conn: Any, runner: Runner) -> None:
        self._conn = conn
        self._runner = runner

    def __repr__(self) -> str:
        state = "closed" if self._conn.is_closed() else "open"
        return f"<{type(self).__name__} {self._runner.kind} {state}>"

    async def _call(self, factory: Callable[[], Any]) -> Any:
        if self._conn.is_closed():
            raise BackendBroken("connection is closed", sent=False)
        # A cancelled query drops its connection: cancelling the asyncio task
        # would make asyncpg send a cancel request, which Picodata cannot serve.
        return await classified(
            self._runner.await_coro(factory, on_cancel=self._conn.terminate), sent=True
        )

    async def run(self, method: str, query: str, args: Sequence[Any]) -> Any:
        """Run it; after 42999 (nothing ran) drop the cached statements and run it again."""
        bound = getattr(self._conn, method)
        reruns = 0
        while True:
            try:
                return await self._call(lambda: bound(query, *args))
            except BackendQueryError as exc:
                if exc.sqlstate != INVALIDATED or reruns == MAX_RERUNS or self.is_closed():
                    raise
            reruns += 1
            self.forget_statements()

    def submit(self, method: str, query: str, args: Sequence[Any], on_done: OnDone) -> None:
        # A closed connection fails in asyncpg before sending (InterfaceError
        # "connection is closed"), which classifies as BackendBroken(sent=False).
        self._runner.start_coro(
            functools.partial(getattr(self._conn, method), query, *args), on_done
        )

    async def probe(self) -> None:
        # execute() with no arguments is the simple query protocol: no
        # prepared statement, nothing a schema change can invalidate.
        await self.run("execute", PROBE_QUERY, ())

    async def prepare(self, query: str) -> Any:
        return await self.run("prepare", query, ())

    async def run_prepared(self, handle: Any, method: str, args: Sequence[Any]) -> Any:
        bound = getattr(handle, method)
        return await self._call(lambda: bound(*args))

    def terminate(self) -> None:
        if not self._conn.is_closed():
            self._runner.run_soon(self._conn.terminate)

    async def close(self) -> None:
        if self._conn.is_closed():
            return
        try:
            with trio.move_on_after(1.0) as scope:
                await self._call(lambda: self._conn.close(timeout=1.0))
            if scope.cancelled_caught:
                self.terminate()
        except Exception:
            self.terminate()

    def is_closed(self) -> bool:
        return bool(self._conn.is_closed())

    def in_transaction(self) -> bool:
        conn = self._conn
        return not conn.is_closed() and bool(conn.is_in_transaction())

    def forget_statements(self) -> None:
        # asyncpg's own statement cache; its statements are closed on the
        # server with the next request (asyncpg garbage-collects them).
        self._conn._drop_local_statement_cache()


class EmbeddedConnection(BridgedConnection):
    """A connection of the embedded runner: ``submit`` goes straight to the loop.

    ``submit(method, query, args, on_done)`` is the loop's
    :meth:`~.embedded.EmbeddedLoop.start_query` with this connection bound:
    a partial, so that the hot path has no frame of its own here.
    """

    __slots__ = ("submit",)

    _runner: EmbeddedLoop

    def __init__(self, conn: Any, runner: EmbeddedLoop) -> None:
        super().__init__(conn, runner)
        setattr(self, "submit", functools.partial(runner.start_query, conn))  # noqa: B010
