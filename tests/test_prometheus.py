"""The Prometheus collector: the metric tables, and real HTTP scrapes of a real cluster."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

import picopyn_actors as pa
from picopyn_actors import prometheus
from picopyn_actors._events import ClusterStatistics, NodeStatistics, NodeStatus
from picopyn_actors.testing import LocalCluster

ROOT = Path(__file__).resolve().parent.parent

#: Snapshot attributes that are no metric, and why.
UNMAPPED = {
    "nodes",  # ClusterStatistics.nodes: the per-node statistics, read by NODE_COUNTERS
    "name",  # NodeStatus: the ``node`` label
    "uuid",  # NodeStatus: labels of picopyn_actors_node_info
    "address",
    "tier",
    "replicaset",
    "state",  # NodeStatus: picopyn_actors_node_up and picopyn_actors_node_state
    "catalog_state",  # text; the catalog's own metrics are Picodata's business
    "last_error",  # text
    "since",  # a trio clock reading, meaningless outside the process
    "requests_ok",  # read through the *_requests_total rows (ok + failed)
}


# -- helpers ---------------------------------------------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def scrape_blocking(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode(), response.headers["Content-Type"]


async def scrape(url: str) -> Samples:
    text, content_type = await trio.to_thread.run_sync(scrape_blocking, url)
    assert content_type.startswith("text/plain"), content_type
    return parse(text)


def _status(name: str, state: pa.NodeState, **kw: Any) -> NodeStatus:
    fields: dict[str, Any] = {
        "name": name,
        "uuid": f"uuid-{name}",
        "address": f"127.0.0.1:{len(name)}",
        "tier": "default",
        "replicaset": f"r-{name}",
        "catalog_state": "Online(1)",
        "state": state,
        "connections": 2,
        "in_flight": 1,
        "latency": 0.004,
        "errors": 3,
        "last_error": None,
        "since": 0.0,
    }
    fields.update(kw)
    return NodeStatus(**fields)


def _stats(**kw: Any) -> ClusterStatistics:
    fields: dict[str, Any] = {
        "nodes": {
            "i1": NodeStatistics(requests_ok=10, requests_failed=1, restarts=2),
            "i2": NodeStatistics(requests_ok=5, requests_retried=4, reconnects=7),
        },
        "requests_ok": 15,
        "requests_failed": 2,
        "requests_retried": 4,
        "restarts": 2,
        "discovery_runs": 9,
        "discovery_failures": 1,
        "queue_depth": 3,
        "events_published": 11,
    }
    fields.update(kw)
    return ClusterStatistics(**fields)


def render(snapshot: prometheus.Snapshot, **labels: str) -> Samples:
    registry = CollectorRegistry()

    class Fixed:
        def collect(self) -> list[Any]:
            return prometheus.families(snapshot, labels)

    registry.register(Fixed())
    return parse(generate_latest(registry).decode())


# -- the tables, without a cluster -------------------------------------------------------------


def test_families_of_a_snapshot() -> None:
    snapshot = prometheus.Snapshot(
        _stats(),
        [_status("i1", pa.NodeState.UP), _status("i2", pa.NodeState.DOWN, latency=None)],
    )
    s = render(snapshot)
    assert value(s, "picopyn_actors_requests_total") == 17
    assert value(s, "picopyn_actors_requests_failed_total") == 2
    assert value(s, "picopyn_actors_requests_retried_total") == 4
    assert value(s, "picopyn_actors_restarts_total") == 2
    assert value(s, "picopyn_actors_discovery_runs_total") == 9
    assert value(s, "picopyn_actors_discovery_failures_total") == 1
    assert value(s, "picopyn_actors_events_published_total") == 11
    assert value(s, "picopyn_actors_queue_depth") == 3
    assert value(s, "picopyn_actors_node_requests_total", node="i1") == 11
    assert value(s, "picopyn_actors_node_requests_failed_total", node="i1") == 1
    assert value(s, "picopyn_actors_node_requests_retried_total", node="i2") == 4
    assert value(s, "picopyn_actors_node_restarts_total", node="i1") == 2
    assert value(s, "picopyn_actors_node_reconnects_total", node="i2") == 7
    assert value(s, "picopyn_actors_node_up", node="i1") == 1
    assert value(s, "picopyn_actors_node_up", node="i2") == 0
    for state in pa.NodeState:
        expected = 1.0 if state is pa.NodeState.DOWN else 0.0
        assert value(s, "picopyn_actors_node_state", node="i2", state=state.value) == expected
    assert value(s, "picopyn_actors_node_connections", node="i1") == 2
    assert value(s, "picopyn_actors_node_in_flight", node="i1") == 1
    assert value(s, "picopyn_actors_node_latency_seconds", node="i1") == pytest.approx(0.004)
    assert ("picopyn_actors_node_latency_seconds", (("node", "i2"),)) not in s  # no measurement
    assert value(s, "picopyn_actors_node_errors_total", node="i2") == 3
    info = value(
        s,
        "picopyn_actors_node_info",
        node="i2",
        uuid="uuid-i2",
        address="127.0.0.1:2",
        tier="default",
        replicaset="r-i2",
    )
    assert info == 1


def test_extra_labels_go_on_every_sample() -> None:
    snapshot = prometheus.Snapshot(_stats(), [_status("i1", pa.NodeState.UP)])
    s = render(snapshot, cluster="orders")
    assert s
    assert all(("cluster", "orders") in labels for _, labels in s)
    assert value(s, "picopyn_actors_node_up", cluster="orders", node="i1") == 1


@attrs.frozen
class _OlderStatistics:
    """A statistics object without some of today's attributes (and with None in one)."""

    nodes: dict[str, Any]
    requests_ok: int
    requests_failed: int
    queue_depth: int | None


