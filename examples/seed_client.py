"""The picopyn-style ``Client``: the seed's API on the self-healing core.

``Client(dsn, pool_size=None, balance_strategy=None, **connect_kwargs)`` with
``connect()``, ``execute``, ``fetch``, ``fetchrow`` and ``close()``, or used
as ``async with``. A program written for picopyn changes its imports and its
event loop (trio instead of asyncio), and nothing else.

Run it against a cluster::

    python examples/seed_client.py postgresql://admin:PASSWORD@127.0.0.1:4327

or without a DSN, on a local stand-in cluster that it starts itself.
"""

from __future__ import annotations

import argparse

import trio

from picopyn_actors import Client


async def explicit(dsn: str) -> None:
    """connect() ... close(), as with picopyn. Call both from the same task."""
    client = Client(dsn, pool_size=2)
    await client.connect()
    try:
        rows = await client.fetch("SELECT name, tier FROM _pico_instance ORDER BY name")
        for row in rows:
            print(f"instance {row['name']} in tier {row['tier']}")
        row = await client.fetchrow("SELECT version() AS version")
        print(f"server: {row['version'] if row else 'unknown'}")
        # execute() returns the status string; real programs run INSERT/UPDATE here.
        status = await client.execute("SELECT 1")
        print(f"execute status: {status}")
    finally:
        await client.close()


async def with_block(dsn: str) -> None:
    """The same client as an ``async with`` block: closed on the way out."""
    async with Client(dsn) as client:
        row = await client.fetchrow("SELECT pico_instance_uuid() AS uuid")
        assert row is not None
        name = await client.fetchrow(
            "SELECT name FROM _pico_instance WHERE uuid = $1", str(row["uuid"])
        )
        print(f"this query was answered by {name['name'] if name else row['uuid']}")


async def run(dsn: str) -> None:
    await explicit(dsn)
    await with_block(dsn)
    print("done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn", nargs="?", help="cluster DSN (default: start a local stand-in)")
    args = parser.parse_args()
    if args.dsn:
        trio.run(run, args.dsn)
        return
    from picopyn_actors.testing import LocalCluster

    with LocalCluster(nodes=3) as lc:
        trio.run(run, lc.dsn)


if __name__ == "__main__":
    main()
