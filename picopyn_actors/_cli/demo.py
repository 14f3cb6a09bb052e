"""``picopyn-actors demo``: a workload through picopyn_actors while a chaos script breaks nodes.

It starts a local stand-in cluster (real PostgreSQL servers impersonating
Picodata nodes, see :mod:`picopyn_actors.testing`), opens one
:class:`~picopyn_actors.Cluster` on it, waits for every node to be up
(at most ``_START_PATIENCE`` seconds; the run's clock starts then) and runs

* readers: ``SELECT pico_instance_uuid()`` with ``idempotent=True``, which
  also tells which node answered;
* writers: non-idempotent ``INSERT`` statements into a demo table;

while a chaos script, scaled to ``--duration``, kills a node, restarts it,
hangs another one (SIGSTOP), resumes it, adds a node and expels the seed
node. At the end it prints the requests sent, answered and failed (by
exception class), each node's share of the answers over time, and how long
the client took to heal after each fault; with ``--plot FILE.png`` it also
draws them (:mod:`picopyn_actors._cli.plot`), and with ``--prometheus
HOST:PORT`` it serves the client's metrics while it runs.

The bookkeeping (:class:`Recorder`) and the report (:func:`share_rows`,
:func:`heal_rows`, :func:`chaos_plan`) are plain code with their own tests.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .._cluster import Cluster, open_cluster
from .._dsn import Address
from .._errors import PicodataError
from .._events import EventsDropped, NodeEvent, NodeState
from .._util import unwrap_single_error
from ..testing import LocalCluster, NodeHandle
from .common import (
    fetch_catalog,
    live_logging,
    make_console,
    on_signals,
    serve_metrics,
    stderr_is_terminal,
)
from .view import CatalogNode, event_text, format_event, node_table, relative_stamp

DEMO_TABLE = "picopyn_demo"
CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {DEMO_TABLE} "
    "(id bigint PRIMARY KEY, writer int NOT NULL, payload text NOT NULL)"
)
INSERT = f"INSERT INTO {DEMO_TABLE} (id, writer, payload) VALUES ($1, $2, $3)"
READ = "SELECT pico_instance_uuid()"

#: Short intervals, so that every fault heals well within its slot of the run.
CLUSTER_OPTIONS: Mapping[str, Any] = {
    "discovery_interval": 1.0,
    "health_interval": 0.5,
    "probe_timeout": 0.5,
    "connect_timeout": 2.0,
    "backoff_initial": 0.05,
    "backoff_max": 1.0,
}
#: Each request's own deadline (``timeout=``): a stuck request fails as TooSlowError.
REQUEST_TIMEOUT = 5.0
#: Readers pause this long between requests, so that the workload is steady
#: but leaves the machine room for the servers and the health probes.
READER_THINK = 0.005
WRITER_THINK = 0.02


@attrs.frozen
class DemoOptions:
    """The command line of ``demo``.

    Attributes:
        duration: seconds of workload; the chaos script scales with it.
        nodes: nodes the local cluster starts with.
        live: the live view (else plain lines).
        readers: tasks running idempotent ``SELECT pico_instance_uuid()``.
        writers: tasks running non-idempotent ``INSERT`` statements.
        connections: connections per node.
        bucket: seconds per row of the share table.
        bridge: the bridge to asyncpg (``None``: the library's default).
        plot: draw the run into this image file at the end.
        prometheus: serve the client's metrics at this address while running.
    """

    duration: float = 60.0
    nodes: int = 3
    live: bool = True
    readers: int = 20
    writers: int = 2
    connections: int = 2
    bucket: float = 5.0
    bridge: str | None = None
    plot: Path | None = None
    prometheus: Address | None = None

    def cluster_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`open_cluster`."""
        options = dict(CLUSTER_OPTIONS, connections_per_node=self.connections)
        if self.bridge is not None:
            options["bridge"] = self.bridge
        return options


# -- the chaos script -----------------------------------------------------------------


@attrs.frozen
class Step:
    """One fault of the chaos script, ``at`` seconds after the workload starts."""

    at: float
    action: str
    node: str | None

    def describe(self) -> str:
        """What it does, in words."""
        node = self.node
        return {
            "kill": f"kill {node} (SIGKILL; the catalog still says Online)",
            "restart": f"restart {node} (same port; the catalog raises its incarnation)",
            "pause": f"hang {node} (SIGSTOP: its sockets stay open, nothing answers)",
            "resume": f"resume {node} (SIGCONT)",
            "add": "add a node (it joins the catalog Offline, then Online)",
            "expel": f"expel {node}, the seed node (catalog: Expelled; the server keeps running)",
            "alter": "change the schema (ALTER TABLE on every node: prepared statements go stale)",
        }[self.action]


#: When each fault happens, as a fraction of the run.
SCHEDULE: Sequence[tuple[float, str]] = (
    (0.10, "kill"),
    (0.25, "restart"),
    (0.40, "pause"),
    (0.52, "resume"),
    (0.58, "alter"),
    (0.65, "add"),
    (0.80, "expel"),
)


def chaos_plan(duration: float, names: Sequence[str]) -> list[Step]:
    """The chaos script for a run of ``duration`` seconds on nodes ``names``
    (at least three): kill and restart the second node, hang and resume the
    third, change the schema on every node, add a node, expel the first (the
    seed)."""
    if len(names) < 3:
        raise ValueError("the chaos script needs at least three nodes")
    targets = {
        "kill": names[1],
        "restart": names[1],
        "pause": names[2],
        "resume": names[2],
        "add": None,
        "expel": names[0],
        "alter": None,
    }
    return [
        Step(round(fraction * duration, 3), action, targets[action])
        for fraction, action in SCHEDULE
    ]


@attrs.define
class Fault:
    """A step as it happened: trio times of the call's start and end."""

    step: Step
    node: str
    started: float
    done: float | None = None
    error: str | None = None


# -- bookkeeping ------------------------------------------------------------------------


@attrs.define(eq=False)
class Recorder:
    """Counts requests and keeps the timelines the report is computed from.

    Times are ``trio.current_time()`` values.
    """

    origin: float
    sent: Counter[str] = attrs.field(factory=Counter)
    answered: Counter[str] = attrs.field(factory=Counter)
    failed: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    failures: list[tuple[float, str, str]] = attrs.field(factory=list)
    answers: dict[str, list[float]] = attrs.field(factory=dict)
    writes: list[float] = attrs.field(factory=list)
    events: list[NodeEvent] = attrs.field(factory=list)
    faults: list[Fault] = attrs.field(factory=list)
    #: Requests the servers rejected with 42999 and the client ran again.
    invalidated: int = 0
    end: float | None = None

    def send(self, op: str) -> None:
        """A request of kind ``op`` (``read``/``write``) is about to be sent."""
        self.sent[op] += 1

    def answer(self, op: str, node: str | None, at: float) -> None:
        """It was answered (by ``node``, when known)."""
        self.answered[op] += 1
        if node is not None:
            self.answers.setdefault(node, []).append(at)
        elif op == "write":
            self.writes.append(at)

    def failure(self, op: str, kind: str, at: float) -> None:
        """It failed with an exception of class ``kind``."""
        self.failed[op, kind] += 1
        self.failures.append((at, op, kind))

    @property
    def total_failed(self) -> int:
        """Failed requests, all kinds."""
        return sum(self.failed.values())

    def failure_kinds(self) -> Counter[str]:
        """Failed requests by exception class."""
        kinds: Counter[str] = Counter()
        for (_op, kind), count in self.failed.items():
            kinds[kind] += count
        return kinds


def _kinds_text(kinds: Mapping[str, int]) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())) or "-"


