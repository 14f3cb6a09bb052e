"""The governor's catalog model and the SQL that writes it into a server.

Pure code: the model is plain Python, :meth:`CatalogModel.sync_sql` renders the
statements that replace a server's copy of the system tables. The cluster
harness decides when to write them.
"""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any, Final, Literal

import attrs

__all__ = [
    "ADMIN_USER",
    "CATALOG_TABLES",
    "CatalogModel",
    "NodeHandle",
    "StateName",
    "identity_sql",
    "setup_sql",
]

StateName = Literal["Offline", "Online", "Expelled"]
STATE_NAMES: Final = ("Offline", "Online", "Expelled")

ADMIN_USER: Final = "admin"
TIER: Final = "default"
PICODATA_VERSION: Final = "25.5.3"
BUCKET_COUNT: Final = 3000
IPROTO_BASE_PORT: Final = 3300

CATALOG_TABLES: Final = ("_pico_tier", "_pico_replicaset", "_pico_instance", "_pico_peer_address")

_SCHEMA: Final = """
CREATE TABLE public._pico_tier (
    name text PRIMARY KEY,
    replication_factor int8 NOT NULL,
    can_vote bool NOT NULL,
    bucket_count int8 NOT NULL,
    is_default bool NOT NULL
);
CREATE TABLE public._pico_replicaset (
    name text PRIMARY KEY,
    uuid text NOT NULL,
    current_master_name text NOT NULL,
    target_master_name text NOT NULL,
    tier text NOT NULL,
    weight float8 NOT NULL,
    state text NOT NULL
);
CREATE TABLE public._pico_instance (
    name text PRIMARY KEY,
    uuid text NOT NULL,
    raft_id int8 NOT NULL,
    replicaset_name text NOT NULL,
    replicaset_uuid text NOT NULL,
    current_state json NOT NULL,
    target_state json NOT NULL,
    failure_domain json NOT NULL,
    tier text NOT NULL,
    picodata_version text NOT NULL,
    sync_incarnation int8 NOT NULL,
    target_state_reason text,
    target_state_change_time timestamptz
);
CREATE TABLE public._pico_peer_address (
    raft_id int8 NOT NULL,
    address text NOT NULL,
    connection_type text NOT NULL,
    PRIMARY KEY (raft_id, connection_type)
);
CREATE TABLE public._picopyn_local_instance (
    name text NOT NULL,
    uuid text NOT NULL,
    raft_id int8 NOT NULL,
    leader_raft_id int8 NOT NULL
);
GRANT SELECT ON public._pico_tier, public._pico_replicaset, public._pico_instance,
    public._pico_peer_address, public._picopyn_local_instance TO PUBLIC;
CREATE FUNCTION public.pico_instance_uuid() RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT uuid FROM public._picopyn_local_instance $$;
CREATE FUNCTION public.instance_uuid() RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT uuid FROM public._picopyn_local_instance $$;
CREATE FUNCTION public.pico_raft_leader_id() RETURNS int8 LANGUAGE sql STABLE
    AS $$ SELECT leader_raft_id FROM public._picopyn_local_instance $$;
CREATE FUNCTION public.pico_raft_leader_uuid() RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT i.uuid FROM public._pico_instance i
          JOIN public._picopyn_local_instance l ON i.raft_id = l.leader_raft_id $$;
CREATE FUNCTION public.pico_instance_name(text) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT name FROM public._pico_instance WHERE uuid = $1 $$;
CREATE FUNCTION public.pico_tier_name(text) RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT tier FROM public._pico_instance WHERE uuid = $1 $$;
"""

_STRICT: Final = """
REVOKE SELECT ON pg_catalog.pg_type FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION pg_catalog.pg_advisory_unlock_all() FROM PUBLIC;
"""


