"""Per-request KV caches for the layers of one shard, preallocated and grown in chunks.

One store for every engine that keeps its own caches (torch, numpy, native): the arrays are numpy
or torch, made by the `zeros` function the engine passes; the rest is the same slicing. A model
says how wide its keys and values are (`cache_dims`): a dense model caches per key/value head, a
latent-attention one (deepseek_v3) one compressed "head" of kv_lora_rank values as its keys and
the shared rotary key of qk_rope_head_dim values as its values.
"""

from collections.abc import Callable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from shoal.engines.args import ModelArgs
from shoal.types.ids import RequestId

CHUNK = 256  # positions added per growth; appending a token is a slice write, not a concatenate


class Array(Protocol):
    """What the store needs of a numpy array or a torch tensor."""

    @property
    def shape(self) -> Any: ...

    @property
    def nbytes(self) -> int: ...

    def __getitem__(self, key: Any) -> Any: ...

    def __setitem__(self, key: Any, value: Any) -> None: ...


A = TypeVar("A", bound=Array)
Zeros = Callable[[tuple[int, int, int, int]], A]  # a zero-filled [L, KV, capacity, D] array


class CacheDims(NamedTuple):
    """What one layer caches per position: `heads` rows of key_dim keys and value_dim values."""

    heads: int
    key_dim: int
    value_dim: int


def cache_dims(args: ModelArgs) -> CacheDims:
    """The cache widths of a model: per key/value head, or MLA's latent and rotary key."""
    if args.kv_lora_rank:  # the normalised compressed kv as "keys", the rotated k_pe as "values"
        return CacheDims(1, args.kv_lora_rank, args.qk_rope_head_dim)
    return CacheDims(args.num_key_value_heads, args.head_dim, args.head_dim)


class KVCache(Generic[A]):
    """Keys and values of one request for every layer of the shard, `length` positions committed."""

    # Storage is [layers, kv_heads, capacity, head_dim] (values value_dim wide, head_dim unless
    # given). A step writes each layer's new keys and values after the committed prefix, then
    # `advance` commits them, so a step that fails halfway leaves the cache as it was.

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        zeros: Zeros[A],
        chunk: int = CHUNK,
        value_dim: int | None = None,
    ) -> None:
        self.length = 0
        self.chunk = chunk
        self._zeros = zeros
        self.k = zeros((n_layers, n_kv_heads, 0, head_dim))
        self.v = zeros((n_layers, n_kv_heads, 0, head_dim if value_dim is None else value_dim))
        self._layers: list[tuple[A, A]] = []
        self._views()

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def reserve(self, n: int) -> None:
        """Make room for n positions in all, growing to the next multiple of the chunk."""
        if n <= self.capacity:
            return
        size = -(-n // self.chunk) * self.chunk
        layers, heads, _, dim = self.k.shape
        value_dim = self.v.shape[3]
        # zeros, not garbage: a fixed-shape step (torch/llama.py Context.fixed) weighs every
        # position past the prefix by 0, and 0 * NaN would be NaN
        k = self._zeros((layers, heads, size, dim))  # [L, KV, size, D]
        v = self._zeros((layers, heads, size, value_dim))  # [L, KV, size, Dv]
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v
        self._views()

    def layer(self, layer: int) -> tuple[A, A]:
        """The layer's keys and values over the whole capacity: [KV, capacity, D] views."""
        return self._layers[layer]

    def update(self, layer: int, k: Any, v: Any) -> tuple[A, A]:
        """Write k [KV, T, D], v [KV, T, Dv] after the committed prefix; return all of the layer's
        so far."""
        end = self.length + k.shape[1]
        assert end <= self.capacity, "reserve() before update()"
        keys, values = self._layers[layer]  # [KV, capacity, D]
        keys[:, self.length : end] = k
        values[:, self.length : end] = v
        return keys[:, :end], values[:, :end]  # [KV, end, D] views

    def advance(self, t: int) -> None:
        """Commit the t positions every layer has just written."""
        self.length += t

    def _views(self) -> None:
        # per-layer views, made once per growth: indexing a torch tensor costs microseconds
        self._layers = [(self.k[i], self.v[i]) for i in range(int(self.k.shape[0]))]


class CacheStore(Generic[A]):
    """One KVCache per request id, created on first use."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        zeros: Zeros[A],
        value_dim: int | None = None,
    ) -> None:
        self._shape = (n_layers, n_kv_heads, head_dim)
        self._value_dim = value_dim
        self._zeros = zeros
        self._caches: dict[RequestId, KVCache[A]] = {}

    def length(self, request_id: RequestId) -> int:
        """Positions cached for the request; 0 for an unknown one."""
        cache = self._caches.get(request_id)
        return cache.length if cache is not None else 0

    def get(self, request_id: RequestId) -> KVCache[A]:
        """The request's cache, empty if it had none."""
        cache = self._caches.get(request_id)
        if cache is None:
            cache = KVCache(*self._shape, zeros=self._zeros, value_dim=self._value_dim)
            self._caches[request_id] = cache
        return cache

    def free(self, request_id: RequestId) -> None:
        """Drop the request's cache; unknown ids are ignored."""
        self._caches.pop(request_id, None)

    def clear(self) -> None:
        """Drop every cache."""
        self._caches.clear()

    def __len__(self) -> int:
        return len(self._caches)

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self._caches.values())

    @property
    def positions(self) -> int:
        """Positions cached over all requests."""
        return sum(cache.length for cache in list(self._caches.values()))

    def truncate(self, request_id: RequestId, length: int) -> None:
        """Keep only the first `length` positions; ValueError if the request holds fewer."""
        held = self.length(request_id)
        if held < length:
            raise ValueError(f"cannot keep {length} positions of {request_id}: it holds {held}")
        if request_id in self._caches:
            self._caches[request_id].length = length

    def fork(self, source: RequestId, target: RequestId, length: int) -> None:
        """Make target's cache a copy of source's first `length` positions (the choices of one
        request share its prompt's prefill); ValueError if source holds fewer."""
        held = self.length(source)
        if held < length:
            raise ValueError(f"cannot fork {length} positions of {source}: it holds {held}")
        copy = KVCache(*self._shape, zeros=self._zeros, value_dim=self._value_dim)
        copy.reserve(length)
        if length:
            src = self._caches[source]
            copy.k[:, :, :length] = src.k[:, :, :length]
            copy.v[:, :, :length] = src.v[:, :, :length]
        copy.advance(length)
        self._caches[target] = copy
