"""The command line: ``picopyn-actors monitor DSN`` and ``picopyn-actors demo``.

Also reachable as ``python -m picopyn_actors``. Exit codes: 0 on success
(and on Ctrl-C, SIGTERM or SIGHUP), 1 on an error (bad DSN or option, wrong
password, unreachable cluster, closed stdout, an optional extra missing:
one line on stderr, never a traceback nor the password; also when a stop
signal was not obeyed within a few seconds, see
:class:`~picopyn_actors._cli.common.Stopper`), 2 when ``monitor --check``
finds a node that is not up (and on a usage error).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import trio

from .._config import BRIDGES, DIALECTS, ClusterConfig
from .._dsn import Address, parse_dsn, redact
from .._errors import ConfigError, PicodataError
from .common import one_line, setup_logging, stop_signals_as_sigint

log = logging.getLogger("picopyn_actors.cli")

#: The shortest demo run the chaos schedule fits in (seconds).
MIN_DURATION = 10.0

PROG = "picopyn-actors"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _seconds_at_least(minimum: float) -> type[float]:
    def parse(text: str) -> float:
        value = _positive_float(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text!r}")
        return value

    parse.__name__ = f"seconds >= {minimum:g}"
    return parse  # type: ignore[return-value]


def _count(minimum: int) -> type[int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse  # type: ignore[return-value]


def _host_port(text: str) -> Address:
    try:
        address = Address.parse(text, default_port=0)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if address.port == 0:  # no port given (an explicit 0 is refused above)
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return address


_host_port.__name__ = "HOST:PORT"


class CommandError(Exception):
    """A problem the command reports as one line and exit code 1."""


#: The optional extras the commands use, by import name.
EXTRAS = {"prometheus_client": "prometheus", "matplotlib": "plot"}


def _require(module: str, option: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise CommandError(
            f"{option} needs {module}, which is not installed: "
            f"pip install 'picopyn_actors[{EXTRAS[module]}]'"
        ) from None


def _prometheus_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prometheus",
        type=_host_port,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics while running "
        "(needs the prometheus extra; see docs/operations.md)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A self-healing trio client for Picodata clusters: tools.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    monitor = commands.add_parser(
        "monitor",
        help="show every node of a cluster, live",
        description="Open the cluster behind DSN and show every node, live: catalog state, "
        "client state, connections, in-flight requests, latency, errors. Events scroll "
        "below the table. Exit codes: 0 ok, 1 error, 2 --check found a node not up.",
    )
    monitor.add_argument(
        "dsn",
        metavar="DSN",
        help="postgresql://USER:PASSWORD@HOST:PORT[,HOST:PORT...][/DB]; every host is a seed",
    )
    monitor.add_argument(
        "--json",
        action="store_true",
        help="print JSON lines (events and periodic snapshots), each with a 'type' field",
    )
    monitor.add_argument(
        "--once", action="store_true", help="wait for the nodes to settle, print one snapshot, exit"
    )
    monitor.add_argument(
        "--check",
        action="store_true",
        help="as --once, then exit 2 when any node is not up (and say which)",
    )
    monitor.add_argument(
        "--interval",
        type=_positive_float,
        metavar="SECONDS",
        help="discovery and health probe interval (default: the library's, 2.0 and 1.0)",
    )
    monitor.add_argument(
        "--connections",
        type=_count(1),
        default=1,
        metavar="N",
        help="connections per node (default 1: the monitor only watches)",
    )
    monitor.add_argument(
        "--refresh",
        type=_positive_float,
        metavar="SECONDS",
        help="redraw (or --json snapshot) period (default 0.25, or 1.0 with --json)",
    )
    monitor.add_argument(
        "--grace",
        type=_positive_float,
        metavar="SECONDS",
        help="--once/--check: longest wait for nodes to settle (default: connect timeout + "
        "health interval)",
    )
    monitor.add_argument(
        "--events", type=_count(1), default=10, metavar="N", help="recent events shown (default 10)"
    )
    _prometheus_option(monitor)
    _bridge(monitor)
    monitor.add_argument(
        "--dialect",
        choices=DIALECTS,
        help="what the servers speak: picodata (the default) sends Picodata's session "
        "options; postgresql, for a plain PostgreSQL server, sends none",
    )
    _verbosity(monitor)

    demo = commands.add_parser(
        "demo",
        help="a local 3-node stand-in cluster, a workload and a chaos script",
        description="Start a local stand-in cluster, run a steady query workload through "
        "picopyn_actors while a chaos script kills, restarts, hangs, resumes, adds and "
        "expels nodes, then print how the client healed.",
    )
    demo.add_argument(
        "--duration",
        type=_seconds_at_least(MIN_DURATION),
        default=60.0,
        metavar="SECONDS",
        help="length of the run; the chaos schedule scales with it "
        f"(default 60, at least {MIN_DURATION:g})",
    )
    demo.add_argument(
        "--nodes", type=_count(3), default=3, metavar="N", help="nodes to start with (default 3)"
    )
    demo.add_argument(
        "--no-live",
        action="store_true",
        help="plain log lines instead of the live view (automatic when stdout is not a terminal)",
    )
    demo.add_argument(
        "--readers",
        type=_count(1),
        default=20,
        metavar="N",
        help="concurrent readers running SELECT pico_instance_uuid() (default 20)",
    )
    # The old name of --readers, still accepted.
    demo.add_argument("--workers", type=_count(1), dest="readers", help=argparse.SUPPRESS)
    demo.add_argument(
        "--writers",
        type=_count(0),
        default=2,
        metavar="N",
        help="concurrent writers running non-idempotent INSERTs (default 2)",
    )
    demo.add_argument(
        "--connections",
        type=_count(1),
        default=2,
        metavar="N",
        help="connections per node (default 2)",
    )
    demo.add_argument(
        "--bucket",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="width of the per-node share buckets in the summary (default 5)",
    )
    demo.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="at the end, draw throughput and each node's share over time, with the faults "
        "marked, into FILE (needs the plot extra: matplotlib)",
    )
    _prometheus_option(demo)
    _bridge(demo)
    _verbosity(demo)
    return parser


def _bridge(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bridge",
        choices=BRIDGES,
        help="how trio reaches asyncpg (default: the library's default)",
    )


def _verbosity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="library logs at INFO (-vv: DEBUG); the default is WARNING, on stderr",
    )


def _scrub(message: str, argv: Sequence[str]) -> str:
    """Redact ``scheme://user:password@`` and any password given on the command line."""
    message = redact(message)
    for arg in argv:
        if "://" not in arg:
            continue
        try:
            password = parse_dsn(arg).password
        except ConfigError:
            continue
        if password:
            message = message.replace(password, "***")
    return message


