"""StateStore: a replica's State, journal and ordered buffer behind one synchronous object.

Entries come in through `accept` (a replica) or `append_as_master` (the master); either way they
are applied, journaled and, every `snapshot_every` entries, snapshotted and compacted so disk use
and catch-up time stay bounded.

Divergence (Raft-like). `accept` takes entries only from the master its caller follows. Each entry
carries the term of the one before it in the master's log (`prev_term`) and is appended only where
our last term matches, so equal (index, term) means equal logs up to there. A higher-term entry at
an index we hold means our log diverged (we followed a master that lost a partition): we cut our
log back there and rebuild the State from the snapshot plus the journal; a lower-term one is
dropped. An entry whose `prev_term` does not match cuts 1, 2, 4, ... of our last entries until the
logs meet, and gap repair (`wanted`) fetches the master's; if they only meet inside our snapshot,
`Diverged` asks for the master's snapshot.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

from shoal.errors import ShoalError
from shoal.state.apply import apply, apply_all
from shoal.state.buffer import OrderedBuffer
from shoal.state.journal import Journal
from shoal.state.model import State
from shoal.types.events import Event, IndexedEvent

log = logging.getLogger(__name__)


class Compacted(ShoalError):
    """The asked-for entries were compacted away; send the snapshot instead."""


class Diverged(ShoalError):
    """Our log disagrees with the master's at or before our snapshot; install the master's."""


class StateStore:
    """The replicated State of one node, restored from and kept in its journal."""

    def __init__(self, journal: Journal, *, snapshot_every: int = 1000, keep: int = 1000) -> None:
        if snapshot_every < 1 or keep < 0:
            raise ValueError(f"need snapshot_every >= 1, keep >= 0: {snapshot_every}, {keep}")
        self._journal = journal
        self._snapshot_every = snapshot_every
        self._keep = keep
        self._state = self._rebuild()
        self._buffer = OrderedBuffer(self._state.index + 1)
        self._backtrack = 1  # entries to cut at the next log mismatch; doubles while they repeat

    @classmethod
    def open(cls, path: Path, *, snapshot_every: int = 1000, keep: int = 1000) -> "StateStore":
        """Open (or create) the journal at `path` and restore the State from it."""
        return cls(Journal(path), snapshot_every=snapshot_every, keep=keep)

    @property
    def state(self) -> State:
        """The State after every applied entry."""
        return self._state

    @property
    def last_index(self) -> int:
        """Index of the last applied entry (0 when none)."""
        return self._state.index

    @property
    def last_term(self) -> int:
        """Term of the last applied entry (0 when none)."""
        return self._state.term

    @property
    def first_index(self) -> int:
        """The oldest entry this node can still serve."""
        return self._journal.first_index()

    @property
    def journal(self) -> Journal:
        """The journal underneath (for sizes and tests)."""
        return self._journal

    def accept(self, entry: IndexedEvent) -> list[IndexedEvent]:
        """Take one entry from the master, in any order; return the entries applied by it."""
        if entry.index <= self.last_index:
            ours = self._journal.term_at(entry.index)
            if ours is None and entry.term > self._journal.snapshot_term:
                # Compacted here, but every term we hold up to the snapshot is lower.
                raise Diverged(f"log differs from the master's at {entry.index}, in our snapshot")
            if ours is None or entry.term <= ours:
                return []  # a duplicate, compacted history, or a replaced master's entry
            log.info(
                "log diverged at %d (term %d here, %d at the master): rolling back",
                entry.index,
                ours,
                entry.term,
            )
            self.truncate_from(entry.index)
        return self._deliver(self._buffer.push(entry))

    def gap(self) -> tuple[int, int] | None:
        """The half-open range to ask the master for, while entries wait behind a hole."""
        return self._buffer.gap()

    def wanted(self, master_index: int, master_term: int) -> tuple[int, int] | None:
        """The range to fetch from a master whose log ends at this (index, term); None if level."""
        # A held-back hole first (entries held past the master's end are a replaced master's:
        # not worth asking for); then what we lack; then, if our entry at the master's last
        # index differs, that one entry: its arrival rolls back our diverged tail.
        gap = self.gap()
        if gap is not None and gap[0] <= master_index:
            return (gap[0], min(gap[1], master_index + 1))
        if self.last_index < master_index:
            return (self.last_index + 1, master_index + 1)
        ours = self.term_at(master_index)
        if ours == master_term or (ours is None and master_term <= self.last_term):
            return None  # level, or compacted here and nothing says we differ
        return (master_index, master_index + 1)

    def term_at(self, index: int) -> int | None:
        """The term of our entry at `index`, if held."""
        return self._journal.term_at(index)

    def entries(self, start: int, end: int) -> list[IndexedEvent]:
        """Our entries in [start, end), to answer a repair request."""
        if start < self.first_index:
            raise Compacted(f"entries before {self.first_index} were compacted (asked {start})")
        return self._journal.read(start, end)

    def snapshot(self) -> State:
        """The current State, to send to a node behind our compaction point."""
        return self._state

    def install_snapshot(self, state: State) -> None:
        """Replace everything (State, journal, buffer) with the master's snapshot."""
        self._journal.replace(state)
        self._state = state
        self._buffer.reset(state.index + 1)
        self._backtrack = 1
        log.info("installed a snapshot at index %d, term %d", state.index, state.term)

    def append_as_master(self, events: Sequence[Event], term: int) -> list[IndexedEvent]:
        """Index the master's new events in `term`, apply and journal them; return the entries."""
        if term < self.last_term:
            raise ValueError(f"term {term} is behind the log's term {self.last_term}")
        state, entries = self._state, []
        for event in events:
            entry = IndexedEvent(
                index=state.index + 1, term=term, prev_term=state.term, event=event
            )
            state = apply(state, entry)
            entries.append(entry)
        if entries:
            self._journal.append(entries)
            self._state = state
            self._buffer.reset(state.index + 1)  # whatever it held came from a former master
            self.maybe_compact()
        return entries

    def truncate_from(self, index: int) -> None:
        """Delete our entries from `index` on and rebuild the State from what remains."""
        if index > self.last_index:
            return
        if index <= self._journal.snapshot_index:
            raise Diverged(f"log differs from the master's at {index}, inside our snapshot")
        self._journal.truncate_from(index)
        self._state = self._rebuild()
        self._buffer.rewind(index)

    def maybe_compact(self) -> bool:
        """Every `snapshot_every` entries: snapshot, drop the entries more than `keep` before it."""
        if self.last_index - self._journal.snapshot_index < self._snapshot_every:
            return False
        self._journal.save_snapshot(self._state)
        self._journal.compact(self.last_index - self._keep)
        return True

    def close(self) -> None:
        """Close the journal."""
        self._journal.close()

    def _deliver(self, batch: list[IndexedEvent]) -> list[IndexedEvent]:
        """Apply and journal `batch` (in order) up to the first entry that does not follow ours."""
        state, applied = self._state, []
        for entry in batch:
            if entry.prev_term != state.term:
                break
            state = apply(state, entry)
            applied.append(entry)
        if applied:
            self._journal.append(applied)
            self._state = state
            self._backtrack = 1
        if len(applied) < len(batch):
            self._refuse(batch[len(applied)], batch[len(applied) + 1 :])
        self.maybe_compact()
        return applied

    def _refuse(self, entry: IndexedEvent, rest: list[IndexedEvent]) -> None:
        """Our last entries are not the master's: cut some, hold the rest for gap repair."""
        if self.last_index <= self._journal.snapshot_index:
            raise Diverged(f"log differs from the master's at or before {self.last_index}")
        cut = max(self.last_index - self._backtrack + 1, self._journal.snapshot_index + 1)
        log.info("log mismatch before %d: rolling back to %d", entry.index, cut - 1)
        self._backtrack *= 2
        self.truncate_from(cut)
        # The refused entry is dropped, not held: if it is the master's, repair brings it again;
        # if a replaced master's entry sat in the buffer, holding it would cut us back forever.
        for later in rest:
            self._buffer.push(later)

    def _rebuild(self) -> State:
        """The State from the snapshot plus every journaled entry after it."""
        base = self._journal.load_snapshot() or State()
        last = self._journal.last()[0]
        return apply_all(base, self._journal.read(base.index + 1, last + 1))
