"""Prefix caching: a finished request's KV caches are kept on every stage, and a later request
whose prompt begins with the same tokens starts from a copy of them instead of prefilling them.

Two halves, each owning what it can see:

- `PrefixIndex`, beside the scheduler (the API node, which has the tokens): the token ids every
  kept cache holds, found by content: chained hashes of whole blocks of BLOCK tokens (as vLLM's
  prefix cache keys its blocks), so the longest kept prefix of a prompt is a few dict lookups,
  then extended token by token within the last block. At most `max_entries`, least recently
  used first out (its caches are then freed on the stages).
- `Retained`, on each stage (and in a local pipeline): the kept caches themselves, an LRU bounded
  in positions (a byte budget over the bytes one position costs the stage). A stage may let go
  of a cache the index still lists; a request that asked to start from it then fails its first
  step and is prefilled from scratch, alone: the index is a hint, the stage's caches the truth.

A request starts from a kept cache with the data plane's `fork` (the copy n choices use), so the
engines need nothing new. Requests with penalties never start from one: the last stage counts
the tokens a penalty needs from what the steps send, and a reused prefix is not sent.
"""

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from shoal.types.ids import RequestId

BLOCK = 32  # tokens a hash covers; a prompt reuses at least one whole block
DEFAULT_ENTRIES = 64


def block_hashes(tokens: Sequence[int]) -> list[bytes]:
    """One hash per whole block of tokens, each covering every token before it too."""
    out: list[bytes] = []
    previous = b""
    ids = np.asarray(tokens, dtype="<i8")
    for end in range(BLOCK, len(ids) + 1, BLOCK):
        previous = hashlib.blake2b(
            previous + ids[end - BLOCK : end].tobytes(), digest_size=16
        ).digest()
        out.append(previous)
    return out


class PrefixIndex:
    """Which kept caches hold which tokens: the API node's view of its stages' kept caches."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("a prefix index holds at least one entry")
        self.max_entries = max_entries
        self._entries: OrderedDict[RequestId, tuple[int, ...]] = OrderedDict()
        self._by_hash: dict[bytes, RequestId] = {}  # block chain → the latest entry holding it
        self._hashes: dict[RequestId, list[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, rid: RequestId) -> bool:
        return rid in self._entries

    def add(self, rid: RequestId, tokens: Sequence[int]) -> list[RequestId]:
        """Keep `rid`, whose caches hold exactly `tokens`; the entries evicted to make room
        (free their caches). A cache shorter than one block is not worth keeping: [rid]."""
        if len(tokens) < BLOCK:
            return [rid]
        hashes = block_hashes(tokens)
        self._entries[rid] = tuple(tokens)
        self._hashes[rid] = hashes
        for h in hashes:
            self._by_hash[h] = rid
        evicted = []
        while len(self._entries) > self.max_entries:
            old, _ = self._entries.popitem(last=False)
            self._forget(old)
            evicted.append(old)
        return evicted

    def lookup(self, prompt: Sequence[int]) -> tuple[RequestId, int] | None:
        """The kept cache sharing the longest prefix with `prompt`, and how many positions of it
        to reuse (at most len(prompt) - 1: the last prompt token must run, for its logits);
        None under one block. The entry counts as used (kept longest)."""
        rid: RequestId | None = None
        blocks = 0
        for i, h in enumerate(block_hashes(prompt)):
            found = self._by_hash.get(h)
            if found is None:
                break
            rid, blocks = found, i + 1
        if rid is None:
            return None
        held = self._entries[rid]
        reuse = blocks * BLOCK
        while reuse < min(len(held), len(prompt)) and held[reuse] == prompt[reuse]:
            reuse += 1  # the tokens past the last whole block that also match
        reuse = min(reuse, len(prompt) - 1)
        if reuse < BLOCK:
            return None
        self._entries.move_to_end(rid)
        return rid, reuse

    def drop(self, rid: RequestId) -> None:
        """Forget an entry (its caches are gone, or about to be)."""
        if self._entries.pop(rid, None) is not None:
            self._forget(rid)

    def clear(self) -> list[RequestId]:
        """Forget every entry; the ids whose caches to free."""
        gone = list(self._entries)
        self._entries.clear()
        self._by_hash.clear()
        self._hashes.clear()
        return gone

    def _forget(self, rid: RequestId) -> None:
        for h in self._hashes.pop(rid, []):
            if self._by_hash.get(h) == rid:
                del self._by_hash[h]  # an older entry with this block stays unfindable: fine


class Retained:
    """A stage's kept caches: request id → the positions it holds, least recently used first,
    at most `budget` positions together (0: nothing is kept)."""

    def __init__(self, budget: int) -> None:
        self.budget = max(0, budget)
        self._held: OrderedDict[RequestId, int] = OrderedDict()

    def __contains__(self, rid: RequestId) -> bool:
        return rid in self._held

    def __len__(self) -> int:
        return len(self._held)

    @property
    def positions(self) -> int:
        """Positions the kept caches hold together."""
        return sum(self._held.values())

    def keep(self, rid: RequestId, positions: int) -> list[RequestId]:
        """Keep rid's cache of `positions`; the caches to free now (the least recently used, until
        the rest fit the budget; rid itself if it alone does not)."""
        self._held[rid] = positions
        self._held.move_to_end(rid)
        evicted = []
        while self._held and self.positions > self.budget:
            old, _ = self._held.popitem(last=False)
            evicted.append(old)
        return evicted

    def touch(self, rid: RequestId) -> None:
        """rid was just used (a request started from it): kept longest."""
        if rid in self._held:
            self._held.move_to_end(rid)

    def discard(self, rid: RequestId) -> bool:
        """Forget rid; whether it was kept."""
        return self._held.pop(rid, None) is not None


def budget_positions(budget_bytes: int, layers: int, heads: int, key_dim: int, value_dim: int,
                     dtype_bytes: int = 4) -> int:  # fmt: skip
    """Positions a byte budget keeps for a shard of `layers` (keys and values per position)."""
    per_position = layers * heads * (key_dim + value_dim) * dtype_bytes
    return budget_bytes // per_position if per_position > 0 else 0
