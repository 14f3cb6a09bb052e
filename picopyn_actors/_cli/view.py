"""Rendering shared by ``monitor`` and ``demo``: the node table, events, JSON lines.

Everything here is pure (no I/O, no clock reads): callers pass ``now``, the
``trio.current_time()`` that ages and timestamps are measured against, and
``wall``, the matching ``time.time()``.

Example::

    table = node_table(cluster.nodes(), catalog_rows, now=trio.current_time())
    console.print(table)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from rich.table import Table
from rich.text import Text

from .._events import EventsDropped, NodeEvent, NodeState, NodeStatus
from .._topology import CatalogState, NodeInfo

#: How each client state is coloured in the live view.
STATE_STYLES: Mapping[NodeState, str] = {
    NodeState.CONNECTING: "cyan",
    NodeState.UP: "bold green",
    NodeState.SUSPECT: "yellow",
    NodeState.DOWN: "bold red",
    NodeState.QUARANTINED: "magenta",
    NodeState.DRAINING: "blue",
    NodeState.RETIRED: "dim",
}

COLUMNS = (
    "name",
    "address",
    "tier",
    "replicaset",
    "catalog",
    "client",
    "conns",
    "in-flight",
    "latency ms",
    "errors",
    "since change",
)


@attrs.frozen
class CatalogNode:
    """A node as the catalog lists it (for nodes the client has no actor for)."""

    name: str
    address: str
    tier: str
    replicaset: str
    current: str
    target: str
    expelled: bool
    offline: bool

    @classmethod
    def from_info(cls, info: NodeInfo) -> CatalogNode:
        """Build from a discovery row."""
        return cls(
            name=info.name,
            address=str(info.address),
            tier=info.tier,
            replicaset=info.replicaset,
            current=str(info.current),
            target=str(info.target),
            expelled=info.expelled,
            offline=CatalogState.OFFLINE in (info.current.variant, info.target.variant),
        )


def format_age(seconds: float) -> str:
    """``4.2s``, ``3m05s``, ``2h10m``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_latency(seconds: float | None) -> str:
    """Milliseconds with one decimal, or ``-`` before the first measurement."""
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def catalog_only(nodes: Sequence[NodeStatus], catalog: Iterable[CatalogNode]) -> list[CatalogNode]:
    """Catalog nodes that have no node actor (Offline, Expelled, not selected)."""
    known = {n.name for n in nodes}
    return sorted((c for c in catalog if c.name not in known), key=lambda c: c.name)


def node_table(
    nodes: Sequence[NodeStatus],
    catalog: Iterable[CatalogNode] = (),
    *,
    now: float,
    title: str | None = None,
) -> Table:
    """The live view's table: one row per node actor, then catalog-only nodes."""
    table = Table(title=title, title_justify="left")
    for column in COLUMNS:
        numeric = column in ("conns", "in-flight", "latency ms", "errors", "since change")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=True)
    for node in nodes:
        table.add_row(
            node.name,
            node.address,
            node.tier,
            node.replicaset,
            node.catalog_state,
            Text(node.state.value, style=STATE_STYLES.get(node.state, "")),
            str(node.connections),
            str(node.in_flight),
            format_latency(node.latency),
            str(node.errors),
            format_age(now - node.since),
        )
    for entry in catalog_only(nodes, catalog):
        table.add_row(
            entry.name,
            entry.address,
            entry.tier,
            entry.replicaset,
            entry.current,
            Text("not routed", style="dim"),
            "-",
            "-",
            "-",
            "-",
            "-",
            style="dim",
        )
    return table


def not_up(nodes: Sequence[NodeStatus], catalog: Iterable[CatalogNode] = ()) -> list[str]:
    """Why each unhealthy node is unhealthy, one string per node, for ``--check``.

    A node actor that is not UP counts, and so does a catalog node that is
    Offline (an expelled node has left the cluster for good and does not).
    """
    problems = []
    for node in nodes:
        if node.state is not NodeState.UP:
            why = f": {node.last_error}" if node.last_error else ""
            problems.append(f"{node.name} ({node.address}) is {node.state.value}{why}")
    for entry in catalog_only(nodes, catalog):
        if entry.offline and not entry.expelled:
            problems.append(
                f"{entry.name} ({entry.address}) is {entry.current} in the catalog "
                f"(target {entry.target})"
            )
    return problems


def relative_stamp(at: float, origin: float) -> str:
    """``[  12.3s]``: seconds since ``origin`` (trio time)."""
    return f"[{at - origin:7.1f}s]"


def clock_stamp(at: float, *, now: float, wall: float) -> str:
    """``12:04:31.250``: the local wall-clock time of trio time ``at``."""
    moment = wall - (now - at)
    return time.strftime("%H:%M:%S", time.localtime(moment)) + f".{int(moment * 1000) % 1000:03d}"


def format_event(event: NodeEvent | EventsDropped, stamp: str) -> str:
    """One line: ``<stamp> i2: up -> down (probe timed out after 1.0s)``."""
    if isinstance(event, EventsDropped):
        return f"{stamp} ({event.count} events dropped: the view fell behind)"
    return f"{stamp} {event.node}: {event.old.value} -> {event.new.value} ({event.reason})"


def event_text(event: NodeEvent | EventsDropped, stamp: str) -> Text:
    """:func:`format_event`, coloured by the new state."""
    text = Text(format_event(event, stamp))
    if isinstance(event, NodeEvent):
        text.stylize(STATE_STYLES.get(event.new, ""))
    return text


# -- JSON lines -------------------------------------------------------------------


def dumps(obj: Mapping[str, Any]) -> str:
    """One compact JSON object on one line."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=False, default=str)


def _wall(at: float, *, now: float, wall: float) -> float:
    return round(wall - (now - at), 3)


def node_json(node: NodeStatus, *, now: float) -> dict[str, Any]:
    """A node actor's snapshot as a JSON-ready mapping."""
    return {
        "name": node.name,
        "uuid": node.uuid,
        "address": node.address,
        "tier": node.tier,
        "replicaset": node.replicaset,
        "catalog_state": node.catalog_state,
        "state": node.state.value,
        "connections": node.connections,
        "in_flight": node.in_flight,
        "latency_ms": None if node.latency is None else round(node.latency * 1000, 3),
        "errors": node.errors,
        "last_error": node.last_error,
        "since_change_s": round(max(0.0, now - node.since), 3),
    }


def snapshot_json(
    nodes: Sequence[NodeStatus],
    catalog: Iterable[CatalogNode] = (),
    *,
    now: float,
    wall: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``{"type": "snapshot", "at": ..., "nodes": [...], "catalog_only": [...]}``."""
    obj: dict[str, Any] = {
        "type": "snapshot",
        "at": round(wall, 3),
        "nodes": [node_json(n, now=now) for n in nodes],
        "catalog_only": [
            {
                "name": c.name,
                "address": c.address,
                "tier": c.tier,
                "replicaset": c.replicaset,
                "current_state": c.current,
                "target_state": c.target,
            }
            for c in catalog_only(nodes, catalog)
        ],
    }
    if extra:
        obj.update(extra)
    return obj


def event_json(event: NodeEvent | EventsDropped, *, now: float, wall: float) -> dict[str, Any]:
    """``{"type": "event", ...}`` or ``{"type": "events_dropped", "count": n}``."""
    at = _wall(event.at, now=now, wall=wall)
    if isinstance(event, EventsDropped):
        return {"type": "events_dropped", "at": at, "count": event.count}
    return {
        "type": "event",
        "at": at,
        "node": event.node,
        "old": event.old.value,
        "new": event.new.value,
        "reason": event.reason,
    }
