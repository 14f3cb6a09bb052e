"""The bridge to asyncpg: the only module that imports asyncpg and trio_asyncio.

asyncpg is asyncio-only; trio code reaches it through a trio-asyncio loop.
Everything the actors need from a server connection is the small
:class:`Connection` protocol below, so that the bridge can change (or a fake
backend stand in for it, in unit tests) without touching the actors.

Errors are classified here, once:

* :class:`BackendQueryError`: the server (or asyncpg, before sending) rejected
  the query; the connection stays usable.
* :class:`BackendBroken`: the connection is gone. ``sent`` tells whether the
  request may have reached the server.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import asyncpg
import trio
import trio_asyncio

from ._dsn import Address, Dsn, redact

log = logging.getLogger(__name__)

__all__ = [
    "AsyncpgBackend",
    "Backend",
    "BackendBroken",
    "BackendQueryError",
    "Connection",
    "open_backend",
]

# SQLSTATE classes and codes that mean "this connection is finished".
_BROKEN_SQLSTATE_PREFIXES = ("08",)
_BROKEN_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


class BackendQueryError(Exception):
    """The query was rejected; the connection is fine."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class BackendBroken(Exception):
    """The connection is unusable. ``sent``: the request may have reached the server."""

    def __init__(self, message: str, *, sent: bool, auth: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.sent = sent
        self.auth = auth


class Connection(Protocol):
    """One server connection, as the actors see it."""

    async def run(self, method: str, query: str, args: Sequence[Any]) -> Any:
        """Run ``asyncpg.Connection.<method>(query, *args)``."""

    async def probe(self) -> None:
        """Run the health probe, ``SELECT 1``."""

    def terminate(self) -> None:
        """Drop the connection at once, without a goodbye."""

    async def close(self) -> None:
        """Close politely; falls back to :meth:`terminate` on error."""

    def is_closed(self) -> bool:
        """``True`` once the connection cannot be used any more."""

    async def prepare(self, query: str) -> Any:
        """Prepare a named statement; returns an opaque handle for :meth:`run_prepared`."""

    async def run_prepared(self, handle: Any, method: str, args: Sequence[Any]) -> Any:
        """Run ``<method>(*args)`` on a prepared statement."""


class Backend(Protocol):
    """Opens connections to nodes."""

    async def connect(self, address: Address) -> Connection:
        """Open one connection; raise :class:`BackendBroken` on failure."""


def classify(exc: BaseException, *, sent: bool) -> Exception:
    """Map an asyncpg/OS exception to :class:`BackendQueryError` or :class:`BackendBroken`."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None)
        text = redact(str(exc)) or type(exc).__name__
        if state and (state.startswith(_BROKEN_SQLSTATE_PREFIXES) or state in _BROKEN_SQLSTATES):
            return BackendBroken(f"{text} [{state}]", sent=sent)
        if isinstance(
            exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
        ):
            return BackendBroken(f"authentication failed: {text} [{state}]", sent=False, auth=True)
        return BackendQueryError(text, state)
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        return BackendBroken(redact(str(exc)) or "connection lost", sent=sent)
    if isinstance(exc, asyncpg.InterfaceError):
        text = redact(str(exc))
        if "connection is closed" in text or "another operation is in progress" in text:
            return BackendBroken(text, sent=False)
        # Wrong argument count or types: asyncpg refused before sending.
        return BackendQueryError(text, None)
    if isinstance(exc, asyncpg.exceptions._base.InternalClientError):
        return BackendBroken(redact(str(exc)), sent=sent)
    if isinstance(exc, TimeoutError):
        return BackendBroken("timed out", sent=sent)
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return BackendBroken(redact(reason), sent=sent)
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return BackendQueryError(redact(str(exc)), None)
    return BackendBroken(f"{type(exc).__name__}: {redact(str(exc))}", sent=sent)


class _AsyncpgConnection:
    """An asyncpg connection driven from trio through a trio-asyncio loop."""

    __slots__ = ("_conn", "_loop")

    def __init__(self, conn: Any, loop: Any) -> None:
        self._conn = conn
        self._loop = loop

    async def run(self, method: str, query: str, args: Sequence[Any]) -> Any:
        conn = self._conn
        if conn.is_closed():
            raise BackendBroken("connection is closed", sent=False)
        try:
            return await self._loop.run_aio_coroutine(getattr(conn, method)(query, *args))
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise classify(exc, sent=True) from exc

    async def probe(self) -> None:
        await self.run("fetchval", "SELECT 1", ())

    async def prepare(self, query: str) -> Any:
        conn = self._conn
        if conn.is_closed():
            raise BackendBroken("connection is closed", sent=False)
        try:
            return await self._loop.run_aio_coroutine(conn.prepare(query))
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise classify(exc, sent=True) from exc

    async def run_prepared(self, handle: Any, method: str, args: Sequence[Any]) -> Any:
        if self._conn.is_closed():
            raise BackendBroken("connection is closed", sent=False)
        try:
            return await self._loop.run_aio_coroutine(getattr(handle, method)(*args))
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise classify(exc, sent=True) from exc

    def terminate(self) -> None:
        if not self._conn.is_closed():
            self._conn.terminate()

    async def close(self) -> None:
        if self._conn.is_closed():
            return
        try:
            with trio.move_on_after(1.0) as scope:
                await self._loop.run_aio_coroutine(self._conn.close(timeout=1.0))
            if scope.cancelled_caught:
                self.terminate()
        except Exception:
            self.terminate()

    def is_closed(self) -> bool:
        return bool(self._conn.is_closed())


class AsyncpgBackend:
    """Opens asyncpg connections with the DSN's credentials and ``connect_kwargs``."""

    def __init__(
        self, dsn: Dsn, connect_timeout: float, connect_kwargs: Mapping[str, Any], loop: Any
    ) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout
        self._loop = loop
        kwargs: dict[str, Any] = dict(connect_kwargs)
        params = dict(dsn.params)
        if "sslmode" in params:
            kwargs.setdefault("ssl", params["sslmode"])
        if "connect_timeout" in params:
            self._timeout = float(params["connect_timeout"])
        if "application_name" in params:
            settings = dict(kwargs.get("server_settings") or {})
            settings.setdefault("application_name", params["application_name"])
            kwargs["server_settings"] = settings
        self._kwargs = kwargs

    async def connect(self, address: Address) -> Connection:
        coro = asyncpg.connect(
            host=address.host,
            port=address.port,
            user=self._dsn.user,
            password=self._dsn.password,
            database=self._dsn.database,
            timeout=self._timeout,
            **self._kwargs,
        )
        try:
            conn = await self._loop.run_aio_coroutine(coro)
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise classify(exc, sent=False) from exc
        return _AsyncpgConnection(conn, self._loop)


def _log_loop_error(loop: Any, context: dict[str, Any]) -> None:
    # asyncpg leaves futures behind when a connect is cut short (for example
    # its SSL negotiation with a hung node). trio-asyncio's default handler
    # re-raises such errors into the loop's nursery, which would tear down the
    # whole cluster for an error nobody is waiting for: log it instead.
    exc = context.get("exception")
    log.debug(
        "asyncio: %s%s", redact(str(context.get("message", ""))), f" ({exc!r})" if exc else ""
    )


def _install_handler(loop: Any) -> None:
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_log_loop_error)


@asynccontextmanager
async def open_backend(
    dsn: Dsn, connect_timeout: float, connect_kwargs: Mapping[str, Any]
) -> AsyncIterator[AsyncpgBackend]:
    """Yield a backend on the running trio-asyncio loop, or on a new one."""
    loop = trio_asyncio.current_loop.get()
    if loop is not None:
        _install_handler(loop)
        yield AsyncpgBackend(dsn, connect_timeout, connect_kwargs, loop)
        return
    async with trio_asyncio.open_loop() as new_loop:
        _install_handler(new_loop)
        yield AsyncpgBackend(dsn, connect_timeout, connect_kwargs, new_loop)
