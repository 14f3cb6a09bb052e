"""Peer: asyncpg.Pool on asyncio, one pool per node, requests round robin over the pools.

Each pool holds ``connections / nodes`` connections (``min_size == max_size``).
Its default reset query (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
RESET ALL``) fails on Picodata, so ``reset`` is a no-op, as a Picodata user
must do.
"""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg
from _aio import main
from _harness import Call


async def _no_reset(conn: Any) -> None:
    return None


async def open_client(cfg: dict[str, Any]) -> tuple[Any, Any]:
    per_node = max(1, cfg["connections"] // len(cfg["nodes"]))
    pools = [
        await asyncpg.create_pool(
            host=node["host"],
            port=node["port"],
            user=cfg["user"],
            password=cfg["password"],
            database=cfg["database"],
            min_size=per_node,
            max_size=per_node,
            reset=_no_reset,
        )
        for node in cfg["nodes"]
    ]
    turn = itertools.cycle(pools)

    async def call(method: str, query: str, args: tuple[Any, ...]) -> Any:
        async with next(turn).acquire() as conn:
            return await getattr(conn, method)(query, *args)

    def make_call(i: int) -> Call:
        return call

    async def close() -> None:
        for pool in pools:
            await pool.close()

    return make_call, close


if __name__ == "__main__":
    main(open_client, info=lambda: {"version": asyncpg.__version__})
