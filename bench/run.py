#!/usr/bin/env python3
"""Benchmark picopyn_actors against its peers on one stand-in cluster, in one run.

    python bench/run.py                 # everything (about 30 minutes)
    python bench/run.py --quick         # a smoke run (about 6 minutes)
    python bench/run.py --only throughput --peers picopyn-0.2.0,actors-rr
    python bench/run.py --docs          # also refresh docs/benchmarks.md and docs/img/

It builds one virtual environment per peer under bench/.venvs/ (pinned, reused
while the pins are unchanged), re-runs itself in the ``bench`` environment
(the project's dependencies, matplotlib, py-spy; picopyn_actors itself comes
from this checkout through PYTHONPATH), starts a 3-node
``LocalCluster(strict=False)`` (bare PostgreSQL: the pgproto front's own cost
would blur the comparison; ``bench/front.py`` measures it) and drives every
peer as a subprocess that gets the cluster as JSON on its command line and answers JSON lines (see
bench/peers/_harness.py). Results go to bench/results/<timestamp>.json, a
markdown report next to it, and the timeline plots.

Workloads (``--only``): ``throughput``, ``hedging-cost``, ``failover``,
``hang``, ``sluggish``, ``scale``, ``profile``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import _envs  # noqa: E402

WORKLOADS = ("throughput", "hedging-cost", "failover", "hang", "sluggish", "scale", "profile")
BASELINE = "picopyn-0.2.0"


#: The sharded table the keyed peer routes on (``bench_items``, sharded by ``id``).
KEYED_TABLE = "bench_items"


class Peer:
    """A client under test: where it runs and with what config; ``queries``, if
    given, limits the throughput cases it runs to those queries."""

    def __init__(
        self,
        name: str,
        env: str,
        script: str,
        *,
        queries: tuple[str, ...] | None = None,
        **config: Any,
    ) -> None:
        self.name = name
        self.env = env
        self.script = script
        self.queries = queries
        self.config = config

    def runs(self, query: str) -> bool:
        return self.queries is None or query in self.queries


PEERS = [
    Peer("asyncpg", "asyncpg", "asyncpg_raw.py"),
    Peer("asyncpg-pool", "asyncpg", "asyncpg_pool.py"),
    Peer(BASELINE, "picopyn-0.2.0", "picopyn_seed.py"),
    Peer("picopyn-3", "picopyn-3", "picopyn3.py"),
    # picopyn_actors with its default bridge (bridge="auto") and each built-in strategy ...
    Peer("actors-rr", "bench", "actors.py", strategy="RoundRobin"),
    Peer("actors-random", "bench", "actors.py", strategy="Random"),
    Peer("actors-lif", "bench", "actors.py", strategy="LeastInFlight"),
    Peer("actors-fastest", "bench", "actors.py", strategy="Fastest"),
    # ... and RoundRobin over the other bridges: trio-asyncio (for services that run
    # trio-asyncio) and a plain asyncio loop in a thread of its own.
    Peer(
        "actors-rr-ta",
        "bench",
        "actors.py",
        strategy="RoundRobin",
        options={"bridge": "trio-asyncio"},
    ),
    # The default bridge again, inside a running trio-asyncio loop (a service that
    # already runs one): compared with actors-rr.
    Peer("actors-rr-in-ta", "bench", "actors.py", strategy="RoundRobin", in_trio_asyncio=True),
    Peer(
        "actors-rr-thread",
        "bench",
        "actors.py",
        strategy="RoundRobin",
        options={"bridge": "thread"},
    ),
    # RoundRobin with hedged reads (the default adaptive policy): what hedging costs
    # on a healthy cluster (here) and what it buys on a sluggish one (the sluggish
    # workload).
    Peer("actors-rr-hedge", "bench", "actors.py", strategy="RoundRobin", hedging={}),
    # RoundRobin with bucket= on every request (the row's id is the sharding key):
    # what keyed routing costs the client. Only the row query has a key of its own.
    Peer(
        "actors-rr-keyed",
        "bench",
        "actors.py",
        queries=("row",),
        strategy="RoundRobin",
        keyed=KEYED_TABLE,
    ),
]
#: Peers run only when ``--peers`` names them (A/B variants).
EXTRA_PEERS = [
    # Hedging every late request, whether or not its node still answers others
    # (``only_stalled=False``): what the stall rule saves on a widely spread workload.
    Peer(
        "actors-rr-hedge-late",
        "bench",
        "actors.py",
        strategy="RoundRobin",
        hedging={"only_stalled": False},
    ),
]
PEER_BY_NAME = {p.name: p for p in PEERS + EXTRA_PEERS}

#: Failover and hang runs: the clients and their refresh options.
TIMELINE_PEERS = ["actors-rr", "actors-rr-ta", "picopyn-3", BASELINE]
TIMELINE_OPTIONS: dict[str, dict[str, Any]] = {
    "actors-rr": {"discovery_interval": 1.0, "health_interval": 0.5},
    "actors-rr-ta": {"discovery_interval": 1.0, "health_interval": 0.5},
    "picopyn-3": {"topology_update_interval": 1.0},  # its minimum
}

#: Sluggish runs: without and with hedging, and the picopyn releases for reference.
SLUGGISH_PEERS = ["actors-rr", "actors-rr-hedge", "picopyn-3", BASELINE]
SLUGGISH_QUICK_PEERS = ["actors-rr", "actors-rr-hedge"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the environment -----------------------------------------------------------------


def in_bench_env() -> bool:
    return Path(sys.prefix).resolve() == (_envs.VENVS / "bench").resolve()


def reexec_in_bench_env(args: argparse.Namespace) -> None:
    """Build the bench environment and run this script again inside it."""
    python = _envs.ensure("bench", rebuild=args.rebuild_envs, log=log)
    env = dict(os.environ, BENCH_ENV_READY="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


# -- peers as subprocesses -------------------------------------------------------------


class PeerProcess:
    """One running peer: JSON commands in on stdin, JSON lines out on stdout."""

    def __init__(
        self, peer: Peer, cluster: dict[str, Any], logdir: Path, tag: str, **extra: Any
    ) -> None:
        self.peer = peer
        cfg = {**cluster, **peer.config, **extra}
        env = dict(os.environ)
        paths = [str(BENCH / "peers")]
        if peer.env == "bench":
            paths.append(str(REPO))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.pop("PYTHONSTARTUP", None)
        self.log_path = logdir / f"{tag}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [str(_envs.python(peer.env)), str(BENCH / "peers" / peer.script), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=BENCH,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        #: The peer's ready line (set by ``running``).
        self.ready: dict[str, Any] = {}
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(
                f"{self.peer.name}: no answer within {timeout:.0f} s (log: {self.log_path})"
            ) from None
        if line is None:
            raise RuntimeError(f"{self.peer.name} exited; see {self.log_path}")
        data: dict[str, Any] = json.loads(line)
        if "error" in data:
            raise RuntimeError(f"{self.peer.name}: {data['error']}")
        return data

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def request(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(cmd)
        return self.read(timeout)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send({"cmd": "quit"})
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


@contextmanager
def running(
    peers: list[Peer], cluster: dict[str, Any], logdir: Path, suffix: str = "", **extra: Any
) -> Iterator[dict[str, PeerProcess]]:
    procs: dict[str, PeerProcess] = {}
    try:
        for peer in peers:
            procs[peer.name] = PeerProcess(peer, cluster, logdir, peer.name + suffix, **extra)
        for name, proc in procs.items():
            proc.ready = proc.read(timeout=90)
            log(f"  {name} ready {proc.ready}")
        yield procs
    finally:
        for proc in procs.values():
            proc.close()


# -- workloads ----------------------------------------------------------------------------


def run_throughput(
    args: argparse.Namespace, cluster: dict[str, Any], peers: list[Peer], logdir: Path
) -> dict[str, Any]:
    from _metrics import ratios, summarize_rounds

    cases = [
        (q, c)
        for q in args.queries
        for c in (args.rows1000_concurrency if q == "rows1000" else args.concurrency)
    ]
    raw: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {
        case: {p.name: [] for p in peers if p.runs(case[0])} for case in cases
    }
    total = args.rounds * sum(len(by_peer) for by_peer in raw.values())
    step = 0
    with running(peers, cluster, logdir, "-throughput") as procs:
        ready = {name: proc.ready for name, proc in procs.items()}
        for r in range(args.rounds):
            for ci, (query, concurrency) in enumerate(cases):
                # Rotate the order each round so no peer always runs first or last.
                mine = [p for p in peers if p.runs(query)]
                shift = (r + ci) % len(mine)
                order = mine[shift:] + mine[:shift]
                for peer in order:
                    step += 1
                    cmd = {
                        "cmd": "throughput",
                        "query": query,
                        "concurrency": concurrency,
                        "warmup": args.warmup,
                        "duration": args.duration,
                        "gc_freeze": args.gc_freeze,
                    }
                    res = procs[peer.name].request(cmd, timeout=args.warmup + args.duration + 60)
                    res["at"] = time.monotonic() - args.duration / 2  # the window's middle
                    res["load"] = os.getloadavg()[0]
                    raw[(query, concurrency)][peer.name].append(res)
                    log(
                        f"  [{step}/{total}] round {r + 1} {query} c={concurrency} "
                        f"{peer.name}: {res['rps']:.0f} req/s, "
                        f"{res['cpu_us_per_request'] or 0:.0f} µs CPU/req"
                    )
    out_cases = []
    for (query, concurrency), by_peer in raw.items():
        base = by_peer.get(BASELINE, [])
        rows = {}
        for name, rounds in by_peer.items():
            rows[name] = {**summarize_rounds(rounds), **ratios(rounds, base)}
            if "picopyn-3" in by_peer:
                vs3 = ratios(rounds, by_peer["picopyn-3"])
                rows[name]["ratio_vs_picopyn3"] = vs3["ratio"]
            if "actors-rr" in by_peer:
                # The same client with the same bridge, measured apart (inside trio-asyncio).
                rows[name]["ratio_vs_actors_rr"] = ratios(rounds, by_peer["actors-rr"])["ratio"]
        out_cases.append({"query": query, "concurrency": concurrency, "peers": rows})
    loads = sorted(r["load"] for by_peer in raw.values() for rs in by_peer.values() for r in rs)
    return {
        "load_median": loads[len(loads) // 2] if loads else None,
        "load_max": loads[-1] if loads else None,
        "baseline": BASELINE if any(p.name == BASELINE for p in peers) else None,
        "rounds": args.rounds,
        "duration": args.duration,
        "warmup": args.warmup,
        "gc_freeze": args.gc_freeze,
        "connections": cluster["connections"],
        "nodes": len(cluster["nodes"]),
        "cases": out_cases,
        "ready": ready,
    }


def run_hedging_cost(
    args: argparse.Namespace, cluster: dict[str, Any], logdir: Path
) -> dict[str, Any]:
    """Hedging's own cost on a healthy cluster, side by side in one process: the
    hedging peer alternates hedging on and off per call (``paired``), every
    ``--paired-slice`` seconds, for each throughput case."""
    from _metrics import paired_metrics

    peer = PEER_BY_NAME["actors-rr-hedge"]
    cases = [
        (q, c)
        for q in args.queries
        for c in (args.rows1000_concurrency if q == "rows1000" else args.concurrency)
    ]
    # The first case once more as a control: hedging off in both halves (A/A).
    runs = [(q, c, False) for q, c in cases] + [(*cases[0], True)] if cases else []
    out_cases = []
    with running([peer], cluster, logdir, "-paired") as procs:
        proc = procs[peer.name]
        for query, concurrency, control in runs:
            cmd = {
                "cmd": "paired",
                "query": query,
                "concurrency": concurrency,
                "warmup": args.warmup,
                "slice": args.paired_slice,
                "pairs": args.paired_pairs,
                "control": control,
            }
            span = args.warmup + 2 * args.paired_pairs * args.paired_slice
            res = proc.request(cmd, timeout=span + 60)
            case = {"query": query, "concurrency": concurrency, "control": control}
            if "error" in res:
                out_cases.append({**case, **res})
                continue
            metrics = paired_metrics(res["slices"])
            out_cases.append({**case, "failed": res["failed"], **metrics})
            log(
                f"  {query} c={concurrency}{' (control: off/off)' if control else ''}: "
                f"hedging on/off {metrics['ratio']:.3f}x "
                f"({metrics['rps_a']:.0f} / {metrics['rps_b']:.0f} req/s), CPU/req "
                f"{metrics['cpu_us_a']:.1f} / {metrics['cpu_us_b']:.1f} µs"
            )
    return {
        "peer": peer.name,
        "slice": args.paired_slice,
        "pairs": args.paired_pairs,
        "warmup": args.warmup,
        "connections": cluster["connections"],
        "cases": out_cases,
    }


def run_timeline(
    kind: str,
    args: argparse.Namespace,
    lc: Any,
    cluster: dict[str, Any],
    peers: list[Peer],
    logdir: Path,
) -> dict[str, Any]:
    """Failover (kill/start) or hang (pause/resume) of one node under steady load."""
    from _metrics import timeline_metrics

    victim = args.victim
    names = {n["uuid"]: n["name"] for n in cluster["nodes"]}
    fault, restore = (lc.kill, lc.start) if kind == "failover" else (lc.pause, lc.resume)
    result: dict[str, Any] = {
        "victim": victim,
        "fault_at": args.fault_at,
        "restore_at": args.restore_at,
        "duration": args.timeline_duration,
        "concurrency": args.timeline_concurrency,
        "node_names": [n["name"] for n in cluster["nodes"]],
        "peers": {},
    }
    for peer in peers:
        log(f"  {kind}: {peer.name}")
        options = {**peer.config.get("options", {}), **TIMELINE_OPTIONS.get(peer.name, {})}
        marks: dict[str, float] = {}
        try:
            with running([peer], cluster, logdir, f"-{kind}", options=options) as procs:
                proc = procs[peer.name]
                t0 = time.monotonic() + 1.0
                proc.send(
                    {
                        "cmd": "timeline",
                        "query": "uuid",
                        "concurrency": args.timeline_concurrency,
                        "t0": t0,
                        "duration": args.timeline_duration,
                        "bin": 0.1,
                        "grace": 5.0,
                    }
                )
                time.sleep(max(0.0, t0 + args.fault_at - time.monotonic()))
                marks["fault"] = time.monotonic() - t0
                fault(victim)
                marks["fault_done"] = time.monotonic() - t0
                time.sleep(max(0.0, t0 + args.restore_at - time.monotonic()))
                marks["restore"] = time.monotonic() - t0
                restore(victim)
                marks["restore_done"] = time.monotonic() - t0
                data = proc.read(timeout=args.timeline_duration + 30)
        except Exception as exc:  # one broken peer must not stop the run
            log(f"  {peer.name}: {exc}")
            result["peers"][peer.name] = {"error": str(exc)}
            data = None
        finally:
            heal(lc, victim)
        if data is None:
            continue
        metrics = timeline_metrics(
            data,
            names=names,
            victim=victim,
            fault_at=marks["fault"],
            restore_begin=marks["restore"],
            restore_end=marks["restore_done"],
            duration=args.timeline_duration,
            kind="kill" if kind == "failover" else "pause",
        )
        metrics["marks"] = marks
        metrics["bins"] = {
            "bin": data["bin"],
            "ok": [{names.get(k, k): v for k, v in b.items()} for b in data["ok"]],
            "failed": data["failed"],
            "max_latency": data["max_latency"],
        }
        result["peers"][peer.name] = metrics
        result["fault_at_measured"] = marks["fault"]
        result["restore_at_measured"] = marks["restore"]
        log(
            f"    ok={metrics['ok_total']} failed={metrics['failed_total']} "
            f"out={metrics['out_of_rotation_s']} ({metrics['out_of_rotation_how']}) "
            f"back={metrics['back_to_third_s']} max_lat={metrics['max_latency_s']:.2f}s"
        )
        time.sleep(1.0)
    return result


def heal(lc: Any, name: str) -> None:
    """Leave node ``name`` running and unpaused, whatever happened."""
    try:
        if lc.is_paused(name):
            lc.resume(name)
        if not lc.is_running(name):
            lc.start(name)
    except Exception as exc:
        log(f"  could not heal {name}: {exc}")


class DutyCycle:
    """Pause node ``name`` for ``on`` seconds in every ``period``, from ``t0`` on, in a
    thread of the parent (``LocalCluster.pause``/``resume``: SIGSTOP/SIGCONT of the
    postmaster and its backends), until :meth:`stop`.

    The cycle keeps to its schedule: each pause starts at ``t0 + k * period`` and
    lasts ``on`` from the moment ``pause`` returned (its processes are stopped).
    ``resume`` re-writes the node's catalog after SIGCONT, so a cycle that ends
    late pushes the next pause to the next slot still ahead (counted in
    ``skipped``). ``pauses`` holds the (stopped, continued) moments, seconds since
    ``t0``, as measured around the calls.
    """

    def __init__(self, lc: Any, name: str, t0: float, period: float, on: float) -> None:
        self.lc = lc
        self.name = name
        self.t0 = t0
        self.period = period
        self.on = on
        self.pauses: list[tuple[float, float]] = []
        self.skipped = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="duty-cycle", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> DutyCycle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join()

    def _run(self) -> None:
        slot = 0
        try:
            while True:
                start = self.t0 + slot * self.period
                # Waiting on the halt event is also the schedule's sleep.
                if self._halt.wait(max(0.0, start - time.monotonic())):
                    return
                self.lc.pause(self.name)
                stopped = time.monotonic()
                # ``on`` from the moment the backends are stopped (pause() takes a while).
                halted = self._halt.wait(self.on)
                continued = time.monotonic()
                self.lc.resume(self.name)
                self.pauses.append((stopped - self.t0, continued - self.t0))
                if halted:
                    return
                ahead = math.ceil((time.monotonic() - self.t0) / self.period)
                self.skipped += max(0, ahead - slot - 1)
                slot = max(slot + 1, ahead)
        except BaseException as exc:  # reported by run_sluggish; heal() cleans up
            self.error = exc


def run_sluggish(
    args: argparse.Namespace,
    lc: Any,
    cluster: dict[str, Any],
    peers: list[Peer],
    logdir: Path,
) -> dict[str, Any]:
    """Idempotent reads while one node is paused for a moment again and again.

    Each peer runs in a fresh process; the parent drives the same duty cycle
    for every peer, from the moment the peer's tasks start (``t0``, on the
    shared monotonic clock), through the warm-up and the measured window.
    """
    from _metrics import duty_cycle_metrics, sluggish_metrics

    import picopyn_actors as pa

    budget = pa.Hedging().budget
    result: dict[str, Any] = {
        "victim": args.victim,
        "period_s": args.sluggish_period,
        "pause_s": args.sluggish_pause,
        "duration": args.sluggish_duration,
        "warmup": args.sluggish_warmup,
        "concurrency": args.sluggish_concurrency,
        "connections": cluster["connections"],
        "query": "SELECT pico_instance_uuid()",
        "peers": {},
    }
    for peer in peers:
        log(f"  sluggish: {peer.name}")
        try:
            with running([peer], cluster, logdir, "-sluggish") as procs:
                proc = procs[peer.name]
                t0 = time.monotonic() + 0.5
                cycle = DutyCycle(lc, args.victim, t0, args.sluggish_period, args.sluggish_pause)
                with cycle:
                    res = proc.request(
                        {
                            "cmd": "throughput",
                            "query": "uuid",
                            "concurrency": args.sluggish_concurrency,
                            "t0": t0,
                            "warmup": args.sluggish_warmup,
                            "duration": args.sluggish_duration,
                        },
                        timeout=args.sluggish_warmup + args.sluggish_duration + 60,
                    )
                if cycle.error is not None:
                    raise RuntimeError(f"duty cycle failed: {cycle.error!r}")
        except Exception as exc:  # one broken peer must not stop the run
            log(f"  {peer.name}: {exc}")
            result["peers"][peer.name] = {"error": str(exc)}
            continue
        finally:
            heal(lc, args.victim)
        res["hedging"] = peer.config.get("hedging") is not None
        metrics = sluggish_metrics(res, budget if res["hedging"] else None)
        metrics["duty_cycle"] = duty_cycle_metrics(
            cycle.pauses, args.sluggish_period, cycle.skipped
        )
        result["peers"][peer.name] = metrics
        duty = metrics["duty_cycle"]
        log(
            f"    {metrics['rps']:.0f} req/s, p50 {metrics['p50_us'] or 0:.0f} µs, "
            f"p99 {metrics['p99_us'] or 0:.0f} µs, p99.9 {metrics['p999_us'] or 0:.0f} µs, "
            f"max {metrics['max_us'] or 0:.0f} µs, failed {metrics['failed']}"
            + (
                f", hedges {metrics['hedges_sent']} (won {metrics['hedges_won']}, refused "
                f"{metrics['hedges_refused']}, {metrics['extra_share'] or 0:.1%} extra)"
                if "hedges_sent" in metrics
                else ""
            )
            + f"; {duty['cycles']} pauses, median {duty['paused_ms_median'] or 0:.0f} ms, "
            f"skipped {duty['skipped']}"
        )
    return result


def run_scale(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    """picopyn_actors on the fake backend with 3, 10, 30 nodes: the client's own cost.

    The total number of connections stays the same (``--scale-connections``,
    spread evenly), so the queueing is the same at every node count and only
    what grows with the number of nodes can change the cost per request.
    """
    from _metrics import summarize_rounds

    peer = PEER_BY_NAME["actors-rr"]
    counts = args.scale_nodes
    raw: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    procs: dict[int, PeerProcess] = {}
    per_node = {n: max(1, args.scale_connections // n) for n in counts}
    try:
        for n in counts:
            procs[n] = PeerProcess(
                peer,
                {"connections": per_node[n] * n, "nodes": []},
                logdir,
                f"scale-{n}",
                fake=n,
                connections_per_node=per_node[n],
            )
        for n, proc in procs.items():
            log(f"  scale {n} nodes ready {proc.read(timeout=90)}")
        for r in range(args.rounds):
            shift = r % len(counts)
            for n in counts[shift:] + counts[:shift]:
                cmd = {
                    "cmd": "throughput",
                    "query": "select1",
                    "concurrency": args.scale_tasks,
                    "warmup": args.warmup,
                    "duration": args.duration,
                }
                res = procs[n].request(cmd, timeout=args.warmup + args.duration + 60)
                raw[n].append(res)
                log(
                    f"  round {r + 1} {n} nodes: {res['rps']:.0f} req/s, "
                    f"{res['cpu_us_per_request']:.1f} µs CPU/req"
                )
    finally:
        for proc in procs.values():
            proc.close()
    rows = [
        {"nodes": n, "connections_per_node": per_node[n], **summarize_rounds(raw[n])}
        for n in counts
    ]
    return {
        "connections": args.scale_connections,
        "concurrency": args.scale_tasks,
        "rounds": args.rounds,
        "rows": rows,
    }


def run_profile(args: argparse.Namespace, cluster: dict[str, Any], logdir: Path) -> dict[str, Any]:
    """py-spy samples of picopyn_actors (RoundRobin) and the baseline under load, plus
    exact call counts per request from cProfile for picopyn_actors."""
    from _metrics import categorize_stacks, leaf_functions

    py_spy = _envs.VENVS / "bench" / "bin" / "py-spy"
    runs = []
    seconds = max(3.0, args.duration)
    for name in args.profile_peers:
        fake = name.endswith("-fake")
        peer = PEER_BY_NAME[name.removesuffix("-fake")]
        target = {"connections": 9, "nodes": []} if fake else cluster
        extra = {"fake": 3, "connections_per_node": 3} if fake else {}
        with running(
            [peer], target, logdir, f"-profile{'-fake' if fake else ''}", **extra
        ) as procs:
            proc = procs[peer.name]
            for concurrency in args.concurrency:
                out = logdir / f"profile-{name}-c{concurrency}.txt"
                cmd = {
                    "cmd": "throughput",
                    "query": "select1",
                    "concurrency": concurrency,
                    "warmup": args.warmup + 0.5,
                    "duration": seconds,
                }
                proc.send(cmd)
                time.sleep(args.warmup + 0.5)
                spy = subprocess.run(
                    [
                        str(py_spy),
                        "record",
                        "--pid",
                        str(proc.pid),
                        "--duration",
                        str(int(seconds)),
                        "--rate",
                        "250",
                        "--nonblocking",
                        "--gil",
                        "--format",
                        "raw",
                        "--output",
                        str(out),
                    ],
                    capture_output=True,
                    text=True,
                )
                res = proc.read(timeout=seconds + 60)
                if spy.returncode != 0 or not out.exists():
                    log(f"  py-spy failed: {spy.stderr.strip()[-300:]}")
                    continue
                lines = out.read_text().splitlines()
                counts = categorize_stacks(lines)
                total = sum(counts.values()) or 1
                cpu = res["cpu_us_per_request"] or 0.0
                # Samples are taken only while Python holds the GIL, so they split the
                # user CPU; the kernel's share (system CPU: syscalls, loopback TCP) is
                # measured apart.
                user = res.get("user_us_per_request") or cpu
                system = res.get("system_us_per_request") or 0.0
                scale = cpu / (user + system) if user + system else 1.0
                breakdown = sorted(
                    (
                        (
                            part,
                            n / total * user * scale / cpu if cpu else 0.0,
                            n / total * user * scale,
                        )
                        for part, n in counts.items()
                    ),
                    key=lambda row: row[1],
                    reverse=True,
                )
                breakdown.append(
                    (
                        "kernel (system CPU: syscalls, loopback TCP)",
                        system * scale / cpu if cpu else 0.0,
                        system * scale,
                    )
                )
                runs.append(
                    {
                        "peer": name,
                        "concurrency": concurrency,
                        "rps": res["rps"],
                        "cpu_us_per_request": cpu,
                        "user_us_per_request": res.get("user_us_per_request"),
                        "system_us_per_request": res.get("system_us_per_request"),
                        "samples": total,
                        "breakdown": breakdown,
                        "leaves": leaf_functions(lines),
                    }
                )
                log(
                    f"  profile {name} c={concurrency}: {res['rps']:.0f} req/s, "
                    + ", ".join(f"{p} {s:.0%}" for p, s, _ in breakdown[:6])
                )
            # Exact call counts per request (cProfile slows things down: counts only).
            for concurrency in args.concurrency:
                cmd = {
                    "cmd": "throughput",
                    "query": "select1",
                    "concurrency": concurrency,
                    "warmup": args.warmup,
                    "duration": min(seconds, 2.0),
                    "cprofile": True,
                }
                res = proc.request(cmd, timeout=120)
                runs.append(
                    {
                        "peer": name,
                        "concurrency": concurrency,
                        "cprofile": True,
                        "requests": res["cprofile_requests"],
                        **res["cprofile"],
                    }
                )
    return {
        "runs": [r for r in runs if not r.get("cprofile")],
        "cprofile": [r for r in runs if r.get("cprofile")],
    }


# -- main -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "picopyn_actors"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if dirty:
            commit += " (picopyn_actors modified)"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()}",
        "commit": commit,
        "load_at_start": load,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="short rounds, fewer of them, no profile: a smoke run"
    )
    p.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"workloads to run, comma-separated (default: all of {', '.join(WORKLOADS)})",
    )
    p.add_argument(
        "--peers",
        default=",".join(p.name for p in PEERS),
        help="peers for the throughput workload, comma-separated",
    )
    p.add_argument("--duration", type=float, help="seconds measured per round (default 3)")
    p.add_argument(
        "--paired-slice",
        type=float,
        default=None,
        help="hedging-cost: seconds per slice, hedging on and off in turn (default 0.5)",
    )
    p.add_argument(
        "--paired-pairs",
        type=int,
        default=None,
        help="hedging-cost: pairs of slices per case (default 100, quick 4)",
    )
    p.add_argument("--rounds", type=int, help="alternating rounds per case (default 5)")
    p.add_argument("--warmup", type=float, default=None, help="seconds before measuring")
    p.add_argument("--concurrency", default="10,100", help="task counts (default 10,100)")
    p.add_argument(
        "--queries",
        default="select1,row,rows1000",
        help="select1, row and/or rows1000 (the 1000-row fetch)",
    )
    p.add_argument(
        "--rows1000-concurrency",
        default="10",
        help="task counts for the 1000-row fetch (default 10)",
    )
    p.add_argument(
        "--gc-freeze",
        action="store_true",
        help="throughput: every peer calls gc.freeze() after each warm-up",
    )
    p.add_argument("--timeline-duration", type=float, default=10.0)
    p.add_argument("--timeline-concurrency", type=int, default=20)
    p.add_argument("--fault-at", type=float, default=3.0)
    p.add_argument("--restore-at", type=float, default=7.0)
    p.add_argument("--victim", default="i2", help="the node killed or paused (default i2)")
    p.add_argument(
        "--sluggish-duration",
        type=float,
        help="seconds measured per client in the sluggish run (default 10, quick 4)",
    )
    p.add_argument("--sluggish-warmup", type=float, default=1.0)
    p.add_argument("--sluggish-concurrency", type=int, default=20)
    p.add_argument(
        "--sluggish-period", type=float, default=0.2, help="duty cycle period (default 0.2 s)"
    )
    p.add_argument(
        "--sluggish-pause",
        type=float,
        default=0.08,
        help="paused part of each period (default 0.08 s)",
    )
    p.add_argument(
        "--sluggish-peers",
        help=f"clients of the sluggish run (default {','.join(SLUGGISH_PEERS)}; "
        f"quick: {','.join(SLUGGISH_QUICK_PEERS)})",
    )
    p.add_argument("--scale-nodes", default="3,10,30")
    p.add_argument("--scale-tasks", type=int, default=100)
    p.add_argument(
        "--scale-connections", type=int, default=30, help="connections in total (default 30)"
    )
    p.add_argument(
        "--profile-peers",
        default=f"actors-rr,actors-rr-ta,actors-rr-thread,{BASELINE},actors-rr-fake",
        help="peers to profile; NAME-fake runs picopyn_actors on the fake backend",
    )
    p.add_argument("--connections", type=int, default=9, help="connections in total (default 9)")
    p.add_argument("--rebuild-envs", action="store_true", help="rebuild bench/.venvs/*")
    p.add_argument(
        "--docs",
        action="store_true",
        help="also write docs/benchmarks.md's results section and docs/img/*.png",
    )
    p.add_argument("--out", type=Path, default=BENCH / "results")
    args = p.parse_args()
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(args.only) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    for name in args.peers:
        if name not in PEER_BY_NAME:
            p.error(f"unknown peer {name}; known: {', '.join(PEER_BY_NAME)}")
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.queries = [x.strip() for x in args.queries.split(",") if x.strip()]
    args.rows1000_concurrency = [int(x) for x in args.rows1000_concurrency.split(",")]
    args.scale_nodes = [int(x) for x in args.scale_nodes.split(",")]
    args.profile_peers = [x.strip() for x in args.profile_peers.split(",") if x.strip()]
    if args.sluggish_peers is None:
        args.sluggish_peers = SLUGGISH_QUICK_PEERS if args.quick else SLUGGISH_PEERS
    else:
        args.sluggish_peers = [x.strip() for x in args.sluggish_peers.split(",") if x.strip()]
    for name in args.sluggish_peers:
        if name not in PEER_BY_NAME:
            p.error(f"unknown peer {name}; known: {', '.join(PEER_BY_NAME)}")
    if not 0 < args.sluggish_pause < args.sluggish_period:
        p.error("--sluggish-pause must be positive and shorter than --sluggish-period")
    args.sluggish_duration = args.sluggish_duration or (4.0 if args.quick else 10.0)
    if args.quick:
        args.duration = args.duration or 1.0
        args.rounds = args.rounds or 2
        args.warmup = 0.3 if args.warmup is None else args.warmup
        if "--only" not in " ".join(sys.argv):
            args.only = [w for w in args.only if w != "profile"]
    args.duration = args.duration or 3.0
    args.paired_slice = args.paired_slice or (0.25 if args.quick else 0.5)
    args.paired_pairs = args.paired_pairs or (4 if args.quick else 100)
    args.rounds = args.rounds or 5
    args.warmup = 0.5 if args.warmup is None else args.warmup
    return args


def main() -> int:
    # A plain SIGTERM would skip the clean-up (peers, servers): make it an exit.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args = parse_args()
    if not in_bench_env():
        reexec_in_bench_env(args)
    sys.path.insert(0, str(REPO))
    from _report import markdown, plot_timeline, targets

    from picopyn_actors.testing import LocalCluster

    started = datetime.datetime.now()
    stamp = started.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.out / stamp
    logdir.mkdir()
    needed = {PEER_BY_NAME[n].env for n in args.peers} | {"bench"}
    if {"failover", "hang"} & set(args.only):
        needed |= {PEER_BY_NAME[n].env for n in TIMELINE_PEERS}
    if "sluggish" in args.only:
        needed |= {PEER_BY_NAME[n].env for n in args.sluggish_peers}
    if "profile" in args.only:
        needed |= {PEER_BY_NAME[n.removesuffix("-fake")].env for n in args.profile_peers}
    for env in sorted(needed):
        if env != "bench":
            _envs.ensure(env, rebuild=args.rebuild_envs, log=log)
    # The command as the report prints it: where the results went is not part of it.
    argv = list(sys.argv[1:])
    for i, arg in enumerate(argv[:-1]):
        if arg == "--out":
            argv[i + 1] = "<dir>"
    argv = ["--out <dir>" if a.startswith("--out=") else a for a in argv]
    command = "python bench/run.py " + " ".join(argv)
    results: dict[str, Any] = {
        "meta": {
            **machine(),
            "started": started.isoformat(timespec="seconds"),
            "command": command.strip(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environments": {env: _envs.freeze(env) for env in sorted(needed)},
        }
    }
    log(
        f"machine: {results['meta']['cpu']}, {results['meta']['cores']} cores, "
        f"load {results['meta']['load_at_start']}"
    )

    if set(args.only) - {"scale"}:
        log("starting a 3-node LocalCluster(strict=False)")
        with LocalCluster(nodes=3, strict=False) as lc:
            # A sharded table (in _pico_table, with the stand-in's bucket map over the
            # three nodes' replicasets), so that the keyed peer can route on its id.
            lc.create_sharded_table(
                KEYED_TABLE,
                {"id": "integer", "name": "string", "value": "double"},
                key=["id"],
            )
            lc.execute_everywhere(
                f"INSERT INTO {KEYED_TABLE} (id, name, value) SELECT g, 'item-' || g, g * 0.5 "
                f"FROM generate_series(1, 1000) g;\nANALYZE {KEYED_TABLE};"
            )
            cluster = {
                "dsn": lc.dsn,
                "dsns": lc.dsns,
                "user": lc.user,
                "password": lc.password,
                "database": "postgres",
                "connections": args.connections,
                "nodes": [
                    {"name": n.name, "uuid": n.uuid, "host": n.host, "port": n.port}
                    for n in lc.nodes
                ],
            }
            if "throughput" in args.only:
                log("throughput")
                peers = [PEER_BY_NAME[n] for n in args.peers]
                results["throughput"] = run_throughput(args, cluster, peers, logdir)
            if "hedging-cost" in args.only:
                log("hedging-cost (hedging on and off in one process)")
                results["hedging-cost"] = run_hedging_cost(args, cluster, logdir)
            for kind, fault in (("failover", "kill/start"), ("hang", "pause/resume")):
                if kind in args.only:
                    log(f"{kind} ({fault} {args.victim})")
                    peers = [PEER_BY_NAME[n] for n in TIMELINE_PEERS]
                    results[kind] = run_timeline(kind, args, lc, cluster, peers, logdir)
            if "sluggish" in args.only:
                log(
                    f"sluggish ({args.victim} paused {args.sluggish_pause * 1000:.0f} ms "
                    f"in every {args.sluggish_period * 1000:.0f} ms)"
                )
                peers = [PEER_BY_NAME[n] for n in args.sluggish_peers]
                results["sluggish"] = run_sluggish(args, lc, cluster, peers, logdir)
            if "profile" in args.only:
                log("profile")
                results["profile"] = run_profile(args, cluster, logdir)
    if "scale" in args.only:
        log("scale (fake backend)")
        results["scale"] = run_scale(args, logdir)

    results["meta"]["load_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results["meta"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["targets"] = [
        {"target": t, "measured": m, "holds": ok} for t, m, ok in targets(results)
    ]
    json_path = args.out / f"{stamp}.json"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    report = markdown(results)
    md_path = args.out / f"{stamp}.md"
    plots = []
    for key in ("failover", "hang"):
        path = plot_timeline(results, key, logdir / f"{key}.png")
        if path is not None:
            plots.append(path)
            report += f"\n![{key} timeline]({path.relative_to(args.out)})\n"
    md_path.write_text(report)
    print(report)
    log(f"wrote {json_path}, {md_path}" + "".join(f", {p}" for p in plots))
    if args.docs:
        write_docs(report, plots)
    return 0


def write_docs(report: str, plots: list[Path]) -> None:
    """Replace the generated section of docs/benchmarks.md; copy the plots to docs/img/."""
    docs = REPO / "docs" / "benchmarks.md"
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    img = REPO / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    body = report.split("\n![")[0].rstrip()
    for path in plots:
        shutil.copy(path, img / path.name)
        body += f"\n\n![{path.stem} timeline](img/{path.name})"
    text = docs.read_text() if docs.exists() else f"# Benchmarks\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    docs.write_text(f"{head}{begin}\n{body}\n{end}{tail}")
    log(f"updated {docs}")


if __name__ == "__main__":
    sys.exit(main())
