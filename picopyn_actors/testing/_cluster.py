"""A local stand-in for a Picodata cluster, made of real PostgreSQL servers.

Each node is one PostgreSQL server that holds Picodata's system tables and
answers ``pico_instance_uuid()`` with its own uuid. In strict mode (the
default) a pgproto front (:mod:`._front`, a process of its own) listens on
the node's port and speaks Picodata's dialect to clients; the server's own
port is internal. The harness plays Picodata's governor: it keeps the
authoritative catalog in Python and writes it to every live server on each
change. A watchdog process (:mod:`._watchdog`) kills every server and front
if the process that owns the cluster dies without closing it.

The API is synchronous, so that fixtures, scripts and benchmarks can use it
directly; trio code calls it through :func:`trio.to_thread.run_sync`::

    from picopyn_actors.testing import LocalCluster

    with LocalCluster(nodes=3) as lc:
        dsn = lc.dsn            # the seed node's DSN
        lc.kill("i2")           # a crash: the catalog still says Online
        lc.start("i2")          # back, with its incarnation raised
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

import attrs

from ._catalog import (
    ADMIN_USER,
    STATE_NAMES,
    CatalogModel,
    NodeHandle,
    StateName,
    identity_sql,
    setup_sql,
)
from ._errors import LocalClusterError, UnknownNodeError
from ._front import DDL_NOTICE, SERVER_SETUP_SQL, bump_harness_ddl, new_stats_file, reset_gauges
from ._pg import (
    PgBinaries,
    RunAs,
    children_of,
    free_ports,
    log_tail,
    port_is_free,
    remove_orphan_shared_memory,
    signal_all,
    tool_env,
    wait_gone,
)
from ._statistics import FrontStatistics
from ._template import copy_data_dirs, pristine_data_dir

__all__ = ["LocalCluster"]

logger = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
DATABASE: Final = "postgres"
SUPERUSER: Final = "postgres"

_READY_POLL_INTERVAL: Final = 0.01
"""How often a starting server's ``postmaster.pid`` is read; PostgreSQL sends no event."""
_SQL_TIMEOUT: Final = 30.0
_SHUTDOWN_TIMEOUT: Final = 10.0
_FRONT_SCRIPT: Final = Path(__file__).with_name("_front.py")
_WATCHDOG_SCRIPT: Final = Path(__file__).with_name("_watchdog.py")
_DDL_HINT: Final = re.compile(
    r"(?:^|;)\s*(?:CREATE|ALTER|DROP|TRUNCATE|COMMENT|GRANT|REVOKE|DO)\b", re.I | re.M
)
"""A script that may change a schema: the fronts learn of it before and after it runs."""


@attrs.define(eq=False)
class _Server:
    """One PostgreSQL process and its directory (mutable, owned by the harness)."""

    node: NodeHandle
    data_dir: Path
    log_path: Path
    pg_port: int
    """The server's own port: the node's port without a front, internal with one."""
    stats_path: Path | None = None
    """The front's statistics file (strict mode only)."""
    process: subprocess.Popen[bytes] | None = None
    front: subprocess.Popen[bytes] | None = None
    paused: bool = False
    initialized: bool = False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def front_running(self) -> bool:
        return self.front is not None and self.front.poll() is None

    def live(self) -> bool:
        return self.running() and not self.paused

    def pids(self) -> list[int]:
        if not self.running():
            return []
        assert self.process is not None
        return [self.process.pid, *children_of(self.process.pid)]


