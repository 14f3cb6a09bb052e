"""Cancel ``open_cluster`` from outside at 0, 1, 2 ... N ms; run as a child process.

``python tests/cancel_sweep.py DSN BRIDGE MAX_MS`` prints one JSON object: the
seconds each cancelled open took to return, and the sockets and threads left
afterwards. It runs in a child process so that a hang (a trio run that never
returns, which no deadline inside that run can break) fails the test instead
of stalling the suite.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time

import trio
import trio_asyncio
from helpers import open_sockets

import picopyn_actors as pa


async def _sweep(dsn: str, bridge: str, max_ms: int) -> list[float]:
    # BRIDGE+trio-asyncio: the same inside a running trio-asyncio loop.
    bridge, _, beside = bridge.partition("+")
    if beside == "trio-asyncio":
        async with trio_asyncio.open_loop():
            return await _opens(dsn, bridge, max_ms)
    return await _opens(dsn, bridge, max_ms)


async def _opens(dsn: str, bridge: str, max_ms: int) -> list[float]:
    took: list[float] = []
    for ms in range(max_ms + 1):
        start = time.monotonic()
        with trio.move_on_after(ms / 1000):
            async with pa.open_cluster(dsn, bridge=bridge, connect_timeout=3.0):
                await trio.sleep_forever()
        took.append(time.monotonic() - start)
    return took


def main() -> None:
    dsn, bridge, max_ms = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sockets_before = open_sockets()
    took = trio.run(_sweep, dsn, bridge, max_ms)
    gc.collect()
    print(
        json.dumps(
            {
                "took": took,
                "sockets_left": open_sockets() - sockets_before,
                # trio keeps idle worker threads for a while: not ours.
                "threads_left": [
                    t.name
                    for t in threading.enumerate()
                    if t is not threading.main_thread() and not t.name.startswith("Trio thread")
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
