"""Discovery rows to :class:`Topology`, and the pure decisions about trusting it.

Nothing here does I/O: the supervisor fetches rows, this module decides:

* :func:`build_topology` turns rows into a view of the cluster, and reports
  the rows it cannot decode (:class:`RowProblem`) instead of dropping them;
* :func:`check_view` says whether a view can be trusted at all (the node
  that answered is in it; it is not empty while nodes serve);
* :func:`guard` keeps a node's last good entry where one row is bad, and
  never lets two nodes share one address;
* :func:`diff` compares the running node actors with a view, with a reason
  for every node it stops;
* :func:`serving_stops` and :func:`confirmation` say whether a plan stops
  nodes that serve now, and so must be confirmed by another node first;
* :func:`order_addresses` and :func:`discovery_deadline` decide where and how
  long discovery asks.

Example::

    >>> view = build_topology(rows, masters={"r1": "i1"}, source="i1", source_uuid=uuid)
    >>> check_view(view, serving={"i1", "i2"})          # None: sane
    >>> guarded, notes = guard(view, known, running)
    >>> plan = diff(running, guarded, Selector())
    >>> confirmation(plan, serving)                     # None: act at once
"""

from __future__ import annotations

import enum
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import attrs

from ._dsn import Address
from ._errors import ConfigError

#: The static discovery join from Picodata's system tables. A LEFT JOIN, so
#: that an instance without a pgproto address shows up (with a NULL address)
#: instead of vanishing from the view.
DISCOVERY_QUERY = (
    "SELECT i.name, i.uuid, i.raft_id, i.tier, i.replicaset_name, "
    "i.current_state, i.target_state, i.failure_domain, p.address "
    "FROM _pico_instance i LEFT JOIN _pico_peer_address p "
    "ON i.raft_id = p.raft_id AND p.connection_type = 'pgproto'"
)
#: Replicaset masters, for ``role="leader"`` / ``"replica"``.
MASTERS_QUERY = "SELECT name, current_master_name FROM _pico_replicaset"
#: The raft leader as the answering node knows it: by uuid, else by raft id.
LEADER_QUERIES = ("SELECT pico_raft_leader_uuid()", "SELECT pico_raft_leader_id()")
#: The shortest deadline a discovery attempt gets (see :func:`discovery_deadline`).
DISCOVERY_FLOOR = 1.0


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
class RowProblem:
    """A catalog row that discovery could not use.

    Attributes:
        name: the instance name, when the row has one.
        uuid: the instance uuid, when the row has one.
        reason: what is wrong, in words (``"catalog row unreadable: ..."``).
    """

    name: str | None
    uuid: str | None
    reason: str


@attrs.frozen
class Topology:
    """The cluster as one discovery run saw it.

    Attributes:
        nodes: the instances whose rows decoded, by name.
        source: who answered (a name or an address), for messages.
        source_uuid: what the answering server said its uuid is, or ``None``
            when it could not say (a release without ``pico_instance_uuid()``
            and ``instance_uuid()``).
        problems: rows that could not be used, each with its reason.
    """

    nodes: Mapping[str, NodeInfo]
    source: str = ""
    source_uuid: str | None = None
    problems: tuple[RowProblem, ...] = ()

    @property
    def tiers(self) -> frozenset[str]:
        """Every tier name in the catalog."""
        return frozenset(n.tier for n in self.nodes.values())

    def named(self, uuid: str) -> str | None:
        """The name of the instance with ``uuid`` in this view (problem rows included)."""
        for node in self.nodes.values():
            if node.uuid == uuid:
                return node.name
        for problem in self.problems:
            if problem.uuid == uuid:
                return problem.name
        return None


