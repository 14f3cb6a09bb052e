"""Prometheus metrics for a :class:`~picopyn_actors.Cluster`, read at scrape time.

Needs the ``prometheus`` extra (``pip install 'picopyn_actors[prometheus]'``,
which brings ``prometheus_client``). Nothing is counted twice and the request
path pays nothing: at each scrape the collector reads
:meth:`Cluster.statistics() <picopyn_actors.Cluster.statistics>` and
:meth:`Cluster.nodes() <picopyn_actors.Cluster.nodes>` and turns the snapshot
into metric families. docs/operations.md lists every metric.

Serve them from a trio service with one call::

    import picopyn_actors as pa
    from picopyn_actors import prometheus

    async with pa.open_cluster(DSN) as cluster:
        async with prometheus.serve(cluster, "127.0.0.1", 9464) as server:
            log.info("metrics at %s", server.url)
            ...  # the service's own work

or add them to a registry that the service already exposes::

    prometheus.register(cluster)            # the default registry, REGISTRY
    prometheus.register(cluster, registry)  # or any CollectorRegistry

The metrics are defined by the tables :data:`CLUSTER_METRICS`,
:data:`NODE_COUNTERS` and :data:`NODE_GAUGES`: one row per metric, naming
the attribute of :class:`~picopyn_actors.ClusterStatistics`,
:class:`~picopyn_actors.NodeStatistics` or
:class:`~picopyn_actors.NodeStatus` it reads. A row whose attribute the
snapshot does not have, or holds ``None``, gives no sample.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Literal

import attrs
import trio

from ._cluster import Cluster
from ._errors import ConfigError
from ._events import ClusterStatistics, NodeState, NodeStatus

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
        Metric,
    )
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "picopyn_actors.prometheus needs prometheus_client: "
        "pip install 'picopyn_actors[prometheus]'"
    ) from exc

__all__ = [
    "CLUSTER_METRICS",
    "NODE_COUNTERS",
    "NODE_GAUGES",
    "ClusterCollector",
    "MetricDef",
    "MetricsServer",
    "register",
    "serve",
]

log = logging.getLogger(__name__)

#: Every metric name starts with this.
PREFIX = "picopyn_actors_"


@attrs.frozen
class MetricDef:
    """One row of a metric table.

    Attributes:
        name: the exposed name; a counter's ends with ``_total``.
        kind: ``"counter"`` or ``"gauge"``.
        help: the HELP text.
        attributes: the snapshot attribute(s) read; several are summed.
            A missing attribute, or ``None``, gives no sample.
        scale: a factor applied to the value (none of today's rows needs one).
    """

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    attributes: tuple[str, ...]
    scale: float = 1.0

    def value(self, snapshot: object) -> float | None:
        """The value this row reads from ``snapshot``, or ``None`` to give no sample."""
        total = 0.0
        for attribute in self.attributes:
            raw = getattr(snapshot, attribute, None)
            if raw is None or isinstance(raw, bool) or not isinstance(raw, int | float):
                return None
            total += raw
        return total * self.scale

    def family(self, labels: Sequence[str]) -> CounterMetricFamily | GaugeMetricFamily:
        """An empty metric family for this row, with ``labels``."""
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=labels)
        return GaugeMetricFamily(self.name, self.help, labels=labels)


def _counter(name: str, help: str, *attributes: str) -> MetricDef:
    return MetricDef(PREFIX + name, "counter", help, attributes)


def _gauge(name: str, help: str, *attributes: str) -> MetricDef:
    return MetricDef(PREFIX + name, "gauge", help, attributes)


#: Read from :class:`~picopyn_actors.ClusterStatistics` (totals include retired nodes).
CLUSTER_METRICS: Sequence[MetricDef] = (
    _counter(
        "requests_total",
        "Requests that finished, answered or failed.",
        "requests_ok",
        "requests_failed",
    ),
    _counter("requests_failed_total", "Requests that ended with an exception.", "requests_failed"),
    _counter("requests_retried_total", "Attempts re-routed to another node.", "requests_retried"),
    _counter("restarts_total", "Node restarts (down after being up), all nodes.", "restarts"),
    _counter("discovery_runs_total", "Discovery runs that succeeded.", "discovery_runs"),
    _counter(
        "discovery_failures_total",
        "Discovery runs that failed on every host.",
        "discovery_failures",
    ),
    _counter("events_published_total", "Node events published.", "events_published"),
    _counter(
        "requests_routed_total",
        "Keyed requests sent to the master that owns their bucket.",
        "requests_routed",
    ),
    _counter(
        "routing_fallbacks_total",
        "Keyed requests sent to another node of the tier (the owner could not take them).",
        "routing_fallbacks",
    ),
    _counter(
        "hedges_sent_total",
        "Second attempts of idempotent requests that had not answered after the hedge delay.",
        "hedges_sent",
    ),
    _counter("hedges_won_total", "Hedges that answered first.", "hedges_won"),
    _counter("hedges_refused_total", "Hedges the budget refused.", "hedges_refused"),
    _counter(
        "hedges_skipped_total",
        "Late requests held, not hedged when due: every node they could go to was as late.",
        "hedges_skipped",
    ),
    _counter(
        "hedges_not_stalled_total",
        "Late requests answered unhedged: their node kept answering others.",
        "hedges_not_stalled",
    ),
    _gauge(
        "hedge_delay_seconds",
        "The hedge delay in force (absent without hedging or before enough latencies).",
        "hedge_delay",
    ),
    _counter(
        "views_rejected_total",
        "Catalog views discovery did not act on (not sane, or not confirmed).",
        "views_rejected",
    ),
    _counter(
        "discovery_connects_total",
        "Connections discovery opened (it keeps one between runs).",
        "discovery_connects",
    ),
    _counter(
        "statements_invalidated_total",
        "Requests prepared and run again after 42999 (a schema change invalidated them).",
        "statements_invalidated",
    ),
    _gauge(
        "queue_depth", "Requests waiting in the dispatcher for a free connection.", "queue_depth"
    ),
)

#: Read from each :class:`~picopyn_actors.NodeStatistics`; label ``node``.
NODE_COUNTERS: Sequence[MetricDef] = (
    _counter(
        "node_requests_total",
        "Requests that finished on the node, answered or failed.",
        "requests_ok",
        "requests_failed",
    ),
    _counter(
        "node_requests_failed_total",
        "Requests that ended with an error on the node (query errors included).",
        "requests_failed",
    ),
    _counter(
        "node_requests_retried_total",
        "Requests that failed on the node and were sent to another node.",
        "requests_retried",
    ),
    _counter("node_restarts_total", "Times the node went down after being up.", "restarts"),
    _counter(
        "node_reconnects_total", "Connections to the node reopened after the first.", "reconnects"
    ),
    _counter(
        "node_statements_invalidated_total",
        "Requests the node rejected with 42999 and that were prepared and run again.",
        "statements_invalidated",
    ),
)

#: Read from each :class:`~picopyn_actors.NodeStatus`; label ``node``.
NODE_GAUGES: Sequence[MetricDef] = (
    _gauge("node_connections", "Query connections open to the node.", "connections"),
    _gauge("node_in_flight", "Requests on the node now.", "in_flight"),
    _gauge(
        "node_latency_seconds",
        "Latency EWMA of the node's queries and probes (absent before the first one).",
        "latency",
    ),
    _counter("node_errors_total", "Connection and query errors seen on the node.", "errors"),
    _gauge(
        "node_reconnect_attempts",
        "Failed reconnect attempts in a row while the node is down (0 while it is up).",
        "attempts",
    ),
    _gauge(
        "node_next_attempt_seconds",
        "trio.current_time() of the next reconnect attempt (absent when none is planned).",
        "next_attempt",
    ),
)

#: Built from each :class:`~picopyn_actors.NodeStatus` by code, not by a table row.
NODE_UP = PREFIX + "node_up"
NODE_STATE = PREFIX + "node_state"
NODE_INFO = PREFIX + "node"  # exposed as picopyn_actors_node_info

_NODE_UP_HELP = "1 when the client routes requests to the node (state up), else 0."
_NODE_STATE_HELP = "The node's client-side state, one series per state: 1 for the current one."
_NODE_INFO_HELP = "The node's identity and place in the cluster."


@attrs.frozen
class Snapshot:
    """What one scrape reads, taken in the cluster's trio thread."""

    statistics: ClusterStatistics
    nodes: Sequence[NodeStatus]


def families(snapshot: Snapshot, labels: Mapping[str, str] | None = None) -> list[Metric]:
    """The metric families of ``snapshot``. Pure: no clock, no I/O.

    ``labels`` are added to every sample (for example ``{"cluster": "orders"}``
    when one process serves several clusters).
    """
    extra = dict(labels or {})
    names, values = list(extra), list(extra.values())
    out: list[Metric] = []

    for row in CLUSTER_METRICS:
        value = row.value(snapshot.statistics)
        if value is not None:
            family = row.family(names)
            family.add_metric(values, value)
            out.append(family)

    node_names = [*names, "node"]
    per_node = getattr(snapshot.statistics, "nodes", None) or {}
    for row in NODE_COUNTERS:
        family = row.family(node_names)
        for node, stats in sorted(per_node.items()):
            value = row.value(stats)
            if value is not None:
                family.add_metric([*values, node], value)
        if family.samples:
            out.append(family)

    up = GaugeMetricFamily(NODE_UP, _NODE_UP_HELP, labels=node_names)
    state = GaugeMetricFamily(NODE_STATE, _NODE_STATE_HELP, labels=[*node_names, "state"])
    info = InfoMetricFamily(
        NODE_INFO, _NODE_INFO_HELP, labels=[*node_names, "uuid", "address", "tier", "replicaset"]
    )
    gauges = [row.family(node_names) for row in NODE_GAUGES]
    for status in snapshot.nodes:
        key = [*values, status.name]
        up.add_metric(key, 1.0 if status.state is NodeState.UP else 0.0)
        for each in NodeState:
            state.add_metric([*key, each.value], 1.0 if status.state is each else 0.0)
        info.add_metric([*key, status.uuid, status.address, status.tier, status.replicaset], {})
        for row, family in zip(NODE_GAUGES, gauges, strict=True):
            value = row.value(status)
            if value is not None and math.isfinite(value):
                family.add_metric(key, value)
    out.extend(f for f in (up, state, info, *gauges) if f.samples)
    return out


def _names(labels: Mapping[str, str] | None) -> list[Metric]:
    """Empty families of every metric, for ``describe()``."""
    extra = list(labels or {})
    node = [*extra, "node"]
    out: list[Metric] = [row.family(extra) for row in CLUSTER_METRICS]
    out += [row.family(node) for row in (*NODE_COUNTERS, *NODE_GAUGES)]
    out += [
        GaugeMetricFamily(NODE_UP, _NODE_UP_HELP, labels=node),
        GaugeMetricFamily(NODE_STATE, _NODE_STATE_HELP, labels=[*node, "state"]),
        InfoMetricFamily(NODE_INFO, _NODE_INFO_HELP, labels=node),
    ]
    return out


class ClusterCollector:
    """A prometheus_client collector for one cluster.

    Make it in the cluster's trio thread (inside ``open_cluster``'s block).
    A scrape from that thread reads the cluster directly; a scrape from any
    other thread (``prometheus_client.start_http_server``, a WSGI server)
    hands the read to the trio thread with :func:`trio.from_thread.run_sync`,
    since the actors' state has one owner. Once the trio run has ended, or
    the cluster has closed, a scrape gives no samples.
    """

    def __init__(self, cluster: Cluster, labels: Mapping[str, str] | None = None) -> None:
        try:
            self._token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            raise RuntimeError(
                "make the collector inside the trio run that opened the cluster"
            ) from None
        self._thread = threading.get_ident()
        self._cluster = cluster
        self._labels = dict(labels or {})
        for key in self._labels:
            if key in ("node", "state", "uuid", "address", "tier", "replicaset"):
                raise ConfigError(f"label {key!r} is one of the collector's own")

    def snapshot(self) -> Snapshot | None:
        """Read the cluster now (``None`` once it has closed). Trio thread only."""
        if self._cluster.closed:
            return None
        return Snapshot(self._cluster.statistics(), self._cluster.nodes())

    def collect(self) -> Iterable[Metric]:
        """Called by prometheus_client at each scrape."""
        if threading.get_ident() == self._thread:
            snapshot = self.snapshot()
        else:
            try:
                snapshot = trio.from_thread.run_sync(self.snapshot, trio_token=self._token)
            except trio.RunFinishedError:
                snapshot = None
        return [] if snapshot is None else families(snapshot, self._labels)

    def describe(self) -> Iterable[Metric]:
        """Every metric this collector may give, so that a registry can check names."""
        return _names(self._labels)


def register(
    cluster: Cluster,
    registry: CollectorRegistry | None = None,
    *,
    labels: Mapping[str, str] | None = None,
) -> ClusterCollector:
    """Add ``cluster``'s metrics to ``registry`` (default: prometheus_client's
    ``REGISTRY``) and return the collector; ``registry.unregister(collector)``
    removes them. Call it in the cluster's trio thread.

    Raises:
        ValueError: the registry already has metrics of these names, for
            example another cluster's: a registry holds one cluster's metrics
            (``labels`` tell the clusters apart when several registries are
            merged by the scraper).
    """
    collector = ClusterCollector(cluster, labels)
    (REGISTRY if registry is None else registry).register(collector)
    return collector


@attrs.frozen
class MetricsServer:
    """The HTTP endpoint :func:`serve` opened.

    Attributes:
        host: the host it listens on.
        port: the port it listens on (the one picked, when 0 was asked for).
        registry: the registry it serves.
    """

    host: str
    port: int
    registry: CollectorRegistry

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


#: The longest a scraper may take to send its request (seconds).
REQUEST_TIMEOUT = 10.0
#: The largest request head accepted (bytes).
MAX_HEAD = 16 * 1024


@asynccontextmanager
async def serve(
    cluster: Cluster,
    host: str,
    port: int,
    *,
    registry: CollectorRegistry | None = None,
    labels: Mapping[str, str] | None = None,
) -> AsyncIterator[MetricsServer]:
    """Serve ``cluster``'s metrics over HTTP at ``http://host:port/metrics``
    while the block runs.

    The server is a small HTTP/1.1 endpoint run by trio tasks in the caller's
    trio run, so every scrape reads the cluster in its own thread. With
    ``registry`` given, the cluster's collector is added to it for the
    block's duration and the whole registry is served (pass
    ``prometheus_client.REGISTRY`` to include the process metrics too);
    without, a registry of the cluster's metrics alone. ``port=0`` picks a
    free port: the yielded :class:`MetricsServer` says which.

    Raises:
        OSError: the address cannot be bound (in use, not local).

    Cancellation: leaving the block closes the listeners and every open
    scrape connection.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < 65536:
        raise ConfigError(f"port must be an integer in 0..65535, got {port!r}")
    own = registry is None
    target = CollectorRegistry() if registry is None else registry
    collector = ClusterCollector(cluster, labels)
    target.register(collector)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
        if port == 0:
            # Each address would get a port of its own: keep the first.
            for extra in listeners[1:]:
                await extra.aclose()
            listeners = listeners[:1]
        try:
            bound = listeners[0].socket.getsockname()
            server = MetricsServer(host=host, port=int(bound[1]), registry=target)

            async def answer(stream: trio.SocketStream) -> None:
                await _answer(stream, target)

            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, answer, listeners)
                log.info("serving metrics at %s", server.url)
                try:
                    yield server
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
    finally:
        if not own:
            target.unregister(collector)


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                head = await _read_head(stream)
                if head is None:
                    return
                status, content_type, body = respond(head, registry)
                headers = (
                    f"HTTP/1.1 {status}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode("latin-1")
                head_only = head.split(b" ", 1)[0] == b"HEAD"
                await stream.send_all(headers if head_only else headers + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers, or ``None`` when the peer sent no full head."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_HEAD:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
    return data


def respond(head: bytes, registry: CollectorRegistry) -> tuple[str, str, bytes]:
    """The status line, content type and body that answer the request ``head``."""
    lines = head.decode("latin-1").splitlines()
    parts = lines[0].split() if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return "400 Bad Request", "text/plain; charset=utf-8", b"bad request\n"
    method, target = parts[0], parts[1]
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", "text/plain; charset=utf-8", b"GET or HEAD only\n"
    if path not in ("/metrics", "/"):
        return "404 Not Found", "text/plain; charset=utf-8", b"the metrics are at /metrics\n"
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    return "200 OK", content_type, encoder(registry)
