"""Journal: entries and snapshot round trip, truncate, compact, reopen, survive kill -9."""

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.state.apply import apply_all
from shoal.state.journal import Journal
from shoal.state.model import State
from shoal.types.events import NodeJoined, NodeLost, NodeProfiled
from shoal.types.ids import NodeId
from tests.helpers.state import indexed, profile

ROOT = Path(__file__).resolve().parents[2]


def events(n: int) -> list[NodeJoined | NodeProfiled]:
    return [
        NodeProfiled(profile=profile(f"n{i % 3}", ram_available=i)) if i % 2 else
        NodeJoined(node_id=NodeId(f"n{i % 3}"))
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "state" / "journal.db")
    yield j
    j.close()


def test_empty(journal: Journal) -> None:
    assert journal.last() == (0, 0)
    assert journal.first_index() == 1
    assert journal.read(1, 10) == []
    assert journal.term_at(1) is None
    assert journal.load_snapshot() is None
    assert journal.count() == 0


def test_round_trip(journal: Journal) -> None:
    log = indexed(events(5)) + indexed(events(3), term=2, after=(5, 1))
    journal.append(log[:5])
    journal.append(log[5:])
    assert journal.read(1, 9) == log
    assert journal.read(3, 6) == log[2:5]
    assert journal.read(7, 100) == log[6:]
    assert journal.last() == (8, 2)
    assert [journal.term_at(i) for i in (0, 1, 5, 6, 8, 9)] == [None, 1, 1, 2, 2, None]
    assert journal.size_bytes() > 0


@pytest.mark.parametrize("first", [1, 3, 5])  # overlaps, overlaps, leaves a hole
def test_append_must_continue(journal: Journal, first: int) -> None:
    journal.append(indexed(events(2)))
    journal.append(indexed(events(1), after=(2, 1)))  # 3 fits
    with pytest.raises(ValueError, match="appended where"):
        journal.append(indexed(events(2), after=(first - 1, 1)))
    assert journal.last() == (3, 1)


def test_batch_with_a_hole_is_refused_whole(journal: Journal) -> None:
    log = indexed(events(4))
    with pytest.raises(ValueError):
        journal.append([log[0], log[1], log[3]])
    assert journal.count() == 0


def test_truncate(journal: Journal) -> None:
    log = indexed(events(6))
    journal.append(log)
    journal.truncate_from(4)
    assert journal.last() == (3, 1)
    assert journal.read(1, 10) == log[:3]
    journal.append(indexed(events(2), term=2, after=(3, 1)))
    assert journal.last() == (5, 2)


def test_snapshot_compact_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    log = indexed(events(20))
    journal = Journal(path)
    journal.append(log)
    with pytest.raises(ValueError, match="snapshot is at 0"):
        journal.compact(5)
    state = apply_all(State(), log[:15])
    journal.save_snapshot(state)
    journal.compact(12)
    assert journal.first_index() == 13
    assert journal.count() == 8
    with pytest.raises(ValueError, match="snapshot covers"):
        journal.truncate_from(15)
    journal.close()

    again = Journal(path)
    assert again.load_snapshot() == state
    assert again.snapshot_index == 15
    assert again.first_index() == 13
    assert again.last() == (20, 1)
    assert again.read(1, 21) == log[12:]
    again.compact(15)
    assert again.first_index() == 16
    assert again.term_at(15) == 1  # the snapshot's
    again.close()


def test_snapshot_must_lie_within_the_log(journal: Journal) -> None:
    log = indexed(events(4))
    journal.append(log)
    with pytest.raises(ValueError, match="outside"):
        journal.save_snapshot(apply_all(State(), log).model_copy(update={"index": 9}))


def test_compacted_to_the_snapshot(journal: Journal) -> None:
    log = indexed(events(5))
    journal.append(log)
    journal.save_snapshot(apply_all(State(), log))
    journal.compact(5)
    assert journal.count() == 0
    assert journal.last() == (5, 1)
    assert journal.first_index() == 6
    journal.append(indexed([NodeLost(node_id=NodeId("n1"), reason="x")], after=(5, 1)))
    assert journal.last() == (6, 1)


def test_replace(journal: Journal) -> None:
    journal.append(indexed(events(5)))
    far = apply_all(State(), indexed(events(40), term=3))
    journal.replace(far)
    assert (journal.count(), journal.last(), journal.first_index()) == (0, (40, 3), 41)
    assert journal.load_snapshot() == far


WRITER = """
import sys
from pathlib import Path
from shoal.state.journal import Journal
from shoal.types.events import NodeJoined
from shoal.types.ids import NodeId
from tests.helpers.state import indexed

journal = Journal(Path(sys.argv[1]))
last = 0
while True:
    batch = [NodeJoined(node_id=NodeId(f"n{last + i}")) for i in range(10)]
    journal.append(indexed(batch, after=(last, 1 if last else 0)))
    last += 10
    if last == 200:
        print("ready", flush=True)
"""


def test_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "ready\n"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        if writer.stdout is not None:
            writer.stdout.close()
    journal = Journal(path)
    last, term = journal.last()
    assert last >= 200 and last % 10 == 0 and term == 1  # whole batches only
    assert [e.index for e in journal.read(1, last + 1)] == list(range(1, last + 1))
    journal.append(indexed([NodeJoined(node_id=NodeId("x"))], after=(last, 1)))
    journal.close()
