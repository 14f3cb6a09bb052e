"""One pristine ``initdb`` data directory per process, copied for every node.

``initdb`` takes about a second; copying its output takes a fraction of
that. The pristine directory is made on first use, never modified, and
removed when the interpreter exits.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from ._errors import LocalClusterError
from ._pg import PgBinaries, RunAs, tool_env

__all__ = ["SERVER_SETTINGS", "copy_data_dirs", "pristine_data_dir"]

SERVER_SETTINGS: Final = """
# picopyn_actors stand-in node: fast and throw-away, never durable.
listen_addresses = '127.0.0.1'
# connections_per_node may be up to 256: those, the probe's and discovery's
# connection, and room for a test's own sessions (psql, raw asyncpg).
max_connections = 300
shared_buffers = 16MB
fsync = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
autovacuum = off
jit = off
huge_pages = off
dynamic_shared_memory_type = mmap
password_encryption = md5
unix_socket_permissions = 0700
logging_collector = off
log_min_messages = warning
log_line_prefix = '%m [%p] '
"""
# With fsync off, synchronous_commit costs a write() and no flush; keeping it on
# means a commit survives a SIGKILL of the server (the OS page cache does).
# dynamic_shared_memory_type = mmap keeps dynamic segments in the data directory,
# so a SIGKILLed server leaves nothing in /dev/shm.

_lock = threading.Lock()
_pristine: dict[tuple[Path, int | None], Path] = {}


def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def run_tool(
    args: Sequence[str | Path], run_as: RunAs, cwd: Path, what: str, timeout: float = 120
) -> None:
    """Run a program to completion as the server's OS user; raise with its output on failure."""
    proc = subprocess.run(
        [str(a) for a in args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=tool_env(cwd),
        timeout=timeout,
        check=False,
        **run_as.popen_kwargs(),
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip().splitlines()[-20:]
        raise LocalClusterError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(output))


def pristine_data_dir(bins: PgBinaries, run_as: RunAs) -> Path:
    """A configured, never-started ``initdb`` data directory owned by *run_as*."""
    key = (bins.bindir, run_as.uid)
    with _lock:
        found = _pristine.get(key)
        if found is not None and found.is_dir():
            return found
        folder = Path(tempfile.mkdtemp(prefix="picopyn-pgtemplate-"))
        atexit.register(_remove, folder)
        run_as.chown(folder)
        data = folder / "data"
        run_tool(
            [
                bins.initdb,
                "-D", data,
                "-U", "postgres",
                "--auth-local=trust",
                "--auth-host=md5",
                "--encoding=UTF8",
                "--locale=C",
                "--wal-segsize=1",
                "--no-sync",
                "--no-instructions",
            ],
            run_as,
            folder,
            "initdb",
        )  # fmt: skip
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(SERVER_SETTINGS)
        _pristine[key] = data
        return data


def copy_data_dirs(source: Path, targets: Sequence[Path], run_as: RunAs, cwd: Path) -> None:
    """Copy *source* to each target in parallel, keeping ownership and modes."""
    procs = [
        subprocess.Popen(
            ["cp", "-a", str(source), str(target)],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=tool_env(cwd),
            **run_as.popen_kwargs(),
        )
        for target in targets
    ]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            errors.append(err.decode("utf-8", "replace").strip())
    if errors:
        raise LocalClusterError("copying a data directory failed:\n" + "\n".join(errors))
