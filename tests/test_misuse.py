"""Misuse and bad input: clear errors at construction, never blamed on the network.

Unit tests on the fake backend in virtual time, and the ones whose bug lived
in the real bridge against the stand-in cluster.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
import trio
import trio.testing
from fakes import FakeCluster, wait_all_states
from helpers import FAST
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import picopyn_actors as pa
from picopyn_actors._dsn import parse_dsn, redact, redact_dsn
from picopyn_actors._request import changes_session
from picopyn_actors.testing import LocalCluster

UP = pa.NodeState.UP
SECRET = "Xyzzy-Pw-42"


# -- DSNs: the password is never shown, whatever it holds ------------------------------


@pytest.mark.parametrize(
    "password", ["pa/ss", "S3cr@t:p/w?x#y%z", "a?b", "c#d", "two words", "@@/@"]
)
def test_unencoded_special_characters_in_a_password_parse(password: str) -> None:
    dsn = parse_dsn(f"postgresql://admin:{password}@127.0.0.1:5000/db")
    assert dsn.user == "admin"
    assert dsn.password == password.replace("%z", "%z")
    assert dsn.hosts == (pa.Address("127.0.0.1", 5000),)
    assert dsn.database == "db"
    assert password not in str(dsn) and password not in repr(dsn)


@pytest.mark.parametrize("password", ["pa/ss", "S3cr@t:p/w?x#y%z", "top@Secret9"])
def test_a_bad_dsn_never_shows_the_password(password: str) -> None:
    with pytest.raises(pa.ConfigError) as info:
        parse_dsn(f"postgresql://admin:{password}@127.0.0.1:99999/db")
    assert "bad port" in str(info.value)
    for fragment in (password, password[-4:]):
        assert fragment not in str(info.value)


# Random passwords between two marker characters that no message of the
# library holds: seeing either marker anywhere is a leak, even of a part.
_START, _END = "\u00a7", "\u00a4"
_passwords = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00%\u00a7\u00a4"), max_size=24
).map(lambda middle: f"{_START}{middle}{_END}")
_tails = st.sampled_from(
    [
        "127.0.0.1:5000/db",
        "h1,h2:7/db",
        "[::1]:99999/db",
        "h1:port/db",
        "h1/db?sslmode=bogus",
        "h1/db?connect_timeout=abc",
        "h1/db?nope=1",
        "h1/db#frag",
        "",
        "h1",
    ]
)


def _leaks(shown: str) -> bool:
    return _START in shown or _END in shown


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=_passwords, tail=_tails, scheme=st.sampled_from(["postgresql://", "postgres://"]))
def test_fuzzed_dsns_never_show_the_password(password: str, tail: str, scheme: str) -> None:
    text = f"{scheme}admin:{password}@{tail}"
    assert not _leaks(redact_dsn(text))
    assert not _leaks(redact(f"failed: {text} (and more)", password))
    try:
        dsn = parse_dsn(text)
    except pa.ConfigError as exc:
        assert not _leaks(str(exc)) and not _leaks(repr(exc))
        return
    assert dsn.password == password
    config = pa.ClusterConfig.create(text)
    for shown in (str(dsn), repr(dsn), repr(config), str(config)):
        assert not _leaks(shown)


async def test_messages_and_logs_never_show_the_password(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    password = "Pw/with?odd#chars@42"
    fake = FakeCluster(2)
    caplog.set_level(logging.DEBUG, logger="picopyn_actors")
    fake["i2"].down()
    async with fake.open("i1", "i2", password=password) as cluster:
        await trio.testing.wait_all_tasks_blocked()
        assert repr(cluster) and password not in repr(cluster)
        fake["i1"].down()
        with pytest.raises(pa.NoNodesAvailable) as info:
            await cluster.fetchval("whoami", idempotent=True)
        assert password not in str(info.value)
    fake["i1"].down()
    with pytest.raises(pa.NoNodesAvailable) as info:
        async with pa.open_cluster(
            fake.dsn("i1", "i2", password=password), backend=fake, connect_timeout=1.0
        ):
            pass  # pragma: no cover
    assert password not in str(info.value)
    assert len(caplog.records) > 5
    for record in caplog.records:
        assert password not in record.getMessage()


# -- options: every one checked at construction, with a ConfigError naming it -----------

DSN = f"postgresql://admin:{SECRET}@h1,h2/db"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"bogus_option": 1}, "bogus_option"),
        ({"command_timeout": 5}, "command_timeout"),
        ({"command_timeout": -1}, "command_timeout"),
        ({"statement_cache_size": -5}, "statement_cache_size"),
        ({"ssl": "bogus"}, "ssl"),
        ({"server_settings": 5}, "server_settings"),
        ({"server_settings": {"a": 1}}, "server_settings"),
        ({"probe_timeout": 10**400}, "probe_timeout"),
        ({"connect_timeout": float("inf")}, "connect_timeout"),
        ({"connections_per_node": 100000}, "connections_per_node"),
        ({"max_attempts": 10**6}, "max_attempts"),
        ({"events_buffer": 10**9}, "events_buffer"),
        ({"max_cached_statement_lifetime": -1}, "max_cached_statement_lifetime"),
    ],
)
def test_bad_options_are_refused_at_construction(options: dict[str, Any], named: str) -> None:
    with pytest.raises(pa.ConfigError, match=named) as info:
        pa.open_cluster(DSN, **options)
    assert SECRET not in str(info.value)
    if named == "connections_per_node":
        with pytest.raises(pa.ConfigError, match="pool_size"):
            pa.Client(DSN, pool_size=options[named])
    else:
        with pytest.raises(pa.ConfigError, match=named):
            pa.Client(DSN, **options)


def test_command_timeout_points_to_the_timeout_argument() -> None:
    with pytest.raises(pa.ConfigError, match=r"cancel request.*timeout="):
        pa.open_cluster(DSN, command_timeout=5)


def test_good_asyncpg_options_pass() -> None:
    config = pa.ClusterConfig.create(
        DSN, ssl="require", statement_cache_size=0, server_settings={"application_name": "x"}
    )
    assert config.connect_kwargs["statement_cache_size"] == 0


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("connect_timeout=abc", "connect_timeout"),
        ("connect_timeout=-1", "connect_timeout"),
        ("connect_timeout=0", "connect_timeout"),
        ("connect_timeout=nan", "connect_timeout"),
        ("connect_timeout=inf", "connect_timeout"),
        ("sslmode=bogus", "sslmode"),
    ],
)
def test_bad_dsn_parameters_are_config_errors(query: str, named: str) -> None:
    with pytest.raises(pa.ConfigError, match=named):
        pa.open_cluster(f"postgresql://admin:{SECRET}@h1/db?{query}")


def test_a_port_in_other_digits_is_refused() -> None:
    with pytest.raises(pa.ConfigError, match="bad port"):
        parse_dsn("postgresql://admin@h1:\u0665\u0660\u0660\u0660/db")


def test_a_fragment_is_refused_not_taken_for_the_database() -> None:
    with pytest.raises(pa.ConfigError, match="fragment"):
        parse_dsn("postgresql://admin@h1/db#frag")


async def test_call_arguments_are_checked(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open() as cluster:
        # A ConfigError naming the argument, and a TypeError too.
        for bad in ({"timeout": "5"}, {"timeout": -1}, {"idempotent": "yes"}):
            with pytest.raises(pa.ConfigError, match=next(iter(bad))) as caught:
                await cluster.fetchval("whoami", **bad)
            assert isinstance(caught.value, TypeError)
        assert await cluster.fetchval("whoami", timeout=10**400) == "i1"
        with pytest.raises(TypeError, match="timeout"):
            async with cluster.connection(timeout="1"):
                pass  # pragma: no cover
    assert fake.queries() == {"i1": 1}


async def test_open_cluster_cannot_be_entered_twice(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    opener = pa.open_cluster(fake.dsn(), backend=fake)
    async with opener as cluster:
        assert await cluster.fetchval("whoami") == "i1"
    with pytest.raises(RuntimeError, match="entered already"):
        async with opener:
            pass  # pragma: no cover


# -- bad query text: a QueryError before anything is sent -----------------------------


@pytest.mark.parametrize(
    ("query", "reason"),
    [("SELECT 'a\x00b'", "NUL"), ("SELECT '\ud800'", "surrogate"), (b"SELECT 1", "str")],
)
async def test_bad_query_text_is_refused_before_sending(
    autojump_clock: object, query: Any, reason: str
) -> None:
    fake = FakeCluster(3)
    async with fake.open() as cluster:
        await wait_all_states(cluster, fake.nodes, UP)
        await trio.testing.wait_all_tasks_blocked()
        before = cluster.statistics()
        with pytest.raises(pa.QueryError, match=reason) as info:
            await cluster.fetchval(query, idempotent=True)
        assert info.value.node is None and info.value.sqlstate is None
        assert "(not sent)" in str(info.value)
        async with cluster.connection() as conn:
            with pytest.raises(pa.QueryError, match=reason):
                await conn.fetchval(query)
            assert await conn.fetchval("whoami")
        assert sum(fake.queries().values()) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert all(n.state is UP for n in cluster.nodes())
        after = cluster.statistics()
        assert after.events_published == before.events_published  # no node changed state
        assert after.requests_retried == 0
        assert sum(s.reconnects for s in after.nodes.values()) == 0


async def test_a_query_that_ends_its_session_does_not_blame_the_node(
    autojump_clock: object,
) -> None:
    fake = FakeCluster(3)
    async with fake.open() as cluster:
        await trio.testing.wait_all_tasks_blocked()
        reconnects = cluster.statistics().nodes
        with pytest.raises(pa.QueryError) as info:
            await cluster.fetchval("fatal sql", idempotent=True)
        assert info.value.sqlstate == "08P01"
        assert sum(fake.executed("fatal sql").values()) == 1  # not retried elsewhere
        await trio.testing.wait_all_tasks_blocked()
        assert all(n.state is UP for n in cluster.nodes())
        # The closed connection was replaced, and the next request is served.
        assert await cluster.fetchval("whoami", idempotent=True)
        after = cluster.statistics().nodes
        assert sum(s.reconnects for s in after.values()) == 1 + sum(
            s.reconnects for s in reconnects.values()
        )


# -- pinned connections ------------------------------------------------------------------


async def test_a_pinned_connection_serves_one_task_at_a_time(autojump_clock: object) -> None:
    fake = FakeCluster(1, service_time=1.0)
    async with fake.open() as cluster, cluster.connection() as conn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.fetchval, "whoami")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError, match="another task"):
                await conn.fetchval("whoami")
        assert await conn.fetchval("whoami") == "i1"


async def test_pinned_session_state_costs_the_connection(autojump_clock: object) -> None:
    fake = FakeCluster(1)

    def replaced() -> int:
        return cluster.statistics().nodes["i1"].reconnects

    async with fake.open(connections_per_node=1) as cluster:
        await trio.testing.wait_all_tasks_blocked()
        async with cluster.connection() as conn:
            assert await conn.fetchval("whoami") == "i1"
        await trio.testing.wait_all_tasks_blocked()
        assert replaced() == 0  # a clean session is kept
        async with cluster.connection() as conn:
            with pytest.raises(pa.QueryError):
                await conn.execute("SET search_path = nowhere")
        await trio.testing.wait_all_tasks_blocked()
        assert replaced() == 1  # replaced, so nobody else inherits it
        assert await cluster.fetchval("whoami") == "i1"


@pytest.mark.parametrize(
    ("query", "changes"),
    [
        ("SELECT 1", False),
        ("select 'a; b'", False),
        ("WITH x AS (SELECT 1) SELECT * FROM x", False),
        ("CREATE TABLE t (a int)", False),
        ("SET search_path = x", True),
        ("/* first */ SET search_path = x", True),
        ("-- first\nset x = 1", True),
        ("SELECT 1; SET x = 1", True),
        ("  begin", True),
        ("CREATE TEMP TABLE t (a int)", True),
        ("create global temporary table t (a int)", True),
        ("SELECT set_config('a', 'b', false)", True),
        ("DO $$ BEGIN PERFORM 1; END $$", True),
    ],
)
def test_which_statements_may_leave_session_state(query: str, changes: bool) -> None:
    assert changes_session(query) is changes


async def test_pinned_session_state_never_leaks_on_postgresql(
    shared_cluster: LocalCluster,
) -> None:
    async with pa.open_cluster(shared_cluster.dsn, connections_per_node=1, **FAST) as cluster:
        for setting in (
            "SET statement_timeout = '1ms'",
            "SET search_path = nowhere",
            "/* a comment first */ SET search_path = nowhere",
        ):
            for _ in range(len(cluster.nodes())):  # round robin: one pin per node
                async with cluster.connection() as conn:
                    await conn.execute(setting)
        async with cluster.connection() as conn, conn_transaction(conn):
            pass
        for _ in range(30):
            assert await cluster.fetchval("SELECT count(*) FROM _pico_instance") == 3
            assert await cluster.fetchval("SELECT pg_sleep(0.002)::text") == ""


async def test_session_state_after_a_comment_or_another_statement_never_leaks(
    make_cluster: Any,
) -> None:
    """On bare PostgreSQL, which runs a text of several statements (Picodata and
    the strict stand-in refuse one)."""
    lc = make_cluster(nodes=1, strict=False)
    options: dict[str, Any] = {**FAST, "dialect": "postgresql", "connections_per_node": 1}
    async with pa.open_cluster(lc.dsn, **options) as cluster:
        for setting in (
            "/* a comment first */ SET search_path = nowhere",
            "SELECT 1; SET search_path = nowhere",
            "SELECT 1; CREATE TEMP TABLE kept (a int)",
        ):
            async with cluster.connection() as conn:
                await conn.execute(setting)
            assert await cluster.fetchval("SELECT count(*) FROM _pico_instance") == 1
            kept = "SELECT count(*) FROM pg_tables WHERE tablename = 'kept'"
            assert await cluster.fetchval(kept) == 0


def conn_transaction(conn: pa.PinnedConnection) -> Any:
    """An open transaction left behind by the body, for the test above."""

    class _Begin:
        async def __aenter__(self) -> None:
            await conn.execute("BEGIN")

        async def __aexit__(self, *exc: object) -> None:
            return None

    return _Begin()


# -- use from another trio run, thread or asyncio ----------------------------------------


async def test_use_from_another_thread_or_run_is_a_clear_error(autojump_clock: object) -> None:
    fake = FakeCluster(1)
    async with fake.open() as cluster:
        errors: list[BaseException] = []

        def other_trio_run() -> None:
            async def use() -> None:
                await cluster.fetchval("whoami")

            try:
                trio.run(use)
            except BaseException as exc:
                errors.append(exc)

        def in_asyncio() -> None:
            try:
                asyncio.run(cluster.fetchval("whoami"))
            except BaseException as exc:
                errors.append(exc)

        for target in (other_trio_run, in_asyncio):
            thread = threading.Thread(target=target)
            thread.start()
            thread.join(10)
            assert not thread.is_alive()
        assert [type(e) for e in errors] == [RuntimeError, RuntimeError]
        for error in errors:
            assert "the trio run that opened it" in str(error)
        assert await cluster.fetchval("whoami") == "i1"
        assert fake.queries() == {"i1": 1}


def test_use_from_the_host_loop_of_a_guest_run_is_a_clear_error() -> None:
    # The same thread as the trio run that opened the cluster, but not in
    # trio: asyncio code hosting trio in guest mode.
    fake = FakeCluster(1)
    seen: list[BaseException] = []

    async def host() -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[tuple[pa.Cluster, trio.lowlevel.TrioToken, trio.Event]]
        opened = loop.create_future()
        finished: asyncio.Future[None] = loop.create_future()

        async def guest() -> None:
            async with fake.open() as cluster:
                release = trio.Event()
                opened.set_result((cluster, trio.lowlevel.current_trio_token(), release))
                await release.wait()
                assert await cluster.fetchval("whoami") == "i1"

        trio.lowlevel.start_guest_run(
            guest,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=lambda result: finished.set_result(None),
        )
        cluster, token, release = await opened
        try:
            await cluster.fetchval("whoami")
        except RuntimeError as exc:
            seen.append(exc)
        token.run_sync_soon(release.set)
        await finished

    # A plain asyncio loop (asyncio.run would make trio-asyncio's, itself in trio).
    loop = asyncio.SelectorEventLoop()
    try:
        loop.run_until_complete(host())
    finally:
        loop.close()
    assert len(seen) == 1 and "the trio run that opened it" in str(seen[0])
    assert fake.queries() == {"i1": 1}


# -- the compat Client -----------------------------------------------------------------


async def test_client_connects_from_any_task_and_only_once(autojump_clock: object) -> None:
    fake = FakeCluster(2)
    client = pa.Client(fake.dsn(), backend=fake)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.connect)
        nursery.start_soon(client.connect)
    # The task that connected is gone; the client still works.
    assert await client.fetchrow("whoami")
    assert fake.total_connects() <= 2 * (1 + 2) + 2  # one discovery and one session per node
    async with client:
        async with client:
            assert await client.execute("INSERT INTO t VALUES (1)") == "INSERT 0 1"
        assert await client.execute("INSERT INTO t VALUES (2)") == "INSERT 0 1"
    with pytest.raises(pa.ClusterClosed):
        await client.fetch("whoami")


async def test_client_connect_cancelled_leaves_nothing_open(autojump_clock: object) -> None:
    fake = FakeCluster(1, connect_time=5.0)
    client = pa.Client(fake.dsn(), backend=fake)
    with trio.move_on_after(1.0):
        await client.connect()
    await trio.testing.wait_all_tasks_blocked()
    assert fake.open_connections() == {"i1": 0}
    with pytest.raises(pa.ClusterClosed):
        await client.fetch("whoami")


def test_client_refuses_unknown_keywords_at_construction() -> None:
    with pytest.raises(pa.ConfigError, match="bogus"):
        pa.Client(DSN, bogus=1)


# -- Picodata's session options --------------------------------------------------------


def test_every_connection_asks_for_statement_invalidation() -> None:
    assert pa.ClusterConfig.create(DSN).startup_options == "pico_stmt_invalidation=true"


def test_pico_options_are_merged_checked_and_rendered() -> None:
    config = pa.ClusterConfig.create(
        f"postgresql://admin:{SECRET}@h1/db?options=read_preference%3Dany%2Csql_motion_row_max%3D5",
        pico_options={"read_preference": "replica", "pico_query_metadata": True},
    )
    assert config.startup_options == (
        "pico_stmt_invalidation=true,read_preference=replica,sql_motion_row_max=5,"
        "pico_query_metadata=true"
    )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"bogus": "1"}, "unknown Picodata session option 'bogus'"),
        ({"read_preference": "nearest"}, "read_preference must be one of"),
        ({"pico_stmt_invalidation": "yes"}, "pico_stmt_invalidation must be true or false"),
        ({"sql_vdbe_opcode_max": -1}, "sql_vdbe_opcode_max must be an integer"),
        ({"sql_vdbe_opcode_max": True}, "sql_vdbe_opcode_max must be an integer"),
        ("read_preference", "not a key=value pair"),
        (42, "must be a mapping"),
    ],
)
def test_bad_pico_options_are_refused_at_construction(options: object, named: str) -> None:
    with pytest.raises(pa.ConfigError, match=named):
        pa.open_cluster(DSN, pico_options=options)


def test_a_bad_options_parameter_in_the_dsn_is_refused() -> None:
    with pytest.raises(pa.ConfigError, match="the DSN's options"):
        pa.open_cluster(f"postgresql://admin:{SECRET}@h1/db?options=read_preference")


def test_plain_postgresql_sends_no_picodata_options() -> None:
    assert pa.ClusterConfig.create(DSN, dialect="postgresql").startup_options is None
    with pytest.raises(pa.ConfigError, match="dialect='picodata'"):
        pa.open_cluster(DSN, dialect="postgresql", pico_options={"read_preference": "any"})
    with pytest.raises(pa.ConfigError, match="dialect"):
        pa.open_cluster(DSN, dialect="mysql")


def test_picodata_options_cannot_hide_in_server_settings() -> None:
    for key in ("options", "pico_stmt_invalidation"):
        with pytest.raises(pa.ConfigError, match="pico_options="):
            pa.open_cluster(DSN, server_settings={key: "x"})
