"""What every peer shares: the command protocol, the workloads and the recorders.

A peer is started as ``python peers/<peer>.py '<config JSON>'``. The config
holds the cluster (``dsn``, ``nodes``: name, uuid, host, port) and the peer's
options. The peer connects, prints ``{"event": "ready", ...}`` on stdout, then
reads one JSON command per line on stdin and answers each with one JSON line:

* ``{"cmd": "throughput", "query": "select1"|"row"|"rows1000"|"uuid",
  "concurrency": C, "warmup": s, "duration": s}``: C tasks run the query in a
  loop; the answer has the request count, requests/s, latencies
  (microseconds, sorted) and client CPU (``time.process_time``) of the
  measured window. With ``"t0": T`` the tasks start at ``time.monotonic() ==
  T`` (see ``timeline``; the sluggish workload starts its fault then). A peer
  that passes ``counters`` (picopyn_actors: its ``statistics()`` counters)
  adds ``"counters"``: each integer's change over the window, other values as
  they were at its end. Every answer has ``"gc"``: the garbage collections of
  each generation in the window and the seconds they took (timed through
  ``gc.callbacks``), the objects the collector tracked after the window and
  those frozen. With ``"gc_freeze": true`` the peer calls ``gc.freeze()`` at
  the end of the warm-up, before the window.
* ``{"cmd": "timeline", "query": "uuid", "concurrency": C, "t0": T,
  "duration": s, "bin": s}``: starts at ``time.monotonic() == T`` (the parent
  reads the same system-wide clock and injects faults at fixed offsets from
  T); answers per-bin successes per answering node, failures and latencies.
* ``{"cmd": "paired", "query": ..., "concurrency": C, "warmup": s, "slice": s,
  "pairs": N}``: an A/B within one process, for a peer with two modes (the
  picopyn_actors peer: hedging on and off, per call). C tasks run the query
  in a loop while the mode alternates every ``slice`` seconds, N pairs of
  slices, each pair AB or BA at random (seeded: so that neither a drift nor
  the client's periodic work, such as discovery every 2 s, favours a mode,
  as a fixed AB BA order would: its period of four slices always put the
  same mode at a multiple of 2 s); the answer has,
  per slice, its mode, the requests completed in it, its length and the
  client's CPU over it (and ``counters``' changes, if given). ``"control":
  true`` asks the peer for mode B in both halves (an A/A run).
* ``{"cmd": "quit"}`` (or end of input): close and exit.

The harness is framework-neutral: the asyncio peers and the trio peer pass
their own ``call``/``sleep``/task-spawning helpers. It imports neither
asyncio nor trio at module level, so each peer's environment needs only its
own client.
"""

from __future__ import annotations

import gc
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

#: name -> (SQL, argument maker or None, the client method: "fetchrow" or "fetch")
QUERIES: dict[str, tuple[str, Callable[[random.Random], tuple[Any, ...]] | None, str]] = {
    "select1": ("SELECT 1", None, "fetchrow"),
    "row": (
        "SELECT id, name, value FROM bench_items WHERE id = $1",
        lambda rnd: (rnd.randint(1, 1000),),
        "fetchrow",
    ),
    # The whole table: 1000 rows of (int, text, float8), about 40 KB on the wire.
    "rows1000": ("SELECT id, name, value FROM bench_items", None, "fetch"),
    "uuid": ("SELECT pico_instance_uuid()", None, "fetchrow"),
}

#: A client call: (method, sql, args) -> the first row ("fetchrow") or all rows ("fetch").
Call = Callable[[str, str, tuple[Any, ...]], Awaitable[Any]]
#: Task index -> the call that task uses (raw asyncpg gives each task its own connection).
MakeCall = Callable[[int], Call]

#: After a failed request a task waits this long before the next one, like an
#: application that logs the error. The same for every peer; it keeps a client
#: whose requests fail at once from spinning.
FAIL_PAUSE = 0.01


def config() -> dict[str, Any]:
    """The JSON config from the command line."""
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} '<config JSON>'")
    cfg: dict[str, Any] = json.loads(sys.argv[1])
    return cfg


