"""Per-request KV caches for the layers of one shard, preallocated and grown in chunks."""

import torch

from shoal.types.ids import RequestId

CHUNK = 256  # positions added per growth; appending a token is a slice write, not a torch.cat


class KVCache:
    """Keys and values of one request for every layer of the shard, `length` positions committed."""

    # Storage is [layers, kv_heads, capacity, head_dim]. A step writes each layer's new keys and
    # values after the committed prefix, then `advance` commits them, so a step that fails
    # halfway leaves the cache as it was.

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        chunk: int = CHUNK,
    ) -> None:
        self.length = 0
        self.chunk = chunk
        self.k = torch.empty(n_layers, n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # views

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def reserve(self, n: int) -> None:
        """Make room for n positions in all, growing to the next multiple of the chunk."""
        if n <= self.capacity:
            return
        size = -(-n // self.chunk) * self.chunk
        layers, heads, _, dim = self.k.shape
        # zeros, not garbage: a fixed-shape step (llama.py Context.fixed) weighs every position
        # past the prefix by 0, and 0 * NaN would be NaN
        k = self.k.new_zeros(layers, heads, size, dim)  # [L, KV, size, D]
        v = self.v.new_zeros(layers, heads, size, dim)  # [L, KV, size, D]
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v
        self._layers = list(zip(k.unbind(0), v.unbind(0), strict=True))

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [KV, T, D] after the committed prefix; return all of the layer's so far."""
        end = self.length + k.shape[1]
        assert end <= self.capacity, "reserve() before update()"
        keys, values = self._layers[layer]  # [KV, capacity, D] views, made once per growth
        keys[:, self.length : end] = k
        values[:, self.length : end] = v
        return keys[:, :end], values[:, :end]

    def write_at(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one position's k, v [KV, 1, D] at the index in position [1] (a tensor, so a
        CUDA graph can replay it at the next position); return the layer's whole capacity."""
        keys, values = self._layers[layer]  # [KV, capacity, D]
        keys.index_copy_(1, position, k.to(keys.dtype))
        values.index_copy_(1, position, v.to(values.dtype))
        return keys, values

    def advance(self, t: int) -> None:
        """Commit the t positions every layer has just written."""
        self.length += t


class CacheStore:
    """One KVCache per request id, created on first use."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._shape = (n_layers, n_kv_heads, head_dim)
        self._dtype = dtype
        self._device = device
        self._caches: dict[RequestId, KVCache] = {}

    def length(self, request_id: RequestId) -> int:
        """Positions cached for the request; 0 for an unknown one."""
        cache = self._caches.get(request_id)
        return cache.length if cache is not None else 0

    def get(self, request_id: RequestId) -> KVCache:
        """The request's cache, empty if it had none."""
        cache = self._caches.get(request_id)
        if cache is None:
            cache = KVCache(*self._shape, dtype=self._dtype, device=self._device)
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
