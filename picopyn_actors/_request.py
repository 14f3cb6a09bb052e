"""A request travelling through the actors, and its one-shot reply path.

The caller parks on trio's trap (``wait_task_rescheduled``, or the run loop's
trap itself: see :mod:`._trap`); whoever ends the request (dispatcher or node
actor) reschedules it exactly once with an outcome.
:meth:`Request.finish` is the only way to end a request, so an answer can
never be given twice; an abandoned request (its caller was cancelled) can
no longer be answered at all.
"""

from __future__ import annotations

import enum
import math
import re
import types
from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import outcome
import trio
from trio.lowlevel import current_task, reschedule, wait_task_rescheduled

from ._bucket import Bucket
from ._errors import ArgumentError, ClusterClosed, QueryError
from ._trap import FAST, WaitTaskRescheduled

if TYPE_CHECKING:
    from ._hedging import Hedger

#: The method of a request that borrows a connection (``cluster.connection()``).
PIN: Final = "pin"

# Statements after which a connection may keep state of its session.
_SESSION_VERBS = frozenset(
    {
        "set",
        "reset",
        "discard",
        "begin",
        "start",
        "commit",
        "end",
        "rollback",
        "abort",
        "savepoint",
        "release",
        "prepare",
        "deallocate",
        "declare",
        "listen",
        "lock",
        "do",
        "call",
    }
)
# SQL comments, and the statements that create session-local objects.
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_TEMPORARY = re.compile(r"\bcreate\s+(?:(?:global|local)\s+)?temp(?:orary)?\b")


def check_query(query: object) -> None:
    """Refuse query text that cannot be sent, before anything is sent.

    Raises:
        QueryError: ``query`` is not a ``str``, holds a NUL character, or
            cannot be encoded as UTF-8 (a lone surrogate). ``node`` is ``None``.
    """
    if type(query) is not str:
        raise QueryError(
            f"the query must be a str, not {type(query).__name__}", sqlstate=None, node=None
        )
    if "\x00" in query:
        raise QueryError(
            f"the query text holds a NUL character at position {query.index(chr(0))}; "
            "pass such data as a $n parameter",
            sqlstate=None,
            node=None,
        )
    if not query.isascii():
        try:
            query.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise QueryError(
                f"the query text cannot be encoded as UTF-8 (a lone surrogate at position "
                f"{exc.start})",
                sqlstate=None,
                node=None,
            ) from None


def check_timeout(timeout: object) -> float:
    """``timeout`` as seconds for ``trio.fail_after``, or a clear error."""
    if isinstance(timeout, int | float) and not isinstance(timeout, bool):
        try:
            if not math.isnan(timeout) and timeout >= 0:
                return float(timeout)
        except OverflowError:
            return math.inf
    raise ArgumentError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")


def changes_session(query: str) -> bool:
    """``query`` may leave state on its session (``SET``, a transaction, a temporary
    table, ...), in any of its statements, after any comment. Errs on the safe
    side: a ``;`` inside a string literal may count as a statement's end."""
    text = _COMMENTS.sub(" ", query).lower()
    if "set_config" in text or _TEMPORARY.search(text):
        return True
    for statement in text.split(";"):
        words = statement.lstrip(" \t\r\n(").split(None, 1)
        if words and words[0] in _SESSION_VERBS:
            return True
    return False


class Terminable(Protocol):
    """What a request needs of the connection it runs on."""

    def terminate(self) -> None:
        """Drop the connection at once."""


class Phase(enum.IntEnum):
    """Where a request is. Only moves forward, except SENT -> QUEUED on a retry."""

    QUEUED = 0  # waiting in the dispatcher
    SENT = 1  # handed to a node's connection slot: the server may have seen it
    DONE = 2  # answered
    ABANDONED = 3  # the caller gave up (cancelled); nobody will answer


# Members as module names, for the request path: on Python 3.11 an enum class
# has a __getattr__ (removed in 3.12), which makes each ``Phase.X`` a slow
# attribute lookup (some 800 instructions); a module name is one load.
QUEUED, SENT, DONE, ABANDONED = Phase.QUEUED, Phase.SENT, Phase.DONE, Phase.ABANDONED
_Value = outcome.Value


