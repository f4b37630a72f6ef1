"""Journal: the log entries and one State snapshot, on disk in SQLite (WAL, synchronous=NORMAL).

Every write is one transaction, so a process killed at any moment (kill -9) reopens to a log that
ends at its last committed write. WAL with synchronous=NORMAL skips the fsync per commit: a power
cut may lose the last few entries, which the master sends again, but never tears the file.
"""

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from shoal.state.model import State
from shoal.types.events import IndexedEvent

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    term INTEGER NOT NULL,
    json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshot (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    idx INTEGER NOT NULL,
    term INTEGER NOT NULL,
    json TEXT NOT NULL
);
"""


class Journal:
    """The on-disk log: entries by index plus at most one snapshot that stands for those before."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._tx():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
        row = self._db.execute("SELECT idx, term FROM snapshot").fetchone()
        self._snapshot: tuple[int, int] = (row[0], row[1]) if row else (0, 0)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def snapshot_index(self) -> int:
        """The index the snapshot stands for (0 without one)."""
        return self._snapshot[0]

    @property
    def snapshot_term(self) -> int:
        """The term of the snapshot's last entry (0 without one)."""
        return self._snapshot[1]

    def append(self, entries: Sequence[IndexedEvent]) -> None:
        """Add entries that continue the log without a hole, in one transaction."""
        if not entries:
            return
        expected = self.last()[0] + 1
        for offset, entry in enumerate(entries):
            if entry.index != expected + offset:
                raise ValueError(f"entry {entry.index} appended where {expected + offset} is next")
        rows = [(e.index, e.term, e.model_dump_json()) for e in entries]
        with self._tx():
            self._db.executemany("INSERT INTO entries (idx, term, json) VALUES (?, ?, ?)", rows)

    def read(self, start: int, end: int) -> list[IndexedEvent]:
        """The entries held in [start, end), in order."""
        rows = self._db.execute(
            "SELECT json FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
        )
        return [IndexedEvent.model_validate_json(json) for (json,) in rows]

    def last(self) -> tuple[int, int]:
        """(index, term) of the last entry, or of the snapshot if it is later; (0, 0) if empty."""
        row = self._db.execute("SELECT idx, term FROM entries ORDER BY idx DESC LIMIT 1").fetchone()
        if row is None or row[0] < self._snapshot[0]:
            return self._snapshot
        return (row[0], row[1])

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index` (or of the snapshot there); None if not held."""
        row = self._db.execute("SELECT term FROM entries WHERE idx = ?", (index,)).fetchone()
        if row is not None:
            return int(row[0])
        if index == self._snapshot[0] and index > 0:
            return self._snapshot[1]
        return None

    def first_index(self) -> int:
        """The lowest entry still held; snapshot index + 1 when every entry was compacted."""
        (low,) = self._db.execute("SELECT MIN(idx) FROM entries").fetchone()
        return self._snapshot[0] + 1 if low is None else int(low)

    def count(self) -> int:
        """How many entries are held."""
        (n,) = self._db.execute("SELECT COUNT(*) FROM entries").fetchone()
        return int(n)

    def truncate_from(self, index: int) -> None:
        """Delete the entry at `index` and every later one; the snapshot must lie before it."""
        if index <= self._snapshot[0]:
            raise ValueError(f"cannot truncate from {index}: the snapshot covers {self._snapshot}")
        with self._tx():
            self._db.execute("DELETE FROM entries WHERE idx >= ?", (index,))

    def save_snapshot(self, state: State) -> None:
        """Store `state` as the snapshot; it lies between the old snapshot and the last entry."""
        if not self._snapshot[0] <= state.index <= self.last()[0]:
            raise ValueError(
                f"snapshot at {state.index} outside [{self._snapshot[0]}, {self.last()[0]}]"
            )
        with self._tx():
            self._put_snapshot(state)
        self._snapshot = (state.index, state.term)

    def replace(self, state: State) -> None:
        """Drop every entry and keep `state` as the snapshot (installing a master's snapshot)."""
        with self._tx():
            self._db.execute("DELETE FROM entries")
            self._put_snapshot(state)
        self._snapshot = (state.index, state.term)

    def load_snapshot(self) -> State | None:
        """The stored snapshot, if any."""
        row = self._db.execute("SELECT json FROM snapshot").fetchone()
        return None if row is None else State.model_validate_json(row[0])

    def compact(self, upto: int) -> None:
        """Delete the entries at or before `upto`, which the snapshot must already cover."""
        if upto > self._snapshot[0]:
            raise ValueError(f"cannot compact to {upto}: the snapshot is at {self._snapshot[0]}")
        with self._tx():
            self._db.execute("DELETE FROM entries WHERE idx <= ?", (upto,))

    def size_bytes(self) -> int:
        """Bytes on disk: the database file and its write-ahead log."""
        files = (self._path, self._path.with_name(self._path.name + "-wal"))
        return sum(f.stat().st_size for f in files if f.exists())

    def close(self) -> None:
        """Close the database (checkpointing the write-ahead log)."""
        self._db.close()

    def _put_snapshot(self, state: State) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO snapshot (id, idx, term, json) VALUES (0, ?, ?, ?)",
            (state.index, state.term, state.model_dump_json()),
        )

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """One write transaction: committed whole or not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
