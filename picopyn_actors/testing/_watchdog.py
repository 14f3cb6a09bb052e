"""The stand-in cluster's watchdog: no server or front outlives the process that owns them.

:class:`~picopyn_actors.testing.LocalCluster` starts one watchdog per
cluster, as ``python -I -S _watchdog.py`` (standard library only), and keeps
the write end of its standard input. Over that pipe it announces, one line
each:

- ``watch <pid> server`` or ``watch <pid> front``: a process to clean up;
- ``forget <pid>``: that process is gone, by the harness's own hand;
- ``done``: the cluster closed cleanly; exit without touching anything.

When the pipe reaches end of file without ``done``, the owner died (SIGKILL
included, whatever thread started the cluster): the watchdog stops and kills
every watched process (a server's backends too), removes the System V
segments the servers left, then the cluster's folder (its only argument).

Each pid is checked against the start time it had when it was announced, so
a recycled pid is never killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import sys
import time
from pathlib import Path

__all__ = ["main"]

_GONE_TIMEOUT = 5.0
_GONE_POLL_INTERVAL = 0.01
"""How often the watchdog looks at ``/proc`` while processes die; the kernel has no event."""


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _remove_segments(base: Path) -> None:
    """Remove each server's System V segment when nothing is attached to it any more."""
    segments = {}
    with contextlib.suppress(OSError), open("/proc/sysvipc/shm") as f:
        next(f, None)
        for line in f:
            fields = line.split()
            segments[int(fields[1])] = (int(fields[0]), int(fields[6]))
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    for pid_file in base.glob("nodes/*/data/postmaster.pid"):
        try:
            key, shmid = (int(v) for v in pid_file.read_text().splitlines()[6].split())
        except (OSError, IndexError, ValueError):
            continue
        if segments.get(shmid) == (key, 0):
            libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(0), None)  # IPC_RMID


def _clean_up(base: Path, watched: dict[int, tuple[str, str]]) -> None:
    live = {pid: kind for pid, (kind, start) in watched.items() if _start_time(pid) == start}
    servers = [pid for pid, kind in live.items() if kind == "server"]
    # Stop the postmasters first so that they fork nothing we would miss.
    _signal(servers, signal.SIGSTOP)
    victims = list(live)
    for pid in servers:
        victims.extend(_children(pid))
    _signal(victims, signal.SIGKILL)
    deadline = time.monotonic() + _GONE_TIMEOUT
    while any(_alive(pid) for pid in victims) and time.monotonic() < deadline:
        time.sleep(_GONE_POLL_INTERVAL)
    _remove_segments(base)
    shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Watch until standard input closes; clean up unless told ``done`` first."""
    args = sys.argv[1:] if argv is None else argv
    base = Path(args[0])
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    watched: dict[int, tuple[str, str]] = {}
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["done"]:
            return 0
        if len(words) == 3 and words[0] == "watch":
            pid = int(words[1])
            start = _start_time(pid)
            if start is not None:
                watched[pid] = (words[2], start)
        elif len(words) == 2 and words[0] == "forget":
            watched.pop(int(words[1]), None)
    _clean_up(base, watched)
    return 0


if __name__ == "__main__":
    sys.exit(main())