class Request:
    """One query (or one pin of a connection) and its caller."""

    __slots__ = (
        "args",
        "attempts",
        "bucket",
        "conn",
        "enqueued_at",
        "errors",
        "hedged",
        "hedger",
        "hedges",
        "idempotent",
        "in_flight",
        "invalidations",
        "last_route",
        "looked",
        "method",
        "parent",
        "phase",
        "query",
        "result",
        "task",
    )

    def __init__(
        self,
        method: str,
        query: str,
        args: Sequence[Any],
        idempotent: bool,
        now: float = 0.0,
        bucket: Bucket | None = None,
    ) -> None:
        self.method = method
        self.bucket = bucket
        # Hedging: the policy's state (None: never hedged), the hedge requests
        # sent for this one, and, on a hedge, the request it hedges.
        self.hedger: Hedger | None = None
        self.hedged = False
        self.hedges: list[Request] | None = None
        self.parent: Request | None = None
        self.in_flight = 0  # slots running this request (its hedges included)
        # When the attempt that the hedge scheduler last decided about
        # started (it looks at each attempt once, but a held one again).
        self.looked = -1.0
        self.query = query
        self.args = args
        self.idempotent = idempotent
        self.phase = QUEUED
        self.task: trio.lowlevel.Task | None = None
        self.attempts = 0
        self.invalidations = 0
        self.last_route: int | None = None
        self.conn: Terminable | None = None
        self.enqueued_at = now  # set by the dispatcher when the request has to wait
        self.errors: list[str] | None = None  # "node: why" of each failed attempt, if any
        self.result: outcome.Outcome[Any] | None = None

    @property
    def open(self) -> bool:
        """The request still waits for an answer."""
        return self.phase < DONE

    # Protected from KeyboardInterrupt, as trio's own reschedule is: a Ctrl-C
    # never lands between the bookkeeping and the wake-up (free on trio >= 0.28,
    # which marks the code object; a wrapper's frame before).
    @trio.lowlevel.enable_ki_protection
    def finish(self, result: outcome.Outcome[Any]) -> bool:
        """Answer the caller; ``False`` (and nothing happens) if already ended.

        A hedge answers the request it hedges: the first answer wins.
        """
        if self.phase >= DONE:
            return False
        self.phase = DONE
        # Not needed any more: a request the hedge scheduler holds stays with
        # it a while longer, its arguments need not.
        self.args = ()
        parent = self.parent
        if parent is not None:
            if (
                isinstance(result, outcome.Error)
                and not isinstance(result.error, QueryError)
                and parent.in_flight > 0
            ):
                return False  # the hedge found no way (AcquireTimeout, say): the first runs on
            won = parent.finish(result)
            if won and parent.hedger is not None:
                parent.hedger.won += 1
            return won
        task = self.task
        if task is None:
            # The caller has not parked yet (it is still handing the request
            # over): keep the answer for :meth:`wait`.
            self.result = result
        elif FAST:
            task._runner.reschedule(task, result)  # trio's reschedule, without its frame
        else:
            reschedule(task, result)
        return True

    def fail(self, exc: BaseException) -> bool:
        """Answer the caller with an exception."""
        return self.finish(outcome.Error(exc))

    def close(self, why: str = "the cluster was closed") -> None:
        """Fail with :class:`ClusterClosed` if still open."""
        self.fail(ClusterClosed(f"{why} before the request finished"))

    def _abort(self, raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        # The caller is cancelled: nobody will read an answer any more. A
        # query on the wire cannot be cancelled on Picodata, so its connection
        # is terminated: its node sees it break, and opens a new one.
        if self.phase >= Phase.DONE:  # pragma: no cover - trio never aborts a rescheduled task
            return trio.lowlevel.Abort.FAILED
        self.phase = Phase.ABANDONED
        if self.conn is not None:
            self.conn.terminate()
        for hedge in self.hedges or ():  # nothing left behind that counts as the caller's
            if hedge.phase < Phase.DONE:
                hedge.phase = Phase.ABANDONED
                if hedge.conn is not None:
                    hedge.conn.terminate()
        return trio.lowlevel.Abort.SUCCEEDED

    @types.coroutine
    def wait(self, task: trio.lowlevel.Task | None = None) -> Generator[Any, Any, Any]:
        """Park the current task (``task``, if the caller has it already) until
        :meth:`finish`; return or raise its outcome (``await request.wait()``).

        If cancelled, the request is abandoned: it will not run if it has not
        started, and its connection is dropped if it has. (A generator that
        yields trio's trap itself: see :mod:`._trap`.)
        """
        if self.result is not None:
            # Answered before its caller parked (it failed at once, say): a
            # checkpoint all the same, as every trio call that waits makes one.
            yield from trio.lowlevel.cancel_shielded_checkpoint()  # noqa: ASYNC105 - awaited so
            return self.result.unwrap()
        self.task = task or current_task()
        if not FAST:
            return (yield from wait_task_rescheduled(self._abort))  # noqa: ASYNC105 - idem
        result = yield WaitTaskRescheduled(self._abort)
        if type(result) is _Value:  # an answer, without Outcome.unwrap
            return result.value
        return result.unwrap()  # an error, or trio's Cancelled
