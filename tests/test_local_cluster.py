"""The stand-in Picodata cluster: catalog, identity, faults, strict mode, cleanup.

These tests talk to the servers with plain asyncpg on asyncio, the way the
library's bridge will, so they check what a client really sees.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trio
from raw import ORDERED_TABLES, query, run

from picopyn_actors._config import MAX_CONNECTIONS_PER_NODE
from picopyn_actors.testing import LocalCluster, LocalClusterError, UnknownNodeError
from picopyn_actors.testing._catalog import CatalogModel
from picopyn_actors.testing._pg import ephemeral_start, free_ports, wait_gone

MakeCluster = Callable[..., LocalCluster]

DISCOVERY = """
SELECT i.name, i.uuid, i.raft_id, i.tier, i.replicaset_name,
       i.current_state, i.target_state, i.failure_domain, p.address
FROM _pico_instance i JOIN _pico_peer_address p ON i.raft_id = p.raft_id
WHERE p.connection_type = 'pgproto'
"""





def catalog_of(dsn: str) -> dict[str, list[dict[str, Any]]]:
    async def fetch(conn: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
        return {t: [dict(r) for r in await conn.fetch(q)] for t, q in ORDERED_TABLES.items()}

    return run(fetch, dsn)


def discovery(dsn: str) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in query(dsn, DISCOVERY)}


def states(dsn: str, name: str) -> tuple[list[Any], list[Any]]:
    row = discovery(dsn)[name]
    return json.loads(row["current_state"]), json.loads(row["target_state"])


def assert_unreachable(dsn: str) -> None:
    with pytest.raises(OSError):
        run(lambda conn: conn.fetchval("SELECT 1"), dsn, timeout=3)


def live_processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def shm_ids() -> set[int]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(line.split()[1]) for line in lines}


# ---------------------------------------------------------------- catalog and identity


def test_catalog_is_identical_on_every_node(shared_cluster: LocalCluster) -> None:
    expected = shared_cluster.catalog_rows()
    assert [r["name"] for r in expected["_pico_instance"]] == ["i1", "i2", "i3"]
    for node in shared_cluster.nodes:
        assert catalog_of(shared_cluster.dsn_for(node.name)) == expected, node.name


def test_each_node_takes_the_most_connections_a_client_may_keep(
    shared_cluster: LocalCluster,
) -> None:
    # connections_per_node up to its maximum, the probe's and discovery's own.
    for node in shared_cluster.nodes:
        (row,) = query(shared_cluster.dsn_for(node.name), "SHOW max_connections")
        assert int(row["max_connections"]) >= MAX_CONNECTIONS_PER_NODE + 2, node.name


def test_system_tables_have_picodata_wire_types(shared_cluster: LocalCluster) -> None:
    expected = {
        "_pico_instance": [
            ("name", "text"), ("uuid", "text"), ("raft_id", "int8"),
            ("replicaset_name", "text"), ("replicaset_uuid", "text"),
            ("current_state", "json"), ("target_state", "json"), ("failure_domain", "json"),
            ("tier", "text"), ("picodata_version", "text"), ("sync_incarnation", "int8"),
            ("target_state_reason", "text"), ("target_state_change_time", "timestamptz"),
        ],
        "_pico_peer_address": [
            ("raft_id", "int8"), ("address", "text"), ("connection_type", "text"),
        ],
        "_pico_replicaset": [
            ("name", "text"), ("uuid", "text"), ("current_master_name", "text"),
            ("target_master_name", "text"), ("tier", "text"), ("weight", "float8"),
            ("state", "text"),
        ],
        "_pico_tier": [
            ("name", "text"), ("replication_factor", "int8"), ("can_vote", "bool"),
            ("bucket_count", "int8"), ("is_default", "bool"),
        ],
    }  # fmt: skip

    async def attributes(conn: asyncpg.Connection) -> dict[str, list[tuple[str, str]]]:
        # Core types only: asyncpg names them without reading pg_type (strict mode).
        found = {}
        for table in expected:
            stmt = await conn.prepare(f"SELECT * FROM {table}")
            found[table] = [(a.name, a.type.name) for a in stmt.get_attributes()]
        return found

    assert run(attributes, shared_cluster.dsn) == expected


def test_each_node_knows_who_it_is(shared_cluster: LocalCluster) -> None:
    leader = shared_cluster.nodes[0]
    for node in shared_cluster.nodes:

        async def ask(conn: asyncpg.Connection) -> asyncpg.Record:
            return await conn.fetchrow(
                "SELECT pico_instance_uuid() AS new, instance_uuid() AS old,"
                " pico_instance_name($1) AS name, pico_raft_leader_id() AS leader_id,"
                " pico_raft_leader_uuid() AS leader_uuid, version() AS version",
                node.uuid,  # noqa: B023 - awaited inside this iteration
            )

        row = run(ask, shared_cluster.dsn_for(node.name))
        assert (row["new"], row["old"], row["name"]) == (node.uuid, node.uuid, node.name)
        assert (row["leader_id"], row["leader_uuid"]) == (leader.raft_id, leader.uuid)
        assert row["version"].startswith("PostgreSQL")
    assert len({n.uuid for n in shared_cluster.nodes}) == 3


def test_discovery_query_lists_every_node(shared_cluster: LocalCluster) -> None:
    found = discovery(shared_cluster.dsn)
    assert sorted(found) == ["i1", "i2", "i3"]
    for node in shared_cluster.nodes:
        row = found[node.name]
        assert row["address"] == node.address == f"127.0.0.1:{node.port}"
        assert (row["uuid"], row["raft_id"], row["tier"]) == (node.uuid, node.raft_id, "default")
        assert row["replicaset_name"] == node.replicaset
        assert row["current_state"] == row["target_state"] == '["Online",1]'
        assert json.loads(row["failure_domain"]) == {}
    iproto = query(shared_cluster.dsn, "SELECT address FROM _pico_peer_address"
                   " WHERE connection_type = 'iproto' ORDER BY raft_id")  # fmt: skip
    assert len(iproto) == 3
    assert not {r["address"] for r in iproto} & {n.address for n in shared_cluster.nodes}


def test_handles_and_dsns(shared_cluster: LocalCluster) -> None:
    lc = shared_cluster
    first = lc.nodes[0]
    assert lc.node("i1") == first
    assert (first.name, first.raft_id, first.replicaset, first.host) == ("i1", 1, "r1", "127.0.0.1")
    assert lc.dsn == lc.dsn_for("i1") == lc.dsns[0]
    assert lc.dsn.startswith(f"postgresql://admin:{lc.password}@127.0.0.1:{first.port}/")
    assert lc.user == "admin"
    assert lc.password not in repr(lc)
    assert all(lc.is_running(n.name) and not lc.is_paused(n.name) for n in lc.nodes)


def test_unknown_node_name_lists_the_known_ones(shared_cluster: LocalCluster) -> None:
    with pytest.raises(UnknownNodeError, match=r"'i9'.*i1, i2, i3") as info:
        shared_cluster.node("i9")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, LocalClusterError)
    with pytest.raises(UnknownNodeError):
        shared_cluster.kill("nope")


async def test_usable_from_trio_through_threads(shared_cluster: LocalCluster) -> None:
    rows = await trio.to_thread.run_sync(shared_cluster.catalog_rows)
    assert len(rows["_pico_instance"]) == 3


# ---------------------------------------------------------------- strict mode and auth


def test_strict_mode_fails_like_picodata(shared_cluster: LocalCluster) -> None:
    async def check(conn: asyncpg.Connection) -> None:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT pg_advisory_unlock_all()")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT typname FROM pg_catalog.pg_type LIMIT 1")
        # asyncpg introspects pg_type for a type outside its core set ...
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT '[1,2)'::int4range")
        # ... and for a codec on such a type.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.set_type_codec("int4range", encoder=str, decoder=str, schema="pg_catalog")
        # What a Picodata client does use still works.
        assert await conn.fetchval("SELECT $1::int", 41) == 41
        assert await conn.fetchval("SELECT 1") == 1
        assert isinstance(await conn.fetchval("SELECT current_state FROM _pico_instance"), str)
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'admin'") is False

    run(check, shared_cluster.dsn)


def test_wrong_password_fails_with_an_auth_error(shared_cluster: LocalCluster) -> None:
    dsn = shared_cluster.dsn.replace(shared_cluster.password, "wrong")
    with pytest.raises(asyncpg.InvalidPasswordError):
        run(lambda conn: conn.fetchval("SELECT 1"), dsn)


def test_non_strict_cluster_and_a_given_password(make_cluster: MakeCluster) -> None:
    lc = make_cluster(nodes=1, strict=False, password="p@ss:w/rd%'")

    async def check(conn: asyncpg.Connection) -> None:
        assert await conn.fetchval("SELECT pg_advisory_unlock_all()") is None
        assert await conn.fetchval("SELECT count(*) FROM pg_catalog.pg_type") > 0
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'admin'")
        # Like Picodata's default, the password is stored and checked as md5.
        stored = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = 'admin'")
        assert stored.startswith("md5")

    run(check, lc.dsn)


# ---------------------------------------------------------------- faults and the governor


def test_kill_is_a_crash_the_catalog_does_not_see(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    before = lc.catalog_rows()
    pids = lc.server_pids("i2")
    front = lc.front_pid("i2")
    assert front is not None
    lc.kill("i2")
    assert not lc.is_running("i2")
    assert not any(alive(pid) for pid in [*pids, front])
    assert lc.front_pid("i2") is None
    assert_unreachable(lc.dsn_for("i2"))
    assert lc.catalog_rows() == before
    assert catalog_of(lc.dsn_for("i1")) == before
    assert states(lc.dsn, "i2") == (["Online", 1], ["Online", 1])
    with pytest.raises(LocalClusterError, match=r"i2.*not running"):
        lc.kill("i2")

    lc.start("i2")
    for node in lc.nodes:
        assert states(lc.dsn_for(node.name), "i2") == (["Online", 2], ["Online", 2])


def test_stop_and_start_move_states_and_keep_data(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    query(lc.dsn_for("i2"), "CREATE TABLE public.kept (v int)")
    query(lc.dsn_for("i2"), "INSERT INTO kept VALUES (7)")

    lc.stop("i2")
    assert not lc.is_running("i2")
    assert_unreachable(lc.dsn_for("i2"))
    for name in ("i1", "i3"):
        assert states(lc.dsn_for(name), "i2") == (["Offline", 1], ["Offline", 1])
    assert discovery(lc.dsn)["i2"]["address"] == lc.node("i2").address

    lc.start("i2")
    for node in lc.nodes:
        assert states(lc.dsn_for(node.name), "i2") == (["Online", 2], ["Online", 2])
        assert catalog_of(lc.dsn_for(node.name)) == lc.catalog_rows()
    assert query(lc.dsn_for("i2"), "SELECT v FROM kept") == [{"v": 7}]
    instance = {r["name"]: r for r in lc.catalog_rows()["_pico_instance"]}["i2"]
    assert (instance["target_state_reason"], instance["sync_incarnation"]) == ("restart", 2)


def test_set_state_is_a_catalog_change_only(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    lc.set_state("i3", "Offline")
    assert states(lc.dsn, "i3") == (["Offline", 1], ["Offline", 1])
    assert lc.is_running("i3")
    assert query(lc.dsn_for("i3"), "SELECT 1 AS one") == [{"one": 1}]
    lc.set_state("i3", "Online")
    assert states(lc.dsn_for("i2"), "i3") == (["Online", 2], ["Online", 2])
    lc.set_state("i3", "Expelled")
    assert states(lc.dsn_for("i3"), "i3") == (["Expelled", 2], ["Expelled", 2])
    assert lc.states("i3") == (("Expelled", 2), ("Expelled", 2))
    replicaset = query(lc.dsn, "SELECT state FROM _pico_replicaset WHERE name = 'r3'")
    assert replicaset == [{"state": "expelled"}]
    with pytest.raises(ValueError, match="Online"):
        lc.set_state("i3", "Dead")  # type: ignore[arg-type]


def test_add_node_joins_offline_then_online(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    node = lc.add_node()
    assert (node.name, node.raft_id, node.replicaset) == ("i4", 4, "r4")
    assert lc.node("i4") == node and len(lc.nodes) == 4
    found = discovery(lc.dsn)
    assert found["i4"]["address"] == node.address
    assert states(lc.dsn, "i4") == (["Online", 1], ["Online", 1])
    assert run(lambda c: c.fetchval("SELECT pico_instance_uuid()"), lc.dsn_for("i4")) == node.uuid
    assert catalog_of(lc.dsn_for("i4")) == lc.catalog_rows()
    instance = {r["name"]: r for r in lc.catalog_rows()["_pico_instance"]}["i4"]
    assert instance["target_state_reason"] == "join"


def test_pause_hangs_a_node_and_resume_brings_it_back(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    lc.pause("i2")
    assert lc.is_paused("i2") and lc.is_running("i2")
    with pytest.raises(TimeoutError):
        run(lambda conn: conn.fetchval("SELECT 1"), lc.dsn_for("i2"), timeout=0.5)
    # The governor keeps working without the hung node ...
    lc.set_state("i3", "Offline")
    assert states(lc.dsn, "i3") == (["Offline", 1], ["Offline", 1])

    lc.resume("i2")
    assert not lc.is_paused("i2")
    # ... and the node catches up when it answers again.
    assert states(lc.dsn_for("i2"), "i3") == (["Offline", 1], ["Offline", 1])


def test_replication_factor_groups_nodes_and_fails_over(make_cluster: MakeCluster) -> None:
    lc = make_cluster(nodes=4, replication_factor=2)
    assert [(n.name, n.replicaset) for n in lc.nodes] == [
        ("i1", "r1"), ("i2", "r1"), ("i3", "r2"), ("i4", "r2"),
    ]  # fmt: skip
    masters = "SELECT name, current_master_name AS m FROM _pico_replicaset ORDER BY name"
    assert query(lc.dsn_for("i4"), masters) == [
        {"name": "r1", "m": "i1"},
        {"name": "r2", "m": "i3"},
    ]
    tier = query(lc.dsn, "SELECT replication_factor FROM _pico_tier")
    assert tier == [{"replication_factor": 2}]
    lc.stop("i1")
    assert query(lc.dsn_for("i2"), masters)[0] == {"name": "r1", "m": "i2"}


def test_execute_everywhere_creates_objects_owned_by_the_login_role(
    local_cluster: LocalCluster,
) -> None:
    lc = local_cluster
    lc.execute_everywhere("CREATE TABLE public.everywhere (id int PRIMARY KEY)")
    for dsn in lc.dsns:
        query(dsn, "INSERT INTO everywhere VALUES (1)")
        assert query(dsn, "SELECT count(*) AS n FROM everywhere") == [{"n": 1}]
    with pytest.raises(LocalClusterError, match="everywhere"):
        lc.execute_everywhere("CREATE TABLE public.everywhere (id int)")


# ---------------------------------------------------------------- clear errors


def test_missing_binaries_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(
        LocalClusterError, match=r"apt-get install -y postgresql.*PICOPYN_PG_BINDIR"
    ):
        LocalCluster(nodes=1, bindir=tmp_path).start_cluster()


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="nodes"):
        LocalCluster(nodes=0)
    with pytest.raises(ValueError, match="replication_factor"):
        LocalCluster(replication_factor=0)
    with pytest.raises(ValueError, match="password"):
        LocalCluster(password="")


def test_restart_errors_are_clear(make_cluster: MakeCluster) -> None:
    lc = make_cluster(nodes=2)
    node = lc.node("i2")
    with pytest.raises(LocalClusterError, match="already running"):
        lc.start("i2")
    lc.stop("i2")

    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((node.host, node.port))
        squatter.listen()
        with pytest.raises(LocalClusterError, match=f"port {node.port}.*taken") as info:
            lc.start("i2")
    assert lc.password not in str(info.value)

    conf = lc.base_dir / "nodes" / "i2" / "data" / "postgresql.conf"
    with open(conf, "a") as f:
        f.write("no_such_setting = 1\n")
    with pytest.raises(LocalClusterError, match=r"(?s)i2 failed to start.*no_such_setting") as info:
        lc.start("i2")
    assert lc.password not in str(info.value)
    assert not lc.is_running("i2")


# ---------------------------------------------------------------- nothing left behind


def test_close_leaves_no_process_no_shared_memory_no_folder() -> None:
    lc = LocalCluster(nodes=3).start_cluster()
    base = lc.base_dir
    run(lambda conn: conn.fetchval("SELECT 1"), lc.dsn_for("i3"))  # a backend exists
    pids = [pid for n in lc.nodes for pid in lc.server_pids(n.name)]
    assert len(pids) > 3 * 3  # postmasters and their background processes
    fronts = [lc.front_pid(n.name) for n in lc.nodes]
    assert all(fronts)
    pids += [pid for pid in fronts if pid is not None]
    assert live_processes_mentioning(str(base))
    segments = {recorded_shm_id(base, n.name) for n in lc.nodes}
    assert segments <= shm_ids()
    lc.kill("i1")  # a SIGKILLed postmaster leaves its System V segment behind
    lc.pause("i2")
    lc.close()
    lc.close()  # idempotent
    assert not [pid for pid in pids if alive(pid)]
    assert live_processes_mentioning(str(base)) == []
    assert not base.exists()
    assert not segments & shm_ids()


def recorded_shm_id(base: Path, name: str) -> int:
    """The System V segment id a running postmaster records in postmaster.pid."""
    lines = (base / "nodes" / name / "data" / "postmaster.pid").read_text().splitlines()
    return int(lines[6].split()[1])


def test_interrupted_body_still_cleans_up() -> None:
    with pytest.raises(KeyboardInterrupt), LocalCluster(nodes=2) as lc:
        base = lc.base_dir
        pids = lc.server_pids("i1") + lc.server_pids("i2")
        raise KeyboardInterrupt
    assert not [pid for pid in pids if alive(pid)]
    assert not base.exists()


@pytest.mark.parametrize("strict", [True, False])
def test_a_sigkilled_owner_leaves_no_orphans(strict: bool) -> None:
    """The watchdog cleans up after SIGKILL, though a finished thread started the cluster."""
    script = (
        "import sys, threading\n"
        "from picopyn_actors.testing import LocalCluster\n"
        "def main():\n"
        f"    lc = LocalCluster(nodes=2, strict={strict}).start_cluster()\n"
        "    lc.pause('i2')\n"
        "    pids = [p for n in lc.nodes for p in lc.server_pids(n.name)]\n"
        "    pids += [lc.front_pid(n.name) or 0 for n in lc.nodes]\n"
        "    print(lc.base_dir, *pids, flush=True)\n"
        "thread = threading.Thread(target=main)\n"
        "thread.start()\n"
        "thread.join()\n"
        "sys.stdin.read()\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        out = owner.stdout.readline().split()
        base, pids = out[0], [int(p) for p in out[1:] if p != "0"]
        assert len(pids) > 2 * 3 + (2 if strict else 0)
        assert all(alive(pid) for pid in pids)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
    # No event tells us when another process is gone: wait_gone looks at /proc.
    assert wait_gone(pids, timeout=10.0), [pid for pid in pids if alive(pid)]
    assert wait_gone(live_processes_mentioning(base), timeout=10.0)  # the watchdog itself
    assert not Path(base).exists()


def test_leftovers_are_checked_from_a_fresh_interpreter(tmp_path: Path) -> None:
    """A process that never calls close() is cleaned up by the atexit hook."""
    script = (
        "from picopyn_actors.testing import LocalCluster\n"
        "lc = LocalCluster(nodes=1).start_cluster()\n"
        "lc.pause('i1')\n"
        "print(lc.base_dir, *lc.server_pids('i1'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    base, pids = out[0], [int(p) for p in out[1:]]
    assert not Path(base).exists()
    assert not [pid for pid in pids if alive(pid)]


# ---------------------------------------------------------------- the governor's model


def test_model_follows_picodata_state_rules() -> None:
    model = CatalogModel(replication_factor=1)
    node = model.add_instance(host="127.0.0.1", port=1)
    assert model.states(node.name) == (("Offline", 0), ("Offline", 0))
    model.set_target(node.name, "Online", "join")
    assert model.states(node.name) == (("Offline", 0), ("Online", 1))
    model.apply_target(node.name)
    assert model.states(node.name) == (("Online", 1), ("Online", 1))
    model.set_target(node.name, "Offline", "shutdown")
    assert model.states(node.name) == (("Online", 1), ("Offline", 1))
    model.apply_target(node.name)
    model.set_target(node.name, "Online", "restart")
    model.apply_target(node.name)
    assert model.states(node.name) == (("Online", 2), ("Online", 2))
    rows = model.rows()
    assert rows["_pico_instance"][0]["current_state"] == '["Online",2]'
    assert [r["connection_type"] for r in rows["_pico_peer_address"]] == ["iproto", "pgproto"]


def test_free_ports_are_below_the_ephemeral_range_and_free() -> None:
    # A client socket takes its local port from the ephemeral range: a port
    # chosen there could be taken before the node's server binds it.
    start = ephemeral_start()
    ports = free_ports("127.0.0.1", 6)
    assert len(set(ports)) == 6
    assert all(port < start for port in ports)
    for port in ports:  # each one binds now
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def test_free_ports_fall_back_to_the_kernels_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from picopyn_actors.testing import _pg

    kernel_start = ephemeral_start()
    monkeypatch.setattr(_pg, "ephemeral_start", lambda: 1024)  # nothing between it and 20000
    ports = free_ports("127.0.0.1", 3)
    assert len(set(ports)) == 3
    assert all(port >= kernel_start for port in ports)  # the kernel's, from its range
