"""PostgreSQL binaries and Linux process helpers for the stand-in cluster.

Everything here is synchronous test tooling: it finds the PostgreSQL
binaries, runs them as an unprivileged OS user when we are root, and walks
``/proc`` to find a server's backends. Linux only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from ._errors import LocalClusterError

__all__ = [
    "PgBinaries",
    "RunAs",
    "children_of",
    "free_ports",
    "is_alive",
    "log_tail",
    "port_is_free",
    "remove_orphan_shared_memory",
    "signal_all",
    "tool_env",
    "wait_gone",
]

logger = logging.getLogger(__name__)

BINDIR_ENV = "PICOPYN_PG_BINDIR"
"""Environment variable that points at a PostgreSQL ``bin`` directory."""

_DEBIAN_BINDIR = Path("/usr/lib/postgresql/15/bin")
_INSTALL_HINT = (
    "install PostgreSQL 15 (as root: apt-get install -y postgresql) "
    f"or set {BINDIR_ENV} to the directory holding initdb, postgres and psql"
)
_GONE_POLL_INTERVAL = 0.005
"""How often :func:`wait_gone` looks at ``/proc``; the kernel has no event for it."""


def _has_server(bindir: Path) -> bool:
    return (bindir / "postgres").is_file() and (bindir / "initdb").is_file()


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def _candidate_bindirs() -> Iterable[Path]:
    from_pg_config = _pg_config_bindir()
    if from_pg_config is not None:
        yield from_pg_config
    yield _DEBIAN_BINDIR

    def version(path: str) -> int:
        name = Path(path).parent.name
        return int(name) if name.isdigit() else 0

    for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        yield Path(path)


@attrs.frozen
class PgBinaries:
    """Paths of the PostgreSQL programs the harness runs."""

    bindir: Path
    initdb: Path
    postgres: Path
    psql: Path

    @classmethod
    def find(cls, bindir: str | os.PathLike[str] | None = None) -> PgBinaries:
        """Locate the binaries.

        Looks at *bindir*, then ``$PICOPYN_PG_BINDIR``, then ``pg_config
        --bindir``, then Debian's ``/usr/lib/postgresql/<version>/bin``.

        Raises:
            LocalClusterError: no directory holds ``postgres`` and ``initdb``.
        """
        explicit = bindir if bindir is not None else os.environ.get(BINDIR_ENV)
        if explicit:
            chosen = Path(explicit)
            if not _has_server(chosen):
                raise LocalClusterError(
                    f"no PostgreSQL server binaries (postgres, initdb) in {chosen}: {_INSTALL_HINT}"
                )
        else:
            found = next((d for d in _candidate_bindirs() if _has_server(d)), None)
            if found is None:
                raise LocalClusterError(f"PostgreSQL server binaries not found: {_INSTALL_HINT}")
            chosen = found
        psql = chosen / "psql"
        if not psql.is_file():
            on_path = shutil.which("psql")
            if on_path is None:
                raise LocalClusterError(f"the psql client was not found: {_INSTALL_HINT}")
            psql = Path(on_path)
        return cls(bindir=chosen, initdb=chosen / "initdb", postgres=chosen / "postgres", psql=psql)


@attrs.frozen
class RunAs:
    """The OS identity the PostgreSQL programs run under.

    PostgreSQL refuses to run as root, so when we are root the programs run as
    the unprivileged ``postgres`` user; otherwise they run as ourselves.
    """

    uid: int | None
    gid: int | None

    @classmethod
    def detect(cls, user: str = "postgres") -> RunAs:
        if os.geteuid() != 0:
            return cls(uid=None, gid=None)
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise LocalClusterError(
                f"running as root, but there is no {user!r} OS user to run PostgreSQL as "
                "(PostgreSQL refuses root); create one or run as a normal user"
            ) from None
        return cls(uid=entry.pw_uid, gid=entry.pw_gid)

    def popen_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`subprocess.Popen` that drop privileges."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        """Give *path* (not recursively) to the PostgreSQL user."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def chown_tree(self, root: Path) -> None:
        """Give *root* and everything below it to the PostgreSQL user."""
        if self.uid is None or self.gid is None:
            return
        os.chown(root, self.uid, self.gid)
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                os.chown(os.path.join(dirpath, name), self.uid, self.gid, follow_symlinks=False)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, ppid)`` of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or ")".
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1])


