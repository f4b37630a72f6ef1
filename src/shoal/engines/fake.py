"""FakeEngine: a deterministic numpy stand-in for a model, for tests of everything around engines.

Its "model" is a fixed-seed embedding, one random mixing matrix per global layer and a head. Each
layer keeps a decaying sum of its inputs per request (its "KV cache"), so outputs depend on the
whole prefix and a cache bug changes them. Every position runs as its own vector operations, so
results are bit-identical however a sequence is chunked, batched or split into shards.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.engines.base import ProgressFn, StepInput, WeightSource
from shoal.types.ids import RequestId
from shoal.types.shard import Shard

DECAY = np.float32(0.5)  # weight of the older prefix in each layer's running state


@dataclass
class _State:
    """One request's cache: positions seen and each layer's running state [layers, hidden]."""

    length: int
    memory: np.ndarray


class FakeEngine:
    """The Engine protocol over a tiny random numpy model; outputs depend only on the tokens."""

    name = "fake"

    def __init__(
        self,
        vocab_size: int | None = None,
        hidden_size: int | None = None,
        seed: int = 0,
        delay_s: float = 0.0,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.seed = seed
        self.delay_s = delay_s  # slept per forward, to play a slow engine
        self.threads: int | None = None  # what set_threads was last told
        self._shard: Shard | None = None
        self._embed: np.ndarray | None = None
        self._layers: list[np.ndarray] = []
        self._head: np.ndarray | None = None
        self._states: dict[RequestId, _State] = {}

    def load(
        self, shard: Shard, source: WeightSource | None = None, progress: ProgressFn | None = None
    ) -> None:
        """Draw the shard's weights from the seed; sizes from the constructor or source.config."""
        vocab, hidden = self.vocab_size, self.hidden_size
        if source is not None:
            vocab = vocab or source.config.vocab_size
            hidden = hidden or source.config.hidden_size
        if vocab is None or hidden is None:
            raise ValueError("FakeEngine needs vocab_size and hidden_size, or a source config")
        self.vocab_size, self.hidden_size = vocab, hidden
        # One generator per global part, so every shard draws the same weights as the whole.
        self._embed = self._draw(0, (vocab, hidden), 1.0) if shard.is_first else None
        self._layers = []
        total = shard.end - shard.start
        for done, i in enumerate(range(shard.start, shard.end), start=1):
            self._layers.append(self._draw(1 + i, (hidden, hidden), hidden**-0.5))
            if progress is not None:
                progress(done, total)
        last = shard.is_last
        self._head = self._draw(1 + shard.n_layers, (vocab, hidden), hidden**-0.5) if last else None
        self._shard = shard
        self._states.clear()

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        """Run each item after its cached prefix, one position at a time."""
        shard = self._loaded()
        ids = [item.request_id for item in batch]
        if len(set(ids)) != len(ids):
            raise ValueError("a request appears twice in one batch")
        for item in batch:
            self._check(item, shard)
        if self.delay_s:
            time.sleep(self.delay_s)
        return [self._run(item, shard, all_logits) for item in batch]

    def free(self, request_id: RequestId) -> None:
        """Drop the request's cache; unknown ids are ignored."""
        self._states.pop(request_id, None)

    def set_threads(self, threads: int) -> None:
        """Kept to be read back: the fake model runs on the calling thread alone."""
        self.threads = threads

    def close(self) -> None:
        """Release every cache and the weights."""
        self._states.clear()
        self._embed, self._layers, self._head, self._shard = None, [], None, None

    def cache_length(self, request_id: RequestId) -> int:
        """Positions cached for the request (0 if none)."""
        state = self._states.get(request_id)
        return state.length if state is not None else 0

    def cached_positions(self) -> int:
        """Positions the caches of every request hold together."""
        return sum(state.length for state in list(self._states.values()))

    def truncate(self, request_id: RequestId, length: int) -> None:
        """Only to its whole length (its state is a running sum): ValueError otherwise."""
        held = self.cache_length(request_id)
        if length != held:
            raise ValueError(f"the fake engine cannot drop positions ({request_id} holds {held})")

    def fork(self, source: RequestId, target: RequestId, length: int) -> None:
        """target := source, when `length` is all source holds (its state is a running sum, not
        per position: a shorter copy cannot be made)."""
        state = self._states.get(source)
        held = state.length if state is not None else 0
        if state is None or length != held:
            raise ValueError(f"the fake engine copies whole caches only ({source} holds {held})")
        self._states[target] = _State(held, state.memory.copy())

    def _draw(self, part: int, shape: tuple[int, int], scale: float) -> np.ndarray:
        rng = np.random.default_rng([self.seed, part])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def _loaded(self) -> Shard:
        if self._shard is None:
            raise RuntimeError("FakeEngine.forward before load()")
        return self._shard

    def _check(self, item: StepInput, shard: Shard) -> None:
        """Refuse an item that cannot run, before any cache changes."""
        rid, data = item.request_id, item.data
        cached = self.cache_length(rid)
        if item.start != cached:
            # As for a real KV cache: a gap or overlap would put positions in the wrong place.
            raise ValueError(
                f"request {rid}: step starts at {item.start} but its cache holds {cached} "
                "positions; free() it to start again"
            )
        if shard.is_first:
            ok = data.ndim == 1 and data.dtype.kind in "iu"
            ok = ok and data.size > 0 and data.min() >= 0 and data.max() < (self.vocab_size or 0)
        else:
            ok = data.ndim == 2 and data.shape[0] > 0 and data.shape[1] == self.hidden_size
        if not ok:
            want = "token ids [T] in the vocab" if shard.is_first else "hidden [T, hidden]"
            raise ValueError(f"request {rid}: this shard takes {want}, got {data.shape}")

    def _run(self, item: StepInput, shard: Shard, all_logits: bool) -> np.ndarray:
        embed = self._embed
        h = embed[item.data] if embed is not None else item.data.astype(np.float32)  # [T, hidden]
        old = self._states.get(item.request_id)
        memory = (
            old.memory.copy()
            if old is not None
            else np.zeros((len(self._layers), h.shape[1]), np.float32)
        )  # [layers, hidden]
        rows = [self._position(vec, memory) for vec in h]
        self._states[item.request_id] = _State(item.start + len(rows), memory)
        out = np.stack(rows)  # [T, hidden]
        if self._head is None:
            return out
        if not all_logits:
            return self._logits(out[-1])  # [vocab]
        return np.stack([self._logits(vec) for vec in out])  # [T, vocab]

    def _position(self, vec: np.ndarray, memory: np.ndarray) -> np.ndarray:
        """One position through every layer, updating each layer's running state in place."""
        for layer, weight in enumerate(self._layers):
            memory[layer] = DECAY * memory[layer] + vec  # [hidden]
            vec = vec + np.float32(0.5) * np.tanh(weight @ memory[layer])  # [hidden]
        return vec

    def _logits(self, vec: np.ndarray) -> np.ndarray:
        assert self._head is not None
        scale = np.float32(1.0) / np.sqrt(np.mean(vec * vec) + np.float32(1e-6))
        return self._head @ (vec * scale)  # [vocab]
