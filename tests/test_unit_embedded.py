"""The embedded runner on its own: asyncio work driven by a trio task, no server.

It relies on asyncio internals, so it checks them before use; these tests pin
that check, the fallback to the thread runner, and how the driver runs
callbacks, timers, steps, cancellation and shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import outcome
import pytest
import trio
import trio.testing

from picopyn_actors._bridge import BackendBroken, BackendQueryError, driver, open_backend
from picopyn_actors._bridge import backend as backend_module
from picopyn_actors._bridge import embedded as embedded_module
from picopyn_actors._bridge.embedded import EmbeddedLoop, self_check
from picopyn_actors._dsn import parse_dsn

DSN = parse_dsn("postgresql://admin:pw@127.0.0.1:1/db")


@asynccontextmanager
async def driven_loop() -> AsyncIterator[EmbeddedLoop]:
    loop = EmbeddedLoop()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.drive)
        try:
            yield loop
        finally:
            await loop.aclose()


def test_the_internals_it_needs_are_there_on_this_python() -> None:
    assert self_check() is None


def test_the_check_names_a_missing_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncio.SelectorEventLoop, "_run_once", None)
    problem = self_check.__wrapped__()
    assert problem is not None and problem.endswith("SelectorEventLoop._run_once is missing")


def test_the_check_notices_an_iteration_that_does_not_run_callbacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asyncio.SelectorEventLoop, "_run_once", lambda self: None)
    problem = self_check.__wrapped__()
    assert problem is not None and "timer" in problem


async def test_a_failed_check_falls_back_to_the_thread_runner_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(
        "picopyn_actors._bridge.backend.self_check", lambda: "Handle._run is missing"
    )
    caplog.set_level(logging.WARNING, logger="picopyn_actors")
    async with open_backend(DSN, 1.0, {}, "embedded") as backend:
        assert backend.kind == "thread"
        with pytest.raises(BackendBroken):  # it works: port 1 refuses
            await backend.connect(DSN.hosts[0])
    (record,) = caplog.records
    assert "Handle._run is missing" in record.getMessage()
    assert "thread runner" in record.getMessage()


async def test_it_runs_coroutines_timers_and_callbacks() -> None:
    async with driven_loop() as loop:

        async def work() -> str:
            await asyncio.sleep(0.01)
            future = loop.create_future()
            loop.call_later(0.01, future.set_result, "done")
            return await future

        assert await loop.await_coro(work) == "done"


async def test_a_callback_that_raises_is_logged_and_the_loop_runs_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A ready callback is a partial whose run does not catch: the driver
    # does, logs it through the loop's handler, and runs the rest.
    caplog.set_level(logging.DEBUG, logger="picopyn_actors._bridge")
    async with driven_loop() as loop:
        ran: list[str] = []
        done = trio.Event()

        def boom() -> None:
            raise ValueError("a bug in a callback")

        def later() -> None:
            ran.append("later")
            done.set()

        loop.call_soon(boom)
        handle = loop.call_soon(ran.append, "cancelled")
        handle.cancel()
        assert handle.cancelled()
        loop.call_soon(later)
        loop.kick()
        with trio.fail_after(5):
            await done.wait()
        assert ran == ["later"]
        assert any("a bug in a callback" in r.getMessage() for r in caplog.records)

        async def work() -> str:
            await asyncio.sleep(0)
            return "still driven"

        assert await loop.await_coro(work) == "still driven"


async def test_a_step_reports_its_outcome_once() -> None:
    async with driven_loop() as loop:
        outcomes: list[outcome.Outcome[Any]] = []
        finished = trio.Event()

        def on_done(result: outcome.Outcome[Any]) -> None:
            outcomes.append(result)
            finished.set()

        async def query() -> int:
            future = loop.create_future()
            loop.call_later(0.01, future.set_result, 42)
            return await future

        loop.start_step(query(), on_done)
        await finished.wait()
        await trio.sleep(0.05)
        assert [o.unwrap() for o in outcomes] == [42]


class _CountingEpoll:
    """The driver's epoll set, counting its polls: one per pass of the driver."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.polls = 0

    def poll(self, timeout: float = -1) -> Any:
        self.polls += 1
        return self.inner.poll(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Answering(asyncio.Protocol):
    """Answers its future with ``rows`` rows when data arrives, noting the pass."""

    def __init__(self, loop: EmbeddedLoop, hot: _CountingEpoll, rows: int) -> None:
        self.future: asyncio.Future[list[None]] = loop.create_future()
        self.hot = hot
        self.rows = rows
        self.read_in_pass: int | None = None

    def data_received(self, data: bytes) -> None:
        self.read_in_pass = self.hot.polls
        self.future.set_result([None] * self.rows)


@pytest.mark.parametrize(
    ("rows", "same_pass"), [(1, True), (embedded_module._ROWS_PER_PASS, False)]
)
async def test_a_pass_that_handed_over_many_rows_yields_before_reading_more(
    rows: int, same_pass: bool
) -> None:
    # Two sockets with their answers waiting: small answers are read in one
    # pass; after a big one the driver yields to trio before the next read.
    loop = EmbeddedLoop()
    hot = loop._hot = _CountingEpoll(loop._hot)  # type: ignore[assignment]
    pairs = [socket.socketpair() for _ in range(2)]
    protocols = [_Answering(loop, hot, rows) for _ in pairs]
    answered: list[int] = []
    both = trio.Event()

    def on_done(result: outcome.Outcome[Any]) -> None:
        answered.append(len(result.unwrap()))
        if len(answered) == 2:
            both.set()

    async def wait_for(future: asyncio.Future[list[None]]) -> list[None]:
        return await future

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.drive)
        try:
            for (ours, _), protocol in zip(pairs, protocols, strict=True):
                ours.setblocking(False)
                loop._make_socket_transport(ours, protocol)  # type: ignore[attr-defined]
                loop.start_step(wait_for(protocol.future), on_done)
            loop.kick()
            await trio.testing.wait_all_tasks_blocked()
            assert len(loop._hot_readers) == 2
            for _, theirs in pairs:  # in one trio step: the driver sees both at once
                theirs.send(b"x")
            with trio.fail_after(5):
                await both.wait()
            assert answered == [rows, rows]
            first, second = (p.read_in_pass for p in protocols)
            assert (first == second) is same_pass
        finally:
            await loop.aclose()
            for ours, theirs in pairs:
                ours.close()
                theirs.close()


