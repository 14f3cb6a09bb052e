"""The bridge to asyncpg: the only module that imports asyncpg and trio_asyncio.

asyncpg is asyncio-only; trio code reaches it through a trio-asyncio loop.
Everything the actors need from a server connection is the small
:class:`Connection` protocol below, so that the bridge can change (or a fake
backend stand in for it, in unit tests) without touching the actors.

Errors are classified here, once:

* :class:`BackendQueryError`: the server (or asyncpg, before sending) rejected
  the query; the connection stays usable.
* :class:`BackendBroken`: the connection is gone. ``sent`` tells whether the
  request may have reached the server.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import selectors
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, Protocol

import asyncpg
import outcome
import trio
import trio_asyncio

from ._dsn import Address, Dsn, redact

log = logging.getLogger(__name__)

__all__ = [
    "AsyncpgBackend",
    "Backend",
    "BackendBroken",
    "BackendQueryError",
    "Connection",
    "open_backend",
    "submit",
]

# SQLSTATE classes and codes that mean "this connection is finished".
_BROKEN_SQLSTATE_PREFIXES = ("08",)
_BROKEN_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# Class-08 codes that are the request's fault, not the connection's: Picodata
# answers a protocol violation and keeps the session (PostgreSQL closes it;
# the node actor then replaces the connection without blaming the node).
_QUERY_SQLSTATES = frozenset({"08P01"})


class BackendQueryError(Exception):
    """The query was rejected; the connection is fine."""

    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class BackendBroken(Exception):
    """The connection is unusable. ``sent``: the request may have reached the server;
    ``auth``: the server refused the credentials; ``timed_out``: no answer in time."""

    def __init__(
        self, message: str, *, sent: bool, auth: bool = False, timed_out: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sent = sent
        self.auth = auth
        self.timed_out = timed_out


class Connection(Protocol):
    """One server connection, as the actors see it."""

    async def run(self, method: str, query: str, args: Sequence[Any]) -> Any:
        """Run ``asyncpg.Connection.<method>(query, *args)``."""

    async def probe(self) -> None:
        """Run the health probe, ``SELECT 1``."""

    def terminate(self) -> None:
        """Drop the connection at once, without a goodbye."""

    async def close(self) -> None:
        """Close politely; falls back to :meth:`terminate` on error."""

    def is_closed(self) -> bool:
        """``True`` once the connection cannot be used any more."""

    def in_transaction(self) -> bool:
        """``True`` while a transaction block is open on the server."""

    async def prepare(self, query: str) -> Any:
        """Prepare a named statement; returns an opaque handle for :meth:`run_prepared`."""

    async def run_prepared(self, handle: Any, method: str, args: Sequence[Any]) -> Any:
        """Run ``<method>(*args)`` on a prepared statement."""


class Backend(Protocol):
    """Opens connections to nodes."""

    async def connect(self, address: Address) -> Connection:
        """Open one connection; raise :class:`BackendBroken` on failure."""


def classify(exc: BaseException, *, sent: bool) -> Exception:
    """Map an asyncpg/OS exception to :class:`BackendQueryError` or :class:`BackendBroken`."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None)
        text = redact(str(exc)) or type(exc).__name__
        if state in _QUERY_SQLSTATES:
            return BackendQueryError(text, state)
        if state and (state.startswith(_BROKEN_SQLSTATE_PREFIXES) or state in _BROKEN_SQLSTATES):
            return BackendBroken(f"{text} [{state}]", sent=sent)
        if isinstance(
            exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError
        ):
            return BackendBroken(f"authentication failed: {text} [{state}]", sent=False, auth=True)
        return BackendQueryError(text, state)
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        return BackendBroken(redact(str(exc)) or "connection lost", sent=sent)
    if isinstance(exc, asyncpg.InterfaceError):
        text = redact(str(exc))
        if "connection is closed" in text or "another operation is in progress" in text:
            return BackendBroken(text, sent=False)
        # Wrong argument count or types: asyncpg refused before sending.
        return BackendQueryError(text, None)
    if isinstance(exc, asyncpg.exceptions._base.InternalClientError):
        return BackendBroken(redact(str(exc)), sent=sent)
    if isinstance(exc, TimeoutError):
        return BackendBroken("timed out", sent=sent)
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return BackendBroken(redact(reason), sent=sent)
    if isinstance(exc, ValueError | TypeError | OverflowError):
        return BackendQueryError(redact(str(exc)), None)
    return BackendBroken(f"{type(exc).__name__}: {redact(str(exc))}", sent=sent)