def test_absent_or_none_attributes_give_no_sample() -> None:
    @attrs.frozen
    class OldNode:
        requests_ok: int = 4

    stats = _OlderStatistics(
        nodes={"i1": OldNode()}, requests_ok=4, requests_failed=0, queue_depth=None
    )
    s = render(prometheus.Snapshot(stats, []))  # type: ignore[arg-type]
    names = {name for name, _ in s}
    assert value(s, "picopyn_actors_requests_total") == 4
    assert "picopyn_actors_queue_depth" not in names
    assert "picopyn_actors_restarts_total" not in names
    # A node row that sums an absent attribute gives no sample either.
    assert "picopyn_actors_node_requests_total" not in names
    assert "picopyn_actors_node_up" not in names


def _numeric_fields(cls: type) -> set[str]:
    return {f.name for f in attrs.fields(cls)}


def test_every_statistics_attribute_is_mapped() -> None:
    """A counter added to the statistics classes fails here until a table row reads it."""
    read = {a for row in prometheus.CLUSTER_METRICS for a in row.attributes}
    missing = _numeric_fields(ClusterStatistics) - read - UNMAPPED
    assert not missing, f"ClusterStatistics fields without a metric: {missing}"
    read = {a for row in prometheus.NODE_COUNTERS for a in row.attributes}
    missing = _numeric_fields(NodeStatistics) - read - UNMAPPED
    assert not missing, f"NodeStatistics fields without a metric: {missing}"
    read = {a for row in prometheus.NODE_GAUGES for a in row.attributes}
    missing = _numeric_fields(NodeStatus) - read - UNMAPPED
    assert not missing, f"NodeStatus fields without a metric: {missing}"


def all_metric_names() -> list[str]:
    rows = [*prometheus.CLUSTER_METRICS, *prometheus.NODE_COUNTERS, *prometheus.NODE_GAUGES]
    return [
        *(row.name for row in rows),
        prometheus.NODE_UP,
        prometheus.NODE_STATE,
        prometheus.NODE_INFO + "_info",
    ]


def test_operations_page_lists_every_metric() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(picopyn_actors_\w+)", text, re.M))
    names = set(all_metric_names())
    assert names - documented == set(), "metrics missing from docs/operations.md"
    assert documented - names == set(), "docs/operations.md lists metrics that do not exist"


def test_metric_names_are_unique_and_well_formed() -> None:
    names = all_metric_names()
    assert len(names) == len(set(names))
    for row in [*prometheus.CLUSTER_METRICS, *prometheus.NODE_COUNTERS, *prometheus.NODE_GAUGES]:
        assert re.fullmatch(r"picopyn_actors_[a-z_]+", row.name)
        assert row.name.endswith("_total") == (row.kind == "counter"), row.name
        assert row.help.endswith(".")


def test_respond_routes() -> None:
    registry = CollectorRegistry()
    status, content_type, _ = prometheus.respond(b"GET /metrics HTTP/1.1\r\n\r\n", registry)
    assert status == "200 OK" and content_type.startswith("text/plain")
    assert prometheus.respond(b"GET /nope HTTP/1.1\r\n\r\n", registry)[0] == "404 Not Found"
    assert prometheus.respond(b"POST /metrics HTTP/1.1\r\n\r\n", registry)[0].startswith("405")
    assert prometheus.respond(b"garbage\r\n\r\n", registry)[0].startswith("400")
    openmetrics = prometheus.respond(
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
        registry,
    )
    assert openmetrics[1].startswith("application/openmetrics-text")
    assert openmetrics[2].rstrip().endswith(b"# EOF")


