"""Plumbing shared by the commands: consoles, signals, logging, the catalog poll."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import TextIO

import attrs
import trio
from rich.console import Console
from rich.logging import RichHandler

from .._cluster import Cluster
from .._dsn import Address, redact
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


def stderr_is_terminal() -> bool:
    """Standard error goes to the terminal (so a log line there would tear a live view)."""
    stream = sys.__stderr__
    try:
        return stream is not None and stream.isatty()
    except ValueError:  # closed
        return False


@contextmanager
def live_logging(console: Console) -> Iterator[None]:
    """While a live view runs on ``console``, log records go through rich to
    that console, which prints them above the view instead of over it.

    Only when stderr is the terminal too: logs sent elsewhere (``2>file``)
    stay there. The handlers set by :func:`setup_logging` come back on exit.
    """
    if not stderr_is_terminal():
        yield
        return
    root = logging.getLogger()
    saved = list(root.handlers)
    handler = RichHandler(
        console=console,
        show_path=False,
        markup=False,
        rich_tracebacks=False,
        log_time_format="%H:%M:%S",
        omit_repeated_times=False,
    )
    handler.setFormatter(_RedactingFormatter("%(name)s: %(message)s"))
    for old in saved:
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for old in saved:
            root.addHandler(old)


#: How long the commands may take to stop after Ctrl-C or SIGTERM before
#: they give up on a clean shutdown and exit at once.
STOP_GRACE = 5.0


def write_stderr(line: str) -> None:
    """Write one line to file descriptor 2, bypassing any proxy (safe from any thread)."""
    with suppress(OSError):
        os.write(2, (line.rstrip("\n") + "\n").encode("utf-8", "replace"))


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop a command: Ctrl-C, SIGTERM, and SIGHUP (its
    terminal went away) unless the command was started with SIGHUP ignored
    (``nohup``)."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup)


def stop_signals_as_sigint() -> None:
    """Make SIGTERM and SIGHUP act as Ctrl-C outside trio too (in the blocking
    parts, such as starting the demo's local cluster), so that the command
    unwinds and cleans up instead of being killed on the spot. Main thread only."""
    for signum in stop_signals()[1:]:
        signal.signal(signum, lambda signum, frame: signal.raise_signal(signal.SIGINT))


@attrs.define(eq=False)
class Stopper:
    """Turns Ctrl-C, SIGTERM and SIGHUP into a clean stop, with a way out if the stop hangs.

    The first signal calls ``action`` (typically ``scope.cancel``) and arms a
    watchdog; a second signal, or the watchdog after ``grace`` seconds, calls
    ``cleanup`` (for the demo: stop the local cluster's servers), says so on
    stderr and ends the process with exit code 1.
    """

    action: Callable[[], object]
    grace: float = STOP_GRACE
    cleanup: Callable[[], object] | None = None
    prog: str = "picopyn-actors"
    stopping: bool = attrs.field(init=False, default=False)
    _timer: threading.Timer | None = attrs.field(init=False, default=None)
    _forcing: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def signal(self, signum: int) -> None:
        """Handle one signal (called in the trio thread)."""
        if not self.stopping:
            log.debug("signal %d: stopping", signum)
            self.stopping = True
            self._timer = threading.Timer(
                self.grace, self.force, (f"did not stop within {self.grace:g} s",)
            )
            self._timer.daemon = True
            self._timer.start()
            self.action()
        else:
            self.force("a second signal")

    def disarm(self) -> None:
        """The stop finished: no watchdog any more."""
        if self._timer is not None:
            self._timer.cancel()

    def force(self, why: str) -> None:
        """Clean up what must not outlive the process and exit now (any thread)."""
        if not self._forcing.acquire(blocking=False):
            return
        write_stderr(f"{self.prog}: error: {why} after the stop signal; exiting at once")
        if self.cleanup is not None:
            try:
                self.cleanup()
            except BaseException as exc:  # we are leaving anyway
                write_stderr(f"{self.prog}: error: clean-up failed: {type(exc).__name__}: {exc}")
        os._exit(1)


@asynccontextmanager
async def on_signals(
    action: Callable[[], object],
    *,
    grace: float = STOP_GRACE,
    cleanup: Callable[[], object] | None = None,
) -> AsyncIterator[Stopper]:
    """Call ``action`` (typically ``scope.cancel``) on Ctrl-C, SIGTERM or SIGHUP
    (see :func:`stop_signals`), instead of raising KeyboardInterrupt somewhere
    inside the actors; if the
    block has not ended ``grace`` seconds later, or on a second signal, exit
    at once (see :class:`Stopper`). Main thread only."""
    stopper = Stopper(action, grace, cleanup)
    # ``action`` typically cancels a scope around this block: the watcher must
    # outlive that cancellation to see a second signal.
    watching = trio.CancelScope(shield=True)

    async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with watching, trio.open_signal_receiver(*stop_signals()) as signals:
            task_status.started()
            async for signum in signals:
                stopper.signal(signum)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watch)  # signals are caught from here on
            try:
                yield stopper
            finally:
                watching.cancel()
    finally:
        stopper.disarm()


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


@asynccontextmanager
async def serve_metrics(cluster: Cluster, address: Address | None) -> AsyncIterator[str | None]:
    """Serve ``cluster``'s Prometheus metrics at ``address`` while the block
    runs, and yield their URL (``None``, and nothing served, without an address)."""
    if address is None:
        yield None
        return
    from ..prometheus import serve

    async with serve(cluster, address.host, address.port) as server:
        yield server.url