def emit(obj: dict[str, Any]) -> None:
    """Send one JSON line to the parent."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def read_command() -> dict[str, Any] | None:
    """Block for the next command line; ``None`` at end of input."""
    line = sys.stdin.readline()
    if not line:
        return None
    cmd: dict[str, Any] = json.loads(line)
    return cmd


def error_name(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:120] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- throughput ------------------------------------------------------------------


class GcMeter:
    """The garbage collector's work while installed: collections of each generation
    and the seconds they took, timed by a ``gc.callbacks`` hook."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._began = 0.0

    def _hook(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        generation = info["generation"]
        self.collections[generation] += 1
        self.seconds[generation] += time.perf_counter() - self._began

    def __enter__(self) -> GcMeter:
        gc.callbacks.append(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._hook)

    def snapshot(self) -> dict[str, list[Any]]:
        return {"collections": list(self.collections), "seconds": list(self.seconds)}


class Throughput:
    """Counts completions and keeps latencies; ``snapshot`` marks the window's ends."""

    def __init__(self, tasks: int) -> None:
        self.done = 0
        self.failed = 0
        self.stopping = False
        self.ends: list[float] = []
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.per_task = [0] * tasks
        self.started: list[float | None] = [None] * tasks

    async def worker(
        self,
        index: int,
        call: Call,
        method: str,
        query: str,
        make_args: Callable[[random.Random], tuple[Any, ...]] | None,
        sleep: Callable[[float], Awaitable[Any]],
    ) -> None:
        rnd = random.Random(index)
        monotonic = time.monotonic
        ends = self.ends
        latencies = self.latencies
        per_task = self.per_task
        started = self.started
        no_args: tuple[Any, ...] = ()
        while not self.stopping:
            args = make_args(rnd) if make_args is not None else no_args
            start = started[index] = monotonic()
            try:
                await call(method, query, args)
            except Exception as exc:
                started[index] = None
                self.failed += 1
                self.errors[error_name(exc)] += 1
                await sleep(FAIL_PAUSE)
                continue
            end = monotonic()
            started[index] = None
            self.done += 1
            per_task[index] += 1
            ends.append(end)
            latencies.append(end - start)

    def snapshot(
        self, counters: Callable[[], dict[str, Any]] | None = None, meter: GcMeter | None = None
    ) -> dict[str, Any]:
        times = os.times()
        return {
            "counters": counters() if counters is not None else None,
            "gc": meter.snapshot() if meter is not None else None,
            "t": time.monotonic(),
            "cpu": time.process_time(),
            "user": times.user,
            "system": times.system,
            "done": self.done,
            "per_task": list(self.per_task),
            "started": list(self.started),
        }

    def result(self, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        t0, t1 = a["t"], b["t"]
        lat = [
            round(lat * 1e6)
            for end, lat in zip(self.ends, self.latencies, strict=True)
            if t0 <= end <= t1
        ]
        # Requests still waiting when the window closed count with the age they
        # had then (a lower bound): a client that starves some callers must not
        # look fast because their requests never finish.
        censored = [round((t1 - s) * 1e6) for s in b["started"] if s is not None]
        lat.extend(censored)
        lat.sort()
        requests = b["done"] - a["done"]
        per_task = [y - x for x, y in zip(a["per_task"], b["per_task"], strict=True)]

        def per_request(key: str) -> float | None:
            return (b[key] - a[key]) * 1e6 / requests if requests else None

        out: dict[str, Any] = {
            "requests": requests,
            "elapsed": t1 - t0,
            "rps": requests / (t1 - t0) if t1 > t0 else 0.0,
            "cpu": b["cpu"] - a["cpu"],
            "cpu_us_per_request": per_request("cpu"),
            "user_us_per_request": per_request("user"),
            "system_us_per_request": per_request("system"),
            "failed": self.failed,
            "errors": dict(self.errors.most_common(5)),
            "latencies_us": lat,
            "in_flight_at_end": len(censored),
            "oldest_in_flight_us": max(censored, default=0),
            "starved_tasks": sum(1 for n in per_task if n == 0),
            "per_task_min": min(per_task, default=0),
            "per_task_max": max(per_task, default=0),
        }
        if a.get("gc") is not None and b.get("gc") is not None:
            out["gc"] = {
                key: [y - x for x, y in zip(a["gc"][key], b["gc"][key], strict=True)]
                for key in ("collections", "seconds")
            }
        if a["counters"] is not None and b["counters"] is not None:
            out["counters"] = {
                key: (
                    value - a["counters"][key]
                    if isinstance(value, int) and not isinstance(value, bool)
                    else value
                )
                for key, value in b["counters"].items()
            }
        return out


async def run_throughput(
    cmd: dict[str, Any],
    make_call: MakeCall,
    sleep: Callable[[float], Awaitable[Any]],
    run_tasks: Callable[[list[Callable[[], Awaitable[None]]]], Awaitable[None]],
    *,
    tasks: int | None = None,
    counters: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the throughput command. ``run_tasks(fns)`` runs the functions concurrently
    and returns when all have returned; ``tasks`` overrides the task count;
    ``counters`` (optional) reads the client's own counters at the window's ends."""
    query, make_args, method = QUERIES[cmd["query"]]
    count = tasks if tasks is not None else int(cmd["concurrency"])
    rec = Throughput(count)
    snaps: list[dict[str, Any]] = []
    if "t0" in cmd:
        await sleep(max(0.0, float(cmd["t0"]) - time.monotonic()))

    async def clock() -> None:
        await sleep(float(cmd["warmup"]))
        if cmd.get("gc_freeze"):
            gc.freeze()  # what was allocated so far: out of every later collection
        snaps.append(rec.snapshot(counters, meter))
        await sleep(float(cmd["duration"]))
        snaps.append(rec.snapshot(counters, meter))
        rec.stopping = True
        # Counted after the window: walking the heap takes milliseconds.
        tracked.append(len(gc.get_objects()))

    def make(i: int) -> Callable[[], Awaitable[None]]:
        call = make_call(i)
        return lambda: rec.worker(i, call, method, query, make_args, sleep)

    fns = [clock, *(make(i) for i in range(count))]
    meter = GcMeter()
    tracked: list[int] = []
    if cmd.get("cprofile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        try:
            with meter:
                await run_tasks(fns)
        finally:
            prof.disable()
        out = rec.result(snaps[0], snaps[1])
        out["cprofile"] = cprofile_summary(prof, rec.done)
        out["cprofile_requests"] = rec.done
        del out["latencies_us"]
    else:
        with meter:
            await run_tasks(fns)
        out = rec.result(snaps[0], snaps[1])
    out["tasks"] = count
    if "gc" in out:
        out["gc"]["tracked"] = tracked[0] if tracked else None
        out["gc"]["frozen"] = gc.get_freeze_count()
    return out


async def run_paired(
    cmd: dict[str, Any],
    make_call: Callable[[int, Callable[[], bool]], Call],
    sleep: Callable[[float], Awaitable[Any]],
    run_tasks: Callable[[list[Callable[[], Awaitable[None]]]], Awaitable[None]],
    *,
    counters: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the paired command. ``make_call(i, mode)`` is task ``i``'s call,
    which sends in mode A (``mode()`` true) or B: both modes share the
    process, the connections and the moment, so what differs is the mode."""
    query, make_args, method = QUERIES[cmd["query"]]
    count = int(cmd["concurrency"])
    pairs = int(cmd["pairs"])
    width = float(cmd["slice"])
    state = {"on": True, "stopping": False, "done": 0, "failed": 0}
    slices: list[dict[str, Any]] = []

    def mode() -> bool:
        return bool(state["on"])

    def snap() -> tuple[float, float, int, dict[str, Any] | None]:
        return (
            time.monotonic(),
            time.process_time(),
            int(state["done"]),
            counters() if counters is not None else None,
        )

    order = random.Random(int(cmd.get("seed", 1)))
    modes = [m for _ in range(pairs) for m in order.choice([(True, False), (False, True)])]

    async def clock() -> None:
        await sleep(float(cmd["warmup"]))
        for k in range(2 * pairs):
            state["on"] = modes[k]
            t0, c0, n0, k0 = snap()
            await sleep(width)
            t1, c1, n1, k1 = snap()
            piece: dict[str, Any] = {
                "a": bool(state["on"]),
                "requests": n1 - n0,
                "seconds": t1 - t0,
                "cpu": c1 - c0,
            }
            if k0 is not None and k1 is not None:
                piece["counters"] = {
                    key: value - k0[key]
                    for key, value in k1.items()
                    if isinstance(value, int) and not isinstance(value, bool)
                }
            slices.append(piece)
        state["stopping"] = True

    def make(i: int) -> Callable[[], Awaitable[None]]:
        call = make_call(i, mode)
        rnd = random.Random(i)
        no_args: tuple[Any, ...] = ()

        async def worker() -> None:
            while not state["stopping"]:
                args = make_args(rnd) if make_args is not None else no_args
                try:
                    await call(method, query, args)
                except Exception:
                    state["failed"] += 1
                    await sleep(FAIL_PAUSE)
                    continue
                state["done"] += 1

        return worker

    await run_tasks([clock, *(make(i) for i in range(count))])
    return {"slices": slices, "failed": state["failed"], "tasks": count}


# -- timelines (failover, hang) -----------------------------------------------------


class Timeline:
    """Per-bin counts by completion time, relative to ``t0``."""

    def __init__(self, t0: float, duration: float, width: float) -> None:
        self.t0 = t0
        self.width = width
        n = int(duration / width) + 1
        self.ok: list[Counter[str]] = [Counter() for _ in range(n)]
        self.failed = [0] * n
        self.max_latency = [0.0] * n
        self.errors: Counter[str] = Counter()
        self.stopping = False
        self.in_flight: dict[int, float] = {}
        self.worst = 0.0
        self.extra: dict[str, Any] = {}

    def _bin(self, end: float) -> int:
        return min(len(self.failed) - 1, max(0, int((end - self.t0) / self.width)))

    async def worker(
        self, index: int, call: Call, query: str, sleep: Callable[[float], Awaitable[Any]]
    ) -> None:
        monotonic = time.monotonic
        while not self.stopping:
            start = monotonic()
            self.in_flight[index] = start
            try:
                row = await call("fetchrow", query, ())
            except Exception as exc:
                end = monotonic()
                del self.in_flight[index]
                b = self._bin(end)
                self.failed[b] += 1
                self.errors[error_name(exc)] += 1
                self._latency(b, end - start)
                await sleep(FAIL_PAUSE)
                continue
            end = monotonic()
            del self.in_flight[index]
            b = self._bin(end)
            self.ok[b][str(row[0])] += 1
            self._latency(b, end - start)

    def _latency(self, b: int, seconds: float) -> None:
        if seconds > self.max_latency[b]:
            self.max_latency[b] = seconds
        if seconds > self.worst:
            self.worst = seconds

    def result(self) -> dict[str, Any]:
        now = time.monotonic()
        stuck = [now - s for s in self.in_flight.values()]
        return {
            "bin": self.width,
            "ok": [dict(c) for c in self.ok],
            "failed": self.failed,
            "max_latency": self.max_latency,
            "worst_latency": max([self.worst, *stuck]),
            "unfinished": len(stuck),
            "errors": dict(self.errors.most_common(8)),
            **self.extra,
        }


async def run_timeline(
    cmd: dict[str, Any],
    make_call: MakeCall,
    sleep: Callable[[float], Awaitable[Any]],
    run_tasks: Callable[[list[Callable[[], Awaitable[None]]]], Awaitable[None]],
    move_on_after: Callable[[float, Callable[[], Awaitable[None]]], Awaitable[None]],
    side: Callable[[Timeline], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Run the timeline command. ``move_on_after(s, fn)`` runs ``fn`` for at most ``s``
    seconds; ``side`` (optional) runs alongside, e.g. to record client events."""
    query, _, _ = QUERIES[cmd["query"]]
    t0 = float(cmd["t0"])
    duration = float(cmd["duration"])
    grace = float(cmd.get("grace", 5.0))
    tl = Timeline(t0, duration + grace, float(cmd.get("bin", 0.1)))
    await sleep(max(0.0, t0 - time.monotonic()))

    async def clock() -> None:
        await sleep(max(0.0, t0 + duration - time.monotonic()))
        tl.stopping = True

    def make(i: int) -> Callable[[], Awaitable[None]]:
        call = make_call(i)
        return lambda: tl.worker(i, call, query, sleep)

    fns = [clock, *(make(i) for i in range(int(cmd["concurrency"])))]
    if side is not None:
        fns.append(lambda: side(tl))

    async def everything() -> None:
        await run_tasks(fns)

    await move_on_after(duration + grace, everything)
    return tl.result()


# -- the command loop ---------------------------------------------------------------


async def serve(
    handlers: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]],
    read: Callable[[], Awaitable[dict[str, Any] | None]],
) -> None:
    """Answer commands until ``quit`` or end of input."""
    while True:
        cmd = await read()
        if cmd is None or cmd.get("cmd") == "quit":
            return
        handler = handlers.get(cmd["cmd"])
        if handler is None:
            emit({"error": f"unknown command {cmd['cmd']!r}"})
            continue
        try:
            result = await handler(cmd)
        except Exception as exc:
            emit({"error": error_name(exc)})
            continue
        emit(result)


# -- deterministic profile (call counts) ------------------------------------------------


#: Per-request counts worth comparing between clients: (label, substrings that
#: must all be in cProfile's "file:line(function)" key).
EVENT_COUNTS: list[tuple[str, tuple[str, ...]]] = [
    ("epoll/select polls", ("of 'select.epoll' objects",)),
    ("socket send() calls", ("'send' of '_socket.socket'",)),
    ("socket recv() calls", ("'recv' of '_socket.socket'",)),
    ("trio task reschedules", ("trio/_core/_run.py", "(reschedule)")),
    ("trio cancel scopes entered", ("trio/_core/_run.py", "(__enter__)")),
    ("trio channel send_nowait", ("trio/_channel.py", "(send_nowait)")),
    ("trio-asyncio loop iterations", ("trio_asyncio/_base.py", "(_main_loop_one)")),
    ("asyncio callbacks run", ("asyncio/events.py", "(_run)")),
    ("asyncio call_soon", ("(call_soon)",)),
    ("asyncio tasks created", ("(create_task)",)),
]


def cprofile_summary(prof: Any, requests: int, top: int = 60) -> dict[str, Any]:
    """The ``top`` functions by own time (calls and own/cumulative microseconds per
    request), selected event counts per request and all Python calls per request, over
    every request completed while the profiler ran (warm-up included).

    cProfile slows everything down several times, so its times are only
    relative. Its call counts are exact; a coroutine or generator counts one
    call per resumption.
    """
    import pstats

    n = max(1, requests)
    stats = pstats.Stats(prof)
    rows = []
    events = dict.fromkeys((label for label, _ in EVENT_COUNTS), 0.0)
    for (path, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        key = f"{_short(path)}:{line}({func})"
        for label, needles in EVENT_COUNTS:
            if all(needle in key for needle in needles):
                events[label] += ncalls / n
        rows.append(
            {
                "function": key,
                "calls_per_request": ncalls / n,
                "own_us_per_request": tottime * 1e6 / n,
                "cum_us_per_request": cumtime * 1e6 / n,
            }
        )
    rows.sort(key=lambda r: r["own_us_per_request"], reverse=True)
    return {
        "python_calls_per_request": stats.total_calls / n,  # type: ignore[attr-defined]
        "events_per_request": events,
        "functions": rows[:top],
    }


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3", "picopyn_actors/", "bench/"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i:] if marker != "site-packages/" else path[i + len(marker) :]
    return path
