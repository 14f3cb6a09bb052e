"""Discovery rows to :class:`Topology`, and the pure topology diff.

Nothing here does I/O: the supervisor fetches rows, this module decides.

Example::

    >>> topo = build_topology(rows, masters={"r1": "i1"})
    >>> plan = diff(current_names, incarnations, topo, Selector())
    >>> plan.start, plan.drain, plan.wake
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ._dsn import Address
from ._errors import ConfigError

#: The static discovery join from Picodata's system tables.
DISCOVERY_QUERY = (
    "SELECT i.name, i.uuid, i.raft_id, i.tier, i.replicaset_name, "
    "i.current_state, i.target_state, i.failure_domain, p.address "
    "FROM _pico_instance i JOIN _pico_peer_address p ON i.raft_id = p.raft_id "
    "WHERE p.connection_type = 'pgproto'"
)
#: Replicaset masters, for ``role="leader"`` / ``"replica"``.
MASTERS_QUERY = "SELECT name, current_master_name FROM _pico_replicaset"


class CatalogState(enum.Enum):
    """An instance state as Picodata's catalog records it."""

    ONLINE = "Online"
    OFFLINE = "Offline"
    EXPELLED = "Expelled"


class Role(enum.Enum):
    """Which nodes of each replicaset to use."""

    ANY = "any"
    LEADER = "leader"
    REPLICA = "replica"


@attrs.frozen
class StateValue:
    """``[variant, incarnation]`` as stored in ``current_state``/``target_state``."""

    variant: CatalogState
    incarnation: int

    def __str__(self) -> str:
        return f"{self.variant.value}({self.incarnation})"


def parse_state(value: Any) -> StateValue:
    """Decode a state: JSON text or already decoded, ``["Online",3]`` or ``{"Online": 3}``.

    Raises:
        ValueError: the value is not a state in either encoding.
    """
    decoded = json.loads(value) if isinstance(value, str | bytes) else value
    if isinstance(decoded, list | tuple) and len(decoded) == 2:
        variant, incarnation = decoded
    elif isinstance(decoded, dict) and len(decoded) == 1:
        ((variant, incarnation),) = decoded.items()
    else:
        raise ValueError(f"not an instance state: {value!r}")
    try:
        return StateValue(CatalogState(variant), int(incarnation))
    except (ValueError, TypeError):
        raise ValueError(f"not an instance state: {value!r}") from None


@attrs.frozen
class NodeInfo:
    """One instance as the catalog describes it."""

    name: str
    uuid: str
    raft_id: int
    tier: str
    replicaset: str
    address: Address
    current: StateValue
    target: StateValue
    failure_domain: tuple[tuple[str, str], ...] = ()
    is_master: bool = True

    @property
    def routable(self) -> bool:
        """Picodata's own rule: current is Online and target is not Offline."""
        return (
            self.current.variant is CatalogState.ONLINE
            and self.target.variant is CatalogState.ONLINE
        )

    @property
    def expelled(self) -> bool:
        """The instance is (being) expelled: it never comes back."""
        return CatalogState.EXPELLED in (self.current.variant, self.target.variant)

    @property
    def incarnation(self) -> int:
        """The highest incarnation seen in either state."""
        return max(self.current.incarnation, self.target.incarnation)


@attrs.frozen
class Topology:
    """The cluster as one discovery run saw it."""

    nodes: Mapping[str, NodeInfo]
    source: str = ""

    @property
    def tiers(self) -> frozenset[str]:
        """Every tier name in the catalog."""
        return frozenset(n.tier for n in self.nodes.values())


def _failure_domain(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    decoded = json.loads(value) if isinstance(value, str | bytes) else value
    if not isinstance(decoded, dict):
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in decoded.items()))