# -- the report -------------------------------------------------------------------------


def share_rows(
    answers: Mapping[str, Sequence[float]], origin: float, end: float, bucket: float
) -> tuple[list[str], list[tuple[str, int, dict[str, float]]]]:
    """Each node's share of the answers per ``bucket`` seconds.

    Returns the node names and, per bucket, ``(label, answers, {node: percent})``.
    """
    names = sorted(answers, key=_node_key)
    # A last sliver shorter than 5% of a bucket (the run ends a few ms late) is dropped.
    count = max(1, math.ceil((end - origin) / bucket - 0.05))
    rows = []
    for index in range(count):
        lo = origin + index * bucket
        hi = min(end, lo + bucket)
        per_node = {
            name: bisect.bisect_left(answers[name], hi) - bisect.bisect_left(answers[name], lo)
            for name in names
        }
        total = sum(per_node.values())
        shares = {name: 100.0 * n / total for name, n in per_node.items() if total}
        rows.append((f"{lo - origin:.0f}-{hi - origin:.0f}s", total, shares))
    return names, rows


def _node_key(name: str) -> tuple[str, int]:
    digits = name.lstrip("abcdefghijklmnopqrstuvwxyz_-")
    return (name[: len(name) - len(digits)], int(digits) if digits.isdigit() else 0)


