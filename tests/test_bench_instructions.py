"""The instruction-count A/B (bench/instructions.py): what it reads of callgrind's output."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def instructions() -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("instructions")
    finally:
        sys.path.remove(str(BENCH))


def test_the_count_is_callgrinds_last_collected_line(instructions: Any) -> None:
    output = "==12== Callgrind\n==12== Events    : Ir\n==12== Collected : 1872381595\n==12==\n"
    assert instructions.collected(output) == 1872381595
    assert instructions.collected("Collected : 5\nCollected : 7\n") == 7
    with pytest.raises(RuntimeError, match="no instruction count"):
        instructions.collected("valgrind: command not found")


def test_start_up_cancels_out_of_the_count_per_request(instructions: Any) -> None:
    start_up = 1_500_000_000
    first, second = start_up + 1000 * 94_000, start_up + 11000 * 94_000
    assert instructions.per_request(first, second, 1000, 11000) == 94_000
    with pytest.raises(ValueError, match="more requests"):
        instructions.per_request(first, second, 11000, 1000)
