"""What to do with a request that did not complete on its node: a pure decision.

Shaped like the Cassandra driver's ``RetryPolicy``: one function answers
for every kind of failure, and a table test pins every row.

Example::

    >>> decide(Failure(sent=True, idempotent=False), attempts=0, max_attempts=3).action
    <Action.OUTCOME_UNKNOWN: 'outcome unknown'>
"""

from __future__ import annotations

import enum

import attrs

from ._bridge import MAX_RERUNS

#: How many times one request may be re-prepared after 42999 before it fails:
#: a storm of schema changes must not loop a request forever.
MAX_INVALIDATIONS = MAX_RERUNS


class Action(enum.Enum):
    """The answer of :func:`decide`."""

    RETRY_HERE = "retry here"  # the same node, on a fresh statement (42999)
    RETRY_ELSEWHERE = "retry elsewhere"  # another node, through the dispatcher
    OUTCOME_UNKNOWN = "outcome unknown"  # fail with OutcomeUnknown: it may have run
    GIVE_UP = "give up"  # fail with the error (or NoNodesAvailable)
    WAIT = "wait"  # another attempt (a hedge) still runs: it will answer


@attrs.frozen
class Failure:
    """How a request failed.

    Attributes:
        sent: the request may have reached the server.
        idempotent: the caller allows it to run more than once.
        invalidated: the server rejected it before executing it, because its
            prepared statement was invalidated by a schema change (42999).
        others_in_flight: other attempts of the same request still running
            (hedges): one of them may still answer.
    """

    sent: bool
    idempotent: bool
    invalidated: bool = False
    others_in_flight: int = 0


@attrs.frozen
class Decision:
    """:func:`decide`'s answer, and the request's counters after it."""

    action: Action
    attempts: int
    invalidations: int


def decide(
    failure: Failure,
    *,
    attempts: int,
    max_attempts: int,
    invalidations: int = 0,
    max_invalidations: int = MAX_INVALIDATIONS,
) -> Decision:
    """Decide the fate of a request that failed.

    ``attempts`` counts the nodes on which the request was sent and broke;
    a request that never reached a server does not use up an attempt.

    - Invalidated (42999): nothing ran, so it is tried again on the same node,
      idempotent or not, up to ``max_invalidations`` times; then it gives up.
    - Never sent: another node, without counting an attempt.
    - Sent and not idempotent: its outcome is unknown.
    - Sent and idempotent: another node, until ``max_attempts`` nodes tried.
    - Another attempt of it (a hedge) still runs: wait for that one (a sent
      failure still uses up an attempt), whatever else holds.
    """
    if failure.invalidated:
        invalidations += 1
        action = Action.RETRY_HERE if invalidations <= max_invalidations else Action.GIVE_UP
        return Decision(action, attempts, invalidations)
    if failure.others_in_flight:
        return Decision(Action.WAIT, attempts + (1 if failure.sent else 0), invalidations)
    if not failure.sent:
        return Decision(Action.RETRY_ELSEWHERE, attempts, invalidations)
    if not failure.idempotent:
        return Decision(Action.OUTCOME_UNKNOWN, attempts, invalidations)
    attempts += 1
    action = Action.RETRY_ELSEWHERE if attempts < max_attempts else Action.GIVE_UP
    return Decision(action, attempts, invalidations)
