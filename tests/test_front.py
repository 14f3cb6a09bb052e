"""The stand-in's pgproto front: each rule of Picodata's dialect, pinned over real sockets.

Every test talks to a ``LocalCluster(strict=True)`` front with raw asyncpg
(or, for what asyncpg cannot send, raw protocol bytes), never through the
library, so each rule holds whatever the client does.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest

from picopyn_actors.testing import FrontStatistics, LocalCluster, LocalClusterError
from picopyn_actors.testing._front import count_statements, parse_options
from picopyn_actors.testing._pg import wait_gone

T = TypeVar("T")
MakeCluster = Callable[..., LocalCluster]

INVALIDATION = {"options": "pico_stmt_invalidation=true"}


def run(
    fn: Callable[[asyncpg.Connection], Awaitable[T]],
    dsn: str,
    timeout: float = 10.0,
    **connect: Any,
) -> T:
    """Connect to *dsn* with raw asyncpg on a fresh asyncio loop, run *fn*, close."""

    async def main() -> T:
        conn = await asyncpg.connect(dsn, timeout=timeout, **connect)
        try:
            return await asyncio.wait_for(fn(conn), timeout)
        finally:
            # A clean close waits for the front to end the session, so the
            # front's counters are settled when run() returns.
            try:
                await conn.close(timeout=5)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


def connect_error(dsn: str, **connect: Any) -> BaseException:
    """The exception a login to *dsn* fails with."""
    with pytest.raises(Exception) as info:
        run(lambda conn: conn.fetchval("SELECT 1"), dsn, **connect)
    return info.value


def bare_dsn(lc: LocalCluster, name: str = "i1") -> str:
    """The DSN of node *name*'s PostgreSQL server itself, past its front."""
    return lc.dsn_for(name).replace(f":{lc.node(name).port}/", f":{lc.server_port(name)}/")


def stats(lc: LocalCluster, name: str = "i1") -> FrontStatistics:
    return lc.front_statistics(name)


@pytest.fixture(scope="module")
def front() -> Iterator[LocalCluster]:
    """A 1-node strict cluster for this module; each test uses tables of its own."""
    with LocalCluster(nodes=1) as cluster:
        yield cluster


# ---------------------------------------------------------------- a raw wire client


class Wire:
    """A PostgreSQL v3 client over a plain socket, for messages asyncpg never sends."""

    def __init__(
        self, lc: LocalCluster, name: str = "i1", port: int | None = None, **params: str
    ) -> None:
        node = lc.node(name)
        self.sock = socket.create_connection((node.host, port or node.port), timeout=10)
        self.buf = b""
        self.user = lc.user
        self.password = lc.password
        self.params = {"user": lc.user, "database": "postgres", **params}
        self.login_messages: list[tuple[bytes, bytes]] = []

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def message(self, kind: bytes, body: bytes = b"") -> None:
        self.send(kind + struct.pack("!I", len(body) + 4) + body)

    def receive(self) -> tuple[bytes, bytes]:
        while True:
            if len(self.buf) >= 5:
                (length,) = struct.unpack_from("!I", self.buf, 1)
                if len(self.buf) >= 1 + length:
                    kind, body = self.buf[:1], self.buf[5 : 1 + length]
                    self.buf = self.buf[1 + length :]
                    return kind, body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the front closed the connection")
            self.buf += chunk

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        """Every message up to and including ReadyForQuery."""
        messages = []
        while True:
            kind, body = self.receive()
            messages.append((kind, body))
            if kind == b"Z":
                return messages

    def login(self) -> Wire:
        startup = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in self.params.items())
        body = struct.pack("!I", 196608) + startup + b"\0"
        self.send(struct.pack("!I", len(body) + 4) + body)
        kind, body = self.receive()
        assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 5, (kind, body)  # md5
        inner = hashlib.md5((self.password + self.user).encode()).hexdigest()
        outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
        self.message(b"p", b"md5" + outer.encode() + b"\0")
        self.login_messages = self.until_ready()
        return self

    def query(self, sql: bytes) -> list[tuple[bytes, bytes]]:
        self.message(b"Q", sql + b"\0")
        return self.until_ready()

    def parse(self, name: bytes, sql: bytes) -> None:
        self.message(b"P", name + b"\0" + sql + b"\0" + b"\0\0")

    def close_statement(self, name: bytes) -> None:
        self.message(b"C", b"S" + name + b"\0")

    def sync(self) -> list[tuple[bytes, bytes]]:
        self.message(b"S")
        return self.until_ready()


