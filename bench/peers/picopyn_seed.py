"""Peer: picopyn 0.2.0, the seed driver, used as its README shows.

``Client(dsn, pool_size=connections)`` discovers the cluster from the seed
node's catalog (``enable_discovery=True``) and fills one static pool round
robin across the nodes. The seed has no ``fetchval``: ``fetchrow`` (and ``fetch``
for the 1000-row query).
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

    methods = {"fetchrow": client.fetchrow, "fetch": client.fetch}

    async def call(method: str, query: str, args: tuple[Any, ...]) -> Any:
        return await methods[method](query, *args)

    def make_call(i: int) -> Call:
        return call

    return make_call, client.close


if __name__ == "__main__":
    main(open_client, info=lambda: {"version": version("picopyn")})
