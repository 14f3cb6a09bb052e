"""Parking a caller and waking it, on trio's own trap where this trio has it.

Every request parks its caller once and wakes it once. trio's public
functions for that (``checkpoint_if_cancelled``, ``wait_task_rescheduled``,
``reschedule``) are thin wrappers over its run loop: together they cost the
request path some eight Python calls per request (about 7% of the client's
instructions per ``SELECT 1``, measured with ``bench/instructions.py``).
Where this trio's internals are as the library was tested with, the request
path uses them directly instead (see :mod:`._request` and
``Cluster._call``):

* **the cancel check**: the caller's task's ``_cancel_status``
  (``effectively_cancelled``) is read, and ``checkpoint_if_cancelled`` runs
  only when it says cancelled;
* **the park**: ``Request.wait`` is a generator that yields the run loop's
  ``WaitTaskRescheduled`` trap itself, and answers a value without
  ``Outcome.unwrap`` (an error, and trio's ``Cancelled``, still go through
  it);
* **the wake-up**: ``task._runner.reschedule`` (trio's public ``reschedule``
  is that call, behind a frame). The caller of it, ``Request.finish``, is
  protected from ``KeyboardInterrupt`` as trio's wrapper is, so that a
  Ctrl-C never lands between its bookkeeping and the wake-up.

:func:`self_check` verifies, at import, that these exist as expected; the
tests run on the lowest and the newest trio ``pyproject.toml`` allows
(``scripts/compat``). When the check fails, :data:`FAST` is false, the
request path uses trio's public functions, and :func:`report` logs one
WARNING when a cluster opens.
"""

from __future__ import annotations

import functools
import logging
from typing import Final

import attrs
import trio

log = logging.getLogger("picopyn_actors")


def self_check() -> str | None:
    """Why the request path cannot use trio's trap directly, or ``None`` when it can."""
    try:
        from trio._core import _run, _traps
    except ImportError as exc:  # pragma: no cover - every trio tested has them
        return f"trio._core has no {exc.name}"
    trap = getattr(_traps, "WaitTaskRescheduled", None)
    if trap is None or getattr(_run, "WaitTaskRescheduled", None) is not trap:
        return "the run loop does not test for trio._core._traps.WaitTaskRescheduled"
    try:
        task_fields = attrs.fields_dict(trio.lowlevel.Task)
        status_fields = attrs.fields_dict(_run.CancelStatus)
    except (AttributeError, TypeError) as exc:  # pragma: no cover - idem
        return f"trio's Task or CancelStatus is not an attrs class ({exc})"
    for name in ("_runner", "_cancel_status", "_next_send_fn", "_abort_func"):
        if name not in task_fields:
            return f"trio.lowlevel.Task has no {name}"
    if "effectively_cancelled" not in status_fields:
        return "trio's CancelStatus has no effectively_cancelled"
    if not callable(getattr(getattr(_run, "Runner", None), "reschedule", None)):
        return "trio's Runner has no reschedule"
    if "abort_func" not in attrs.fields_dict(_traps.WaitTaskRescheduled):
        return "trio's WaitTaskRescheduled has no abort_func"
    return None


PROBLEM: Final = self_check()
#: The request path uses trio's trap directly (:func:`self_check` passed).
FAST: Final = PROBLEM is None

try:
    from trio._core._traps import WaitTaskRescheduled as WaitTaskRescheduled
except ImportError:  # pragma: no cover - self_check says so, and FAST is false
    WaitTaskRescheduled = None  # type: ignore[assignment,misc]


@functools.cache
def report() -> None:
    """Log, once, that the request path uses trio's public functions (slower)."""
    if PROBLEM is not None:
        log.warning(
            "trio %s's internals are not what the request path expects (%s); "
            "requests park through trio's public functions instead (more CPU per request)",
            trio.__version__,
            PROBLEM,
        )
