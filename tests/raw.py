"""Raw asyncpg against the stand-in, bypassing picopyn_actors: for tests of the
stand-in itself (its catalog, its edits), from synchronous test code."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

T = TypeVar("T")

#: Picodata's topology tables, each in a stable order.
ORDERED_TABLES = {
    "_pico_tier": "SELECT * FROM _pico_tier ORDER BY name",
    "_pico_replicaset": "SELECT * FROM _pico_replicaset ORDER BY name",
    "_pico_instance": "SELECT * FROM _pico_instance ORDER BY raft_id",
    "_pico_peer_address": "SELECT * FROM _pico_peer_address ORDER BY raft_id, connection_type",
}


def run(fn: Callable[[asyncpg.Connection], Awaitable[T]], dsn: str, timeout: float = 10.0) -> T:
    """Connect to *dsn* on a fresh asyncio loop, run *fn*, close."""

    async def main() -> T:
        conn = await asyncpg.connect(dsn, timeout=timeout)
        try:
            return await asyncio.wait_for(fn(conn), timeout)
        finally:
            conn.terminate()

    # Explicitly a plain asyncio loop: once trio_asyncio is imported,
    # asyncio.run() would run on trio-asyncio's loop instead.
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


def query(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """The rows of *sql* at *dsn*, as dicts."""

    async def fetch(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        return [dict(r) for r in await conn.fetch(sql, *args)]

    return run(fetch, dsn)