class LocalCluster:
    """N PostgreSQL servers that impersonate the nodes of one Picodata cluster.

    Args:
        nodes: how many nodes start with the cluster (``i1`` ... ``iN``).
        strict: speak Picodata's dialect. A pgproto front before each server
            imposes Picodata's protocol rules (startup ``options``, no
            cancel, statement invalidation with 42999, stub transactions,
            ``SET`` ignored, COPY, LISTEN/NOTIFY and multi-statement strings
            rejected, ``pg_statement_max``; see docs/dialect.md), and the
            catalog fails asyncpg misuse as Picodata does: the login role is
            not a superuser, ``pg_type`` is unreadable and
            ``pg_advisory_unlock_all()`` is not executable. ``strict=False``
            is bare PostgreSQL, for benchmarks.
        pg_statement_max: named statements a node holds for all its clients
            together (strict mode); past it, Parse fails with "Statement
            storage is full".
        password: the login role's password; random when not given.
        replication_factor: nodes per replicaset; the first member of each
            replicaset is its master.
        bindir: directory of the PostgreSQL binaries (default:
            ``$PICOPYN_PG_BINDIR``, ``pg_config --bindir``, Debian's path).
        startup_timeout: seconds a server may take to accept connections.

    Use it as a context manager, or call :meth:`start_cluster` and
    :meth:`close`. Every server, every front and the temporary folder are
    gone when it closes, whatever happened in between; an ``atexit`` hook is
    a safety net, and a watchdog process cleans up within seconds if the
    owning process is killed (SIGKILL included). The methods are thread-safe
    (one operation at a time).
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        strict: bool = True,
        pg_statement_max: int = 100000,
        password: str | None = None,
        replication_factor: int = 1,
        bindir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        if not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"nodes must be a positive integer, got {nodes!r}")
        if not isinstance(replication_factor, int) or replication_factor < 1:
            raise ValueError(
                f"replication_factor must be a positive integer, got {replication_factor!r}"
            )
        if password is not None and (not isinstance(password, str) or not password):
            raise ValueError("password must be a non-empty string")
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {startup_timeout!r}")
        if (
            not isinstance(pg_statement_max, int)
            or isinstance(pg_statement_max, bool)
            or pg_statement_max < 1
        ):
            raise ValueError(
                f"pg_statement_max must be a positive integer, got {pg_statement_max!r}"
            )
        self._initial_nodes = nodes
        self._strict = strict
        self._pg_statement_max = pg_statement_max
        self._password = password if password is not None else secrets.token_urlsafe(18)
        self._bindir = bindir
        self._startup_timeout = startup_timeout
        self._model = CatalogModel(replication_factor=replication_factor)
        self._servers: dict[str, _Server] = {}
        self._lock = threading.RLock()
        self._base_dir: Path | None = None
        self._socket_dir: Path | None = None
        self._bins: PgBinaries | None = None
        self._run_as = RunAs(uid=None, gid=None)
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._state = "new"

    def __repr__(self) -> str:
        running = sum(s.running() for s in self._servers.values())
        return (
            f"<LocalCluster {self._state} nodes={len(self._servers)} running={running} "
            f"strict={self._strict}>"
        )

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        return self.start_cluster()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start_cluster(self) -> Self:
        """Create and start every node; return self.

        Raises:
            LocalClusterError: binaries missing, or a server failed to start
                (the message holds the tail of its log). Nothing is left
                running then.
        """
        with self._lock:
            if self._state != "new":
                raise LocalClusterError(
                    f"start_cluster() called on a cluster that is {self._state}"
                )
            self._state = "starting"
            atexit.register(self.close)
            started = time.monotonic()
            try:
                self._bins = PgBinaries.find(self._bindir)
                self._run_as = RunAs.detect()
                self._base_dir = Path(tempfile.mkdtemp(prefix="picopyn-localcluster-"))
                self._socket_dir = self._base_dir / "sockets"
                self._socket_dir.mkdir()
                (self._base_dir / "nodes").mkdir()
                self._run_as.chown_tree(self._base_dir)
                self._start_watchdog()
                count = self._initial_nodes
                ports = free_ports(HOST, 2 * count if self._strict else count)
                servers = self._new_servers(
                    [
                        self._model.add_instance(host=HOST, port=p, state="Online")
                        for p in ports[:count]
                    ],
                    ports[count:] if self._strict else ports,
                )
                for server in servers:
                    self._spawn(server)
                for server in servers:
                    self._wait_ready(server)
                self._initialize(servers)
            except BaseException:
                self.close()
                raise
            self._state = "running"
            logger.info(
                "local cluster of %d nodes up in %.2f s in %s",
                len(servers),
                time.monotonic() - started,
                self._base_dir,
            )
        return self

    def close(self) -> None:
        """Stop every server and remove the temporary folder. Idempotent.

        Paused servers are resumed first; servers that do not stop within a
        few seconds are killed.
        """
        with self._lock:
            if self._state == "closed":
                return
            try:
                self._shutdown_all()
            finally:
                if self._base_dir is not None:
                    shutil.rmtree(self._base_dir, ignore_errors=True)
                self._stop_watchdog()
                self._state = "closed"
                atexit.unregister(self.close)

    def _shutdown_all(self) -> None:
        servers = [s for s in self._servers.values() if s.running()]
        for server in servers:
            if server.paused:
                self._signal_server(server, signal.SIGCONT)
                server.paused = False
        fronts = [s for s in self._servers.values() if s.front_running()]
        for server in fronts:
            assert server.front is not None
            with contextlib.suppress(ProcessLookupError):
                server.front.send_signal(signal.SIGCONT)
                server.front.terminate()
        # SIGQUIT is PostgreSQL's immediate shutdown: no checkpoint, but the
        # postmaster still waits for its backends and removes its shared memory.
        for server in servers:
            assert server.process is not None
            with contextlib.suppress(ProcessLookupError):
                server.process.send_signal(signal.SIGQUIT)
        deadline = time.monotonic() + _SHUTDOWN_TIMEOUT
        for server in servers:
            assert server.process is not None
            try:
                server.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("node %s did not shut down; killing it", server.node.name)
                self._kill_server(server)
        for server in fronts:
            self._stop_front(server)
        for server in self._servers.values():
            if server.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.process.wait(timeout=_SHUTDOWN_TIMEOUT)
            remove_orphan_shared_memory(server.data_dir)

    # ------------------------------------------------------------------ properties

    @property
    def user(self) -> str:
        """The login role clients use."""
        return ADMIN_USER

    @property
    def password(self) -> str:
        """The login role's password."""
        return self._password

    @property
    def strict(self) -> bool:
        """Whether a pgproto front speaks Picodata's dialect before each server."""
        return self._strict

    @property
    def pg_statement_max(self) -> int:
        """Named statements each node holds for all its clients together (strict mode)."""
        return self._pg_statement_max

    @property
    def nodes(self) -> list[NodeHandle]:
        """Every node that ever joined, in join order (expelled ones included)."""
        with self._lock:
            return self._model.nodes()

    @property
    def dsn(self) -> str:
        """DSN of the first node, the seed."""
        nodes = self.nodes
        if not nodes:
            raise LocalClusterError("the cluster has not been started")
        return self.dsn_for(nodes[0].name)

    @property
    def dsns(self) -> list[str]:
        """DSNs of every node, in join order."""
        return [self.dsn_for(n.name) for n in self.nodes]

    @property
    def base_dir(self) -> Path:
        """The temporary folder that holds every node's data (gone after close)."""
        if self._base_dir is None:
            raise LocalClusterError("the cluster has not been started")
        return self._base_dir

    def node(self, name: str) -> NodeHandle:
        """The handle of node *name*.

        Raises:
            UnknownNodeError: no such node (the message lists the known ones).
        """
        return self._server(name).node

    def dsn_for(self, name: str) -> str:
        """``postgresql://admin:<password>@127.0.0.1:<port>/postgres`` for one node.

        The port is the node's pgproto port: its front in strict mode.
        """
        node = self.node(name)
        secret = quote(self._password, safe="")
        return f"postgresql://{ADMIN_USER}:{secret}@{node.host}:{node.port}/{DATABASE}"

    def is_running(self, name: str) -> bool:
        """Whether node *name*'s server process exists (paused or not)."""
        return self._server(name).running()

    def is_paused(self, name: str) -> bool:
        server = self._server(name)
        return server.running() and server.paused

    def server_pids(self, name: str) -> list[int]:
        """Process ids of node *name*'s postmaster and its backends (empty when down)."""
        with self._lock:
            return self._server(name).pids()

    def server_port(self, name: str) -> int:
        """The port of node *name*'s PostgreSQL server itself.

        In strict mode it is internal: clients use the node's port (its
        front); this one bypasses the dialect, for measurements. Without a
        front it is the node's port.
        """
        with self._lock:
            return self._server(name).pg_port

    def front_pid(self, name: str) -> int | None:
        """Process id of node *name*'s front, or None (down, or no front)."""
        with self._lock:
            server = self._server(name)
            if server.front is None or not server.front_running():
                return None
            return server.front.pid

    def front_statistics(self, name: str) -> FrontStatistics:
        """What node *name*'s front counted: logins, cancels, invalidations, rejections...

        Readable at any time, even while the node is paused or down.

        Raises:
            LocalClusterError: the cluster runs without fronts (``strict=False``).
        """
        with self._lock:
            server = self._server(name)
            if server.stats_path is None:
                raise LocalClusterError("the cluster has no fronts (strict=False)")
            return FrontStatistics.read(server.stats_path)

    def log_path(self, name: str) -> Path:
        """The server log of node *name* (gone after close)."""
        return self._server(name).log_path

    def catalog_rows(self) -> dict[str, list[dict[str, Any]]]:
        """The authoritative catalog: table name -> rows, valued as asyncpg returns them.

        JSON columns are ``str`` (``'["Online",1]'``), timestamps aware
        datetimes. Every live server holds exactly these rows.
        """
        with self._lock:
            return self._model.rows()

    def states(self, name: str) -> tuple[tuple[str, int], tuple[str, int]]:
        """``(current_state, target_state)`` of node *name*, e.g. ``(("Online", 2), ...)``."""
        with self._lock:
            self._server(name)
            return self._model.states(name)

    def execute_everywhere(self, sql: str) -> None:
        """Run *sql* on every live server as the login role (``admin``).

        Picodata's tables are global; the stand-in's are per server. Tests
        that need a table on every node create it with this.

        Raises:
            LocalClusterError: a server rejected the SQL (the message holds its error).
        """
        with self._lock:
            self._check_open()
            script = f"SET ROLE {ADMIN_USER};\n{sql}\n"
            self._run_sql([(s, script) for s in self._servers.values() if s.live()])

    # ------------------------------------------------------------------ faults and governor

    def kill(self, name: str) -> None:
        """Crash node *name*: SIGKILL its postmaster and every backend.

        The catalog does not change (Picodata notices a dead node only after
        30 s); clients must find out themselves.
        """
        with self._lock:
            server = self._running_server(name, "kill")
            self._kill_server(server)
            logger.info("node %s killed", name)

    def stop(self, name: str) -> None:
        """Shut node *name* down cleanly (fast mode), as an operator would.

        The governor first writes the target state Offline, then the server
        stops, then the current state becomes Offline; the incarnation stays.
        """
        with self._lock:
            server = self._running_server(name, "stop")
            self._model.set_target(name, "Offline", "shutdown")
            self._sync_catalog()
            if server.paused:
                self._signal_server(server, signal.SIGCONT)
                server.paused = False
            assert server.process is not None
            server.process.send_signal(signal.SIGINT)
            try:
                server.process.wait(timeout=_SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                logger.warning("node %s did not shut down in time; killing it", name)
                self._kill_server(server)
            self._forget(server.process)
            self._stop_front(server)
            self._model.apply_target(name)
            self._sync_catalog()
            logger.info("node %s stopped", name)

    def start(self, name: str) -> None:
        """Start node *name* again, on the same port with the same data.

        The catalog is written into it, then the governor sets the target
        state Online (incarnation + 1), then the current state. An expelled
        node starts but stays Expelled in the catalog.

        Raises:
            LocalClusterError: the node is running, its port is taken, or the
                server failed to start.
        """
        with self._lock:
            server = self._server(name)
            self._check_open()
            if server.running():
                raise LocalClusterError(f"node {name} is already running")
            self._stop_front(server)  # left over if the server died by itself
            for port in dict.fromkeys([server.node.port, server.pg_port]):
                if not port_is_free(HOST, port):
                    raise LocalClusterError(
                        f"cannot start node {name}: port {port} on {HOST} is taken "
                        "by another process"
                    )
            self._spawn(server)
            self._wait_ready(server)
            self._initialize([server])
            if self._model.states(name)[1][0] != "Expelled":
                self._governor(name, "Online", "restart")
            logger.info("node %s started", name)

    def pause(self, name: str) -> None:
        """Hang node *name*: SIGSTOP its front, server and backends.

        Sockets stay open and new TCP connections are still accepted (by the
        kernel), but nothing answers.
        """
        with self._lock:
            server = self._running_server(name, "pause")
            if server.paused:
                return
            self._signal_server(server, signal.SIGSTOP)
            server.paused = True
            logger.info("node %s paused", name)

    def resume(self, name: str) -> None:
        """Undo :meth:`pause` (SIGCONT) and write the catalog it missed."""
        with self._lock:
            server = self._running_server(name, "resume")
            if not server.paused:
                return
            self._signal_server(server, signal.SIGCONT)
            server.paused = False
            self._sync_catalog([server])
            logger.info("node %s resumed", name)

    def set_state(self, name: str, state: StateName) -> None:
        """Change node *name*'s state in the catalog, as the governor does.

        The target state changes first, then the current state; ``Online``
        raises the incarnation. The server process is not touched.
        """
        if state not in STATE_NAMES:
            raise ValueError(f"state must be one of {', '.join(STATE_NAMES)}, got {state!r}")
        with self._lock:
            self._server(name)
            self._check_open()
            self._governor(name, state, "set_state")

    def add_node(self) -> NodeHandle:
        """Start a new node and let it join.

        The catalog first lists it as ``["Offline",0]``, then its target state
        becomes ``["Online",1]``, then its current state.
        """
        with self._lock:
            self._check_open()
            port, *pg_port = free_ports(HOST, 2 if self._strict else 1)
            (server,) = self._new_servers(
                [self._model.add_instance(host=HOST, port=port)], pg_port or [port]
            )
            self._spawn(server)
            self._wait_ready(server)
            self._initialize([server])  # it holds the catalog that lists it Offline ...
            self._sync_catalog(
                [s for s in self._servers.values() if s is not server]
            )  # ... so do all
            self._governor(server.node.name, "Online", "join")
            logger.info("node %s joined on port %d", server.node.name, port)
            return server.node

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._state != "running":
            raise LocalClusterError(f"the cluster is {self._state}")

    def _server(self, name: str) -> _Server:
        server = self._servers.get(name)
        if server is None:
            raise UnknownNodeError(name, list(self._servers))
        return server

    def _running_server(self, name: str, action: str) -> _Server:
        server = self._server(name)
        self._check_open()
        if not server.running():
            raise LocalClusterError(f"cannot {action} node {name}: it is not running")
        return server

    def _governor(self, name: str, state: StateName, reason: str) -> None:
        self._model.set_target(name, state, reason)
        self._sync_catalog()
        self._model.apply_target(name)
        self._sync_catalog()

    def _new_servers(
        self, nodes: Sequence[NodeHandle], pg_ports: Sequence[int] | None = None
    ) -> list[_Server]:
        """Give each node a folder with a copy of the pristine data directory.

        *pg_ports* are the servers' own ports; by default the nodes' ports
        without a front, free ports with one.
        """
        assert self._bins is not None
        if pg_ports is None:
            pg_ports = free_ports(HOST, len(nodes)) if self._strict else [n.port for n in nodes]
        pristine = pristine_data_dir(self._bins, self._run_as)
        servers = []
        for node, pg_port in zip(nodes, pg_ports, strict=True):
            node_dir = self.base_dir / "nodes" / node.name
            node_dir.mkdir()
            self._run_as.chown(node_dir)
            server = _Server(
                node=node,
                data_dir=node_dir / "data",
                log_path=node_dir / "postgres.log",
                pg_port=pg_port,
            )
            if self._strict:
                server.stats_path = node_dir / "front.stats"
                new_stats_file(server.stats_path)
            self._servers[node.name] = server
            servers.append(server)
        copy_data_dirs(pristine, [s.data_dir for s in servers], self._run_as, self.base_dir)
        return servers

    def _spawn(self, server: _Server) -> None:
        assert self._bins is not None and self._socket_dir is not None
        args = [
            str(self._bins.postgres),
            "-D", str(server.data_dir),
            "-p", str(server.pg_port),
            "-k", str(self._socket_dir),
        ]  # fmt: skip
        with open(server.log_path, "ab") as log:
            server.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._base_dir,
                env=tool_env(self.base_dir),
                start_new_session=True,
                **self._run_as.popen_kwargs(),
            )
        server.paused = False
        self._watch(server.process, "server")
        try:
            self._spawn_front(server)
        except BaseException:
            self._kill_server(server)
            raise

    def _spawn_front(self, server: _Server) -> None:
        """Start node *server*'s front on the node's port (strict mode; else nothing).

        The front listens at once (on a socket bound here); until its server is
        ready, a client that logs in gets the server's own refusal.
        """
        if server.stats_path is None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((HOST, server.node.port))
            except OSError as exc:
                raise LocalClusterError(
                    f"cannot start the front of node {server.node.name}: port "
                    f"{server.node.port} on {HOST} is taken ({exc.strerror})"
                ) from None
            listener.listen(128)
            args = [
                sys.executable, "-I", "-S", str(_FRONT_SCRIPT),
                "--listen-fd", str(listener.fileno()),
                "--upstream-host", HOST,
                "--upstream-port", str(server.pg_port),
                "--stats", str(server.stats_path),
                "--statement-max", str(self._pg_statement_max),
                "--name", server.node.name,
            ]  # fmt: skip
            with open(server.stats_path.with_name("front.log"), "ab") as log:
                server.front = subprocess.Popen(
                    args,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    cwd=self._base_dir,
                    pass_fds=(listener.fileno(),),
                    start_new_session=True,
                )
        finally:
            listener.close()
        self._watch(server.front, "front")

    def _wait_front_ready(self, server: _Server) -> None:
        """Wait until the front says ``ready`` on its stdout (a pipe: no polling)."""
        front = server.front
        if front is None:
            return
        assert front.stdout is not None
        deadline = time.monotonic() + self._startup_timeout
        poller = select.poll()  # not select(): the test process may hold over 1024 files
        poller.register(front.stdout.fileno(), select.POLLIN)
        line = b""
        while not line.endswith(b"\n"):
            remaining = max(0.0, deadline - time.monotonic())
            readable = poller.poll(remaining * 1000)
            chunk = os.read(front.stdout.fileno(), 64) if readable else b""
            if not chunk:
                self._stop_front(server)
                why = "exited" if readable else f"did not start within {self._startup_timeout} s"
                log = log_tail(server.log_path.with_name("front.log"))
                raise LocalClusterError(
                    f"the front of node {server.node.name} {why}; end of its log:\n{log}"
                )
            line += chunk
        front.stdout.close()

    def _stop_front(self, server: _Server) -> None:
        """Stop node *server*'s front (SIGTERM, then SIGKILL) and zero its gauges."""
        front = server.front
        if front is None:
            return
        if front.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                front.send_signal(signal.SIGCONT)
                front.terminate()
            try:
                front.wait(timeout=_SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                logger.warning("the front of node %s did not stop; killing it", server.node.name)
                front.kill()
                front.wait()
        self._close_front_pipes(server)

    def _close_front_pipes(self, server: _Server) -> None:
        front = server.front
        if front is None:
            return
        for pipe in (front.stdin, front.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._forget(front)
        server.front = None
        if server.stats_path is not None:
            reset_gauges(server.stats_path)

    def _start_watchdog(self) -> None:
        """Start the process that cleans up if this one dies (see :mod:`._watchdog`)."""
        self._watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_WATCHDOG_SCRIPT), str(self.base_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _tell_watchdog(self, line: str) -> None:
        watchdog = self._watchdog
        if watchdog is None or watchdog.stdin is None:
            return
        try:
            watchdog.stdin.write(line.encode() + b"\n")
            watchdog.stdin.flush()
        except OSError:
            logger.warning("the watchdog of %s is gone; nothing cleans up after a crash", self)
            self._watchdog = None

    def _watch(self, process: subprocess.Popen[bytes], kind: str) -> None:
        self._tell_watchdog(f"watch {process.pid} {kind}")

    def _forget(self, process: subprocess.Popen[bytes] | None) -> None:
        if process is not None:
            self._tell_watchdog(f"forget {process.pid}")

    def _stop_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        if watchdog.stdin is not None:
            with contextlib.suppress(OSError):
                watchdog.stdin.write(b"done\n")
                watchdog.stdin.close()
        try:
            watchdog.wait(timeout=_SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()

    def _wait_ready(self, server: _Server) -> None:
        """Wait until the postmaster says it accepts connections, then its front."""
        assert server.process is not None
        pid_file = server.data_dir / "postmaster.pid"
        deadline = time.monotonic() + self._startup_timeout
        while True:
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                # Line 1 is the pid (a stale file may remain after a kill), line 8 the status.
                if (
                    len(lines) >= 8
                    and lines[0] == str(server.process.pid)
                    and lines[7].strip() == "ready"
                ):
                    break
            if server.process.poll() is not None:
                self._forget(server.process)
                self._stop_front(server)
                raise LocalClusterError(
                    f"node {server.node.name} failed to start (exit {server.process.returncode}); "
                    f"end of its log:\n{self._log_tail(server)}"
                )
            if time.monotonic() > deadline:
                self._kill_server(server)
                raise LocalClusterError(
                    f"node {server.node.name} did not accept connections within "
                    f"{self._startup_timeout} s; end of its log:\n{self._log_tail(server)}"
                )
            time.sleep(_READY_POLL_INTERVAL)
        self._wait_front_ready(server)

    def _initialize(self, servers: Sequence[_Server]) -> None:
        """Write the catalog into freshly started servers, after the first-start set-up."""
        catalog = self._model.sync_sql()
        scripts = []
        for server in servers:
            sql = catalog
            if not server.initialized:
                sql = "\n".join(
                    [
                        setup_sql(password=self._password, strict=self._strict),
                        SERVER_SETUP_SQL if self._strict else "",
                        identity_sql(server.node, leader_raft_id=self._model.leader_raft_id),
                        catalog,
                    ]
                )
            scripts.append((server, sql))
        self._run_sql(scripts)
        for server in servers:
            server.initialized = True

    def _sync_catalog(self, servers: Sequence[_Server] | None = None) -> None:
        """Write the model into *servers* (default: every live server)."""
        candidates = self._servers.values() if servers is None else servers
        catalog = self._model.sync_sql()
        self._run_sql([(s, catalog) for s in candidates if s.live()])

    def _psql(self, server: _Server, *options: str, stdout: int) -> subprocess.Popen[bytes]:
        """``psql`` as superuser on *server*'s own socket (past its front), script on stdin."""
        assert self._bins is not None and self._socket_dir is not None
        args = [
            str(self._bins.psql), "-X", "-q", "-w", *options,
            "-v", "ON_ERROR_STOP=1",
            "-h", str(self._socket_dir),
            "-p", str(server.pg_port),
            "-U", SUPERUSER,
            "-d", DATABASE,
        ]  # fmt: skip
        return subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=subprocess.PIPE,
            cwd=self._base_dir,
            env={**tool_env(self.base_dir), "PGCONNECT_TIMEOUT": "10"},
            **self._run_as.popen_kwargs(),
        )

    def _run_sql(self, scripts: Sequence[tuple[_Server, str]]) -> None:
        """Run each script with ``psql`` as superuser over its server's unix socket, in parallel.

        A script that changes a schema (it looks like DDL, or the server's
        event trigger reported DDL) counts as a schema change for the node's
        front, before and after it runs, so that a statement parsed before it
        is invalidated whatever the timing.
        """
        assert self._bins is not None and self._socket_dir is not None
        procs = []
        for server, sql in scripts:
            if server.stats_path is not None and _DDL_HINT.search(sql):
                bump_harness_ddl(server.stats_path)
            proc = self._psql(server, "-f", "-", stdout=subprocess.DEVNULL)
            procs.append((server, sql, proc))
        failures = []
        for server, sql, proc in procs:
            try:
                _, err = proc.communicate(sql.encode(), timeout=_SQL_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                failures.append(f"node {server.node.name}: psql timed out")
                continue
            if server.stats_path is not None and (
                _DDL_HINT.search(sql) or DDL_NOTICE.encode() in err
            ):
                bump_harness_ddl(server.stats_path)
            if proc.returncode != 0:
                message = self._redact(err.decode("utf-8", "replace").strip())
                failures.append(f"node {server.node.name}: {message}")
        if failures:
            raise LocalClusterError("psql failed:\n" + "\n".join(failures))

    def _redact(self, text: str) -> str:
        """*text* with the password blanked out (a failed statement may quote it)."""
        return text.replace(self._password, "***")

    def _log_tail(self, server: _Server) -> str:
        return self._redact(log_tail(server.log_path))

    def _signal_server(self, server: _Server, sig: signal.Signals) -> None:
        """Signal the front, the postmaster and its backends (each backend is its own session).

        The front is stopped first and continued last, so that no client
        sees a front that answers before its server does.
        """
        assert server.process is not None
        pid = server.process.pid
        front = [server.front.pid] if server.front_running() and server.front else []
        if sig == signal.SIGCONT:
            signal_all([*children_of(pid), pid], sig)
            signal_all(front, sig)
        else:
            signal_all(front, sig)
            # Stop the postmaster first so that it forks nothing we would miss.
            signal_all([pid], signal.SIGSTOP)
            signal_all([*children_of(pid), pid], sig)

    def _kill_server(self, server: _Server) -> None:
        """SIGKILL the front (it stops listening at once), the postmaster and its backends."""
        assert server.process is not None
        if server.front is not None:
            with contextlib.suppress(ProcessLookupError):
                server.front.kill()
            server.front.wait()
            self._close_front_pipes(server)
        pid = server.process.pid
        signal_all([pid], signal.SIGSTOP)
        backends = children_of(pid)
        signal_all([*backends, pid], signal.SIGKILL)
        server.process.wait()
        self._forget(server.process)
        server.paused = False
        if not wait_gone(backends, timeout=5.0):
            logger.warning("backends of node %s outlived SIGKILL", server.node.name)

    # ------------------------------------------------------------------ routing and catalog edits
    # Sharded tables, the bucket map and master switches are governor changes:
    # like the node changes above, each is written to every live server. The
    # per-node edits below let a test bend one server's catalog; the next
    # governor change rewrites it unless that server's catalog is held.

    @property
    def bucket_count(self) -> int:
        """``_pico_tier.bucket_count`` of the one tier, ``default`` (3000)."""
        return self._model.bucket_count

    def create_sharded_table(
        self, name: str, columns: Mapping[str, str], key: Sequence[str], tier: str = "default"
    ) -> None:
        """Create a sharded table on every node and record it in ``_pico_table``.

        Args:
            name: a plain SQL identifier.
            columns: column name -> Picodata type (``integer``, ``unsigned``,
                ``string``, ``double``, ``boolean``, ``decimal``, ``uuid``,
                ``datetime``, or an alias such as ``int`` or ``text``), in order.
            key: the sharding key columns, in key order; they are also the
                primary key and NOT NULL.
            tier: must be ``default``, the stand-in's only tier.

        Each server gets the table (owned by the login role) plus a
        ``bucket_id`` column, which the stand-in leaves NULL: Picodata computes
        it, the stand-in does not. ``_pico_table`` lists the table as
        ``{"ShardedImplicitly": [key, "murmur3", tier]}``, with ``bucket_id``
        (``unsigned``) in its format right after the key columns, as Picodata
        does. Nodes that join or start later get the table from the governor.

        Raises:
            ValueError: bad name, columns, key or tier.
            LocalClusterError: a server refused the table (say it exists).
        """
        if isinstance(key, str):
            raise ValueError(f"key must be a non-empty list of distinct column names, got {key!r}")
        with self._lock:
            self._check_open()
            self._model.add_table(name, list(columns.items()), list(key), tier)
            try:
                sql = self._model.create_table_sql(name)
                self._run_sql([(s, sql) for s in self._servers.values() if s.live()])
            except BaseException:
                self._model.forget_table(name)
                raise
            self._sync_catalog()
            logger.info("sharded table %s created, key (%s)", name, ", ".join(key))

    def table_rows(self) -> list[dict[str, Any]]:
        """``_pico_table`` as the model holds it, valued as asyncpg returns it (json as ``str``)."""
        with self._lock:
            return self._model.table_rows()

    def bucket_ranges(self) -> list[dict[str, Any]]:
        """What ``SELECT _pico_bucket('default')`` answers now, decoded from JSON."""
        with self._lock:
            return self._model.bucket_json()

    def bucket_replicaset(self, bucket_id: int) -> str:
        """Name of the replicaset that owns *bucket_id* (``r1``, ``r2`` ...)."""
        with self._lock:
            return self._model.owner_of(bucket_id)

    def move_buckets(self, start: int, end: int, replicaset: str) -> None:
        """Move buckets ``start..end`` (inclusive) to *replicaset*, as vshard's rebalancer would.

        The move is atomic: the new map is written to every live server at
        once (Picodata's ``_pico_bucket`` never shows a range in transfer).

        Raises:
            ValueError: the range is not within ``1..bucket_count``.
            LocalClusterError: no such replicaset.
        """
        with self._lock:
            self._check_open()
            self._known_replicaset(replicaset)
            self._model.move_buckets(start, end, replicaset)
            self._sync_catalog()
            logger.info("buckets %d..%d moved to %s", start, end, replicaset)

    def rebalance(self) -> None:
        """Spread the buckets evenly, in contiguous ranges, over the replicasets with a
        member that is not expelled (say, after :meth:`add_node` made a new one)."""
        with self._lock:
            self._check_open()
            self._model.rebalance()
            self._sync_catalog()
            logger.info("buckets rebalanced over %d replicasets", len(self._model.bucket_ranges()))

    def set_master(self, replicaset: str, name: str) -> None:
        """Switch *replicaset*'s master to node *name*, as the governor does.

        ``_pico_replicaset.target_master_name`` changes first, then
        ``current_master_name``; each step is written to every live server.

        Raises:
            UnknownNodeError: no node *name*.
            LocalClusterError: no such replicaset, *name* is not one of its
                members, or *name* is not Online.
        """
        with self._lock:
            self._check_open()
            self._server(name)
            _, members = self._known_replicaset(replicaset)
            if name not in members:
                raise LocalClusterError(
                    f"node {name} is not a member of replicaset {replicaset} ({', '.join(members)})"
                )
            if self._model.states(name)[0][0] != "Online":
                raise LocalClusterError(f"node {name} is not Online; it cannot become master")
            self._model.set_target_master(replicaset, name)
            self._sync_catalog()
            self._model.apply_target_master(replicaset)
            self._sync_catalog()
            logger.info("replicaset %s master is now %s", replicaset, name)

    def set_rebalance_in_progress(self, on: bool = True) -> None:
        """Make ``_pico_bucket()`` fail on every node (or stop failing), as during a rebalance.

        The error is vshard's: ``_pico_bucket: Bucket 1 cannot be found. Is
        rebalancing in progress?`` (SQLSTATE XX000). The map itself is kept.
        """
        with self._lock:
            self._check_open()
            self._model.set_rebalance_in_progress(on)
            self._sync_catalog()

    def execute_on(self, name: str, sql: str) -> None:
        """Run *sql* on node *name* only, as the PostgreSQL superuser.

        This is how a test edits one server's copy of the catalog (say,
        ``DELETE FROM _pico_instance``) to play a lagging or broken node. The
        edit lasts until the next governor change (any state change, master
        switch, bucket move, join or restart), which rewrites the catalog of
        every live server; :meth:`hold_catalog` makes it stick.

        Raises:
            LocalClusterError: the node is down or paused, or the server
                rejected the SQL (the message holds its error).
        """
        with self._lock:
            server = self._editable_server(name, "execute SQL on")
            self._run_sql([(server, sql)])

    def hold_catalog(self, name: str) -> None:
        """Stop the governor from writing node *name*'s catalog until :meth:`release_catalog`.

        The server keeps whatever catalog it has (edits by :meth:`execute_on`
        included), even across a restart of the node; sharded tables are still
        created on it. The hold lives in the server, so it survives this call's
        process only as long as the server's data does.
        """
        with self._lock:
            server = self._editable_server(name, "hold the catalog of")
            self._run_sql([(server, self._model.hold_statement(True))])

    def release_catalog(self, name: str) -> None:
        """Undo :meth:`hold_catalog` and write the governor's catalog into node *name* now."""
        with self._lock:
            server = self._editable_server(name, "release the catalog of")
            self._run_sql([(server, self._model.hold_statement(False))])
            self._sync_catalog([server])

    def set_identity(self, name: str, uuid: str | None) -> None:
        """Make node *name*'s server answer ``pico_instance_uuid()`` (and
        ``instance_uuid()``) with *uuid*, a stranger to its catalog row; ``None``
        restores its own. The catalog does not change; the answer survives
        restarts of the node."""
        if uuid is not None and (not isinstance(uuid, str) or not uuid):
            raise ValueError(f"uuid must be a non-empty string or None, got {uuid!r}")
        with self._lock:
            server = self._editable_server(name, "change the identity of")
            answer = server.node.uuid if uuid is None else uuid
            self._run_sql([(server, self._model.answer_uuid_statement(answer))])

    def lock_catalog(
        self, name: str, table: str = "_pico_instance", *, timeout: float = 10.0
    ) -> CatalogLock:
        """Hold an ACCESS EXCLUSIVE lock on *table* of node *name* until released.

        Every reader of that table on that server waits, as behind a stuck
        transaction. The node's catalog is held meanwhile (:meth:`hold_catalog`)
        so that the governor does not wait too; releasing the lock writes the
        governor's catalog into it. Use it as a context manager or call
        :meth:`CatalogLock.release`::

            with lc.lock_catalog("i2"):
                ...  # discovery on i2 blocks here

        Raises:
            ValueError: *table* is not a plain identifier.
            LocalClusterError: the node is down or paused, or the lock was not
                granted within *timeout* seconds.
        """
        self._model.check_identifier(table, "table")
        with self._lock:
            server = self._editable_server(name, "lock the catalog of")
            self._run_sql([(server, self._model.hold_statement(True))])
            try:
                process = self._open_lock_session(server, table, timeout)
            except BaseException:
                self._run_sql([(server, self._model.hold_statement(False))])
                raise
            logger.info("node %s: %s locked", name, table)
            return CatalogLock(node=name, table=table, process=process, on_release=self._after_lock)

    def _after_lock(self, name: str) -> None:
        with self._lock:
            server = self._server(name)
            if self._state == "running" and server.live():
                self._run_sql([(server, self._model.hold_statement(False))])
                self._sync_catalog([server])

    def _known_replicaset(self, replicaset: str) -> tuple[str, list[str]]:
        try:
            return self._model.replicaset_of(replicaset)
        except KeyError:
            known = ", ".join(self._model.replicaset_names())
            raise LocalClusterError(
                f"unknown replicaset {replicaset!r}; the cluster's replicasets are: {known}"
            ) from None

    def _editable_server(self, name: str, action: str) -> _Server:
        server = self._running_server(name, action)
        if server.paused:
            raise LocalClusterError(f"cannot {action} node {name}: it is paused")
        return server

    def _open_lock_session(
        self, server: _Server, table: str, timeout: float
    ) -> subprocess.Popen[bytes]:
        """A psql session that holds the lock; returns once the server granted it."""
        assert self._bins is not None and self._socket_dir is not None
        process = self._psql(server, "-A", "-t", stdout=subprocess.PIPE)
        assert process.stdin is not None and process.stdout is not None
        script = (
            f"SET lock_timeout = '{max(1, int(timeout * 1000))}ms';\n"
            "BEGIN;\n"
            f'LOCK TABLE public."{table}" IN ACCESS EXCLUSIVE MODE;\n'
            f"SELECT '{_LOCKED_MARK}';\n"
        )
        process.stdin.write(script.encode())
        process.stdin.flush()
        # psql prints the mark once the lock is granted, or exits on an error
        # (ON_ERROR_STOP): either way the pipe tells, no polling needed.
        for line in process.stdout:
            if line.strip() == _LOCKED_MARK.encode():
                return process
        _, err = process.communicate(timeout=_SQL_TIMEOUT)
        message = self._redact(err.decode("utf-8", "replace").strip())
        raise LocalClusterError(
            f"could not lock {table} on node {server.node.name}: {message or 'psql exited'}"
        )


_LOCKED_MARK: Final = "picopyn-catalog-locked"


@attrs.define(eq=False)
class CatalogLock:
    """A lock taken by :meth:`LocalCluster.lock_catalog`, held until :meth:`release`.

    Release it once (more calls do nothing); as a context manager it is
    released on exit.
    """

    node: str
    """The node whose table is locked."""
    table: str
    _process: subprocess.Popen[bytes] = attrs.field(alias="process", repr=False)
    _on_release: Callable[[str], None] = attrs.field(alias="on_release", repr=False)
    _released: bool = attrs.field(init=False, default=False)

    @property
    def held(self) -> bool:
        """Whether the lock is still held."""
        return not self._released and self._process.poll() is None

    def release(self) -> None:
        """End the locking transaction, then let the governor write the node's catalog."""
        if self._released:
            return
        self._released = True
        try:
            self._process.communicate(b"ROLLBACK;\n", timeout=_SQL_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
        finally:
            self._on_release(self.node)
        logger.info("node %s: %s unlocked", self.node, self.table)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
