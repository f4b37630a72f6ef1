"""Election rules as tables."""

import pytest

from shoal.election.rules import Standing, best, decide, has_quorum, next_term
from shoal.types.ids import NodeId


def s(
    node: str,
    last_term: int = 1,
    last_index: int = 10,
    started_at: float = 100.0,
    claims: bool = False,
) -> Standing:
    return Standing(NodeId(node), last_term, last_term, last_index, started_at, claims)


@pytest.mark.parametrize(
    ("candidates", "winner"),
    [
        ([], None),
        ([s("a")], "a"),
        ([s("a", last_index=9), s("b", last_index=10)], "b"),  # longest log
        ([s("a", last_term=2, last_index=5), s("b", last_term=1, last_index=50)], "a"),  # term
        ([s("a", started_at=200), s("b", started_at=100)], "b"),  # seniority
        ([s("b"), s("a")], "a"),  # then node id
    ],
)
def test_best(candidates: list[Standing], winner: str | None) -> None:
    found = best(candidates)
    assert (found.node_id if found else None) == winner


@pytest.mark.parametrize(
    ("live", "expected"),
    [
        ([], None),
        # a fresh cluster: empty logs, the most senior node
        ([s("a", 0, 0, 300), s("b", 0, 0, 100), s("c", 0, 0, 200)], "b"),
        # a sitting master is kept even when a follower's index looks fresher
        ([s("a", last_index=10, started_at=300, claims=True), s("b", last_index=11)], "a"),
        # the master is gone: the best remaining log
        ([s("a", last_index=10), s("b", last_index=12)], "b"),
        # a healed partition: the claimant with the later term wins
        ([s("a", last_term=3, claims=True), s("b", last_term=5, claims=True)], "b"),
        # two claimants of one term (a start-up race): the ranking settles it
        ([s("a", last_index=3, claims=True), s("b", last_index=4, claims=True)], "b"),
        # a claimant whose log is from an older term than someone else's is not kept
        ([s("a", last_term=2, claims=True), s("b", last_term=3)], "b"),
    ],
)
def test_decide(live: list[Standing], expected: str | None) -> None:
    assert decide(live) == expected


def test_every_order_of_the_same_standings_agrees() -> None:
    standings = [s(n, last_index=i % 3, started_at=float(i)) for i, n in enumerate("edcba")]
    winners = {decide(standings[i:] + standings[:i]) for i in range(len(standings))}
    assert len(winners) == 1


@pytest.mark.parametrize(("seen", "term"), [([], 1), ([0], 1), ([3, 1, 2], 4)])
def test_next_term(seen: list[int], term: int) -> None:
    assert next_term(seen) == term


def q(node: str, last_term: int, quorum: bool, last_index: int = 10) -> Standing:
    return Standing(NodeId(node), last_term, last_term, last_index, 100.0, True, quorum)


@pytest.mark.parametrize(
    ("live", "expected"),
    [
        # a node cut off alone elected itself (a later term, no majority): the majority's wins
        ([q("alone", 2, False, last_index=50), q("majority", 1, True)], "majority"),
        # the majority re-elected after losing its master: the newer majority master wins
        ([q("old", 1, True), q("new", 2, True)], "new"),
        # two minority claimants: the later term
        ([q("a", 2, False), q("b", 3, False)], "b"),
    ],
)
def test_a_majority_master_beats_a_minority_one(live: list[Standing], expected: str) -> None:
    assert decide(live) == expected


@pytest.mark.parametrize(
    ("live", "known", "ok"),
    [(1, 1, True), (1, 3, False), (2, 3, True), (2, 4, False), (3, 5, True)],
)
def test_quorum(live: int, known: int, ok: bool) -> None:
    assert has_quorum(live, known) is ok
