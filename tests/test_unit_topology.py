"""Unit tests: catalog states, build_topology, the topology diff and check_tiers."""

from __future__ import annotations

import json
from typing import Any

import pytest

from picopyn_actors import Address, ConfigError
from picopyn_actors._topology import (
    CatalogState,
    NodeInfo,
    Role,
    Selector,
    StateValue,
    Topology,
    build_topology,
    check_tiers,
    diff,
    parse_state,
)

# -- parse_state -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        '["Online",3]',
        '["Online", 3]',
        b'["Online",3]',
        '{"Online": 3}',
        ["Online", 3],
        ("Online", 3),
        {"Online": 3},
        ["Online", "3"],
    ],
)
def test_parse_state_both_encodings(value: Any) -> None:
    assert parse_state(value) == StateValue(CatalogState.ONLINE, 3)


def test_parse_state_every_variant() -> None:
    assert parse_state('["Offline",0]').variant is CatalogState.OFFLINE
    assert parse_state('{"Expelled": 7}') == StateValue(CatalogState.EXPELLED, 7)
    assert str(parse_state('["Online",2]')) == "Online(2)"


@pytest.mark.parametrize(
    "value",
    [
        '["Bogus",1]',
        '["Online"]',
        '["Online",1,2]',
        '{"Online": 1, "Offline": 2}',
        '["Online","x"]',
        '["Online",null]',
        "not json",
        '"Online"',
        None,
        42,
        {},
    ],
)
def test_parse_state_rejects_garbage_with_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match=r"state|Expecting|JSON"):
        parse_state(value)


# -- build_topology ------------------------------------------------------------------------


def row(
    name: str,
    index: int,
    *,
    current: Any = '["Online",1]',
    target: Any = '["Online",1]',
    tier: str = "default",
    replicaset: str | None = None,
    address: str | None = None,
    uuid: str | None = None,
    failure_domain: Any = '{"zone": "a"}',
) -> dict[str, Any]:
    return {
        "name": name,
        "uuid": uuid or f"uuid-{name}",
        "raft_id": index,
        "tier": tier,
        "replicaset_name": replicaset or f"r{index}",
        "current_state": current,
        "target_state": target,
        "failure_domain": failure_domain,
        "address": address or f"10.0.0.{index}:4327",
    }


def test_build_topology_decodes_rows() -> None:
    topo = build_topology(
        [
            row("i1", 1, replicaset="r1"),
            row("i2", 2, replicaset="r1", current={"Offline": 2}, failure_domain=None),
            row("i3", 3, tier="storage", address="[::1]:5000", failure_domain={"dc": "x"}),
        ],
        masters={"r1": "i1"},
        source="uuid-i1",
    )
    assert topo.source == "uuid-i1"
    assert set(topo.nodes) == {"i1", "i2", "i3"}
    assert topo.tiers == frozenset({"default", "storage"})
    i1, i2, i3 = topo.nodes["i1"], topo.nodes["i2"], topo.nodes["i3"]
    assert i1.address == Address("10.0.0.1", 4327)
    assert i1.failure_domain == (("zone", "a"),)
    assert i1.is_master and not i2.is_master
    assert i3.is_master  # no master known for r3: counts as master
    assert i2.current == StateValue(CatalogState.OFFLINE, 2)
    assert i2.failure_domain == ()
    assert i3.address == Address("::1", 5000)
    assert i3.failure_domain == (("dc", "x"),)
    assert i1.routable and not i2.routable
    assert i2.incarnation == 2


def test_build_topology_skips_rows_it_cannot_decode() -> None:
    good = row("i1", 1)
    bad_address = row("i2", 2, address="::1:bad")
    bad_state = row("i3", 3, current='["Zombie",1]')
    missing = {k: v for k, v in row("i4", 4).items() if k != "uuid"}
    bad_raft = row("i5", 5) | {"raft_id": "five"}
    bad_domain = row("i6", 6, failure_domain="{not json")
    topo = build_topology([good, bad_address, bad_state, missing, bad_raft, bad_domain])
    assert set(topo.nodes) == {"i1"}


