"""Block-quantized weights for the CPU engines, with a matmul compiled for this machine.

`BlockWeights` holds a [n, k] matrix in blocks of 32 along k, GGUF's own layouts: "q8" (int8
and an fp16 scale per block, Q8_0) and "q4" (4-bit, an fp16 scale and minimum per block, Q4_1).
A Q8_0 or Q4_1 checkpoint is held exactly. The product writes each activation as a 15-bit integer
per block of 32 (llama.cpp uses 8 bits) and sums integer products exactly, so a row's result does
not depend on the rest of the batch. `Decoder` runs a whole pass through a shard's
layers in one call.

The kernels are blockq.c, compiled on first use with the system's C compiler for this CPU
(-march=native: AVX2 where it exists) and cached under $XDG_CACHE_HOME/shoal/kernels. Where no
compiler works, `library()` is None, the failure is logged once, and the engines keep their own
formats. SHOAL_NATIVE=0 turns the kernels off.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from ctypes import c_int, c_int64, c_void_p
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from shoal.engines.args import ModelArgs

log = logging.getLogger(__name__)

BLOCK = 32  # weights per block along the input dimension
LANES = 8  # rows interleaved per group
Kind = Literal["q8", "q4"]
SOURCE = Path(__file__).with_name("blockq.c")
_ATTEMPTS = (  # tried in order; the first that compiles is used
    ("-march=native", "-fopenmp"),
    ("-fopenmp",),
    (),
)


class Matrix(ctypes.Structure):
    """blockq.c's shoal_matrix."""

    _fields_ = [
        ("kind", c_int64),
        ("n", c_int64),
        ("k", c_int64),
        ("values", c_void_p),
        ("scales", c_void_p),
        ("minimums", c_void_p),
    ]


class Layer(ctypes.Structure):
    """blockq.c's shoal_layer."""

    _fields_ = [
        ("qkv", Matrix),
        ("o", Matrix),
        ("gate_up", Matrix),
        ("down", Matrix),
        ("attn_norm", c_void_p),
        ("mlp_norm", c_void_p),
        ("qkv_bias", c_void_p),
        ("q_norm", c_void_p),
        ("k_norm", c_void_p),
    ]


class Dims(ctypes.Structure):
    """blockq.c's shoal_dims."""

    _fields_ = [
        ("hidden", c_int64),
        ("heads", c_int64),
        ("kv_heads", c_int64),
        ("head_dim", c_int64),
        ("inter", c_int64),
        ("eps", ctypes.c_float),
        ("inv_freq", c_void_p),
    ]


class Rows(ctypes.Structure):
    """blockq.c's shoal_rows."""

    _fields_ = [
        ("item", c_void_p),
        ("position", c_void_p),
        ("k", c_void_p),
        ("v", c_void_p),
        ("capacity", c_void_p),
    ]


_P = ctypes.POINTER
_SIGNATURES = {
    "shoal_blockq_simd": (c_int, []),
    "shoal_quantize_q8": (None, [c_void_p, c_int64, c_int64, c_void_p, c_void_p, c_int]),
    "shoal_quantize_q4": (None, [c_void_p, c_int64, c_int64, c_void_p, c_void_p, c_void_p, c_int]),
    "shoal_dequantize": (None, [_P(Matrix), c_void_p, c_int]),
    "shoal_matmul": (c_int, [_P(Matrix), c_void_p, c_int64, c_void_p, c_int]),
    "shoal_forward": (c_int, [_P(Dims), _P(Layer), c_int64, c_void_p, c_int64, _P(Rows), c_int]),
    "shoal_rms_norm": (
        None,
        [c_void_p, c_int64, c_int64, c_void_p, ctypes.c_float, c_void_p, c_int],
    ),
}


@dataclass(frozen=True)
class Library:
    """The loaded kernels: `lib` is the ctypes handle, `simd` whether AVX2 paths are in."""

    lib: ctypes.CDLL
    path: Path
    simd: bool


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/shoal/kernels, else ~/.cache/shoal/kernels."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "shoal" / "kernels"


@functools.cache
def library(portable: bool = False) -> Library | None:
    """The kernels for this machine, compiled once and cached; None if off or uncompilable.

    portable=True builds the plain-C paths only (what a CPU without AVX2 runs), for tests.
    """
    if os.environ.get("SHOAL_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: block-quantized kernels are off")
        return None
    errors = []
    for extra in _ATTEMPTS:
        flags = ["-O3", "-fPIC", "-shared", "-fno-math-errno", *extra]
        if portable:
            flags.append("-DSHOAL_PORTABLE")
        try:
            path = _build(compiler, flags)
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{' '.join(extra) or 'plain'}: {e}")
            continue
        return _load(path)
    log.warning("block-quantized kernels did not compile, they are off: %s", "; ".join(errors))
    return None