@attrs.frozen
class Healing:
    """One row of the healing report.

    ``after`` is in seconds from ``since`` (``None``: not within the run).
    """

    fault: Fault
    what: str
    since: str
    after: float | None
    detail: str = ""


def _first_answer(answers: Mapping[str, Sequence[float]], node: str, after: float) -> float | None:
    times = answers.get(node, ())
    index = bisect.bisect_left(times, after)
    return times[index] if index < len(times) else None


def _first_event(
    events: Sequence[NodeEvent], node: str, after: float, test: Callable[[NodeEvent], bool]
) -> NodeEvent | None:
    for event in events:
        if event.node == node and event.at >= after and test(event):
            return event
    return None


def heal_rows(recorder: Recorder) -> list[Healing]:
    """How long the client took to heal after each fault.

    * kill, hang, expel: until the client stopped routing to the node (it
      left the UP state), and for a hang until it was marked down;
    * restart, resume, add: until the node answered a request again,
      counted from the end of the operation (the server accepts connections).
    """
    rows: list[Healing] = []
    events, answers = recorder.events, recorder.answers
    for fault in recorder.faults:
        node, start = fault.node, fault.started
        action = fault.step.action
        if fault.error is not None:
            rows.append(Healing(fault, "the operation failed", "start", None, fault.error))
            continue
        if action in ("kill", "pause", "expel"):
            left = _first_event(
                events, node, start, lambda e: e.old is NodeState.UP and e.new is not e.old
            )
            rows.append(
                Healing(
                    fault,
                    f"no new requests to {node}",
                    "start",
                    None if left is None else left.at - start,
                    "" if left is None else f"{left.old.value} -> {left.new.value}: {left.reason}",
                )
            )
            if action == "pause":
                down = _first_event(events, node, start, lambda e: e.new is NodeState.DOWN)
                rows.append(
                    Healing(
                        fault,
                        f"{node} marked down",
                        "start",
                        None if down is None else down.at - start,
                        "" if down is None else down.reason,
                    )
                )
        elif action == "alter":
            rows.append(
                Healing(
                    fault,
                    f"statements prepared again after 42999: {recorder.invalidated}",
                    "start",
                    None if fault.done is None else fault.done - start,
                )
            )
        else:
            since = fault.done if fault.done is not None else start
            first = _first_answer(answers, node, since)
            rows.append(
                Healing(
                    fault,
                    f"{node} answers again" if action != "add" else f"{node} answers",
                    "done",
                    None if first is None else first - since,
                )
            )
    return rows


def failures_between(recorder: Recorder, lo: float, hi: float) -> Counter[str]:
    """Failed requests by exception class within ``[lo, hi)``."""
    kinds: Counter[str] = Counter()
    for at, _op, kind in recorder.failures:
        if lo <= at < hi:
            kinds[kind] += 1
    return kinds


