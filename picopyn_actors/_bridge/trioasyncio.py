"""The trio-asyncio runner: asyncpg on a running trio-asyncio loop.

For services that already run one and want every asyncio object on it. Its
asyncio callbacks run in trio's thread, as trio-asyncio schedules them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import outcome
import trio

from .base import BackendBroken, OnDone
from .embedded import CANCEL_GRACE
from .errors import call_back, task_outcome


class TrioAsyncioRunner:
    """asyncpg on a trio-asyncio loop: for services that already run one."""

    kind = "trio-asyncio"

    def __init__(self, loop: Any) -> None:
        self.loop = loop

    async def await_coro(
        self, factory: Callable[[], Any], on_cancel: Callable[[], object] | None = None
    ) -> Any:
        task = self.loop.create_task(factory())
        waiting: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        cancel: list[trio.lowlevel.RaiseCancelT] = []

        def wake(result: outcome.Outcome[Any]) -> None:
            nonlocal waiting
            if waiting is None:
                return
            if cancel and isinstance(result, outcome.Error):
                result = outcome.capture(cancel[0])
            trio.lowlevel.reschedule(waiting, result)
            waiting = None

        task.add_done_callback(lambda t: wake(task_outcome(t)))

        def give_up() -> None:
            wake(outcome.Error(BackendBroken("operation cancelled", sent=True)))

        def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            cancel.append(raise_cancel)
            if on_cancel is not None:
                on_cancel()
            else:
                task.cancel()
            self.loop.call_later(CANCEL_GRACE, give_up)
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def start_coro(self, factory: Callable[[], Any], on_done: OnDone) -> None:
        # Done callbacks run on the trio-asyncio loop, that is, in trio.
        self.loop.create_task(factory()).add_done_callback(functools.partial(_report, on_done))

    def run_soon(self, fn: Callable[[], object]) -> None:
        fn()  # same thread, same loop


def _report(on_done: OnDone, task: asyncio.Task[Any]) -> None:
    call_back(on_done, task_outcome(task))