class _Runner(Protocol):
    """How one bridge runs asyncio work for trio (see the three bridges below)."""

    kind: str

    async def await_coro(self, factory: Callable[[], Any]) -> Any:
        """Run ``factory()`` on the asyncio side; wait for it in trio.

        Cancellation cancels the asyncio task and waits for it to end.
        """

    def start_coro(
        self, factory: Callable[[], Any], on_done: Callable[[outcome.Outcome[Any]], None]
    ) -> None:
        """Run ``factory()`` on the asyncio side; ``on_done(outcome)`` runs in trio after."""

    def run_soon(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` on the asyncio side, without waiting."""


class _BridgedConnection:
    """An asyncpg connection, reached from trio through one of the bridges."""

    __slots__ = ("_conn", "_runner")

    def __init__(self, conn: Any, runner: _Runner) -> None:
        self._conn = conn
        self._runner = runner

    async def _call(self, factory: Callable[[], Any]) -> Any:
        if self._conn.is_closed():
            raise BackendBroken("connection is closed", sent=False)
        try:
            return await self._runner.await_coro(factory)
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise classify(exc, sent=True) from exc

    async def run(self, method: str, query: str, args: Sequence[Any]) -> Any:
        bound = getattr(self._conn, method)
        return await self._call(lambda: bound(query, *args))

    def submit(
        self,
        method: str,
        query: str,
        args: Sequence[Any],
        on_done: Callable[[outcome.Outcome[Any]], None],
    ) -> None:
        """Start ``method(query, *args)``; ``on_done(outcome)`` runs in trio when it ends.

        The hot path: no trio task waits for it. Errors arrive classified.
        """
        # A closed connection fails in asyncpg before sending (InterfaceError
        # "connection is closed"), which classifies as BackendBroken(sent=False).
        self._runner.start_coro(
            functools.partial(getattr(self._conn, method), query, *args), on_done
        )

    async def probe(self) -> None:
        await self.run("fetchval", "SELECT 1", ())

    async def prepare(self, query: str) -> Any:
        return await self.run("prepare", query, ())

    async def run_prepared(self, handle: Any, method: str, args: Sequence[Any]) -> Any:
        bound = getattr(handle, method)
        return await self._call(lambda: bound(*args))

    def terminate(self) -> None:
        if not self._conn.is_closed():
            self._runner.run_soon(self._conn.terminate)

    async def close(self) -> None:
        if self._conn.is_closed():
            return
        try:
            with trio.move_on_after(1.0) as scope:
                await self._call(lambda: self._conn.close(timeout=1.0))
            if scope.cancelled_caught:
                self.terminate()
        except Exception:
            self.terminate()

    def is_closed(self) -> bool:
        return bool(self._conn.is_closed())

    def in_transaction(self) -> bool:
        return bool(self._conn.is_in_transaction())


def _connect_options(
    dsn: Dsn, connect_timeout: float, connect_kwargs: Mapping[str, Any]
) -> tuple[float, dict[str, Any]]:
    """The connect timeout and ``asyncpg.connect`` keyword arguments for a DSN."""
    kwargs: dict[str, Any] = dict(connect_kwargs)
    params = dict(dsn.params)
    if "sslmode" in params:
        kwargs.setdefault("ssl", params["sslmode"])
    if "connect_timeout" in params:
        connect_timeout = float(params["connect_timeout"])
    if "application_name" in params:
        settings = dict(kwargs.get("server_settings") or {})
        settings.setdefault("application_name", params["application_name"])
        kwargs["server_settings"] = settings
    kwargs.update(user=dsn.user, password=dsn.password, database=dsn.database)
    return connect_timeout, kwargs


class AsyncpgBackend:
    """Opens asyncpg connections through one of the bridges (its ``kind``)."""

    def __init__(
        self,
        dsn: Dsn,
        connect_timeout: float,
        connect_kwargs: Mapping[str, Any],
        runner: _Runner,
    ) -> None:
        self._timeout, self._kwargs = _connect_options(dsn, connect_timeout, connect_kwargs)
        self._runner = runner

    @property
    def kind(self) -> str:
        """The bridge: ``"embedded"``, ``"thread"`` or ``"trio-asyncio"``."""
        return self._runner.kind

    async def connect(self, address: Address) -> Connection:
        kwargs, timeout = self._kwargs, self._timeout
        try:
            conn = await self._runner.await_coro(
                lambda: asyncpg.connect(
                    host=address.host, port=address.port, timeout=timeout, **kwargs
                )
            )
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise classify(exc, sent=False) from exc
        if isinstance(self._runner, _EmbeddedLoop):
            return _EmbeddedConnection(conn, self._runner)
        return _BridgedConnection(conn, self._runner)


class _EmbeddedConnection(_BridgedConnection):
    """A connection of the embedded bridge: :meth:`submit` goes straight to the loop."""

    __slots__ = ()

    _runner: _EmbeddedLoop

    def submit(
        self,
        method: str,
        query: str,
        args: Sequence[Any],
        on_done: Callable[[outcome.Outcome[Any]], None],
    ) -> None:
        self._runner.start_step(getattr(self._conn, method)(query, *args), on_done)


# -- the trio-asyncio bridge -------------------------------------------------------


class _TrioAsyncioRunner:
    """asyncpg on a trio-asyncio loop: for services that already run one."""

    kind = "trio-asyncio"

    def __init__(self, loop: Any) -> None:
        self.loop = loop

    async def await_coro(self, factory: Callable[[], Any]) -> Any:
        return await self.loop.run_aio_coroutine(factory())

    def start_coro(
        self, factory: Callable[[], Any], on_done: Callable[[outcome.Outcome[Any]], None]
    ) -> None:
        # Done callbacks run on the trio-asyncio loop, that is, in trio.
        self.loop.create_task(factory()).add_done_callback(functools.partial(_report, on_done))

    def run_soon(self, fn: Callable[[], object]) -> None:
        fn()  # same thread, same loop


def _report(on_done: Callable[[outcome.Outcome[Any]], None], task: asyncio.Task[Any]) -> None:
    _call_back(on_done, _task_outcome(task))


# -- the thread bridge -----------------------------------------------------------
#
# A plain asyncio loop runs in a thread of its own and owns every asyncpg
# connection. Work crosses between the threads in batches: the trio side
# appends jobs to a deque and wakes the asyncio loop once per batch
# (call_soon_threadsafe); the asyncio side appends finished jobs to another
# deque and wakes trio once per batch (TrioToken.run_sync_soon), which
# reschedules each waiting task directly. A job's waiter never gives up on
# it: cancelling a job cancels its asyncio task, and the waiter wakes when
# the asyncio side says it is over, so a connection is never used by two
# operations at once.


class _Job:
    """A coroutine to run on the asyncio side, and who to tell: a parked task or a callback."""

    __slots__ = ("aio_task", "callback", "coro_factory", "outcome", "raise_cancel", "task")

    def __init__(
        self,
        coro_factory: Any,
        task: trio.lowlevel.Task | None = None,
        callback: Callable[[outcome.Outcome[Any]], None] | None = None,
    ) -> None:
        self.coro_factory = coro_factory
        self.task = task
        self.callback = callback
        self.aio_task: asyncio.Task[Any] | None = None
        self.outcome: outcome.Outcome[Any] | None = None
        self.raise_cancel: Any = None


class _LoopThread:
    """An asyncio loop in a daemon thread, with batched hand-offs both ways."""

    kind = "thread"

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._loop = asyncio.SelectorEventLoop()  # plain asyncio, whatever policy is installed
        self._loop.set_exception_handler(_log_loop_error)
        self._to_aio: deque[_Job | _Cancel | Callable[[], object]] = deque()
        self._to_trio: deque[_Job] = deque()
        self._aio_wakeup = False
        self._trio_wakeup = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name="picopyn_actors asyncio bridge", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    # trio side -------------------------------------------------------------------

    def post(self, item: _Job | _Cancel | Callable[[], object]) -> None:
        """Queue a job (or a plain callable) for the asyncio thread."""
        if self._closed:
            raise BackendBroken("the bridge is closed", sent=False)
        self._to_aio.append(item)
        if not self._aio_wakeup:
            self._aio_wakeup = True
            self._loop.call_soon_threadsafe(self._drain)

    def start_coro(
        self, factory: Callable[[], Any], on_done: Callable[[outcome.Outcome[Any]], None]
    ) -> None:
        try:
            self.post(_Job(factory, callback=on_done))
        except BackendBroken as exc:
            on_done(outcome.Error(exc))

    def run_soon(self, fn: Callable[[], object]) -> None:
        with suppress(BackendBroken):
            self.post(fn)

    async def await_coro(self, coro_factory: Any) -> Any:
        """Run ``coro_factory()`` on the asyncio loop; wait for its outcome.

        Cancellation cancels the asyncio task and waits for it to end.
        """
        job = _Job(coro_factory, task=trio.lowlevel.current_task())
        self.post(job)

        def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            job.raise_cancel = raise_cancel
            self.post(_Cancel(job))
            return trio.lowlevel.Abort.FAILED

        result = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def _deliver(self) -> None:
        # Runs in trio, once per batch of finished jobs.
        self._trio_wakeup = False
        queue = self._to_trio
        reschedule = trio.lowlevel.reschedule
        while queue:
            job = queue.popleft()
            result = job.outcome
            assert result is not None
            if job.callback is not None:
                _call_back(job.callback, result)
                continue
            assert job.task is not None
            if (
                job.raise_cancel is not None
                and isinstance(result, outcome.Error)
                and isinstance(result.error, asyncio.CancelledError)
            ):
                result = outcome.capture(job.raise_cancel)
            reschedule(job.task, result)

    # asyncio side ----------------------------------------------------------------

    def _drain(self) -> None:
        self._aio_wakeup = False
        queue = self._to_aio
        create_task = self._loop.create_task
        while queue:
            item = queue.popleft()
            if isinstance(item, _Job):
                item.aio_task = task = create_task(item.coro_factory())
                task.add_done_callback(functools.partial(self._done, item))
            elif isinstance(item, _Cancel):
                aio_task = item.job.aio_task
                if aio_task is not None:
                    aio_task.cancel()
            else:
                item()

    def _done(self, job: _Job, task: asyncio.Task[Any]) -> None:
        job.outcome = _task_outcome(task)
        self._to_trio.append(job)
        if not self._trio_wakeup:
            self._trio_wakeup = True
            with suppress(trio.RunFinishedError):  # trio is gone: nobody waits
                self._token.run_sync_soon(self._deliver)

    async def aclose(self) -> None:
        """Cancel what runs on the loop, stop it and join the thread."""
        if self._closed:
            return

        def shutdown() -> None:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.call_soon(self._loop.stop)

        self.post(shutdown)
        self._closed = True
        await trio.to_thread.run_sync(self._thread.join)


def _call_back(
    callback: Callable[[outcome.Outcome[Any]], None], result: outcome.Outcome[Any]
) -> None:
    """Report a finished operation to ``callback``, classifying its error; never raises."""
    if isinstance(result, outcome.Error):
        error = result.error
        if isinstance(error, asyncio.CancelledError):
            result = outcome.Error(BackendBroken("operation cancelled", sent=True))
        elif not isinstance(error, BackendQueryError | BackendBroken):
            result = outcome.Error(classify(error, sent=True))
    try:
        callback(result)
    except Exception:  # pragma: no cover - a bug in the callback; keep the bridge alive
        log.exception("picopyn_actors: error in a completion callback")


def submit(
    conn: Connection,
    method: str,
    query: str,
    args: Sequence[Any],
    on_done: Callable[[outcome.Outcome[Any]], None],
    spawn: Callable[..., None],
) -> None:
    """Start ``method(query, *args)`` on ``conn``; ``on_done(outcome)`` runs in trio when it ends.

    Errors arrive classified (:class:`BackendQueryError` / :class:`BackendBroken`).
    The bridges' connections do this without any trio task; for other
    connections (test fakes) a task is started with ``spawn(fn, *args)``.
    """
    fast = getattr(conn, "submit", None)
    if fast is not None:
        fast(method, query, args, on_done)
    else:
        spawn(_run_and_report, conn, method, query, args, on_done)


async def _run_and_report(
    conn: Connection,
    method: str,
    query: str,
    args: Sequence[Any],
    on_done: Callable[[outcome.Outcome[Any]], None],
) -> None:
    try:
        result: outcome.Outcome[Any] = outcome.Value(await conn.run(method, query, args))
    except (BackendQueryError, BackendBroken) as exc:
        result = outcome.Error(exc)
    _call_back(on_done, result)


def _task_outcome(task: asyncio.Task[Any]) -> outcome.Outcome[Any]:
    if task.cancelled():
        return outcome.Error(asyncio.CancelledError())
    exc = task.exception()
    return outcome.Value(task.result()) if exc is None else outcome.Error(exc)


class _Cancel:
    __slots__ = ("job",)

    def __init__(self, job: _Job) -> None:
        self.job = job


# -- the embedded bridge -----------------------------------------------------------
#
# A plain asyncio loop driven from a trio task in trio's own thread. The loop
# never blocks in its selector: the driver task runs one loop iteration with a
# zero timeout, then parks in trio until the selector's epoll descriptor is
# readable, the next asyncio timer is due, or trio code hands the loop work
# (which "kicks" the parked driver). asyncpg's transports and callbacks run at
# native asyncio speed, and their completion callbacks run inside the driver
# task, that is in trio, so they reschedule the waiting trio task directly:
# no thread, no lock, no GIL hand-off.


class _NoWaitSelector:
    """A selector whose ``select`` never blocks (trio does the waiting)."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.inner = selector

    def select(self, timeout: float | None = None) -> Any:
        return self.inner.select(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _EmbeddedLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose iterations are run by a trio task (:meth:`drive`)."""

    kind = "embedded"

    def __init__(self) -> None:
        selector = selectors.DefaultSelector()  # epoll on Linux: one descriptor to wait on
        super().__init__(selector)
        self._epoll_fd = selector.fileno()
        self._wrapped = _NoWaitSelector(selector)
        # The base loop keeps its selector in a private attribute; swap in ours.
        setattr(self, "_selector", self._wrapped)  # noqa: B010
        self._parked: trio.CancelScope | None = None
        self._steppers: set[_Stepper] = set()
        self._waiters: set[_Waiter] = set()
        self._driving = False
        # The driver's own scope: shielded, so that a cancellation from outside
        # never stops the loop while trio code still waits on it; only
        # :meth:`aclose` stops it, after every wait has ended.
        self._stop = trio.CancelScope(shield=True)
        self._stopped = trio.Event()
        self.set_exception_handler(_log_loop_error)

    def _make_socket_transport(self, *args: Any, **kwargs: Any) -> Any:
        transport = super()._make_socket_transport(*args, **kwargs)  # type: ignore[misc]
        # asyncio reads with recv(256 KiB): above glibc's mmap threshold, so
        # every answer costs an mmap, an mremap and a munmap. A smaller
        # read stays on the heap; asyncpg's own buffer gathers long answers.
        transport.max_size = _RECV_SIZE
        return transport

    def kick(self) -> None:
        """Wake the driver: work was handed to the loop from trio."""
        parked = self._parked
        if parked is not None:
            self._parked = None
            parked.cancel()

    def start_task(self, coro: Any) -> asyncio.Task[Any]:
        """Create an asyncio task from trio code, and make sure it runs soon."""
        task = self.create_task(coro)
        self.kick()
        return task

    async def await_coro(self, factory: Callable[[], Any]) -> Any:
        return await _await_on(self, factory())

    def start_coro(
        self, factory: Callable[[], Any], on_done: Callable[[outcome.Outcome[Any]], None]
    ) -> None:
        self.start_step(factory(), on_done)

    def start_step(self, coro: Any, on_done: Callable[[outcome.Outcome[Any]], None]) -> None:
        """Run ``coro`` without an asyncio Task; ``on_done(outcome)`` when it ends.

        The hot path: the coroutine's first step (which writes the query to
        the socket) runs right here, the rest in the driver task when its
        socket has the answer.
        """
        step = _Stepper(self, coro, on_done)
        self._steppers.add(step)
        if self._driving:  # called back from code the driver runs: the loop is running
            step.step()
            return
        # asyncio.get_running_loop() answers from this contextvar in trio
        # code (trio-asyncio patches it). The thread's own running-loop slot
        # is left alone: asyncpg passes its loop explicitly, and setting
        # the slot costs a getpid() system call each time.
        running = trio_asyncio.current_loop.set(self)
        try:
            step.step()
        finally:
            trio_asyncio.current_loop.reset(running)
        if self._ready:  # type: ignore[attr-defined]
            self.kick()  # the step scheduled asyncio callbacks: let the driver run them

    def run_soon(self, fn: Callable[[], object]) -> None:
        fn()  # same thread
        self.kick()

    async def drive(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the loop until :meth:`aclose` stops it; cancellation from outside is shielded."""
        try:
            with self._stop:
                await self._drive(task_status)
        finally:
            self._parked = None
            self._stopped.set()

    async def _drive(self, task_status: trio.TaskStatus[None]) -> None:
        # Code running on this loop asks asyncio for the running loop; trio-asyncio
        # (imported by this module) answers that from the trio task's context.
        trio_asyncio.current_loop.set(self)
        task_status.started()
        run_once = self._run_once  # type: ignore[attr-defined]
        ready = self._ready  # type: ignore[attr-defined]
        # The thread's own "running loop" slot is left alone: asyncio's
        # getters are wrapped by trio-asyncio to answer from the trio task's
        # context (set above), asyncpg passes its loop explicitly, and setting
        # the slot costs two getpid() system calls per wake-up.
        popleft = ready.popleft
        poll = self._wrapped.inner.select
        process_events = self._process_events  # type: ignore[attr-defined]
        while True:
            # One cancel scope serves many waits: it is cancelled only by a
            # kick() or by its deadline, the loop's next timer (in asyncio's
            # clock: ``when``), and it is moved only when that timer changes.
            with trio.CancelScope() as parked:
                self._parked = parked
                when = math.inf
                timers_due = True
                while True:
                    self._driving = True
                    try:
                        if timers_due:
                            # A full iteration: I/O, due timers, ready callbacks.
                            run_once()
                            timers_due = False
                        else:
                            # Woken by I/O before the next timer: poll, without
                            # the timer bookkeeping; the rounds below run the
                            # callbacks.
                            process_events(poll(0))
                        # Callbacks made ready (a query's waiter resolved by
                        # the data just read, then the coroutine waiting on
                        # it) run now, without polling the selector again or
                        # yielding to trio first: the answer reaches its
                        # caller in the same trio step.
                        for _ in range(_INLINE_ROUNDS):
                            if not ready:
                                break
                            for _ in range(len(ready)):
                                handle = popleft()
                                if not handle._cancelled:
                                    handle._run()
                    finally:
                        self._driving = False
                    if ready:
                        await trio.lowlevel.checkpoint()
                        continue
                    # (_run_once may replace the timer list: read it afresh)
                    scheduled = self._scheduled  # type: ignore[attr-defined]
                    next_when = scheduled[0].when() if scheduled else math.inf
                    if next_when != when:
                        when = next_when
                        parked.deadline = (
                            math.inf
                            if when == math.inf
                            else trio.current_time() + max(0.0, when - self.time())
                        )
                    await trio.lowlevel.wait_readable(self._epoll_fd)
            self._parked = None

    async def aclose(self) -> None:
        """Cancel every asyncio task, give them a moment to finish, close the loop.

        Shielded from cancellation, and bounded: after ``_CLOSE_GRACE`` seconds
        every trio task still waiting on the loop is woken (with ``Cancelled``
        if it was cancelled, else :class:`BackendBroken`) and the driver stops,
        so nothing is left waiting on a stopped loop.
        """
        with trio.CancelScope(shield=True):
            for step in list(self._steppers):
                step.abandon()
            tasks = [t for t in asyncio.all_tasks(self) if not t.done()]
            if tasks:
                finished = trio.Event()
                for task in tasks:
                    task.cancel()
                gathered = asyncio.gather(*tasks, return_exceptions=True)
                gathered.add_done_callback(lambda _: finished.set())
                self.kick()
                with trio.move_on_after(_CLOSE_GRACE):
                    await finished.wait()
            for waiter in list(self._waiters):
                waiter.give_up(self)
            self._stop.cancel()
            await self._stopped.wait()
            setattr(self, "_selector", self._wrapped.inner)  # noqa: B010
            self.close()


# Seconds a cancelled wait gives its asyncio task to end, and :meth:`aclose`
# gives every task, before trio stops waiting for them.
_CANCEL_GRACE = 1.0
_CLOSE_GRACE = 1.0

# Bytes asked of each recv() on a connection of the embedded loop.
_RECV_SIZE = 64 * 1024

# How many rounds of newly ready callbacks the driver runs after a loop
# iteration before it polls the selector again (bounded, so that a coroutine
# that keeps yielding cannot starve trio).
_INLINE_ROUNDS = 4


class _Stepper:
    """Runs one coroutine on the embedded loop without an asyncio Task.

    A query is one short coroutine (asyncpg's ``fetchrow`` and friends) that
    awaits one or two futures of the protocol. A Task would cost a handle
    to start it, a context copy, registration in the loop's task set and a
    handle for its done callback; this steps the coroutine directly and
    reports its outcome to ``on_done`` in the same call that finishes it.
    Outside of a Task, ``asyncio.current_task()`` is ``None``: fine for
    asyncpg's query methods with no ``timeout``, the only ones run this way.
    """

    __slots__ = ("coro", "loop", "on_done")

    def __init__(
        self,
        loop: _EmbeddedLoop,
        coro: Any,
        on_done: Callable[[outcome.Outcome[Any]], None],
    ) -> None:
        self.loop = loop
        self.coro = coro
        self.on_done: Callable[[outcome.Outcome[Any]], None] | None = on_done

    def step(self, _future: object = None) -> None:
        """Advance the coroutine; also the done callback of the futures it awaits."""
        try:
            yielded = self.coro.send(None)
        except StopIteration as stop:
            self._finish(outcome.Value(stop.value))
            return
        except (KeyboardInterrupt, SystemExit) as exc:
            self._finish(outcome.Error(BackendBroken(repr(exc), sent=True)))
            raise
        except BaseException as exc:
            self._finish(outcome.Error(exc))
            return
        if yielded is None:  # a bare yield: asyncio.sleep(0)
            self.loop.call_soon(self.step)
            return
        if not getattr(yielded, "_asyncio_future_blocking", False):  # pragma: no cover
            self.coro.close()
            self._finish(outcome.Error(RuntimeError(f"coroutine yielded {yielded!r}")))
            return
        yielded._asyncio_future_blocking = False
        yielded.add_done_callback(self.step)

    def _finish(self, result: outcome.Outcome[Any]) -> None:
        self.loop._steppers.discard(self)
        on_done, self.on_done = self.on_done, None
        if on_done is None:
            return
        if type(result) is not outcome.Value:
            _call_back(on_done, result)  # classifies the error
            return
        try:
            on_done(result)
        except Exception:  # pragma: no cover - a bug in the callback; keep the loop alive
            log.exception("picopyn_actors: error in a completion callback")

    def abandon(self) -> None:
        """The loop is closing: end the coroutine and report it cancelled."""
        with suppress(BaseException):
            self.coro.close()
        self._finish(outcome.Error(asyncio.CancelledError()))


class _Waiter:
    """A trio task waiting on the embedded loop for one asyncio task (see :func:`_await_on`)."""

    __slots__ = ("aio_task", "raise_cancel", "task")

    def __init__(self, task: trio.lowlevel.Task, aio_task: asyncio.Task[Any]) -> None:
        self.task: trio.lowlevel.Task | None = task
        self.aio_task = aio_task
        self.raise_cancel: trio.lowlevel.RaiseCancelT | None = None

    def wake(self, result: outcome.Outcome[Any]) -> None:
        """Reschedule the waiting task with ``result``, once; later calls do nothing."""
        task, self.task = self.task, None
        if task is None:
            return
        if self.raise_cancel is not None and (
            isinstance(result, outcome.Error) and isinstance(result.error, asyncio.CancelledError)
        ):
            result = outcome.capture(self.raise_cancel)
        trio.lowlevel.reschedule(task, result)

    def done(self, loop: _EmbeddedLoop, aio_task: asyncio.Task[Any]) -> None:
        """The asyncio task ended: hand its outcome to the waiting task."""
        loop._waiters.discard(self)
        self.wake(_task_outcome(aio_task))

    def give_up(self, loop: _EmbeddedLoop) -> None:
        """The asyncio task outlived its grace after a cancel (or the loop closes):
        stop waiting for it."""
        loop._waiters.discard(self)
        if self.raise_cancel is not None:
            self.wake(outcome.capture(self.raise_cancel))
        else:
            self.wake(outcome.Error(BackendBroken("the asyncio bridge closed", sent=True)))


async def _await_on(loop: _EmbeddedLoop, coro: Any) -> Any:
    """Run ``coro`` on the embedded loop and wait for it in trio.

    Cancellation cancels the asyncio task and waits for it to end, at most
    ``_CANCEL_GRACE`` seconds (the loop keeps running meanwhile: its driver
    is shielded); then the waiter raises ``Cancelled`` and the asyncio task
    is left to finish on its own.
    """
    aio_task = loop.start_task(coro)
    waiter = _Waiter(trio.lowlevel.current_task(), aio_task)
    loop._waiters.add(waiter)
    aio_task.add_done_callback(functools.partial(waiter.done, loop))

    def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        waiter.raise_cancel = raise_cancel
        aio_task.cancel()
        loop.call_later(_CANCEL_GRACE, waiter.give_up, loop)
        loop.kick()
        return trio.lowlevel.Abort.FAILED

    return await trio.lowlevel.wait_task_rescheduled(abort)


def _log_loop_error(loop: Any, context: dict[str, Any]) -> None:
    # asyncpg leaves futures behind when a connect is cut short (for example
    # its SSL negotiation with a hung node). trio-asyncio's default handler
    # re-raises such errors into the loop's nursery, which would tear down the
    # whole cluster for an error nobody is waiting for: log it instead.
    exc = context.get("exception")
    log.debug(
        "asyncio: %s%s", redact(str(context.get("message", ""))), f" ({exc!r})" if exc else ""
    )


def _install_handler(loop: Any) -> None:
    if loop.get_exception_handler() is None:
        loop.set_exception_handler(_log_loop_error)


@asynccontextmanager
async def open_backend(
    dsn: Dsn, connect_timeout: float, connect_kwargs: Mapping[str, Any], kind: str = "auto"
) -> AsyncIterator[Backend]:
    """Yield a backend of the given kind.

    ``"trio-asyncio"`` uses the running trio-asyncio loop, or opens one;
    ``"thread"`` runs a plain asyncio loop in a thread of its own; ``"auto"``
    is the running trio-asyncio loop if any, else the thread.
    """
    running = trio_asyncio.current_loop.get()
    if kind == "auto":
        kind = "trio-asyncio" if running is not None else "embedded"
    if kind == "embedded":
        loop = _EmbeddedLoop()
        async with trio.open_nursery() as nursery:
            # start_soon, not start: the driver shields itself, and trio's
            # started() in an already cancelled start() would leave it in a
            # nursery that waits for it forever.
            nursery.start_soon(loop.drive, name="picopyn_actors asyncio driver")
            try:
                yield AsyncpgBackend(dsn, connect_timeout, connect_kwargs, loop)
            finally:
                with trio.CancelScope(shield=True):
                    await loop.aclose()
                nursery.cancel_scope.cancel()
        return
    if kind == "thread":
        bridge = _LoopThread(trio.lowlevel.current_trio_token())
        try:
            yield AsyncpgBackend(dsn, connect_timeout, connect_kwargs, bridge)
        finally:
            with trio.CancelScope(shield=True):
                await bridge.aclose()
        return
    if running is not None:
        _install_handler(running)
        yield AsyncpgBackend(dsn, connect_timeout, connect_kwargs, _TrioAsyncioRunner(running))
        return
    async with trio_asyncio.open_loop() as new_loop:
        _install_handler(new_loop)
        yield AsyncpgBackend(dsn, connect_timeout, connect_kwargs, _TrioAsyncioRunner(new_loop))
