"""A custom balance strategy, and the spread of requests over the nodes it gives.

A strategy is any callable ``strategy(candidates) -> candidate``. It gets the
nodes that are up and have a free connection right now (never an empty
list), as :class:`picopyn_actors.Candidate` objects with ``name``,
``failure_domain``, ``in_flight``, ``free`` and ``latency``, and must return
one of them. It runs once per request, so keep it cheap.

``PreferredNodes`` below prefers one failure domain (``zone``), avoids nodes
whose names match some patterns unless nothing else is up, and takes the
least loaded of what is left. The example runs the same workload with the
default ``RoundRobin`` and with ``PreferredNodes`` and prints the spread:
the avoided node gets no requests while the others have free connections,
and takes the overflow when they do not.

Run it against a cluster::

    python examples/custom_strategy.py postgresql://admin:PASSWORD@127.0.0.1:4327 --avoid i1

or without a DSN, on a local stand-in cluster that it starts itself.
"""

from __future__ import annotations

import argparse
import fnmatch
from collections import Counter
from collections.abc import Callable, Sequence

import trio

import picopyn_actors as pa

Strategy = Callable[[Sequence[pa.Candidate]], pa.Candidate]


class PreferredNodes:
    """Prefer failure domain ``zone=<zone>``; avoid nodes matching ``avoid``
    (shell patterns) unless only they are up; then the lowest ``in_flight``,
    taking turns between ties."""

    def __init__(self, zone: str | None = None, avoid: Sequence[str] = ()) -> None:
        self.zone = zone
        self.avoid = tuple(avoid)
        self._turn = 0

    def __call__(self, candidates: Sequence[pa.Candidate]) -> pa.Candidate:
        pool = [
            c for c in candidates if not any(fnmatch.fnmatch(c.name, p) for p in self.avoid)
        ] or list(candidates)
        if self.zone is not None:
            pool = [c for c in pool if c.failure_domain.get("zone") == self.zone] or pool
        lowest = min(c.in_flight for c in pool)
        best = [c for c in pool if c.in_flight == lowest]
        self._turn += 1
        return best[self._turn % len(best)]

    def __repr__(self) -> str:
        return f"PreferredNodes(zone={self.zone!r}, avoid={self.avoid!r})"


async def wait_until_all_up(cluster: pa.Cluster, timeout: float = 10.0) -> None:
    """open_cluster returns when one node is up; wait for the others (event-driven)."""
    with trio.move_on_after(timeout):
        async with cluster.events() as events:
            while not all(n.state is pa.NodeState.UP for n in cluster.nodes()):
                await events.receive()


async def spread(dsn: str, strategy: Strategy, requests: int, concurrency: int) -> Counter[str]:
    """Run ``requests`` idempotent queries; count the answers per node name."""
    async with pa.open_cluster(dsn, strategy=strategy, connections_per_node=2) as cluster:
        await wait_until_all_up(cluster)
        names = {
            str(row["uuid"]): str(row["name"])
            for row in await cluster.fetch("SELECT uuid, name FROM _pico_instance", idempotent=True)
        }
        seen: Counter[str] = Counter()
        remaining = requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                uuid = await cluster.fetchval("SELECT pico_instance_uuid()", idempotent=True)
                seen[names.get(str(uuid), str(uuid))] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        return seen


async def compare(dsn: str, zone: str | None, avoid: list[str], requests: int) -> None:
    # The strategy only sees nodes with a free connection: with more concurrent
    # requests than the preferred nodes have connections, the others take the
    # overflow. "Avoid" is a preference, never a reason to wait.
    runs: list[tuple[str, Strategy, int]] = [
        ("RoundRobin (default), 3 concurrent", pa.RoundRobin(), 3),
        (f"{PreferredNodes(zone, avoid)!r}, 3 concurrent", PreferredNodes(zone, avoid), 3),
        (f"{PreferredNodes(zone, avoid)!r}, 12 concurrent", PreferredNodes(zone, avoid), 12),
    ]
    results = [
        (label, await spread(dsn, strategy, requests, concurrency))
        for label, strategy, concurrency in runs
    ]
    nodes = sorted({name for _, counts in results for name in counts})
    width = max(len(label) for label, _ in results)
    print(f"{'strategy':<{width}}  " + "  ".join(f"{n:>6}" for n in nodes))
    for label, counts in results:
        total = sum(counts.values()) or 1
        cells = "  ".join(f"{100 * counts[n] / total:5.0f}%" for n in nodes)
        print(f"{label:<{width}}  {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn", nargs="?", help="cluster DSN (default: start a local stand-in)")
    parser.add_argument("--zone", help="preferred failure domain zone (default: none)")
    parser.add_argument(
        "--avoid",
        action="append",
        default=None,
        metavar="PATTERN",
        help="node names to avoid, shell pattern; repeatable (default: i1)",
    )
    parser.add_argument("--requests", type=int, default=600, help="requests per strategy")
    args = parser.parse_args()
    avoid = args.avoid if args.avoid is not None else ["i1"]
    if args.dsn:
        trio.run(compare, args.dsn, args.zone, avoid, args.requests)
        return
    from picopyn_actors.testing import LocalCluster

    with LocalCluster(nodes=3) as lc:
        trio.run(compare, lc.dsn, args.zone, avoid, args.requests)


if __name__ == "__main__":
    main()
