"""asyncpg and trio-asyncio, in one module: the library reaches either through here.

* **Connecting** (:func:`connect`) and **error classification**
  (:func:`classify`: asyncpg's exceptions become
  :class:`~.base.BackendQueryError` or :class:`~.base.BackendBroken`).
* **trio-asyncio**: :data:`CURRENT_LOOP` (the context variable from which
  trio-asyncio answers ``asyncio.get_running_loop()`` in trio code; importing
  this module installs those patches) and :func:`open_loop`.
* **The embedded runner's fast path.** On a statement already in the
  connection's statement cache, with no query logger and no timeout,
  ``Connection.fetchrow(query, *args)`` does nothing but pass the call down
  through five coroutines (``fetchrow`` -> ``_execute`` -> ``__execute`` ->
  ``_do_execute`` -> ``_get_statement``) to the protocol's ``bind_execute``,
  and the answer back up through them: about a third of the Python calls
  of a request. :func:`fast_call` makes that one protocol call itself, as
  asyncpg's ``__execute`` makes it (the same keyword arguments), and says
  how to shape its answer the way the public method would; anything else
  (a statement not cached yet, a query logger, a closed connection, a
  method not listed in ``PLANS``) is left to the public method, which
  prepares and caches the statement for the next time.

  Two errors asyncpg's ``_do_execute`` handles are handled the same way by
  :func:`recover`: ``OutdatedSchemaCacheError`` reloads the schema state and
  is raised again; ``InvalidCachedStatementError`` drops the statement
  caches and runs the public method once more unless a transaction is open.

  It leans on asyncpg internals (``_protocol``, ``_stmt_cache``,
  ``_query_loggers``, ``_aborted``, ``bind_execute``, ``query``,
  ``get_record_class``, ``is_connected``, and the statement cache's
  ``_entries`` and their ``_statement``, read as its ``get()`` reads them,
  without that call's frame):
  :func:`self_check` verifies that they exist, and the tests run on every
  asyncpg release ``pyproject.toml`` allows (``scripts/compat``). When the
  check fails, :func:`~picopyn_actors._bridge.open_backend` logs one
  WARNING and the public methods are used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import trio_asyncio
from asyncpg import exceptions as _exc

from .._dsn import redact
from .base import BackendBroken, BackendQueryError

#: The context variable trio-asyncio keeps the current asyncio loop in (trio code
#: asks asyncio for its running loop, and trio-asyncio answers from this).
CURRENT_LOOP = trio_asyncio.current_loop


def open_loop() -> AbstractAsyncContextManager[Any]:
    """A new trio-asyncio loop for the duration of an ``async with``."""
    loop: AbstractAsyncContextManager[Any] = trio_asyncio.open_loop()
    return loop


async def connect(host: str, port: int, timeout: float, **kwargs: Any) -> Any:
    """``asyncpg.connect``: a new connection, on the running asyncio loop."""
    return await asyncpg.connect(host=host, port=port, timeout=timeout, **kwargs)


# SQLSTATE classes and codes that mean "this connection is finished".
_BROKEN_SQLSTATE_PREFIXES = ("08",)
_BROKEN_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# Class-08 codes that are the request's fault, not the connection's: Picodata
# answers a protocol violation and keeps the session (PostgreSQL closes it;
# the node actor then replaces the connection without blaming the node).
_QUERY_SQLSTATES = frozenset({"08P01"})


def classify(exc: BaseException, *, sent: bool) -> Exception:
    """Map an asyncpg/OS exception to :class:`BackendQueryError` or :class:`BackendBroken`."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None)
        text = redact(str(exc)) or type(exc).__name__
        if state in _QUERY_SQLSTATES:
            return BackendQueryError(text, state)
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


def _first(rows: Any) -> Any:
    return rows[0] if rows else None


def _value(rows: Any) -> Any:
    return rows[0][0] if rows else None


def _status(extra: Any) -> str:
    status: bytes = extra[1]
    return status.decode()


#: method -> (limit, return_extra, how to shape bind_execute's answer or None),
#: as asyncpg's public methods call ``_execute``.
PLANS: dict[str, tuple[int, bool, Callable[[Any], Any] | None]] = {
    "fetch": (0, False, None),
    "fetchrow": (1, False, _first),
    "fetchval": (1, False, _value),
    "execute": (0, True, _status),
}

#: The errors :func:`recover` handles (asyncpg's ``_do_execute`` handles them too).
RECOVERABLE = (_exc.OutdatedSchemaCacheError, _exc.InvalidCachedStatementError)


def fast_call(
    conn: Any, method: str, query: str, args: Sequence[Any]
) -> tuple[Any, Callable[[Any], Any] | None] | None:
    """The protocol coroutine for ``conn.<method>(query, *args)`` and how to shape
    its result, or ``None`` when the public method must run instead."""
    plan = PLANS.get(method)
    protocol = conn._protocol
    # (conn.is_closed(), written out)
    if plan is None or conn._query_loggers or conn._aborted or not protocol.is_connected():
        return None
    if method == "execute" and not args:
        # Connection.execute without arguments: the simple query protocol.
        return protocol.query(query, None), None
    # The statement cache's get(), written out: a miss, or a statement closed
    # since, goes to the public method, whose own get() drops it.
    key = (query, protocol.get_record_class(), False)
    entries = conn._stmt_cache._entries
    entry = entries.get(key)
    if entry is None:
        return None
    statement = entry._statement
    if statement.closed:
        return None
    entries.move_to_end(key)
    limit, extra, shape = plan
    return (
        protocol.bind_execute(
            state=statement,
            args=args,
            portal_name="",
            limit=limit,
            return_extra=extra,
            timeout=None,
        ),
        shape,
    )


async def recover(conn: Any, error: BaseException, method: str, query: str, args: Any) -> Any:
    """What asyncpg's ``_do_execute`` does after one of ``RECOVERABLE``."""
    if isinstance(error, _exc.OutdatedSchemaCacheError):
        await conn.reload_schema_state()
        raise error
    conn._drop_global_statement_cache()
    if conn._protocol.is_in_transaction():
        raise error
    return await getattr(conn, method)(query, *args)


@functools.cache
def self_check() -> str | None:
    """Why the fast path cannot run on this asyncpg, or ``None`` when it can."""
    slots: set[str] = set()
    for klass in asyncpg.Connection.__mro__:
        slots.update(getattr(klass, "__slots__", ()))
    for name in ("_protocol", "_stmt_cache", "_query_loggers", "_aborted"):
        if name not in slots:
            return f"asyncpg.Connection has no {name}"
    for name in ("is_closed", "reload_schema_state", "_drop_global_statement_cache", *PLANS):
        if not callable(getattr(asyncpg.Connection, name, None)):
            return f"asyncpg.Connection.{name} is missing"
    protocol = getattr(getattr(asyncpg, "protocol", None), "Protocol", None)
    if protocol is None:
        return "asyncpg.protocol.Protocol is missing"
    for name in ("bind_execute", "query", "get_record_class", "is_in_transaction", "is_connected"):
        if not callable(getattr(protocol, name, None)):
            return f"asyncpg's Protocol.{name} is missing"
    module = getattr(asyncpg, "connection", None)
    for klass, name in (("_StatementCache", "_entries"), ("_StatementCacheEntry", "_statement")):
        if name not in getattr(getattr(module, klass, None), "__slots__", ()):
            return f"asyncpg's {klass} has no {name}"
    return None
