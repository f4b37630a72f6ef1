"""An affine-quantized matrix as MLX stores it: packed integers, a scale and a bias per group.

Row r's element i is the `bits`-bit integer at bits [i * bits, (i + 1) * bits) of the row's
little-endian uint32 words (bits 2, 3, 4, 5, 6 or 8; 3, 5 and 6 cross word boundaries); its
value is `scale * q + bias` with the scale and bias of its group of `group_size` elements along
the input dimension. Sources return checkpoints stored this way as `Packed`
(models/safetensors.py); engines dequantize them where they want floats, or turn them into
native blocks without a round trip through floats (native/blocks.py).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

F32 = np.float32
FLOATS = ("F16", "BF16", "F32")  # how the scales and biases are stored
BITS = (2, 3, 4, 5, 6, 8)  # MLX's affine widths


def widen(a: np.ndarray, dtype: str) -> np.ndarray:
    """Scales or biases as stored (float16, bfloat16 bit patterns in uint16, float32) → float32."""
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(F32)
    return a.astype(F32)


@dataclass(frozen=True, eq=False)
class Packed:
    """A packed affine-quantized matrix: weight uint32 [out, in * bits / 32], scales and biases
    [out, in / group_size] as stored (`float_dtype` F16, BF16 as raw uint16 bits, or F32)."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int
    float_dtype: str

    def __post_init__(self) -> None:
        out, words = self.weight.shape
        if self.bits not in BITS or self.float_dtype not in FLOATS or (words * 32) % self.bits:
            raise ValueError(f"unsupported packing: {self.bits} bits, {self.float_dtype} scales")
        groups = words * 32 // self.bits // self.group_size
        for a in (self.scales, self.biases):
            if a.shape != (out, groups):
                raise ValueError(
                    f"scales/biases {a.shape} do not fit a {self.bits}-bit weight "
                    f"{self.weight.shape} in groups of {self.group_size}"
                )

    @property
    def shape(self) -> tuple[int, int]:
        """The logical [out, in] shape."""
        return self.weight.shape[0], self.weight.shape[1] * 32 // self.bits

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed integers, scales and biases as stored."""
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes

    def values(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """The integers q as uint8 [rows, in]."""
        raw = np.ascontiguousarray(self.weight[rows], dtype="<u4").view(np.uint8)  # [r, in*bits/8]
        if self.bits == 8:
            return raw
        if 8 % self.bits:  # 3, 5, 6 bits: a little-endian bit stream, values across bytes
            stream = np.unpackbits(raw, axis=1, bitorder="little")  # [r, in * bits]
            fields = stream.reshape(raw.shape[0], -1, self.bits)  # [r, in, bits]
            return np.packbits(fields, axis=2, bitorder="little")[..., 0]  # [r, in]
        per = 8 // self.bits  # values per byte, lowest bits first
        shifts = np.arange(0, 8, self.bits, dtype=np.uint8)  # [per]
        q = (raw[..., None] >> shifts) & np.uint8((1 << self.bits) - 1)  # [r, bytes, per]
        return q.reshape(raw.shape[0], raw.shape[1] * per)

    def group_scales(self, rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(scales, biases) as float32 [rows, in / group_size]."""
        return widen(self.scales[rows], self.float_dtype), widen(
            self.biases[rows], self.float_dtype
        )

    def rows(self, ids: np.ndarray | slice = slice(None)) -> np.ndarray:
        """float32 [len(ids), in]: the rows `ids` dequantized (an embedding lookup)."""
        q = self.values(ids).astype(F32)  # [r, in]
        scales, biases = self.group_scales(ids)  # [r, groups]
        r, n_in = q.shape
        q = q.reshape(r, -1, self.group_size)  # [r, groups, group]
        w = q * scales[..., None] + biases[..., None]  # as MLX: scale * q + bias, in float32
        return w.reshape(r, n_in)

    def dequantize(self) -> np.ndarray:
        """The float32 [out, in] matrix."""
        return self.rows(slice(None))

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        """Rows by index, so a packed embedding table is looked up like an array."""
        return self.rows(np.asarray(ids))


def concat_rows(parts: Sequence["np.ndarray | Packed"]) -> "np.ndarray | Packed":
    """Matrices stacked along their output rows: packed if every part is packed alike, else
    float32 (each packed part dequantized)."""
    first = parts[0]
    if isinstance(first, Packed) and all(
        isinstance(p, Packed)
        and (p.bits, p.group_size, p.float_dtype, p.shape[1])
        == (first.bits, first.group_size, first.float_dtype, first.shape[1])
        for p in parts
    ):
        packed = [p for p in parts if isinstance(p, Packed)]
        return Packed(
            np.concatenate([p.weight for p in packed]),
            np.concatenate([p.scales for p in packed]),
            np.concatenate([p.biases for p in packed]),
            first.bits,
            first.group_size,
            first.float_dtype,
        )
    return np.concatenate([dense(p) for p in parts])


def dense(array: "np.ndarray | Packed") -> np.ndarray:
    """A contiguous float32 array: a packed matrix dequantized, anything else converted."""
    if isinstance(array, Packed):
        return array.dequantize()
    return np.ascontiguousarray(array, dtype=F32)
