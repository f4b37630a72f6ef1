"""Block-quantized weights: a [n, k] matrix in GGUF's blocks of 32, and its product.

"q8" is int8 and an fp16 scale per block (GGUF Q8_0), "q4" 4-bit values, an fp16 scale and minimum
per block (GGUF Q4_1), so a Q8_0 or Q4_1 checkpoint is held exactly. The product writes each
activation as a 15-bit integer per block of 32 (llama.cpp uses 8 bits) and sums integer products
exactly, so a row's result does not depend on the rest of the batch. The C side is blocks.c.
"""

import ctypes
import os
from typing import Literal

import numpy as np

from shoal.engines.native.abi import Library, Matrix

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
    [groups, k / 32, 256], q4 values uint8 [groups, k / 32, 128]; scales (and q4's minimums) fp16
    [groups, k / 32, 8].
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
            address(values, np.int8, (*shape, LANES * BLOCK))
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
