"""``demo --plot FILE.png``: throughput and each node's share over time, faults marked.

Needs the ``plot`` extra (matplotlib). :func:`timeline` bins a run's
recorded answers and failures (plain code, tested on its own);
:func:`draw` turns the bins into a two-panel figure:

* requests per second, stacked: the read answers of each node, the write
  answers, and the failures on top, in red;
* each node's share of the read answers, stacked to 100%;

with a dashed line and a label at every fault of the chaos script.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from .demo import Fault, Recorder

#: Node colours, in the order of the nodes' names (as docs/img/failover.png).
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
WRITES = "#b0b0b0"
FAILED = "#c44e52"


@attrs.frozen
class Timeline:
    """A run cut into bins of ``width`` seconds.

    Attributes:
        width: seconds per bin.
        starts: each bin's start, in seconds from the start of the run.
        reads: per node, read answers per bin.
        writes: write answers per bin.
        failed: failed requests (reads and writes) per bin.
        faults: ``(seconds from the start, label)`` of each fault.
    """

    width: float
    starts: Sequence[float]
    reads: Mapping[str, Sequence[int]]
    writes: Sequence[int]
    failed: Sequence[int]
    faults: Sequence[tuple[float, str]]

    def shares(self) -> dict[str, list[float]]:
        """Each node's percentage of the read answers, per bin (0 in an empty bin)."""
        totals = [sum(counts[i] for counts in self.reads.values()) for i in range(len(self.starts))]
        return {
            node: [100.0 * n / t if t else 0.0 for n, t in zip(counts, totals, strict=True)]
            for node, counts in self.reads.items()
        }


def _count(times: Sequence[float], edges: Sequence[float]) -> list[int]:
    """How many of the sorted ``times`` fall in each ``[edges[i], edges[i+1])``."""
    marks = [bisect.bisect_left(times, edge) for edge in edges]
    return [hi - lo for lo, hi in itertools.pairwise(marks)]


def fault_label(fault: Fault) -> str:
    """``kill i2``, ``hang i3``, ``add i4`` ..."""
    verb = {"pause": "hang"}.get(fault.step.action, fault.step.action)
    return f"{verb} {fault.node}"


def bin_width(duration: float) -> float:
    """About 120 bins, never narrower than a quarter of a second."""
    return max(0.25, round(duration / 120, 2))


def timeline(recorder: Recorder, width: float, node_order: Sequence[str] = ()) -> Timeline:
    """Bin ``recorder``'s run (from its origin to its end) into ``width``-second bins."""
    origin = recorder.origin
    end = recorder.end if recorder.end is not None else origin
    count = max(1, math.ceil((end - origin) / width - 1e-9))
    edges = [origin + i * width for i in range(count + 1)]
    names = list(node_order) + sorted(n for n in recorder.answers if n not in node_order)
    reads = {name: _count(recorder.answers.get(name, []), edges) for name in names}
    failures = sorted(at for at, _op, _kind in recorder.failures)
    return Timeline(
        width=width,
        starts=[edge - origin for edge in edges[:-1]],
        reads=reads,
        writes=_count(recorder.writes, edges),
        failed=_count(failures, edges),
        faults=[(f.started - origin, fault_label(f)) for f in recorder.faults],
    )


def supported_formats() -> set[str]:
    """The image formats matplotlib can write (file name suffixes)."""
    from matplotlib.figure import Figure

    return set(Figure().canvas.get_supported_filetypes())


def draw(line: Timeline, path: Path, title: str) -> Path:
    """Draw ``line`` into ``path`` (the format follows the suffix); return the path."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(10, 6.4))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 2)})
    xs = list(line.starts)
    width = line.width
    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(line.reads)}

    base = [0.0] * len(xs)
    for name, counts in line.reads.items():
        ys = [n / width for n in counts]
        top.bar(xs, ys, width, base, align="edge", color=colors[name], linewidth=0,
                label=f"reads via {name}")  # fmt: skip
        base = [b + y for b, y in zip(base, ys, strict=True)]
    writes = [n / width for n in line.writes]
    top.bar(xs, writes, width, base, align="edge", color=WRITES, linewidth=0, label="writes")
    base = [b + y for b, y in zip(base, writes, strict=True)]
    failed = [n / width for n in line.failed]
    top.bar(xs, failed, width, base, align="edge", color=FAILED, linewidth=0, label="failed")
    top.set_ylabel("requests/s")
    top.set_title(title, loc="left", fontsize=10)

    base = [0.0] * len(xs)
    for name, share in line.shares().items():
        bottom.bar(xs, share, width, base, align="edge", color=colors[name], linewidth=0)
        base = [b + s for b, s in zip(base, share, strict=True)]
    bottom.set_ylim(0, 100)
    bottom.set_ylabel("share of reads (%)")
    bottom.set_xlabel("seconds since the workload started (dashed: a fault of the chaos script)")

    for at, label in line.faults:
        for ax in (top, bottom):
            ax.axvline(at, color="black", linestyle="--", linewidth=1)
        top.annotate(
            label,
            (at, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            fontsize=8,
            rotation=90,
        )
    end = xs[-1] + width if xs else 0.0
    bottom.set_xlim(0, end)
    fig.legend(*top.get_legend_handles_labels(), loc="upper right", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    return path
