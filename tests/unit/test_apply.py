"""apply: each event's effect, the order check, determinism, and JSON round trips."""

import pytest
from pydantic import TypeAdapter

from shoal.state.apply import apply, apply_all
from shoal.state.model import NodeRecord, State
from shoal.types.events import (
    MAX_TERM,
    Event,
    IndexedEvent,
    MasterElected,
    MemberAdmitted,
    MemberRemoved,
    NodeForgotten,
    NodeJoined,
    NodeLost,
    NodeProfiled,
)
from shoal.types.ids import NodeId
from tests.helpers.state import indexed, profile

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")

# (connected, lost_reason, has a profile, joined_index) per node, after the events
Summary = dict[str, tuple[bool, str | None, bool, int]]

CASES: list[tuple[str, list[Event], Summary]] = [
    ("join", [NodeJoined(node_id=A)], {"a": (True, None, False, 1)}),
    ("join twice keeps the first", [NodeJoined(node_id=A)] * 2, {"a": (True, None, False, 1)}),
    ("lost", [NodeJoined(node_id=A), NodeLost(node_id=A, reason="crashed")],
     {"a": (False, "crashed", False, 1)}),
    ("lost then back",
     [NodeJoined(node_id=A), NodeLost(node_id=A, reason="lease"), NodeJoined(node_id=A)],
     {"a": (True, None, False, 3)}),
    ("profile creates", [NodeProfiled(profile=profile("a"))], {"a": (True, None, True, 1)}),
    ("rejoin keeps the profile",
     [NodeJoined(node_id=A), NodeProfiled(profile=profile("a")),
      NodeLost(node_id=A, reason="cut"), NodeJoined(node_id=A)],
     {"a": (True, None, True, 4)}),
    ("profile of a lost node keeps it lost",
     [NodeJoined(node_id=A), NodeLost(node_id=A, reason="cut"), NodeProfiled(profile=profile("a"))],
     {"a": (False, "cut", True, 1)}),
    ("forgotten",
     [NodeJoined(node_id=A), NodeLost(node_id=A, reason="x"), NodeForgotten(node_id=A)], {}),
    ("lost unknown is ignored", [NodeLost(node_id=A, reason="x")], {}),
    ("forgotten unknown is ignored", [NodeJoined(node_id=B), NodeForgotten(node_id=A)],
     {"b": (True, None, False, 1)}),
    ("master elected", [NodeJoined(node_id=A), MasterElected(node_id=A, term=1)],
     {"a": (True, None, False, 1)}),
]  # fmt: skip


def summary(state: State) -> Summary:
    return {
        k: (r.connected, r.lost_reason, r.profile is not None, r.joined_index)
        for k, r in state.nodes.items()
    }


