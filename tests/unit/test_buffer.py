"""OrderedBuffer: releases entries by consecutive index, reports the hole, stays bounded."""

import pytest

from shoal.state.buffer import OrderedBuffer
from shoal.types.events import IndexedEvent, NodeJoined
from shoal.types.ids import NodeId


def entry(index: int, term: int = 1) -> IndexedEvent:
    return IndexedEvent(index=index, term=term, event=NodeJoined(node_id=NodeId(f"n{index}")))


CASES: list[tuple[str, int, list[int], list[int], tuple[int, int] | None]] = [
    # name, next_index, pushed indices, released indices (in order), gap after
    ("in order", 1, [1, 2, 3], [1, 2, 3], None),
    ("reversed", 1, [3, 2, 1], [1, 2, 3], None),
    ("shuffled", 1, [2, 5, 1, 4, 3], [1, 2, 3, 4, 5], None),
    ("duplicates", 1, [1, 1, 3, 3, 2, 2, 1], [1, 2, 3], None),
    ("one hole", 1, [1, 2, 4, 5], [1, 2], (3, 4)),
    ("two holes: the first", 1, [1, 3, 6], [1], (2, 3)),
    ("nothing yet", 1, [4], [], (1, 4)),
    ("below next dropped", 5, [3, 4, 5], [5], None),
    ("starts late", 10, [11, 10], [10, 11], None),
]


@pytest.mark.parametrize(
    ("start", "pushed", "released", "gap"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_push(start: int, pushed: list[int], released: list[int], gap: tuple[int, int] | None):
    buffer = OrderedBuffer(start)
    out = [e.index for i in pushed for e in buffer.push(entry(i))]
    assert out == released
    assert buffer.gap() == gap
    assert buffer.next_index == (released[-1] + 1 if released else start)


def test_push_returns_the_run_it_completes() -> None:
    buffer = OrderedBuffer(1)
    assert buffer.push(entry(3)) == []
    assert buffer.push(entry(2)) == []
    assert [e.index for e in buffer.push(entry(1))] == [1, 2, 3]
    assert len(buffer) == 0


def test_held_entry_replaced_by_higher_term() -> None:
    buffer = OrderedBuffer(1)
    buffer.push(entry(2, term=1))
    buffer.push(entry(2, term=3))
    buffer.push(entry(2, term=2))
    assert [e.term for e in buffer.push(entry(1))] == [1, 3]


def test_bounded_drops_the_highest() -> None:
    buffer = OrderedBuffer(1, limit=3)
    for i in (2, 3, 4, 5):
        buffer.push(entry(i))
    assert len(buffer) == 3
    assert [e.index for e in buffer.push(entry(1))] == [1, 2, 3, 4]
    assert buffer.gap() is None
    assert buffer.next_index == 5


def test_bound_keeps_the_lowest_when_the_newcomer_is_highest() -> None:
    buffer = OrderedBuffer(1, limit=2)
    for i in (3, 2, 9):
        buffer.push(entry(i))
    assert len(buffer) == 2
    assert buffer.gap() == (1, 2)


def test_reset_forgets_held() -> None:
    buffer = OrderedBuffer(1)
    buffer.push(entry(3))
    buffer.reset(7)
    assert (buffer.gap(), buffer.next_index, len(buffer)) == (None, 7, 0)
    assert [e.index for e in buffer.push(entry(7))] == [7]


def test_rewind_keeps_held() -> None:
    buffer = OrderedBuffer(5)
    buffer.push(entry(7))
    buffer.rewind(3)
    assert buffer.gap() == (3, 7)
    assert [e.index for e in buffer.push(entry(3))] == [3]
    with pytest.raises(ValueError):
        buffer.rewind(5)


@pytest.mark.parametrize(("start", "limit"), [(0, 10), (1, 0)])
def test_bad_arguments(start: int, limit: int) -> None:
    with pytest.raises(ValueError):
        OrderedBuffer(start, limit=limit)
