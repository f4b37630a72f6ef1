"""Election rules as tables."""

import pytest

from shoal.election.rules import Standing, best, decide, next_term
from shoal.types.ids import NodeId


def s(
    node: str,
    last_term: int = 1,
    last_index: int = 10,
    started_at: float = 100.0,
    term: int | None = None,
) -> Standing:
    return Standing(
        NodeId(node), term if term is not None else last_term, last_term, last_index, started_at
    )


@pytest.mark.parametrize(
    ("candidates", "winner"),
    [
        ([], None),
        ([s("a")], "a"),
        ([s("a", last_index=9), s("b", last_index=10)], "b"),  # longest log
        (
            [s("a", last_term=2, last_index=5), s("b", last_term=1, last_index=50)],
            "a",
        ),  # term first
        ([s("a", started_at=200), s("b", started_at=100)], "b"),  # seniority
        ([s("b"), s("a")], "a"),  # then node id
        ([s("c", last_index=0, started_at=1), s("d", last_index=0, started_at=2)], "c"),
    ],
)
def test_best(candidates: list[Standing], winner: str | None) -> None:
    found = best(candidates)
    assert (found.node_id if found else None) == winner


@pytest.mark.parametrize(
    ("current", "live", "expected"),
    [
        (None, [s("a"), s("b", started_at=50)], "b"),
        # a live master is kept even when a follower's view of the index is fresher
        ("a", [s("a", last_index=10, started_at=300), s("b", last_index=11)], "a"),
        # the master is gone: the best remaining candidate
        ("gone", [s("a", last_index=10), s("b", last_index=12)], "b"),
        # partition healed: the side with the later term wins, its master kept
        ("a", [s("a", last_term=3), s("b", last_term=5)], "b"),
        ("b", [s("a", last_term=3), s("b", last_term=5)], "b"),
        (None, [], None),
    ],
)
def test_decide(current: str | None, live: list[Standing], expected: str | None) -> None:
    assert decide(NodeId(current) if current else None, live) == expected


def test_every_view_of_the_same_standings_agrees() -> None:
    standings = [s(n, last_index=i % 3, started_at=float(i)) for i, n in enumerate("edcba")]
    winners = {decide(None, standings[i:] + standings[:i]) for i in range(len(standings))}
    assert len(winners) == 1


@pytest.mark.parametrize(("seen", "term"), [([], 1), ([0], 1), ([3, 1, 2], 4)])
def test_next_term(seen: list[int], term: int) -> None:
    assert next_term(seen) == term
