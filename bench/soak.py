"""Soak test: minutes of random chaos against a stand-in cluster, at high concurrency.

Not part of the test suite. Run it as::

    .venv/bin/python bench/soak.py --minutes 10 --tasks 60

Random faults (kill, start, pause, resume, expel, join, and schema changes:
ALTER TABLE on every live node) hit a 4-node
``LocalCluster`` while trio tasks run idempotent reads and non-idempotent
writes with unique keys through one ``open_cluster``. At the end every
expelled or stopped server is counted too, and the script prints: requests
sent, answered, failed by kind, lost (sent but never ended: must be 0),
writes duplicated (a key stored twice: must be 0), acknowledged writes
missing (must be 0), peak memory, and open connections and sockets at the
start and the end (must not grow). Exit status 1 if any must-be-zero is not.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import resource
import sys
import time
from collections import Counter
from typing import Any

import asyncpg
import trio

import picopyn_actors as pa
from picopyn_actors.testing import LocalCluster

TABLE = "soak_writes"
CREATE = f"CREATE TABLE IF NOT EXISTS {TABLE} (k int PRIMARY KEY)"
DEADLINE = 15.0  # a request slower than this counts as hung


def _sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _count_keys(dsns: list[str]) -> Counter[int]:
    async def main() -> Counter[int]:
        keys: Counter[int] = Counter()
        for dsn in dsns:
            conn = await asyncpg.connect(dsn)
            try:
                for row in await conn.fetch(f"SELECT k FROM {TABLE}"):
                    keys[row["k"]] += 1
            finally:
                await conn.close()
        return keys

    loop = asyncio.SelectorEventLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


class Soak:
    def __init__(self, lc: LocalCluster, args: argparse.Namespace) -> None:
        self.lc = lc
        self.args = args
        self.rand = random.Random(args.seed)
        self.sent = 0
        self.answered = 0
        self.failed: Counter[str] = Counter()
        # Compact bookkeeping, so that the memory figures are the client's.
        self.acknowledged = array.array("q")
        self.unknown: set[int] = set()
        self.faults: Counter[str] = Counter()
        self.keys = itertools.count(1)
        self.paused: set[str] = set()
        self.altered = 0
        self.down: set[str] = set()
        self.expelled: set[str] = set()

    async def request(self, cluster: pa.Cluster) -> None:
        self.sent += 1
        write = self.rand.random() < 0.3
        key = next(self.keys)
        try:
            with trio.fail_after(DEADLINE):
                if write:
                    await cluster.execute(f"INSERT INTO {TABLE} VALUES ($1)", key)
                    self.acknowledged.append(key)
                else:
                    await cluster.fetchval("SELECT pico_instance_uuid()", idempotent=True)
            self.answered += 1
        except trio.TooSlowError:
            self.failed["hung"] += 1
        except pa.OutcomeUnknown:
            self.failed["OutcomeUnknown"] += 1
            self.unknown.add(key)
        except pa.PicodataError as exc:
            self.failed[type(exc).__name__] += 1

    async def load(self, cluster: pa.Cluster, stop: trio.Event) -> None:
        async def loop() -> None:
            while not stop.is_set():
                await self.request(cluster)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for _ in range(self.args.tasks):
                nursery.start_soon(loop)

    async def chaos(self, stop: trio.Event) -> None:
        lc = self.lc
        while not stop.is_set():
            with trio.move_on_after(self.rand.uniform(1.0, 4.0)):
                await stop.wait()
            if stop.is_set():
                return
            alive = [
                n.name for n in lc.nodes if n.name not in self.down | self.paused | self.expelled
            ]
            choices = ["start", "resume", "alter"]
            if len(alive) > 1:
                choices += ["kill", "kill", "pause", "stop"]
            if len(alive) > 2:
                choices.append("expel")
            if len(lc.nodes) - len(self.expelled) < 6:
                choices.append("join")
            action = self.rand.choice(choices)
            try:
                if action in ("kill", "stop", "pause", "expel"):
                    name = self.rand.choice(alive)
                    if action == "expel":
                        await trio.to_thread.run_sync(lc.set_state, name, "Expelled")
                        self.expelled.add(name)
                    else:
                        await trio.to_thread.run_sync(getattr(lc, action), name)
                        (self.paused if action == "pause" else self.down).add(name)
                elif action == "start" and self.down:
                    name = self.rand.choice(sorted(self.down))
                    await trio.to_thread.run_sync(lc.start, name)
                    self.down.discard(name)
                elif action == "resume" and self.paused:
                    name = self.rand.choice(sorted(self.paused))
                    await trio.to_thread.run_sync(lc.resume, name)
                    self.paused.discard(name)
                elif action == "join":
                    name = (await trio.to_thread.run_sync(lc.add_node)).name
                    await trio.to_thread.run_sync(lc.execute_everywhere, CREATE)
                elif action == "alter":
                    # Prepared statements on every node go stale (42999 on the front).
                    name = "every node"
                    self.altered += 1
                    ddl = f"ALTER TABLE {TABLE} ADD COLUMN extra{self.altered} int"
                    await trio.to_thread.run_sync(lc.execute_everywhere, ddl)
                else:
                    continue
            except Exception as exc:  # a harness hiccup is reported, not fatal
                print(f"  chaos {action} failed: {exc}", file=sys.stderr)
                continue
            self.faults[action] += 1
            print(f"  t={time.monotonic() - self.t0:6.1f}s {action} {name}", flush=True)

    async def run(self) -> int:
        lc, args = self.lc, self.args
        await trio.to_thread.run_sync(
            lc.execute_everywhere, f"CREATE TABLE {TABLE} (k int PRIMARY KEY)"
        )
        sockets_start = _sockets()
        self.t0 = time.monotonic()
        async with pa.open_cluster(
            lc.dsn,
            connections_per_node=3,
            discovery_interval=0.5,
            health_interval=0.3,
            probe_timeout=0.5,
            backoff_max=1.0,
            bridge=args.bridge,
        ) as cluster:
            async with cluster.events() as events:
                while not all(n.state is pa.NodeState.UP for n in cluster.nodes()):
                    await events.receive()
            connections_start = sum(n.connections for n in cluster.nodes())
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.load, cluster, stop)
                nursery.start_soon(self.chaos, stop)
                warmup = min(60.0, args.minutes * 60 / 5)
                await trio.sleep(warmup)
                rss_warm = _rss_mib()  # after the warm-up: caches and pools are full
                await trio.sleep(args.minutes * 60 - warmup)
                stop.set()
            rss_end = _rss_mib()
            # Heal everything, then compare connections with the start.
            for name in sorted(self.paused):
                await trio.to_thread.run_sync(lc.resume, name)
            for name in sorted(self.down):
                await trio.to_thread.run_sync(lc.start, name)
            self.paused.clear()
            self.down.clear()
            live = {n.name for n in lc.nodes} - self.expelled
            async with cluster.events() as events:
                with trio.move_on_after(30):
                    while {n.name for n in cluster.nodes() if n.state is pa.NodeState.UP} != live:
                        await events.receive()
            per_node = {n.name: n.connections for n in cluster.nodes()}
            stats = cluster.statistics()
        sockets_end = _sockets()
        keys = await trio.to_thread.run_sync(_count_keys, [lc.dsn_for(n.name) for n in lc.nodes])
        duplicated = sum(1 for c in keys.values() if c > 1)
        acknowledged = set(self.acknowledged)
        missing = len(acknowledged - set(keys))
        stray = len(set(keys) - acknowledged - self.unknown)
        ended = self.answered + sum(self.failed.values())
        report: dict[str, Any] = {
            "minutes": args.minutes,
            "tasks": args.tasks,
            "bridge": args.bridge,
            "sent": self.sent,
            "answered": self.answered,
            "failed": dict(self.failed),
            "lost": self.sent - ended,
            "hung": self.failed.get("hung", 0),
            "writes_acknowledged": len(self.acknowledged),
            "writes_outcome_unknown": len(self.unknown),
            "writes_duplicated": duplicated,
            "writes_missing": missing,
            "writes_stray": stray,
            "faults": dict(self.faults),
            "restarts": stats.restarts,
            "retried": stats.requests_retried,
            "statements_invalidated": stats.statements_invalidated,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_mib_after_warmup": rss_warm,
            "rss_mib_end_of_load": rss_end,
            "connections_start": connections_start,
            "connections_end": sum(per_node.values()),
            "connections_end_per_node": per_node,
            "sockets_start": sockets_start,
            "sockets_end": sockets_end,
        }
        print(json.dumps(report, indent=2))
        bad = report["lost"] or report["hung"] or duplicated or missing or stray
        limit = 3  # connections_per_node below
        bad = bad or sockets_end > sockets_start or any(c > limit for c in per_node.values())
        bad = bad or rss_end > rss_warm + 32  # MiB: growth under steady chaos is a leak
        return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bridge", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    with LocalCluster(nodes=args.nodes) as lc:
        status = trio.run(Soak(lc, args).run)
    sys.exit(status)


if __name__ == "__main__":
    main()
