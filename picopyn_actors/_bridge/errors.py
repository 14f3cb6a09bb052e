"""Error classification for the asyncpg side, in one place.

Every exception asyncpg, asyncio or the OS raises for a request becomes a
:class:`~.base.BackendQueryError` (the query was rejected) or a
:class:`~.base.BackendBroken` (the connection is gone) here, and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import asyncpg
import outcome
import trio

from .._dsn import redact
from .base import BackendBroken, BackendQueryError, OnDone

log = logging.getLogger("picopyn_actors._bridge")

#: SQLSTATE of "prepared statement has been invalidated": Picodata rejects, at
#: Bind and before running anything, a statement prepared before a schema
#: change of its tables (when the session asked for pico_stmt_invalidation).
INVALIDATED = "42999"
#: How many times in a row a request is prepared again after 42999.
MAX_RERUNS = 5

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


async def classified(awaitable: Awaitable[Any], *, sent: bool) -> Any:
    """Await ``awaitable``; an error other than cancellation comes out classified."""
    try:
        return await awaitable
    except (trio.Cancelled, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise classify(exc, sent=sent) from exc


def call_back(
    callback: OnDone, result: outcome.Outcome[Any]
) -> None:
    """Report a finished operation to ``callback``, classifying its error; never raises."""
    if isinstance(result, outcome.Error):
        error = result.error
        if isinstance(error, asyncio.CancelledError):
            result = outcome.Error(BackendBroken("operation cancelled", sent=True))
        elif not isinstance(error, BackendQueryError | BackendBroken):
            result = outcome.Error(classify(error, sent=True))
    try:
        callback(result)
    except Exception:  # pragma: no cover - a bug in the callback; keep the bridge alive
        log.exception("picopyn_actors: error in a completion callback")


def task_outcome(task: asyncio.Task[Any]) -> outcome.Outcome[Any]:
    if task.cancelled():
        return outcome.Error(asyncio.CancelledError())
    exc = task.exception()
    return outcome.Value(task.result()) if exc is None else outcome.Error(exc)


def log_loop_error(loop: Any, context: dict[str, Any]) -> None:
    # asyncpg leaves futures behind when a connect is cut short (for example
    # its SSL negotiation with a hung node). trio-asyncio's default handler
    # re-raises such errors into the loop's nursery, which would tear down the
    # whole cluster for an error nobody is waiting for: log it instead.
    exc = context.get("exception")
    log.debug(
        "asyncio: %s%s", redact(str(context.get("message", ""))), f" ({exc!r})" if exc else ""
    )


def install_handler(loop: Any) -> None:
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(log_loop_error)