def is_alive(pid: int) -> bool:
    """Whether *pid* is a live process (a zombie counts as gone)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """Live child processes of *pid* (PostgreSQL backends run in their own sessions)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] == pid and stat[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    """Send *sig* to each pid, ignoring the ones already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    """Wait until none of *pids* is alive; False if some still are at *timeout*."""
    remaining = list(pids)
    deadline = time.monotonic() + timeout
    while remaining:
        remaining = [pid for pid in remaining if is_alive(pid)]
        if not remaining:
            break
        if time.monotonic() > deadline:
            return False
        time.sleep(_GONE_POLL_INTERVAL)
    return True


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on *host*:*port* now (as PostgreSQL binds, SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(host: str, count: int) -> list[int]:
    """*count* distinct ports that are free on *host* right now, below the
    kernel's ephemeral range.

    A server binds its port a moment after it is chosen. A port from the
    ephemeral range (what binding to port 0 gives) can be taken meanwhile as
    the local port of any client socket on the machine, and the server then
    fails to start; clients never take a port below that range. Ports are
    drawn at random there (another process choosing at the same moment is
    unlikely to draw the same), each checked free; if none can be found
    there, the kernel's choice is the fallback.
    """
    pool = range(_LOWEST_PORT, ephemeral_start())
    chosen: list[int] = []
    for port in random.sample(pool, min(len(pool), 64 * count)):
        if len(chosen) == count:
            break
        if port_is_free(host, port):
            chosen.append(port)
    return chosen if len(chosen) == count else _kernel_ports(host, count)


def ephemeral_start() -> int:
    """The lowest local port the kernel gives client sockets (Linux's default if unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _EPHEMERAL_START


def _kernel_ports(host: str, count: int) -> list[int]:
    """*count* distinct ports the kernel calls free on *host* now (its ephemeral range)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


# Where free_ports draws from: above the usual services' ports, up to the
# ephemeral range (Linux's default start when it cannot be read).
_LOWEST_PORT = 20000
_EPHEMERAL_START = 32768


def log_tail(path: Path, lines: int = 20) -> str:
    """The last *lines* lines of a log file, or a note that there is none."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def _shm_segments() -> dict[int, tuple[int, int]]:
    """``{shmid: (key, nattch)}`` of the System V shared memory segments."""
    segments = {}
    try:
        with open("/proc/sysvipc/shm") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                segments[int(fields[1])] = (int(fields[0]), int(fields[6]))
    except OSError:
        pass
    return segments


def remove_orphan_shared_memory(data_dir: Path) -> None:
    """Remove the System V segment a SIGKILLed postmaster left behind.

    PostgreSQL keeps a small System V segment as an interlock and records its
    key and id in ``postmaster.pid``. A clean or immediate shutdown removes it;
    a SIGKILL does not. The segment is removed only when it still matches the
    recorded key and nothing is attached to it.
    """
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        key, shmid = (int(v) for v in lines[6].split())
    except (OSError, IndexError, ValueError):
        return
    if _shm_segments().get(shmid) != (key, 0):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    ipc_rmid = 0
    if libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(ipc_rmid), None) != 0:
        logger.warning(
            "could not remove shared memory segment %d: %s",
            shmid,
            os.strerror(ctypes.get_errno()),
        )


def tool_env(home: Path) -> dict[str, str]:
    """Environment for PostgreSQL programs: no inherited ``PG*`` settings, C locale, UTC."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", TZ="UTC", PGTZ="UTC", HOME=str(home))
    return env
