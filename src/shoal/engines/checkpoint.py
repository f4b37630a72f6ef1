"""A shard's tensors taken by name as an engine builds its modules; left-overs or gaps refuse it."""

from collections.abc import Mapping

import numpy as np

from shoal.engines.packed import Packed, dense
from shoal.errors import UnsupportedModel

F32 = np.float32


class Checkpoint:
    """The shard's tensors, taken by name as modules are built; names left over or missing fail."""

    def __init__(self, tensors: Mapping[str, np.ndarray | Packed]) -> None:
        self._left = dict(tensors)
        self._missing: list[str] = []

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor `name` of that shape as contiguous float32 (what numpy and the native
        kernels both read; a packed one dequantized); a missing one is recorded for `finish`."""
        return dense(self.take_packed(name, shape))

    def take_packed(self, name: str, shape: tuple[int, ...]) -> np.ndarray | Packed:
        """Like take, but a packed (MLX-quantized) tensor stays packed, for an engine that turns
        it into its own format without a round trip through floats."""
        array = self._left.pop(name, None)
        if array is None:
            self._missing.append(name)
            return np.zeros(shape, F32)  # a stand-in until finish() refuses the load
        if tuple(array.shape) != shape:
            raise UnsupportedModel(f"{name}: shape {tuple(array.shape)}, expected {shape}")
        return array if isinstance(array, Packed) else np.ascontiguousarray(array, dtype=F32)

    def finish(self, what: str) -> None:
        """Refuse the load if any tensor was missing or not taken."""
        if self._missing or self._left:
            raise UnsupportedModel(
                f"weights do not fit {what}: "
                f"missing {sorted(self._missing)}, unexpected {sorted(self._left)}"
            )
