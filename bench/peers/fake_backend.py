"""A minimal in-bench fake of picopyn_actors' backend protocol (see ``_bridge.py``).

N fake nodes that answer at once, with a catalog that lists all of them as
Online. Used by the scale workload (and the ``actors-rr-fake`` profile) to
measure the dispatcher's and node actors' own cost per request as the node
count grows, with no I/O and no asyncpg in the way.

Like the real bridges' connections, a fake connection has ``submit(method,
query, args, on_done)``: the request is answered by a callback that runs in
trio, once per batch (as the thread bridge delivers completions with one
``TrioToken.run_sync_soon`` per batch). ``run`` (one trio checkpoint) serves
probes, discovery and pinned connections.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import outcome
import trio

from picopyn_actors import Address

_BASE_PORT = 20000


class FakeConnection:
    def __init__(self, backend: FakeBackend, index: int) -> None:
        self._backend = backend
        self._index = index
        self._closed = False

    def _answer(self, method: str, query: str) -> Any:
        if "instance_uuid()" in query:
            uuid = self._backend.uuid(self._index)
            return uuid if method == "fetchval" else (uuid,)
        if "FROM _pico_instance" in query:
            return self._backend.rows()
        if "FROM _pico_replicaset" in query:
            return [
                {"name": f"r{i}", "current_master_name": f"i{i}"}
                for i in range(1, self._backend.n + 1)
            ]
        if method == "fetchval":
            return 1
        if method == "fetch":
            return [(1,)]
        if method == "execute":
            return "SELECT 1"
        return (1,)

    async def run(self, method: str, query: str, args: Sequence[Any]) -> Any:
        await trio.lowlevel.checkpoint()
        return self._answer(method, query)

    def submit(
        self,
        method: str,
        query: str,
        args: Sequence[Any],
        on_done: Callable[[outcome.Outcome[Any]], None],
    ) -> None:
        self._backend.complete(on_done, outcome.Value(self._answer(method, query)))

    async def probe(self) -> None:
        await trio.lowlevel.checkpoint()

    def terminate(self) -> None:
        self._closed = True

    async def close(self) -> None:
        self._closed = True

    def is_closed(self) -> bool:
        return self._closed

    def in_transaction(self) -> bool:
        return False

    async def prepare(self, query: str) -> Any:
        await trio.lowlevel.checkpoint()
        return query

    async def run_prepared(self, handle: Any, method: str, args: Sequence[Any]) -> Any:
        return await self.run(method, handle, args)


class FakeBackend:
    """``n`` nodes at 127.0.0.1:20001..; nothing listens there, nothing is sent."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._done: deque[tuple[Callable[[outcome.Outcome[Any]], None], outcome.Outcome[Any]]]
        self._done = deque()
        self._wakeup = False

    @property
    def dsn(self) -> str:
        return f"postgresql://admin:fake@127.0.0.1:{_BASE_PORT + 1}/postgres"

    def uuid(self, index: int) -> str:
        return f"00000000-0000-0000-0000-{index:012d}"

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "name": f"i{i}",
                "uuid": self.uuid(i),
                "raft_id": i,
                "tier": "default",
                "replicaset_name": f"r{i}",
                "current_state": '["Online",1]',
                "target_state": '["Online",1]',
                "failure_domain": "{}",
                "address": f"127.0.0.1:{_BASE_PORT + i}",
            }
            for i in range(1, self.n + 1)
        ]

    def complete(
        self, on_done: Callable[[outcome.Outcome[Any]], None], result: outcome.Outcome[Any]
    ) -> None:
        """Queue a completion; deliver the batch on trio's next pass."""
        self._done.append((on_done, result))
        if not self._wakeup:
            self._wakeup = True
            trio.lowlevel.current_trio_token().run_sync_soon(self._deliver)

    def _deliver(self) -> None:
        self._wakeup = False
        done = self._done
        while done:
            on_done, result = done.popleft()
            on_done(result)

    async def connect(self, address: Address) -> FakeConnection:
        await trio.lowlevel.checkpoint()
        return FakeConnection(self, address.port - _BASE_PORT)
