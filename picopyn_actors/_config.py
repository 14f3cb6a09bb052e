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
from ._hedging import Hedging
from ._strategies import RoundRobin, Strategy
from ._topology import Role, Selector

# Keyword arguments that the library sets itself for each node.
_RESERVED_CONNECT_KWARGS = frozenset(
    {"host", "port", "user", "password", "database", "dsn", "loop"}
)
# asyncpg.connect keywords that cannot work against Picodata, and why.
_REFUSED_CONNECT_KWARGS = {
    "command_timeout": (
        "asyncpg enforces it by sending a cancel request, which Picodata cannot serve; "
        "pass timeout= to each call instead (a timed-out query costs its connection)"
    ),
    "connection_class": "the library owns its connections",
    "target_session_attrs": "the library picks nodes itself (see role= and tiers=)",
    "passfile": "put the password in the DSN",
    "krbsrvname": "Picodata has no GSSAPI authentication",
    "gsslib": "Picodata has no GSSAPI authentication",
}
_SSL_MODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})

#: Upper bounds of the counts, so that a typo cannot open a million connections.
MAX_CONNECTIONS_PER_NODE = 256
MAX_ATTEMPTS = 100
MAX_RESTARTS = 10_000
MAX_EVENTS_BUFFER = 1_000_000


def _positive(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    try:
        ok = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 0
        )
    except OverflowError:  # an int too big for a float
        ok = False
    if not ok:
        raise ConfigError(f"{attribute.name} must be a positive number of seconds, got {value!r}")


def _count(minimum: int, maximum: int) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not minimum <= value <= maximum
        ):
            raise ConfigError(
                f"{attribute.name} must be an integer from {minimum} to {maximum}, got {value!r}"
            )

    return check


#: How trio reaches asyncpg; see :class:`ClusterConfig`.
BRIDGES = ("auto", "embedded", "trio-asyncio", "thread")
#: What the servers speak; see :class:`ClusterConfig`.
DIALECTS = ("picodata", "postgresql")

# Picodata's session options (its ``options`` startup parameter) and how each
# value is checked; read from Picodata's src/pgproto/client/startup.rs.
_BOOLEAN_OPTIONS = frozenset({"pico_stmt_invalidation", "pico_query_metadata"})
_COUNT_OPTIONS = frozenset({"sql_motion_row_max", "sql_vdbe_opcode_max"})
_READ_PREFERENCES = ("leader", "replica", "any")
PICO_OPTIONS = (
    *sorted(_BOOLEAN_OPTIONS),
    "read_preference",
    *sorted(_COUNT_OPTIONS),
    "forward",
)
#: What every connection sends unless the caller says otherwise: a statement
#: whose tables changed fails with 42999 at Bind instead of running stale.
DEFAULT_PICO_OPTIONS = {"pico_stmt_invalidation": "true"}


def pico_options(value: object, where: str = "pico_options") -> dict[str, str]:
    """Check Picodata session options and render their values as Picodata reads them.

    ``value`` is a mapping (``{"read_preference": "replica"}``) or the text of
    the ``options`` startup parameter (``"read_preference=replica,..."``).

    Raises:
        ConfigError: an unknown key, a malformed pair, or a bad value, named.
    """
    if isinstance(value, str):
        pairs: dict[str, object] = {}
        for pair in filter(None, value.split(",")):
            key, equals, text = pair.partition("=")
            if not equals or "=" in text:
                raise ConfigError(f"{where}: {pair!r} is not a key=value pair")
            pairs[key.strip()] = text.strip()
        value = pairs
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of Picodata session options, got {value!r}")
    checked: dict[str, str] = {}
    for key, raw in value.items():
        if key not in PICO_OPTIONS:
            raise ConfigError(
                f"{where}: unknown Picodata session option {key!r} (known: "
                f"{', '.join(PICO_OPTIONS)})"
            )
        checked[key] = _pico_value(key, raw, where)
    return checked


