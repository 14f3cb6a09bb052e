"""A long-running trio service that shares one cluster among many tasks.

Workers run queries through one :class:`picopyn_actors.Cluster`; a reporter
task logs the client's statistics every second. The service stops cleanly
after ``--seconds``, or on Ctrl-C / SIGTERM: the nursery is cancelled, the
cluster closes its connections, and a last report is logged.

Run it against a cluster::

    python examples/service.py postgresql://admin:PASSWORD@127.0.0.1:4327 --seconds 30

or without a DSN, on a local stand-in cluster that it starts itself.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections import Counter

import trio

import picopyn_actors as pa

log = logging.getLogger("service")


class Service:
    """The service's own state: a cluster and a few counters."""

    def __init__(self, cluster: pa.Cluster) -> None:
        self.cluster = cluster
        self.answers: Counter[str] = Counter()  # node uuid -> answers
        self.errors: Counter[str] = Counter()  # exception class -> count

    async def worker(self, number: int) -> None:
        """Ask which node answers, again and again. Reads are idempotent: a
        request whose node dies mid-flight is retried on another node."""
        while True:
            try:
                uuid = await self.cluster.fetchval(
                    "SELECT pico_instance_uuid()", idempotent=True, timeout=5.0
                )
            except (pa.PicodataError, trio.TooSlowError) as exc:
                self.errors[type(exc).__name__] += 1
                log.warning("worker %d: %s", number, exc)
                await trio.sleep(0.1)
            else:
                self.answers[str(uuid)] += 1
            await trio.sleep(0.01)

    async def reporter(self, every: float) -> None:
        """Log the client's statistics periodically."""
        while True:
            await trio.sleep(every)
            self.report()

    def report(self) -> None:
        stats = self.cluster.statistics()
        nodes = ", ".join(f"{n.name}={n.state.value}" for n in self.cluster.nodes())
        log.info(
            "requests ok=%d failed=%d retried=%d queue=%d | nodes: %s",
            stats.requests_ok,
            stats.requests_failed,
            stats.requests_retried,
            stats.queue_depth,
            nodes,
        )


async def stop_on_signal(scope: trio.CancelScope) -> None:
    """Cancel the service on SIGINT or SIGTERM (graceful shutdown)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal %d: shutting down", signum)
            scope.cancel()
            return


async def serve(dsn: str, seconds: float, workers: int) -> None:
    async with pa.open_cluster(dsn, connections_per_node=2) as cluster:
        service = Service(cluster)
        log.info("connected: %s", cluster)
        with trio.move_on_after(seconds) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_signal, scope)
                nursery.start_soon(service.reporter, 1.0)
                for number in range(workers):
                    nursery.start_soon(service.worker, number)
        service.report()
        names = {n.uuid: n.name for n in cluster.nodes()}
        spread = ", ".join(
            f"{names.get(uuid, uuid)}: {count}" for uuid, count in sorted(service.answers.items())
        )
        print(f"answers per node: {spread}")
        print(f"errors: {dict(service.errors) or 'none'}")
    print("service stopped cleanly")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn", nargs="?", help="cluster DSN (default: start a local stand-in)")
    parser.add_argument("--seconds", type=float, default=10.0, help="run time (default 10)")
    parser.add_argument("--workers", type=int, default=8, help="worker tasks (default 8)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("picopyn_actors").setLevel(logging.WARNING)
    if args.dsn:
        trio.run(serve, args.dsn, args.seconds, args.workers)
        return
    from picopyn_actors.testing import LocalCluster

    with LocalCluster(nodes=3) as lc:
        trio.run(serve, lc.dsn, args.seconds, args.workers)


if __name__ == "__main__":
    main()