def summary(recorder: Recorder, options: DemoOptions, final: Sequence[str]) -> list[RenderableType]:
    """The end-of-run report, as renderables for a rich console."""
    origin = recorder.origin
    end = recorder.end if recorder.end is not None else origin
    out: list[RenderableType] = [
        Text(
            f"\nSummary: {end - origin:.1f} s, {options.nodes} nodes at start, "
            f"{options.readers} readers, {options.writers} writers",
            style="bold",
        )
    ]

    requests = Table(title="Requests", title_justify="left")
    for column in ("", "sent", "answered", "failed", "cut off at the end", "failures by kind"):
        requests.add_column(
            column, justify="left" if column in ("", "failures by kind") else "right"
        )
    ops = [op for op in ("read", "write") if recorder.sent[op]]
    for op in ops:
        kinds = {kind: n for (o, kind), n in recorder.failed.items() if o == op}
        failed = sum(kinds.values())
        requests.add_row(
            op,
            str(recorder.sent[op]),
            str(recorder.answered[op]),
            str(failed),
            str(recorder.sent[op] - recorder.answered[op] - failed),
            _kinds_text(kinds),
        )
    sent, answered = sum(recorder.sent.values()), sum(recorder.answered.values())
    requests.add_row(
        "total",
        str(sent),
        str(answered),
        str(recorder.total_failed),
        str(sent - answered - recorder.total_failed),
        _kinds_text(recorder.failure_kinds()),
        style="bold",
    )
    out.append(requests)

    names, rows = share_rows(recorder.answers, origin, end, options.bucket)
    shares = Table(title="Share of read answers per node", title_justify="left")
    shares.add_column(f"time ({options.bucket:g} s)")
    shares.add_column("answers", justify="right")
    for name in names:
        shares.add_column(name, justify="right")
    for label, total, percent in rows:
        shares.add_row(
            label,
            str(total),
            *(f"{percent[name]:.0f}%" if percent.get(name) else "-" for name in names),
        )
    out.append(shares)

    healing = Table(title="Faults and healing", title_justify="left")
    for column in ("at", "fault", "call took", "healed", "after", "failed meanwhile"):
        healing.add_column(
            column, justify="right" if column in ("at", "call took", "after") else "left"
        )
    heal = heal_rows(recorder)
    starts = [f.started for f in recorder.faults] + [end]
    for index, fault in enumerate(recorder.faults):
        meanwhile = failures_between(recorder, fault.started, starts[index + 1])
        took = "-" if fault.done is None else f"{fault.done - fault.started:.2f}s"
        first = True
        for row in (r for r in heal if r.fault is fault):
            after = "not within the run" if row.after is None else f"{row.after:.2f}s"
            healing.add_row(
                f"{fault.started - origin:.1f}s" if first else "",
                fault.step.describe().split(" (")[0] if first else "",
                took if first else "",
                row.what,
                after
                + (" after the call" if row.since == "done" and row.after is not None else ""),
                _kinds_text(meanwhile) if first else "",
            )
            first = False
    out.append(healing)
    out.append(Text("Final node states: " + (", ".join(final) or "none")))
    return out


# -- running it -------------------------------------------------------------------------


def run(options: DemoOptions, out: TextIO) -> int:
    """Start the stand-in cluster, run the demo in trio, close the cluster. Blocking."""
    console = make_console(out)
    console.print(
        f"demo: starting a local stand-in cluster of {options.nodes} nodes "
        "(PostgreSQL servers impersonating Picodata nodes)...",
        markup=False,
    )
    out.flush()
    started = time.monotonic()
    with LocalCluster(nodes=options.nodes) as lc:
        lc.execute_everywhere(CREATE_TABLE)
        handles = lc.nodes
        console.print(
            f"demo: cluster up in {time.monotonic() - started:.1f} s: "
            + ", ".join(f"{n.name} at {n.address}" for n in handles),
            markup=False,
        )
        out.flush()
        demo = _Demo(lc, options, console, {n.uuid: n.name for n in handles})
        names = [n.name for n in handles]
        code = trio.run(demo.main, lc.dsn, names)
    if options.plot is not None and demo.cluster is not None:
        from .plot import bin_width, draw, timeline

        recorder = demo.recorder
        end = recorder.end if recorder.end is not None else recorder.origin
        line = timeline(recorder, bin_width(end - recorder.origin), names)
        title = (
            f"picopyn_actors demo: {options.readers} readers, {options.writers} writers, "
            f"{options.nodes} nodes at start"
        )
        console.print(f"demo: plot written to {draw(line, options.plot, title)}", markup=False)
    return code


