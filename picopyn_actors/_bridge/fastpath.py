"""asyncpg's query methods without their Python layers: the embedded runner's hot path.

On a statement already in the connection's statement cache, with no query
logger and no timeout, ``Connection.fetchrow(query, *args)`` does nothing but
pass the call down through five coroutines (``fetchrow`` -> ``_execute`` ->
``__execute`` -> ``_do_execute`` -> ``_get_statement``) to the protocol's
``bind_execute``, and the answer back up through them: about a third of the
Python calls of a request. :func:`fast_call` makes that one protocol call
itself, as asyncpg's ``__execute`` makes it (the same keyword arguments), and
says how to shape its answer the way the public method would; anything else
(a statement not cached yet, a query logger, a closed connection, a method
not listed in ``PLANS``) is left to the public method, which prepares and
caches the statement for the next time.

Two errors asyncpg's ``_do_execute`` handles are handled the same way by
:func:`recover`: ``OutdatedSchemaCacheError`` reloads the schema state and
is raised again; ``InvalidCachedStatementError`` drops the statement caches
and runs the public method once more unless a transaction is open.

It leans on asyncpg internals (``_protocol``, ``_stmt_cache``,
``_query_loggers``, ``bind_execute``, ``query``, ``get_record_class``):
:func:`self_check` verifies that they exist, and the tests run on every
asyncpg release ``pyproject.toml`` allows (``scripts/compat``). When the check
fails, :func:`~picopyn_actors._bridge.open_backend` logs one WARNING and the
public methods are used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from asyncpg import exceptions as _exc


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
    if plan is None or conn._query_loggers or conn.is_closed():
        return None
    protocol = conn._protocol
    if method == "execute" and not args:
        # Connection.execute without arguments: the simple query protocol.
        return protocol.query(query, None), None
    statement = conn._stmt_cache.get((query, protocol.get_record_class(), False))
    if statement is None:
        return None
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
    for name in ("_protocol", "_stmt_cache", "_query_loggers"):
        if name not in slots:
            return f"asyncpg.Connection has no {name}"
    for name in ("is_closed", "reload_schema_state", "_drop_global_statement_cache", *PLANS):
        if not callable(getattr(asyncpg.Connection, name, None)):
            return f"asyncpg.Connection.{name} is missing"
    protocol = getattr(getattr(asyncpg, "protocol", None), "Protocol", None)
    if protocol is None:
        return "asyncpg.protocol.Protocol is missing"
    for name in ("bind_execute", "query", "get_record_class", "is_in_transaction"):
        if not callable(getattr(protocol, name, None)):
            return f"asyncpg's Protocol.{name} is missing"
    cache = getattr(getattr(asyncpg, "connection", None), "_StatementCache", None)
    if not callable(getattr(cache, "get", None)):
        return "asyncpg's statement cache has no get()"
    return None