def framed(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def error_code(messages: list[tuple[bytes, bytes]]) -> str | None:
    """The SQLSTATE of the first ErrorResponse among *messages*."""
    for kind, body in messages:
        if kind == b"E":
            for field in body.split(b"\0"):
                if field[:1] == b"C":
                    return field[1:].decode()
    return None


def kinds(messages: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(kind for kind, _ in messages)


@pytest.fixture
def wire(front: LocalCluster) -> Iterator[Wire]:
    connection = Wire(front).login()
    try:
        yield connection
    finally:
        connection.close()


def assert_serves(wire: Wire) -> None:
    """The session is open and answers a query."""
    messages = wire.query(b"SELECT 41 + 1")
    assert kinds(messages) == b"TDCZ", messages
    assert messages[1][1].endswith(b"42")
    assert messages[-1] == (b"Z", b"I")


# ---------------------------------------------------------------- 1. startup options


def test_option_parsing_follows_picodata() -> None:
    options, unknown = parse_options(
        {
            "options": "pico_stmt_invalidation=true,read_preference=replica,"
            "sql_motion_row_max=5000,sql_vdbe_opcode_max=45000,forward=x,"
            "pico_query_metadata=false,colour=blue,extra=a=b"
        }
    )
    assert options == {
        "pico_stmt_invalidation": True,
        "read_preference": "replica",
        "sql_motion_row_max": 5000,
        "sql_vdbe_opcode_max": 45000,
        "forward": "x",
        "pico_query_metadata": False,
    }
    assert unknown == ["colour", "extra"]
    # Startup parameters of their own win over the options string.
    options, _ = parse_options(
        {"options": "pico_stmt_invalidation=true", "pico_stmt_invalidation": "false"}
    )
    assert options["pico_stmt_invalidation"] is False


def test_options_are_accepted_and_never_reach_postgresql(front: LocalCluster) -> None:
    async def check(conn: asyncpg.Connection) -> tuple[str, str, str]:
        return (
            await conn.fetchval("SHOW search_path"),
            await conn.fetchval("SHOW application_name"),
            await conn.fetchval("SHOW work_mem"),
        )

    default = run(check, front.dsn)
    options = (
        "pico_stmt_invalidation=true,pico_query_metadata=true,read_preference=any,"
        "sql_motion_row_max=10,sql_vdbe_opcode_max=20,forward=true,-c search_path=nowhere"
    )
    settings = {"options": options, "application_name": "sticky", "work_mem": "77MB"}
    assert run(check, front.dsn, server_settings=settings) == default
    # PostgreSQL itself refuses the same startup options.
    error = connect_error(bare_dsn(front), server_settings={"options": options})
    assert isinstance(error, asyncpg.PostgresError)
    log = (front.base_dir / "nodes" / "i1" / "front.log").read_text()
    assert "unknown option: '-c search_path'" in log


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"options": "pico_stmt_invalidation"}, "option without value"),
        ({"options": ""}, "option without value"),
        ({"options": "read_preference=leader,,"}, "option without value"),
        ({"options": "pico_stmt_invalidation=yes"}, "pico_stmt_invalidation"),
        ({"options": "pico_query_metadata=True"}, "pico_query_metadata"),
        ({"pico_stmt_invalidation": "1"}, "pico_stmt_invalidation"),
        ({"options": "read_preference=nearest"}, "unknown read_preference value: 'nearest'"),
        ({"options": "sql_motion_row_max=-1"}, "sql_motion_row_max should be positive"),
        ({"options": "sql_vdbe_opcode_max=many"}, "invalid digit found in string"),
    ],
)
def test_bad_options_fail_the_login(
    front: LocalCluster, settings: dict[str, str], message: str
) -> None:
    before = stats(front)
    error = connect_error(front.dsn, server_settings=settings)
    assert isinstance(error, asyncpg.PostgresError)
    assert error.sqlstate == "XX000"
    assert message in str(error)
    after = stats(front)
    assert after.logins_refused == before.logins_refused + 1
    assert after.logins == before.logins


