"""Opening asyncpg connections: :class:`AsyncpgBackend` and :func:`open_backend`."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from .._dsn import Address, Dsn
from . import driver
from .base import Backend, Connection, Runner
from .connection import BridgedConnection, EmbeddedConnection
from .embedded import EmbeddedLoop, self_check
from .errors import classified, install_handler
from .thread import LoopThread
from .trioasyncio import TrioAsyncioRunner

log = logging.getLogger("picopyn_actors._bridge")


def connect_options(
    dsn: Dsn,
    connect_timeout: float,
    connect_kwargs: Mapping[str, Any],
    startup_options: str | None = None,
) -> tuple[float, dict[str, Any]]:
    """The connect timeout and ``asyncpg.connect`` keyword arguments for a DSN.

    ``startup_options`` is Picodata's ``options`` startup parameter
    (``ClusterConfig.startup_options``), sent as a server setting.
    """
    kwargs: dict[str, Any] = dict(connect_kwargs)
    params = dict(dsn.params)
    if "sslmode" in params:
        kwargs.setdefault("ssl", params["sslmode"])
    if "connect_timeout" in params:
        connect_timeout = float(params["connect_timeout"])
    if "application_name" in params:
        settings = dict(kwargs.get("server_settings") or {})
        settings.setdefault("application_name", params["application_name"])
        kwargs["server_settings"] = settings
    if startup_options:
        settings = dict(kwargs.get("server_settings") or {})
        settings["options"] = startup_options
        kwargs["server_settings"] = settings
    kwargs.update(user=dsn.user, password=dsn.password, database=dsn.database)
    return connect_timeout, kwargs


class AsyncpgBackend:
    """Opens asyncpg connections through one of the runners (its ``kind``)."""

    def __init__(
        self,
        dsn: Dsn,
        connect_timeout: float,
        connect_kwargs: Mapping[str, Any],
        runner: Runner,
        startup_options: str | None = None,
    ) -> None:
        self._timeout, self._kwargs = connect_options(
            dsn, connect_timeout, connect_kwargs, startup_options
        )
        self._runner = runner

    def __repr__(self) -> str:
        return f"<AsyncpgBackend {self.kind}>"

    @property
    def kind(self) -> str:
        """The runner: ``"embedded"``, ``"thread"`` or ``"trio-asyncio"``."""
        return self._runner.kind

    async def connect(self, address: Address) -> Connection:
        kwargs, timeout = self._kwargs, self._timeout
        conn = await classified(
            self._runner.await_coro(
                lambda: driver.connect(address.host, address.port, timeout, **kwargs)
            ),
            sent=False,
        )
        runner = self._runner
        if isinstance(runner, EmbeddedLoop):
            return EmbeddedConnection(conn, runner)
        return BridgedConnection(conn, runner)


@asynccontextmanager
async def open_backend(
    dsn: Dsn,
    connect_timeout: float,
    connect_kwargs: Mapping[str, Any],
    kind: str = "auto",
    startup_options: str | None = None,
) -> AsyncIterator[AsyncpgBackend]:
    """Yield a backend whose connections use the runner ``kind`` names.

    ``"embedded"``: a plain asyncio loop driven by a trio task in trio's own
    thread (falls back to ``"thread"``, with one WARNING, when this Python's
    asyncio internals fail :func:`~.embedded.self_check`; its queries use
    asyncpg's public methods, with one WARNING, when asyncpg's internals fail
    :func:`~.driver.self_check`). ``"thread"``: a
    plain asyncio loop in a thread of its own. ``"trio-asyncio"``: the running
    trio-asyncio loop, or a new one. ``"auto"``: ``"embedded"``, also beside a
    running trio-asyncio loop (the embedded loop keeps to its own trio task and
    its own context, and leaves the service's loop alone; tests pin that).

    Every connection sends ``startup_options`` (Picodata's session options)
    when given. Leaving the block closes the runner, shielded and in bounded
    time.
    """
    running = driver.CURRENT_LOOP.get()
    args = (dsn, connect_timeout, connect_kwargs)
    if kind == "auto":
        kind = "embedded"
    if kind == "embedded":
        problem = self_check()
        if problem is None:
            async with _embedded(*args, startup_options) as backend:
                yield backend
            return
        log.warning(
            "the embedded asyncio runner cannot run on this Python (%s); "
            "using the thread runner instead",
            problem,
        )
        kind = "thread"
    if kind == "thread":
        bridge = LoopThread(trio.lowlevel.current_trio_token())
        try:
            yield AsyncpgBackend(*args, bridge, startup_options)
        finally:
            with trio.CancelScope(shield=True):
                await bridge.aclose()
        return
    if running is not None:
        install_handler(running)
        yield AsyncpgBackend(*args, TrioAsyncioRunner(running), startup_options)
        return
    async with driver.open_loop() as new_loop:
        install_handler(new_loop)
        yield AsyncpgBackend(*args, TrioAsyncioRunner(new_loop), startup_options)


@functools.cache
def fast_queries() -> bool:
    """Whether the embedded runner may call asyncpg's protocol itself (:mod:`.driver`);
    logs one WARNING when this asyncpg fails the check."""
    problem = driver.self_check()
    if problem is not None:
        log.warning(
            "asyncpg's internals are not what the fast query path expects (%s); "
            "queries use asyncpg's public methods instead",
            problem,
        )
    return problem is None


@asynccontextmanager
async def _embedded(
    dsn: Dsn,
    connect_timeout: float,
    connect_kwargs: Mapping[str, Any],
    startup_options: str | None,
) -> AsyncIterator[AsyncpgBackend]:
    loop = EmbeddedLoop(fast_queries=fast_queries())
    async with trio.open_nursery() as nursery:
        # start_soon, not start: the driver shields itself, and trio's
        # started() in an already cancelled start() would leave it in a
        # nursery that waits for it forever.
        nursery.start_soon(loop.drive, name="picopyn_actors asyncio driver")
        try:
            yield AsyncpgBackend(dsn, connect_timeout, connect_kwargs, loop, startup_options)
        finally:
            with trio.CancelScope(shield=True):
                await loop.aclose()
            nursery.cancel_scope.cancel()


__all__ = ["AsyncpgBackend", "Backend", "connect_options", "open_backend"]
