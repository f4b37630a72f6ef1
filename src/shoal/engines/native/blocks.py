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
from collections.abc import Sequence
from typing import Literal

import numpy as np

from shoal.engines.native.abi import Library, Matrix
from shoal.engines.packed import Packed, concat_rows, dense

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


def _lanes(x: np.ndarray, groups: int) -> np.ndarray:
    """[n, ...] rows → [groups, 8, ...], zero-padded to whole groups."""
    padded = np.zeros((groups * LANES, *x.shape[1:]), x.dtype)
    padded[: x.shape[0]] = x
    return padded.reshape(groups, LANES, *x.shape[1:])


def _layout(q: np.ndarray, kind: Kind) -> np.ndarray:
    """Integer values [groups, nb, 8 lanes, 32] → the bytes of blocks.c's layout [groups, nb, -1].

    q4: lane 4h + j's values e and 16 + e (e < 16) → the low and high nibble of byte 32 j + 16 h
    + e; q8: lane 4h + j's value 8c + e → byte 16 (4 j + c) + 8 h + e.
    """
    groups, nb = q.shape[:2]
    if kind == "q4":
        pairs = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)  # [groups, nb, 8, 16]
        out = pairs.reshape(groups, nb, 2, 4, BLOCK // 2).transpose(0, 1, 3, 2, 4)
    else:
        out = q.reshape(groups, nb, 2, 4, 4, 8).transpose(0, 1, 3, 4, 2, 5)
    return np.ascontiguousarray(out).reshape(groups, nb, -1)


def _lane_values(values: np.ndarray, kind: Kind) -> np.ndarray:
    """The inverse of _layout: [groups, nb, 8 lanes, 32] integer values."""
    groups, nb = values.shape[:2]
    if kind == "q4":
        pairs = values.reshape(groups, nb, 4, 2, BLOCK // 2).transpose(0, 1, 3, 2, 4)
        pairs = pairs.reshape(groups, nb, LANES, BLOCK // 2)
        return np.concatenate([pairs & 0x0F, pairs >> 4], axis=-1)
    out = values.reshape(groups, nb, 4, 4, 2, 8).transpose(0, 1, 4, 2, 3, 5)
    return out.reshape(groups, nb, LANES, BLOCK)


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
        """Blocks holding a packed matrix exactly, without a round trip through floats: up to 4
        bits → q4, 5 to 8 → q8 with minimums; None where it cannot (groups not whole blocks, or
        a scale or bias that fp16 does not hold exactly)."""
        n, k = packed.shape
        if packed.group_size % BLOCK:
            return None
        scales, biases = packed.group_scales()  # float32 [n, k / group]
        d, m = scales.astype(np.float16), biases.astype(np.float16)
        if not (np.array_equal(d, scales) and np.array_equal(m, biases)):
            return None
        groups, nb = _grouped(n, k)
        per = packed.group_size // BLOCK  # blocks per group, sharing its scale and bias

        def per_block(x: np.ndarray) -> np.ndarray:  # [n, k / group] → [groups, nb, 8]
            return np.ascontiguousarray(_lanes(np.repeat(x, per, axis=1), groups).swapaxes(1, 2))

        q = _lanes(packed.values().reshape(n, nb, BLOCK), groups).swapaxes(1, 2)
        kind: Kind = "q4" if packed.bits <= 4 else "q8"
        return cls(lib, kind, n, _layout(q, kind), per_block(d), per_block(m))

    def with_minimums(self) -> "BlockWeights | None":
        """The same matrix as q8 blocks with minimums (uint8 values), exactly: q4 values and
        minimums as they are, Q8_0's values + 128 with minimum -128 d; None if fp16 cannot hold
        that minimum."""
        if self.kind == "q8" and self.minimums is not None:
            return self
        values = _lane_values(self.values, self.kind)  # [groups, nb, 8, 32]
        minimums = self.minimums
        if minimums is None:  # Q8_0: d q = d (q + 128) - 128 d
            values = (values.astype(np.int16) + 128).astype(np.uint8)
            wide = self.scales.astype(np.float32) * np.float32(-128)
            minimums = wide.astype(np.float16)
            if not np.array_equal(minimums, wide):
                return None
        return BlockWeights(self.lib, "q8", self.n, _layout(values, "q8"), self.scales, minimums)

    @classmethod
    def stack(cls, parts: Sequence["BlockWeights"]) -> "BlockWeights | None":
        """Matrices stacked along their rows, exactly; None where it cannot (a part but the last
        not whole groups of 8 rows, or formats that do not meet in q8 with minimums)."""
        if any(p.n % LANES for p in parts[:-1]):
            return None
        same = {(p.kind, p.minimums is None) for p in parts}
        if len(same) > 1:
            promoted = [p.with_minimums() for p in parts]
            if any(p is None for p in promoted):
                return None
            parts = [p for p in promoted if p is not None]
        first = parts[0]
        minimums = None if first.minimums is None else np.concatenate([p.minimums for p in parts])
        return cls(
            first.lib,
            first.kind,
            sum(p.n for p in parts),
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.scales for p in parts]),
            minimums,
        )

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


def stacked_blocks(
    lib: Library,
    parts: Sequence["np.ndarray | Packed"],
    kind: Kind,
    threads: int | None,
    name: str,
) -> BlockWeights:
    """Several weights stacked along their rows as one block matrix (fused q/k/v, gate/up):
    each part as blocks_of makes it, stacked exactly; float parts alone are stacked first."""
    if not any(isinstance(p, Packed) for p in parts):
        return BlockWeights.quantize(lib, np.concatenate([dense(p) for p in parts]), kind, threads)
    fused = concat_rows(parts)
    if isinstance(fused, Packed):
        return blocks_of(lib, fused, kind, threads, name)
    stacked = BlockWeights.stack([blocks_of(lib, p, kind, threads, name) for p in parts])
    if stacked is not None:
        return stacked
    log.info("%s: parts in formats that do not stack: re-quantized to %s", name, kind)
    return BlockWeights.quantize(lib, fused, kind, threads)