def test_a_pico_startup_parameter_wins_over_options(front: LocalCluster) -> None:
    front.execute_everywhere("CREATE TABLE public.wins (v int)")

    columns = iter(range(100))

    async def stale(conn: asyncpg.Connection) -> str | None:
        stmt = await conn.prepare("SELECT v FROM wins")
        front.execute_everywhere(f"ALTER TABLE public.wins ADD COLUMN w{next(columns)} int")
        try:
            await stmt.fetch()
        except asyncpg.PostgresError as exc:
            return str(exc.sqlstate)
        return None

    on = {"options": "pico_stmt_invalidation=false", "pico_stmt_invalidation": "true"}
    off = {"options": "pico_stmt_invalidation=true", "pico_stmt_invalidation": "false"}
    assert run(stale, front.dsn, server_settings=on) == "42999"
    assert run(stale, front.dsn, server_settings=off) is None


# ---------------------------------------------------------------- 2. no cancel


def test_no_backend_key_data(wire: Wire) -> None:
    assert b"K" not in kinds(wire.login_messages)
    assert b"R" in kinds(wire.login_messages)
    assert wire.login_messages[-1] == (b"Z", b"I")


def test_a_cancel_request_only_closes_its_socket(front: LocalCluster) -> None:
    front.execute_everywhere("CREATE TABLE public.uncancelled (v int)")
    before = stats(front)

    async def check(conn: asyncpg.Connection) -> int:
        # asyncpg sends a CancelRequest on timeout; PostgreSQL would cancel the insert.
        with pytest.raises(TimeoutError):
            await conn.execute("INSERT INTO uncancelled SELECT 1 FROM pg_sleep(0.3)", timeout=0.05)
        return int(await conn.fetchval("SELECT count(*) FROM uncancelled"))

    assert run(check, front.dsn) == 1
    with socket.create_connection((front.node("i1").host, front.node("i1").port)) as sock:
        sock.sendall(struct.pack("!IIII", 16, 80877102, 1, 2))
        assert sock.recv(100) == b""
    assert stats(front).cancel_requests_ignored == before.cancel_requests_ignored + 2


# ---------------------------------------------------------------- 3. statement invalidation


def test_a_stale_statement_fails_at_bind_and_runs_nothing(front: LocalCluster) -> None:
    front.execute_everywhere("CREATE TABLE public.stale (v int)")
    before = stats(front)

    async def check(conn: asyncpg.Connection) -> None:
        insert = await conn.prepare("INSERT INTO stale VALUES ($1)")
        await insert.fetch(1)
        front.execute_everywhere("ALTER TABLE public.stale ADD COLUMN w int")
        with pytest.raises(asyncpg.PostgresError) as info:
            await insert.fetch(2)
        assert info.value.sqlstate == "42999"
        assert "__asyncpg_stmt_" in str(info.value)
        assert str(info.value).endswith("has been invalidated")
        # Nothing ran, and the session goes on: a new statement is fine.
        assert await conn.fetchval("SELECT string_agg(v::text, ',') FROM stale") == "1"
        fresh = await conn.prepare("INSERT INTO stale VALUES ($1)")
        await fresh.fetch(3)
        assert await conn.fetchval("SELECT string_agg(v::text, ',' ORDER BY v) FROM stale") == "1,3"

    run(check, front.dsn, server_settings=INVALIDATION)
    assert stats(front).invalidations == before.invalidations + 1


def test_asyncpg_statement_cache_sees_42999(front: LocalCluster) -> None:
    front.execute_everywhere("CREATE TABLE public.cached (v int)")

    async def check(conn: asyncpg.Connection) -> None:
        assert await conn.fetch("SELECT v FROM cached") == []
        front.execute_everywhere("ALTER TABLE public.cached ADD COLUMN w int")
        # The cached statement is stale: every use fails until the client prepares again.
        for _ in range(2):
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.fetch("SELECT v FROM cached")
            assert info.value.sqlstate == "42999"

    run(check, front.dsn, server_settings=INVALIDATION)