@pytest.mark.parametrize(("events", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_apply_events(events: list[Event], expected: Summary) -> None:
    state = apply_all(State(), indexed(events))
    assert summary(state) == expected
    assert state.index == len(events)
    assert state.term == 1


def test_master_elected_sets_master_and_term() -> None:
    log = indexed([NodeJoined(node_id=A)]) + indexed(
        [MasterElected(node_id=B, term=3)], term=3, after=(1, 1)
    )
    state = apply_all(State(), log)
    assert (state.master, state.term, state.index) == (B, 3, 2)


def test_profile_replaced_by_newer() -> None:
    first, second = profile("a", ram_available=1), profile("a", ram_available=2)
    log = indexed([NodeProfiled(profile=first), NodeProfiled(profile=second)])
    assert apply_all(State(), log).nodes[A].profile == second


@pytest.mark.parametrize("index", [2, 5])
def test_gap_raises(index: int) -> None:
    entry = IndexedEvent(index=index, term=1, event=NodeJoined(node_id=A))
    with pytest.raises(ValueError, match="applied to a state at index 0"):
        apply(State(), entry)


def test_repeat_raises() -> None:
    (entry,) = indexed([NodeJoined(node_id=A)])
    with pytest.raises(ValueError):
        apply(apply(State(), entry), entry)


def test_apply_is_pure() -> None:
    state = apply_all(State(), indexed([NodeJoined(node_id=A)]))
    before = state.model_dump_json()
    apply(state, indexed([NodeLost(node_id=A, reason="x")], after=(1, 1))[0])
    assert state.model_dump_json() == before


def test_nodes_sorted_whatever_the_join_order() -> None:
    log = indexed(
        [NodeJoined(node_id=C), NodeProfiled(profile=profile("a")), NodeJoined(node_id=B)]
    )
    assert list(apply_all(State(), log).nodes) == ["a", "b", "c"]


def test_same_entries_same_json() -> None:
    events: list[Event] = [
        NodeJoined(node_id=C),
        MasterElected(node_id=C, term=1),
        NodeJoined(node_id=A),
        *[NodeProfiled(profile=profile(n, ram_available=i)) for i, n in enumerate("cab")],
        NodeLost(node_id=B, reason="gone"),
        NodeForgotten(node_id=B),
        NodeJoined(node_id=B),
    ]
    log = indexed(events)
    one = apply_all(State(), log).model_dump_json()
    # Another node: applied half, restarted from the JSON snapshot, then applied the rest.
    half = State.model_validate_json(apply_all(State(), log[:4]).model_dump_json())
    assert apply_all(half, log[4:]).model_dump_json() == one


# (members, revoked) after the events
MEMBER_CASES: list[tuple[str, list[Event], tuple[str, str]]] = [
    ("admitted", [MemberAdmitted(node_id=B), MemberAdmitted(node_id=A)], ("ab", "")),
    ("admitted twice", [MemberAdmitted(node_id=A)] * 2, ("a", "")),
    ("removed", [MemberAdmitted(node_id=A), MemberRemoved(node_id=A, reason="x")], ("", "a")),
    ("removed stays out",
     [MemberAdmitted(node_id=A), MemberRemoved(node_id=A, reason="x"), MemberAdmitted(node_id=A)],
     ("", "a")),
    ("a stranger revoked ahead", [MemberRemoved(node_id=C, reason="x")], ("", "c")),
    ("removed twice", [MemberRemoved(node_id=C, reason="x")] * 2, ("", "c")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("events", "expected"), [c[1:] for c in MEMBER_CASES], ids=[c[0] for c in MEMBER_CASES]
)
def test_membership(events: list[Event], expected: tuple[str, str]) -> None:
    state = apply_all(State(), indexed(events))
    assert ("".join(state.members), "".join(state.revoked)) == expected
    assert all(state.trusts(m) for m in state.members)
    assert not any(state.trusts(r) for r in state.revoked)


def test_a_removed_member_is_no_longer_connected() -> None:
    events: list[Event] = [MemberAdmitted(node_id=A), NodeJoined(node_id=A)]
    state = apply_all(State(), indexed([*events, MemberRemoved(node_id=A, reason="stolen")]))
    assert not state.nodes[A].connected and state.nodes[A].lost_reason == "removed: stolen"


@pytest.mark.parametrize("field", ["index", "term", "prev_term"])
def test_terms_and_indexes_past_the_bound_are_refused(field: str) -> None:
    good = {"index": 1, "term": 1, "prev_term": 0, "event": NodeJoined(node_id=A)}
    IndexedEvent(**{**good, field: MAX_TERM})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        IndexedEvent(**{**good, field: 2**63 - 1})  # type: ignore[arg-type]


def test_state_rejects_mismatched_keys() -> None:
    with pytest.raises(ValueError, match="holds the record of"):
        State(nodes={A: NodeRecord(node_id=B, joined_index=1)})


def test_state_sorts_nodes_on_construction() -> None:
    records = {n: NodeRecord(node_id=n, joined_index=1) for n in (C, A, B)}
    assert list(State(nodes=records).nodes) == ["a", "b", "c"]


EVENTS: list[Event] = [
    NodeJoined(node_id=A),
    NodeLost(node_id=A, reason="lease expired"),
    NodeProfiled(profile=profile("a", memory_bandwidth_gbs=101.5, matmul_gflops=2.5e3)),
    NodeForgotten(node_id=A),
    MasterElected(node_id=A, term=7),
    MemberAdmitted(node_id=A),
    MemberRemoved(node_id=A, reason="stolen laptop"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.kind)
def test_event_json_round_trip(event: Event) -> None:
    adapter: TypeAdapter[Event] = TypeAdapter(Event)
    assert adapter.validate_json(adapter.dump_json(event)) == event
    entry = IndexedEvent(index=3, term=7, prev_term=6, event=event)
    assert IndexedEvent.model_validate_json(entry.model_dump_json()) == entry


def test_state_json_round_trip() -> None:
    state = apply_all(State(), indexed(EVENTS[:3] + [NodeJoined(node_id=B), EVENTS[4]]))
    again = State.model_validate_json(state.model_dump_json())
    assert again == state
    assert again.model_dump_json() == state.model_dump_json()