def _cpu() -> bytes:
    """What -march=native depends on: the CPU's model and feature flags where Linux lists them,
    so a cache shared by machines with different CPUs (an NFS home) never serves one the other's
    build."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [line for line in f if line.startswith((b"model name", b"flags"))]
        return b"".join(sorted(set(lines)))
    except OSError:
        return platform.processor().encode()


def _build(compiler: str, flags: list[str]) -> Path:
    """Compile blockq.c with flags into the cache (once per source, flags, compiler and CPU)."""
    source = SOURCE.read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, check=True, timeout=30
    ).stdout
    parts = [source, " ".join(flags).encode(), version, platform.machine().encode(), _cpu()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir() / f"blockq-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise subprocess.SubprocessError(result.stderr.strip().splitlines()[-1:] or "failed")
        os.replace(tmp, target)  # atomic: concurrent builders each write their own file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("compiled block-quantized kernels: %s", target)
    return target


def _load(path: Path) -> Library:
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return Library(lib, path, bool(lib.shoal_blockq_simd()))


def _threads(threads: int | None) -> int:
    return max(1, threads or os.cpu_count() or 1)


def _grouped(n: int, k: int) -> tuple[int, int]:
    """(groups of 8 rows, blocks per row) of an [n, k] block matrix."""
    return -(-n // LANES), k // BLOCK


def _address(array: np.ndarray, dtype: type, shape: tuple[int, ...]) -> int:
    """The data address of a C-contiguous array of dtype and shape, after checking all three."""
    if array.dtype != dtype or array.shape != shape or not array.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous {np.dtype(dtype)} array {shape}")
    return int(array.ctypes.data)


class BlockWeights:
    """A [n, k] matrix in blocks of 32 along k (k a multiple of 32), as numpy arrays.

    Rows are interleaved by 8 (blockq.c), groups = ceil(n / 8): q8 values int8
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
        _address(scales, np.float16, (*shape, LANES))
        if kind == "q8":
            _address(values, np.int8, (*shape, LANES * BLOCK))
        else:
            assert minimums is not None
            _address(values, np.uint8, (*shape, LANES * BLOCK // 2))
            _address(minimums, np.float16, (*shape, LANES))
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
        t = _threads(threads)
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
        if self.lib.lib.shoal_matmul(ctypes.byref(self.matrix), x, rows, out, _threads(threads)):
            raise MemoryError(f"no memory to quantize {rows} activation rows")

    def dequantize_into(self, out: int, threads: int | None = None) -> None:
        """The float32 [n, k] matrix, written at a raw address."""
        self.lib.lib.shoal_dequantize(ctypes.byref(self.matrix), out, _threads(threads))

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


@dataclass
class DecoderLayer:
    """One Llama-family layer for `Decoder`: block matrices and float32 vectors."""

    qkv: BlockWeights  # q, k, v fused: [(heads + 2 kv_heads) * head_dim, hidden]
    o: BlockWeights  # [hidden, heads * head_dim]
    gate_up: BlockWeights  # gate and up fused: [2 * inter, hidden]
    down: BlockWeights  # [hidden, inter]
    attn_norm: np.ndarray  # [hidden]
    mlp_norm: np.ndarray  # [hidden]
    qkv_bias: np.ndarray | None = None  # [(heads + 2 kv_heads) * head_dim] (qwen2)
    q_norm: np.ndarray | None = None  # [head_dim] (qwen3)
    k_norm: np.ndarray | None = None  # [head_dim] (qwen3)


def _vector(array: np.ndarray | None, size: int) -> int | None:
    return None if array is None else _address(array, np.float32, (size,))


class Decoder:
    """A forward pass through a shard's layers in a single native call (blockq.c shoal_forward).

    Per layer: RMSNorm, the fused q/k/v product, q/k norms and rotation, every row's keys and
    values written into its item's cache, causal attention over the item's cached positions, the
    output product added to the residual, RMSNorm, gate/up, SiLU(gate) * up, the down product
    added to the residual. Every step is per row and in a fixed order, so a row's result does not
    depend on the rest of the batch, nor on whether it came in a prompt or alone: replaying a
    request's tokens as one prompt (failover) rebuilds exactly the cache and logits it had.
    """

    MAX_HEAD_DIM = 512
    CACHE_DTYPE = np.float16  # keys and values: half the bytes a step reads, as llama.cpp's cache

    def __init__(
        self,
        lib: Library,
        *,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        inter: int,
        eps: float,
        inv_freq: np.ndarray,
        layers: list[DecoderLayer],
    ) -> None:
        if head_dim > self.MAX_HEAD_DIM or head_dim % 2 or heads % kv_heads:
            raise ValueError(f"no native forward for {heads}/{kv_heads} heads of {head_dim}")
        width = (heads + 2 * kv_heads) * head_dim
        expected = {
            "qkv": (width, hidden),
            "o": (hidden, heads * head_dim),
            "gate_up": (2 * inter, hidden),
            "down": (hidden, inter),
        }
        structs = []
        for layer in layers:
            for name, shape in expected.items():
                m = getattr(layer, name)
                if (m.n, m.k) != shape:
                    raise ValueError(f"{name} is {(m.n, m.k)}, expected {shape}")
            structs.append(
                Layer(
                    layer.qkv.matrix,
                    layer.o.matrix,
                    layer.gate_up.matrix,
                    layer.down.matrix,
                    _vector(layer.attn_norm, hidden),
                    _vector(layer.mlp_norm, hidden),
                    _vector(layer.qkv_bias, width),
                    _vector(layer.q_norm, head_dim),
                    _vector(layer.k_norm, head_dim),
                )
            )
        self.lib = lib
        self.hidden, self.head_dim, self.eps = hidden, head_dim, eps
        self.inv_freq = np.ascontiguousarray(inv_freq, dtype=np.float32)
        freq = _vector(self.inv_freq, head_dim // 2)
        self.dims = Dims(hidden, heads, kv_heads, head_dim, inter, eps, freq)
        self._layers = (Layer * len(structs))(*structs)
        self._count = len(structs)
        self._keep = layers  # the arrays the structs point into

    @classmethod
    def for_model(
        cls, lib: Library, args: ModelArgs, inv_freq: np.ndarray, layers: list[DecoderLayer]
    ) -> "Decoder":
        """The decoder of a Llama-family model file's layers (its arguments and rope)."""
        return cls(
            lib,
            hidden=args.hidden_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            inter=args.intermediate_size,
            eps=args.rms_norm_eps,
            inv_freq=inv_freq,
            layers=layers,
        )

    def forward(
        self,
        h: int,
        item: np.ndarray,
        position: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        capacity: np.ndarray,
        threads: int | None = None,
    ) -> None:
        """Advance h [rows, hidden] (float32 at address h) through every layer, in place.

        Row r is position position[r] of item item[r] (int64 [rows]). k, v: uint64 [items],
        addresses of each item's CACHE_DTYPE cache [layers, kv_heads, capacity, head_dim]; capacity:
        int64 [items]. Every row's keys and values are written at its position.
        """
        rows, items = len(item), len(k)
        _address(item, np.int64, (rows,))
        _address(position, np.int64, (rows,))
        for array, dtype in ((k, np.uint64), (v, np.uint64), (capacity, np.int64)):
            _address(array, dtype, (items,))
        if rows and (item.min() < 0 or item.max() >= items):
            raise ValueError("a row names an item that has no cache")
        if rows and np.any((position < 0) | (position >= capacity[item])):
            raise ValueError("a cache has no room for the position it is to write")
        frame = Rows(item.ctypes.data, position.ctypes.data, k.ctypes.data, v.ctypes.data,
                     capacity.ctypes.data)  # fmt: skip
        status = self.lib.lib.shoal_forward(
            ctypes.byref(self.dims), self._layers, self._count, h, rows, ctypes.byref(frame),
            _threads(threads),
        )  # fmt: skip
        if status:
            raise MemoryError(f"no memory for a native pass of {rows} rows")

    def rms_norm(
        self, x: int, rows: int, weight: np.ndarray, out: int, threads: int | None
    ) -> None:
        """out [rows, hidden] = RMSNorm(x) with weight [hidden], at raw float32 addresses: the
        final norm, by the same code as the layers' so a row is the same in any batch."""
        w = _vector(weight, self.hidden)
        self.lib.lib.shoal_rms_norm(x, rows, self.hidden, w, self.eps, out, _threads(threads))
