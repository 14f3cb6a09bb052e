"""Smoke run: start a local stand-in cluster and show what discovery finds.

Run it with ``python -m picopyn_actors.testing._smoke [--nodes N]``. It starts
:class:`LocalCluster`, asks the seed node for the cluster's topology with the
discovery query (asyncpg on plain asyncio), prints one line per node and
stops the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from ._cluster import LocalCluster

DISCOVERY = (
    "SELECT i.name, i.uuid, i.raft_id, i.tier, i.replicaset_name,"
    " i.current_state, i.target_state, i.failure_domain, p.address"
    " FROM _pico_instance i JOIN _pico_peer_address p ON i.raft_id = p.raft_id"
    " WHERE p.connection_type = 'pgproto'"
)


def _state(raw: str) -> str:
    """``'["Online",1]'`` or ``'{"Online": 1}'`` -> ``Online:1``."""
    value = json.loads(raw)
    if isinstance(value, dict):
        ((variant, incarnation),) = value.items()
    else:
        variant, incarnation = value
    return f"{variant}:{incarnation}"


async def discover(dsn: str) -> tuple[str, list[dict[str, Any]]]:
    """The seed's own uuid and the discovery rows, sorted by raft id."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        seed_uuid = await conn.fetchval("SELECT pico_instance_uuid()")
        rows = [dict(r) for r in await conn.fetch(DISCOVERY)]
    finally:
        await conn.close()
    return seed_uuid, sorted(rows, key=lambda r: r["raft_id"])


def format_table(rows: Sequence[dict[str, Any]], seed_uuid: str) -> str:
    header = ("name", "address", "state (current / target)", "replicaset", "uuid")
    lines = [
        (
            row["name"] + (" *" if row["uuid"] == seed_uuid else ""),
            row["address"],
            f"{_state(row['current_state'])} / {_state(row['target_state'])}",
            row["replicaset_name"],
            row["uuid"],
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *lines])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m picopyn_actors.testing._smoke",
        description="Start a local stand-in Picodata cluster and print what discovery finds.",
    )
    parser.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the harness")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    started = time.monotonic()
    with LocalCluster(nodes=args.nodes) as cluster:
        up = time.monotonic() - started
        # A plain asyncio loop, even when trio_asyncio (which replaces asyncio.run's) is loaded.
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            seed_uuid, rows = runner.run(discover(cluster.dsn))
        print(f"Local stand-in cluster: {len(cluster.nodes)} nodes up in {up:.2f} s.")
        print(f"Discovery through the seed {cluster.nodes[0].address} (marked *) found:\n")
        print(format_table(rows, seed_uuid))
    print("\nCluster stopped, nothing left behind.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
