"""The embedded runner: a plain asyncio loop driven by a trio task, in trio's thread.

A plain asyncio loop driven from a trio task in trio's own thread. The loop
never blocks in its selector: the driver task runs one loop iteration with a
zero timeout, then parks in trio until the selector's epoll descriptor is
readable, the next asyncio timer is due, or trio code hands the loop work
(which "kicks" the parked driver). asyncpg's transports and callbacks run at
native asyncio speed, and their completion callbacks run inside the driver
task, that is in trio, so they reschedule the waiting trio task directly:
no thread, no lock, no GIL hand-off.

It relies on asyncio internals (``_run_once``, ``_ready``, ``_scheduled``,
``_process_events``, ``_selector``, ``Handle._run``): :func:`self_check`
verifies, before the first use, that they exist and behave, so that
:func:`~picopyn_actors._bridge.open_backend` can fall back to the thread
runner (with one WARNING) on a Python where they do not.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import selectors
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import outcome
import trio
import trio_asyncio

from .base import BackendBroken, OnDone
from .errors import call_back, log_loop_error, task_outcome

log = logging.getLogger("picopyn_actors._bridge")


class _NoWaitSelector:
    """A selector whose ``select`` never blocks (trio does the waiting)."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.inner = selector

    def select(self, timeout: float | None = None) -> Any:
        return self.inner.select(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class EmbeddedLoop(asyncio.SelectorEventLoop):
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
        self.set_exception_handler(log_loop_error)

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

    async def await_coro(
        self, factory: Callable[[], Any], on_cancel: Callable[[], object] | None = None
    ) -> Any:
        return await _await_on(self, factory(), on_cancel)

    def start_coro(self, factory: Callable[[], Any], on_done: OnDone) -> None:
        self.start_step(factory(), on_done)

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
CANCEL_GRACE = 1.0
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
        loop: EmbeddedLoop,
        coro: Any,
        on_done: OnDone,
    ) -> None:
        self.loop = loop
        self.coro = coro
        self.on_done: OnDone | None = on_done

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
            call_back(on_done, result)  # classifies the error
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




@functools.cache
def self_check() -> str | None:
    """Why the embedded runner cannot run on this Python, or ``None`` when it can.

    Checks that the asyncio internals the driver uses exist, and that one
    loop iteration driven the way the driver drives it runs a ready callback
    and a due timer. Runs once per process.
    """
    for owner, name in (
        (asyncio.SelectorEventLoop, "_run_once"),
        (asyncio.SelectorEventLoop, "_process_events"),
        (asyncio.SelectorEventLoop, "_make_socket_transport"),
        (asyncio.Handle, "_run"),
    ):
        if not callable(getattr(owner, name, None)):
            return f"{owner.__qualname__}.{name} is missing"
    try:
        loop = EmbeddedLoop()
    except Exception as exc:  # pragma: no cover - depends on the Python
        return f"an embedded loop cannot be made: {exc!r}"
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
    except Exception as exc:
        return f"driving one iteration failed: {exc!r}"
    finally:
        setattr(loop, "_selector", loop._wrapped.inner)  # noqa: B010
        loop.close()
    return None
