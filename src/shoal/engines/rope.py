"""The rotary embedding of multi-head latent attention (deepseek_v3): plain or YaRN, no framework.

As transformers 5.x computes it (`_compute_yarn_parameters`, `yarn_apply_mscale`): the rotary
part of each head is qk_rope_head_dim wide; YaRN blends interpolated (1 / factor) and original
frequencies over a ramp between the dims that rotate beta_fast and beta_slow times in the
original context, multiplies cos and sin by an attention factor, and, where mscale_all_dim is set,
scales the softmax by mscale(factor, mscale_all_dim)^2 as well, the non-rotary dims included.
"""

import math
from typing import Any, NamedTuple

import numpy as np

from shoal.engines.args import ModelArgs
from shoal.errors import UnsupportedModel

F32 = np.float32


class Rope(NamedTuple):
    """inv_freq [rope_dim / 2] float32, the factor on cos and sin, and the softmax scale."""

    inv_freq: np.ndarray
    attention_factor: float
    softmax_scale: float


def _kind(scaling: dict[str, Any]) -> str:
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def _mscale(factor: float, mscale: float) -> float:
    """YaRN's Eq. 21: 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_rope(args: ModelArgs) -> Rope:
    """The rotary frequencies and scales of a latent-attention model (default or YaRN rope)."""
    dim = args.qk_rope_head_dim
    scaling = args.rope_scaling or {}
    kind = _kind(scaling)
    pos_freqs = F32(args.rope_theta) ** (np.arange(0, dim, 2, dtype=F32) / F32(dim))  # [R/2]
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    if kind == "default":
        return Rope((1 / pos_freqs).astype(F32), 1.0, scale)
    if kind != "yarn":
        raise UnsupportedModel(f"deepseek_v3 rope_scaling type {kind!r} (default, yarn only)")
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    mscale = float(scaling.get("mscale") or 0)  # 0: not given
    mscale_all_dim = float(scaling.get("mscale_all_dim") or 0)
    attention = scaling.get("attention_factor")
    if attention is None:  # as transformers: mscale's ratio where both are given
        both = mscale and mscale_all_dim
        attention = (
            _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
            if both
            else _mscale(factor, 1)
        )
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times
        return (
            dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(args.rope_theta))
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(low)) / F32(high - low), 0, 1)  # [R/2]
    extrapolated = 1 - ramp  # [R/2]: 1 where the original frequency is kept
    inv_freq = (1 / (F32(factor) * pos_freqs)) * ramp + (1 / pos_freqs) * extrapolated  # [R/2]
    if mscale_all_dim:
        scale *= _mscale(factor, mscale_all_dim) ** 2
    return Rope(inv_freq.astype(F32), float(attention), scale)
