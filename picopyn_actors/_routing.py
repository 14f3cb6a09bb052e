"""Bucket routing data: which replicaset owns a bucket, and who is its master.

Pure: the supervisor fetches the rows (:data:`REPLICASETS_QUERY`,
:data:`TIERS_QUERY` and :func:`buckets_query`), this module turns them into an
immutable :class:`Routing` snapshot, and the dispatcher reads it to send a
keyed request straight to the master of the replicaset that owns its bucket.

Example::

    >>> routing = Routing.build(replicasets, tiers, {"default": buckets_json})
    >>> routing.owner("default", 1934)
    'r1'
    >>> routing.masters["r1"]
    'i1'
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

#: Every replicaset: its name, uuid and current master.
REPLICASETS_QUERY = "SELECT name, uuid, current_master_name FROM _pico_replicaset"
#: Every tier and its bucket count.
TIERS_QUERY = "SELECT name, bucket_count FROM _pico_tier"
#: A sharded table's distribution and format.
TABLE_QUERY = "SELECT distribution, format FROM _pico_table WHERE name = $1"


def buckets_query(tier: str) -> str:
    """``SELECT _pico_bucket('<tier>')``: the tier's bucket ranges, as one JSON array.

    The tier is a literal (a volatile function takes no parameters in every
    release): quotes in it are doubled.
    """
    quoted = tier.replace("'", "''")
    return f"SELECT _pico_bucket('{quoted}')"


@attrs.frozen
class BucketMap:
    """One tier's buckets: sorted range starts and the replicaset owning each range."""

    tier: str
    bucket_count: int
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    owners: tuple[str, ...]

    def owner(self, bucket_id: int) -> str | None:
        """The replicaset that owns ``bucket_id``, or ``None`` when no range holds it."""
        index = bisect.bisect_right(self.starts, bucket_id) - 1
        if index < 0 or bucket_id > self.ends[index]:
            return None
        return self.owners[index]


def parse_buckets(
    tier: str, bucket_count: int, raw: object, replicaset_names: Mapping[str, str]
) -> BucketMap:
    """``_pico_bucket(tier)``'s answer (JSON text or decoded) to a :class:`BucketMap`.

    A range names its owner by replicaset uuid (``current_replicaset_uuid``);
    ``replicaset_names`` maps uuids to names.

    Raises:
        ValueError: the answer is not a list of ranges, or names an unknown
            replicaset.
    """
    decoded = json.loads(raw) if isinstance(raw, str | bytes) else raw
    if not isinstance(decoded, list):
        raise ValueError(f"_pico_bucket({tier!r}) did not answer a list of ranges: {raw!r}")
    ranges: list[tuple[int, int, str]] = []
    for item in decoded:
        try:
            start, end = int(item["bucket_id_start"]), int(item["bucket_id_end"])
            uuid = str(item["current_replicaset_uuid"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"_pico_bucket({tier!r}): not a bucket range: {item!r}") from None
        name = replicaset_names.get(uuid)
        if name is None:
            raise ValueError(f"_pico_bucket({tier!r}): range owned by unknown replicaset {uuid}")
        ranges.append((start, end, name))
    ranges.sort()
    return BucketMap(
        tier,
        bucket_count,
        tuple(r[0] for r in ranges),
        tuple(r[1] for r in ranges),
        tuple(r[2] for r in ranges),
    )


@attrs.frozen
class Routing:
    """Everything the dispatcher needs to route keyed requests, as one snapshot.

    Attributes:
        maps: each routed tier's :class:`BucketMap`.
        masters: each replicaset's current master (an instance name).
        bucket_counts: each tier's bucket count.
    """

    maps: Mapping[str, BucketMap] = attrs.field(factory=dict)
    masters: Mapping[str, str] = attrs.field(factory=dict)
    bucket_counts: Mapping[str, int] = attrs.field(factory=dict)

    def owner(self, tier: str, bucket_id: int) -> str | None:
        """The replicaset owning ``bucket_id`` in ``tier``, or ``None`` if unknown."""
        bucket_map = self.maps.get(tier)
        return None if bucket_map is None else bucket_map.owner(bucket_id)

    def master_of(self, tier: str, bucket_id: int) -> str | None:
        """The instance name of the master that owns ``bucket_id``, or ``None``."""
        owner = self.owner(tier, bucket_id)
        return None if owner is None else self.masters.get(owner)

    def refreshed(
        self,
        replicasets: Iterable[Mapping[str, Any]],
        tiers: Iterable[Mapping[str, Any]],
        buckets: Mapping[str, object],
    ) -> tuple[Routing, dict[str, str]]:
        """A new snapshot from fresh rows, and the problems met, by tier.

        ``buckets`` maps a tier to ``_pico_bucket``'s answer, or to the
        exception it raised. A tier whose answer failed or could not be read
        keeps its last good map (a rebalance in progress makes
        ``_pico_bucket`` fail: routing on the old map is still correct, as
        Picodata forwards what reached the wrong node).
        """
        masters: dict[str, str] = {}
        names: dict[str, str] = {}
        for row in replicasets:
            name = str(row["name"])
            names[str(row["uuid"])] = name
            master = row.get("current_master_name")
            if master:
                masters[name] = str(master)
        counts = {str(row["name"]): int(row["bucket_count"]) for row in tiers}
        maps = dict(self.maps)
        problems: dict[str, str] = {}
        for tier, answer in buckets.items():
            if isinstance(answer, BaseException):
                problems[tier] = str(answer) or type(answer).__name__
                continue
            count = counts.get(tier)
            if count is None:
                problems[tier] = f"tier {tier!r} is not in _pico_tier"
                continue
            try:
                maps[tier] = parse_buckets(tier, count, answer, names)
            except ValueError as exc:
                problems[tier] = str(exc)
        return Routing(maps, masters, counts), problems