class _Answers(asyncio.Protocol):
    """Answers one future per read with ``_ROWS_PER_PASS`` rows, noting the order
    of the reads in ``reads``; its first read makes its next answer arrive at once."""

    def __init__(self, loop: EmbeddedLoop, name: str, reads: list[str]) -> None:
        self.futures: list[asyncio.Future[list[None]]] = [loop.create_future() for _ in range(2)]
        self.name = name
        self.reads = reads
        self.read = 0
        self.peer: socket.socket | None = None

    def data_received(self, data: bytes) -> None:
        self.reads.append(self.name)
        self.futures[self.read].set_result([None] * embedded_module._ROWS_PER_PASS)
        self.read += 1
        if self.peer is not None:
            self.peer.send(b"next")  # as when a queued request is sent on it at once
            self.peer = None


async def test_sockets_a_pass_left_unread_go_before_one_read_again() -> None:
    # Three sockets with a big answer waiting; the one read first has its next
    # answer back before the next pass. The poll (level-triggered) lists it
    # first again, but the two that waited are read before it.
    loop = EmbeddedLoop()
    reads: list[str] = []
    pairs = [socket.socketpair() for _ in range(3)]
    protocols = [_Answers(loop, name, reads) for name in "abc"]
    answered: list[int] = []
    done = trio.Event()

    def on_done(result: outcome.Outcome[Any]) -> None:
        answered.append(len(result.unwrap()))
        if len(answered) == 4:
            done.set()

    async def wait_for(future: asyncio.Future[list[None]]) -> list[None]:
        return await future

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.drive)
        try:
            for (ours, theirs), protocol in zip(pairs, protocols, strict=True):
                ours.setblocking(False)
                protocol.peer = theirs
                loop._make_socket_transport(ours, protocol)  # type: ignore[attr-defined]
                for future in protocol.futures:
                    loop.start_step(wait_for(future), on_done)
            loop.kick()
            await trio.testing.wait_all_tasks_blocked()
            assert len(loop._hot_readers) == 3
            for _, theirs in pairs:  # in one trio step: the driver sees all three at once
                theirs.send(b"x")
            with trio.fail_after(5):
                await done.wait()
            first = reads[0]
            assert len(set(reads[:3])) == 3, reads  # each waiting socket once ...
            assert reads[3] == first, reads  # ... before the first one's next answer
        finally:
            await loop.aclose()
            for ours, theirs in pairs:
                ours.close()
                theirs.close()


