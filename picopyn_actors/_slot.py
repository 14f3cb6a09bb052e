"""A connection slot: one query connection of a session, and its request's fate.

The dispatcher holds idle slots as tokens and hands a request to one with
:meth:`Slot.start`, a call that never blocks. The bridge calls
:meth:`Slot.completed` back, in trio, when the request ends. Completion is
*decide, then act*: first the bookkeeping (the slot is free, the node has one
request fewer) and the decision of what becomes of the request and the
slot; then the caller's answer, a retry, and the slot's return, in that
order, so that a call which starts another request synchronously finds
consistent state and nothing re-enters a half-done completion.

:func:`reroute_or_fail` applies the retry decision (:func:`~._retry.decide`)
to a request that could not complete on its node.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import outcome

from ._bridge import INVALIDATED, BackendBroken, BackendQueryError, Connection
from ._errors import NoNodesAvailable, OutcomeUnknown, QueryError
from ._request import ABANDONED, PIN, QUEUED, SENT, Request
from ._retry import Action, Failure, decide
from ._strategies import LATENCY_EWMA

if TYPE_CHECKING:
    from ._node import NodeActor
    from ._session import Session

# Picodata's error when a node's statements (pg_statement_max) are used up.
_STORAGE_FULL = "Statement storage is full"


def query_error(exc: BackendQueryError, node: str) -> QueryError:
    """The :class:`QueryError` for a query the server rejected, with advice where
    the server gives none."""
    message = exc.message
    if _STORAGE_FULL.lower() in message.lower():
        message = (
            f"{message}: node {node} holds as many prepared statements as its "
            "pg_statement_max allows, for every client together. Lower "
            "statement_cache_size= (each connection caches that many), or "
            "connections_per_node, or raise pg_statement_max on the node"
        )
    return QueryError(message, sqlstate=exc.sqlstate, node=node)


class Slot:
    """One query connection of a session, and the request on it (if any)."""

    __slots__ = ("candidate", "conn", "request", "route_id", "session", "started")

    def __init__(self, session: Session, conn: Connection) -> None:
        self.session = session
        self.conn = conn
        self.route_id = session.node.route_id
        self.candidate = session.node.candidate
        self.request: Request | None = None
        self.started = 0.0

    def __repr__(self) -> str:
        busy = self.request is not None
        return f"<Slot {self.session.node.name} gen={self.session.generation} busy={busy}>"

    def start(self, request: Request) -> None:
        """Run ``request`` on this slot's connection. Never blocks, never raises."""
        self.candidate.in_flight += 1
        self.request = request
        request.phase = SENT
        request.last_route = self.route_id
        (request.parent or request).in_flight += 1
        if request.method == PIN:
            self.session.lend(self, request)
            return
        conn = self.conn
        request.conn = conn  # a caller that gives up terminates it: see Request._abort
        session = self.session
        self.started = session.perf() + session.offset  # session.clock(), without its frame
        conn.submit(
            request.method, request.query, request.args, functools.partial(self.completed, request)
        )

    def completed(self, request: Request, result: outcome.Outcome[Any]) -> None:
        """``request`` ended. Runs in trio, called by the bridge; never raises."""
        if self.request is not request:
            return  # the session ended meanwhile, and dealt with the request then
        session = self.session
        node = session.node
        # Decide: the bookkeeping first, and what becomes of the request and the slot.
        self.request = None
        request.conn = None
        node.candidate.in_flight -= 1
        (request.parent or request).in_flight -= 1
        if type(result) is outcome.Value and request.phase is not ABANDONED:
            # The hot path: an answer for a caller who waits (or a hedge race's loser).
            node.counters.ok += 1
            now = session.perf() + session.offset
            latency = now - self.started
            candidate = self.candidate  # NodeActor.observe_latency, written out
            old = candidate.latency
            candidate.latency = latency if old is None else old + LATENCY_EWMA * (latency - old)
            hedger = request.hedger
            if hedger is not None:  # hedging samples one answer in so many, and the late ones
                hedger.countdown -= 1
                if hedger.countdown <= 0 or latency >= hedger.last_delay:
                    hedger.answered(latency, now, candidate.answered_at, request.hedged)
            candidate.answered_at = now  # (hedging tells a stalled node by it)
            request.finish(result)
            # Session.give_back, written out for the hot path.
            if node.serving and session.failure is None:
                node.router.release(self)  # last: it may start another request
            else:
                self._after(request, keep=True)
            return
        self._failed(request, result)

    def _failed(self, request: Request, result: outcome.Outcome[Any]) -> None:
        """The rest of :meth:`completed`: an error, or a caller who gave up."""
        session = self.session
        node = session.node
        abandoned = request.phase is ABANDONED
        keep = not abandoned and not self.conn.is_closed()
        if isinstance(result, outcome.Error):
            exc = result.error
            if isinstance(exc, BackendQueryError):
                self.candidate.answered_at = session.clock()  # an error is an answer too
            if isinstance(exc, BackendQueryError) and exc.sqlstate == INVALIDATED and keep:
                self.conn.forget_statements()
                node.counters.invalidated += 1
                if self._invalidated(request, exc):
                    self.start(request)  # run it again, here
                    return
            elif isinstance(exc, BackendQueryError):
                node.counters.query_errors += 1
                node.counters.failed += 1
                error = query_error(exc, node.name)
                error.__cause__ = exc.__cause__
                request.fail(error)
            elif isinstance(exc, BackendBroken):
                keep = False
                if not abandoned:
                    session.note_broken(exc.message)
                    reroute_or_fail(node, request, exc.message, sent=exc.sent)
            else:  # pragma: no cover - the bridge classifies every error
                keep = False
                request.fail(exc)
        self._after(request, keep=keep)

    def _after(self, request: Request, *, keep: bool) -> None:
        """Act on the slot, last, because giving it back may start another request."""
        session = self.session
        if keep:
            session.give_back(self)
        else:
            session.replace(self)
        node = session.node
        if not node.serving and node.candidate.in_flight == 0:
            node.wake()  # draining: the last request is done

    def _invalidated(self, request: Request, exc: BackendQueryError) -> bool:
        """42999: the statements were dropped; run it again here (``True``), or give up."""
        node = self.session.node
        decision = decide(
            Failure(sent=False, idempotent=request.idempotent, invalidated=True),
            attempts=request.attempts,
            max_attempts=node.config.max_attempts,
            invalidations=request.invalidations,
        )
        request.invalidations = decision.invalidations
        if decision.action is Action.RETRY_HERE and request.open:
            return True
        node.counters.failed += 1
        request.fail(
            QueryError(
                f"{exc.message}; prepared again {request.invalidations - 1} times while the "
                "schema kept changing",
                sqlstate=exc.sqlstate,
                node=node.name,
            )
        )
        return False


