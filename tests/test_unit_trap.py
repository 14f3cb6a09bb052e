"""The request path's park and wake-up (picopyn_actors._trap): on trio's own
trap, and on trio's public functions when this trio fails the check; both
answer every request once, cancel the same way, and say which one runs."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import outcome
import pytest
import trio
import trio.testing
from fakes import FakeCluster, wait_state

from picopyn_actors import (
    Candidate,
    NodeState,
    QueryError,
    StrategyError,
    _cluster,
    _request,
    _trap,
)
from picopyn_actors._request import Request

UP = NodeState.UP


def test_this_trio_passes_the_check() -> None:
    # The trio the tests run on is one the fast path is made for: if a new
    # trio fails the check, this says so (the library itself would go on,
    # slower, with one WARNING).
    assert _trap.self_check() is None
    assert _trap.FAST is True


@attrs.define
class Calls:
    """What the request path called, counted by wrappers around each way."""

    trap: int = 0
    public_wait: int = 0
    public_reschedule: int = 0


@pytest.fixture(params=["trap", "public"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    """Run the test on trio's trap (as on every tested trio) or on trio's public
    functions (as when the check fails), counting which the requests use."""
    calls = Calls()
    trap, wait, reschedule = (
        _request.WaitTaskRescheduled,
        _request.wait_task_rescheduled,
        _request.reschedule,
    )

    def counted_trap(abort: Any) -> Any:
        calls.trap += 1
        return trap(abort)

    def counted_wait(abort: Any) -> Any:
        calls.public_wait += 1
        return wait(abort)

    def counted_reschedule(task: Any, result: Any) -> None:
        calls.public_reschedule += 1
        reschedule(task, result)

    monkeypatch.setattr(_request, "WaitTaskRescheduled", counted_trap)
    monkeypatch.setattr(_request, "wait_task_rescheduled", counted_wait)
    monkeypatch.setattr(_request, "reschedule", counted_reschedule)
    if request.param == "public":
        monkeypatch.setattr(_request, "FAST", False)
        monkeypatch.setattr(_cluster, "FAST", False)
    yield calls
    if request.param == "trap":
        assert calls.public_wait == calls.public_reschedule == 0
    else:
        assert calls.trap == 0


async def test_answers_errors_and_cancellation_on_either_path(
    path: Calls, autojump_clock: object
) -> None:
    fake = FakeCluster(1)
    node = fake["i1"]
    refuse = False

    def strategy(candidates: Sequence[Candidate]) -> Candidate:
        if refuse:
            raise RuntimeError("no node today")
        return candidates[0]

    async with fake.open(
        connections_per_node=2, discovery_interval=1000.0, strategy=strategy
    ) as cluster:
        await wait_state(cluster, "i1", UP)
        # Values, concurrently: each caller gets its own answer, once.
        answers: list[Any] = []

        async def one() -> None:
            answers.append(await cluster.fetchval("whoami", idempotent=True))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert answers == ["i1"] * 20
        # An error goes through the same wake-up.
        with pytest.raises(QueryError) as caught:
            await cluster.fetchval("bad sql")
        assert caught.value.node == "i1"
        # Answered before the caller parks (the strategy failed it at once):
        # a checkpoint, and the error, without a park.
        refuse = True
        with pytest.raises(StrategyError, match="no node today"):
            await cluster.fetchval("whoami")
        refuse = False
        # A caller cancelled before the call: nothing is sent.
        executed = node.executed["whoami"]
        with trio.CancelScope() as scope:
            scope.cancel()
            await cluster.fetchval("whoami")
        assert scope.cancelled_caught
        assert node.executed["whoami"] == executed
        # Cancelled while parked, mid-query: the connection is replaced.
        opened = node.opened
        with trio.move_on_after(1) as scope:
            await cluster.fetchval("sleep:10")
        assert scope.cancelled_caught
        await trio.testing.wait_all_tasks_blocked()
        assert node.opened == opened + 1
        assert await cluster.fetchval("whoami") == "i1"
    waits = 20 + 1 + 1 + 1  # the concurrent ones, the error, the cancelled, the last
    if path.trap:
        assert path.trap == waits
    else:
        assert path.public_wait == waits
        assert path.public_reschedule == waits - 1  # the cancelled one is aborted, not woken


async def test_the_wake_up_is_protected_from_keyboard_interrupt() -> None:
    # Request.finish wakes the caller with trio's runner itself: a Ctrl-C
    # must not land between its bookkeeping and that call, as trio's own
    # reschedule is protected.
    seen: list[bool] = []

    class Runner:
        def reschedule(self, task: object, result: object) -> None:
            seen.append(trio.lowlevel.currently_ki_protected())

    @attrs.define
    class Task:
        _runner: Runner

    request = Request("fetchval", "whoami", (), True)
    request.task = Task(Runner())  # type: ignore[assignment]
    assert request.finish(outcome.Value(1))
    assert seen == [True]
    assert not trio.lowlevel.currently_ki_protected()  # (the test itself is not)


def test_the_check_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from trio._core import _run, _traps

    @attrs.frozen
    class OtherTrap:
        abort_func: object

    monkeypatch.setattr(_run, "WaitTaskRescheduled", OtherTrap)
    assert _trap.self_check() == (
        "the run loop does not test for trio._core._traps.WaitTaskRescheduled"
    )
    monkeypatch.undo()
    monkeypatch.delattr(_traps, "WaitTaskRescheduled")
    assert "WaitTaskRescheduled" in (_trap.self_check() or "")
    monkeypatch.undo()
    monkeypatch.delattr(_run.Runner, "reschedule")
    assert _trap.self_check() == "trio's Runner has no reschedule"
    monkeypatch.undo()
    assert _trap.self_check() is None


async def test_a_failed_check_is_logged_once_when_clusters_open(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, autojump_clock: object
) -> None:
    monkeypatch.setattr(_trap, "PROBLEM", "trio's Runner has no reschedule")
    _trap.report.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="picopyn_actors"):
            for _ in range(2):
                async with FakeCluster(1).open() as cluster:
                    await wait_state(cluster, "i1", UP)
    finally:
        _trap.report.cache_clear()
    messages = [r.getMessage() for r in caplog.records if "request path" in r.getMessage()]
    assert len(messages) == 1
    assert "trio's Runner has no reschedule" in messages[0]
    assert trio.__version__ in messages[0]