@pytest.mark.parametrize(
    "ddl",
    [
        "CREATE TABLE public.ddl_new_{n} (v int)",
        "ALTER TABLE public.ddl_{n} ADD COLUMN w int",
        "DROP TABLE public.ddl_other_{n}",
        "TRUNCATE public.ddl_{n}",
        "COMMENT ON TABLE public.ddl_{n} IS 'x'",
        "CREATE INDEX ON public.ddl_{n} (v)",
        "DO $$ BEGIN EXECUTE 'ALTER TABLE public.ddl_{n} ADD COLUMN z int'; END $$",
        "SELECT public.ddl_make_{n}()",
    ],
)
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_ddl_through_the_front_invalidates(front: LocalCluster, ddl: str, protocol: str) -> None:
    n = abs(hash((ddl, protocol)))
    front.execute_everywhere(
        f"CREATE TABLE public.ddl_{n} (v int); CREATE TABLE public.ddl_other_{n} (v int);"
        f"CREATE FUNCTION public.ddl_make_{n}() RETURNS int LANGUAGE plpgsql AS "
        f"$$ BEGIN CREATE TABLE public.ddl_made_{n} (v int); RETURN 1; END $$;"
    )
    sql = ddl.format(n=n)

    async def check(conn: asyncpg.Connection) -> str | None:
        other = await asyncpg.connect(front.dsn)
        try:
            stmt = await conn.prepare(f"SELECT count(*) FROM ddl_{n}")
            await stmt.fetchval()
            if protocol == "simple":
                await other.execute(sql)  # no arguments: a Query message
            else:
                await other.fetch(sql)  # Parse, Bind, Execute
            try:
                await stmt.fetchval()
            except asyncpg.PostgresError as exc:
                return str(exc.sqlstate)
            return None
        finally:
            await other.close()

    assert run(check, front.dsn, server_settings=INVALIDATION) == "42999"


def test_without_the_option_stale_statements_run_as_on_postgresql(front: LocalCluster) -> None:
    front.execute_everywhere("CREATE TABLE public.lenient (v int)")
    before = stats(front)

    async def check(conn: asyncpg.Connection) -> None:
        insert = await conn.prepare("INSERT INTO lenient VALUES ($1)")
        await insert.fetch(1)
        front.execute_everywhere("ALTER TABLE public.lenient ADD COLUMN w int")
        await insert.fetch(2)
        listed = await conn.fetchval("SELECT string_agg(v::text, ',' ORDER BY v) FROM lenient")
        assert listed == "1,2"

    run(check, front.dsn)
    assert stats(front).invalidations == before.invalidations


def test_statements_parsed_after_the_change_are_valid(front: LocalCluster) -> None:
    front.execute_everywhere("CREATE TABLE public.later (v int)")

    async def check(conn: asyncpg.Connection) -> None:
        front.execute_everywhere("ALTER TABLE public.later ADD COLUMN w int")
        stmt = await conn.prepare("SELECT count(*) FROM later")
        assert await stmt.fetchval() == 0
        assert await stmt.fetchval() == 0
        # A DDL statement is never invalidated by the change it made itself.
        alter = await conn.prepare("ALTER TABLE public.later ADD COLUMN IF NOT EXISTS x int")
        await alter.fetch()
        await alter.fetch()

    run(check, front.dsn, server_settings=INVALIDATION)


# ---------------------------------------------------------------- 4. stub transactions, SET


def test_transactions_are_stubs(front: LocalCluster) -> None:
    front.execute_everywhere("CREATE TABLE public.stubbed (v int)")

    async def check(conn: asyncpg.Connection) -> None:
        other = await asyncpg.connect(front.dsn)
        try:
            for statement in ("BEGIN", "START TRANSACTION ISOLATION LEVEL SERIALIZABLE"):
                assert await conn.execute(statement) in ("BEGIN", "START TRANSACTION")
                assert not conn.is_in_transaction()  # ReadyForQuery said idle
                await conn.execute("INSERT INTO stubbed VALUES (1)")
                assert await conn.execute("SAVEPOINT s") == "SAVEPOINT"
                await conn.execute("INSERT INTO stubbed VALUES (2)")
                assert await conn.execute("ROLLBACK TO SAVEPOINT s") == "ROLLBACK"
                assert await conn.execute("RELEASE SAVEPOINT s") == "RELEASE"
                # Another session sees both rows at once: nothing is transactional.
                assert await other.fetchval("SELECT count(*) FROM stubbed") == 2
                assert await conn.execute("ROLLBACK") == "ROLLBACK"
                assert await other.fetchval("SELECT count(*) FROM stubbed") == 2
                await conn.execute("DELETE FROM stubbed")
            for statement, tag in (("COMMIT", "COMMIT"), ("END", "COMMIT"), ("ABORT", "ROLLBACK")):
                assert await conn.execute(statement) == tag
            # asyncpg's transaction(): nothing errors and nothing is rolled back.
            with pytest.raises(KeyError):
                async with conn.transaction(isolation="serializable"):
                    await conn.execute("INSERT INTO stubbed VALUES (3)")
                    raise KeyError
            assert await other.fetchval("SELECT count(*) FROM stubbed") == 1
            # Through the extended protocol too.
            assert await conn.fetch("BEGIN") == []
            stmt = await conn.prepare("COMMIT")
            assert await stmt.fetch() == []
            assert stmt.get_attributes() == ()
        finally:
            await other.close()

    run(check, front.dsn)