@attrs.define(eq=False)
class Lease:
    """A connection lent to one caller by ``cluster.connection()``."""

    conn: Connection
    node: str
    _on_return: Callable[..., None]
    returned: bool = False

    def give_back(self, *, dirty: bool = False) -> None:
        """Return the connection to its node (``dirty``: it must be replaced). Idempotent."""
        if not self.returned:
            self.returned = True
            self._on_return(dirty=dirty)


def reroute_or_fail(node: NodeActor, request: Request, error: str, *, sent: bool) -> None:
    """``request`` (or a hedge of it) could not complete on ``node``: retry it
    elsewhere or fail it; if another attempt of it still runs, wait for that one."""
    request = request.parent or request  # a hedge's fate is its request's
    if not request.open:
        return
    if request.errors is None:
        request.errors = []
    request.errors.append(f"{node.name}: {error}")
    if node.closing.is_set():
        request.close()
        return
    decision = decide(
        Failure(sent=sent, idempotent=request.idempotent, others_in_flight=request.in_flight),
        attempts=request.attempts,
        max_attempts=node.config.max_attempts,
    )
    if decision.action is Action.WAIT:
        request.attempts = decision.attempts
        return
    request.attempts = decision.attempts
    if decision.action is Action.RETRY_ELSEWHERE:
        node.counters.retried += 1
        request.phase = QUEUED
        request.last_route = node.route_id
        node.router.submit(request)
        return
    node.counters.failed += 1
    if decision.action is Action.OUTCOME_UNKNOWN:
        request.fail(
            OutcomeUnknown(
                f"the connection to node {node.name} ({node.info.address}) broke after "
                f"the request was sent ({error}); it may or may not have been executed. "
                "Pass idempotent=True to let such requests be retried on another node",
                node=node.name,
            )
        )
        return
    request.fail(
        NoNodesAvailable(
            f"request failed on {request.attempts} node(s) "
            f"(max_attempts={node.config.max_attempts})",
            dict(e.split(": ", 1) for e in request.errors or () if ": " in e),
        )
    )