async def test_the_collector_must_be_made_in_the_trio_run() -> None:
    def outside() -> None:
        prometheus.ClusterCollector(None)  # type: ignore[arg-type]

    with pytest.raises(RuntimeError, match="inside the trio run"):
        await trio.to_thread.run_sync(outside)


# -- real scrapes of a real cluster ------------------------------------------------------------


async def all_up(cluster: pa.Cluster, count: int) -> None:
    """Until ``count`` nodes are up: driven by the node events, not by a timer."""
    async with cluster.events() as events:
        while sum(n.state is pa.NodeState.UP for n in cluster.nodes()) < count:
            await events.receive()


@pytest.mark.deadline(90)
async def test_scrape_shows_every_node_up_and_counts_requests(
    shared_cluster: LocalCluster,
) -> None:
    names = {n.name for n in shared_cluster.nodes}
    async with (
        pa.open_cluster(shared_cluster.dsn, health_interval=0.2) as cluster,
        prometheus.serve(cluster, "127.0.0.1", 0) as server,
    ):
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        await all_up(cluster, len(names))
        before = await scrape(server.url)
        for name in names:
            assert value(before, "picopyn_actors_node_up", node=name) == 1
            assert value(before, "picopyn_actors_node_state", node=name, state="up") == 1
            assert value(before, "picopyn_actors_node_connections", node=name) >= 1
        requests = 300

        async def one() -> None:
            for _ in range(requests // 10):
                await cluster.fetchval("SELECT 1", idempotent=True)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
            # A scrape in the middle of the load is served too.
            during = await scrape(server.url)
        after = await scrape(server.url)
    total = "picopyn_actors_requests_total"
    assert value(before, total) <= value(during, total) <= value(after, total)
    assert value(after, total) >= value(before, total) + requests
    per_node = sum(value(after, "picopyn_actors_node_requests_total", node=n) for n in names)
    assert per_node >= requests
    assert value(after, "picopyn_actors_discovery_runs_total") >= 1
    assert shared_cluster.password not in repr(after)


async def test_serve_on_a_shared_registry_and_unregister(shared_cluster: LocalCluster) -> None:
    registry = CollectorRegistry()
    async with pa.open_cluster(shared_cluster.dsn) as cluster:
        async with prometheus.serve(cluster, "127.0.0.1", 0, registry=registry) as server:
            assert server.registry is registry
            samples = await scrape(server.url)
            assert value(samples, "picopyn_actors_discovery_runs_total") >= 1
        # Gone from the registry once the block has exited.
        assert "picopyn_actors_" not in generate_latest(registry).decode()
        await all_up(cluster, len(shared_cluster.nodes))
        collector = prometheus.register(cluster, registry, labels={"cluster": "a"})
        with pytest.raises(ValueError):
            prometheus.register(cluster, registry)  # the same names twice
        text = generate_latest(registry).decode()
        assert 'picopyn_actors_node_up{cluster="a",node="i1"} 1.0' in text
        registry.unregister(collector)


async def test_scrape_from_a_thread_hops_to_the_trio_thread(shared_cluster: LocalCluster) -> None:
    """prometheus_client's own threaded server: collect() runs in its thread."""
    registry = CollectorRegistry()
    async with pa.open_cluster(shared_cluster.dsn) as cluster:
        prometheus.register(cluster, registry)
        httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        try:
            url = f"http://127.0.0.1:{httpd.server_port}/metrics"
            samples = await scrape(url)
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(10)
        assert value(samples, "picopyn_actors_discovery_runs_total") >= 1
    # After the cluster has closed: an empty, valid scrape.
    assert "picopyn_actors_" not in generate_latest(registry).decode()


async def test_serve_refuses_a_bad_port_and_a_taken_address(shared_cluster: LocalCluster) -> None:
    async with pa.open_cluster(shared_cluster.dsn) as cluster:
        with pytest.raises(pa.ConfigError, match="port"):
            async with prometheus.serve(cluster, "127.0.0.1", 70000):
                pass
        async with prometheus.serve(cluster, "127.0.0.1", 0) as first:
            with pytest.raises(OSError):
                async with prometheus.serve(cluster, "127.0.0.1", first.port):
                    pass
            # The first one still answers.
            assert await scrape(first.url)
            with pytest.raises(urllib.error.HTTPError) as info:
                await trio.to_thread.run_sync(
                    scrape_blocking, first.url.replace("/metrics", "/other")
                )
            assert info.value.code == 404


def test_import_without_prometheus_client_says_which_extra() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "try:\n"
        "    import picopyn_actors.prometheus\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'picopyn_actors[prometheus]'" in result.stdout