def _failure_domain(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    decoded = json.loads(value) if isinstance(value, str | bytes) else value
    if not isinstance(decoded, dict):
        return ()
    return tuple(sorted((str(k), str(v)) for k, v in decoded.items()))


def _text(row: Mapping[str, Any], key: str) -> str | None:
    value = row.get(key)
    return None if value is None else str(value)


_REQUIRED = ("name", "uuid", "raft_id", "tier", "replicaset_name")


def build_topology(
    rows: Iterable[Mapping[str, Any]],
    masters: Mapping[str, str | None] | None = None,
    source: str = "",
    source_uuid: str | None = None,
) -> Topology:
    """Turn rows of :data:`DISCOVERY_QUERY` into a :class:`Topology`.

    A row that cannot be decoded (a bad address or state, a missing column)
    or that has no pgproto address is not dropped in silence: it becomes a
    :class:`RowProblem` of the view, with the name and uuid it carries, so
    that the supervisor can keep that node's last good entry and say why.
    """
    nodes: dict[str, NodeInfo] = {}
    problems: list[RowProblem] = []
    for row in rows:
        name, uuid = _text(row, "name"), _text(row, "uuid")
        if row.get("address") is None and "address" in row:
            problems.append(RowProblem(name, uuid, "no pgproto address in the catalog"))
            continue
        try:
            empty = [c for c in _REQUIRED if row[c] is None]
            if empty:
                raise ValueError(f"{', '.join(empty)} is NULL")
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
        except KeyError as exc:
            problems.append(RowProblem(name, uuid, f"catalog row unreadable: no column {exc}"))
        except (ValueError, TypeError, ConfigError) as exc:
            problems.append(RowProblem(name, uuid, f"catalog row unreadable: {exc}"))
    return Topology(nodes=nodes, source=source, source_uuid=source_uuid, problems=tuple(problems))


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


# -- trusting a view --------------------------------------------------------------------


def check_view(view: Topology, serving: Collection[str]) -> str | None:
    """Why ``view`` cannot be trusted at all, or ``None`` when it is sane.

    ``serving`` names the nodes that serve right now. A sane view lists the
    node that answered (by the uuid it gave, when it gave one), and is not
    empty while nodes serve: a node whose catalog is empty or stale to the
    point of leaving itself out is lagging, broken or not a member at all.
    """
    if not view.nodes and not view.problems and serving:
        return f"it lists no node while {len(serving)} serve"
    uuid = view.source_uuid
    if uuid is not None and view.named(uuid) is None:
        return f"it does not list the node that answered (uuid {uuid})"
    return None


@attrs.frozen
class Note:
    """Something wrong in an accepted view, about one node, to be told once.

    Attributes:
        node: the node it is about, when known.
        kind: ``"unreadable"``, ``"no-address"`` or ``"duplicate-address"``.
        message: what is wrong and what the client does about it.
        others: other nodes it concerns (those whose address was claimed).
    """

    node: str | None
    kind: str
    message: str
    others: tuple[str, ...] = ()


def guard(
    view: Topology,
    known: Mapping[str, NodeInfo],
    running: Mapping[str, NodeInfo],
) -> tuple[Topology, tuple[Note, ...]]:
    """Make ``view`` safe to act on; return it with a note for each change.

    * A node whose row is a :class:`RowProblem` keeps its last good entry
      from ``known`` (the last accepted view and the running actors), so that
      one bad row never retires it; without one it is left out.
    * No two nodes that may be served (routable, or running and not
      expelled) share an address. Of those that claim one address, the one
      running there (in ``running``) keeps it; any other keeps its last good
      entry if that is elsewhere, or is left out. When none runs there, none
      is served there.

    Pure: the inputs are not changed.
    """
    nodes = dict(view.nodes)
    notes: list[Note] = []
    source = view.source or "the answering node"
    for problem in view.problems:
        kind = "no-address" if problem.reason.startswith("no pgproto") else "unreadable"
        if problem.name is None:
            notes.append(Note(None, kind, f"catalog of {source}: {problem.reason}"))
            continue
        old = known.get(problem.name)
        if old is not None and problem.name not in nodes:
            nodes[problem.name] = old
            action = f"keeping its last good entry ({old.address}, {old.current})"
        else:
            action = "not used"
        notes.append(
            Note(
                problem.name,
                kind,
                f"catalog of {source}: node {problem.name}: {problem.reason}; {action}",
            )
        )
    _separate_addresses(nodes, known, running, source, notes)
    guarded = attrs.evolve(view, nodes=nodes)
    return guarded, tuple(notes)


def _separate_addresses(
    nodes: dict[str, NodeInfo],
    known: Mapping[str, NodeInfo],
    running: Mapping[str, NodeInfo],
    source: str,
    notes: list[Note],
) -> None:
    """Resolve address clashes in ``nodes``, in place (see :func:`guard`).

    Each round settles one shared address; a node goes back to its last good
    address at most once, so the rounds end.
    """
    reverted: set[str] = set()
    while True:
        claims: dict[Address, list[str]] = {}
        for name in sorted(nodes):
            node = nodes[name]
            if node.routable or (name in running and not node.expelled):
                claims.setdefault(node.address, []).append(name)
        clash = next(((a, names) for a, names in claims.items() if len(names) > 1), None)
        if clash is None:
            return
        address, names = clash
        holders = [n for n in names if n in running and running[n].address == address]
        keeper = holders[0] if len(holders) == 1 else None
        for name in names:
            if name == keeper:
                continue
            if keeper is not None:
                why = f"the catalog gives it {address}, the address of {keeper}"
            else:
                others = ", ".join(n for n in names if n != name)
                why = f"the catalog gives it {address}, and {others} the same"
            old = known.get(name)
            if old is not None and old.address != address and name not in reverted:
                nodes[name] = old
                reverted.add(name)
                action = f"keeping its last good address {old.address}"
            else:
                del nodes[name]
                action = f"not serving it at {address}"
            message = f"catalog of {source}: node {name}: {why}; {action}"
            concerned = (keeper,) if keeper is not None else tuple(n for n in names if n != name)
            notes.append(Note(name, "duplicate-address", message, concerned))


@attrs.frozen
class Plan:
    """What the supervisor must do to move from the running actors to a topology.

    Attributes:
        start: nodes that are routable and have no actor yet.
        drain: names of running nodes to stop gracefully (target or current
            Offline, or no longer selected); in-flight work finishes.
        retire: names of running nodes that were expelled, vanished, or whose
            uuid or address changed (a different server).
        wake: names of running nodes whose incarnation rose while still
            routable: the node restarted, so cut any backoff short.
        update: every running node that stays, with its fresh catalog row.
        reasons: why each node of ``drain`` and ``retire`` stops, in words.
    """

    start: tuple[NodeInfo, ...] = ()
    drain: tuple[str, ...] = ()
    retire: tuple[str, ...] = ()
    wake: tuple[str, ...] = ()
    update: tuple[NodeInfo, ...] = ()
    reasons: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def empty(self) -> bool:
        """Nothing to start, stop or wake."""
        return not (self.start or self.drain or self.retire or self.wake)

    @property
    def stops(self) -> frozenset[str]:
        """Every node this plan drains or retires."""
        return frozenset(self.drain) | frozenset(self.retire)


def _states(node: NodeInfo) -> str:
    return f"current {node.current}, target {node.target}"


def _replaced(old: NodeInfo, new: NodeInfo) -> str:
    changes = []
    if old.address != new.address:
        changes.append(f"address changed from {old.address} to {new.address}")
    if old.uuid != new.uuid:
        changes.append(f"uuid changed from {old.uuid} to {new.uuid}")
    return "; ".join(changes)


def _deselected(selector: Selector, node: NodeInfo) -> str:
    if selector.tiers is not None and node.tier not in selector.tiers:
        return f"tier {node.tier} is not selected"
    if selector.role is Role.LEADER:
        return f"no longer the master of {node.replicaset} (role=leader)"
    return f"now the master of {node.replicaset} (role=replica)"


def diff(
    running: Mapping[str, NodeInfo],
    new: Topology,
    selector: Selector = Selector(),
) -> Plan:
    """Compare the running node actors (by name, with the catalog row each was
    last given) with a fresh topology. Pure: no I/O, no clock.

    A node whose uuid or address changed under the same name is retired and
    started again: it is a different server. Every node stopped gets its
    reason in :attr:`Plan.reasons`: ``"expelled (...)"`` only for Expelled,
    ``"address changed from X to Y"``, ``"uuid changed from U to V"``,
    ``"no longer in the catalog"``, ``"catalog: current ..., target ..."``
    or ``"no longer selected (...)"``.
    """
    start: list[NodeInfo] = []
    drain: list[str] = []
    retire: list[str] = []
    wake: list[str] = []
    update: list[NodeInfo] = []
    reasons: dict[str, str] = {}
    for name, node in sorted(new.nodes.items()):
        wanted = selector.accepts(node)
        old = running.get(name)
        if old is None:
            if wanted and node.routable:
                start.append(node)
            continue
        if old.uuid != node.uuid or old.address != node.address:
            retire.append(name)
            reasons[name] = _replaced(old, node)
            if wanted and node.routable:
                start.append(node)
        elif node.expelled:
            retire.append(name)
            reasons[name] = f"expelled (catalog: {_states(node)})"
        elif not node.routable:
            drain.append(name)
            reasons[name] = f"catalog: {_states(node)}"
        elif not wanted:
            drain.append(name)
            reasons[name] = _deselected(selector, node)
        else:
            update.append(node)
            if node.incarnation > old.incarnation:
                wake.append(name)
    for name in sorted(running):
        if name not in new.nodes:
            retire.append(name)
            reasons[name] = "no longer in the catalog"
    return Plan(tuple(start), tuple(drain), tuple(retire), tuple(wake), tuple(update), reasons)


# -- confirming a plan ------------------------------------------------------------------


def serving_stops(plan: Plan, serving: Collection[str]) -> frozenset[str]:
    """The nodes that serve right now and that ``plan`` would drain or retire."""
    return plan.stops & frozenset(serving)


@attrs.frozen
class Confirmation:
    """A plan would stop nodes that serve now: another node must agree first.

    Attributes:
        stops: the serving nodes the plan would stop.
        serving: how many nodes serve now.
    """

    stops: frozenset[str]
    serving: int

    @property
    def majority(self) -> bool:
        """The plan would stop more than half of the serving nodes."""
        return 2 * len(self.stops) > self.serving

    def __str__(self) -> str:
        names = ", ".join(sorted(self.stops))
        share = f"{len(self.stops)} of {self.serving} serving nodes"
        return f"{names} ({share}{', a majority' if self.majority else ''})"


def confirmation(plan: Plan, serving: Collection[str]) -> Confirmation | None:
    """What must be confirmed before acting on ``plan``, or ``None``: act at once.

    Any plan that drains or retires a node serving now needs a second
    opinion (the raft leader's catalog, or another node's), whatever the
    reason: one node's word, even the leader's about itself, is not enough
    to take a healthy node out of service. Nodes that do not serve (down,
    quarantined, connecting) are stopped without one: nothing is lost.
    """
    stops = serving_stops(plan, serving)
    if not stops:
        return None
    return Confirmation(stops, len(frozenset(serving)))


def agrees(needed: Confirmation, other: Plan) -> bool:
    """``other`` (the plan from another node's view) stops every node in ``needed``."""
    return needed.stops <= other.stops


def find_node(key: str | int, *views: Iterable[NodeInfo]) -> NodeInfo | None:
    """The first node with uuid ``key`` (a ``str``) or raft id ``key`` (an ``int``)."""
    for nodes in views:
        for node in nodes:
            if (node.uuid if isinstance(key, str) else node.raft_id) == key:
                return node
    return None


def order_addresses(
    groups: Iterable[Iterable[Address]], avoid: Collection[Address]
) -> list[Address]:
    """Every address of ``groups``, once, in order; those in ``avoid`` last (in order too)."""
    seen: set[Address] = set()
    ordered: list[Address] = []
    for group in groups:
        for address in group:
            if address not in seen:
                seen.add(address)
                ordered.append(address)
    return [a for a in ordered if a not in avoid] + [a for a in ordered if a in avoid]


def discovery_deadline(connect_timeout: float, discovery_interval: float) -> float:
    """How long one discovery attempt at one node may take, connect included.

    Tied to the interval (a node that cannot answer within about one interval
    is skipped for this run), never below :data:`DISCOVERY_FLOOR` (a loaded but
    healthy node needs a moment) and never above ``connect_timeout``.
    """
    return min(connect_timeout, max(discovery_interval, DISCOVERY_FLOOR))


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
