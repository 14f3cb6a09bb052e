"""Unit tests: catalog states, build_topology, the topology diff and check_tiers, and the
decisions about trusting a view (check_view, guard, confirmation, where and how long to ask)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from picopyn_actors import Address, ConfigError
from picopyn_actors._topology import (
    CatalogState,
    Confirmation,
    NodeInfo,
    Plan,
    Role,
    RowProblem,
    Selector,
    StateValue,
    Topology,
    agrees,
    build_topology,
    check_tiers,
    check_view,
    confirmation,
    diff,
    discovery_deadline,
    find_node,
    guard,
    order_addresses,
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


def test_build_topology_reports_rows_it_cannot_decode() -> None:
    good = row("i1", 1)
    bad_address = row("i2", 2, address="::1:bad")
    bad_state = row("i3", 3, current='["Zombie",1]')
    missing = {k: v for k, v in row("i4", 4).items() if k != "tier"}
    bad_raft = row("i5", 5) | {"raft_id": "five"}
    bad_domain = row("i6", 6, failure_domain="{not json")
    no_pgproto = row("i7", 7) | {"address": None}
    nameless = {k: v for k, v in row("i8", 8).items() if k not in ("name", "uuid")}
    topo = build_topology(
        [good, bad_address, bad_state, missing, bad_raft, bad_domain, no_pgproto, nameless]
    )
    assert set(topo.nodes) == {"i1"}
    problems = {p.name: p for p in topo.problems}
    assert set(problems) == {"i2", "i3", "i4", "i5", "i6", "i7", None}
    assert all(p.uuid == f"uuid-{p.name}" for p in topo.problems if p.name is not None)
    assert problems["i7"].reason == "no pgproto address in the catalog"
    assert problems["i3"].reason.startswith("catalog row unreadable: not an instance state")
    assert "'tier'" in problems["i4"].reason
    assert problems[None].reason.startswith("catalog row unreadable")
    assert all(
        p.reason.startswith("catalog row unreadable") for n, p in problems.items() if n != "i7"
    )


def test_topology_named_finds_nodes_and_problem_rows_by_uuid() -> None:
    topo = build_topology([row("i1", 1), row("i2", 2, current='["Online"]')])
    assert topo.named("uuid-i1") == "i1"
    assert topo.named("uuid-i2") == "i2"  # its row is unreadable, but it is there
    assert topo.named("uuid-stranger") is None


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


# -- check_view ------------------------------------------------------------------------------


def view(*rows: dict[str, Any], uuid: str | None = "uuid-i1") -> Topology:
    return build_topology(rows, source="i1", source_uuid=uuid)


@pytest.mark.parametrize(
    ("topo", "serving", "expected"),
    [
        (view(row("i1", 1), row("i2", 2)), {"i1", "i2"}, None),
        (view(row("i1", 1)), {"i1", "i2", "i3"}, None),  # stale, but sane: confirmation decides
        (view(uuid=None), set(), None),  # nothing serves, nobody to name: nothing to check
        (view(), {"i1"}, "lists no node while 1 serve"),
        (view(uuid=None), {"i1", "i2"}, "lists no node while 2 serve"),
        (view(), set(), "does not list the node that answered (uuid uuid-i1)"),
        (view(row("i2", 2)), {"i2"}, "does not list the node that answered"),
        (view(row("i2", 2), uuid="uuid-stranger"), set(), "does not list the node"),
        (view(row("i1", 1, current='["Online"]')), {"i1"}, None),  # there, though unreadable
        (view(row("i2", 2), uuid=None), {"i1"}, None),
    ],
)
def test_check_view(topo: Topology, serving: set[str], expected: str | None) -> None:
    problem = check_view(topo, serving)
    if expected is None:
        assert problem is None
    else:
        assert problem is not None and expected in problem


# -- guard -------------------------------------------------------------------------------------


def test_guard_keeps_the_last_good_entry_of_a_node_whose_row_is_bad() -> None:
    known = BASE.nodes
    bad = view(row("i1", 1), row("i2", 2, current='["Online"]'), row("i3", 3) | {"address": None})
    guarded, notes = guard(bad, known, dict(known))
    assert guarded.nodes["i2"] is known["i2"]
    assert guarded.nodes["i3"] is known["i3"]
    assert {(n.node, n.kind) for n in notes} == {("i2", "unreadable"), ("i3", "no-address")}
    assert all("keeping its last good entry" in n.message for n in notes)
    assert all(n.message.startswith("catalog of i1: node ") for n in notes)
    assert diff(dict(known), guarded).empty  # nobody retired on the word of one bad row


def test_guard_leaves_out_a_bad_row_it_has_no_good_entry_for() -> None:
    bad = view(row("i1", 1), row("i4", 4, current='["Online"]'), row("i5", 5) | {"name": None})
    guarded, notes = guard(bad, BASE.nodes, {})
    assert set(guarded.nodes) == {"i1"}
    assert [(n.node, n.kind) for n in notes] == [("i4", "unreadable"), (None, "unreadable")]
    assert "not used" in notes[0].message


@pytest.mark.parametrize(
    ("rows", "running_names", "kept", "moved", "left_out"),
    [
        # i2's row points at i3's address: i3 runs there, i2 goes back to its own.
        ([row("i1", 1), row("i2", 2, address="10.0.0.3:4327"), row("i3", 3)], "123", "13", "2", ""),
        # A new row on i3's address: not served.
        ([row("i1", 1), row("i3", 3), row("i9", 9, address="10.0.0.3:4327")], "13", "13", "", "9"),
        # Two new rows on one address, neither running: neither served.
        ([row("i1", 1), row("i8", 8, address="10.0.0.8:1"), row("i9", 9, address="10.0.0.8:1")],
         "1", "1", "", "89"),
        # An Offline or Expelled row does not claim its address.
        ([row("i1", 1), row("i9", 9, address="10.0.0.1:4327", current='["Offline",1]')],
         "1", "19", "", ""),
        ([row("i1", 1), row("i9", 9, address="10.0.0.1:4327", target='["Expelled",2]')],
         "1", "19", "", ""),
        # Two nodes swap addresses in one view: no clash, nothing to do here (diff replaces them).
        ([row("i1", 1, address="10.0.0.2:4327"), row("i2", 2, address="10.0.0.1:4327")],
         "12", "12", "", ""),
    ],
)
def test_guard_never_lets_two_nodes_share_an_address(
    rows: list[dict[str, Any]], running_names: str, kept: str, moved: str, left_out: str
) -> None:
    running = {f"i{n}": BASE.nodes[f"i{n}"] for n in running_names}
    guarded, notes = guard(view(*rows), BASE.nodes, running)
    given = {r["name"]: r for r in rows}
    assert {f"i{n}" for n in kept + moved} == set(guarded.nodes)
    for n in moved:
        assert guarded.nodes[f"i{n}"] is BASE.nodes[f"i{n}"]
    for n in kept:
        assert str(guarded.nodes[f"i{n}"].address) == given[f"i{n}"]["address"]
    assert {n.node for n in notes} == {f"i{n}" for n in moved + left_out}
    assert all(n.kind == "duplicate-address" for n in notes)
    served = [n.address for n in guarded.nodes.values() if n.routable]
    assert len(served) == len(set(served))


def test_guard_notes_name_the_node_whose_address_was_claimed() -> None:
    rows = [row("i1", 1), row("i2", 2, address="10.0.0.3:4327"), row("i3", 3)]
    _, (note,) = guard(view(*rows), BASE.nodes, dict(BASE.nodes))
    assert note.node == "i2" and note.others == ("i3",)
    assert "the catalog gives it 10.0.0.3:4327, the address of i3" in note.message
    assert "keeping its last good address 10.0.0.2:4327" in note.message


def test_guard_is_pure() -> None:
    bad = view(row("i1", 1), row("i2", 2, current='["Online"]'))
    known = dict(BASE.nodes)
    first = guard(bad, known, known)
    assert first == guard(bad, known, known)
    assert known == BASE.nodes and set(bad.nodes) == {"i1"}


# -- reasons ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "plan_field", "reason"),
    [
        ({"target": '["Expelled",2]'}, "retire", "expelled (catalog: current Online(1), target"),
        ({"address": "10.0.0.9:4327"}, "retire",
         "address changed from 10.0.0.2:4327 to 10.0.0.9:4327"),
        ({"uuid": "uuid-new"}, "retire", "uuid changed from uuid-i2 to uuid-new"),
        ({"target": '["Offline",1]'}, "drain", "catalog: current Online(1), target Offline(1)"),
        ({"tier": "other"}, "drain", "tier other is not selected"),
    ],
)
def test_diff_gives_an_honest_reason_for_each_node_it_stops(
    change: dict[str, str], plan_field: str, reason: str
) -> None:
    new = topology(row("i1", 1), row("i2", 2, **change))
    plan = diff(running(BASE, "i1", "i2"), new, Selector(tiers=frozenset({"default"})))
    assert getattr(plan, plan_field) == ("i2",)
    assert plan.reasons["i2"].startswith(reason)
    if "expelled" not in reason:
        assert "expelled" not in plan.reasons["i2"]


def test_diff_reasons_for_a_vanished_node_a_moved_one_and_a_role_change() -> None:
    plan = diff(running(BASE, "i1", "i3"), topology(row("i1", 1)))
    assert plan.reasons == {"i3": "no longer in the catalog"}
    both = topology(row("i1", 1, address="10.0.0.7:1", uuid="uuid-x"))
    assert diff(running(BASE, "i1"), both).reasons["i1"] == (
        "address changed from 10.0.0.1:4327 to 10.0.0.7:1; uuid changed from uuid-i1 to uuid-x"
    )
    switched = topology(row("i1", 1, replicaset="r1"), masters={"r1": "i9"})
    leader = diff(running(BASE, "i1"), switched, Selector(role=Role.LEADER))
    assert leader.reasons["i1"] == "no longer the master of r1 (role=leader)"


# -- confirmation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drain", "retire", "serving", "stops", "majority"),
    [
        ((), (), "123", None, False),
        (("i2",), (), "", None, False),  # nobody serves: act at once
        (("i2",), (), "13", None, False),  # i2 is down already
        (("i2",), (), "123", "2", False),
        ((), ("i2", "i3"), "123", "23", True),
        (("i1",), ("i2",), "12", "12", True),
        (("i4",), ("i2",), "123", "2", False),  # i4 does not serve
        (("i3", "i4"), (), "1234", "34", False),  # half is not a majority
    ],
)
def test_confirmation_is_needed_to_stop_serving_nodes(
    drain: tuple[str, ...],
    retire: tuple[str, ...],
    serving: str,
    stops: str | None,
    majority: bool,
) -> None:
    plan = Plan(drain=drain, retire=retire)
    needed = confirmation(plan, {f"i{n}" for n in serving})
    if stops is None:
        assert needed is None
        return
    assert needed == Confirmation(frozenset(f"i{n}" for n in stops), len(serving))
    assert needed.majority is majority
    assert ("a majority" in str(needed)) is majority


def test_confirmation_text_and_agreement() -> None:
    needed = Confirmation(frozenset({"i3", "i2"}), 3)
    assert str(needed) == "i2, i3 (2 of 3 serving nodes, a majority)"
    assert agrees(needed, Plan(retire=("i2",), drain=("i3",)))
    assert agrees(needed, Plan(retire=("i1", "i2", "i3")))
    assert not agrees(needed, Plan(retire=("i2",)))
    assert not agrees(needed, Plan())


def test_find_node_by_uuid_or_raft_id_in_order() -> None:
    first = [BASE.nodes["i1"]]
    second = list(BASE.nodes.values())
    assert find_node("uuid-i2", first, second) is BASE.nodes["i2"]
    assert find_node(3, first, second) is BASE.nodes["i3"]
    assert find_node(1, first, second) is first[0]
    assert find_node("uuid-none", first, second) is None
    assert find_node(9) is None


def test_order_addresses_once_each_avoided_last() -> None:
    a, b, c, d = (Address(f"10.0.0.{i}", 1) for i in range(1, 5))
    assert order_addresses([[b], [a, b, c], [d, a]], avoid=set()) == [b, a, c, d]
    assert order_addresses([[b], [a, b, c], [d, a]], avoid={b, c}) == [a, d, b, c]
    assert order_addresses([], avoid={a}) == []


@pytest.mark.parametrize(
    ("connect_timeout", "interval", "expected"),
    [(5.0, 2.0, 2.0), (3.0, 0.3, 1.0), (5.0, 10.0, 5.0), (0.5, 0.1, 0.5), (5.0, 1.0, 1.0)],
)
def test_discovery_deadline(connect_timeout: float, interval: float, expected: float) -> None:
    assert discovery_deadline(connect_timeout, interval) == expected


def test_row_problem_is_a_value() -> None:
    assert RowProblem("i1", "u", "x") == RowProblem("i1", "u", "x")
    assert NodeInfo is not None  # re-exported names stay importable