def _literal(value: object) -> str:
    """An SQL literal for a value of the catalog."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, datetime.datetime):
        return f"{_literal(value.isoformat())}::timestamptz"
    text = str(value)
    if "\x00" in text:
        raise ValueError("a catalog value cannot hold a NUL character")
    return "'" + text.replace("'", "''") + "'"


def _state_json(state: tuple[str, int]) -> str:
    return json.dumps(list(state), separators=(",", ":"))


def setup_sql(*, password: str, strict: bool) -> str:
    """Statements that turn a fresh ``initdb`` database into a Picodata stand-in.

    Creates the login role (md5 password; a superuser unless *strict*), the
    system tables and the node-identity functions, and in strict mode revokes
    what asyncpg must not rely on. Run once per data directory as superuser.
    """
    role = f"CREATE ROLE {ADMIN_USER} LOGIN PASSWORD {_literal(password)}"
    role += " NOSUPERUSER;" if strict else " SUPERUSER;"
    return "\n".join(
        [
            "BEGIN;",
            "SET LOCAL password_encryption = 'md5';",
            role,
            f"GRANT ALL ON SCHEMA public TO {ADMIN_USER};",
            _SCHEMA,
            _STRICT if strict else "",
            "COMMIT;",
        ]
    )


def identity_sql(node: NodeHandle, *, leader_raft_id: int) -> str:
    """Statements that record which node a server impersonates."""
    values = ", ".join(_literal(v) for v in (node.name, node.uuid, node.raft_id, leader_raft_id))
    return (
        "BEGIN;\n"
        "DELETE FROM public._picopyn_local_instance;\n"
        f"INSERT INTO public._picopyn_local_instance VALUES ({values});\n"
        "COMMIT;\n"
    )


@attrs.frozen
class NodeHandle:
    """One node of a :class:`~picopyn_actors.testing.LocalCluster`.

    A value object: it never changes. The node's states live in the catalog
    (see :meth:`LocalCluster.catalog_rows`).
    """

    name: str
    """Instance name: ``i1``, ``i2``, ..."""
    uuid: str
    """Instance uuid, as ``pico_instance_uuid()`` answers on this node."""
    raft_id: int
    host: str
    port: int
    """The pgproto port clients connect to."""
    tier: str
    replicaset: str
    """Name of the node's replicaset: ``r1``, ``r2``, ..."""

    @property
    def address(self) -> str:
        """``host:port``, as ``_pico_peer_address`` lists it for ``pgproto``."""
        return f"{self.host}:{self.port}"


@attrs.define(eq=False)
class _Instance:
    node: NodeHandle
    replicaset_uuid: str
    current: tuple[str, int] = ("Offline", 0)
    target: tuple[str, int] = ("Offline", 0)
    target_reason: str | None = None
    target_change_time: datetime.datetime | None = None


@attrs.define(eq=False)
class _Replicaset:
    name: str
    uuid: str
    members: list[str]
    current_master: str
    target_master: str


def _now() -> datetime.datetime:
    # Microseconds are what timestamptz keeps, so the model equals what a server returns.
    return datetime.datetime.now(datetime.UTC)


