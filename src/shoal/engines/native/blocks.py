"""Block-quantized weights: a [n, k] matrix in GGUF's blocks of 32, and its product.

"q8" is int8 and an fp16 scale per block (GGUF Q8_0), or uint8 with an fp16 scale and minimum
(MLX 8-bit), "q4" 4-bit values, an fp16 scale and minimum per block (GGUF Q4_1, MLX 4-bit), so a
Q8_0, Q4_1 or MLX 4/8-bit checkpoint (groups of 32, 64, 128: whole blocks) is held exactly.
The product writes each activation as a 15-bit integer per block of 32 (llama.cpp uses 8 bits)
and sums integer products exactly, so a row's result does not depend on the rest of the batch.
The C side is blocks.c.
"""

import ctypes
import logging
import os
from typing import Literal

import numpy as np

from shoal.engines.native.abi import Library, Matrix
from shoal.engines.packed import Packed

log = logging.getLogger(__name__)

BLOCK = 32  # weights per block along the input dimension
LANES = 8  # rows interleaved per group
Kind = Literal["q8", "q4"]


def threads_or_all(threads: int | None) -> int:
    return max(1, threads or os.cpu_count() or 1)


def _grouped(n: int, k: int) -> tuple[int, int]:
    """(groups of 8 rows, blocks per row) of an [n, k] block matrix."""
    return -(-n // LANES), k // BLOCK


def address(array: np.ndarray, dtype: type, shape: tuple[int, ...]) -> int:
    """The data address of a C-contiguous array of dtype and shape, after checking all three."""
    if array.dtype != dtype or array.shape != shape or not array.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous {np.dtype(dtype)} array {shape}")
    return int(array.ctypes.data)


class BlockWeights:
    """A [n, k] matrix in blocks of 32 along k (k a multiple of 32), as numpy arrays.

    Rows are interleaved by 8 (blocks.c), groups = ceil(n / 8): q8 values int8
    [groups, k / 32, 256] (uint8 when it has minimums), q4 values uint8 [groups, k / 32, 128];
    scales (and minimums) fp16 [groups, k / 32, 8].
    """

    def __init__(
        self,
        lib: Library,
        kind: Kind,
        n: int,
        values: np.ndarray,
        scales: np.ndarray,
        minimums: np.ndarray | None,
    ) -> None:
        self.lib, self.kind, self.n = lib, kind, n
        self.k = scales.shape[1] * BLOCK
        self.values, self.scales, self.minimums = values, scales, minimums
        shape = _grouped(n, self.k)
        address(scales, np.float16, (*shape, LANES))
        if kind == "q8":
            address(values, np.int8 if minimums is None else np.uint8, (*shape, LANES * BLOCK))
            if minimums is not None:
                address(minimums, np.float16, (*shape, LANES))
        else:
            assert minimums is not None
            address(values, np.uint8, (*shape, LANES * BLOCK // 2))
            address(minimums, np.float16, (*shape, LANES))
        self.matrix = Matrix(
            8 if kind == "q8" else 4,
            n,
            self.k,
            values.ctypes.data,
            scales.ctypes.data,
            None if minimums is None else minimums.ctypes.data,
        )

    @classmethod
    def quantize(
        cls, lib: Library, weight: np.ndarray, kind: Kind, threads: int | None = None
    ) -> "BlockWeights":
        """Blocks of a float [n, k] weight: each block's own scale (and minimum for q4)."""
        w = np.ascontiguousarray(weight, dtype=np.float32)
        n, k = w.shape
        if k % BLOCK:
            raise ValueError(f"input dimension {k} is not a multiple of {BLOCK}")
        t = threads_or_all(threads)
        shape = _grouped(n, k)
        scales = np.empty((*shape, LANES), np.float16)
        if kind == "q8":
            values = np.empty((*shape, LANES * BLOCK), np.int8)
            lib.lib.shoal_quantize_q8(
                w.ctypes.data, n, k, values.ctypes.data, scales.ctypes.data, t
            )
            return cls(lib, kind, n, values, scales, None)
        values = np.empty((*shape, LANES * BLOCK // 2), np.uint8)
        minimums = np.empty_like(scales)
        lib.lib.shoal_quantize_q4(
            w.ctypes.data, n, k, values.ctypes.data, scales.ctypes.data, minimums.ctypes.data, t
        )
        return cls(lib, kind, n, values, scales, minimums)

    @classmethod
    def from_packed(cls, lib: Library, packed: Packed) -> "BlockWeights | None":
        """Blocks holding a packed matrix exactly, without a round trip through floats: 4 bits →
        q4, 8 bits → q8 with minimums; None where it cannot (other bits, groups not whole
        blocks, or a scale or bias that fp16 does not hold exactly)."""
        n, k = packed.shape
        if packed.bits not in (4, 8) or packed.group_size % BLOCK:
            return None
        scales, biases = packed.group_scales()  # float32 [n, k / group]
        d, m = scales.astype(np.float16), biases.astype(np.float16)
        if not (np.array_equal(d, scales) and np.array_equal(m, biases)):
            return None
        groups, nb = _grouped(n, k)
        per = packed.group_size // BLOCK  # blocks per group, sharing its scale and bias

        def lanes(x: np.ndarray) -> np.ndarray:  # [n, ...] → [groups, 8, ...], zero-padded
            padded = np.zeros((groups * LANES, *x.shape[1:]), x.dtype)
            padded[:n] = x
            return padded.reshape(groups, LANES, *x.shape[1:])

        def per_block(x: np.ndarray) -> np.ndarray:  # [n, k / group] → [groups, k / 32, 8]
            return np.ascontiguousarray(lanes(np.repeat(x, per, axis=1)).transpose(0, 2, 1))

        q = lanes(packed.values().reshape(n, nb, BLOCK))  # uint8 [groups, 8, nb, 32]
        if packed.bits == 4:  # lane 4h + j, value e (< 16) and 16 + e → byte 32 j + 16 h + e
            pairs = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)  # [groups, 8, nb, 16]
            values = pairs.reshape(groups, 2, 4, nb, BLOCK // 2).transpose(0, 3, 2, 1, 4)
            kind: Kind = "q4"
        else:  # lane 4h + j, value 8c + e → byte 16 (4 j + c) + 8 h + e
            values = q.reshape(groups, 2, 4, nb, 4, 8).transpose(0, 3, 2, 4, 1, 5)
            kind = "q8"
        values = np.ascontiguousarray(values).reshape(groups, nb, -1)
        return cls(lib, kind, n, values, per_block(d), per_block(m))

    @property
    def nbytes(self) -> int:
        extra = 0 if self.minimums is None else self.minimums.nbytes
        return self.values.nbytes + self.scales.nbytes + extra

    def matmul_into(self, x: int, rows: int, out: int, threads: int | None = None) -> None:
        """out [rows, n] = x [rows, k] @ W^T, at raw addresses of C-contiguous float32 data."""
        status = self.lib.lib.shoal_matmul(
            ctypes.byref(self.matrix), x, rows, out, threads_or_all(threads)
        )
        if status:
            raise MemoryError(f"no memory to quantize {rows} activation rows")

    def dequantize_into(self, out: int, threads: int | None = None) -> None:
        """The float32 [n, k] matrix, written at a raw address."""
        self.lib.lib.shoal_dequantize(ctypes.byref(self.matrix), out, threads_or_all(threads))

    def matmul(self, x: np.ndarray, threads: int | None = None) -> np.ndarray:
        """x [..., k] float32 @ W^T → [..., n] float32."""
        x2 = np.ascontiguousarray(x.reshape(-1, self.k), dtype=np.float32)
        out = np.empty((x2.shape[0], self.n), np.float32)
        self.matmul_into(int(x2.ctypes.data), x2.shape[0], int(out.ctypes.data), threads)
        return out.reshape(*x.shape[:-1], self.n)

    def dequantize(self, threads: int | None = None) -> np.ndarray:
        out = np.empty((self.n, self.k), np.float32)
        self.dequantize_into(int(out.ctypes.data), threads)
        return out


def blocks_of(
    lib: Library, weight: "np.ndarray | Packed", kind: Kind, threads: int | None, name: str
) -> BlockWeights:
    """A weight as blocks: a packed one exactly in its own format where it fits (from_packed),
    otherwise (a float weight, or a packed one that does not fit) quantized to `kind`."""
    if isinstance(weight, Packed):
        blocks = BlockWeights.from_packed(lib, weight)
        if blocks is not None:
            return blocks
        log.info(
            "%s: %d-bit groups of %d with %s scales do not map exactly onto blocks: "
            "dequantized and re-quantized to %s",
            name,
            weight.bits,
            weight.group_size,
            weight.float_dtype,
            kind,
        )
        weight = weight.dequantize()
    return BlockWeights.quantize(lib, weight, kind, threads)
