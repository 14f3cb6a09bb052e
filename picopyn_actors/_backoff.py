"""When a node actor tries again: reconnect backoff and restart intensity, as one object.

Pure: the caller passes the clock's reading; nothing here sleeps.

Example::

    >>> recovery = Recovery(initial=0.05, maximum=1.0, max_restarts=5,
    ...                     restart_window=30.0, quarantine_time=10.0)
    >>> recovery.connected()                  # the node is up
    >>> verdict = recovery.failed(now=12.0)   # it went down
    >>> verdict.quarantined, verdict.retry_at > 12.0
    (False, True)
"""

from __future__ import annotations

import random
from collections import deque
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._config import ClusterConfig

_RANDOM = random.Random()


def backoff_delay(
    failures: int, initial: float, maximum: float, rand: random.Random | None = None
) -> float:
    """Delay before reconnect attempt number ``failures`` (1-based).

    Exponential, capped at ``maximum``, with "equal jitter": a uniform draw in
    the upper half, so that clients do not reconnect in lockstep and the delay
    never collapses to zero.
    """
    base = min(maximum, initial * 2.0 ** min(max(0, failures - 1), 64))
    jitter = (rand or _RANDOM).uniform(0, base / 2)
    return base / 2 + jitter


@attrs.define
class RestartTracker:
    """Restart intensity: at most ``limit`` restarts within ``window`` seconds."""

    limit: int
    window: float
    _times: deque[float] = attrs.field(init=False, factory=deque)

    def record(self, now: float) -> bool:
        """Record a restart at ``now``; ``True`` when the limit is exceeded."""
        self._times.append(now)
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        return len(self._times) > self.limit

    @property
    def count(self) -> int:
        """Restarts in the current window (as of the last :meth:`record`)."""
        return len(self._times)


@attrs.frozen
class Verdict:
    """What to do after a failed session.

    Attributes:
        retry_at: when to try again (the clock's time).
        delay: ``retry_at`` minus the failure's time.
        quarantined: the node failed too often: it waits ``quarantine_time``.
        restart: the failure ended a session that had been up (a restart).
        attempt: failed attempts in a row, this one included.
    """

    retry_at: float
    delay: float
    quarantined: bool
    restart: bool
    attempt: int


@attrs.define
class Recovery:
    """Backoff state of one node: failed attempts in a row, and recent restarts.

    Call :meth:`connected` when a session comes up and :meth:`failed` when one
    fails; :meth:`wake` when the node is known to be back (its attempts start
    over). Shaped like psycopg_pool's ``AttemptWithBackoff``: one object, not
    a handful of fields.
    """

    initial: float
    maximum: float
    max_restarts: int
    restart_window: float
    quarantine_time: float
    rand: random.Random = attrs.field(factory=random.Random)
    attempts: int = attrs.field(init=False, default=0)
    _up: bool = attrs.field(init=False, default=False)
    _tracker: RestartTracker = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._tracker = RestartTracker(self.max_restarts, self.restart_window)

    @classmethod
    def from_config(cls, config: ClusterConfig, rand: random.Random | None = None) -> Recovery:
        """The recovery policy that ``config``'s backoff and restart options describe."""
        return cls(
            initial=config.backoff_initial,
            maximum=config.backoff_max,
            max_restarts=config.max_restarts,
            restart_window=config.restart_window,
            quarantine_time=config.quarantine_time,
            rand=rand or random.Random(),
        )

    def connected(self) -> None:
        """A session came up: failures start over."""
        self.attempts = 0
        self._up = True

    def wake(self) -> None:
        """The node is back (its catalog incarnation rose): try at once, from scratch."""
        self.attempts = 0

    def failed(self, now: float, *, auth: bool = False) -> Verdict:
        """A session failed at ``now``: when to try again, and whether to quarantine.

        A failure after the node was up counts as a restart; more than
        ``max_restarts`` restarts within ``restart_window`` quarantine the
        node for ``quarantine_time``. Refused credentials always wait
        ``maximum``, so that a bad password never hammers a server.
        """
        restart, self._up = self._up, False
        self.attempts += 1
        if restart and self._tracker.record(now):
            return Verdict(
                now + self.quarantine_time, self.quarantine_time, True, True, self.attempts
            )
        if auth:
            delay = self.maximum
        else:
            delay = backoff_delay(self.attempts, self.initial, self.maximum, self.rand)
        return Verdict(now + delay, delay, False, restart, self.attempts)

    @property
    def restarts_in_window(self) -> int:
        """Restarts counted in the current window."""
        return self._tracker.count
