"""Pure functions that turn what the peers sent into the numbers of the report."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

# -- throughput ---------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted sequence (``q`` in 0..100)."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def summarize_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge one peer's rounds of one case: median rps and CPU, pooled latencies."""
    latencies = sorted(v for r in rounds for v in r["latencies_us"])
    cpus = [r["cpu_us_per_request"] for r in rounds if r["cpu_us_per_request"] is not None]
    errors: Counter[str] = Counter()
    for r in rounds:
        errors.update(r.get("errors", {}))
    counters: dict[str, Any] = {}
    for r in rounds:
        for key, value in (r.get("counters") or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                counters[key] = counters.get(key, 0) + value
            else:
                counters[key] = value  # a gauge: the last round's
    return {
        "rounds": len(rounds),
        "tasks": rounds[0].get("tasks") if rounds else None,
        "rps": statistics.median(r["rps"] for r in rounds) if rounds else 0.0,
        "rps_rounds": [round(r["rps"], 1) for r in rounds],
        "p50_us": percentile(latencies, 50),
        "p99_us": percentile(latencies, 99),
        "p999_us": percentile(latencies, 99.9),
        "max_us": latencies[-1] if latencies else None,
        "cpu_us_per_request": statistics.median(cpus) if cpus else None,
        "user_us_per_request": _median(r.get("user_us_per_request") for r in rounds),
        "system_us_per_request": _median(r.get("system_us_per_request") for r in rounds),
        "starved_tasks": max((r.get("starved_tasks", 0) for r in rounds), default=0),
        "oldest_in_flight_us": max((r.get("oldest_in_flight_us", 0) for r in rounds), default=0),
        "failed": sum(r.get("failed", 0) for r in rounds),
        "errors": dict(errors.most_common(5)),
        "requests": sum(r.get("requests", 0) for r in rounds),
        **({"counters": counters} if counters else {}),
        **({"gc": gc} if (gc := gc_per_request(rounds)) else {}),
    }


def gc_per_request(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The garbage collector's share of the rounds that measured it, pooled: per
    request, the collections of each generation and the microseconds spent in
    each; their total, and as a share of the client's CPU; the most objects it
    tracked after a round, and the most frozen (``gc.freeze()``). ``None`` when
    no round measured it."""
    measured = [r for r in rounds if r.get("gc") and r.get("requests")]
    if not measured:
        return None
    requests = sum(r["requests"] for r in measured)
    collections = [sum(r["gc"]["collections"][g] for r in measured) for g in range(3)]
    seconds = [sum(r["gc"]["seconds"][g] for r in measured) for g in range(3)]
    cpu = sum(r.get("cpu") or 0.0 for r in measured)
    tracked = [r["gc"]["tracked"] for r in measured if r["gc"].get("tracked") is not None]
    return {
        "collections_per_request": [c / requests for c in collections],
        "us_per_request": [s * 1e6 / requests for s in seconds],
        "us_per_request_total": sum(seconds) * 1e6 / requests,
        "cpu_share": sum(seconds) / cpu if cpu > 0 else None,
        "tracked": max(tracked, default=None),
        "frozen": max((r["gc"].get("frozen") or 0 for r in measured), default=0),
    }


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def baseline_at(at: float, base_rounds: list[dict[str, Any]]) -> float | None:
    """The baseline's throughput at moment ``at``, interpolated linearly between its
    rounds just before and just after (the nearest one at either end)."""
    points = sorted((r["at"], r["rps"]) for r in base_rounds if "at" in r)
    if not points:
        return None
    before = [p for p in points if p[0] <= at]
    after = [p for p in points if p[0] > at]
    if not before:
        return after[0][1]
    if not after:
        return before[-1][1]
    (t0, v0), (t1, v1) = before[-1], after[0]
    return v0 + (v1 - v0) * (at - t0) / (t1 - t0)


def ratios(
    peer_rounds: list[dict[str, Any]], base_rounds: list[dict[str, Any]]
) -> dict[str, float | None]:
    """Throughput relative to a baseline measured in the same run.

    Each round of the peer is divided by the baseline's throughput at that
    moment (interpolated between the baseline's rounds of the same case run
    just before and after it), so slow drifts of the machine's load cancel
    out; the ratio is the median of these, and min/max show the spread.
    """
    pairs = []
    for r in peer_rounds:
        base = baseline_at(r["at"], base_rounds) if "at" in r else None
        if base:
            pairs.append(r["rps"] / base)
    if not pairs:
        return {"ratio": None, "ratio_min": None, "ratio_max": None}
    return {
        "ratio": statistics.median(pairs),
        "ratio_min": min(pairs),
        "ratio_max": max(pairs),
    }


# -- a sluggish node ---------------------------------------------------------------------


def paired_metrics(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """A paired A/B (``paired`` command): mode A's throughput and CPU per
    request against mode B's. ``ratio``: A's requests per second over B's,
    pooled over every slice; ``pair_ratios``: the same for each pair of
    neighbouring slices (AB or BA), sorted, to show the spread."""
    a = [s for s in slices if s["a"]]
    b = [s for s in slices if not s["a"]]

    def rate(group: list[dict[str, Any]]) -> float | None:
        seconds = sum(s["seconds"] for s in group)
        return sum(s["requests"] for s in group) / seconds if seconds else None

    def cpu_us(group: list[dict[str, Any]]) -> float | None:
        requests = sum(s["requests"] for s in group)
        return sum(s["cpu"] for s in group) * 1e6 / requests if requests else None

    pair_ratios = []
    for first, second in zip(slices[::2], slices[1::2], strict=False):
        pa_, pb_ = (first, second) if first["a"] else (second, first)
        ra, rb = rate([pa_]), rate([pb_])
        if ra is not None and rb:
            pair_ratios.append(ra / rb)
    pair_ratios.sort()
    rate_a, rate_b = rate(a), rate(b)
    cpu_a, cpu_b = cpu_us(a), cpu_us(b)
    counters_a: Counter[str] = Counter()
    for s in a:
        counters_a.update(s.get("counters") or {})
    requests_a = sum(s["requests"] for s in a)
    return {
        "rps_a": rate_a,
        "rps_b": rate_b,
        "ratio": rate_a / rate_b if rate_a is not None and rate_b else None,
        "pair_ratios": pair_ratios,
        "pair_ratio_median": _median(pair_ratios),
        "cpu_us_a": cpu_a,
        "cpu_us_b": cpu_b,
        "cpu_ratio": cpu_a / cpu_b if cpu_a is not None and cpu_b else None,
        "pairs": len(pair_ratios),
        "requests_a": requests_a,
        "hedges_sent_a": counters_a.get("hedges_sent", 0),
        "hedges_not_stalled_a": counters_a.get("hedges_not_stalled", 0),
    }


def duty_cycle_metrics(
    pauses: Sequence[tuple[float, float]], period: float, skipped: int
) -> dict[str, Any]:
    """What the parent's duty cycle really did: ``pauses`` are (stopped, continued)
    moments, seconds since t0; ``skipped`` counts cycles dropped because the one
    before ran late."""
    lengths = sorted(end - start for start, end in pauses)
    span = pauses[-1][1] - pauses[0][0] if pauses else 0.0
    return {
        "cycles": len(pauses),
        "skipped": skipped,
        "period_s": period,
        "paused_ms_median": lengths[len(lengths) // 2] * 1e3 if lengths else None,
        "paused_ms_max": lengths[-1] * 1e3 if lengths else None,
        "paused_share": sum(lengths) / span if span > 0 else None,
        "first_s": pauses[0][0] if pauses else None,
        "last_s": pauses[-1][1] if pauses else None,
    }


def sluggish_metrics(res: dict[str, Any], budget: float | None) -> dict[str, Any]:
    """One peer's sluggish run: the throughput numbers, and for picopyn_actors its
    hedges over the measured window as a share of the requests it answered."""
    out = summarize_rounds([res])
    counters = res.get("counters") or {}
    out["hedging"] = bool(res.get("hedging"))
    if out["hedging"] and "hedges_sent" in counters:
        requests = res["requests"]
        sent = counters["hedges_sent"]
        out["hedges_sent"] = sent
        out["hedges_won"] = counters["hedges_won"]
        out["hedges_refused"] = counters["hedges_refused"]
        out["hedges_skipped"] = counters.get("hedges_skipped", 0)
        out["hedges_not_stalled"] = counters.get("hedges_not_stalled", 0)
        out["hedge_delay_s"] = counters.get("hedge_delay")
        out["extra_share"] = sent / requests if requests else None
        out["budget"] = budget
    return out


# -- timelines ------------------------------------------------------------------------


def timeline_metrics(
    data: dict[str, Any],
    *,
    names: dict[str, str],
    victim: str,
    fault_at: float,
    restore_begin: float,
    restore_end: float,
    duration: float,
    kind: str,
) -> dict[str, Any]:
    """Per-second table and the headline numbers of one failover or hang run.

    ``fault_at``, ``restore_*`` are seconds since t0 as the parent measured
    them. ``kind`` is ``"kill"`` or ``"pause"``.
    """
    width = float(data["bin"])
    ok: list[dict[str, int]] = [{names.get(k, k): v for k, v in b.items()} for b in data["ok"]]
    failed: list[int] = data["failed"]
    n_bins = min(len(ok), round(duration / width))
    every = sorted({name for b in ok for name in b} | set(names.values()))

    per_second = []
    per_bin = round(1 / width)
    for s in range(int(duration)):
        lo, hi = s * per_bin, min(n_bins, (s + 1) * per_bin)
        counts: Counter[str] = Counter()
        for b in ok[lo:hi]:
            counts.update(b)
        total = sum(counts.values())
        per_second.append(
            {
                "second": s,
                "ok": total,
                "failed": sum(failed[lo:hi]),
                "share": {n: (counts[n] / total if total else 0.0) for n in every},
                "max_latency": max(data["max_latency"][lo:hi], default=0.0),
            }
        )

    def bin_start(i: int) -> float:
        return i * width

    fault_bin = int(fault_at / width)
    restore_bin = int(restore_begin / width)
    failed_after_fault = [i for i in range(fault_bin, len(failed)) if failed[i]]
    failed_before_restore = [i for i in failed_after_fault if i < restore_bin]

    # When did the victim stop getting requests? From the client's own events if
    # it has them (picopyn_actors); else from the last failure before the restore.
    out_of_rotation: float | None = None
    how = "last failure"
    events = data.get("events") or []
    for at, node, _old, new, _reason in events:
        if node == victim and at >= fault_at - width and new != "up":
            out_of_rotation = max(0.0, at - fault_at)
            how = f"client event ({new})"
            break
    if out_of_rotation is None and failed_before_restore:
        last = failed_before_restore[-1]
        if bin_start(last + 1) < restore_begin - 1.0:
            out_of_rotation = bin_start(last + 1) - fault_at
        else:
            how = "never (failing until the restore)"
    elif out_of_rotation is None:
        # Nothing failed and the client tells nothing: when it stopped trying the
        # victim cannot be seen from outside (it may retry internally).
        how = "n/a: no failures seen"

    # Back to a third: the first bin after the restore from which the victim's
    # share stays >= 0.3 for 0.5 s (or until the end of the run).
    back: float | None = None
    hold = max(1, round(0.5 / width))
    restore_end_bin = int(restore_end / width)
    for i in range(restore_end_bin, n_bins):
        window = ok[i : min(n_bins, i + hold)]
        if window and all(b and b.get(victim, 0) / sum(b.values()) >= 0.3 for b in window):
            back = max(0.0, bin_start(i) - restore_end)
            break

    fault_window = [
        data["max_latency"][i] for i in range(fault_bin, min(len(failed), restore_bin + 1))
    ]
    return {
        "ok_total": sum(sum(b.values()) for b in ok[:n_bins]),
        "failed_total": sum(failed),
        "failed_after_restore": sum(failed[restore_bin:]),
        "out_of_rotation_s": out_of_rotation,
        "out_of_rotation_how": how,
        "back_to_third_s": back,
        "max_latency_s": data.get("worst_latency"),
        "max_latency_fault_window_s": max(fault_window, default=0.0),
        "unfinished": data.get("unfinished", 0),
        "errors": data.get("errors", {}),
        "per_second": per_second,
        "retried_total": (data.get("retried") or [[0, 0]])[-1][1],
        "events": events,
    }


# -- sampling profiles --------------------------------------------------------------------

#: Parts of a stack that own the time spent below them, as (name, substrings of
#: a frame's file). A sample is charged to the innermost owning frame, so trio's
#: channel code run by the dispatcher counts as the dispatcher's, and asyncio's
#: transport code run by asyncpg counts as socket I/O.
OWNERS: list[tuple[str, tuple[str, ...]]] = [
    ("socket I/O (asyncio transport, syscalls)", ("asyncio/selector_events.py",)),
    ("asyncpg (driver)", ("asyncpg/",)),
    (
        "dispatcher",
        (
            "picopyn_actors/_dispatcher.py",
            "picopyn_actors/_strategies.py",
            "picopyn_actors/_routes.py",
            "picopyn_actors/_owners.py",
            "picopyn_actors/_hedges.py",
            "picopyn_actors/_hedging.py",
        ),
    ),
    (
        "node (slots, completions)",
        ("picopyn_actors/_node.py", "picopyn_actors/_session.py", "picopyn_actors/_slot.py"),
    ),
    ("bridge: _bridge/", ("picopyn_actors/_bridge/",)),
    (
        "caller side: _cluster.py, _request.py",
        ("picopyn_actors/_cluster.py", "picopyn_actors/_request.py"),
    ),
    ("bridge: trio-asyncio loop", ("trio_asyncio/",)),
    ("picopyn pool", ("picopyn/",)),
    ("fake backend", ("picopyn_actors/testing/_fake.py",)),
    (
        "bench loop",
        # The harness's request loop and the peers' one-line ``call`` wrappers; not
        # the peers' module or main frames, which are at the root of every stack.
        (
            "(_harness.py:",
            "call (actors.py:",
            "call (picopyn_seed.py:",
            "call (picopyn3.py:",
            "call (asyncpg_pool.py:",
            "call (asyncpg_raw.py:",
        ),
    ),
]
#: What is left when no owner is on the stack.
GENERIC: list[tuple[str, tuple[str, ...]]] = [
    ("trio scheduler (run loop, epoll)", ("trio/",)),
    ("asyncio event loop", ("asyncio/",)),
]


def _match(where: str, table: list[tuple[str, tuple[str, ...]]]) -> str | None:
    for name, needles in table:
        if any(needle in where for needle in needles):
            return name
    return None


def categorize_stacks(lines: Iterable[str]) -> dict[str, int]:
    """Samples per part from py-spy ``--format raw`` lines (``root;...;leaf count``)."""
    counts: Counter[str] = Counter()
    for line in lines:
        stack, _, n = line.strip().rpartition(" ")
        if not stack:
            continue
        try:
            samples = int(n)
        except ValueError:
            continue
        # py-spy raw frames look like "function (path/to/file.py:123)".
        files = stack.split(";")
        category = None
        for where in reversed(files):
            category = _match(where, OWNERS)
            if category:
                break
        if category is None:
            for where in reversed(files):
                category = _match(where, GENERIC)
                if category:
                    break
        counts[category or "other"] += samples
    return dict(counts)


def leaf_functions(lines: Iterable[str], top: int = 25) -> list[tuple[str, int]]:
    """The most sampled innermost frames (self time)."""
    counts: Counter[str] = Counter()
    for line in lines:
        stack, _, n = line.strip().rpartition(" ")
        if not stack:
            continue
        try:
            counts[stack.split(";")[-1]] += int(n)
        except ValueError:
            continue
    return counts.most_common(top)