def test_set_is_answered_and_ignored(front: LocalCluster) -> None:
    async def check(conn: asyncpg.Connection) -> None:
        before = await conn.fetchval("SHOW search_path")
        assert await conn.execute("SET search_path = nowhere") == "SET"
        assert await conn.execute("SET SESSION statement_timeout = 1") == "SET"
        assert await conn.fetch("SET LOCAL work_mem = '64MB'") == []
        assert await conn.fetchval("SHOW search_path") == before
        assert await conn.fetchval("SHOW work_mem") != "64MB"
        assert await conn.fetchval("SELECT 1 FROM pg_sleep(0.01)") == 1  # no 1 ms timeout

    run(check, front.dsn)


def test_stub_statements_behave_as_statements(wire: Wire) -> None:
    wire.parse(b"b1", b"BEGIN")
    wire.message(b"D", b"Sb1\0")
    wire.message(b"B", b"p1\0b1\0\0\0\0\0\0\0")
    wire.message(b"D", b"Pp1\0")
    wire.message(b"E", b"p1\0\0\0\0\0")
    wire.close_statement(b"b1")
    messages = wire.sync()
    assert kinds(messages) == b"1tn2nC3Z"
    assert messages[5] == (b"C", b"BEGIN\0")
    wire.parse(b"dup", b"SET x = 1")
    wire.parse(b"dup", b"SET x = 2")
    assert error_code(wire.sync()) == "42P05"
    assert_serves(wire)


def test_a_prepared_statement_holds_no_lock(front: LocalCluster) -> None:
    """asyncpg prepares with Parse, Describe, Flush: on PostgreSQL the open implicit
    transaction would keep its table lock and block DDL until the next Sync."""
    front.execute_everywhere("CREATE TABLE public.unlocked (v int)")

    async def check(conn: asyncpg.Connection) -> None:
        stmt = await conn.prepare("SELECT v FROM unlocked")
        front.execute_everywhere(
            "SET lock_timeout = '2s'; ALTER TABLE public.unlocked ADD COLUMN w int"
        )
        assert await stmt.fetch() == []

    run(check, front.dsn)


def test_pipelined_answers_keep_their_order(wire: Wire) -> None:
    wire.send(
        framed(b"Q", b"BEGIN\0")
        + framed(b"Q", b"SELECT 1\0")
        + framed(b"Q", b"SET x = 1\0")
        + framed(b"Q", b"LISTEN nothing\0")
        + framed(b"Q", b"SELECT 2\0")
    )
    messages = [wire.until_ready() for _ in range(5)]
    assert [kinds(m) for m in messages] == [b"CZ", b"TDCZ", b"CZ", b"EZ", b"TDCZ"]
    assert messages[0][0] == (b"C", b"BEGIN\0")
    assert messages[2][0] == (b"C", b"SET\0")
    assert messages[4][1][1].endswith(b"2")


def test_after_a_server_error_the_front_skips_to_sync(wire: Wire) -> None:
    wire.parse(b"", b"SELECT count(*) / 0 FROM pg_class")  # fails at Execute
    wire.message(b"B", b"\0\0\0\0\0\0\0\0")
    wire.message(b"E", b"\0\0\0\0\0")
    wire.parse(b"later", b"BEGIN")  # a stub: answered by the front, unless skipped
    wire.message(b"B", b"p\0later\0\0\0\0\0\0\0")
    messages = wire.sync()
    assert kinds(messages) == b"12EZ"
    assert error_code(messages) == "22012"
    # The skipped Parse left nothing behind: the name is free.
    wire.parse(b"later", b"SELECT 3")
    assert kinds(wire.sync()) == b"1Z"
    assert_serves(wire)


def test_large_results_and_arguments_pass_intact(front: LocalCluster) -> None:
    async def check(conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            "SELECT i, repeat('x', 200) AS pad FROM generate_series(1, 50000) i"
        )
        assert len(rows) == 50000 and rows[-1]["i"] == 50000 and len(rows[0]["pad"]) == 200
        big = "y" * 3_000_000
        assert await conn.fetchval("SELECT length($1::text)", big) == len(big)
        await conn.executemany("SELECT $1::int", [(i,) for i in range(500)])

    run(check, front.dsn, timeout=30)


