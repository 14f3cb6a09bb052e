"""Hedged reads: when an idempotent request is slow, send it to a second node too.

:class:`Hedging` is the public, frozen policy (``open_cluster(...,
hedging=pa.Hedging())``); :class:`Hedger` is the dispatcher's state for it:
recent latencies (for the adaptive delay), the budget over a sliding window,
and the counters. Pure: the dispatcher passes the clock's reading.

Example::

    >>> hedger = Hedger(Hedging(percentile=0.95, floor=0.002, budget=0.1))
    >>> for ms in range(1, 101):
    ...     hedger.record(ms / 1000, now=0.0)
    >>> round(hedger.delay(now=0.0), 3)   # about the 95th percentile
    0.096
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs

from ._errors import ConfigError

if TYPE_CHECKING:
    from ._request import Request

# Latencies are kept in buckets 5% wide: the percentile is within 5% of the truth.
_GROWTH = 1.05
_FIRST = 1e-5  # seconds: the upper edge of the first bucket
_BUCKETS = 400  # up to _FIRST * 1.05**400, about 50 minutes; slower ones fall in the last
# The upper edges of the buckets but the last: bucket i holds the latencies in
# (_EDGES[i - 1], _EDGES[i]] (a bisection finds it, cheaper than a logarithm).
_EDGES = [_FIRST * _GROWTH**i for i in range(_BUCKETS - 1)]
# The sliding window is cut into this many slices.
_SLICES = 10
# One latency in this many is kept at least: the percentile needs a sample, not all.
_SAMPLE = 4
# At high rates fewer: about this many per slice of the window (one in
# ``requests of the last slice // _PER_SLICE``), each standing for as many
# requests in the histogram. 2,560 samples over a window put the p95 within
# half a percentile point; sampling them costs next to nothing per request.
_PER_SLICE = 256


def _fraction(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < 1:
        raise ConfigError(
            f"Hedging.{attribute.name} must be a number between 0 and 1, got {value!r}"
        )


def _seconds(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None and attribute.name == "delay":
        return
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(
            f"Hedging.{attribute.name} must be a positive number of seconds, got {value!r}"
        )


@attrs.frozen(kw_only=True, cache_hash=True)  # (a per-call policy is looked up by it)
class Hedging:
    """The hedging policy: when a slow idempotent request gets a second attempt.

    Only idempotent requests are hedged, never a pinned connection's. When the
    first attempt has not answered after the hedge delay, the same request is
    sent to another routable node (for a keyed request, a replica of the same
    replicaset, or nowhere); the first answer wins. By default
    (``only_stalled``) the late request's node must also have stalled: it has
    answered nothing, to any request, for the hedge delay; while it keeps
    answering others, the request is slow by itself (a big result, a heavy
    query), a second node would be no faster, and it is left alone, to be
    hedged should its node stall. The loser is not cancelled (Picodata
    cannot cancel): its connection finishes the query, the answer is
    dropped, and the connection serves on.

    Attributes:
        delay: a fixed hedge delay in seconds, or ``None`` (the default) for
            an adaptive one: the ``percentile`` of the latencies of the last
            ``window`` seconds, and at least ``floor``.
        percentile: which latency the adaptive delay follows (0.95: the p95).
        floor: the adaptive delay's least value, in seconds.
        budget: hedges may add at most this share of extra requests over the
            last ``window`` seconds (0.1: 10%; and one hedge per window in any
            case, so that a quiet client can hedge too), so that hedging cannot
            double the load when the whole cluster is slow.
        window: the sliding window of the budget and of the latencies, in seconds.
        min_samples: the adaptive delay needs this many latencies in the
            window (one answer in four is sampled, fewer at high rates:
            about 2,500 over the window); before that, nothing is hedged.
        only_stalled: hedge a late request only once its node has answered
            nothing for the hedge delay (the default); ``False``: hedge every
            late request, so that a workload whose own latencies spread
            widely gets about ``1 - percentile`` extra requests (within the
            budget) on a healthy cluster.
    """

    delay: float | None = attrs.field(default=None, validator=_seconds)
    percentile: float = attrs.field(default=0.95, validator=_fraction)
    floor: float = attrs.field(default=0.002, validator=_seconds)
    budget: float = attrs.field(default=0.1, validator=_fraction)
    window: float = attrs.field(default=10.0, validator=_seconds)
    min_samples: int = attrs.field(default=20)
    only_stalled: bool = attrs.field(default=True)

    def __attrs_post_init__(self) -> None:
        if (
            not isinstance(self.min_samples, int)
            or isinstance(self.min_samples, bool)
            or self.min_samples < 1
        ):
            raise ConfigError(
                f"Hedging.min_samples must be an integer >= 1, got {self.min_samples!r}"
            )
        if not isinstance(self.only_stalled, bool):
            raise ConfigError(
                f"Hedging.only_stalled must be True or False, got {self.only_stalled!r}"
            )


@attrs.define
class _Slice:
    """One slice of the sliding window: its start, counts and latency histogram
    (``latencies``: each sample counts for ``every`` requests, as many as it
    stands for; ``weight``: their sum; ``samples``: how many were kept)."""

    start: float
    every: int = _SAMPLE
    requests: int = 0
    hedges: int = 0
    latencies: list[int] = attrs.field(factory=lambda: [0] * _BUCKETS)
    samples: int = 0
    weight: int = 0


@attrs.define(eq=False)
class Hedger:
    """The dispatcher's hedging state for one :class:`Hedging` policy.

    The request path keeps no list of requests for it: a send counts its
    request (``fresh``, for the budget), an answer counts down to the next
    latency sample (``countdown``) and, when it came after the delay, calls
    :meth:`answered`. The hedge scheduler (see :mod:`._hedges`) finds the late
    requests on the connection slots of the nodes that stalled.
    """

    policy: Hedging
    sent: int = 0
    won: int = 0
    refused: int = 0  # hedges the budget refused
    skipped: int = 0  # late requests held, not hedged: every other node was as late
    not_stalled: int = 0  # late requests answered unhedged: their node answered others
    # Requests sent since the last look (the scheduler counts them for the
    # budget), and answers left until the next latency sample.
    fresh: int = 0
    countdown: int = _SAMPLE
    #: The delay :meth:`delay` computed last (``inf`` while unknown): an
    #: answer at least this late calls :meth:`answered`.
    last_delay: float = attrs.field(init=False, default=math.inf)
    # Late requests due for a hedge that every node they might go to was as
    # late for: looked at again at ``held_due``, after ``held_wait`` (an eighth
    # of the delay, doubled while they stay held, up to 8 delays); their nodes
    # (``held_at``) get no hedge meanwhile.
    held: list[Request] = attrs.field(init=False, factory=list)
    held_due: float = attrs.field(init=False, default=-math.inf)
    held_wait: float = attrs.field(init=False, default=0.0)
    held_at: set[int | None] = attrs.field(init=False, factory=set)
    _slices: deque[_Slice] = attrs.field(init=False, factory=deque)
    _cur: _Slice = attrs.field(init=False, factory=lambda: _Slice(-math.inf))
    _slice_end: float = attrs.field(init=False, default=-math.inf)
    _delay_until: float = attrs.field(init=False, default=-math.inf)

    def _current(self, now: float) -> _Slice:
        if now >= self._slice_end:
            self._rotate(now)
        return self._cur

    def _rotate(self, now: float) -> None:
        slices = self._slices
        width = self.policy.window / _SLICES
        # One latency in ``every``: at least one in _SAMPLE, and about
        # _PER_SLICE per slice at the last slice's rate.
        self._cur = _Slice(now, max(_SAMPLE, self._cur.requests // _PER_SLICE))
        slices.append(self._cur)
        while slices and slices[0].start <= now - self.policy.window:
            slices.popleft()
        self._slice_end = now + width

    def record(self, seconds: float, now: float) -> None:
        """Keep a latency: a request answered in ``seconds``, counted for as
        many requests as it stands for (the slice's ``every``)."""
        current = self._cur if now < self._slice_end else self._current(now)
        every = current.every
        current.samples += 1
        current.weight += every
        current.latencies[bisect.bisect_left(_EDGES, seconds)] += every

    def answered(self, latency: float, now: float, node_answered: float, hedged: bool) -> None:
        """An answer after ``latency`` seconds, called when :attr:`countdown`
        ran out (a sample: one answer in ``every``, see :meth:`record`) or
        when it came after the delay. A late answer that got no hedge while
        its node answered others since it was late (``node_answered``, the
        node's previous answer) counts in ``not_stalled``."""
        if self.countdown <= 0:
            self.record(latency, now)
            self.countdown = self._cur.every
        delay = self.last_delay
        if latency >= delay and not hedged and node_answered >= now - latency + delay:
            self.not_stalled += 1

    def count(self, requests: int, now: float) -> None:
        """``requests`` hedgeable requests were sent (for the budget)."""
        self._current(now).requests += requests

    def delay(self, now: float) -> float:
        """The hedge delay now: fixed, or the percentile of the window's latencies
        (``inf`` until there are ``min_samples`` of them). Recomputed at most
        once per slice of the window."""
        policy = self.policy
        if policy.delay is not None:
            self.last_delay, self._delay_until = policy.delay, math.inf
            return policy.delay
        if now < self._delay_until:
            return self.last_delay
        # Until the next slice; each call while there are too few samples.
        self._delay_until = now + policy.window / _SLICES
        self._current(now)
        samples = sum(s.samples for s in self._slices)
        if samples < policy.min_samples:
            self.last_delay = math.inf
            self._delay_until = -math.inf
            return self.last_delay
        rank = math.ceil(policy.percentile * sum(s.weight for s in self._slices))
        seen = 0
        for index in range(_BUCKETS):
            seen += sum(s.latencies[index] for s in self._slices)
            if seen >= rank:
                upper = _FIRST * _GROWTH**index
                self.last_delay = max(policy.floor, upper)
                return self.last_delay
        self.last_delay = max(policy.floor, _FIRST * _GROWTH**_BUCKETS)  # pragma: no cover
        return self.last_delay

    def allow(self, now: float) -> bool:
        """May one more hedge be sent now, within the budget? Counts it if so."""
        current = self._current(now)
        requests = sum(s.requests for s in self._slices)
        hedges = sum(s.hedges for s in self._slices)
        if hedges and hedges + 1 > self.policy.budget * requests:
            self.refused += 1
            return False
        current.hedges += 1
        self.sent += 1
        return True

    @property
    def current_delay(self) -> float | None:
        """The delay in force: fixed, or the last one computed (``None`` while unknown)."""
        if self.policy.delay is not None:
            return self.policy.delay
        return None if math.isinf(self.last_delay) else self.last_delay
