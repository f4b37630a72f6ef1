"""StateStore: restore on restart, convergence after divergence, bounded compaction, snapshots."""

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.state.store import Compacted, Diverged, StateStore
from shoal.types.events import (
    Event,
    IndexedEvent,
    MasterElected,
    NodeForgotten,
    NodeJoined,
    NodeLost,
    NodeProfiled,
)
from shoal.types.ids import NodeId
from tests.helpers.state import indexed, profile


class Stores:
    """Opens stores under one temporary folder and closes them all at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.opened: list[StateStore] = []

    def __call__(self, name: str, **kwargs: int) -> StateStore:
        store = StateStore.open(self.root / f"{name}.db", **kwargs)
        self.opened.append(store)
        return store


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    s = Stores(tmp_path)
    yield s
    for store in s.opened:
        store.close()


def some_events(rng: random.Random, n: int) -> list[Event]:
    """A mix of every event type over a few nodes."""
    out: list[Event] = []
    for _ in range(n):
        node = NodeId(f"n{rng.randrange(4)}")
        choices: list[Event] = [
            NodeJoined(node_id=node),
            NodeLost(node_id=node, reason=f"r{rng.randrange(9)}"),
            NodeProfiled(profile=profile(node, ram_available=rng.randrange(1 << 30))),
            NodeForgotten(node_id=node),
        ]
        out.append(rng.choice(choices))
    return out


def elect(store: StateStore, name: str, term: int, events: list[Event]) -> list[IndexedEvent]:
    """`store` takes office in `term` and appends `events` after its MasterElected."""
    return store.append_as_master([MasterElected(node_id=NodeId(name), term=term), *events], term)


def deliver(follower: StateStore, entries: list[IndexedEvent], master: StateStore) -> None:
    """Hand `entries` to `follower` one by one, installing the master's snapshot if asked to."""
    for entry in entries:
        try:
            follower.accept(entry)
        except Diverged:
            follower.install_snapshot(master.snapshot())


def sync(follower: StateStore, master: StateStore, rounds: int = 64) -> None:
    """What a replica does: fetch what `wanted` names until level with the master."""
    for _ in range(rounds):
        wanted = follower.wanted(master.last_index, master.last_term)
        if wanted is None:
            return
        try:
            entries = master.entries(*wanted)
        except Compacted:
            follower.install_snapshot(master.snapshot())
        else:
            deliver(follower, entries, master)
    raise AssertionError(f"not level after {rounds} rounds")


def assert_same(a: StateStore, b: StateStore) -> None:
    assert a.state.model_dump_json() == b.state.model_dump_json()
    start = max(a.first_index, b.first_index)
    assert a.entries(start, a.last_index + 1) == b.entries(start, b.last_index + 1)


def test_restart_restores_the_state(stores: Stores) -> None:
    rng = random.Random(1)
    store = stores("a", snapshot_every=7, keep=3)
    for term in (1, 2, 3):
        elect(store, "a", term, some_events(rng, 20))
    before = (store.state.model_dump_json(), store.last_index, store.last_term, store.first_index)
    store.close()
    again = stores("a", snapshot_every=7, keep=3)
    after = (again.state.model_dump_json(), again.last_index, again.last_term, again.first_index)
    assert after == before


@pytest.mark.parametrize("seed", range(4))
def test_follower_matches_master_in_any_order(stores: Stores, seed: int) -> None:
    rng = random.Random(seed)
    master, follower = stores("m"), stores("f", snapshot_every=10, keep=5)
    log = elect(master, "m", 1, some_events(rng, 40)) + elect(master, "m", 2, some_events(rng, 9))
    arrivals = log + rng.sample(log, 15)
    rng.shuffle(arrivals)
    released = [e for entry in arrivals for e in follower.accept(entry)]
    assert released == log
    assert follower.gap() is None
    assert_same(follower, master)


