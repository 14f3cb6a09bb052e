"""The thread runner: a plain asyncio loop in a thread of its own.

A plain asyncio loop runs in a thread of its own and owns every asyncpg
connection. Work crosses between the threads in batches: the trio side
appends jobs to a deque and wakes the asyncio loop once per batch
(call_soon_threadsafe); the asyncio side appends finished jobs to another
deque and wakes trio once per batch (TrioToken.run_sync_soon), which
reschedules each waiting task directly. A job's waiter never gives up on
it: cancelling a job cancels its asyncio task, and the waiter wakes when
the asyncio side says it is over, so a connection is never used by two
operations at once.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import outcome
import trio

from .base import BackendBroken, OnDone
from .errors import call_back, log_loop_error, task_outcome


class _Job:
    """A coroutine to run on the asyncio side, and who to tell: a parked task or a callback."""

    __slots__ = (
        "aio_task",
        "callback",
        "coro_factory",
        "on_cancel",
        "outcome",
        "raise_cancel",
        "task",
    )

    def __init__(
        self,
        coro_factory: Any,
        task: trio.lowlevel.Task | None = None,
        callback: OnDone | None = None,
        on_cancel: Callable[[], object] | None = None,
    ) -> None:
        self.coro_factory = coro_factory
        self.on_cancel = on_cancel
        self.task = task
        self.callback = callback
        self.aio_task: asyncio.Task[Any] | None = None
        self.outcome: outcome.Outcome[Any] | None = None
        self.raise_cancel: Any = None


class LoopThread:
    """An asyncio loop in a daemon thread, with batched hand-offs both ways."""

    kind = "thread"

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._loop = asyncio.SelectorEventLoop()  # plain asyncio, whatever policy is installed
        self._loop.set_exception_handler(log_loop_error)
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

    def start_coro(self, factory: Callable[[], Any], on_done: OnDone) -> None:
        try:
            self.post(_Job(factory, callback=on_done))
        except BackendBroken as exc:
            on_done(outcome.Error(exc))

    def run_soon(self, fn: Callable[[], object]) -> None:
        with suppress(BackendBroken):
            self.post(fn)

    async def await_coro(
        self, coro_factory: Any, on_cancel: Callable[[], object] | None = None
    ) -> Any:
        """Run ``coro_factory()`` on the asyncio loop; wait for its outcome.

        Cancellation calls ``on_cancel()`` in the loop's thread (or cancels
        the asyncio task) and waits for the task to end.
        """
        job = _Job(coro_factory, task=trio.lowlevel.current_task(), on_cancel=on_cancel)
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
                call_back(job.callback, result)
                continue
            assert job.task is not None
            if job.raise_cancel is not None and isinstance(result, outcome.Error):
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
                job = item.job
                if job.aio_task is not None and not job.aio_task.done():
                    if job.on_cancel is not None:
                        job.on_cancel()
                    else:
                        job.aio_task.cancel()
            else:
                item()

    def _done(self, job: _Job, task: asyncio.Task[Any]) -> None:
        job.outcome = task_outcome(task)
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


class _Cancel:
    __slots__ = ("job",)

    def __init__(self, job: _Job) -> None:
        self.job = job
