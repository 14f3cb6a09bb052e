"""The bridge to asyncpg: the only package that uses asyncpg and trio_asyncio.

asyncpg is asyncio-only. The actors see it through two small protocols
(:mod:`.base`): a :class:`Backend` opens a :class:`Connection`, whose
``submit`` starts a request on the hot path and calls back in trio. One
module imports asyncpg and trio_asyncio, :mod:`.driver` (connecting, error
classification, the embedded runner's fast path, trio-asyncio's loop
variable); the others reach them through it. Errors are classified once
(:func:`~.driver.classify`, applied by :mod:`.errors`). Three runners carry
the asyncio work, one module each:

* :mod:`.embedded`: a plain asyncio loop driven by a trio task in trio's own
  thread (the default and the fastest);
* :mod:`.thread`: a plain asyncio loop in a thread of its own;
* :mod:`.trioasyncio`: a running trio-asyncio loop, shared with the service.

:func:`open_backend` picks one (:mod:`.backend`).
"""

from .backend import AsyncpgBackend, connect_options, open_backend
from .base import Backend, BackendBroken, BackendQueryError, Connection, OnDone, Runner
from .driver import classify
from .errors import INVALIDATED, MAX_RERUNS

__all__ = [
    "INVALIDATED",
    "MAX_RERUNS",
    "AsyncpgBackend",
    "Backend",
    "BackendBroken",
    "BackendQueryError",
    "Connection",
    "OnDone",
    "Runner",
    "classify",
    "connect_options",
    "open_backend",
]
