"""Plumbing shared by the commands: consoles, signals, logging, the catalog poll."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TextIO

import trio
from rich.console import Console

from .._cluster import Cluster
from .._dsn import redact
from .._errors import PicodataError
from .._topology import DISCOVERY_QUERY, build_topology
from .view import CatalogNode

log = logging.getLogger("picopyn_actors.cli")

#: Width used when stdout is not a terminal (pipes, CI logs): wide enough that
#: the node table never wraps a node name.
PIPE_WIDTH = 160


def make_console(file: TextIO | None = None) -> Console:
    """A rich console on ``file`` (stdout); wide and colourless when not a terminal."""
    console = Console(file=file, highlight=False)
    if not console.is_terminal:
        console = Console(file=file, highlight=False, width=PIPE_WIDTH)
    return console


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is *now*, so that a live view that
    redirects stderr shows log lines above itself instead of tearing."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(verbosity: int) -> None:
    """Library logs to stderr: WARNING by default, INFO with ``-v``, DEBUG with ``-vv``."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = _StderrHandler()
    handler.setFormatter(
        _RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


@asynccontextmanager
async def on_signals(action: Callable[[], object]) -> AsyncIterator[None]:
    """Call ``action`` (typically ``scope.cancel``) on SIGINT (Ctrl-C) or SIGTERM,
    instead of raising KeyboardInterrupt somewhere inside the actors. Main thread only."""

    async def watch() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.debug("signal %d: stopping", signum)
                action()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


async def fetch_catalog(cluster: Cluster, timeout: float) -> list[CatalogNode] | None:
    """Every node the catalog lists (``None`` when no node answered in time)."""
    try:
        rows = await cluster.fetch(DISCOVERY_QUERY, idempotent=True, timeout=timeout)
    except (PicodataError, trio.TooSlowError) as exc:
        log.debug("catalog query failed: %s", exc)
        return None
    topology = build_topology(rows)
    return sorted((CatalogNode.from_info(i) for i in topology.nodes.values()), key=lambda c: c.name)


def one_line(message: str) -> str:
    """Collapse a message to one line."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())
