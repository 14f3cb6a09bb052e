"""Balance strategies: pick one candidate node for a request.

A strategy is any callable ``strategy(candidates) -> candidate``. It is given
the nodes that are up and have a free connection right now (never an empty
list) and must return one of them; a strategy of your own gets a list of its
own, which it may keep or change. A strategy that takes a keyword argument
``bucket`` is also given the request's :class:`~picopyn_actors.Bucket` (``None``
for a request without one): a keyed request goes straight to the master that
owns its bucket when that node can take it, and the strategy chooses, seeing
the bucket, when it cannot (among the nodes of the bucket's tier) and among
the replicas of the owner with ``role="replica"``. The built-in ones keep a little state of
their own and are cheap: they run once per request on the hot path.

Example::

    def prefer_zone_a(candidates):
        local = [c for c in candidates if c.failure_domain.get("zone") == "a"]
        return (local or candidates)[0]

    async with pa.open_cluster(dsn, strategy=prefer_zone_a) as cluster: ...
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable, Mapping, Sequence

import attrs

from ._dsn import Address


@attrs.define(eq=False)
class Candidate:
    """A node offered to a strategy. Treat it as read-only.

    Attributes:
        name: the instance name.
        address: its pgproto address.
        tier: its tier.
        replicaset: its replicaset name.
        failure_domain: its failure domain, such as ``{"zone": "a"}``.
        in_flight: requests sent to it and not yet answered.
        free: idle connections it has right now.
        latency: exponentially weighted mean request latency in seconds, or
            ``None`` before the first answer.
        answered_at: when it last answered a request (``trio.current_time()``),
            ``-inf`` before the first answer.
    """

    name: str
    address: Address
    tier: str
    replicaset: str
    failure_domain: Mapping[str, str] = attrs.field(factory=dict)
    in_flight: int = 0
    free: int = 0
    latency: float | None = None
    answered_at: float = -math.inf


#: The weight of a new latency sample in :attr:`Candidate.latency`, the EWMA.
LATENCY_EWMA = 0.2

#: The type of a balance strategy: given the candidates (never empty), return one.
Strategy = Callable[[Sequence[Candidate]], Candidate]


class RoundRobin:
    """Take the candidates in turn (the default)."""

    def __init__(self) -> None:
        self._next = 0

    def __call__(self, candidates: Sequence[Candidate]) -> Candidate:
        index = self._next % len(candidates)
        self._next = index + 1
        return candidates[index]

    def __repr__(self) -> str:
        return "RoundRobin()"


class Random:
    """Pick a candidate uniformly at random."""

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def __call__(self, candidates: Sequence[Candidate]) -> Candidate:
        return candidates[self._random.randrange(len(candidates))]

    def __repr__(self) -> str:
        return "Random()"


class LeastInFlight:
    """Power of two choices: sample two candidates, take the less loaded one."""

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def __call__(self, candidates: Sequence[Candidate]) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._random.sample(range(len(candidates)), 2)
        first, second = candidates[a], candidates[b]
        return first if first.in_flight <= second.in_flight else second

    def __repr__(self) -> str:
        return "LeastInFlight()"


class Fastest:
    """Take the candidate with the lowest latency EWMA.

    A node not measured yet counts as fastest, so that every node gets
    measured; the health probes keep every node's figure fresh.
    """

    def __call__(self, candidates: Sequence[Candidate]) -> Candidate:
        best = candidates[0]
        best_latency = best.latency if best.latency is not None else -1.0
        for candidate in candidates[1:]:
            latency = candidate.latency if candidate.latency is not None else -1.0
            if latency < best_latency:
                best, best_latency = candidate, latency
        return best

    def __repr__(self) -> str:
        return "Fastest()"


#: The built-in strategies' types: they only read the list they are given.
BUILT_IN = (RoundRobin, Random, LeastInFlight, Fastest)


def takes_bucket(strategy: object) -> bool:
    """``strategy`` accepts a ``bucket`` keyword argument."""
    try:
        parameters = inspect.signature(strategy).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    bucket = parameters.get("bucket")
    if bucket is not None:
        return bucket.kind in (bucket.KEYWORD_ONLY, bucket.POSITIONAL_OR_KEYWORD)
    return any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def strategy_name(strategy: object) -> str:
    """A readable name for error messages."""
    if isinstance(strategy, RoundRobin | Random | LeastInFlight | Fastest):
        return repr(strategy)
    return getattr(strategy, "__qualname__", None) or repr(strategy)