def test_gap_is_reported_then_repaired(stores: Stores) -> None:
    master, follower = stores("m"), stores("f")
    log = elect(master, "m", 1, some_events(random.Random(2), 9))
    follower.accept(log[0])
    assert follower.accept(log[6]) == []
    assert follower.gap() == (2, 7)
    assert follower.wanted(master.last_index, master.last_term) == (2, 7)
    sync(follower, master)
    assert_same(follower, master)


def partitioned(stores: Stores, old_tail: int, new_tail: int) -> tuple[StateStore, StateStore]:
    """x and y share 10 entries of term 1; then x (the old master) appends `old_tail` more in
    term 1 while y, elected on the other side, appends `new_tail` in term 2."""
    rng = random.Random(old_tail * 100 + new_tail)
    x, y = stores("x", snapshot_every=50, keep=20), stores("y", snapshot_every=50, keep=20)
    for entry in elect(x, "x", 1, some_events(rng, 9)):
        y.accept(entry)
    x.append_as_master(some_events(rng, old_tail), 1)
    lost = NodeLost(node_id=NodeId("x"), reason="partition")
    elect(y, "y", 2, [lost, *some_events(rng, new_tail)])
    return x, y


@pytest.mark.parametrize(("old_tail", "new_tail"), [(3, 5), (12, 3), (40, 2), (5, 30), (1, 0)])
def test_divergent_logs_converge_in_order(stores: Stores, old_tail: int, new_tail: int) -> None:
    x, y = partitioned(stores, old_tail, new_tail)
    deliver(x, y.entries(11, y.last_index + 1), y)
    sync(x, y)
    assert_same(x, y)
    assert x.state.master == "y"


@pytest.mark.parametrize(("old_tail", "new_tail"), [(3, 5), (12, 3), (40, 2), (5, 30)])
def test_divergent_logs_converge_from_the_newest_entry(
    stores: Stores, old_tail: int, new_tail: int
) -> None:
    # After the heal x first hears y's next live entry, at an index x may already hold.
    x, y = partitioned(stores, old_tail, new_tail)
    (live,) = y.append_as_master([NodeJoined(node_id=NodeId("x"))], 2)
    deliver(x, [live], y)
    sync(x, y)
    assert_same(x, y)


@pytest.mark.parametrize(("old_tail", "new_tail"), [(3, 5), (12, 3), (5, 30)])
def test_divergent_logs_converge_in_reverse(stores: Stores, old_tail: int, new_tail: int) -> None:
    x, y = partitioned(stores, old_tail, new_tail)
    deliver(x, y.entries(1, y.last_index + 1)[::-1], y)
    sync(x, y)
    assert_same(x, y)


@pytest.mark.parametrize("seed", range(6))
def test_random_partitions_converge(stores: Stores, seed: int) -> None:
    # Each term a random node leads and reaches a random subset, out of order and lossy;
    # at the end everyone catches up with the last master and holds the same bytes.
    rng = random.Random(seed)
    nodes = [stores(n, snapshot_every=8, keep=3) for n in "abcd"]
    for term in range(1, 9):
        leader = rng.choice(nodes)
        new = elect(leader, f"t{term}", term, some_events(rng, rng.randrange(12)))
        for other in rng.sample(nodes, rng.randrange(len(nodes))):
            if other is leader:
                continue
            heard = [e for e in new if rng.random() < 0.7]
            rng.shuffle(heard)
            deliver(other, heard, leader)
            if rng.random() < 0.5:
                sync(other, leader)
    for node in nodes:
        if node is not leader:
            sync(node, leader)
            assert_same(node, leader)


