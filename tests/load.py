"""A steady concurrent load that accounts for every request exactly once."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

import picopyn_actors as pa

# Anything slower than this is a hang, which no request may do.
REQUEST_DEADLINE = 8.0


@attrs.define
class Tally:
    """Per-request outcomes: answers per node and failures per exception class."""

    sent: int = 0
    ok: Counter[str] = attrs.field(factory=Counter)
    failed: Counter[str] = attrs.field(factory=Counter)
    errors: list[BaseException] = attrs.field(factory=list)
    max_latency: float = 0.0

    @property
    def ended(self) -> int:
        return sum(self.ok.values()) + sum(self.failed.values())


async def run_load(
    tally: Tally,
    call: Callable[[int], Awaitable[Any]],
    *,
    tasks: int,
    stop: trio.Event,
    names: dict[str, str] | None = None,
) -> None:
    """Run ``call(seq)`` in ``tasks`` loops until ``stop`` is set; record each outcome once.

    ``call`` returns the uuid of the node that answered (or anything, when
    ``names`` is ``None``).
    """
    counter = itertools.count()

    async def loop() -> None:
        while not stop.is_set():
            seq = next(counter)
            tally.sent += 1
            start = trio.current_time()
            try:
                with trio.fail_after(REQUEST_DEADLINE):
                    answer = await call(seq)
            except trio.TooSlowError as exc:
                tally.failed["hang"] += 1
                tally.errors.append(exc)
            except pa.PicodataError as exc:
                tally.failed[type(exc).__name__] += 1
                tally.errors.append(exc)
            else:
                key = names.get(answer, str(answer)) if names is not None else "ok"
                tally.ok[key] += 1
            tally.max_latency = max(tally.max_latency, trio.current_time() - start)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(loop)