# Seconds the demo waits for every node to be up before its clock starts.
_START_PATIENCE = 15.0


@attrs.define(eq=False)
class _Demo:
    lc: LocalCluster  # blocking: only ever called through trio.to_thread
    options: DemoOptions
    console: Console
    names_by_uuid: dict[str, str]
    recorder: Recorder = attrs.field(init=False)
    cluster: Cluster | None = attrs.field(init=False, default=None)
    metrics_url: str | None = attrs.field(init=False, default=None)
    catalog: list[CatalogNode] = attrs.field(init=False, factory=list)
    chaos_log: deque[Text] = attrs.field(init=False, factory=lambda: deque(maxlen=6))
    event_log: deque[NodeEvent | EventsDropped] = attrs.field(
        init=False, factory=lambda: deque(maxlen=8)
    )
    _ids: itertools.count[int] = attrs.field(init=False, factory=lambda: itertools.count(1))
    altered: int = attrs.field(init=False, default=0)  # schema changes made so far

    async def main(self, dsn: str, names: list[str]) -> int:
        options = self.options
        self.recorder = Recorder(trio.current_time())
        final: list[str] = []
        run_scope = trio.CancelScope()
        interrupted = False
        with trio.CancelScope() as scope, unwrap_single_error():

            def stop() -> None:
                # Before the cluster is open, give up; after, stop the workload
                # only, so that the summary still sees every node.
                nonlocal interrupted
                interrupted = True
                (run_scope if self.cluster is not None else scope).cancel()

            async with (
                # A stop that hangs still stops the servers: they must not outlive us.
                on_signals(stop, cleanup=self.lc.close),
                open_cluster(dsn, **options.cluster_options()) as cluster,
                serve_metrics(cluster, options.prometheus) as metrics_url,
            ):
                self.cluster = cluster
                self.metrics_url = metrics_url
                await self._every_node_up(cluster)
                self.recorder = Recorder(trio.current_time())
                if metrics_url is not None:
                    self._say(f"metrics at {metrics_url}")
                with run_scope:
                    await self._run(cluster, names)
                self.recorder.end = trio.current_time()
                self.recorder.invalidated = cluster.statistics().statements_invalidated
                final = [f"{n.name} {n.state.value}" for n in cluster.nodes()]
        if interrupted:
            self.console.print("demo: interrupted, stopped early", style="yellow", markup=False)
        if self.cluster is None:
            return 0
        for part in summary(self.recorder, options, final):
            self.console.print(part)
        self.console.file.flush()
        return 0

    async def _every_node_up(self, cluster: Cluster) -> None:
        """Start the clock when every node is up: open_cluster returns with the
        first one, and the chaos plan's first fault must not meet a node that is
        still logging in. Gives up (the run goes on) after ``_START_PATIENCE``."""
        with trio.move_on_after(_START_PATIENCE):
            async with cluster.events() as events:
                while any(n.state is not NodeState.UP for n in cluster.nodes()):
                    await events.receive()

    async def _run(self, cluster: Cluster, names: list[str]) -> None:
        options = self.options
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_events, cluster)
            nursery.start_soon(self._poll_catalog, cluster)
            for index in range(options.readers):
                nursery.start_soon(self._reader, cluster, name=f"reader {index}")
            for index in range(options.writers):
                nursery.start_soon(self._writer, cluster, index, name=f"writer {index}")
            if options.live:
                nursery.start_soon(self._live)
            else:
                nursery.start_soon(self._counters)
            await self._chaos(chaos_plan(options.duration, names))
            await trio.sleep_until(self.recorder.origin + options.duration)
            nursery.cancel_scope.cancel()

    # -- output ---------------------------------------------------------------------

    def _stamp(self) -> str:
        return relative_stamp(trio.current_time(), self.recorder.origin)

    def _say(self, message: str, style: str = "") -> None:
        """A line for the log: printed at once without the live view, else shown in it."""
        text = Text(f"{self._stamp()} {message}", style=style)
        if self.options.live:
            self.chaos_log.append(text)
        else:
            self.console.print(text, soft_wrap=True)
            self.console.file.flush()

    def _counters_text(self, rate: float) -> Text:
        rec = self.recorder
        return Text.assemble(
            ("workload ", "bold"),
            f"sent {sum(rec.sent.values())}  answered {sum(rec.answered.values())}  ",
            (f"failed {rec.total_failed}", "red" if rec.total_failed else ""),
            f" ({_kinds_text(rec.failure_kinds())})  answers/s {rate:.0f}",
        )

    def _render(self, rate: float) -> RenderableType:
        assert self.cluster is not None
        now = trio.current_time()
        elapsed = now - self.recorder.origin
        parts: list[RenderableType] = [
            Text.assemble(
                ("picopyn_actors demo ", "bold"),
                f"{min(elapsed, self.options.duration):5.1f}s / {self.options.duration:g}s   "
                f"{self.options.readers} readers (idempotent SELECT), "
                f"{self.options.writers} writers (non-idempotent INSERT)",
                *(
                    [(f"   metrics at {self.metrics_url}", "dim")]
                    if self.metrics_url is not None
                    else []
                ),
            ),
            node_table(self.cluster.nodes(), self.catalog, now=now),
            self._counters_text(rate),
            Text("chaos", style="bold"),
            *(self.chaos_log or [Text("  (nothing yet)", style="dim")]),
            Text("node events", style="bold"),
            *(
                [event_text(e, relative_stamp(e.at, self.recorder.origin)) for e in self.event_log]
                or [Text("  (none yet)", style="dim")]
            ),
            Text("Ctrl-C stops the run early and prints the summary", style="dim"),
        ]
        return Group(*parts)

    async def _live(self) -> None:
        rate = _Rate()
        rate.update(trio.current_time(), sum(self.recorder.answered.values()))
        with (
            Live(
                self._render(0.0),
                console=self.console,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=stderr_is_terminal(),
            ) as live,
            live_logging(live.console),
        ):
            deadline = trio.current_time()
            while True:
                deadline = max(deadline + 0.25, trio.current_time())
                await trio.sleep_until(deadline)
                now = trio.current_time()
                live.update(
                    self._render(rate.update(now, sum(self.recorder.answered.values()))),
                    refresh=True,
                )

    async def _counters(self) -> None:
        """Without the live view: a counters line every 5 seconds."""
        rate = _Rate(window=5.0)
        deadline = trio.current_time()
        rate.update(deadline, sum(self.recorder.answered.values()))
        while True:
            deadline += 5.0
            await trio.sleep_until(deadline)
            assert self.cluster is not None
            per_second = rate.update(trio.current_time(), sum(self.recorder.answered.values()))
            states = ", ".join(f"{n.name} {n.state.value}" for n in self.cluster.nodes())
            self._say(f"{self._counters_text(per_second).plain}; nodes: {states}")

    # -- tasks ------------------------------------------------------------------------

    async def _read_events(self, cluster: Cluster) -> None:
        async with cluster.events() as events:
            async for event in events:
                if isinstance(event, NodeEvent):
                    self.recorder.events.append(event)
                if self.options.live:
                    self.event_log.append(event)
                else:
                    line = format_event(event, relative_stamp(event.at, self.recorder.origin))
                    self.console.print(
                        line.replace("] ", "] event: ", 1), markup=False, soft_wrap=True
                    )
                    self.console.file.flush()

    async def _poll_catalog(self, cluster: Cluster) -> None:
        deadline = trio.current_time()
        while True:
            catalog = await fetch_catalog(cluster, timeout=REQUEST_TIMEOUT)
            if catalog is not None:
                self.catalog = catalog
            deadline = max(deadline + 1.0, trio.current_time())
            await trio.sleep_until(deadline)

    async def _reader(self, cluster: Cluster) -> None:
        rec = self.recorder
        names = self.names_by_uuid
        while True:
            rec.send("read")
            try:
                uuid = await cluster.fetchval(READ, idempotent=True, timeout=REQUEST_TIMEOUT)
            except (PicodataError, trio.TooSlowError) as exc:
                rec.failure("read", type(exc).__name__, trio.current_time())
                await trio.sleep(0.05)  # no hot loop while nothing is available
            else:
                rec.answer("read", names.get(str(uuid), str(uuid)), trio.current_time())
            await trio.sleep(READER_THINK)

    async def _writer(self, cluster: Cluster, index: int) -> None:
        rec = self.recorder
        while True:
            rec.send("write")
            row_id = next(self._ids)
            try:
                await cluster.execute(
                    INSERT, row_id, index, f"row {row_id}", timeout=REQUEST_TIMEOUT
                )
            except (PicodataError, trio.TooSlowError) as exc:
                rec.failure("write", type(exc).__name__, trio.current_time())
                await trio.sleep(0.05)
            else:
                rec.answer("write", None, trio.current_time())
            await trio.sleep(WRITER_THINK)

    async def _chaos(self, plan: Sequence[Step]) -> None:
        origin = self.recorder.origin
        for step in plan:
            await trio.sleep_until(origin + step.at)
            await self._inject(step)

    async def _inject(self, step: Step) -> None:
        fault = Fault(step, step.node or "?", trio.current_time())
        self.recorder.faults.append(fault)
        self._say(f"chaos: {step.describe()}", style="bold yellow")
        try:
            joined = await trio.to_thread.run_sync(self._blocking_step, step)
        except Exception as exc:
            fault.error = f"{type(exc).__name__}: {exc}"
            self._say(f"chaos: {step.action} failed: {fault.error}", style="bold red")
            return
        fault.done = trio.current_time()
        if joined is not None:
            fault.node = joined.name
            self.names_by_uuid[joined.uuid] = joined.name
            self._say(f"chaos: {joined.name} joined at {joined.address}", style="yellow")

    def _blocking_step(self, step: Step) -> NodeHandle | None:
        """Run one step on the stand-in cluster, in a worker thread."""
        lc = self.lc
        node = step.node or ""
        if step.action == "kill":
            lc.kill(node)
        elif step.action == "restart":
            lc.start(node)
        elif step.action == "pause":
            lc.pause(node)
        elif step.action == "resume":
            lc.resume(node)
        elif step.action == "expel":
            lc.set_state(node, "Expelled")
        elif step.action == "alter":
            self.altered += 1
            lc.execute_everywhere(f"ALTER TABLE {DEMO_TABLE} ADD COLUMN extra{self.altered} int")
        elif step.action == "add":
            handle = lc.add_node()
            # The stand-in's tables are per server: give the new node the demo table.
            lc.execute_everywhere(CREATE_TABLE)
            return handle
        return None


@attrs.define
class _Rate:
    """Answers per second over a sliding window of samples."""

    window: float = 1.0
    _samples: deque[tuple[float, int]] = attrs.field(factory=deque)

    def update(self, now: float, total: int) -> float:
        self._samples.append((now, total))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()
        first_at, first_total = self._samples[0]
        return 0.0 if now <= first_at else (total - first_total) / (now - first_at)