def _fail(message: str, argv: Sequence[str], err: TextIO | None) -> int:
    if err is not None:
        try:
            err.write(f"{PROG}: error: {one_line(_scrub(message, argv))}\n")
            err.flush()
        except (OSError, ValueError):
            pass  # stderr is gone too: the exit code is all that is left
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if sys.stdout is None:
        # Started with stdout closed (``>&-``): there is nowhere to write.
        return _fail(
            "standard output is closed; send it to a file, a pipe or /dev/null",
            args_list,
            sys.stderr,
        )
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's lifetime
    if threading.current_thread() is threading.main_thread():
        stop_signals_as_sigint()
    try:
        args = build_parser().parse_args(args_list)
    except KeyboardInterrupt:
        return 0
    setup_logging(args.verbose)
    try:
        try:
            return _dispatch(args)
        except BaseExceptionGroup as group:
            # A lone error out of our nurseries is reported as itself.
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (PicodataError, CommandError) as exc:
        return _fail(str(exc) or type(exc).__name__, args_list, sys.stderr)
    except Exception as exc:
        from ..testing import LocalClusterError

        if isinstance(exc, LocalClusterError):
            return _fail(f"local cluster: {exc}", args_list, sys.stderr)
        if isinstance(exc, OSError):
            return _fail(f"{type(exc).__name__}: {exc}", args_list, sys.stderr)
        log.debug("unexpected error", exc_info=True)
        return _fail(
            f"{type(exc).__name__}: {exc} (unexpected: -vv shows the traceback)",
            args_list,
            sys.stderr,
        )


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)
    return leaves


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "monitor":
        from .monitor import MonitorOptions
        from .monitor import run as run_monitor

        options = MonitorOptions(
            dsn=args.dsn,
            json=args.json,
            once=args.once,
            check=args.check,
            interval=args.interval,
            connections=args.connections,
            refresh=args.refresh,
            grace=args.grace,
            events=args.events,
            bridge=args.bridge,
            prometheus=args.prometheus,
            dialect=args.dialect,
        )
        if options.prometheus is not None:
            if options.once or options.check:
                raise CommandError("--prometheus serves while the monitor runs: not with --once")
            _require("prometheus_client", "--prometheus")
        # Validate before any I/O: a bad DSN or option is an error line, not a traceback.
        ClusterConfig.create(options.dsn, **options.cluster_options())
        return trio.run(run_monitor, options, sys.stdout)
    from .demo import DemoOptions
    from .demo import run as run_demo

    options_demo = DemoOptions(
        duration=args.duration,
        nodes=args.nodes,
        live=not args.no_live and sys.stdout.isatty(),
        readers=args.readers,
        writers=args.writers,
        connections=args.connections,
        bucket=args.bucket,
        bridge=args.bridge,
        plot=args.plot,
        prometheus=args.prometheus,
    )
    if options_demo.prometheus is not None:
        _require("prometheus_client", "--prometheus")
    if options_demo.plot is not None:
        _check_plot_path(options_demo.plot)
    # The local cluster takes seconds to start: check the options first.
    ClusterConfig.create("postgresql://demo@127.0.0.1", **options_demo.cluster_options())
    return run_demo(options_demo, sys.stdout)


def _check_plot_path(path: Path) -> None:
    """Fail now, not after the run, when the plot cannot be written."""
    _require("matplotlib", "--plot")
    from .plot import supported_formats

    suffix = path.suffix.lower().lstrip(".")
    formats = supported_formats()
    if suffix not in formats:
        raise CommandError(
            f"--plot {str(path)!r}: unknown image format {suffix or '(none)'!r}; "
            f"use one of {', '.join(sorted(formats))}"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CommandError(f"--plot {str(path)!r}: no directory {str(parent)!r}")
    if not os.access(parent, os.W_OK):
        raise CommandError(f"--plot {str(path)!r}: the directory is not writable")