def test_node_info_routable_and_expelled() -> None:
    def info(current: str, target: str) -> NodeInfo:
        return build_topology([row("i1", 1, current=current, target=target)]).nodes["i1"]

    assert info('["Online",1]', '["Online",1]').routable
    assert not info('["Online",1]', '["Offline",1]').routable
    assert not info('["Offline",1]', '["Online",2]').routable
    assert info('["Online",1]', '["Expelled",1]').expelled
    assert info('["Expelled",1]', '["Expelled",1]').expelled
    assert not info('["Offline",1]', '["Offline",1]').expelled


# -- diff ------------------------------------------------------------------------------------


def topology(*rows: dict[str, Any], masters: dict[str, str] | None = None) -> Topology:
    return build_topology(rows, masters)


def running(topo: Topology, *names: str) -> dict[str, NodeInfo]:
    return {name: topo.nodes[name] for name in names}


BASE = topology(row("i1", 1), row("i2", 2), row("i3", 3))


def test_diff_starts_routable_new_nodes() -> None:
    new = topology(
        row("i1", 1),
        row("i2", 2),
        row("i3", 3),
        row("i4", 4),
        row("i5", 5, current='["Offline",1]'),
        row("i6", 6, target='["Offline",1]'),
        row("i7", 7, current='["Expelled",1]', target='["Expelled",1]'),
    )
    plan = diff(running(BASE, "i1", "i2", "i3"), new)
    assert [n.name for n in plan.start] == ["i4"]
    assert plan.drain == plan.retire == plan.wake == ()
    assert [n.name for n in plan.update] == ["i1", "i2", "i3"]
    assert not plan.empty


def test_diff_no_change_is_empty() -> None:
    plan = diff(running(BASE, "i1", "i2", "i3"), BASE)
    assert plan.empty
    assert [n.name for n in plan.update] == ["i1", "i2", "i3"]


def test_diff_drains_offline_nodes() -> None:
    new = topology(
        row("i1", 1),
        row("i2", 2, target='["Offline",1]'),
        row("i3", 3, current='["Offline",1]', target='["Offline",1]'),
    )
    plan = diff(running(BASE, "i1", "i2", "i3"), new)
    assert plan.drain == ("i2", "i3")
    assert plan.start == () and plan.retire == () and plan.wake == ()
    assert [n.name for n in plan.update] == ["i1"]


def test_diff_retires_expelled_and_vanished_nodes() -> None:
    new = topology(row("i1", 1), row("i2", 2, target='["Expelled",1]'))
    plan = diff(running(BASE, "i1", "i2", "i3"), new)
    assert plan.retire == ("i2", "i3")
    assert plan.drain == () and plan.start == ()
    assert [n.name for n in plan.update] == ["i1"]


def test_diff_wakes_a_node_whose_incarnation_rose() -> None:
    new = topology(row("i1", 1), row("i2", 2, current='["Online",2]', target='["Online",2]'))
    plan = diff(running(BASE, "i1", "i2"), new)
    assert plan.wake == ("i2",)
    assert plan.start == () and plan.drain == () and plan.retire == ()
    assert new.nodes["i2"] in plan.update


def test_diff_does_not_wake_on_same_or_lower_incarnation() -> None:
    old = topology(row("i1", 1, current='["Online",5]', target='["Online",5]'))
    new = topology(row("i1", 1, current='["Online",4]', target='["Online",5]'))
    assert diff(running(old, "i1"), new).wake == ()


@pytest.mark.parametrize(
    "change", [{"uuid": "uuid-other"}, {"address": "10.0.0.9:4327"}, {"address": "10.0.0.2:1"}]
)
def test_diff_replaces_a_node_whose_uuid_or_address_changed(change: dict[str, str]) -> None:
    new = topology(row("i1", 1), row("i2", 2, **change))  # type: ignore[arg-type]
    plan = diff(running(BASE, "i1", "i2"), new)
    assert plan.retire == ("i2",)
    assert [n.name for n in plan.start] == ["i2"]
    assert plan.start[0] is new.nodes["i2"]


