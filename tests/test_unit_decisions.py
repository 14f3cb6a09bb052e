"""The pure decisions of the node actor: retry, backoff and restart intensity, transitions."""

from __future__ import annotations

import random

import pytest

from picopyn_actors import NodeState
from picopyn_actors._backoff import Recovery
from picopyn_actors._events import TRANSITIONS
from picopyn_actors._node import REMIND_EVERY, Outage
from picopyn_actors._retry import MAX_INVALIDATIONS, Action, Failure, decide

S = NodeState

# -- the retry decision: every row -------------------------------------------------------

# (sent, idempotent, invalidated, others_in_flight, attempts, max_attempts, invalidations)
#   -> (action, attempts after, invalidations after)
RETRY_TABLE = [
    # Never reached a server: another node, no attempt used, idempotent or not.
    ((False, False, False, False, 0, 3, 0), (Action.RETRY_ELSEWHERE, 0, 0)),
    ((False, True, False, False, 2, 3, 0), (Action.RETRY_ELSEWHERE, 2, 0)),
    # Sent and not idempotent: it may have run.
    ((True, False, False, False, 0, 3, 0), (Action.OUTCOME_UNKNOWN, 0, 0)),
    ((True, False, False, False, 2, 3, 0), (Action.OUTCOME_UNKNOWN, 2, 0)),
    # Sent and idempotent: another node while attempts last.
    ((True, True, False, False, 0, 3, 0), (Action.RETRY_ELSEWHERE, 1, 0)),
    ((True, True, False, False, 1, 3, 0), (Action.RETRY_ELSEWHERE, 2, 0)),
    ((True, True, False, False, 2, 3, 0), (Action.GIVE_UP, 3, 0)),
    ((True, True, False, False, 0, 1, 0), (Action.GIVE_UP, 1, 0)),
    # 42999: nothing ran; the same node again, idempotent or not, a bounded number of times.
    ((False, False, True, False, 0, 3, 0), (Action.RETRY_HERE, 0, 1)),
    ((False, True, True, False, 2, 3, 3), (Action.RETRY_HERE, 2, 4)),
    (
        (False, False, True, False, 0, 3, MAX_INVALIDATIONS - 1),
        (Action.RETRY_HERE, 0, MAX_INVALIDATIONS),
    ),
    (
        (False, False, True, False, 0, 3, MAX_INVALIDATIONS),
        (Action.GIVE_UP, 0, MAX_INVALIDATIONS + 1),
    ),
    # A hedge of the request still runs: wait for it; a sent failure still uses an
    # attempt, so that one request never has more than max_attempts in flight.
    ((True, True, False, True, 0, 3, 0), (Action.WAIT, 1, 0)),
    ((False, True, False, True, 1, 3, 0), (Action.WAIT, 1, 0)),
    ((True, True, False, True, 2, 3, 0), (Action.WAIT, 3, 0)),
    # ... but 42999 still runs it again here.
    ((False, True, True, True, 0, 3, 0), (Action.RETRY_HERE, 0, 1)),
]


@pytest.mark.parametrize(("given", "expected"), RETRY_TABLE)
def test_retry_decision_table(
    given: tuple[bool, bool, bool, bool, int, int, int], expected: tuple[Action, int, int]
) -> None:
    sent, idempotent, invalidated, others, attempts, max_attempts, invalidations = given
    decision = decide(
        Failure(
            sent=sent, idempotent=idempotent, invalidated=invalidated, others_in_flight=others
        ),
        attempts=attempts,
        max_attempts=max_attempts,
        invalidations=invalidations,
    )
    assert (decision.action, decision.attempts, decision.invalidations) == expected


# -- Recovery: backoff and restart intensity as one object ----------------------------------


def _recovery(**kwargs: float) -> Recovery:
    options: dict[str, float] = dict(
        initial=0.1, maximum=1.0, max_restarts=2, restart_window=10.0, quarantine_time=30.0
    )
    options.update(kwargs)
    return Recovery(rand=random.Random(7), **options)  # type: ignore[arg-type]


def test_recovery_backs_off_exponentially_and_starts_over_when_connected() -> None:
    recovery = _recovery()
    delays = [recovery.failed(now=0.0).delay for _ in range(6)]
    bases = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert all(base / 2 <= d <= base for d, base in zip(delays, bases, strict=True))
    assert recovery.attempts == 6
    recovery.connected()
    assert recovery.attempts == 0
    assert recovery.failed(now=0.0).delay <= 0.1


def test_recovery_counts_restarts_and_quarantines_past_the_limit() -> None:
    recovery = _recovery()
    verdicts = []
    for now in (1.0, 2.0, 3.0):
        recovery.connected()
        verdicts.append(recovery.failed(now=now))
    assert [v.restart for v in verdicts] == [True, True, True]
    assert [v.quarantined for v in verdicts] == [False, False, True]
    assert verdicts[-1].retry_at == 33.0
    # A failure of a session that never came up is not a restart.
    assert not recovery.failed(now=40.0).restart


def test_recovery_forgets_restarts_outside_the_window() -> None:
    recovery = _recovery()
    for now in (1.0, 2.0, 13.0):
        recovery.connected()
        verdict = recovery.failed(now=now)
    assert not verdict.quarantined
    assert recovery.restarts_in_window == 1


def test_refused_credentials_always_wait_the_maximum() -> None:
    recovery = _recovery()
    assert recovery.failed(now=5.0, auth=True).retry_at == 6.0


def test_wake_starts_the_attempts_over() -> None:
    recovery = _recovery()
    for _ in range(5):
        recovery.failed(now=0.0)
    recovery.wake()
    assert recovery.attempts == 0


# -- the transition table ----------------------------------------------------------------


def test_every_state_but_retired_can_retire_and_retired_is_final() -> None:
    for state, allowed in TRANSITIONS.items():
        if state is S.RETIRED:
            assert allowed == frozenset()
        else:
            assert S.RETIRED in allowed, state
        assert state not in allowed  # no self-loops: a change is a change


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.QUARANTINED, S.DRAINING),
        (S.CONNECTING, S.DRAINING),
        (S.DOWN, S.DRAINING),
        (S.DOWN, S.CONNECTING),
        (S.DRAINING, S.UP),
        (S.RETIRED, S.UP),
        (S.CONNECTING, S.QUARANTINED),
    ],
)
def test_changes_the_issue_found_unchecked_are_refused(old: NodeState, new: NodeState) -> None:
    assert not old.can_become(new)


def test_only_up_and_suspect_can_drain() -> None:
    assert {s for s, allowed in TRANSITIONS.items() if S.DRAINING in allowed} == {S.UP, S.SUSPECT}


# -- Outage: calm logs ------------------------------------------------------------------------


def test_an_outage_reminds_at_most_every_few_minutes() -> None:
    outage = Outage()
    assert outage.end(5.0) is None  # it was not down
    outage.start(10.0)
    outage.start(11.0)  # a failed attempt does not move the start
    assert outage.attempts == 1
    assert outage.remind(10.0 + REMIND_EVERY - 1) is None
    assert outage.remind(10.0 + REMIND_EVERY) == REMIND_EVERY
    assert outage.remind(10.0 + REMIND_EVERY + 1) is None
    assert outage.end(400.0) == 390.0
    assert outage.end(401.0) is None
