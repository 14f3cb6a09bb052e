"""The exception hierarchy of picopyn_actors.

Every error the library raises on purpose derives from :class:`PicodataError`::

    PicodataError
     ├── ConfigError        bad input, raised at construction
     ├── NoNodesAvailable   no node can take the request; lists each node's last error
     ├── AcquireTimeout     nodes exist but none had a free connection in time
     ├── QueryError         the server rejected the SQL (never retried)
     ├── OutcomeUnknown     the node died after the request was sent
     ├── StrategyError      the balance strategy raised or returned a stranger
     └── ClusterClosed      the cluster was closed before the request finished

Example::

    try:
        await cluster.execute("INSERT INTO t VALUES ($1)", 1)
    except pa.OutcomeUnknown as exc:
        log.warning("write to %s may or may not have happened", exc.node)
"""

from __future__ import annotations

from collections.abc import Mapping


class PicodataError(Exception):
    """Base class of every error raised by picopyn_actors."""


class ConfigError(PicodataError, ValueError):
    """Invalid configuration: a bad DSN, an option value out of range, an unknown tier.

    Raised when the configuration is built, before any connection is opened,
    except for an unknown tier name, which can only be known after the first
    discovery and is raised from :func:`open_cluster`.
    """


class ArgumentError(ConfigError, TypeError):
    """A bad argument of one call (``timeout=``, ``idempotent=``): a
    :class:`ConfigError` naming it, and a ``TypeError`` too. Nothing is sent."""


class NoNodesAvailable(PicodataError):
    """No node of the cluster can take the request right now.

    Attributes:
        node_errors: for each known node name, the last error seen on it
            (an empty mapping when discovery has found no usable node at all).
    """

    def __init__(self, message: str, node_errors: Mapping[str, str] | None = None) -> None:
        self.node_errors: dict[str, str] = dict(node_errors or {})
        if self.node_errors:
            details = "; ".join(f"{name}: {err}" for name, err in sorted(self.node_errors.items()))
            message = f"{message} ({details})"
        super().__init__(message)


class AcquireTimeout(PicodataError, TimeoutError):
    """Nodes are up, but none had a free connection within ``acquire_timeout``.

    Raise ``connections_per_node`` or ``acquire_timeout``, or lower the concurrency.
    """


class QueryError(PicodataError):
    """The server (or the client, before sending) rejected the query.

    Such an error is never retried, and the connection stays usable.
    The original asyncpg exception, if any, is chained as ``__cause__``.

    Attributes:
        sqlstate: the SQLSTATE code, or ``None`` for a client-side error
            (wrong argument count or type, query text that cannot be sent).
        message: the error's message.
        node: the name of the node that answered, or ``None`` when the
            query was refused before it was sent.
    """

    def __init__(self, message: str, *, sqlstate: str | None, node: str | None) -> None:
        self.sqlstate = sqlstate
        self.message = message
        self.node = node
        code = f" [{sqlstate}]" if sqlstate else ""
        where = f" (node {node})" if node is not None else " (not sent)"
        super().__init__(f"{message}{code}{where}")


class OutcomeUnknown(PicodataError):
    """The connection to ``node`` broke after the request was sent.

    The server may or may not have executed it. Requests marked
    ``idempotent=True`` are retried on another node instead of raising this.

    Attributes:
        node: the name of the node the request was sent to.
    """

    def __init__(self, message: str, *, node: str) -> None:
        self.node = node
        super().__init__(message)


class StrategyError(PicodataError):
    """The balance strategy raised, or returned something it was not offered."""


class ClusterClosed(PicodataError):
    """The cluster is closed (or closing); the request was not completed."""
