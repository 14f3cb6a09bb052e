"""Peer: raw asyncpg on asyncio, no pool: one task per connection, the driver's limit.

``connections`` connections are spread round robin over the nodes and task
``i`` always uses connection ``i``, so at most that many requests are in
flight whatever the asked concurrency: its latencies have no queueing in them.
"""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg
from _aio import main
from _harness import Call


async def open_client(cfg: dict[str, Any]) -> tuple[Any, Any]:
    conns: list[Any] = []
    for node in itertools.islice(itertools.cycle(cfg["nodes"]), cfg["connections"]):
        conns.append(
            await asyncpg.connect(
                host=node["host"],
                port=node["port"],
                user=cfg["user"],
                password=cfg["password"],
                database=cfg["database"],
            )
        )

    def make_call(i: int) -> Call:
        conn = conns[i % len(conns)]
        methods = {"fetchrow": conn.fetchrow, "fetch": conn.fetch}

        async def call(method: str, query: str, args: tuple[Any, ...]) -> Any:
            return await methods[method](query, *args)

        return call

    async def close() -> None:
        for conn in conns:
            await conn.close()

    return make_call, close


if __name__ == "__main__":
    main(
        open_client,
        tasks_for=lambda cfg, concurrency: min(concurrency, cfg["connections"]),
        info=lambda: {"version": asyncpg.__version__},
    )
