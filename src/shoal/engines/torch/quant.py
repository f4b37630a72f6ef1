"""Weight formats for the torch engine's linear layers: dense, fp16, int8 and int4.

Every format is a module with the same call, `y = proj(x)` for x [..., in] → y [..., out], built
once at load time from the layer's float weight. PyTorch's own kernels, and on CPU shoal's block
kernels for int8 and int4 (below):

- dense: `F.linear` in the engine's dtype.
- fp16: weights stored in half precision. On CPU, fbgemm's packed fp16 GEMM
  (`quantized.linear_dynamic_fp16`, float32 activations); elsewhere a half-precision matmul.
- int8: one int8 per weight, one scale per output row, weight-only (`_weight_int8pack_mm`).
  fbgemm's dynamic int8 GEMM is faster on AVX2 but quantizes the activations too, with one scale
  for the whole batch: SmolLM2 then loses "Paris" and a request's tokens depend on its batch
  neighbours, so it is not used.
- int4: groups of 32 weights along the input with a scale and an offset each, the layout of a
  GGUF Q4_1 block, so a Q4_0/Q4_1 checkpoint is re-expressed without further loss. On CUDA the
  tinygemm `_weight_int4pack_mm`.

On CPU, int8 and int4 use shoal's block kernels (`shoal.engines.native`, GGUF's Q8_0 and Q4_1
blocks, activations as 15-bit integers per block) where they compile: PyTorch's own int8
and int4 CPU kernels are vectorised for AVX-512 only, and on AVX2 machines were 3-6x slower
than fp16 (bench/engine_step.py), while the block kernels are faster than fp16. Without them,
int8 is `_weight_int8pack_mm` (one scale per row) and int4 `_weight_int4pack_mm_for_cpu`.

Every format gives a row the same result, to float32 rounding, whatever else is in the batch, so
continuous batching does not change a request's tokens.

An MLX-quantized checkpoint arrives as float weights (its values, dequantized exactly) plus the
packed matrices themselves: where they become block weights, those are taken without a round
trip through floats (native/blocks.py stacked_blocks), so 4- and 8-bit MLX weights stay exact.
"""

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shoal.engines import native
from shoal.engines.packed import Packed
from shoal.errors import BadRequest
from shoal.types.weights import QUANTS, Quant

INT4_GROUP = 32  # weights per scale/offset pair, as in GGUF's Q4_0/Q4_1 blocks

_ops: Any = torch.ops  # the packed kernels are untyped


def check_quant(quant: str) -> Quant:
    """quant itself if known, else a BadRequest naming the choices."""
    if quant not in QUANTS:
        raise BadRequest(f"quant {quant!r} is not one of {', '.join(QUANTS)}", param="quant")
    return cast(Quant, quant)


def head_format(quant: Quant, device: torch.device) -> Quant:
    """The output head's format under `quant`.

    A 4-bit head costs accuracy that 4-bit layers do not, so GGUFs keep it at 6-8 bits: under
    int4 the head is 8-bit blocks (Q8_0, as the GGUF has it) where the block kernels run, else
    fp16 (PyTorch's per-row int8 is coarser).
    """
    if quant != "int4":
        return quant
    return "int8" if device.type == "cpu" and native.library() is not None else "fp16"


def pack(
    weight: Tensor,
    bias: Tensor | None,
    quant: Quant,
    *,
    device: torch.device,
    dtype: torch.dtype,
    parts: Sequence[Tensor | Packed] = (),
    name: str = "",
) -> nn.Module:
    """A projection computing x @ weight.T + bias in the given format; weight [out, in] float.

    parts: what weight stacks along its rows as the checkpoint held it, each a float weight or
    an MLX-packed matrix (whose values weight holds); block weights take packed ones exactly.
    """
    if quant == "int4" and weight.shape[1] % INT4_GROUP:
        quant = "int8"  # a row that is not whole groups (rare): keep it 8-bit
    lib = native.library() if device.type == "cpu" else None
    if quant in ("int8", "int4") and lib is not None and weight.shape[1] % native.BLOCK == 0:
        kind: native.Kind = "q8" if quant == "int8" else "q4"
        threads = torch.get_num_threads()
        if any(isinstance(p, Packed) for p in parts):
            held = [p if isinstance(p, Packed) else p.float().numpy() for p in parts]
            return Blocked(native.stacked_blocks(lib, held, kind, threads, name), bias)
        w = weight.float().numpy()
        return Blocked(native.BlockWeights.quantize(lib, w, kind, threads), bias)
    if quant == "none":
        return Dense(weight, bias, device=device, dtype=dtype)
    if quant == "fp16":
        if device.type == "cpu":
            return Fp16Cpu(weight, bias)
        return Dense(weight, bias, device=device, dtype=torch.float16)
    if quant == "int8":
        return Int8(weight, bias, device=device)
    return Int4(weight, bias, device=device)