# ---------------------------------------------------------------- 5. rejected statements


@pytest.mark.parametrize(
    "sql",
    [
        "COPY pg_class TO STDOUT",
        "copy (SELECT 1) TO STDOUT",
        "LISTEN channel",
        "NOTIFY channel",
        "UNLISTEN *",
        "SELECT 1; SELECT 2",
        "SELECT 1;SELECT 2;",
        "/* first */ SELECT ';'; SELECT $$;$$",
    ],
)
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_rejected_statements(front: LocalCluster, sql: str, protocol: str) -> None:
    before = stats(front)

    async def check(conn: asyncpg.Connection) -> None:
        with pytest.raises(asyncpg.FeatureNotSupportedError):
            if protocol == "simple":
                await conn.execute(sql)
            else:
                await conn.fetch(sql)
        assert await conn.fetchval("SELECT 1") == 1

    run(check, front.dsn)
    assert stats(front).rejected_statements == before.rejected_statements + 1


def test_asyncpg_copy_and_listeners_are_rejected(front: LocalCluster) -> None:
    async def check(conn: asyncpg.Connection) -> None:
        with pytest.raises(asyncpg.FeatureNotSupportedError):
            await conn.copy_from_query("SELECT 1", output=lambda data: asyncio.sleep(0))
        with pytest.raises(asyncpg.FeatureNotSupportedError):
            await conn.add_listener("channel", lambda *args: None)
        assert await conn.fetchval("SELECT 2") == 2

    run(check, front.dsn)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT ';'",
        "SELECT 1;",
        "SELECT 1; -- a comment",
        "SELECT $tag$a;b$tag$",
        "SELECT E'it\\'s;'",
        'SELECT 1 AS ";"',
    ],
)
def test_one_statement_with_semicolons_is_fine(front: LocalCluster, sql: str) -> None:
    assert count_statements(sql) == 1
    assert run(lambda conn: conn.fetchval(sql), front.dsn) is not None


def test_statement_counting() -> None:
    assert count_statements("") == 0
    assert count_statements(" ; ;") == 0
    assert count_statements("-- nothing") == 0
    assert count_statements("SELECT 1") == 1
    assert count_statements("SELECT 1; SELECT 2") == 2
    assert count_statements("SELECT '--'; SELECT 2") == 2
    assert count_statements("SELECT $$ ; $$ ; SELECT 2 /* ; */") == 2


def test_the_function_call_message_is_rejected(front: LocalCluster, wire: Wire) -> None:
    before = stats(front)
    wire.message(b"F", struct.pack("!Ihhh", 1299, 0, 0, 0))  # oid, formats, arguments, result
    messages = wire.until_ready()
    assert error_code(messages) == "0A000"
    assert messages[-1] == (b"Z", b"I")
    assert_serves(wire)
    assert stats(front).rejected_statements == before.rejected_statements + 1


# ---------------------------------------------------------------- 6. pg_statement_max


def test_the_statement_limit_is_shared_and_freed(make_cluster: MakeCluster) -> None:
    lc = make_cluster(nodes=1, pg_statement_max=3)

    async def check(conn: asyncpg.Connection) -> None:
        other = await asyncpg.connect(lc.dsn)
        held = [await other.prepare("SELECT 1"), await other.prepare("SELECT 2")]
        held.append(await conn.prepare("SELECT 3", name="three"))
        assert stats(lc).statements_in_use == 3
        for client in (conn, other):
            with pytest.raises(asyncpg.InternalServerError) as info:
                await client.prepare("SELECT 4", name="four")
            assert info.value.sqlstate == "XX000"
            assert str(info.value).startswith("Statement storage is full. Current size limit: 3.")
        # Unnamed statements (no statement cache) do not count; the session goes on.
        assert await conn.fetchval("SELECT 5") == 5
        await other.close()  # a client's statements are freed when it disconnects
        assert stats(lc).statements_in_use == 1
        held.append(await conn.prepare("SELECT 6", name="six"))
        assert await held[-1].fetchval() == 6
        assert stats(lc).statements_in_use == 2

    run(check, lc.dsn, statement_cache_size=0)
    assert stats(lc).statements_refused == 2
    assert stats(lc).statements_in_use == 0