class _Rally(asyncio.Protocol):
    """Busy traffic on one socket: each read answers the oldest waiting future and
    has the peer send again at once, while ``playing``."""

    def __init__(self, peer: socket.socket) -> None:
        self.peer = peer
        self.futures: list[asyncio.Future[int]] = []
        self.reads = 0
        self.playing = True

    def data_received(self, data: bytes) -> None:
        self.reads += 1
        if self.futures:
            self.futures.pop(0).set_result(self.reads)
        if self.playing:
            self.peer.send(b"x")


async def test_a_busy_driver_polls_again_and_still_runs_timers_and_kicks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # While a pass reads answers and others are still out, the driver polls
    # again after a yield instead of waiting on trio (one epoll_ctl each time).
    # Neither a timer that falls due nor work handed over from trio waits
    # for the traffic to stop, and other trio tasks run meanwhile.
    waits = 0
    wait_readable = trio.lowlevel.wait_readable

    async def counting_wait(fd: Any) -> None:
        nonlocal waits
        waits += 1
        await wait_readable(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counting_wait)
    loop = EmbeddedLoop()
    hot = loop._hot = _CountingEpoll(loop._hot)  # type: ignore[assignment]
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    rally = _Rally(theirs)
    answered = 0
    rallying = trio.Event()

    async def wait_for(future: asyncio.Future[int]) -> int:
        return await future

    def next_query(result: outcome.Outcome[Any] | None = None) -> None:
        # One query always out: each answer sends the next.
        nonlocal answered
        if result is not None:
            result.unwrap()
            answered += 1
            if answered == 50:
                rallying.set()
        future: asyncio.Future[int] = loop.create_future()
        rally.futures.append(future)
        loop.start_step(wait_for(future), next_query)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.drive)
        try:
            loop._make_socket_transport(ours, rally)  # type: ignore[attr-defined]
            next_query()
            await trio.testing.wait_all_tasks_blocked()
            theirs.send(b"x")
            with trio.fail_after(5):
                await rallying.wait()  # the rally is on (and this task runs)
            polls, waited = hot.polls, waits
            fired = trio.Event()
            loop.call_later(0.01, fired.set)
            with trio.fail_after(5):
                await fired.wait()  # a timer falls due mid-rally
                assert await loop.await_coro(lambda: asyncio.sleep(0, "handed")) == "handed"
            assert hot.polls - polls > 10
            assert waits - waited <= 1, (waits - waited, hot.polls - polls)
        finally:
            rally.playing = False
            await loop.aclose()
            ours.close()
            theirs.close()


async def test_cancelling_a_wait_cancels_its_asyncio_task_promptly() -> None:
    async with driven_loop() as loop:
        cancelled = trio.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with trio.move_on_after(0.05) as scope:
            await loop.await_coro(forever)
        assert scope.cancelled_caught
        assert cancelled.is_set()


async def test_a_task_that_ignores_cancellation_is_given_up_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(embedded_module, "CANCEL_GRACE", 0.1)
    async with driven_loop() as loop:

        async def stubborn() -> None:
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue  # a misbehaving task: it swallows the cancel

        start = trio.current_time()
        with trio.move_on_after(0.05) as scope:
            await loop.await_coro(stubborn)
        assert scope.cancelled_caught
        assert trio.current_time() - start < 2.0


async def test_closing_wakes_every_waiter_and_stops_the_driver() -> None:
    loop = EmbeddedLoop()
    results: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.drive)

        async def wait_for_ever() -> None:
            async def stubborn() -> None:
                while True:
                    try:
                        await asyncio.sleep(3600)
                    except asyncio.CancelledError:
                        continue

            try:
                await loop.await_coro(stubborn)
            except BaseException as exc:
                results.append(exc)

        nursery.start_soon(wait_for_ever)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            await loop.aclose()
    assert len(results) == 1 and isinstance(results[0], BackendBroken)
    assert loop.is_closed()


async def test_the_driver_ignores_a_cancellation_from_outside_until_closed() -> None:
    loop = EmbeddedLoop()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.drive)
        nursery.cancel_scope.cancel()  # what a cancelled open_cluster does
        # The loop still serves the waits that are under way.
        with trio.CancelScope(shield=True):
            assert await loop.await_coro(lambda: asyncio.sleep(0.01, "still here")) == (
                "still here"
            )
            await loop.aclose()