def build_topology(
    rows: Iterable[Mapping[str, Any]],
    masters: Mapping[str, str | None] | None = None,
    source: str = "",
) -> Topology:
    """Turn rows of :data:`DISCOVERY_QUERY` into a :class:`Topology`.

    Rows that cannot be decoded (a bad address, an unknown state) are skipped,
    so that one odd row never stops discovery.
    """
    nodes: dict[str, NodeInfo] = {}
    for row in rows:
        try:
            name = str(row["name"])
            replicaset = str(row["replicaset_name"])
            master = (masters or {}).get(replicaset)
            nodes[name] = NodeInfo(
                name=name,
                uuid=str(row["uuid"]),
                raft_id=int(row["raft_id"]),
                tier=str(row["tier"]),
                replicaset=replicaset,
                address=Address.parse(str(row["address"])),
                current=parse_state(row["current_state"]),
                target=parse_state(row["target_state"]),
                failure_domain=_failure_domain(row["failure_domain"]),
                is_master=master is None or master == name,
            )
        except (KeyError, ValueError, TypeError, ConfigError):
            continue
    return Topology(nodes=nodes, source=source)


@attrs.frozen
class Selector:
    """Which catalog nodes the client uses: by tier and replicaset role."""

    tiers: frozenset[str] | None = None
    role: Role = Role.ANY

    def accepts(self, node: NodeInfo) -> bool:
        """``True`` when ``node`` is in a chosen tier and has the chosen role."""
        if self.tiers is not None and node.tier not in self.tiers:
            return False
        if self.role is Role.LEADER:
            return node.is_master
        if self.role is Role.REPLICA:
            return not node.is_master
        return True


@attrs.frozen
class Plan:
    """What the supervisor must do to move from the running actors to a topology.

    Attributes:
        start: nodes that are routable and have no actor yet.
        drain: names of running nodes to stop gracefully (target or current
            Offline, or no longer selected); in-flight work finishes.
        retire: names of running nodes that were expelled or vanished.
        wake: names of running nodes whose incarnation rose while still
            routable: the node restarted, so cut any backoff short.
        update: every running node that stays, with its fresh catalog row.
    """

    start: tuple[NodeInfo, ...] = ()
    drain: tuple[str, ...] = ()
    retire: tuple[str, ...] = ()
    wake: tuple[str, ...] = ()
    update: tuple[NodeInfo, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to start, stop or wake."""
        return not (self.start or self.drain or self.retire or self.wake)


def diff(
    running: Mapping[str, NodeInfo],
    new: Topology,
    selector: Selector = Selector(),
) -> Plan:
    """Compare the running node actors (by name, with the catalog row each was
    last given) with a fresh topology. Pure: no I/O, no clock.

    A node whose uuid or address changed under the same name is retired and
    started again: it is a different server.
    """
    start: list[NodeInfo] = []
    drain: list[str] = []
    retire: list[str] = []
    wake: list[str] = []
    update: list[NodeInfo] = []
    for name, node in sorted(new.nodes.items()):
        wanted = selector.accepts(node)
        old = running.get(name)
        if old is None:
            if wanted and node.routable:
                start.append(node)
            continue
        if old.uuid != node.uuid or old.address != node.address:
            retire.append(name)
            if wanted and node.routable:
                start.append(node)
        elif node.expelled:
            retire.append(name)
        elif not wanted or not node.routable:
            drain.append(name)
        else:
            update.append(node)
            if node.incarnation > old.incarnation:
                wake.append(name)
    retire.extend(name for name in sorted(running) if name not in new.nodes)
    return Plan(tuple(start), tuple(drain), tuple(retire), tuple(wake), tuple(update))


def check_tiers(selector: Selector, topology: Topology) -> None:
    """Raise :class:`ConfigError` when a requested tier is not in the catalog."""
    if selector.tiers is None or not topology.nodes:
        return
    unknown = selector.tiers - topology.tiers
    if unknown:
        known = ", ".join(sorted(topology.tiers))
        raise ConfigError(f"unknown tier(s) {', '.join(sorted(unknown))}: the cluster has {known}")


def summarize(nodes: Sequence[NodeInfo]) -> str:
    """``i1@127.0.0.1:5001 Online(1), ...`` for logs."""
    return ", ".join(f"{n.name}@{n.address} {n.current}" for n in nodes)
