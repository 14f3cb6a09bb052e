"""Frozen, validated configuration. Bad input fails here, before any I/O.

Example::

    >>> cfg = ClusterConfig.create("postgresql://admin:pw@h1:4327", connections_per_node=4)
    >>> cfg.connections_per_node
    4
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ._dsn import Dsn, parse_dsn
from ._errors import ConfigError
from ._strategies import RoundRobin, Strategy
from ._topology import Role, Selector

# Keyword arguments that the library sets itself for each node.
_RESERVED_CONNECT_KWARGS = frozenset(
    {"host", "port", "user", "password", "database", "dsn", "loop"}
)


def _positive(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{attribute.name} must be a positive number of seconds, got {value!r}")


def _count(minimum: int) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{attribute.name} must be an integer >= {minimum}, got {value!r}")

    return check


#: How trio reaches asyncpg; see :class:`ClusterConfig`.
BRIDGES = ("auto", "embedded", "trio-asyncio", "thread")


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{attribute.name} must be one of {allowed}, got {value!r}")

    return check


def _callable(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not callable(value):
        raise ConfigError(
            f"{attribute.name} must be callable(candidates) -> candidate, got {value!r}"
        )


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """Every option of :func:`open_cluster`, validated. See docs/tuning.md.

    Attributes:
        dsn: the parsed DSN (user, password, seed hosts).
        connections_per_node: query connections each node actor keeps open.
        strategy: the balance strategy.
        discovery_interval: seconds between discovery runs.
        health_interval: seconds between health probes of each node.
        probe_timeout: a probe (``SELECT 1``) slower than this marks the node down.
        connect_timeout: deadline of one connection attempt; also how long
            :func:`open_cluster` waits for a first usable node.
        acquire_timeout: how long a request may wait for a free connection.
        selector: the tiers and replicaset role to use.
        backoff_initial: first reconnect delay after a failure.
        backoff_max: reconnect delays grow exponentially up to this (with jitter).
        max_restarts: a node that goes down more than this many times ...
        restart_window: ... within this many seconds is quarantined ...
        quarantine_time: ... for this long before it is tried again.
        max_attempts: how many nodes one request may be tried on.
        drain_timeout: how long a drained node's in-flight requests may take.
        events_buffer: events kept per slow ``events()`` subscriber.
        bridge: how trio reaches asyncpg. ``"embedded"``: a plain asyncio loop
            driven by a trio task in trio's own thread (the fastest; see
            docs/benchmarks.md). ``"trio-asyncio"``: on the running trio-asyncio
            loop, or on a new one. ``"thread"``: a plain asyncio loop in a
            thread of its own, with batched hand-offs. ``"auto"`` (the
            default): the running trio-asyncio loop if there is one, so a
            service that already runs trio-asyncio shares its loop, else
            ``"embedded"``.
        connect_kwargs: extra keyword arguments for ``asyncpg.connect``.
    """

    dsn: Dsn
    connections_per_node: int = attrs.field(default=2, validator=_count(1))
    strategy: Strategy = attrs.field(factory=RoundRobin, validator=_callable)
    discovery_interval: float = attrs.field(default=2.0, validator=_positive)
    health_interval: float = attrs.field(default=1.0, validator=_positive)
    probe_timeout: float = attrs.field(default=1.0, validator=_positive)
    connect_timeout: float = attrs.field(default=5.0, validator=_positive)
    acquire_timeout: float = attrs.field(default=5.0, validator=_positive)
    selector: Selector = attrs.field(factory=Selector)
    backoff_initial: float = attrs.field(default=0.05, validator=_positive)
    backoff_max: float = attrs.field(default=1.0, validator=_positive)
    max_restarts: int = attrs.field(default=5, validator=_count(1))
    restart_window: float = attrs.field(default=30.0, validator=_positive)
    quarantine_time: float = attrs.field(default=10.0, validator=_positive)
    max_attempts: int = attrs.field(default=3, validator=_count(1))
    drain_timeout: float = attrs.field(default=10.0, validator=_positive)
    events_buffer: int = attrs.field(default=256, validator=_count(1))
    bridge: str = attrs.field(default="auto", validator=_one_of(BRIDGES))
    connect_kwargs: Mapping[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.backoff_max < self.backoff_initial:
            raise ConfigError(
                f"backoff_max ({self.backoff_max}) must be >= "
                f"backoff_initial ({self.backoff_initial})"
            )
        reserved = _RESERVED_CONNECT_KWARGS.intersection(self.connect_kwargs)
        if reserved:
            raise ConfigError(
                f"connect keyword(s) {', '.join(sorted(reserved))} are set from the DSN "
                "and discovery; put them in the DSN instead"
            )

    @classmethod
    def create(
        cls,
        dsn: str,
        *,
        tiers: Iterable[str] | str | None = None,
        role: str | Role = "any",
        **options: Any,
    ) -> ClusterConfig:
        """Build a config from the public keyword arguments of :func:`open_cluster`.

        Options that are not fields of this class go to ``asyncpg.connect``.
        """
        parsed = parse_dsn(dsn)
        fields = {a.name for a in attrs.fields(cls)} - {"dsn", "selector", "connect_kwargs"}
        own = {k: v for k, v in options.items() if k in fields}
        connect_kwargs = {k: v for k, v in options.items() if k not in fields}
        if "timeout" in connect_kwargs and "connect_timeout" not in own:
            own["connect_timeout"] = connect_kwargs.pop("timeout")
        connect_kwargs.pop("timeout", None)
        return cls(
            dsn=parsed,
            selector=Selector(tiers=_tiers(tiers), role=_role(role)),
            connect_kwargs=connect_kwargs,
            **own,
        )


def _tiers(tiers: Iterable[str] | str | None) -> frozenset[str] | None:
    if tiers is None:
        return None
    names = (tiers,) if isinstance(tiers, str) else tuple(tiers)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ConfigError(f"tiers must be None or non-empty tier names, got {tiers!r}")
    return frozenset(names)


def _role(role: str | Role) -> Role:
    if isinstance(role, Role):
        return role
    try:
        return Role(role)
    except ValueError:
        raise ConfigError(f"role must be 'any', 'leader' or 'replica', got {role!r}") from None
