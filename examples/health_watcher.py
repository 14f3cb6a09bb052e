"""A health watcher built on ``cluster.events()``.

It prints the state of every node once, then one line per node event (a
node going down, coming back, joining, leaving), and says loudly when no
node at all is up. The event stream never blocks the client: a watcher that
reads too slowly gets an ``EventsDropped`` marker instead.

Run it against a cluster::

    python examples/health_watcher.py postgresql://admin:PASSWORD@127.0.0.1:4327 --seconds 60

or without a DSN, on a local stand-in cluster that it starts itself.
"""

from __future__ import annotations

import argparse
import time

import trio

import picopyn_actors as pa


def stamp() -> str:
    return time.strftime("%H:%M:%S")


def show_nodes(cluster: pa.Cluster) -> None:
    for node in cluster.nodes():
        latency = "-" if node.latency is None else f"{node.latency * 1000:.1f} ms"
        print(
            f"{stamp()} node {node.name} at {node.address}: {node.state.value} "
            f"(catalog {node.catalog_state}, latency {latency})",
            flush=True,
        )


async def watch(dsn: str, seconds: float) -> None:
    # Subscribe first, then take the snapshot: no change falls in between.
    async with (
        pa.open_cluster(dsn, health_interval=0.5) as cluster,
        cluster.events() as events,
    ):
        show_nodes(cluster)
        with trio.move_on_after(seconds):
            async for event in events:
                if isinstance(event, pa.EventsDropped):
                    print(f"{stamp()} missed {event.count} events", flush=True)
                    show_nodes(cluster)
                    continue
                print(
                    f"{stamp()} {event.node}: {event.old.value} -> {event.new.value} "
                    f"({event.reason})",
                    flush=True,
                )
                if not any(n.state is pa.NodeState.UP for n in cluster.nodes()):
                    print(f"{stamp()} ALERT: no node of the cluster is up", flush=True)
    print(f"{stamp()} watcher stopped", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn", nargs="?", help="cluster DSN (default: start a local stand-in)")
    parser.add_argument("--seconds", type=float, default=30.0, help="run time (default 30)")
    args = parser.parse_args()
    if args.dsn:
        trio.run(watch, args.dsn, args.seconds)
        return
    from picopyn_actors.testing import LocalCluster

    with LocalCluster(nodes=3) as lc:
        trio.run(watch, lc.dsn, args.seconds)


if __name__ == "__main__":
    main()