def test_close_frees_a_statement(make_cluster: MakeCluster) -> None:
    lc = make_cluster(nodes=1, pg_statement_max=1)
    wire = Wire(lc).login()
    try:
        wire.parse(b"one", b"SELECT 1")
        assert kinds(wire.sync()) == b"1Z"
        wire.parse(b"two", b"SELECT 2")
        messages = wire.sync()
        assert error_code(messages) == "XX000"
        assert stats(lc).statements_in_use == 1
        wire.close_statement(b"one")
        wire.parse(b"two", b"SELECT 2")
        assert kinds(wire.sync()) == b"31Z"
        # A statement whose Parse the server refused does not count.
        wire.close_statement(b"two")
        wire.parse(b"bad", b"SELECT * FROM no_such_table")
        assert error_code(wire.sync()) == "42P01"
        assert stats(lc).statements_in_use == 0
    finally:
        wire.close()


# ---------------------------------------------------------------- 7. malformed messages


@pytest.mark.parametrize(
    "message",
    [
        framed(b"Q", b"SELECT 1\0x\0"),  # a NUL inside the query string
        framed(b"Q", b"SELECT \xff1\0"),  # invalid UTF-8
        framed(b"Q", b"SELECT 1"),  # not terminated
        b"Q\0\0\0\x02",  # a length below 4
        framed(b"z", b""),  # an unknown message type
        framed(b"S", b"abcd"),  # a Sync with a body
    ],
    ids=["nul", "utf8", "unterminated", "length", "type", "sync-body"],
)
def test_a_malformed_message_gets_08p01_and_the_session_stays(
    front: LocalCluster, wire: Wire, message: bytes
) -> None:
    before = stats(front)
    wire.send(message)
    messages = wire.until_ready()
    assert error_code(messages) == "08P01", messages
    assert messages[-1] == (b"Z", b"I")
    assert_serves(wire)
    assert stats(front).malformed_messages == before.malformed_messages + 1


def test_a_malformed_extended_message_skips_to_sync(front: LocalCluster, wire: Wire) -> None:
    wire.parse(b"", b"SELECT 1")
    wire.message(b"B", b"\0\0\0\0\0\x05")  # five parameter values announced, none sent
    wire.message(b"E", b"\0\0\0\0\0")  # skipped
    messages = wire.sync()
    assert kinds(messages) == b"1EZ"
    assert error_code(messages) == "08P01"
    assert_serves(wire)


def test_asyncpg_sees_a_protocol_violation_and_goes_on(front: LocalCluster) -> None:
    async def check(conn: asyncpg.Connection) -> None:
        with pytest.raises(asyncpg.ProtocolViolationError):
            await conn.execute("SELECT 1\x00; DROP TABLE x")
        assert await conn.fetchval("SELECT 3") == 3

    run(check, front.dsn)


def test_postgresql_itself_would_close_the_session(front: LocalCluster) -> None:
    """What the front protects from: the same bytes end a session on PostgreSQL."""
    bare = Wire(front, port=front.server_port("i1")).login()
    try:
        bare.send(b"z\0\0\0\x04")
        with pytest.raises(ConnectionError):
            bare.until_ready()
    finally:
        bare.close()


# ---------------------------------------------------------------- 8. the node's life


def unreachable(lc: LocalCluster, name: str) -> None:
    with pytest.raises(OSError):
        run(lambda conn: conn.fetchval("SELECT 1"), lc.dsn_for(name), timeout=3)


