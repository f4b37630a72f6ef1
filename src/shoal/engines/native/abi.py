"""The library's C interface as ctypes sees it: blocks.h's and forward.c's structs, and the
signatures of every exported function (bound once when build.py loads the library)."""

import ctypes
from ctypes import c_int, c_int64, c_void_p
from dataclasses import dataclass
from pathlib import Path


class Matrix(ctypes.Structure):
    """blocks.h's shoal_matrix."""

    _fields_ = [
        ("kind", c_int64),
        ("n", c_int64),
        ("k", c_int64),
        ("values", c_void_p),
        ("scales", c_void_p),
        ("minimums", c_void_p),
    ]


class Layer(ctypes.Structure):
    """forward.c's shoal_layer."""

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
        ("experts", c_int64),
        ("top_k", c_int64),
        ("norm_topk_prob", c_int64),
        ("router", c_void_p),
        ("expert_gate_up", c_void_p),  # Matrix [experts]
        ("expert_down", c_void_p),  # Matrix [experts]
    ]


class Dims(ctypes.Structure):
    """forward.c's shoal_dims."""

    _fields_ = [
        ("hidden", c_int64),
        ("heads", c_int64),
        ("kv_heads", c_int64),
        ("head_dim", c_int64),
        ("inter", c_int64),
        ("moe_inter", c_int64),
        ("eps", ctypes.c_float),
        ("inv_freq", c_void_p),
    ]


class Rows(ctypes.Structure):
    """forward.c's shoal_rows."""

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


def bind(lib: ctypes.CDLL, path: Path) -> Library:
    """The loaded library with every exported function's signature set."""
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return Library(lib, path, bool(lib.shoal_blockq_simd()))
