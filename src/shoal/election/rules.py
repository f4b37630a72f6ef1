"""Election rules, pure: rank candidates and decide whom every node should follow.

A candidate's standing is its log's (last_term, last_index) — the most complete log leads, so a
new master continues the cluster's history instead of starting over — then seniority (earlier
started_at), then the smaller node id. A node that already claims mastership keeps it while
nobody's log is from a later term: followers see its index with some lag, and a fresher-looking
follower must not unseat it. Two claimants (a start-up race, or a healed partition) are settled
by the same ranking, so every node that sees the same standings picks the same master.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from shoal.types.ids import NodeId


@dataclass(frozen=True)
class Standing:
    """What the rules need to know about one live candidate."""

    node_id: NodeId
    term: int  # highest term the candidate has seen
    last_term: int  # term of its last log entry
    last_index: int
    started_at: float
    claims: bool = False  # it says it is master now
    quorum: bool = False  # ... and was elected seeing a majority of the nodes it knew


def rank(s: Standing) -> tuple[int, int, float, str]:
    """Sort key: the smallest key wins."""
    return (-s.last_term, -s.last_index, s.started_at, s.node_id)


def best(candidates: Iterable[Standing]) -> Standing | None:
    """The best-ranked candidate, or None when there are none."""
    return min(candidates, key=rank, default=None)


def decide(live: Iterable[Standing]) -> NodeId | None:
    """Whom to follow, from the standings of every live node (this one included).

    A master elected by a majority beats one that ruled a minority (a node cut off alone must
    not roll back what the rest of the cluster did meanwhile); among equals the later term and
    the longer log win.
    """
    standings = list(live)
    if not standings:
        return None
    top_term = max(s.last_term for s in standings)
    majority = best(s for s in standings if s.claims and s.quorum)
    sitting = best(s for s in standings if s.claims and s.last_term == top_term)
    winner = majority or sitting or best(standings)
    assert winner is not None
    return winner.node_id


def has_quorum(live: int, known: int) -> bool:
    """Whether `live` nodes (this one included) are a majority of the `known` ones."""
    return 2 * live > known


def next_term(seen: Iterable[int]) -> int:
    """The term a newly elected master takes: one past every term seen."""
    return max(seen, default=0) + 1
