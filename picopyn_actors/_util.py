"""Small helpers shared by the actors."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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


def split_clock(clock: Callable[[], float]) -> tuple[Callable[[], float], float]:
    """``clock`` as a reader and an offset: ``reader() + offset`` reads it.

    trio's own clock is ``offset + time.perf_counter()`` (a Python frame per
    read); split, it is read with ``time.perf_counter`` itself, in C. The hot
    path reads the clock twice per request. Any other clock (a test's
    ``MockClock``, say) is read as it is.
    """
    owner = getattr(clock, "__self__", None)
    kind = type(owner)
    offset = getattr(owner, "offset", None)
    if (
        kind.__name__ == "SystemClock"
        and kind.__module__.startswith("trio.")
        and getattr(clock, "__name__", None) == "current_time"
        and type(offset) is float
        and abs(clock() - (time.perf_counter() + offset)) < 1.0
    ):
        return time.perf_counter, offset
    return clock, 0.0
