"""asyncio glue for the harness: task groups, timeouts, reading commands, the main loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from _harness import MakeCall, config, emit, read_command, run_throughput, run_timeline, serve


async def run_tasks(fns: list[Callable[[], Awaitable[None]]]) -> None:
    await asyncio.gather(*(fn() for fn in fns))


async def move_on_after(seconds: float, fn: Callable[[], Awaitable[None]]) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(fn(), seconds)


async def read() -> dict[str, Any] | None:
    return await asyncio.get_running_loop().run_in_executor(None, read_command)


OpenClient = Callable[[dict[str, Any]], Awaitable[tuple[MakeCall, Callable[[], Awaitable[None]]]]]


def main(
    open_client: OpenClient,
    *,
    tasks_for: Callable[[dict[str, Any], int], int] | None = None,
    info: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Run a peer. ``open_client(cfg)`` connects and returns ``(make_call, close)``;
    ``tasks_for(cfg, concurrency)`` may cap the task count (raw asyncpg)."""
    cfg = config()

    async def amain() -> None:
        make_call, close = await open_client(cfg)
        try:
            emit({"event": "ready", **(info() if info else {})})

            async def throughput(cmd: dict[str, Any]) -> dict[str, Any]:
                concurrency = int(cmd["concurrency"])
                tasks = tasks_for(cfg, concurrency) if tasks_for else None
                return await run_throughput(cmd, make_call, asyncio.sleep, run_tasks, tasks=tasks)

            async def timeline(cmd: dict[str, Any]) -> dict[str, Any]:
                return await run_timeline(cmd, make_call, asyncio.sleep, run_tasks, move_on_after)

            await serve({"throughput": throughput, "timeline": timeline}, read)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close(), 5.0)

    asyncio.run(amain())
