"""Every example runs against the stand-in cluster, as a subprocess with a DSN."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from picopyn_actors.testing import LocalCluster

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str, timeout: float = 60.0) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result.stdout + result.stderr


def test_every_example_is_tested() -> None:
    tested = {"service.py", "health_watcher.py", "custom_strategy.py", "seed_client.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_service(shared_cluster: LocalCluster) -> None:
    out = run_example("service.py", shared_cluster.dsn, "--seconds", "3", "--workers", "4")
    assert "requests ok=" in out
    assert "service stopped cleanly" in out
    assert "errors: none" in out
    for node in shared_cluster.nodes:
        assert f"{node.name}: " in out


def test_health_watcher(shared_cluster: LocalCluster) -> None:
    out = run_example("health_watcher.py", shared_cluster.dsn, "--seconds", "2")
    for node in shared_cluster.nodes:
        assert f"node {node.name} at {node.address}" in out
    assert "watcher stopped" in out


def test_custom_strategy(shared_cluster: LocalCluster) -> None:
    out = run_example("custom_strategy.py", shared_cluster.dsn, "--requests", "150")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("strategy"))
    assert header.split()[1:] == [n.name for n in shared_cluster.nodes]
    preferred = next(
        line for line in lines if "PreferredNodes" in line and ", 3 concurrent" in line
    )
    # i1 is avoided while the other nodes have free connections.
    assert float(preferred.split()[-3].rstrip("%")) < 5


def test_seed_client(shared_cluster: LocalCluster) -> None:
    out = run_example("seed_client.py", shared_cluster.dsn)
    for node in shared_cluster.nodes:
        assert f"instance {node.name} in tier" in out
    assert "execute status: SELECT 1" in out
    assert "done" in out


def test_an_example_starts_its_own_cluster_without_a_dsn() -> None:
    out = run_example("seed_client.py", timeout=90)
    assert "instance i1 in tier default" in out
    assert "done" in out