def _pico_value(key: str, raw: object, where: str) -> str:
    if key in _BOOLEAN_OPTIONS:
        if isinstance(raw, bool):
            return "true" if raw else "false"
        if raw in ("true", "false"):
            return str(raw)
        raise ConfigError(f"{where}: {key} must be true or false, got {raw!r}")
    if key in _COUNT_OPTIONS:
        try:
            number = int(raw) if isinstance(raw, int | str) and not isinstance(raw, bool) else -1
        except ValueError:
            number = -1
        if not 0 <= number < 2**63:
            raise ConfigError(f"{where}: {key} must be an integer >= 0, got {raw!r}")
        return str(number)
    if key == "read_preference":
        if raw not in _READ_PREFERENCES:
            raise ConfigError(
                f"{where}: read_preference must be one of {', '.join(_READ_PREFERENCES)}, "
                f"got {raw!r}"
            )
        return str(raw)
    text = str(raw)
    if not text or "," in text or "=" in text:
        raise ConfigError(f"{where}: {key} needs a value without ',' or '=', got {raw!r}")
    return text


def _one_of(choices: tuple[str, ...]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{attribute.name} must be one of {allowed}, got {value!r}")

    return check


def _hedging(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, Hedging):
        raise ConfigError(f"hedging must be None or a picopyn_actors.Hedging, got {value!r}")


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
        hedging: the :class:`~picopyn_actors.Hedging` policy of idempotent
            requests, or ``None`` (the default) for no hedged requests; each
            call may override it with ``hedging=``.
        dialect: what the servers speak. ``"picodata"`` (the default): every
            connection sends Picodata's session options (``pico_options``,
            with ``pico_stmt_invalidation=true``). ``"postgresql"``: a plain
            PostgreSQL server, which refuses those options; nothing is sent.
        pico_options: Picodata session options, as ``{"read_preference":
            "replica"}``, merged over ``pico_stmt_invalidation=true`` and over
            the DSN's ``?options=``; see docs/dialect.md.
        bridge: how trio reaches asyncpg. ``"embedded"``: a plain asyncio loop
            driven by a trio task in trio's own thread (the fastest; see
            docs/benchmarks.md). ``"trio-asyncio"``: on the running trio-asyncio
            loop, or on a new one. ``"thread"``: a plain asyncio loop in a
            thread of its own, with batched hand-offs. ``"auto"`` (the
            default): ``"embedded"``, also in a service that runs a
            trio-asyncio loop (which keeps its loop to itself; pass
            ``"trio-asyncio"`` to put asyncpg on it too).
        connect_kwargs: extra keyword arguments for ``asyncpg.connect``.
    """

    dsn: Dsn
    connections_per_node: int = attrs.field(
        default=2, validator=_count(1, MAX_CONNECTIONS_PER_NODE)
    )
    strategy: Strategy = attrs.field(factory=RoundRobin, validator=_callable)
    discovery_interval: float = attrs.field(default=2.0, validator=_positive)
    health_interval: float = attrs.field(default=1.0, validator=_positive)
    probe_timeout: float = attrs.field(default=1.0, validator=_positive)
    connect_timeout: float = attrs.field(default=5.0, validator=_positive)
    acquire_timeout: float = attrs.field(default=5.0, validator=_positive)
    selector: Selector = attrs.field(factory=Selector)
    backoff_initial: float = attrs.field(default=0.05, validator=_positive)
    backoff_max: float = attrs.field(default=1.0, validator=_positive)
    max_restarts: int = attrs.field(default=5, validator=_count(1, MAX_RESTARTS))
    restart_window: float = attrs.field(default=30.0, validator=_positive)
    quarantine_time: float = attrs.field(default=10.0, validator=_positive)
    max_attempts: int = attrs.field(default=3, validator=_count(1, MAX_ATTEMPTS))
    drain_timeout: float = attrs.field(default=10.0, validator=_positive)
    events_buffer: int = attrs.field(default=256, validator=_count(1, MAX_EVENTS_BUFFER))
    hedging: Hedging | None = attrs.field(default=None, validator=_hedging)
    dialect: str = attrs.field(default="picodata", validator=_one_of(DIALECTS))
    pico_options: Mapping[str, str] = attrs.field(factory=dict, converter=pico_options)
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
        for key, value in self.connect_kwargs.items():
            _check_connect_kwarg(key, value)
        if self.dialect == "postgresql" and self.pico_options:
            raise ConfigError(
                "pico_options (or a DSN ?options=) need dialect='picodata': a plain "
                "PostgreSQL server refuses Picodata's session options"
            )

    @property
    def startup_options(self) -> str | None:
        """The ``options`` startup parameter every connection sends, or ``None``."""
        if self.dialect != "picodata":
            return None
        merged = {**DEFAULT_PICO_OPTIONS, **self.pico_options}
        return ",".join(f"{key}={value}" for key, value in merged.items())

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
        dsn_options = dict(parsed.params).get("options")
        if dsn_options is not None:
            given = pico_options(options.get("pico_options") or {})
            options["pico_options"] = {**pico_options(dsn_options, "the DSN's options"), **given}
        fields = {a.name for a in attrs.fields(cls)} - {"dsn", "selector", "connect_kwargs"}
        own = {k: v for k, v in options.items() if k in fields}
        connect_kwargs = {k: v for k, v in options.items() if k not in fields}
        if "timeout" in connect_kwargs:
            timeout = connect_kwargs.pop("timeout")
            own.setdefault("connect_timeout", timeout)
        return cls(
            dsn=parsed,
            selector=Selector(tiers=_tiers(tiers), role=_role(role)),
            connect_kwargs=connect_kwargs,
            **own,
        )


def _check_connect_kwarg(key: str, value: object) -> None:
    """Refuse an ``asyncpg.connect`` keyword that is unknown, useless here, or ill-typed."""
    if key in _REFUSED_CONNECT_KWARGS:
        raise ConfigError(f"{key}= is not supported: {_REFUSED_CONNECT_KWARGS[key]}")
    check = _CONNECT_KWARGS.get(key)
    if check is None:
        options = sorted({a.name for a in attrs.fields(ClusterConfig)} - {"dsn", "selector"})
        raise ConfigError(
            f"unknown option {key}=: open_cluster takes {', '.join(options)}, tiers, role, "
            f"strategy, and the asyncpg.connect options {', '.join(sorted(_CONNECT_KWARGS))}"
        )
    problem = check(value)
    if problem:
        raise ConfigError(f"{key}= {problem}, got {value!r}")


def _check_ssl(value: object) -> str | None:
    if value is None or isinstance(value, bool) or value in _SSL_MODES:
        return None
    if type(value).__name__ == "SSLContext":
        return None
    return f"must be True, False, an ssl.SSLContext or one of {', '.join(sorted(_SSL_MODES))}"


def _check_settings(value: object) -> str | None:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and "\x00" not in k + v
        for k, v in value.items()
    ):
        return "must be a mapping of setting names to string values"
    picodata = sorted(k for k in value if k == "options" or k.startswith("pico_"))
    if picodata:
        return f"must not set {', '.join(picodata)}: pass Picodata session options as pico_options="
    return None


def _check_size(value: object) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return "must be an integer >= 0"
    return None


def _check_seconds_or_zero(value: object) -> str | None:
    try:
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        ):
            return None
    except OverflowError:
        pass
    return "must be a number of seconds >= 0"


def _check_bool(value: object) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def _check_class(value: object) -> str | None:
    return None if isinstance(value, type) else "must be a class (a subclass of asyncpg.Record)"


# The asyncpg.connect keywords the library passes on, each with its check.
_CONNECT_KWARGS = {
    "ssl": _check_ssl,
    "direct_tls": _check_bool,
    "server_settings": _check_settings,
    "statement_cache_size": _check_size,
    "max_cached_statement_lifetime": _check_seconds_or_zero,
    "max_cacheable_statement_size": _check_size,
    "record_class": _check_class,
}


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
