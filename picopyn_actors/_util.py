"""Small helpers shared by the actors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        flat: list[BaseException] = []
        for inner in exc.exceptions:
            flat.extend(_flatten(inner))
        return flat
    return [exc]


@contextmanager
def unwrap_single_error() -> Iterator[None]:
    """Re-raise a lone error out of a nursery's exception group.

    Our nurseries are an implementation detail: a caller of ``open_cluster``
    should see ``NoNodesAvailable`` or its own exception, not a group.
    Groups of several real errors, and groups holding only ``Cancelled``
    (which the owning cancel scope must catch), pass through unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        real = [e for e in _flatten(group) if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from real[0].__cause__
        raise