def test_compaction_keeps_the_journal_bounded(stores: Stores) -> None:
    every, keep = 1000, 1000
    master = stores("m", snapshot_every=every, keep=keep)
    elect(master, "m", 1, [NodeJoined(node_id=NodeId(f"n{i}")) for i in range(4)])
    for i in range(10_000):
        master.append_as_master([NodeProfiled(profile=profile(f"n{i % 4}", ram_available=i))], 1)
        if i % 250 == 0:
            assert master.journal.count() <= every + keep
    assert master.journal.count() <= every + keep
    assert master.first_index > 8000
    live = master.state.model_dump_json()
    master.close()
    restored = stores("m", snapshot_every=every, keep=keep)
    assert restored.state.model_dump_json() == live
    assert restored.last_index == 10_005


def test_old_ranges_are_compacted_and_a_snapshot_catches_up(stores: Stores) -> None:
    rng = random.Random(3)
    master, late = stores("m", snapshot_every=10, keep=4), stores("late")
    elect(master, "m", 1, some_events(rng, 40))
    assert master.first_index > 1
    with pytest.raises(Compacted):
        master.entries(1, 5)
    assert master.entries(master.first_index, master.first_index + 2)
    assert late.wanted(master.last_index, master.last_term) == (1, 42)
    late.install_snapshot(master.snapshot())
    assert late.wanted(master.last_index, master.last_term) is None
    for entry in master.append_as_master(some_events(rng, 5), 1):
        late.accept(entry)
    assert_same(late, master)


@pytest.mark.parametrize("keep", [0, 20])  # our entry there compacted, or still held
def test_divergence_inside_the_snapshot_asks_for_one(stores: Stores, keep: int) -> None:
    x, y = stores("x", snapshot_every=5, keep=keep), stores("y")
    for entry in elect(x, "x", 1, some_events(random.Random(4), 3)):
        y.accept(entry)
    x.append_as_master(some_events(random.Random(5), 10), 1)  # x snapshots past index 4
    elect(y, "y", 2, [])
    with pytest.raises(Diverged):
        x.accept(y.entries(5, 6)[0])
    x.install_snapshot(y.snapshot())
    assert_same(x, y)


def test_a_lower_term_entry_at_a_held_index_is_dropped(stores: Stores) -> None:
    master, follower = stores("m"), stores("f")
    old = indexed([MasterElected(node_id=NodeId("old"), term=1), NodeJoined(node_id=NodeId("a"))])
    for entry in old:
        master.accept(entry)
    for entry in master.entries(1, 3) + elect(master, "m", 2, []):
        follower.accept(entry)
    stale = indexed([NodeJoined(node_id=NodeId("b"))], term=1, after=(2, 1))[0]
    assert follower.accept(stale) == []  # index 3 holds a term-2 entry
    assert follower.accept(old[1]) == []  # a duplicate
    assert follower.last_index == 3
    assert follower.state.master == "m"


def test_a_stale_held_entry_costs_one_refetch(stores: Stores) -> None:
    # A replaced master's entry sat in the buffer; once the new master's entry before it is in,
    # it does not follow: it is dropped, and what it cut back comes again from the master.
    master, follower = stores("m"), stores("f")
    for entry in elect(master, "m", 1, [NodeJoined(node_id=NodeId("a"))]):
        follower.accept(entry)
    stale = indexed([NodeJoined(node_id=NodeId("b"))], term=1, after=(3, 1))[0]
    assert follower.accept(stale) == []
    new = elect(master, "m2", 2, [NodeJoined(node_id=NodeId("c"))])
    follower.accept(new[0])
    sync(follower, master)
    assert_same(follower, master)
    assert "b" not in follower.state.nodes


def test_append_as_master_checks_the_term(stores: Stores) -> None:
    master = stores("m")
    elect(master, "m", 3, [])
    with pytest.raises(ValueError, match="behind"):
        master.append_as_master([NodeJoined(node_id=NodeId("a"))], 2)
    assert master.append_as_master([], 3) == []
    (entry,) = master.append_as_master([NodeJoined(node_id=NodeId("a"))], 4)
    assert (entry.index, entry.term, entry.prev_term) == (2, 4, 3)
