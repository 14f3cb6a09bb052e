"""What the stand-in's pgproto front costs per request.

Starts a 1-node ``LocalCluster(strict=True)`` and times ``SELECT 1`` round
trips with raw asyncpg (one connection, its statement cache on, as the
library uses it), through the front and straight to the PostgreSQL server
behind it, alternating in rounds in the same run. Prints the median
microseconds per round trip of each, per round, and the medians of those,
and the CPU time the front's process spent per request (from /proc).

    python bench/front.py                 # 7 rounds of 5000 round trips
    python bench/front.py --rounds 3 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import asyncpg

from picopyn_actors.testing import LocalCluster


def _cpu_seconds(pid: int) -> float:
    """User plus system time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _round_trips(dsn: str, count: int) -> list[float]:
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(200):  # warm up: the statement is parsed and cached
            await conn.fetchval("SELECT 1")
        timings = []
        for _ in range(count):
            started = time.perf_counter()
            await conn.fetchval("SELECT 1")
            timings.append(time.perf_counter() - started)
        return timings
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    with LocalCluster(nodes=1, strict=True) as lc:
        front = lc.dsn
        bare = front.replace(f":{lc.node('i1').port}/", f":{lc.server_port('i1')}/")
        front_pid = lc.front_pid("i1")
        assert front_pid is not None
        medians: dict[str, list[float]] = {"front": [], "bare": []}
        front_cpu: list[float] = []
        with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
            for round_ in range(args.rounds):
                order = [("front", front), ("bare", bare)]
                if round_ % 2:
                    order.reverse()
                for name, dsn in order:
                    cpu_before = _cpu_seconds(front_pid)
                    timings = runner.run(_round_trips(dsn, args.requests))
                    medians[name].append(statistics.median(timings) * 1e6)
                    if name == "front":
                        spent = _cpu_seconds(front_pid) - cpu_before
                        front_cpu.append(spent / (args.requests + 200) * 1e6)
                print(
                    f"round {round_ + 1}: front {medians['front'][-1]:.1f} µs, "
                    f"bare {medians['bare'][-1]:.1f} µs, "
                    f"front CPU {front_cpu[-1]:.0f} µs per request",
                    flush=True,
                )
    front_us = statistics.median(medians["front"])
    bare_us = statistics.median(medians["bare"])
    print(
        f"median of {args.rounds} rounds: front {front_us:.1f} µs, bare {bare_us:.1f} µs, "
        f"the front adds {front_us - bare_us:.1f} µs per round trip; "
        f"the front's CPU: {statistics.median(front_cpu):.0f} µs per request"
    )


if __name__ == "__main__":
    main()
