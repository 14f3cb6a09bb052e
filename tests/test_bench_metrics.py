"""The bench's pure functions: the garbage collector's share (bench/_metrics.py) and
what the instruction-count A/B reads of callgrind's output (bench/instructions.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str) -> Any:
    """A module of bench/ (a folder of scripts, not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def metrics() -> Any:
    return bench_module("_metrics")


@pytest.fixture(scope="module")
def instructions() -> Any:
    return bench_module("instructions")


def a_round(
    requests: int, cpu: float, collections: list[int], seconds: list[float]
) -> dict[str, Any]:
    return {
        "requests": requests,
        "cpu": cpu,
        "gc": {"collections": collections, "seconds": seconds, "tracked": 100, "frozen": 0},
    }


def test_the_collectors_share_is_pooled_over_the_rounds(metrics: Any) -> None:
    rounds = [
        a_round(1000, 0.4, [900, 80, 7], [0.030, 0.020, 0.070]),
        a_round(3000, 1.2, [2700, 240, 21], [0.090, 0.060, 0.210]),
    ]
    rounds[1]["gc"]["tracked"] = 300
    gc = metrics.gc_per_request(rounds)
    assert gc["collections_per_request"] == pytest.approx([0.9, 0.08, 0.007])
    assert gc["us_per_request"] == pytest.approx([30.0, 20.0, 70.0])
    assert gc["us_per_request_total"] == pytest.approx(120.0)
    assert gc["cpu_share"] == pytest.approx(0.48 / 1.6)
    assert gc["tracked"] == 300
    assert gc["frozen"] == 0


def test_rounds_without_a_measure_or_requests_are_left_out(metrics: Any) -> None:
    rounds = [
        {"requests": 10, "cpu": 0.1},
        a_round(0, 0.1, [5, 0, 0], [0.001, 0.0, 0.0]),
        a_round(100, 0.0, [10, 1, 0], [0.001, 0.0005, 0.0]),
    ]
    gc = metrics.gc_per_request(rounds)
    assert gc["collections_per_request"] == pytest.approx([0.1, 0.01, 0.0])
    assert gc["us_per_request_total"] == pytest.approx(15.0)
    assert gc["cpu_share"] is None  # no CPU measured
    assert metrics.gc_per_request(rounds[:2]) is None


def test_the_summary_of_a_case_carries_it(metrics: Any) -> None:
    round_ = {
        **a_round(100, 0.05, [50, 5, 0], [0.002, 0.001, 0.0]),
        "rps": 1000.0,
        "latencies_us": [100, 200],
        "cpu_us_per_request": 500.0,
    }
    summary = metrics.summarize_rounds([round_])
    assert summary["gc"]["collections_per_request"] == pytest.approx([0.5, 0.05, 0.0])
    del round_["gc"]
    assert "gc" not in metrics.summarize_rounds([round_])


def test_the_count_is_callgrinds_last_collected_line(instructions: Any) -> None:
    output = "==12== Callgrind\n==12== Events    : Ir\n==12== Collected : 1872381595\n==12==\n"
    assert instructions.collected(output) == 1872381595
    assert instructions.collected("Collected : 5\nCollected : 7\n") == 7
    with pytest.raises(RuntimeError, match="no instruction count"):
        instructions.collected("valgrind: command not found")


def test_caches_reads_cachegrinds_summary(instructions: Any) -> None:
    output = (
        "==7== I   refs:      139,595,114\n==7== I1  misses:      1,405,369\n"
        "==7== LLi misses:         14,049\n==7== I1  miss rate:        1.01%\n"
        "==7== D   refs:       59,749,302  (40,161,998 rd   + 19,587,304 wr)\n"
        "==7== D1  misses:      2,144,798  ( 1,945,232 rd   +    199,566 wr)\n"
        "==7== Branches:       24,436,869  (21,134,930 cond +  3,301,939 ind)\n"
        "==7== Mispredicts:     2,484,334  ( 1,599,584 cond +    884,750 ind)\n"
    )
    assert instructions.cache_counts(output) == {
        "instructions": 139_595_114,
        "I1 misses": 1_405_369,
        "D1 misses": 2_144_798,
        "mispredicts": 2_484_334,
    }
    with pytest.raises(RuntimeError, match="Mispredicts"):
        instructions.cache_counts(output.split("==7== Mispredicts")[0])


def test_start_up_cancels_out_of_the_count_per_request(instructions: Any) -> None:
    start_up = 1_500_000_000
    first, second = start_up + 1000 * 94_000, start_up + 11000 * 94_000
    assert instructions.per_request(first, second, 1000, 11000) == 94_000
    with pytest.raises(ValueError, match="more requests"):
        instructions.per_request(first, second, 11000, 1000)


def a_slice(a: bool, requests: int, cpu: float, hedges: int = 0) -> dict[str, Any]:
    return {
        "a": a,
        "requests": requests,
        "seconds": 0.5,
        "cpu": cpu,
        "counters": {"hedges_sent": hedges, "hedges_not_stalled": 1},
    }


def test_a_paired_run_is_pooled_over_its_slices_and_spread_over_its_pairs(
    metrics: Any,
) -> None:
    # AB BA: A answers 900 and 1100 where B answers 1000 and 1000.
    slices = [
        a_slice(True, 900, 0.045, hedges=9),
        a_slice(False, 1000, 0.040),
        a_slice(False, 1000, 0.040),
        a_slice(True, 1100, 0.055, hedges=2),
    ]
    m = metrics.paired_metrics(slices)
    assert m["rps_a"] == pytest.approx(2000 / 1.0) and m["rps_b"] == pytest.approx(2000 / 1.0)
    assert m["ratio"] == pytest.approx(1.0)
    assert m["pair_ratios"] == pytest.approx([0.9, 1.1]) and m["pairs"] == 2
    assert m["cpu_us_a"] == pytest.approx(50.0) and m["cpu_us_b"] == pytest.approx(40.0)
    assert m["cpu_ratio"] == pytest.approx(1.25)
    assert m["requests_a"] == 2000 and m["hedges_sent_a"] == 11
    assert m["hedges_not_stalled_a"] == 2  # (counted in A's slices only)


def test_a_paired_run_with_no_requests_has_no_ratio(metrics: Any) -> None:
    m = metrics.paired_metrics([a_slice(True, 0, 0.0), a_slice(False, 0, 0.0)])
    assert m["ratio"] is None and m["cpu_ratio"] is None and m["pair_ratios"] == []