def test_diff_changed_uuid_not_routable_is_only_retired() -> None:
    new = topology(row("i2", 2, uuid="uuid-new", current='["Offline",1]'))
    plan = diff(running(BASE, "i2"), new)
    assert plan.retire == ("i2",)
    assert plan.start == ()


def test_diff_tier_selection() -> None:
    new = topology(row("i1", 1, tier="router"), row("i2", 2, tier="storage"), row("i3", 3))
    selector = Selector(tiers=frozenset({"storage"}))
    # From scratch: only the storage node starts.
    assert [n.name for n in diff({}, new, selector).start] == ["i2"]
    # Running nodes that are no longer selected are drained, not retired.
    plan = diff(running(new, "i1", "i2", "i3"), new, selector)
    assert plan.drain == ("i1", "i3")
    assert [n.name for n in plan.update] == ["i2"]


def test_diff_role_selection() -> None:
    masters = {"r1": "i1", "r2": "i3"}
    new = topology(
        row("i1", 1, replicaset="r1"),
        row("i2", 2, replicaset="r1"),
        row("i3", 3, replicaset="r2"),
        row("i4", 4, replicaset="r2"),
        masters=masters,
    )
    leaders = diff({}, new, Selector(role=Role.LEADER))
    replicas = diff({}, new, Selector(role=Role.REPLICA))
    anyone = diff({}, new, Selector(role=Role.ANY))
    assert [n.name for n in leaders.start] == ["i1", "i3"]
    assert [n.name for n in replicas.start] == ["i2", "i4"]
    assert [n.name for n in anyone.start] == ["i1", "i2", "i3", "i4"]
    # A switchover: i2 becomes master of r1; with role=leader, i1 drains, i2 starts.
    switched = topology(
        row("i1", 1, replicaset="r1"),
        row("i2", 2, replicaset="r1"),
        masters={"r1": "i2"},
    )
    plan = diff(running(new, "i1"), switched, Selector(role=Role.LEADER))
    assert plan.drain == ("i1",)
    assert [n.name for n in plan.start] == ["i2"]


def test_diff_expelled_wins_over_deselection() -> None:
    new = topology(row("i1", 1, tier="other", target='["Expelled",1]'))
    plan = diff(running(BASE, "i1"), new, Selector(tiers=frozenset({"default"})))
    assert plan.retire == ("i1",)
    assert plan.drain == ()


def test_diff_is_pure() -> None:
    run = running(BASE, "i1", "i2")
    before = dict(run)
    new = topology(row("i1", 1, current='["Online",3]', target='["Online",3]'), row("i4", 4))
    first = diff(run, new)
    second = diff(run, new)
    assert first == second
    assert run == before


# -- check_tiers -------------------------------------------------------------------------------


def test_check_tiers() -> None:
    topo = topology(row("i1", 1, tier="router"), row("i2", 2, tier="storage"))
    check_tiers(Selector(), topo)
    check_tiers(Selector(tiers=frozenset({"storage"})), topo)
    check_tiers(Selector(tiers=frozenset({"anything"})), Topology(nodes={}))
    with pytest.raises(ConfigError) as info:
        check_tiers(Selector(tiers=frozenset({"storage", "nope", "gone"})), topo)
    message = str(info.value)
    assert "gone, nope" in message
    assert "router, storage" in message


def test_rows_round_trip_through_json_text() -> None:
    # The catalog returns JSON text for states and failure domains.
    text_row = row("i1", 1, current=json.dumps(["Online", 9]), failure_domain=json.dumps({}))
    node = build_topology([text_row]).nodes["i1"]
    assert node.current.incarnation == 9
    assert node.incarnation == 9
    assert node.failure_domain == ()
