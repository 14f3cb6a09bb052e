"""Sharded tables' keys, for :meth:`Cluster.bucket`: read once, then cached."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._bucket import Bucket, ShardingKey, sharding_key
from ._errors import ConfigError
from ._routing import TABLE_QUERY

if TYPE_CHECKING:
    from ._cluster import Cluster
    from ._supervisor import Supervisor

_TIER_QUERY = "SELECT bucket_count FROM _pico_tier WHERE name = $1"


@attrs.define(eq=False)
class BucketKeys:
    """Each sharded table's :class:`ShardingKey`, read from ``_pico_table`` once."""

    cluster: Cluster
    supervisor: Supervisor
    _keys: dict[str, ShardingKey] = attrs.field(init=False, factory=dict)

    async def bucket(self, table: str, key_values: Sequence[Any]) -> Bucket:
        """The bucket of ``key_values`` in ``table``; see :meth:`Cluster.bucket`."""
        key = self._keys.get(table)
        if key is None:
            key = await self._sharding_key(table)
        count = self.supervisor.routing.bucket_counts.get(key.tier)
        if count is None:
            count = await self._bucket_count(key.tier)
        bucket = key.bucket(key_values, count)
        ready = self.supervisor.want_routing(key.tier)
        if not ready.is_set():
            with trio.move_on_after(self.cluster.config.connect_timeout):
                await ready.wait()
        return bucket

    async def _sharding_key(self, table: str) -> ShardingKey:
        if not isinstance(table, str) or not table:
            raise ConfigError(f"table must be a table name, got {table!r}")
        row = await self.cluster.fetchrow(TABLE_QUERY, table, idempotent=True)
        if row is None:
            raise ConfigError(f"unknown table {table!r}: it is not in _pico_table")
        key = sharding_key(row["distribution"], row["format"], table=table)
        tiers = self.cluster.config.selector.tiers
        if tiers is not None and key.tier not in tiers:
            raise ConfigError(
                f"table {table!r} lives in tier {key.tier!r}, outside this cluster's "
                f"tiers={sorted(tiers)}"
            )
        self._keys[table] = key
        return key

    async def _bucket_count(self, tier: str) -> int:
        count = await self.cluster.fetchval(_TIER_QUERY, tier, idempotent=True)
        if count is None:
            raise ConfigError(f"tier {tier!r} is not in _pico_tier")
        return int(count)