@attrs.define(eq=False)
class CatalogModel:
    """The authoritative copy of Picodata's global system tables.

    The governor's moves (:meth:`set_target`, :meth:`apply_target`) follow
    Picodata's rules: the target state changes first, then the current state
    follows it; an Online target raises the incarnation; a replicaset whose
    master is not Online switches to a member that is.
    """

    replication_factor: int = attrs.field(validator=attrs.validators.ge(1))
    _instances: dict[str, _Instance] = attrs.field(init=False, factory=dict)
    _replicasets: dict[str, _Replicaset] = attrs.field(init=False, factory=dict)

    @property
    def leader_raft_id(self) -> int:
        """The raft leader: the first node."""
        return min(i.node.raft_id for i in self._instances.values())

    def names(self) -> list[str]:
        return list(self._instances)

    def nodes(self) -> list[NodeHandle]:
        return [i.node for i in self._instances.values()]

    def get(self, name: str) -> NodeHandle | None:
        instance = self._instances.get(name)
        return instance.node if instance is not None else None

    def states(self, name: str) -> tuple[tuple[str, int], tuple[str, int]]:
        """``(current, target)`` of one instance."""
        instance = self._instances[name]
        return instance.current, instance.target

    def add_instance(self, *, host: str, port: int, state: StateName = "Offline") -> NodeHandle:
        """Add the next instance (``i<n>``) with both states ``[state, 0 or 1]``.

        The instance joins the last replicaset if it has room, or a new one
        of which it becomes the master.
        """
        raft_id = len(self._instances) + 1
        name = f"i{raft_id}"
        replicaset = next(reversed(self._replicasets.values()), None)
        if replicaset is None or len(replicaset.members) >= self.replication_factor:
            rs_name = f"r{len(self._replicasets) + 1}"
            replicaset = _Replicaset(rs_name, str(uuid.uuid4()), [], name, name)
            self._replicasets[rs_name] = replicaset
        replicaset.members.append(name)
        node = NodeHandle(
            name=name,
            uuid=str(uuid.uuid4()),
            raft_id=raft_id,
            host=host,
            port=port,
            tier=TIER,
            replicaset=replicaset.name,
        )
        incarnation = 1 if state == "Online" else 0
        self._instances[name] = _Instance(
            node=node,
            replicaset_uuid=replicaset.uuid,
            current=(state, incarnation),
            target=(state, incarnation),
            target_reason="bootstrap" if state == "Online" else "join",
            target_change_time=_now(),
        )
        return node

    def set_target(self, name: str, state: StateName, reason: str) -> None:
        """Change the target state; an Online target raises the incarnation."""
        instance = self._instances[name]
        incarnation = instance.target[1] + (1 if state == "Online" else 0)
        instance.target = (state, incarnation)
        instance.target_reason = reason
        instance.target_change_time = _now()

    def apply_target(self, name: str) -> None:
        """Make the current state follow the target, then fix replicaset masters."""
        instance = self._instances[name]
        instance.current = instance.target
        rs = self._replicasets[instance.node.replicaset]
        if self._instances[rs.current_master].current[0] != "Online":
            online = [m for m in rs.members if self._instances[m].current[0] == "Online"]
            if online:
                rs.target_master = rs.current_master = online[0]

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """Every table's rows, valued as asyncpg returns them (json as ``str``)."""
        tier = {
            "name": TIER,
            "replication_factor": self.replication_factor,
            "can_vote": True,
            "bucket_count": BUCKET_COUNT,
            "is_default": True,
        }
        replicasets = [
            {
                "name": rs.name,
                "uuid": rs.uuid,
                "current_master_name": rs.current_master,
                "target_master_name": rs.target_master,
                "tier": TIER,
                "weight": 1.0,
                "state": (
                    "expelled"
                    if all(self._instances[m].current[0] == "Expelled" for m in rs.members)
                    else "ready"
                ),
            }
            for rs in self._replicasets.values()
        ]
        instances = [
            {
                "name": i.node.name,
                "uuid": i.node.uuid,
                "raft_id": i.node.raft_id,
                "replicaset_name": i.node.replicaset,
                "replicaset_uuid": i.replicaset_uuid,
                "current_state": _state_json(i.current),
                "target_state": _state_json(i.target),
                "failure_domain": "{}",
                "tier": i.node.tier,
                "picodata_version": PICODATA_VERSION,
                "sync_incarnation": i.current[1],
                "target_state_reason": i.target_reason,
                "target_state_change_time": i.target_change_time,
            }
            for i in self._instances.values()
        ]
        addresses = []
        for i in self._instances.values():
            iproto = f"{i.node.host}:{IPROTO_BASE_PORT + i.node.raft_id}"
            addresses.append(
                {"raft_id": i.node.raft_id, "address": iproto, "connection_type": "iproto"}
            )
            addresses.append(
                {"raft_id": i.node.raft_id, "address": i.node.address, "connection_type": "pgproto"}
            )
        return {
            "_pico_tier": [tier],
            "_pico_replicaset": replicasets,
            "_pico_instance": instances,
            "_pico_peer_address": addresses,
        }

    def sync_sql(self) -> str:
        """One transaction that replaces a server's system tables with the model.

        Rows are deleted and inserted (not truncated), so concurrent readers
        keep seeing the previous catalog until the commit.
        """
        statements = ["BEGIN;"]
        for table, rows in self.rows().items():
            statements.append(f"DELETE FROM public.{table};")
            if rows:
                columns = ", ".join(rows[0])
                values = ",\n  ".join(
                    "(" + ", ".join(_literal(v) for v in row.values()) + ")" for row in rows
                )
                statements.append(f"INSERT INTO public.{table} ({columns}) VALUES\n  {values};")
        statements.append("COMMIT;")
        return "\n".join(statements) + "\n"
