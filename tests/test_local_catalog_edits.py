"""The stand-in's routing data and per-node catalog edits, seen through raw asyncpg.

Sharded tables in ``_pico_table``, ``_pico_bucket()`` over replicasets with
masters and replicas, bucket moves, master switches, a failing bucket map,
and the supported ways to bend one node's catalog (issue 17's cases).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from raw import ORDERED_TABLES, query, run

from picopyn_actors._bucket import ShardingKey, sharding_key
from picopyn_actors.testing import LocalCluster, LocalClusterError, UnknownNodeError
from picopyn_actors.testing._catalog import CatalogModel

MakeCluster = Callable[..., LocalCluster]

BUCKETS = "SELECT _pico_bucket('default') AS b"
REPLICASETS = (
    "SELECT name, current_master_name, target_master_name FROM _pico_replicaset ORDER BY name"
)




def buckets_of(dsn: str) -> list[dict[str, Any]]:
    (row,) = query(dsn, BUCKETS)
    assert isinstance(row["b"], str)  # json arrives as text, as from Picodata
    decoded: list[dict[str, Any]] = json.loads(row["b"])
    return decoded


def spans_of(dsn: str) -> list[tuple[int, int, str]]:
    """``(start, end, current replicaset uuid)`` of each range ``_pico_bucket`` answers."""
    return [
        (b["bucket_id_start"], b["bucket_id_end"], b["current_replicaset_uuid"])
        for b in buckets_of(dsn)
    ]


def topology_of(dsn: str) -> dict[str, list[dict[str, Any]]]:
    return {table: query(dsn, sql) for table, sql in ORDERED_TABLES.items()}


def uuid_of_replicaset(lc: LocalCluster, name: str) -> str:
    rows = {r["name"]: r for r in lc.catalog_rows()["_pico_replicaset"]}
    uuid: str = rows[name]["uuid"]
    return uuid


def pico_bucket_error(dsn: str, sql: str) -> asyncpg.PostgresError:
    async def fail(conn: asyncpg.Connection) -> asyncpg.PostgresError:
        try:
            await conn.fetchval(sql)
        except asyncpg.PostgresError as exc:
            return exc
        raise AssertionError(f"{sql} did not fail")

    return run(fail, dsn)


# ---------------------------------------------------------------- sharded tables


def test_sharded_table_in_pico_table_and_on_every_node(make_cluster: MakeCluster) -> None:
    lc = make_cluster(nodes=4, replication_factor=2)
    columns = {"tenant": "text", "code": "int", "amount": "decimal", "note": "string"}
    lc.create_sharded_table("orders", columns, key=["tenant", "code"])

    (row,) = lc.table_rows()
    assert json.loads(row["distribution"]) == {
        "ShardedImplicitly": [["tenant", "code"], "murmur3", "default"]
    }
    assert json.loads(row["format"]) == [
        {"name": "tenant", "field_type": "string", "is_nullable": False},
        {"name": "code", "field_type": "integer", "is_nullable": False},
        {"name": "bucket_id", "field_type": "unsigned", "is_nullable": False},
        {"name": "amount", "field_type": "decimal", "is_nullable": True},
        {"name": "note", "field_type": "string", "is_nullable": True},
    ]
    assert (row["name"], row["operable"], row["engine"]) == ("orders", True, "memtx")

    async def wire_types(conn: asyncpg.Connection) -> list[tuple[str, str]]:
        stmt = await conn.prepare("SELECT * FROM _pico_table")
        return [(a.name, a.type.name) for a in stmt.get_attributes()]

    assert run(wire_types, lc.dsn) == [
        ("id", "int8"), ("name", "text"), ("distribution", "json"), ("format", "json"),
        ("schema_version", "int8"), ("operable", "bool"), ("engine", "text"),
        ("owner", "int8"), ("description", "text"),
    ]  # fmt: skip

    key = sharding_key(row["distribution"], row["format"], table="orders")
    assert key == ShardingKey(
        tier="default", columns=("tenant", "code"), types=("string", "integer"),
        nullable=(False, False), table="orders",
    )  # fmt: skip
    for node in lc.nodes:
        dsn = lc.dsn_for(node.name)
        assert query(dsn, "SELECT * FROM _pico_table") == lc.table_rows(), node.name
        # The login role (not a superuser: strict mode) owns the table and uses it.
        query(dsn, "INSERT INTO orders (tenant, code, amount) VALUES ($1, $2, $3)", node.name, 1, 2)
        rows = query(dsn, "SELECT tenant, code, bucket_id FROM orders")
        assert rows == [{"tenant": node.name, "code": 1, "bucket_id": None}]

    # A node that joins later gets the table and the row from the governor.
    new = lc.add_node()
    assert query(lc.dsn_for(new.name), "SELECT name FROM _pico_table") == [{"name": "orders"}]
    assert query(lc.dsn_for(new.name), "SELECT count(*) AS n FROM orders") == [{"n": 0}]


def test_bad_sharded_tables_are_refused(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    lc.create_sharded_table("t", {"id": "integer"}, key=["id"])
    with pytest.raises(ValueError, match="already exists"):
        lc.create_sharded_table("t", {"id": "integer"}, key=["id"])
    with pytest.raises(ValueError, match="unknown sharding key type 'blob'"):
        lc.create_sharded_table("t2", {"id": "blob"}, key=["id"])
    with pytest.raises(ValueError, match="cannot be a stand-in column"):
        lc.create_sharded_table("t2", {"id": "scalar"}, key=["id"])
    with pytest.raises(ValueError, match="'nope' not among the columns"):
        lc.create_sharded_table("t2", {"id": "integer"}, key=["nope"])
    with pytest.raises(ValueError, match="non-empty list"):
        lc.create_sharded_table("t2", {"id": "integer"}, key="id")
    with pytest.raises(ValueError, match="one tier, 'default'"):
        lc.create_sharded_table("t2", {"id": "integer"}, key=["id"], tier="hot")
    with pytest.raises(ValueError, match="bucket_id is reserved"):
        lc.create_sharded_table("t2", {"bucket_id": "integer"}, key=["bucket_id"])
    with pytest.raises(ValueError, match="plain SQL identifier"):
        lc.create_sharded_table("t; DROP", {"id": "integer"}, key=["id"])
    with pytest.raises(ValueError, match="reserved for system tables"):
        lc.create_sharded_table("_pico_x", {"id": "integer"}, key=["id"])
    # A table the servers already have is refused by them, and forgotten.
    lc.execute_everywhere("CREATE TABLE public.taken (id int)")
    with pytest.raises(LocalClusterError, match="already exists"):
        lc.create_sharded_table("taken", {"id": "integer"}, key=["id"])
    assert [r["name"] for r in lc.table_rows()] == ["t"]
    assert query(lc.dsn, "SELECT name FROM _pico_table") == [{"name": "t"}]


# ---------------------------------------------------------------- _pico_bucket


def test_pico_bucket_maps_every_bucket_on_masters_and_replicas(make_cluster: MakeCluster) -> None:
    lc = make_cluster(nodes=4, replication_factor=2)
    assert lc.bucket_count == 3000
    r1, r2 = uuid_of_replicaset(lc, "r1"), uuid_of_replicaset(lc, "r2")
    expected = [
        {"bucket_id_start": 1, "bucket_id_end": 1500, "current_replicaset_uuid": r1,
         "target_replicaset_uuid": r1, "tier_name": "default", "state": "active"},
        {"bucket_id_start": 1501, "bucket_id_end": 3000, "current_replicaset_uuid": r2,
         "target_replicaset_uuid": r2, "tier_name": "default", "state": "active"},
    ]  # fmt: skip
    assert lc.bucket_ranges() == expected
    for node in lc.nodes:  # i1 and i3 are masters, i2 and i4 replicas
        assert buckets_of(lc.dsn_for(node.name)) == expected, node.name
    assert (lc.bucket_replicaset(1), lc.bucket_replicaset(1500)) == ("r1", "r1")
    assert (lc.bucket_replicaset(1501), lc.bucket_replicaset(3000)) == ("r2", "r2")

    async def column_type(conn: asyncpg.Connection) -> str:
        stmt = await conn.prepare(BUCKETS)
        name: str = stmt.get_attributes()[0].type.name
        return name

    assert run(column_type, lc.dsn) == "json"

    # Picodata's messages (test/pgproto/_pico_bucket_function_test.py).
    error = pico_bucket_error(lc.dsn, "SELECT _pico_bucket(NULL)")
    assert (error.sqlstate, str(error)) == ("XX000", "_pico_bucket: tier name is null")
    error = pico_bucket_error(lc.dsn, "SELECT _pico_bucket('no_such_tier')")
    assert str(error) == "_pico_bucket: tier 'no_such_tier' doesn't exist"


def test_move_buckets_and_rebalance_reach_every_node(make_cluster: MakeCluster) -> None:
    lc = make_cluster(nodes=4, replication_factor=2)
    r1, r2 = uuid_of_replicaset(lc, "r1"), uuid_of_replicaset(lc, "r2")
    lc.move_buckets(1, 10, "r2")
    lc.move_buckets(3000, 3000, "r1")
    spans = [(1, 10, r2), (11, 1500, r1), (1501, 2999, r2), (3000, 3000, r1)]
    for node in lc.nodes:
        got = spans_of(lc.dsn_for(node.name))
        assert got == spans, node.name
    assert (lc.bucket_replicaset(10), lc.bucket_replicaset(11)) == ("r2", "r1")

    # A new replicaset owns nothing until a rebalance spreads the buckets over it.
    lc.add_node()  # i5 starts r3
    assert {b["current_replicaset_uuid"] for b in buckets_of(lc.dsn)} == {r1, r2}
    lc.rebalance()
    r3 = uuid_of_replicaset(lc, "r3")
    for node in lc.nodes:
        got = spans_of(lc.dsn_for(node.name))
        assert got == [(1, 1000, r1), (1001, 2000, r2), (2001, 3000, r3)], node.name

    with pytest.raises(ValueError, match=r"not within 1\.\.3000"):
        lc.move_buckets(0, 5, "r1")
    with pytest.raises(ValueError, match=r"not within 1\.\.3000"):
        lc.move_buckets(10, 3001, "r1")
    with pytest.raises(LocalClusterError, match=r"unknown replicaset 'r9'.*r1, r2, r3"):
        lc.move_buckets(1, 5, "r9")


def test_rebalance_in_progress_makes_pico_bucket_fail_everywhere(
    make_cluster: MakeCluster,
) -> None:
    lc = make_cluster(nodes=2, replication_factor=2)
    before = lc.bucket_ranges()
    lc.set_rebalance_in_progress()
    for node in lc.nodes:
        error = pico_bucket_error(lc.dsn_for(node.name), BUCKETS)
        assert error.sqlstate == "XX000"
        assert str(error) == "_pico_bucket: Bucket 1 cannot be found. Is rebalancing in progress?"
        # The rest of the catalog reads as usual.
        assert len(query(lc.dsn_for(node.name), "SELECT name FROM _pico_instance")) == 2
    lc.set_rebalance_in_progress(False)
    for node in lc.nodes:
        assert buckets_of(lc.dsn_for(node.name)) == before


# ---------------------------------------------------------------- masters


def test_set_master_moves_target_then_current_on_every_node(make_cluster: MakeCluster) -> None:
    lc = make_cluster(nodes=4, replication_factor=2)
    lc.set_master("r1", "i2")
    expected = [
        {"name": "r1", "current_master_name": "i2", "target_master_name": "i2"},
        {"name": "r2", "current_master_name": "i3", "target_master_name": "i3"},
    ]
    for node in lc.nodes:
        assert query(lc.dsn_for(node.name), REPLICASETS) == expected, node.name
    # A later node change keeps the chosen master while it is Online.
    lc.set_state("i4", "Offline")
    assert query(lc.dsn_for("i1"), REPLICASETS) == expected

    with pytest.raises(LocalClusterError, match=r"i3 is not a member of replicaset r1 \(i1, i2\)"):
        lc.set_master("r1", "i3")
    with pytest.raises(LocalClusterError, match="i4 is not Online"):
        lc.set_master("r2", "i4")
    with pytest.raises(LocalClusterError, match="unknown replicaset 'r7'"):
        lc.set_master("r7", "i1")
    with pytest.raises(UnknownNodeError):
        lc.set_master("r1", "i9")


# ---------------------------------------------------------------- per-node edits


def test_execute_on_edits_one_node_until_the_next_governor_change(
    local_cluster: LocalCluster,
) -> None:
    lc = local_cluster
    lc.execute_on("i2", "DELETE FROM _pico_instance")
    assert query(lc.dsn_for("i2"), "SELECT name FROM _pico_instance") == []
    for name in ("i1", "i3"):
        assert topology_of(lc.dsn_for(name)) == lc.catalog_rows(), name
    # Any governor change rewrites every live node's catalog, i2's included.
    lc.set_state("i3", "Offline")
    for node in lc.nodes:
        assert topology_of(lc.dsn_for(node.name)) == lc.catalog_rows(), node.name

    with pytest.raises(LocalClusterError, match=r"node i2: .*no_such_table"):
        lc.execute_on("i2", "SELECT * FROM no_such_table")
    lc.pause("i3")
    with pytest.raises(LocalClusterError, match="i3: it is paused"):
        lc.execute_on("i3", "SELECT 1")
    lc.resume("i3")
    lc.kill("i3")
    with pytest.raises(LocalClusterError, match="i3: it is not running"):
        lc.execute_on("i3", "SELECT 1")


def test_a_held_catalog_keeps_its_edit_until_released(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    lc.hold_catalog("i2")
    lc.execute_on("i2", "DELETE FROM _pico_instance WHERE name <> 'i2'")  # a stale view
    lc.set_state("i3", "Offline")
    lc.create_sharded_table("t", {"id": "integer"}, key=["id"])
    stale = query(lc.dsn_for("i2"), "SELECT name, current_state FROM _pico_instance")
    assert stale == [{"name": "i2", "current_state": '["Online",1]'}]
    # Held means no catalog writes; sharded tables are still created.
    assert query(lc.dsn_for("i2"), "SELECT * FROM _pico_table") == []
    assert query(lc.dsn_for("i2"), "SELECT count(*) AS n FROM t") == [{"n": 0}]
    for name in ("i1", "i3"):
        assert topology_of(lc.dsn_for(name)) == lc.catalog_rows(), name

    lc.release_catalog("i2")
    assert topology_of(lc.dsn_for("i2")) == lc.catalog_rows()
    assert query(lc.dsn_for("i2"), "SELECT * FROM _pico_table") == lc.table_rows()
    assert buckets_of(lc.dsn_for("i2")) == lc.bucket_ranges()


def test_set_identity_makes_a_server_answer_a_stranger_uuid(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    stranger = "6f2a5c3e-0000-4000-8000-000000000017"
    own = lc.node("i2").uuid
    lc.set_identity("i2", stranger)
    ask = "SELECT pico_instance_uuid() AS new, instance_uuid() AS old"
    assert query(lc.dsn_for("i2"), ask) == [{"new": stranger, "old": stranger}]
    assert query(lc.dsn_for("i1"), ask) == [{"new": lc.node("i1").uuid, "old": lc.node("i1").uuid}]
    # The catalog still gives i2 its own uuid, on i2 as everywhere.
    row = query(lc.dsn_for("i2"), "SELECT uuid FROM _pico_instance WHERE name = 'i2'")
    assert row == [{"uuid": own}]
    # The answer survives a restart of the node ...
    lc.stop("i2")
    lc.start("i2")
    assert query(lc.dsn_for("i2"), ask) == [{"new": stranger, "old": stranger}]
    # ... until restored.
    lc.set_identity("i2", None)
    assert query(lc.dsn_for("i2"), ask) == [{"new": own, "old": own}]
    with pytest.raises(ValueError, match="non-empty string"):
        lc.set_identity("i2", "")


LOCKED_READ = "SELECT count(*) AS n FROM _pico_instance"


def server_dsn(lc: LocalCluster, name: str) -> str:
    """A DSN to node ``name``'s PostgreSQL server itself, past its front: the
    front ignores ``SET``, as Picodata does, and these reads need a lock timeout."""
    password = urllib.parse.quote(lc.password, safe="")
    return f"postgresql://{lc.user}:{password}@127.0.0.1:{lc.server_port(name)}/postgres"


def read_with_lock_timeout(dsn: str) -> list[dict[str, Any]]:
    """Read _pico_instance, giving up at once (55P03) if its lock is not granted."""

    async def read(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        await conn.execute("SET lock_timeout = '200ms'")
        return [dict(r) for r in await conn.fetch(LOCKED_READ)]

    return run(read, dsn)


def test_lock_catalog_blocks_readers_of_one_node(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    with lc.lock_catalog("i2") as lock:
        assert lock.held and (lock.node, lock.table) == ("i2", "_pico_instance")
        with pytest.raises(asyncpg.LockNotAvailableError):
            read_with_lock_timeout(server_dsn(lc, "i2"))
        assert read_with_lock_timeout(server_dsn(lc, "i1")) == [{"n": 3}]
        # The governor does not wait on the locked node: its catalog is held.
        lc.set_state("i3", "Offline")
        assert topology_of(lc.dsn_for("i1")) == lc.catalog_rows()
    assert not lock.held
    lock.release()  # a second release does nothing
    assert read_with_lock_timeout(server_dsn(lc, "i2")) == [{"n": 3}]
    # Released, the node got the change it missed.
    assert topology_of(lc.dsn_for("i2")) == lc.catalog_rows()

    other = lc.lock_catalog("i1", "_pico_peer_address")
    with pytest.raises(asyncpg.LockNotAvailableError):
        run(lambda c: c.execute("SET lock_timeout = '200ms'; SELECT * FROM _pico_peer_address"),
            server_dsn(lc, "i1"))  # fmt: skip
    other.release()

    with pytest.raises(ValueError, match="plain SQL identifier"):
        lc.lock_catalog("i2", "_pico_instance; DROP TABLE x")
    with pytest.raises(LocalClusterError, match="could not lock no_such_table on node i2"):
        lc.lock_catalog("i2", "no_such_table")
    # A failed lock leaves the node's catalog in the governor's hands.
    lc.set_state("i3", "Online")
    assert topology_of(lc.dsn_for("i2")) == lc.catalog_rows()


# ---------------------------------------------------------------- strict and non-strict


@pytest.mark.parametrize("strict", [True, False])
def test_routing_data_in_both_modes(make_cluster: MakeCluster, strict: bool) -> None:
    lc = make_cluster(nodes=2, replication_factor=1, strict=strict)
    lc.create_sharded_table("kv", {"k": "string", "v": "integer"}, key=["k"])
    (row,) = query(lc.dsn_for("i2"), "SELECT distribution, format FROM _pico_table")
    key = sharding_key(row["distribution"], row["format"], table="kv")
    bucket = key.bucket(["kek"], lc.bucket_count)
    owner = lc.bucket_replicaset(bucket.bucket_id)
    found = [
        b for b in buckets_of(lc.dsn_for("i2"))
        if b["bucket_id_start"] <= bucket.bucket_id <= b["bucket_id_end"]
    ]  # fmt: skip
    assert [b["current_replicaset_uuid"] for b in found] == [uuid_of_replicaset(lc, owner)]
    lc.set_identity("i1", "00000000-0000-4000-8000-000000000001")
    assert query(lc.dsn, "SELECT pico_instance_uuid() AS u") == [
        {"u": "00000000-0000-4000-8000-000000000001"}
    ]
    with lc.lock_catalog("i1"), pytest.raises(asyncpg.LockNotAvailableError):
        read_with_lock_timeout(server_dsn(lc, "i1"))
    assert read_with_lock_timeout(server_dsn(lc, "i1")) == [{"n": 2}]


# ---------------------------------------------------------------- the model alone


def test_model_spreads_moves_and_merges_bucket_ranges() -> None:
    model = CatalogModel(replication_factor=1, bucket_count=10)
    for port in (1, 2, 3):
        model.add_instance(host="127.0.0.1", port=port, state="Online")
    assert model.bucket_ranges() == [(1, 4, "r1"), (5, 7, "r2"), (8, 10, "r3")]
    model.move_buckets(5, 7, "r1")
    assert model.bucket_ranges() == [(1, 7, "r1"), (8, 10, "r3")]
    assert [model.owner_of(b) for b in (7, 8)] == ["r1", "r3"]
    model.set_target("i3", "Expelled", "expel")
    model.rebalance()
    assert model.bucket_ranges() == [(1, 5, "r1"), (6, 10, "r2")]
    with pytest.raises(ValueError, match="not within"):
        model.owner_of(11)
    sql = model.sync_sql()
    assert "IF EXISTS (SELECT 1 FROM public._picopyn_catalog_hold) THEN RETURN" in sql
    assert sql.startswith("BEGIN;\nDO $picopyn_sync$") and sql.endswith("COMMIT;\n")
    model.add_instance(host="h$picopyn_sync$", port=4)
    with pytest.raises(ValueError, match="quoting tag"):
        model.sync_sql()