def test_the_front_follows_kill_stop_start(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    node = lc.node("i2")
    assert node.port != lc.server_port("i2")
    assert run(lambda conn: conn.fetchval("SELECT 1"), lc.dsn_for("i2")) == 1
    front_pid = lc.front_pid("i2")
    assert front_pid is not None

    lc.kill("i2")
    assert lc.front_pid("i2") is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((node.host, node.port), timeout=3).close()
    unreachable(lc, "i2")
    lc.start("i2")
    assert lc.front_pid("i2") not in (None, front_pid)
    assert run(lambda conn: conn.fetchval("SELECT 2"), lc.dsn_for("i2")) == 2

    lc.stop("i2")
    assert lc.front_pid("i2") is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((node.host, node.port), timeout=3).close()
    lc.start("i2")
    assert run(lambda conn: conn.fetchval("SELECT 3"), lc.dsn_for("i2")) == 3
    assert stats(lc, "i2").sessions == 0


def test_a_killed_node_drops_its_sessions(local_cluster: LocalCluster) -> None:
    lc = local_cluster

    async def check(conn: asyncpg.Connection) -> None:
        assert await conn.fetchval("SELECT 1") == 1
        assert stats(lc, "i3").sessions == 1
        await asyncio.to_thread(lc.kill, "i3")
        with pytest.raises((asyncpg.InterfaceError, ConnectionError)):
            await conn.fetchval("SELECT 1")

    run(check, lc.dsn_for("i3"))
    assert stats(lc, "i3").sessions == 0


def test_a_front_without_its_server_refuses_logins(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    postmaster = lc.server_pids("i2")[0]
    os.kill(postmaster, signal.SIGKILL)  # the server dies by itself; the front lives on
    assert wait_gone([postmaster], timeout=10.0)
    error = connect_error(lc.dsn_for("i2"))
    assert isinstance(error, asyncpg.PostgresError) and error.sqlstate == "08006"
    assert "cannot reach its server" in str(error)
    lc.start("i2")
    assert run(lambda conn: conn.fetchval("SELECT 1"), lc.dsn_for("i2")) == 1


def test_a_paused_node_accepts_tcp_and_never_answers(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    node = lc.node("i2")
    lc.pause("i2")
    with socket.create_connection((node.host, node.port), timeout=3) as sock:
        sock.settimeout(0.3)
        sock.sendall(struct.pack("!II", 8, 80877103))  # SSLRequest
        with pytest.raises(TimeoutError):
            sock.recv(1)
        lc.resume("i2")
        sock.settimeout(5)
        assert sock.recv(1) == b"N"  # the answer comes once the node runs again
    assert run(lambda conn: conn.fetchval("SELECT 1"), lc.dsn_for("i2")) == 1


def test_a_joining_node_gets_a_front(local_cluster: LocalCluster) -> None:
    lc = local_cluster
    node = lc.add_node()
    assert lc.front_pid(node.name) is not None
    assert node.port != lc.server_port(node.name)
    addresses = run(
        lambda conn: conn.fetch(
            "SELECT p.address FROM _pico_peer_address p JOIN _pico_instance i"
            " ON i.raft_id = p.raft_id WHERE i.name = $1 AND p.connection_type = 'pgproto'",
            node.name,
        ),
        lc.dsn,
    )
    assert [r["address"] for r in addresses] == [f"127.0.0.1:{node.port}"]
    uuid = run(lambda conn: conn.fetchval("SELECT pico_instance_uuid()"), lc.dsn_for(node.name))
    assert uuid == node.uuid


# ---------------------------------------------------------------- 9. catalog strictness


def test_the_catalog_strictness_holds_through_the_front(front: LocalCluster) -> None:
    async def check(conn: asyncpg.Connection) -> None:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT pg_advisory_unlock_all()")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT typname FROM pg_catalog.pg_type LIMIT 1")
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'admin'") is False

    run(check, front.dsn)


def test_a_wrong_password_is_refused_through_the_front(front: LocalCluster) -> None:
    before = stats(front)
    error = connect_error(front.dsn.replace(front.password, "wrong"))
    assert isinstance(error, asyncpg.InvalidPasswordError)
    assert stats(front).logins_refused == before.logins_refused + 1


# ---------------------------------------------------------------- 10. counters


def test_logins_and_sessions_are_counted(front: LocalCluster) -> None:
    before = stats(front)

    async def check(conn: asyncpg.Connection) -> None:
        assert stats(front).sessions == before.sessions + 1
        await conn.prepare("SELECT 1")
        assert stats(front).statements_in_use == before.statements_in_use + 1

    run(check, front.dsn)
    run(check, front.dsn)
    after = stats(front)
    assert after.logins == before.logins + 2
    assert after.sessions == before.sessions
    assert after.statements_in_use == before.statements_in_use


def test_bare_clusters_have_no_front(make_cluster: MakeCluster) -> None:
    lc = make_cluster(nodes=1, strict=False)
    assert lc.server_port("i1") == lc.node("i1").port
    assert lc.front_pid("i1") is None
    with pytest.raises(LocalClusterError, match="strict=False"):
        lc.front_statistics("i1")

    # Bare PostgreSQL: real transactions, and SET sticks.
    async def check(conn: asyncpg.Connection) -> None:
        await conn.execute("BEGIN")
        assert conn.is_in_transaction()
        await conn.execute("SET search_path = nowhere")
        assert await conn.fetchval("SHOW search_path") == "nowhere"

    run(check, lc.dsn)


def test_pg_statement_max_is_checked_at_construction() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="pg_statement_max"):
            LocalCluster(pg_statement_max=bad)  # type: ignore[arg-type]
