"""``picopyn-actors monitor DSN``: a live view of every node of a cluster.

Modes:

* default: a table of every node, refreshed a few times a second, with the
  latest node events below it (on a terminal; through a pipe, event lines
  and a table every few seconds);
* ``--json``: JSON lines on stdout, each with a ``"type"``: ``connected``,
  ``event``, ``events_dropped`` and periodic ``snapshot`` objects;
* ``--once``: wait for the nodes to settle, print one snapshot, exit;
* ``--check``: as ``--once``, then exit 2 when a node is not up.

With ``--prometheus HOST:PORT`` the following modes also serve the
cluster's metrics (:mod:`picopyn_actors.prometheus`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

import attrs
import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from .._cluster import Cluster, open_cluster
from .._dsn import Address
from .._events import EventsDropped, NodeEvent, NodeState
from .._util import unwrap_single_error
from .common import (
    fetch_catalog,
    live_logging,
    make_console,
    on_signals,
    serve_metrics,
    stderr_is_terminal,
)
from .view import (
    CatalogNode,
    catalog_only,
    clock_stamp,
    dumps,
    event_json,
    event_text,
    format_event,
    node_table,
    not_up,
    snapshot_json,
)

#: States a node rests in; CONNECTING and SUSPECT are on their way elsewhere.
SETTLED = frozenset(
    {NodeState.UP, NodeState.DOWN, NodeState.QUARANTINED, NodeState.DRAINING, NodeState.RETIRED}
)

#: Without a terminal the view prints a full table this often (seconds).
PIPE_TABLE_EVERY = 10.0


@attrs.frozen
class MonitorOptions:
    """The command line of ``monitor``."""

    dsn: str
    json: bool = False
    once: bool = False
    check: bool = False
    interval: float | None = None
    connections: int = 1
    refresh: float | None = None
    grace: float | None = None
    events: int = 10
    bridge: str | None = None
    prometheus: Address | None = None
    dialect: str | None = None

    def cluster_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`open_cluster`."""
        options: dict[str, Any] = {"connections_per_node": self.connections}
        if self.dialect is not None:
            options["dialect"] = self.dialect
        if self.interval is not None:
            options["discovery_interval"] = self.interval
            options["health_interval"] = self.interval
        if self.bridge is not None:
            options["bridge"] = self.bridge
        return options


@attrs.define(eq=False)
class _View:
    """What the follow modes keep between refreshes."""

    events: deque[NodeEvent | EventsDropped]
    catalog: list[CatalogNode] = attrs.field(factory=list)
    metrics_url: str | None = None


async def run(options: MonitorOptions, out: TextIO) -> int:
    """Run the command; return the exit code. Ctrl-C or SIGTERM end it with 0
    (or with 1 when the stop hangs, see :func:`~picopyn_actors._cli.common.on_signals`)."""
    code = 0
    with trio.CancelScope() as scope, unwrap_single_error():
        async with on_signals(scope.cancel):
            code = await _monitor(options, out)
    return code


async def _monitor(options: MonitorOptions, out: TextIO) -> int:
    async with open_cluster(options.dsn, **options.cluster_options()) as cluster:
        if options.once or options.check:
            return await _once(cluster, options, out)
        async with serve_metrics(cluster, options.prometheus) as metrics_url:
            view = _View(deque(maxlen=options.events), metrics_url=metrics_url)
            return await _follow(cluster, view, options, out)


async def _follow(cluster: Cluster, view: _View, options: MonitorOptions, out: TextIO) -> int:
    """The following modes: until Ctrl-C."""
    console = make_console(out)

    def emit_json(event: NodeEvent | EventsDropped) -> None:
        _emit(out, event_json(event, now=trio.current_time(), wall=time.time()))

    def print_line(event: NodeEvent | EventsDropped) -> None:
        stamp = clock_stamp(event.at, now=trio.current_time(), wall=time.time())
        console.print(format_event(event, stamp), soft_wrap=True)
        out.flush()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_poll_catalog, cluster, view)
        if options.json:
            connected: dict[str, Any] = {
                "type": "connected",
                "at": round(time.time(), 3),
                "dsn": str(cluster.config.dsn),
            }
            if view.metrics_url is not None:
                connected["metrics"] = view.metrics_url
            _emit(out, connected)
            nursery.start_soon(_read_events, cluster, view, emit_json)
            await _json_snapshots(cluster, view, options.refresh or 1.0, out)
        elif console.is_terminal:
            nursery.start_soon(_read_events, cluster, view, None)
            await _live(cluster, view, options.refresh or 0.25, console)
        else:
            if view.metrics_url is not None:
                console.print(f"metrics at {view.metrics_url}", markup=False)
            nursery.start_soon(_read_events, cluster, view, print_line)
            await _plain(cluster, view, console)
    return 0


# -- --once and --check -------------------------------------------------------------


async def settle(cluster: Cluster, *, min_wait: float, grace: float) -> None:
    """Wait at least ``min_wait``, then until every node rests in a settled
    state (driven by node events), at most ``grace`` seconds in all."""
    deadline = trio.current_time() + max(grace, min_wait)
    async with cluster.events() as events:
        await trio.sleep(min_wait)
        with trio.move_on_at(deadline):
            while not all(n.state in SETTLED for n in cluster.nodes()):
                try:
                    await events.receive()
                except trio.EndOfChannel:
                    return


