"""Which instance a connection reached: ``pico_instance_uuid()``, else ``instance_uuid()``.

``pico_instance_uuid()`` exists since Picodata 25.3.1 and ``instance_uuid()``
from 25.2.1 to 26.3. The first one that works is remembered per backend, so
that each later question costs one query.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Final

from ._bridge import Backend, BackendQueryError, Connection

UUID_FUNCTIONS: Final = ("pico_instance_uuid", "instance_uuid")
_preferred: weakref.WeakKeyDictionary[Backend, str] = weakref.WeakKeyDictionary()


async def instance_uuid(conn: Connection, backend: Backend) -> str | None:
    """The uuid of the instance ``conn`` reached, or ``None`` when the server has
    neither function (then nothing can be checked)."""
    first = _preferred.get(backend, UUID_FUNCTIONS[0])
    for function in (first, *(f for f in UUID_FUNCTIONS if f != first)):
        try:
            uuid = await conn.run("fetchval", f"SELECT {function}()", ())
        except BackendQueryError:
            continue
        # A backend that cannot be weakly referenced is asked afresh each time.
        with contextlib.suppress(TypeError):
            _preferred[backend] = function
        return str(uuid)
    return None
