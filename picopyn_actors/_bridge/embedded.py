"""The embedded runner: a plain asyncio loop driven by a trio task, in trio's thread.

A plain asyncio loop driven from a trio task in trio's own thread. The loop
never blocks in its selector: the driver task parks in trio until there is
something to do, then does it without blocking. asyncpg's protocol,
transports and callbacks run at native asyncio speed, and their completion
callbacks run inside the driver task, that is in trio, so they reschedule
the waiting trio task directly: no thread, no lock, no GIL hand-off.

The hot path goes around asyncio's own machinery:

* **Reads.** Each connection's socket is registered, level-triggered, in an
  epoll set of the runner's own (the *hot* set), which also holds asyncio's
  selector. The driver parks on the hot set only (``wait_readable``); when it
  wakes, one ``poll(0)`` says which sockets have data, and each is read
  straight into its transport (``_read_ready``): no selector keys, no
  handles, no full loop iteration. asyncio's own selector (connects, blocked
  writes, the self-pipe) and its timers get a full iteration when they are
  due. While it is busy (a pass read answers, and more are still out) the
  driver polls again after one yield to trio instead of waiting on the hot
  set: trio's registration of a descriptor lasts one wake-up, so each wait
  costs an ``epoll_ctl`` and its Python; the first pass that reads nothing
  waits again.
* **Answers.** What a read completes reaches its caller before the next
  socket is read. Once a pass has handed over 1000 rows, the driver yields
  to trio before it reads further, so that the callers it woke take their
  rows (and drop them) in step with the parsing, not after every
  connection's answer has been parsed: fewer rows alive at once, whose
  records asyncpg recycles without the garbage collector (see "Big results
  and the garbage collector" in docs/tuning.md). The sockets such a pass
  left unread are read first in the next one, in their order: a
  level-triggered poll lists the socket just read first again when its next
  answer is already back (a queued request is sent on it at once), and
  reading in the poll's order let a few connections go ahead of the others
  again and again.
* **Queries.** A query runs as a bare coroutine stepped by a
  :class:`_Stepper`, without an asyncio Task; its awaits resume it through
  the loop's ready queue without an ``asyncio.Handle`` (the stepper is its
  own handle). On a statement asyncpg has cached, the coroutine is the
  protocol's own (:mod:`.driver`), without asyncpg's Python layers.
* **Callbacks.** ``call_soon`` makes a handle that is a ``functools.partial``
  of its context's ``run`` (:class:`_Soon`: made and run in C, where an
  ``asyncio.Handle`` costs two Python frames; the driver catches what it
  raises), ``create_future`` is a partial of ``asyncio.Future`` (what
  asyncio's method returns, without its frame), and ``get_debug``, which
  every Future calls, reads ``_debug`` in C.

It relies on asyncio internals (``_run_once``, ``_ready``, ``_scheduled``,
``_process_events``, ``_selector``, ``_add_reader``, ``_remove_reader``,
``Handle._run``, the socket transport's ``_read_ready``): :func:`self_check`
verifies, before the first use, that they exist and behave (it drives one
iteration and one socket read the way the driver does), so that
:func:`~picopyn_actors._bridge.open_backend` can fall back to the thread
runner (with one WARNING) on a Python where they do not.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import operator
import select
import selectors
import socket
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import outcome
import trio

from . import driver
from .base import BackendBroken, OnDone
from .errors import call_back, log_loop_error, task_outcome

log = logging.getLogger("picopyn_actors._bridge")

# The socket transport's read callback, as transports hand it to _add_reader.
_READ_READY = getattr(
    getattr(asyncio.selector_events, "_SelectorSocketTransport", None), "_read_ready", None
)
# A loop's get_debug(), as C code: what BaseEventLoop.get_debug returns.
_DEBUG = operator.attrgetter("_debug")
# Futures resolved on this loop call their stepper back with this context,
# which nothing reads (a stepper runs without entering a context).
_NO_CONTEXT = contextvars.Context()


class _NoWaitSelector:
    """A selector whose ``select`` never blocks (trio does the waiting)."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.inner = selector

    def select(self, timeout: float | None = None) -> Any:
        return self.inner.select(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Soon(functools.partial):  # type: ignore[type-arg]
    """A ready callback, made and run in C: a partial of its context's ``run``.

    ``call_soon`` makes one, outside asyncio's debug mode, for every callback
    but a stepper: asyncpg's ``_on_waiter_completed``, for one, once per
    query. Made by ``functools.partial`` and run by its call (``_run``), it
    costs no Python frame, where an ``asyncio.Handle`` costs two (its
    ``__init__`` and its ``_run``). What asyncio reads of a handle it has:
    ``_cancelled``, ``_run``, ``cancel``, ``cancelled``. Unlike a Handle's,
    its ``_run`` does not catch what the callback raises: the driver does
    (:meth:`EmbeddedLoop._callback_failed`).
    """

    __slots__ = ()
    _cancelled = False  # (cancel() sets it on the instance)
    _run = functools.partial.__call__

    def cancel(self) -> None:
        self._cancelled = True

    def cancelled(self) -> bool:
        return self._cancelled


class EmbeddedLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose iterations are run by a trio task (:meth:`drive`)."""

    kind = "embedded"

    def __init__(self, *, fast_queries: bool = True) -> None:
        selector = selectors.DefaultSelector()  # epoll on Linux: one descriptor to wait on
        super().__init__(selector)
        self._epoll_fd = selector.fileno()
        self._wrapped = _NoWaitSelector(selector)
        # The base loop keeps its selector in a private attribute; swap in ours.
        setattr(self, "_selector", self._wrapped)  # noqa: B010
        # The hot set: each connection's socket, and asyncio's selector.
        self._hot = select.epoll()
        self._hot.register(self._epoll_fd, select.EPOLLIN)
        self._hot_readers: dict[int, Any] = {}
        self.fast_queries = fast_queries
        self._parked: trio.CancelScope | None = None
        self._steppers: set[_Stepper] = set()
        self._waiters: set[_Waiter] = set()
        self._driving = False
        # Rows of the answers the driver's current pass has handed over (see
        # _ROWS_PER_PASS); counted by the steppers.
        self._handed_rows = 0
        # The driver's own scope: shielded, so that a cancellation from outside
        # never stops the loop while trio code still waits on it; only
        # :meth:`aclose` stops it, after every wait has ended.
        self._stop = trio.CancelScope(shield=True)
        self._stopped = trio.Event()
        self.set_exception_handler(log_loop_error)
        # asyncio's create_future() is Future(loop=self): as a partial, the
        # same future without a Python frame (each query's protocol makes one).
        setattr(self, "create_future", functools.partial(asyncio.Future, loop=self))  # noqa: B010
        # Every Future asks its loop get_debug() (from C, once per query): the
        # same answer, read by C code, without the method's Python frame.
        setattr(self, "get_debug", functools.partial(_DEBUG, self))  # noqa: B010

    # -- asyncio's hooks ---------------------------------------------------------

    def _make_socket_transport(self, *args: Any, **kwargs: Any) -> Any:
        transport = super()._make_socket_transport(*args, **kwargs)  # type: ignore[misc]
        # asyncio reads with recv(256 KiB): above glibc's mmap threshold, so
        # every answer costs an mmap, an mremap and a munmap. A smaller
        # read stays on the heap; asyncpg's own buffer gathers long answers.
        transport.max_size = _RECV_SIZE
        return transport

    def _add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> Any:
        # A socket transport's reads go to the hot set, where the driver reads
        # them itself; every other reader is asyncio's.
        if (
            not args
            and getattr(callback, "__func__", None) is _READ_READY
            and isinstance(fd, int)
        ):
            self._check_closed()  # type: ignore[attr-defined]
            if fd not in self._hot_readers:
                self._hot.register(fd, select.EPOLLIN)
            self._hot_readers[fd] = callback.__self__  # type: ignore[attr-defined]
            return None
        return super()._add_reader(fd, callback, *args)  # type: ignore[misc]

    def _remove_reader(self, fd: Any) -> bool:
        if fd in self._hot_readers:
            del self._hot_readers[fd]
            with suppress(OSError):  # already closed: epoll forgot it
                self._hot.unregister(fd)
            return True
        return bool(super()._remove_reader(fd))  # type: ignore[misc]

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        if type(callback) is _Stepper and not self._debug:  # type: ignore[attr-defined]
            # A future this loop resolved calls its stepper back: the stepper
            # is its own handle (asyncio's debug mode wants real handles).
            self._ready.append(callback)  # type: ignore[attr-defined]
            return callback  # type: ignore[return-value]
        if self._debug or self._closed:  # type: ignore[attr-defined]
            return super().call_soon(callback, *args, context=context)
        if context is None:
            context = contextvars.copy_context()
        handle = _Soon(context.run, callback, *args)
        self._ready.append(handle)  # type: ignore[attr-defined]
        return handle  # type: ignore[return-value]

    # -- handing work over from trio ---------------------------------------------

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

    async def await_coro(
        self, factory: Callable[[], Any], on_cancel: Callable[[], object] | None = None
    ) -> Any:
        return await _await_on(self, factory(), on_cancel)

    def start_coro(self, factory: Callable[[], Any], on_done: OnDone) -> None:
        self.start_step(factory(), on_done)

    def start_query(
        self, conn: Any, method: str, query: str, args: Sequence[Any], on_done: OnDone
    ) -> None:
        """Run ``conn.<method>(query, *args)`` (an asyncpg connection of this loop).

        On a statement asyncpg has cached, the protocol's coroutine itself
        (:mod:`.driver`); otherwise the public method, which caches it.
        """
        fast = driver.fast_call(conn, method, query, args) if self.fast_queries else None
        if fast is None:
            self.start_step(getattr(conn, method)(query, *args), on_done)
            return
        coro, shape = fast
        step = _Stepper(self, coro, on_done, shape, (conn, method, query, args))
        self._steppers.add(step)
        # The protocol's coroutine asks nobody for the running loop: no
        # context to set, whoever calls.
        step.step()
        if self._ready and not self._driving:  # type: ignore[attr-defined]
            self.kick()

    def start_step(self, coro: Any, on_done: OnDone) -> None:
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
        running = driver.CURRENT_LOOP.set(self)
        try:
            step.step()
        finally:
            driver.CURRENT_LOOP.reset(running)
        if self._ready:  # type: ignore[attr-defined]
            self.kick()  # the step scheduled asyncio callbacks: let the driver run them

    def run_soon(self, fn: Callable[[], object]) -> None:
        fn()  # same thread
        self.kick()

    # -- the driver --------------------------------------------------------------

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
        # (imported by the driver module) answers that from the trio task's context.
        driver.CURRENT_LOOP.set(self)
        task_status.started()
        run_once = self._run_once  # type: ignore[attr-defined]
        ready = self._ready  # type: ignore[attr-defined]
        # The thread's own "running loop" slot is left alone: asyncio's
        # getters are wrapped by trio-asyncio to answer from the trio task's
        # context (set above), asyncpg passes its loop explicitly, and setting
        # the slot costs two getpid() system calls per wake-up.
        popleft = ready.popleft
        hot_poll = self._hot.poll
        hot_fd = self._hot.fileno()
        readers = self._hot_readers
        get_reader = readers.get
        asyncio_fd = self._epoll_fd
        # The ready sockets the last pass did not read (it stopped after
        # _ROWS_PER_PASS rows): the next pass reads them first.
        left: list[tuple[int, int]] = []
        # What the last poll found (an empty pass waits on trio again).
        events: list[tuple[int, int]] = []
        while True:
            # One cancel scope serves many waits: it is cancelled only by a
            # kick() or by its deadline, the loop's next timer (in asyncio's
            # clock: ``when``), and it is moved only when that timer changes.
            with trio.CancelScope() as parked:
                self._parked = parked
                when = math.inf
                full = True  # a kick, or the first pass: one full iteration
                while True:
                    self._driving = True
                    self._handed_rows = 0
                    try:
                        events = hot_poll(0)
                        if left:
                            unread = {fd for fd, _ in left}
                            events = left + [e for e in events if e[0] not in unread]
                            left = []
                        pending = iter(events)
                        for fd, _ in pending:
                            transport = get_reader(fd)
                            if transport is not None:
                                transport._read_ready()
                                # The steppers this read made ready (their
                                # futures resolved by the data) hand their
                                # answers over before the next socket is read.
                                if ready:
                                    for _ in range(len(ready)):
                                        handle = popleft()
                                        if not handle._cancelled:
                                            handle._run()
                                    if self._handed_rows >= _ROWS_PER_PASS:
                                        # The other sockets: first in the next pass.
                                        left = list(pending)
                                        break
                            elif fd == asyncio_fd:
                                full = True
                        if full:
                            # asyncio's own selector and the due timers (and
                            # the ready callbacks, once).
                            run_once()
                            full = False
                        # Callbacks made ready since (by the callbacks run
                        # above, or by that iteration) run now, without
                        # polling again or yielding to trio first.
                        for _ in range(_INLINE_ROUNDS):
                            if not ready:
                                break
                            for _ in range(len(ready)):
                                handle = popleft()
                                if not handle._cancelled:
                                    handle._run()
                    except Exception as exc:
                        # A callback raised (a _Soon's run does not catch,
                        # unlike asyncio's Handle): logged, as asyncio would.
                        # What this pass left (ready callbacks, unread
                        # sockets, the full iteration: ``full`` is still
                        # set) the next one does, after a yield.
                        self._callback_failed(exc)
                    finally:
                        self._driving = False
                    if ready or full or self._handed_rows >= _ROWS_PER_PASS:
                        # Yield to trio: the callers woken run (and drop
                        # their rows) in the batch of the next pass.
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
                    if events and self._steppers:
                        # Busy: this pass read answers and others are still
                        # out. Poll again after one yield to trio, without
                        # re-arming trio's one-shot registration of the hot
                        # set (an epoll_ctl and its Python each time); the
                        # first pass that reads nothing waits for it again.
                        await trio.lowlevel.cancel_shielded_checkpoint()
                        if parked.cancel_called:  # a kick, or the next timer is due
                            break
                        continue
                    await trio.lowlevel.wait_readable(hot_fd)
            self._parked = None

    def _callback_failed(self, exc: Exception) -> None:
        """A ready callback raised: to the exception handler, as asyncio's Handle does."""
        self.call_exception_handler({"message": "Exception in a callback", "exception": exc})

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

    def close(self) -> None:
        super().close()
        self._hot_readers.clear()
        self._hot.close()


# Seconds a cancelled wait gives its asyncio task to end, and :meth:`aclose`
# gives every task, before trio stops waiting for them.
CANCEL_GRACE = 1.0
_CLOSE_GRACE = 1.0

# Bytes asked of each recv() on a connection of the embedded loop.
_RECV_SIZE = 64 * 1024

# How many rounds of newly ready callbacks the driver runs after a loop
# iteration before it polls again (bounded, so that a coroutine that keeps
# yielding cannot starve trio). After each socket's read it runs one.
_INLINE_ROUNDS = 4

# Rows a driver pass hands over before it yields to trio, so that their callers
# take them in step with the parsing. asyncpg reuses up to 2000 freed
# records of each length without the garbage collector hearing of them; a
# pass that parsed every connection's 1000-row answer before any caller ran
# kept more rows alive than that, and cost one young collection per such
# fetch (and the older ones that follow). Half of it leaves room for the rows
# of answers still arriving.
_ROWS_PER_PASS = 1000


class _Stepper:
    """Runs one coroutine on the embedded loop without an asyncio Task.

    A query is one short coroutine (asyncpg's ``fetchrow`` and friends, or
    the protocol's ``bind_execute`` itself, see :mod:`.driver`) that awaits
    one or two futures of the protocol. A Task would cost a handle to start
    it, a context copy, registration in the loop's task set and a handle for
    its done callback; this steps the coroutine directly and reports its
    outcome to ``on_done`` in the same call that finishes it. The stepper is
    the done callback of the future it waits for, and the loop queues it as
    its own handle (``_run``, ``_cancelled``). Outside of a Task,
    ``asyncio.current_task()`` is ``None``: fine for asyncpg's query methods
    with no ``timeout``, the only ones run this way.
    """

    __slots__ = ("_cancelled", "coro", "loop", "on_done", "retry", "shape")

    def __init__(
        self,
        loop: EmbeddedLoop,
        coro: Any,
        on_done: OnDone,
        shape: Callable[[Any], Any] | None = None,
        retry: tuple[Any, str, str, Sequence[Any]] | None = None,
    ) -> None:
        self.loop = loop
        self.coro = coro
        self.on_done: OnDone | None = on_done
        self._cancelled = False
        # The fast path's: how to shape the result, and what to run again
        # after an error asyncpg itself would recover from.
        self.shape = shape
        self.retry = retry

    def __repr__(self) -> str:
        return f"<_Stepper {self.coro!r}>"

    def __call__(self, _future: object) -> None:  # a future's done callback
        self.step()

    def cancel(self) -> None:
        self._cancelled = True

    def step(self) -> None:
        """Advance the coroutine."""
        try:
            yielded = self.coro.send(None)
        except StopIteration as stop:
            value = stop.value
            if type(value) is list:  # rows (fetch, fetchrow...): see _ROWS_PER_PASS
                self.loop._handed_rows += len(value)
            if self.shape is not None:
                try:
                    value = self.shape(value)
                except Exception as exc:
                    self._fail(exc)
                    return
            # The answer (the hot path; an error goes through _fail).
            self.loop._steppers.discard(self)
            on_done, self.on_done = self.on_done, None
            if on_done is not None:
                try:
                    on_done(outcome.Value(value))
                except Exception:  # pragma: no cover - a bug in the callback
                    log.exception("picopyn_actors: error in a completion callback")
            return
        except (KeyboardInterrupt, SystemExit) as exc:
            self._fail(BackendBroken(repr(exc), sent=True))
            raise
        except BaseException as exc:
            retry = self.retry
            if retry is not None and isinstance(exc, driver.RECOVERABLE):
                # What asyncpg's _do_execute does after these errors.
                self.retry = self.shape = None
                self.coro = driver.recover(retry[0], exc, *retry[1:])
                self.step()
                return
            self._fail(exc)
            return
        if yielded is None:  # a bare yield: asyncio.sleep(0)
            self.loop.call_soon(self)
            return
        if not getattr(yielded, "_asyncio_future_blocking", False):  # pragma: no cover
            self.coro.close()
            self._fail(RuntimeError(f"coroutine yielded {yielded!r}"))
            return
        yielded._asyncio_future_blocking = False
        yielded.add_done_callback(self, context=_NO_CONTEXT)

    # As a handle in the loop's ready queue, the stepper is run by its step.
    _run = step

    def _fail(self, error: BaseException) -> None:
        """End with ``error``, reported once to ``on_done`` (classified). An answer
        is reported by :meth:`step` itself."""
        self.loop._steppers.discard(self)
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            call_back(on_done, outcome.Error(error))

    def abandon(self) -> None:
        """The loop is closing: end the coroutine and report it cancelled."""
        self._cancelled = True
        with suppress(BaseException):
            self.coro.close()
        self._fail(asyncio.CancelledError())


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
        if self.raise_cancel is not None and isinstance(result, outcome.Error):
            # Cancelled (or its connection dropped because of it): the
            # caller's cancellation is what it sees.
            result = outcome.capture(self.raise_cancel)
        trio.lowlevel.reschedule(task, result)

    def done(self, loop: EmbeddedLoop, aio_task: asyncio.Task[Any]) -> None:
        """The asyncio task ended: hand its outcome to the waiting task."""
        loop._waiters.discard(self)
        self.wake(task_outcome(aio_task))

    def give_up(self, loop: EmbeddedLoop) -> None:
        """The asyncio task outlived its grace after a cancel (or the loop closes):
        stop waiting for it."""
        loop._waiters.discard(self)
        if self.raise_cancel is not None:
            self.wake(outcome.capture(self.raise_cancel))
        else:
            self.wake(outcome.Error(BackendBroken("the asyncio bridge closed", sent=True)))


async def _await_on(
    loop: EmbeddedLoop, coro: Any, on_cancel: Callable[[], object] | None = None
) -> Any:
    """Run ``coro`` on the embedded loop and wait for it in trio.

    Cancellation calls ``on_cancel()`` (or cancels the asyncio task) and
    waits for the task to end, at most ``CANCEL_GRACE`` seconds (the loop
    keeps running meanwhile: its driver is shielded); then the waiter raises
    ``Cancelled`` and the asyncio task is left to finish on its own.
    """
    aio_task = loop.start_task(coro)
    waiter = _Waiter(trio.lowlevel.current_task(), aio_task)
    loop._waiters.add(waiter)
    aio_task.add_done_callback(functools.partial(waiter.done, loop))

    def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        waiter.raise_cancel = raise_cancel
        if on_cancel is not None:
            on_cancel()
        else:
            aio_task.cancel()
        loop.call_later(CANCEL_GRACE, waiter.give_up, loop)
        loop.kick()
        return trio.lowlevel.Abort.FAILED

    return await trio.lowlevel.wait_task_rescheduled(abort)




class _Probe(asyncio.Protocol):
    """The protocol :func:`self_check` reads a socket with."""

    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@functools.cache
def self_check() -> str | None:
    """Why the embedded runner cannot run on this Python, or ``None`` when it can.

    Checks that the asyncio internals the driver uses exist, and that the
    loop driven the way the driver drives it runs a ready callback, a due
    timer and a stepper resumed by a future, and reads a socket transport
    through the hot set. Runs once per process.
    """
    for owner, name in (
        (asyncio.SelectorEventLoop, "_run_once"),
        (asyncio.SelectorEventLoop, "_process_events"),
        (asyncio.SelectorEventLoop, "_make_socket_transport"),
        (asyncio.SelectorEventLoop, "_add_reader"),
        (asyncio.SelectorEventLoop, "_remove_reader"),
        (asyncio.Handle, "_run"),
    ):
        if not callable(getattr(owner, name, None)):
            return f"{owner.__qualname__}.{name} is missing"
    if _READ_READY is None:
        return "asyncio's socket transport has no _read_ready"
    try:
        loop = EmbeddedLoop()
    except Exception as exc:  # pragma: no cover - depends on the Python
        return f"an embedded loop cannot be made: {exc!r}"
    ours, theirs = socket.socketpair()
    try:
        ready: Any = getattr(loop, "_ready", None)
        scheduled = getattr(loop, "_scheduled", None)
        if not hasattr(ready, "popleft") or not isinstance(scheduled, list):
            return "the loop's _ready deque or _scheduled list is missing"
        if getattr(loop, "_selector", None) is not loop._wrapped:
            return "the loop's selector could not be replaced"
        ran: list[str] = []
        loop.call_soon(ran.append, "ready")
        handle = ready.popleft()
        if handle._cancelled:
            return "a fresh handle reads as cancelled"
        handle._run()
        loop.call_later(0, ran.append, "timer")
        loop._process_events(loop._wrapped.inner.select(0))  # type: ignore[attr-defined]
        loop._run_once()  # type: ignore[attr-defined]
        if ran != ["ready", "timer"]:
            return f"one driven iteration ran {ran!r}, not a ready callback and a timer"
        # A stepper resumed by the future it awaits, through the ready queue.
        future = loop.create_future()

        async def wait_for_it() -> Any:
            return await future

        results: list[outcome.Outcome[Any]] = []
        loop.start_step(wait_for_it(), results.append)
        future.set_result("stepped")
        while ready:
            ready.popleft()._run()
        if [r.unwrap() for r in results] != ["stepped"]:
            return f"a stepper resumed by its future reported {results!r}"
        # A socket transport read through the hot set.
        ours.setblocking(False)
        probe = _Probe()
        transport: Any = loop._make_socket_transport(ours, probe)
        loop._run_once()  # type: ignore[attr-defined]  # connection_made, then _add_reader
        if not any(r is transport for r in loop._hot_readers.values()):
            return "the socket transport did not register its reads in the hot set"
        theirs.sendall(b"ping")
        for fd, _ in loop._hot.poll(0.1):
            reader = loop._hot_readers.get(fd)
            if reader is not None:
                reader._read_ready()
        if probe.data != b"ping":
            return f"a hot read delivered {probe.data!r}, not b'ping'"
        transport.close()
        loop._run_once()  # type: ignore[attr-defined]  # connection_lost
        if loop._hot_readers or not probe.lost:
            return "a closed transport stayed in the hot set"
    except Exception as exc:
        return f"driving the loop failed: {exc!r}"
    finally:
        theirs.close()
        ours.close()
        setattr(loop, "_selector", loop._wrapped.inner)  # noqa: B010
        loop.close()
    return None
