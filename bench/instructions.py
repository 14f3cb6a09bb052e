"""Client instructions per request, counted by callgrind: an A/B that ignores the machine's load.

Throughput on a shared machine moves by 10% from one round to the next; the
number of instructions the client executes per request does not. This
counts them for one or more working trees, with hedging off and on::

    python bench/instructions.py                          # this tree, the fake backend
    python bench/instructions.py --backend stand-in       # 3 stand-in nodes (bare PostgreSQL)
    python bench/instructions.py --tree . --tree ../old   # A/B two trees, alternating
    python bench/instructions.py --hedging both --repeat 3
    python bench/instructions.py --backend stand-in --query row --query keyed --hedging off
    python bench/instructions.py --backend stand-in --hedging off --layers

Each measure runs the client twice under ``valgrind --tool=callgrind``, with
``N1`` and ``N2`` requests after the same warm-up, and reports ``(I2 - I1) /
(N2 - N1)``: start-up and shutdown cancel out. The client runs ``TASKS``
tasks over 3 nodes with 3 connections each, each task making one kind of
request (``--query``):

* ``select1``: ``fetchrow("SELECT 1", idempotent=True)``;
* ``row``: one row of the bench's sharded table by a random id,
  ``fetchrow("SELECT ... WHERE id = $1", key, idempotent=True)``;
* ``keyed``: the same row with ``bucket=`` (the bucket of its id, computed
  before the count starts), which routes it to the node that owns the bucket.

``row`` and ``keyed`` need ``--backend stand-in``; they compare keyed routing's
own cost with the same query unrouted.

``--layers`` (stand-in, ``select1``) also counts, once per round, what lies
under the client, each with one task per connection of the 9: asyncpg on
asyncio with no pool (``asyncio``), picopyn 0.2.0 with its pool (``seed``,
in its own bench environment; 9 tasks: it serves no more), and, for each
tree, trio with the bare embedded runner and no actors (``floor``). The
client's count less the floor's is what the actors cost; the seed's less
asyncio's is what its pool costs; the floor's less asyncio's is trio's.

Time-driven work (the hedge scheduler's looks once a millisecond, probes,
the hedging window) must happen as often per request as it does at full
speed, although valgrind runs some 50 times slower: the client runs on a
trio clock that advances with the process's own CPU time times ``--rate``
(0.02 by default), not with the wall clock, so that neither valgrind nor the
machine's load changes how often per request it comes due. The remaining
spread between two identical measures is a few hundred instructions per
request; ``--repeat`` and the median take care of it.

``--caches`` runs cachegrind instead, with its cache and branch simulation,
and reports per request, beside the instructions, the first-level
instruction and data cache misses and the mispredicted branches: why one
instruction costs more than another (a client that touches more objects and
more code per request runs its instructions slower). It is some 2x slower
than the plain count.

Needs valgrind (``apt-get install valgrind``). It runs in the bench's own
environment (bench/.venvs/bench, built as ``bench/run.py`` builds it);
picopyn_actors is imported from each ``--tree``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WARMUP = 500
#: The sharded table of ``--query row`` and ``keyed``, and its ids 1..KEYS.
TABLE, KEYS = "bench_items", 1000
QUERIES = ("select1", "row", "keyed")
#: A layer under the client: its name, the python that runs it, how to reach the nodes.
Layer = tuple[str, str, dict[str, Any]]
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")
#: What ``--caches`` reports: a name, and the line of cachegrind's summary it is read from.
CACHE_EVENTS = {
    "instructions": "I   refs",
    "I1 misses": "I1  misses",
    "D1 misses": "D1  misses",
    "mispredicts": "Mispredicts",
}


def collected(output: str) -> int:
    """The instruction count callgrind prints at exit ("Collected : N")."""
    found = _COLLECTED.findall(output)
    if not found:
        raise RuntimeError(f"callgrind printed no instruction count:\n{output[-2000:]}")
    return int(found[-1])


def cache_counts(output: str) -> dict[str, int]:
    """The totals of :data:`CACHE_EVENTS` in cachegrind's summary at exit
    (``==pid== D1  misses:  2,144,798  ( 1,945,232 rd ...``: the first number)."""
    counts = {}
    for name, label in CACHE_EVENTS.items():
        found = re.findall(rf"^==\d+== {re.escape(label)}:\s+([\d,]+)", output, re.MULTILINE)
        if not found:
            raise RuntimeError(f"cachegrind printed no {label!r} line:\n{output[-2000:]}")
        counts[name] = int(found[-1].replace(",", ""))
    return counts


def per_request(first: int, second: int, n1: int, n2: int) -> float:
    """Instructions per request from two runs of ``n1`` and ``n2`` requests."""
    if n2 <= n1:
        raise ValueError(f"the second run must have more requests ({n1}, {n2})")
    return (second - first) / (n2 - n1)


# -- the client, run under valgrind -----------------------------------------------------

_CHILD = r'''
import json, os, random, sys, time
sys.path.insert(0, os.environ["BENCH_TREE"])
import trio
import picopyn_actors as pa

class WorkClock(trio.abc.Clock):
    """Virtual seconds: this process's CPU seconds times ``rate``."""
    def __init__(self, rate):
        self.rate, self.base = rate, 0.0
    def start_clock(self):
        self.base = time.process_time()
    def current_time(self):
        return (time.process_time() - self.base) * self.rate
    def deadline_to_sleep_time(self, deadline):
        return max(0.0, (deadline - self.current_time()) / self.rate)

cfg = json.loads(os.environ["BENCH_CONFIG"])
TABLE, KEYS = cfg["table"], cfg["keys"]
ROW = f"SELECT id, name, value FROM {TABLE} WHERE id = $1"

async def main():
    options = {"connections_per_node": 3, "hedging": pa.Hedging() if cfg["hedging"] else None}
    if cfg["dsn"] is None:
        from picopyn_actors.testing import FakeCluster
        fake = FakeCluster(3, instant=True)
        target, options["backend"] = fake.dsn(), fake
    else:
        target, options["dialect"] = cfg["dsn"], "postgresql"
    async with pa.open_cluster(target, **options) as cluster:
        async with cluster.events() as events:
            while sum(n.state is pa.NodeState.UP for n in cluster.nodes()) < 3:
                await events.receive()
        left = cfg["requests"]
        query = cfg["query"]
        buckets = {}
        if query == "keyed":
            for key in range(1, KEYS + 1):
                buckets[key] = await cluster.bucket(TABLE, key)
        async def worker(i):
            nonlocal left
            rnd = random.Random(1000 + i)
            while left > 0:
                left -= 1
                if query == "select1":
                    await cluster.fetchrow("SELECT 1", idempotent=True)
                elif query == "row":
                    await cluster.fetchrow(ROW, rnd.randint(1, KEYS), idempotent=True)
                else:
                    key = rnd.randint(1, KEYS)
                    await cluster.fetchrow(ROW, key, bucket=buckets[key], idempotent=True)
        async with trio.open_nursery() as nursery:
            for i in range(cfg["tasks"]):
                nursery.start_soon(worker, i)
    os._exit(0)  # at once: the shutdown is the same for every run anyway

trio.run(main, clock=WorkClock(cfg["rate"]))
'''

# The layers under the client (--layers): one task per connection, SELECT 1.
_LAYERS_CHILD = r'''
import json, os, sys
cfg = json.loads(os.environ["BENCH_CONFIG"])
client, left = cfg["client"], cfg["requests"]

async def worker(call):
    global left
    while left > 0:
        left -= 1
        await call("SELECT 1")

if client in ("asyncio", "seed"):
    import asyncio
    async def main():
        if client == "asyncio":
            import asyncpg
            calls = [
                (await asyncpg.connect(host=h, port=p, user=cfg["user"],
                                       password=cfg["password"], database="postgres")).fetchrow
                for h, p in cfg["nodes"] * 3
            ]
        else:
            from picopyn import Client
            seed = Client(cfg["dsn"], pool_size=9)
            await seed.connect()
            calls = [seed.fetchrow] * 9
        await asyncio.gather(*(worker(call) for call in calls))
        os._exit(0)
    asyncio.run(main())
else:  # the floor: trio, the embedded runner, asyncpg; no actors
    sys.path.insert(0, os.environ["BENCH_TREE"])
    import trio
    from picopyn_actors._bridge import open_backend
    from picopyn_actors._dsn import Address, parse_dsn
    async def main():
        async with open_backend(parse_dsn(cfg["dsn"]), 10.0, {}, "embedded") as backend:
            conns = [await backend.connect(Address(h, p)) for h, p in cfg["nodes"] * 3]
            def call_on(conn):
                def call(query):
                    task = trio.lowlevel.current_task()
                    conn.submit("fetchrow", query, (), lambda r: trio.lowlevel.reschedule(task, r))
                    return trio.lowlevel.wait_task_rescheduled(
                        lambda _: trio.lowlevel.Abort.FAILED
                    )
                return call
            calls = [call_on(conn) for conn in conns]
            async with trio.open_nursery() as nursery:
                for call in calls:
                    nursery.start_soon(worker, call)
            os._exit(0)
    trio.run(main)
'''


def count(
    tree: Path,
    requests: int,
    *,
    query: str,
    hedging: bool,
    dsn: str | None,
    args: argparse.Namespace,
    layer: Layer | None = None,
) -> dict[str, int]:
    """The counts of one client run of ``requests`` requests (after the warm-up),
    or of one of the layers under it (``layer``: its name, python and stand-in):
    its instructions, and with ``--caches`` its cache misses and mispredicts."""
    config: dict[str, object] = {
        "query": query,
        "table": TABLE,
        "keys": KEYS,
        "hedging": hedging,
        "dsn": dsn,
        "requests": WARMUP + requests,
        "tasks": args.tasks,
        "rate": args.rate,
    }
    python, child = sys.executable, _CHILD
    if layer is not None:
        name, python, node = layer
        config.update(client=name, **node)
        child = _LAYERS_CHILD
    env = {**os.environ, "BENCH_TREE": str(tree), "BENCH_CONFIG": json.dumps(config)}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
        script.write(child)
    try:
        tool = (
            [
                "--tool=cachegrind",
                "--cache-sim=yes",
                "--branch-sim=yes",
                "--cachegrind-out-file=/dev/null",
            ]
            if args.caches
            else ["--tool=callgrind", "--callgrind-out-file=/dev/null"]
        )
        done = subprocess.run(
            ["valgrind", *tool, python, script.name],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        os.unlink(script.name)
    if done.returncode != 0:
        raise RuntimeError(f"the client failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
    if args.caches:
        return cache_counts(done.stderr)
    return {"instructions": collected(done.stderr)}


def median(measures: list[dict[str, float]]) -> dict[str, float]:
    """The median of each count over several measures of one case."""
    return {name: statistics.median(m[name] for m in measures) for name in measures[0]}


def shown(counts: dict[str, float]) -> str:
    """One measure, for the progress lines: its instructions, and the rest if counted."""
    rest = ", ".join(f"{n} {v:,.0f}" for n, v in counts.items() if n != "instructions")
    return f"{counts['instructions']:,.0f}" + (f" ({rest})" if rest else "")


def measure(
    tree: Path,
    *,
    query: str,
    hedging: bool,
    dsn: str | None,
    args: argparse.Namespace,
    layer: Layer | None = None,
) -> dict[str, float]:
    """Each count per request (instructions, and with ``--caches`` the others)."""
    first, second = (
        count(tree, n, query=query, hedging=hedging, dsn=dsn, args=args, layer=layer)
        for n in (args.n1, args.n2)
    )
    return {name: per_request(first[name], second[name], args.n1, args.n2) for name in first}


@contextlib.contextmanager
def stand_in(backend: str) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """The DSN of 3 stand-in nodes for ``backend="stand-in"``, and what the
    layers need to reach them; ``None`` for the fake."""
    if backend == "fake":
        yield None, {}
        return
    sys.path.insert(0, str(REPO))
    from picopyn_actors.testing import LocalCluster

    with LocalCluster(nodes=3, strict=False) as cluster:
        # The bench's sharded table, as bench/run.py makes it, for --query row and keyed.
        cluster.create_sharded_table(
            TABLE, {"id": "integer", "name": "string", "value": "double"}, key=["id"]
        )
        cluster.execute_everywhere(
            f"INSERT INTO {TABLE} (id, name, value) SELECT g, 'item-' || g, g * 0.5 "
            f"FROM generate_series(1, {KEYS}) g;\nANALYZE {TABLE};"
        )
        nodes = [(n.host, n.port) for n in cluster.nodes]
        yield cluster.dsn, {
            "nodes": nodes,
            "user": cluster.user,
            "password": cluster.password,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tree", action="append", type=Path, help="a working tree (default: this one); repeat: A/B"
    )
    parser.add_argument("--backend", choices=("fake", "stand-in"), default="fake")
    parser.add_argument("--hedging", choices=("off", "on", "both"), default="both")
    parser.add_argument(
        "--query",
        action="append",
        choices=QUERIES,
        help="select1 (default), row, keyed; repeat: each in turn",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="also count asyncpg on asyncio, picopyn 0.2.0, and trio's bare embedded runner",
    )
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--n1", type=int, default=1000)
    parser.add_argument("--n2", type=int, default=11000)
    parser.add_argument("--repeat", type=int, default=1, help="measures of each case (median)")
    parser.add_argument("--rate", type=float, default=0.02, help="virtual seconds per CPU second")
    parser.add_argument(
        "--caches",
        action="store_true",
        help="cachegrind: also count cache misses and mispredicted branches per request",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "bench"))
    import _envs

    if Path(sys.prefix).resolve() != (_envs.VENVS / "bench").resolve():
        # The client needs the project's dependencies: the bench's environment has them.
        bench = _envs.ensure("bench", log=lambda m: print(m, file=sys.stderr))
        os.execv(str(bench), [str(bench), __file__, *(sys.argv[1:] if argv is None else argv)])
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    trees = [t.resolve() for t in (args.tree or [REPO])]
    queries = args.query or ["select1"]
    if args.backend == "fake" and set(queries) - {"select1"}:
        parser.error("--query row and keyed need --backend stand-in (the fake has no table)")
    if args.layers and (args.backend == "fake" or queries != ["select1"]):
        parser.error("--layers needs --backend stand-in and --query select1")
    # picopyn 0.2.0 runs in its own environment, as bench/run.py builds it.
    seed_python = (
        str(_envs.ensure("picopyn-0.2.0", log=lambda m: print(m, file=sys.stderr)))
        if args.layers
        else ""
    )
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.hedging]
    results: dict[tuple[Path, str, bool], list[dict[str, float]]] = {}
    layers: dict[str, list[dict[str, float]]] = {}
    with stand_in(args.backend) as (dsn, node):
        for round_ in range(args.repeat):
            for tree in trees if round_ % 2 == 0 else trees[::-1]:  # alternate the order
                for query in queries:
                    for hedging in modes:
                        value = measure(tree, query=query, hedging=hedging, dsn=dsn, args=args)
                        results.setdefault((tree, query, hedging), []).append(value)
                        state = "on" if hedging else "off"
                        print(f"  {tree} {query} hedging={state}: {shown(value)}", file=sys.stderr)
                if args.layers:
                    floor: Layer = ("floor", sys.executable, node)
                    value = measure(
                        tree, query="select1", hedging=False, dsn=dsn, args=args, layer=floor
                    )
                    layers.setdefault(f"floor ({tree.name})", []).append(value)
                    print(f"  {tree} floor: {shown(value)}", file=sys.stderr)
            if args.layers:
                for name, python in (("asyncio", sys.executable), ("seed", seed_python)):
                    value = measure(
                        REPO, query="select1", hedging=False, dsn=dsn, args=args,
                        layer=(name, python, node),
                    )
                    layers.setdefault(name, []).append(value)
                    print(f"  {name}: {shown(value)}", file=sys.stderr)
    medians = {key: median(values) for key, values in results.items()}
    what = f"instructions per request ({args.backend}, {args.tasks} tasks)"
    print(f"| tree | query | hedging | {what} | vs hedging off | vs {queries[0]} |")
    print("|---|---|---|---:|---:|---:|")
    for tree in trees:
        for query in queries:
            off = medians.get((tree, query, False), {}).get("instructions")
            for hedging in modes:
                value = medians[(tree, query, hedging)]["instructions"]
                ratio = f"{value / off:.3f}x" if off and hedging else ""
                base = medians[(tree, queries[0], hedging)]["instructions"]
                versus = f"{value / base:.3f}x" if query != queries[0] else ""
                state = "on" if hedging else "off"
                print(f"| {tree.name} | {query} | {state} | {value:,.0f} | {ratio} | {versus} |")
    if layers:
        print()
        print("| layer (select1, a task per connection) | instructions per request |")
        print("|---|---:|")
        for name, values in layers.items():
            print(f"| {name} | {median(values)['instructions']:,.0f} |")
    if args.caches:
        print()
        events = [e for e in CACHE_EVENTS if e != "instructions"]
        what = f"client (per request, {args.backend}, {args.tasks} tasks)"
        print(f"| {what} | " + " | ".join(events) + " |")
        print("|---|" + "---:|" * len(events))
        rows = {
            **{f"{t.name} {q} hedging={'on' if h else 'off'}": m
               for (t, q, h), m in medians.items()},
            **{name: median(values) for name, values in layers.items()},
        }
        for name, counts in rows.items():
            print(f"| {name} | " + " | ".join(f"{counts[e]:,.0f}" for e in events) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
