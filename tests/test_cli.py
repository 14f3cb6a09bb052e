"""The command line: ``python -m picopyn_actors monitor|demo``.

Integration tests run the CLI as a subprocess against the stand-in cluster;
unit tests cover the pure parts (the chaos plan, the report, the view).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from picopyn_actors import NodeState, NodeStatus
from picopyn_actors._cli import build_parser
from picopyn_actors._cli.demo import (
    DemoOptions,
    Fault,
    Recorder,
    Step,
    chaos_plan,
    heal_rows,
    share_rows,
    summary,
)
from picopyn_actors._cli.view import CatalogNode, format_age, node_json, not_up
from picopyn_actors._events import NodeEvent
from picopyn_actors.testing import LocalCluster

CLI = [sys.executable, "-m", "picopyn_actors"]


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("picopyn-actors: error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for secret in secrets:
        assert secret not in result.stderr + result.stdout


#: What the CLI says when a stop signal was not obeyed in time.
STOP_HUNG = (
    "picopyn-actors: error: did not stop within {grace:g} s after the stop signal; "
    "exiting at once\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- monitor against the shared cluster (read-only) --------------------------------------


def test_monitor_once_shows_every_node(shared_cluster: LocalCluster) -> None:
    result = run_cli("monitor", "--once", shared_cluster.dsn)
    assert result.returncode == 0, result.stderr
    for node in shared_cluster.nodes:
        assert node.name in result.stdout
        assert node.address in result.stdout
    assert "up" in result.stdout
    assert shared_cluster.password not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_monitor_check_passes_when_every_node_is_up(shared_cluster: LocalCluster) -> None:
    result = run_cli("monitor", "--check", shared_cluster.dsn)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check passed" in result.stdout


def test_monitor_json_streams_events_and_snapshots(shared_cluster: LocalCluster) -> None:
    proc = subprocess.Popen(
        [*CLI, "monitor", "--json", "--refresh", "0.2", shared_cluster.dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    watchdog = threading.Timer(30.0, proc.kill)
    watchdog.start()
    names = {n.name for n in shared_cluster.nodes}
    objects: list[dict[str, Any]] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            obj = json.loads(line)
            assert isinstance(obj, dict) and "type" in obj
            objects.append(obj)
            snapshots = [o for o in objects if o["type"] == "snapshot"]
            if len(snapshots) >= 3:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert objects[0]["type"] == "connected"
    assert shared_cluster.password not in json.dumps(objects)
    snapshots = [o for o in objects if o["type"] == "snapshot"]
    assert len(snapshots) >= 3
    last = snapshots[-1]
    assert {n["name"] for n in last["nodes"]} == names
    assert all(n["state"] == "up" for n in last["nodes"])
    for node in last["nodes"]:
        assert set(node) >= {"address", "catalog_state", "in_flight", "latency_ms", "errors"}


def test_monitor_once_json(shared_cluster: LocalCluster) -> None:
    result = run_cli("monitor", "--once", "--json", shared_cluster.dsn)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    snapshot = json.loads(lines[0])
    assert snapshot["type"] == "snapshot"
    assert {n["name"] for n in snapshot["nodes"]} == {n.name for n in shared_cluster.nodes}


def test_wrong_password_is_one_line_without_the_password(shared_cluster: LocalCluster) -> None:
    node = shared_cluster.nodes[0]
    wrong = "Wr0ng-Passw0rd-xyz"
    dsn = f"postgresql://{shared_cluster.user}:{wrong}@{node.address}/postgres"
    result = run_cli("monitor", "--once", dsn)
    assert_one_line_error(result, wrong, shared_cluster.password)
    assert "authentication" in result.stderr or "password" in result.stderr


# -- errors without a cluster ---------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    [
        "mysql://admin:s3cret-pw@127.0.0.1:4327",
        "postgresql://admin:s3cret-pw@127.0.0.1:99999/db",
        "postgresql://admin:s3cret-pw@127.0.0.1:4327/db?bogus=1",
        "postgresql://:s3cret-pw@127.0.0.1:4327",
    ],
)
def test_bad_dsn_is_one_line_error(dsn: str) -> None:
    result = run_cli("monitor", "--check", dsn)
    assert_one_line_error(result, "s3cret-pw")
    assert "DSN" in result.stderr or "dsn" in result.stderr


def test_unreachable_seed_is_one_line_error() -> None:
    dsn = f"postgresql://admin:s3cret-pw@127.0.0.1:{free_port()}/postgres"
    result = run_cli("monitor", "--once", dsn)
    assert_one_line_error(result, "s3cret-pw")


def test_usage_errors_exit_2() -> None:
    for duration in ("0", "5", "nan", "soon"):
        result = run_cli("demo", "--duration", duration)
        assert result.returncode == 2, duration
        assert "Traceback" not in result.stderr
        assert "--duration" in result.stderr
    result = run_cli("monitor")
    assert result.returncode == 2


def test_console_script_is_the_same_command() -> None:
    script = Path(sys.executable).with_name("picopyn-actors")
    if not script.exists():
        pytest.skip("the console script is not installed next to this interpreter")
    a = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    b = run_cli("--help")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


# -- a broken cluster -----------------------------------------------------------------------


def test_monitor_check_fails_with_a_dead_node(local_cluster: LocalCluster) -> None:
    local_cluster.kill("i2")
    result = run_cli("monitor", "--check", "--interval", "0.5", local_cluster.dsn)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "check failed" in result.stdout
    failing = [line for line in result.stdout.splitlines() if line.strip().startswith("i2 (")]
    # Between reconnect attempts the node is down; during one, connecting.
    assert failing and (" is down" in failing[0] or " is connecting" in failing[0]), result.stdout
    assert "Traceback" not in result.stderr
    result = run_cli("monitor", "--check", "--json", "--interval", "0.5", local_cluster.dsn)
    assert result.returncode == 2
    snapshot = json.loads(result.stdout.strip().splitlines()[-1])
    assert snapshot["check"]["ok"] is False
    assert any(p.startswith("i2 ") for p in snapshot["check"]["problems"])
    assert local_cluster.password not in result.stdout + result.stderr


# -- demo ---------------------------------------------------------------------------------------


def test_demo_short_run_prints_a_summary_serves_metrics_and_plots(tmp_path: Path) -> None:
    """One 20 s run: the summary, a scrape under the demo's load, and the plot."""
    pytest.importorskip("prometheus_client")
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    args = ["demo", "--duration", "20", "--no-live", "--readers", "10"]
    args += ["--plot", str(png), "--prometheus", f"127.0.0.1:{free_port()}"]
    proc = subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    watchdog = threading.Timer(90.0, proc.terminate)  # SIGTERM: the demo stops its servers
    watchdog.start()
    lines: list[str] = []
    scrapes: list[dict[str, float]] = []
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            lines.append(line)
            if url is None and "metrics at " in line:
                url = line.split("metrics at ", 1)[1].strip()
                scrapes.append(scrape(url))
            elif url is not None and len(scrapes) == 1 and "chaos: kill" in line:
                # Two seconds of load later (the kill is at 10% of the run).
                scrapes.append(scrape(url))
        _, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "Traceback" not in err
    for text in ("Summary", "Requests", "Share of read answers", "Faults and healing"):
        assert text in out
    assert "10 readers, 2 writers" in out
    for fault in ("kill i2", "restart i2", "hang i3", "resume i3", "add a node", "expel i1"):
        assert f"chaos: {fault}" in out
        assert fault in out.split("Faults and healing", 1)[1]
    assert "i4 joined" in out
    # The metrics of the demo's client, under its load.
    assert len(scrapes) == 2, out[-2000:]
    first, second = scrapes
    assert second["picopyn_actors_requests_total"] > first["picopyn_actors_requests_total"]
    # (i2 may be down already: the line that triggers the scrape announces its kill.)
    assert all(second[f'picopyn_actors_node_up{{node="i{n}"}}'] == 1 for n in (1, 3))
    assert first['picopyn_actors_node_up{node="i2"}'] == 1
    # The plot.
    assert f"plot written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def scrape(url: str) -> dict[str, float]:
    """One real HTTP scrape, parsed by prometheus_client: ``{'name{labels}': value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_monitor_serves_prometheus_metrics(shared_cluster: LocalCluster) -> None:
    """``monitor --prometheus``: every node up, and requests_total moves (the
    monitor's own catalog queries, one per --interval)."""
    pytest.importorskip("prometheus_client")
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [*CLI, "monitor", "--json", "--interval", "0.2", "--prometheus", address,
         shared_cluster.dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    watchdog = threading.Timer(60.0, proc.kill)
    watchdog.start()
    names = sorted(n.name for n in shared_cluster.nodes)
    scrapes: list[dict[str, float]] = []
    try:
        assert proc.stdout is not None
        connected = json.loads(proc.stdout.readline())
        assert connected["type"] == "connected"
        url = connected["metrics"]
        assert url == f"http://{address}/metrics"
        for line in proc.stdout:
            snapshot = json.loads(line)
            if snapshot["type"] != "snapshot":
                continue
            if not scrapes:
                if all(n["state"] == "up" for n in snapshot["nodes"]) and len(
                    snapshot["nodes"]
                ) == len(names):
                    scrapes.append(scrape(url))
            else:
                scrapes.append(scrape(url))  # a snapshot (a second) later
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # A clean stop, even with a catalog query in flight at the signal.
    assert proc.returncode == 0, err
    assert len(scrapes) == 2
    first, second = scrapes
    for name in names:
        assert first[f'picopyn_actors_node_up{{node="{name}"}}'] == 1
        assert first[f'picopyn_actors_node_state{{node="{name}",state="up"}}'] == 1
    assert second["picopyn_actors_requests_total"] > first["picopyn_actors_requests_total"]
    assert (
        second["picopyn_actors_discovery_runs_total"] > first["picopyn_actors_discovery_runs_total"]
    )


# -- stopping ----------------------------------------------------------------------------------


def test_sigint_stops_monitor_cleanly_with_a_paused_node(local_cluster: LocalCluster) -> None:
    local_cluster.pause("i2")
    proc = subprocess.Popen(
        [*CLI, "monitor", "--json", "--interval", "0.5", "--refresh", "0.5", local_cluster.dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    watchdog = threading.Timer(60.0, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["type"] == "connected"
        # Until the client found the hung node down, and two snapshots more
        # (half a second each): it is then in the middle of a reconnect attempt,
        # which waits for the paused server up to connect_timeout.
        snapshots_since_down = None
        for line in proc.stdout:
            obj = json.loads(line)
            if obj["type"] == "event" and obj["node"] == "i2" and obj["new"] == "down":
                snapshots_since_down = snapshots_since_down or 0
            elif obj["type"] == "snapshot" and snapshots_since_down is not None:
                snapshots_since_down += 1
                if snapshots_since_down == 2:
                    break
        proc.send_signal(signal.SIGINT)
        # Past the CLI's grace the watchdog ends it with 1: a clean stop is 0.
        _, err = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err
    assert "exiting at once" not in err, err
    assert proc.returncode == 0, err


def test_sighup_stops_the_demo_and_its_servers() -> None:
    """The terminal went away: the demo stops the workload and the local servers."""
    proc = subprocess.Popen(
        [*CLI, "demo", "--duration", "10", "--no-live"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    watchdog = threading.Timer(60.0, proc.terminate)
    watchdog.start()
    ports: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "cluster up in" in line:
                ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", line)]
            if "chaos: kill" in line:  # the workload is running
                break
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(ports) == 3, out
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    for port in ports:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


STUCK = """
import sys
import trio
from picopyn_actors._cli.common import on_signals

async def main():
    with trio.CancelScope() as scope:
        def stop():
            print("stopping", flush=True)
            scope.cancel()

        async with on_signals(stop, grace=float(sys.argv[1]),
                              cleanup=lambda: print("cleaned up", flush=True)):
            print("ready", flush=True)
            with trio.CancelScope(shield=sys.argv[2] == "stuck"):
                await trio.sleep_forever()
    print("stopped", flush=True)

trio.run(main)
"""


def _stuck(grace: float, mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, str(grace), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_a_stop_that_hangs_ends_after_the_grace_period() -> None:
    proc = _stuck(1.0, "stuck")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert out == "stopping\ncleaned up\n"
    assert err == STOP_HUNG.format(grace=1)


def test_a_second_signal_ends_a_hanging_stop_at_once() -> None:
    proc = _stuck(600.0, "stuck")
    assert proc.stdout is not None
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "stopping\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert out == "cleaned up\n"
    assert "a second signal after the stop signal; exiting at once" in err


def test_a_clean_stop_is_not_forced() -> None:
    proc = _stuck(600.0, "clean")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "stopping\nstopped\n"
    assert err == ""


async def test_the_watchdog_is_disarmed_when_the_block_ends() -> None:
    from picopyn_actors._cli.common import on_signals

    stopped = trio.Event()
    async with on_signals(stopped.set, grace=600) as stopper:
        os.kill(os.getpid(), signal.SIGINT)  # caught by the block's signal receiver
        await stopped.wait()
        assert stopper.stopping
    assert stopper._timer is not None and stopper._timer.finished.is_set()


# -- environment problems: one line, no traceback -------------------------------------------


def test_closed_stdout_is_one_line_error() -> None:
    dsn = f"postgresql://admin:s3cret-pw@127.0.0.1:{free_port()}/postgres"
    result = subprocess.run(
        ["bash", "-c", 'exec "$@" >&-', "bash", *CLI, "monitor", "--json", dsn],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert_one_line_error(result, "s3cret-pw")
    assert "standard output is closed" in result.stderr


def test_stdout_closed_by_the_reader_stops_quietly(shared_cluster: LocalCluster) -> None:
    result = subprocess.run(
        ["bash", "-c", '"$@" | head -n 1', "bash", *CLI, "monitor", "--json", shared_cluster.dsn],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert json.loads(result.stdout)["type"] == "connected"
    assert result.stderr == ""


def test_bad_dsn_parameter_is_one_line_error() -> None:
    dsn = f"postgresql://admin:s3cret-pw@127.0.0.1:{free_port()}/db?connect_timeout=abc"
    result = run_cli("monitor", "--once", dsn)
    assert_one_line_error(result, "s3cret-pw")


def test_bad_dsn_parameter_error_names_it() -> None:
    dsn = f"postgresql://admin:s3cret-pw@127.0.0.1:{free_port()}/db?connect_timeout=abc"
    result = run_cli("monitor", "--once", dsn)
    assert_one_line_error(result, "s3cret-pw")
    assert "connect_timeout" in result.stderr


@pytest.mark.parametrize("command", ["monitor", "demo"])
def test_too_many_connections_is_refused_before_any_io(command: str, tmp_path: Path) -> None:
    dsn = f"postgresql://admin:s3cret-pw@127.0.0.1:{free_port()}/db"
    args = [command, "--connections", "100000"] + ([dsn] if command == "monitor" else [])
    # Should the option get past the check, the demo must not start real
    # servers with 100000 connections each: point it at binaries that are not there.
    env = {**os.environ, "PICOPYN_PG_BINDIR": str(tmp_path)}
    result = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert_one_line_error(result, "s3cret-pw")
    assert "connections_per_node" in result.stderr
    assert "local cluster" not in result.stdout  # refused before starting one


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("matplotlib", ["demo", "--plot", "run.png"], "plot"),
        ("prometheus_client", ["demo", "--prometheus", "127.0.0.1:9"], "prometheus"),
        ("prometheus_client", ["monitor", "--prometheus", "127.0.0.1:9", "postgresql://a@h"],
         "prometheus"),
    ],
)  # fmt: skip
def test_a_missing_extra_is_one_line_error(module: str, args: list[str], extra: str) -> None:
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from picopyn_actors._cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert_one_line_error(result)
    assert f"pip install 'picopyn_actors[{extra}]'" in result.stderr


def test_bad_plot_path_is_refused_before_the_run(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result = run_cli("demo", "--plot", str(tmp_path / "missing" / "run.png"))
    assert_one_line_error(result)
    assert "no directory" in result.stderr and "starting" not in result.stdout
    result = run_cli("demo", "--plot", str(tmp_path / "run.nope"))
    assert_one_line_error(result)
    assert "unknown image format 'nope'" in result.stderr


def test_prometheus_address_needs_a_port() -> None:
    result = run_cli("monitor", "--prometheus", "localhost", "postgresql://a@h")
    assert result.returncode == 2
    assert "expected HOST:PORT" in result.stderr
    result = run_cli("monitor", "--once", "--prometheus", "127.0.0.1:9", "postgresql://a@h")
    assert_one_line_error(result)


# -- unit tests of the pure parts --------------------------------------------------------------


def test_chaos_plan_scales_with_the_duration() -> None:
    plan = chaos_plan(60, ["i1", "i2", "i3"])
    assert [(s.action, s.node) for s in plan] == [
        ("kill", "i2"),
        ("restart", "i2"),
        ("pause", "i3"),
        ("resume", "i3"),
        ("alter", None),
        ("add", None),
        ("expel", "i1"),
    ]
    assert plan[0].at == 6.0 and plan[-1].at == 48.0
    assert [s.at for s in chaos_plan(20, ["a", "b", "c"])] == [
        2.0, 5.0, 8.0, 10.4, 11.6, 13.0, 16.0
    ]  # fmt: skip
    with pytest.raises(ValueError):
        chaos_plan(60, ["i1", "i2"])


def test_share_rows_per_bucket() -> None:
    answers = {"i1": [0.5, 1.0, 6.0], "i2": [2.0, 7.0, 8.0, 9.0], "i10": [9.5]}
    names, rows = share_rows(answers, origin=0.0, end=10.01, bucket=5.0)
    assert names == ["i1", "i2", "i10"]
    assert len(rows) == 2  # the 10 ms sliver at the end is no bucket of its own
    label, total, shares = rows[0]
    assert (label, total) == ("0-5s", 3)
    assert shares["i1"] == pytest.approx(200 / 3)
    label, total, shares = rows[1]
    assert total == 5 and shares["i2"] == pytest.approx(60.0) and shares["i10"] == 20.0


def _event(node: str, old: NodeState, new: NodeState, at: float) -> NodeEvent:
    return NodeEvent(node, old, new, "why", at)


def test_heal_rows() -> None:
    rec = Recorder(origin=100.0)
    rec.faults = [
        Fault(Step(2, "kill", "i2"), "i2", started=102.0, done=102.1),
        Fault(Step(5, "restart", "i2"), "i2", started=105.0, done=105.5),
        Fault(Step(8, "pause", "i3"), "i3", started=108.0, done=108.0),
        Fault(Step(13, "add", None), "i4", started=113.0, done=114.0),
        Fault(Step(16, "expel", "i1"), "i1", started=116.0, done=116.2, error="boom"),
    ]
    rec.events = [
        _event("i2", NodeState.UP, NodeState.SUSPECT, 102.05),
        _event("i2", NodeState.SUSPECT, NodeState.DOWN, 102.06),
        _event("i3", NodeState.UP, NodeState.SUSPECT, 108.2),
        _event("i3", NodeState.SUSPECT, NodeState.DOWN, 108.9),
    ]
    rec.answers = {"i2": [101.0, 105.2, 105.8, 106.0], "i4": [114.25]}
    rows = heal_rows(rec)
    got = [
        (r.fault.step.action, r.what, None if r.after is None else round(r.after, 2)) for r in rows
    ]
    assert got == [
        ("kill", "no new requests to i2", 0.05),
        ("restart", "i2 answers again", 0.3),
        ("pause", "no new requests to i3", 0.2),
        ("pause", "i3 marked down", 0.9),
        ("add", "i4 answers", 0.25),
        ("expel", "the operation failed", None),
    ]
    rec.end = 120.0
    rec.sent.update(read=10, write=2)
    rec.answered.update(read=8, write=1)
    rec.failure("read", "NoNodesAvailable", 102.1)
    rec.failure("write", "OutcomeUnknown", 102.1)
    assert rec.failure_kinds() == {"NoNodesAvailable": 1, "OutcomeUnknown": 1}
    assert summary(rec, DemoOptions(duration=20), ["i2 up"])  # renders without error


def _status(name: str, state: NodeState, **kw: Any) -> NodeStatus:
    fields: dict[str, Any] = {
        "name": name,
        "uuid": f"uuid-{name}",
        "address": "127.0.0.1:1",
        "tier": "default",
        "replicaset": "r1",
        "catalog_state": "Online(1)",
        "state": state,
        "connections": 1,
        "in_flight": 0,
        "latency": None,
        "errors": 0,
        "last_error": None,
        "since": 0.0,
    }
    fields.update(kw)
    return NodeStatus(**fields)


def test_not_up_lists_down_and_offline_nodes_but_not_expelled_ones() -> None:
    nodes = [
        _status("i1", NodeState.UP),
        _status("i2", NodeState.DOWN, last_error="connection refused"),
    ]
    catalog = [
        CatalogNode("i3", "h:3", "default", "r3", "Offline(1)", "Offline(1)", False, True),
        CatalogNode("i4", "h:4", "default", "r4", "Expelled(1)", "Expelled(1)", True, False),
        CatalogNode("i1", "h:1", "default", "r1", "Online(1)", "Online(1)", False, False),
    ]
    problems = not_up(nodes, catalog)
    assert len(problems) == 2
    assert problems[0].startswith("i2 ") and "down: connection refused" in problems[0]
    assert problems[1].startswith("i3 ") and "Offline(1)" in problems[1]


def test_view_helpers() -> None:
    assert format_age(4.24) == "4.2s"
    assert format_age(185) == "3m05s"
    assert format_age(7300) == "2h01m"
    obj = node_json(_status("i1", NodeState.UP, latency=0.0123, since=10.0), now=12.5)
    assert obj["latency_ms"] == 12.3 and obj["since_change_s"] == 2.5 and obj["state"] == "up"


def test_timeline_bins_the_run() -> None:
    from picopyn_actors._cli.plot import timeline

    rec = Recorder(origin=100.0)
    rec.end = 103.0
    rec.answers = {"i2": [100.1, 100.2, 102.5], "i1": [101.5], "i4": [102.9]}
    rec.writes = [100.5, 102.0]
    rec.failures = [(101.2, "read", "NoNodesAvailable"), (101.9, "write", "OutcomeUnknown")]
    rec.faults = [Fault(Step(1.0, "pause", "i3"), "i3", started=101.0, done=101.01)]
    line = timeline(rec, 1.0, ["i1", "i2", "i3"])
    assert list(line.starts) == [0.0, 1.0, 2.0]
    assert list(line.reads) == ["i1", "i2", "i3", "i4"]
    assert line.reads["i2"] == [2, 0, 1] and line.reads["i1"] == [0, 1, 0]
    assert line.reads["i3"] == [0, 0, 0] and line.reads["i4"] == [0, 0, 1]
    assert list(line.writes) == [1, 0, 1] and list(line.failed) == [0, 2, 0]
    assert list(line.faults) == [(1.0, "hang i3")]
    shares = line.shares()
    assert shares["i2"] == [100.0, 0.0, 50.0] and shares["i4"][2] == 50.0


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.duration, args.nodes, args.no_live) == (60.0, 3, False)
    assert args.readers == 20 and args.plot is None and args.prometheus is None
    assert build_parser().parse_args(["demo", "--workers", "7"]).readers == 7  # the old name
    args = build_parser().parse_args(["monitor", "--check", "-v", "postgresql://a@h"])
    assert args.check and args.verbose == 1 and args.connections == 1 and args.bridge is None
    args = build_parser().parse_args(["demo", "--bridge", "thread", "--duration", "30"])
    assert args.bridge == "thread" and args.duration == 30.0
