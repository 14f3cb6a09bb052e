"""What a node's pgproto front counted (see :meth:`LocalCluster.front_statistics`)."""

from __future__ import annotations

import os

import attrs

from ._front import read_stats

__all__ = ["FrontStatistics"]


@attrs.frozen
class FrontStatistics:
    """A snapshot of one node's front counters.

    Counters are cumulative over the node's life (restarts included); the
    last two are gauges, reset when the node restarts.
    """

    logins: int
    """Logins that succeeded."""
    logins_refused: int
    """Logins that failed: bad startup options, a bad startup packet, or a wrong password."""
    cancel_requests_ignored: int
    """CancelRequests received; each only closed its socket."""
    invalidations: int
    """Binds answered with 42999 (statement invalidated by a schema change)."""
    rejected_statements: int
    """Statements refused as Picodata refuses them: COPY, LISTEN, NOTIFY, UNLISTEN,
    FunctionCall, several statements in one query string."""
    malformed_messages: int
    """Messages answered with 08P01 (protocol violation); the session stayed open."""
    statements_refused: int
    """Parses refused with "Statement storage is full"."""
    schema_changes: int
    """How often the server's schema version moved, through the front or by the harness.

    One DDL statement may move it more than once (its completion and the
    server's event trigger; before and after a harness script): it only
    ever grows, which is all that invalidation needs."""
    statements_in_use: int
    """Named statements that the node's clients hold now (against ``pg_statement_max``)."""
    sessions: int
    """Client sessions logged in now."""

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> FrontStatistics:
        """The snapshot in a front's statistics file."""
        values = read_stats(path)
        return cls(
            logins=values["logins"],
            logins_refused=values["logins_refused"],
            cancel_requests_ignored=values["cancel_requests_ignored"],
            invalidations=values["invalidations"],
            rejected_statements=values["rejected_statements"],
            malformed_messages=values["malformed_messages"],
            statements_refused=values["statements_refused"],
            schema_changes=values["harness_ddl"] + values["front_ddl"],
            statements_in_use=values["statements_in_use"],
            sessions=values["sessions"],
        )
