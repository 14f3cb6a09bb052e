"""The governor's catalog model and the SQL that writes it into a server.

Pure code: the model is plain Python, :meth:`CatalogModel.sync_sql` renders the
statements that replace a server's copy of the system tables. The cluster
harness decides when to write them.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from typing import Any, Final, Literal

import attrs

from .._bucket import canonical_type

__all__ = [
    "ADMIN_USER",
    "CATALOG_TABLES",
    "COLUMN_TYPES",
    "REBALANCE_IN_PROGRESS",
    "CatalogModel",
    "NodeHandle",
    "StateName",
    "answer_uuid_sql",
    "hold_sql",
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
TABLE_ID_BASE: Final = 1024
"""User tables get ids from here on (Picodata's system tables are below 1024)."""
ADMIN_ID: Final = 1
"""Picodata's ``admin`` user id, the owner of tables made by the harness."""
REBALANCE_IN_PROGRESS: Final = "Bucket {bucket_id} cannot be found. Is rebalancing in progress?"
"""vshard's NO_ROUTE_TO_BUCKET message, which ``_pico_bucket`` passes on while buckets move."""

COLUMN_TYPES: Final = {
    "integer": "int8",
    "unsigned": "int8",
    "string": "text",
    "double": "float8",
    "boolean": "bool",
    "decimal": "numeric",
    "uuid": "uuid",
    "datetime": "timestamptz",
}
"""Picodata field types a stand-in sharded table can have, and the PostgreSQL type of each."""
_SYNC_TAG: Final = "$picopyn_sync$"
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

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
CREATE TABLE public._pico_table (
    id int8 PRIMARY KEY,
    name text NOT NULL UNIQUE,
    distribution json NOT NULL,
    format json NOT NULL,
    schema_version int8 NOT NULL,
    operable bool NOT NULL,
    engine text NOT NULL,
    owner int8 NOT NULL,
    description text NOT NULL
);
CREATE TABLE public._picopyn_local_instance (
    name text NOT NULL,
    uuid text NOT NULL,
    raft_id int8 NOT NULL,
    leader_raft_id int8 NOT NULL
);
CREATE TABLE public._picopyn_bucket (
    tier_name text NOT NULL,
    bucket_id_start int8 NOT NULL,
    bucket_id_end int8 NOT NULL,
    replicaset_uuid text NOT NULL,
    PRIMARY KEY (tier_name, bucket_id_start)
);
CREATE TABLE public._picopyn_bucket_fault (message text NOT NULL);
CREATE TABLE public._picopyn_catalog_hold (since timestamptz NOT NULL DEFAULT now());
GRANT SELECT ON public._pico_tier, public._pico_replicaset, public._pico_instance,
    public._pico_peer_address, public._pico_table, public._picopyn_local_instance,
    public._picopyn_bucket, public._picopyn_bucket_fault TO PUBLIC;
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
CREATE FUNCTION public._pico_bucket(tier text) RETURNS json LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    fault text;
    ranges json;
BEGIN
    IF tier IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'XX000', MESSAGE = '_pico_bucket: tier name is null';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM public._pico_tier t WHERE t.name = tier) THEN
        RAISE EXCEPTION USING ERRCODE = 'XX000',
            MESSAGE = '_pico_bucket: tier ''' || tier || ''' doesn''t exist';
    END IF;
    SELECT f.message INTO fault FROM public._picopyn_bucket_fault f LIMIT 1;
    IF fault IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'XX000', MESSAGE = '_pico_bucket: ' || fault;
    END IF;
    SELECT coalesce(json_agg(json_build_object(
               'bucket_id_start', b.bucket_id_start,
               'bucket_id_end', b.bucket_id_end,
               'current_replicaset_uuid', b.replicaset_uuid,
               'target_replicaset_uuid', b.replicaset_uuid,
               'tier_name', b.tier_name,
               'state', 'active') ORDER BY b.bucket_id_start), '[]'::json)
        INTO ranges FROM public._picopyn_bucket b WHERE b.tier_name = tier;
    RETURN ranges;
END $$;
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


def answer_uuid_sql(uuid_text: str) -> str:
    """Make a server answer ``pico_instance_uuid()`` with *uuid_text* (its catalog row stays)."""
    return f"UPDATE public._picopyn_local_instance SET uuid = {_literal(uuid_text)};\n"


def hold_sql(held: bool) -> str:
    """Hold (or release) a server's catalog: :meth:`CatalogModel.sync_sql` skips a held one."""
    if held:
        return (
            "INSERT INTO public._picopyn_catalog_hold "
            "SELECT WHERE NOT EXISTS (SELECT 1 FROM public._picopyn_catalog_hold);\n"
        )
    return "DELETE FROM public._picopyn_catalog_hold;\n"


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@attrs.frozen
class _Column:
    name: str
    field_type: str
    """A Picodata field type, a key of :data:`COLUMN_TYPES`."""


@attrs.frozen
class _Table:
    id: int
    name: str
    columns: tuple[_Column, ...]
    key: tuple[str, ...]
    tier: str
    schema_version: int

    def format(self) -> list[dict[str, Any]]:
        """``_pico_table.format``: the columns, with ``bucket_id`` after the primary key."""
        fields: list[dict[str, Any]] = [
            {"name": c.name, "field_type": c.field_type, "is_nullable": c.name not in self.key}
            for c in self.columns
        ]
        last_key_column = max(i for i, c in enumerate(self.columns) if c.name in self.key)
        bucket = {"name": "bucket_id", "field_type": "unsigned", "is_nullable": False}
        fields.insert(last_key_column + 1, bucket)
        return fields

    def distribution(self) -> dict[str, Any]:
        return {"ShardedImplicitly": [list(self.key), "murmur3", self.tier]}

    def create_sql(self, *, if_not_exists: bool) -> str:
        """The stand-in's table: the columns, a nullable ``bucket_id``, the key as primary key.

        The stand-in does not compute ``bucket_id``; Picodata does.
        """
        columns = [
            f"{_quote_ident(c.name)} {COLUMN_TYPES[c.field_type]}"
            + (" NOT NULL" if c.name in self.key else "")
            for c in self.columns
        ]
        columns.append("bucket_id int8")
        columns.append("PRIMARY KEY (" + ", ".join(_quote_ident(k) for k in self.key) + ")")
        table = f"public.{_quote_ident(self.name)}"
        create = (
            f"CREATE TABLE {table} ({', '.join(columns)});\n"
            f"ALTER TABLE {table} OWNER TO {ADMIN_USER};"
        )
        if not if_not_exists:
            return create + "\n"
        # Inside the sync's DO block: only a server that lacks the table gets it,
        # so tables that exist are never locked by a sync.
        return f"IF to_regclass({_literal(table)}) IS NULL THEN\n{create}\nEND IF;"


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
    master is not Online switches to a member that is. A master switch
    likewise moves the target master first (:meth:`set_target_master`).

    It also keeps the sharded tables (``_pico_table``) and the bucket map of
    the one tier: buckets are spread evenly over the first replicasets, and
    move only when asked (:meth:`move_buckets`, :meth:`rebalance`).
    """

    replication_factor: int = attrs.field(validator=attrs.validators.ge(1))
    bucket_count: int = attrs.field(default=BUCKET_COUNT, validator=attrs.validators.ge(1))
    _instances: dict[str, _Instance] = attrs.field(init=False, factory=dict)
    _replicasets: dict[str, _Replicaset] = attrs.field(init=False, factory=dict)
    _tables: dict[str, _Table] = attrs.field(init=False, factory=dict)
    _schema_version: int = attrs.field(init=False, default=0)
    _bucket_owner: list[str] = attrs.field(init=False, factory=list)
    """Replicaset name owning each bucket (index 0 is bucket 1); empty until first needed."""
    bucket_fault: str | None = attrs.field(init=False, default=None)
    """When set, ``_pico_bucket`` fails on every server with this message."""

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

    # -------------------------------------------------------------- masters

    def replicaset_names(self) -> list[str]:
        return list(self._replicasets)

    def replicaset_of(self, name: str) -> tuple[str, list[str]]:
        """``(uuid, member names)`` of replicaset *name* (KeyError if unknown)."""
        rs = self._replicasets[name]
        return rs.uuid, list(rs.members)

    def masters(self, replicaset: str) -> tuple[str, str]:
        """``(current_master_name, target_master_name)`` of a replicaset."""
        rs = self._replicasets[replicaset]
        return rs.current_master, rs.target_master

    def set_target_master(self, replicaset: str, name: str) -> None:
        """The governor's first step of a master switch: the target master changes."""
        rs = self._replicasets[replicaset]
        if name not in rs.members:
            raise ValueError(f"{name} is not a member of replicaset {replicaset}")
        rs.target_master = name

    def apply_target_master(self, replicaset: str) -> None:
        """The switch completes: the current master becomes the target."""
        rs = self._replicasets[replicaset]
        rs.current_master = rs.target_master

    # -------------------------------------------------------------- sharded tables

    def add_table(
        self, name: str, columns: list[tuple[str, str]], key: list[str], tier: str
    ) -> dict[str, Any]:
        """Record a sharded table; return its ``_pico_table`` row.

        *columns* are ``(name, type)`` pairs in order, each type a Picodata
        type or alias (``int``, ``text`` ...); *key* names the sharding key
        columns, which also make the primary key.

        Raises:
            ValueError: a bad name, type or key, a table that exists, or a
                tier the stand-in does not have.
        """
        if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"table name must be a plain SQL identifier, got {name!r}")
        if name.startswith("_pico"):
            raise ValueError(f"table name {name!r} is reserved for system tables")
        if tier != TIER:
            raise ValueError(f"the stand-in has one tier, {TIER!r}; got {tier!r}")
        if name in self._tables:
            raise ValueError(f"table {name!r} already exists")
        if not columns:
            raise ValueError(f"table {name!r} needs at least one column")
        typed: list[_Column] = []
        for column, type_name in columns:
            if not isinstance(column, str) or not _IDENTIFIER.fullmatch(column):
                raise ValueError(f"column name must be a plain SQL identifier, got {column!r}")
            if column == "bucket_id":
                raise ValueError("bucket_id is reserved: every sharded table gets it")
            field_type = canonical_type(type_name)
            if field_type not in COLUMN_TYPES:
                raise ValueError(
                    f"column {column!r}: type {type_name!r} cannot be a stand-in column; "
                    f"use one of {', '.join(COLUMN_TYPES)}"
                )
            typed.append(_Column(column, field_type))
        names = [c.name for c in typed]
        if len(set(names)) != len(names):
            raise ValueError(f"table {name!r} has a duplicate column name")
        if isinstance(key, str) or not key or len(set(key)) != len(key):
            raise ValueError(f"key must be a non-empty list of distinct column names, got {key!r}")
        missing = [k for k in key if k not in names]
        if missing:
            raise ValueError(f"key column(s) {', '.join(map(repr, missing))} not among the columns")
        self._schema_version += 1
        table = _Table(
            id=TABLE_ID_BASE + self._schema_version,
            name=name,
            columns=tuple(typed),
            key=tuple(key),
            tier=tier,
            schema_version=self._schema_version,
        )
        self._tables[name] = table
        return self._table_row(table)

    def forget_table(self, name: str) -> None:
        """Undo :meth:`add_table` (when the servers refused the table)."""
        self._tables.pop(name, None)

    def create_table_sql(self, name: str) -> str:
        """``CREATE TABLE`` for one recorded table (fails if it exists)."""
        return self._tables[name].create_sql(if_not_exists=False)

    @staticmethod
    def _table_row(table: _Table) -> dict[str, Any]:
        return {
            "id": table.id,
            "name": table.name,
            "distribution": json.dumps(table.distribution(), separators=(",", ":")),
            "format": json.dumps(table.format(), separators=(",", ":")),
            "schema_version": table.schema_version,
            "operable": True,
            "engine": "memtx",
            "owner": ADMIN_ID,
            "description": "",
        }

    def table_rows(self) -> list[dict[str, Any]]:
        """``_pico_table`` rows, valued as asyncpg returns them (json as ``str``)."""
        return [self._table_row(t) for t in self._tables.values()]

    # -------------------------------------------------------------- buckets

    def _live_replicasets(self) -> list[str]:
        return [
            rs.name
            for rs in self._replicasets.values()
            if any(self._instances[m].target[0] != "Expelled" for m in rs.members)
        ]

    def _spread(self, replicasets: list[str]) -> list[str]:
        if not replicasets:
            raise ValueError("no replicaset can own buckets: every one is expelled")
        n = len(replicasets)
        return [replicasets[i * n // self.bucket_count] for i in range(self.bucket_count)]

    def _owners(self) -> list[str]:
        if not self._bucket_owner and self._replicasets:
            self._bucket_owner = self._spread(self._live_replicasets())
        return self._bucket_owner

    def rebalance(self) -> None:
        """Spread the buckets evenly, in contiguous ranges, over the live replicasets."""
        self._bucket_owner = self._spread(self._live_replicasets())

    def move_buckets(self, start: int, end: int, replicaset: str) -> None:
        """Give buckets ``start..end`` (inclusive) to *replicaset*."""
        if replicaset not in self._replicasets:
            raise KeyError(replicaset)
        if not 1 <= start <= end <= self.bucket_count:
            raise ValueError(f"bucket range {start}..{end} is not within 1..{self.bucket_count}")
        owners = self._owners()
        owners[start - 1 : end] = [replicaset] * (end - start + 1)

    def owner_of(self, bucket_id: int) -> str:
        """The replicaset that owns *bucket_id*."""
        if not 1 <= bucket_id <= self.bucket_count:
            raise ValueError(f"bucket {bucket_id} is not within 1..{self.bucket_count}")
        return self._owners()[bucket_id - 1]

    def bucket_ranges(self) -> list[tuple[int, int, str]]:
        """``(start, end, replicaset name)``: the map in contiguous ranges, by start."""
        ranges: list[tuple[int, int, str]] = []
        for index, owner in enumerate(self._owners()):
            if ranges and ranges[-1][2] == owner:
                ranges[-1] = (ranges[-1][0], index + 1, owner)
            else:
                ranges.append((index + 1, index + 1, owner))
        return ranges

    def bucket_json(self) -> list[dict[str, Any]]:
        """What ``SELECT _pico_bucket('default')`` answers, decoded."""
        return [
            {
                "bucket_id_start": start,
                "bucket_id_end": end,
                "current_replicaset_uuid": self._replicasets[owner].uuid,
                "target_replicaset_uuid": self._replicasets[owner].uuid,
                "tier_name": TIER,
                "state": "active",
            }
            for start, end, owner in self.bucket_ranges()
        ]

    def set_rebalance_in_progress(self, on: bool) -> None:
        """Make ``_pico_bucket`` fail as vshard does while buckets move (or stop it)."""
        self.bucket_fault = REBALANCE_IN_PROGRESS.format(bucket_id=1) if on else None

    # -------------------------------------------------------------- per-server statements

    @staticmethod
    def check_identifier(name: object, what: str) -> None:
        """Raise ValueError unless *name* is a plain SQL identifier."""
        if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"{what} must be a plain SQL identifier, got {name!r}")

    def hold_statement(self, held: bool) -> str:
        """See :func:`hold_sql`."""
        return hold_sql(held)

    def answer_uuid_statement(self, uuid_text: str) -> str:
        """See :func:`answer_uuid_sql`."""
        return answer_uuid_sql(uuid_text)

    # -------------------------------------------------------------- rendering

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """The topology tables' rows, valued as asyncpg returns them (json as ``str``).

        ``_pico_table`` is in :meth:`table_rows`, the bucket map in
        :meth:`bucket_json`.
        """
        tier = {
            "name": TIER,
            "replication_factor": self.replication_factor,
            "can_vote": True,
            "bucket_count": self.bucket_count,
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
        """One transaction that replaces a server's global tables with the model.

        It first creates any sharded table the server lacks, then, unless the
        server's catalog is held (:func:`hold_sql`), rewrites the topology
        tables, ``_pico_table``, the bucket map and the ``_pico_bucket``
        fault. Rows are deleted and inserted (not truncated), so concurrent
        readers keep seeing the previous catalog until the commit.
        """
        tables: dict[str, list[dict[str, Any]]] = dict(self.rows())
        tables["_pico_table"] = self.table_rows()
        tables["_picopyn_bucket"] = [
            {
                "tier_name": TIER,
                "bucket_id_start": start,
                "bucket_id_end": end,
                "replicaset_uuid": self._replicasets[owner].uuid,
            }
            for start, end, owner in self.bucket_ranges()
        ]
        tables["_picopyn_bucket_fault"] = (
            [{"message": self.bucket_fault}] if self.bucket_fault is not None else []
        )
        body = [t.create_sql(if_not_exists=True) for t in self._tables.values()]
        body.append("IF EXISTS (SELECT 1 FROM public._picopyn_catalog_hold) THEN RETURN; END IF;")
        for table, rows in tables.items():
            body.append(f"DELETE FROM public.{table};")
            if rows:
                columns = ", ".join(rows[0])
                values = ",\n  ".join(
                    "(" + ", ".join(_literal(v) for v in row.values()) + ")" for row in rows
                )
                body.append(f"INSERT INTO public.{table} ({columns}) VALUES\n  {values};")
        text = "\n".join(body)
        if _SYNC_TAG in text:
            raise ValueError(f"a catalog value holds the quoting tag {_SYNC_TAG}")
        return f"BEGIN;\nDO {_SYNC_TAG} BEGIN\n{text}\nEND {_SYNC_TAG};\nCOMMIT;\n"
