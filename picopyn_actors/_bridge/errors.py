"""Errors on the asyncio side, as the runners report them.

Every exception asyncpg, asyncio or the OS raises for a request becomes a
:class:`~.base.BackendQueryError` (the query was rejected) or a
:class:`~.base.BackendBroken` (the connection is gone) by
:func:`~.driver.classify`, which these helpers apply, and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import outcome
import trio

from .._dsn import redact
from .base import BackendBroken, BackendQueryError, OnDone
from .driver import classify

log = logging.getLogger("picopyn_actors._bridge")

#: SQLSTATE of "prepared statement has been invalidated": Picodata rejects, at
#: Bind and before running anything, a statement prepared before a schema
#: change of its tables (when the session asked for pico_stmt_invalidation).
INVALIDATED = "42999"
#: How many times in a row a request is prepared again after 42999.
MAX_RERUNS = 5

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


