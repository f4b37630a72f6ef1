"""OrderedBuffer: entries arrive in any order (pub/sub, repair replies) and leave in index order.

Pure and synchronous. Entries past a hole are held until the hole is filled; `gap()` names the
hole so the replica can ask the master for it. The buffer is bounded: past `limit` held entries
the highest are dropped, and gap repair fetches them again later.
"""

from bisect import insort

from shoal.types.events import IndexedEvent


class OrderedBuffer:
    """Holds entries that arrived early and releases them by consecutive index."""

    def __init__(self, next_index: int = 1, *, limit: int = 10_000) -> None:
        if next_index < 1 or limit < 1:
            raise ValueError(f"need next_index >= 1 and limit >= 1, got {next_index}, {limit}")
        self._limit = limit
        self._next = next_index
        self._held: dict[int, IndexedEvent] = {}
        self._order: list[int] = []  # indices of _held, ascending

    @property
    def next_index(self) -> int:
        """The index the buffer releases next."""
        return self._next

    def __len__(self) -> int:
        return len(self._held)

    def push(self, entry: IndexedEvent) -> list[IndexedEvent]:
        """Take one entry; return the entries that are now deliverable, in index order."""
        index = entry.index
        if index < self._next:
            return []  # already delivered: a duplicate or a late repair reply
        if index > self._next:
            self._hold(entry)
            return []
        out = [entry]
        self._next += 1
        run = 0
        while run < len(self._order) and self._order[run] == self._next:
            out.append(self._held.pop(self._next))
            self._next += 1
            run += 1
        del self._order[:run]
        return out

    def gap(self) -> tuple[int, int] | None:
        """The missing half-open range [next_index, lowest held) while entries are held back."""
        return (self._next, self._order[0]) if self._order else None

    def reset(self, next_index: int) -> None:
        """Forget every held entry and expect `next_index` next."""
        if next_index < 1:
            raise ValueError(f"next_index must be >= 1, got {next_index}")
        self._next = next_index
        self._held.clear()
        self._order.clear()

    def rewind(self, next_index: int) -> None:
        """Expect an earlier `next_index` next (the log was cut back), keeping what is held."""
        if not 1 <= next_index <= self._next:
            raise ValueError(f"cannot rewind from {self._next} to {next_index}")
        self._next = next_index

    def _hold(self, entry: IndexedEvent) -> None:
        """Keep an early entry; of two for one index the higher term wins; trim to the limit."""
        old = self._held.get(entry.index)
        if old is not None:
            if entry.term > old.term:
                self._held[entry.index] = entry
            return
        self._held[entry.index] = entry
        insort(self._order, entry.index)
        if len(self._order) > self._limit:
            del self._held[self._order.pop()]