class _FakeProtocol:
    def __init__(self, in_transaction: bool) -> None:
        self.in_transaction = in_transaction

    def is_in_transaction(self) -> bool:
        return self.in_transaction


class _FakeConnection:
    """What :func:`driver.recover` touches of an asyncpg connection."""

    def __init__(self, *, in_transaction: bool = False) -> None:
        self._protocol = _FakeProtocol(in_transaction)
        self.calls: list[str] = []

    async def reload_schema_state(self) -> None:
        self.calls.append("reload")
        await asyncio.sleep(0)

    def _drop_global_statement_cache(self) -> None:
        self.calls.append("drop")

    async def fetchval(self, query: str, *args: Any) -> Any:
        self.calls.append(f"fetchval {query} {args}")
        return "again"


def _stepped(loop: EmbeddedLoop, error: BaseException, conn: _FakeConnection) -> Any:
    """Run a fast-path stepper whose coroutine raises ``error``; return its outcome."""

    async def failing() -> Any:
        raise error

    results: list[outcome.Outcome[Any]] = []
    reported = trio.Event()

    def on_done(result: outcome.Outcome[Any]) -> None:
        results.append(result)
        reported.set()

    step = embedded_module._Stepper(loop, failing(), on_done)
    step.retry = (conn, "fetchval", "SELECT $1", (1,))
    return step, results, reported


async def test_an_outdated_type_cache_is_reloaded_then_raised_as_asyncpg_does() -> None:
    async with driven_loop() as loop:
        conn = _FakeConnection()
        error = asyncpg.exceptions.OutdatedSchemaCacheError("type changed")
        step, results, reported = _stepped(loop, error, conn)
        step.step()
        with trio.fail_after(5):
            await reported.wait()
        assert conn.calls == ["reload"]
        # Classified as the public method's error is (an asyncpg client error).
        with pytest.raises(BackendBroken, match="type changed"):
            results[0].unwrap()


async def test_a_changed_result_type_runs_the_public_method_again() -> None:
    async with driven_loop() as loop:
        conn = _FakeConnection()
        error = asyncpg.exceptions.InvalidCachedStatementError("cached plan changed")
        step, results, _ = _stepped(loop, error, conn)
        step.step()
        assert conn.calls == ["drop", "fetchval SELECT $1 (1,)"]
        assert [r.unwrap() for r in results] == ["again"]


async def test_a_changed_result_type_in_a_transaction_is_raised() -> None:
    async with driven_loop() as loop:
        conn = _FakeConnection(in_transaction=True)
        error = asyncpg.exceptions.InvalidCachedStatementError("cached plan changed")
        step, results, _ = _stepped(loop, error, conn)
        step.step()
        assert conn.calls == ["drop"]
        with pytest.raises(BackendQueryError):
            results[0].unwrap()


def test_the_fast_path_check_names_a_missing_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(asyncpg.Connection, "fetchval")
    problem = driver.self_check.__wrapped__()
    assert problem == "asyncpg.Connection.fetchval is missing"
    monkeypatch.undo()
    assert driver.self_check.__wrapped__() is None


def test_the_fast_path_check_names_a_missing_statement_cache_internal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(asyncpg.connection._StatementCache, "__slots__", ("_loop",))
    problem = driver.self_check.__wrapped__()
    assert problem == "asyncpg's _StatementCache has no _entries"
    monkeypatch.undo()
    assert driver.self_check.__wrapped__() is None


async def test_a_failed_fast_path_check_uses_asyncpgs_methods_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(driver, "self_check", lambda: "asyncpg.Connection has no _stmt_cache")
    backend_module.fast_queries.cache_clear()
    caplog.set_level(logging.WARNING, logger="picopyn_actors")
    try:
        async with open_backend(DSN, 1.0, {}, "embedded") as backend:
            assert backend.kind == "embedded"
            assert backend._runner.fast_queries is False  # type: ignore[attr-defined]
        async with open_backend(DSN, 1.0, {}, "embedded"):
            pass
    finally:
        backend_module.fast_queries.cache_clear()
    (record,) = caplog.records
    assert "no _stmt_cache" in record.getMessage()
    assert "public methods" in record.getMessage()
