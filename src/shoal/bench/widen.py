"""A larger model made from a small GGUF: its feed-forward layers widened k times, exactly.

Speculative decoding pays most where a decode step is bound by the bytes of the weights, which
SmolLM2-135M (80 MB at int4, much of it in cache) is not. No bigger model can be downloaded in
CI, and a random one is no use (what it drafts says nothing about real text), so the bench
makes one: every FFN's intermediate dimension is tiled k times (gate and up rows repeated,
down's columns repeated with each copy scaled by 1/k). Each copy of a neuron computes the same
value and k copies of value/k sum to the original, so the model says exactly what the small
one says while a decode step reads more bytes (SmolLM2, k = 8: 0.69 B parameters, 450 MB at
Q4_1, 4.5x the 98 MB). k is a power of two, so 1/k is exact in the blocks' fp16 scales.

The copy is made on the quantized blocks, never dequantized: gate and up rows are copied
whole; down's rows are tiled with each block's scale (and Q4_1's offset) divided by k.
"""

from pathlib import Path

import gguf
import numpy as np

from shoal.errors import BadRequest

# Per block of 32 weights: the fp16 fields a scale applies to (byte offsets), the block's bytes.
_SCALED: dict[gguf.GGMLQuantizationType, tuple[tuple[int, ...], int]] = {
    gguf.GGMLQuantizationType.Q4_0: ((0,), 18),  # d, 16 bytes of nibbles
    gguf.GGMLQuantizationType.Q4_1: ((0, 2), 20),  # d, m, 16 bytes of nibbles
    gguf.GGMLQuantizationType.Q8_0: ((0,), 34),  # d, 32 int8
}


def widened_path(folder: Path, source: Path, factor: int) -> Path:
    return folder / f"{source.stem}.ffn-x{factor}.gguf"


def widen_ffn(source: Path, dest: Path, factor: int) -> Path:
    """Write `source` (a llama-family GGUF) with every FFN `factor` times as wide to `dest`."""
    if factor < 2 or factor & (factor - 1):
        raise BadRequest(f"the widening factor must be a power of two from 2, not {factor}")
    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    key = f"{arch}.feed_forward_length"
    if key not in reader.fields:
        raise BadRequest(f"{source.name}: no {key}, so not a model whose FFN can be widened")
    if f"{arch}.expert_count" in reader.fields:
        raise BadRequest(f"{source.name} is a mixture of experts; only dense FFNs are widened")
    for tensor in reader.tensors:  # before writing anything
        if tensor.name.endswith(".ffn_down.weight"):
            _check(tensor.tensor_type, tensor.name)
    writer = gguf.GGUFWriter(dest, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer writes these itself
        value = field.contents()
        if name == key:
            value = int(value) * factor
        elif name == "general.name":
            value = f"{value} (FFN x{factor})"
        writer.add_key_value(
            name, value, field.types[0], field.types[1] if len(field.types) > 1 else None
        )
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.name.endswith((".ffn_gate.weight", ".ffn_up.weight")):
            data = np.tile(data, (factor, 1))  # rows are the intermediate dimension
        elif tensor.name.endswith(".ffn_down.weight"):
            data = np.tile(_scaled(data, tensor.tensor_type, factor), (1, factor))
        writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def _scaled(data: np.ndarray, kind: gguf.GGMLQuantizationType, factor: int) -> np.ndarray:
    """`data` (rows of one tensor, as the reader holds them) times 1/factor; `kind` is one
    widen_ffn checked before writing (`_check`)."""
    if kind in _FLOAT:
        return (data / factor).astype(data.dtype)
    offsets, size = _SCALED[kind]
    rows = data.reshape(data.shape[0], -1, size).copy()
    for at in offsets:
        scale = rows[:, :, at : at + 2].copy().view(np.float16)
        rows[:, :, at : at + 2] = (scale / np.float16(factor)).view(np.uint8)
    return rows.reshape(data.shape)


_FLOAT = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def _check(kind: gguf.GGMLQuantizationType, name: str) -> None:
    if kind not in _FLOAT and kind not in _SCALED:
        raise BadRequest(f"{name} is {kind.name}; only F32, F16, Q4_0, Q4_1 and Q8_0 are widened")
