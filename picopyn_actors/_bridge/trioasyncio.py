"""The trio-asyncio runner: asyncpg on a running trio-asyncio loop.

For services that already run one and want every asyncio object on it. Its
asyncio callbacks run in trio's thread, as trio-asyncio schedules them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from typing import Any

from .base import OnDone
from .errors import call_back, task_outcome


class TrioAsyncioRunner:
    """asyncpg on a trio-asyncio loop: for services that already run one."""

    kind = "trio-asyncio"

    def __init__(self, loop: Any) -> None:
        self.loop = loop

    async def await_coro(
        self, factory: Callable[[], Any], on_cancel: Callable[[], object] | None = None
    ) -> Any:
        if on_cancel is None:
            return await self.loop.run_aio_coroutine(factory())
        return await self.loop.run_aio_coroutine(_guarded(factory, on_cancel))

    def start_coro(self, factory: Callable[[], Any], on_done: OnDone) -> None:
        # Done callbacks run on the trio-asyncio loop, that is, in trio.
        self.loop.create_task(factory()).add_done_callback(functools.partial(_report, on_done))

    def run_soon(self, fn: Callable[[], object]) -> None:
        fn()  # same thread, same loop


async def _guarded(factory: Callable[[], Any], on_cancel: Callable[[], object]) -> Any:
    """Run ``factory()``; if the task is cancelled, call ``on_cancel()`` instead of
    letting the cancellation reach it (asyncpg answers a cancelled query with a
    cancel request, which Picodata cannot serve), wait for it to end, re-raise."""
    inner = asyncio.ensure_future(factory())
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        on_cancel()
        with contextlib.suppress(BaseException):
            await inner
        raise


def _report(on_done: OnDone, task: asyncio.Task[Any]) -> None:
    call_back(on_done, task_outcome(task))
