"""Peer: picopyn 0.2.0, the seed driver, used as its README shows.

``Client(dsn, pool_size=connections)`` discovers the cluster from the seed
node's catalog (``enable_discovery=True``) and fills one static pool round
robin across the nodes. The seed has no ``fetchval``: ``fetchrow`` for all.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from _aio import main
from _harness import Call
from picopyn import Client


async def open_client(cfg: dict[str, Any]) -> tuple[Any, Any]:
    client = Client(cfg["dsn"], pool_size=cfg["connections"])
    await client.connect()

    async def call(query: str, args: tuple[Any, ...]) -> Any:
        return await client.fetchrow(query, *args)

    def make_call(i: int) -> Call:
        return call

    return make_call, client.close


if __name__ == "__main__":
    main(open_client, info=lambda: {"version": version("picopyn")})