async def _once(cluster: Cluster, options: MonitorOptions, out: TextIO) -> int:
    config = cluster.config
    grace = options.grace
    if grace is None:
        grace = config.connect_timeout + config.health_interval
    await settle(cluster, min_wait=config.health_interval, grace=grace)
    catalog = await fetch_catalog(cluster, timeout=config.connect_timeout) or []
    nodes = cluster.nodes()
    now = trio.current_time()
    problems = not_up(nodes, catalog) if options.check else []
    if options.json:
        extra: dict[str, Any] = {}
        if options.check:
            extra["check"] = {"ok": not problems, "problems": problems}
        _emit(out, snapshot_json(nodes, catalog, now=now, wall=time.time(), extra=extra))
    else:
        console = make_console(out)
        up = sum(1 for n in nodes if n.state is NodeState.UP)
        title = f"{config.dsn}: {up} of {len(nodes)} nodes up"
        others = catalog_only(nodes, catalog)
        if others:
            title += f", {len(others)} more in the catalog only"
        console.print(node_table(nodes, catalog, now=now, title=title))
        if options.check:
            if problems:
                console.print(f"check failed: {len(problems)} node(s) not up:")
                for problem in problems:
                    console.print(f"  {problem}", soft_wrap=True)
            else:
                console.print(f"check passed: all {len(nodes)} nodes up")
    out.flush()
    return 2 if problems else 0


# -- following ----------------------------------------------------------------------


def _emit(out: TextIO, obj: dict[str, Any]) -> None:
    out.write(dumps(obj) + "\n")
    out.flush()


async def _read_events(
    cluster: Cluster, view: _View, on_event: Callable[[NodeEvent | EventsDropped], None] | None
) -> None:
    async with cluster.events() as events:
        async for event in events:
            view.events.append(event)
            if on_event is not None:
                on_event(event)


async def _poll_catalog(cluster: Cluster, view: _View) -> None:
    interval = cluster.config.discovery_interval
    deadline = trio.current_time()
    while True:
        deadline = max(deadline + interval, trio.current_time())
        catalog = await fetch_catalog(cluster, timeout=cluster.config.connect_timeout)
        if catalog is not None:
            view.catalog = catalog
        await trio.sleep_until(deadline)


async def _json_snapshots(cluster: Cluster, view: _View, every: float, out: TextIO) -> None:
    deadline = trio.current_time()
    while True:
        stats = cluster.statistics()
        _emit(
            out,
            snapshot_json(
                cluster.nodes(),
                view.catalog,
                now=trio.current_time(),
                wall=time.time(),
                extra={
                    "statistics": {
                        "requests_ok": stats.requests_ok,
                        "requests_failed": stats.requests_failed,
                        "requests_retried": stats.requests_retried,
                        "restarts": stats.restarts,
                        "discovery_runs": stats.discovery_runs,
                        "discovery_failures": stats.discovery_failures,
                    }
                },
            ),
        )
        deadline = max(deadline + every, trio.current_time())
        await trio.sleep_until(deadline)


def render(cluster: Cluster, view: _View) -> RenderableType:
    """The live view: a header, the node table, the latest events."""
    now, wall = trio.current_time(), time.time()
    nodes = cluster.nodes()
    stats = cluster.statistics()
    up = sum(1 for n in nodes if n.state is NodeState.UP)
    header = Text.assemble(
        ("picopyn-actors monitor ", "bold"),
        f"{cluster.config.dsn}   ",
        (f"{up}/{len(nodes)} up", "bold green" if up == len(nodes) else "bold red"),
        f"   discovery runs {stats.discovery_runs} (failed {stats.discovery_failures})"
        f"   {time.strftime('%H:%M:%S', time.localtime(wall))}",
    )
    if view.metrics_url is not None:
        header.append(f"   metrics at {view.metrics_url}", style="dim")
    lines: list[RenderableType] = [header, node_table(nodes, view.catalog, now=now)]
    lines.append(Text("recent events", style="bold"))
    if view.events:
        lines.extend(event_text(e, clock_stamp(e.at, now=now, wall=wall)) for e in view.events)
    else:
        lines.append(Text("  (none since the monitor started)", style="dim"))
    lines.append(Text("Ctrl-C to quit", style="dim"))
    return Group(*lines)


async def _live(cluster: Cluster, view: _View, every: float, console: Console) -> None:
    with (
        Live(
            render(cluster, view),
            console=console,
            auto_refresh=False,
            redirect_stdout=False,
            redirect_stderr=stderr_is_terminal(),
        ) as live,
        live_logging(live.console),
    ):
        deadline = trio.current_time()
        while True:
            deadline = max(deadline + every, trio.current_time())
            await trio.sleep_until(deadline)
            live.update(render(cluster, view), refresh=True)


async def _plain(cluster: Cluster, view: _View, console: Console) -> None:
    """Without a terminal: a table now and then (the event reader prints event lines)."""
    deadline = trio.current_time()
    while True:
        console.print(node_table(cluster.nodes(), view.catalog, now=trio.current_time()))
        console.file.flush()
        deadline = max(deadline + PIPE_TABLE_EVERY, trio.current_time())
        await trio.sleep_until(deadline)