class Dense(nn.Module):
    """F.linear with the weight in `dtype`; the result comes back in the input's dtype."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, *, device: torch.device, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.to(device, dtype), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(device, dtype), False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        return F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)


class Fp16Cpu(nn.Module):
    """fbgemm's packed half-precision weights, float32 in and out."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        b = None if bias is None else bias.float()
        self.packed = _ops.quantized.linear_prepack_fp16(weight.float().contiguous(), b)

    def forward(self, x: Tensor) -> Tensor:
        return cast(Tensor, _ops.quantized.linear_dynamic_fp16(x.float(), self.packed)).to(x.dtype)


def _int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: (q [out, in] int8, scale [out] float32) with weight ≈ q * scale."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # [out]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [out, in]
    return q, scale


class Int8(nn.Module):
    """Weight-only int8: `_weight_int8pack_mm`, or a dequantizing matmul where it has no kernel."""

    def __init__(self, weight: Tensor, bias: Tensor | None, *, device: torch.device) -> None:
        super().__init__()
        q, scale = _int8_rows(weight)
        self.q = nn.Buffer(q.to(device))
        self.scale = nn.Buffer(scale.to(device))
        self.bias = None if bias is None else nn.Buffer(bias.float().to(device))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [N, in]
        try:
            y = torch._weight_int8pack_mm(x2, self.q, self.scale.to(x.dtype))
        except (RuntimeError, NotImplementedError):  # no kernel for this device or dtype
            y = F.linear(x2, self.q.to(x.dtype)) * self.scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], -1)


class Int4(nn.Module):
    """Groups of 32 4-bit weights with a scale and an offset each, in PyTorch's packed layout."""

    def __init__(self, weight: Tensor, bias: Tensor | None, *, device: torch.device) -> None:
        super().__init__()
        out, cols = weight.shape
        w = weight.float().reshape(out, cols // INT4_GROUP, INT4_GROUP)  # [out, groups, 32]
        low, high = w.amin(dim=-1), w.amax(dim=-1)  # [out, groups]
        scale = ((high - low) / 15).clamp(min=1e-12)  # [out, groups]
        q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        q = q.reshape(out, cols)  # [out, in], values 0..15: weight ≈ q * scale + low
        # The kernels compute (q - 8) * scale + zero, so zero = low + 8 * scale.
        zero = low + 8 * scale
        self.on_cuda = device.type == "cuda"
        dtype = torch.bfloat16 if self.on_cuda else torch.float32
        pairs = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
        self.scales_zeros = nn.Buffer(pairs.to(device, dtype))
        if self.on_cuda:
            nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)  # [out, in / 2]
            tiles = next(t for t in (8, 4, 2) if cols % (16 * t) == 0)  # in / 16 k-tiles
            self.packed = nn.Buffer(_ops.aten._convert_weight_to_int4pack(nibbles, tiles))
        else:
            self.packed = nn.Buffer(_ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.bias = None if bias is None else nn.Buffer(bias.float().to(device))

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [N, in]
        if self.on_cuda:
            y = _ops.aten._weight_int4pack_mm(
                x2.to(torch.bfloat16), self.packed, INT4_GROUP, self.scales_zeros
            )
        else:
            y = _ops.aten._weight_int4pack_mm_for_cpu(
                x2.float(), self.packed, INT4_GROUP, self.scales_zeros
            )
        y = cast(Tensor, y).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], -1)


class Blocked(nn.Module):
    """GGUF-style blocks of 32 (q8: Q8_0, q4: Q4_1) through shoal's native CPU kernels."""

    def __init__(self, blocks: native.BlockWeights, bias: Tensor | None) -> None:
        super().__init__()
        self.blocks = blocks
        self.bias = None if bias is None else nn.Buffer(bias.float())

    def forward(self, x: Tensor) -> Tensor:
        # Any number of rows: at 128-512 the integer kernel beat expanding the blocks to float32
        # for a float GEMM (measured on a 2-core AVX2 VM), and a row's bits never depend on it.
        shape, blocks = x.shape, self.blocks
        x2 = x.reshape(-1, shape[-1]).float().contiguous()  # [N, in]
        y = torch.empty(x2.shape[0], blocks.n)
        blocks.matmul_into(x2.data_ptr(), x2.shape[0], y.data_ptr(), torch.get_num_threads())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], -1)
