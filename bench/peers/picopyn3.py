"""Peer: picopyn 3.x, the current official asyncio driver, used as its docs show.

``Pool(dsn, max_size=connections, enable_discovery=True)``; the topology
refresh interval comes from the config (1 s, its minimum, in the failover
runs; its default of 60 s otherwise).

picopyn 3.x asks Picodata for ``pico_stmt_invalidation`` (and
``pico_query_metadata``) in the startup packet's ``options``. PostgreSQL,
which plays Picodata here, rejects unknown options, so the bench replaces the
function that adds them with one that adds nothing. Nothing else changes.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

import picopyn.asynchronous.connection as _pp_connection
from _aio import main
from _harness import Call
from picopyn.asynchronous import Pool


def _no_picodata_options(
    connect_kwargs: dict[str, Any], dsn: str, *, request_query_metadata: bool
) -> dict[str, Any]:
    return dict(connect_kwargs)


_pp_connection._with_picodata_startup_options = _no_picodata_options  # type: ignore[assignment]


async def open_client(cfg: dict[str, Any]) -> tuple[Any, Any]:
    options = dict(cfg.get("options") or {})
    pool = Pool(cfg["dsn"], max_size=cfg["connections"], enable_discovery=True, **options)
    await pool.open()

    methods = {"fetchrow": pool.fetchrow, "fetch": pool.fetch}

    async def call(method: str, query: str, args: tuple[Any, ...]) -> Any:
        return await methods[method](query, *args)

    def make_call(i: int) -> Call:
        return call

    return make_call, pool.close


if __name__ == "__main__":
    main(open_client, info=lambda: {"version": version("picopyn")})
